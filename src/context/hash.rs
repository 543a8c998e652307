//! The `kiln-v1` context hash: every entry's sha256 computed in parallel,
//! then one sha256 over the lines `"<hex sha256> <mode octal> <path>\n"` in
//! archive-path byte order, the path with `\` and newline escaped.
//!
//! Modes are git-style: `100644`/`100755` (after the mode policy) for files,
//! `120000` for symlinks, whose content hash is the sha256 of the link target.
//! A Dockerfile given with `-f` is not a context entry; it is hashed as one
//! last line named `/Dockerfile`, a name no entry can have.

use std::os::unix::ffi::OsStrExt;

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::listing::{mode_of, Listing, REGULAR, SYMLINK};
use super::walk::hash_reader;
use super::{Context, Entry, Error, ModePolicy, Source};
use crate::progress::Step;

/// Computes the sha256 of one entry's content (or takes the one the walk
/// computed), checking the file did not change.
pub fn entry_sha256(entry: &Entry) -> Result<[u8; 32], Error> {
    if let Some(d) = entry.digest {
        return Ok(d);
    }
    match &entry.source {
        Source::Bytes(b) => Ok(Sha256::digest(b).into()),
        Source::Symlink { target, .. } => Ok(Sha256::digest(target.as_os_str().as_bytes()).into()),
        Source::File(path) => {
            let f = crate::fsx::open_deep(path).map_err(|e| Error::io(path, e))?;
            hash_reader(f, path, entry.size, &Step::none())
        }
    }
}

/// The git-style mode string of an entry under `policy`.
pub fn mode_string(entry: &Entry, policy: ModePolicy) -> std::borrow::Cow<'static, str> {
    mode_text(mode_of(entry), policy)
}

/// The mode string of a listing's mode under `policy`.
fn mode_text(mode: u32, policy: ModePolicy) -> std::borrow::Cow<'static, str> {
    if mode == SYMLINK {
        return "120000".into();
    }
    match policy.file(mode & 0o7777) {
        0o644 => "100644".into(),
        0o755 => "100755".into(),
        m => format!("{:o}", REGULAR | m).into(),
    }
}

/// The `kiln-v1` hash of a context, as 64 lowercase hex digits.
pub fn kiln_v1(ctx: &Context, policy: ModePolicy) -> Result<String, Error> {
    if ctx.entries.is_empty() {
        return Ok(lines_digest(ctx, &ctx.listing, policy));
    }
    let entries: Vec<(&Vec<u8>, &Entry)> = ctx.entries.iter().collect();
    let digests: Vec<[u8; 32]> = entries
        .par_iter()
        .with_min_len(16)
        .map(|(_, e)| entry_sha256(e))
        .collect::<Result<_, _>>()?;
    let mut listing = Listing::default();
    for ((path, e), d) in entries.iter().zip(digests) {
        listing.push(path, b"", mode_of(e), e.size, d);
    }
    Ok(lines_digest(ctx, &listing, policy))
}

/// Appends a path to a kiln-v1 line, escaped so that no name can end or
/// split a line: `\` becomes `\\` and a newline `\n` (the two
/// characters). Paths without either byte are written as they are, so
/// their trees keep their hash; with them the encoding stays injective (a
/// file named `a\n<hex> 100644 b` no longer hashes like the tree {a, b}).
fn push_escaped(line: &mut Vec<u8>, path: &[u8]) {
    line.extend_from_slice(&crate::digest::escape_line(path, false));
}

/// Appends one kiln-v1 line: `<hex sha256> <mode> <escaped path>\n`.
fn push_line(line: &mut Vec<u8>, digest: &[u8; 32], mode: &str, path: &[u8]) {
    let mut hexbuf = [0u8; 64];
    hex::encode_to_slice(digest, &mut hexbuf).expect("64 hex digits for 32 bytes");
    line.extend_from_slice(&hexbuf);
    line.push(b' ');
    line.extend_from_slice(mode.as_bytes());
    line.push(b' ');
    push_escaped(line, path);
    line.push(b'\n');
}

/// One sha256 over the lines of a sorted listing (plus the `-f`
/// Dockerfile's line), fed in large blocks.
fn lines_digest(ctx: &Context, listing: &Listing, policy: ModePolicy) -> String {
    let mut h = Sha256::new();
    let mut line = Vec::with_capacity(1 << 16);
    let mut hexbuf = [0u8; 64];
    for (path, mode, digest) in listing.iter() {
        push_line(&mut line, digest, &mode_text(mode, policy), path);
        if line.len() >= 1 << 16 {
            h.update(&line);
            line.clear();
        }
    }
    if !ctx.dockerfile_in_context() {
        hex::encode_to_slice(Sha256::digest(&ctx.dockerfile), &mut hexbuf)
            .expect("64 hex digits for 32 bytes");
        line.extend_from_slice(&hexbuf);
        line.extend_from_slice(b" 100644 /Dockerfile\n");
    }
    h.update(&line);
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_holding_a_line_never_hashes_like_two_files() {
        // The tree {a, b} and one file named "a\n<hex of b> 100644 b",
        // with a's content.
        let (da, db) = ([1u8; 32], [2u8; 32]);
        let mut two = Vec::new();
        push_line(&mut two, &da, "100644", b"a");
        push_line(&mut two, &db, "100644", b"b");
        let forged = format!("a\n{} 100644 b", hex::encode(db));
        let mut one = Vec::new();
        push_line(&mut one, &da, "100644", forged.as_bytes());
        assert_ne!(two, one);
        let mut plain = Vec::new();
        push_escaped(&mut plain, b"dir/file name.txt");
        assert_eq!(plain, b"dir/file name.txt", "ordinary names are unchanged");
        let mut esc = Vec::new();
        push_escaped(&mut esc, b"a\\b\nc");
        assert_eq!(esc, b"a\\\\b\\nc");
    }
}
