//! Assembling an image: plan, then execute.
//!
//! [`Plan::new`] collects and hashes the context, parses and analyzes the
//! Dockerfile and resolves every base once; the plan gives the index digest
//! ([`Plan::index_digest`]) and drives [`execute`]: the target stage's
//! instructions become layers and a config, the layers are written in
//! parallel (or streamed straight into an archive), and the image, a
//! [`BuildBlobs`] source, reaches its output or the user store through
//! [`crate::copy`].

mod analysis;
mod config;
mod copy;
mod docker_load;
mod fs;
mod plan;
mod reproduce;
pub mod run;
mod stage;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde::Serialize;

use crate::context::{self, Algorithm, ContextOptions, ModePolicy};
use crate::copy::{copy, Selection};
use crate::dockerfile;
use crate::image::{canonical_json, Descriptor, Digest, ImageConfig, Manifest, MediaType, RootFs};
use crate::layer::{self, Compression, LayerInfo};
use crate::progress::Progress;
use crate::sink::{file, Format, Output};
use crate::source::{self, BuildBlobs};
use crate::store::{Store, Stores};

pub use copy::{detect_archive, ArchiveKind};
pub use plan::{collect, unresolved_bases, Base, Bases, Parent, Plan};
pub use reproduce::{check_reproducible, Reproduced, PERTURB_ENV};
pub use stage::{StageError, DEFAULT_PATH};

/// Everything a build needs to know.
#[derive(Clone, Debug)]
pub struct BuildOptions {
    pub context: ContextOptions,
    pub algorithm: Algorithm,
    pub mode_policy: ModePolicy,
    pub tags: Vec<String>,
    pub compression: Compression,
    pub timestamp: u64,
    pub format: Format,
    pub output: PathBuf,
    pub target: Option<String>,
    /// The hash cache file for kiln-v1, if any.
    pub hash_cache: Option<PathBuf>,
    pub progress: Progress,
    /// Where `FROM` and `COPY --from` look for images, in order.
    pub stores: Stores,
    /// Images built earlier in the same run (`--all`), by qualified name;
    /// they win over the stores.
    pub parents: Arc<BTreeMap<String, Parent>>,
    /// The network RUN steps get (`--network`; `RUN --network` overrides).
    pub network: crate::sandbox::Network,
    /// `--allow network.host`: a step may ask for the host's network with
    /// `RUN --network=host` (BuildKit's entitlement).
    pub allow_network_host: bool,
    /// `--isolation`: how RUN is isolated (kiln's sandbox, or the
    /// container's own root inside an unprivileged container).
    pub isolation: crate::sandbox::container::Isolation,
    /// Build arguments expand in FROM even where no ARG declares them
    /// (kaniko's rule; Taskcluster's image tasks rely on it).
    pub args_in_from: bool,
    /// `--secret id=ID,src=FILE`: files `RUN --mount=type=secret` binds.
    pub secrets: BTreeMap<String, PathBuf>,
    /// The step cache, when the build goes into a store (indexed builds).
    pub steps: Option<Steps>,
    /// `--pull`: whether a base no store has is pulled (never by default).
    pub pull: PullPolicy,
    /// Where pulled bases come from (mirrors, plain HTTP).
    pub sources: crate::registry::Sources,
    /// `--reproducible`: what dpkg, apt, debconf, ldconfig and
    /// update-alternatives leave with the build's clock in a RUN's layer is
    /// removed or emptied (`sandbox::reproducible`), and the history says so.
    pub reproducible: bool,
    /// `--label KEY=VALUE`: labels of the image's config, over the
    /// Dockerfile's LABELs (the target stage's).
    pub labels: BTreeMap<String, String>,
}

impl BuildOptions {
    /// What the layers' bytes depend on besides their content.
    pub fn layer_format(&self) -> crate::steps::LayerFormat {
        crate::steps::LayerFormat {
            compression: self.compression,
            timestamp: self.timestamp,
            mode_policy: self.mode_policy,
            reproducible: self.reproducible,
        }
    }
}

/// `kiln build --pull[=missing|always]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Never touch the network for a base (the default).
    #[default]
    Never,
    /// Pull a base no store has into the user store.
    Missing,
    /// Pull every tag reference again (digest-pinned ones only when missing).
    Always,
}

/// The step cache a build uses: its entries, the store holding their
/// layers (the build's own), and whether to look steps up (`--no-cache`:
/// no, but record them).
#[derive(Clone, Debug)]
pub struct Steps {
    pub cache: crate::steps::StepCache,
    pub store: Store,
    pub lookup: bool,
    /// Entries shared through a registry (`--cache-registry`).
    pub remote: Option<Arc<crate::steps::Remote>>,
}

/// What a build produced.
#[derive(Clone, Debug, Serialize)]
pub struct BuildResult {
    pub context_hash: String,
    pub image_id: Digest,
    pub manifest_digest: Digest,
    pub tags: Vec<String>,
    pub layers: Vec<LayerSummary>,
    pub output: PathBuf,
    pub format: String,
    pub status: String,
    /// Each layer-producing step: its key and whether it was a cache hit.
    pub steps: Vec<crate::steps::StepReport>,
}

/// One layer in the build summary.
#[derive(Clone, Debug, Serialize)]
pub struct LayerSummary {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
    pub media_type: MediaType,
}

/// Build errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Context(#[from] context::Error),
    #[error("{}: {source}", dockerfile.display())]
    Dockerfile {
        dockerfile: PathBuf,
        source: dockerfile::Error,
    },
    #[error("{}:{line}: {text}: {message}", dockerfile.display())]
    Instruction {
        dockerfile: PathBuf,
        line: usize,
        text: String,
        message: String,
    },
    #[error("{}: {message}", dockerfile.display())]
    Stage {
        dockerfile: PathBuf,
        message: String,
    },
    #[error("{0}")]
    Layer(#[from] layer::Error),
    #[error("{0}")]
    Image(#[from] source::Error),
    #[error("creating a work directory beside {}: {source}", path.display())]
    Work {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The image name of a directory: its last component (`image` if it has none).
pub fn image_name(image_dir: &Path) -> String {
    std::path::absolute(image_dir)
        .ok()
        .and_then(|a| a.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "image".into())
}

/// The default tag of an image directory: `<REGISTRY>/<name>:<VERSION>`
/// where those files exist, else `<name>:latest`.
pub fn default_tag(image_dir: &Path) -> String {
    let abs = std::path::absolute(image_dir).unwrap_or_else(|_| image_dir.to_path_buf());
    let name = image_name(image_dir);
    let read = |f: &str| {
        std::fs::read_to_string(abs.join(f))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    let version = read("VERSION").unwrap_or_else(|| "latest".to_string());
    // taskgraph's docker_image(): the image's REGISTRY, else the one of
    // taskcluster/docker/ beside it.
    let shared = || {
        let parent = abs.parent()?;
        parent
            .ends_with("taskcluster/docker")
            .then(|| std::fs::read_to_string(parent.join("REGISTRY")).ok())
            .flatten()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    match read("REGISTRY").or_else(shared) {
        Some(reg) => format!("{}/{name}:{version}", reg.trim_end_matches('/')),
        None => format!("{name}:{version}"),
    }
}

/// A stage error as a build error naming the original Dockerfile line.
fn stage_error(ctx: &context::Context, e: StageError) -> Error {
    let dockerfile = ctx.dockerfile_path();
    match e {
        StageError::At {
            line,
            text,
            message,
        } => Error::Instruction {
            dockerfile,
            line: ctx.original_line(line),
            text,
            message,
        },
        StageError::Whole(message) => Error::Stage {
            dockerfile,
            message,
        },
    }
}

/// Summaries of an image's layers: each descriptor with its diff_id.
pub fn layer_summaries(layers: &[Descriptor], diff_ids: &[Digest]) -> Vec<LayerSummary> {
    layers
        .iter()
        .zip(diff_ids)
        .map(|(l, diff_id)| LayerSummary {
            digest: l.digest.clone(),
            diff_id: diff_id.clone(),
            size: l.size,
            media_type: l.media_type.clone(),
        })
        .collect()
}

/// Where a build puts its image.
pub enum Dest<'a> {
    /// Straight to `opts.output`.
    Output,
    /// Into a store under `name` (blobs written there as they are made),
    /// then from the store to `opts.output`.
    Store { store: &'a Store, name: String },
}

/// An output written but not yet in place (an indexed build's archive,
/// whose layers were streamed while they went into the store).
pub struct StagedOutput {
    out: Output,
    images: Vec<(Descriptor, Vec<String>)>,
}

impl StagedOutput {
    /// Puts the output in place.
    pub fn commit(self) -> Result<(), Error> {
        use crate::sink::Sink;
        self.out.commit(&self.images)?;
        Ok(())
    }
}

/// Shares a fresh step through the cache registry; a cache is never worth
/// a failed build, so an error is a one-line warning.
fn publish_step(remote: &crate::steps::Remote, entry: &crate::steps::Entry, store: &Store) {
    if let Err(e) = remote.publish(entry, store) {
        eprintln!(
            "kiln: warning: step cache entry {}: publishing it to the cache registry: {e}; the build goes on",
            entry.key
        );
    }
}

/// Builds the image in `image_dir` and writes `opts.output`.
pub fn build(image_dir: &Path, opts: &BuildOptions) -> Result<BuildResult, Error> {
    let plan = Plan::new(image_dir, opts, None)?;
    execute(plan, opts, Dest::Output).map(|(r, _, _)| r)
}

/// Executes a plan: the image goes to `dest`; with [`Dest::Output`] that
/// is `opts.output`, with [`Dest::Store`] the caller writes the output
/// ([`write_output`]) once everything else has succeeded, so a failed
/// build never publishes one. Returns the result and the manifest
/// descriptor, and with [`Dest::Store`] and an archive format, the output
/// written alongside the store (to commit with [`StagedOutput::commit`]
/// instead of calling [`write_output`]).
pub fn execute(
    plan: Plan,
    opts: &BuildOptions,
    dest: Dest<'_>,
) -> Result<(BuildResult, Descriptor, Option<StagedOutput>), Error> {
    let work_parent = file::parent_dir(&opts.output);
    let work = tempfile::Builder::new()
        .prefix(&file::temp_prefix("build"))
        .tempdir_in(&work_parent)
        .map_err(|source| Error::Work {
            path: opts.output.clone(),
            source,
        })?;
    // An interrupt removes the work directory (a RUN's spool included).
    let _interrupt = crate::interrupt::remove_on_interrupt(work.path());
    let blob_dir = match &dest {
        Dest::Store { store, .. } => {
            store.create()?;
            store.blob_dir()?
        }
        Dest::Output => file::BlobDir::plain(&work.path().join("blobs/sha256"))?,
    };
    let blobs = blob_dir.path().to_path_buf();
    let spool = work.path().join("spool");
    // RUN steps leave files of the user namespace's ids there when rootless.
    struct Spool(PathBuf);
    impl Drop for Spool {
        fn drop(&mut self) {
            crate::sandbox::remove_tree(&self.0);
        }
    }
    let _spool = Spool(spool.clone());

    let mut planned = stage::run(&plan, opts, &spool).map_err(|e| stage_error(&plan.context, e))?;
    docker_load::recompress_bases(&mut planned, opts, &blob_dir, &spool)?;
    // What each file looked like when it was collected (and hashed).
    let watch: Vec<(Arc<Path>, u64, i64)> = plan
        .context
        .entries
        .values()
        .filter_map(|e| match (&e.source, e.mtime_ns) {
            (context::Source::File(p), Some(m)) => Some((p.clone(), e.size, m)),
            _ => None,
        })
        .collect();
    let context_hash = plan.context_hash.clone();
    // The longest instruction: where an oversized config most likely grew.
    let longest = plan
        .dockerfile
        .instructions
        .iter()
        .rev()
        .max_by_key(|i| i.text.len())
        .map(|i| (plan.context.original_line(i.line), i.text.len()));
    let dockerfile_path = plan.context.dockerfile_path();
    // The layers hold what they need (shared paths); the context's own
    // metadata for every file is dead weight while they are written.
    drop(plan);

    let (bytes, files) = planned
        .layers
        .iter()
        .map(layer::Planned::totals)
        .fold((0, 0), |(b, f), (lb, lf)| (b + lb, f + lf));
    let step = opts.progress.step("writing layers", bytes, files);
    let (level, ts) = (opts.compression, opts.timestamp);
    // An archive output streams each new layer as it is made; an indexed
    // build (into a store) writes that same stream into the store as well,
    // and the output is committed by the caller, last.
    let output = match dest {
        Dest::Store { .. } if !opts.format.streams() => None,
        _ => Some(Output::create(&opts.output, opts.format, ts)?),
    };
    let into_store = matches!(dest, Dest::Store { .. });
    let streaming = output.as_ref().filter(|o| o.format().streams());
    let infos: Vec<LayerInfo> = match streaming {
        // Archive outputs: each layer's stream goes straight into the archive,
        // one layer after another (each layer is itself parallel inside).
        Some(out) => stream_layers(out, &planned, &blob_dir, into_store, opts, &step)?,
        // Layouts, stores and .tar.zst: blobs first; independent layers in parallel.
        None => planned
            .layers
            .par_iter()
            .map(|entries| layer::write_layer(entries, ts, level, &blob_dir, &step))
            .collect::<Result<_, _>>()?,
    };
    step.finish();
    unchanged(&watch, &infos)?;

    let mut config: ImageConfig = planned.config;
    let mut diff_ids = std::mem::take(&mut config.rootfs.diff_ids);
    diff_ids.extend(infos.iter().map(|l| l.diff_id.clone()));
    config.rootfs = RootFs {
        kind: "layers".into(),
        diff_ids,
    };
    let config_bytes = canonical_json(&config);
    too_large("config", config_bytes.len(), &dockerfile_path, longest)?;
    let config_desc = Descriptor::new(
        MediaType::OciConfig,
        blob_dir.write_bytes(&config_bytes)?,
        config_bytes.len() as u64,
    );
    // Base layers pass through: same descriptors, same blob files; so do
    // step cache hits.
    let mut extra = BTreeMap::new();
    for l in &planned.layers {
        if let layer::Planned::Cached { desc, blob, .. } = l {
            extra.insert(desc.digest.clone(), blob.clone());
        }
    }
    let mut layers: Vec<Descriptor> = Vec::new();
    for (d, path) in &planned.base {
        extra.insert(d.digest.clone(), path.clone());
        layers.push(d.clone());
    }
    layers.extend(infos.iter().map(layer::LayerInfo::descriptor));
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MediaType::OciManifest),
        config: config_desc.clone(),
        layers: layers.clone(),
        annotations: BTreeMap::new(),
        extra: Default::default(),
    };
    let manifest_bytes = canonical_json(&manifest);
    too_large("manifest", manifest_bytes.len(), &dockerfile_path, longest)?;
    let manifest_desc = Descriptor::new(
        MediaType::OciManifest,
        blob_dir.write_bytes(&manifest_bytes)?,
        manifest_bytes.len() as u64,
    );
    let built = BuildBlobs {
        blobs: blobs.clone(),
        extra,
        image: manifest_desc.clone(),
        tags: opts.tags.clone(),
    };
    let total: u64 = layers.iter().map(|l| l.size).sum();
    let step = opts
        .progress
        .step("writing output", total, layers.len() as u64);
    let sel = Selection::image(&manifest_desc, &opts.tags);
    let mut staged = None;
    match (output, dest) {
        (Some(out), Dest::Output) => {
            copy(&built, &out, &sel)?;
        }
        (out, Dest::Store { store, name }) => {
            // Base layers from other stores join the image in this one.
            // The output is the caller's to write, last.
            copy(&built, store, &Selection::image(&manifest_desc, &[name]))?;
            // The steps that ran are recorded once their layers are stored.
            if let Some(st) = opts.steps.as_ref().filter(|s| s.store.dir == store.dir) {
                let own = &layers[layers.len() - infos.len()..];
                for ((key, info), d) in planned.keys.iter().zip(&infos).zip(own) {
                    let Some((key, instruction)) = key else {
                        continue;
                    };
                    let entry = crate::steps::Entry {
                        key: key.clone(),
                        instruction: instruction.clone(),
                        layer: d.clone(),
                        diff_id: info.diff_id.clone(),
                        created: crate::steps::timestamp(),
                    };
                    st.cache.put(&entry)?;
                    if let Some(remote) = &st.remote {
                        publish_step(remote, &entry, store);
                    }
                }
                // Other stages' fresh steps: their layers written here too.
                for (layer, key, instruction) in &planned.side {
                    let info = layer::write_layer(
                        layer,
                        ts,
                        level,
                        &blob_dir,
                        &crate::progress::Step::none(),
                    )?;
                    let d = info.descriptor();
                    let entry = crate::steps::Entry {
                        key: key.clone(),
                        instruction: instruction.clone(),
                        layer: d,
                        diff_id: info.diff_id.clone(),
                        created: crate::steps::timestamp(),
                    };
                    st.cache.put(&entry)?;
                    if let Some(remote) = &st.remote {
                        publish_step(remote, &entry, store);
                    }
                }
            }
            // The streamed output gets the rest (config, manifest, base
            // layers); the caller commits it last.
            if let Some(out) = out {
                let images = crate::copy::copy_uncommitted(&built, &out, &sel)?.images;
                staged = Some(StagedOutput { out, images });
            }
        }
        (None, Dest::Output) => unreachable!("an output was created"),
    }
    step.inc(total, layers.len() as u64);
    step.finish();
    let result = BuildResult {
        context_hash,
        image_id: config_desc.digest,
        manifest_digest: manifest_desc.digest.clone(),
        tags: opts.tags.clone(),
        layers: layer_summaries(&layers, &config.rootfs.diff_ids),
        output: opts.output.clone(),
        format: opts.format.name().to_string(),
        status: "built".into(),
        steps: planned.reports,
    };
    Ok((result, manifest_desc, staged))
}

/// Copies an image from a store to `opts.output` (the last step of a
/// build: the output appears only when everything else succeeded).
pub fn write_output(store: &Store, desc: &Descriptor, opts: &BuildOptions) -> Result<(), Error> {
    let out = Output::create(&opts.output, opts.format, opts.timestamp)?;
    copy(store, &out, &Selection::image(desc, &opts.tags))?;
    Ok(())
}

/// Refuses to write a config or manifest larger than kiln (and registries,
/// and containers/image) read back: [`crate::limits::MAX_JSON_BLOB`].
fn too_large(
    what: &str,
    size: usize,
    dockerfile: &Path,
    longest: Option<(usize, usize)>,
) -> Result<(), Error> {
    let max = crate::limits::MAX_JSON_BLOB;
    if size as u64 <= max {
        return Ok(());
    }
    let hint = longest.map_or(String::new(), |(line, len)| {
        format!("; its longest instruction is line {line} ({len} bytes)")
    });
    Err(Error::Stage {
        dockerfile: dockerfile.to_path_buf(),
        message: format!(
            "the image {what} would be {size} bytes, more than the {max} bytes (4 MiB) kiln, registries and Docker's tools read back{hint}; move large data into a file and COPY it"
        ),
    })
}

/// Streams a build's layers into an archive output, in manifest order
/// (base layers, then this build's, cache hits at their place): the order
/// `copy` exports an image in, so a build and an export give the same
/// archive bytes. Each new layer is written once; `into_store` (an indexed
/// build) writes the same stream into the store's blob directory too.
fn stream_layers(
    out: &Output,
    planned: &stage::Planned,
    blob_dir: &file::BlobDir,
    into_store: bool,
    opts: &BuildOptions,
    step: &crate::progress::Step,
) -> Result<Vec<LayerInfo>, Error> {
    let (level, ts) = (opts.compression, opts.timestamp);
    let blobs = blob_dir.path().to_path_buf();
    let mut ready = BTreeMap::new();
    let mut base = Vec::new();
    for (d, path) in &planned.base {
        ready.insert(d.digest.clone(), path.clone());
        base.push(d.clone());
    }
    for l in &planned.layers {
        if let layer::Planned::Cached { desc, blob, .. } = l {
            ready.insert(desc.digest.clone(), blob.clone());
        }
    }
    let have = source::BuildBlobs {
        blobs: blobs.clone(),
        extra: ready,
        image: Descriptor::new(MediaType::OciManifest, crate::Digest::from_raw([0; 32]), 0),
        tags: Vec::new(),
    };
    let put = |d: &Descriptor| {
        if crate::sink::Sink::has_blob(out, d)? {
            return Ok::<_, Error>(());
        }
        crate::sink::Sink::put_blob(
            out,
            crate::sink::Blob {
                desc: d,
                data: crate::sink::BlobData::Source(&have),
            },
        )?;
        Ok(())
    };
    for d in &base {
        put(d)?;
    }
    let mut infos = Vec::new();
    for entries in &planned.layers {
        if let layer::Planned::Cached { desc, .. } = entries {
            put(desc)?;
        }
        if let Some(info) = entries.cached_info() {
            infos.push(info);
            continue;
        }
        let info = out.put_new_blob(|f| {
            let pending = match into_store {
                true => Some(blob_dir.pending("layer")?),
                false => None,
            };
            let stored = |f: &file::Pending| f.file().try_clone();
            let (info, f) = match &pending {
                None => layer::write_layer_to(entries, ts, level, f, step),
                Some(p) => {
                    let also = stored(p).map_err(|source| source::Error::Write {
                        path: p.temp_path(),
                        source,
                    })?;
                    let tee = layer::Tee(f, also, p.temp_path());
                    layer::write_layer_to(entries, ts, level, tee, step).map(|(i, t)| (i, t.0))
                }
            }
            .map_err(|e| match e {
                // The layer goes straight into the output file (and,
                // indexed, into the store: a failure there names the
                // store's file).
                layer::Error::Write { source, .. } => {
                    let store_side = source
                        .get_ref()
                        .and_then(|e| e.downcast_ref::<layer::TeeFailed>())
                        .map(|t| {
                            let e = std::io::Error::new(t.source.kind(), t.source.to_string());
                            (t.path.clone(), e)
                        });
                    let (path, source) =
                        store_side.unwrap_or_else(|| (opts.output.clone(), source));
                    Error::Image(source::Error::Write { path, source })
                }
                e => Error::Layer(e),
            })?;
            let (d, n) = (info.digest.clone(), info.size);
            if let Some(p) = pending {
                blob_dir.commit(p, &d)?;
            }
            Ok::<_, Error>((info, d, n, f))
        })?;
        infos.push(info.expect("uncompressed archives take new blobs"));
    }
    Ok(infos)
}

/// Checks that no context file changed (size or mtime) since it was
/// collected: the layers were read after the hash was computed. A file a
/// layer read is checked against the `fstat` the layer writer made of it
/// once read (no second lookup); only files no layer read are stat-ed here.
fn unchanged(watch: &[(Arc<Path>, u64, i64)], layers: &[LayerInfo]) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    // Keyed by the shared path's address: layer entries hold the very Arcs
    // the context's entries hold.
    let key = |p: &Arc<Path>| Arc::as_ptr(p) as *const u8 as usize;
    let read: HashMap<usize, (u64, i64)> = layers
        .iter()
        .flat_map(|l| &l.read)
        .map(|(p, size, mtime)| (key(p), (*size, *mtime)))
        .collect();
    watch.par_iter().try_for_each(|(p, size, mtime)| {
        let now = match read.get(&key(p)) {
            Some(&seen) => Some(seen),
            None => crate::fsx::lstat_deep(p)
                .ok()
                .map(|m| (m.len(), m.mtime() * 1_000_000_000 + m.mtime_nsec())),
        };
        if now == Some((*size, *mtime)) {
            Ok(())
        } else {
            Err(Error::Context(context::Error::Changed {
                path: p.to_path_buf(),
                expected: *size,
                got: now.map_or(0, |m| m.0),
            }))
        }
    })
}
