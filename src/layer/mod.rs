//! Deterministic layers: a sorted set of entries written as one tar stream,
//! hashed (diff_id), compressed and hashed again (digest) in a single pass
//! into a blob file, with memory that does not grow with file sizes.

pub mod compress;
pub mod scan;
pub mod tar;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use compress::{Compression, Compressor};

use crate::digest::{Digest, HashingWriter};
use crate::prefetch::{Event, Prefetch};
use crate::progress::Step;

/// Where a file's bytes come from.
#[derive(Clone, Debug)]
pub enum FileSource {
    /// Shared with the context entry it came from: 200,000 paths are not copied.
    Path(Arc<Path>),
    Bytes(Arc<[u8]>),
}

/// What an entry is.
#[derive(Clone, Debug)]
pub enum Content {
    Dir,
    File { source: FileSource, size: u64 },
    Symlink(Vec<u8>),
}

/// One entry of a layer.
#[derive(Clone, Debug)]
pub struct LayerEntry {
    pub content: Content,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
}

impl LayerEntry {
    pub fn dir(mode: u32, uid: u64, gid: u64) -> LayerEntry {
        LayerEntry {
            content: Content::Dir,
            mode,
            uid,
            gid,
        }
    }
    pub fn file(source: FileSource, size: u64, mode: u32, uid: u64, gid: u64) -> LayerEntry {
        LayerEntry {
            content: Content::File { source, size },
            mode,
            uid,
            gid,
        }
    }
    pub fn is_dir(&self) -> bool {
        matches!(self.content, Content::Dir)
    }
}

/// A layer's entries, keyed by path without leading or trailing slash.
pub type Entries = BTreeMap<Vec<u8>, LayerEntry>;

/// What a written layer is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
    pub media_type: crate::image::MediaType,
    /// The compressor annotation, if compressed.
    pub compressor: Option<String>,
    /// What `--reproducible` did to a RUN layer, if anything.
    pub note: Option<String>,
    /// The files on disk the layer read, as they were once read.
    pub read: Vec<Observed>,
}

impl LayerInfo {
    /// The layer's descriptor, with its annotations (the compressor, and
    /// what `--reproducible` did).
    pub fn descriptor(&self) -> crate::image::Descriptor {
        let mut d =
            crate::image::Descriptor::new(self.media_type.clone(), self.digest.clone(), self.size);
        if let Some(c) = &self.compressor {
            d.annotations
                .insert(crate::image::ANNOTATION_COMPRESSOR.into(), c.clone());
        }
        if let Some(n) = &self.note {
            d.annotations
                .insert(crate::image::ANNOTATION_REPRODUCIBLE.into(), n.clone());
        }
        d
    }
}

/// A file a layer read: its path (shared with the context entry it came
/// from), length, and mtime (ns) by `fstat` after the read.
pub type Observed = (Arc<Path>, u64, i64);

/// Errors writing a layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("writing layer blob {}: {source}", dir.display())]
    Write { dir: PathBuf, source: io::Error },
    #[error("{}: the file changed while kiln read it ({expected} bytes expected, {got} read); the tree changed under the build, run it again on a quiet tree", path.display())]
    Changed {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
}

/// A layer to write: entries kiln lays out itself (COPY, ADD, WORKDIR), or
/// a tar a RUN step left, complete and deterministic already.
#[derive(Clone, Debug)]
pub enum Planned {
    Entries(Entries),
    Tar {
        path: PathBuf,
        /// Its size, and the files in it, for progress.
        size: u64,
        files: u64,
        /// What `--reproducible` removed or emptied, for the annotation.
        note: Option<String>,
    },
    /// A step cache hit: a blob already in the destination store, used as
    /// it is (nothing is run, tarred or compressed).
    Cached {
        desc: Box<crate::image::Descriptor>,
        diff_id: Digest,
        blob: PathBuf,
    },
}

impl Planned {
    /// Bytes of file content and files, for progress.
    pub fn totals(&self) -> (u64, u64) {
        match self {
            Planned::Entries(e) => e.values().fold((0, 0), |(b, f), e| match &e.content {
                Content::File { size, .. } => (b + size, f + 1),
                _ => (b, f),
            }),
            Planned::Tar { size, files, .. } => (*size, *files),
            Planned::Cached { .. } => (0, 0),
        }
    }

    /// The layer a cache hit names, as written layers are described.
    pub fn cached_info(&self) -> Option<LayerInfo> {
        match self {
            Planned::Cached { desc, diff_id, .. } => Some(LayerInfo {
                digest: desc.digest.clone(),
                diff_id: diff_id.clone(),
                size: desc.size,
                media_type: desc.media_type.clone(),
                compressor: desc
                    .annotations
                    .get(crate::image::ANNOTATION_COMPRESSOR)
                    .cloned(),
                note: desc
                    .annotations
                    .get(crate::image::ANNOTATION_REPRODUCIBLE)
                    .cloned(),
                read: Vec::new(),
            }),
            _ => None,
        }
    }
}

/// Writes the tar stream of `entries` to `w` with every mtime set to `mtime`.
/// Hard links on disk between files of this layer become hard-link entries.
pub fn write_tar<W: Write>(
    entries: &Entries,
    mtime: u64,
    w: &mut W,
    step: &Step,
) -> Result<Vec<Observed>, Error> {
    let mut read = Vec::new();
    let werr = |e: io::Error| Error::Write {
        dir: PathBuf::from("layer stream"),
        source: e,
    };
    // Files on disk are read ahead, in order, by a few threads.
    let files: Vec<(&Path, u64)> = entries
        .values()
        .filter_map(|e| match &e.content {
            Content::File {
                source: FileSource::Path(p),
                size,
            } => Some((&**p, *size)),
            _ => None,
        })
        .collect();
    let mut seen: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    std::thread::scope(|scope| {
        let mut prefetch = Prefetch::start(scope, &files, rayon::current_num_threads().max(2));
        for (path, e) in entries {
            let header = |w: &mut W, name: &[u8], kind, mode, size, link: &[u8]| {
                let h = tar::Header {
                    name,
                    kind,
                    mode,
                    uid: e.uid,
                    gid: e.gid,
                    size,
                    mtime,
                    link,
                };
                tar::write_ustar(w, &h).map(|_| ())
            };
            match &e.content {
                Content::Dir => {
                    let mut name = path.clone();
                    name.push(b'/');
                    header(w, &name, tar::Kind::Dir, e.mode, 0, b"").map_err(werr)?;
                }
                Content::Symlink(target) => {
                    header(w, path, tar::Kind::Symlink, 0o777, 0, target).map_err(werr)?
                }
                Content::File {
                    source: FileSource::Bytes(b),
                    ..
                } => {
                    header(w, path, tar::Kind::File, e.mode, b.len() as u64, b"").map_err(werr)?;
                    w.write_all(b).map_err(werr)?;
                    tar::pad(w, b.len() as u64).map_err(werr)?;
                }
                Content::File {
                    source: FileSource::Path(p),
                    size,
                } => {
                    let changed = |got| Error::Changed {
                        path: p.to_path_buf(),
                        expected: *size,
                        got,
                    };
                    let mut early: Option<Error> = None;
                    let mut total = 0u64;
                    let mut linked = false;
                    let got = prefetch.next_file_events(|ev| match ev {
                        Event::Open(link, now) => {
                            if let Some(key) = link {
                                if let Some(first) = seen.get(&key) {
                                    header(w, path, tar::Kind::HardLink, e.mode, 0, first)?;
                                    linked = true;
                                    return Ok(false);
                                }
                                seen.insert(key, path.clone());
                            }
                            if now != *size {
                                early = Some(changed(now));
                                return Err(io::Error::other("changed"));
                            }
                            header(w, path, tar::Kind::File, e.mode, *size, b"")?;
                            Ok(true)
                        }
                        Event::Data(d) => {
                            total += d.len() as u64;
                            if total > *size {
                                return Err(io::Error::other("grew"));
                            }
                            w.write_all(d).map(|_| true)
                        }
                    });
                    if let Some(err) = early {
                        return Err(err);
                    }
                    let got = match got {
                        Ok(n) => n,
                        Err(_) if total > *size => return Err(changed(total)),
                        Err((path, source)) if path.as_os_str() == "(output)" => {
                            return Err(werr(source))
                        }
                        Err((path, source)) => return Err(Error::Read { path, source }),
                    };
                    if linked {
                        continue;
                    }
                    if got != *size {
                        return Err(changed(got));
                    }
                    read.push((p.clone(), got, prefetch.last_mtime()));
                    tar::pad(w, *size).map_err(werr)?;
                    step.inc(*size, 1);
                }
            }
        }
        tar::finish(w).map_err(werr)?;
        Ok(read)
    })
}

/// A writer that hands its bytes to a thread of its own (hashing and
/// writing the compressed stream there), so the tar/compress thread never
/// waits on either.
struct Offload {
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    buf: Vec<u8>,
}

const OFFLOAD_CHUNK: usize = 1 << 20;

impl Write for Offload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= OFFLOAD_CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(OFFLOAD_CHUNK + 64 * 1024));
        match &self.tx {
            Some(tx) => tx
                .send(chunk)
                .map_err(|_| io::Error::other("the blob writer stopped")),
            None => Ok(()),
        }
    }
}

/// Writes a layer blob into `blobs` (a `blobs/sha256` directory): tar →
/// sha256 (diff_id) → compressor → sha256 (digest) → file, in one pass.
/// Files are read ahead on reader threads, and the compressed stream is
/// hashed and written on a thread of its own.
pub fn write_layer(
    entries: &Planned,
    mtime: u64,
    compression: Compression,
    blobs: &crate::sink::file::BlobDir,
    step: &Step,
) -> Result<LayerInfo, Error> {
    if let Some(info) = entries.cached_info() {
        return Ok(info);
    }
    let werr = |e: io::Error| Error::Write {
        dir: blobs.path().to_path_buf(),
        source: e,
    };
    let werr2 = |e: crate::source::Error| match e {
        crate::source::Error::Write { source, .. } => werr(source),
        e => werr(io::Error::other(e.to_string())),
    };
    let pending = blobs.pending("layer").map_err(werr2)?;
    let file = pending.file().try_clone().map_err(werr)?;
    let (info, _) =
        write_layer_to(entries, mtime, compression, file, step).map_err(|e| match e {
            // A full disk names the file being written.
            Error::Write { source, .. } => Error::Write {
                dir: pending.temp_path(),
                source,
            },
            e => e,
        })?;
    blobs.commit(pending, &info.digest).map_err(werr2)?;
    Ok(info)
}

/// Writes a layer's compressed stream to `file` at its current position and
/// returns what was written and the file (positioned after the stream).
/// `file` may be a [`Tee`]: one stream, two destinations.
pub fn write_layer_to<W: Write + Send>(
    entries: &Planned,
    mtime: u64,
    compression: Compression,
    file: W,
    step: &Step,
) -> Result<(LayerInfo, W), Error> {
    let werr = |e: io::Error| Error::Write {
        dir: PathBuf::from("layer blob"),
        source: e,
    };
    let (diff_id, written) = std::thread::scope(|scope| -> Result<_, Error> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(4);
        let writer = scope.spawn(move || -> io::Result<(Digest, u64, W)> {
            let mut out = HashingWriter::new(file);
            for chunk in rx {
                out.write_all(&chunk)?;
            }
            Ok(out.finish())
        });
        let offload = Offload {
            tx: Some(tx),
            buf: Vec::with_capacity(OFFLOAD_CHUNK + 64 * 1024),
        };
        let result = (|| {
            let comp = compression.writer(offload).map_err(werr)?;
            let mut inner = HashingWriter::new(BufWriter::with_capacity(1 << 20, comp));
            let mut read = Vec::new();
            match entries {
                Planned::Entries(entries) => read = write_tar(entries, mtime, &mut inner, step)?,
                Planned::Cached { .. } => unreachable!("a cache hit is never written again"),
                Planned::Tar { path, .. } => {
                    // A RUN's layer, already a deterministic tar: hashed
                    // and compressed as it is.
                    let mut f = File::open(path).map_err(|source| Error::Read {
                        path: path.to_path_buf(),
                        source,
                    })?;
                    let mut buf = vec![0u8; 1 << 20];
                    loop {
                        let n = f.read(&mut buf).map_err(|source| Error::Read {
                            path: path.to_path_buf(),
                            source,
                        })?;
                        if n == 0 {
                            break;
                        }
                        inner.write_all(&buf[..n]).map_err(werr)?;
                        step.inc(n as u64, 0);
                    }
                }
            }
            let (diff_id, _, comp) = inner.finish();
            let comp = comp.into_inner().map_err(|e| werr(e.into_error()))?;
            let mut offload = comp.finish().map_err(werr)?;
            offload.flush().map_err(werr)?;
            drop(offload.tx.take());
            Ok((diff_id, read))
        })();
        let written = writer
            .join()
            .map_err(|_| werr(io::Error::other("the blob writer panicked")))?;
        // The writer's own error (a full disk, say) is the cause of the
        // tar side's "the blob writer stopped": report it first.
        let written = written.map_err(werr)?;
        Ok((result?, written))
    })?;
    let (digest, size, file) = written;
    let (diff_id, read) = diff_id;
    let info = LayerInfo {
        digest,
        diff_id,
        read,
        size,
        media_type: compression.media_type(),
        compressor: compression.describe(),
        note: match entries {
            Planned::Tar { note, .. } => note.clone(),
            _ => None,
        },
    };
    Ok((info, file))
}

/// Two files written as one: an indexed build's layer goes into the user
/// store and the output archive in the same pass. The second file is named
/// (`.2`) so that its failure (a full disk under the store) names it.
pub struct Tee(pub File, pub File, pub PathBuf);

/// The second file of a [`Tee`] failed.
#[derive(Debug, thiserror::Error)]
#[error("writing {}: {source}", path.display())]
pub struct TeeFailed {
    pub path: PathBuf,
    pub source: io::Error,
}

impl Write for Tee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write_all(buf)?;
        self.1.write_all(buf).map_err(|source| {
            io::Error::new(
                source.kind(),
                TeeFailed {
                    path: self.2.clone(),
                    source,
                },
            )
        })?;
        // Start the store file's writeback as it grows (without waiting),
        // so the fsync that commits it has little left to do.
        use std::os::fd::AsRawFd;
        // SAFETY: a valid descriptor; SYNC_FILE_RANGE_WRITE only starts I/O.
        unsafe {
            libc::sync_file_range(self.1.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()?;
        self.1.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(b: &[u8], mode: u32) -> LayerEntry {
        LayerEntry {
            content: Content::File {
                source: FileSource::Bytes(Arc::from(b)),
                size: b.len() as u64,
            },
            mode,
            uid: 0,
            gid: 0,
        }
    }

    #[test]
    fn tar_is_sorted_root_owned_and_normalized() {
        let mut e = Entries::new();
        e.insert(b"b".to_vec(), file(b"2", 0o644));
        e.insert(b"a".to_vec(), LayerEntry::dir(0o755, 0, 0));
        e.insert(b"a/x".to_vec(), file(b"1", 0o755));
        let mut out = Vec::new();
        write_tar(&e, 42, &mut out, &Step::none()).unwrap();
        let mut ar = ::tar::Archive::new(&out[..]);
        let names: Vec<(String, u32, u64)> = ar
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let h = e.header();
                (
                    String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                    h.mode().unwrap(),
                    h.mtime().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            names,
            vec![
                ("a/".into(), 0o755, 42),
                ("a/x".into(), 0o755, 42),
                ("b".into(), 0o644, 42)
            ]
        );
    }

    #[test]
    fn same_entries_same_digests_any_compression() {
        let mut e = Entries::new();
        e.insert(b"f".to_vec(), file(&vec![9u8; 300_000], 0o644));
        for c in [
            Compression::Zstd(3),
            Compression::Gzip(6),
            Compression::None,
        ] {
            let d1 = tempfile::tempdir().unwrap();
            let d2 = tempfile::tempdir().unwrap();
            let e2 = Planned::Entries(e.clone());
            let a = write_layer(
                &e2,
                0,
                c,
                &crate::sink::file::BlobDir::plain(d1.path()).unwrap(),
                &Step::none(),
            )
            .unwrap();
            let b = write_layer(
                &e2,
                0,
                c,
                &crate::sink::file::BlobDir::plain(d2.path()).unwrap(),
                &Step::none(),
            )
            .unwrap();
            assert_eq!(a, b);
            assert_eq!(
                std::fs::read(d1.path().join(a.digest.hex())).unwrap().len() as u64,
                a.size
            );
        }
    }

    #[test]
    fn uncompressed_layer_digest_is_its_diff_id() {
        let mut e = Entries::new();
        e.insert(b"f".to_vec(), file(b"x", 0o644));
        let d = tempfile::tempdir().unwrap();
        let info = write_layer(
            &Planned::Entries(e),
            0,
            Compression::None,
            &crate::sink::file::BlobDir::plain(d.path()).unwrap(),
            &Step::none(),
        )
        .unwrap();
        assert_eq!(info.digest, info.diff_id);
    }
}
