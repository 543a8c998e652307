//! Images on local disk. [`ImageReader`] reads one image in any format kiln
//! writes or imports; [`Store`] is an OCI image layout used as a store of
//! named base images (`vendor-images/`, `--store DIR`, `$KILN_STORE`, the
//! user cache), and [`Stores`] searches them in order to resolve a `FROM`.
//! Every blob read from either is verified against its digest and size.

mod layout;
mod reader;
mod reference;

use std::io;
use std::path::PathBuf;

pub use layout::{layer_reader, parse_platform, BaseImage, Listed, Store, Stores};
pub use reader::{decompressed, is_index, ImageReader, Summary};
pub use reference::Reference;

/// Errors reading an image or a store.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: {what} is missing from the image", path.display())]
    Missing { path: PathBuf, what: String },
    #[error("{}: blob {digest} does not match its digest or size (got {got}, {size} bytes); the image is corrupt: re-import it (kiln store add) or restore the file", path.display())]
    BadBlob {
        path: PathBuf,
        digest: String,
        got: String,
        size: u64,
    },
    #[error("{}: {what} is not valid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        what: String,
        source: serde_json::Error,
    },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("{message}")]
    NotFound { message: String },
}
