//! The command line's shape: clap definitions of every command and flag,
//! and their conversions into library types. `main.rs` dispatches.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use kiln::store::Store;
use kiln::{Algorithm, ModePolicy};

/// Daemonless, rootless, reproducible OCI image builds for Taskcluster-style image directories.
#[derive(Parser)]
#[command(name = "kiln", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Progress display: auto (bars on a terminal, else plain), plain (one line per step and a
    /// RUN's output, for CI logs), or never.
    #[arg(long, global = true, value_enum, default_value_t = ProgressArg::Auto)]
    pub progress: ProgressArg,
    /// Threads to use (default: all cores). Outputs do not depend on it.
    #[arg(short = 'j', long, global = true, value_name = "N")]
    pub jobs: Option<usize>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ProgressArg {
    Auto,
    Plain,
    Never,
}

/// `--hash-cache [PATH]`: the default cache lives in the user cache directory.
pub fn default_hash_cache() -> PathBuf {
    kiln::cache_dir().join("hash-cache")
}

#[derive(Subcommand)]
pub enum Command {
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
    /// The step cache: list or prune the steps kiln will not run again.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Taskcluster: run as the image builder of a `docker-image` task.
    #[command(subcommand)]
    Taskcluster(TaskclusterCommand),
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
        /// [REGISTRY/]REPOSITORY[:TAG|@sha256:...]; without a registry, Docker Hub (debian:12 is
        /// docker.io/library/debian:12, reached at registry-1.docker.io).
        reference: String,
        /// Keep a whole multi-platform image index (every platform), not only the host's image.
        #[arg(long)]
        all_platforms: bool,
        /// A Docker Hub mirror tried first (repeatable, like the Docker daemon's registry-mirrors;
        /// also $KILN_REGISTRY_MIRRORS, comma-separated). With --insecure it speaks plain HTTP.
        #[arg(long = "registry-mirror", value_name = "HOST[:PORT]")]
        mirrors: Vec<String>,
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
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to standard output.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
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
pub enum StoreCommand {
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
    /// Delete blobs no named image references and no running kiln holds, and what finished kiln
    /// processes left behind (temporary files, leases).
    Gc {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Rebuild the store's index.json (its names) from its blobs and kiln's index: for a store
    /// whose index.json is corrupt or was lost.
    Repair {
        #[command(flatten)]
        store: StoreArg,
        /// The local index whose entries name the store's images (default $XDG_CACHE_HOME/kiln/index).
        #[arg(long, value_name = "DIR")]
        index: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum TaskclusterCommand {
    /// Build the image of a taskgraph `docker-image` task from its environment (CONTEXT_TASK_ID,
    /// CONTEXT_PATH, IMAGE_NAME, DOCKER_BUILD_ARGS, DOCKER_IMAGE_ZSTD_LEVEL, PARENT_TASK_ID,
    /// CHOWN_OUTPUT, HASH, TASKCLUSTER_ROOT_URL or TASKCLUSTER_PROXY_URL): fetch the context and the
    /// parent, check HASH, build, write out/image.tar and out/image.tar.zst.
    BuildImage {
        /// The task's workspace: context.tar.gz and parent.tar are taken from it when present; the
        /// outputs go to its out/.
        #[arg(long, default_value = "/workspace")]
        workspace: PathBuf,
        /// More `kiln build` flags (after --), e.g. --isolation sandbox.
        #[arg(last = true)]
        build_flags: Vec<String>,
    },
}

#[derive(Subcommand)]
pub enum CacheCommand {
    /// List the cached steps (least recently used first).
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove cached steps: those unused for longer than --older-than, then the least recently used
    /// until their layers total at most --keep-bytes; `kiln store gc` then frees their layers.
    Prune {
        /// e.g. 30d, 12h, 90m.
        #[arg(long, value_name = "DURATION")]
        older_than: Option<String>,
        #[arg(long, value_name = "BYTES")]
        keep_bytes: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum IndexCommand {
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
pub struct StoreArg {
    /// The store directory (default: the first of $KILN_STORE, else $XDG_CACHE_HOME/kiln/store).
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
}

impl StoreArg {
    pub fn store(&self) -> Store {
        Store::chosen(self.store.as_deref())
    }
}

#[derive(Args, Clone)]
pub struct ContextArgs {
    /// The image directory (holding the Dockerfile), or with -f any Docker build context. For
    /// `kiln build`, `-` or a tar file (.tar, .tar.gz, .tar.zst) is a context archive, built as it
    /// is (as `docker build - < context.tar.gz`; taskgraph's context tars too).
    pub image_dir: PathBuf,
    /// The Dockerfile, when it is not IMAGE_DIR/Dockerfile (as `docker build -f`).
    #[arg(short = 'f', long = "file", value_name = "DOCKERFILE")]
    pub file: Option<PathBuf>,
    /// Root of the source tree for `# %include` (default: the enclosing git/hg checkout, else the working directory).
    #[arg(long)]
    pub topsrcdir: Option<PathBuf>,
    /// NAME=VALUE for `# %ARG NAME` and Dockerfile ARG (repeatable); NAME alone takes $NAME.
    #[arg(long = "arg", alias = "build-arg", value_name = "NAME=VALUE")]
    pub args: Vec<String>,
    /// taskgraph's run-task/ directory, for `# %include-run-task`.
    #[arg(long)]
    pub run_task_dir: Option<PathBuf>,
    /// Print a JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Set for a context archive: its Dockerfile is used as it is.
    #[arg(skip)]
    pub plain_dockerfile: bool,
}

#[derive(Args)]
pub struct BuildArgs {
    #[command(flatten)]
    pub ctx: ContextArgs,
    /// More image directories (with --all).
    #[arg(value_name = "MORE_DIRS")]
    pub more: Vec<PathBuf>,
    /// Build every image under the given directories (e.g. taskcluster/docker), parents first,
    /// independent images in parallel; parents come from taskcluster/kinds/docker-image/kind.yml
    /// (`parent:`, used as FROM $DOCKER_IMAGE_PARENT) or a FROM naming another image of the tree.
    #[arg(long)]
    pub all: bool,
    /// With --all: when an image fails, go on with the images that do not depend on it (its
    /// children are reported blocked), then fail listing them.
    #[arg(long)]
    pub keep_going: bool,
    /// The network RUN steps get: host (the default: Dockerfiles install packages) or none (only
    /// loopback). `RUN --network=…` overrides it for one step.
    #[arg(long, value_name = "host|none", default_value = "host", value_parser = ["host", "none", "default"])]
    pub network: String,
    /// Grant an entitlement (BuildKit's word): network.host lets a step ask for the host's network
    /// with `RUN --network=host`. Without it such a step fails; a build-wide --network none binds
    /// every step whatever is allowed.
    #[arg(long = "allow", value_name = "network.host", value_parser = ["network.host"])]
    pub allow: Vec<String>,
    /// How RUN is isolated: auto (kiln's sandbox where namespaces can be made; as root inside an
    /// unprivileged container, the container's own root, as kaniko does), sandbox, or container.
    #[arg(long, value_name = "auto|sandbox|container", default_value = "auto", value_parser = ["auto", "sandbox", "container"])]
    pub isolation: String,
    /// A label for the image's config, as `docker build --label`: KEY=VALUE (KEY alone: an
    /// empty value). Repeatable; over the Dockerfile's LABELs of the same key.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Build arguments expand in FROM even where no ARG declares them (kaniko's rule, which
    /// Taskcluster image Dockerfiles rely on: `FROM $DOCKER_IMAGE_PARENT`).
    #[arg(long)]
    pub build_args_in_from: bool,
    /// Pull a FROM or COPY --from image no store has into the user store (--pull or
    /// --pull=missing), or every tag reference again (--pull=always). Off by default: kiln then
    /// never touches the network for a base. A pinned digest accepts only those bytes.
    /// (A value needs `=`: `kiln build --pull .` builds `.`, as `docker build --pull .` does.)
    #[arg(long, value_name = "missing|always", num_args = 0..=1, require_equals = true, default_missing_value = "missing")]
    pub pull: Option<String>,
    /// A Docker Hub mirror tried first by --pull (repeatable; also $KILN_REGISTRY_MIRRORS).
    #[arg(long = "registry-mirror", value_name = "HOST[:PORT]")]
    pub mirrors: Vec<String>,
    /// A secret for `RUN --mount=type=secret,id=ID`: id=ID,src=FILE (or env=VAR). Never in a
    /// layer, the history, the config or the index key.
    #[arg(long = "secret", value_name = "id=ID,src=FILE")]
    pub secrets: Vec<String>,
    /// Print only the image id (as `docker build -q`): no progress, no summary; errors and
    /// warnings still go to stderr.
    #[arg(short = 'q', long, conflicts_with = "json")]
    pub quiet: bool,
    /// Build twice (the second time with another thread count, directory entries read in reverse
    /// order, and another temporary directory) and fail with a `kiln diff` report if anything differs.
    #[arg(long)]
    pub check_reproducible: bool,
    /// Remove or empty what dpkg, apt, debconf, ldconfig and update-alternatives leave with the
    /// build's clock in each RUN's layer (caches they rebuild, logs), so two builds of an
    /// `apt-get install` step are identical; the image's history lists what was done.
    #[arg(long)]
    pub reproducible: bool,
    /// With --all: where outputs go, as <name>.tar (or the extension --format implies).
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Output path (default: <dir name>.tar in the working directory).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Output format (default: from the extension: .tar.zst, .oci.tar, .tar, else an OCI layout directory).
    #[arg(long, value_enum)]
    pub format: Option<FormatArg>,
    /// Image name and tag (repeatable; default <REGISTRY>/<dir>:<VERSION>, else <dir>:latest).
    #[arg(short, long = "tag")]
    pub tags: Vec<String>,
    /// Layer compression (default: zstd for OCI layouts and archives, gzip for docker-archive, none inside a .tar.zst).
    #[arg(long, value_enum)]
    pub layer_compression: Option<CompressionArg>,
    /// Compression level (zstd 1-22, default 3; gzip 0-9, default 6).
    #[arg(long)]
    pub compression_level: Option<i32>,
    /// Timestamp for every mtime and `created` (default $SOURCE_DATE_EPOCH, else 0).
    #[arg(long, value_name = "EPOCH")]
    pub timestamp: Option<u64>,
    /// How on-disk modes become layer modes.
    #[arg(long, value_enum, default_value_t = PolicyArg::Git)]
    pub mode_policy: PolicyArg,
    /// Context hash algorithm reported by the build.
    #[arg(long, value_enum, default_value_t = AlgorithmArg::KilnV1)]
    pub algorithm: AlgorithmArg,
    /// Write the manifest digest to this file (with --push: once every tag is pushed).
    #[arg(long)]
    pub digest_file: Option<PathBuf>,
    /// Push the image to every -t tag's registry after the build: the blobs and the manifest once
    /// a repository, then each of its tags.
    #[arg(long)]
    pub push: bool,
    /// Write the image id (the config digest) to this file, as docker and buildah do.
    #[arg(long)]
    pub iidfile: Option<PathBuf>,
    /// Build this stage (FROM ... AS NAME) instead of the last.
    #[arg(long)]
    pub target: Option<String>,
    /// Reuse file digests of unchanged files (kiln-v1), keyed by device, inode, size, mtime and ctime.
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "")]
    pub hash_cache: Option<PathBuf>,
    /// An image store (OCI layout) for FROM and COPY --from (repeatable). Stores are searched in
    /// this order: each --store, then $KILN_STORE (colon-separated), then <topsrcdir>/vendor-images
    /// if present, then $XDG_CACHE_HOME/kiln/store (~/.cache/kiln/store). Nothing is ever pulled.
    #[arg(long = "store", value_name = "DIR")]
    pub stores: Vec<PathBuf>,
    #[command(flatten)]
    pub index: IndexArgs,
}

#[derive(Args, Clone)]
pub struct IndexArgs {
    /// The local index (default $XDG_CACHE_HOME/kiln/index); its images live in the user store.
    #[arg(long, value_name = "DIR")]
    pub index: Option<PathBuf>,
    /// Route prefix: {prefix}.cache.level-{level}.docker-images.v2.{name}.hash.{digest}.
    #[arg(long, value_name = "PREFIX", default_value = kiln::index::DEFAULT_PREFIX)]
    pub index_prefix: String,
    /// Taskcluster level (1-3): lookups try levels 3 down to it; writes go to it.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub level: u8,
    /// Build even when the index has the image (the result is indexed again).
    #[arg(long)]
    pub no_cache: bool,
    /// Neither look the image up nor index it (no copy is kept in the user store).
    #[arg(long)]
    pub no_index: bool,
    /// Keep the index in a registry too (REGISTRY/PREFIX): routes are tags hash-<digest>, latest
    /// and pushdate-<YYYYMMDDHHMMSS> on PREFIX/<level>/<name>; looked up before building, pushed after.
    #[arg(long, value_name = "REGISTRY/PREFIX")]
    pub index_registry: Option<String>,
    /// Share the step cache through a registry (REGISTRY/PREFIX): each step is a tag <key> on
    /// PREFIX/steps whose one layer is the step's; looked up on a local miss, pushed after a build.
    #[arg(long, value_name = "REGISTRY/PREFIX")]
    pub cache_registry: Option<String>,
    #[command(flatten)]
    pub net: NetArgs,
}

#[derive(Args, Clone)]
pub struct NetArgs {
    /// Speak plain HTTP to the registry (localhost and 127.0.0.0/8 do by default, as in Docker).
    #[arg(long)]
    pub insecure: bool,
    /// Upload blobs larger than this in chunks of this many bytes (0: always one request).
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20)]
    pub chunk_size: u64,
    /// Registry credentials from this Taskcluster secret, read through $TASKCLUSTER_PROXY_URL
    /// (instead of Docker's or podman's configuration).
    #[arg(long, value_name = "NAME")]
    pub taskcluster_secret: Option<String>,
    /// The keys of the secret's `secret` object that hold the user name and the password.
    #[arg(
        long,
        value_name = "USER:PASSWORD",
        default_value = "username:password"
    )]
    pub taskcluster_secret_keys: String,
}

impl NetArgs {
    /// A registry client for `host`, with the Taskcluster secret's
    /// credentials when one is named.
    pub fn client(&self, host: &str) -> Result<kiln::registry::Client> {
        let client = kiln::registry::Client::new(host, self.insecure);
        let Some(name) = &self.taskcluster_secret else {
            return Ok(client);
        };
        let (user, password) = self
            .taskcluster_secret_keys
            .split_once(':')
            .ok_or_else(|| {
                anyhow!(
                    "--taskcluster-secret-keys {}: expected USER_KEY:PASSWORD_KEY",
                    self.taskcluster_secret_keys
                )
            })?;
        let creds =
            kiln::taskcluster::secret_credentials(name, user, password).map_err(|e| anyhow!(e))?;
        Ok(client.with_credentials(creds))
    }
}

/// Splits `REGISTRY/PREFIX` of --index-registry.
pub fn registry_index(spec: &str, net: &NetArgs) -> Result<kiln::index::RegistryIndex> {
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
    pub fn options(&self, name: &str) -> Result<kiln::index::IndexOptions> {
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
            store: Store::user(),
            step_cache: true,
            lookup: !self.no_cache,
            name: name.to_string(),
            cache_registry: match &self.cache_registry {
                Some(spec) => {
                    let r = registry_index(spec, &self.net).map_err(|e| {
                        anyhow!(
                            "{}",
                            e.to_string()
                                .replace("--index-registry", "--cache-registry")
                        )
                    })?;
                    Some(std::sync::Arc::new(kiln::steps::Remote {
                        client: r.client,
                        prefix: r.prefix,
                        push: r.push,
                    }))
                }
                None => None,
            },
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum AlgorithmArg {
    KilnV1,
    Taskgraph,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PolicyArg {
    Git,
    Preserve,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum FormatArg {
    DockerArchive,
    /// A docker-archive compressed as a whole with zstd (image.tar.zst).
    DockerArchiveZstd,
    OciArchive,
    OciDir,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum CompressionArg {
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
