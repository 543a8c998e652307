//! Layer compression: multithreaded zstd (its bytes do not depend on the
//! worker count), gzip through flate2's zlib-rs backend with a fixed header,
//! or none. Each compressor names itself for the manifest annotation.

use std::io::{self, Write};

/// The zstd multithreaded job size: part of the compressed bytes' definition.
pub const ZSTD_JOB_SIZE: u32 = 4 << 20;

/// A layer compression choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    Zstd(i32),
    Gzip(u32),
    None,
}

impl Compression {
    /// The OCI media type of a layer compressed this way.
    pub fn media_type(self) -> crate::image::MediaType {
        crate::image::MediaType::oci_layer(match self {
            Compression::Zstd(_) => crate::image::Codec::Zstd,
            Compression::Gzip(_) => crate::image::Codec::Gzip,
            Compression::None => crate::image::Codec::None,
        })
    }

    /// The compressor's name, library version and level, or `None` for no compression.
    pub fn describe(self) -> Option<String> {
        match self {
            Compression::Zstd(l) => Some(format!(
                "zstd {} level {l} (multithreaded encoder)",
                zstd::zstd_safe::version_string()
            )),
            Compression::Gzip(l) => Some(format!("gzip flate2/zlib-rs level {l}")),
            Compression::None => None,
        }
    }

    /// Wraps `w` in this compressor.
    pub fn writer<'a, W: Write + 'a>(self, w: W) -> io::Result<Compressor<'a, W>> {
        Ok(match self {
            Compression::Zstd(level) => {
                let mut enc = zstd::stream::write::Encoder::new(w, level)?;
                // --jobs sizes the rayon pool; the bytes do not depend on the worker count.
                let workers = rayon::current_num_threads() as u32;
                enc.multithread(workers.max(1))?;
                // A fixed job size bounds the encoder's memory (a few jobs in
                // flight per worker) and, like the worker count, keeps the bytes
                // independent of the machine.
                enc.set_parameter(zstd::zstd_safe::CParameter::JobSize(ZSTD_JOB_SIZE))?;
                Compressor::Zstd(enc)
            }
            Compression::Gzip(level) => Compressor::Gzip(
                flate2::GzBuilder::new()
                    .mtime(0)
                    .operating_system(255)
                    .write(w, flate2::Compression::new(level)),
            ),
            Compression::None => Compressor::None(w),
        })
    }
}

/// A running compressor; call [`Compressor::finish`] to get the inner writer back.
pub enum Compressor<'a, W: Write> {
    Zstd(zstd::stream::write::Encoder<'a, W>),
    Gzip(flate2::write::GzEncoder<W>),
    None(W),
}

impl<W: Write> Compressor<'_, W> {
    /// Flushes the compressed stream's end and returns the inner writer.
    pub fn finish(self) -> io::Result<W> {
        match self {
            Compressor::Zstd(e) => e.finish(),
            Compressor::Gzip(e) => e.finish(),
            Compressor::None(w) => Ok(w),
        }
    }
}

impl<W: Write> Write for Compressor<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Compressor::Zstd(e) => e.write(buf),
            Compressor::Gzip(e) => e.write(buf),
            Compressor::None(w) => w.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Compressor::Zstd(e) => e.flush(),
            Compressor::Gzip(e) => e.flush(),
            Compressor::None(w) => w.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gzip_header_has_no_mtime_or_name() {
        let mut c = Compression::Gzip(6).writer(Vec::new()).unwrap();
        c.write_all(b"x").unwrap();
        let out = c.finish().unwrap();
        assert_eq!(&out[..4], &[0x1f, 0x8b, 8, 0]);
        assert_eq!(&out[4..8], &[0, 0, 0, 0]);
    }

    #[test]
    fn zstd_round_trips() {
        let data = vec![7u8; 100_000];
        let mut c = Compression::Zstd(3).writer(Vec::new()).unwrap();
        c.write_all(&data).unwrap();
        let out = c.finish().unwrap();
        assert_eq!(zstd::decode_all(&out[..]).unwrap(), data);
    }
}
