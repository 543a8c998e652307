//! A build that consults the index first: on a hit the image comes out of
//! the user store (verified, nothing rebuilt); with a registry index, a hit
//! there is pulled into the user store first. On a miss the image is built
//! with its blobs written straight into the user store, named there, filed
//! under its routes, and pushed to the registry index if there is one.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{builder_line, index_digest, Entry, Error, LocalIndex, RouteOptions};
use crate::build::{self, BuildOptions, BuildResult};
use crate::context::Context;
use crate::store::{BaseImage, Reference, Store};

/// Where the index and its images live, and how to use them.
#[derive(Clone, Debug)]
pub struct IndexOptions {
    pub index: LocalIndex,
    pub routes: RouteOptions,
    /// The store holding indexed images (the user store).
    pub store: Store,
    /// Whether to look up before building (`--no-cache` turns it off).
    pub lookup: bool,
    /// The image (task) name in routes.
    pub name: String,
    /// The shared index in a registry, if any.
    pub registry: Option<RegistryIndex>,
}

/// An index kept in a registry: a route is a tag (`hash-<digest>`,
/// `latest`, `pushdate-<YYYYMMDDHHMMSS>`) on repository `<prefix>/<level>/<name>`.
#[derive(Clone)]
pub struct RegistryIndex {
    pub client: Arc<crate::registry::Client>,
    /// The repository path prefix inside the registry.
    pub prefix: String,
    pub push: crate::registry::PushOptions,
    /// Repositories this process pushed to (blobs are mounted from them).
    pub pushed: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for RegistryIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegistryIndex({}/{})", self.client.host, self.prefix)
    }
}

impl RegistryIndex {
    pub fn repository(&self, level: u8, name: &str) -> String {
        format!("{}/{level}/{name}", self.prefix)
    }
}

/// What a cached build did.
#[derive(Clone, Debug)]
pub struct Cached {
    pub result: BuildResult,
    pub image: BaseImage,
    pub index_digest: String,
    /// The route that hit, or the hash route written.
    pub route: String,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Builds `image_dir` unless the index already has it; either way writes
/// `opts.output`. `collected` is the context and hash if the caller has them.
pub fn build_cached(
    image_dir: &Path,
    opts: &BuildOptions,
    io: &IndexOptions,
    collected: Option<(Context, String)>,
) -> Result<Cached, Error> {
    let (ctx, context_hash) = match collected {
        Some(c) => c,
        None => build::collect(image_dir, opts)?,
    };
    let parents = build::base_digests(&ctx, opts)?;
    let digest = index_digest(
        &context_hash,
        &opts.context.args,
        &builder_line(opts),
        &parents,
    );
    let store_name = format!("kiln.local/index/{}:{digest}", io.name);
    if io.lookup {
        for route in io.routes.lookup(&io.name, &digest) {
            let Some(entry) = io.index.get(&route) else {
                continue;
            };
            if entry.index_digest != digest {
                continue;
            }
            if let Some(hit) = export(opts, io, &entry, &context_hash, &digest)? {
                return Ok(Cached { route, ..hit });
            }
        }
    }
    if let Some(reg) = io.registry.as_ref().filter(|_| io.lookup) {
        for level in (io.routes.level..=3).rev() {
            let repo = reg.repository(level, &io.name);
            let tag = format!("hash-{digest}");
            let pulled = crate::registry::pull(
                &reg.client,
                &repo,
                &tag,
                &io.store,
                std::slice::from_ref(&store_name),
                &Default::default(),
            )?;
            let Some(desc) = pulled else { continue };
            let route = io.routes.lookup(&io.name, &digest)[(3 - level) as usize].clone();
            let entry = Entry {
                route: route.clone(),
                name: io.name.clone(),
                index_digest: digest.clone(),
                context_hash: context_hash.clone(),
                manifest_digest: desc.digest.clone(),
                filed: now(),
            };
            io.index.put(&entry)?;
            if let Some(hit) = export(opts, io, &entry, &context_hash, &digest)? {
                return Ok(Cached {
                    route: format!("{}/{repo}:{tag}", reg.client.host),
                    ..hit
                });
            }
        }
    }
    io.store.create()?;
    let mut opts = opts.clone();
    opts.hash_cache = None;
    let (result, mut image) = build::build_into(
        image_dir,
        &opts,
        Some(&io.store.blobs()),
        Some((ctx, context_hash)),
    )?;
    let desc = crate::image::descriptor(
        crate::image::MEDIA_MANIFEST,
        &crate::digest::Digest::parse(&result.manifest_digest).expect("kiln writes valid digests"),
        std::fs::metadata(
            io.store
                .blobs()
                .join(result.manifest_digest.trim_start_matches("sha256:")),
        )
        .map_err(|source| crate::store::Error::Io {
            path: io.store.dir.clone(),
            source,
        })?
        .len(),
    );
    // Base layers that came from other stores join the image in ours.
    for (d, path) in &image.layers {
        if let Some(digest) = crate::digest::Digest::parse(&d.digest) {
            io.store.put_blob_file(&digest, path)?;
        }
    }
    io.store.tag(&desc, &[store_name])?;
    let routes = io.routes.write(&io.name, &digest, now());
    for route in &routes {
        io.index.put(&Entry {
            route: route.clone(),
            name: io.name.clone(),
            index_digest: digest.clone(),
            context_hash: result.context_hash.clone(),
            manifest_digest: result.manifest_digest.clone(),
            filed: now(),
        })?;
    }
    image.index_digest = Some(digest.clone());
    if let Some(reg) = &io.registry {
        let repo = reg.repository(io.routes.level, &io.name);
        let pushdate = routes[2].rsplit('.').next().unwrap_or_default().to_string();
        let tags = [
            format!("hash-{digest}"),
            "latest".to_string(),
            format!("pushdate-{pushdate}"),
        ];
        let reader = crate::store::ImageReader::open(&io.store.dir)?;
        let mut push = reg.push.clone();
        push.mount_from
            .extend(reg.pushed.lock().unwrap().iter().cloned());
        crate::registry::push(&reg.client, &reader, &desc, &repo, &tags, &push)?;
        reg.pushed.lock().unwrap().push(repo);
    }
    Ok(Cached {
        result,
        image,
        index_digest: digest,
        route: routes[0].clone(),
    })
}

/// Writes the indexed image to the output, if the store still holds it.
fn export(
    opts: &BuildOptions,
    io: &IndexOptions,
    entry: &Entry,
    context_hash: &str,
    digest: &str,
) -> Result<Option<Cached>, Error> {
    let Ok(r) = Reference::parse(&format!(
        "kiln.local/index/{}@{}",
        io.name, entry.manifest_digest
    )) else {
        return Ok(None);
    };
    let Some(mut desc) = io.store.find(&r)? else {
        // The store lost it (store rm + gc): build again.
        return Ok(None);
    };
    desc.annotations.clear();
    let mut image = io.store.load(&desc, &io.name, None)?;
    let manifest = io.store.read_manifest(&desc)?;
    io.store
        .write_image(
            &desc,
            &manifest,
            &opts.tags,
            opts.timestamp,
            opts.format,
            &opts.output,
        )
        .map_err(build::Error::from)?;
    image.index_digest = Some(digest.to_string());
    let result = BuildResult {
        context_hash: context_hash.to_string(),
        image_id: manifest.config.digest.clone(),
        manifest_digest: desc.digest.clone(),
        tags: opts.tags.clone(),
        layers: build::layer_summaries(&manifest.layers, &image.config.rootfs.diff_ids),
        output: opts.output.clone(),
        format: opts.format.name().to_string(),
        status: "up to date".into(),
    };
    Ok(Some(Cached {
        result,
        image,
        index_digest: digest.to_string(),
        route: entry.route.clone(),
    }))
}
