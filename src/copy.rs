//! One `copy(source, sink, selection)` for every move of an image: `store
//! add`, `pull`, `push`, `pull -o`, the output of a build and of an index
//! hit, a parent handed to its children in `build --all`.
//!
//! It picks the images (narrowing an index to one platform unless asked to
//! keep them all), walks the blobs they need, skips those the sink already
//! has, sends the rest (in parallel where the sink allows; each verified
//! against its descriptor as it is read), then the manifests, children
//! before the index that lists them, and commits: names and visibility come
//! last, all at once.

use rayon::prelude::*;

use crate::image::{Descriptor, Platform};
use crate::sink::{Blob, BlobData, Sink};
use crate::source::{self, Error, Source};

/// Which images to copy, and under which names.
#[derive(Clone, Debug, Default)]
pub struct Selection {
    /// The image to copy; default: every image of the source (the first
    /// one only when `names` are given).
    pub image: Option<Descriptor>,
    /// Names for the copy; default: the names the source carries.
    pub names: Vec<String>,
    /// Keep a multi-platform index whole instead of narrowing it.
    pub all_platforms: bool,
    /// The platform to narrow an index to (default: the host's).
    pub platform: Option<Platform>,
}

impl Selection {
    /// The one image `d`, under `names`.
    pub fn image(d: &Descriptor, names: &[String]) -> Selection {
        Selection {
            image: Some(d.bare()),
            names: names.to_vec(),
            ..Default::default()
        }
    }
}

/// What a copy did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Copied {
    /// The images copied, with their names in the sink.
    pub images: Vec<(Descriptor, Vec<String>)>,
    /// Blobs sent, and blobs the sink already had.
    pub sent: usize,
    pub skipped: usize,
    pub bytes: u64,
}

/// Copies images from `src` to `sink` as `sel` says.
pub fn copy(src: &dyn Source, sink: &dyn Sink, sel: &Selection) -> Result<Copied, Error> {
    let out = copy_uncommitted(src, sink, sel)?;
    sink.commit(&out.images)?;
    Ok(out)
}

/// [`copy`] without the sink's commit: the caller commits
/// (`sink.commit(&copied.images)`) once everything else it waits for is done.
pub fn copy_uncommitted(
    src: &dyn Source,
    sink: &dyn Sink,
    sel: &Selection,
) -> Result<Copied, Error> {
    let mut roots = match &sel.image {
        Some(d) => vec![(d.bare(), sel.names.clone())],
        None => src.images()?,
    };
    if !sel.names.is_empty() {
        roots.truncate(1);
        if let Some(first) = roots.first_mut() {
            first.1 = sel.names.clone();
        }
    }
    let mut out = Copied::default();
    for (root, names) in roots {
        let root = if sel.all_platforms {
            root
        } else {
            // Only the manifest is read here: the config is read once, when
            // it is copied.
            source::narrow(src, &root, sel.platform.as_ref())?.0
        };
        let closure = source::closure(src, &root)?;
        let mut todo = Vec::new();
        for b in &closure.blobs {
            if sink.has_blob(b)? {
                out.skipped += 1;
            } else {
                todo.push(b);
            }
        }
        let put = |d: &&Descriptor| {
            sink.put_blob(Blob {
                desc: d,
                data: BlobData::Source(src),
            })
        };
        if sink.parallel() {
            todo.par_iter().try_for_each(put)?;
        } else {
            todo.iter().try_for_each(put)?;
        }
        out.sent += todo.len();
        out.bytes += todo.iter().map(|d| d.size).sum::<u64>();
        for (d, bytes) in closure.manifests.iter().rev() {
            sink.put_manifest(d, bytes)?;
        }
        out.images.push((root, names));
    }
    Ok(out)
}
