//! A store's `index.json`: read, written atomically under the store's lock
//! file, and the names in it (`tag`, `list`, `remove`).

use std::fs::File;
use std::io;
use std::path::Path;

use super::{Error, Store};
use crate::image::{
    canonical_json, Descriptor, Digest, Index, Manifest, Reference, ANNOTATION_CONTAINERD_NAME,
    ANNOTATION_REF_NAME,
};
use crate::source::read_json;

/// One image of a store, for `kiln store ls`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Listed {
    pub name: String,
    pub digest: Digest,
    pub media_type: String,
    /// Config plus layers, in bytes (0 for a multi-platform index).
    pub size: u64,
}

/// The name of an index entry for people (the ref name as given when it
/// is a full `name:tag`, else containerd's).
pub(super) fn entry_name(d: &Descriptor) -> Option<&String> {
    d.annotations
        .get(ANNOTATION_REF_NAME)
        .filter(|n| n.contains(':'))
        .or_else(|| d.annotations.get(ANNOTATION_CONTAINERD_NAME))
        .or_else(|| d.annotations.get(ANNOTATION_REF_NAME))
}

pub(super) fn entry_matches(d: &Descriptor, name: &str) -> bool {
    [ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME]
        .iter()
        .filter_map(|a| d.annotations.get(*a))
        .any(|n| Reference::parse(n).is_ok_and(|r| r.name() == name))
}

/// Points `names` at `desc` in `index`, replacing what they named.
pub(super) fn name_entries(
    index: &mut Index,
    desc: &Descriptor,
    names: &[String],
    dir: &Path,
) -> Result<(), Error> {
    for tag in names {
        let r = Reference::parse(tag).map_err(|message| Error::Invalid {
            path: dir.to_path_buf(),
            message,
        })?;
        let name = r.name();
        index.manifests.retain(|e| !entry_matches(e, &name));
        let mut d = desc.bare();
        d.annotations
            .insert(ANNOTATION_CONTAINERD_NAME.into(), name.clone());
        d.annotations
            .insert(ANNOTATION_REF_NAME.into(), tag.clone());
        index.manifests.push(d);
    }
    index
        .manifests
        .sort_by(|a, b| entry_name(a).cmp(&entry_name(b)));
    Ok(())
}

impl Store {
    pub(super) fn index(&self) -> Result<Index, Error> {
        let p = self.dir.join("index.json");
        let root = match crate::fsx::DirFd::open(&self.dir) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Index::new()),
            Err(e) => return Err(self.io(&self.dir)(e)),
        };
        match root.read("index.json", crate::limits::MAX_STORE_INDEX) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| Error::Corrupt {
                path: p,
                message: source.to_string(),
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index::new()),
            Err(e) => Err(self.io(&p)(e)),
        }
    }

    pub(super) fn write_index(&self, index: &Index) -> Result<(), Error> {
        let root = self.root()?;
        let tmp = root
            .create_dir(super::lease::TMP_DIR)
            .map_err(self.io(&self.dir.join(super::lease::TMP_DIR)))?;
        crate::sink::file::write_atomic_in(&root, tmp, "index.json", &canonical_json(index))
    }

    /// Creates the layout if needed and takes the store's write lock.
    pub(super) fn lock(&self) -> Result<File, Error> {
        let wio = |path: std::path::PathBuf| move |source| Error::Write { path, source };
        let root = crate::fsx::DirFd::create(&self.dir).map_err(wio(self.dir.clone()))?;
        // Temporary files in .kiln/tmp belong to a process with a lease
        // (another kiln's clean-up removes those of lease-less pids).
        let _ = self.lease();
        root.create_dir("blobs/sha256").map_err(wio(self.blobs()))?;
        let tmp = root
            .create_dir(super::lease::TMP_DIR)
            .map_err(wio(self.dir.join(super::lease::TMP_DIR)))?;
        if root
            .stat("oci-layout")
            .map_err(self.io(&self.dir))?
            .is_none()
        {
            crate::sink::file::write_atomic_in(&root, tmp, "oci-layout", crate::sink::OCI_LAYOUT)?;
        }
        let lock = self.dir.join(".kiln-lock");
        let f = root.open_rw(".kiln-lock").map_err(wio(lock.clone()))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| self.io(&lock)(e.into()))?;
        Ok(f)
    }

    /// Names an image whose blobs are already in the store.
    pub fn tag(&self, desc: &Descriptor, names: &[String]) -> Result<(), Error> {
        crate::sink::Sink::commit(self, &[(desc.bare(), names.to_vec())])
    }

    /// The images of the store.
    pub fn list(&self) -> Result<Vec<Listed>, Error> {
        let mut out = Vec::new();
        for d in self.index()?.manifests {
            let size = if d.media_type.is_index() {
                0
            } else {
                read_json::<Manifest>(self, &d, "manifest").map_or(0, |m| {
                    m.config.size + m.layers.iter().map(|l| l.size).sum::<u64>()
                })
            };
            out.push(Listed {
                name: entry_name(&d).cloned().unwrap_or_default(),
                digest: d.digest.clone(),
                media_type: d.media_type.to_string(),
                size,
            });
        }
        Ok(out)
    }

    /// Removes the names matching `reference` (a name or a digest); blobs stay until `gc`.
    pub fn remove(&self, reference: &str) -> Result<usize, Error> {
        let r = Reference::parse(reference).map_err(|message| Error::NotFound { message })?;
        let _lock = self.lock()?;
        let mut index = self.index()?;
        let before = index.manifests.len();
        let name = r.name();
        index.manifests.retain(|e| match &r.digest {
            Some(d) => &e.digest != d,
            None => !entry_matches(e, &name),
        });
        let removed = before - index.manifests.len();
        if removed == 0 {
            return Err(Error::NotFound {
                message: format!(
                    "{reference}: no such image in the store {} (kiln store ls lists them)",
                    self.dir.display()
                ),
            });
        }
        self.write_index(&index)?;
        Ok(removed)
    }
}
