//! RUN without overlayfs (its upper directory would be on overlayfs or
//! fuse-overlayfs, or the kernel is old): the lower directories are copied
//! into one writable root, which is snapshotted before the command and
//! compared after it by inode, size, ctime, mode and owner (never mtime,
//! which a command can set back). New and changed entries become the
//! layer; deleted ones `.wh.` entries (only the topmost of a deleted tree).

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::capture::Found;

/// Which archive paths (relative to the root) a walk leaves alone: never
/// read, compared, copied over or removed (container mode's kiln, cache,
/// context and mount points).
pub type Skip<'a> = &'a dyn Fn(&[u8]) -> bool;

/// Skips nothing.
pub fn nothing(_: &[u8]) -> bool {
    false
}

/// What the comparison looks at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snap {
    ino: u64,
    /// A directory's inode generation: a directory removed and made again
    /// may get the same inode number, never the same generation.
    generation: Option<u64>,
    size: u64,
    ctime_ns: i64,
    mode: u32,
    uid: u32,
    gid: u32,
}

impl Snap {
    /// (mode, uid, gid) if this was a directory.
    pub fn dir(&self) -> Option<(u32, u32, u32)> {
        (self.mode & libc::S_IFMT == libc::S_IFDIR).then_some((self.mode, self.uid, self.gid))
    }
}

/// `FS_IOC_GETVERSION` of a directory (ext4, xfs, btrfs keep one).
fn generation(p: &Path) -> Option<u64> {
    let f = fs::File::open(p).ok()?;
    let mut v: libc::c_long = 0;
    // SAFETY: FS_IOC_GETVERSION writes one long into `v`.
    let r = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0x8008_7601u64 as _,
            &mut v,
        )
    };
    (r == 0).then_some(v as u64)
}

impl Snap {
    fn at(p: &Path, md: &fs::Metadata) -> Snap {
        Snap {
            generation: if md.is_dir() { generation(p) } else { None },
            ..Snap::of(md)
        }
    }

    fn of(md: &fs::Metadata) -> Snap {
        Snap {
            generation: None,
            ino: md.ino(),
            size: md.len(),
            ctime_ns: md.ctime() * 1_000_000_000 + md.ctime_nsec(),
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
        }
    }
}

fn opaque(p: &Path) -> bool {
    let mut v = [0u8; 8];
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|k| rustix::fs::lgetxattr(p, *k, &mut v).is_ok_and(|n| &v[..n] == b"y"))
}

fn remove_any(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = fs::remove_file(p);
        }
        Err(_) => {}
    }
}

fn own(p: &Path, md: &fs::Metadata) {
    let _ = std::os::unix::fs::lchown(p, Some(md.uid()), Some(md.gid()));
}

/// Copies `lowers` (topmost first, in overlay's format: 0/0 character
/// devices are whiteouts, the opaque xattr hides what is below) into
/// `root`, leaving the paths `skip` names alone.
pub fn copy_lowers(lowers: &[PathBuf], root: &Path, skip: Skip<'_>) -> io::Result<()> {
    for lower in lowers.iter().rev() {
        let mut dir_modes: Vec<(PathBuf, fs::Metadata)> = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let mut names: Vec<_> = fs::read_dir(lower.join(&rel))?
                .map(|e| e.map(|e| e.file_name()))
                .collect::<io::Result<_>>()?;
            names.sort();
            for name in names {
                let r = rel.join(&name);
                if skip(r.as_os_str().as_bytes()) {
                    continue;
                }
                let src = lower.join(&r);
                let dst = root.join(&r);
                let md = fs::symlink_metadata(&src)?;
                let ft = md.file_type();
                if ft.is_char_device() && md.rdev() == 0 {
                    remove_any(&dst);
                } else if ft.is_dir() {
                    let existing = fs::symlink_metadata(&dst).ok();
                    if opaque(&src) || existing.as_ref().is_some_and(|m| !m.is_dir()) {
                        remove_any(&dst);
                    }
                    if fs::symlink_metadata(&dst).is_err() {
                        fs::create_dir(&dst)?;
                    }
                    own(&dst, &md);
                    dir_modes.push((dst, md));
                    stack.push(r);
                } else if ft.is_symlink() {
                    remove_any(&dst);
                    std::os::unix::fs::symlink(fs::read_link(&src)?, &dst)?;
                    own(&dst, &md);
                } else if ft.is_file() {
                    remove_any(&dst);
                    fs::copy(&src, &dst)?;
                    own(&dst, &md);
                    // After chown, which clears setuid and setgid.
                    fs::set_permissions(
                        &dst,
                        std::os::unix::fs::PermissionsExt::from_mode(md.mode() & 0o7777),
                    )?;
                    let t = fs::FileTimes::new().set_modified(md.modified()?);
                    let _ = fs::File::options()
                        .write(true)
                        .open(&dst)
                        .and_then(|f| f.set_times(t));
                }
            }
        }
        for (dst, md) in dir_modes {
            fs::set_permissions(
                &dst,
                std::os::unix::fs::PermissionsExt::from_mode(md.mode() & 0o7777),
            )?;
        }
    }
    Ok(())
}

/// The snapshot of every entry under `root` but what `skip` names, by
/// archive path.
pub fn scan(root: &Path, skip: Skip<'_>) -> io::Result<BTreeMap<Vec<u8>, Snap>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel))? {
            let r = rel.join(e?.file_name());
            if skip(r.as_os_str().as_bytes()) {
                continue;
            }
            let md = fs::symlink_metadata(root.join(&r))?;
            if md.is_dir() {
                stack.push(r.clone());
            }
            out.insert(
                r.as_os_str().as_bytes().to_vec(),
                Snap::at(&root.join(&r), &md),
            );
        }
    }
    Ok(out)
}

/// What changed under `root` since `before` (what `skip` names aside).
pub fn changes(
    root: &Path,
    before: &BTreeMap<Vec<u8>, Snap>,
    skip: Skip<'_>,
) -> io::Result<super::capture::Changes> {
    let mut found = BTreeMap::new();
    let mut now_paths = std::collections::HashSet::new();
    let mut replaced_dirs: Vec<Vec<u8>> = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in fs::read_dir(root.join(&rel))? {
            let r = rel.join(e?.file_name());
            if skip(r.as_os_str().as_bytes()) {
                continue;
            }
            let p = root.join(&r);
            let md = fs::symlink_metadata(&p)?;
            let key = r.as_os_str().as_bytes().to_vec();
            now_paths.insert(key.clone());
            let ft = md.file_type();
            if ft.is_dir() {
                stack.push(r.clone());
            }
            let was = before.get(&key);
            let now = Snap::at(&p, &md);
            if was == Some(&now) {
                continue;
            }
            let what = if ft.is_dir() {
                // A directory removed and made again: what was in it is
                // hidden, as overlay's opaque directory does.
                let replaced = was.is_some_and(|w| {
                    w.mode & libc::S_IFMT == libc::S_IFDIR
                        && (w.ino != now.ino || w.generation != now.generation)
                });
                if replaced {
                    replaced_dirs.push(key.clone());
                }
                Found::Dir { opaque: replaced }
            } else if ft.is_file() {
                Found::File
            } else if ft.is_symlink() {
                Found::Symlink(fs::read_link(&p)?.as_os_str().as_bytes().to_vec())
            } else {
                continue;
            };
            found.insert(key, (what, Some(md)));
        }
    }
    // Deleted: a whiteout for the topmost path of each deleted tree.
    for path in before.keys() {
        if now_paths.contains(path) {
            continue;
        }
        let parent_gone = path
            .iter()
            .rposition(|&c| c == b'/')
            .is_some_and(|i| !now_paths.contains(&path[..i]));
        let under_replaced = replaced_dirs
            .iter()
            .any(|d| path.len() > d.len() && path.starts_with(d) && path[d.len()] == b'/');
        if !parent_gone && !under_replaced {
            found.insert(path.clone(), (Found::Whiteout, None));
        }
    }
    // Every parent of what changed, as overlay's copy-up puts them in the
    // upper directory.
    let changed: Vec<Vec<u8>> = found.keys().cloned().collect();
    for path in changed {
        let mut p = &path[..];
        while let Some(i) = p.iter().rposition(|&c| c == b'/') {
            p = &p[..i];
            if found.contains_key(p) {
                break;
            }
            let md = fs::symlink_metadata(root.join(std::ffi::OsStr::from_bytes(p)))?;
            found.insert(p.to_vec(), (Found::Dir { opaque: false }, Some(md)));
        }
    }
    Ok(found)
}
