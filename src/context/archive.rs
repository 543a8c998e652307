//! A build context given as a tar (`docker build - < context.tar.gz`, or
//! the gzip tar taskgraph's `create_context_tar` writes for Taskcluster's
//! image tasks): unpacked beneath a private directory, every member
//! resolved with no link followed, and built as a plain Docker context
//! (its Dockerfile as it is: taskgraph has already applied `# %ARG` and
//! `# %include`).

use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::dockerfile::ignore::clean;
use crate::fsx::DirFd;

/// A context tar unpacked into a directory that lives as long as it does
/// (and is removed by an interrupt).
pub struct Unpacked {
    dir: tempfile::TempDir,
    name: String,
    /// sha256 of the uncompressed tar: taskgraph's context hash.
    pub tar_sha256: String,
    _interrupt: crate::interrupt::Guard,
}

impl Unpacked {
    /// The context directory.
    pub fn path(&self) -> std::path::PathBuf {
        self.dir.path().join(&self.name)
    }
}

/// What went wrong with a context tar; names the archive and the member.
fn bad(what: &str, member: &[u8], why: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "context archive {what}: member {}: {why}",
            String::from_utf8_lossy(member)
        ),
    )
}

/// Unpacks a context tar (plain, gzip or zstd: sniffed) read from `r`
/// into a directory called `name` (the image's name where none is given);
/// `what` names it in errors (a path, `standard input`, a URL).
pub fn unpack(r: impl Read + Send, what: &str, name: &str) -> io::Result<Unpacked> {
    let top = tempfile::Builder::new()
        .prefix(".kiln-context-")
        .tempdir()?;
    let guard = crate::interrupt::remove_on_interrupt(top.path());
    let dir_path = top.path().join(name);
    std::fs::create_dir(&dir_path)?;
    let mut r = io::BufReader::with_capacity(1 << 20, r);
    let head = io::BufRead::fill_buf(&mut r)?;
    let codec = crate::source::sniff(&head[..head.len().min(4)]);
    let decoded = crate::source::decoder(codec, r, what)?;
    let mut hashed = crate::digest::HashingReader::new(decoded);
    let root = DirFd::open(&dir_path)?;
    {
        let mut ar = tar::Archive::new(&mut hashed);
        for entry in ar.entries().map_err(|e| bad(what, b"(header)", e))? {
            let mut entry = entry.map_err(|e| bad(what, b"(header)", e))?;
            let raw = entry.path_bytes().into_owned();
            let rel = clean(&raw);
            let climbs = raw.starts_with(b"/") || raw.split(|&c| c == b'/').any(|c| c == b"..");
            if climbs {
                return Err(bad(
                    what,
                    &raw,
                    "an absolute path or one with `..`; a context stays inside itself",
                ));
            }
            if rel.is_empty() {
                continue;
            }
            let relp = Path::new(OsStr::from_bytes(&rel));
            let (parent, name) = match relp.parent() {
                Some(p) if !p.as_os_str().is_empty() => {
                    (Some(p), relp.file_name().unwrap_or_default())
                }
                _ => (None, relp.as_os_str()),
            };
            let pdir = match parent {
                Some(p) => root.create_dir(p).map_err(|e| bad(what, &raw, e))?,
                None => DirFd::open(&dir_path)?,
            };
            let mode = entry.header().mode().unwrap_or(0o644);
            let kind = entry.header().entry_type();
            if kind.is_dir() {
                pdir.create_dir(name).map_err(|e| bad(what, &raw, e))?;
            } else if kind.is_file() || kind == tar::EntryType::Continuous {
                pdir.remove(name).map_err(|e| bad(what, &raw, e))?;
                let mut f = pdir.create_new(name).map_err(|e| bad(what, &raw, e))?;
                io::copy(&mut entry, &mut f).map_err(|e| bad(what, &raw, e))?;
                use std::os::unix::fs::PermissionsExt;
                f.set_permissions(std::fs::Permissions::from_mode(mode & 0o755))
                    .map_err(|e| bad(what, &raw, e))?;
            } else if kind.is_symlink() {
                let target = entry
                    .link_name_bytes()
                    .map(|l| l.into_owned())
                    .unwrap_or_default();
                pdir.remove(name).map_err(|e| bad(what, &raw, e))?;
                rustix::fs::symlinkat(OsStr::from_bytes(&target), pdir.fd(), name)
                    .map_err(|e| bad(what, &raw, io::Error::from(e)))?;
            } else {
                return Err(bad(
                    what,
                    &raw,
                    "a hard link, device or FIFO; a context holds files, directories and symbolic links",
                ));
            }
        }
    }
    let (digest, _) = hashed.finish()?;
    if !dir_path.join("Dockerfile").is_file() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("context archive {what} has no Dockerfile at its top"),
        ));
    }
    Ok(Unpacked {
        dir: top,
        name: name.to_string(),
        tar_sha256: digest.hex().to_string(),
        _interrupt: guard,
    })
}

/// sha256 of the uncompressed bytes of a context tar (taskgraph's context
/// hash, from the gzip tar `create_context_tar` wrote).
pub fn tar_sha256(path: &Path) -> io::Result<String> {
    let f = std::fs::File::open(path)?;
    let r = crate::source::sniffed(f, &path.display().to_string())?;
    let (d, _) = crate::digest::HashingReader::new(r).finish()?;
    Ok(d.hex().to_string())
}

/// Whether a build context named on the command line is an archive:
/// `-` (standard input) or a file rather than a directory.
pub fn is_archive(p: &Path) -> bool {
    p == Path::new("-") || p.is_file()
}

/// Unpacks a context archive named on the command line (`-`: standard
/// input), into a directory named after it (`context` for standard input,
/// `ctx` for `ctx.tar.gz`).
pub fn unpack_named(p: &Path) -> io::Result<Unpacked> {
    if p == Path::new("-") {
        return unpack(io::stdin(), "standard input", "context");
    }
    let f = std::fs::File::open(p)?;
    let base = p
        .file_name()
        .map_or("context".into(), |n| n.to_string_lossy().into_owned());
    let stem = [".tar.gz", ".tgz", ".tar.zst", ".tar"]
        .iter()
        .find_map(|x| base.strip_suffix(x))
        .unwrap_or(&base)
        .to_string();
    let stem = if stem.is_empty() || stem.starts_with('.') {
        "context".to_string()
    } else {
        stem
    };
    unpack(f, &p.display().to_string(), &stem)
}
