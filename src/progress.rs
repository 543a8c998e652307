//! Progress reporting: bars on a terminal (bytes and files done, rate,
//! ETA), one line per finished step in `plain` mode (for CI logs), nothing
//! otherwise. Reporting never changes what kiln computes.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `--progress auto|plain|never`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Bars when stderr is a terminal, else plain (a CI log), as Docker
    /// falls back to plain output there.
    #[default]
    Auto,
    /// One line per finished step on stderr.
    Plain,
    /// Nothing.
    Never,
}

/// Where progress goes, chosen once.
#[derive(Clone, Debug, Default)]
pub struct Progress {
    mode: Mode,
}

impl Progress {
    pub fn new(mode: Mode) -> Progress {
        let mode = match mode {
            Mode::Auto if std::io::stderr().is_terminal() => Mode::Auto,
            Mode::Auto => Mode::Plain,
            m => m,
        };
        Progress { mode }
    }

    /// No reporting at all.
    pub fn none() -> Progress {
        Progress { mode: Mode::Never }
    }

    /// A line for the log (`plain` mode only): BuildKit's `CACHED` lines.
    pub fn say(&self, text: &str) {
        if self.mode == Mode::Plain {
            eprintln!("kiln: {text}");
        }
    }

    /// Starts a step of `bytes` bytes in `files` files (0 when unknown).
    pub fn step(&self, name: &str, bytes: u64, files: u64) -> Step {
        let bar = (self.mode == Mode::Auto).then(|| {
            let bar = ProgressBar::with_draw_target(Some(bytes), ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template("{msg:>12} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {prefix} eta {eta}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(name.to_string());
            bar
        });
        Step {
            inner: Arc::new(StepInner {
                name: name.to_string(),
                plain: self.mode == Mode::Plain,
                bar,
                files_total: files,
                bytes: AtomicU64::new(0),
                files: AtomicU64::new(0),
                start: Instant::now(),
            }),
        }
    }
}

#[derive(Debug)]
struct StepInner {
    name: String,
    plain: bool,
    bar: Option<ProgressBar>,
    files_total: u64,
    bytes: AtomicU64,
    files: AtomicU64,
    start: Instant,
}

/// One running step; clones report into the same step (from any thread).
#[derive(Clone, Debug)]
pub struct Step {
    inner: Arc<StepInner>,
}

impl Step {
    /// A step that reports nothing.
    pub fn none() -> Step {
        Progress::none().step("", 0, 0)
    }

    /// A line a RUN command printed: in `plain` mode printed under the
    /// step, on a terminal the step's live tail.
    pub fn line(&self, text: &str) {
        let i = &self.inner;
        if i.plain {
            eprintln!("kiln: {}: {text}", i.name);
        }
        if let Some(bar) = &i.bar {
            let short: String = text.chars().take(100).collect();
            bar.set_message(format!("{}: {short}", i.name));
        }
    }

    /// Records `bytes` more bytes and `files` more files done.
    pub fn inc(&self, bytes: u64, files: u64) {
        let i = &self.inner;
        i.bytes.fetch_add(bytes, Ordering::Relaxed);
        let done = i.files.fetch_add(files, Ordering::Relaxed) + files;
        if let Some(bar) = &i.bar {
            bar.inc(bytes);
            if files > 0 && (done % 256 == 0 || done == i.files_total) {
                bar.set_prefix(format!("{done}/{} files", i.files_total));
            }
        }
    }

    /// Ends the step; in plain mode prints its totals and time.
    pub fn finish(&self) {
        let i = &self.inner;
        if let Some(bar) = &i.bar {
            bar.finish_and_clear();
        }
        if i.plain {
            let secs = i.start.elapsed().as_secs_f64();
            let bytes = i.bytes.load(Ordering::Relaxed);
            let mb = bytes as f64 / 1e6;
            let rate = if secs > 0.0 { mb / secs } else { 0.0 };
            eprintln!(
                "kiln: {}: {} files, {mb:.1} MB in {secs:.2} s ({rate:.0} MB/s)",
                i.name,
                i.files.load(Ordering::Relaxed)
            );
        }
    }
}
