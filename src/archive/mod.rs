//! Output writers: an OCI image layout directory, an OCI archive, a
//! docker-archive (which is also an OCI layout inside, as `docker save`
//! writes since Docker 25), and the same docker-archive zstd-compressed as a
//! whole (`image.tar.zst`, the Taskcluster artifact). Each writer lives in
//! its own file behind [`Writer`]; [`writer_for`] chooses.
//!
//! Every writer works in a temporary file or directory beside the target and
//! renames it into place only when complete, so a failed or interrupted
//! build leaves no partial output.

mod docker_archive;
mod oci_archive;
mod oci_dir;

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::image::{
    Descriptor, Index, ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME, MEDIA_INDEX,
};
use crate::layer::{self, Entries, FileSource, LayerEntry};
use crate::progress::Step;

/// Output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    OciDir,
    OciArchive,
    DockerArchive,
    /// A docker-archive compressed as a whole with zstd (`image.tar.zst`).
    DockerArchiveZstd,
}

impl Format {
    /// Guesses the format from an output path.
    pub fn from_path(p: &Path) -> Format {
        let s = p.to_string_lossy();
        if s.ends_with(".tar.zst") || s.ends_with(".tzst") {
            Format::DockerArchiveZstd
        } else if s.ends_with(".oci.tar") {
            Format::OciArchive
        } else if s.ends_with(".tar") {
            Format::DockerArchive
        } else {
            Format::OciDir
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::OciDir => "oci-dir",
            Format::OciArchive => "oci-archive",
            Format::DockerArchive => "docker-archive",
            Format::DockerArchiveZstd => "docker-archive+zstd",
        }
    }
}

/// A finished image whose blobs sit in `blobs` (a `blobs/sha256` directory).
#[derive(Clone, Debug)]
pub struct ImageFiles {
    pub blobs: PathBuf,
    /// Blobs that live elsewhere (base layers in a store), by digest.
    pub extra: std::collections::BTreeMap<String, PathBuf>,
    pub manifest: Descriptor,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    /// Full tags, e.g. `registry.example/foo:1.0`.
    pub tags: Vec<String>,
    /// mtime for archive entries.
    pub mtime: u64,
}

impl ImageFiles {
    /// The file holding a blob.
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        match self.extra.get(digest) {
            Some(p) => p.clone(),
            None => self.blobs.join(digest.trim_start_matches("sha256:")),
        }
    }
}

/// Errors writing an output.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("output directory {} exists and is not an OCI image layout; remove it or choose another -o", path.display())]
    NotALayout { path: PathBuf },
    #[error("building the archive {}: {source}", path.display())]
    Layer { path: PathBuf, source: layer::Error },
}

pub(crate) fn io_err(path: &Path) -> impl Fn(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// An output backend.
pub trait Writer {
    /// Writes `img` to `out`, atomically.
    fn write(&self, img: &ImageFiles, out: &Path) -> Result<(), Error>;
}

/// Chooses the writer for `format`.
pub fn writer_for(format: Format) -> Box<dyn Writer> {
    match format {
        Format::OciDir => Box::new(oci_dir::OciDir),
        Format::OciArchive => Box::new(oci_archive::OciArchive),
        Format::DockerArchive => Box::new(docker_archive::DockerArchive { zstd: false }),
        Format::DockerArchiveZstd => Box::new(docker_archive::DockerArchive { zstd: true }),
    }
}

/// Splits `name[:tag]` into the repository and tag (`latest` by default).
pub fn split_tag(reference: &str) -> (&str, &str) {
    let last = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last..].rfind(':') {
        Some(i) => (&reference[..last + i], &reference[last + i + 1..]),
        None => (reference, "latest"),
    }
}

/// Docker's fully qualified name: `docker.io/library/foo:latest` for `foo`.
pub fn qualified_name(reference: &str) -> String {
    let (repo, tag) = split_tag(reference);
    let first = repo.split('/').next().unwrap_or("");
    let has_domain =
        repo.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let repo = if has_domain {
        repo.to_string()
    } else if repo.contains('/') {
        format!("docker.io/{repo}")
    } else {
        format!("docker.io/library/{repo}")
    };
    format!("{repo}:{tag}")
}

/// The `index.json` of an image layout holding `img` under its tags.
pub fn index_json(img: &ImageFiles) -> Vec<u8> {
    let mut manifests = Vec::new();
    for tag in &img.tags {
        let mut d = img.manifest.clone();
        d.annotations
            .insert(ANNOTATION_CONTAINERD_NAME.into(), qualified_name(tag));
        d.annotations
            .insert(ANNOTATION_REF_NAME.into(), split_tag(tag).1.to_string());
        manifests.push(d);
    }
    if manifests.is_empty() {
        manifests.push(img.manifest.clone());
    }
    let index = Index {
        schema_version: 2,
        media_type: Some(MEDIA_INDEX.into()),
        manifests,
    };
    crate::image::canonical_json(&index)
}

pub const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// The layout's entries (dirs, blobs, `oci-layout`, `index.json`) as archive entries.
fn layout_entries(img: &ImageFiles) -> Entries {
    let mut e = Entries::new();
    e.insert(b"blobs".to_vec(), LayerEntry::dir(0o755, 0, 0));
    e.insert(b"blobs/sha256".to_vec(), LayerEntry::dir(0o755, 0, 0));
    let mut digests: Vec<(&str, u64)> = vec![
        (&img.manifest.digest, img.manifest.size),
        (&img.config.digest, img.config.size),
    ];
    digests.extend(img.layers.iter().map(|l| (l.digest.as_str(), l.size)));
    for (d, size) in digests {
        let hex = d.trim_start_matches("sha256:");
        let path = img.blob_path(d);
        e.insert(
            format!("blobs/sha256/{hex}").into_bytes(),
            file(FileSource::Path(std::sync::Arc::from(path)), size),
        );
    }
    e.insert(b"oci-layout".to_vec(), bytes(OCI_LAYOUT.to_vec()));
    e.insert(b"index.json".to_vec(), bytes(index_json(img)));
    e
}

fn file(source: FileSource, size: u64) -> LayerEntry {
    LayerEntry::file(source, size, 0o644, 0, 0)
}

fn bytes(b: Vec<u8>) -> LayerEntry {
    let size = b.len() as u64;
    file(FileSource::Bytes(b.into()), size)
}

/// Writes `entries` as a tar (optionally zstd-compressed as a whole) to a
/// temporary file beside `out`, then renames it to `out`.
fn write_archive(entries: &Entries, mtime: u64, zstd: bool, out: &Path) -> Result<(), Error> {
    let dir = parent_dir(out);
    let tmp = tempfile::Builder::new()
        .prefix(&temp_prefix("out"))
        .tempfile_in(&dir)
        .map_err(io_err(out))?;
    {
        let f = BufWriter::with_capacity(1 << 20, tmp.as_file());
        let lerr = |source| Error::Layer {
            path: out.to_path_buf(),
            source,
        };
        if zstd {
            let mut enc = layer::Compression::Zstd(3).writer(f).map_err(io_err(out))?;
            let mut bw = BufWriter::with_capacity(1 << 20, &mut enc);
            layer::write_tar(entries, mtime, &mut bw, &Step::none()).map_err(lerr)?;
            bw.flush().map_err(io_err(out))?;
            drop(bw);
            let mut f = enc.finish().map_err(io_err(out))?;
            f.flush().map_err(io_err(out))?;
        } else {
            drop(f);
            copy_archive(entries, mtime, tmp.as_file()).map_err(io_err(out))?;
        }
    }
    finish_file(tmp.as_file(), out)?;
    tmp.persist(out).map_err(|e| Error::Io {
        path: out.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
}

/// An OCI archive or docker-archive written as the build goes: each layer's
/// compressed stream goes straight into the archive (its header is written
/// into reserved space once the digest and size are known), so no layer is
/// written twice. The rest of the image follows at [`Streaming::finish`].
pub struct Streaming {
    tmp: tempfile::NamedTempFile,
    out: PathBuf,
    mtime: u64,
    written: std::collections::BTreeSet<String>,
}

impl Format {
    /// Whether the build can write this format's layers straight into it.
    pub fn streams(self) -> bool {
        matches!(self, Format::OciArchive | Format::DockerArchive)
    }
}

impl Streaming {
    pub fn create(out: &Path, mtime: u64) -> Result<Streaming, Error> {
        let dir = parent_dir(out);
        let tmp = tempfile::Builder::new()
            .prefix(&temp_prefix("out"))
            .tempfile_in(&dir)
            .map_err(io_err(out))?;
        let mut s = Streaming {
            tmp,
            out: out.to_path_buf(),
            mtime,
            written: Default::default(),
        };
        for name in [&b"blobs/"[..], b"blobs/sha256/"] {
            let h = layer::tar::Header {
                name,
                kind: layer::tar::Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                mtime,
                link: b"",
            };
            layer::tar::write_ustar(s.tmp.as_file_mut(), &h).map_err(io_err(out))?;
        }
        Ok(s)
    }

    /// Adds one layer: `write` gets the archive file positioned where the
    /// blob's bytes go and returns the layer's digest, size and the file.
    pub fn add_layer<E>(
        &mut self,
        write: impl FnOnce(fs::File) -> Result<(crate::layer::LayerInfo, fs::File), E>,
    ) -> Result<Result<crate::layer::LayerInfo, E>, Error> {
        use std::io::{Seek, SeekFrom};
        let out = self.out.clone();
        let ioe = io_err(&out);
        let f = self.tmp.as_file_mut();
        let start = f.stream_position().map_err(&ioe)?;
        f.write_all(&[0u8; layer::tar::BLOCK]).map_err(&ioe)?;
        let handle = f.try_clone().map_err(&ioe)?;
        let (info, _) = match write(handle) {
            Ok(r) => r,
            Err(e) => return Ok(Err(e)),
        };
        let f = self.tmp.as_file_mut();
        let end = start + layer::tar::BLOCK as u64 + info.size;
        if !self.written.insert(info.digest.to_string()) {
            // The same blob is already in the archive: take this copy back out.
            f.set_len(start).map_err(&ioe)?;
            f.seek(SeekFrom::Start(start)).map_err(&ioe)?;
            return Ok(Ok(info));
        }
        let name = format!("blobs/sha256/{}", info.digest.hex());
        let h = layer::tar::Header {
            name: name.as_bytes(),
            kind: layer::tar::Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: info.size,
            mtime: self.mtime,
            link: b"",
        };
        let block = layer::tar::ustar_block(&h).map_err(&ioe)?;
        f.seek(SeekFrom::Start(start)).map_err(&ioe)?;
        f.write_all(&block).map_err(&ioe)?;
        f.seek(SeekFrom::Start(end)).map_err(&ioe)?;
        layer::tar::pad(f, info.size).map_err(&ioe)?;
        Ok(Ok(info))
    }

    /// Writes the config, manifest and the format's index files, and renames
    /// the archive into place.
    pub fn finish(mut self, img: &ImageFiles, format: Format) -> Result<(), Error> {
        let mut entries = match format {
            Format::DockerArchive => docker_archive::docker_entries(img),
            _ => layout_entries(img),
        };
        entries.retain(|path, e| {
            !e.is_dir()
                && !path.strip_prefix(&b"blobs/sha256/"[..]).is_some_and(|hex| {
                    self.written
                        .contains(&format!("sha256:{}", String::from_utf8_lossy(hex)))
                })
        });
        copy_archive(&entries, self.mtime, self.tmp.as_file_mut()).map_err(io_err(&self.out))?;
        finish_file(self.tmp.as_file(), &self.out)?;
        self.tmp.persist(&self.out).map_err(|e| Error::Io {
            path: self.out.clone(),
            source: e.error,
        })?;
        Ok(())
    }
}

/// Writes the archive of our own blobs straight into `file`: headers
/// through a buffer, blob contents with `io::copy` from file to file, which
/// Linux turns into `copy_file_range` (no trip through user space).
fn copy_archive(entries: &Entries, mtime: u64, file: &fs::File) -> std::io::Result<()> {
    use crate::layer::{tar, Content};
    let mut out = BufWriter::with_capacity(1 << 20, file);
    for (path, e) in entries {
        let mut h = tar::Header {
            name: path,
            kind: tar::Kind::File,
            mode: e.mode,
            uid: 0,
            gid: 0,
            size: 0,
            mtime,
            link: b"",
        };
        match &e.content {
            Content::Dir => {
                let mut name = path.clone();
                name.push(b'/');
                tar::write_ustar(
                    &mut out,
                    &tar::Header {
                        name: &name,
                        kind: tar::Kind::Dir,
                        ..h
                    },
                )?;
            }
            Content::File {
                source: FileSource::Bytes(b),
                ..
            } => {
                h.size = b.len() as u64;
                tar::write_ustar(&mut out, &h)?;
                out.write_all(b)?;
                tar::pad(&mut out, h.size)?;
            }
            Content::File {
                source: FileSource::Path(p),
                size,
            } => {
                h.size = *size;
                tar::write_ustar(&mut out, &h)?;
                out.flush()?;
                let mut src = fs::File::open(p)?;
                let mut dst: &fs::File = out.get_ref();
                let copied = std::io::copy(&mut src, &mut dst)?;
                if copied != *size {
                    return Err(std::io::Error::other(format!(
                        "blob {} changed size while kiln copied it",
                        p.display()
                    )));
                }
                tar::pad(&mut out, *size)?;
            }
            Content::Symlink(_) => {
                return Err(std::io::Error::other("an image archive holds no symlinks"))
            }
        }
    }
    tar::finish(&mut out)?;
    out.flush()
}

/// Makes a finished temporary output world-readable (tempfiles start 0600) and durable.
pub(crate) fn finish_file(f: &fs::File, out: &Path) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    f.set_permissions(fs::Permissions::from_mode(0o644))
        .map_err(io_err(out))?;
    f.sync_all().map_err(io_err(out))
}

/// The prefix of kiln's temporary files and directories beside outputs:
/// `.kiln-<kind>-<pid>-`, so a later run can tell whose they are.
pub fn temp_prefix(kind: &str) -> String {
    format!(".kiln-{kind}-{}-", std::process::id())
}

/// Removes temporary outputs that kiln processes which no longer run left
/// in `dir` (after a `kill -9` or a power cut); never another live
/// process's. Best effort: failures are ignored.
pub fn clean_stale(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(".kiln-")) else {
            continue;
        };
        let mut parts = rest.splitn(3, '-');
        let (Some(kind), Some(pid), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if !matches!(kind, "out" | "build" | "old") {
            continue;
        }
        let Ok(pid) = pid.parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        let p = e.path();
        let _ = if p.is_dir() && !p.is_symlink() {
            fs::remove_dir_all(&p)
        } else {
            fs::remove_file(&p)
        };
    }
}

/// The directory an output goes into (created if missing).
pub(crate) fn parent_dir(out: &Path) -> PathBuf {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let _ = fs::create_dir_all(parent);
    clean_stale(parent);
    parent.to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_split_and_qualify_like_docker() {
        assert_eq!(split_tag("foo"), ("foo", "latest"));
        assert_eq!(
            split_tag("localhost:5000/foo:1.2"),
            ("localhost:5000/foo", "1.2")
        );
        assert_eq!(
            split_tag("localhost:5000/foo"),
            ("localhost:5000/foo", "latest")
        );
        assert_eq!(qualified_name("foo"), "docker.io/library/foo:latest");
        assert_eq!(qualified_name("me/foo:1"), "docker.io/me/foo:1");
        assert_eq!(qualified_name("ghcr.io/me/foo:1"), "ghcr.io/me/foo:1");
    }

    #[test]
    fn format_follows_the_extension() {
        assert_eq!(
            Format::from_path(Path::new("image.tar.zst")),
            Format::DockerArchiveZstd
        );
        assert_eq!(
            Format::from_path(Path::new("x.oci.tar")),
            Format::OciArchive
        );
        assert_eq!(Format::from_path(Path::new("x.tar")), Format::DockerArchive);
        assert_eq!(Format::from_path(Path::new("out/")), Format::OciDir);
    }
}
