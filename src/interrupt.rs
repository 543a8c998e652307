//! Interrupts: on SIGINT, SIGTERM or SIGHUP kiln kills the sandbox
//! helpers it started, removes the temporary files and directories it
//! registered (a secret's file, a build's spool), then dies of the same
//! signal. `kill -9` cannot be caught: what it leaves, the next run or
//! `kiln cache prune` removes.
//!
//! [`install`] blocks the three signals in the calling thread (the main
//! thread, before any other exists, so every thread inherits the mask) and
//! starts one thread that waits for them. Children started through
//! `std::process::Command` get an empty mask again.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

#[derive(Default)]
struct Registry {
    next: u64,
    paths: Vec<(u64, PathBuf)>,
    pids: Vec<(u64, u32)>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: 0,
    paths: Vec::new(),
    pids: Vec::new(),
});

const SIGNALS: [i32; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn signal_set() -> libc::sigset_t {
    // SAFETY: sigemptyset/sigaddset initialise a set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in SIGNALS {
            libc::sigaddset(&mut set, s);
        }
        set
    }
}

/// Takes over SIGINT, SIGTERM and SIGHUP. Call once, from the main thread,
/// before any other thread starts.
pub fn install() {
    let set = signal_set();
    // SAFETY: blocks the signals in this thread; the set is valid.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let _ = std::thread::Builder::new()
        .name("kiln-signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: waits for one of the blocked signals.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            clean_up();
            // Die of the signal, as the caller expects.
            // SAFETY: default disposition, unblocked in this thread, raised.
            unsafe {
                libc::signal(sig, libc::SIG_DFL);
                let mut one: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut one);
                libc::sigaddset(&mut one, sig);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
                libc::raise(sig);
            }
            std::process::exit(128 + sig);
        });
}

/// Kills the registered processes (and waits until they are gone), then
/// removes the registered paths.
fn clean_up() {
    let reg = match REGISTRY.lock() {
        Ok(r) => r,
        Err(p) => p.into_inner(),
    };
    for (_, pid) in &reg.pids {
        // SAFETY: kill and a non-reaping wait on our own child.
        unsafe {
            libc::kill(*pid as libc::pid_t, libc::SIGKILL);
            let mut info: libc::siginfo_t = std::mem::zeroed();
            libc::waitid(
                libc::P_PID,
                *pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            );
        }
    }
    for (_, p) in reg.paths.iter().rev() {
        crate::sandbox::remove_tree(p);
    }
}

/// Unregisters what it registered when dropped.
#[must_use]
pub struct Guard(u64);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(mut r) = REGISTRY.lock() {
            r.paths.retain(|(id, _)| *id != self.0);
            r.pids.retain(|(id, _)| *id != self.0);
        }
    }
}

fn register(f: impl FnOnce(&mut Registry, u64)) -> Guard {
    let mut r = match REGISTRY.lock() {
        Ok(r) => r,
        Err(p) => p.into_inner(),
    };
    r.next += 1;
    let id = r.next;
    f(&mut r, id);
    Guard(id)
}

/// Removes `path` (a file or a directory tree) if kiln is interrupted
/// while the guard lives.
pub fn remove_on_interrupt(path: &Path) -> Guard {
    let p = path.to_path_buf();
    register(|r, id| r.paths.push((id, p)))
}

/// Kills the child `pid` (before any path is removed) if kiln is
/// interrupted while the guard lives.
pub fn kill_on_interrupt(pid: u32) -> Guard {
    register(|r, id| r.pids.push((id, pid)))
}

/// A file that exists only while it lives: removed when dropped and when
/// kiln is interrupted. Created private (0600) in a private directory.
pub struct TempFile {
    dir: tempfile::TempDir,
    path: PathBuf,
    _guard: Guard,
}

impl TempFile {
    /// Writes `bytes` to a new private file named `name`.
    pub fn new(name: &str, bytes: &[u8]) -> std::io::Result<TempFile> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let dir = tempfile::Builder::new().prefix(".kiln-secret-").tempdir()?;
        let guard = remove_on_interrupt(dir.path());
        let path = dir.path().join(name);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        f.write_all(bytes)?;
        Ok(TempFile {
            dir,
            path,
            _guard: guard,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory holding it.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}
