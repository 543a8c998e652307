//! The optional hash cache (`--hash-cache`): file digests keyed by device,
//! inode, size, mtime and ctime in nanoseconds, so re-hashing an unchanged
//! tree reads no file contents. As git does against racy writes, an entry is
//! trusted only if the file's mtime and ctime are older than the start of
//! the run that wrote it (less a margin for coarse filesystem clocks).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

const MAGIC: &[u8; 8] = b"KILNHC01";
const RECORD: usize = 8 * 5 + 32;
/// Files changed this close to the cache's reference time are re-hashed.
const RACY_MARGIN_NS: i128 = 2_000_000_000;

/// What identifies one version of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Stamp {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// A loaded hash cache plus what this run learned.
#[derive(Debug)]
pub struct HashCache {
    path: PathBuf,
    /// The start of the run that wrote the loaded cache.
    reference_ns: i128,
    /// The start of this run (the next cache's reference).
    started_ns: i128,
    /// Records as saved: sorted by (device, inode), looked up by binary
    /// search (building a hash map of 200,000 records cost more than the lookups).
    known: Vec<(Stamp, [u8; 32])>,
    fresh: Mutex<Vec<(Stamp, [u8; 32])>>,
    hits: std::sync::atomic::AtomicU64,
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

impl HashCache {
    /// Loads the cache at `path`; a missing or unreadable cache is empty (it is only a cache).
    pub fn load(path: &Path) -> HashCache {
        let started_ns = now_ns();
        let mut cache = HashCache {
            path: path.to_path_buf(),
            reference_ns: 0,
            started_ns,
            known: Vec::new(),
            fresh: Mutex::new(Vec::new()),
            hits: Default::default(),
        };
        // Never through a link (a cache is kiln's own file).
        let read = || -> io::Result<Vec<u8>> {
            let dir = path
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let name = path
                .file_name()
                .ok_or_else(|| io::Error::other("no file name"))?;
            crate::fsx::DirFd::open(dir)?.read(name, u64::MAX / 2)
        };
        let Ok(bytes) = read() else {
            return cache;
        };
        if bytes.len() < 24 || &bytes[..8] != MAGIC || (bytes.len() - 24) % RECORD != 0 {
            return cache;
        }
        cache.known.reserve((bytes.len() - 24) / RECORD);
        cache.reference_ns = i128::from_le_bytes(bytes[8..24].try_into().unwrap_or([0; 16]));
        let n = |b: &[u8], i: usize| {
            u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]))
        };
        for rec in bytes[24..].chunks_exact(RECORD) {
            let stamp = Stamp {
                dev: n(rec, 0),
                ino: n(rec, 1),
                size: n(rec, 2),
                mtime_ns: n(rec, 3) as i64,
                ctime_ns: n(rec, 4) as i64,
            };
            let mut digest = [0u8; 32];
            digest.copy_from_slice(&rec[40..72]);
            cache.known.push((stamp, digest));
        }
        // Saved sorted; a file edited by hand is sorted here rather than trusted.
        if !cache
            .known
            .windows(2)
            .all(|w| (w[0].0.dev, w[0].0.ino) < (w[1].0.dev, w[1].0.ino))
        {
            cache.known.sort_by_key(|(s, _)| (s.dev, s.ino));
            cache.known.dedup_by_key(|(s, _)| (s.dev, s.ino));
        }
        cache
    }

    /// The cached digest of a file with this stamp, if it can be trusted.
    pub fn get(&self, s: &Stamp) -> Option<[u8; 32]> {
        let i = self
            .known
            .binary_search_by_key(&(s.dev, s.ino), |(k, _)| (k.dev, k.ino))
            .ok()?;
        let (known, digest) = &self.known[i];
        let settled = |t: i64| i128::from(t) + RACY_MARGIN_NS < self.reference_ns;
        let hit = known == s && settled(s.mtime_ns) && settled(s.ctime_ns);
        if hit {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        hit.then_some(*digest)
    }

    /// (files whose digest came from the cache, files hashed and recorded) in this run.
    pub fn counts(&self) -> (u64, u64) {
        let hashed = self.fresh.lock().map_or(0, |f| f.len() as u64);
        (self.hits.load(std::sync::atomic::Ordering::Relaxed), hashed)
    }

    /// Records a digest computed in this run.
    pub fn put(&self, s: Stamp, digest: [u8; 32]) {
        if let Ok(mut f) = self.fresh.lock() {
            f.push((s, digest));
        }
    }

    /// Writes the cache (loaded entries plus this run's), atomically; nothing
    /// to do when this run hashed no file.
    pub fn save(&self) -> io::Result<()> {
        let fresh = self.fresh.lock().map(|f| f.clone()).unwrap_or_default();
        if fresh.is_empty() && self.path.exists() {
            return Ok(());
        }
        let mut all: BTreeMap<(u64, u64), (Stamp, [u8; 32])> = self
            .known
            .iter()
            .map(|(s, d)| ((s.dev, s.ino), (*s, *d)))
            .collect();
        for (s, d) in fresh {
            all.insert((s.dev, s.ino), (s, d));
        }
        let mut out = Vec::with_capacity(24 + all.len() * RECORD);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.started_ns.to_le_bytes());
        let mut records: Vec<_> = all.into_values().collect();
        records.sort_by_key(|(s, _)| (s.dev, s.ino));
        for (s, d) in records {
            for v in [s.dev, s.ino, s.size, s.mtime_ns as u64, s.ctime_ns as u64] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(&d);
        }
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(dir)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".kiln-hash-cache-")
            .tempfile_in(dir)?;
        tmp.write_all(&out)?;
        tmp.persist(&self.path).map_err(|e| e.error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(mtime_ns: i64) -> Stamp {
        Stamp {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns,
            ctime_ns: mtime_ns,
        }
    }

    #[test]
    fn round_trips_and_distrusts_racy_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let c = HashCache::load(&path);
        let old = stamp(1_000_000_000);
        let racy = Stamp {
            ino: 9,
            ..stamp((c.started_ns - 1_000_000) as i64)
        };
        c.put(old, [7; 32]);
        c.put(racy, [8; 32]);
        c.save().unwrap();
        let c = HashCache::load(&path);
        assert_eq!(c.get(&old), Some([7; 32]));
        assert_eq!(
            c.get(&racy),
            None,
            "changed within the margin before the run: re-hash"
        );
        assert_eq!(c.get(&Stamp { size: 4, ..old }), None);
        assert_eq!(c.get(&Stamp { ctime_ns: 5, ..old }), None);
    }

    #[test]
    fn a_corrupt_cache_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        fs::write(&path, b"garbage").unwrap();
        assert!(HashCache::load(&path).known.is_empty());
    }
}
