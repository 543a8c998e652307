//! Push an image to a registry and pull one into a store.

use std::io::{BufWriter, Write};

use super::{Client, Error, Payload};
use crate::image::{Descriptor, Index, Manifest, MEDIA_MANIFEST};
use crate::store::{is_index, ImageReader, Store};

/// How to push.
#[derive(Clone, Debug, Default)]
pub struct PushOptions {
    /// Upload in PATCH chunks of this many bytes (0: one PUT per blob).
    pub chunk: u64,
    /// Repositories of the same registry to mount missing blobs from.
    pub mount_from: Vec<String>,
}

/// What a push did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PushReport {
    pub repository: String,
    pub manifest_digest: String,
    pub tags: Vec<String>,
    /// Blobs sent, blobs the repository already had, blobs mounted.
    pub uploaded: u64,
    pub present: u64,
    pub mounted: u64,
    pub bytes_uploaded: u64,
}

fn is_manifest_type(d: &Descriptor) -> bool {
    is_index(d)
        || d.media_type == MEDIA_MANIFEST
        || d.media_type == crate::image::MEDIA_DOCKER_MANIFEST
}

/// Pushes the image `desc` of `src` to `repo` under `tags` (and by digest).
pub fn push(
    client: &Client,
    src: &ImageReader,
    desc: &Descriptor,
    repo: &str,
    tags: &[String],
    opts: &PushOptions,
) -> Result<PushReport, Error> {
    let closure = src.closure(desc)?;
    let mut report = PushReport {
        repository: repo.to_string(),
        manifest_digest: desc.digest.clone(),
        tags: tags.to_vec(),
        ..Default::default()
    };
    let mut seen = std::collections::BTreeSet::new();
    let mut manifests: Vec<&Descriptor> = Vec::new();
    let mut blobs: Vec<&Descriptor> = Vec::new();
    for (i, d) in closure.iter().enumerate() {
        if !seen.insert(d.digest.clone()) {
            continue;
        }
        if i == 0 || is_manifest_type(d) {
            manifests.push(d);
        } else {
            blobs.push(d);
        }
    }
    for b in blobs {
        if client.blob_exists(repo, &b.digest)? {
            report.present += 1;
            continue;
        }
        let mut location = None;
        let mut mounted = false;
        for from in opts.mount_from.iter().filter(|f| f.as_str() != repo) {
            match client.start_upload(repo, &b.digest, Some(from))? {
                None => {
                    mounted = true;
                    break;
                }
                Some(loc) => location = Some(loc),
            }
        }
        if mounted {
            report.mounted += 1;
            continue;
        }
        let location = match location {
            Some(l) => l,
            None => client
                .start_upload(repo, &b.digest, None)?
                .expect("an upload without mount gives a location"),
        };
        match src.blob_location(b)? {
            Some((path, offset, len)) => client.upload(
                &location,
                &b.digest,
                &Payload::File {
                    path: &path,
                    offset,
                    len,
                },
                opts.chunk,
            )?,
            None => {
                let bytes = src.read_blob(b)?;
                client.upload(&location, &b.digest, &Payload::Bytes(&bytes), opts.chunk)?
            }
        }
        report.uploaded += 1;
        report.bytes_uploaded += b.size;
    }
    // Manifests last, children before the index that lists them.
    for m in manifests.iter().rev() {
        let bytes = src.read_blob(m)?;
        let media_type = if m.media_type.is_empty() {
            MEDIA_MANIFEST.to_string()
        } else {
            m.media_type.clone()
        };
        client.put_manifest(repo, &m.digest, &media_type, &bytes)?;
        if m.digest == desc.digest {
            for t in tags {
                client.put_manifest(repo, t, &media_type, &bytes)?;
            }
        }
    }
    Ok(report)
}

/// How to pull.
#[derive(Clone, Debug, Default)]
pub struct PullOptions {
    /// The platform to take from a multi-platform index (default: the host's).
    pub platform: Option<crate::image::Platform>,
}

/// Writes one verified blob from the registry into the store (if missing).
fn fetch_blob(client: &Client, repo: &str, d: &Descriptor, store: &Store) -> Result<(), Error> {
    let digest = crate::digest::Digest::parse(&d.digest)
        .ok_or_else(|| Error::Reference(format!("invalid digest {:?} in a manifest", d.digest)))?;
    let target = store.blob_path(&digest);
    if std::fs::metadata(&target).is_ok_and(|m| m.len() == d.size) {
        return Ok(());
    }
    write_store_blob(store, &target, |w| client.get_blob(repo, d, w))
}

/// Writes a blob file into the store through a temporary file, renamed
/// into place only when `fill` succeeds.
fn write_store_blob(
    store: &Store,
    target: &std::path::Path,
    fill: impl FnOnce(&mut dyn Write) -> Result<(), Error>,
) -> Result<(), Error> {
    let ioe = |source| Error::Io {
        path: target.to_path_buf(),
        source,
    };
    let mut t = tempfile::Builder::new()
        .prefix(".kiln-pull-")
        .tempfile_in(store.blobs())
        .map_err(ioe)?;
    {
        let mut w = BufWriter::with_capacity(1 << 20, t.as_file_mut());
        fill(&mut w)?;
        w.flush().map_err(ioe)?;
    }
    t.persist(target).map_err(|e| ioe(e.error))?;
    Ok(())
}

/// Pulls `repo:reference` into `store` (every blob verified) and names it
/// `names` there. Returns the manifest descriptor, or None if the registry
/// does not have the reference.
pub fn pull(
    client: &Client,
    repo: &str,
    reference: &str,
    store: &Store,
    names: &[String],
    opts: &PullOptions,
) -> Result<Option<Descriptor>, Error> {
    let Some((mut bytes, mut media_type, mut digest)) = client.get_manifest(repo, reference)?
    else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
        Error::Reference(format!("{repo}:{reference}: the manifest is not JSON: {e}"))
    })?;
    if v.get("manifests").is_some() {
        let index: Index = serde_json::from_value(v)
            .map_err(|e| Error::Reference(format!("{repo}:{reference}: bad image index: {e}")))?;
        let host = crate::image::host_platform();
        let want = opts.platform.as_ref().unwrap_or(&host);
        let m = index
            .manifests
            .iter()
            .find(|m| {
                m.platform
                    .as_ref()
                    .is_some_and(|p| p.os == want.os && p.architecture == want.architecture)
            })
            .ok_or_else(|| {
                Error::Reference(format!(
                    "{repo}:{reference}: the index has no {}/{} image",
                    want.os, want.architecture
                ))
            })?;
        let Some(got) = client.get_manifest(repo, &m.digest)? else {
            return Err(Error::Reference(format!(
                "{repo}@{}: listed by the index but missing from the registry",
                m.digest
            )));
        };
        (bytes, media_type, digest) = got;
    }
    let manifest: Manifest = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Reference(format!("{repo}:{reference}: bad image manifest: {e}")))?;
    if media_type.is_empty() || media_type.contains("json") && !media_type.contains("manifest") {
        media_type = manifest
            .media_type
            .clone()
            .unwrap_or_else(|| MEDIA_MANIFEST.to_string());
    }
    store.create()?;
    fetch_blob(client, repo, &manifest.config, store)?;
    for l in &manifest.layers {
        fetch_blob(client, repo, l, store)?;
    }
    let target = store.blob_path(&digest);
    if !target.exists() {
        write_store_blob(store, &target, |w| {
            w.write_all(&bytes).map_err(|source| Error::Io {
                path: target.clone(),
                source,
            })
        })?;
    }
    let desc = crate::image::descriptor(&media_type, &digest, bytes.len() as u64);
    if !names.is_empty() {
        store.tag(&desc, names)?;
    }
    Ok(Some(desc))
}
