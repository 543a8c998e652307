//! `kiln store gc`: deletes the blobs no named image references.

use std::collections::BTreeSet;
use std::fs;

use super::{Error, Store};
use crate::image::{Descriptor, Digest, Index, Manifest};

impl Store {
    /// Deletes every blob no named image references; returns (blobs, bytes) freed.
    pub fn gc(&self) -> Result<(usize, u64), Error> {
        let _lock = self.lock()?;
        let mut keep: BTreeSet<Digest> = BTreeSet::new();
        // Manifests and indexes to read; configs and layers are leaves, kept unread.
        let mut todo: Vec<Descriptor> = self.index()?.manifests;
        while let Some(d) = todo.pop() {
            if !keep.insert(d.digest.clone()) || d.size > crate::limits::MAX_JSON_BLOB {
                continue;
            }
            let Ok(bytes) = fs::read(self.blob_path(&d.digest)) else {
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
        let (mut n, mut bytes) = (0, 0);
        let blobs = self.blobs();
        for e in fs::read_dir(&blobs).map_err(self.io(&blobs))? {
            let e = e.map_err(self.io(&blobs))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if Digest::from_hex(&name).is_some_and(|d| keep.contains(&d)) {
                continue;
            }
            let size = e.metadata().map(|m| m.len()).unwrap_or(0);
            fs::remove_file(e.path()).map_err(self.io(&e.path()))?;
            n += 1;
            bytes += size;
        }
        Ok((n, bytes))
    }
}
