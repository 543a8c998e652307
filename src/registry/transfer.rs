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
    pull_selected(client, reference, store, names, |sel| {
        sel.platform = platform.cloned()
    })
}

/// [`pull`] of a whole image index: every platform's manifest and the
/// index itself are kept (`kiln pull --all-platforms`).
pub fn pull_all_platforms(
    client: &Arc<Client>,
    reference: &Reference,
    store: &Store,
    names: &[String],
) -> Result<Option<Descriptor>, Error> {
    pull_selected(client, reference, store, names, |sel| {
        sel.all_platforms = true
    })
}

/// The one pull: the reference's image into `store` under `names`, with
/// what `narrow` sets of the selection (a platform, or all of them).
fn pull_selected(
    client: &Arc<Client>,
    reference: &Reference,
    store: &Store,
    names: &[String],
    narrow: impl FnOnce(&mut Selection),
) -> Result<Option<Descriptor>, Error> {
    let Some(src) = RegistrySource::open(client.clone(), reference)? else {
        return Ok(None);
    };
    let mut sel = Selection {
        image: Some(src.descriptor().clone()),
        names: names.to_vec(),
        ..Default::default()
    };
    narrow(&mut sel);
    let copied = copy(&src, store, &sel)?;
    Ok(copied.images.into_iter().next().map(|(d, _)| d))
}

/// Where to look for images a build or `kiln pull` fetches: Docker Hub
/// mirrors (tried first for `docker.io` images) and plain HTTP.
#[derive(Clone, Debug, Default)]
pub struct Sources {
    pub mirrors: Vec<String>,
    pub insecure: bool,
}

impl Sources {
    /// The mirrors given, then `$KILN_REGISTRY_MIRRORS` (comma-separated).
    pub fn new(mirrors: &[String], insecure: bool) -> Sources {
        let env = std::env::var("KILN_REGISTRY_MIRRORS").unwrap_or_default();
        let mirrors = mirrors
            .iter()
            .map(String::as_str)
            .chain(env.split([',', ' ']).filter(|m| !m.is_empty()))
            .map(|m| {
                m.trim_start_matches("https://")
                    .trim_start_matches("http://")
                    .trim_end_matches('/')
                    .to_string()
            })
            .collect();
        Sources { mirrors, insecure }
    }

    /// The hosts to try for `r`, in order, each with whether it speaks plain HTTP.
    pub fn hosts(&self, r: &Reference) -> Vec<(String, bool)> {
        let mut out: Vec<(String, bool)> = Vec::new();
        if r.is_docker_hub() {
            out.extend(self.mirrors.iter().map(|m| (m.clone(), self.insecure)));
            out.push((r.api_host().to_string(), false));
        } else {
            out.push((r.api_host().to_string(), self.insecure));
        }
        out
    }
}

/// Pulls `r` from the first host of `sources` that has it (a failing
/// mirror is skipped with a warning, as Docker does) into `store` under
/// `names`. `Ok(None)`: no host has it; the list says what each answered.
pub fn pull_any(
    r: &Reference,
    sources: &Sources,
    store: &Store,
    names: &[String],
    all_platforms: bool,
) -> Result<Result<Descriptor, Vec<String>>, Error> {
    let hosts = sources.hosts(r);
    let mut tried = Vec::new();
    for (i, (host, insecure)) in hosts.iter().enumerate() {
        let client = Arc::new(Client::new(host, *insecure));
        let got = if all_platforms {
            pull_all_platforms(&client, r, store, names)
        } else {
            pull(&client, r, store, names, None)
        };
        match got {
            Ok(Some(d)) => return Ok(Ok(d)),
            Ok(None) => tried.push(format!("{host}: no such image")),
            Err(e) if i + 1 < hosts.len() => {
                eprintln!("kiln: warning: mirror {host}: {e}; trying the next");
                tried.push(format!("{host}: {e}"));
            }
            Err(e) => {
                store.abandon();
                return Err(e);
            }
        }
    }
    Ok(Err(tried))
}
