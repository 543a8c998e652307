//! Ordered read-ahead: files are read by a few threads ahead of one
//! consumer that needs their bytes strictly in order (the taskgraph tar
//! hash, a layer's tar stream). File `i` is read by thread `i % n` into that
//! thread's bounded channel, so order needs no sorting and memory stays
//! bounded (each channel holds a few chunks of at most [`CHUNK`] bytes).
//!
//! The readers are plain threads, not rayon tasks: consumers may run on
//! rayon workers and block on these channels.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver};
use std::thread::Scope;

/// The largest chunk a reader sends.
pub const CHUNK: usize = 512 * 1024;
const DEPTH: usize = 8;
/// Messages travel in batches of about this many bytes (or [`BATCH_MSGS`]
/// messages): one hand-off per file cost more than reading small files.
const BATCH_BYTES: usize = 256 * 1024;
const BATCH_MSGS: usize = 128;

/// What a reader sends for one file: that it opened it, data chunks, then the end.
pub enum Msg {
    /// The file is open: its (device, inode) when it has other hard links, and its size now.
    Open(Option<(u64, u64)>, u64),
    Data(Vec<u8>),
    /// The file ended after this many bytes.
    /// The file's length and its mtime (ns) by `fstat` once it was read.
    End(u64, i64),
    Err(PathBuf, io::Error),
}

/// Reads `files` in order on `threads` threads inside `scope`.
pub struct Prefetch {
    rx: Vec<Receiver<Vec<Msg>>>,
    pending: Vec<std::collections::VecDeque<Msg>>,
    next: usize,
    last_mtime: i64,
}

impl Prefetch {
    /// `files` are (path, expected size); the size only sizes buffers.
    pub fn start<'s, 'e: 's, P: AsRef<Path> + Sync>(
        scope: &'s Scope<'s, 'e>,
        files: &'e [(P, u64)],
        threads: usize,
    ) -> Prefetch {
        let n = threads.clamp(1, 16).min(files.len().max(1));
        let mut rx = Vec::with_capacity(n);
        for t in 0..n {
            let (tx, r) = sync_channel(DEPTH);
            rx.push(r);
            scope.spawn(move || {
                let mut batch = Batch {
                    tx,
                    msgs: Vec::new(),
                    bytes: 0,
                };
                for (path, size) in files.iter().skip(t).step_by(n) {
                    if read_one(path.as_ref(), *size, &mut batch).is_err() {
                        return; // the consumer hung up
                    }
                }
                let _ = batch.flush();
            });
        }
        let pending = (0..n).map(|_| Default::default()).collect();
        Prefetch {
            rx,
            pending,
            next: 0,
            last_mtime: 0,
        }
    }

    /// Receives the next file's bytes through `sink`; returns its length.
    pub fn next_file(
        &mut self,
        mut sink: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> Result<u64, (PathBuf, io::Error)> {
        self.next_file_events(|ev| match ev {
            Event::Open(..) => Ok(true),
            Event::Data(d) => sink(d).map(|_| true),
        })
    }

    /// Receives the next file as events: first [`Event::Open`] (answer
    /// false to drop the bytes), then its [`Event::Data`]; returns its length.
    pub fn next_file_events(
        &mut self,
        mut f: impl FnMut(Event<'_>) -> io::Result<bool>,
    ) -> Result<u64, (PathBuf, io::Error)> {
        let out = |e| (PathBuf::from("(output)"), e);
        let mut want = true;
        let t = self.next % self.rx.len();
        self.next += 1;
        loop {
            let msg = match self.pending[t].pop_front() {
                Some(m) => m,
                None => match self.rx[t].recv() {
                    Ok(batch) => {
                        self.pending[t].extend(batch);
                        continue;
                    }
                    Err(_) => {
                        return Err((
                            PathBuf::from("(reader)"),
                            io::Error::other("a reader thread stopped"),
                        ))
                    }
                },
            };
            match msg {
                Msg::Open(link, size) => want = f(Event::Open(link, size)).map_err(out)?,
                Msg::Data(d) if want => {
                    f(Event::Data(&d)).map_err(out)?;
                }
                Msg::Data(_) => {}
                Msg::End(n, mtime) => {
                    self.last_mtime = mtime;
                    return Ok(n);
                }
                Msg::Err(p, e) => return Err((p, e)),
            }
        }
    }
}

impl Prefetch {
    /// The mtime (ns) of the file last received, by `fstat` of its open
    /// descriptor after it was read: the build's check that no context file
    /// changed under it rides on this, with no second lookup by path.
    pub fn last_mtime(&self) -> i64 {
        self.last_mtime
    }
}

/// What [`Prefetch::next_file_events`] reports.
pub enum Event<'a> {
    /// The file is open: its (device, inode) when it has other hard links, and its size.
    Open(Option<(u64, u64)>, u64),
    Data(&'a [u8]),
}

struct Batch {
    tx: std::sync::mpsc::SyncSender<Vec<Msg>>,
    msgs: Vec<Msg>,
    bytes: usize,
}

impl Batch {
    fn push(&mut self, m: Msg) -> Result<(), ()> {
        if let Msg::Data(d) = &m {
            self.bytes += d.len();
        }
        self.msgs.push(m);
        if self.bytes >= BATCH_BYTES || self.msgs.len() >= BATCH_MSGS {
            self.flush()?;
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), ()> {
        self.bytes = 0;
        self.tx.send(std::mem::take(&mut self.msgs)).map_err(|_| ())
    }
}

fn read_one(path: &Path, size: u64, batch: &mut Batch) -> Result<(), ()> {
    let mut send = |m| batch.push(m);
    let mut f = match crate::fsx::open_deep(path) {
        Ok(f) => f,
        Err(e) => return send(Msg::Err(path.to_path_buf(), e)),
    };
    match f.metadata() {
        Ok(md) => {
            use std::os::unix::fs::MetadataExt;
            send(Msg::Open(
                (md.nlink() > 1).then(|| (md.dev(), md.ino())),
                md.len(),
            ))?;
        }
        Err(e) => return send(Msg::Err(path.to_path_buf(), e)),
    }
    let mut total = 0u64;
    let end = |f: &std::fs::File, total: u64| {
        use std::os::unix::fs::MetadataExt;
        match f.metadata() {
            Ok(md) => Msg::End(total, md.mtime() * 1_000_000_000 + md.mtime_nsec()),
            Err(e) => Msg::Err(path.to_path_buf(), e),
        }
    };
    loop {
        // Sized to what is left (+1 to see the end in the same read), never zeroed.
        let want = (size.saturating_sub(total) as usize).min(CHUNK) + 1;
        let mut buf = Vec::with_capacity(want.min(CHUNK));
        match (&mut f).take(CHUNK as u64).read_to_end(&mut buf) {
            Ok(0) => return send(end(&f, total)),
            Ok(n) => {
                total += n as u64;
                send(Msg::Data(buf))?;
                if n < CHUNK {
                    return send(end(&f, total));
                }
            }
            Err(e) => return send(Msg::Err(path.to_path_buf(), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_arrive_in_order_whatever_the_threads() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<(PathBuf, u64)> = (0..40)
            .map(|i| {
                let p = dir.path().join(format!("f{i}"));
                std::fs::write(&p, vec![i as u8; i * 50_000]).unwrap();
                (p, (i * 50_000) as u64)
            })
            .collect();
        for threads in [1, 3, 8] {
            std::thread::scope(|s| {
                let mut pf = Prefetch::start(s, &files, threads);
                for i in 0..40 {
                    let mut got = Vec::new();
                    let n = pf.next_file(|d| {
                        got.extend_from_slice(d);
                        Ok(())
                    });
                    assert_eq!(n.ok(), Some((i * 50_000) as u64));
                    assert!(got.iter().all(|&b| b == i as u8));
                }
            });
        }
    }
}
