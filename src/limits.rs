//! Every limit kiln puts on what untrusted input can make it do, named
//! once here and listed in README's Security section: the decompression
//! ratio (a small archive that inflates to terabytes is refused as a
//! decompression bomb), the JSON kiln reads into memory and writes (the
//! same limit both ways, so kiln never writes what it refuses to read),
//! Dockerfile lines, parent directories given entries of their own, and
//! symlink hops. Directory depth and path length have no limit: every
//! walk is iterative and resolves names relative to a directory.

use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Decompressed output may exceed this many times the compressed input...
pub const MAX_RATIO: u64 = 1000;
/// ...only below this many bytes (small, very compressible files are fine).
pub const RATIO_FREE_BYTES: u64 = 1 << 30;
/// Manifests, indexes and configs larger than this are refused, when kiln
/// reads them and when a build would write one: 4 MiB, what the
/// distribution registry accepts for a manifest and containers/image
/// (podman, skopeo, buildah) reads for a manifest or config, so kiln never
/// writes an image it, or they, would refuse.
pub const MAX_JSON_BLOB: u64 = 4 << 20;
/// A store's `index.json` (one entry per name) larger than this is refused.
pub const MAX_STORE_INDEX: u64 = 64 << 20;
/// An entry of the local index (a few hundred bytes) larger than this is ignored.
pub const MAX_INDEX_ENTRY: u64 = 1 << 20;
/// A token answer from a registry's auth server larger than this is refused.
pub const MAX_TOKEN_ANSWER: u64 = 1 << 20;
/// `/etc/passwd` and `/etc/group` of a base image larger than this are not
/// read for `USER` and `--chown` names.
pub const MAX_USER_DB: u64 = 16 << 20;
/// Symlinks followed while resolving one path inside an image (Linux's own limit).
pub const MAX_SYMLINK_HOPS: usize = 40;
/// Parent directories a COPY, ADD or WORKDIR creates get layer entries of
/// their own down to this path length; deeper ones (no kernel call takes
/// such a path whole) are left implied, and every extractor creates them
/// 0755. Keeps a destination of 64,000 components linear.
pub const MAX_EXPLICIT_PARENT: usize = 4096;
/// A Dockerfile line, or an instruction with its continuation lines,
/// longer than this is refused (Docker's classic builder refuses lines
/// over 65,535 bytes; kiln allows more, and stays linear).
pub const MAX_DOCKERFILE_LINE: usize = 1 << 20;

/// Counts the bytes read through it (the compressed side).
pub struct Counted<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Fails the read once the decompressed output outgrows the ratio cap.
pub struct BombGuard<R> {
    inner: R,
    compressed: Arc<AtomicU64>,
    out: u64,
    what: String,
}

impl<R: Read> Read for BombGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.out += n as u64;
        let input = self.compressed.load(Ordering::Relaxed).max(1);
        if self.out > RATIO_FREE_BYTES && self.out > input.saturating_mul(MAX_RATIO) {
            return Err(io::Error::other(format!(
                "{}: decompresses to more than {MAX_RATIO} times its size ({} bytes from {input}); refusing what looks like a decompression bomb",
                self.what, self.out
            )));
        }
        Ok(n)
    }
}

/// Wraps a compressed reader: `decoder` builds the decompressor over the
/// counted input; the result is guarded by the ratio cap.
pub fn guarded<R: Read, D: Read>(
    compressed: R,
    what: &str,
    decoder: impl FnOnce(Counted<R>) -> io::Result<D>,
) -> io::Result<BombGuard<D>> {
    let count = Arc::new(AtomicU64::new(0));
    let inner = decoder(Counted {
        inner: compressed,
        count: count.clone(),
    })?;
    Ok(BombGuard {
        inner,
        compressed: count,
        out: 0,
        what: what.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_small_stream_that_inflates_hugely_is_refused() {
        // 2 GiB of zeros in a few MB of zstd.
        let mut enc = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..2048 {
            io::Write::write_all(&mut enc, &zeros).unwrap();
        }
        let small = enc.finish().unwrap();
        let mut r = guarded(&small[..], "bomb.zst", |c| {
            zstd::stream::read::Decoder::new(c)
        })
        .unwrap();
        let err = io::copy(&mut r, &mut io::sink()).unwrap_err();
        assert!(
            err.to_string()
                .contains("bomb.zst: decompresses to more than 1000 times"),
            "{err}"
        );
        // An ordinary ratio passes.
        let text: Vec<u8> = (0..3_000_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let z = zstd::encode_all(&text[..], 3).unwrap();
        let mut r = guarded(&z[..], "ok.zst", zstd::stream::read::Decoder::new).unwrap();
        assert_eq!(
            io::copy(&mut r, &mut io::sink()).unwrap(),
            text.len() as u64
        );
    }
}
