//! The taskgraph-compatible context archive and hash: the exact tar that
//! `taskgraph.util.docker.stream_context_tar` writes (Python `tarfile`, GNU
//! format), hashed as it streams. Symlinks are followed (to directories:
//! skipped), modes are kept as on disk, uid/gid 0, mtime 1451606400.

use std::io::{self, Write};

use super::{Context, Entry, Error, Source};
use crate::digest::HashingWriter;
use crate::layer::tar::{self, Header, Kind};
use crate::prefetch::Prefetch;
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
    // Check every entry first, and list the files to read ahead in order.
    let mut files = Vec::new();
    for entry in ctx.entries.values().filter(|e| included(e)) {
        let path: &std::path::Path = match &entry.source {
            Source::Bytes(_) => continue,
            Source::File(p) => p,
            Source::Symlink { path, .. } if entry.resolves_to_file => path,
            Source::Symlink { path, target } if entry.escapes => {
                return Err(Error::Escapes {
                    path: path.clone(),
                    target: target.clone(),
                })
            }
            Source::Symlink { path, .. } => {
                return Err(Error::BrokenSymlink { path: path.clone() })
            }
        };
        if entry.mode & 0o6000 != 0 {
            return Err(Error::Setuid {
                path: path.to_path_buf(),
            });
        }
        files.push((path, entry.size));
    }
    let threads = rayon::current_num_threads() + 1;
    std::thread::scope(|scope| {
        let mut pf = Prefetch::start(scope, &files, threads);
        let mut offset = 0u64;
        for (name, entry) in ctx.entries.iter().filter(|(_, e)| included(e)) {
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
            if let Source::Bytes(b) = &entry.source {
                hw.write_all(b).map_err(out)?;
            } else {
                let mut seen = 0u64;
                let got = pf
                    .next_file(|d| {
                        seen += d.len() as u64;
                        if seen > entry.size {
                            return Err(io::Error::other("grew"));
                        }
                        hw.write_all(d)
                    })
                    .map_err(|(path, e)| {
                        if seen > entry.size {
                            changed(entry, seen)
                        } else {
                            Error::io(&path, e)
                        }
                    })?;
                if got != entry.size {
                    return Err(changed(entry, got));
                }
            }
            offset += entry.size;
            offset += tar::pad(&mut hw, entry.size).map_err(out)?;
            step.inc(entry.size, 1);
        }
        offset += tar::finish(&mut hw).map_err(out)?;
        tar::pad_record(&mut hw, offset).map_err(out)?;
        Ok(())
    })?;
    let (digest, _, w) = hw.finish();
    Ok((digest.hex().to_string(), w))
}

fn changed(entry: &Entry, got: u64) -> Error {
    let path = match &entry.source {
        Source::File(p) => p.to_path_buf(),
        Source::Symlink { path: p, .. } => p.clone(),
        Source::Bytes(_) => "Dockerfile".into(),
    };
    Error::Changed {
        path,
        expected: entry.size,
        got,
    }
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
