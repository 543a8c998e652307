//! A build that consults the index first: on a hit the image is copied out
//! of the user store (verified, nothing rebuilt); with a registry index, a
//! hit there is pulled into the user store first. On a miss the plan is
//! executed with its blobs written straight into the user store, the image
//! named there, filed under its routes, and pushed to the registry index if
//! there is one.

use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{Entry, Error, LocalIndex, RouteOptions};
use crate::assemble::{self, BuildOptions, BuildResult, Dest, Parent, Plan};
use crate::context::Context;
use crate::image::Reference;
use crate::source::resolve;
use crate::store::Store;

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
    /// Step entries shared through a registry, if any.
    pub cache_registry: Option<Arc<crate::steps::Remote>>,
    /// Whether steps are looked up in and recorded to the user's step
    /// cache (off for `--all --no-index`, whose store is a scratch one).
    pub step_cache: bool,
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
    /// The image in the index's store, for children of the same run.
    pub parent: Parent,
    pub index_digest: String,
    /// The route that hit, or the hash route written.
    pub route: String,
}

/// Builds `image_dir` unless the index already has it; either way writes
/// `opts.output`. `collected` is the context and hash if the caller has them.
pub fn build_cached(
    image_dir: &Path,
    opts: &BuildOptions,
    io: &IndexOptions,
    collected: Option<(Context, String)>,
) -> Result<Cached, Error> {
    let plan = Plan::new(image_dir, opts, collected)?;
    let digest = plan.index_digest(opts)?;
    let context_hash = plan.context_hash.clone();
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
            let r = Reference::parse(&format!("{}/{repo}:{tag}", reg.client.host))
                .map_err(crate::registry::Error::Reference)?;
            let pulled = crate::registry::pull(
                &reg.client,
                &r,
                &io.store,
                std::slice::from_ref(&store_name),
                None,
            )?;
            let Some(desc) = pulled else { continue };
            let route = io.routes.lookup(&io.name, &digest)[(3 - level) as usize].clone();
            let entry = Entry {
                route: route.clone(),
                name: io.name.clone(),
                index_digest: digest.clone(),
                context_hash: context_hash.clone(),
                manifest_digest: desc.digest.clone(),
                filed: crate::steps::timestamp(),
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
    // A failed build takes back the blobs it put into the store.
    miss(plan, opts, io, store_name, digest).inspect_err(|_| {
        io.store.abandon();
    })
}

/// Builds what the index did not have: into the store, filed, pushed, and
/// then, last, written to the output.
fn miss(
    plan: Plan,
    opts: &BuildOptions,
    io: &IndexOptions,
    store_name: String,
    digest: String,
) -> Result<Cached, Error> {
    // Steps are looked up (and recorded) in the store the image goes to.
    let mut with_steps = opts.clone();
    with_steps.steps = io.step_cache.then(|| assemble::Steps {
        cache: crate::steps::StepCache::new(crate::steps::StepCache::default_dir()),
        store: io.store.clone(),
        lookup: io.lookup,
        remote: io.cache_registry.clone(),
    });
    let opts = &with_steps;
    let (result, desc, staged) = assemble::execute(
        plan,
        opts,
        Dest::Store {
            store: &io.store,
            name: store_name,
        },
    )?;
    let routes = io
        .routes
        .write(&io.name, &digest, crate::steps::timestamp());
    for route in &routes {
        io.index.put(&Entry {
            route: route.clone(),
            name: io.name.clone(),
            index_digest: digest.clone(),
            context_hash: result.context_hash.clone(),
            manifest_digest: result.manifest_digest.clone(),
            filed: crate::steps::timestamp(),
        })?;
    }
    if let Some(reg) = &io.registry {
        let repo = reg.repository(io.routes.level, &io.name);
        let pushdate = routes[2].rsplit('.').next().unwrap_or_default().to_string();
        let tags = [
            format!("hash-{digest}"),
            "latest".to_string(),
            format!("pushdate-{pushdate}"),
        ];
        let mut push = reg.push.clone();
        push.mount_from
            .extend(reg.pushed.lock().unwrap().iter().cloned());
        crate::registry::push(&reg.client, &io.store, &desc, &repo, &tags, &push)?;
        reg.pushed.lock().unwrap().push(repo);
    }
    // Last: the output appears only once the store, the index and the
    // registry hold the image (an archive was written with the store).
    match staged {
        Some(out) => out.commit()?,
        None => assemble::write_output(&io.store, &desc, opts)?,
    }
    Ok(Cached {
        result,
        parent: Parent {
            store: io.store.clone(),
            descriptor: desc,
            index_digest: digest.clone(),
        },
        index_digest: digest,
        route: routes[0].clone(),
    })
}

/// Copies the indexed image to the output, if the store still holds it.
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
    let Some(desc) = io.store.find(&r)? else {
        // The store lost it (store rm + gc): build again.
        return Ok(None);
    };
    let image = resolve(&io.store, &desc, None)?;
    assemble::write_output(&io.store, &desc, opts)?;
    let result = BuildResult {
        context_hash: context_hash.to_string(),
        image_id: image.manifest.config.digest.clone(),
        manifest_digest: desc.digest.clone(),
        tags: opts.tags.clone(),
        layers: assemble::layer_summaries(&image.manifest.layers, &image.config.rootfs.diff_ids),
        output: opts.output.clone(),
        format: opts.format.name().to_string(),
        status: "up to date".into(),
        steps: Vec::new(),
    };
    Ok(Some(Cached {
        result,
        parent: Parent {
            store: io.store.clone(),
            descriptor: desc,
            index_digest: digest.to_string(),
        },
        index_digest: digest.to_string(),
        route: entry.route.clone(),
    }))
}

/// What `kiln routes` shows: an image's index digest and routes, and what
/// the local index has under each lookup route, without building.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RoutesReport {
    pub context_hash: String,
    pub index_digest: String,
    pub builder: String,
    pub parents: Vec<String>,
    pub lookup: Vec<String>,
    pub hits: Vec<Option<Entry>>,
    pub write: Vec<String>,
}

/// Works out the routes of `image_dir` (a pinned base needs no store).
pub fn routes(
    image_dir: &Path,
    opts: &BuildOptions,
    io: &IndexOptions,
) -> Result<RoutesReport, Error> {
    let plan = Plan::new(image_dir, opts, None)?;
    let parents = plan.parent_digests(opts)?;
    let builder = super::builder_line(opts);
    let digest = super::index_digest(&plan.context_hash, &opts.context.args, &builder, &parents);
    let lookup = io.routes.lookup(&io.name, &digest);
    Ok(RoutesReport {
        context_hash: plan.context_hash.clone(),
        hits: lookup.iter().map(|r| io.index.get(r)).collect(),
        write: io
            .routes
            .write(&io.name, &digest, crate::steps::timestamp()),
        index_digest: digest,
        builder,
        parents,
        lookup,
    })
}
