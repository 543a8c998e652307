//! A docker-archive as `docker save` writes it since Docker 25: an OCI image
//! layout plus `manifest.json` (RepoTags, Config, Layers) and `repositories`
//! (which taskgraph's image loader requires). With `zstd`, the whole tar is
//! compressed: the Taskcluster `image.tar.zst` artifact.

use std::collections::BTreeMap;
use std::path::Path;

use super::{bytes, layout_entries, split_tag, write_archive, Error, ImageFiles, Writer};
use crate::image::{canonical_json, DockerManifestEntry};

pub struct DockerArchive {
    pub zstd: bool,
}

/// Docker's short name for a tag: `docker.io/library/foo:1` → `foo:1`.
fn familiar(tag: &str) -> String {
    let t = tag.strip_prefix("docker.io/").unwrap_or(tag);
    let t = t.strip_prefix("library/").unwrap_or(t);
    let (repo, tag) = split_tag(t);
    format!("{repo}:{tag}")
}

/// The docker-archive's entries: the OCI layout plus `manifest.json` and `repositories`.
pub(super) fn docker_entries(img: &ImageFiles) -> crate::layer::Entries {
    {
        let mut entries = layout_entries(img);
        let blob = |d: &str| format!("blobs/sha256/{}", d.trim_start_matches("sha256:"));
        let tags: Vec<String> = img.tags.iter().map(|t| familiar(t)).collect();
        let manifest = vec![DockerManifestEntry {
            config: blob(&img.config.digest),
            repo_tags: tags.clone(),
            layers: img.layers.iter().map(|l| blob(&l.digest)).collect(),
        }];
        entries.insert(b"manifest.json".to_vec(), bytes(canonical_json(&manifest)));
        let top = img.layers.last().map_or(&img.config.digest, |l| &l.digest);
        let mut repos: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for t in &tags {
            let (repo, tag) = split_tag(t);
            repos.entry(repo.to_string()).or_default().insert(
                tag.to_string(),
                top.trim_start_matches("sha256:").to_string(),
            );
        }
        entries.insert(b"repositories".to_vec(), bytes(canonical_json(&repos)));
        entries
    }
}

impl Writer for DockerArchive {
    fn write(&self, img: &ImageFiles, out: &Path) -> Result<(), Error> {
        write_archive(&docker_entries(img), img.mtime, self.zstd, out)
    }
}
