//! Sinks: every place kiln writes an image to, behind one trait. A sink
//! takes blobs (each verified as it is read from its source), manifests,
//! and at the end a commit that names the images and makes them visible at
//! once: a store ([`crate::store::Store`]), the output files ([`Output`]: OCI
//! layout, OCI archive, docker-archive, `image.tar.zst`), or a registry
//! ([`RegistrySink`]).

mod archive;
pub mod file;
mod registry;

use std::io::Read;
use std::path::PathBuf;

pub use archive::{index_json, Format, Output, OCI_LAYOUT};
pub use registry::{PushReport, RegistrySink};

use crate::image::Descriptor;
use crate::source::{BlobFile, Error, Source, Verified};

/// Where a blob's bytes come from.
#[derive(Clone, Copy)]
pub enum BlobData<'a> {
    Source(&'a dyn Source),
    Bytes(&'a [u8]),
}

/// A blob on its way into a sink.
#[derive(Clone, Copy)]
pub struct Blob<'a> {
    pub desc: &'a Descriptor,
    pub data: BlobData<'a>,
}

impl<'a> Blob<'a> {
    /// Its bytes, verified against the descriptor as they are read.
    pub fn reader(&self) -> Result<Verified<Box<dyn Read + Send + 'a>>, Error> {
        match self.data {
            BlobData::Source(s) => s.open_verified(self.desc),
            BlobData::Bytes(b) => Ok(Verified::new(Box::new(b), self.desc)),
        }
    }

    /// Where the bytes lie on disk, if they do (not yet verified).
    pub fn file(&self) -> Option<BlobFile> {
        match self.data {
            BlobData::Source(s) => s.blob_file(self.desc),
            BlobData::Bytes(_) => None,
        }
    }

    /// The source, for messages.
    pub fn from(&self) -> PathBuf {
        match self.data {
            BlobData::Source(s) => s.location(),
            BlobData::Bytes(_) => PathBuf::from("(memory)"),
        }
    }
}

/// Something kiln writes images to.
pub trait Sink: Send + Sync {
    /// The file, directory or URL, for messages.
    fn location(&self) -> PathBuf;

    /// Whether the sink already holds the blob (it is then not sent).
    fn has_blob(&self, d: &Descriptor) -> Result<bool, Error>;

    /// Stores a blob; a blob whose bytes do not match its descriptor is an
    /// error and leaves nothing.
    fn put_blob(&self, blob: Blob<'_>) -> Result<(), Error>;

    /// Stores a manifest or index (after every blob it names).
    fn put_manifest(&self, d: &Descriptor, bytes: &[u8]) -> Result<(), Error> {
        self.put_blob(Blob {
            desc: d,
            data: BlobData::Bytes(bytes),
        })
    }

    /// Whether blobs may be put from several threads at once.
    fn parallel(&self) -> bool {
        false
    }

    /// Names the images and makes everything visible at once.
    fn commit(&self, images: &[(Descriptor, Vec<String>)]) -> Result<(), Error>;
}
