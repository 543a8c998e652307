//! kiln: a daemonless, rootless, network-free OCI image assembler for
//! Taskcluster-style image directories.
//!
//! The pipeline: [`context`] collects an image directory's build context
//! (`# %include`, `# %ARG`) and hashes it; [`dockerfile`] parses and expands
//! the Dockerfile; [`build`] turns its instructions into deterministic
//! [`layer`]s and an [`image`] config and manifest; [`archive`] writes an OCI
//! layout, OCI archive, docker-archive or `image.tar.zst`; [`store`] reads
//! such images back for `kiln inspect`.

pub mod archive;
pub mod build;
pub mod context;
pub mod diff;
pub mod digest;
pub mod dockerfile;
pub mod image;
pub mod index;
pub mod layer;
pub mod limits;
pub mod store;
pub mod tree;
pub mod verify;

pub use archive::Format;
pub use build::{build, default_tag, BuildOptions, BuildResult};
pub use context::{Algorithm, Context, ContextOptions, ModePolicy};
pub use digest::Digest;
pub use layer::Compression;

/// kiln's user cache directory: `$XDG_CACHE_HOME/kiln`, else
/// `~/.cache/kiln` (the hash cache, the user store and the index live here).
pub fn cache_dir() -> std::path::PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("kiln")
}

/// Finds the enclosing git or hg checkout root of `start`.
pub fn checkout_root(start: &std::path::Path) -> Option<std::path::PathBuf> {
    let abs = std::path::absolute(start).ok()?;
    abs.ancestors()
        .find(|d| d.join(".git").exists() || d.join(".hg").exists())
        .map(|d| d.to_path_buf())
}
pub mod prefetch;
pub mod progress;
pub mod registry;
