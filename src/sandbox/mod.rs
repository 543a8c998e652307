//! kiln's own sandbox for `RUN`: no daemon, no runtime binary.
//!
//! kiln re-executes itself (`/proc/self/exe __sandbox SPEC`): the helper is
//! single-threaded, which `unshare(CLONE_NEWUSER)` demands. The helper
//!
//! 1. as an unprivileged user, enters a new user namespace, which kiln maps
//!    with `newuidmap`/`newgidmap` from the user's `/etc/subuid` and
//!    `/etc/subgid` ranges (or, without a range, to the user alone);
//! 2. runs its action: [`Action::Extract`] unpacks a layer into a lower
//!    directory (whiteouts as overlay's 0/0 devices, opaque directories as
//!    overlay's xattr), [`Action::Run`] runs a command;
//! 3. for a command, enters new PID, mount, UTS and IPC namespaces (and a
//!    network namespace with only `lo` for `--network none`); its child is
//!    PID 1, which mounts the overlay (lower directories, the step's upper
//!    directory), a fresh `/proc`, a tmpfs `/dev` with the usual devices,
//!    `/etc/resolv.conf`, `/etc/hosts` and `/etc/hostname` (copies, never
//!    captured), the `RUN --mount`s, pivots into the root and runs the
//!    command as its child, reaping zombies; when the command ends, PID 1
//!    exits and the kernel kills whatever is left and drops every mount;
//! 4. writes the upper directory as the step's layer tar ([`capture`]).
//!
//! The parent (kiln) streams the command's output and reports failures.

pub mod capture;
pub mod container;
mod exec;
pub mod extract;
mod helper;
mod masks;
pub mod reproducible;
mod seccomp;
pub mod snapshot;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::{Deserialize, Serialize};

pub use helper::helper_main;

/// The hidden subcommand the helper runs as.
pub const HELPER: &str = "__sandbox";
/// The helper's exit code when it could not set the sandbox up.
pub const SETUP_FAILED: i32 = 125;
/// The prefix of the helper's own error line on stderr.
pub const ERROR_PREFIX: &str = "kiln-sandbox-error: ";
/// The prefix of the helper's report of how the command ended.
pub const STATUS_PREFIX: &str = "kiln-sandbox-status: ";

/// The network a command sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// The host's network (the default: Dockerfiles install packages).
    #[default]
    Host,
    /// A namespace of its own with only loopback, brought up.
    None,
}

impl Network {
    pub fn parse(s: &str) -> Option<Network> {
        match s {
            "host" | "default" => Some(Network::Host),
            "none" => Some(Network::None),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Network::Host => "host",
            Network::None => "none",
        }
    }
}

/// A `RUN --mount`, resolved to host paths.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Mount {
    /// `rel` beneath the host directory `root` (or `root` itself, a
    /// directory or file, where `rel` is empty), bound at `target`. The
    /// helper resolves `rel` with no link followed and binds what it
    /// opened, so a link in the context never reaches the host.
    Bind {
        root: PathBuf,
        rel: String,
        target: String,
        readonly: bool,
    },
    Tmpfs {
        target: String,
    },
    /// Read-only: `source` inside the stack of `lowers` (another stage's or
    /// image's filesystem, topmost first), resolved beneath it with no link
    /// followed, bound at `target`.
    Stack {
        lowers: Vec<PathBuf>,
        source: String,
        target: String,
    },
}

/// What the helper does.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Action {
    /// Unpacks a layer (a tar, compressed or not) into `dir`, which must
    /// not exist; it appears only when complete, and, where `diff_id` is
    /// given, only when the uncompressed stream has that digest.
    Extract {
        tar: PathBuf,
        dir: PathBuf,
        diff_id: Option<crate::image::Digest>,
    },
    /// Removes a directory tree (a rootless build's spool holds files of
    /// the user namespace's ids, which only it can remove).
    Remove { dir: PathBuf },
    /// Runs a command on an overlay of `lowers` (topmost first) and
    /// `upper`, then writes `upper` as a deterministic tar at `capture`.
    Run(Box<RunSpec>),
}

/// A command and the root filesystem it runs in.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunSpec {
    pub lowers: Vec<PathBuf>,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub merged: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub network: Network,
    pub hostname: String,
    /// Files bound over `/etc/<name>` (copies: a command's edits stay there).
    pub etc: Vec<(String, PathBuf)>,
    pub mounts: Vec<Mount>,
    /// The layer tar to write, and the build timestamp mtimes are clamped to.
    pub capture: PathBuf,
    pub timestamp: u64,
    /// `kiln build --reproducible`: the layer goes through
    /// [`reproducible::apply`]; what was done is written beside `capture`
    /// (extension `normalized`, one line per file).
    #[serde(default)]
    pub reproducible: bool,
}

/// Everything the helper needs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Spec {
    /// Inside a user namespace (kiln is not root).
    pub rootless: bool,
    pub action: Action,
}

/// Why a sandbox could not run a command, or how the command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Setup(String),
    #[error("{}", describe_exit(*code, *signal, tail))]
    Failed {
        code: Option<i32>,
        signal: Option<i32>,
        tail: Vec<String>,
    },
    #[error("starting the sandbox helper ({}): {source}", path.display())]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn describe_exit(code: Option<i32>, signal: Option<i32>, tail: &[String]) -> String {
    let how = match (code, signal) {
        (_, Some(s)) => format!("was killed by signal {s}"),
        (Some(c), _) => format!("exited with code {c}"),
        _ => "failed".into(),
    };
    if tail.is_empty() {
        format!("the command {how} (it printed nothing)")
    } else {
        format!(
            "the command {how}; its last lines:\n    {}",
            tail.join("\n    ")
        )
    }
}

/// How many of a failed command's last lines the error shows.
pub const TAIL_LINES: usize = 20;

/// Whether RUN goes through a user namespace: kiln runs as an unprivileged
/// user, or `KILN_ROOTLESS=1` asks for the rootless path as root too.
pub fn rootless() -> bool {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    euid != 0 || std::env::var_os("KILN_ROOTLESS").is_some_and(|v| v == "1")
}

/// A user's subordinate id range from `/etc/subuid` or `/etc/subgid`.
pub fn subid_range(file: &str, user: &str, id: u32) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.trim().split(':');
        let (who, start, count) = (f.next()?, f.next()?, f.next()?);
        (who == user || who == id.to_string())
            .then(|| Some((start.parse().ok()?, count.parse().ok()?)))
            .flatten()
    })
}

/// The current user's name (from `/etc/passwd`, else `$USER`).
fn user_name(uid: u32) -> String {
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|t| crate::userdb::user_by_uid(&t, uid.into()).map(|u| u.name.to_string()))
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_default()
}

/// What kiln found it can do rootless, and the warning to print, if any.
#[derive(Clone, Debug)]
pub struct UserMap {
    pub uid: (u32, Option<(u32, u32)>),
    pub gid: (u32, Option<(u32, u32)>),
}

impl UserMap {
    pub fn current() -> UserMap {
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let name = user_name(uid);
        UserMap {
            uid: (uid, subid_range("/etc/subuid", &name, uid)),
            gid: (gid, subid_range("/etc/subgid", &name, uid)),
        }
    }

    /// The warning for a user without subordinate ranges.
    pub fn warning(&self) -> Option<String> {
        (self.uid.1.is_none() || self.gid.1.is_none()).then(|| {
            format!(
                "kiln: warning: no /etc/subuid and /etc/subgid range for uid {}: RUN maps only root to you, so chown, setgroups and apt's sandbox user fail; add a range (usermod --add-subuids 100000-165535 --add-subgids 100000-165535 USER)",
                self.uid.0
            )
        })
    }

    /// Runs newuidmap/newgidmap for `pid`; false where a range is missing
    /// (the helper then maps itself alone).
    fn apply(&self, pid: u32) -> Result<bool, Error> {
        let (Some((us, uc)), Some((gs, gc))) = (self.uid.1, self.gid.1) else {
            return Ok(false);
        };
        for (tool, own, start, count) in [
            ("newuidmap", self.uid.0, us, uc),
            ("newgidmap", self.gid.0, gs, gc),
        ] {
            let out = Command::new(tool)
                .arg(pid.to_string())
                .args(["0", &own.to_string(), "1"])
                .args(["1", &start.to_string(), &count.to_string()])
                .output()
                .map_err(|e| {
                    Error::Setup(if e.kind() == std::io::ErrorKind::NotFound {
                        format!("RUN as an unprivileged user needs {tool} (Debian's and Ubuntu's package uidmap, Fedora's shadow-utils): install it, or build as root")
                    } else {
                        format!("running {tool}: {e}")
                    })
                })?;
            if !out.status.success() {
                return Err(Error::Setup(format!(
                    "{tool} {pid} refused to map your /etc/sub{} range ({}): check that the range is yours and that {tool} is setuid root (or has cap_set{}id)",
                    if tool == "newuidmap" { "uid" } else { "gid" },
                    String::from_utf8_lossy(&out.stderr).trim(),
                    if tool == "newuidmap" { "u" } else { "g" },
                )));
            }
        }
        Ok(true)
    }
}

/// A pipe (close-on-exec on both ends; the child gets dups).
fn pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors that we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    use std::os::fd::FromRawFd;
    // SAFETY: both descriptors are fresh and owned by nobody else.
    Ok(unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::fs::File::from_raw_fd(fds[1]),
        )
    })
}

/// Removes `dir` and everything in it, through the sandbox helper where
/// a rootless build left files of other ids there (overlay's `work/work`
/// is mode 0000 and owned by the namespace's root). Best effort.
pub fn remove_tree(dir: &Path) {
    if std::fs::remove_dir_all(dir).is_ok() || !dir.exists() {
        return;
    }
    crate::fsx::force_remove_tree(dir);
    if !dir.exists() {
        return;
    }
    if rootless() {
        let spec = Spec {
            rootless: true,
            action: Action::Remove {
                dir: dir.to_path_buf(),
            },
        };
        let parent = dir.parent().unwrap_or(Path::new("/tmp")).to_path_buf();
        let _ = run(&spec, &parent, |_| {});
    }
}

/// The descriptor the helper writes its control lines to (never the
/// command's output, so nothing a command prints is taken for one).
pub const CONTROL_FD: i32 = 3;
/// The longest output line shown whole; longer ones are clipped.
pub const MAX_LINE: usize = 8 * 1024;
/// How much of a step's output is shown (BuildKit's default step log
/// limit); the rest is counted and dropped.
pub const MAX_LOG: u64 = 2 * 1024 * 1024;

/// A command's output, split into bounded lines: at most [`MAX_LINE`]
/// bytes a line and [`MAX_LOG`] bytes shown, and the last
/// [`TAIL_LINES`] lines kept for an error; memory stays flat whatever
/// the command prints.
struct Lines {
    partial: Vec<u8>,
    /// Bytes of the current line beyond MAX_LINE.
    dropped: u64,
    shown: u64,
    hidden: u64,
    tail: std::collections::VecDeque<String>,
}

impl Lines {
    fn new() -> Lines {
        Lines {
            partial: Vec::new(),
            dropped: 0,
            shown: 0,
            hidden: 0,
            tail: Default::default(),
        }
    }

    fn push(&mut self, mut bytes: &[u8], output: &mut dyn FnMut(&str)) {
        while !bytes.is_empty() {
            let (chunk, end) = match bytes.iter().position(|&b| b == b'\n') {
                Some(i) => (&bytes[..i], Some(i + 1)),
                None => (bytes, None),
            };
            let room = MAX_LINE.saturating_sub(self.partial.len());
            let take = chunk.len().min(room);
            self.partial.extend_from_slice(&chunk[..take]);
            self.dropped += (chunk.len() - take) as u64;
            match end {
                Some(i) => {
                    self.line(output);
                    bytes = &bytes[i..];
                }
                None => break,
            }
        }
    }

    fn line(&mut self, output: &mut dyn FnMut(&str)) {
        let mut text = String::from_utf8_lossy(&self.partial)
            .trim_end_matches('\r')
            .to_string();
        if self.dropped > 0 {
            text.push_str(&format!(
                " [kiln: line clipped, {} more bytes]",
                self.dropped
            ));
        }
        // What is shown counts against the log cap; a clipped line's
        // dropped bytes are already said in it.
        let len = self.partial.len() as u64 + 1;
        self.partial.clear();
        self.dropped = 0;
        if self.shown + len <= MAX_LOG {
            self.shown += len;
            output(&text);
        } else {
            self.hidden += len;
        }
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(text);
    }

    fn finish(&mut self, output: &mut dyn FnMut(&str)) {
        if !self.partial.is_empty() || self.dropped > 0 {
            self.line(output);
        }
        if self.hidden > 0 {
            output(&format!(
                "[kiln: output clipped: the step printed {} more bytes after the first {} MiB; they are not shown]",
                self.hidden,
                MAX_LOG >> 20
            ));
        }
    }
}

/// Reads a command's output `out` into bounded [`Lines`] (each shown line
/// to `output`) and, where given, the helper's control channel `ctl`
/// (each line to `control`), until both end.
fn pump(
    out: &mut std::fs::File,
    mut ctl: Option<&mut std::fs::File>,
    output: &mut dyn FnMut(&str),
    mut control: impl FnMut(&str),
) -> Lines {
    use std::os::fd::AsRawFd;
    let mut lines = Lines::new();
    let mut pending = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let (mut out_open, mut ctl_open) = (true, ctl.is_some());
    while out_open || ctl_open {
        let mut fds = [
            libc::pollfd {
                fd: if out_open { out.as_raw_fd() } else { -1 },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: match &ctl {
                    Some(c) if ctl_open => c.as_raw_fd(),
                    _ => -1,
                },
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfd structs.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) } < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        if fds[0].revents != 0 {
            match out.read(&mut buf) {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => lines.push(&buf[..n], output),
            }
        }
        if fds[1].revents != 0 {
            let Some(c) = ctl.as_mut() else { continue };
            match c.read(&mut buf) {
                Ok(0) | Err(_) => ctl_open = false,
                Ok(n) => {
                    // Control lines are short; a helper that sends more
                    // than this is broken, and the rest is ignored.
                    if pending.len() < 64 * 1024 {
                        pending.extend_from_slice(&buf[..n]);
                    }
                }
            }
            while let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                control(&String::from_utf8_lossy(&line[..i]));
            }
        }
    }
    lines.finish(output);
    lines
}

/// Runs the helper for `spec`; `output` gets each line the command prints
/// (bounded: see [`Lines`]). Returns when the helper has finished (the
/// layer tar written, for a run).
pub fn run(spec: &Spec, spool: &Path, mut output: impl FnMut(&str)) -> Result<(), Error> {
    let _ = crate::fsx::create_private_dir(spool);
    let spec_file = tempfile::Builder::new()
        .prefix(".kiln-sandbox-")
        .tempfile_in(spool)
        .map_err(|e| {
            Error::Setup(format!(
                "writing the sandbox spec in {}: {e}",
                spool.display()
            ))
        })?;
    serde_json::to_writer(spec_file.as_file(), spec).expect("specs serialize");
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let spawn_err = |source| Error::Spawn {
        path: exe.clone(),
        source,
    };
    let (mut out_r, out_w) = pipe().map_err(spawn_err)?;
    let (mut ctl_r, ctl_w) = pipe().map_err(spawn_err)?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg(HELPER)
        .arg(spec_file.path())
        .stdin(Stdio::piped())
        .stdout(out_w.try_clone().map_err(spawn_err)?)
        .stderr(out_w);
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let ctl = ctl_w.as_raw_fd();
        // SAFETY: dup2 and close_range are async-signal-safe; the closure
        // touches no memory of the parent beyond the copied descriptor.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(ctl, CONTROL_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Nothing kiln's caller left open reaches the helper.
                libc::syscall(
                    libc::SYS_close_range,
                    (CONTROL_FD + 1) as libc::c_uint,
                    libc::c_uint::MAX,
                    0 as libc::c_uint,
                );
                Ok(())
            })
        };
    }
    let map = spec.rootless.then(UserMap::current);
    if let Some(w) = map.as_ref().and_then(UserMap::warning) {
        static WARNED: std::sync::Once = std::sync::Once::new();
        WARNED.call_once(|| eprintln!("{w}"));
    }
    let mut child = cmd.spawn().map_err(|source| Error::Spawn {
        path: exe.clone(),
        source,
    })?;
    drop(cmd);
    drop(ctl_w);
    let _interrupt = crate::interrupt::kill_on_interrupt(child.id());
    let mut stdin = child.stdin.take().expect("piped");
    let mut setup_error = None;
    let mut mapped = false;
    let mut ended: Option<(Option<i32>, Option<i32>)> = None;
    let lines = pump(&mut out_r, Some(&mut ctl_r), &mut output, |text| {
        if text == "userns" && !mapped {
            mapped = true;
            let answer = match &map {
                Some(m) => match m.apply(child.id()) {
                    Ok(true) => "mapped\n",
                    Ok(false) => "self\n",
                    Err(e) => {
                        setup_error = Some(e);
                        "abort\n"
                    }
                },
                None => "self\n",
            };
            let _ = stdin.write_all(answer.as_bytes());
            let _ = stdin.flush();
        } else if let Some(msg) = text.strip_prefix(ERROR_PREFIX) {
            setup_error.get_or_insert(Error::Setup(msg.to_string()));
        } else if let Some(st) = text.strip_prefix(STATUS_PREFIX) {
            let num = |k: &str| st.strip_prefix(k).and_then(|v| v.parse().ok());
            ended = Some((num("code="), num("signal=")));
        }
    });
    let status = child
        .wait()
        .map_err(|source| Error::Spawn { path: exe, source })?;
    if let Some(e) = setup_error {
        return Err(e);
    }
    if status.success() {
        return Ok(());
    }
    let (code, signal) = match ended {
        Some(e) => e,
        None => {
            return Err(Error::Setup(format!(
                "the sandbox helper ended ({status}) before the command did"
            )))
        }
    };
    Err(Error::Failed {
        code,
        signal,
        tail: lines.tail.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subordinate_ranges_are_found_by_name_or_uid() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("subuid");
        std::fs::write(&f, "alice:100000:65536\n1001:200000:1000\n").unwrap();
        let f = f.to_str().unwrap();
        assert_eq!(subid_range(f, "alice", 1000), Some((100000, 65536)));
        assert_eq!(subid_range(f, "bob", 1001), Some((200000, 1000)));
        assert_eq!(subid_range(f, "carol", 1002), None);
    }

    #[test]
    fn failures_name_the_code_or_signal_and_the_last_lines() {
        let e = Error::Failed {
            code: Some(3),
            signal: None,
            tail: vec!["a".into(), "b".into()],
        };
        assert_eq!(
            e.to_string(),
            "the command exited with code 3; its last lines:\n    a\n    b"
        );
        let e = Error::Failed {
            code: None,
            signal: Some(9),
            tail: vec![],
        };
        assert_eq!(
            e.to_string(),
            "the command was killed by signal 9 (it printed nothing)"
        );
    }
}
