//! The image filesystem as the build sees it: the directories earlier layers
//! of the stage made (metadata only, never file contents),
//! and user/group lookups through the image's own `/etc/passwd` and
//! `/etc/group`.

use std::io::Read;

use crate::layer::{Content, Entries, FileSource, LayerEntry};

/// Paths (no leading slash) → what the image holds there so far.
#[derive(Clone, Debug, Default)]
pub struct ImageFs {
    pub nodes: Entries,
}

impl ImageFs {
    pub fn is_dir(&self, path: &[u8]) -> bool {
        path.is_empty() || self.nodes.get(path).is_some_and(LayerEntry::is_dir)
    }

    /// Records a layer's entries (later layers win). Only what later steps
    /// ask about is kept: directories, and the user and group databases;
    /// keeping every file of a 200,000-file COPY doubled kiln's memory.
    pub fn apply(&mut self, layer: &Entries) {
        for (p, e) in layer {
            if e.is_dir() || p == b"etc/passwd" || p == b"etc/group" {
                self.nodes.insert(p.clone(), e.clone());
            } else {
                self.nodes.remove(p);
            }
        }
    }

    /// The bytes of a small file in the image (for /etc/passwd and /etc/group).
    pub fn read_small(&self, path: &[u8]) -> Option<Vec<u8>> {
        match &self.nodes.get(path)?.content {
            Content::File {
                source: FileSource::Bytes(b),
                ..
            } => Some(b.to_vec()),
            Content::File {
                source: FileSource::Path(p),
                ..
            } => {
                let mut out = Vec::new();
                std::fs::File::open(p)
                    .ok()?
                    .take(16 << 20)
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
        lookup(&text, name, 2).and_then(|f| Some((f.0, f.1?)))
    }

    /// Looks up a group name in the image's `/etc/group`.
    pub fn lookup_group(&self, name: &str) -> Option<u64> {
        let text = self.read_small(b"etc/group")?;
        lookup(&text, name, 2).map(|f| f.0)
    }
}

/// Finds `name` in a colon-separated database; returns the numeric field at
/// `idx` and the one after it, if numeric.
fn lookup(text: &[u8], name: &str, idx: usize) -> Option<(u64, Option<u64>)> {
    let text = String::from_utf8_lossy(text);
    for line in text.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() == Some(&name) && fields.len() > idx {
            let id = fields[idx].parse().ok()?;
            let next = fields.get(idx + 1).and_then(|s| s.parse().ok());
            return Some((id, next));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

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
}
