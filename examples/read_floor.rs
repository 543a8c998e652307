//! The floor under kiln's context hash, for benches/compare.sh: the least a
//! program can do to read every file of a tree, so kiln's own time can be
//! stated against it. Directories are listed in parallel (rayon, one task
//! per directory, names relative to the directory's descriptor) and every
//! regular file is opened, `fstat`ed (kiln needs the mode), read to the end
//! and closed; with `--sha256` each file is hashed too, and the digests are
//! folded so nothing is optimized away. No sorting, no paths kept, no output
//! but a count.
//!
//! Modes: the default is one call each for open, fstat, read and close;
//! `--uring-fstat` batches open, read and close through io_uring with a
//! plain fstat each (what kiln does); `--uring` leaves out the fstat (the
//! least any batched reader can do); `--stat` only stats each file (the
//! floor of an all-hits `--hash-cache` run).
//!
//! Usage: `read_floor [--sha256] [--uring|--uring-fstat|--stat] DIR`;
//! prints `files bytes fold`.

use std::os::fd::OwnedFd;

use rayon::prelude::*;
use rustix::fs::{openat, Dir, FileType, Mode, OFlags};
use sha2::{Digest, Sha256};

const SLOTS: usize = 64;
const FBUF: usize = 16 * 1024;

thread_local! {
    static RING: std::cell::RefCell<Option<(io_uring::IoUring, Vec<u8>)>> =
        const { std::cell::RefCell::new(None) };
}

/// One batch of files of one directory through io_uring: openat into a
/// direct descriptor, linked read and close (no stat: the lower bound).
fn uring_batch(dirfd: &OwnedFd, names: &[std::ffi::CString], hash: bool) -> (u64, u64, u8) {
    use io_uring::{opcode, squeue::Flags, types};
    use std::os::fd::AsRawFd;
    RING.with_borrow_mut(|slot| {
        let (ring, bufs) = slot.get_or_insert_with(|| {
            let ring = io_uring::IoUring::new(256).expect("io_uring");
            ring.submitter()
                .register_files_sparse(SLOTS as u32)
                .expect("register files");
            (ring, vec![0u8; SLOTS * FBUF])
        });
        let dfd = types::Fd(dirfd.as_raw_fd());
        {
            let mut sq = ring.submission();
            for (i, name) in names.iter().enumerate() {
                let open = opcode::OpenAt::new(dfd, name.as_ptr())
                    .flags(libc::O_RDONLY | libc::O_NOFOLLOW)
                    .file_index(Some(
                        types::DestinationSlot::try_from_slot_target(i as u32).unwrap(),
                    ))
                    .build()
                    .flags(Flags::IO_LINK)
                    .user_data((i * 4) as u64);
                let read = opcode::Read::new(
                    types::Fixed(i as u32),
                    bufs[i * FBUF..].as_mut_ptr(),
                    FBUF as u32,
                )
                .build()
                .flags(Flags::IO_HARDLINK)
                .user_data((i * 4 + 1) as u64);
                let close = opcode::Close::new(types::Fixed(i as u32))
                    .build()
                    .user_data((i * 4 + 2) as u64);
                unsafe {
                    sq.push(&open).unwrap();
                    sq.push(&read).unwrap();
                    sq.push(&close).unwrap();
                }
            }
        }
        let mut lens = vec![0usize; names.len()];
        for (ud, res) in reap(ring, names.len() * 3) {
            if ud % 4 == 1 {
                lens[ud / 4] = res as usize;
            }
        }
        let mut out = (0u64, 0u64, 0u8);
        for (i, &len) in lens.iter().enumerate() {
            assert!(len < FBUF, "file too big for the floor's buffers");
            out = (
                out.0 + 1,
                out.1 + len as u64,
                out.2 ^ slot_first(bufs, i, len, hash),
            );
        }
        out
    })
}

/// Like `uring_batch`, with plain descriptors so each can be `fstat`ed:
/// openat for the batch in one submission, then fstat (a syscall each),
/// then read and close for the batch in a second submission.
fn uring_fstat_batch(dirfd: &OwnedFd, names: &[std::ffi::CString], hash: bool) -> (u64, u64, u8) {
    use io_uring::{opcode, squeue::Flags, types};
    use std::os::fd::AsRawFd;
    RING.with_borrow_mut(|slot| {
        let (ring, bufs) = slot.get_or_insert_with(|| {
            let ring = io_uring::IoUring::new(256).expect("io_uring");
            (ring, vec![0u8; SLOTS * FBUF])
        });
        let dfd = types::Fd(dirfd.as_raw_fd());
        let mut fds = vec![-1i32; names.len()];
        {
            let mut sq = ring.submission();
            for (i, name) in names.iter().enumerate() {
                let open = opcode::OpenAt::new(dfd, name.as_ptr())
                    .flags(libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .build()
                    .user_data(i as u64);
                unsafe { sq.push(&open).unwrap() };
            }
        }
        for (i, fd) in reap(ring, names.len()) {
            fds[i] = fd;
        }
        let mut sizes = vec![0i64; names.len()];
        let mut out = (0u64, 0u64, 0u8);
        for (i, fd) in fds.iter_mut().enumerate() {
            let b = unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) };
            sizes[i] = rustix::fs::fstat(b).expect("fstat").st_size;
            if sizes[i] as usize >= FBUF {
                // Too big for a slot: read (and close) it here, as kiln does.
                let f = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(*fd) };
                let (n, bytes, first) = read_all(&f, hash);
                out = (out.0 + n, out.1 + bytes, out.2 ^ first);
                *fd = -1;
            }
        }
        let small = fds.iter().filter(|fd| **fd >= 0).count();
        {
            let mut sq = ring.submission();
            for (i, fd) in fds.iter().enumerate().filter(|(_, fd)| **fd >= 0) {
                let read =
                    opcode::Read::new(types::Fd(*fd), bufs[i * FBUF..].as_mut_ptr(), FBUF as u32)
                        .build()
                        .flags(Flags::IO_HARDLINK)
                        .user_data((i * 2) as u64);
                let close = opcode::Close::new(types::Fd(*fd))
                    .build()
                    .user_data((i * 2 + 1) as u64);
                unsafe {
                    sq.push(&read).unwrap();
                    sq.push(&close).unwrap();
                }
            }
        }
        let mut lens = vec![0usize; names.len()];
        for (ud, res) in reap(ring, small * 2) {
            if ud % 2 == 0 {
                lens[ud / 2] = res as usize;
            }
        }
        for (i, &len) in lens.iter().enumerate() {
            if fds[i] < 0 {
                continue;
            }
            assert_eq!(len as i64, sizes[i]);
            out = (
                out.0 + 1,
                out.1 + len as u64,
                out.2 ^ slot_first(bufs, i, len, hash),
            );
        }
        out
    })
}

fn dir(fd: OwnedFd, hash: bool) -> (u64, u64, u8) {
    let mut files = Vec::new();
    let mut subdirs = Vec::new();
    let dup = rustix::io::fcntl_dupfd_cloexec(&fd, 0).expect("dup");
    let mut d = Dir::new(dup).expect("readdir");
    while let Some(Ok(e)) = d.read() {
        let name = e.file_name().to_owned();
        match e.file_type() {
            FileType::Directory if name.to_bytes() != b"." && name.to_bytes() != b".." => {
                subdirs.push(name)
            }
            FileType::RegularFile => files.push(name),
            _ => {}
        }
    }
    let fd = &fd;
    let mode = MODE.load(std::sync::atomic::Ordering::Relaxed);
    let (mut n, mut bytes, mut fold) = if mode > 0 {
        let names: Vec<std::ffi::CString> = files;
        names
            .par_chunks(SLOTS)
            .map(|c| {
                if mode == 3 {
                    uring_fstat_batch(fd, c, hash)
                } else {
                    uring_batch(fd, c, hash)
                }
            })
            .reduce(|| (0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 ^ b.2))
    } else if mode == -1 {
        files
            .par_iter()
            .with_max_len(64)
            .map(|name| {
                let st = rustix::fs::statat(fd, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                    .expect("stat");
                (1u64, st.st_size as u64, st.st_ino as u8)
            })
            .reduce(|| (0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 ^ b.2))
    } else {
        sync_files(fd, &files, hash)
    };
    let sub: Vec<(u64, u64, u8)> = subdirs
        .par_iter()
        .map(|name| {
            let d = openat(
                fd,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .expect("opendir");
            dir(d, hash)
        })
        .collect();
    for s in sub {
        n += s.0;
        bytes += s.1;
        fold ^= s.2;
    }
    (n, bytes, fold)
}

/// Submits what is queued and waits for `want` completions: (user data,
/// result), every one a success (the floor has no error path).
fn reap(ring: &mut io_uring::IoUring, want: usize) -> Vec<(usize, i32)> {
    let mut got = Vec::with_capacity(want);
    while got.len() < want {
        ring.submit_and_wait(want - got.len()).expect("submit");
        for c in ring.completion() {
            assert!(
                c.result() >= 0,
                "op {} failed: {}",
                c.user_data(),
                c.result()
            );
            got.push((c.user_data() as usize, c.result()));
        }
    }
    got
}

/// The first byte of slot `i`'s digest (or of its bytes, not hashing).
fn slot_first(bufs: &[u8], i: usize, len: usize, hash: bool) -> u8 {
    let b = &bufs[i * FBUF..i * FBUF + len];
    if hash {
        Sha256::digest(b)[0]
    } else {
        bufs[i * FBUF]
    }
}

/// Reads a whole file one call at a time: (1, bytes, first digest byte).
fn read_all(f: &OwnedFd, hash: bool) -> (u64, u64, u8) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut h = Sha256::new();
    let mut total = 0u64;
    loop {
        let k = rustix::io::read(f, &mut buf[..]).expect("read");
        if k == 0 {
            break;
        }
        if hash {
            h.update(&buf[..k]);
        }
        total += k as u64;
    }
    (1, total, if hash { h.finalize()[0] } else { buf[0] })
}

static MODE: std::sync::atomic::AtomicI8 = std::sync::atomic::AtomicI8::new(0);

fn sync_files(fd: &OwnedFd, files: &[std::ffi::CString], hash: bool) -> (u64, u64, u8) {
    let (n, bytes, fold) = files
        .par_iter()
        .with_max_len(64)
        .map_init(
            || vec![0u8; 256 * 1024],
            |buf, name| {
                let f = openat(fd, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
                    .expect("open");
                let st = rustix::fs::fstat(&f).expect("fstat");
                let mut h = Sha256::new();
                let mut total = 0u64;
                loop {
                    let k = rustix::io::read(&f, &mut buf[..]).expect("read");
                    if k == 0 {
                        break;
                    }
                    if hash {
                        h.update(&buf[..k]);
                    }
                    total += k as u64;
                    if total == st.st_size as u64 && k < buf.len() {
                        break;
                    }
                }
                let first = if hash { h.finalize()[0] } else { buf[0] };
                (1u64, total, first)
            },
        )
        .reduce(|| (0, 0, 0), |a, b| (a.0 + b.0, a.1 + b.1, a.2 ^ b.2));
    (n, bytes, fold)
}

fn main() {
    let mut hash = false;
    let mut root = None;
    for a in std::env::args().skip(1) {
        match a.as_str() {
            "--sha256" => hash = true,
            "--uring" => MODE.store(1, std::sync::atomic::Ordering::Relaxed),
            "--stat" => MODE.store(-1, std::sync::atomic::Ordering::Relaxed),
            "--uring-fstat" => MODE.store(3, std::sync::atomic::Ordering::Relaxed),
            _ => root = Some(a),
        }
    }
    let root = root.expect("usage: read_floor [--sha256] DIR");
    let fd = rustix::fs::open(
        root.as_str(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .expect("open root");
    let (n, bytes, fold) = dir(fd, hash);
    println!("{n} {bytes} {fold}");
}
