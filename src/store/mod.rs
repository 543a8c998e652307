//! Stores: OCI image layouts used as stores of named images
//! (`vendor-images/`, `--store DIR`, `$KILN_STORE`, the user cache). A store
//! is a source and a sink like any other: `store add`, `pull` and the index
//! fill it through [`crate::copy`], builds read their bases from it.
//!
//! - [`names`]: `index.json`, its lock and the names in it;
//! - [`search`]: the stores a build searches, in order, and FROM resolution;
//! - [`gc`]: deleting what no name references.
//!
//! Names live in the index's `io.containerd.image.name` (fully qualified)
//! and `org.opencontainers.image.ref.name` (the reference as given)
//! annotations, so skopeo (`oci:DIR:NAME`), umoci and containerd read the
//! store too.

mod gc;
mod lease;
mod names;
mod repair;
mod search;

use std::collections::HashSet;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

pub use lease::{release_leases, Lease, Swept};
pub use names::Listed;
pub use repair::Repaired;
pub use search::Stores;

use crate::image::{Descriptor, Digest, ImageConfig, Platform, Reference};
use crate::sink::{file::BlobDir, Blob, Sink};
pub use crate::source::Error;
use crate::source::{BlobFile, Source};

/// One OCI layout directory used as a store.
#[derive(Clone, Debug)]
pub struct Store {
    pub dir: PathBuf,
    /// Where it came from, for messages: `--store`, `$KILN_STORE`, ...
    pub origin: String,
}

/// A base image resolved from a store: its config and its layer blobs,
/// verified.
#[derive(Clone, Debug)]
pub struct BaseImage {
    /// The reference as written, for messages.
    pub reference: String,
    pub manifest_digest: Digest,
    pub config: ImageConfig,
    /// Each layer's descriptor (OCI media types) and its verified blob file.
    pub layers: Vec<(Descriptor, PathBuf)>,
}

/// Blob files already verified by this process (path, size).
fn verified() -> &'static Mutex<HashSet<(PathBuf, u64)>> {
    static V: OnceLock<Mutex<HashSet<(PathBuf, u64)>>> = OnceLock::new();
    V.get_or_init(Default::default)
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>, origin: &str) -> Store {
        Store {
            dir: dir.into(),
            origin: origin.to_string(),
        }
    }

    /// The store `--store`, else `$KILN_STORE` (its first entry), else the
    /// user cache's, as the store commands choose it.
    pub fn chosen(flag: Option<&Path>) -> Store {
        if let Some(d) = flag {
            return Store::new(d, "--store");
        }
        let env = std::env::var_os("KILN_STORE")
            .and_then(|v| std::env::split_paths(&v).find(|p| !p.as_os_str().is_empty()));
        match env {
            Some(d) => Store::new(d, "$KILN_STORE"),
            None => Store::user(),
        }
    }

    /// The user store: `$XDG_CACHE_HOME/kiln/store` (else `~/.cache/kiln/store`).
    pub fn user() -> Store {
        Store::new(crate::cache_dir().join("store"), "user cache")
    }

    fn io(&self, path: &Path) -> impl Fn(io::Error) -> Error + '_ {
        let path = path.to_path_buf();
        move |source| Error::Io {
            path: path.clone(),
            source,
        }
    }

    /// The `blobs/sha256` directory.
    pub fn blobs(&self) -> PathBuf {
        self.dir.join("blobs/sha256")
    }

    /// The file of a blob (not verified).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs().join(digest.hex())
    }

    /// Whether the store's layout exists.
    pub fn exists(&self) -> bool {
        self.dir.join("index.json").is_file()
    }

    /// Creates the layout (if needed) so blobs can be written into it.
    pub fn create(&self) -> Result<(), Error> {
        drop(self.lock()?);
        Ok(())
    }

    /// Where new blobs go: `blobs/sha256`, by way of `.kiln/tmp`, under
    /// this process's lease.
    pub fn blob_dir(&self) -> Result<BlobDir, Error> {
        let werr = |path: PathBuf| move |source| Error::Write { path, source };
        let root = crate::fsx::DirFd::create(&self.dir).map_err(werr(self.dir.clone()))?;
        let blobs = root
            .create_dir("blobs/sha256")
            .map_err(werr(self.blobs()))?;
        let tmp = root
            .create_dir(lease::TMP_DIR)
            .map_err(werr(self.dir.join(lease::TMP_DIR)))?;
        Ok(BlobDir::leased(blobs, tmp, self.lease()))
    }

    /// Checks a blob file against its descriptor (once per process) and returns its path.
    pub fn verify(&self, d: &Descriptor) -> Result<PathBuf, Error> {
        let p = self.blob_path(&d.digest);
        if verified().lock().unwrap().contains(&(p.clone(), d.size)) {
            return Ok(p);
        }
        // Verified (and scanned) by an earlier build, and untouched since.
        if d.media_type.is_layer() && crate::layer::scan::trusted(&p, d.size) {
            verified().lock().unwrap().insert((p.clone(), d.size));
            return Ok(p);
        }
        io::copy(&mut self.open_verified(d)?, &mut io::sink())
            .map_err(|e| crate::source::read_error(self.dir.clone(), d, e))?;
        verified().lock().unwrap().insert((p.clone(), d.size));
        Ok(p)
    }

    /// Finds a reference: by digest (any manifest blob of the store), else by name.
    pub fn find(&self, r: &Reference) -> Result<Option<Descriptor>, Error> {
        if !self.exists() {
            return Ok(None);
        }
        let index = self.index()?;
        if let Some(d) = &r.digest {
            if let Some(e) = index.manifests.iter().find(|e| &e.digest == d) {
                return Ok(Some(e.bare()));
            }
            // A manifest held by the store but not named (one platform of
            // an index); a blob too large to be one is not read.
            let Some(len) = self
                .root()?
                .stat(format!("blobs/sha256/{}", d.hex()))
                .ok()
                .flatten()
                .map(|st| st.st_size as u64)
                .filter(|&n| n <= crate::limits::MAX_JSON_BLOB)
            else {
                return Ok(None);
            };
            let probe = Descriptor::new(crate::image::MediaType::default(), d.clone(), len);
            let bytes = self.read_blob(&probe)?;
            let media_type = if crate::image::json_is_index(&bytes) {
                crate::image::MediaType::OciIndex
            } else {
                crate::image::MediaType::OciManifest
            };
            return Ok(Some(Descriptor::new(media_type, d.clone(), len)));
        }
        let name = r.name();
        Ok(index
            .manifests
            .into_iter()
            .find(|e| names::entry_matches(e, &name))
            .map(|e| e.bare()))
    }

    /// Loads the image a descriptor names, choosing `platform` (else the
    /// host's) from a multi-platform index; verifies every blob.
    /// Loads a base image. With `verify_layers` false the caller verifies
    /// each layer itself, in the pass that scans it
    /// ([`crate::layer::scan::scan`]), so a cold build reads it once there.
    pub fn load(
        &self,
        d: &Descriptor,
        reference: &str,
        platform: Option<&Platform>,
        verify_layers: bool,
    ) -> Result<BaseImage, Error> {
        let r = crate::source::resolve(self, d, platform).map_err(|e| match e {
            Error::NotFound { message } => Error::NotFound {
                message: format!("{reference}: {message}"),
            },
            e => e,
        })?;
        let (manifest, config) = (r.manifest, r.config);
        if let Some(want) = platform {
            if !want.accepts(&config.os, &config.architecture, config.variant.as_deref()) {
                return Err(Error::NotFound {
                    message: format!(
                        "{reference}: the image in {} is {}/{}, not {want}",
                        self.dir.display(),
                        config.os,
                        config.architecture,
                    ),
                });
            }
        }
        if manifest.layers.len() != config.rootfs.diff_ids.len() {
            return Err(Error::Invalid {
                path: self.dir.clone(),
                message: format!(
                    "{reference}: manifest {} has {} layers but its config lists {} diff_ids",
                    r.descriptor.digest,
                    manifest.layers.len(),
                    config.rootfs.diff_ids.len()
                ),
            });
        }
        let mut layers = Vec::new();
        for l in &manifest.layers {
            if !l.media_type.is_layer() {
                return Err(Error::Invalid {
                    path: self.dir.clone(),
                    message: format!(
                        "{reference}: layer {} has media type {:?}, which is not a layer (tar, tar+gzip or tar+zstd)",
                        l.digest, l.media_type.as_str()
                    ),
                });
            }
            let path = if verify_layers {
                self.verify(l)?
            } else {
                self.blob_path(&l.digest)
            };
            let mut desc = l.clone();
            desc.media_type = l.media_type.to_oci();
            layers.push((desc, path));
        }
        Ok(BaseImage {
            reference: reference.to_string(),
            manifest_digest: r.descriptor.digest,
            config,
            layers,
        })
    }
}

impl Source for Store {
    fn location(&self) -> PathBuf {
        self.dir.clone()
    }

    fn format(&self) -> &str {
        "store"
    }

    fn images(&self) -> Result<Vec<(Descriptor, Vec<String>)>, Error> {
        Ok(crate::source::group_names(
            self.index()?.manifests.into_iter().map(|e| {
                let name = names::entry_name(&e).cloned();
                (e, name)
            }),
        ))
    }

    /// Opens a blob beneath the store with no links followed (a link or
    /// anything but a regular file is an error naming it; nothing about
    /// its target is read), leased so gc keeps it while this process runs.
    fn open_blob(&self, d: &Descriptor) -> Result<Box<dyn Read + Send + '_>, Error> {
        let rel = format!("blobs/sha256/{}", d.digest.hex());
        let open = || {
            let root = self.root()?;
            match root.open_file(&rel) {
                Ok(f) => {
                    Ok(Box::new(io::BufReader::with_capacity(1 << 20, f)) as Box<dyn Read + Send>)
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::Missing {
                    path: self.dir.clone(),
                    what: format!("blob {}", d.digest),
                }),
                Err(source) => Err(Error::Io {
                    path: root.join(&rel),
                    source,
                }),
            }
        };
        match self.lease() {
            Some(l) => l.hold(&d.digest, false, open),
            None => open(),
        }
    }

    fn blob_file(&self, d: &Descriptor) -> Option<BlobFile> {
        crate::source::whole_file(self.blob_path(&d.digest))
    }
}

impl Sink for Store {
    fn location(&self) -> PathBuf {
        self.dir.clone()
    }

    fn has_blob(&self, d: &Descriptor) -> Result<bool, Error> {
        self.blob_dir()?.has(d)
    }

    /// Always a copy, never a hard link: a store blob never shares its
    /// inode with a file outside the store that could change under it.
    fn put_blob(&self, blob: Blob<'_>) -> Result<(), Error> {
        self.blob_dir()?
            .write_blob(blob.desc, &mut blob.reader()?, blob.from())?;
        Ok(())
    }

    fn put_manifest(&self, d: &Descriptor, bytes: &[u8]) -> Result<(), Error> {
        let dir = self.blob_dir()?;
        if !dir.has(d)? {
            dir.write_blob(d, &mut &bytes[..], PathBuf::from("(memory)"))?;
        }
        Ok(())
    }

    fn parallel(&self) -> bool {
        true
    }

    /// Names every image (an image without a name is an error).
    fn commit(&self, images: &[(Descriptor, Vec<String>)]) -> Result<(), Error> {
        let _lock = self.lock()?;
        let mut index = self.index()?;
        for (d, names) in images {
            if names.is_empty() {
                return Err(Error::Invalid {
                    path: self.dir.clone(),
                    message: format!(
                        "image {} has no name; give one with --name NAME:TAG",
                        d.digest
                    ),
                });
            }
            names::name_entries(&mut index, d, names, &self.dir)?;
        }
        self.write_index(&index)
    }
}
