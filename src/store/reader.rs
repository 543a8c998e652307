//! Reading images kiln (or docker, skopeo, buildah) wrote: an OCI layout
//! directory, an OCI archive, a docker-archive (with an OCI layout inside,
//! as Docker 25+ writes, or the legacy `manifest.json`-only form that
//! `docker save` before 25 and `skopeo copy docker-archive:` write), or
//! `image.tar.zst`. Every blob read is checked against its digest and size.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::Error;
use crate::digest::{Digest, HashingWriter};
use crate::image::{
    canonical_json, descriptor, Descriptor, DockerManifestEntry, ImageConfig, Index, Manifest,
    MEDIA_CONFIG, MEDIA_MANIFEST,
};

enum Backing {
    Dir(PathBuf),
    /// A tar file with its members' (offset, size).
    Tar {
        file: PathBuf,
        members: BTreeMap<String, (u64, u64)>,
        _tmp: Option<tempfile::TempPath>,
    },
}

/// A legacy docker-archive (no `index.json`): the manifest kiln derives
/// from its `manifest.json`, and where each blob lives in the archive.
struct Legacy {
    manifest: Vec<u8>,
    descriptor: Descriptor,
    tags: Vec<String>,
    members: HashMap<String, String>,
}

/// An image read from disk.
pub struct ImageReader {
    path: PathBuf,
    backing: Backing,
    legacy: Option<Legacy>,
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

pub const MEDIA_OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// A layer stream decompressed as its media type says (`…gzip`, `…zstd`,
/// else a plain tar).
pub fn decompressed<'a, R: Read + 'a>(media_type: &str, r: R) -> io::Result<Box<dyn Read + 'a>> {
    Ok(if media_type.ends_with("gzip") {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if media_type.ends_with("zstd") {
        Box::new(zstd::stream::read::Decoder::new(r)?)
    } else {
        Box::new(r)
    })
}

/// Whether a descriptor names an image index (a multi-platform list).
pub fn is_index(d: &Descriptor) -> bool {
    d.media_type == MEDIA_OCI_INDEX || d.media_type == MEDIA_DOCKER_LIST
}

/// The OCI layer media type for a layer blob, from its first bytes.
fn sniff_layer_type(head: &[u8]) -> &'static str {
    if head.starts_with(&[0x1f, 0x8b]) {
        "application/vnd.oci.image.layer.v1.tar+gzip"
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        "application/vnd.oci.image.layer.v1.tar+zstd"
    } else {
        "application/vnd.oci.image.layer.v1.tar"
    }
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
            if !path.join("index.json").is_file() {
                return Err(Error::Missing {
                    path: path.to_path_buf(),
                    what: "index.json (a directory must be an OCI image layout)".into(),
                });
            }
            return Ok(ImageReader {
                path: path.to_path_buf(),
                backing: Backing::Dir(path.to_path_buf()),
                legacy: None,
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
            let mut dec = crate::limits::guarded(
                BufReader::new(File::open(path).map_err(ioe)?),
                &path.display().to_string(),
                zstd::stream::read::Decoder::new,
            )
            .map_err(ioe)?;
            io::copy(&mut dec, t.as_file_mut()).map_err(ioe)?;
            let tp = t.into_temp_path();
            (tp.to_path_buf(), Some(tp))
        } else {
            (path.to_path_buf(), None)
        };
        let mut members = BTreeMap::new();
        let mut ar = tar::Archive::new(File::open(&file).map_err(ioe)?);
        let entries = ar.entries_with_seek().map_err(|e| Error::Invalid {
            path: path.to_path_buf(),
            message: format!("not a tar archive, OCI layout or image.tar.zst: {e}"),
        })?;
        for e in entries {
            let e = e.map_err(|e| Error::Invalid {
                path: path.to_path_buf(),
                message: format!("not a readable tar archive: {e}"),
            })?;
            let name = String::from_utf8_lossy(&e.path_bytes())
                .trim_start_matches("./")
                .to_string();
            members.insert(name, (e.raw_file_position(), e.size()));
        }
        let docker = members.contains_key("manifest.json");
        let format = match (docker, tmp.is_some()) {
            (true, true) => "docker-archive+zstd",
            (true, false) => "docker-archive",
            (false, _) => "oci-archive",
        };
        let mut r = ImageReader {
            path: path.to_path_buf(),
            backing: Backing::Tar {
                file,
                members,
                _tmp: tmp,
            },
            legacy: None,
            format,
        };
        if docker && r.read_member("index.json")?.is_none() {
            r.legacy = Some(r.read_legacy()?);
        }
        Ok(r)
    }

    /// Derives an OCI manifest for a legacy docker-archive: the config and
    /// layer files are its blobs, byte for byte (layers are usually plain tars,
    /// so their digest is their diff_id).
    fn read_legacy(&self) -> Result<Legacy, Error> {
        let dm = self.read_member("manifest.json")?.unwrap_or_default();
        let dm: Vec<DockerManifestEntry> = self.json(&dm, "manifest.json")?;
        let Some(first) = dm.first() else {
            return Err(self.invalid("manifest.json lists no images"));
        };
        if dm.len() > 1 {
            return Err(self.invalid(
                "manifest.json lists more than one image; kiln reads one image per archive (save them one by one)",
            ));
        }
        let mut members = HashMap::new();
        let mut blob = |member: &str, what: &str| -> Result<(Digest, u64, Vec<u8>), Error> {
            let member = member.trim_start_matches("./").to_string();
            let mut head = Vec::new();
            let (digest, size) = {
                let mut r = self.open_member(&member)?.ok_or_else(|| Error::Missing {
                    path: self.path.clone(),
                    what: format!("{what} {member} named by manifest.json"),
                })?;
                let mut w = HashingWriter::new(io::sink());
                let mut buf = vec![0u8; 1 << 16];
                loop {
                    let n = r.read(&mut buf).map_err(|e| self.io(e))?;
                    if n == 0 {
                        break;
                    }
                    if head.len() < 8 {
                        head.extend_from_slice(&buf[..n.min(8)]);
                    }
                    w.write_all(&buf[..n]).map_err(|e| self.io(e))?;
                }
                let (d, n, _) = w.finish();
                (d, n)
            };
            members.insert(digest.to_string(), member);
            Ok((digest, size, head))
        };
        let (cd, cs, _) = blob(&first.config, "config")?;
        let mut layers = Vec::new();
        for l in &first.layers {
            let (d, s, head) = blob(l, "layer")?;
            layers.push(descriptor(sniff_layer_type(&head), &d, s));
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_MANIFEST.into()),
            config: descriptor(MEDIA_CONFIG, &cd, cs),
            layers,
            annotations: BTreeMap::new(),
        };
        let bytes = canonical_json(&manifest);
        let d = Digest::of(&bytes);
        Ok(Legacy {
            descriptor: descriptor(MEDIA_MANIFEST, &d, bytes.len() as u64),
            manifest: bytes,
            tags: first.repo_tags.clone(),
            members,
        })
    }

    fn io(&self, source: io::Error) -> Error {
        Error::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn invalid(&self, message: &str) -> Error {
        Error::Invalid {
            path: self.path.clone(),
            message: message.to_string(),
        }
    }

    /// Opens a member for streaming.
    fn open_member(&self, name: &str) -> Result<Option<Box<dyn Read + '_>>, Error> {
        match &self.backing {
            Backing::Dir(d) => match File::open(d.join(name)) {
                Ok(f) => Ok(Some(Box::new(BufReader::with_capacity(1 << 20, f)))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(self.io(e)),
            },
            Backing::Tar { file, members, .. } => {
                let Some(&(off, size)) = members.get(name) else {
                    return Ok(None);
                };
                let mut f = File::open(file).map_err(|e| self.io(e))?;
                f.seek(SeekFrom::Start(off)).map_err(|e| self.io(e))?;
                Ok(Some(Box::new(BufReader::with_capacity(
                    1 << 20,
                    f.take(size),
                ))))
            }
        }
    }

    /// Reads a whole member (small files: JSON).
    fn read_member(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        let Some(mut r) = self.open_member(name)? else {
            return Ok(None);
        };
        let mut buf = Vec::new();
        r.read_to_end(&mut buf).map_err(|e| self.io(e))?;
        Ok(Some(buf))
    }

    fn blob_member(&self, digest: &Digest) -> String {
        if let Some(m) = self
            .legacy
            .as_ref()
            .and_then(|l| l.members.get(digest.as_str()))
        {
            return m.clone();
        }
        format!("blobs/sha256/{}", digest.hex())
    }

    /// Reads a manifest, index or config blob (verified, size-capped).
    fn read_json_blob(&self, d: &Descriptor) -> Result<Vec<u8>, Error> {
        if d.size > crate::limits::MAX_JSON_BLOB {
            return Err(self.invalid(&format!(
                "{} declares {} bytes; kiln reads manifests and configs of at most {} bytes",
                d.digest,
                d.size,
                crate::limits::MAX_JSON_BLOB
            )));
        }
        self.read_blob(d)
    }

    fn parse_digest(&self, d: &Descriptor) -> Result<Digest, Error> {
        Digest::parse(&d.digest)
            .ok_or_else(|| self.invalid(&format!("invalid digest {:?}", d.digest)))
    }

    /// Streams a blob into `w`, verifying its digest and size; on a mismatch
    /// the error names the blob and whatever was written must be discarded.
    pub fn copy_blob(&self, d: &Descriptor, w: &mut dyn Write) -> Result<(), Error> {
        let digest = self.parse_digest(d)?;
        if let Some(l) = self
            .legacy
            .as_ref()
            .filter(|l| l.descriptor.digest == d.digest)
        {
            return w.write_all(&l.manifest).map_err(|e| self.io(e));
        }
        let name = self.blob_member(&digest);
        let mut r = self.open_member(&name)?.ok_or_else(|| Error::Missing {
            path: self.path.clone(),
            what: format!("blob {digest}"),
        })?;
        let mut hw = HashingWriter::new(w);
        io::copy(&mut r, &mut hw).map_err(|e| self.io(e))?;
        let (got, size, _) = hw.finish();
        if got != digest || size != d.size {
            return Err(Error::BadBlob {
                path: self.path.clone(),
                digest: digest.to_string(),
                got: got.to_string(),
                size,
            });
        }
        Ok(())
    }

    /// The raw bytes of a blob as a stream (not verified: the caller hashes).
    pub fn blob_stream(&self, d: &Descriptor) -> Result<Box<dyn Read + '_>, Error> {
        let digest = self.parse_digest(d)?;
        if let Some(l) = self
            .legacy
            .as_ref()
            .filter(|l| l.descriptor.digest == d.digest)
        {
            return Ok(Box::new(io::Cursor::new(l.manifest.clone())));
        }
        let name = self.blob_member(&digest);
        self.open_member(&name)?.ok_or_else(|| Error::Missing {
            path: self.path.clone(),
            what: format!("blob {digest}"),
        })
    }

    /// A layer's uncompressed tar stream (by its media type; not verified).
    pub fn layer_tar(&self, d: &Descriptor) -> Result<Box<dyn Read + '_>, Error> {
        let raw = io::BufReader::with_capacity(1 << 20, self.blob_stream(d)?);
        decompressed(&d.media_type, raw).map_err(|source| Error::Io {
            path: PathBuf::from(&d.digest),
            source,
        })
    }

    /// A small member of the archive (`manifest.json`, `repositories`), if present.
    pub fn member(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        self.read_member(name)
    }

    /// Whether the image is a legacy docker-archive (no OCI layout inside).
    pub fn is_legacy(&self) -> bool {
        self.legacy.is_some()
    }

    /// Where a blob's bytes are on disk: (file, offset, length); None for
    /// a manifest kiln derived (legacy docker-archives), which is in memory.
    pub fn blob_location(&self, d: &Descriptor) -> Result<Option<(PathBuf, u64, u64)>, Error> {
        let digest = self.parse_digest(d)?;
        if self
            .legacy
            .as_ref()
            .is_some_and(|l| l.descriptor.digest == d.digest)
        {
            return Ok(None);
        }
        let name = self.blob_member(&digest);
        let missing = || Error::Missing {
            path: self.path.clone(),
            what: format!("blob {digest}"),
        };
        match &self.backing {
            Backing::Dir(dir) => {
                let p = dir.join(&name);
                let len = fs::metadata(&p).map_err(|_| missing())?.len();
                Ok(Some((p, 0, len)))
            }
            Backing::Tar { file, members, .. } => {
                let &(off, len) = members.get(&name).ok_or_else(missing)?;
                Ok(Some((file.clone(), off, len)))
            }
        }
    }

    /// Reads a blob and verifies its digest and size.
    pub fn read_blob(&self, d: &Descriptor) -> Result<Vec<u8>, Error> {
        let mut out = Vec::new();
        self.copy_blob(d, &mut out)?;
        Ok(out)
    }

    pub(crate) fn json<T: serde::de::DeserializeOwned>(
        &self,
        bytes: &[u8],
        what: &str,
    ) -> Result<T, Error> {
        serde_json::from_slice(bytes).map_err(|source| Error::Json {
            path: self.path.clone(),
            what: what.to_string(),
            source,
        })
    }

    /// Every image the file holds: (descriptor, names), in index order. A
    /// name is the fullest one recorded (containerd's qualified name, else
    /// the OCI ref name); docker-archive tags win where present.
    pub fn images(&self) -> Result<Vec<(Descriptor, Vec<String>)>, Error> {
        if let Some(l) = &self.legacy {
            return Ok(vec![(l.descriptor.clone(), l.tags.clone())]);
        }
        let Some(index) = self.read_member("index.json")? else {
            return Err(Error::Missing {
                path: self.path.clone(),
                what: "index.json (is this an image?)".into(),
            });
        };
        let index: Index = self.json(&index, "index.json")?;
        let mut out: Vec<(Descriptor, Vec<String>)> = Vec::new();
        for m in &index.manifests {
            let name = m
                .annotations
                .get(crate::image::ANNOTATION_CONTAINERD_NAME)
                .or_else(|| m.annotations.get(crate::image::ANNOTATION_REF_NAME))
                .cloned();
            let mut bare = m.clone();
            bare.annotations.clear();
            match out.iter_mut().find(|(d, _)| d.digest == m.digest) {
                Some((_, names)) => names.extend(name),
                None => out.push((bare, name.into_iter().collect())),
            }
        }
        if let Some(dm) = self.read_member("manifest.json")? {
            let dm: Vec<DockerManifestEntry> = self.json(&dm, "manifest.json")?;
            if let (Some(e), Some(first)) = (dm.first(), out.first_mut()) {
                if !e.repo_tags.is_empty() {
                    first.1 = e.repo_tags.clone();
                }
            }
        }
        Ok(out)
    }

    /// The manifest descriptor and tags of the (first) image.
    pub fn manifest_descriptor(&self) -> Result<(Descriptor, Vec<String>), Error> {
        self.images()?
            .into_iter()
            .next()
            .ok_or_else(|| self.invalid("index.json lists no manifests"))
    }

    /// The blobs an image descriptor needs, itself first (manifests of an
    /// index, then each manifest's config and layers).
    pub fn closure(&self, d: &Descriptor) -> Result<Vec<Descriptor>, Error> {
        let mut out = vec![d.clone()];
        let bytes = self.read_json_blob(d)?;
        let v: serde_json::Value = self.json(&bytes, &format!("manifest {}", d.digest))?;
        if v.get("manifests").is_some() {
            let index: Index = self.json(&bytes, &format!("index {}", d.digest))?;
            for m in &index.manifests {
                out.extend(self.closure(m)?);
            }
        } else {
            let m: Manifest = self.json(&bytes, &format!("manifest {}", d.digest))?;
            out.push(m.config.clone());
            out.extend(m.layers.iter().cloned());
        }
        Ok(out)
    }

    /// Reads manifest and config.
    pub fn summary(&self) -> Result<Summary, Error> {
        let (desc, tags) = self.manifest_descriptor()?;
        if is_index(&desc) {
            return Err(self.invalid(&format!(
                "{} is a multi-platform index; kiln inspect shows single images",
                desc.digest
            )));
        }
        let manifest: Manifest = self.json(&self.read_json_blob(&desc)?, "manifest")?;
        let config: ImageConfig = self.json(&self.read_json_blob(&manifest.config)?, "config")?;
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
