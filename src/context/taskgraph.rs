//! The taskgraph-compatible context archive and hash: the exact tar that
//! `taskgraph.util.docker.stream_context_tar` writes (Python `tarfile`, GNU
//! format), hashed as it streams. Symlinks are followed (to directories:
//! skipped), modes are kept as on disk, uid/gid 0, mtime 1451606400.

use std::fs::File;
use std::io::{self, Read, Write};

use super::{Context, Entry, Error, Source};
use crate::digest::HashingWriter;
use crate::layer::tar::{self, Header, Kind};
use crate::progress::Step;

/// taskgraph's fixed mtime: 2016-01-01T00:00:00Z.
pub const MTIME: u64 = 1451606400;

/// Entries taskgraph would put in its tar: symlinks to directories are skipped.
fn included(entry: &Entry) -> bool {
    !matches!(entry.source, Source::Symlink { .. }) || !entry.resolves_to_dir
}

/// Writes taskgraph's context tar of `ctx` to `w`; returns the sha256 of the tar.
pub fn write_context_tar<W: Write>(ctx: &Context, w: W) -> Result<(String, W), Error> {
    write_context_tar_with(ctx, w, &Step::none())
}

/// [`write_context_tar`], reporting progress to `step`.
pub fn write_context_tar_with<W: Write>(
    ctx: &Context,
    w: W,
    step: &Step,
) -> Result<(String, W), Error> {
    let mut hw = HashingWriter::new(w);
    let out = |e: io::Error| Error::Write {
        path: "context tar".into(),
        source: e,
    };
    let mut buf = vec![0u8; 256 * 1024];
    let mut offset = 0u64;
    for (name, entry) in ctx.entries.iter().filter(|(_, e)| included(e)) {
        let (path, data): (std::path::PathBuf, Option<&[u8]>) = match &entry.source {
            Source::Bytes(b) => ("Dockerfile".into(), Some(b)),
            Source::File(p) => (p.clone(), None),
            Source::Symlink { path, .. } => {
                if !entry.resolves_to_file {
                    return Err(Error::BrokenSymlink { path: path.clone() });
                }
                (path.clone(), None)
            }
        };
        if entry.mode & 0o6000 != 0 {
            return Err(Error::Setuid { path });
        }
        let h = Header {
            name,
            kind: Kind::File,
            mode: entry.mode,
            uid: 0,
            gid: 0,
            size: entry.size,
            mtime: MTIME,
            link: b"",
        };
        offset += tar::write_gnu(&mut hw, &h).map_err(out)?;
        match data {
            Some(b) => hw.write_all(b).map_err(out)?,
            None => {
                let mut f = File::open(&path).map_err(|e| Error::io(&path, e))?;
                let mut total = 0u64;
                loop {
                    let n = f.read(&mut buf).map_err(|e| Error::io(&path, e))?;
                    if n == 0 {
                        break;
                    }
                    if total + n as u64 > entry.size {
                        return Err(Error::Changed {
                            path,
                            expected: entry.size,
                            got: total + n as u64,
                        });
                    }
                    hw.write_all(&buf[..n]).map_err(out)?;
                    total += n as u64;
                }
                if total != entry.size {
                    return Err(Error::Changed {
                        path,
                        expected: entry.size,
                        got: total,
                    });
                }
            }
        }
        offset += entry.size;
        offset += tar::pad(&mut hw, entry.size).map_err(out)?;
        step.inc(entry.size, 1);
    }
    offset += tar::finish(&mut hw).map_err(out)?;
    tar::pad_record(&mut hw, offset).map_err(out)?;
    let (digest, _, w) = hw.finish();
    Ok((digest.hex().to_string(), w))
}

/// The taskgraph context hash of `ctx`.
pub fn hash(ctx: &Context) -> Result<String, Error> {
    hash_with(ctx, &Step::none())
}

/// The taskgraph context hash of `ctx`, reporting progress to `step`.
pub fn hash_with(ctx: &Context, step: &Step) -> Result<String, Error> {
    let (digest, _) = write_context_tar_with(ctx, io::sink(), step)?;
    Ok(digest)
}
