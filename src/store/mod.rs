//! Reading images kiln (or docker, skopeo, buildah) wrote: an OCI layout
//! directory, an OCI archive, a docker-archive, or `image.tar.zst`. Every
//! blob read is checked against its digest and size.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::image::{Descriptor, DockerManifestEntry, ImageConfig, Index, Manifest};

/// Errors reading an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {what} is missing from the image", path.display())]
    Missing { path: PathBuf, what: String },
    #[error("{}: blob {digest} does not match its digest or size (got {got}, {size} bytes); the image is corrupt", path.display())]
    BadBlob {
        path: PathBuf,
        digest: String,
        got: String,
        size: u64,
    },
    #[error("{}: {what} is not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        what: String,
        source: serde_json::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

enum Backing {
    Dir(PathBuf),
    /// A tar file with its members' (offset, size).
    Tar {
        file: PathBuf,
        members: BTreeMap<String, (u64, u64)>,
        _tmp: Option<tempfile::TempPath>,
    },
}

/// An image read from disk.
pub struct ImageReader {
    path: PathBuf,
    backing: Backing,
    pub format: &'static str,
}

/// What [`ImageReader::summary`] returns.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub format: String,
    pub manifest_digest: String,
    pub image_id: String,
    pub tags: Vec<String>,
    pub manifest: Manifest,
    pub config: ImageConfig,
}

impl ImageReader {
    /// Opens an image of any supported format.
    pub fn open(path: &Path) -> Result<ImageReader, Error> {
        let ioe = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let md = fs::metadata(path).map_err(ioe)?;
        if md.is_dir() {
            return Ok(ImageReader {
                path: path.to_path_buf(),
                backing: Backing::Dir(path.to_path_buf()),
                format: "oci-dir",
            });
        }
        let mut magic = [0u8; 4];
        let n = File::open(path)
            .map_err(ioe)?
            .read(&mut magic)
            .map_err(ioe)?;
        let (file, tmp) = if n == 4 && magic == [0x28, 0xb5, 0x2f, 0xfd] {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let mut t = tempfile::Builder::new()
                .prefix(".kiln-read-")
                .tempfile_in(dir)
                .or_else(|_| tempfile::NamedTempFile::new())
                .map_err(ioe)?;
            let mut dec =
                zstd::stream::read::Decoder::new(BufReader::new(File::open(path).map_err(ioe)?))
                    .map_err(ioe)?;
            io::copy(&mut dec, t.as_file_mut()).map_err(ioe)?;
            let tp = t.into_temp_path();
            (tp.to_path_buf(), Some(tp))
        } else {
            (path.to_path_buf(), None)
        };
        let mut members = BTreeMap::new();
        let mut ar = tar::Archive::new(File::open(&file).map_err(ioe)?);
        for e in ar.entries_with_seek().map_err(ioe)? {
            let e = e.map_err(ioe)?;
            let name = String::from_utf8_lossy(&e.path_bytes())
                .trim_start_matches("./")
                .to_string();
            members.insert(name, (e.raw_file_position(), e.size()));
        }
        let format = if members.contains_key("manifest.json") {
            if tmp.is_some() {
                "docker-archive+zstd"
            } else {
                "docker-archive"
            }
        } else {
            "oci-archive"
        };
        Ok(ImageReader {
            path: path.to_path_buf(),
            backing: Backing::Tar {
                file,
                members,
                _tmp: tmp,
            },
            format,
        })
    }

    /// Reads a whole member (small files: JSON).
    fn read_member(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        let ioe = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        match &self.backing {
            Backing::Dir(d) => match fs::read(d.join(name)) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(ioe(e)),
            },
            Backing::Tar { file, members, .. } => {
                let Some(&(off, size)) = members.get(name) else {
                    return Ok(None);
                };
                let mut f = File::open(file).map_err(ioe)?;
                f.seek(SeekFrom::Start(off)).map_err(ioe)?;
                let mut buf = Vec::with_capacity(size as usize);
                f.take(size).read_to_end(&mut buf).map_err(ioe)?;
                Ok(Some(buf))
            }
        }
    }

    /// Reads a blob and verifies its digest and size.
    pub fn read_blob(&self, d: &Descriptor) -> Result<Vec<u8>, Error> {
        let digest = Digest::parse(&d.digest).ok_or_else(|| Error::Invalid {
            path: self.path.clone(),
            message: format!("invalid digest {:?}", d.digest),
        })?;
        let name = format!("blobs/sha256/{}", digest.hex());
        let bytes = self.read_member(&name)?.ok_or_else(|| Error::Missing {
            path: self.path.clone(),
            what: format!("blob {digest}"),
        })?;
        let got = Digest::of(&bytes);
        if got != digest || bytes.len() as u64 != d.size {
            return Err(Error::BadBlob {
                path: self.path.clone(),
                digest: digest.to_string(),
                got: got.to_string(),
                size: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }

    fn json<T: serde::de::DeserializeOwned>(&self, bytes: &[u8], what: &str) -> Result<T, Error> {
        serde_json::from_slice(bytes).map_err(|source| Error::Json {
            path: self.path.clone(),
            what: what.to_string(),
            source,
        })
    }

    /// The manifest descriptor and tags of the (single) image.
    pub fn manifest_descriptor(&self) -> Result<(Descriptor, Vec<String>), Error> {
        if let Some(index) = self.read_member("index.json")? {
            let index: Index = self.json(&index, "index.json")?;
            let first = index
                .manifests
                .first()
                .cloned()
                .ok_or_else(|| Error::Invalid {
                    path: self.path.clone(),
                    message: "index.json lists no manifests".into(),
                })?;
            let mut tags: Vec<String> = index
                .manifests
                .iter()
                .filter(|m| m.digest == first.digest)
                .filter_map(|m| {
                    m.annotations
                        .get(crate::image::ANNOTATION_CONTAINERD_NAME)
                        .or_else(|| m.annotations.get(crate::image::ANNOTATION_REF_NAME))
                        .cloned()
                })
                .collect();
            if let Some(dm) = self.read_member("manifest.json")? {
                let dm: Vec<DockerManifestEntry> = self.json(&dm, "manifest.json")?;
                if let Some(e) = dm.first() {
                    tags = e.repo_tags.clone();
                }
            }
            return Ok((first, tags));
        }
        Err(Error::Missing {
            path: self.path.clone(),
            what: "index.json (legacy docker-archives without an OCI layout are not supported yet)"
                .into(),
        })
    }

    /// Reads manifest and config.
    pub fn summary(&self) -> Result<Summary, Error> {
        let (desc, tags) = self.manifest_descriptor()?;
        let manifest: Manifest = self.json(&self.read_blob(&desc)?, "manifest")?;
        let config: ImageConfig = self.json(&self.read_blob(&manifest.config)?, "config")?;
        Ok(Summary {
            format: self.format.to_string(),
            manifest_digest: desc.digest,
            image_id: manifest.config.digest.clone(),
            tags,
            manifest,
            config,
        })
    }
}
