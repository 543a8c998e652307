//! The step cache: never run a step twice.
//!
//! Every layer-producing step (RUN, COPY, ADD, a WORKDIR that creates a
//! directory) has a key, the sha256 of everything its layer depends on
//! ([`StepKey`], one injective encoding): the parent (the previous step's
//! key, or the base image's manifest digest), the instruction as written,
//! the environment, ARGs, USER, WORKDIR and SHELL; for RUN its argv, user
//! and groups, mounts (ids and targets, never a secret's contents), what
//! its binds bring in by content, and network; for COPY, ADD and WORKDIR
//! the layer's entries (paths, modes, owners, content digests); the layer
//! format ([`LayerFormat`]: version, compression, timestamp, modes). An entry maps a key to
//! the layer it made, a blob in the user store; a hit reuses the blob
//! without running or re-tarring anything. Entries live in
//! `$XDG_CACHE_HOME/kiln/steps/<key>`, written atomically like the index;
//! `kiln store gc` keeps the layers they name until `kiln cache prune`.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::image::{Descriptor, Digest};

mod key;

pub use key::{LayerFormat, StepKey, VERSION};

/// One cached step.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    /// The instruction as written, for `kiln cache ls`.
    pub instruction: String,
    /// The layer: a blob in the user store.
    pub layer: Descriptor,
    pub diff_id: Digest,
    /// When it was cached (seconds since 1970).
    pub created: u64,
}

/// What a step did in a build, for `--json`.
#[derive(Clone, Debug, Serialize)]
pub struct StepReport {
    pub line: usize,
    pub instruction: String,
    pub key: String,
    pub cached: bool,
}

/// The step cache directory.
#[derive(Clone, Debug)]
pub struct StepCache {
    pub dir: PathBuf,
}

impl StepCache {
    pub fn new(dir: impl Into<PathBuf>) -> StepCache {
        StepCache { dir: dir.into() }
    }

    /// `$XDG_CACHE_HOME/kiln/steps`.
    pub fn default_dir() -> PathBuf {
        crate::cache_dir().join("steps")
    }

    fn valid(key: &str) -> bool {
        key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit())
    }

    /// The entry of a key (never through a link; an unreadable one is none).
    /// A hit marks the entry used (its file's mtime), for `prune`.
    pub fn get(&self, key: &str) -> Option<Entry> {
        if !Self::valid(key) {
            return None;
        }
        let dir = crate::fsx::DirFd::open(&self.dir).ok()?;
        let bytes = dir.read(key, crate::limits::MAX_INDEX_ENTRY).ok()?;
        let e: Entry = serde_json::from_slice(&bytes).ok()?;
        if e.key != key {
            return None;
        }
        let f = dir.open_file(key).ok()?;
        let _ = f.set_modified(SystemTime::now());
        Some(e)
    }

    /// Records an entry, atomically (last writer wins; both wrote the same).
    pub fn put(&self, e: &Entry) -> Result<(), crate::source::Error> {
        crate::sink::file::write_atomic(
            &self.dir.join(&e.key),
            &serde_json::to_vec_pretty(e).expect("entries serialize"),
        )
    }

    /// Forgets a key's entry (one that failed verification).
    pub fn remove(&self, key: &str) {
        if Self::valid(key) {
            if let Ok(dir) = crate::fsx::DirFd::open(&self.dir) {
                let _ = dir.remove(std::ffi::OsStr::new(key));
            }
        }
    }

    /// Every entry, with its last use (seconds since 1970), oldest use first.
    pub fn list(&self) -> io::Result<Vec<(Entry, u64)>> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut out = Vec::new();
        for ent in rd {
            let name = ent?.file_name().to_string_lossy().into_owned();
            if !Self::valid(&name) {
                continue;
            }
            let used = std::fs::symlink_metadata(self.dir.join(&name))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .unwrap_or_default();
            // Read without marking it used.
            let Ok(bytes) = crate::fsx::DirFd::open(&self.dir)
                .and_then(|d| d.read(&name, crate::limits::MAX_INDEX_ENTRY))
            else {
                continue;
            };
            if let Ok(e) = serde_json::from_slice::<Entry>(&bytes) {
                out.push((e, used));
            }
        }
        // Least recently used first, to the nanosecond.
        out.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.key.cmp(&b.0.key)));
        Ok(out.into_iter().map(|(e, t)| (e, t.as_secs())).collect())
    }

    /// The layers the entries name (`kiln store gc` keeps them).
    pub fn referenced(&self) -> Vec<Digest> {
        self.list()
            .unwrap_or_default()
            .into_iter()
            .map(|(e, _)| e.layer.digest)
            .collect()
    }

    /// Removes entries unused for longer than `older_than`, then the least
    /// recently used until their layers total at most `keep_bytes`.
    /// Returns (entries removed, bytes of their layers).
    pub fn prune(
        &self,
        older_than: Option<Duration>,
        keep_bytes: Option<u64>,
    ) -> io::Result<(usize, u64)> {
        let entries = self.list()?;
        let cutoff = older_than.map(|d| timestamp().saturating_sub(d.as_secs()));
        let mut total: u64 = entries.iter().map(|(e, _)| e.layer.size).sum();
        let (mut n, mut bytes) = (0, 0);
        for (e, used) in &entries {
            let old = cutoff.is_some_and(|c| *used < c);
            let over = keep_bytes.is_some_and(|k| total > k);
            if !(old || over) {
                continue;
            }
            match std::fs::remove_file(self.dir.join(&e.key)) {
                Ok(()) => {}
                Err(err) if err.kind() == io::ErrorKind::NotFound => {}
                Err(err) => return Err(err),
            }
            total -= e.layer.size;
            n += 1;
            bytes += e.layer.size;
        }
        Ok((n, bytes))
    }
}

/// Parses `30d`, `12h`, `90m`, `45s` (or plain seconds).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        "w" => 7 * 86400,
        _ => return None,
    };
    Some(Duration::from_secs(n * mult))
}

/// Seconds since 1970, now.
pub fn timestamp() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether a path is inside `dir` (for messages).
pub fn is_under(p: &Path, dir: &Path) -> bool {
    p.starts_with(dir)
}

/// Step entries shared through an OCI registry (`--cache-registry
/// REGISTRY/PREFIX`): each entry is a small image manifest tagged with its
/// key in `PREFIX/steps`, its config the entry, its one layer the step's
/// layer. Another machine fetches the entry and the layer (verified); a
/// layer the registry has is never uploaded again.
pub struct Remote {
    pub client: std::sync::Arc<crate::registry::Client>,
    /// The repository path prefix.
    pub prefix: String,
    pub push: crate::registry::PushOptions,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({}/{})", self.client.host, self.prefix)
    }
}

/// The config media type of a step entry in a registry.
pub const ENTRY_MEDIA_TYPE: &str = "application/vnd.kiln.step.v1+json";

impl Remote {
    fn repo(&self) -> String {
        format!("{}/steps", self.prefix)
    }

    /// Fetches `key`'s entry into `cache` and its layer into `store`, if
    /// the registry has it.
    pub fn fetch(
        &self,
        key: &str,
        cache: &StepCache,
        store: &crate::store::Store,
    ) -> Result<Option<Entry>, crate::source::Error> {
        use crate::sink::{Blob, BlobData, Sink};
        use crate::source::Source;
        let r =
            crate::image::Reference::parse(&format!("{}/{}:{key}", self.client.host, self.repo()))
                .map_err(|message| crate::source::Error::NotFound { message })?;
        let Some(src) = crate::source::RegistrySource::open(self.client.clone(), &r)? else {
            return Ok(None);
        };
        let (desc, _) = crate::source::first_image(&src)?;
        let manifest: crate::image::Manifest =
            crate::source::read_json(&src, &desc, "step manifest")?;
        let bytes = crate::source::read_small(&src, &manifest.config, "step entry")?;
        let entry: Entry = crate::source::parse_json(&src, &bytes, "step entry")?;
        let Some(layer) = manifest.layers.first() else {
            return Ok(None);
        };
        if entry.key != key || layer.digest != entry.layer.digest {
            return Ok(None);
        }
        if !store.has_blob(layer)? {
            store.put_blob(Blob {
                desc: layer,
                data: BlobData::Source(&src as &dyn Source),
            })?;
        }
        cache.put(&entry)?;
        Ok(Some(entry))
    }

    /// Publishes an entry whose layer is in `store`.
    pub fn publish(
        &self,
        entry: &Entry,
        store: &crate::store::Store,
    ) -> Result<(), crate::source::Error> {
        use crate::image::{canonical_json, Manifest, MediaType};
        let config = serde_json::to_vec(entry).expect("entries serialize");
        let blobs = store.blob_dir()?;
        let config_desc = Descriptor::new(
            MediaType::Other(ENTRY_MEDIA_TYPE.into()),
            blobs.write_bytes(&config)?,
            config.len() as u64,
        );
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MediaType::OciManifest),
            config: config_desc,
            layers: vec![entry.layer.clone()],
            annotations: Default::default(),
            extra: Default::default(),
        };
        let bytes = canonical_json(&manifest);
        let desc = Descriptor::new(
            MediaType::OciManifest,
            blobs.write_bytes(&bytes)?,
            bytes.len() as u64,
        );
        crate::registry::push(
            &self.client,
            store,
            &desc,
            &self.repo(),
            std::slice::from_ref(&entry.key),
            &self.push,
        )
        .map_err(crate::source::Error::from)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest as _;

    #[test]
    fn entries_round_trip_and_prune_by_age_and_size() {
        let d = tempfile::tempdir().unwrap();
        let c = StepCache::new(d.path());
        let layer = |n: u8, size| {
            Descriptor::new(
                crate::image::MediaType::OciLayerZstd,
                Digest::of(&[n]),
                size,
            )
        };
        for (i, size) in [(1u8, 100u64), (2, 200), (3, 300)] {
            let e = Entry {
                key: hex::encode(sha2::Sha256::digest([i])),
                instruction: format!("RUN {i}"),
                layer: layer(i, size),
                diff_id: Digest::of(&[i, i]),
                created: 0,
            };
            c.put(&e).unwrap();
            assert_eq!(c.get(&e.key), Some(e.clone()));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(c.list().unwrap().len(), 3);
        assert_eq!(c.referenced().len(), 3);
        // Keep 350 bytes: the two least recently used go (100 + 200 bytes).
        assert_eq!(c.prune(None, Some(350)).unwrap(), (2, 300));
        assert_eq!(c.list().unwrap().len(), 1);
        assert_eq!(
            c.prune(Some(Duration::from_secs(86400)), None).unwrap().0,
            0
        );
        assert_eq!(parse_duration("7d"), Some(Duration::from_secs(604800)));
        assert_eq!(parse_duration("x"), None);
        assert!(c.get("not-a-key").is_none());
    }
}
