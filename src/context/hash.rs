//! The `kiln-v1` context hash: every entry's sha256 computed in parallel,
//! then one sha256 over the lines `"<hex sha256> <mode octal> <path>\n"` in
//! archive-path byte order.
//!
//! Modes are git-style: `100644`/`100755` (after the mode policy) for files,
//! `120000` for symlinks, whose content hash is the sha256 of the link target.

use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::{Context, Entry, Error, ModePolicy, Source};

/// Buffer size for reading files while hashing.
const BUF: usize = 256 * 1024;

/// Computes the sha256 of one entry's content, checking it did not change.
pub fn entry_sha256(entry: &Entry) -> Result<[u8; 32], Error> {
    match &entry.source {
        Source::Bytes(b) => Ok(Sha256::digest(b).into()),
        Source::Symlink { target, .. } => Ok(Sha256::digest(target.as_os_str().as_bytes()).into()),
        Source::File(path) => {
            let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
            let mut h = Sha256::new();
            let mut buf = vec![0u8; BUF.min(entry.size as usize + 1).max(4096)];
            let mut total = 0u64;
            loop {
                let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                h.update(&buf[..n]);
            }
            if total != entry.size {
                return Err(Error::Changed {
                    path: path.clone(),
                    expected: entry.size,
                    got: total,
                });
            }
            Ok(h.finalize().into())
        }
    }
}

/// The git-style mode string of an entry under `policy`.
pub fn mode_string(entry: &Entry, policy: ModePolicy) -> String {
    match entry.source {
        Source::Symlink { .. } => "120000".to_string(),
        _ => format!("{:o}", 0o100000 | policy.file(entry.mode)),
    }
}

/// The `kiln-v1` hash of a context, as 64 lowercase hex digits.
pub fn kiln_v1(ctx: &Context, policy: ModePolicy) -> Result<String, Error> {
    let entries: Vec<(&Vec<u8>, &Entry)> = ctx.entries.iter().collect();
    let digests: Vec<[u8; 32]> = entries
        .par_iter()
        .with_min_len(16)
        .map(|(_, e)| entry_sha256(e))
        .collect::<Result<_, _>>()?;
    let mut h = Sha256::new();
    for ((path, entry), digest) in entries.iter().zip(&digests) {
        h.update(hex::encode(digest).as_bytes());
        h.update(b" ");
        h.update(mode_string(entry, policy).as_bytes());
        h.update(b" ");
        h.update(path);
        h.update(b"\n");
    }
    Ok(hex::encode(h.finalize()))
}
