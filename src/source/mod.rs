//! Sources: every place kiln reads an image from, behind one trait.
//!
//! A [`Source`] lists the images it holds and opens blobs by descriptor;
//! everything else (verified reads, JSON with the size cap, the blob closure
//! of an image, platform selection, decompressed layers) is written once,
//! here, on top of those two calls. The sources: an image file or layout
//! ([`ImageFile`]: OCI layout, OCI archive, docker-archive in both forms,
//! `image.tar.zst`), a store ([`crate::store::Store`]), a build in progress
//! ([`BuildBlobs`]), and a registry ([`RegistrySource`]).

mod files;
mod registry;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::PathBuf;

use sha2::{Digest as _, Sha256};

pub use files::{ImageFile, Summary};
pub use registry::RegistrySource;

use crate::image::{platform, Codec, Descriptor, Digest, ImageConfig, Index, Manifest, Platform};

/// Errors reading an image: each names the file, store or registry and the
/// blob it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{}: {what} is missing from the image", path.display())]
    Missing { path: PathBuf, what: String },
    #[error("{}: blob {digest} does not match its digest or size (got {got}, {size} bytes); the image is corrupt: re-import it (kiln store add) or restore the file", path.display())]
    BadBlob {
        path: PathBuf,
        digest: Digest,
        got: Digest,
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
    #[error("{}: the store's list of names is corrupt ({message}); run `kiln store repair --store {}` to rebuild it from the store's blobs and kiln's index (or remove the file: the blobs stay, the names go)", path.display(), path.parent().unwrap_or(path).display())]
    Corrupt { path: PathBuf, message: String },
    #[error("{message}")]
    NotFound { message: String },
    #[error("{0}")]
    Registry(Box<crate::registry::Error>),
}

impl From<crate::registry::Error> for Error {
    fn from(e: crate::registry::Error) -> Self {
        Error::Registry(Box::new(e))
    }
}

/// A reader that hashes and counts what passes and fails at the end (or as
/// soon as it outgrows the size) unless the bytes are exactly the blob the
/// descriptor names. Every blob kiln reads goes through one.
pub struct Verified<R> {
    inner: R,
    hash: Sha256,
    n: u64,
    want: Digest,
    size: u64,
    done: bool,
}

/// The mismatch a [`Verified`] reader reports, inside its `io::Error`.
#[derive(Debug)]
pub struct Mismatch {
    pub got: Digest,
    pub size: u64,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "content is {} ({} bytes)", self.got, self.size)
    }
}

impl std::error::Error for Mismatch {}

impl<R: Read> Verified<R> {
    pub fn new(inner: R, d: &Descriptor) -> Verified<R> {
        Verified {
            inner,
            hash: Sha256::new(),
            n: 0,
            want: d.digest.clone(),
            size: d.size,
            done: false,
        }
    }

    fn check(&mut self) -> io::Result<()> {
        let got = Digest::from_raw(self.hash.clone().finalize().into());
        if got != self.want || self.n != self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                Mismatch { got, size: self.n },
            ));
        }
        Ok(())
    }
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        // Never read further than one byte past the size.
        let room = (self.size + 1 - self.n.min(self.size + 1)).min(buf.len() as u64) as usize;
        let n = self.inner.read(&mut buf[..room.max(1)])?;
        self.hash.update(&buf[..n]);
        self.n += n as u64;
        if n == 0 || self.n > self.size {
            self.done = true;
            self.check()?;
        }
        Ok(n)
    }
}

/// Turns a read error into the error that names the blob: a mismatch
/// becomes [`Error::BadBlob`], anything else an I/O error on `path`.
pub fn read_error(path: PathBuf, d: &Descriptor, e: io::Error) -> Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<Mismatch>()) {
        Some(m) => Error::BadBlob {
            path,
            digest: d.digest.clone(),
            got: m.got.clone(),
            size: m.size,
        },
        None => Error::Io { path, source: e },
    }
}

/// The codec of a blob from its first bytes.
pub fn sniff(head: &[u8]) -> Codec {
    if head.starts_with(&[0x1f, 0x8b]) {
        Codec::Gzip
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Codec::Zstd
    } else {
        Codec::None
    }
}

/// The one decompressor: gzip (multi-member), zstd or nothing, with the
/// decompression-bomb guard of [`crate::limits`]. `what` names the blob in
/// the guard's error.
pub fn decoder<'a, R: Read + Send + 'a>(
    codec: Codec,
    r: R,
    what: &str,
) -> io::Result<Box<dyn Read + Send + 'a>> {
    Ok(match codec {
        Codec::Gzip => Box::new(crate::limits::guarded(r, what, |c| {
            Ok(flate2::read::MultiGzDecoder::new(c))
        })?),
        Codec::Zstd => Box::new(crate::limits::guarded(r, what, |c| {
            zstd::stream::read::Decoder::new(c)
        })?),
        Codec::None => Box::new(r),
    })
}

/// Opens a layer blob file of kiln's own (a store's, a build's) decompressed
/// by its magic bytes: once, never through a link, only a regular file.
pub fn layer_file(path: &std::path::Path) -> io::Result<Box<dyn Read + Send>> {
    sniffed(
        crate::fsx::open_own_file(path)?,
        &path.display().to_string(),
    )
}

/// `f` from its start, decompressed by its magic bytes.
pub fn sniffed(mut f: File, what: &str) -> io::Result<Box<dyn Read + Send>> {
    let mut head = [0u8; 4];
    let n = f.read(&mut head)?;
    io::Seek::seek(&mut f, io::SeekFrom::Start(0))?;
    decoder(
        sniff(&head[..n]),
        BufReader::with_capacity(1 << 20, f),
        what,
    )
}

/// Opens a blob kept as a whole file at `path`; a missing file is
/// [`Error::Missing`] in `owner` (the store or build it belongs to).
pub(crate) fn open_file(
    path: &std::path::Path,
    owner: &std::path::Path,
    d: &Descriptor,
) -> Result<Box<dyn Read + Send + 'static>, Error> {
    // Never through a link: blob files are kiln's own or a store's.
    match crate::fsx::open_own_file(path) {
        Ok(f) => Ok(Box::new(BufReader::with_capacity(1 << 20, f))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Error::Missing {
            path: owner.to_path_buf(),
            what: format!("blob {}", d.digest),
        }),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A blob kept as a whole file, if the file is there.
pub(crate) fn whole_file(path: PathBuf) -> Option<BlobFile> {
    let md = std::fs::symlink_metadata(&path).ok()?;
    if !md.is_file() {
        return None;
    }
    let len = md.len();
    Some(BlobFile {
        path,
        offset: 0,
        len,
    })
}

/// Groups index entries (a descriptor and the name it carries, if any)
/// by blob: each image once, with all its names, in first-seen order.
pub(crate) fn group_names(
    entries: impl IntoIterator<Item = (Descriptor, Option<String>)>,
) -> Vec<(Descriptor, Vec<String>)> {
    let mut out: Vec<(Descriptor, Vec<String>)> = Vec::new();
    for (d, name) in entries {
        match out.iter_mut().find(|(e, _)| e.digest == d.digest) {
            Some((_, names)) => names.extend(name),
            None => out.push((d.bare(), name.into_iter().collect())),
        }
    }
    out
}

/// The first image of a source and its names.
pub fn first_image(src: &(impl Source + ?Sized)) -> Result<(Descriptor, Vec<String>), Error> {
    src.images()?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Invalid {
            path: src.location(),
            message: "holds no image (index.json lists no manifests)".into(),
        })
}

/// Where a blob's bytes lie on disk: a file, an offset and a length.
#[derive(Clone, Debug)]
pub struct BlobFile {
    pub path: PathBuf,
    pub offset: u64,
    pub len: u64,
}

/// An image resolved in a source: a single-platform manifest, its bytes
/// parsed, and its config.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub descriptor: Descriptor,
    pub manifest: Manifest,
    pub config: ImageConfig,
}

/// Something kiln reads images from.
pub trait Source: Send + Sync {
    /// The file, directory or URL, for messages.
    fn location(&self) -> PathBuf;

    /// A short name of the kind of source (`oci-dir`, `docker-archive`, `store`, `registry`).
    fn format(&self) -> &str;

    /// The images it holds at top level, each with the names it carries,
    /// in order; a blob appears once with all its names.
    fn images(&self) -> Result<Vec<(Descriptor, Vec<String>)>, Error>;

    /// The raw bytes of a blob, not yet verified (use [`Source::open_verified`]).
    fn open_blob(&self, d: &Descriptor) -> Result<Box<dyn Read + Send + '_>, Error>;

    /// Where a blob lies on disk, when it does as one run of bytes.
    fn blob_file(&self, _d: &Descriptor) -> Option<BlobFile> {
        None
    }

    /// A file of the image other than a blob (a docker-archive's
    /// `manifest.json` and `repositories`).
    fn member(&self, _name: &str) -> Result<Option<Vec<u8>>, Error> {
        Ok(None)
    }

    /// Whether the image's manifest was derived by kiln (a legacy
    /// docker-archive without an OCI layout inside).
    fn is_derived(&self) -> bool {
        false
    }

    /// A blob's stream, verified against its digest and size as it is read.
    fn open_verified(&self, d: &Descriptor) -> Result<Verified<Box<dyn Read + Send + '_>>, Error> {
        Ok(Verified::new(self.open_blob(d)?, d))
    }

    /// A whole blob, verified (for manifests and configs, [`read_small`]
    /// also refuses what declares more than the JSON cap).
    fn read_blob(&self, d: &Descriptor) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(d.size.min(1 << 20) as usize);
        self.open_verified(d)?
            .read_to_end(&mut out)
            .map_err(|e| read_error(self.location(), d, e))?;
        Ok(out)
    }

    /// A layer's uncompressed tar stream (by its media type; guarded, not verified).
    fn layer_tar(&self, d: &Descriptor) -> Result<Box<dyn Read + Send + '_>, Error> {
        let raw = BufReader::with_capacity(1 << 20, self.open_blob(d)?);
        decoder(
            d.media_type.codec().unwrap_or(Codec::None),
            raw,
            &format!("layer {}", d.digest),
        )
        .map_err(|source| Error::Io {
            path: self.location(),
            source,
        })
    }
}

/// A manifest, index or config of `src`, verified and parsed, with the size cap.
pub fn read_json<T: serde::de::DeserializeOwned>(
    src: &(impl Source + ?Sized),
    d: &Descriptor,
    what: &str,
) -> Result<T, Error> {
    let bytes = read_small(src, d, what)?;
    parse_json(src, &bytes, &format!("{what} {}", d.digest))
}

/// Reads a manifest, index or config blob: verified, and refused unread
/// when it declares more than [`crate::limits::MAX_JSON_BLOB`] bytes.
pub fn read_small(
    src: &(impl Source + ?Sized),
    d: &Descriptor,
    what: &str,
) -> Result<Vec<u8>, Error> {
    if d.size > crate::limits::MAX_JSON_BLOB {
        return Err(Error::Invalid {
            path: src.location(),
            message: format!(
                "{what} {} declares {} bytes; kiln reads manifests and configs of at most {} bytes",
                d.digest,
                d.size,
                crate::limits::MAX_JSON_BLOB
            ),
        });
    }
    src.read_blob(d)
}

/// Parses JSON read from `src`, naming it in the error.
pub fn parse_json<T: serde::de::DeserializeOwned>(
    src: &(impl Source + ?Sized),
    bytes: &[u8],
    what: &str,
) -> Result<T, Error> {
    serde_json::from_slice(bytes).map_err(|source| Error::Json {
        path: src.location(),
        what: what.to_string(),
        source,
    })
}

/// Narrows an image descriptor of `src` to a single-platform manifest:
/// an index is narrowed to `platform` (else the host's) in the one place
/// that does it. Returns the manifest's descriptor and verified bytes.
pub fn narrow(
    src: &(impl Source + ?Sized),
    d: &Descriptor,
    platform: Option<&Platform>,
) -> Result<(Descriptor, Vec<u8>), Error> {
    let d = d.bare();
    let bytes = read_small(src, &d, "manifest")?;
    if !d.media_type.is_index_with(&bytes) {
        return Ok((d, bytes));
    }
    let index: Index = parse_json(src, &bytes, &format!("index {}", d.digest))?;
    let m = platform::select(&index, platform)
        .map_err(|m| Error::NotFound {
            message: format!(
                "{} ({} {}): {m}",
                src.location().display(),
                src.format(),
                d.digest
            ),
        })?
        .clone();
    let bytes = read_small(src, &m, "manifest")?;
    Ok((m, bytes))
}

/// Resolves an image descriptor of `src` to a single-platform manifest
/// ([`narrow`]) and reads its manifest and config, verified.
pub fn resolve(
    src: &(impl Source + ?Sized),
    d: &Descriptor,
    platform: Option<&Platform>,
) -> Result<Resolved, Error> {
    let (d, bytes) = narrow(src, d, platform)?;
    let manifest: Manifest = parse_json(src, &bytes, &format!("manifest {}", d.digest))?;
    let config: ImageConfig = read_json(src, &manifest.config, "config")?;
    Ok(Resolved {
        descriptor: d,
        manifest,
        config,
    })
}

/// The blobs an image needs: its manifests (an index first, then the
/// manifests it lists), each with its verified bytes, and the configs and
/// layers they name, each once, in manifest order.
#[derive(Debug, Default)]
pub struct Closure {
    pub manifests: Vec<(Descriptor, Vec<u8>)>,
    pub blobs: Vec<Descriptor>,
}

/// Walks the blobs an image needs.
pub fn closure(src: &(impl Source + ?Sized), d: &Descriptor) -> Result<Closure, Error> {
    let mut out = Closure::default();
    let mut seen = std::collections::BTreeSet::new();
    let mut todo = vec![(d.bare(), 0usize)];
    while let Some((d, depth)) = todo.pop() {
        if !seen.insert(d.digest.clone()) {
            continue;
        }
        if depth > 4 {
            return Err(Error::Invalid {
                path: src.location(),
                message: format!("{}: indexes nested too deeply", d.digest),
            });
        }
        let bytes = read_small(src, &d, "manifest")?;
        if d.media_type.is_index_with(&bytes) {
            let index: Index = parse_json(src, &bytes, &format!("index {}", d.digest))?;
            todo.extend(index.manifests.iter().rev().map(|m| (m.bare(), depth + 1)));
        } else {
            let m: Manifest = parse_json(src, &bytes, &format!("manifest {}", d.digest))?;
            // Layers in order, then the config: the order a build streams
            // an archive in, so an exported image and a built one are the
            // same bytes.
            for b in m.layers.iter().chain(std::iter::once(&m.config)) {
                if seen.insert(b.digest.clone()) {
                    out.blobs.push(b.clone());
                }
            }
        }
        out.manifests.push((d, bytes));
    }
    Ok(out)
}

/// A build's own blobs: new ones in a `blobs/sha256` directory, base
/// layers where their stores keep them. The image a build assembles is a
/// source like any other, so it reaches its outputs through `copy`.
pub struct BuildBlobs {
    pub blobs: PathBuf,
    pub extra: BTreeMap<Digest, PathBuf>,
    pub image: Descriptor,
    pub tags: Vec<String>,
}

impl BuildBlobs {
    fn path(&self, d: &Digest) -> PathBuf {
        match self.extra.get(d) {
            Some(p) => p.clone(),
            None => self.blobs.join(d.hex()),
        }
    }
}

impl Source for BuildBlobs {
    fn location(&self) -> PathBuf {
        self.blobs.clone()
    }
    fn format(&self) -> &str {
        "build"
    }
    fn images(&self) -> Result<Vec<(Descriptor, Vec<String>)>, Error> {
        Ok(vec![(self.image.clone(), self.tags.clone())])
    }
    fn open_blob(&self, d: &Descriptor) -> Result<Box<dyn Read + Send + '_>, Error> {
        open_file(&self.path(&d.digest), &self.blobs, d)
    }
    fn blob_file(&self, d: &Descriptor) -> Option<BlobFile> {
        whole_file(self.path(&d.digest))
    }
}

/// Opens what a user names as an image: a file or layout on disk, else a
/// registry reference (`REGISTRY/REPOSITORY[:TAG|@sha256:…]`), read in
/// place with no temporary store. `insecure` speaks plain HTTP.
pub fn open(image: &str, insecure: bool) -> Result<Box<dyn Source>, Error> {
    let p = std::path::Path::new(image);
    let r = match crate::image::Reference::parse_remote(image) {
        Ok(r) if !p.exists() => r,
        _ => return Ok(Box::new(ImageFile::open(p)?)),
    };
    let client = std::sync::Arc::new(crate::registry::Client::new(r.host(), insecure));
    match RegistrySource::open(client, &r)? {
        Some(s) => Ok(Box::new(s)),
        None => Err(Error::NotFound {
            message: format!("{image}: the registry has no such image"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verified_reads_pass_good_bytes_and_name_bad_ones() {
        let d = Descriptor::new(crate::image::MediaType::OciConfig, Digest::of(b"abc"), 3);
        let mut out = Vec::new();
        Verified::new(&b"abc"[..], &d)
            .read_to_end(&mut out)
            .unwrap();
        assert_eq!(out, b"abc");
        for bad in [&b"abd"[..], b"ab", b"abcd"] {
            let e = Verified::new(bad, &d)
                .read_to_end(&mut Vec::new())
                .unwrap_err();
            let e = read_error(PathBuf::from("x"), &d, e);
            assert!(matches!(e, Error::BadBlob { .. }), "{e}");
        }
    }
}
