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
    Dir {
        opaque: bool,
    },
    File,
    Symlink(Vec<u8>),
    Whiteout,
    /// A file kept with no bytes (`--reproducible` empties logs).
    Empty,
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

/// One layer below a step: an unpacked directory (overlay's lower), or a
/// RUN's layer tar applied in place (container mode), read by its index.
pub enum Lower {
    Dir(PathBuf),
    Tar(TarLower),
}

/// A layer tar's entries by path, for comparing without unpacking.
pub struct TarLower {
    path: PathBuf,
    entries: HashMap<Vec<u8>, TarEntry>,
    /// Paths a `.wh.` entry deletes, and directories marked opaque.
    whiteouts: std::collections::HashSet<Vec<u8>>,
    opaque: std::collections::HashSet<Vec<u8>>,
}

struct TarEntry {
    /// The file type and permission bits, as `st_mode`.
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    offset: u64,
    link: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl TarLower {
    /// Reads the index of a layer tar kiln captured (uncompressed).
    pub fn open(path: &Path) -> io::Result<TarLower> {
        let mut ar = ::tar::Archive::new(File::open(path)?);
        let mut t = TarLower {
            path: path.to_path_buf(),
            entries: HashMap::new(),
            whiteouts: Default::default(),
            opaque: Default::default(),
        };
        for e in ar.entries_with_seek()? {
            let mut e = e?;
            let name = e.path_bytes().trim_ascii_end().to_vec();
            let name = name.strip_suffix(b"/").unwrap_or(&name).to_vec();
            let (dir, base) = match name.iter().rposition(|&c| c == b'/') {
                Some(i) => (name[..i].to_vec(), name[i + 1..].to_vec()),
                None => (Vec::new(), name.clone()),
            };
            if base == b".wh..wh..opq" {
                t.opaque.insert(dir);
                continue;
            }
            if let Some(gone) = base.strip_prefix(b".wh.") {
                let mut p = dir.clone();
                if !p.is_empty() {
                    p.push(b'/');
                }
                p.extend_from_slice(gone);
                t.whiteouts.insert(p);
                continue;
            }
            let h = e.header().clone();
            let kind = match h.entry_type() {
                ::tar::EntryType::Directory => libc::S_IFDIR,
                ::tar::EntryType::Symlink => libc::S_IFLNK,
                ::tar::EntryType::Regular => libc::S_IFREG,
                // Hard links and others: never taken as unchanged.
                _ => 0,
            };
            let xattrs = e
                .pax_extensions()
                .ok()
                .flatten()
                .map(|x| {
                    let mut v: Vec<(String, Vec<u8>)> = x
                        .filter_map(Result::ok)
                        .filter_map(|x| {
                            let k = x.key().ok()?;
                            k.starts_with("SCHILY.xattr.")
                                .then(|| (k.to_string(), x.value_bytes().to_vec()))
                        })
                        .collect();
                    v.sort();
                    v
                })
                .unwrap_or_default();
            let entry = TarEntry {
                mode: kind | (h.mode()? & 0o7777),
                uid: h.uid()? as u32,
                gid: h.gid()? as u32,
                size: e.size(),
                offset: e.raw_file_position(),
                link: e.link_name_bytes().map(|l| l.to_vec()).unwrap_or_default(),
                xattrs,
            };
            t.entries.insert(name, entry);
        }
        Ok(t)
    }
}

/// What the step's root held below it, to tell what a step left as it was.
pub enum Below<'a> {
    /// The lowers, topmost first (overlay's order): whiteouts and opaque
    /// directories in them hide what lies deeper, as overlay does.
    Stack(&'a [Lower]),
    /// The lower directories, topmost first.
    Dirs(&'a [PathBuf]),
}

/// What a lower holds at a path.
enum Held<'a> {
    Dir(PathBuf),
    Tar(&'a TarLower, &'a TarEntry),
}

impl Below<'_> {
    /// The lower entry the step's root showed at `rel`, if any.
    fn find(&self, rel: &[u8]) -> Option<Held<'_>> {
        let relp = Path::new(OsStr::from_bytes(rel));
        let ancestors: Vec<&Path> = relp
            .ancestors()
            .skip(1)
            .filter(|a| !a.as_os_str().is_empty())
            .collect();
        let dir_lower = |l: &Path| -> Result<Option<Held<'_>>, bool> {
            // An ancestor that is no directory here (a whiteout, a file)
            // or is opaque hides the deeper layers.
            let mut hidden = false;
            for a in &ancestors {
                match fs::symlink_metadata(l.join(a)) {
                    Ok(m) if m.is_dir() => hidden |= is_opaque(&l.join(a)),
                    Ok(_) => return Ok(None),
                    Err(_) => {}
                }
            }
            let p = l.join(relp);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_char_device() && m.rdev() == 0 => Ok(None),
                Ok(_) => Ok(Some(Held::Dir(p))),
                Err(_) => Err(hidden),
            }
        };
        let stack: Vec<Result<&Path, &TarLower>> = match self {
            Below::Dirs(d) => d.iter().map(|p| Ok(p.as_path())).collect(),
            Below::Stack(s) => s
                .iter()
                .map(|l| match l {
                    Lower::Dir(p) => Ok(p.as_path()),
                    Lower::Tar(t) => Err(t),
                })
                .collect(),
        };
        for l in stack {
            match l {
                Ok(dir) => match dir_lower(dir) {
                    Ok(found) => return found,
                    Err(true) => return None,
                    Err(false) => continue,
                },
                Err(t) => {
                    let bytes = |p: &Path| p.as_os_str().as_bytes().to_vec();
                    if t.whiteouts.contains(rel)
                        || ancestors.iter().any(|a| {
                            t.whiteouts.contains(&bytes(a))
                                || t.entries
                                    .get(&bytes(a))
                                    .is_some_and(|e| e.mode & libc::S_IFMT != libc::S_IFDIR)
                        })
                    {
                        return None;
                    }
                    if let Some(e) = t.entries.get(rel) {
                        return Some(Held::Tar(t, e));
                    }
                    if ancestors.iter().any(|a| t.opaque.contains(&bytes(a))) {
                        return None;
                    }
                }
            }
        }
        None
    }

    /// What the directory at `rel` was below the step: (mode, uid, gid).
    fn dir(&self, rel: &[u8]) -> Option<(u32, u32, u32)> {
        match self.find(rel)? {
            Held::Dir(p) => {
                let m = fs::symlink_metadata(p).ok()?;
                m.is_dir().then(|| (m.mode(), m.uid(), m.gid()))
            }
            Held::Tar(_, e) => {
                (e.mode & libc::S_IFMT == libc::S_IFDIR).then_some((e.mode, e.uid, e.gid))
            }
        }
    }

    /// Whether the entry at `upper` is exactly what was below it at
    /// `rel`: type, mode, owner, extended attributes, and for a file its
    /// bytes, for a symlink its target (a `chown -R` to the owner a tree
    /// already has copies every file up, unchanged). Directories compare
    /// without their content.
    fn unchanged(&self, rel: &[u8], upper: &Path, md: &fs::Metadata) -> bool {
        let (mode, uid, gid) = (md.mode(), md.uid(), md.gid());
        match self.find(rel) {
            None => false,
            Some(Held::Dir(low)) => {
                let Ok(lm) = fs::symlink_metadata(&low) else {
                    return false;
                };
                if lm.mode() != mode || lm.uid() != uid || lm.gid() != gid {
                    return false;
                }
                if xattrs(&low) != xattrs(upper) {
                    return false;
                }
                if md.is_dir() {
                    true
                } else if md.file_type().is_symlink() {
                    fs::read_link(&low).ok() == fs::read_link(upper).ok()
                } else {
                    md.is_file()
                        && lm.len() == md.len()
                        && File::open(&low)
                            .and_then(|f| same_bytes(f, upper))
                            .unwrap_or(false)
                }
            }
            Some(Held::Tar(t, e)) => {
                if e.mode != mode || e.uid != uid || e.gid != gid || e.xattrs != xattrs(upper) {
                    return false;
                }
                if md.is_dir() {
                    true
                } else if md.file_type().is_symlink() {
                    fs::read_link(upper).is_ok_and(|l| l.as_os_str().as_bytes() == e.link)
                } else {
                    md.is_file()
                        && e.size == md.len()
                        && File::open(&t.path)
                            .and_then(|mut f| {
                                io::Seek::seek(&mut f, io::SeekFrom::Start(e.offset))?;
                                same_bytes(f.take(e.size), upper)
                            })
                            .unwrap_or(false)
                }
            }
        }
    }
}

fn same_bytes(mut fa: impl Read, b: &Path) -> io::Result<bool> {
    let mut fb = File::open(b)?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(fb.read(&mut bb[..1])? == 0);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}

/// Writes `upper` as a layer tar at `out`.
pub fn capture(
    upper: &Path,
    lowers: &[PathBuf],
    mountpoints: &[String],
    out: &Path,
    timestamp: u64,
    reproducible: bool,
) -> io::Result<()> {
    // Walk iteratively; collect (archive path, what, metadata).
    let below = Below::Dirs(lowers);
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
                    opaque: is_opaque(&p) && below.dir(&key).is_some(),
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
    write(
        upper,
        found,
        mountpoints,
        &below,
        out,
        timestamp,
        reproducible,
    )
}

/// Writes what was found under `root` as a layer tar at `out`, leaving out
/// the mount points the sandbox made where nothing is left in them, and
/// what the step left exactly as it was below (copied up, unchanged).
pub fn write(
    root: &Path,
    mut found: Changes,
    mountpoints: &[String],
    below: &Below<'_>,
    out: &Path,
    timestamp: u64,
    reproducible: bool,
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
    // Files and symlinks the step left as they were below (outside any
    // directory it replaced): dropped.
    let replaced: Vec<Vec<u8>> = found
        .iter()
        .filter(|(_, (w, _))| matches!(w, Found::Dir { opaque: true }))
        .map(|(k, _)| {
            let mut p = k.clone();
            p.push(b'/');
            p
        })
        .collect();
    let same: Vec<Vec<u8>> = found
        .iter()
        .filter(|(k, (w, md))| {
            matches!(w, Found::File | Found::Symlink(_))
                && !replaced.iter().any(|r| k.starts_with(r))
                && md
                    .as_ref()
                    .is_some_and(|md| below.unchanged(k, &upper.join(OsStr::from_bytes(k)), md))
        })
        .map(|(k, _)| k.clone())
        .collect();
    for k in same {
        found.remove(&k);
    }
    // Directories that are there only because something under them was
    // made and then left out (a mount point, an unchanged copy-up),
    // unchanged from below: dropped, deepest first.
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
        let same = match found.get(&d) {
            Some((_, Some(md))) => below.unchanged(&d, &upper.join(OsStr::from_bytes(&d)), md),
            _ => false,
        };
        if !busy && same {
            found.remove(&d);
        }
    }
    if reproducible {
        let done = super::reproducible::apply(&mut found, &|p| below.find(p).is_some());
        let mut text = done.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        fs::write(out.with_extension("normalized"), text)?;
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
            Found::Empty => {
                tar::write_ustar_pax(
                    &mut w,
                    &h(name, Kind::File, mode, 0, b"", ids),
                    &xattrs(&src),
                )?;
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
