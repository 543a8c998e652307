//! The step cache inside a stage: each layer-producing step's key (see
//! `crate::steps`), the lookup that takes a cached layer as it is, and the
//! record of a step that ran.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::{Layer, State};
use crate::dockerfile::Instr;
use crate::layer::{Content, Entries, FileSource};
use crate::steps::StepKey;

impl State<'_> {
    /// The fields every step key has: the parent, the layer format, the
    /// environment, ARGs, USER, WORKDIR and SHELL.
    pub(super) fn key(&self, kind: &str) -> StepKey {
        let mut k = StepKey::new(kind, &self.chain);
        self.opts.layer_format().add_to(&mut k);
        k.pairs(
            "env",
            self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        // ARGs reach a RUN's environment; COPY, ADD and WORKDIR only
        // through expansion, which their entries already show.
        let args = self.args.iter().filter(|_| kind == "run");
        k.pairs("args", args.map(|(k, v)| (k.as_str(), v.as_str())))
            .text("user", &self.user)
            .text("workdir", &self.workdir)
            .list("shell", &self.shell);
        k
    }

    /// A layer's entries by content (kiln-v1 digests of context files,
    /// reused from the context hash; other files hashed), as one key.
    pub(super) fn describe(&mut self, entries: &Entries) -> Result<String, String> {
        use sha2::Digest as _;
        if self.digests.is_none() {
            let mut m = HashMap::new();
            for e in self.view.ctx.entries.values() {
                if let (crate::context::Source::File(p), Some(d)) = (&e.source, e.digest) {
                    m.insert(p.to_path_buf(), d);
                }
            }
            self.digests = Some(m);
        }
        let known = self.digests.as_ref().expect("built above");
        let mut k = StepKey::new("entries", "");
        for (path, e) in entries {
            k.bytes("path", path)
                .number("mode", e.mode.into())
                .number("uid", e.uid)
                .number("gid", e.gid);
            match &e.content {
                Content::Dir => k.text("dir", ""),
                Content::Symlink(t) => k.bytes("link", t),
                Content::File {
                    source: FileSource::Bytes(b),
                    ..
                } => k.bytes("bytes-sha256", &sha2::Sha256::digest(b)),
                Content::File {
                    source: FileSource::Path(p),
                    size,
                } => {
                    let d = match known.get(&**p) {
                        Some(d) => *d,
                        None => {
                            let f = crate::fsx::open_deep(p)
                                .map_err(|e| format!("reading {}: {e}", p.display()))?;
                            crate::context::hash_file(f, p, *size).map_err(|e| e.to_string())?
                        }
                    };
                    k.bytes("file-kiln-v1", &d).number("size", *size)
                }
            };
        }
        Ok(k.finish())
    }

    /// What names another stage's or image's filesystem in a step key:
    /// the stage's last step key, or the image's manifest digest.
    pub(super) fn source_key(&self, from: &str) -> Result<String, String> {
        if let Some(n) = self.earlier.find(from, true) {
            return match self.earlier.done[n].as_ref() {
                Some(prev) => Ok(prev.chain.clone()),
                None => Err(format!("--mount from={from}: stage {n} was not built")),
            };
        }
        let base = self
            .resolve_image(from, None, false)
            .map_err(|m| format!("--mount from={from}: {m}"))?;
        Ok(format!("image@{}", base.manifest_digest))
    }

    /// The content of a file or directory tree a RUN binds (read-only):
    /// paths, modes and content digests, as one key.
    pub(super) fn tree_digest(&self, root: &Path) -> Result<String, String> {
        let mut k = StepKey::new("tree", "");
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let p = if rel.as_os_str().is_empty() {
                root.to_path_buf()
            } else {
                root.join(&rel)
            };
            let md = std::fs::symlink_metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            k.bytes("path", rel.as_os_str().as_encoded_bytes())
                .number("mode", std::os::unix::fs::MetadataExt::mode(&md).into());
            if md.is_dir() {
                let mut names: Vec<_> = std::fs::read_dir(&p)
                    .map_err(|e| format!("{}: {e}", p.display()))?
                    .filter_map(|e| e.ok().map(|e| e.file_name()))
                    .collect();
                names.sort();
                names.reverse();
                stack.extend(names.into_iter().map(|n| rel.join(n)));
            } else if md.is_file() {
                let f = std::fs::File::open(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                let d = crate::context::hash_file(f, &p, md.len()).map_err(|e| e.to_string())?;
                k.bytes("file-kiln-v1", &d);
            } else if md.file_type().is_symlink() {
                let t = std::fs::read_link(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                k.bytes("link", t.as_os_str().as_encoded_bytes());
            }
        }
        Ok(k.finish())
    }

    /// Looks a step up; on a hit (its layer verified in the store: its
    /// digest, and its diff_id from the uncompressed bytes) the layer joins
    /// the stage as it is. Nothing from the cache is trusted unverified:
    /// a registry error, a corrupt blob or an entry whose diff_id is not
    /// its layer's is a miss with a one-line warning, never a failure and
    /// never a use. A miss makes every later step a miss.
    pub(super) fn try_cached(&mut self, ins: &Instr, key: &str) -> Result<bool, String> {
        let Some(st) = self
            .opts
            .steps
            .as_ref()
            .filter(|s| s.lookup && !self.missed)
        else {
            self.missed = true;
            return Ok(false);
        };
        let miss = |why: String| {
            eprintln!("kiln: warning: step cache entry {key}: {why}; running the step");
        };
        let entry = match st.cache.get(key) {
            Some(e) => Some(e),
            None => match &st.remote {
                Some(r) => match r.fetch(key, &st.cache, &st.store) {
                    Ok(e) => e,
                    Err(e) => {
                        miss(format!("fetching it from the cache registry: {e}"));
                        None
                    }
                },
                None => None,
            },
        };
        let Some(entry) = entry else {
            self.missed = true;
            return Ok(false);
        };
        let checked = st
            .store
            .verify(&entry.layer)
            .map_err(|e| {
                // A corrupt or missing layer: rebuilt, never served.
                let _ = std::fs::remove_file(st.store.blob_path(&entry.layer.digest));
                e.to_string()
            })
            .and_then(|blob| {
                let scan = crate::layer::scan::scan(&blob).map_err(|e| e.to_string())?;
                // What --reproducible did travels on the descriptor into
                // the image: only what this build would say, and what the
                // layer bears out.
                if let Some(note) = entry
                    .layer
                    .annotations
                    .get(crate::image::ANNOTATION_REPRODUCIBLE)
                {
                    if !self.opts.reproducible {
                        return Err("its layer claims what --reproducible did, and this build does not use --reproducible".into());
                    }
                    crate::sandbox::reproducible::verify_note(note, &scan)?;
                }
                match &scan.diff_id {
                    Some(d) if *d == entry.diff_id => Ok((blob, scan)),
                    got => Err(format!(
                        "its layer {} has the diff_id {}, not the {} the entry claims",
                        entry.layer.digest,
                        got.as_ref().map_or("(unknown)", |d| d.as_str()),
                        entry.diff_id
                    )),
                }
            });
        let (blob, scan) = match checked {
            Ok(x) => x,
            Err(why) => {
                st.cache.remove(key);
                miss(why);
                self.missed = true;
                return Ok(false);
            }
        };
        self.fs
            .apply_scan(&scan, std::sync::Arc::from(blob.as_path()));
        self.layers.push(Layer::Cached {
            desc: Box::new(entry.layer),
            diff_id: entry.diff_id,
            blob,
        });
        self.dirs.push(None);
        self.keys.push(None);
        self.chain = key.to_string();
        self.opts.progress.say(&format!(
            "#{} CACHED {}",
            self.view.ctx.original_line(ins.line),
            ins.text
        ));
        self.reports.push(crate::steps::StepReport {
            line: self.view.ctx.original_line(ins.line),
            instruction: ins.text.clone(),
            key: key.to_string(),
            cached: true,
        });
        Ok(true)
    }

    /// Records a step that ran (its layer was just pushed).
    pub(super) fn fresh(&mut self, ins: &Instr, key: String) {
        self.keys.push(Some((key.clone(), ins.text.clone())));
        self.reports.push(crate::steps::StepReport {
            line: self.view.ctx.original_line(ins.line),
            instruction: ins.text.clone(),
            key: key.clone(),
            cached: false,
        });
        self.chain = key;
    }
}
