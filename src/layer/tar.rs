//! Tar headers built by hand, byte for byte, so that the archives kiln writes
//! depend on nothing but their inputs.
//!
//! Two dialects are written. Layers use POSIX ustar with PAX extended headers
//! for what ustar cannot hold (long names and link targets, sizes of 8 GiB and
//! more), as Go's `archive/tar` and therefore Docker do. The taskgraph context
//! archive reproduces what Python's `tarfile` writes in `GNU_FORMAT` under
//! taskgraph's `HackedType` (devmajor/devminor written as octal zeros),
//! including `././@LongLink` entries for names over 100 bytes.

use std::io::{self, Write};

/// Size of one tar block.
pub const BLOCK: usize = 512;
/// Python's `tarfile` pads the whole archive to this record size.
pub const RECORD: u64 = 20 * 512;

/// The kind of a tar entry, as its type flag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    HardLink,
    Symlink,
    Dir,
}

impl Kind {
    fn flag(self) -> u8 {
        match self {
            Kind::File => b'0',
            Kind::HardLink => b'1',
            Kind::Symlink => b'2',
            Kind::Dir => b'5',
        }
    }
}

/// Everything one header says about an entry.
#[derive(Clone, Debug)]
pub struct Header<'a> {
    pub name: &'a [u8],
    pub kind: Kind,
    /// Permission bits (and setuid/setgid/sticky); the file type comes from `kind`.
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub size: u64,
    pub mtime: u64,
    pub link: &'a [u8],
}

/// Writes `n` as `digits - 1` octal digits and a NUL, or `None` when it does not fit.
fn octal(field: &mut [u8], n: u64) -> bool {
    let digits = field.len() - 1;
    let s = format!("{n:0digits$o}");
    if s.len() > digits {
        return false;
    }
    field[..digits].copy_from_slice(s.as_bytes());
    field[digits] = 0;
    true
}

/// GNU base-256 encoding for numbers too large for octal (Python's `itn` in GNU format).
fn base256(field: &mut [u8], mut n: u64) {
    let len = field.len();
    field.fill(0);
    field[0] = 0o200;
    for i in (1..len).rev() {
        field[i] = (n & 0xff) as u8;
        n >>= 8;
    }
}

fn put_str(field: &mut [u8], s: &[u8]) {
    let n = s.len().min(field.len());
    field[..n].copy_from_slice(&s[..n]);
}

fn checksum(block: &mut [u8; BLOCK]) {
    block[148..156].fill(b' ');
    let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
    let s = format!("{sum:06o}\0 ");
    block[148..156].copy_from_slice(s.as_bytes());
}

/// The fixed fields shared by both dialects. Returns false if a number does not fit in octal.
fn fill_common(block: &mut [u8; BLOCK], h: &Header<'_>, flag: u8) -> bool {
    put_str(&mut block[0..100], h.name);
    let mut fits = octal(&mut block[100..108], u64::from(h.mode & 0o7777));
    fits &= octal(&mut block[108..116], h.uid);
    fits &= octal(&mut block[116..124], h.gid);
    fits &= octal(&mut block[124..136], h.size);
    fits &= octal(&mut block[136..148], h.mtime);
    block[156] = flag;
    put_str(&mut block[157..257], h.link);
    fits
}

/// One PAX record: `"<len> <key>=<value>\n"` where len counts the whole record.
fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let body = key.len() + value.len() + 3; // ' ', '=', '\n'
    let mut len = body + 1;
    while len.to_string().len() + body != len {
        len = body + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Writes the header (and any PAX extended header it needs) of a layer entry.
pub fn write_ustar<W: Write>(w: &mut W, h: &Header<'_>) -> io::Result<u64> {
    write_ustar_pax(w, h, &[])
}

/// [`write_ustar`] with extra PAX records (`SCHILY.xattr.NAME` for
/// extended attributes), written in the order given.
pub fn write_ustar_pax<W: Write>(
    w: &mut W,
    h: &Header<'_>,
    extra: &[(String, Vec<u8>)],
) -> io::Result<u64> {
    let mut pax = Vec::new();
    for (k, v) in extra {
        pax_record(&mut pax, k, v);
    }
    if h.name.len() > 100 {
        pax_record(&mut pax, "path", h.name);
    }
    if h.link.len() > 100 {
        pax_record(&mut pax, "linkpath", h.link);
    }
    if h.size >= 8u64.pow(11) {
        pax_record(&mut pax, "size", h.size.to_string().as_bytes());
    }
    let mut written = 0;
    if !pax.is_empty() {
        let ph = Header {
            name: b"././@PaxHeader",
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: pax.len() as u64,
            mtime: h.mtime,
            link: b"",
        };
        written += write_ustar_block(w, &ph, b'x')?;
        w.write_all(&pax)?;
        written += pax.len() as u64;
        written += pad(w, pax.len() as u64)?;
    }
    written += write_ustar_block(w, h, h.kind.flag())?;
    Ok(written)
}

fn write_ustar_block<W: Write>(w: &mut W, h: &Header<'_>, flag: u8) -> io::Result<u64> {
    let mut block = [0u8; BLOCK];
    let size = if h.size >= 8u64.pow(11) { 0 } else { h.size };
    let hh = Header { size, ..h.clone() };
    if !fill_common(&mut block, &hh, flag) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "tar header field out of range for {}",
                String::from_utf8_lossy(h.name)
            ),
        ));
    }
    block[257..263].copy_from_slice(b"ustar\0");
    block[263..265].copy_from_slice(b"00");
    octal(&mut block[329..337], 0);
    octal(&mut block[337..345], 0);
    checksum(&mut block);
    w.write_all(&block)?;
    Ok(BLOCK as u64)
}

/// One ustar header block, never more: sizes of 8 GiB and more use GNU's
/// base-256 size field (which Go's archive/tar, and so Docker, reads). For
/// headers written into space reserved before the size was known.
pub fn ustar_block(h: &Header<'_>) -> io::Result<[u8; BLOCK]> {
    let mut block = [0u8; BLOCK];
    if h.name.len() > 100 || h.link.len() > 100 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "name too long for a single ustar block",
        ));
    }
    if !fill_common(&mut block, h, h.kind.flag()) {
        base256(&mut block[124..136], h.size);
    }
    block[257..263].copy_from_slice(b"ustar\0");
    block[263..265].copy_from_slice(b"00");
    octal(&mut block[329..337], 0);
    octal(&mut block[337..345], 0);
    checksum(&mut block);
    Ok(block)
}

/// Writes a header exactly as taskgraph's Python `tarfile` (GNU format) does,
/// with a `././@LongLink` entry first for names over 100 bytes.
pub fn write_gnu<W: Write>(w: &mut W, h: &Header<'_>) -> io::Result<u64> {
    let mut written = 0;
    if h.name.len() > 100 {
        let mut long = h.name.to_vec();
        long.push(0);
        let mut block = [0u8; BLOCK];
        let lh = Header {
            name: b"././@LongLink",
            kind: Kind::File,
            mode: 0,
            uid: 0,
            gid: 0,
            size: long.len() as u64,
            mtime: 0,
            link: b"",
        };
        fill_common(&mut block, &lh, b'L');
        block[257..265].copy_from_slice(b"ustar  \0");
        // taskgraph's TarInfo subclass wraps every header's type, the
        // long-link one included, so its device fields are octal zeros too.
        octal(&mut block[329..337], 0);
        octal(&mut block[337..345], 0);
        checksum(&mut block);
        w.write_all(&block)?;
        w.write_all(&long)?;
        written += BLOCK as u64 + long.len() as u64 + pad(w, long.len() as u64)?;
    }
    let mut block = [0u8; BLOCK];
    if !fill_common(&mut block, h, h.kind.flag()) {
        // Python's itn falls back to base-256 for GNU format.
        base256(&mut block[124..136], h.size);
    }
    block[257..265].copy_from_slice(b"ustar  \0");
    octal(&mut block[329..337], 0);
    octal(&mut block[337..345], 0);
    checksum(&mut block);
    w.write_all(&block)?;
    Ok(written + BLOCK as u64)
}

/// Pads after `len` bytes of entry data to the next block boundary.
pub fn pad<W: Write>(w: &mut W, len: u64) -> io::Result<u64> {
    let rem = (len % BLOCK as u64) as usize;
    if rem == 0 {
        return Ok(0);
    }
    let zeros = [0u8; BLOCK];
    w.write_all(&zeros[..BLOCK - rem])?;
    Ok((BLOCK - rem) as u64)
}

/// Writes the end-of-archive marker (two zero blocks).
pub fn finish<W: Write>(w: &mut W) -> io::Result<u64> {
    w.write_all(&[0u8; 2 * BLOCK])?;
    Ok(2 * BLOCK as u64)
}

/// Pads a whole archive of `len` bytes to a multiple of [`RECORD`], as Python's `tarfile` does.
pub fn pad_record<W: Write>(w: &mut W, len: u64) -> io::Result<u64> {
    let rem = len % RECORD;
    if rem == 0 {
        return Ok(0);
    }
    let n = (RECORD - rem) as usize;
    w.write_all(&vec![0u8; n])?;
    Ok(n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(name: &[u8], size: u64) -> Header<'_> {
        Header {
            name,
            kind: Kind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size,
            mtime: 0,
            link: b"",
        }
    }

    #[test]
    fn ustar_header_reads_back_with_tar_crate() {
        let mut buf = Vec::new();
        write_ustar(&mut buf, &header(b"a/b.txt", 3)).unwrap();
        buf.extend_from_slice(b"abc");
        pad(&mut buf, 3).unwrap();
        finish(&mut buf).unwrap();
        let mut ar = tar::Archive::new(&buf[..]);
        let e = ar.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path_bytes().as_ref(), b"a/b.txt");
        assert_eq!(e.header().mode().unwrap(), 0o644);
        assert_eq!(e.header().size().unwrap(), 3);
        assert_eq!(&buf[257..265], b"ustar\x0000");
    }

    #[test]
    fn long_names_get_a_pax_path_record() {
        let name = vec![b'n'; 150];
        let mut buf = Vec::new();
        write_ustar(&mut buf, &header(&name, 0)).unwrap();
        finish(&mut buf).unwrap();
        assert_eq!(buf[156], b'x');
        let mut ar = tar::Archive::new(&buf[..]);
        let e = ar.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(e.path_bytes().as_ref(), &name[..]);
    }

    #[test]
    fn pax_record_length_counts_itself() {
        let mut out = Vec::new();
        pax_record(&mut out, "path", &[b'x'; 93]);
        // 3 digits + ' ' + "path=" + 93 + '\n' = 103
        assert!(out.starts_with(b"103 path="));
        assert_eq!(out.len(), 103);
    }

    #[test]
    fn gnu_long_name_uses_longlink() {
        let name = vec![b'n'; 120];
        let mut buf = Vec::new();
        write_gnu(&mut buf, &header(&name, 0)).unwrap();
        assert_eq!(&buf[..13], b"././@LongLink");
        assert_eq!(buf[156], b'L');
        assert_eq!(&buf[257..265], b"ustar  \0");
        // both headers carry octal-zero device fields (taskgraph's HackedType)
        assert_eq!(&buf[329..345], b"0000000\x000000000\x00");
        assert_eq!(&buf[1024 + 329..1024 + 345], b"0000000\x000000000\x00");
    }

    #[test]
    fn huge_sizes_use_pax_in_ustar_and_base256_in_gnu() {
        let big = 9 * (1u64 << 30);
        let mut buf = Vec::new();
        write_ustar(&mut buf, &header(b"big", big)).unwrap();
        assert_eq!(buf[156], b'x');
        let mut g = Vec::new();
        write_gnu(&mut g, &header(b"big", big)).unwrap();
        assert_eq!(g[124], 0o200);
        assert_eq!(u64::from_be_bytes(g[128..136].try_into().unwrap()), big);
    }
}
