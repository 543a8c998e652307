//! An OCI image layout used as a store of named images, and the ordered
//! list of stores a build searches. Names live in the index's
//! `io.containerd.image.name` (fully qualified) and
//! `org.opencontainers.image.ref.name` (the reference as given) annotations,
//! so skopeo (`oci:DIR:NAME`), umoci and containerd read the store too.
//! Writes take a lock file and replace `index.json` atomically.

use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use super::reader::{is_index, ImageReader};
use super::{Error, Reference};
use crate::digest::{Digest, HashingWriter};
use crate::image::{
    canonical_json, host_platform, Descriptor, ImageConfig, Index, Manifest, Platform,
    ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME, MEDIA_INDEX,
};

/// One OCI layout directory used as a store.
#[derive(Clone, Debug)]
pub struct Store {
    pub dir: PathBuf,
    /// Where it came from, for messages: `--store`, `$KILN_STORE`, ...
    pub origin: String,
}

/// One image of a store, for `kiln store ls`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Listed {
    pub name: String,
    pub digest: String,
    pub media_type: String,
    /// Config plus layers, in bytes (0 for a multi-platform index).
    pub size: u64,
}

/// A base image resolved from a store (or built earlier in the same run):
/// its config and its layer blobs, already verified.
#[derive(Clone, Debug)]
pub struct BaseImage {
    /// The reference as written, for messages.
    pub reference: String,
    pub manifest_digest: String,
    pub config: ImageConfig,
    /// Each layer's descriptor (OCI media types) and its verified blob file.
    pub layers: Vec<(Descriptor, PathBuf)>,
    /// For an image kiln built in this run or found in its index: its index
    /// digest, which children chain into theirs.
    pub index_digest: Option<String>,
}

/// Blob files already verified by this process (path, size).
fn verified() -> &'static Mutex<HashSet<(PathBuf, u64)>> {
    static V: OnceLock<Mutex<HashSet<(PathBuf, u64)>>> = OnceLock::new();
    V.get_or_init(Default::default)
}

/// Opens a layer blob decompressed (gzip, zstd or a plain tar, by its magic).
/// The output is capped by [`crate::limits`]: a decompression bomb is an error.
pub fn layer_reader(path: &Path) -> io::Result<Box<dyn Read + Send>> {
    let mut head = [0u8; 4];
    let n = File::open(path)?.read(&mut head)?;
    let f = BufReader::with_capacity(1 << 20, File::open(path)?);
    let what = path.display().to_string();
    Ok(if n >= 2 && head[..2] == [0x1f, 0x8b] {
        Box::new(crate::limits::guarded(f, &what, |c| {
            Ok(flate2::read::MultiGzDecoder::new(c))
        })?)
    } else if n == 4 && head == [0x28, 0xb5, 0x2f, 0xfd] {
        Box::new(crate::limits::guarded(f, &what, |c| {
            zstd::stream::read::Decoder::new(c)
        })?)
    } else {
        Box::new(f)
    })
}

/// Docker's layer media types become their OCI equivalents (same bytes).
fn oci_layer_type(t: &str) -> String {
    match t {
        "application/vnd.docker.image.rootfs.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.v1.tar+gzip".into()
        }
        "application/vnd.docker.image.rootfs.diff.tar.zstd" => {
            "application/vnd.oci.image.layer.v1.tar+zstd".into()
        }
        "application/vnd.docker.image.rootfs.diff.tar" => {
            "application/vnd.oci.image.layer.v1.tar".into()
        }
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip" => {
            "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip".into()
        }
        other => other.to_string(),
    }
}

fn platform_text(p: &Platform) -> String {
    match &p.variant {
        Some(v) => format!("{}/{}/{v}", p.os, p.architecture),
        None => format!("{}/{}", p.os, p.architecture),
    }
}

/// Parses `os/arch[/variant]`.
pub fn parse_platform(s: &str) -> Option<Platform> {
    let mut it = s.split('/');
    let os = it.next().filter(|s| !s.is_empty())?.to_string();
    let architecture = it.next().filter(|s| !s.is_empty())?.to_string();
    let variant = it.next().map(str::to_string);
    if it.next().is_some() {
        return None;
    }
    Some(Platform {
        architecture,
        os,
        variant,
    })
}

fn platform_matches(want: &Platform, os: &str, arch: &str, variant: Option<&str>) -> bool {
    want.os == os
        && want.architecture == arch
        && (want.variant.is_none() || want.variant.as_deref() == variant)
}

impl Store {
    pub fn new(dir: impl Into<PathBuf>, origin: &str) -> Store {
        Store {
            dir: dir.into(),
            origin: origin.to_string(),
        }
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

    /// Creates the layout (if needed) so blobs can be written into it.
    pub fn create(&self) -> Result<(), Error> {
        drop(self.lock()?);
        Ok(())
    }

    /// Puts a (verified) blob file into the store, if it is not there yet:
    /// a hard link where the filesystem allows, else a copy.
    pub fn put_blob_file(&self, digest: &Digest, src: &Path) -> Result<(), Error> {
        let target = self.blob_path(digest);
        if target.exists() || src == target {
            return Ok(());
        }
        let tmp = self.blobs().join(format!(
            ".kiln-link-{}-{}",
            std::process::id(),
            digest.hex()
        ));
        let _ = fs::remove_file(&tmp);
        if fs::hard_link(src, &tmp).is_err() {
            fs::copy(src, &tmp).map_err(self.io(&target))?;
        }
        fs::rename(&tmp, &target).map_err(self.io(&target))
    }

    /// Names an image whose blobs are already in the store.
    pub fn tag(&self, desc: &Descriptor, names: &[String]) -> Result<(), Error> {
        let _lock = self.lock()?;
        let mut index = self.index()?;
        Self::name_entries(&mut index, desc, names, &self.dir)?;
        self.write_index(&index)
    }

    /// Points `names` at `desc` in `index`, replacing what they named.
    fn name_entries(
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
            index.manifests.retain(|e| !Self::entry_matches(e, &name));
            let mut d = desc.clone();
            d.annotations.clear();
            d.annotations
                .insert(ANNOTATION_CONTAINERD_NAME.into(), name.clone());
            d.annotations
                .insert(ANNOTATION_REF_NAME.into(), tag.clone());
            index.manifests.push(d);
        }
        index
            .manifests
            .sort_by(|a, b| Self::entry_name(a).cmp(&Self::entry_name(b)));
        Ok(())
    }

    /// The file of a blob (not verified).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs().join(digest.hex())
    }

    /// Whether the store's layout exists.
    pub fn exists(&self) -> bool {
        self.dir.join("index.json").is_file()
    }

    fn index(&self) -> Result<Index, Error> {
        let p = self.dir.join("index.json");
        match fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| Error::Json {
                path: p,
                what: "index.json".into(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Index {
                schema_version: 2,
                media_type: Some(MEDIA_INDEX.into()),
                manifests: Vec::new(),
            }),
            Err(e) => Err(self.io(&p)(e)),
        }
    }

    fn write_index(&self, index: &Index) -> Result<(), Error> {
        let p = self.dir.join("index.json");
        let mut t = tempfile::Builder::new()
            .prefix(".kiln-index-")
            .tempfile_in(&self.dir)
            .map_err(self.io(&p))?;
        t.write_all(&canonical_json(index)).map_err(self.io(&p))?;
        crate::archive::finish_file(t.as_file(), &p).map_err(|e| Error::Invalid {
            path: p.clone(),
            message: e.to_string(),
        })?;
        t.persist(&p).map_err(|e| self.io(&p)(e.error))?;
        Ok(())
    }

    /// Creates the layout if needed and takes the store's write lock.
    fn lock(&self) -> Result<File, Error> {
        fs::create_dir_all(self.blobs()).map_err(self.io(&self.dir))?;
        let layout = self.dir.join("oci-layout");
        if !layout.exists() {
            fs::write(&layout, crate::archive::OCI_LAYOUT).map_err(self.io(&layout))?;
        }
        let lock = self.dir.join(".kiln-lock");
        let f = File::create(&lock).map_err(self.io(&lock))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| self.io(&lock)(e.into()))?;
        Ok(f)
    }

    /// The name of an index entry for people
    /// (the ref name as given when it is a full `name:tag`, else containerd's.)
    fn entry_name(d: &Descriptor) -> Option<&String> {
        d.annotations
            .get(ANNOTATION_REF_NAME)
            .filter(|n| n.contains(':'))
            .or_else(|| d.annotations.get(ANNOTATION_CONTAINERD_NAME))
            .or_else(|| d.annotations.get(ANNOTATION_REF_NAME))
    }

    fn entry_matches(d: &Descriptor, name: &str) -> bool {
        [ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME]
            .iter()
            .filter_map(|a| d.annotations.get(*a))
            .any(|n| Reference::parse(n).is_ok_and(|r| r.name() == name))
    }

    /// The images of the store.
    pub fn list(&self) -> Result<Vec<Listed>, Error> {
        let mut out = Vec::new();
        for d in self.index()?.manifests {
            let size = if is_index(&d) {
                0
            } else {
                let m: Option<Manifest> = fs::read(self.blob_path(&self.digest(&d)?))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok());
                m.map_or(0, |m| {
                    m.config.size + m.layers.iter().map(|l| l.size).sum::<u64>()
                })
            };
            out.push(Listed {
                name: Self::entry_name(&d).cloned().unwrap_or_default(),
                digest: d.digest.clone(),
                media_type: d.media_type.clone(),
                size,
            });
        }
        Ok(out)
    }

    fn digest(&self, d: &Descriptor) -> Result<Digest, Error> {
        Digest::parse(&d.digest).ok_or_else(|| Error::Invalid {
            path: self.dir.join("index.json"),
            message: format!("invalid digest {:?}", d.digest),
        })
    }

    /// Finds a reference: by digest (any blob of the store), else by name.
    pub fn find(&self, r: &Reference) -> Result<Option<Descriptor>, Error> {
        if !self.exists() {
            return Ok(None);
        }
        let index = self.index()?;
        if let Some(d) = &r.digest {
            if let Some(e) = index.manifests.iter().find(|e| e.digest == d.as_str()) {
                return Ok(Some(e.clone()));
            }
            let p = self.blob_path(d);
            // A manifest held by the store but not named (e.g. one platform
            // of an index); a blob too large to be one is not read.
            if let Some(md) = fs::metadata(&p)
                .ok()
                .filter(|m| m.len() <= crate::limits::MAX_JSON_BLOB)
            {
                let bytes = fs::read(&p).map_err(self.io(&p))?;
                let v: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|source| Error::Json {
                        path: p.clone(),
                        what: format!("blob {d}"),
                        source,
                    })?;
                let media_type = v
                    .get("mediaType")
                    .and_then(|m| m.as_str())
                    .map(str::to_string)
                    .unwrap_or_else(|| {
                        if v.get("manifests").is_some() {
                            MEDIA_INDEX.into()
                        } else {
                            crate::image::MEDIA_MANIFEST.into()
                        }
                    });
                return Ok(Some(crate::image::descriptor(&media_type, d, md.len())));
            }
            return Ok(None);
        }
        let name = r.name();
        Ok(index
            .manifests
            .into_iter()
            .find(|e| Self::entry_matches(e, &name)))
    }

    /// Checks a blob file against its descriptor (once per process) and returns its path.
    pub fn verify(&self, d: &Descriptor) -> Result<PathBuf, Error> {
        let digest = self.digest(d)?;
        let p = self.blob_path(&digest);
        if verified().lock().unwrap().contains(&(p.clone(), d.size)) {
            return Ok(p);
        }
        let mut f = File::open(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                Error::Missing {
                    path: self.dir.clone(),
                    what: format!("blob {digest}"),
                }
            } else {
                self.io(&p)(e)
            }
        })?;
        let mut w = HashingWriter::new(io::sink());
        io::copy(&mut f, &mut w).map_err(self.io(&p))?;
        let (got, size, _) = w.finish();
        if got != digest || size != d.size {
            return Err(Error::BadBlob {
                path: self.dir.clone(),
                digest: digest.to_string(),
                got: got.to_string(),
                size,
            });
        }
        verified().lock().unwrap().insert((p.clone(), d.size));
        Ok(p)
    }

    /// Writes the image `desc` names (with its `manifest`, read from the
    /// store) to `out` in `format`, under `tags`.
    pub fn write_image(
        &self,
        desc: &Descriptor,
        manifest: &Manifest,
        tags: &[String],
        mtime: u64,
        format: crate::archive::Format,
        out: &Path,
    ) -> Result<(), crate::archive::Error> {
        let files = crate::archive::ImageFiles {
            blobs: self.blobs(),
            extra: Default::default(),
            manifest: desc.clone(),
            config: manifest.config.clone(),
            layers: manifest.layers.clone(),
            tags: tags.to_vec(),
            mtime,
        };
        crate::archive::writer_for(format).write(&files, out)
    }

    /// Reads a manifest blob (verified).
    pub fn read_manifest(&self, d: &Descriptor) -> Result<Manifest, Error> {
        self.json(d, "manifest")
    }

    fn read_verified(&self, d: &Descriptor) -> Result<Vec<u8>, Error> {
        let p = self.verify(d)?;
        fs::read(&p).map_err(self.io(&p))
    }

    fn json<T: serde::de::DeserializeOwned>(&self, d: &Descriptor, what: &str) -> Result<T, Error> {
        if d.size > crate::limits::MAX_JSON_BLOB {
            return Err(Error::Invalid {
                path: self.dir.clone(),
                message: format!(
                    "{what} {} declares {} bytes; kiln reads manifests and configs of at most {} bytes",
                    d.digest,
                    d.size,
                    crate::limits::MAX_JSON_BLOB
                ),
            });
        }
        let bytes = self.read_verified(d)?;
        serde_json::from_slice(&bytes).map_err(|source| Error::Json {
            path: self.dir.clone(),
            what: format!("{what} {}", d.digest),
            source,
        })
    }

    /// Loads the image a descriptor names, choosing `platform` (else the
    /// host's) from a multi-platform index; verifies every blob.
    pub fn load(
        &self,
        d: &Descriptor,
        reference: &str,
        platform: Option<&Platform>,
    ) -> Result<BaseImage, Error> {
        let host = host_platform();
        let want = platform.unwrap_or(&host);
        let mut d = d.clone();
        let looks_like_index = |s: &Store, d: &Descriptor| -> Result<bool, Error> {
            if is_index(d) {
                return Ok(true);
            }
            let v: serde_json::Value = s.json(d, "manifest")?;
            Ok(v.get("manifests").is_some())
        };
        if looks_like_index(self, &d)? {
            let index: Index = self.json(&d, "index")?;
            let found = index.manifests.iter().find(|m| {
                m.platform.as_ref().is_some_and(|p| {
                    platform_matches(want, &p.os, &p.architecture, p.variant.as_deref())
                })
            });
            d = match found {
                Some(m) => m.clone(),
                None => {
                    let have: Vec<String> = index
                        .manifests
                        .iter()
                        .filter_map(|m| m.platform.as_ref().map(platform_text))
                        .collect();
                    return Err(Error::NotFound {
                        message: format!(
                            "{reference}: the image in {} has no {} variant (it has: {}); pass --platform to FROM for one it has",
                            self.dir.display(),
                            platform_text(want),
                            have.join(", ")
                        ),
                    });
                }
            };
        }
        let manifest: Manifest = self.json(&d, "manifest")?;
        let config: ImageConfig = self.json(&manifest.config, "config")?;
        if platform.is_some()
            && !platform_matches(
                want,
                &config.os,
                &config.architecture,
                config.variant.as_deref(),
            )
        {
            return Err(Error::NotFound {
                message: format!(
                    "{reference}: the image in {} is {}/{}, not {}",
                    self.dir.display(),
                    config.os,
                    config.architecture,
                    platform_text(want)
                ),
            });
        }
        if manifest.layers.len() != config.rootfs.diff_ids.len() {
            return Err(Error::Invalid {
                path: self.dir.clone(),
                message: format!(
                    "{reference}: manifest {} has {} layers but its config lists {} diff_ids",
                    d.digest,
                    manifest.layers.len(),
                    config.rootfs.diff_ids.len()
                ),
            });
        }
        let mut layers = Vec::new();
        for l in &manifest.layers {
            let oci = oci_layer_type(&l.media_type);
            if !oci.starts_with("application/vnd.oci.image.layer.") {
                return Err(Error::Invalid {
                    path: self.dir.clone(),
                    message: format!(
                        "{reference}: layer {} has media type {:?}, which is not a layer (tar, tar+gzip or tar+zstd)",
                        l.digest, l.media_type
                    ),
                });
            }
            let path = self.verify(l)?;
            let mut desc = l.clone();
            desc.media_type = oci_layer_type(&l.media_type);
            layers.push((desc, path));
        }
        Ok(BaseImage {
            reference: reference.to_string(),
            manifest_digest: d.digest.clone(),
            config,
            layers,
            index_digest: None,
        })
    }

    /// Imports every image of `src` (or only the first, under `names`),
    /// copying blobs byte for byte after verifying them. Returns what was added.
    pub fn add(&self, src: &ImageReader, names: &[String]) -> Result<Vec<Listed>, Error> {
        let _lock = self.lock()?;
        let mut images = src.images()?;
        if !names.is_empty() {
            images.truncate(1);
            if let Some(first) = images.first_mut() {
                first.1 = names.to_vec();
            }
        }
        let mut index = self.index()?;
        let mut added = Vec::new();
        for (desc, tags) in images {
            if tags.is_empty() {
                return Err(Error::Invalid {
                    path: PathBuf::from(src.format),
                    message: format!(
                        "image {} has no name; give one with --name NAME:TAG",
                        desc.digest
                    ),
                });
            }
            for blob in src.closure(&desc)? {
                let digest = self.digest(&blob)?;
                let target = self.blob_path(&digest);
                if fs::metadata(&target).is_ok_and(|m| m.len() == blob.size) {
                    continue;
                }
                let mut t = tempfile::Builder::new()
                    .prefix(".kiln-blob-")
                    .tempfile_in(self.blobs())
                    .map_err(self.io(&target))?;
                {
                    let mut w = io::BufWriter::with_capacity(1 << 20, t.as_file_mut());
                    src.copy_blob(&blob, &mut w)?;
                    w.flush().map_err(self.io(&target))?;
                }
                crate::archive::finish_file(t.as_file(), &target).map_err(|e| Error::Invalid {
                    path: target.clone(),
                    message: e.to_string(),
                })?;
                t.persist(&target).map_err(|e| self.io(&target)(e.error))?;
            }
            Self::name_entries(&mut index, &desc, &tags, &self.dir)?;
            added.extend(tags.into_iter().map(|tag| Listed {
                name: tag,
                digest: desc.digest.clone(),
                media_type: desc.media_type.clone(),
                size: 0,
            }));
        }
        self.write_index(&index)?;
        Ok(added)
    }

    /// Removes the names matching `reference` (a name or a digest); blobs stay until `gc`.
    pub fn remove(&self, reference: &str) -> Result<usize, Error> {
        let r = Reference::parse(reference).map_err(|message| Error::NotFound { message })?;
        let _lock = self.lock()?;
        let mut index = self.index()?;
        let before = index.manifests.len();
        let name = r.name();
        index.manifests.retain(|e| match &r.digest {
            Some(d) => e.digest != d.as_str(),
            None => !Self::entry_matches(e, &name),
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

    /// Deletes every blob no named image references; returns (blobs, bytes) freed.
    pub fn gc(&self) -> Result<(usize, u64), Error> {
        let _lock = self.lock()?;
        let mut keep: BTreeSet<String> = BTreeSet::new();
        // Manifests and indexes to read; configs and layers are leaves, kept unread.
        let mut todo: Vec<Descriptor> = self.index()?.manifests;
        while let Some(d) = todo.pop() {
            if !keep.insert(d.digest.clone()) {
                continue;
            }
            let p = self.blob_path(&self.digest(&d)?);
            if d.size > crate::limits::MAX_JSON_BLOB {
                continue;
            }
            let Ok(bytes) = fs::read(&p) else { continue };
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
                continue;
            };
            if v.get("manifests").is_some() {
                if let Ok(i) = serde_json::from_value::<Index>(v) {
                    todo.extend(i.manifests);
                }
            } else if v.get("layers").is_some() {
                if let Ok(m) = serde_json::from_value::<Manifest>(v) {
                    keep.insert(m.config.digest);
                    keep.extend(m.layers.into_iter().map(|l| l.digest));
                }
            }
        }
        let (mut n, mut bytes) = (0, 0);
        let blobs = self.blobs();
        for e in fs::read_dir(&blobs).map_err(self.io(&blobs))? {
            let e = e.map_err(self.io(&blobs))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if keep.contains(&format!("sha256:{name}")) {
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

/// The stores a build searches, in order.
#[derive(Clone, Debug, Default)]
pub struct Stores {
    pub list: Vec<Store>,
}

impl Stores {
    /// `--store` dirs, then `$KILN_STORE` (colon-separated), then
    /// `<topsrcdir>/vendor-images` if present, then the user cache.
    pub fn search_order(flags: &[PathBuf], topsrcdir: Option<&Path>) -> Stores {
        let mut list: Vec<Store> = flags.iter().map(|d| Store::new(d, "--store")).collect();
        if let Some(env) = std::env::var_os("KILN_STORE") {
            for d in std::env::split_paths(&env).filter(|d| !d.as_os_str().is_empty()) {
                list.push(Store::new(d, "$KILN_STORE"));
            }
        }
        if let Some(t) = topsrcdir {
            let v = t.join("vendor-images");
            if v.join("index.json").is_file() {
                list.push(Store::new(v, "<topsrcdir>/vendor-images"));
            }
        }
        list.push(Store::new(Self::user_store(), "user cache"));
        Stores { list }
    }

    /// `$XDG_CACHE_HOME/kiln/store` (else `~/.cache/kiln/store`).
    pub fn user_store() -> PathBuf {
        crate::cache_dir().join("store")
    }

    /// The search order as text, for errors.
    pub fn describe(&self) -> String {
        self.list
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let missing = if s.exists() { "" } else { ", absent" };
                format!("{}. {} ({}{missing})", i + 1, s.dir.display(), s.origin)
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Resolves a FROM reference in the first store that has it.
    pub fn resolve(
        &self,
        reference: &str,
        platform: Option<&Platform>,
    ) -> Result<BaseImage, Error> {
        let (s, d) = self.find(reference)?;
        s.load(&d, reference, platform)
    }

    /// The first store holding a reference, and its descriptor there (nothing verified yet).
    pub fn find(&self, reference: &str) -> Result<(&Store, Descriptor), Error> {
        let r = Reference::parse(reference).map_err(|message| Error::NotFound { message })?;
        for s in &self.list {
            if let Some(d) = s.find(&r)? {
                return Ok((s, d));
            }
        }
        let what = match &r.digest {
            Some(d) => format!("an image with digest {d}"),
            None => r.name(),
        };
        Err(Error::NotFound {
            message: format!(
                "base image {reference}: {what} is in none of the image stores searched, in order: {}. kiln never pulls from a network: import the image with `kiln store add IMAGE.tar --name {}` (e.g. from `docker save` or `skopeo copy`), or pass --store DIR",
                self.describe(),
                if r.digest.is_some() { "NAME:TAG".to_string() } else { reference.to_string() }
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platforms_parse() {
        let p = parse_platform("linux/arm64/v8").unwrap();
        assert_eq!((p.os.as_str(), p.architecture.as_str()), ("linux", "arm64"));
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert!(parse_platform("linux").is_none());
        assert!(platform_matches(
            &parse_platform("linux/amd64").unwrap(),
            "linux",
            "amd64",
            None
        ));
    }

    #[test]
    fn docker_layer_types_become_oci() {
        assert_eq!(
            oci_layer_type("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            "application/vnd.oci.image.layer.v1.tar+gzip"
        );
    }
}
