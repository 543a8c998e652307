//! Image files kiln (or docker, skopeo, buildah) wrote: an OCI layout
//! directory, an OCI archive, a docker-archive (with an OCI layout inside,
//! as Docker 25+ writes, or the legacy `manifest.json`-only form that
//! `docker save` before 25 and `skopeo copy docker-archive:` write), or
//! `image.tar.zst`. A source like any other: blobs are verified by the
//! readers of [`super`].

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{decoder, sniff, BlobFile, Error, Source};
use crate::digest::HashingWriter;
use crate::image::{
    canonical_json, Codec, Descriptor, Digest, DockerManifestEntry, ImageConfig, Index, Manifest,
    MediaType,
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
    members: HashMap<Digest, String>,
}

/// An image file or layout directory.
pub struct ImageFile {
    path: PathBuf,
    backing: Backing,
    legacy: Option<Legacy>,
    format: &'static str,
}

/// What `kiln inspect` shows.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub format: String,
    pub manifest_digest: Digest,
    pub image_id: Digest,
    pub tags: Vec<String>,
    pub manifest: Manifest,
    pub config: ImageConfig,
}

impl ImageFile {
    /// Opens an image of any supported format.
    pub fn open(path: &Path) -> Result<ImageFile, Error> {
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
            return Ok(ImageFile {
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
        let (file, tmp) = if sniff(&magic[..n]) == Codec::Zstd {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let mut t = tempfile::Builder::new()
                .prefix(&crate::sink::file::temp_prefix("read"))
                .tempfile_in(dir)
                .or_else(|_| {
                    tempfile::Builder::new()
                        .prefix(&crate::sink::file::temp_prefix("read"))
                        .tempfile()
                })
                .map_err(ioe)?;
            let mut dec = decoder(
                Codec::Zstd,
                BufReader::new(File::open(path).map_err(ioe)?),
                &path.display().to_string(),
            )
            .map_err(ioe)?;
            // A read error names the input; a write error (a full disk)
            // names the temporary file it was decompressed into.
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = match dec.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(ioe(e)),
                };
                io::Write::write_all(t.as_file_mut(), &buf[..n]).map_err(|source| {
                    Error::Write {
                        path: t.path().to_path_buf(),
                        source,
                    }
                })?;
            }
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
        let mut r = ImageFile {
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
        let dm: Vec<DockerManifestEntry> = super::parse_json(self, &dm, "manifest.json")?;
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
            members.insert(digest.clone(), member);
            Ok((digest, size, head))
        };
        let (cd, cs, _) = blob(&first.config, "config")?;
        let mut layers = Vec::new();
        for l in &first.layers {
            let (d, s, head) = blob(l, "layer")?;
            layers.push(Descriptor::new(MediaType::oci_layer(sniff(&head)), d, s));
        }
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MediaType::OciManifest),
            config: Descriptor::new(MediaType::OciConfig, cd, cs),
            layers,
            annotations: BTreeMap::new(),
            extra: Default::default(),
        };
        let bytes = canonical_json(&manifest);
        let d = Digest::of(&bytes);
        Ok(Legacy {
            descriptor: Descriptor::new(MediaType::OciManifest, d, bytes.len() as u64),
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
    fn open_member(&self, name: &str) -> Result<Option<Box<dyn Read + Send + '_>>, Error> {
        match &self.backing {
            // Beneath the layout with no links followed: a blob that is a
            // link is an error naming it, its target never read.
            Backing::Dir(d) => match crate::fsx::DirFd::open(d).and_then(|d| d.open_file(name)) {
                Ok(f) => Ok(Some(Box::new(BufReader::with_capacity(1 << 20, f)))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::Io {
                    path: d.join(name),
                    source: e,
                }),
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
        if let Some(m) = self.legacy.as_ref().and_then(|l| l.members.get(digest)) {
            return m.clone();
        }
        format!("blobs/sha256/{}", digest.hex())
    }

    fn derived(&self, d: &Descriptor) -> Option<&Legacy> {
        self.legacy
            .as_ref()
            .filter(|l| l.descriptor.digest == d.digest)
    }

    fn missing(&self, d: &Descriptor) -> Error {
        Error::Missing {
            path: self.path.clone(),
            what: format!("blob {}", d.digest),
        }
    }

    /// Reads manifest and config of the (first) image.
    pub fn summary(&self) -> Result<Summary, Error> {
        let (desc, tags) = super::first_image(self)?;
        if desc.media_type.is_index() {
            return Err(self.invalid(&format!(
                "{} is a multi-platform index; kiln inspect shows single images",
                desc.digest
            )));
        }
        let manifest: Manifest = super::read_json(self, &desc, "manifest")?;
        let config: ImageConfig = super::read_json(self, &manifest.config, "config")?;
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

impl Source for ImageFile {
    fn location(&self) -> PathBuf {
        self.path.clone()
    }

    fn format(&self) -> &str {
        self.format
    }

    /// Every image the file holds: (descriptor, names), in index order. A
    /// name is the fullest one recorded (containerd's qualified name, else
    /// the OCI ref name); docker-archive tags win where present.
    fn images(&self) -> Result<Vec<(Descriptor, Vec<String>)>, Error> {
        if let Some(l) = &self.legacy {
            return Ok(vec![(l.descriptor.clone(), l.tags.clone())]);
        }
        let Some(index) = self.read_member("index.json")? else {
            return Err(Error::Missing {
                path: self.path.clone(),
                what: "index.json (is this an image?)".into(),
            });
        };
        let index: Index = super::parse_json(self, &index, "index.json")?;
        let mut out = super::group_names(index.manifests.into_iter().map(|m| {
            let name = m
                .annotations
                .get(crate::image::ANNOTATION_CONTAINERD_NAME)
                .or_else(|| m.annotations.get(crate::image::ANNOTATION_REF_NAME))
                .cloned();
            (m, name)
        }));
        if let Some(dm) = self.read_member("manifest.json")? {
            let dm: Vec<DockerManifestEntry> = super::parse_json(self, &dm, "manifest.json")?;
            if let (Some(e), Some(first)) = (dm.first(), out.first_mut()) {
                if !e.repo_tags.is_empty() {
                    first.1 = e.repo_tags.clone();
                }
            }
        }
        Ok(out)
    }

    fn open_blob(&self, d: &Descriptor) -> Result<Box<dyn Read + Send + '_>, Error> {
        if let Some(l) = self.derived(d) {
            return Ok(Box::new(io::Cursor::new(l.manifest.clone())));
        }
        let name = self.blob_member(&d.digest);
        self.open_member(&name)?.ok_or_else(|| self.missing(d))
    }

    fn blob_file(&self, d: &Descriptor) -> Option<BlobFile> {
        if self.derived(d).is_some() {
            return None;
        }
        let name = self.blob_member(&d.digest);
        match &self.backing {
            Backing::Dir(dir) => super::whole_file(dir.join(&name)),
            Backing::Tar { file, members, .. } => {
                let &(offset, len) = members.get(&name)?;
                Some(BlobFile {
                    path: file.clone(),
                    offset,
                    len,
                })
            }
        }
    }

    fn member(&self, name: &str) -> Result<Option<Vec<u8>>, Error> {
        self.read_member(name)
    }

    fn is_derived(&self) -> bool {
        self.legacy.is_some()
    }
}

impl Summary {
    /// The image as `kiln inspect` shows it.
    pub fn render(&self, path: &Path) -> String {
        use std::fmt::Write as _;
        let s = self;
        let mut out = String::new();
        let _ = writeln!(out, "image:           {} ({})", path.display(), s.format);
        let _ = writeln!(out, "manifest digest: {}", s.manifest_digest);
        let _ = writeln!(out, "image id:        {}", s.image_id);
        if !s.tags.is_empty() {
            let _ = writeln!(out, "tags:            {}", s.tags.join(", "));
        }
        let c = &s.config;
        let _ = writeln!(out, "platform:        {}/{}", c.os, c.architecture);
        if let Some(created) = &c.created {
            let _ = writeln!(out, "created:         {created}");
        }
        let _ = writeln!(out, "layers:          {}", s.manifest.layers.len());
        for (i, l) in s.manifest.layers.iter().enumerate() {
            let diff = c.rootfs.diff_ids.get(i).map(|d| d.as_str()).unwrap_or("?");
            let _ = writeln!(out, "  {i}: {} {} bytes {}", l.digest, l.size, l.media_type);
            let _ = writeln!(out, "     diff_id {diff}");
        }
        let rc = &c.config;
        let list = |v: &Option<Vec<String>>| v.as_ref().map(|v| format!("{v:?}"));
        let fields: Vec<(&str, Option<String>)> = vec![
            ("Env", list(&rc.env)),
            ("Entrypoint", list(&rc.entrypoint)),
            ("Cmd", list(&rc.cmd)),
            ("WorkingDir", rc.working_dir.clone()),
            ("User", rc.user.clone()),
            (
                "ExposedPorts",
                rc.exposed_ports
                    .as_ref()
                    .map(|m| m.keys().cloned().collect::<Vec<_>>().join(" ")),
            ),
            (
                "Volumes",
                rc.volumes
                    .as_ref()
                    .map(|m| m.keys().cloned().collect::<Vec<_>>().join(" ")),
            ),
            ("Labels", rc.labels.as_ref().map(|m| format!("{m:?}"))),
            ("StopSignal", rc.stop_signal.clone()),
            ("Shell", list(&rc.shell)),
            (
                "Healthcheck",
                rc.healthcheck.as_ref().map(|h| format!("{:?}", h.test)),
            ),
            ("OnBuild", list(&rc.on_build)),
        ];
        let _ = writeln!(out, "config:");
        for (k, v) in fields {
            if let Some(v) = v {
                let _ = writeln!(out, "  {k}: {v}");
            }
        }
        let _ = writeln!(out, "history:");
        for h in &c.history {
            let empty = if h.empty_layer { " (no layer)" } else { "" };
            let _ = writeln!(out, "  {}{empty}", h.created_by.as_deref().unwrap_or(""));
        }
        out
    }
}
