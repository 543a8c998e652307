//! A stage's base: `FROM scratch`, an earlier stage, or an image the plan
//! resolved (its platform checked), and the config a stage inherits from it
//! as Docker does.

use super::{at, StageError, State, DEFAULT_PATH};
use crate::dockerfile::expand::{expand_word, Vars};
use crate::dockerfile::{Instr, Kind};
use crate::image::{host_platform, ImageConfig, Platform};
use crate::store::BaseImage;

/// The variable names a word refers to (`$NAME`, `${NAME…}`), in order.
fn variables_in(word: &str) -> Vec<String> {
    let b = word.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' {
            let start = i + 1 + usize::from(b.get(i + 1) == Some(&b'{'));
            let end = (start..b.len())
                .find(|&j| !(b[j].is_ascii_alphanumeric() || b[j] == b'_'))
                .unwrap_or(b.len());
            if end > start {
                out.push(word[start..end].to_string());
            }
            i = end.max(i + 1);
        } else {
            i += 1;
        }
    }
    out
}

impl State<'_> {
    /// Starts from a base config, as Docker does: its run config, env
    /// (PATH added if it has none), working dir, user, shell, history,
    /// platform and diff_ids; ONBUILD triggers are not inherited.
    pub(super) fn inherit(&mut self, c: &ImageConfig) {
        let mut run = c.config.clone();
        self.env = run
            .env
            .take()
            .unwrap_or_default()
            .into_iter()
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (kv, String::new()),
            })
            .collect();
        if !self.env.iter().any(|(k, _)| k == "PATH") {
            self.env.push(("PATH".into(), DEFAULT_PATH.into()));
        }
        run.on_build = None;
        // An empty WorkingDir (images `docker import`ed, or made by the
        // classic builder) is `/`, as Docker takes it.
        self.workdir = run
            .working_dir
            .clone()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "/".into());
        self.user = run.user.clone().unwrap_or_default();
        if let Some(sh) = &run.shell {
            self.shell = sh.clone();
        }
        self.run = run;
        self.author = c.author.clone();
        self.history = c.history.clone();
        self.diff_ids = c.rootfs.diff_ids.clone();
        self.os = c.os.clone();
        self.architecture = c.architecture.clone();
        self.variant = c.variant.clone();
    }

    /// Loads an image reference that the plan resolved.
    /// Loads a base image; `scanned` says each of its layers is scanned
    /// next (which verifies it in the same pass).
    pub(super) fn resolve_image(
        &self,
        reference: &str,
        platform: Option<&Platform>,
        scanned: bool,
    ) -> Result<BaseImage, String> {
        self.bases.load(reference, platform, self.opts, !scanned)
    }

    pub(super) fn from(
        &mut self,
        ins: &Instr,
        global: &Vars,
        scan: bool,
    ) -> Result<(), StageError> {
        let Kind::From { image, flags, .. } = &ins.kind else {
            unreachable!()
        };
        let word = image;
        let image = expand_word(word, global, self.escape).map_err(|e| at(ins, e.0))?;
        if image.is_empty() {
            let vars = variables_in(word);
            let what = match vars.first() {
                Some(v) => format!(
                    "${v} is empty or not set: give it with --build-arg {v}=IMAGE, and declare ARG {v} before the first FROM (or build with --build-args-in-from, as kaniko lets build arguments reach FROM)"
                ),
                None => "an empty image name".into(),
            };
            return Err(at(ins, format!("FROM names no image: {what}")));
        }
        let mut platform = None;
        for (name, value) in flags {
            if name != "platform" {
                return Err(at(ins, format!("unknown flag --{name}")));
            }
            let v = expand_word(value.as_deref().unwrap_or(""), global, self.escape)
                .map_err(|e| at(ins, e.0))?;
            let p = Platform::parse(&v).ok_or_else(|| {
                at(
                    ins,
                    format!("--platform={v}: expected OS/ARCH[/VARIANT], e.g. linux/amd64"),
                )
            })?;
            platform = Some((v, p));
        }
        if image.eq_ignore_ascii_case("scratch") {
            if let Some((v, p)) = &platform {
                let host = host_platform();
                if p.os != host.os || p.architecture != host.architecture {
                    return Err(at(
                        ins,
                        format!(
                            "--platform={v}: FROM scratch builds for the host platform ({}/{}) only",
                            host.os, host.architecture
                        ),
                    ));
                }
            }
            return Ok(());
        }
        if let Some(n) = self.earlier.find(&image, false) {
            let Some(prev) = self.earlier.done[n].as_deref().cloned() else {
                return Err(at(ins, format!("stage {image} was not built")));
            };
            let keep_all = self.fs.keep_all;
            self.inherit(&prev.config);
            self.history = prev.config.history.clone();
            self.base = prev.base;
            self.base_diff_ids = self.diff_ids.clone();
            self.base_diff_ids.truncate(self.base.len());
            self.layers = prev.layers;
            self.dirs = prev.dirs;
            self.fs = prev.fs;
            self.chain = prev.chain;
            self.keys = prev.keys;
            self.reports = prev.reports;
            self.fs.keep_all |= keep_all;
            return Ok(());
        }
        let base = self
            .resolve_image(&image, platform.as_ref().map(|p| &p.1), scan)
            .map_err(|m| at(ins, m))?;
        if let Some(t) = base
            .config
            .config
            .on_build
            .as_ref()
            .filter(|t| !t.is_empty())
        {
            return Err(at(
                ins,
                format!(
                    "base image {image} has ONBUILD triggers ({}); kiln does not run them: build from an image without them",
                    t.join("; ")
                ),
            ));
        }
        self.inherit(&base.config);
        if scan {
            for (d, path) in &base.layers {
                self.fs.apply_blob(path).map_err(|e| {
                    at(
                        ins,
                        format!("reading layer {} of base image {image}: {e}", d.digest),
                    )
                })?;
            }
        }
        self.chain = format!("image@{}", base.manifest_digest);
        self.base = base.layers;
        self.base_diff_ids = base.config.rootfs.diff_ids.clone();
        Ok(())
    }
}
