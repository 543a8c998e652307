//! The kiln command line: argument parsing and output only; everything else
//! is in the library.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use kiln::build::image_name;
use kiln::context::taskgraph;
use kiln::{Algorithm, BuildOptions, Compression, ContextOptions, Format, ModePolicy};

/// Daemonless, rootless, reproducible OCI image builds for Taskcluster-style image directories.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Progress display: bars on a terminal (auto), one line per step (plain, for CI logs), or none.
    #[arg(long, global = true, value_enum, default_value_t = ProgressArg::Auto)]
    progress: ProgressArg,
    /// Threads to use (default: all cores). Outputs do not depend on it.
    #[arg(short = 'j', long, global = true, value_name = "N")]
    jobs: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ProgressArg {
    Auto,
    Plain,
    Never,
}

/// `--hash-cache [PATH]`: the default cache lives in the user cache directory.
fn default_hash_cache() -> PathBuf {
    kiln::cache_dir().join("hash-cache")
}

#[derive(Subcommand)]
enum Command {
    /// Print the context hash of an image directory.
    Hash {
        #[command(flatten)]
        ctx: ContextArgs,
        /// Hash algorithm: kiln's parallel kiln-v1, or byte-identical to taskgraph's.
        #[arg(long, value_enum, default_value_t = AlgorithmArg::KilnV1)]
        algorithm: AlgorithmArg,
        /// How on-disk modes enter the kiln-v1 hash.
        #[arg(long, value_enum, default_value_t = PolicyArg::Git)]
        mode_policy: PolicyArg,
        /// Reuse file digests of unchanged files (kiln-v1), keyed by device, inode, size, mtime and ctime.
        #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "")]
        hash_cache: Option<PathBuf>,
    },
    /// Write the taskgraph-compatible context archive (gzip) and print its hash.
    Context {
        #[command(flatten)]
        ctx: ContextArgs,
        /// Where to write the archive (e.g. foo.tar.gz).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Build an image from an image directory.
    Build(Box<BuildArgs>),
    /// Manage a local image store (an OCI layout of named base images).
    #[command(subcommand)]
    Store(StoreCommand),
    /// Push an image (OCI layout, OCI archive, docker-archive, image.tar.zst) to a registry.
    Push {
        image: PathBuf,
        /// REGISTRY/REPOSITORY[:TAG] (without a tag: by digest only).
        #[arg(long, value_name = "REF")]
        to: String,
        /// Repositories of the same registry to mount missing blobs from (repeatable).
        #[arg(long, value_name = "REPO")]
        mount_from: Vec<String>,
        #[command(flatten)]
        net: NetArgs,
        #[arg(long)]
        json: bool,
    },
    /// Pull an image from a registry into a store (every blob verified), and optionally write it out.
    Pull {
        /// REGISTRY/REPOSITORY[:TAG|@sha256:...]
        reference: String,
        #[command(flatten)]
        store: StoreArg,
        /// Name it NAME:TAG in the store (repeatable; default: the reference).
        #[arg(long = "name", value_name = "NAME:TAG")]
        names: Vec<String>,
        /// Also write the image here (format from the extension, as for build).
        #[arg(short, long)]
        output: Option<PathBuf>,
        #[command(flatten)]
        net: NetArgs,
        #[arg(long)]
        json: bool,
    },
    /// Check an image through and through: every digest and size, each layer's diff_id, media
    /// types, tar well-formedness, docker-archive metadata. Lists every problem; exit 1 if any.
    Verify {
        /// An OCI layout, OCI archive, docker-archive, image.tar.zst, or REGISTRY/REPO:TAG.
        image: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Say exactly how two images differ: digests, config fields, and per layer whether only the
    /// compression or the content differs, with the entries that differ. Exit 0 same, 1 different, 2 error.
    Diff {
        a: String,
        b: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Print an image's index digest and routes without building (takes build's flags).
    Routes(Box<BuildArgs>),
    /// Inspect the local index.
    #[command(subcommand)]
    Index(IndexCommand),
    /// Show an image's digests, layers and config.
    Inspect {
        /// An OCI layout directory, OCI archive, docker-archive or image.tar.zst.
        image: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Import an image (OCI layout, OCI archive, docker-archive, image.tar.zst); blob digests are kept.
    Add {
        /// The image to import.
        image: PathBuf,
        /// Name it NAME:TAG in the store (repeatable; default: the names the image carries).
        #[arg(long = "name", value_name = "NAME:TAG")]
        names: Vec<String>,
        #[command(flatten)]
        store: StoreArg,
    },
    /// List the store's images.
    Ls {
        #[command(flatten)]
        store: StoreArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove a name (NAME:TAG or NAME@sha256:...) from the store; `gc` frees its blobs.
    Rm {
        reference: String,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Delete blobs no named image references.
    Gc {
        #[command(flatten)]
        store: StoreArg,
    },
}

#[derive(Subcommand)]
enum IndexCommand {
    /// List entries (route, manifest digest), optionally only routes matching PATTERN (`*` wildcards).
    Ls {
        pattern: Option<String>,
        #[arg(long, value_name = "DIR")]
        index: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Show one route's entry.
    Show {
        route: String,
        #[arg(long, value_name = "DIR")]
        index: Option<PathBuf>,
    },
    /// Remove the entries whose routes match PATTERN.
    Rm {
        pattern: String,
        #[arg(long, value_name = "DIR")]
        index: Option<PathBuf>,
    },
}

#[derive(Args)]
struct StoreArg {
    /// The store directory (default: the first of $KILN_STORE, else $XDG_CACHE_HOME/kiln/store).
    #[arg(long, value_name = "DIR")]
    store: Option<PathBuf>,
}

impl StoreArg {
    fn store(&self) -> kiln::store::Store {
        match &self.store {
            Some(d) => kiln::store::Store::new(d, "--store"),
            None => {
                let env = std::env::var_os("KILN_STORE")
                    .and_then(|v| std::env::split_paths(&v).find(|p| !p.as_os_str().is_empty()));
                match env {
                    Some(d) => kiln::store::Store::new(d, "$KILN_STORE"),
                    None => {
                        kiln::store::Store::new(kiln::store::Stores::user_store(), "user cache")
                    }
                }
            }
        }
    }
}

#[derive(Args, Clone)]
struct ContextArgs {
    /// The image directory (holding the Dockerfile).
    image_dir: PathBuf,
    /// Root of the source tree for `# %include` (default: the enclosing git/hg checkout, else the working directory).
    #[arg(long)]
    topsrcdir: Option<PathBuf>,
    /// NAME=VALUE for `# %ARG NAME` and Dockerfile ARG (repeatable).
    #[arg(long = "arg", alias = "build-arg", value_name = "NAME=VALUE")]
    args: Vec<String>,
    /// taskgraph's run-task/ directory, for `# %include-run-task`.
    #[arg(long)]
    run_task_dir: Option<PathBuf>,
    /// Print a JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BuildArgs {
    #[command(flatten)]
    ctx: ContextArgs,
    /// More image directories (with --all).
    #[arg(value_name = "MORE_DIRS")]
    more: Vec<PathBuf>,
    /// Build every image under the given directories (e.g. taskcluster/docker), parents first,
    /// independent images in parallel; parents come from taskcluster/kinds/docker-image/kind.yml
    /// (`parent:`, used as FROM $DOCKER_IMAGE_PARENT) or a FROM naming another image of the tree.
    #[arg(long)]
    all: bool,
    /// Build twice (the second time with another thread count, directory entries read in reverse
    /// order, and another temporary directory) and fail with a `kiln diff` report if anything differs.
    #[arg(long)]
    check_reproducible: bool,
    /// With --all: where outputs go, as <name>.tar (or the extension --format implies).
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
    /// Output path (default: <dir name>.tar in the working directory).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Output format (default: from the extension: .tar.zst, .oci.tar, .tar, else an OCI layout directory).
    #[arg(long, value_enum)]
    format: Option<FormatArg>,
    /// Image name and tag (repeatable; default <REGISTRY>/<dir>:<VERSION>, else <dir>:latest).
    #[arg(short, long = "tag")]
    tags: Vec<String>,
    /// Layer compression (default: zstd for OCI layouts and archives, gzip for docker-archive, none inside a .tar.zst).
    #[arg(long, value_enum)]
    layer_compression: Option<CompressionArg>,
    /// Compression level (zstd 1-22, default 3; gzip 0-9, default 6).
    #[arg(long)]
    compression_level: Option<i32>,
    /// Timestamp for every mtime and `created` (default $SOURCE_DATE_EPOCH, else 0).
    #[arg(long, value_name = "EPOCH")]
    timestamp: Option<u64>,
    /// How on-disk modes become layer modes.
    #[arg(long, value_enum, default_value_t = PolicyArg::Git)]
    mode_policy: PolicyArg,
    /// Context hash algorithm reported by the build.
    #[arg(long, value_enum, default_value_t = AlgorithmArg::KilnV1)]
    algorithm: AlgorithmArg,
    /// Write the manifest digest to this file.
    #[arg(long)]
    digest_file: Option<PathBuf>,
    /// Build this stage (FROM ... AS NAME) instead of the last.
    #[arg(long)]
    target: Option<String>,
    /// Reuse file digests of unchanged files (kiln-v1), keyed by device, inode, size, mtime and ctime.
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "")]
    hash_cache: Option<PathBuf>,
    /// An image store (OCI layout) for FROM and COPY --from (repeatable). Stores are searched in
    /// this order: each --store, then $KILN_STORE (colon-separated), then <topsrcdir>/vendor-images
    /// if present, then $XDG_CACHE_HOME/kiln/store (~/.cache/kiln/store). Nothing is ever pulled.
    #[arg(long = "store", value_name = "DIR")]
    stores: Vec<PathBuf>,
    #[command(flatten)]
    index: IndexArgs,
}

#[derive(Args, Clone)]
struct IndexArgs {
    /// The local index (default $XDG_CACHE_HOME/kiln/index); its images live in the user store.
    #[arg(long, value_name = "DIR")]
    index: Option<PathBuf>,
    /// Route prefix: {prefix}.cache.level-{level}.docker-images.v2.{name}.hash.{digest}.
    #[arg(long, value_name = "PREFIX", default_value = kiln::index::DEFAULT_PREFIX)]
    index_prefix: String,
    /// Taskcluster level (1-3): lookups try levels 3 down to it; writes go to it.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=3))]
    level: u8,
    /// Build even when the index has the image (the result is indexed again).
    #[arg(long)]
    no_cache: bool,
    /// Neither look the image up nor index it (no copy is kept in the user store).
    #[arg(long)]
    no_index: bool,
    /// Keep the index in a registry too (REGISTRY/PREFIX): routes are tags hash-<digest>, latest
    /// and pushdate-<YYYYMMDDHHMMSS> on PREFIX/<level>/<name>; looked up before building, pushed after.
    #[arg(long, value_name = "REGISTRY/PREFIX")]
    index_registry: Option<String>,
    #[command(flatten)]
    net: NetArgs,
}

#[derive(Args, Clone)]
struct NetArgs {
    /// Speak plain HTTP to the registry (loopback test registries).
    #[arg(long)]
    insecure: bool,
    /// Upload blobs larger than this in chunks of this many bytes (0: always one request).
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20)]
    chunk_size: u64,
}

/// Splits `REGISTRY/PREFIX` of --index-registry.
fn registry_index(spec: &str, net: &NetArgs) -> Result<kiln::index::RegistryIndex> {
    let (host, prefix) = spec
        .split_once('/')
        .filter(|(h, p)| !h.is_empty() && !p.is_empty())
        .ok_or_else(|| {
            anyhow!(
                "--index-registry {spec}: expected REGISTRY/PREFIX, e.g. 127.0.0.1:5000/kiln-index"
            )
        })?;
    Ok(kiln::index::RegistryIndex {
        client: std::sync::Arc::new(kiln::registry::Client::new(host, net.insecure)),
        prefix: prefix.trim_end_matches('/').to_string(),
        push: kiln::registry::PushOptions {
            chunk: net.chunk_size,
            mount_from: Vec::new(),
        },
        pushed: Default::default(),
    })
}

impl IndexArgs {
    fn options(&self, name: &str) -> Result<kiln::index::IndexOptions> {
        let registry = match &self.index_registry {
            Some(spec) => Some(registry_index(spec, &self.net)?),
            None => None,
        };
        Ok(kiln::index::IndexOptions {
            registry,
            index: kiln::index::LocalIndex::new(
                self.index
                    .clone()
                    .unwrap_or_else(kiln::index::LocalIndex::default_dir),
            ),
            routes: kiln::index::RouteOptions {
                prefix: self.index_prefix.clone(),
                level: self.level,
            },
            store: kiln::store::Store::new(kiln::store::Stores::user_store(), "user cache"),
            lookup: !self.no_cache,
            name: name.to_string(),
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum AlgorithmArg {
    KilnV1,
    Taskgraph,
}

#[derive(Clone, Copy, ValueEnum)]
enum PolicyArg {
    Git,
    Preserve,
}

#[derive(Clone, Copy, ValueEnum)]
enum FormatArg {
    DockerArchive,
    /// A docker-archive compressed as a whole with zstd (image.tar.zst).
    DockerArchiveZstd,
    OciArchive,
    OciDir,
}

#[derive(Clone, Copy, ValueEnum)]
enum CompressionArg {
    Zstd,
    Gzip,
    None,
}

impl From<AlgorithmArg> for Algorithm {
    fn from(a: AlgorithmArg) -> Self {
        match a {
            AlgorithmArg::KilnV1 => Algorithm::KilnV1,
            AlgorithmArg::Taskgraph => Algorithm::Taskgraph,
        }
    }
}

impl From<PolicyArg> for ModePolicy {
    fn from(p: PolicyArg) -> Self {
        match p {
            PolicyArg::Git => ModePolicy::Git,
            PolicyArg::Preserve => ModePolicy::Preserve,
        }
    }
}

fn main() -> ExitCode {
    // Like every Unix filter, end quietly when the reader of our output
    // goes away (`kiln inspect … | head`) instead of panicking in println!.
    // SAFETY: called before any other thread exists; SIG_DFL is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: error: {}", error_text(&e));
            ExitCode::from(1)
        }
    }
}

/// The error and its causes, skipping a cause whose text the message already holds.
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// Turns `ContextArgs` into checked `ContextOptions`.
fn context_options(a: &ContextArgs) -> Result<ContextOptions> {
    let mut args = BTreeMap::new();
    for kv in &a.args {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow!("--arg {kv}: expected NAME=VALUE"))?;
        if k.is_empty() {
            bail!("--arg {kv}: empty NAME");
        }
        args.insert(k.to_string(), v.to_string());
    }
    if !a.image_dir.is_dir() {
        bail!(
            "image directory {} does not exist or is not a directory",
            a.image_dir.display()
        );
    }
    let topsrcdir = match &a.topsrcdir {
        Some(t) => t.clone(),
        None => match kiln::checkout_root(&a.image_dir) {
            Some(root) => root,
            None => std::env::current_dir().context("finding the working directory")?,
        },
    };
    Ok(ContextOptions {
        topsrcdir,
        args,
        run_task_dir: a.run_task_dir.clone(),
        taskgraph_names: false,
    })
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn cache_path(p: PathBuf) -> PathBuf {
    if p.as_os_str().is_empty() {
        default_hash_cache()
    } else {
        p
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    if let Some(n) = cli.jobs {
        if n == 0 {
            bail!("--jobs 0: give at least one thread");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up the thread pool")?;
    }
    let progress = kiln::progress::Progress::new(match cli.progress {
        ProgressArg::Auto => kiln::progress::Mode::Auto,
        ProgressArg::Plain => kiln::progress::Mode::Plain,
        ProgressArg::Never => kiln::progress::Mode::Never,
    });
    match cli.command {
        Command::Hash {
            ctx,
            algorithm,
            mode_policy,
            hash_cache,
        } => {
            let opts = context_options(&ctx)?;
            let algorithm: Algorithm = algorithm.into();
            let cache = hash_cache.map(|p| kiln::context::HashCache::load(&cache_path(p)));
            let (c, h) = kiln::context::collect_and_hash(
                &ctx.image_dir,
                &opts,
                algorithm,
                mode_policy.into(),
                cache.as_ref(),
                &progress,
            )?;
            if ctx.json {
                let name = match algorithm {
                    Algorithm::KilnV1 => "kiln-v1",
                    Algorithm::Taskgraph => "taskgraph",
                };
                let mut v = serde_json::json!({ "algorithm": name, "context_hash": h, "files": c.entries.len(), "bytes": c.total_size() });
                if let Some(cache) = &cache {
                    let (hits, hashed) = cache.counts();
                    v["hash_cache"] = serde_json::json!({ "hits": hits, "hashed": hashed });
                }
                print_json(&v)?;
            } else {
                println!("{h}");
            }
        }
        Command::Context { ctx, output } => {
            let mut opts = context_options(&ctx)?;
            opts.taskgraph_names = true;
            let c = kiln::Context::collect(&ctx.image_dir, &opts)?;
            let h = write_context_archive(&c, &output)?;
            if ctx.json {
                print_json(&serde_json::json!({ "context_hash": h, "output": output }))?;
            } else {
                println!("{h}");
            }
        }
        Command::Build(b) => return build(*b, progress),
        Command::Store(cmd) => store(cmd)?,
        Command::Routes(b) => return routes(*b, progress),
        Command::Verify { image, json, net } => return verify(&image, json, &net),
        Command::Diff { a, b, json, net } => {
            return Ok(match diff(&a, &b, json, &net) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("kiln: error: {}", error_text(&e));
                    ExitCode::from(2)
                }
            })
        }
        Command::Push {
            image,
            to,
            mount_from,
            net,
            json,
        } => push(&image, &to, mount_from, &net, json)?,
        Command::Pull {
            reference,
            store,
            names,
            output,
            net,
            json,
        } => pull(&reference, &store, names, output, &net, json)?,
        Command::Index(cmd) => index(cmd)?,
        Command::Inspect { image, json } => {
            let r = kiln::store::ImageReader::open(&image)?;
            let s = r.summary()?;
            if json {
                print_json(&s)?;
            } else {
                print_summary(&image, &s);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes taskgraph's gzip context archive atomically; returns the hash.
fn write_context_archive(c: &kiln::Context, output: &Path) -> Result<String> {
    let dir = output
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(&kiln::archive::temp_prefix("out"))
        .tempfile_in(dir)
        .with_context(|| format!("writing {}", output.display()))?;
    // gzip header as Python's GzipFile writes it for taskgraph: file name without .gz, fixed mtime.
    let base = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let fname = base.strip_suffix(".gz").unwrap_or(&base).to_string();
    let gz = flate2::GzBuilder::new()
        .filename(fname.as_bytes())
        .mtime(taskgraph::MTIME as u32)
        .operating_system(255)
        .write(
            std::io::BufWriter::new(tmp.as_file()),
            flate2::Compression::best(),
        );
    let (h, gz) = taskgraph::write_context_tar(c, gz)?;
    gz.finish()
        .and_then(|mut w| w.flush())
        .with_context(|| format!("writing {}", output.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::Permissions::from_mode(0o644);
        tmp.as_file()
            .set_permissions(mode)
            .with_context(|| format!("writing {}", output.display()))?;
    }
    tmp.persist(output)
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(h)
}

fn build(b: BuildArgs, progress: kiln::progress::Progress) -> Result<ExitCode> {
    let opts = build_options(&b, progress)?;
    if b.all {
        return build_all(&b, opts);
    }
    if !b.more.is_empty() {
        bail!("several image directories given: add --all to build them all (with --out-dir)");
    }
    let (r, indexed) = if b.index.no_index {
        (kiln::build(&b.ctx.image_dir, &opts)?, None)
    } else {
        let io = b.index.options(&image_name(&b.ctx.image_dir))?;
        let c = kiln::index::build_cached(&b.ctx.image_dir, &opts, &io, None)?;
        (c.result, Some((c.index_digest, c.route)))
    };
    if b.check_reproducible {
        check_reproducible(&b, &opts, &r)?;
    }
    if let Some(df) = &b.digest_file {
        std::fs::write(df, format!("{}\n", r.manifest_digest))
            .with_context(|| format!("writing {}", df.display()))?;
    }
    if b.ctx.json {
        let mut v = serde_json::to_value(&r)?;
        if let Some((digest, route)) = &indexed {
            v["index_digest"] = serde_json::json!(digest);
            v["route"] = serde_json::json!(route);
        }
        print_json(&v)?;
    } else {
        println!("context hash:    {}", r.context_hash);
        if let Some((digest, route)) = &indexed {
            println!("index digest:    {digest}");
            println!("route:           {route}");
        }
        println!("image id:        {}", r.image_id);
        println!("manifest digest: {}", r.manifest_digest);
        println!("tags:            {}", r.tags.join(", "));
        let size: u64 = r.layers.iter().map(|l| l.size).sum();
        println!(
            "{}: {} {} ({} layers, {} bytes of layers)",
            r.status,
            r.format,
            r.output.display(),
            r.layers.len(),
            size
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Builds again with perturbations and compares the manifest digests.
fn check_reproducible(b: &BuildArgs, opts: &BuildOptions, first: &kiln::BuildResult) -> Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("kiln-reproducible-")
        .tempdir_in(std::env::temp_dir())
        .context("creating a temporary directory for the second build")?;
    let mut again = opts.clone();
    again.output = tmp.path().join(
        opts.output
            .file_name()
            .map_or_else(|| "image".into(), |n| n.to_owned()),
    );
    again.hash_cache = None;
    again.progress = kiln::progress::Progress::new(kiln::progress::Mode::Never);
    let threads = rayon::current_num_threads();
    let other = if threads > 1 { 1 } else { 3 };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(other)
        .build()
        .context("setting up the second build's threads")?;
    kiln::context::walk::set_reverse_read_order(true);
    let second = pool.install(|| kiln::build(&b.ctx.image_dir, &again));
    kiln::context::walk::set_reverse_read_order(false);
    let second = second?;
    if second.manifest_digest == first.manifest_digest {
        eprintln!(
            "kiln: reproducible: a second build ({other} thread(s) instead of {threads}, directories read in reverse, in {}) gave the same manifest digest {}",
            tmp.path().display(),
            second.manifest_digest
        );
        return Ok(());
    }
    let ra = kiln::store::ImageReader::open(&opts.output)?;
    let rb = kiln::store::ImageReader::open(&again.output)?;
    let report = kiln::diff::diff(&ra, &rb)?;
    eprint!("{}", kiln::diff::render(&report));
    bail!(
        "not reproducible: the second build gave {} instead of {} (the report above compares them)",
        second.manifest_digest,
        first.manifest_digest
    )
}

fn routes(b: BuildArgs, progress: kiln::progress::Progress) -> Result<ExitCode> {
    let opts = build_options(&b, progress)?;
    let io = b.index.options(&image_name(&b.ctx.image_dir))?;
    let (ctx, hash) = kiln::context::collect_and_hash(
        &b.ctx.image_dir,
        &opts.context,
        opts.algorithm,
        opts.mode_policy,
        None,
        &opts.progress,
    )?;
    let parents = kiln::build::base_digests(&ctx, &opts)?;
    let builder = kiln::index::builder_line(&opts);
    let digest = kiln::index::index_digest(&hash, &opts.context.args, &builder, &parents);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let lookup = io.routes.lookup(&io.name, &digest);
    let write = io.routes.write(&io.name, &digest, now);
    if b.ctx.json {
        let hits: Vec<Option<kiln::index::Entry>> =
            lookup.iter().map(|r| io.index.get(r)).collect();
        print_json(&serde_json::json!({
            "context_hash": hash, "index_digest": digest, "builder": builder,
            "parents": parents, "lookup": lookup, "hits": hits, "write": write,
        }))?;
    } else {
        println!("context hash: {hash}");
        println!("index digest: {digest}");
        for r in &lookup {
            let hit = match io.index.get(r) {
                Some(e) => format!("hit {}", e.manifest_digest),
                None => "miss".into(),
            };
            println!("lookup {r} ({hit})");
        }
        for r in &write {
            println!("write  {r}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Opens an image file, or pulls a registry reference into a temporary store.
fn open_image(
    image: &str,
    net: &NetArgs,
) -> Result<(kiln::store::ImageReader, Option<tempfile::TempDir>)> {
    let p = Path::new(image);
    if p.exists() || kiln::registry::split_reference(image).is_err() {
        return Ok((kiln::store::ImageReader::open(p)?, None));
    }
    let (host, repo, r) = kiln::registry::split_reference(image)?;
    let tmp = tempfile::tempdir().context("creating a temporary store")?;
    let store = kiln::store::Store::new(tmp.path().join("store"), "temporary");
    let client = kiln::registry::Client::new(&host, net.insecure);
    kiln::registry::pull(
        &client,
        &repo,
        r.as_deref().unwrap_or("latest"),
        &store,
        &[format!("{host}/{repo}:pulled")],
        &Default::default(),
    )
    .with_context(|| format!("pulling {image}"))?
    .ok_or_else(|| anyhow!("{image}: the registry has no such image"))?;
    Ok((kiln::store::ImageReader::open(&store.dir)?, Some(tmp)))
}

fn diff(a: &str, b: &str, json: bool, net: &NetArgs) -> Result<ExitCode> {
    let (ra, _ta) = open_image(a, net)?;
    let (rb, _tb) = open_image(b, net)?;
    let report = kiln::diff::diff(&ra, &rb)?;
    if json {
        print_json(&report)?;
    } else {
        print!("{}", kiln::diff::render(&report));
    }
    Ok(if report.identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn verify(image: &str, json: bool, net: &NetArgs) -> Result<ExitCode> {
    let (r, _tmp) = open_image(image, net)?;
    let report = kiln::verify::verify(&r);
    if json {
        print_json(&report)?;
    } else if report.problems.is_empty() {
        println!(
            "ok: {image} ({}): {} manifest(s) {}, {} blobs and {} layers verified",
            report.format,
            report.manifests.len(),
            report.manifests.join(", "),
            report.blobs_checked,
            report.layers_checked
        );
    } else {
        println!(
            "{image} ({}): {} problem(s):",
            report.format,
            report.problems.len()
        );
        for p in &report.problems {
            println!("  {}: {}", p.blob, p.message);
        }
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn push(image: &Path, to: &str, mount_from: Vec<String>, net: &NetArgs, json: bool) -> Result<()> {
    let (host, repo, reference) = kiln::registry::split_reference(to)?;
    if reference
        .as_deref()
        .is_some_and(|r| r.starts_with("sha256:"))
    {
        bail!("--to {to}: push to a tag or to a bare repository, not to a digest");
    }
    let client = kiln::registry::Client::new(&host, net.insecure);
    let reader = kiln::store::ImageReader::open(image)?;
    let (desc, _) = reader.manifest_descriptor()?;
    let opts = kiln::registry::PushOptions {
        chunk: net.chunk_size,
        mount_from,
    };
    let tags: Vec<String> = reference.into_iter().collect();
    let report = kiln::registry::push(&client, &reader, &desc, &repo, &tags, &opts)
        .with_context(|| format!("pushing {} to {to}", image.display()))?;
    if json {
        print_json(&report)?;
    } else {
        println!("manifest digest: {}", report.manifest_digest);
        println!(
            "pushed {host}/{repo}{}: {} blob(s) uploaded ({} bytes), {} already there, {} mounted",
            tags.first().map(|t| format!(":{t}")).unwrap_or_default(),
            report.uploaded,
            report.bytes_uploaded,
            report.present,
            report.mounted
        );
    }
    Ok(())
}

fn pull(
    reference: &str,
    store: &StoreArg,
    names: Vec<String>,
    output: Option<PathBuf>,
    net: &NetArgs,
    json: bool,
) -> Result<()> {
    let (host, repo, r) = kiln::registry::split_reference(reference)?;
    let r = r.unwrap_or_else(|| "latest".to_string());
    let client = kiln::registry::Client::new(&host, net.insecure);
    let s = store.store();
    let names = if names.is_empty() {
        vec![if r.starts_with("sha256:") {
            format!("{host}/{repo}:pulled")
        } else {
            format!("{host}/{repo}:{r}")
        }]
    } else {
        names
    };
    let desc = kiln::registry::pull(&client, &repo, &r, &s, &names, &Default::default())
        .with_context(|| format!("pulling {reference}"))?
        .ok_or_else(|| anyhow!("{reference}: the registry has no such image"))?;
    if let Some(out) = &output {
        let manifest = s.read_manifest(&desc)?;
        s.write_image(&desc, &manifest, &names, 0, Format::from_path(out), out)?;
    }
    if json {
        print_json(
            &serde_json::json!({ "manifest_digest": desc.digest, "names": names, "store": s.dir, "output": output }),
        )?;
    } else {
        println!("manifest digest: {}", desc.digest);
        println!("stored as {} in {}", names.join(", "), s.dir.display());
    }
    Ok(())
}

fn index(cmd: IndexCommand) -> Result<()> {
    let open = |d: Option<PathBuf>| {
        kiln::index::LocalIndex::new(d.unwrap_or_else(kiln::index::LocalIndex::default_dir))
    };
    match cmd {
        IndexCommand::Ls {
            pattern,
            index,
            json,
        } => {
            let list = open(index).list(pattern.as_deref())?;
            if json {
                print_json(&list)?;
            } else {
                for e in list {
                    println!("{}\t{}", e.route, e.manifest_digest);
                }
            }
        }
        IndexCommand::Show { route, index } => {
            let idx = open(index);
            let e = idx.get(&route).ok_or_else(|| {
                anyhow!("{route}: no such route in the index {}", idx.dir.display())
            })?;
            print_json(&e)?;
        }
        IndexCommand::Rm { pattern, index } => {
            let n = open(index).remove(&pattern)?;
            println!("removed {n} route(s)");
        }
    }
    Ok(())
}

fn build_options(b: &BuildArgs, progress: kiln::progress::Progress) -> Result<BuildOptions> {
    let context = context_options(&b.ctx)?;
    let output = b
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.tar", image_name(&b.ctx.image_dir))));
    let format = match b.format {
        Some(FormatArg::OciDir) => Format::OciDir,
        Some(FormatArg::OciArchive) => Format::OciArchive,
        Some(FormatArg::DockerArchive)
            if Format::from_path(&output) == Format::DockerArchiveZstd =>
        {
            Format::DockerArchiveZstd
        }
        Some(FormatArg::DockerArchive) => Format::DockerArchive,
        Some(FormatArg::DockerArchiveZstd) => Format::DockerArchiveZstd,
        None => Format::from_path(&output),
    };
    let compression = match b.layer_compression {
        Some(CompressionArg::Zstd) => Compression::Zstd(b.compression_level.unwrap_or(3)),
        Some(CompressionArg::Gzip) => {
            Compression::Gzip(b.compression_level.unwrap_or(6).clamp(0, 9) as u32)
        }
        Some(CompressionArg::None) => Compression::None,
        None if format == Format::DockerArchiveZstd => Compression::None,
        // Docker Engines before 23 cannot load zstd layers from a docker-archive.
        None if format == Format::DockerArchive => {
            Compression::Gzip(b.compression_level.unwrap_or(6).clamp(0, 9) as u32)
        }
        None => Compression::Zstd(b.compression_level.unwrap_or(3)),
    };
    match (compression, b.compression_level) {
        (Compression::Zstd(l), _) if !(1..=22).contains(&l) => {
            bail!("--compression-level {l}: zstd levels run from 1 to 22")
        }
        (Compression::Gzip(_), Some(l)) if !(0..=9).contains(&l) => {
            bail!("--compression-level {l}: gzip levels run from 0 to 9")
        }
        _ => {}
    }
    let timestamp = match b.timestamp {
        Some(t) => t,
        None => match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(s) if !s.is_empty() => s
                .trim()
                .parse()
                .map_err(|_| anyhow!("SOURCE_DATE_EPOCH={s}: expected whole seconds since 1970"))?,
            _ => 0,
        },
    };
    let tags = if b.tags.is_empty() {
        vec![kiln::default_tag(&b.ctx.image_dir)]
    } else {
        b.tags.clone()
    };
    let stores = kiln::store::Stores::search_order(&b.stores, Some(&context.topsrcdir));
    let opts = BuildOptions {
        context,
        algorithm: b.algorithm.into(),
        mode_policy: b.mode_policy.into(),
        tags,
        compression,
        timestamp,
        format,
        output,
        target: b.target.clone(),
        hash_cache: b.hash_cache.clone().map(cache_path),
        stores,
        parents: Default::default(),
        progress,
    };
    Ok(opts)
}

fn build_all(b: &BuildArgs, opts: BuildOptions) -> Result<ExitCode> {
    if b.output.is_some() || !b.tags.is_empty() || b.target.is_some() || b.digest_file.is_some() {
        bail!("--all builds many images: use --out-dir DIR instead of -o, and leave out -t, --target and --digest-file");
    }
    let out_dir = b
        .out_dir
        .clone()
        .ok_or_else(|| anyhow!("--all needs --out-dir DIR for the images it writes"))?;
    let mut inputs = vec![b.ctx.image_dir.clone()];
    inputs.extend(b.more.iter().cloned());
    let images = kiln::tree::discover(&inputs, &opts.context.topsrcdir)?;
    let json = b.ctx.json;
    let mut io = b.index.options("")?;
    // --no-index: a throwaway index and store, so nothing is kept.
    let scratch = tempfile::tempdir().context("creating a temporary index")?;
    if b.index.no_index {
        io.index = kiln::index::LocalIndex::new(scratch.path().join("index"));
        io.store = kiln::store::Store::new(scratch.path().join("store"), "this run");
    }
    let lines = kiln::tree::build_all(&images, &opts, &io, &out_dir, &|l| {
        if !json {
            println!(
                "{}\t{}\t{}\t{}\t{:.2}s",
                l.name, l.context_hash, l.manifest_digest, l.status, l.seconds
            );
        }
    })?;
    if json {
        print_json(&lines)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn store(cmd: StoreCommand) -> Result<()> {
    match cmd {
        StoreCommand::Add {
            image,
            names,
            store,
        } => {
            let s = store.store();
            let r = kiln::store::ImageReader::open(&image)?;
            let added = s.add(&r, &names).with_context(|| {
                format!(
                    "importing {} into the store {}",
                    image.display(),
                    s.dir.display()
                )
            })?;
            for a in added {
                println!("{}\t{}", a.name, a.digest);
            }
        }
        StoreCommand::Ls { store, json } => {
            let s = store.store();
            let list = s.list()?;
            if json {
                print_json(&list)?;
            } else {
                for l in list {
                    println!("{}\t{}\t{}", l.name, l.digest, l.size);
                }
            }
        }
        StoreCommand::Rm { reference, store } => {
            let n = store.store().remove(&reference)?;
            println!("removed {n} name(s); run `kiln store gc` to free unreferenced blobs");
        }
        StoreCommand::Gc { store } => {
            let (n, bytes) = store.store().gc()?;
            println!("deleted {n} blob(s), {bytes} bytes");
        }
    }
    Ok(())
}

fn print_summary(path: &Path, s: &kiln::store::Summary) {
    println!("image:           {} ({})", path.display(), s.format);
    println!("manifest digest: {}", s.manifest_digest);
    println!("image id:        {}", s.image_id);
    if !s.tags.is_empty() {
        println!("tags:            {}", s.tags.join(", "));
    }
    let c = &s.config;
    println!("platform:        {}/{}", c.os, c.architecture);
    if let Some(created) = &c.created {
        println!("created:         {created}");
    }
    println!("layers:          {}", s.manifest.layers.len());
    for (i, l) in s.manifest.layers.iter().enumerate() {
        let diff = c.rootfs.diff_ids.get(i).map(String::as_str).unwrap_or("?");
        println!("  {i}: {} {} bytes {}", l.digest, l.size, l.media_type);
        println!("     diff_id {diff}");
    }
    let rc = &c.config;
    let list = |v: &Option<Vec<String>>| v.as_ref().map(|v| format!("{v:?}"));
    let fields: Vec<(&str, Option<String>)> = vec![
        ("Env", list(&rc.env)),
        ("Entrypoint", list(&rc.entrypoint)),
        ("Cmd", list(&rc.cmd)),
        ("WorkingDir", rc.working_dir.clone()),
        ("User", rc.user.clone()),
        (
            "ExposedPorts",
            rc.exposed_ports
                .as_ref()
                .map(|m| m.keys().cloned().collect::<Vec<_>>().join(" ")),
        ),
        (
            "Volumes",
            rc.volumes
                .as_ref()
                .map(|m| m.keys().cloned().collect::<Vec<_>>().join(" ")),
        ),
        ("Labels", rc.labels.as_ref().map(|m| format!("{m:?}"))),
        ("StopSignal", rc.stop_signal.clone()),
        ("Shell", list(&rc.shell)),
        (
            "Healthcheck",
            rc.healthcheck.as_ref().map(|h| format!("{:?}", h.test)),
        ),
        ("OnBuild", list(&rc.on_build)),
    ];
    println!("config:");
    for (k, v) in fields {
        if let Some(v) = v {
            println!("  {k}: {v}");
        }
    }
    println!("history:");
    for h in &c.history {
        let empty = if h.empty_layer { " (no layer)" } else { "" };
        println!("  {}{empty}", h.created_by.as_deref().unwrap_or(""));
    }
}
