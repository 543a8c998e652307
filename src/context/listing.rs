//! What the kiln-v1 hash needs of a context and nothing more: per entry its
//! archive path, kind and permission bits, and content digest. Paths live
//! in one arena, so an entry costs 56 bytes plus its path, with no
//! allocation of its own (the full `Entry` map a build needs costs about
//! ten times that). `kiln hash` collects into a listing; a build's context
//! map is turned into one for hashing.

use rayon::prelude::*;

use super::{Entry, Error, Source};

/// The mode recorded for a symbolic link.
pub const SYMLINK: u32 = 0o120000;
/// The type bits of a regular file.
pub const REGULAR: u32 = 0o100000;

/// The listing mode of a context entry.
pub fn mode_of(e: &Entry) -> u32 {
    match e.source {
        Source::Symlink { .. } => SYMLINK,
        _ => REGULAR | (e.mode & 0o7777),
    }
}

#[derive(Clone, Copy)]
struct Rec {
    off: u64,
    len: u32,
    /// `REGULAR | permission bits`, or `SYMLINK`.
    mode: u32,
    size: u64,
    digest: [u8; 32],
}

/// Hashed entries, sorted by archive path once [`Listing::finish`] ran.
#[derive(Clone, Default)]
pub struct Listing {
    arena: Vec<u8>,
    recs: Vec<Rec>,
    /// Bytes of regular-file content.
    pub bytes: u64,
}

impl Listing {
    /// Adds an entry whose archive path is `prefix` followed by `name`.
    pub fn push(&mut self, prefix: &[u8], name: &[u8], mode: u32, size: u64, digest: [u8; 32]) {
        let off = self.arena.len() as u64;
        self.arena.extend_from_slice(prefix);
        self.arena.extend_from_slice(name);
        self.recs.push(Rec {
            off,
            len: (prefix.len() + name.len()) as u32,
            mode,
            size: if mode == SYMLINK { 0 } else { size },
            digest,
        });
        if mode != SYMLINK {
            self.bytes += size;
        }
    }

    /// Adds an entry found other than by a compact walk (a symlink, an
    /// included file, the Dockerfile), hashing its content.
    pub fn push_entry(&mut self, prefix: &[u8], name: &[u8], e: &Entry) -> Result<(), Error> {
        self.push(
            prefix,
            name,
            mode_of(e),
            e.size,
            super::hash::entry_sha256(e)?,
        );
        Ok(())
    }

    /// Moves every entry of `other` to the end of this listing (later
    /// entries replace earlier ones of the same path, as map inserts do).
    pub fn append(&mut self, other: Listing) {
        if self.recs.is_empty() && self.arena.is_empty() {
            // Moved, not copied: no second copy of a whole walk at once.
            let bytes = self.bytes;
            *self = other;
            self.bytes += bytes;
            return;
        }
        let base = self.arena.len() as u64;
        self.arena.extend_from_slice(&other.arena);
        self.recs.extend(other.recs.into_iter().map(|r| Rec {
            off: r.off + base,
            ..r
        }));
        self.bytes += other.bytes;
    }

    fn path(&self, r: &Rec) -> &[u8] {
        &self.arena[r.off as usize..r.off as usize + r.len as usize]
    }

    /// Sorts by archive path; of entries with the same path, the one added
    /// last stays (its path sits later in the arena).
    pub fn finish(&mut self) {
        let mut recs = std::mem::take(&mut self.recs);
        recs.par_sort_unstable_by(|a, b| self.path(a).cmp(self.path(b)).then(a.off.cmp(&b.off)));
        // Deduplicated in place: no second array of records.
        let mut kept = 0;
        for i in 0..recs.len() {
            if kept > 0 && self.path(&recs[kept - 1]) == self.path(&recs[i]) {
                self.bytes -= recs[kept - 1].size;
                recs[kept - 1] = recs[i];
            } else {
                recs[kept] = recs[i];
                kept += 1;
            }
        }
        recs.truncate(kept);
        self.recs = recs;
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// Whether a (finished) listing has an entry at `path`.
    pub fn contains(&self, path: &[u8]) -> bool {
        self.recs
            .binary_search_by(|r| self.path(r).cmp(path))
            .is_ok()
    }

    /// Entries in order: (archive path, mode, digest).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], u32, &[u8; 32])> + '_ {
        self.recs.iter().map(|r| (self.path(r), r.mode, &r.digest))
    }
}

impl std::fmt::Debug for Listing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Listing({} entries, {} bytes)", self.len(), self.bytes)
    }
}
