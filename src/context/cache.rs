//! The optional hash cache (`--hash-cache`): file digests by directory and
//! name, trusted only while the file's device, inode, size, mtime and ctime
//! (in nanoseconds) are unchanged, so re-hashing an unchanged tree reads no
//! file contents. As git does against racy writes, an entry is
//! trusted only if the file's mtime and ctime are older than the start of
//! the run that wrote it (less a margin for coarse filesystem clocks).

use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

const MAGIC: &[u8; 8] = b"KILNHC02";
/// Header: magic, reference time (i128), number of directories, of records.
const HEADER: usize = 8 + 16 + 8 + 8;
/// A directory: path offset (u64), path length (u32), first record (u32),
/// record count (u32), padding (u32).
const DIR: usize = 24;
/// A record: name offset (u64), name length (u32), padding (u32), device,
/// inode, size, mtime and ctime in ns (u64 each), sha256.
const RECORD: usize = 16 + 8 * 5 + 32;
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

/// One directory's files as this run found them: (name, stamp, digest),
/// sorted by name.
type DirFiles = Vec<FileRecord>;
/// One file of a directory: name, stamp, digest.
type FileRecord = (Box<[u8]>, Stamp, [u8; 32]);

/// A directory this run walked (absolute path) and its files, if any changed.
type SeenDir = (Box<[u8]>, Option<DirFiles>);

/// A loaded hash cache plus what this run learned.
///
/// The file holds, per directory (sorted by absolute path), its regular
/// files sorted by name. The walk reads a directory's names in sorted
/// order too, so a lookup is one binary search per directory and then a
/// merge of two sorted lists: no per-file map is built, and the loaded
/// bytes are used where they lie.
#[derive(Debug)]
pub struct HashCache {
    path: PathBuf,
    /// The start of the run that wrote the loaded cache.
    reference_ns: i128,
    /// The start of this run (the next cache's reference).
    started_ns: i128,
    /// The file as read (empty when there was none or it was not valid).
    bytes: Vec<u8>,
    dirs: usize,
    records: usize,
    /// Directories this run walked, by absolute path: `None` when every
    /// file was a hit and the loaded section still holds.
    seen: Mutex<Vec<SeenDir>>,
    hits: AtomicU64,
    hashed: AtomicU64,
}

fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap_or([0; 8]))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap_or([0; 4]))
}

/// One directory's section of the loaded cache.
#[derive(Clone, Copy)]
pub struct DirView<'a> {
    cache: &'a HashCache,
    first: usize,
    count: usize,
}

impl<'a> DirView<'a> {
    fn rec(&self, k: usize) -> &'a [u8] {
        let at = HEADER + self.cache.dirs * DIR + (self.first + k) * RECORD;
        &self.cache.bytes[at..at + RECORD]
    }

    fn name(&self, k: usize) -> &'a [u8] {
        let r = self.rec(k);
        let off = u64_at(r, 0) as usize;
        &self.cache.bytes[off..off + u32_at(r, 8) as usize]
    }

    fn entry(&self, k: usize) -> (Stamp, [u8; 32]) {
        let r = self.rec(k);
        let stamp = Stamp {
            dev: u64_at(r, 16),
            ino: u64_at(r, 24),
            size: u64_at(r, 32),
            mtime_ns: u64_at(r, 40) as i64,
            ctime_ns: u64_at(r, 48) as i64,
        };
        let mut d = [0u8; 32];
        d.copy_from_slice(&r[56..88]);
        (stamp, d)
    }

    /// The first record at or after `name` (binary search).
    pub fn lower_bound(&self, name: &[u8]) -> usize {
        let (mut lo, mut hi) = (0, self.count);
        while lo < hi {
            let mid = (lo + hi) / 2;
            if self.name(mid) < name {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        lo
    }

    /// The first record at or after `name`, searching on from `from`.
    pub fn seek(&self, from: usize, name: &[u8]) -> usize {
        let mut k = from;
        while k < self.count && self.name(k) < name {
            k += 1;
        }
        k
    }

    /// The cached digest of `name` with this stamp, if the record at `k`
    /// is that file and can be trusted.
    pub fn get(&self, k: usize, name: &[u8], s: &Stamp) -> Option<[u8; 32]> {
        if k >= self.count || self.name(k) != name {
            return None;
        }
        let (known, digest) = self.entry(k);
        let settled = |t: i64| i128::from(t) + RACY_MARGIN_NS < self.cache.reference_ns;
        let hit = known == *s && settled(s.mtime_ns) && settled(s.ctime_ns);
        if hit {
            self.cache.hits.fetch_add(1, Ordering::Relaxed);
        }
        hit.then_some(digest)
    }

    /// Number of files in the section.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Whether the section has no files.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
}

impl HashCache {
    /// Loads the cache at `path`; a missing, unreadable or invalid cache
    /// is empty (it is only a cache).
    pub fn load(path: &Path) -> HashCache {
        let mut cache = HashCache {
            path: path.to_path_buf(),
            reference_ns: 0,
            started_ns: now_ns(),
            bytes: Vec::new(),
            dirs: 0,
            records: 0,
            seen: Mutex::new(Vec::new()),
            hits: AtomicU64::new(0),
            hashed: AtomicU64::new(0),
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
        if let Ok(bytes) = read() {
            if let Some((reference, dirs, records)) = validate(&bytes) {
                (cache.reference_ns, cache.dirs, cache.records) = (reference, dirs, records);
                cache.bytes = bytes;
            }
        }
        cache
    }

    fn dir_path(&self, i: usize) -> &[u8] {
        let at = HEADER + i * DIR;
        let off = u64_at(&self.bytes, at) as usize;
        &self.bytes[off..off + u32_at(&self.bytes, at + 8) as usize]
    }

    fn dir_at(&self, i: usize) -> DirView<'_> {
        let at = HEADER + i * DIR;
        DirView {
            cache: self,
            first: u32_at(&self.bytes, at + 12) as usize,
            count: u32_at(&self.bytes, at + 16) as usize,
        }
    }

    /// The loaded section of the directory at absolute path `dir`.
    pub fn dir(&self, dir: &Path) -> Option<DirView<'_>> {
        let key = dir.as_os_str().as_bytes();
        let (mut lo, mut hi) = (0, self.dirs);
        while lo < hi {
            let mid = (lo + hi) / 2;
            match self.dir_path(mid).cmp(key) {
                std::cmp::Ordering::Less => lo = mid + 1,
                std::cmp::Ordering::Greater => hi = mid,
                std::cmp::Ordering::Equal => return Some(self.dir_at(mid)),
            }
        }
        None
    }

    /// Records what this run found in directory `dir`: `files` sorted by
    /// name, or `None` when they are exactly the loaded section (all hits).
    pub fn record_dir(&self, dir: &Path, files: Option<DirFiles>, hashed: u64) {
        self.hashed.fetch_add(hashed, Ordering::Relaxed);
        if let Ok(mut seen) = self.seen.lock() {
            seen.push((dir.as_os_str().as_bytes().into(), files));
        }
    }

    /// (files whose digest came from the cache, files hashed) in this run.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.hashed.load(Ordering::Relaxed),
        )
    }

    /// Writes the cache atomically: the directories this run walked as it
    /// found them, the others as loaded. Nothing to do when this run
    /// hashed no file and the cache exists.
    pub fn save(&self) -> io::Result<()> {
        let mut seen = self
            .seen
            .lock()
            .map(|mut s| std::mem::take(&mut *s))
            .unwrap_or_default();
        if self.hashed.load(Ordering::Relaxed) == 0 && !self.bytes.is_empty() {
            return Ok(());
        }
        seen.sort_by(|a, b| a.0.cmp(&b.0));
        seen.dedup_by(|a, b| a.0 == b.0);
        // Every directory of the new file, in path order: this run's or the loaded one's.
        enum Src<'a> {
            Loaded(usize),
            Fresh(&'a [FileRecord]),
        }
        let mut all: Vec<(&[u8], Src<'_>)> = Vec::with_capacity(self.dirs + seen.len());
        let mut j = 0;
        for (path, files) in &seen {
            while j < self.dirs && self.dir_path(j) < &path[..] {
                all.push((self.dir_path(j), Src::Loaded(j)));
                j += 1;
            }
            let loaded = j < self.dirs && self.dir_path(j) == &path[..];
            match files {
                Some(f) => all.push((path, Src::Fresh(f))),
                None if loaded => all.push((self.dir_path(j), Src::Loaded(j))),
                None => {}
            }
            if loaded {
                j += 1;
            }
        }
        all.extend((j..self.dirs).map(|j| (self.dir_path(j), Src::Loaded(j))));
        let count = |s: &Src<'_>| match s {
            Src::Loaded(j) => self.dir_at(*j).count,
            Src::Fresh(f) => f.len(),
        };
        let records: usize = all.iter().map(|(_, s)| count(s)).sum();
        let mut out = Vec::with_capacity(HEADER + all.len() * DIR + records * RECORD);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.started_ns.to_le_bytes());
        out.extend_from_slice(&(all.len() as u64).to_le_bytes());
        out.extend_from_slice(&(records as u64).to_le_bytes());
        // Names and paths follow the records; their offsets are known ahead.
        let mut names_at = HEADER + all.len() * DIR + records * RECORD;
        let mut arena: Vec<u8> = Vec::new();
        let mut first = 0usize;
        for (path, s) in &all {
            out.extend_from_slice(&((names_at + arena.len()) as u64).to_le_bytes());
            out.extend_from_slice(&(path.len() as u32).to_le_bytes());
            out.extend_from_slice(&(first as u32).to_le_bytes());
            out.extend_from_slice(&(count(s) as u32).to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            arena.extend_from_slice(path);
            first += count(s);
        }
        let put = |out: &mut Vec<u8>, arena: &mut Vec<u8>, name: &[u8], s: &Stamp, d: &[u8; 32]| {
            out.extend_from_slice(&((names_at + arena.len()) as u64).to_le_bytes());
            out.extend_from_slice(&(name.len() as u32).to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            for v in [s.dev, s.ino, s.size, s.mtime_ns as u64, s.ctime_ns as u64] {
                out.extend_from_slice(&v.to_le_bytes());
            }
            out.extend_from_slice(d);
            arena.extend_from_slice(name);
        };
        for (_, s) in &all {
            match s {
                Src::Loaded(j) => {
                    let v = self.dir_at(*j);
                    for k in 0..v.count {
                        let (st, d) = v.entry(k);
                        put(&mut out, &mut arena, v.name(k), &st, &d);
                    }
                }
                Src::Fresh(f) => {
                    for (name, st, d) in f.iter() {
                        put(&mut out, &mut arena, name, st, d);
                    }
                }
            }
        }
        names_at = out.len();
        debug_assert_eq!(names_at, HEADER + all.len() * DIR + records * RECORD);
        out.extend_from_slice(&arena);
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

/// Checks a cache file's structure: every offset in bounds, directories
/// sorted. Returns (reference, dirs, records).
fn validate(b: &[u8]) -> Option<(i128, usize, usize)> {
    if b.len() < HEADER || &b[..8] != MAGIC {
        return None;
    }
    let reference = i128::from_le_bytes(b[8..24].try_into().ok()?);
    let dirs = usize::try_from(u64_at(b, 24)).ok()?;
    let records = usize::try_from(u64_at(b, 32)).ok()?;
    let fixed = HEADER
        .checked_add(dirs.checked_mul(DIR)?)?
        .checked_add(records.checked_mul(RECORD)?)?;
    if fixed > b.len() {
        return None;
    }
    let text = |off: u64, len: u32| -> Option<&[u8]> {
        let off = usize::try_from(off).ok()?;
        let end = off.checked_add(len as usize)?;
        (off >= fixed && end <= b.len()).then(|| &b[off..end])
    };
    let mut prev: Option<&[u8]> = None;
    let mut next_first = 0usize;
    for i in 0..dirs {
        let at = HEADER + i * DIR;
        let path = text(u64_at(b, at), u32_at(b, at + 8))?;
        let (first, count) = (u32_at(b, at + 12) as usize, u32_at(b, at + 16) as usize);
        if prev.is_some_and(|p| p >= path) || first != next_first {
            return None;
        }
        next_first = first.checked_add(count)?;
        if next_first > records {
            return None;
        }
        // Names in bounds. Their order is not checked: a record out of
        // order can only be missed by the merge (a file hashed again),
        // never give a wrong digest (a hit needs the name and the stamp).
        for k in first..next_first {
            let r = HEADER + dirs * DIR + k * RECORD;
            text(u64_at(b, r), u32_at(b, r + 8))?;
        }
        prev = Some(path);
    }
    (next_first == records).then_some((reference, dirs, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(ino: u64, mtime_ns: i64) -> Stamp {
        Stamp {
            dev: 1,
            ino,
            size: 3,
            mtime_ns,
            ctime_ns: mtime_ns,
        }
    }

    fn files(list: &[(&str, Stamp, u8)]) -> DirFiles {
        list.iter()
            .map(|(n, s, d)| (n.as_bytes().into(), *s, [*d; 32]))
            .collect()
    }

    #[test]
    fn round_trips_merges_by_name_and_distrusts_racy_entries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        let c = HashCache::load(&path);
        let old = stamp(2, 1_000_000_000);
        let racy = stamp(9, (c.started_ns - 1_000_000) as i64);
        c.record_dir(
            Path::new("/t/a"),
            Some(files(&[("x", old, 7), ("y", racy, 8), ("z", old, 6)])),
            3,
        );
        c.record_dir(Path::new("/t/b"), Some(files(&[("x", old, 5)])), 1);
        c.save().unwrap();
        let c = HashCache::load(&path);
        let a = c.dir(Path::new("/t/a")).expect("directory kept");
        assert_eq!(a.len(), 3);
        let k = a.seek(0, b"x");
        assert_eq!(a.get(k, b"x", &old), Some([7; 32]));
        let k = a.seek(k, b"y");
        assert_eq!(
            a.get(k, b"y", &racy),
            None,
            "changed within the margin before the run: re-hash"
        );
        let k = a.seek(k, b"yy");
        assert_eq!(a.get(k, b"yy", &old), None, "no such name");
        let k = a.seek(k, b"z");
        assert_eq!(a.get(k, b"z", &Stamp { size: 4, ..old }), None);
        assert_eq!(a.get(k, b"z", &Stamp { ctime_ns: 5, ..old }), None);
        assert_eq!(a.get(k, b"z", &old), Some([6; 32]));
        assert!(c.dir(Path::new("/t")).is_none());

        // A run that walks /t/a again (z deleted, w new) keeps /t/b as loaded.
        c.record_dir(
            Path::new("/t/a"),
            Some(files(&[("w", old, 1), ("x", old, 7)])),
            1,
        );
        c.save().unwrap();
        let c = HashCache::load(&path);
        let a = c.dir(Path::new("/t/a")).unwrap();
        assert_eq!(a.len(), 2, "the deleted file is gone");
        assert_eq!(a.get(a.seek(0, b"w"), b"w", &old), Some([1; 32]));
        let b = c.dir(Path::new("/t/b")).unwrap();
        assert_eq!(b.get(b.seek(0, b"x"), b"x", &old), Some([5; 32]));
        assert_eq!(c.counts(), (2, 0), "two hits counted, nothing hashed");
    }

    #[test]
    fn a_corrupt_cache_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        fs::write(&path, b"garbage").unwrap();
        assert_eq!(HashCache::load(&path).dirs, 0);
        // A valid header whose counts point past the end.
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&[0; 16]);
        b.extend_from_slice(&5u64.to_le_bytes());
        b.extend_from_slice(&5u64.to_le_bytes());
        fs::write(&path, b).unwrap();
        assert_eq!(HashCache::load(&path).dirs, 0);
    }
}
