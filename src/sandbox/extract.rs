//! Unpacks a layer into an overlay lower directory: owners, modes, setuid
//! bits, mtimes and extended attributes as the tar says; `.wh.NAME`
//! whiteouts become overlay's 0/0 character devices, `.wh..wh..opq` the
//! opaque xattr (`trusted.overlay.opaque`, or `user.overlay.opaque` for a
//! rootless mount with `userxattr`). Device nodes are skipped (they cannot
//! be made rootless and images do not need them). Every name is resolved
//! beneath the directory with no links followed, so a hostile layer cannot
//! write or link outside it.

use std::ffi::{CString, OsStr};
use std::io::{self, Read};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags, Timespec, Timestamps};

use crate::dockerfile::ignore::clean as norm;
use crate::fsx::DirFd;

/// The opaque-directory xattr overlay reads in this mode.
pub fn opaque_xattr(rootless: bool) -> &'static str {
    if rootless {
        "user.overlay.opaque"
    } else {
        "trusted.overlay.opaque"
    }
}

fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"", path),
    }
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// Removes whatever is at `name` in `dir` (a directory with its contents).
fn remove(dir: &DirFd, name: &OsStr) {
    if dir.remove(name).is_ok() {
        return;
    }
    if let Ok(sub) = dir.dir(name) {
        for n in sub.names().unwrap_or_default() {
            remove(&sub, &n);
        }
        let _ = rustix::fs::unlinkat(dir.fd(), name, AtFlags::REMOVEDIR);
    }
}

fn set_xattr(dir: &DirFd, name: &OsStr, key: &str, value: &[u8]) -> io::Result<()> {
    let path = dir.path.join(name);
    rustix::fs::lsetxattr(&path, key, value, rustix::fs::XattrFlags::empty())?;
    Ok(())
}

/// The prefix of an unpack in progress (`.<name>.tmp-<pid>-<n>`, `n`
/// unique in the process: stages unpack on several threads), so a later
/// run can remove one that a killed process left.
pub const TMP_INFIX: &str = ".tmp-";

/// Unpacks `tar` into `dir` (created here; it appears only when complete
/// and, where `diff_id` is given, only when the uncompressed stream has
/// that digest: a directory named by a diff_id holds exactly that layer).
pub fn extract(
    tar: &Path,
    dir: &Path,
    diff_id: Option<&crate::image::Digest>,
    rootless: bool,
) -> Result<(), String> {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = dir.with_file_name(format!(
        ".{}{TMP_INFIX}{}-{}",
        dir.file_name()
            .map_or("layer".into(), |n| n.to_string_lossy()),
        std::process::id(),
        SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
    let root = DirFd::open(&tmp).map_err(|e| format!("opening {}: {e}", tmp.display()))?;
    let reader =
        crate::source::layer_file(tar).map_err(|e| format!("reading {}: {e}", tar.display()))?;
    let mut hashed = crate::digest::HashingReader::new(reader);
    let mut ar = ::tar::Archive::new(&mut hashed);
    let mut dir_times: Vec<(Vec<u8>, u64)> = Vec::new();
    let entries = ar
        .entries()
        .map_err(|e| format!("reading {}: {e}", tar.display()))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| format!("reading {}: {e}", tar.display()))?;
        let path = norm(&entry.path_bytes());
        if path.is_empty() {
            continue;
        }
        let (parent, base) = split(&path);
        let pdir = root
            .create_dir(os(parent))
            .map_err(|e| format!("{}: {e}", String::from_utf8_lossy(&path)))?;
        let err = |e: io::Error| format!("{}: {e}", String::from_utf8_lossy(&path));
        if base == b".wh..wh..opq" {
            let (pp, pb) = split(parent);
            let holder = root.create_dir(os(pp)).map_err(err)?;
            set_xattr(&holder, os(pb), opaque_xattr(rootless), b"y").map_err(err)?;
            continue;
        }
        if let Some(name) = base.strip_prefix(b".wh.") {
            remove(&pdir, os(name));
            rustix::fs::mknodat(
                pdir.fd(),
                os(name),
                rustix::fs::FileType::CharacterDevice,
                Mode::empty(),
                0,
            )
            .map_err(|e| err(e.into()))?;
            continue;
        }
        let h = entry.header();
        let mode = h.mode().unwrap_or(0o644) & 0o7777;
        let (uid, gid) = (h.uid().unwrap_or(0), h.gid().unwrap_or(0));
        let mtime = h.mtime().unwrap_or(0);
        let et = h.entry_type();
        let name = os(base);
        let own = |flags: AtFlags| {
            // Rootless, ids outside the subordinate range cannot be set:
            // the file stays root's.
            let _ = rustix::fs::chownat(
                pdir.fd(),
                name,
                Some(rustix::process::Uid::from_raw(uid as u32)),
                Some(rustix::process::Gid::from_raw(gid as u32)),
                flags,
            );
        };
        let times = Timestamps {
            last_access: Timespec {
                tv_sec: mtime as i64,
                tv_nsec: 0,
            },
            last_modification: Timespec {
                tv_sec: mtime as i64,
                tv_nsec: 0,
            },
        };
        let xattrs: Vec<(String, Vec<u8>)> = entry
            .pax_extensions()
            .ok()
            .flatten()
            .map(|exts| {
                exts.filter_map(Result::ok)
                    .filter_map(|e| {
                        let k = e.key().ok()?.strip_prefix("SCHILY.xattr.")?.to_string();
                        Some((k, e.value_bytes().to_vec()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        if et.is_dir() {
            match pdir.dir(name) {
                Ok(_) => {}
                Err(_) => {
                    remove(&pdir, name);
                    rustix::fs::mkdirat(pdir.fd(), name, Mode::from_raw_mode(0o700))
                        .map_err(|e| err(e.into()))?;
                }
            }
            own(AtFlags::empty());
            rustix::fs::chmodat(pdir.fd(), name, Mode::from_raw_mode(mode), AtFlags::empty())
                .map_err(|e| err(e.into()))?;
            dir_times.push((path.clone(), mtime));
        } else if et.is_symlink() {
            let target = entry
                .link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default();
            remove(&pdir, name);
            rustix::fs::symlinkat(os(&target), pdir.fd(), name).map_err(|e| err(e.into()))?;
            own(AtFlags::SYMLINK_NOFOLLOW);
            let _ = rustix::fs::utimensat(pdir.fd(), name, &times, AtFlags::SYMLINK_NOFOLLOW);
            continue;
        } else if et.is_hard_link() {
            let target = norm(
                &entry
                    .link_name_bytes()
                    .map(|l| l.into_owned())
                    .unwrap_or_default(),
            );
            let (tp, tb) = split(&target);
            let tdir = root.dir(os(tp)).map_err(err)?;
            remove(&pdir, name);
            rustix::fs::linkat(tdir.fd(), os(tb), pdir.fd(), name, AtFlags::empty())
                .map_err(|e| err(e.into()))?;
            continue;
        } else if et.is_file() || et == ::tar::EntryType::Continuous {
            remove(&pdir, name);
            let fd = rustix::fs::openat(
                pdir.fd(),
                name,
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| err(e.into()))?;
            let mut f = std::fs::File::from(fd);
            io::copy(&mut (&mut entry).take(u64::MAX), &mut f).map_err(err)?;
            own(AtFlags::empty());
            // After chown, which clears setuid and setgid bits.
            rustix::fs::fchmod(f.as_fd(), Mode::from_raw_mode(mode)).map_err(|e| err(e.into()))?;
            let _ = rustix::fs::futimens(f.as_fd(), &times);
        } else {
            // Devices, FIFOs: not needed by images, not makeable rootless.
            continue;
        }
        for (k, v) in &xattrs {
            let _ = set_xattr(&pdir, name, k, v);
        }
    }
    // Directory mtimes last (their entries changed them), deepest first.
    for (p, mtime) in dir_times.iter().rev() {
        let (parent, base) = split(p);
        if let Ok(pdir) = root.dir(os(parent)) {
            let t = Timespec {
                tv_sec: *mtime as i64,
                tv_nsec: 0,
            };
            let _ = rustix::fs::utimensat(
                pdir.fd(),
                os(base),
                &Timestamps {
                    last_access: t,
                    last_modification: t,
                },
                AtFlags::SYMLINK_NOFOLLOW,
            );
        }
    }
    let (got, _) = hashed
        .finish()
        .map_err(|e| format!("reading {}: {e}", tar.display()))?;
    if let Some(want) = diff_id.filter(|w| **w != got) {
        remove_tree(&tmp);
        return Err(format!(
            "{}: the layer's uncompressed digest is {got}, not the diff_id {want} it was given as; the layer is not used",
            tar.display()
        ));
    }
    drop(root);
    match std::fs::rename(&tmp, dir) {
        Ok(()) => Ok(()),
        // Another build extracted the same layer first.
        Err(_) if dir.is_dir() => {
            remove_tree(&tmp);
            Ok(())
        }
        Err(e) => Err(format!(
            "renaming {} to {}: {e}",
            tmp.display(),
            dir.display()
        )),
    }
}

fn remove_tree(p: &Path) {
    crate::fsx::force_remove_tree(p);
}

/// A C string of a path (for xattr calls by path).
pub fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("paths have no NUL")
}
