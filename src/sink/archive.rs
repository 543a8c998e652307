//! The output files as a sink: an OCI image layout directory, an OCI
//! archive, a docker-archive (an OCI layout plus `manifest.json` and
//! `repositories`, as `docker save` writes since Docker 25, which
//! taskgraph's image loader requires), and the same docker-archive
//! compressed as a whole with zstd (`image.tar.zst`, the Taskcluster
//! artifact).
//!
//! Everything is written to a temporary file or directory beside the target
//! and renamed into place at [`Sink::commit`]: a failed or interrupted write
//! leaves no partial output. Archives are written as blobs arrive (each
//! verified as it streams in); a build can stream a layer of unknown size
//! straight into an archive with [`Output::put_new_blob`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::file::{parent_dir, temp_prefix, Pending};
use super::{Blob, Sink};
use crate::image::{
    canonical_json, Descriptor, Digest, DockerManifestEntry, Index, Manifest, Reference,
    ANNOTATION_CONTAINERD_NAME, ANNOTATION_REF_NAME,
};
use crate::layer::{tar, Compression};
use crate::source::{read_error, Error};

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
    /// The format an output path implies by its extension.
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

    /// The format of an output: the one asked for, else what the path's
    /// extension implies; a docker-archive asked for at a `.tar.zst` path
    /// is the whole-file zstd one.
    pub fn choose(asked: Option<Format>, output: &Path) -> Format {
        match asked {
            Some(Format::DockerArchive)
                if Format::from_path(output) == Format::DockerArchiveZstd =>
            {
                Format::DockerArchiveZstd
            }
            Some(f) => f,
            None => Format::from_path(output),
        }
    }

    /// The layer compression a format gets unless one is asked for: zstd
    /// for OCI layouts and archives; gzip for docker-archives, because
    /// Docker Engines before 23 cannot load zstd layers; none inside a
    /// `.tar.zst`, which is compressed as a whole. `level` is the user's.
    pub fn default_compression(self, level: Option<i32>) -> Compression {
        match self {
            Format::DockerArchiveZstd => Compression::None,
            Format::DockerArchive => Compression::Gzip(level.unwrap_or(6).clamp(0, 9) as u32),
            Format::OciDir | Format::OciArchive => Compression::Zstd(level.unwrap_or(3)),
        }
    }

    /// The output file or directory name an image gets in this format.
    pub fn file_name(self, name: &str) -> String {
        match self {
            Format::DockerArchive => format!("{name}.tar"),
            Format::DockerArchiveZstd => format!("{name}.tar.zst"),
            Format::OciArchive => format!("{name}.oci.tar"),
            Format::OciDir => name.to_string(),
        }
    }

    /// Whether a build can stream its layers straight into this format.
    pub fn streams(self) -> bool {
        matches!(self, Format::OciArchive | Format::DockerArchive)
    }
}

pub const OCI_LAYOUT: &[u8] = br#"{"imageLayoutVersion":"1.0.0"}"#;

/// The `index.json` of an output layout: each image under each of its
/// names (containerd's qualified name and the tag as the OCI ref name).
pub fn index_json(images: &[(Descriptor, Vec<String>)]) -> Result<Vec<u8>, Error> {
    let mut index = Index::new();
    for (d, names) in images {
        for name in names {
            let r = Reference::parse(name).map_err(|message| Error::NotFound { message })?;
            let mut e = d.bare();
            e.annotations
                .insert(ANNOTATION_CONTAINERD_NAME.into(), r.name());
            e.annotations.insert(
                ANNOTATION_REF_NAME.into(),
                r.tag.clone().unwrap_or_else(|| "latest".into()),
            );
            index.manifests.push(e);
        }
        if names.is_empty() {
            index.manifests.push(d.bare());
        }
    }
    Ok(canonical_json(&index))
}

/// docker-archive's `manifest.json` and `repositories` for one image.
fn docker_files(
    manifest: &Manifest,
    names: &[String],
) -> Result<[(&'static str, Vec<u8>); 2], Error> {
    let blob = |d: &Digest| format!("blobs/sha256/{}", d.hex());
    let mut tags = Vec::new();
    for n in names {
        tags.push(Reference::parse(n).map_err(|message| Error::NotFound { message })?);
    }
    let entry = vec![DockerManifestEntry {
        config: blob(&manifest.config.digest),
        repo_tags: tags.iter().map(|t| t.familiar()).collect(),
        layers: manifest.layers.iter().map(|l| blob(&l.digest)).collect(),
    }];
    let top = manifest
        .layers
        .last()
        .map_or(&manifest.config.digest, |l| &l.digest);
    let mut repos: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for t in &tags {
        let familiar = t.familiar();
        let (repo, tag) = familiar
            .rsplit_once(':')
            .expect("familiar names carry a tag");
        repos
            .entry(repo.to_string())
            .or_default()
            .insert(tag.to_string(), top.hex().to_string());
    }
    Ok([
        ("manifest.json", canonical_json(&entry)),
        ("repositories", canonical_json(&repos)),
    ])
}

enum TarOut {
    Plain(BufWriter<File>),
    Zstd(Box<crate::layer::Compressor<'static, BufWriter<File>>>),
}

impl Write for TarOut {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            TarOut::Plain(w) => w.write(b),
            TarOut::Zstd(w) => w.write(b),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            TarOut::Plain(w) => w.flush(),
            TarOut::Zstd(w) => w.flush(),
        }
    }
}

/// An archive being written: the temporary file, the tar stream into it
/// (plain, or zstd over the whole), and the blobs already in it.
struct Tar {
    pending: Pending,
    out: TarOut,
    written: BTreeSet<Digest>,
    /// The output, for errors, and the entries' mtime.
    path: PathBuf,
    mtime: u64,
}

impl Tar {
    fn werr(&self) -> impl Fn(io::Error) -> Error + '_ {
        move |source| Error::Write {
            path: self.path.clone(),
            source,
        }
    }

    /// Writes one file entry of `size` bytes from `r`; a blob whose bytes
    /// fail verification is named as the blob of `blob`.
    fn entry(
        &mut self,
        name: &str,
        r: &mut dyn Read,
        size: u64,
        blob: Option<&Blob<'_>>,
    ) -> Result<(), Error> {
        let header = file_header(name.as_bytes(), size, self.mtime);
        tar::write_ustar(&mut self.out, &header).map_err(self.werr())?;
        let copied = io::copy(r, &mut self.out).map_err(|e| match blob {
            Some(b) if e.kind() == io::ErrorKind::InvalidData => read_error(b.from(), b.desc, e),
            _ => Error::Write {
                path: self.path.clone(),
                source: e,
            },
        })?;
        if copied != size {
            return Err(self.werr()(io::Error::other(format!(
                "{name}: {copied} bytes, not {size}"
            ))));
        }
        tar::pad(&mut self.out, size).map_err(self.werr())?;
        Ok(())
    }

    /// Ends the tar stream and renames the file into place.
    fn finish(mut self) -> Result<(), Error> {
        tar::finish(&mut self.out).map_err(self.werr())?;
        let path = self.path.clone();
        let werr = |source| Error::Write {
            path: path.clone(),
            source,
        };
        match self.out {
            TarOut::Plain(mut f) => f.flush().map_err(werr)?,
            TarOut::Zstd(z) => z.finish().and_then(|mut f| f.flush()).map_err(werr)?,
        }
        self.pending.commit(&path)
    }
}

enum State {
    Dir { stage: PathBuf },
    Tar(Box<Tar>),
    Done,
}

/// An output file or layout being written.
pub struct Output {
    out: PathBuf,
    format: Format,
    mtime: u64,
    state: Mutex<State>,
    manifests: Mutex<HashMap<Digest, Vec<u8>>>,
}

impl Drop for Output {
    fn drop(&mut self) {
        if let Ok(State::Dir { stage }) = self.state.get_mut() {
            let _ = fs::remove_dir_all(stage);
        }
    }
}

fn is_replaceable(out: &Path) -> bool {
    !out.exists()
        || out.join("oci-layout").is_file()
        || (out.is_dir() && fs::read_dir(out).is_ok_and(|mut d| d.next().is_none()))
}

impl Output {
    /// Starts writing `out` in `format`; archive entries get `mtime`.
    pub fn create(out: &Path, format: Format, mtime: u64) -> Result<Output, Error> {
        let werr = |source| Error::Write {
            path: out.to_path_buf(),
            source,
        };
        let parent = parent_dir(out);
        let state = match format {
            Format::OciDir => {
                if !is_replaceable(out) {
                    return Err(Error::Invalid {
                        path: out.to_path_buf(),
                        message: "output directory exists and is not an OCI image layout; remove it or choose another -o".into(),
                    });
                }
                let stage = tempfile::Builder::new()
                    .prefix(&temp_prefix("out"))
                    .tempdir_in(&parent)
                    .map_err(werr)?
                    .keep();
                fs::create_dir_all(stage.join("blobs/sha256")).map_err(werr)?;
                State::Dir { stage }
            }
            _ => {
                let pending = Pending::create(&parent, "out", out)?;
                let f =
                    BufWriter::with_capacity(1 << 20, pending.file().try_clone().map_err(werr)?);
                let mut w = if format == Format::DockerArchiveZstd {
                    TarOut::Zstd(Box::new(Compression::Zstd(3).writer(f).map_err(werr)?))
                } else {
                    TarOut::Plain(f)
                };
                for name in [&b"blobs/"[..], b"blobs/sha256/"] {
                    tar::write_ustar(&mut w, &dir_header(name, mtime)).map_err(werr)?;
                }
                State::Tar(Box::new(Tar {
                    pending,
                    out: w,
                    written: BTreeSet::new(),
                    path: out.to_path_buf(),
                    mtime,
                }))
            }
        };
        Ok(Output {
            out: out.to_path_buf(),
            format,
            mtime,
            state: Mutex::new(state),
            manifests: Mutex::new(HashMap::new()),
        })
    }

    pub fn format(&self) -> Format {
        self.format
    }

    fn werr(&self) -> impl Fn(io::Error) -> Error + '_ {
        move |source| Error::Write {
            path: self.out.clone(),
            source,
        }
    }

    /// Streams a new blob (a layer being built, its digest and size not
    /// known yet) straight into an uncompressed archive: `write` gets the
    /// archive file positioned where the bytes go and returns what it wrote
    /// with the file. Other formats and a second copy of a blob: `Ok(None)`
    /// (the caller writes the blob elsewhere and puts it).
    pub fn put_new_blob<T, E: From<Error>>(
        &self,
        write: impl FnOnce(File) -> Result<(T, Digest, u64, File), E>,
    ) -> Result<Option<T>, E> {
        let mut st = self.state.lock().unwrap();
        let State::Tar(t) = &mut *st else {
            return Ok(None);
        };
        let werr = self.werr();
        let TarOut::Plain(w) = &mut t.out else {
            return Ok(None);
        };
        // The clone shares the file offset with the archive's writer.
        w.flush().map_err(&werr)?;
        let mut f: &File = w.get_ref();
        let start = f.stream_position().map_err(&werr)?;
        f.write_all(&[0u8; tar::BLOCK]).map_err(&werr)?;
        let (value, digest, size, f) = write(f.try_clone().map_err(&werr)?)?;
        let mut f = &f;
        if !t.written.insert(digest.clone()) {
            // Already in the archive: take this copy back out.
            f.set_len(start).map_err(&werr)?;
            f.seek(SeekFrom::Start(start)).map_err(&werr)?;
        } else {
            let end = start + tar::BLOCK as u64 + size;
            let name = format!("blobs/sha256/{}", digest.hex());
            let block =
                tar::ustar_block(&file_header(name.as_bytes(), size, self.mtime)).map_err(&werr)?;
            f.seek(SeekFrom::Start(start)).map_err(&werr)?;
            f.write_all(&block).map_err(&werr)?;
            f.seek(SeekFrom::Start(end)).map_err(&werr)?;
            tar::pad(&mut f, size).map_err(&werr)?;
        }
        Ok(Some(value))
    }
}

fn dir_header(name: &[u8], mtime: u64) -> tar::Header<'_> {
    tar::Header {
        name,
        kind: tar::Kind::Dir,
        mode: 0o755,
        uid: 0,
        gid: 0,
        size: 0,
        mtime,
        link: b"",
    }
}

fn file_header(name: &[u8], size: u64, mtime: u64) -> tar::Header<'_> {
    tar::Header {
        name,
        kind: tar::Kind::File,
        mode: 0o644,
        uid: 0,
        gid: 0,
        size,
        mtime,
        link: b"",
    }
}

impl Sink for Output {
    fn location(&self) -> PathBuf {
        self.out.clone()
    }

    fn has_blob(&self, d: &Descriptor) -> Result<bool, Error> {
        Ok(match &*self.state.lock().unwrap() {
            State::Dir { stage } => stage.join("blobs/sha256").join(d.digest.hex()).is_file(),
            State::Tar(t) => t.written.contains(&d.digest),
            State::Done => false,
        })
    }

    fn put_blob(&self, blob: Blob<'_>) -> Result<(), Error> {
        let mut st = self.state.lock().unwrap();
        match &mut *st {
            State::Dir { stage } => super::file::put_blob(&stage.join("blobs/sha256"), &blob),
            State::Tar(t) => {
                if t.written.contains(&blob.desc.digest) {
                    return Ok(());
                }
                let name = format!("blobs/sha256/{}", blob.desc.digest.hex());
                t.entry(&name, &mut blob.reader()?, blob.desc.size, Some(&blob))?;
                t.written.insert(blob.desc.digest.clone());
                Ok(())
            }
            State::Done => unreachable!("a committed output takes no blobs"),
        }
    }

    fn put_manifest(&self, d: &Descriptor, bytes: &[u8]) -> Result<(), Error> {
        self.put_blob(Blob {
            desc: d,
            data: super::BlobData::Bytes(bytes),
        })?;
        self.manifests
            .lock()
            .unwrap()
            .insert(d.digest.clone(), bytes.to_vec());
        Ok(())
    }

    fn commit(&self, images: &[(Descriptor, Vec<String>)]) -> Result<(), Error> {
        let werr = self.werr();
        let mut files: Vec<(&str, Vec<u8>)> = vec![
            ("index.json", index_json(images)?),
            ("oci-layout", OCI_LAYOUT.to_vec()),
        ];
        if matches!(
            self.format,
            Format::DockerArchive | Format::DockerArchiveZstd
        ) {
            let [(d, names)] = images else {
                return Err(Error::Invalid {
                    path: self.out.clone(),
                    message: "a docker-archive holds one image".into(),
                });
            };
            let bytes = self
                .manifests
                .lock()
                .unwrap()
                .get(&d.digest)
                .cloned()
                .ok_or_else(|| Error::Invalid {
                    path: self.out.clone(),
                    message: format!(
                        "a docker-archive holds a single-platform image, and {} is not one",
                        d.digest
                    ),
                })?;
            let m: Manifest = serde_json::from_slice(&bytes).map_err(|source| Error::Json {
                path: self.out.clone(),
                what: format!("manifest {}", d.digest),
                source,
            })?;
            files.extend(docker_files(&m, names)?);
        }
        files.sort();
        let mut st = self.state.lock().unwrap();
        match &mut *st {
            State::Dir { stage } => {
                for (name, bytes) in &files {
                    fs::write(stage.join(name), bytes).map_err(&werr)?;
                }
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&*stage, fs::Permissions::from_mode(0o755)).map_err(&werr)?;
            }
            State::Tar(t) => {
                for (name, bytes) in &files {
                    t.entry(name, &mut &bytes[..], bytes.len() as u64, None)?;
                }
            }
            State::Done => return Ok(()),
        }
        // Complete: rename into place (a failure above left the state for
        // Drop to clean up).
        match std::mem::replace(&mut *st, State::Done) {
            State::Dir { stage } => swap_into_place(&stage, &self.out),
            State::Tar(t) => t.finish(),
            State::Done => Ok(()),
        }
    }
}

/// Renames a finished layout directory over `out`, keeping the old one
/// until the new one is in place.
fn swap_into_place(stage: &Path, out: &Path) -> Result<(), Error> {
    let werr = |source| Error::Write {
        path: out.to_path_buf(),
        source,
    };
    if out.exists() {
        let parent = parent_dir(out);
        let old = tempfile::Builder::new()
            .prefix(&temp_prefix("old"))
            .tempdir_in(&parent)
            .map_err(werr)?;
        let old_path = old.path().join("layout");
        fs::rename(out, &old_path).map_err(werr)?;
        if let Err(e) = fs::rename(stage, out) {
            let _ = fs::rename(&old_path, out);
            let _ = fs::remove_dir_all(stage);
            return Err(werr(e));
        }
    } else if let Err(e) = fs::rename(stage, out) {
        let _ = fs::remove_dir_all(stage);
        return Err(werr(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn output_names_qualify_like_docker() {
        let d = Descriptor::new(crate::image::MediaType::OciManifest, Digest::of(b"m"), 1);
        let j = String::from_utf8(
            index_json(&[(d, vec!["foo".into(), "ghcr.io/me/x:1".into()])]).unwrap(),
        )
        .unwrap();
        assert!(j.contains(r#""io.containerd.image.name":"docker.io/library/foo:latest","org.opencontainers.image.ref.name":"latest""#), "{j}");
        assert!(j.contains(r#""io.containerd.image.name":"ghcr.io/me/x:1","org.opencontainers.image.ref.name":"1""#), "{j}");
    }
}
