//! What a build needs to know of a base layer without its file contents:
//! every member's path, kind, mode and owner (and the bytes of the small
//! user databases), whiteouts and opaque directories. Scanning a layer
//! means decompressing all of it; a 50 MB gzip Debian base costs 0.2 s.
//!
//! So a scan of a store blob (a file named by its sha256) is done once: the
//! same pass hashes the compressed bytes and checks them against the name,
//! and the result is recorded in kiln's cache (`scans/<sha256>`) with the
//! blob file's device, inode, size, mtime and ctime. While those are
//! unchanged the record stands for both the scan and the verification
//! ([`trusted`]): a warm build reads no base layer to plan its steps.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"KILNSC02";
/// Records larger than this are not trusted (a scan of a huge layer with
/// many files is still far below it).
const MAX_RECORD: u64 = 256 << 20;

/// The user databases a scan keeps the bytes of.
pub const SMALL: &[&[u8]] = &[b"etc/passwd", b"etc/group"];

/// What one member is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Dir,
    Symlink(Vec<u8>),
    /// A hard link to `target` (same layer); `size` is the target's.
    HardLink {
        target: Vec<u8>,
        size: u64,
    },
    /// A regular file (its bytes stay in the blob).
    File {
        size: u64,
    },
    /// A small user database, with its bytes.
    Small(Vec<u8>),
}

/// One member of a layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub path: Vec<u8>,
    pub kind: Kind,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
}

/// A scanned layer, in archive order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scan {
    pub members: Vec<Member>,
    pub whiteouts: Vec<Vec<u8>>,
    pub opaque: Vec<Vec<u8>>,
    /// The sha256 of the uncompressed stream (the layer's diff_id), where
    /// the whole blob was read ([`scan`] always sets it).
    pub diff_id: Option<crate::Digest>,
}

fn records() -> PathBuf {
    crate::cache_dir().join("scans")
}

/// The digest a store blob's file name says it has.
fn named_digest(blob: &Path) -> Option<String> {
    let name = blob.file_name()?.to_str()?;
    (name.len() == 64 && name.bytes().all(|c| c.is_ascii_hexdigit())).then(|| name.to_string())
}

fn stamp(md: &fs::Metadata) -> [u64; 5] {
    [
        md.dev(),
        md.ino(),
        md.len(),
        (md.mtime() * 1_000_000_000 + md.mtime_nsec()) as u64,
        (md.ctime() * 1_000_000_000 + md.ctime_nsec()) as u64,
    ]
}

/// A store blob's hex digest (its name) and its own metadata (never that
/// of what a link in its place points to).
fn own_blob(blob: &Path) -> Option<(String, fs::Metadata)> {
    let hex = named_digest(blob)?;
    let md = fs::symlink_metadata(blob).ok().filter(|m| m.is_file())?;
    Some((hex, md))
}

/// Bytes of a record's header: magic and the blob's stamp.
const RECORD_HEAD: usize = 8 + 40;

/// Whether a record's header names this very file (same stamp).
fn stamped(head: &[u8], md: &fs::Metadata) -> bool {
    head.len() >= RECORD_HEAD
        && &head[..8] == MAGIC
        && head[8..RECORD_HEAD]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .eq(stamp(md))
}

/// The recorded scan of `blob`, if there is one for this very file.
fn recorded(blob: &Path) -> Option<Scan> {
    let (hex, md) = own_blob(blob)?;
    let path = records().join(&hex);
    if fs::metadata(&path).ok()?.len() > MAX_RECORD {
        return None;
    }
    let bytes = fs::read(&path).ok()?;
    if !stamped(&bytes, &md) {
        return None;
    }
    decode(&mut Reader {
        b: &bytes,
        at: RECORD_HEAD,
    })
}

/// Whether `blob` (a store blob named by its sha256, `size` bytes long)
/// was verified by a scan whose record still matches the file.
pub fn trusted(blob: &Path, size: u64) -> bool {
    let Some((hex, md)) = own_blob(blob).filter(|(_, md)| md.len() == size) else {
        return false;
    };
    let mut head = [0u8; RECORD_HEAD];
    fs::File::open(records().join(hex))
        .and_then(|f| f.take(RECORD_HEAD as u64).read_exact(&mut head))
        .is_ok()
        && stamped(&head, &md)
}

/// Scans `blob` (a layer, compressed or not), from its record when one
/// matches the file. A store blob is verified against its name in the
/// same pass, and the result recorded.
pub fn scan(blob: &Path) -> io::Result<Scan> {
    if let Some(s) = recorded(blob) {
        return Ok(s);
    }
    // Never through a link, as the store's own reads.
    let file = match crate::fsx::open_own_file(blob) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let what =
                named_digest(blob).map_or("the layer blob".into(), |h| format!("blob sha256:{h}"));
            return Err(io::Error::new(
                e.kind(),
                format!("{}: {what} is missing from the image", blob.display()),
            ));
        }
        Err(e) => return Err(e),
    };
    let before = file.metadata()?;
    let mut head = [0u8; 4];
    let n = (&file).read(&mut head)?;
    io::Seek::seek(&mut (&file), io::SeekFrom::Start(0))?;
    let hashing = crate::digest::HashingReader::new(io::BufReader::with_capacity(1 << 20, file));
    let shared = std::sync::Arc::new(std::sync::Mutex::new(Some(hashing)));
    let reader = Shared(shared.clone());
    let decoder = crate::source::decoder(
        crate::source::sniff(&head[..n]),
        reader,
        &blob.display().to_string(),
    )?;
    let mut uncompressed = crate::digest::HashingReader::new(decoder);
    let scanned = scan_reader(&mut uncompressed);
    let diff_id = uncompressed.finish().map(|(d, _)| d);
    let Some(h) = shared.lock().map_err(|_| io::Error::other("scan"))?.take() else {
        return scanned;
    };
    // Whatever follows the tar's end (padding, the compressor's trailer)
    // counts too.
    let (whole, _) = h.finish()?;
    let Some(hex) = named_digest(blob) else {
        return scanned;
    };
    // A damaged blob is reported as such, whatever the tar reader made of it.
    let got = whole.hex().to_string();
    if got != hex {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{}: blob sha256:{hex} does not match its digest or size (got sha256:{got}, {} bytes); the image is corrupt: re-import it (kiln store add) or restore the file",
                blob.display(),
                before.len()
            ),
        ));
    }
    let mut s = scanned?;
    s.diff_id = Some(diff_id?);
    s.members.shrink_to_fit();
    let after = fs::symlink_metadata(blob)?;
    if stamp(&before) == stamp(&after) {
        let _ = record(&hex, &after, &s);
    }
    Ok(s)
}

/// The hashing reader, shared so its digest can be taken after the
/// decoder (which owns its reader) is done.
struct Shared(
    std::sync::Arc<std::sync::Mutex<Option<crate::digest::HashingReader<io::BufReader<fs::File>>>>>,
);

impl Read for Shared {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut g = self.0.lock().map_err(|_| io::Error::other("scan"))?;
        match g.as_mut() {
            Some(h) => h.read(buf),
            None => Ok(0),
        }
    }
}

fn record(hex: &str, md: &fs::Metadata, s: &Scan) -> io::Result<()> {
    let mut out = Vec::with_capacity(64 + s.members.len() * 64);
    out.extend_from_slice(MAGIC);
    for v in stamp(md) {
        out.extend_from_slice(&v.to_le_bytes());
    }
    encode(s, &mut out);
    let dir = records();
    fs::create_dir_all(&dir)?;
    crate::sink::file::write_atomic(&dir.join(hex), &out).map_err(io::Error::other)
}

/// What an OCI whiteout member of a layer means.
pub enum Marker {
    /// `DIR/.wh..wh..opq`: DIR hides what lower layers hold under it.
    Opaque(Vec<u8>),
    /// `DIR/.wh.NAME`: DIR/NAME is deleted.
    Whiteout(Vec<u8>),
}

/// The whiteout a member's (cleaned) path stands for, if it is one.
pub fn marker(path: &[u8]) -> Option<Marker> {
    let (dir, base) = match path.iter().rposition(|&c| c == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&b""[..], path),
    };
    if base == b".wh..wh..opq" {
        return Some(Marker::Opaque(dir.to_vec()));
    }
    let name = base.strip_prefix(b".wh.")?;
    let mut p = dir.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    Some(Marker::Whiteout(p))
}

/// Reads a tar stream's members (applying nothing).
pub fn scan_reader(r: impl Read) -> io::Result<Scan> {
    use crate::dockerfile::ignore::clean as norm;
    let mut ar = tar::Archive::new(r);
    let mut s = Scan::default();
    let mut sizes: std::collections::HashMap<Vec<u8>, u64> = Default::default();
    for entry in ar.entries()? {
        let mut entry = entry?;
        let path = norm(&entry.path_bytes());
        if path.is_empty() {
            continue;
        }
        match marker(&path) {
            Some(Marker::Opaque(dir)) => {
                s.opaque.push(dir);
                continue;
            }
            Some(Marker::Whiteout(p)) => {
                s.whiteouts.push(p);
                continue;
            }
            None => {}
        }
        let h = entry.header();
        let mode = h.mode()? & 0o7777;
        let (uid, gid) = (h.uid().unwrap_or(0), h.gid().unwrap_or(0));
        let et = h.entry_type();
        let link = |e: &tar::Entry<'_, _>| -> Vec<u8> {
            e.link_name_bytes()
                .map(|l| l.into_owned())
                .unwrap_or_default()
        };
        let kind = if et.is_dir() {
            Kind::Dir
        } else if et.is_symlink() {
            Kind::Symlink(link(&entry))
        } else if et.is_hard_link() {
            let target = norm(&link(&entry));
            let size = sizes.get(&target).copied().unwrap_or(0);
            Kind::HardLink { target, size }
        } else if et.is_file() || et == tar::EntryType::Continuous {
            let size = entry.size();
            sizes.insert(path.clone(), size);
            if SMALL.contains(&path.as_slice()) && size <= crate::limits::MAX_USER_DB {
                let mut b = Vec::with_capacity(size as usize);
                entry.read_to_end(&mut b)?;
                Kind::Small(b)
            } else {
                Kind::File { size }
            }
        } else {
            // Devices and FIFOs: nothing a COPY can use.
            continue;
        };
        s.members.push(Member {
            path,
            kind,
            mode,
            uid,
            gid,
        });
    }
    Ok(s)
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

fn encode(s: &Scan, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.members.len() as u64).to_le_bytes());
    for m in &s.members {
        put_bytes(out, &m.path);
        let (tag, size, extra): (u8, u64, &[u8]) = match &m.kind {
            Kind::Dir => (0, 0, &[]),
            Kind::Symlink(t) => (1, 0, t),
            Kind::HardLink { target, size } => (2, *size, target),
            Kind::File { size } => (3, *size, &[]),
            Kind::Small(b) => (4, b.len() as u64, b),
        };
        out.push(tag);
        out.extend_from_slice(&m.mode.to_le_bytes());
        out.extend_from_slice(&m.uid.to_le_bytes());
        out.extend_from_slice(&m.gid.to_le_bytes());
        out.extend_from_slice(&size.to_le_bytes());
        put_bytes(out, extra);
    }
    for list in [&s.whiteouts, &s.opaque] {
        out.extend_from_slice(&(list.len() as u64).to_le_bytes());
        for p in list {
            put_bytes(out, p);
        }
    }
    put_bytes(
        out,
        s.diff_id.as_ref().map_or("", |d| d.as_str()).as_bytes(),
    );
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.b.get(self.at..end)?;
        self.at = end;
        Some(s)
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<Vec<u8>> {
        let n = self.u32()? as usize;
        Some(self.take(n)?.to_vec())
    }
}

fn decode(r: &mut Reader<'_>) -> Option<Scan> {
    let mut s = Scan::default();
    let n = r.u64()?;
    for _ in 0..n {
        let path = r.bytes()?;
        let tag = r.take(1)?[0];
        let mode = r.u32()?;
        let (uid, gid, size) = (r.u64()?, r.u64()?, r.u64()?);
        let extra = r.bytes()?;
        let kind = match tag {
            0 => Kind::Dir,
            1 => Kind::Symlink(extra),
            2 => Kind::HardLink {
                target: extra,
                size,
            },
            3 => Kind::File { size },
            4 => Kind::Small(extra),
            _ => return None,
        };
        s.members.push(Member {
            path,
            kind,
            mode,
            uid,
            gid,
        });
    }
    for list in [&mut s.whiteouts, &mut s.opaque] {
        let n = r.u64()?;
        for _ in 0..n {
            list.push(r.bytes()?);
        }
    }
    let d = r.bytes()?;
    if !d.is_empty() {
        s.diff_id = Some(crate::Digest::parse(std::str::from_utf8(&d).ok()?)?);
    }
    (r.at == r.b.len()).then_some(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let s = Scan {
            members: vec![
                Member {
                    path: b"etc".to_vec(),
                    kind: Kind::Dir,
                    mode: 0o755,
                    uid: 0,
                    gid: 0,
                },
                Member {
                    path: b"etc/passwd".to_vec(),
                    kind: Kind::Small(b"root:x:0:0::/root:/bin/sh\n".to_vec()),
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
                Member {
                    path: b"bin/sh".to_vec(),
                    kind: Kind::Symlink(b"busybox".to_vec()),
                    mode: 0o777,
                    uid: 1,
                    gid: 2,
                },
                Member {
                    path: b"a".to_vec(),
                    kind: Kind::HardLink {
                        target: b"b".to_vec(),
                        size: 7,
                    },
                    mode: 0o600,
                    uid: 1000,
                    gid: 1000,
                },
                Member {
                    path: b"b".to_vec(),
                    kind: Kind::File { size: 7 },
                    mode: 0o600,
                    uid: 1000,
                    gid: 1000,
                },
            ],
            whiteouts: vec![b"x/y".to_vec()],
            opaque: vec![b"z".to_vec()],
            diff_id: Some(crate::Digest::of(b"layer")),
        };
        let mut out = Vec::new();
        encode(&s, &mut out);
        let back = decode(&mut Reader { b: &out, at: 0 }).unwrap();
        assert_eq!(back, s);
        // A truncated record is no record.
        assert!(decode(&mut Reader {
            b: &out[..out.len() - 1],
            at: 0
        })
        .is_none());
    }
}
