//! The orchestrator: collect and hash the context, parse the Dockerfile,
//! run the target stage's instructions into layers and config, write the
//! layers in parallel, then hand the image to the chosen writer.

mod copy;
mod fs;
mod stage;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use serde::Serialize;

use crate::archive::{self, Format, ImageFiles};
use crate::context::{self, Algorithm, ContextOptions, HashCache, ModePolicy};
use crate::digest::Digest;
use crate::dockerfile;
use crate::image::{
    self, canonical_json, descriptor, ImageConfig, Manifest, RootFs, ANNOTATION_COMPRESSOR,
    MEDIA_CONFIG, MEDIA_MANIFEST,
};
use crate::layer::{self, Compression, LayerInfo};
use crate::progress::Progress;
use crate::store::{BaseImage, Stores};

pub use copy::{detect_archive, ArchiveKind};
pub use stage::StageError;

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
    pub parents: Arc<BTreeMap<String, BaseImage>>,
}

/// What a build produced.
#[derive(Clone, Debug, Serialize)]
pub struct BuildResult {
    pub context_hash: String,
    pub image_id: String,
    pub manifest_digest: String,
    pub tags: Vec<String>,
    pub layers: Vec<LayerSummary>,
    pub output: PathBuf,
    pub format: String,
    pub status: String,
}

/// One layer in the build summary.
#[derive(Clone, Debug, Serialize)]
pub struct LayerSummary {
    pub digest: String,
    pub diff_id: String,
    pub size: u64,
    pub media_type: String,
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
    Archive(#[from] archive::Error),
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
    match read("REGISTRY") {
        Some(reg) => format!("{}/{name}:{version}", reg.trim_end_matches('/')),
        None => format!("{name}:{version}"),
    }
}

/// Collects and hashes the context of `image_dir` as `opts` say (with the
/// hash cache, if any).
pub fn collect(image_dir: &Path, opts: &BuildOptions) -> Result<(context::Context, String), Error> {
    let cache = opts.hash_cache.as_deref().map(HashCache::load);
    Ok(context::collect_and_hash(
        image_dir,
        &opts.context,
        opts.algorithm,
        opts.mode_policy,
        cache.as_ref(),
        &opts.progress,
    )?)
}

/// A stage error as a build error naming the original Dockerfile line.
fn stage_error(ctx: &context::Context, e: StageError) -> Error {
    let dockerfile = ctx.image_dir.join("Dockerfile");
    match e {
        StageError::At {
            line,
            text,
            message,
        } => Error::Instruction {
            dockerfile,
            line: ctx
                .line_map
                .get(line.wrapping_sub(1))
                .copied()
                .unwrap_or(line),
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
pub fn layer_summaries(layers: &[image::Descriptor], diff_ids: &[String]) -> Vec<LayerSummary> {
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

/// Parses the context's (rewritten) Dockerfile; errors name the line of the original.
pub fn parse_dockerfile(ctx: &context::Context) -> Result<dockerfile::Dockerfile, Error> {
    let original_line = |line: usize| {
        ctx.line_map
            .get(line.wrapping_sub(1))
            .copied()
            .unwrap_or(line)
    };
    dockerfile::parse(ctx.dockerfile_text()).map_err(|e| {
        let dockerfile::Error::Syntax {
            line,
            column,
            message,
        } = e;
        Error::Dockerfile {
            dockerfile: ctx.image_dir.join("Dockerfile"),
            source: dockerfile::Error::Syntax {
                line: original_line(line),
                column,
                message,
            },
        }
    })
}

/// The digests of the images a build takes from outside its Dockerfile
/// (FROM and COPY --from images the target needs): a parent built in the
/// same run gives its index digest, a store image its manifest digest.
/// Nothing is read beyond the stores' index files.
pub fn base_digests(ctx: &context::Context, opts: &BuildOptions) -> Result<Vec<String>, Error> {
    let df = parse_dockerfile(ctx)?;
    let refs = stage::external_refs(&df, opts).map_err(|e| stage_error(ctx, e))?;
    let mut out = Vec::new();
    for (line, text, r) in refs {
        let parent = crate::store::Reference::parse(&r)
            .ok()
            .and_then(|p| opts.parents.get(&p.name()));
        let digest = match parent {
            Some(p) => p
                .index_digest
                .clone()
                .unwrap_or_else(|| p.manifest_digest.clone()),
            None => {
                let (_, d) = opts.stores.find(&r).map_err(|e| {
                    stage_error(
                        ctx,
                        StageError::At {
                            line,
                            text,
                            message: e.to_string(),
                        },
                    )
                })?;
                d.digest
            }
        };
        out.push(digest);
    }
    Ok(out)
}

/// Builds the image in `image_dir`.
pub fn build(image_dir: &Path, opts: &BuildOptions) -> Result<BuildResult, Error> {
    build_into(image_dir, opts, None, None).map(|(r, _)| r)
}

/// Builds the image in `image_dir`; with `shared_blobs`, layer blobs go
/// into that `blobs/sha256` directory (and stay there), and the image is
/// also returned as a [`BaseImage`] that later builds of the run can use.
/// `collected` is the context and its hash when the caller already has them.
pub fn build_into(
    image_dir: &Path,
    opts: &BuildOptions,
    shared_blobs: Option<&Path>,
    collected: Option<(context::Context, String)>,
) -> Result<(BuildResult, BaseImage), Error> {
    let (ctx, context_hash) = match collected {
        Some(c) => c,
        None => collect(image_dir, opts)?,
    };
    let df = parse_dockerfile(&ctx)?;

    let work_parent = archive::parent_dir(&opts.output);
    let work = tempfile::Builder::new()
        .prefix(&archive::temp_prefix("build"))
        .tempdir_in(&work_parent)
        .map_err(|source| Error::Work {
            path: opts.output.clone(),
            source,
        })?;
    let blobs = match shared_blobs {
        Some(b) => b.to_path_buf(),
        None => work.path().join("blobs/sha256"),
    };
    let spool = work.path().join("spool");

    let planned = stage::run(&df, &ctx, opts, &spool).map_err(|e| stage_error(&ctx, e))?;
    // What each file looked like when it was collected (and hashed).
    let watch: Vec<(Arc<Path>, u64, i64)> = ctx
        .entries
        .values()
        .filter_map(|e| match (&e.source, e.mtime_ns) {
            (context::Source::File(p), Some(m)) => Some((p.clone(), e.size, m)),
            _ => None,
        })
        .collect();
    // The layers hold what they need (shared paths); the context's own
    // metadata for every file is dead weight while they are written.
    drop(ctx);

    // Layers are independent: write them in parallel.
    let (bytes, files) =
        planned
            .layers
            .iter()
            .flat_map(|l| l.values())
            .fold((0, 0), |(b, f), e| match &e.content {
                layer::Content::File { size, .. } => (b + size, f + 1),
                _ => (b, f),
            });
    let step = opts.progress.step("writing layers", bytes, files);
    let (level, ts) = (opts.compression, opts.timestamp);
    let mut streaming = if opts.format.streams() && shared_blobs.is_none() {
        Some(archive::Streaming::create(&opts.output, ts)?)
    } else {
        None
    };
    let infos: Vec<LayerInfo> = match &mut streaming {
        // Archive outputs: each layer's stream goes straight into the archive,
        // one layer after another (each layer is itself parallel inside).
        Some(st) => {
            let mut infos = Vec::new();
            for entries in &planned.layers {
                let info = st
                    .add_layer(|f| layer::write_layer_to(entries, ts, level, f, &step))?
                    .map_err(|e| match e {
                        // The layer goes straight into the output file.
                        layer::Error::Write { source, .. } => Error::Archive(archive::Error::Io {
                            path: opts.output.clone(),
                            source,
                        }),
                        e => Error::Layer(e),
                    })?;
                infos.push(info);
            }
            infos
        }
        // Layouts and .tar.zst: blobs first; independent layers in parallel.
        None => planned
            .layers
            .par_iter()
            .map(|entries| layer::write_layer(entries, ts, level, &blobs, &step))
            .collect::<Result<_, _>>()?,
    };
    step.finish();
    unchanged(&watch)?;

    let mut config: ImageConfig = planned.config;
    let mut diff_ids = std::mem::take(&mut config.rootfs.diff_ids);
    diff_ids.extend(infos.iter().map(|l| l.diff_id.to_string()));
    config.rootfs = RootFs {
        kind: "layers".into(),
        diff_ids,
    };
    let config_bytes = canonical_json(&config);
    let config_desc = write_blob(&blobs, MEDIA_CONFIG, &config_bytes)?;
    // Base layers pass through: same descriptors, same blob files.
    let mut extra = BTreeMap::new();
    let mut layers: Vec<image::Descriptor> = Vec::new();
    for (d, path) in &planned.base {
        extra.insert(d.digest.clone(), path.clone());
        layers.push(d.clone());
    }
    layers.extend(infos.iter().map(|l| {
        let mut d = descriptor(&l.media_type, &l.digest, l.size);
        if let Some(c) = &l.compressor {
            d.annotations
                .insert(ANNOTATION_COMPRESSOR.into(), c.clone());
        }
        d
    }));
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_MANIFEST.into()),
        config: config_desc.clone(),
        layers: layers.clone(),
        annotations: BTreeMap::new(),
    };
    let manifest_desc = write_blob(&blobs, MEDIA_MANIFEST, &canonical_json(&manifest))?;
    let files = ImageFiles {
        blobs: blobs.clone(),
        extra,
        manifest: manifest_desc.clone(),
        config: config_desc.clone(),
        layers,
        tags: opts.tags.clone(),
        mtime: opts.timestamp,
    };
    let total: u64 = files.layers.iter().map(|l| l.size).sum();
    let step = opts
        .progress
        .step("writing output", total, files.layers.len() as u64);
    match streaming {
        Some(st) => st.finish(&files, opts.format)?,
        None => archive::writer_for(opts.format).write(&files, &opts.output)?,
    }
    step.inc(total, files.layers.len() as u64);
    step.finish();
    let as_base = BaseImage {
        reference: opts.tags.first().cloned().unwrap_or_default(),
        manifest_digest: manifest_desc.digest.clone(),
        layers: files
            .layers
            .iter()
            .map(|d| (d.clone(), files.blob_path(&d.digest)))
            .collect(),
        config: config.clone(),
        index_digest: None,
    };
    let result = BuildResult {
        context_hash,
        image_id: config_desc.digest,
        manifest_digest: manifest_desc.digest,
        tags: opts.tags.clone(),
        layers: layer_summaries(&files.layers, &config.rootfs.diff_ids),
        output: opts.output.clone(),
        format: opts.format.name().to_string(),
        status: "built".into(),
    };
    Ok((result, as_base))
}

/// Checks that no context file changed (size or mtime) since it was
/// collected: the layers were read after the hash was computed.
fn unchanged(watch: &[(Arc<Path>, u64, i64)]) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    watch.par_iter().try_for_each(|(p, size, mtime)| {
        let now = std::fs::symlink_metadata(p).ok();
        let same = now.as_ref().is_some_and(|m| {
            m.len() == *size && m.mtime() * 1_000_000_000 + m.mtime_nsec() == *mtime
        });
        if same {
            Ok(())
        } else {
            Err(Error::Context(context::Error::Changed {
                path: p.to_path_buf(),
                expected: *size,
                got: now.map_or(0, |m| m.len()),
            }))
        }
    })
}

fn write_blob(blobs: &Path, media_type: &str, bytes: &[u8]) -> Result<image::Descriptor, Error> {
    let digest = Digest::of(bytes);
    let werr = |source| Error::Work {
        path: blobs.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(blobs).map_err(werr)?;
    std::fs::write(blobs.join(digest.hex()), bytes).map_err(werr)?;
    Ok(descriptor(media_type, &digest, bytes.len() as u64))
}
