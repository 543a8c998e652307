//! Digests: the validated `sha256:<hex>` type and a writer that hashes what
//! passes through it.

use std::fmt;
use std::io::{self, Write};

use sha2::{Digest as _, Sha256};

/// A validated `sha256:<64 lowercase hex>` digest.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(String);

impl Digest {
    /// Parses `sha256:<hex>`, refusing anything else.
    pub fn parse(s: &str) -> Option<Digest> {
        let hex = s.strip_prefix("sha256:")?;
        (hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| Digest(s.to_string()))
    }
    /// The digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(data))))
    }
    /// The digest whose hex part is `hex` (a blob file's name), if valid.
    pub fn from_hex(hex: &str) -> Option<Digest> {
        Digest::parse(&format!("sha256:{hex}"))
    }
    /// The digest of a finished sha256.
    pub fn from_raw(raw: [u8; 32]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(raw)))
    }
    /// The hex part.
    pub fn hex(&self) -> &str {
        &self.0[7..]
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Digest {
    type Err = String;
    fn from_str(s: &str) -> Result<Digest, String> {
        Digest::parse(s).ok_or_else(|| {
            format!("{s:?} is not a valid digest (expected sha256: and 64 lowercase hex digits)")
        })
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl PartialEq<str> for Digest {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl AsRef<str> for Digest {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A writer that hashes and counts everything passing through it.
pub struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    written: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter {
            inner,
            hash: Sha256::new(),
            written: 0,
        }
    }
    /// The digest of what was written, its size, and the inner writer.
    pub fn finish(self) -> (Digest, u64, W) {
        (
            Digest::from_raw(self.hash.finalize().into()),
            self.written,
            self.inner,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// `bytes` escaped for a line of hashed text: `\` as `\\`, a newline
/// as `\n`, and with `tab` a tab as `\t` (where tabs separate fields).
/// Bytes holding none of them come back as they are, so texts without
/// them hash as before; with them the encoding stays injective.
pub fn escape_line(bytes: &[u8], tab: bool) -> std::borrow::Cow<'_, [u8]> {
    let special = |b: u8| b == b'\\' || b == b'\n' || (tab && b == b'\t');
    if !bytes.iter().any(|&b| special(b)) {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() + 8);
    for &b in bytes {
        match b {
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\t' if tab => out.extend_from_slice(b"\\t"),
            b => out.push(b),
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A reader that hashes and counts everything read through it.
pub struct HashingReader<R> {
    inner: R,
    hash: Sha256,
    read: u64,
}

impl<R: io::Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hash: Sha256::new(),
            read: 0,
        }
    }

    /// The digest of what was read so far.
    pub fn digest(&self) -> Digest {
        Digest::from_raw(self.hash.clone().finalize().into())
    }

    /// How many bytes were read so far.
    pub fn count(&self) -> u64 {
        self.read
    }

    /// Reads the rest (what follows a tar's end counts too), then gives
    /// the digest of everything and its size.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((Digest::from_raw(self.hash.finalize().into()), self.read))
    }
}

impl<R: io::Read> io::Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_refuses_bad_digests() {
        assert!(Digest::parse(&format!("sha256:{}", "a".repeat(64))).is_some());
        assert!(Digest::parse(&format!("sha256:{}", "A".repeat(64))).is_none());
        assert!(Digest::parse(&format!("sha512:{}", "a".repeat(64))).is_none());
        assert!(Digest::parse("sha256:abc").is_none());
    }

    #[test]
    fn hashing_writer_matches_digest_of() {
        let mut w = HashingWriter::new(Vec::new());
        w.write_all(b"hello").unwrap();
        let (d, n, inner) = w.finish();
        assert_eq!(d, Digest::of(b"hello"));
        assert_eq!(n, 5);
        assert_eq!(inner, b"hello");
    }
}
