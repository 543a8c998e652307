//! `kiln store repair`: rebuilds a store's `index.json` (its names) from
//! what survives: the old file's entries where it still parses, the names
//! kiln's index gives its images, and every other image among the blobs
//! (a manifest or index no other one references) when the old file was
//! unreadable, named
//! `kiln.local/recovered:<digest prefix>`. The corrupt file is kept beside
//! as `index.json.corrupt`.

use std::collections::BTreeSet;

use super::{names, Error, Store};
use crate::image::{json_is_index, Descriptor, Digest, Index, Manifest, MediaType};

/// What a repair did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Repaired {
    /// Entries kept from a readable `index.json`.
    pub kept: usize,
    /// Names restored from kiln's index.
    pub restored: Vec<String>,
    /// Images found among the blobs with no name left.
    pub recovered: Vec<String>,
    /// Where the unreadable `index.json` was moved.
    pub moved: Option<std::path::PathBuf>,
}

impl Store {
    /// Rebuilds `index.json`; `known` are (manifest digest, name) pairs
    /// from kiln's index, restored where the store holds the manifest.
    pub fn repair(&self, known: &[(Digest, String)]) -> Result<Repaired, Error> {
        let _lock = self.lock()?;
        let root = self.root()?;
        let mut out = Repaired::default();
        let mut index = match self.index() {
            Ok(i) => {
                out.kept = i.manifests.len();
                i
            }
            Err(Error::Corrupt { .. }) => {
                let moved = self.dir.join("index.json.corrupt");
                root.rename(
                    std::ffi::OsStr::new("index.json"),
                    &root,
                    std::ffi::OsStr::new("index.json.corrupt"),
                )
                .map_err(self.io(&moved))?;
                out.moved = Some(moved);
                Index::new()
            }
            Err(e) => return Err(e),
        };
        // Every manifest and index among the blobs, and what they reference.
        let blobs = root.dir("blobs/sha256").map_err(self.io(&self.blobs()))?;
        let mut images: Vec<Descriptor> = Vec::new();
        let mut referenced: BTreeSet<Digest> = BTreeSet::new();
        for name in blobs.names().map_err(self.io(&self.blobs()))? {
            let Some(digest) = name.to_str().and_then(Digest::from_hex) else {
                continue;
            };
            let Ok(bytes) = blobs.read(&name, crate::limits::MAX_JSON_BLOB) else {
                continue;
            };
            if Digest::of(&bytes) != digest {
                continue;
            }
            let size = bytes.len() as u64;
            if json_is_index(&bytes) {
                if let Ok(i) = serde_json::from_slice::<Index>(&bytes) {
                    referenced.extend(i.manifests.into_iter().map(|m| m.digest));
                    images.push(Descriptor::new(MediaType::OciIndex, digest, size));
                }
            } else if let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) {
                if m.schema_version == 2 && !m.config.digest.as_str().is_empty() {
                    let media_type = m.media_type.clone().unwrap_or(MediaType::OciManifest);
                    images.push(Descriptor::new(media_type, digest, size));
                }
            }
        }
        let named: BTreeSet<Digest> = index.manifests.iter().map(|d| d.digest.clone()).collect();
        let mut seen = BTreeSet::new();
        for (digest, name) in known {
            if named.contains(digest) || !seen.insert(name) {
                continue;
            }
            if let Some(d) = images.iter().find(|d| &d.digest == digest) {
                names::name_entries(&mut index, d, std::slice::from_ref(name), &self.dir)?;
                out.restored.push(name.clone());
            }
        }
        let named: BTreeSet<Digest> = index.manifests.iter().map(|d| d.digest.clone()).collect();
        // With the names lost, every image no other references is one a
        // name pointed at once; with them intact, unnamed ones are gc's.
        for d in images.iter().filter(|_| out.moved.is_some()) {
            if named.contains(&d.digest) || referenced.contains(&d.digest) {
                continue;
            }
            let name = format!("kiln.local/recovered:{}", &d.digest.hex()[..12]);
            names::name_entries(&mut index, d, std::slice::from_ref(&name), &self.dir)?;
            out.recovered.push(name);
        }
        self.write_index(&index)?;
        Ok(out)
    }
}
