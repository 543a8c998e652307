//! kiln: a daemonless, rootless, reproducible OCI image assembler for
//! Taskcluster-style image directories and plain Docker contexts.
//!
//! The image core, in three words: **sources → copy → sinks**.
//!
//! - [`image`]: the typed OCI model (a validated [`Digest`], a
//!   [`image::MediaType`] enum, descriptors, manifests, indexes, configs,
//!   platforms, references), serialized as canonical JSON, fields kiln
//!   does not model kept.
//! - [`source`]: everything kiln reads images from (image files and
//!   layouts, [`store`]s, a build in progress, registries), each blob
//!   verified as it is read, one decompressor with the bomb guard, one
//!   platform selector.
//! - [`sink`]: everything kiln writes images to (stores, the output
//!   formats, registries), one blob writer (temp file, fsync, rename, 0644),
//!   commits that name images last.
//! - [`copy()`]: the one move between any source and any sink: `store add`,
//!   `pull`, `push`, a build's output, an index hit.
//!
//! A build is plan-then-execute: [`context`] collects an image directory's
//! build context (`# %include`, `# %ARG`) and hashes it; [`dockerfile`]
//! parses and expands the Dockerfile; [`assemble::Plan`] analyzes it and
//! resolves its bases once, which gives the [`index`] digest; executing
//! the plan turns instructions into deterministic [`layer`]s and a config,
//! and copies the finished image to its sinks.

pub mod assemble;
pub mod context;
pub mod copy;
pub mod diff;
pub mod digest;
pub mod dockerfile;
pub mod fsx;
pub mod image;
pub mod index;
pub mod interrupt;
pub mod layer;
pub mod limits;
pub mod prefetch;
pub mod progress;
pub mod registry;
pub mod sandbox;
pub mod sink;
pub mod source;
pub mod steps;
pub mod store;
pub mod taskcluster;
pub mod tree;
pub mod userdb;
pub mod verify;

pub use assemble::{build, default_tag, BuildOptions, BuildResult};
pub use context::{Algorithm, Context, ContextOptions, ModePolicy};
pub use copy::{copy, Selection};
pub use digest::Digest;
pub use layer::Compression;
pub use sink::Format;

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
