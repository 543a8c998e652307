//! COPY and ADD with Docker's semantics, planned into a layer's entries:
//! multiple sources, wildcards, trailing-slash destinations, directory
//! contents (not the directory itself), `--chown`, `--chmod`, heredocs,
//! `.dockerignore`, and ADD's extraction of local tar archives.
//!
//! Planning reads metadata only; file bytes are read later, once, by the
//! layer writer (archives given to ADD are the exception: they are unpacked
//! into a spool directory so the layer can be written in sorted order).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::context::{Context, ModePolicy, Source};
use crate::dockerfile::ignore::{clean, has_magic, Glob, Ignore};
use crate::layer::{Content, Entries, FileSource, LayerEntry};

use super::fs::ImageFs;

/// The build context as COPY sees it: files, symlinks and directories, less
/// what `.dockerignore` excludes.
pub struct ContextView<'a> {
    pub ctx: &'a Context,
    ignore: Ignore,
    /// Every directory, including those only implied by the files under them.
    dirs: BTreeMap<Vec<u8>, u32>,
}

impl<'a> ContextView<'a> {
    pub fn new(ctx: &'a Context) -> ContextView<'a> {
        let ignore = match fs::read(ctx.image_dir.join(".dockerignore")) {
            Ok(text) => Ignore::parse(&text),
            Err(_) => Ignore::default(),
        };
        let mut dirs = ctx.dirs.clone();
        for path in ctx.entries.keys() {
            let mut p = &path[..];
            while let Some(i) = p.iter().rposition(|&c| c == b'/') {
                p = &p[..i];
                dirs.entry(p.to_vec()).or_insert(0o755);
            }
        }
        ContextView { ctx, ignore, dirs }
    }

    fn visible(&self, path: &[u8]) -> bool {
        self.ignore.is_empty() || !self.ignore.is_ignored(path)
    }

    fn is_dir(&self, path: &[u8]) -> bool {
        path.is_empty() || self.dirs.contains_key(path)
    }

    /// Everything strictly under `dir`, as (relative path, what it is).
    fn descendants(&self, dir: &[u8]) -> Vec<(Vec<u8>, Item<'a>)> {
        let mut prefix = dir.to_vec();
        if !prefix.is_empty() {
            prefix.push(b'/');
        }
        let mut out = Vec::new();
        for (p, m) in self.dirs.range(prefix.clone()..) {
            if !p.starts_with(&prefix) {
                break;
            }
            if self.visible(p) {
                out.push((p[prefix.len()..].to_vec(), Item::Dir(*m)));
            }
        }
        for (p, e) in self.ctx.entries.range(prefix.clone()..) {
            if !p.starts_with(&prefix) {
                break;
            }
            if self.visible(p) {
                out.push((p[prefix.len()..].to_vec(), Item::Entry(e)));
            }
        }
        out
    }

    /// All paths matching a wildcard pattern.
    fn glob(&self, pattern: &[u8]) -> Vec<Vec<u8>> {
        let glob = Glob::new(pattern);
        let mut out: Vec<Vec<u8>> = self
            .dirs
            .keys()
            .chain(self.ctx.entries.keys())
            .filter(|p| self.visible(p) && glob.matches(p))
            .cloned()
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

enum Item<'a> {
    Dir(u32),
    Entry(&'a crate::context::Entry),
    /// A file, symlink or directory of another stage or image.
    Image(&'a LayerEntry),
}

/// Where COPY reads from: the build context, or (`--from`) another
/// stage's or image's filesystem.
#[derive(Clone, Copy)]
pub enum Tree<'a> {
    Context(&'a ContextView<'a>),
    Image(&'a ImageFs, &'a str),
}

impl<'a> Tree<'a> {
    fn is_dir(&self, p: &[u8]) -> bool {
        match self {
            Tree::Context(v) => v.is_dir(p),
            Tree::Image(fs, _) => fs.is_dir(p),
        }
    }

    fn glob(&self, pattern: &[u8]) -> Vec<Vec<u8>> {
        match self {
            Tree::Context(v) => v.glob(pattern),
            Tree::Image(fs, _) => {
                let glob = Glob::new(pattern);
                fs.nodes
                    .keys()
                    .filter(|p| glob.matches(p))
                    .cloned()
                    .collect()
            }
        }
    }

    fn descendants(&self, dir: &[u8]) -> Vec<(Vec<u8>, Item<'a>)> {
        match self {
            Tree::Context(v) => v.descendants(dir),
            Tree::Image(fs, _) => {
                let mut prefix = dir.to_vec();
                if !prefix.is_empty() {
                    prefix.push(b'/');
                }
                fs.nodes
                    .range(prefix.clone()..)
                    .take_while(|(p, _)| p.starts_with(&prefix))
                    .map(|(p, e)| (p[prefix.len()..].to_vec(), Item::Image(e)))
                    .collect()
            }
        }
    }

    fn item(&self, p: &[u8]) -> Option<Item<'a>> {
        match self {
            Tree::Context(v) => v.ctx.entries.get(p).map(Item::Entry),
            Tree::Image(fs, _) => fs.nodes.get(p).map(Item::Image),
        }
    }
}

/// A planned COPY layer, and the files of it whose bytes must first be
/// read out of base layer blobs: (layer path, path in the source image).
pub struct PlannedCopy {
    pub layer: Entries,
    pub pending: Vec<(Vec<u8>, Vec<u8>)>,
}

/// COPY/ADD flags that shape the entries.
#[derive(Clone, Debug, Default)]
pub struct CopyOptions {
    pub chown: Option<(u64, u64)>,
    pub chmod: Option<u32>,
    pub policy: ModePolicy,
    pub add: bool,
}

/// One source after expansion.
pub enum Src {
    Path(String),
    Bytes { name: String, content: Vec<u8> },
}

/// Joins `dest` to `workdir` and cleans it; returns the path without the
/// leading slash and whether it names a directory (trailing slash).
pub fn resolve_dest(workdir: &str, dest: &str) -> (Vec<u8>, bool) {
    let is_dir = dest.ends_with('/') || dest == "." || dest.ends_with("/.") || dest.is_empty();
    let joined = if dest.starts_with('/') {
        dest.to_string()
    } else {
        format!("{workdir}/{dest}")
    };
    (clean(joined.as_bytes()), is_dir)
}

/// Cleans a context-relative source; `None` if it climbs out of the context.
fn clean_source(p: &str) -> Option<Vec<u8>> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in p.as_bytes().split(|&c| c == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop()?;
            }
            c => out.push(c),
        }
    }
    Some(out.join(&b'/'))
}

fn join(a: &[u8], b: &[u8]) -> Vec<u8> {
    if a.is_empty() {
        return b.to_vec();
    }
    if b.is_empty() {
        return a.to_vec();
    }
    let mut out = a.to_vec();
    out.push(b'/');
    out.extend_from_slice(b);
    out
}

fn basename(p: &[u8]) -> &[u8] {
    p.rsplit(|&c| c == b'/').next().unwrap_or(p)
}

fn lossy(p: &[u8]) -> String {
    String::from_utf8_lossy(p).into_owned()
}

/// Plans the entries of one COPY/ADD layer.
pub fn plan(
    tree: Tree<'_>,
    image: &ImageFs,
    sources: &[Src],
    dest: (&[u8], bool),
    opts: &CopyOptions,
    spool: &Path,
) -> Result<PlannedCopy, String> {
    let (dest_path, dest_slash) = dest;
    let uid_gid = opts.chown.unwrap_or((0, 0));
    // Resolve sources to context paths.
    let mut resolved: Vec<ResolvedSrc> = Vec::new();
    for src in sources {
        match src {
            Src::Bytes { name, content } => {
                resolved.push(ResolvedSrc::Bytes(name.clone(), content.clone()))
            }
            Src::Path(s) => {
                if opts.add && is_url(s) {
                    return Err(format!("{s}: kiln never downloads; fetch the file into the source tree and ADD or COPY it from there"));
                }
                let clean = clean_source(s.trim_start_matches('/'))
                    .ok_or_else(|| format!("{s}: source path is outside the build context"))?;
                let view = match tree {
                    Tree::Context(view) => view,
                    Tree::Image(fs, from) => {
                        if has_magic(&clean) {
                            resolved.extend(tree.glob(&clean).into_iter().map(ResolvedSrc::Path));
                            continue;
                        }
                        // A source named directly is followed through symlinks, as Docker does.
                        let real = fs.resolve(&clean);
                        if !fs.is_dir(&real) && !fs.nodes.contains_key(&real) {
                            return Err(format!("{s}: not found in {from}"));
                        }
                        resolved.push(ResolvedSrc::Path(real));
                        continue;
                    }
                };
                if has_magic(&clean) {
                    let hits = view.glob(&clean);
                    resolved.extend(hits.into_iter().map(ResolvedSrc::Path));
                } else if view.is_dir(&clean)
                    || (view.ctx.entries.contains_key(&clean) && view.visible(&clean))
                {
                    if !clean.is_empty() && !view.visible(&clean) {
                        return Err(format!(
                            "{s}: not found in build context (excluded by .dockerignore)"
                        ));
                    }
                    resolved.push(ResolvedSrc::Path(clean));
                } else if view.ctx.entries.contains_key(&clean) {
                    return Err(format!(
                        "{s}: not found in build context (excluded by .dockerignore)"
                    ));
                } else {
                    return Err(format!(
                        "{s}: not found in build context; the context is the image directory plus `# %include`d paths under topsrcdir/"
                    ));
                }
            }
        }
    }
    if resolved.is_empty() {
        return Err("no source files were specified (the wildcards matched nothing)".into());
    }
    let dest_is_dir = dest_slash || image.is_dir(dest_path);
    if resolved.len() > 1 && !dest_is_dir {
        return Err("when using COPY with more than one source file, the destination must be a directory and end with a /".into());
    }
    let mut layer = Entries::new();
    let mut pending = Vec::new();
    for r in resolved {
        match r {
            ResolvedSrc::Bytes(name, content) => {
                let target = if dest_is_dir {
                    join(dest_path, name.as_bytes())
                } else {
                    dest_path.to_vec()
                };
                let size = content.len() as u64;
                layer.insert(
                    target,
                    LayerEntry::file(
                        FileSource::Bytes(Arc::from(content)),
                        size,
                        opts.chmod.unwrap_or(0o644),
                        uid_gid.0,
                        uid_gid.1,
                    ),
                );
            }
            ResolvedSrc::Path(p) if tree.is_dir(&p) => {
                for (rel, item) in tree.descendants(&p) {
                    let target = join(dest_path, &rel);
                    let entry = match item {
                        Item::Dir(mode) => LayerEntry::dir(
                            opts.chmod.unwrap_or(opts.policy.dir(mode)),
                            uid_gid.0,
                            uid_gid.1,
                        ),
                        Item::Entry(e) => entry_for(e, opts, uid_gid, &join(&p, &rel), false)?,
                        Item::Image(e) => {
                            let src = join(&p, &rel);
                            image_entry(tree, e, &src, &target, opts, uid_gid, &mut pending)
                        }
                    };
                    layer.insert(target, entry);
                }
                if !dest_path.is_empty() && !layer.contains_key(dest_path) {
                    // The destination directory itself.
                    let e = match image.nodes.get(dest_path) {
                        Some(existing) if existing.is_dir() => existing.clone(),
                        _ => LayerEntry::dir(0o755, uid_gid.0, uid_gid.1),
                    };
                    layer.insert(dest_path.to_vec(), e);
                }
            }
            ResolvedSrc::Path(p) => {
                let target = if dest_is_dir {
                    join(dest_path, basename(&p))
                } else {
                    dest_path.to_vec()
                };
                let e = match tree.item(&p) {
                    Some(Item::Entry(e)) => e,
                    Some(Item::Image(e)) => {
                        let entry = image_entry(tree, e, &p, &target, opts, uid_gid, &mut pending);
                        layer.insert(target, entry);
                        continue;
                    }
                    _ => return Err(format!("{}: not found", lossy(&p))),
                };
                if opts.add {
                    if let Some(path) = archive_path(e) {
                        if let Some(kind) = detect_archive(&path)
                            .map_err(|err| format!("{}: {err}", path.display()))?
                        {
                            extract(&path, kind, dest_path, opts, image, spool, &mut layer)?;
                            continue;
                        }
                    }
                }
                layer.insert(target, entry_for(e, opts, uid_gid, &p, true)?);
            }
        }
    }
    add_parents(&mut layer, image, uid_gid);
    Ok(PlannedCopy { layer, pending })
}

/// The entry for a file, symlink or directory of another stage or image:
/// its mode is kept (or `--chmod`), its owner is root (or `--chown`), as
/// Docker does. Files still inside a base layer are noted in `pending`.
fn image_entry(
    tree: Tree<'_>,
    e: &LayerEntry,
    src: &[u8],
    target: &[u8],
    opts: &CopyOptions,
    (uid, gid): (u64, u64),
    pending: &mut Vec<(Vec<u8>, Vec<u8>)>,
) -> LayerEntry {
    let mut out = e.clone();
    out.uid = uid;
    out.gid = gid;
    if !matches!(out.content, Content::Symlink(_)) {
        if let Some(m) = opts.chmod {
            out.mode = m;
        }
    }
    if let Tree::Image(fs, _) = tree {
        if fs.origins.contains_key(src) {
            pending.push((target.to_vec(), src.to_vec()));
        }
    }
    out
}

enum ResolvedSrc {
    Path(Vec<u8>),
    Bytes(String, Vec<u8>),
}

fn is_url(s: &str) -> bool {
    s.starts_with("http://")
        || s.starts_with("https://")
        || s.starts_with("git@")
        || s.starts_with("git://")
}

/// The entry for one context file. A source named directly that is a
/// symlink is followed (as Docker does); symlinks inside a copied directory
/// stay symlinks.
fn entry_for(
    e: &crate::context::Entry,
    opts: &CopyOptions,
    (uid, gid): (u64, u64),
    name: &[u8],
    top: bool,
) -> Result<LayerEntry, String> {
    let file = |path: Arc<Path>| -> Result<LayerEntry, String> {
        if e.mode & 0o6000 != 0 && opts.chmod.is_none() {
            return Err(format!(
                "{}: has the setuid or setgid bit; kiln refuses to copy it unless --chmod sets the mode explicitly",
                lossy(name)
            ));
        }
        Ok(LayerEntry::file(
            FileSource::Path(path),
            e.size,
            opts.chmod.unwrap_or(opts.policy.file(e.mode)),
            uid,
            gid,
        ))
    };
    match &e.source {
        Source::File(path) => file(path.clone()),
        Source::Bytes(b) => Ok(LayerEntry::file(
            FileSource::Bytes(b.clone()),
            b.len() as u64,
            opts.chmod.unwrap_or(0o644),
            uid,
            gid,
        )),
        Source::Symlink { path, target } => {
            if top {
                if e.resolves_to_file {
                    return file(Arc::from(path.as_path()));
                }
                if e.escapes {
                    return Err(format!(
                        "{}: is a symlink to {} outside the build context; kiln never follows links out of it",
                        lossy(name),
                        target.display()
                    ));
                }
                return Err(format!(
                    "{}: is a symlink to {} which is not a regular file; name the target instead",
                    lossy(name),
                    target.display()
                ));
            }
            Ok(LayerEntry {
                content: Content::Symlink(target.as_os_str().as_bytes().to_vec()),
                mode: 0o777,
                uid,
                gid,
            })
        }
    }
}

/// Adds every missing parent directory: existing ones with their metadata
/// from earlier layers, new ones 0755 owned by the `--chown` user.
fn add_parents(layer: &mut Entries, image: &ImageFs, (uid, gid): (u64, u64)) {
    let mut missing = Vec::new();
    for p in layer.keys() {
        for cur in parents(p) {
            if layer.contains_key(cur) {
                break;
            }
            missing.push(cur.to_vec());
        }
    }
    for m in missing {
        let e = match image.nodes.get(&m) {
            Some(existing) if existing.is_dir() => existing.clone(),
            _ => LayerEntry::dir(0o755, uid, gid),
        };
        layer.entry(m).or_insert(e);
    }
}

/// The parent directories of `path` that get layer entries of their own,
/// deepest first: those no longer than
/// [`crate::limits::MAX_EXPLICIT_PARENT`]. Deeper ones are left implied
/// (every extractor creates a missing parent 0755), which keeps a path of
/// 64,000 components linear instead of 64,000 entries of ever longer names.
pub(super) fn parents(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    let max = crate::limits::MAX_EXPLICIT_PARENT;
    // The deepest parent within the limit: a cut at a '/' at most `max` in.
    let mut cur = if path.len() > max {
        let window = &path[..=max];
        window.iter().rposition(|&c| c == b'/').map(|i| &path[..i])
    } else {
        path.iter().rposition(|&c| c == b'/').map(|i| &path[..i])
    };
    std::iter::from_fn(move || {
        let here = cur?;
        cur = here.iter().rposition(|&c| c == b'/').map(|i| &here[..i]);
        Some(here)
    })
    .filter(|p| !p.is_empty())
}

fn archive_path(e: &crate::context::Entry) -> Option<PathBuf> {
    match &e.source {
        Source::File(p) => Some(p.to_path_buf()),
        Source::Symlink { path, .. } if e.resolves_to_file => Some(path.clone()),
        _ => None,
    }
}

/// Compression of a local archive ADD extracts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArchiveKind {
    Tar,
    Gzip,
    Bzip2,
    Xz,
    Zstd,
}

fn open_decoder(path: &Path, kind: ArchiveKind) -> io::Result<Box<dyn Read>> {
    use crate::limits::guarded;
    let f = BufReader::new(File::open(path)?);
    let what = path.display().to_string();
    Ok(match kind {
        ArchiveKind::Tar => Box::new(f),
        ArchiveKind::Gzip => Box::new(guarded(f, &what, |c| {
            Ok(flate2::read::MultiGzDecoder::new(c))
        })?),
        ArchiveKind::Bzip2 => Box::new(guarded(f, &what, |c| {
            Ok(bzip2::read::MultiBzDecoder::new(c))
        })?),
        ArchiveKind::Xz => Box::new(guarded(f, &what, |c| {
            Ok(xz2::read::XzDecoder::new_multi_decoder(c))
        })?),
        ArchiveKind::Zstd => Box::new(guarded(f, &what, zstd::stream::read::Decoder::new)?),
    })
}

/// Whether a file is a (possibly compressed) tar archive, as Docker decides:
/// by the compression magic, then a valid tar header.
pub fn detect_archive(path: &Path) -> io::Result<Option<ArchiveKind>> {
    let mut head = [0u8; 6];
    let n = File::open(path)?.read(&mut head)?;
    let head = &head[..n];
    // The layer codecs by the one sniffer; ADD also takes bzip2 and xz.
    let kind = match crate::source::sniff(head) {
        crate::image::Codec::Gzip => ArchiveKind::Gzip,
        crate::image::Codec::Zstd => ArchiveKind::Zstd,
        _ if head.starts_with(b"BZh") => ArchiveKind::Bzip2,
        _ if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) => ArchiveKind::Xz,
        _ => ArchiveKind::Tar,
    };
    let mut block = [0u8; 512];
    let mut r = match open_decoder(path, kind) {
        Ok(r) => r,
        Err(_) => return Ok(None),
    };
    let mut got = 0;
    while got < 512 {
        match r.read(&mut block[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(_) => return Ok(None),
        }
    }
    if got < 512 {
        return Ok(None);
    }
    let stored: Option<u32> = std::str::from_utf8(&block[148..156])
        .ok()
        .and_then(|s| u32::from_str_radix(s.trim_matches(|c: char| c == '\0' || c == ' '), 8).ok());
    let mut sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
    sum = sum - block[148..156].iter().map(|&b| u32::from(b)).sum::<u32>() + 8 * u32::from(b' ');
    Ok((stored == Some(sum)).then_some(kind))
}

/// Extracts a local archive into the layer under `dest`, spooling file
/// contents to `spool` so the layer can be written in sorted order.
fn extract(
    path: &Path,
    kind: ArchiveKind,
    dest: &[u8],
    opts: &CopyOptions,
    image: &ImageFs,
    spool: &Path,
    layer: &mut Entries,
) -> Result<(), String> {
    let err = |e: io::Error| format!("extracting {}: {e}", path.display());
    fs::create_dir_all(spool).map_err(err)?;
    let mut ar = tar::Archive::new(open_decoder(path, kind).map_err(err)?);
    let mut spooled: BTreeMap<Vec<u8>, PathBuf> = BTreeMap::new();
    for (i, entry) in ar.entries().map_err(err)?.enumerate() {
        let mut entry = entry.map_err(err)?;
        let raw = entry.path_bytes().into_owned();
        let rel = clean_source(&String::from_utf8_lossy(&raw).replace('\\', "/"))
            .filter(|_| !raw.split(|&c| c == b'/').any(|c| c == b".."))
            .ok_or_else(|| {
                format!(
                    "{}: archive entry {} points outside the destination; refusing to extract it",
                    path.display(),
                    lossy(&raw)
                )
            })?;
        if rel.is_empty() {
            continue;
        }
        let h = entry.header();
        let mode = h.mode().map_err(err)? & 0o7777;
        let (uid, gid) = match opts.chown {
            Some(ids) => ids,
            // An all-NUL id field reads as 0, as Go's archive/tar (and so Docker) reads it.
            None => (h.uid().unwrap_or(0), h.gid().unwrap_or(0)),
        };
        let target = join(dest, &rel);
        let et = h.entry_type();
        let e = if et.is_dir() {
            LayerEntry::dir(mode, uid, gid)
        } else if et.is_symlink() {
            let link = entry
                .link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default();
            LayerEntry {
                content: Content::Symlink(link),
                mode: 0o777,
                uid,
                gid,
            }
        } else if et.is_hard_link() {
            let link = entry
                .link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default();
            let link = clean_source(&String::from_utf8_lossy(&link)).unwrap_or_default();
            let Some(first) = spooled.get(&link) else {
                return Err(format!(
                    "{}: hard link {} points to {} which is not earlier in the archive",
                    path.display(),
                    lossy(&raw),
                    lossy(&link)
                ));
            };
            let file = spool.join(format!("{i}"));
            fs::hard_link(first, &file).map_err(err)?;
            let size = fs::metadata(&file).map_err(err)?.len();
            LayerEntry::file(FileSource::Path(Arc::from(file)), size, mode, uid, gid)
        } else if et.is_file() || et == tar::EntryType::Continuous {
            let file = spool.join(format!("{i}"));
            let mut out = File::create(&file).map_err(err)?;
            let size = io::copy(&mut entry, &mut out).map_err(err)?;
            spooled.insert(rel.clone(), file.clone());
            LayerEntry::file(FileSource::Path(Arc::from(file)), size, mode, uid, gid)
        } else {
            // Devices, FIFOs, PAX globals and the like are not extracted.
            continue;
        };
        layer.insert(target, e);
    }
    if !dest.is_empty() && !layer.contains_key(dest) {
        let e = match image.nodes.get(dest) {
            Some(existing) if existing.is_dir() => existing.clone(),
            _ => LayerEntry::dir(
                0o755,
                opts.chown.map_or(0, |c| c.0),
                opts.chown.map_or(0, |c| c.1),
            ),
        };
        layer.insert(dest.to_vec(), e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dest_resolution_follows_workdir_and_slashes() {
        assert_eq!(resolve_dest("/", "app/"), (b"app".to_vec(), true));
        assert_eq!(resolve_dest("/srv", "x"), (b"srv/x".to_vec(), false));
        assert_eq!(resolve_dest("/srv", "/a/../b/"), (b"b".to_vec(), true));
        assert_eq!(resolve_dest("/srv", "."), (b"srv".to_vec(), true));
    }

    #[test]
    fn sources_cannot_climb_out() {
        assert_eq!(clean_source("a/../b"), Some(b"b".to_vec()));
        assert_eq!(clean_source("../x"), None);
        assert_eq!(clean_source("."), Some(vec![]));
    }
}
