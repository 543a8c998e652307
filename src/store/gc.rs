//! `kiln store gc`: deletes the blobs no named image references and no
//! running kiln holds (see [`super::lease`]), and the leftovers of kiln
//! processes that are gone. The same sweep undoes a failed command's
//! blobs ([`Store::abandon`]).

use std::collections::BTreeSet;

use super::lease::Swept;
use super::{Error, Store};
use crate::image::{Descriptor, Digest, Index, Manifest};

impl Store {
    /// Every blob the named images reference (manifests, indexes, configs,
    /// layers), as far as they can be read.
    fn named_closure(&self) -> Result<BTreeSet<Digest>, Error> {
        let mut keep: BTreeSet<Digest> = BTreeSet::new();
        let root = self.root()?;
        // Manifests and indexes to read; configs and layers are leaves, kept unread.
        let mut todo: Vec<Descriptor> = self.index()?.manifests;
        while let Some(d) = todo.pop() {
            if !keep.insert(d.digest.clone()) || d.size > crate::limits::MAX_JSON_BLOB {
                continue;
            }
            let Ok(bytes) = root.read(
                format!("blobs/sha256/{}", d.digest.hex()),
                crate::limits::MAX_JSON_BLOB,
            ) else {
                continue;
            };
            if d.media_type.is_index_with(&bytes) {
                if let Ok(i) = serde_json::from_slice::<Index>(&bytes) {
                    todo.extend(i.manifests);
                }
            } else if let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) {
                keep.insert(m.config.digest);
                keep.extend(m.layers.into_iter().map(|l| l.digest));
            }
        }
        Ok(keep)
    }

    /// Deletes every blob no named image references and no running kiln
    /// holds, and what finished kiln processes left behind.
    pub fn gc(&self) -> Result<Swept, Error> {
        self.gc_keeping(&[])
    }

    /// [`Store::gc`], also keeping `extra` (the layers step cache entries name).
    pub fn gc_keeping(&self, extra: &[Digest]) -> Result<Swept, Error> {
        let _lock = self.lock()?;
        let mut keep = self.named_closure()?;
        keep.extend(extra.iter().cloned());
        self.sweep(keep, None)
    }

    /// Undoes a failed command: removes the blobs this process put into
    /// the store that no named image references and no other running kiln
    /// holds. Best effort; returns what it removed.
    pub fn abandon(&self) -> Swept {
        let Some(lease) = self.lease() else {
            return Swept::default();
        };
        let created = lease.created();
        if created.is_empty() {
            return Swept::default();
        }
        let run = || {
            let _lock = self.lock()?;
            let keep = self.named_closure()?;
            self.sweep(keep, Some(&created))
        };
        run().unwrap_or_default()
    }
}
