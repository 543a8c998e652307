//! File access that links cannot redirect, and that path length cannot
//! limit.
//!
//! - [`DirFd`]: a directory kiln owns (a store, the index, the hash cache),
//!   opened once; every name beneath it is resolved with
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` (component by component
//!   with `O_NOFOLLOW` on kernels before 5.6), so a symlink anywhere under
//!   it is an error naming it, never followed for a read or a write. Only
//!   the directory the user names is taken as given.
//! - [`open_deep`] and [`lstat_deep`]: a path longer than `PATH_MAX` (a
//!   context 10,000 directories deep) opened in pieces with `openat`.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rustix::fs::{openat, statat, AtFlags, FileType, Mode, OFlags, ResolveFlags, Stat};

/// A directory opened once; names beneath it never pass through a link.
#[derive(Debug)]
pub struct DirFd {
    fd: OwnedFd,
    /// Its path, for messages.
    pub path: PathBuf,
}

/// Opens a file kiln owns (a blob of a store or a build) by path for
/// reading, never through a link: a link in its place is refused (nothing
/// about its target is read or printed), and so is anything not a regular
/// file.
pub fn open_own_file(path: &Path) -> io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => not_regular(path, "a symbolic link"),
            _ => e,
        })?;
    if !f.metadata()?.is_file() {
        return Err(not_regular(path, "a directory or special file"));
    }
    Ok(f)
}

/// The error for a link (or other non-regular file) where kiln wants its own file.
pub fn not_regular(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "{} is {what}, not a regular file; kiln never follows links inside a store, index or cache (remove it)",
            path.display()
        ),
    )
}

fn describe(st: &Stat) -> &'static str {
    match FileType::from_raw_mode(st.st_mode) {
        FileType::Symlink => "a symbolic link",
        FileType::Directory => "a directory",
        FileType::Fifo => "a FIFO",
        FileType::Socket => "a socket",
        FileType::CharacterDevice | FileType::BlockDevice => "a device",
        _ => "not a regular file",
    }
}

/// Resolves `rel` beneath `dir` with no links, one `openat2` where the
/// kernel has it, else component by component with `O_NOFOLLOW`.
fn open_beneath(dir: BorrowedFd<'_>, rel: &Path, flags: OFlags, mode: Mode) -> io::Result<OwnedFd> {
    let flags = flags | OFlags::CLOEXEC | OFlags::NOFOLLOW;
    match rustix::fs::openat2(
        dir,
        rel,
        flags,
        mode,
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    ) {
        Err(rustix::io::Errno::NOSYS) | Err(rustix::io::Errno::PERM) => {}
        r => return r.map_err(Into::into),
    }
    let parts: Vec<&OsStr> = rel
        .components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: not a plain relative path", rel.display()),
            )),
        })
        .collect::<io::Result<_>>()?;
    let Some((last, dirs)) = parts.split_last() else {
        return rustix::io::fcntl_dupfd_cloexec(dir, 0).map_err(Into::into);
    };
    let mut cur: Option<OwnedFd> = None;
    for d in dirs {
        let at = cur.as_ref().map_or(dir, |f| f.as_fd());
        let next = openat(
            at,
            *d,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        cur = Some(next);
    }
    let at = cur.as_ref().map_or(dir, |f| f.as_fd());
    Ok(openat(at, *last, flags, mode)?)
}

impl DirFd {
    /// Opens a directory the user named (links in its own path are theirs).
    pub fn open(path: &Path) -> io::Result<DirFd> {
        let fd = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(DirFd {
            fd,
            path: path.to_path_buf(),
        })
    }

    /// Creates `path` (and its parents) if missing, then opens it.
    pub fn create(path: &Path) -> io::Result<DirFd> {
        std::fs::create_dir_all(path)?;
        DirFd::open(path)
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// The path of a name beneath, for messages.
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.path.join(rel)
    }

    /// A directory beneath, reached with no links.
    pub fn dir(&self, rel: impl AsRef<Path>) -> io::Result<DirFd> {
        let rel = rel.as_ref();
        let fd = open_beneath(
            self.fd(),
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .map_err(|e| self.link_error(rel, e))?;
        Ok(DirFd {
            fd,
            path: self.join(rel),
        })
    }

    /// A directory beneath, created (with its parents) if missing.
    pub fn create_dir(&self, rel: impl AsRef<Path>) -> io::Result<DirFd> {
        let rel = rel.as_ref();
        let mut cur = DirFd {
            fd: rustix::io::fcntl_dupfd_cloexec(&self.fd, 0)?,
            path: self.path.clone(),
        };
        for c in rel.components() {
            let Component::Normal(n) = c else { continue };
            match rustix::fs::mkdirat(&cur.fd, n, Mode::from_raw_mode(0o755)) {
                Ok(()) | Err(rustix::io::Errno::EXIST) => {}
                Err(e) => return Err(io::Error::from(e)),
            }
            cur = cur.dir(n)?;
        }
        Ok(cur)
    }

    /// Says which name is a link when resolution met one.
    fn link_error(&self, rel: &Path, e: io::Error) -> io::Error {
        let looped = e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error())
            || e.raw_os_error() == Some(rustix::io::Errno::XDEV.raw_os_error())
            || e.raw_os_error() == Some(rustix::io::Errno::NOTDIR.raw_os_error());
        if !looped {
            return e;
        }
        // Find the first component that is not a plain directory or file.
        let mut at = PathBuf::new();
        for c in rel.components() {
            at.push(c);
            if let Ok(st) = statat(&self.fd, &at, AtFlags::SYMLINK_NOFOLLOW) {
                if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                    return not_regular(&self.join(&at), "a symbolic link");
                }
            }
        }
        e
    }

    /// Opens a regular file beneath for reading; a link or anything else
    /// that is not a regular file is an error naming it.
    pub fn open_file(&self, rel: impl AsRef<Path>) -> io::Result<File> {
        self.open_regular(rel.as_ref(), OFlags::RDONLY, Mode::empty())
    }

    /// Opens (creating if missing, never truncating) a regular file beneath
    /// for writing, as lock and lease files are.
    pub fn open_rw(&self, rel: impl AsRef<Path>) -> io::Result<File> {
        self.open_regular(
            rel.as_ref(),
            OFlags::RDWR | OFlags::CREATE,
            Mode::from_raw_mode(0o644),
        )
    }

    /// Opens `rel` beneath with `flags`, refusing anything but a regular
    /// file (opened non-blocking, so a FIFO never blocks, then set back).
    fn open_regular(&self, rel: &Path, flags: OFlags, mode: Mode) -> io::Result<File> {
        let fd = open_beneath(self.fd(), rel, flags | OFlags::NONBLOCK, mode)
            .map_err(|e| self.link_error(rel, e))?;
        let st = rustix::fs::fstat(&fd)?;
        if FileType::from_raw_mode(st.st_mode) != FileType::RegularFile {
            return Err(not_regular(&self.join(rel), describe(&st)));
        }
        rustix::fs::fcntl_setfl(&fd, OFlags::empty())?;
        Ok(File::from(fd))
    }

    /// Creates a new file (which must not exist) beneath, mode 0600.
    pub fn create_new(&self, name: &OsStr) -> io::Result<File> {
        let fd = openat(
            &self.fd,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )?;
        Ok(File::from(fd))
    }

    /// Reads a whole regular file beneath, refusing one over `max` bytes.
    pub fn read(&self, rel: impl AsRef<Path>, max: u64) -> io::Result<Vec<u8>> {
        let rel = rel.as_ref();
        let f = self.open_file(rel)?;
        let len = f.metadata()?.len();
        if len > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is {len} bytes; kiln reads at most {max} here",
                    self.join(rel).display()
                ),
            ));
        }
        let mut out = Vec::with_capacity(len as usize);
        f.take(max + 1).read_to_end(&mut out)?;
        Ok(out)
    }

    /// `lstat` of a name beneath (links are not followed); `None` if missing.
    pub fn stat(&self, rel: impl AsRef<Path>) -> io::Result<Option<Stat>> {
        let rel = rel.as_ref();
        let (dir, name) = match (rel.parent(), rel.file_name()) {
            (Some(p), Some(n)) if !p.as_os_str().is_empty() => (Some(self.dir(p)?), n),
            (_, Some(n)) => (None, n),
            _ => return Ok(None),
        };
        let at = dir.as_ref().map_or(self.fd(), |d| d.fd());
        match statat(at, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => Ok(Some(st)),
            Err(rustix::io::Errno::NOENT) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether `name` is a regular file of `size` bytes (a link is not).
    pub fn has_file(&self, rel: impl AsRef<Path>, size: u64) -> bool {
        self.stat(rel).ok().flatten().is_some_and(|st| {
            FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
                && st.st_size as u64 == size
        })
    }

    /// Renames `from` in this directory to `to` in `dir` (replacing what is
    /// there, never following a link there).
    pub fn rename(&self, from: &OsStr, dir: &DirFd, to: &OsStr) -> io::Result<()> {
        rustix::fs::renameat(&self.fd, from, &dir.fd, to).map_err(Into::into)
    }

    /// Removes a file beneath (not a directory); missing is fine.
    pub fn remove(&self, name: &OsStr) -> io::Result<()> {
        match rustix::fs::unlinkat(&self.fd, name, AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The names in this directory (without `.` and `..`).
    pub fn names(&self) -> io::Result<Vec<std::ffi::OsString>> {
        let dup = rustix::io::fcntl_dupfd_cloexec(&self.fd, 0)?;
        let mut d = rustix::fs::Dir::new(dup)?;
        let mut out = Vec::new();
        while let Some(e) = d.read() {
            let e = e?;
            let n = e.file_name().to_bytes();
            if n != b"." && n != b".." {
                out.push(OsStr::from_bytes(n).to_os_string());
            }
        }
        Ok(out)
    }

    /// An `O_PATH` descriptor of `rel` beneath (a directory or a regular
    /// file), reached with no link followed: a link on the way or in its
    /// place is an error naming it. Returns whether it is a directory.
    pub fn open_path(&self, rel: impl AsRef<Path>) -> io::Result<(OwnedFd, bool)> {
        let rel = rel.as_ref();
        let fd = open_beneath(self.fd(), rel, OFlags::PATH, Mode::empty())
            .map_err(|e| self.link_error(rel, e))?;
        let st = rustix::fs::fstat(&fd)?;
        match FileType::from_raw_mode(st.st_mode) {
            FileType::Directory => Ok((fd, true)),
            FileType::RegularFile => Ok((fd, false)),
            _ => Err(not_regular(&self.join(rel), describe(&st))),
        }
    }

    /// Syncs the directory (a rename in it becomes durable).
    pub fn sync(&self) -> io::Result<()> {
        rustix::fs::fsync(&self.fd).map_err(Into::into)
    }
}

/// Whether a process `pid` is running here (one that left temporary
/// files is gone once it is not).
pub fn process_alive(pid: u32) -> bool {
    pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists()
}

/// Creates `path` (and its parents) and makes it private (0700): a
/// directory holding a build's or a RUN's files, which no other local user
/// may enter (a RUN may leave a setuid binary there).
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(path)?;
    let md = std::fs::symlink_metadata(path)?;
    if md.permissions().mode() & 0o7777 != 0o700 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// Removes a tree that may hold directories without write or search
/// permission (overlay's `work/work` is mode 0000): each directory is made
/// 0700 before its entries go. Links are removed, never followed. Best
/// effort; what is left stays.
pub fn force_remove_tree(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let Ok(md) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !md.is_dir() {
        let _ = std::fs::remove_file(dir);
        return;
    }
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            force_remove_tree(&e.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Most of a path one `open` takes (`PATH_MAX` is 4096 with its NUL).
const PIECE: usize = 3072;

/// Splits a long path into pieces of at most [`PIECE`] bytes at `/`.
fn pieces(path: &Path) -> Vec<&OsStr> {
    let b = path.as_os_str().as_bytes();
    let mut out = Vec::new();
    let mut start = 0;
    while b.len() - start > PIECE {
        let window = &b[start..start + PIECE];
        let cut = match window.iter().rposition(|&c| c == b'/') {
            Some(0) | None => {
                // One name longer than a piece: let the kernel say so.
                out.push(OsStr::from_bytes(&b[start..]));
                return out;
            }
            Some(i) => start + i,
        };
        out.push(OsStr::from_bytes(&b[start..cut]));
        start = cut + 1;
        while b.get(start) == Some(&b'/') {
            start += 1;
        }
    }
    out.push(OsStr::from_bytes(&b[start..]));
    out
}

/// The directory holding the last piece of a long path, and that piece.
fn deep_parent(path: &Path) -> io::Result<(Option<OwnedFd>, &OsStr)> {
    let parts = pieces(path);
    let (last, dirs) = parts.split_last().expect("at least one piece");
    let mut cur: Option<OwnedFd> = None;
    for d in dirs {
        let next = match &cur {
            None => rustix::fs::open(
                *d,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ),
            Some(f) => openat(
                f,
                *d,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ),
        }?;
        cur = Some(next);
    }
    Ok((cur, last))
}

/// Opens a file for reading as `File::open` does; a path longer than
/// `PATH_MAX` is opened in pieces.
pub fn open_deep(path: &Path) -> io::Result<File> {
    let flags = OFlags::RDONLY | OFlags::CLOEXEC;
    if path.as_os_str().len() < PIECE {
        return Ok(File::from(rustix::fs::open(path, flags, Mode::empty())?));
    }
    let (dir, last) = deep_parent(path)?;
    let fd = match &dir {
        None => rustix::fs::open(last, flags, Mode::empty()),
        Some(d) => openat(d, last, flags, Mode::empty()),
    }?;
    Ok(File::from(fd))
}

/// `lstat` of a path of any length.
pub fn lstat_deep(path: &Path) -> io::Result<std::fs::Metadata> {
    if path.as_os_str().len() < PIECE {
        return std::fs::symlink_metadata(path);
    }
    // Metadata comes from the opened file (a deep link: its target's).
    let f = open_deep(path)?;
    f.metadata()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_beneath_a_dir_are_refused_by_name() {
        let t = tempfile::tempdir().unwrap();
        let outside = t.path().join("outside");
        std::fs::write(&outside, b"secret").unwrap();
        let store = t.path().join("store");
        std::fs::create_dir_all(store.join("blobs")).unwrap();
        std::os::unix::fs::symlink(&outside, store.join("blobs/x")).unwrap();
        std::os::unix::fs::symlink(t.path(), store.join("up")).unwrap();
        let d = DirFd::open(&store).unwrap();
        let e = d.open_file("blobs/x").unwrap_err().to_string();
        assert!(e.contains("blobs/x is a symbolic link"), "{e}");
        let e = d.open_file("up/outside").unwrap_err().to_string();
        assert!(e.contains("store/up is a symbolic link"), "{e}");
        let e = d.open_rw("blobs/x").unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(std::fs::read(&outside).unwrap(), b"secret");
        assert!(!d.has_file("blobs/x", 6));
        let e = d.read("../outside", 100).unwrap_err();
        assert!(
            e.raw_os_error().is_some() || e.to_string().contains("relative"),
            "{e}"
        );
    }

    #[test]
    fn paths_longer_than_path_max_open_in_pieces() {
        let t = tempfile::tempdir().unwrap();
        let mut p = t.path().to_path_buf();
        for _ in 0..3000 {
            p.push("d");
        }
        // create_dir_all cannot: build it with openat.
        let mut dir = DirFd::open(t.path()).unwrap();
        for _ in 0..3000 {
            dir = dir.create_dir("d").unwrap();
        }
        let f = dir.create_new(OsStr::new("f")).unwrap();
        drop(f);
        let file = p.join("f");
        assert!(file.as_os_str().len() > 4096);
        assert!(std::fs::File::open(&file).is_err());
        let mut s = String::new();
        open_deep(&file).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "");
        assert!(lstat_deep(&file).unwrap().is_file());
    }
}
