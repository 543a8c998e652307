//! The directory walk behind context collection: directories in parallel,
//! every name resolved relative to its directory's descriptor (`openat`,
//! `fstatat`) rather than by full path, and, for the kiln-v1 hash, each file
//! hashed while it is open (`fstat` gives its size and mode), consulting the
//! optional hash cache first.

use std::ffi::{CStr, OsStr};
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use rustix::fs::{openat, statat, AtFlags, Dir, FileType, Mode, OFlags, Stat};
use sha2::{Digest, Sha256};

use super::cache::{DirView, HashCache, Stamp};
use super::collect::{file_entry, Entry, Source};
use super::listing::{Listing, REGULAR};
use super::uring;
use super::Error;
use crate::progress::Step;

/// What the walk does besides listing.
pub struct Walker<'a> {
    /// Hash regular files while walking (kiln-v1).
    pub hash: bool,
    pub cache: Option<&'a HashCache>,
    pub step: &'a Step,
    /// Take directory entries in reverse order (the output must not change).
    pub reverse: bool,
    /// Keep only what the kiln-v1 hash needs, in a [`Listing`] (implies `hash`).
    pub compact: bool,
}

/// What one walk found.
#[derive(Default)]
pub struct Walked {
    pub entries: Vec<(Vec<u8>, Entry)>,
    pub dirs: Vec<(Vec<u8>, u32)>,
    /// What a compact walk keeps of one directory instead of `entries`
    /// (moved into the caller's listing as each round ends).
    pub listing: Listing,
}

const READ_BUF: usize = 256 * 1024;

thread_local! {
    static BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; READ_BUF]);
}

fn io(path: &Path, e: impl Into<std::io::Error>) -> Error {
    Error::Walk {
        path: path.to_path_buf(),
        source: e.into(),
    }
}

fn stamp(st: &Stat) -> Stamp {
    Stamp {
        dev: st.st_dev,
        ino: st.st_ino,
        size: st.st_size as u64,
        mtime_ns: st.st_mtime * 1_000_000_000 + i64::from(st.st_mtime_nsec as u32),
        ctime_ns: st.st_ctime * 1_000_000_000 + i64::from(st.st_ctime_nsec as u32),
    }
}

/// Reads `f` to the end into a sha256; checks the size did not change.
pub fn hash_reader(
    mut f: impl Read,
    path: &Path,
    expected: u64,
    step: &Step,
) -> Result<[u8; 32], Error> {
    let mut h = Sha256::new();
    let mut total = 0u64;
    BUFFER.with_borrow_mut(|buf| {
        loop {
            let n = f.read(buf).map_err(|e| Error::io(path, e))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            h.update(&buf[..n]);
            step.inc(n as u64, 0);
            // A regular file reads short only at its end: once the size
            // `fstat` gave is read and the read was short, the end is
            // reached without one more call to learn it.
            if total == expected && n < buf.len() {
                break;
            }
        }
        Ok::<(), Error>(())
    })?;
    if total != expected {
        return Err(Error::Changed {
            path: path.to_path_buf(),
            expected,
            got: total,
        });
    }
    Ok(h.finalize().into())
}

/// One directory still to read: opened relative to its parent's
/// descriptor, which stays open only while some of its subdirectories wait.
struct Pending {
    parent: Option<Arc<OwnedFd>>,
    name: Vec<u8>,
    path: PathBuf,
    /// Archive prefix of its entries (ends in `/` or is empty).
    prefix: Vec<u8>,
}

/// Directories read per parallel round.
const ROUND: usize = 64;

/// Walks the directory `path` into archive names under `prefix` (ending in
/// `/` or empty). The walk is iterative (an explicit stack, never recursion,
/// so depth cannot overflow a stack) and resolves every name relative to its
/// directory's descriptor (so full paths longer than `PATH_MAX` are no
/// limit). Directories are read in parallel rounds; the result is sorted.
/// A compact walk adds its entries to `into` (one growing listing, never a
/// second copy of a whole walk).
pub fn walk(
    path: &Path,
    prefix: &[u8],
    w: &Walker<'_>,
    root: &Path,
    into: &mut Listing,
) -> Result<Walked, Error> {
    let mut stack = vec![Pending {
        parent: None,
        name: Vec::new(),
        path: path.to_path_buf(),
        prefix: prefix.to_vec(),
    }];
    let mut out = Walked::default();
    while !stack.is_empty() {
        let round: Vec<Pending> = stack.split_off(stack.len().saturating_sub(ROUND));
        let results: Vec<(Walked, Vec<Pending>)> = round
            .into_par_iter()
            .map(|p| read_dir(p, w, root))
            .collect::<Result<_, Error>>()?;
        for (found, subdirs) in results {
            out.entries.extend(found.entries);
            out.dirs.extend(found.dirs);
            into.append(found.listing);
            // Reversed so the stack pops them in name order.
            stack.extend(subdirs.into_iter().rev());
        }
    }
    // Archive-path order: a directory sorts as its name plus '/', which is
    // what full paths of files do bytewise; directories compare with '/'.
    out.entries.par_sort_unstable_by(|a, b| a.0.cmp(&b.0));
    out.dirs
        .par_sort_unstable_by(|a, b| a.0.iter().chain(b"/").cmp(b.0.iter().chain(b"/")));
    Ok(out)
}

/// One directory's names, NUL-terminated in one buffer.
struct Names {
    buf: Vec<u8>,
    items: Vec<(u32, u32, FileType)>,
}

impl Names {
    fn name(&self, i: usize) -> &[u8] {
        let (off, len, _) = self.items[i];
        &self.buf[off as usize..(off + len) as usize]
    }

    fn cstr(&self, i: usize) -> &CStr {
        let (off, len, _) = self.items[i];
        // Each name is stored with its NUL.
        CStr::from_bytes_with_nul(&self.buf[off as usize..=(off + len) as usize])
            .expect("names are stored NUL-terminated")
    }
}

/// What one regular file is: its `fstat` and, when hashing, its digest.
struct File_ {
    st: Stat,
    digest: Option<[u8; 32]>,
    /// The digest came from the hash cache.
    hit: bool,
}

/// Reads one directory: its files become entries, its subdirectories
/// (opened, their modes recorded) are returned to walk next.
fn read_dir(p: Pending, w: &Walker<'_>, root: &Path) -> Result<(Walked, Vec<Pending>), Error> {
    let dir = &p.path;
    let fd = match &p.parent {
        None => rustix::fs::open(
            dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        ),
        Some(parent) => openat(
            &**parent,
            p.name.as_slice(),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        ),
    }
    .map_err(|e| io(dir, e))?;
    // The parent's descriptor is no longer needed for this one.
    drop(p.parent);
    let mut names = Names {
        buf: Vec::new(),
        items: Vec::new(),
    };
    {
        let dup = rustix::io::fcntl_dupfd_cloexec(&fd, 0).map_err(|e| io(dir, e))?;
        let mut d = Dir::new(dup).map_err(|e| io(dir, e))?;
        while let Some(de) = d.read() {
            let de = de.map_err(|e| io(dir, e))?;
            let name = de.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let off = names.buf.len() as u32;
            names.buf.extend_from_slice(name);
            names.buf.push(0);
            names.items.push((off, name.len() as u32, de.file_type()));
        }
    }
    if w.reverse {
        names.items.reverse();
    }
    let mut order: Vec<usize> = (0..names.items.len()).collect();
    order.sort_unstable_by(|&a, &b| names.name(a).cmp(names.name(b)));
    let fd = Arc::new(fd);
    let mut out = Walked::default();
    let mut subdirs = Vec::new();
    let mut regular = Vec::new();
    for i in order {
        let name = names.name(i);
        let mut ft = names.items[i].2;
        if ft == FileType::Unknown {
            let path = dir.join(OsStr::from_bytes(name));
            ft = FileType::from_raw_mode(
                statat(&*fd, name, AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| io(&path, e))?
                    .st_mode,
            );
        }
        match ft {
            FileType::Directory if name == b"__pycache__" => {}
            FileType::Directory => {
                let path = dir.join(OsStr::from_bytes(name));
                let mut archive = p.prefix.clone();
                archive.extend_from_slice(name);
                if !w.compact {
                    let st =
                        statat(&*fd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io(&path, e))?;
                    out.dirs.push((archive.clone(), st.st_mode & 0o7777));
                }
                archive.push(b'/');
                subdirs.push(Pending {
                    parent: Some(fd.clone()),
                    name: name.to_vec(),
                    path,
                    prefix: archive,
                });
            }
            FileType::RegularFile => regular.push(i),
            _ => {
                let path = dir.join(OsStr::from_bytes(name));
                out.add(&p.prefix, name, file_entry(&path, root)?, w)?;
            }
        }
    }
    let view = w.cache.filter(|_| w.hash).and_then(|c| c.dir(dir));
    let files: Vec<File_> = regular
        .par_chunks(uring::BATCH)
        .map(|chunk| files(&fd, dir, &names, chunk, view, w))
        .collect::<Result<Vec<_>, Error>>()?
        .into_iter()
        .flatten()
        .collect();
    if let Some(cache) = w.cache.filter(|_| w.hash) {
        let hits = files.iter().filter(|f| f.hit).count();
        let all_hits = hits == files.len() && view.is_some_and(|v| v.len() == files.len());
        let found = (!all_hits).then(|| {
            regular
                .iter()
                .zip(&files)
                .filter_map(|(&i, f)| Some((names.name(i).into(), stamp(&f.st), f.digest?)))
                .collect()
        });
        cache.record_dir(dir, found, (files.len() - hits) as u64);
    }
    for (&i, f) in regular.iter().zip(files) {
        let name = names.name(i);
        if w.compact {
            let digest = f.digest.expect("compact walks hash");
            out.listing.push(
                &p.prefix,
                name,
                REGULAR | (f.st.st_mode & 0o7777),
                f.st.st_size as u64,
                digest,
            );
        } else {
            let mut archive = p.prefix.clone();
            archive.extend_from_slice(name);
            let path = dir.join(OsStr::from_bytes(name));
            out.entries.push((archive, file_of(&f.st, path, f.digest)));
        }
    }
    Ok((out, subdirs))
}

impl Walked {
    /// Adds a non-regular entry (or one found other than by the walk).
    fn add(&mut self, prefix: &[u8], name: &[u8], e: Entry, w: &Walker<'_>) -> Result<(), Error> {
        if w.compact {
            self.listing.push_entry(prefix, name, &e)
        } else {
            let mut archive = prefix.to_vec();
            archive.extend_from_slice(name);
            self.entries.push((archive, e));
            Ok(())
        }
    }
}

fn file_of(st: &Stat, path: PathBuf, digest: Option<[u8; 32]>) -> Entry {
    Entry {
        source: Source::File(Arc::from(path)),
        mode: st.st_mode & 0o7777,
        size: st.st_size as u64,
        resolves_to_file: false,
        resolves_to_dir: false,
        escapes: false,
        digest,
        mtime_ns: Some(stamp(st).mtime_ns),
    }
}

/// Stats (and when hashing, hashes) the regular files `chunk` of one
/// directory: hash-cache hits first, then the rest in one io_uring batch,
/// then whatever the batch left to one call per operation.
fn files(
    dirfd: &OwnedFd,
    dir: &Path,
    names: &Names,
    chunk: &[usize],
    view: Option<DirView<'_>>,
    w: &Walker<'_>,
) -> Result<Vec<File_>, Error> {
    let path_of = |i: usize| dir.join(OsStr::from_bytes(names.name(i)));
    let mut got: Vec<Option<File_>> = chunk.iter().map(|_| None).collect();
    if w.hash {
        if let (Some(view), Some(&first)) = (view, chunk.first()) {
            // Both lists are sorted by name: one merge.
            let mut at = view.lower_bound(names.name(first));
            for (k, &i) in chunk.iter().enumerate() {
                let name = names.name(i);
                at = view.seek(at, name);
                let st = statat(dirfd, names.cstr(i), AtFlags::SYMLINK_NOFOLLOW)
                    .map_err(|e| io(&path_of(i), e))?;
                if let Some(d) = view.get(at, name, &stamp(&st)) {
                    w.step.inc(st.st_size as u64, 1);
                    got[k] = Some(File_ {
                        st,
                        digest: Some(d),
                        hit: true,
                    });
                }
            }
        }
        let todo: Vec<usize> = (0..chunk.len()).filter(|&k| got[k].is_none()).collect();
        let cstrs: Vec<&CStr> = todo.iter().map(|&k| names.cstr(chunk[k])).collect();
        for (&k, h) in todo.iter().zip(uring::hash_batch(dirfd.as_fd(), &cstrs)) {
            match h {
                Some(uring::Hashed::Done(st, d)) => {
                    w.step.inc(st.st_size as u64, 1);
                    got[k] = Some(File_ {
                        st,
                        digest: Some(d),
                        hit: false,
                    });
                }
                Some(uring::Hashed::Changed { expected, got }) => {
                    return Err(Error::Changed {
                        path: path_of(chunk[k]),
                        expected,
                        got,
                    })
                }
                None => {}
            }
        }
    }
    chunk
        .iter()
        .zip(got)
        .map(|(&i, g)| match g {
            Some(f) => Ok(f),
            None => regular(dirfd, names.cstr(i), path_of(i), w),
        })
        .collect()
}

/// A regular file one call at a time: stat it (and hash it, when asked)
/// relative to its directory.
fn regular(dirfd: &OwnedFd, name: &CStr, path: PathBuf, w: &Walker<'_>) -> Result<File_, Error> {
    if !w.hash {
        let st = statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io(&path, e))?;
        w.step.inc(st.st_size as u64, 1);
        return Ok(File_ {
            st,
            digest: None,
            hit: false,
        });
    }
    let fd = openat(
        dirfd.as_fd(),
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io(&path, e))?;
    let st = rustix::fs::fstat(&fd).map_err(|e| io(&path, e))?;
    let digest = hash_reader(File::from(fd), &path, st.st_size as u64, w.step)?;
    w.step.inc(0, 1);
    Ok(File_ {
        st,
        digest: Some(digest),
        hit: false,
    })
}
