//! Push and pull: each one [`crate::copy()`] between a registry and another
//! source or sink.

use std::sync::Arc;

use super::{Client, Error};
use crate::copy::{copy, Selection};
use crate::image::{Descriptor, Platform, Reference};
use crate::sink::{PushReport, RegistrySink};
use crate::source::{RegistrySource, Source};
use crate::store::Store;

/// How to push.
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// Upload in PATCH chunks of this many bytes (0: one PUT per blob).
    pub chunk: u64,
    /// Repositories of the same registry to mount missing blobs from.
    pub mount_from: Vec<String>,
}

/// Pushes the image `desc` of `src` (a whole index with every platform) to
/// `repo` under `tags` (and by digest).
pub fn push(
    client: &Arc<Client>,
    src: &dyn Source,
    desc: &Descriptor,
    repo: &str,
    tags: &[String],
    opts: &PushOptions,
) -> Result<PushReport, Error> {
    let mut sink = RegistrySink::new(client.clone(), repo, tags);
    sink.chunk = opts.chunk;
    sink.mount_from = opts.mount_from.clone();
    let sel = Selection {
        image: Some(desc.bare()),
        all_platforms: true,
        ..Default::default()
    };
    copy(src, &sink, &sel)?;
    Ok(sink.report())
}

/// Pulls `reference` of the registry `client` talks to into `store`
/// (every blob verified), narrowed to `platform` (else the host's), and
/// names it `names` there. Returns the manifest descriptor, or None if
/// the registry does not have the reference.
pub fn pull(
    client: &Arc<Client>,
    reference: &Reference,
    store: &Store,
    names: &[String],
    platform: Option<&Platform>,
) -> Result<Option<Descriptor>, Error> {
    let Some(src) = RegistrySource::open(client.clone(), reference)? else {
        return Ok(None);
    };
    let sel = Selection {
        image: Some(src.descriptor().clone()),
        names: names.to_vec(),
        platform: platform.cloned(),
        ..Default::default()
    };
    let copied = copy(&src, store, &sel)?;
    Ok(copied.images.into_iter().next().map(|(d, _)| d))
}
