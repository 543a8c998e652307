//! The build context: collecting it (`collect`), hashing it with kiln's
//! parallel `kiln-v1` algorithm (`hash`) and writing or hashing the
//! taskgraph-compatible context tar (`taskgraph`).

pub mod archive;
pub mod cache;
pub mod collect;
pub mod hash;
pub mod listing;
pub mod taskgraph;
mod uring;
pub mod walk;

use std::io;
use std::path::{Path, PathBuf};

pub use cache::HashCache;
pub use collect::{Context, ContextOptions, Entry, Source};

use crate::progress::Progress;

/// Collects the context of `image_dir` and computes its hash with
/// `algorithm`. For kiln-v1, files are hashed during the walk (consulting
/// `cache`, which is saved afterwards).
pub fn collect_and_hash(
    image_dir: &Path,
    opts: &ContextOptions,
    algorithm: Algorithm,
    policy: ModePolicy,
    cache: Option<&HashCache>,
    progress: &Progress,
) -> Result<(Context, String), Error> {
    let mut opts = opts.clone();
    opts.taskgraph_names = algorithm == Algorithm::Taskgraph;
    let hashing = algorithm == Algorithm::KilnV1;
    let name = if hashing {
        "hashing context (kiln-v1)"
    } else {
        "collecting context"
    };
    let step = progress.step(name, 0, 0);
    let walker = walk::Walker {
        hash: hashing,
        cache,
        step: &step,
        reverse: opts.reverse_read_order,
        compact: hashing && opts.hash_only,
    };
    let ctx = Context::collect_with(image_dir, &opts, &walker)?;
    let digest = match algorithm {
        Algorithm::KilnV1 => hash::kiln_v1(&ctx, policy)?,
        Algorithm::Taskgraph => {
            step.finish();
            let step = progress.step(
                "hashing context (taskgraph)",
                ctx.total_size(),
                ctx.entries.len() as u64,
            );
            let d = taskgraph::hash_with(&ctx, &step)?;
            step.finish();
            return Ok((ctx, d));
        }
    };
    step.finish();
    if let Some(c) = cache {
        c.save().map_err(|e| Error::Write {
            path: "hash cache".into(),
            source: e,
        })?;
    }
    Ok((ctx, digest))
}

/// How file modes from disk become modes in hashes and layers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ModePolicy {
    /// Files become 0644 or 0755 (by the owner's exec bit), directories 0755,
    /// so checkouts made under different umasks give the same result.
    #[default]
    Git,
    /// Permission bits are kept as on disk.
    Preserve,
}

impl ModePolicy {
    /// The mode a regular file with on-disk permission bits `mode` gets.
    pub fn file(self, mode: u32) -> u32 {
        match self {
            ModePolicy::Git if mode & 0o100 != 0 => 0o755,
            ModePolicy::Git => 0o644,
            ModePolicy::Preserve => mode & 0o7777,
        }
    }

    /// The mode a directory with on-disk permission bits `mode` gets.
    pub fn dir(self, mode: u32) -> u32 {
        match self {
            ModePolicy::Git => 0o755,
            ModePolicy::Preserve => mode & 0o7777,
        }
    }
}

/// Context-hash algorithms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Algorithm {
    /// kiln's parallel per-file hash (see README: "Context hashes").
    #[default]
    KilnV1,
    /// Byte-identical to taskgraph's `generate_context_hash`.
    Taskgraph,
}

/// Errors collecting or hashing a context.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("walking {}: {source}", path.display())]
    Walk { path: PathBuf, source: io::Error },
    #[error("no Dockerfile in image directory {}: pass the directory that holds the Dockerfile", dir.display())]
    NoDockerfile { dir: PathBuf },
    #[error("{}: -f builds a plain Docker context, and the taskgraph hash and context archive are defined for image directories with their own Dockerfile; leave out -f or use the kiln-v1 hash", dir.display())]
    DockerfileFlagWithTaskgraph { dir: PathBuf },
    #[error("{}: the Dockerfile is not valid UTF-8", path.display())]
    DockerfileNotUtf8 { path: PathBuf },
    #[error("{}:{line}: missing argument: {name} (pass it with --arg {name}=VALUE)", path.display())]
    MissingArgument {
        path: PathBuf,
        line: usize,
        name: String,
    },
    #[error("{}:{line}: {what}: {include}", path.display())]
    Include {
        path: PathBuf,
        line: usize,
        what: &'static str,
        include: String,
    },
    #[error("{}:{line}: `# %include-run-task` needs --run-task-dir pointing at taskgraph's run-task/ directory", path.display())]
    RunTaskWithoutDir { path: PathBuf, line: usize },
    #[error("{}: is {kind}; only regular files, directories and symlinks can be in a build context", path.display())]
    SpecialFile { path: PathBuf, kind: &'static str },
    #[error("{}: cannot add file with setuid or setgid set (taskgraph refuses it too); clear the bit with chmod", path.display())]
    Setuid { path: PathBuf },
    #[error("{}: broken symlink or symlink loop (taskgraph follows symlinks, so the target must exist)", path.display())]
    BrokenSymlink { path: PathBuf },
    #[error("{}: symlink to {} leads outside the source tree; kiln never follows links out of it (taskgraph would: this is a deliberate difference); remove the link or point it inside", path.display(), target.display())]
    Escapes { path: PathBuf, target: PathBuf },
    #[error("{}: the file changed while kiln read it ({expected} bytes expected, {got} read); the tree changed under the build, run it again on a quiet tree", path.display())]
    Changed {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

impl Error {
    pub(crate) fn io(path: &Path, source: io::Error) -> Error {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// The sha256 of a file's content (read once, its size checked).
pub fn hash_file(f: std::fs::File, path: &std::path::Path, size: u64) -> Result<[u8; 32], Error> {
    walk::hash_reader(f, path, size, &crate::progress::Step::none())
}
