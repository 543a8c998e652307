//! Writes a RUN step's upper directory as its layer: a deterministic tar
//! (entries sorted by path; numeric owners as the command left them, no
//! user or group names; modes as left; mtimes clamped to the build
//! timestamp, as BuildKit's rewrite-timestamp does; extended attributes
//! kept except overlay's own). Overlay's whiteouts (0/0 character devices)
//! become `.wh.NAME` entries; an opaque directory gets `.wh..wh..opq` only
//! where a lower layer had that directory (overlay marks brand-new
//! directories opaque too). Mount points the sandbox made, still empty,
//! are left out.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
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
    /// Each entry's metadata and the offset of its bytes.
    entries: HashMap<Vec<u8>, (Meta, u64)>,
    /// Paths a `.wh.` entry deletes, and directories marked opaque.
    whiteouts: HashSet<Vec<u8>>,
    opaque: HashSet<Vec<u8>>,
}

/// What is compared of an entry: type and mode bits (`st_mode`), owner,
/// size (files only), link target, extended attributes.
#[derive(Clone, PartialEq, Eq)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    link: Vec<u8>,
    xattrs: Vec<(String, Vec<u8>)>,
}

impl Meta {
    fn of(path: &Path, md: &fs::Metadata) -> Meta {
        let link = if md.file_type().is_symlink() {
            fs::read_link(path).map_or_else(|_| Vec::new(), |l| l.into_os_string().into_vec())
        } else {
            Vec::new()
        };
        Meta {
            mode: md.mode(),
            uid: md.uid(),
            gid: md.gid(),
            size: if md.is_file() { md.len() } else { 0 },
            link,
            xattrs: xattrs(path),
        }
    }
}

impl TarLower {
    /// Reads the index of a layer tar kiln captured (uncompressed).
    pub fn open(path: &Path) -> io::Result<TarLower> {
        use crate::layer::scan::{marker, Marker};
        let mut ar = ::tar::Archive::new(File::open(path)?);
        let mut t = TarLower {
            path: path.to_path_buf(),
            entries: HashMap::new(),
            whiteouts: HashSet::new(),
            opaque: HashSet::new(),
        };
        for e in ar.entries_with_seek()? {
            let mut e = e?;
            let name = crate::dockerfile::ignore::clean(&e.path_bytes());
            match marker(&name) {
                Some(Marker::Opaque(dir)) => {
                    t.opaque.insert(dir);
                    continue;
                }
                Some(Marker::Whiteout(p)) => {
                    t.whiteouts.insert(p);
                    continue;
                }
                None => {}
            }
            let h = e.header().clone();
            let kind = match h.entry_type() {
                ::tar::EntryType::Directory => libc::S_IFDIR,
                ::tar::EntryType::Symlink => libc::S_IFLNK,
                ::tar::EntryType::Regular => libc::S_IFREG,
                // Hard links and others: never taken as unchanged.
                _ => 0,
            };
            let mut xattrs: Vec<(String, Vec<u8>)> = e
                .pax_extensions()
                .ok()
                .flatten()
                .into_iter()
                .flatten()
                .filter_map(Result::ok)
                .filter_map(|x| {
                    let k = x.key().ok()?;
                    k.starts_with("SCHILY.xattr.")
                        .then(|| (k.to_string(), x.value_bytes().to_vec()))
                })
                .collect();
            xattrs.sort();
            let meta = Meta {
                mode: kind | (h.mode()? & 0o7777),
                uid: h.uid()? as u32,
                gid: h.gid()? as u32,
                size: if kind == libc::S_IFREG { e.size() } else { 0 },
                link: e.link_name_bytes().map(|l| l.to_vec()).unwrap_or_default(),
                xattrs,
            };
            t.entries.insert(name, (meta, e.raw_file_position()));
        }
        Ok(t)
    }
}

/// Where a lower holds an entry.
enum Held<'a> {
    Dir(PathBuf),
    Tar(&'a TarLower, &'a (Meta, u64)),
}

impl Held<'_> {
    fn meta(&self) -> Option<Meta> {
        match self {
            Held::Dir(p) => fs::symlink_metadata(p).ok().map(|m| Meta::of(p, &m)),
            Held::Tar(_, (m, _)) => Some(m.clone()),
        }
    }

    fn open(&self) -> io::Result<Box<dyn Read + '_>> {
        match self {
            Held::Dir(p) => Ok(Box::new(File::open(p)?)),
            Held::Tar(t, (m, offset)) => {
                let mut f = File::open(&t.path)?;
                io::Seek::seek(&mut f, io::SeekFrom::Start(*offset))?;
                Ok(Box::new(f.take(m.size)))
            }
        }
    }
}

impl Lower {
    /// Unpacked directories as lowers.
    pub fn dirs(dirs: &[PathBuf]) -> Vec<Lower> {
        dirs.iter().cloned().map(Lower::Dir).collect()
    }

    /// Whether this layer has an entry or a whiteout at `rel`.
    fn has(&self, rel: &[u8]) -> bool {
        match self {
            Lower::Dir(d) => fs::symlink_metadata(d.join(OsStr::from_bytes(rel))).is_ok(),
            Lower::Tar(t) => t.entries.contains_key(rel) || t.whiteouts.contains(rel),
        }
    }

    /// Whether this layer hides what deeper layers hold under `ancestors`:
    /// one of them is not a directory here (a whiteout, a file) or is an
    /// opaque directory.
    fn hides(&self, ancestors: &[&[u8]]) -> bool {
        ancestors.iter().any(|a| match self {
            Lower::Dir(d) => {
                let p = d.join(OsStr::from_bytes(a));
                match fs::symlink_metadata(&p) {
                    Ok(m) => !m.is_dir() || is_opaque(&p),
                    Err(_) => false,
                }
            }
            Lower::Tar(t) => {
                t.whiteouts.contains(*a)
                    || t.opaque.contains(*a)
                    || t.entries
                        .get(*a)
                        .is_some_and(|(m, _)| m.mode & libc::S_IFMT != libc::S_IFDIR)
            }
        })
    }

    /// This layer's entry at `rel` (none for a whiteout).
    fn get(&self, rel: &[u8]) -> Option<Held<'_>> {
        match self {
            Lower::Dir(d) => {
                let p = d.join(OsStr::from_bytes(rel));
                let m = fs::symlink_metadata(&p).ok()?;
                let whiteout = m.file_type().is_char_device() && m.rdev() == 0;
                (!whiteout).then_some(Held::Dir(p))
            }
            Lower::Tar(t) => t.entries.get(rel).map(|e| Held::Tar(t, e)),
        }
    }
}

/// What the step's root held below it (its lowers, topmost first, as
/// overlay takes them), to tell what a step left as it was.
pub struct Below<'a>(pub &'a [Lower]);

impl Below<'_> {
    /// The entry the step's root showed at `rel` before the step, if any:
    /// the topmost layer's that has one, unless a layer above it hides it
    /// (a whiteout, a file or an opaque directory on the way). Most paths
    /// a step makes are in no layer: one lookup per layer.
    fn find(&self, rel: &[u8]) -> Option<Held<'_>> {
        let i = self.0.iter().position(|l| l.has(rel))?;
        let ancestors: Vec<&[u8]> = rel
            .iter()
            .enumerate()
            .filter(|&(_, &c)| c == b'/')
            .map(|(n, _)| &rel[..n])
            .collect();
        if self.0[..i].iter().any(|l| l.hides(&ancestors)) {
            return None;
        }
        self.0[i].get(rel)
    }

    /// Whether a directory was at `rel` below the step.
    fn is_dir(&self, rel: &[u8]) -> bool {
        self.find(rel)
            .and_then(|h| h.meta())
            .is_some_and(|m| m.mode & libc::S_IFMT == libc::S_IFDIR)
    }

    /// Whether the entry at `upper` is exactly what was below it at
    /// `rel`: type, mode, owner, extended attributes, and for a file its
    /// bytes, for a symlink its target (a `chown -R` to the owner a tree
    /// already has copies every file up, unchanged). Directories compare
    /// without their content.
    fn unchanged(&self, rel: &[u8], upper: &Path, md: &fs::Metadata) -> bool {
        let Some(held) = self.find(rel) else {
            return false;
        };
        if held.meta() != Some(Meta::of(upper, md)) {
            return false;
        }
        !md.is_file()
            || held
                .open()
                .and_then(|r| same_bytes(r, upper))
                .unwrap_or(false)
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
    let lowers = Lower::dirs(lowers);
    let below = Below(&lowers);
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
                    opaque: is_opaque(&p) && below.is_dir(&key),
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
