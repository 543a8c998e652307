//! Leases: what a live kiln process holds in a store, so `kiln store gc`
//! running beside it removes none of it (containerd's content store has
//! the same idea).
//!
//! Each process that writes to (or reads from) a store takes a lease: a
//! file `.kiln/leases/<pid>-<random>` it holds an exclusive `flock` on for
//! as long as it runs. Before a blob is renamed into place, or found
//! already there and used, its digest is appended to the lease; that and
//! the rename (or the check) happen under a shared lock on
//! `.kiln/gc.lock`. gc takes that lock exclusively, so it sees every
//! lease line of every blob it could see. A lease whose lock can be taken
//! belongs to a process that is gone: gc removes it and that process's
//! temporary files in `.kiln/tmp`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, BufRead, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use rustix::fs::{flock, FlockOperation};

use super::{Error, Store};
use crate::fsx::DirFd;
use crate::Digest;

/// kiln's own directory inside a store.
pub const KILN_DIR: &str = ".kiln";
/// Temporary files of blobs and index files being written.
pub const TMP_DIR: &str = ".kiln/tmp";
pub const LEASES_DIR: &str = ".kiln/leases";
const GC_LOCK: &str = ".kiln/gc.lock";

/// This process's lease on one store.
pub struct Lease {
    root: DirFd,
    file: Mutex<File>,
    name: OsString,
    /// Blobs this process renamed into place (it made them).
    created: Mutex<Vec<Digest>>,
    /// Digests already written to the lease file.
    recorded: Mutex<HashSet<Digest>>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Lease({})",
            self.root.join(LEASES_DIR).join(&self.name).display()
        )
    }
}

fn leases() -> &'static Mutex<HashMap<PathBuf, Arc<Lease>>> {
    static L: OnceLock<Mutex<HashMap<PathBuf, Arc<Lease>>>> = OnceLock::new();
    L.get_or_init(Default::default)
}

/// Takes the gc lock (shared for writers, exclusive for gc).
fn gc_lock(root: &DirFd, exclusive: bool) -> io::Result<File> {
    let f = root.open_rw(GC_LOCK)?;
    let op = if exclusive {
        FlockOperation::LockExclusive
    } else {
        FlockOperation::LockShared
    };
    flock(&f, op)?;
    Ok(f)
}

impl Lease {
    /// Runs `f` under the shared gc lock (gc cannot be between its scan
    /// of leases and its deletions meanwhile).
    pub fn guard<T>(&self, f: impl FnOnce() -> Result<T, Error>) -> Result<T, Error> {
        let _shared = gc_lock(&self.root, false).map_err(|source| Error::Write {
            path: self.root.join(GC_LOCK),
            source,
        })?;
        f()
    }

    /// Records `digest` in the lease, then runs `f` (a rename into place,
    /// or a check that the blob is there) under the shared gc lock.
    /// `created` says `f` puts the blob there.
    pub fn hold<T>(
        &self,
        digest: &Digest,
        created: bool,
        f: impl FnOnce() -> Result<T, Error>,
    ) -> Result<T, Error> {
        self.guard(|| {
            if self.recorded.lock().unwrap().insert(digest.clone()) {
                let mut file = self.file.lock().unwrap();
                writeln!(file, "{}", digest.hex()).map_err(|source| Error::Write {
                    path: self.root.join(LEASES_DIR).join(&self.name),
                    source,
                })?;
            }
            let r = f()?;
            if created {
                self.created.lock().unwrap().push(digest.clone());
            }
            Ok(r)
        })
    }

    /// Blobs this process put into the store.
    pub fn created(&self) -> Vec<Digest> {
        self.created.lock().unwrap().clone()
    }
}

/// Ends this process's leases (at exit: what they held is named by now,
/// or was abandoned). A lease left by a killed process is gc's to remove.
pub fn release_leases() {
    let all: Vec<Arc<Lease>> = leases().lock().unwrap().drain().map(|(_, l)| l).collect();
    for l in all {
        if let Ok(dir) = l.root.dir(LEASES_DIR) {
            let _ = dir.remove(&l.name);
        }
    }
}

fn lease_pid(name: &std::ffi::OsStr) -> Option<u32> {
    name.to_str()?.split('-').next()?.parse().ok()
}

/// With the gc lock held exclusively: the live leases' pids and the
/// digests they hold (`own`, this process's lease, is counted live and not
/// read). With `clean`, also removes the leases of processes that are gone
/// and every temporary file no live process owns, tallying them there.
fn sweep_dead(
    root: &DirFd,
    own: Option<&OsString>,
    mut clean: Option<&mut Swept>,
) -> io::Result<(BTreeSet<u32>, BTreeSet<Digest>)> {
    let (mut pids, mut digests) = (BTreeSet::new(), BTreeSet::new());
    if let Ok(dir) = root.dir(LEASES_DIR) {
        for name in dir.names()? {
            let pid = lease_pid(&name);
            if Some(&name) == own {
                pids.extend(pid);
                continue;
            }
            let Ok(f) = dir.open_rw(&name) else { continue };
            match flock(&f, FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    // Its process is gone.
                    if let Some(swept) = clean.as_deref_mut() {
                        let _ = dir.remove(&name);
                        swept.leases += 1;
                    }
                }
                Err(_) => {
                    pids.extend(pid);
                    for line in io::BufReader::new(&f).lines().map_while(Result::ok) {
                        digests.extend(Digest::from_hex(line.trim()));
                    }
                }
            }
        }
    }
    let Some(swept) = clean else {
        return Ok((pids, digests));
    };
    if let Ok(tmp) = root.dir(TMP_DIR) {
        for name in tmp.names()? {
            let pid = crate::sink::file::temp_pid(&name);
            if pid.is_some_and(|p| pids.contains(&p)) {
                continue;
            }
            let size = tmp
                .stat(&name)
                .ok()
                .flatten()
                .map_or(0, |s| s.st_size as u64);
            if tmp.remove(&name).is_ok() {
                swept.temps += 1;
                swept.temp_bytes += size;
            }
        }
    }
    Ok((pids, digests))
}

/// What a sweep of a store removed.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Swept {
    pub blobs: usize,
    pub bytes: u64,
    /// Temporary files of processes that are gone.
    pub temps: usize,
    pub temp_bytes: u64,
    /// Leases of processes that are gone.
    pub leases: usize,
}

impl Swept {
    /// One line for people.
    pub fn render(&self) -> String {
        format!(
            "removed {} blobs ({} bytes), {} temporary files of finished processes ({} bytes), {} stale leases",
            self.blobs, self.bytes, self.temps, self.temp_bytes, self.leases
        )
    }
}

impl Store {
    /// The store's directory, opened (its own path may hold links; nothing
    /// beneath it is followed).
    pub fn root(&self) -> Result<DirFd, Error> {
        DirFd::open(&self.dir).map_err(|source| Error::Io {
            path: self.dir.clone(),
            source,
        })
    }

    /// This process's lease on the store (taken on first use). `None`
    /// where the store cannot be written (a read-only `vendor-images/`).
    fn lease_key(&self) -> PathBuf {
        std::path::absolute(&self.dir).unwrap_or_else(|_| self.dir.clone())
    }

    pub fn lease(&self) -> Option<Arc<Lease>> {
        let key = self.lease_key();
        let mut all = leases().lock().unwrap();
        if let Some(l) = all.get(&key) {
            return Some(l.clone());
        }
        let root = self.root().ok()?;
        let dir = root.create_dir(LEASES_DIR).ok()?;
        root.create_dir(TMP_DIR).ok()?;
        let _shared = gc_lock(&root, false).ok()?;
        let name = OsString::from(format!(
            "{}-{:08x}",
            std::process::id(),
            crate::sink::file::rand_u64() & 0xffff_ffff
        ));
        let file = dir.create_new(&name).ok()?;
        flock(&file, FlockOperation::LockExclusive).ok()?;
        let lease = Arc::new(Lease {
            root,
            file: Mutex::new(file),
            name,
            created: Mutex::default(),
            recorded: Mutex::default(),
        });
        all.insert(key, lease.clone());
        drop(all);
        drop(_shared);
        self.clean_dead(&lease.root);
        Some(lease)
    }

    /// Removes the leases and temporary files of kiln processes that are
    /// gone, if no gc or writer holds the gc lock right now (never waits;
    /// `kiln store gc` does the same, and blobs too).
    fn clean_dead(&self, root: &DirFd) {
        let Ok(f) = root.open_rw(GC_LOCK) else { return };
        if flock(&f, FlockOperation::NonBlockingLockExclusive).is_err() {
            return;
        }
        let _ = sweep_dead(root, None, Some(&mut Swept::default()));
    }

    /// Removes every blob that no named image references and no live
    /// lease holds, the leases and temporary files of processes that are
    /// gone; with `only`, just those blobs (undoing a failed command).
    pub(super) fn sweep(
        &self,
        keep: BTreeSet<Digest>,
        only: Option<&[Digest]>,
    ) -> Result<Swept, Error> {
        let root = self.root()?;
        let ioe = |p: PathBuf| move |source| Error::Io { path: p, source };
        let own = leases()
            .lock()
            .unwrap()
            .get(&self.lease_key())
            .map(|l| l.name.clone());
        root.create_dir(KILN_DIR)
            .map_err(ioe(root.join(KILN_DIR)))?;
        let _gc = gc_lock(&root, true).map_err(ioe(root.join(GC_LOCK)))?;
        let mut keep = keep;
        let mut swept = Swept::default();
        // Undoing our own blobs (`only`) cleans nothing else.
        let clean = only.is_none().then_some(&mut swept);
        let (live_pids, leased) =
            sweep_dead(&root, own.as_ref(), clean).map_err(ioe(root.join(KILN_DIR)))?;
        keep.extend(leased);
        let blobs = match root.dir("blobs/sha256") {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(swept),
            Err(e) => return Err(ioe(root.join("blobs/sha256"))(e)),
        };
        let names: Vec<OsString> = match only {
            Some(list) => list.iter().map(|d| OsString::from(d.hex())).collect(),
            None => blobs.names().map_err(ioe(blobs.path.clone()))?,
        };
        for name in names {
            let digest = name.to_str().and_then(Digest::from_hex);
            if digest.as_ref().is_some_and(|d| keep.contains(d)) {
                continue;
            }
            // Temporary files of kiln before 0.2 lay beside the blobs.
            if let Some(pid) = crate::sink::file::temp_pid(&name) {
                if live_pids.contains(&pid) || crate::fsx::process_alive(pid) {
                    continue;
                }
            }
            let Some(st) = blobs.stat(&name).ok().flatten() else {
                continue;
            };
            if rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory {
                continue;
            }
            blobs.remove(&name).map_err(ioe(blobs.join(&name)))?;
            swept.blobs += 1;
            swept.bytes += st.st_size as u64;
        }
        Ok(swept)
    }
}
