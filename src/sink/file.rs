//! The one way kiln writes a file that others may be reading: a temporary
//! file beside the target (`.kiln-<kind>-<pid>-…`, so a later run can tell a
//! dead process's leftovers), filled, made 0644, fsynced, renamed over the
//! target. A reader sees the old bytes or the new ones, never half a file.
//! Blobs, `index.json` files, outputs and index entries all go through it.

use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::image::Descriptor;
use crate::source::{read_error, Error, Verified};
use crate::Digest;

/// The prefix of kiln's temporary files and directories:
/// `.kiln-<kind>-<pid>-`, so a later run can tell whose they are.
pub fn temp_prefix(kind: &str) -> String {
    format!(".kiln-{kind}-{}-", std::process::id())
}

/// A temporary file beside its final place.
pub struct Pending {
    tmp: tempfile::NamedTempFile,
    /// What to name in errors.
    target: PathBuf,
}

impl Pending {
    /// A temporary file in `dir` (created if missing), for a `target` there.
    pub fn create(dir: &Path, kind: &str, target: &Path) -> Result<Pending, Error> {
        let werr = |source| Error::Write {
            path: target.to_path_buf(),
            source,
        };
        fs::create_dir_all(dir).map_err(werr)?;
        let tmp = tempfile::Builder::new()
            .prefix(&temp_prefix(kind))
            .tempfile_in(dir)
            .map_err(werr)?;
        Ok(Pending {
            tmp,
            target: target.to_path_buf(),
        })
    }

    pub fn file(&self) -> &File {
        self.tmp.as_file()
    }

    pub fn file_mut(&mut self) -> &mut File {
        self.tmp.as_file_mut()
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    pub fn error(&self, source: io::Error) -> Error {
        Error::Write {
            path: self.target.clone(),
            source,
        }
    }

    /// Makes the file 0644 and durable, and renames it to `to`.
    pub fn commit(self, to: &Path) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt;
        let f = self.tmp.as_file();
        f.set_permissions(fs::Permissions::from_mode(0o644))
            .and_then(|_| f.sync_all())
            .map_err(|e| self.error(e))?;
        let target = self.target.clone();
        self.tmp.persist(to).map_err(|e| Error::Write {
            path: target,
            source: e.error,
        })?;
        Ok(())
    }
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

/// Writes a blob into `blobs` (a `blobs/sha256` directory) from a stream
/// that must be exactly the blob `d` names: verified as it is written; on a
/// mismatch nothing is left. `from` names the source in errors.
pub fn write_blob(
    blobs: &Path,
    d: &Descriptor,
    r: &mut dyn Read,
    from: PathBuf,
) -> Result<PathBuf, Error> {
    let target = blobs.join(d.digest.hex());
    let mut p = Pending::create(blobs, "blob", &target)?;
    {
        let mut v = Verified::new(r, d);
        let mut w = BufWriter::with_capacity(1 << 20, p.file_mut());
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match v.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_error(from, d, e)),
            };
            if n == 0 {
                break;
            }
            w.write_all(&buf[..n]).map_err(|e| Error::Write {
                path: target.clone(),
                source: e,
            })?;
        }
        w.flush().map_err(|e| Error::Write {
            path: target.clone(),
            source: e,
        })?;
    }
    p.commit(&target)?;
    Ok(target)
}

/// Puts a blob into an output layout's `blobs` directory: a blob that
/// lies on disk as a whole file is verified by one read and hard-linked
/// (no second copy of a layer); anything else is written by
/// [`write_blob`], verified as it streams. Stores never link (see
/// `Store::put_blob`).
pub fn put_blob(blobs: &Path, blob: &super::Blob<'_>) -> Result<(), Error> {
    let d = blob.desc;
    if let Some(f) = blob.file().filter(|f| f.offset == 0 && f.len == d.size) {
        io::copy(&mut blob.reader()?, &mut io::sink())
            .map_err(|e| read_error(blob.from(), d, e))?;
        fs::create_dir_all(blobs).map_err(|source| Error::Write {
            path: blobs.to_path_buf(),
            source,
        })?;
        let target = blobs.join(d.digest.hex());
        if f.path == target || fs::hard_link(&f.path, &target).is_ok() {
            return Ok(());
        }
    }
    write_blob(blobs, d, &mut blob.reader()?, blob.from())?;
    Ok(())
}

/// Writes bytes as a blob (configs and manifests kiln makes) and returns
/// their digest.
pub fn write_bytes_blob(blobs: &Path, bytes: &[u8]) -> Result<Digest, Error> {
    let digest = Digest::of(bytes);
    let target = blobs.join(digest.hex());
    if fs::metadata(&target).is_ok_and(|m| m.is_file() && m.len() == bytes.len() as u64) {
        return Ok(digest);
    }
    let d = Descriptor::new(
        crate::image::MediaType::OciConfig,
        digest.clone(),
        bytes.len() as u64,
    );
    write_blob(blobs, &d, &mut &bytes[..], PathBuf::from("(memory)"))?;
    Ok(digest)
}

/// Removes temporary files and directories that kiln processes which no
/// longer run left in `dir` (after a `kill -9` or a power cut); never
/// another live process's. Best effort: failures are ignored.
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
        if !matches!(kind, "out" | "build" | "old" | "blob" | "file" | "layer") {
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
        let p = write_blob(d.path(), &good, &mut &b"abc"[..], "src".into()).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"abc");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let bad = Descriptor::new(crate::image::MediaType::OciConfig, Digest::of(b"xyz"), 3);
        let e = write_blob(d.path(), &bad, &mut &b"abc"[..], "src".into()).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        let left: Vec<_> = fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "only the good blob remains");
    }
}
