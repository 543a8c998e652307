//! Writes a RUN step's upper directory as its layer: a deterministic tar
//! (entries sorted by path; numeric owners as the command left them, no
//! user or group names; modes as left; mtimes clamped to the build
//! timestamp, as BuildKit's rewrite-timestamp does; extended attributes
//! kept except overlay's own). Overlay's whiteouts (0/0 character devices)
//! become `.wh.NAME` entries; an opaque directory gets `.wh..wh..opq` only
//! where a lower layer had that directory (overlay marks brand-new
//! directories opaque too). Mount points the sandbox made, still empty,
//! are left out.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::layer::tar::{self, Header, Kind};

/// What a step changed, by archive path (metadata: none for a deletion).
pub type Changes = BTreeMap<Vec<u8>, (Found, Option<fs::Metadata>)>;

/// One thing found in the upper directory (or, without overlayfs, changed
/// since the snapshot).
pub enum Found {
    Dir { opaque: bool },
    File,
    Symlink(Vec<u8>),
    Whiteout,
}

fn xattrs(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut names = vec![0u8; 4096];
    let Ok(n) = rustix::fs::llistxattr(path, &mut names) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&c| c == 0).filter(|n| !n.is_empty()) {
        let key = String::from_utf8_lossy(name).into_owned();
        if key.starts_with("trusted.overlay.") || key.starts_with("user.overlay.") {
            continue;
        }
        let mut value = vec![0u8; 65536];
        if let Ok(len) = rustix::fs::lgetxattr(path, name, &mut value) {
            value.truncate(len);
            out.push((format!("SCHILY.xattr.{key}"), value));
        }
    }
    out.sort();
    out
}

fn is_opaque(path: &Path) -> bool {
    let mut v = [0u8; 8];
    ["trusted.overlay.opaque", "user.overlay.opaque"]
        .iter()
        .any(|k| rustix::fs::lgetxattr(path, *k, &mut v).is_ok_and(|n| &v[..n] == b"y"))
}

/// What the topmost lower layer that has `rel` holds there, if it is a
/// directory: (mode, uid, gid).
fn lower_dir(lowers: &[PathBuf], rel: &Path) -> Option<(u32, u32, u32)> {
    for l in lowers {
        match fs::symlink_metadata(l.join(rel)) {
            Ok(m) if m.is_dir() => return Some((m.mode(), m.uid(), m.gid())),
            Ok(_) => return None,
            Err(_) => continue,
        }
    }
    None
}

/// Writes `upper` as a layer tar at `out`.
pub fn capture(
    upper: &Path,
    lowers: &[PathBuf],
    mountpoints: &[String],
    out: &Path,
    timestamp: u64,
) -> io::Result<()> {
    // Walk iteratively; collect (archive path, what, metadata).
    let mut found = Changes::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let dir = upper.join(&rel);
        for e in fs::read_dir(&dir)? {
            let e = e?;
            let r = rel.join(e.file_name());
            let p = upper.join(&r);
            let md = fs::symlink_metadata(&p)?;
            let ft = md.file_type();
            let key = r.as_os_str().as_bytes().to_vec();
            let what = if ft.is_dir() {
                stack.push(r.clone());
                Found::Dir {
                    opaque: is_opaque(&p) && lower_dir(lowers, &r).is_some(),
                }
            } else if ft.is_file() {
                Found::File
            } else if ft.is_symlink() {
                Found::Symlink(fs::read_link(&p)?.as_os_str().as_bytes().to_vec())
            } else if ft.is_char_device() && md.rdev() == 0 {
                Found::Whiteout
            } else {
                // Devices, FIFOs, sockets a command left: not in images.
                continue;
            };
            found.insert(key, (what, Some(md)));
        }
    }
    let lower = |path: &[u8]| lower_dir(lowers, Path::new(OsStr::from_bytes(path)));
    write(upper, found, mountpoints, &lower, out, timestamp)
}

/// What a directory was below the step (mode, uid, gid), if it was one.
pub type LowerDir<'a> = &'a dyn Fn(&[u8]) -> Option<(u32, u32, u32)>;

/// Writes what was found under `root` as a layer tar at `out`, leaving out
/// the mount points the sandbox made where nothing is left in them.
pub fn write(
    root: &Path,
    mut found: Changes,
    mountpoints: &[String],
    lower: LowerDir<'_>,
    out: &Path,
    timestamp: u64,
) -> io::Result<()> {
    let upper = root;
    // Mount-point files the sandbox made, still empty: dropped.
    for m in mountpoints {
        if let Some((Found::File, Some(md))) = found.get(m.as_bytes()) {
            if md.len() == 0 {
                found.remove(m.as_bytes());
            }
        }
    }
    // Mount-point directories the sandbox made, deepest first: dropped
    // when nothing else is left under them.
    let mut made_dirs: Vec<&String> = mountpoints
        .iter()
        .filter(|m| matches!(found.get(m.as_bytes()), Some((Found::Dir { .. }, _))))
        .collect();
    made_dirs.sort_by_key(|m| std::cmp::Reverse(m.matches('/').count()));
    for m in made_dirs {
        let mut prefix = m.as_bytes().to_vec();
        prefix.push(b'/');
        let busy = found
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&prefix));
        if !busy {
            found.remove(m.as_bytes());
        }
    }
    // Directories that are there only because something under them was
    // made and then left out (a mount point), unchanged from below:
    // dropped, deepest first.
    let dirs: Vec<Vec<u8>> = found
        .iter()
        .filter(|(_, (w, _))| matches!(w, Found::Dir { opaque: false }))
        .map(|(k, _)| k.clone())
        .rev()
        .collect();
    for d in dirs {
        let mut prefix = d.clone();
        prefix.push(b'/');
        let busy = found
            .range(prefix.clone()..)
            .next()
            .is_some_and(|(k, _)| k.starts_with(&prefix));
        let same = match (found.get(&d), lower(&d)) {
            (Some((_, Some(md))), Some((mode, uid, gid))) => {
                md.mode() == mode && md.uid() == uid && md.gid() == gid
            }
            _ => false,
        };
        if !busy && same {
            found.remove(&d);
        }
    }
    // Whiteouts and opaque markers under their archive names, sorted.
    // Archive name → (what, metadata, path under the root).
    type Entry<'a> = (&'a Found, Option<&'a fs::Metadata>, Vec<u8>);
    let mut entries: BTreeMap<Vec<u8>, Entry<'_>> = BTreeMap::new();
    for (path, (what, md)) in &found {
        let (dir, base) = match path.iter().rposition(|&c| c == b'/') {
            Some(i) => (&path[..=i], &path[i + 1..]),
            None => (&b""[..], &path[..]),
        };
        match what {
            Found::Whiteout => {
                let mut name = dir.to_vec();
                name.extend_from_slice(b".wh.");
                name.extend_from_slice(base);
                entries.insert(name, (what, md.as_ref(), path.clone()));
            }
            Found::Dir { opaque } => {
                entries.insert(path.clone(), (what, md.as_ref(), path.clone()));
                if *opaque {
                    let mut name = path.clone();
                    name.extend_from_slice(b"/.wh..wh..opq");
                    entries.insert(name, (&Found::Whiteout, None, Vec::new()));
                }
            }
            _ => {
                entries.insert(path.clone(), (what, md.as_ref(), path.clone()));
            }
        }
    }
    let file = File::create(out)?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut buf = vec![0u8; 1 << 20];
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for (name, (what, md, real)) in &entries {
        // Whiteouts: the deletion's time, clamped (the same with or without overlay).
        let mtime = md.map_or(now, |m| m.mtime().max(0) as u64).min(timestamp);
        let (uid, gid) = md.map_or((0, 0), |m| (m.uid() as u64, m.gid() as u64));
        let mode = md.map_or(0, |m| m.mode() & 0o7777);
        let src = upper.join(OsStr::from_bytes(real));
        fn h<'a>(
            name: &'a [u8],
            kind: Kind,
            mode: u32,
            size: u64,
            link: &'a [u8],
            (uid, gid, mtime): (u64, u64, u64),
        ) -> Header<'a> {
            Header {
                name,
                kind,
                mode,
                uid,
                gid,
                size,
                mtime,
                link,
            }
        }
        let ids = (uid, gid, mtime);
        match what {
            Found::Whiteout => {
                let wh = Header {
                    uid: 0,
                    gid: 0,
                    ..h(name, Kind::File, 0, 0, b"", ids)
                };
                tar::write_ustar(&mut w, &wh)?;
            }
            Found::Dir { .. } => {
                let mut n = name.clone();
                n.push(b'/');
                tar::write_ustar_pax(&mut w, &h(&n, Kind::Dir, mode, 0, b"", ids), &xattrs(&src))?;
            }
            Found::Symlink(target) => {
                tar::write_ustar_pax(
                    &mut w,
                    &h(name, Kind::Symlink, 0o777, 0, target, ids),
                    &xattrs(&src),
                )?;
            }
            Found::File => {
                let md = md.expect("files have metadata");
                if md.nlink() > 1 {
                    if let Some(first) = links.get(&(md.dev(), md.ino())) {
                        tar::write_ustar(&mut w, &h(name, Kind::HardLink, mode, 0, first, ids))?;
                        continue;
                    }
                    links.insert((md.dev(), md.ino()), name.clone());
                }
                let mut f = File::open(&src)?;
                let size = md.len();
                tar::write_ustar_pax(
                    &mut w,
                    &h(name, Kind::File, mode, size, b"", ids),
                    &xattrs(&src),
                )?;
                let mut left = size;
                while left > 0 {
                    let n = f.read(&mut buf[..(left.min(1 << 20) as usize)])?;
                    if n == 0 {
                        return Err(io::Error::other(format!(
                            "{} shrank while kiln read it",
                            src.display()
                        )));
                    }
                    w.write_all(&buf[..n])?;
                    left -= n as u64;
                }
                tar::pad(&mut w, size)?;
            }
        }
    }
    tar::finish(&mut w)?;
    w.flush()?;
    w.get_ref().sync_all()?;
    Ok(())
}
