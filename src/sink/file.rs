//! The one way kiln writes a file that others may be reading: a temporary
//! file beside the target (`.kiln-<kind>-<pid>-…`, so a later run can tell a
//! dead process's leftovers), filled, made 0644, fsynced, renamed over the
//! target. A reader sees the old bytes or the new ones, never half a file.
//! Blobs, `index.json` files, outputs and index entries all go through it.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::fsx::DirFd;
use crate::image::Descriptor;
use crate::source::{read_error, Error, Verified};
use crate::store::Lease;
use crate::Digest;

/// The prefix of kiln's temporary files and directories:
/// `.kiln-<kind>-<pid>-`, so a later run can tell whose they are.
pub fn temp_prefix(kind: &str) -> String {
    format!(".kiln-{kind}-{}-", std::process::id())
}

/// The pid in a temporary name kiln made (`.kiln-<kind>-<pid>-…`).
pub fn temp_pid(name: &OsStr) -> Option<u32> {
    let rest = name.to_str()?.strip_prefix(".kiln-")?;
    let mut parts = rest.splitn(3, '-');
    let (Some(_kind), Some(pid), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    pid.parse().ok()
}

/// A temporary file, created with `O_EXCL | O_NOFOLLOW` in a directory
/// opened once, removed if dropped before [`Pending::commit_to`].
pub struct Pending {
    dir: DirFd,
    name: OsString,
    file: Option<File>,
    /// What to name in errors.
    target: PathBuf,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = self.dir.remove(&self.name);
        }
    }
}

impl Pending {
    /// A temporary file in `dir` (created if missing), for a `target` there.
    pub fn create(dir: &Path, kind: &str, target: &Path) -> Result<Pending, Error> {
        let d = DirFd::create(dir).map_err(|source| Error::Write {
            path: target.to_path_buf(),
            source,
        })?;
        Pending::new_in(d, kind, target)
    }

    /// A temporary file in the open directory `dir`.
    pub fn new_in(dir: DirFd, kind: &str, target: &Path) -> Result<Pending, Error> {
        let prefix = temp_prefix(kind);
        let mut last = None;
        for _ in 0..16 {
            let name = OsString::from(format!("{prefix}{:016x}", rand_u64()));
            match dir.create_new(&name) {
                Ok(file) => {
                    return Ok(Pending {
                        dir,
                        name,
                        file: Some(file),
                        target: target.to_path_buf(),
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => {
                    return Err(Error::Write {
                        path: dir.path.clone(),
                        source: e,
                    })
                }
            }
        }
        Err(Error::Write {
            path: dir.path.clone(),
            source: last.unwrap_or_else(|| io::Error::other("no free temporary name")),
        })
    }

    pub fn file(&self) -> &File {
        self.file.as_ref().expect("pending file")
    }

    pub fn file_mut(&mut self) -> &mut File {
        self.file.as_mut().expect("pending file")
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The temporary file's own path (where a full disk hit).
    pub fn temp_path(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    pub fn error(&self, source: io::Error) -> Error {
        Error::Write {
            path: self.target.clone(),
            source,
        }
    }

    /// Makes the file 0644 and durable, ready to rename.
    fn seal(&self) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt;
        let f = self.file();
        f.set_permissions(fs::Permissions::from_mode(0o644))
            .and_then(|_| f.sync_all())
            .map_err(|e| self.error(e))
    }

    /// Makes the file 0644 and durable, and renames it to `to` (a path in
    /// the directory it was created in).
    pub fn commit(self, to: &Path) -> Result<(), Error> {
        let name = to.file_name().unwrap_or(to.as_os_str()).to_os_string();
        let dir = DirFd::open(&self.dir.path).map_err(|e| self.error(e))?;
        self.commit_to(&dir, &name)
    }

    /// Makes the file 0644 and durable, and renames it to `name` in `dir`
    /// (replacing what is there; a link there is replaced, not followed).
    pub fn commit_to(mut self, dir: &DirFd, name: &OsStr) -> Result<(), Error> {
        self.seal()?;
        self.dir
            .rename(&self.name, dir, name)
            .map_err(|e| self.error(e))?;
        self.file = None;
        Ok(())
    }
}

/// A random 64-bit number for temporary names.
pub(crate) fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// Replaces `path` with `bytes`, atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut p = Pending::create(dir, "file", path)?;
    p.file_mut().write_all(bytes).map_err(|e| Error::Write {
        path: path.to_path_buf(),
        source: e,
    })?;
    p.commit(path)
}

/// Replaces `name` in the open directory `dir` with `bytes`, atomically,
/// by way of a temporary file in `tmp` (on the same file system).
pub fn write_atomic_in(dir: &DirFd, tmp: DirFd, name: &str, bytes: &[u8]) -> Result<(), Error> {
    let target = dir.join(name);
    let mut p = Pending::new_in(tmp, "file", &target)?;
    p.file_mut().write_all(bytes).map_err(|e| Error::Write {
        path: target.clone(),
        source: e,
    })?;
    p.commit_to(dir, OsStr::new(name))
}

/// A `blobs/sha256` directory new blobs are written into: temporary files
/// in `tmp`, renamed into `blobs` once verified. A store's has a lease, so
/// `kiln store gc` leaves this process's blobs alone.
pub struct BlobDir {
    pub blobs: DirFd,
    tmp: DirFd,
    lease: Option<std::sync::Arc<Lease>>,
}

impl BlobDir {
    /// An output's blobs directory (created if missing); temporary files beside the blobs.
    pub fn plain(blobs: &Path) -> Result<BlobDir, Error> {
        let open = || {
            Ok(BlobDir {
                blobs: DirFd::create(blobs)?,
                tmp: DirFd::open(blobs)?,
                lease: None,
            })
        };
        open().map_err(|source| Error::Write {
            path: blobs.to_path_buf(),
            source,
        })
    }

    /// A store's blobs directory, its temporary directory and its lease.
    pub fn leased(blobs: DirFd, tmp: DirFd, lease: Option<std::sync::Arc<Lease>>) -> BlobDir {
        BlobDir { blobs, tmp, lease }
    }

    pub fn path(&self) -> &Path {
        &self.blobs.path
    }

    /// A temporary file for a new blob.
    pub fn pending(&self, kind: &str) -> Result<Pending, Error> {
        let tmp = DirFd::open(&self.tmp.path).map_err(|source| Error::Write {
            path: self.tmp.path.clone(),
            source,
        })?;
        match &self.lease {
            Some(l) => l.guard(|| Pending::new_in(tmp, kind, &self.blobs.path)),
            None => Pending::new_in(tmp, kind, &self.blobs.path),
        }
    }

    /// Renames a verified temporary file into place as blob `digest`.
    pub fn commit(&self, p: Pending, digest: &Digest) -> Result<PathBuf, Error> {
        let name = digest.hex();
        let put = || p.commit_to(&self.blobs, OsStr::new(&name));
        match &self.lease {
            Some(l) => l.hold(digest, true, put)?,
            None => put()?,
        }
        Ok(self.blobs.join(name))
    }

    /// Whether the blob is there, as a regular file of its size (leased
    /// from now on, so gc keeps it).
    pub fn has(&self, d: &Descriptor) -> Result<bool, Error> {
        let check = || Ok(self.blobs.has_file(d.digest.hex(), d.size));
        match &self.lease {
            Some(l) => l.hold(&d.digest, false, check),
            None => check(),
        }
    }

    /// Writes a blob from a stream that must be exactly the blob `d` names:
    /// verified as it is written; on a mismatch nothing is left. `from`
    /// names the source in errors.
    pub fn write_blob(
        &self,
        d: &Descriptor,
        r: &mut dyn Read,
        from: PathBuf,
    ) -> Result<PathBuf, Error> {
        let p = self.pending("blob")?;
        // A write error names the file being written.
        let werr = |p: &Pending, source| Error::Write {
            path: p.temp_path(),
            source,
        };
        {
            let mut v = Verified::new(r, d);
            let mut buf = vec![0u8; 1 << 20];
            let mut w = BufWriter::with_capacity(1 << 20, p.file());
            loop {
                let n = match v.read(&mut buf) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(read_error(from, d, e)),
                };
                if n == 0 {
                    break;
                }
                if let Err(e) = w.write_all(&buf[..n]) {
                    drop(w);
                    return Err(werr(&p, e));
                }
            }
            if let Err(e) = w.flush() {
                drop(w);
                return Err(werr(&p, e));
            }
        }
        self.commit(p, &d.digest)
    }

    /// Writes bytes as a blob (configs and manifests kiln makes) and
    /// returns their digest.
    pub fn write_bytes(&self, bytes: &[u8]) -> Result<Digest, Error> {
        let d = Descriptor::new(
            crate::image::MediaType::OciConfig,
            Digest::of(bytes),
            bytes.len() as u64,
        );
        if !self.has(&d)? {
            self.write_blob(&d, &mut &bytes[..], PathBuf::from("(memory)"))?;
        }
        Ok(d.digest)
    }
}

/// Puts a blob into an output layout's `blobs` directory: a blob that
/// lies on disk as a whole file is verified by one read and hard-linked
/// (no second copy of a layer); anything else is written by
/// [`BlobDir::write_blob`], verified as it streams. Stores never link (see
/// `Store::put_blob`).
pub fn put_blob(blobs: &Path, blob: &super::Blob<'_>) -> Result<(), Error> {
    let d = blob.desc;
    let dir = BlobDir::plain(blobs)?;
    // One read either way: a hard link (same filesystem) is verified by
    // reading it once, in the output's staging directory, and taken back
    // if it does not match; otherwise the copy is verified as it is made.
    if let Some(f) = blob.file().filter(|f| f.offset == 0 && f.len == d.size) {
        let target = blobs.join(d.digest.hex());
        let linked = f.path != target && fs::hard_link(&f.path, &target).is_ok();
        if linked || f.path == target {
            if let Err(e) = io::copy(&mut blob.reader()?, &mut io::sink()) {
                if linked {
                    let _ = fs::remove_file(&target);
                }
                return Err(read_error(blob.from(), d, e));
            }
            return Ok(());
        }
    }
    dir.write_blob(d, &mut blob.reader()?, blob.from())?;
    Ok(())
}

/// Removes temporary files and directories that kiln processes which no
/// longer run left in `dir` (after a `kill -9` or a power cut); never
/// another live process's. Best effort: failures are ignored.
pub fn clean_stale(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let name = e.file_name();
        let kind_ok = name
            .to_str()
            .and_then(|n| n.strip_prefix(".kiln-"))
            .is_some_and(|r| {
                [
                    "out-", "build-", "old-", "blob-", "file-", "layer-", "pull-", "read-",
                ]
                .iter()
                .any(|k| r.starts_with(k))
            });
        let Some(pid) = temp_pid(&name).filter(|_| kind_ok) else {
            continue;
        };
        if crate::fsx::process_alive(pid) {
            continue;
        }
        let p = e.path();
        if p.is_dir() && !p.is_symlink() {
            // A rootless RUN's spool holds files of the user namespace's
            // ids and overlay's mode-0000 work directory.
            crate::sandbox::remove_tree(&p);
        } else {
            let _ = fs::remove_file(&p);
        }
    }
}

/// The directory an output goes into (created if missing), cleaned of
/// dead processes' leftovers.
pub fn parent_dir(out: &Path) -> PathBuf {
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
    fn a_blob_is_verified_and_lands_0644_or_not_at_all() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let good = Descriptor::new(crate::image::MediaType::OciConfig, Digest::of(b"abc"), 3);
        let dir = BlobDir::plain(d.path()).unwrap();
        let p = dir
            .write_blob(&good, &mut &b"abc"[..], "src".into())
            .unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"abc");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let bad = Descriptor::new(crate::image::MediaType::OciConfig, Digest::of(b"xyz"), 3);
        let e = dir
            .write_blob(&bad, &mut &b"abc"[..], "src".into())
            .unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        let left: Vec<_> = fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the good blob remains");
    }
}
