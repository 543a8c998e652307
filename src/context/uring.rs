//! Batched file hashing through io_uring: the context walk hands over the
//! regular files of one directory in batches; each batch costs two
//! submissions (every `openat`, then every `read` linked to its `close`)
//! instead of four system calls per file. `fstat` stays a plain call per
//! file (io_uring's `statx` runs on a kernel worker thread, which costs
//! more than the call it saves).
//!
//! Files up to [`SMALL`] bytes are read whole in one request of `size + 1`
//! bytes, so a file that grew since its `fstat` shows up as a long read; a
//! larger file, a failed open and anything unexpected go back to the
//! caller's one-file-at-a-time path, which reports errors exactly as
//! before. Where io_uring is unavailable (an old kernel,
//! `kernel.io_uring_disabled`, a seccomp profile that denies it, as
//! Docker's default does) or `KILN_NO_URING=1` is set, every file takes that
//! path.

use std::cell::RefCell;
use std::ffi::CStr;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU8, Ordering};

use io_uring::{opcode, squeue::Flags, types, IoUring};
use rustix::fs::Stat;
use sha2::{Digest, Sha256};

/// Files up to this size are read through the ring.
pub const SMALL: u64 = 128 * 1024;
/// Files per batch (one ring submission each way).
pub const BATCH: usize = 64;
/// Bytes of file content one batch may hold.
const BATCH_BYTES: usize = 4 << 20;

/// 0: not yet known, 1: usable, 2: unavailable.
static STATE: AtomicU8 = AtomicU8::new(0);

thread_local! {
    static RING: RefCell<Option<(IoUring, Vec<u8>)>> = const { RefCell::new(None) };
}

/// Whether batches can go through io_uring (decided once per process).
pub fn available() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let ok = std::env::var_os("KILN_NO_URING").map_or(true, |v| v.is_empty() || v == "0")
                && IoUring::new(8).is_ok();
            STATE.store(if ok { 1 } else { 2 }, Ordering::Relaxed);
            ok
        }
    }
}

/// What the ring found for one file: its `fstat` and the sha256 of its
/// content, or the number of bytes read when that differs from the size.
pub enum Hashed {
    Done(Stat, [u8; 32]),
    /// The file changed between `fstat` and the read.
    Changed {
        expected: u64,
        got: u64,
    },
}

/// Opens, stats, reads and hashes the files `names` of the directory
/// `dir`. Each result is `None` where the caller must take its own path
/// (large file, failed open or read, ring unavailable).
pub fn hash_batch(dir: BorrowedFd<'_>, names: &[&CStr]) -> Vec<Option<Hashed>> {
    let mut out: Vec<Option<Hashed>> = names.iter().map(|_| None).collect();
    if names.is_empty() || !available() {
        return out;
    }
    let done = RING.with_borrow_mut(|slot| {
        if slot.is_none() {
            match IoUring::new((2 * BATCH) as u32) {
                Ok(r) => *slot = Some((r, Vec::new())),
                Err(_) => return false,
            }
        }
        let Some((ring, buf)) = slot.as_mut() else {
            return false;
        };
        if run(ring, buf, dir, names, &mut out).is_ok() {
            return true;
        }
        // Requests may still be in flight into the buffer: it is never
        // freed or reused, and io_uring is not used again in this process.
        STATE.store(2, Ordering::Relaxed);
        if let Some((ring, buf)) = slot.take() {
            std::mem::forget(buf);
            drop(ring);
        }
        false
    });
    if !done {
        // The ring failed as a whole: nothing it returned is trusted.
        out.iter_mut().for_each(|o| *o = None);
    }
    out
}

/// Submits what is queued and reaps `want` completions as (user data, result).
fn reap(ring: &mut IoUring, want: usize) -> std::io::Result<Vec<(u64, i32)>> {
    let mut got = Vec::with_capacity(want);
    while got.len() < want {
        match ring.submit_and_wait(want - got.len()) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        got.extend(ring.completion().map(|c| (c.user_data(), c.result())));
    }
    Ok(got)
}

fn run(
    ring: &mut IoUring,
    buf: &mut Vec<u8>,
    dir: BorrowedFd<'_>,
    names: &[&CStr],
    out: &mut [Option<Hashed>],
) -> std::io::Result<()> {
    let dfd = types::Fd(dir.as_raw_fd());
    for chunk in (0..names.len()).collect::<Vec<_>>().chunks(BATCH) {
        // 1. Every open of the batch in one submission.
        {
            let mut sq = ring.submission();
            for &i in chunk {
                let open = opcode::OpenAt::new(dfd, names[i].as_ptr())
                    // Not O_NONBLOCK: io_uring would then answer EAGAIN for
                    // reads not in the page cache instead of waiting for them.
                    .flags(libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NOCTTY)
                    .build()
                    .user_data(i as u64);
                // SAFETY: the name outlives the submission (reaped below).
                unsafe { sq.push(&open) }.map_err(std::io::Error::other)?;
            }
        }
        let mut fds: Vec<(usize, OwnedFd)> = Vec::with_capacity(chunk.len());
        for (i, res) in reap(ring, chunk.len())? {
            if res >= 0 {
                // SAFETY: a descriptor the kernel just opened for us.
                fds.push((i as usize, unsafe { OwnedFd::from_raw_fd(res) }));
            }
        }
        fds.sort_unstable_by_key(|(i, _)| *i);
        // 2. fstat each; the small ones get a place in the buffer.
        let mut small: Vec<(usize, OwnedFd, Stat, usize)> = Vec::new();
        let mut at = 0usize;
        for (i, fd) in fds {
            let Ok(st) = rustix::fs::fstat(&fd) else {
                continue;
            };
            let size = st.st_size as u64;
            let is_file = st.st_mode & libc::S_IFMT == libc::S_IFREG;
            if !is_file || size > SMALL || at + size as usize + 1 > BATCH_BYTES {
                continue; // closed on drop; the caller reads it itself
            }
            small.push((i, fd, st, at));
            at += size as usize + 1;
        }
        if buf.len() < at {
            buf.resize(at, 0);
        }
        // 3. Every read, each linked to its close, in one submission.
        {
            let mut sq = ring.submission();
            for (k, (_, fd, st, off)) in small.iter().enumerate() {
                let len = st.st_size as u32 + 1;
                let read =
                    opcode::Read::new(types::Fd(fd.as_raw_fd()), buf[*off..].as_mut_ptr(), len)
                        .build()
                        .flags(Flags::IO_HARDLINK)
                        .user_data((2 * k) as u64);
                let close = opcode::Close::new(types::Fd(fd.as_raw_fd()))
                    .build()
                    .user_data((2 * k + 1) as u64);
                // SAFETY: the buffer and descriptors outlive the submission.
                unsafe {
                    sq.push(&read).map_err(std::io::Error::other)?;
                    sq.push(&close).map_err(std::io::Error::other)?;
                }
            }
        }
        let mut lens: Vec<i32> = vec![-1; small.len()];
        let mut closed = vec![false; small.len()];
        for (ud, res) in reap(ring, 2 * small.len())? {
            let k = ud as usize / 2;
            if ud % 2 == 0 {
                lens[k] = res;
            } else {
                closed[k] = res >= 0;
            }
        }
        for (k, (i, fd, st, off)) in small.into_iter().enumerate() {
            if closed[k] {
                // The ring closed it: the number must not be closed again.
                std::mem::forget(fd);
            }
            let size = st.st_size as u64;
            out[i] = match lens[k] {
                n if n < 0 => None,
                n if n as u64 == size => Some(Hashed::Done(
                    st,
                    Sha256::digest(&buf[off..off + size as usize]).into(),
                )),
                n => Some(Hashed::Changed {
                    expected: size,
                    got: n as u64,
                }),
            };
        }
    }
    Ok(())
}
