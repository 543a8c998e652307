//! The image filesystem as the build sees it: what the base image's layers
//! and the stage's own layers hold, as metadata (never unpacked to disk).
//! Base layers are scanned once (whiteouts and opaque directories applied);
//! their files' bytes stay in the layer blobs until a `COPY --from` needs
//! them, when [`ImageFs::extract`] streams each blob once and spools only
//! the wanted files. User and group lookups read the image's own
//! `/etc/passwd` and `/etc/group`.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

// Tar member names are cleaned like paths: no `./`, no leading or trailing slash.
use crate::dockerfile::ignore::clean as norm;
use crate::layer::{Content, Entries, FileSource, LayerEntry};

/// Where the bytes of a file from a base layer live.
#[derive(Clone, Debug)]
pub struct Origin {
    /// The layer blob.
    pub blob: Arc<Path>,
    /// For a hard link: the path (in the same layer) holding the bytes.
    pub link: Option<Vec<u8>>,
}

/// Paths (no leading slash) → what the image holds there so far.
#[derive(Clone, Debug, Default)]
pub struct ImageFs {
    pub nodes: Entries,
    /// Files whose bytes are in a base layer blob.
    pub origins: HashMap<Vec<u8>, Origin>,
    /// Keep every file (a stage another stage copies from), not only
    /// directories, symlinks and the user databases.
    pub keep_all: bool,
}

use crate::layer::scan::{self, SMALL};

impl ImageFs {
    pub fn is_dir(&self, path: &[u8]) -> bool {
        path.is_empty() || self.nodes.get(path).is_some_and(LayerEntry::is_dir)
    }

    fn keeps(&self, p: &[u8], e: &LayerEntry) -> bool {
        self.keep_all || !matches!(e.content, Content::File { .. }) || SMALL.contains(&p)
    }

    /// Removes `path` and everything under it.
    fn remove_tree(&mut self, path: &[u8]) {
        self.nodes.remove(path);
        self.origins.remove(path);
        self.remove_children(path);
    }

    /// Removes everything strictly under `dir`.
    fn remove_children(&mut self, dir: &[u8]) {
        let doomed: Vec<Vec<u8>> = if dir.is_empty() {
            self.nodes.keys().cloned().collect()
        } else {
            let mut start = dir.to_vec();
            start.push(b'/');
            self.nodes
                .range(start.clone()..)
                .take_while(|(k, _)| k.starts_with(&start))
                .map(|(k, _)| k.clone())
                .collect()
        };
        for k in doomed {
            self.nodes.remove(&k);
            self.origins.remove(&k);
        }
    }

    /// Records a layer's entries (later layers win). Only what later steps
    /// ask about is kept unless `keep_all`: directories, symlinks and the
    /// user and group databases; keeping every file of a 200,000-file COPY
    /// doubled kiln's memory.
    pub fn apply(&mut self, layer: &Entries) {
        for (p, e) in layer {
            self.origins.remove(p);
            if !e.is_dir() {
                // A file or symlink replaces whatever tree was there.
                self.remove_children(p);
            }
            if self.keeps(p, e) {
                self.nodes.insert(p.clone(), e.clone());
            } else {
                self.nodes.remove(p);
            }
        }
    }

    /// Applies a layer blob (a base image's, a cached step's, a RUN's),
    /// whiteouts included. The blob is scanned once ([`scan::scan`]: a
    /// store blob's scan is recorded with its verification).
    pub fn apply_blob(&mut self, blob: &Path) -> io::Result<()> {
        let s = scan::scan(blob)?;
        self.apply_scan(&s, Arc::from(blob));
        Ok(())
    }

    /// Applies a scanned layer whose bytes are in `blob`.
    pub fn apply_scan(&mut self, s: &scan::Scan, blob: Arc<Path>) {
        for d in &s.opaque {
            self.remove_children(d);
        }
        for w in &s.whiteouts {
            self.remove_tree(w);
        }
        for m in &s.members {
            let (mode, uid, gid) = (m.mode, m.uid, m.gid);
            let origin = |link: Option<Vec<u8>>| Origin {
                blob: blob.clone(),
                link,
            };
            let (e, origin) = match &m.kind {
                scan::Kind::Dir => (LayerEntry::dir(mode, uid, gid), None),
                scan::Kind::Symlink(target) => (
                    LayerEntry {
                        content: Content::Symlink(target.clone()),
                        mode: 0o777,
                        uid,
                        gid,
                    },
                    None,
                ),
                scan::Kind::HardLink { target, size } => (
                    placeholder(*size, mode, uid, gid),
                    Some(origin(Some(target.clone()))),
                ),
                scan::Kind::File { size } => {
                    (placeholder(*size, mode, uid, gid), Some(origin(None)))
                }
                scan::Kind::Small(b) => (
                    LayerEntry::file(
                        FileSource::Bytes(Arc::from(&b[..])),
                        b.len() as u64,
                        mode,
                        uid,
                        gid,
                    ),
                    None,
                ),
            };
            let p = &m.path;
            if !e.is_dir() {
                self.remove_children(p);
            }
            self.origins.remove(p);
            if self.keeps(p, &e) {
                if let Some(o) = origin {
                    self.origins.insert(p.clone(), o);
                }
                self.nodes.insert(p.clone(), e);
            } else {
                self.nodes.remove(p);
            }
        }
    }

    /// Follows symlinks in `path` (all components) as the image would,
    /// never leaving the image root. Linear in the path's length: only
    /// prefixes no longer than the image's longest symlink path are looked up.
    pub fn resolve(&self, path: &[u8]) -> Vec<u8> {
        let longest = self
            .nodes
            .iter()
            .filter(|(_, e)| matches!(e.content, Content::Symlink(_)))
            .map(|(k, _)| k.len())
            .max()
            .unwrap_or(0);
        let comps = |p: &'_ [u8]| -> Vec<Vec<u8>> {
            p.split(|&c| c == b'/')
                .filter(|c| !c.is_empty())
                .map(<[u8]>::to_vec)
                .rev()
                .collect()
        };
        let mut todo = comps(path);
        let mut out: Vec<u8> = Vec::new();
        // Where each component of `out` starts (its '/' included).
        let mut starts: Vec<usize> = Vec::new();
        let mut hops = 0;
        while let Some(c) = todo.pop() {
            match c.as_slice() {
                b"." => continue,
                b".." => {
                    if let Some(s) = starts.pop() {
                        out.truncate(s);
                    }
                    continue;
                }
                _ => {}
            }
            let start = out.len();
            starts.push(start);
            if start > 0 {
                out.push(b'/');
            }
            out.extend_from_slice(&c);
            if out.len() > longest {
                continue;
            }
            if let Some(LayerEntry {
                content: Content::Symlink(target),
                ..
            }) = self.nodes.get(&out)
            {
                hops += 1;
                if hops > crate::limits::MAX_SYMLINK_HOPS {
                    break;
                }
                out.truncate(start);
                starts.pop();
                if target.starts_with(b"/") {
                    out.clear();
                    starts.clear();
                }
                todo.extend(comps(target));
            }
        }
        out
    }

    /// Reads the files `wanted` (image paths) out of their base layer blobs
    /// into `spool`, one pass over each blob; returns path → spooled file.
    pub fn extract(
        &self,
        wanted: &[Vec<u8>],
        spool: &Path,
    ) -> io::Result<HashMap<Vec<u8>, PathBuf>> {
        // The path whose bytes each wanted file has (hard links → their target).
        let mut by_blob: BTreeMap<Arc<Path>, Vec<Vec<u8>>> = BTreeMap::new();
        let mut data_path: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        for w in wanted {
            let Some(o) = self.origins.get(w) else {
                continue;
            };
            let src = o.link.clone().unwrap_or_else(|| w.clone());
            by_blob.entry(o.blob.clone()).or_default().push(src.clone());
            data_path.insert(w.clone(), src);
        }
        fs::create_dir_all(spool)?;
        let mut spooled: HashMap<Vec<u8>, PathBuf> = HashMap::new();
        for (n, (blob, paths)) in by_blob.into_iter().enumerate() {
            let want: std::collections::HashSet<Vec<u8>> = paths.into_iter().collect();
            let mut ar = tar::Archive::new(crate::source::layer_file(&blob)?);
            for (i, entry) in ar.entries()?.enumerate() {
                let mut entry = entry?;
                let et = entry.header().entry_type();
                if !(et.is_file() || et == tar::EntryType::Continuous) {
                    continue;
                }
                let path = norm(&entry.path_bytes());
                if !want.contains(&path) {
                    continue;
                }
                let file = spool.join(format!("from-{n}-{i}"));
                let mut out = File::create(&file)?;
                io::copy(&mut entry, &mut out)?;
                spooled.insert(path, file);
            }
        }
        Ok(data_path
            .into_iter()
            .filter_map(|(w, src)| spooled.get(&src).map(|f| (w, f.clone())))
            .collect())
    }

    /// The bytes of a small file in the image (for /etc/passwd and /etc/group).
    pub fn read_small(&self, path: &[u8]) -> Option<Vec<u8>> {
        match &self.nodes.get(path)?.content {
            Content::File {
                source: FileSource::Bytes(b),
                ..
            } if !self.origins.contains_key(path) => Some(b.to_vec()),
            Content::File {
                source: FileSource::Path(p),
                ..
            } => {
                let mut out = Vec::new();
                File::open(p)
                    .ok()?
                    .take(crate::limits::MAX_USER_DB)
                    .read_to_end(&mut out)
                    .ok()?;
                Some(out)
            }
            _ => None,
        }
    }

    /// Looks up a user name in the image's `/etc/passwd`: (uid, primary gid).
    pub fn lookup_user(&self, name: &str) -> Option<(u64, u64)> {
        let text = self.read_small(b"etc/passwd")?;
        let text = String::from_utf8_lossy(&text);
        let u = crate::userdb::user_by_name(&text, name)?;
        Some((u.uid, u.gid?))
    }

    /// Looks up a group name in the image's `/etc/group`.
    pub fn lookup_group(&self, name: &str) -> Option<u64> {
        let text = self.read_small(b"etc/group")?;
        crate::userdb::group_by_name(&String::from_utf8_lossy(&text), name)
    }
}

/// A file whose bytes are still in a base layer (see [`ImageFs::origins`]).
fn placeholder(size: u64, mode: u32, uid: u64, gid: u64) -> LayerEntry {
    LayerEntry::file(FileSource::Bytes(Arc::from(&[][..])), size, mode, uid, gid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_and_groups_resolve_from_the_image() {
        let mut fs = ImageFs::default();
        let passwd = b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n";
        let group = b"root:x:0:\nstaff:x:50:\n";
        for (p, b) in [
            (&b"etc/passwd"[..], &passwd[..]),
            (b"etc/group", &group[..]),
        ] {
            fs.nodes.insert(
                p.to_vec(),
                LayerEntry::file(FileSource::Bytes(Arc::from(b)), b.len() as u64, 0o644, 0, 0),
            );
        }
        assert_eq!(fs.lookup_user("app"), Some((1000, 1001)));
        assert_eq!(fs.lookup_user("nobody"), None);
        assert_eq!(fs.lookup_group("staff"), Some(50));
    }

    fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut h = tar::Header::new_gnu();
            if let Some(target) = data.strip_prefix(b"->") {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                h.set_mode(0o777);
                b.append_link(&mut h, name, std::str::from_utf8(target).unwrap())
                    .unwrap();
            } else if name.ends_with('/') {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(0o755);
                b.append_data(&mut h, name, &[][..]).unwrap();
            } else {
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                b.append_data(&mut h, name, *data).unwrap();
            }
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn whiteouts_and_opaque_dirs_hide_lower_layers() {
        let d = tempfile::tempdir().unwrap();
        let l1 = d.path().join("l1");
        let l2 = d.path().join("l2");
        fs::write(
            &l1,
            tar_of(&[
                ("a/", b""),
                ("a/gone", b"1"),
                ("a/kept", b"2"),
                ("o/", b""),
                ("o/old", b"3"),
                ("bin", b"->usr/bin"),
            ]),
        )
        .unwrap();
        fs::write(
            &l2,
            tar_of(&[
                ("a/.wh.gone", b""),
                ("o/.wh..wh..opq", b""),
                ("o/new", b"4"),
            ]),
        )
        .unwrap();
        let mut fs_ = ImageFs {
            keep_all: true,
            ..Default::default()
        };
        fs_.apply_blob(&l1).unwrap();
        fs_.apply_blob(&l2).unwrap();
        let names: Vec<String> = fs_
            .nodes
            .keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect();
        assert_eq!(names, ["a", "a/kept", "bin", "o", "o/new"]);
        assert_eq!(fs_.resolve(b"bin/x"), b"usr/bin/x");
        let spool = d.path().join("spool");
        let got = fs_
            .extract(&[b"a/kept".to_vec(), b"o/new".to_vec()], &spool)
            .unwrap();
        assert_eq!(fs::read(&got[&b"a/kept".to_vec()]).unwrap(), b"2");
        assert_eq!(fs::read(&got[&b"o/new".to_vec()]).unwrap(), b"4");
    }
}
