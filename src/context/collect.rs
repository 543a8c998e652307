//! Collects a build context the way Taskcluster does: the image directory's
//! files, plus every `# %include` path of the source tree under `topsrcdir/`,
//! plus the Dockerfile rewritten by `# %ARG` substitution.
//!
//! Nothing is copied: the result is a sorted map from archive path to where
//! the bytes live (a file on disk, a symlink, or the rewritten Dockerfile in
//! memory). Hashing and layer writing read straight from those sources.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::listing::Listing;
use super::walk::{walk, Walker};
use super::Error;
use crate::progress::Step;

/// Files that `# %include-run-task` adds, and the lines it appends after itself.
pub const RUN_TASK_FILES: [&str; 4] = ["run-task", "fetch-content", "hgrc", "robustcheckout.py"];
const RUN_TASK_SNIPPET: [&str; 4] = [
    "COPY run-task/run-task /usr/local/bin/run-task\n",
    "COPY run-task/fetch-content /usr/local/bin/fetch-content\n",
    "COPY run-task/robustcheckout.py /usr/local/mercurial/robustcheckout.py\n",
    "COPY run-task/hgrc /etc/mercurial/hgrc.d/mozilla.rc\n",
];

/// How to collect a context.
#[derive(Clone, Debug, Default)]
pub struct ContextOptions {
    /// Root of the source tree that `# %include` paths are relative to.
    pub topsrcdir: PathBuf,
    /// Values for `# %ARG NAME` lines.
    pub args: BTreeMap<String, String>,
    /// taskgraph's `run-task/` directory, for `# %include-run-task`.
    pub run_task_dir: Option<PathBuf>,
    /// Name included files exactly as taskgraph does (`topsrcdir/` + the path
    /// as written, `./` and `..` kept) instead of the normalized path.
    pub taskgraph_names: bool,
    /// The Dockerfile, when it is not `<image dir>/Dockerfile` (`-f`).
    pub dockerfile: Option<PathBuf>,
    /// Take directory entries from the kernel in reverse order (the walk
    /// sorts, so nothing may change: `build --check-reproducible` checks).
    pub reverse_read_order: bool,
    /// Keep only what the kiln-v1 hash needs (`Context::listing`), not the
    /// entries a build reads: `kiln hash` of a huge tree in little memory.
    pub hash_only: bool,
    /// The Dockerfile as it is, with no `# %ARG` or `# %include` processing:
    /// a context taskgraph (or anyone) already assembled (a context tar).
    pub plain_dockerfile: bool,
}

/// Where the bytes of one context entry come from.
#[derive(Clone, Debug)]
pub enum Source {
    /// A regular file on disk (possibly reached through a symlink).
    File(Arc<Path>),
    /// A symbolic link on disk, kept as a link.
    Symlink { path: PathBuf, target: PathBuf },
    /// Bytes held in memory (the rewritten Dockerfile).
    Bytes(Arc<[u8]>),
}

/// One entry of the context.
#[derive(Clone, Debug)]
pub struct Entry {
    pub source: Source,
    /// Permission bits as on disk (for a symlink: of the file it points to,
    /// if any, which is what taskgraph stores when it follows the link).
    pub mode: u32,
    /// Size in bytes (for a symlink: of the file it points to, if any).
    pub size: u64,
    /// For a symlink: whether it resolves to a regular file.
    pub resolves_to_file: bool,
    /// For a symlink: whether it resolves to a directory.
    pub resolves_to_dir: bool,
    /// For a symlink: whether it resolves outside the source tree
    /// (topsrcdir; the image directory if it is not under topsrcdir).
    /// kiln never follows it.
    pub escapes: bool,
    /// The content's sha256, when the walk already computed it.
    pub digest: Option<[u8; 32]>,
    /// A regular file's mtime (ns) when it was collected: the build checks
    /// it again after writing the layers, so a file changed under the build
    /// can never give a layer other than what was hashed.
    pub mtime_ns: Option<i64>,
}

/// A collected build context.
#[derive(Clone, Debug)]
pub struct Context {
    /// The image directory (absolute).
    pub image_dir: PathBuf,
    /// The source tree root (absolute).
    pub topsrcdir: PathBuf,
    /// Archive path (no leading slash) → entry, sorted by path bytes.
    pub entries: BTreeMap<Vec<u8>, Entry>,
    /// Directories seen on disk, archive path → permission bits.
    pub dirs: BTreeMap<Vec<u8>, u32>,
    /// With `ContextOptions::hash_only`, the entries as the hash needs them
    /// (and `entries` stays empty).
    pub listing: Listing,
    /// The Dockerfile after `# %ARG` substitution and `# %include-run-task`.
    pub dockerfile: Arc<[u8]>,
    /// Maps lines of the rewritten Dockerfile (index) to 1-based lines of the original.
    pub line_map: Vec<usize>,
    /// The Dockerfile read (absolute).
    pub dockerfile_path: PathBuf,
}

impl Context {
    /// Collects the context of `image_dir`.
    pub fn collect(image_dir: &Path, opts: &ContextOptions) -> Result<Context, Error> {
        let step = Step::none();
        let walker = Walker {
            hash: false,
            cache: None,
            step: &step,
            reverse: opts.reverse_read_order,
            compact: false,
        };
        Context::collect_with(image_dir, opts, &walker)
    }

    /// Collects the context, letting `walker` hash files as they are found.
    pub fn collect_with(
        image_dir: &Path,
        opts: &ContextOptions,
        walker: &Walker<'_>,
    ) -> Result<Context, Error> {
        let image_dir = absolute(image_dir)?;
        let topsrcdir = absolute(&opts.topsrcdir)?;
        let dockerfile_path = match &opts.dockerfile {
            Some(_) if opts.taskgraph_names => {
                return Err(Error::DockerfileFlagWithTaskgraph {
                    dir: image_dir.clone(),
                })
            }
            Some(f) => {
                let f = absolute(f)?;
                if !f.is_file() {
                    return Err(Error::io(
                        &f,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "no such Dockerfile (-f)",
                        ),
                    ));
                }
                f
            }
            None => image_dir.join("Dockerfile"),
        };
        if !dockerfile_path.is_file() {
            return Err(Error::NoDockerfile { dir: image_dir });
        }
        let mut ctx = Context {
            image_dir: image_dir.clone(),
            topsrcdir: topsrcdir.clone(),
            entries: BTreeMap::new(),
            dirs: BTreeMap::new(),
            listing: Listing::default(),
            dockerfile: Arc::from(&b""[..]),
            line_map: Vec::new(),
            dockerfile_path: dockerfile_path.clone(),
        };
        // Links may point anywhere in the source tree, never out of it.
        let root = if image_dir.starts_with(&topsrcdir) {
            topsrcdir.clone()
        } else {
            image_dir.clone()
        };
        walk_into(&image_dir, b"", &mut ctx, walker, &root)?;

        let raw = fs::read(&dockerfile_path).map_err(|e| Error::io(&dockerfile_path, e))?;
        let text = String::from_utf8(raw).map_err(|_| Error::DockerfileNotUtf8 {
            path: dockerfile_path.clone(),
        })?;
        let text = universal_newlines(&text);
        let mut replace: Vec<(String, String)> = Vec::new();
        let mut content = String::with_capacity(text.len());
        let mut line_map = Vec::new();
        for (idx, raw_line) in split_lines_keep_ends(&text).into_iter().enumerate() {
            let lineno = idx + 1;
            if opts.plain_dockerfile {
                content.push_str(raw_line);
                line_map.push(lineno);
                continue;
            }
            if let Some(rest) = raw_line.strip_prefix("# %ARG") {
                let name = rest.get(1..).unwrap_or("").trim();
                let Some(value) = opts.args.get(name) else {
                    return Err(Error::MissingArgument {
                        path: dockerfile_path.clone(),
                        line: lineno,
                        name: name.to_string(),
                    });
                };
                replace.push((name.to_string(), python_repl(value)));
                continue;
            }
            let mut line = raw_line.to_string();
            for (name, value) in &replace {
                line = substitute_word(&line, name, value);
            }
            content.push_str(&line);
            line_map.push(lineno);
            if !line.starts_with("# %include") {
                continue;
            }
            if line.trim() == "# %include-run-task" {
                let Some(dir) = &opts.run_task_dir else {
                    return Err(Error::RunTaskWithoutDir {
                        path: dockerfile_path.clone(),
                        line: lineno,
                    });
                };
                for s in RUN_TASK_SNIPPET {
                    content.push_str(s);
                    line_map.push(lineno);
                }
                for f in RUN_TASK_FILES {
                    let src = dir.join(f);
                    let entry = file_entry(&src, dir)?;
                    ctx.insert(b"run-task/", f.as_bytes(), entry, walker)?;
                }
                continue;
            }
            let p = line.get("# %include ".len()..).unwrap_or("").trim();
            include(&mut ctx, p, opts, (&dockerfile_path, lineno), walker)?;
        }
        ctx.dockerfile = Arc::from(content.into_bytes());
        ctx.line_map = line_map;
        let df = Entry {
            source: Source::Bytes(ctx.dockerfile.clone()),
            mode: 0o644,
            size: ctx.dockerfile.len() as u64,
            resolves_to_file: false,
            resolves_to_dir: false,
            escapes: false,
            digest: None,
            mtime_ns: None,
        };
        // An image directory's Dockerfile is part of its context (as in
        // taskgraph's); one given with -f is not, as with `docker build -f`
        // (the kiln-v1 hash still covers it: see `Context::dockerfile_entry`).
        if opts.dockerfile.is_none() {
            ctx.insert(b"", b"Dockerfile", df, walker)?;
        }
        ctx.listing.finish();
        Ok(ctx)
    }

    /// Adds one entry (to the listing, for a compact walk).
    fn insert(
        &mut self,
        prefix: &[u8],
        name: &[u8],
        e: Entry,
        w: &Walker<'_>,
    ) -> Result<(), Error> {
        if w.compact {
            self.listing.push_entry(prefix, name, &e)
        } else {
            let mut path = prefix.to_vec();
            path.extend_from_slice(name);
            self.entries.insert(path, e);
            Ok(())
        }
    }

    /// Number of entries (files and symlinks).
    pub fn len(&self) -> usize {
        self.entries.len() + self.listing.len()
    }

    /// Whether the context has no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the Dockerfile is an entry of the context (an image
    /// directory's), rather than a file given with `-f`.
    pub fn dockerfile_in_context(&self) -> bool {
        self.dockerfile_path == self.image_dir.join("Dockerfile")
            && (self.entries.contains_key(&b"Dockerfile"[..])
                || self.listing.contains(b"Dockerfile"))
    }

    /// The Dockerfile the context was read with.
    pub fn dockerfile_path(&self) -> PathBuf {
        self.dockerfile_path.clone()
    }

    /// The line of the original Dockerfile that line `line` of the
    /// rewritten one comes from.
    pub fn original_line(&self, line: usize) -> usize {
        self.line_map
            .get(line.wrapping_sub(1))
            .copied()
            .unwrap_or(line)
    }

    /// The rewritten Dockerfile as text.
    pub fn dockerfile_text(&self) -> &str {
        // Built from a String in `collect`.
        std::str::from_utf8(&self.dockerfile).unwrap_or("")
    }

    /// Total bytes of regular-file content in the context.
    pub fn total_size(&self) -> u64 {
        self.entries.values().map(|e| e.size).sum::<u64>() + self.listing.bytes
    }
}

fn include(
    ctx: &mut Context,
    p: &str,
    opts: &ContextOptions,
    (dockerfile, line): (&Path, usize),
    walker: &Walker<'_>,
) -> Result<(), Error> {
    let at = |what: &'static str| Error::Include {
        path: dockerfile.to_path_buf(),
        line,
        what,
        include: p.to_string(),
    };
    if p.starts_with('/') {
        return Err(at("extra include path cannot be absolute"));
    }
    let Some(rel) = normalize(Path::new(p)) else {
        return Err(at("extra include path outside topsrcdir"));
    };
    let fs_path = ctx.topsrcdir.join(&rel);
    if escapes(&ctx.topsrcdir, &fs_path) {
        return Err(at(
            "extra include path leads outside topsrcdir through a symlink",
        ));
    }
    if fs::metadata(&fs_path).is_err() {
        if fs::symlink_metadata(&fs_path).is_ok() {
            return Err(at("extra include path is a broken symlink"));
        }
        return Err(at("extra include path does not exist"));
    }
    let archive_base: Vec<u8> = if opts.taskgraph_names {
        python_join(b"topsrcdir", p.as_bytes())
    } else if rel.as_os_str().is_empty() {
        b"topsrcdir".to_vec()
    } else {
        python_join(b"topsrcdir", rel.as_os_str().as_bytes())
    };
    if fs_path.is_dir() {
        let mut prefix = archive_base.clone();
        if !prefix.ends_with(b"/") {
            prefix.push(b'/');
        }
        walk_into(&fs_path, &prefix, ctx, walker, &ctx.topsrcdir.clone())?;
    } else {
        let entry = file_entry(&fs_path, &ctx.topsrcdir)?;
        ctx.insert(&archive_base, b"", entry, walker)?;
    }
    Ok(())
}

/// Walks `dir` (not following symlinks, skipping `__pycache__`), adding every
/// non-directory under `prefix`.
fn walk_into(
    dir: &Path,
    prefix: &[u8],
    ctx: &mut Context,
    w: &Walker<'_>,
    root: &Path,
) -> Result<(), Error> {
    let walked = walk(dir, prefix, w, root, &mut ctx.listing)?;
    // The walk emits archive-path order, so building the map is one pass.
    if ctx.entries.is_empty() {
        ctx.entries = walked.entries.into_iter().collect();
    } else {
        ctx.entries.extend(walked.entries);
    }
    ctx.dirs.extend(walked.dirs);
    Ok(())
}

/// Describes one non-directory path of the source tree.
/// A symlink resolving outside `root` is recorded as such and never followed.
pub fn file_entry(path: &Path, root: &Path) -> Result<Entry, Error> {
    let lmd = fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
    let ft = lmd.file_type();
    if ft.is_symlink() {
        let target = fs::read_link(path).map_err(|e| Error::io(path, e))?;
        let (mut mode, size, mut is_file, is_dir) = match fs::metadata(path) {
            Ok(md) => (md.mode() & 0o7777, md.len(), md.is_file(), md.is_dir()),
            Err(_) => (0o777, 0, false, false),
        };
        let escapes = is_file && escapes(root, path);
        if escapes {
            (is_file, mode) = (false, 0o777);
        }
        return Ok(Entry {
            source: Source::Symlink {
                path: path.to_path_buf(),
                target,
            },
            mode,
            size: if is_file { size } else { 0 },
            resolves_to_file: is_file,
            resolves_to_dir: is_dir,
            escapes,
            digest: None,
            mtime_ns: None,
        });
    }
    if ft.is_file() {
        return Ok(Entry {
            source: Source::File(Arc::from(path)),
            mode: lmd.mode() & 0o7777,
            size: lmd.len(),
            resolves_to_file: false,
            resolves_to_dir: false,
            escapes: false,
            digest: None,
            mtime_ns: Some(lmd.mtime() * 1_000_000_000 + lmd.mtime_nsec()),
        });
    }
    let kind = if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device file"
    } else {
        "not a regular file"
    };
    Err(Error::SpecialFile {
        path: path.to_path_buf(),
        kind,
    })
}

/// Whether `path` (a path under `root`), followed through every symlink,
/// leaves `root`. The kernel resolves it beneath `root`'s descriptor
/// (`openat2` with `RESOLVE_BENEATH`), so no string check decides; an
/// absolute link that the kernel refuses is accepted only if its real path
/// is under `root`'s real path.
pub fn escapes(root: &Path, path: &Path) -> bool {
    use rustix::fs::{OFlags, ResolveFlags};
    let Ok(rel) = path.strip_prefix(root) else {
        return true;
    };
    let real_outside = || match (fs::canonicalize(path), fs::canonicalize(root)) {
        (Ok(p), Ok(r)) => !p.starts_with(r),
        _ => false,
    };
    let Ok(fd) = rustix::fs::open(
        root,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    ) else {
        return real_outside();
    };
    match rustix::fs::openat2(
        &fd,
        rel,
        OFlags::PATH | OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS,
    ) {
        Ok(_) => false,
        Err(rustix::io::Errno::XDEV) | Err(rustix::io::Errno::NOSYS) => real_outside(),
        // Missing targets and loops are reported where the link is used.
        Err(_) => false,
    }
}

fn absolute(p: &Path) -> Result<PathBuf, Error> {
    std::path::absolute(p).map_err(|e| Error::io(p, e))
}

/// Lexically normalizes a relative path; `None` if it climbs above its start.
pub fn normalize(p: &Path) -> Option<PathBuf> {
    let mut out: Vec<&std::ffi::OsStr> = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop()?;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out.iter().collect())
}

/// `os.path.join(a, b)` for a relative `b`.
fn python_join(a: &[u8], b: &[u8]) -> Vec<u8> {
    let mut out = a.to_vec();
    if !out.ends_with(b"/") && !out.is_empty() {
        out.push(b'/');
    }
    out.extend_from_slice(b);
    out
}

/// Python's text mode: `\r\n` and lone `\r` become `\n`.
fn universal_newlines(s: &str) -> String {
    s.replace("\r\n", "\n").replace('\r', "\n")
}

fn split_lines_keep_ends(s: &str) -> Vec<&str> {
    s.split_inclusive('\n').collect()
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Replaces `$NAME` where a word boundary follows (Python's `\$NAME\b`).
pub fn substitute_word(line: &str, name: &str, value: &str) -> String {
    let pat = format!("${name}");
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(pos) = rest.find(&pat) {
        let after = &rest[pos + pat.len()..];
        let last_is_word = name.chars().last().is_some_and(is_word);
        let next_is_word = after.chars().next().is_some_and(is_word);
        let boundary = if last_is_word {
            !next_is_word
        } else {
            next_is_word
        };
        out.push_str(&rest[..pos]);
        if boundary {
            out.push_str(value);
        } else {
            out.push_str(&pat);
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// Applies the escapes Python's `re.sub` interprets in a replacement string.
fn python_repl(value: &str) -> String {
    if !value.contains('\\') {
        return value.to_string();
    }
    let mut out = String::new();
    let mut chars = value.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some(o) => {
                out.push('\\');
                out.push(o);
            }
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitute_word_respects_boundaries() {
        assert_eq!(substitute_word("FROM $A:$AB $A", "A", "x"), "FROM x:$AB x");
        assert_eq!(substitute_word("${A} $A_B $A-1", "A", "x"), "${A} $A_B x-1");
    }

    #[test]
    fn normalize_refuses_climbing_out() {
        assert_eq!(normalize(Path::new("a/../b")), Some(PathBuf::from("b")));
        assert_eq!(normalize(Path::new("a/../../b")), None);
        assert_eq!(normalize(Path::new("./a/./b/")), Some(PathBuf::from("a/b")));
    }

    #[test]
    fn crlf_becomes_lf() {
        assert_eq!(universal_newlines("a\r\nb\rc\n"), "a\nb\nc\n");
    }

    #[test]
    fn python_join_keeps_trailing_slash() {
        assert_eq!(python_join(b"topsrcdir", b"a/"), b"topsrcdir/a/");
        assert_eq!(python_join(b"topsrcdir", b"./a"), b"topsrcdir/./a");
    }
}
