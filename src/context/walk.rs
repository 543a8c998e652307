//! The directory walk behind context collection: directories in parallel,
//! every name resolved relative to its directory's descriptor (`openat`,
//! `fstatat`) rather than by full path, and, for the kiln-v1 hash, each file
//! hashed while it is open (`fstat` gives its size and mode), consulting the
//! optional hash cache first.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use rustix::fs::{openat, statat, AtFlags, Dir, FileType, Mode, OFlags, Stat};
use sha2::{Digest, Sha256};

use super::cache::{HashCache, Stamp};
use super::collect::{file_entry, Entry, Source};
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
}

/// What one walk found.
#[derive(Default)]
pub struct Walked {
    pub entries: Vec<(Vec<u8>, Entry)>,
    pub dirs: Vec<(Vec<u8>, u32)>,
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
pub fn walk(path: &Path, prefix: &[u8], w: &Walker<'_>, root: &Path) -> Result<Walked, Error> {
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
    let mut listing = Vec::new();
    {
        let dup = rustix::io::fcntl_dupfd_cloexec(&fd, 0).map_err(|e| io(dir, e))?;
        let mut d = Dir::new(dup).map_err(|e| io(dir, e))?;
        while let Some(de) = d.read() {
            let de = de.map_err(|e| io(dir, e))?;
            let name = de.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            listing.push((name.to_vec(), de.file_type()));
        }
    }
    if w.reverse {
        listing.reverse();
    }
    listing.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let fd = Arc::new(fd);
    let results: Vec<(Walked, Option<Pending>)> = listing
        .into_par_iter()
        .with_max_len(64)
        .map(|(name, mut ft)| {
            let path = dir.join(OsStr::from_bytes(&name));
            let mut archive = p.prefix.clone();
            archive.extend_from_slice(&name);
            let mut out = Walked::default();
            if ft == FileType::Unknown {
                ft = FileType::from_raw_mode(
                    statat(&*fd, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| io(&path, e))?
                        .st_mode,
                );
            }
            match ft {
                FileType::Directory => {
                    if name == b"__pycache__" {
                        return Ok((out, None));
                    }
                    let st = statat(&*fd, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| io(&path, e))?;
                    out.dirs.push((archive.clone(), st.st_mode & 0o7777));
                    archive.push(b'/');
                    let sub = Pending {
                        parent: Some(fd.clone()),
                        name,
                        path,
                        prefix: archive,
                    };
                    return Ok((out, Some(sub)));
                }
                FileType::RegularFile => out.entries.push((archive, regular(&fd, &name, path, w)?)),
                _ => out.entries.push((archive, file_entry(&path, root)?)),
            }
            Ok((out, None))
        })
        .collect::<Result<_, Error>>()?;
    let mut out = Walked::default();
    let mut subdirs = Vec::new();
    for (r, sub) in results {
        out.entries.extend(r.entries);
        out.dirs.extend(r.dirs);
        subdirs.extend(sub);
    }
    Ok((out, subdirs))
}

/// A regular file: stat it (and hash it, when asked) relative to its directory.
fn regular(dirfd: &OwnedFd, name: &[u8], path: PathBuf, w: &Walker<'_>) -> Result<Entry, Error> {
    let entry = |st: &Stat, path: PathBuf, digest| Entry {
        source: Source::File(Arc::from(path)),
        mode: st.st_mode & 0o7777,
        size: st.st_size as u64,
        resolves_to_file: false,
        resolves_to_dir: false,
        escapes: false,
        digest,
        mtime_ns: Some(stamp(st).mtime_ns),
    };
    if !w.hash {
        let st = statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io(&path, e))?;
        w.step.inc(st.st_size as u64, 1);
        return Ok(entry(&st, path, None));
    }
    if let Some(cache) = w.cache {
        let st = statat(dirfd, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| io(&path, e))?;
        if let Some(d) = cache.get(&stamp(&st)) {
            w.step.inc(st.st_size as u64, 1);
            return Ok(entry(&st, path, Some(d)));
        }
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
    if let Some(cache) = w.cache {
        cache.put(stamp(&st), digest);
    }
    Ok(entry(&st, path, Some(digest)))
}
