//! RUN where kiln's sandbox cannot be made: as root inside an unprivileged
//! container (a Kubernetes pod, Taskcluster's docker-worker, `docker run`
//! with Docker's defaults), whose seccomp profile refuses `unshare` and
//! `mount`. kaniko's way: the container's own root filesystem becomes the
//! build root. Before a step, everything in `/` that is not kiln's (kiln's
//! binary, its cache and spool, the context, the stores, the output, and
//! every mount point of `/proc/self/mountinfo`, `/proc`, `/sys` and `/dev`
//! among them) is made to hold exactly the stage's layers; the command
//! runs directly; its changes are found by a snapshot of `/` before and
//! after (the same comparison as the sandbox's fallback without overlayfs)
//! and written with the same layer writer, so a deterministic step gives
//! the same layer bytes in both modes.
//!
//! The container is the boundary here: kiln adds no namespace, seccomp
//! filter or capability change of its own. kiln never does this outside a
//! container, where it would replace the host's root.

use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::{snapshot, Error, RunSpec};

/// How RUN is isolated (`kiln build --isolation`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Isolation {
    /// kiln's sandbox where it can be made, else container mode where kiln
    /// runs as root inside a container.
    #[default]
    Auto,
    /// kiln's namespace sandbox (fails where it cannot be made).
    Sandbox,
    /// The container's own root (only inside a container, as root).
    Container,
}

impl Isolation {
    pub fn parse(s: &str) -> Option<Isolation> {
        match s {
            "auto" => Some(Isolation::Auto),
            "sandbox" => Some(Isolation::Sandbox),
            "container" => Some(Isolation::Container),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isolation::Auto => "auto",
            Isolation::Sandbox => "sandbox",
            Isolation::Container => "container",
        }
    }
}

/// Whether kiln runs inside a container: Docker's `/.dockerenv`, podman's
/// `/run/.containerenv`, a Kubernetes pod's service variables, the
/// `container` variable systemd and others set, or a container runtime's
/// name in `/proc/1/cgroup`.
pub fn in_container() -> bool {
    Path::new("/.dockerenv").exists()
        || Path::new("/run/.containerenv").exists()
        || std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
        || std::env::var_os("container").is_some_and(|v| !v.is_empty())
        || std::fs::read_to_string("/proc/1/cgroup").is_ok_and(|t| {
            ["docker", "kubepods", "containerd", "libpod"]
                .iter()
                .any(|w| t.contains(w))
        })
}

/// Why the sandbox cannot be made here, if it cannot: a child tries the
/// namespaces and the mount a root RUN needs.
pub fn namespaces_refused() -> Option<String> {
    // SAFETY: the child only makes raw syscalls and _exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return None;
    }
    if pid == 0 {
        // SAFETY: raw syscalls in the forked child.
        unsafe {
            let flags =
                libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
            if libc::unshare(flags) != 0 {
                libc::_exit(1);
            }
            if libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                libc::_exit(2);
            }
            libc::_exit(0)
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    match libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)) {
        Some(0) => None,
        Some(1) => {
            Some("creating namespaces is refused (a seccomp profile, or no CAP_SYS_ADMIN)".into())
        }
        Some(2) => Some("mounting is refused (no CAP_SYS_ADMIN, or AppArmor)".into()),
        _ => Some("the namespace probe failed".into()),
    }
}

static ACTIVE: AtomicBool = AtomicBool::new(false);

/// Whether this process runs RUN in container mode (layers are then
/// unpacked in-process: after the root is replaced, kiln's own binary may
/// not start again).
pub fn active() -> bool {
    ACTIVE.load(Ordering::Relaxed)
}

/// The mode RUN takes for `requested` and why, decided once a process;
/// the third field is true the first time (when it is worth saying).
pub fn choose(requested: Isolation) -> Result<(Isolation, String, bool), String> {
    static CHOSEN: Mutex<Option<(Isolation, Isolation, String)>> = Mutex::new(None);
    let mut chosen = CHOSEN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((req, mode, why)) = chosen.as_ref() {
        if *req == requested {
            return Ok((*mode, why.clone(), false));
        }
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let probe = || {
        (root && !super::rootless())
            .then(namespaces_refused)
            .flatten()
    };
    let (mode, why) = decide(requested, in_container(), root, probe)?;
    ACTIVE.store(mode == Isolation::Container, Ordering::Relaxed);
    *chosen = Some((requested, mode, why.clone()));
    Ok((mode, why, true))
}

/// The decision behind [`choose`]: `refused` probes whether (and why) the
/// namespace sandbox cannot be made.
fn decide(
    requested: Isolation,
    in_container: bool,
    root: bool,
    refused: impl FnOnce() -> Option<String>,
) -> Result<(Isolation, String), String> {
    Ok(match requested {
        Isolation::Sandbox => (Isolation::Sandbox, "asked for with --isolation sandbox".to_string()),
        Isolation::Container => {
            if !in_container {
                return Err("--isolation container runs RUN in the root filesystem kiln runs in, which it replaces: kiln does that only inside a container (no /.dockerenv, /run/.containerenv, Kubernetes or container variable here); use --isolation sandbox or auto".into());
            }
            if !root {
                return Err("--isolation container needs root inside the container (it writes the whole root filesystem); run the container as root, or use kiln's sandbox".into());
            }
            (Isolation::Container, "asked for with --isolation container".to_string())
        }
        Isolation::Auto => match refused() {
            Some(why) if in_container && root => (
                Isolation::Container,
                format!("kiln's sandbox cannot start here: {why}, and kiln runs as root inside a container"),
            ),
            _ => (Isolation::Sandbox, "namespaces can be created here".to_string()),
        },
    })
}

/// The paths of `/` that are kiln's or the container's, never the image's:
/// left alone when the root is cleared, when layers are applied and when
/// a step's changes are found. Archive paths (no leading `/`), sorted.
#[derive(Clone, Debug, Default)]
pub struct Keep {
    paths: Vec<Vec<u8>>,
}

impl Keep {
    /// Every mount point but `/`, and `extra` (kiln's binary, cache,
    /// spool, context, stores, output).
    pub fn new(extra: &[PathBuf]) -> Keep {
        let mut paths: Vec<Vec<u8>> = Vec::new();
        let mut add = |p: &Path| {
            let p = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
            let rel = crate::dockerfile::ignore::clean(p.as_os_str().as_bytes());
            if !rel.is_empty() {
                paths.push(rel);
            }
        };
        for mp in mount_points() {
            add(&mp);
        }
        for p in extra {
            add(p);
            // The real place too, where a link leads there.
            if let Ok(c) = std::fs::canonicalize(p) {
                add(&c);
            }
        }
        for p in ["proc", "sys", "dev"] {
            add(Path::new("/").join(p).as_path());
        }
        paths.sort();
        paths.dedup();
        Keep { paths }
    }

    /// Whether `rel` is kept (it or a parent is one of the paths).
    pub fn skip(&self, rel: &[u8]) -> bool {
        self.paths.iter().any(|p| {
            rel == &p[..] || (rel.len() > p.len() && rel.starts_with(p) && rel[p.len()] == b'/')
        })
    }

    /// Whether a kept path lies beneath `rel`.
    fn holds(&self, rel: &[u8]) -> bool {
        self.paths
            .iter()
            .any(|p| p.len() > rel.len() && p.starts_with(rel) && p[rel.len()] == b'/')
    }
}

/// The mount points of this process's mount namespace.
fn mount_points() -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|p| p != Path::new("/"))
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// The layers `/` holds now, bottom first (lower directories, or a RUN's
/// layer tar for a step run here).
static APPLIED: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Removes everything under `/` that is not kept.
fn clear_root(keep: &Keep) -> io::Result<()> {
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for e in std::fs::read_dir(Path::new("/").join(&rel))? {
            let r = rel.join(e?.file_name());
            let b = r.as_os_str().as_bytes();
            if keep.skip(b) {
                continue;
            }
            let p = Path::new("/").join(&r);
            if keep.holds(b) {
                if std::fs::symlink_metadata(&p)?.is_dir() {
                    stack.push(r);
                }
                continue;
            }
            crate::fsx::force_remove_tree(&p);
        }
    }
    Ok(())
}

/// Makes `/` hold exactly `lowers` (topmost first, as overlay takes
/// them): the layers it holds already are kept when they are the bottom
/// of the stack, else the root is cleared first. A lower that is a file is
/// a RUN's layer tar, unpacked beside it first.
pub fn prepare(lowers: &[PathBuf], keep: &Keep) -> Result<(), String> {
    let want: Vec<PathBuf> = lowers.iter().rev().cloned().collect();
    let mut applied = APPLIED.lock().unwrap_or_else(|p| p.into_inner());
    let same = applied
        .iter()
        .zip(&want)
        .take_while(|(a, b)| a == b)
        .count();
    if same < applied.len() {
        clear_root(keep).map_err(|e| format!("clearing the container's root filesystem: {e}"))?;
        applied.clear();
    }
    for lower in &want[applied.len()..] {
        let dir = if lower.is_file() {
            let dir = lower.with_extension("dir");
            if !dir.is_dir() {
                super::extract::extract(lower, &dir, None, true)?;
            }
            dir
        } else {
            lower.clone()
        };
        snapshot::copy_lowers(std::slice::from_ref(&dir), Path::new("/"), &|r| {
            keep.skip(r)
        })
        .map_err(|e| {
            format!(
                "writing the layer {} into the container's root filesystem: {e}",
                dir.display()
            )
        })?;
        applied.push(lower.clone());
    }
    Ok(())
}

/// Runs `spec`'s command in `/` (prepared with [`prepare`]) and writes
/// its changes as the layer tar `spec.capture`; `output` gets each line.
pub fn run(spec: &RunSpec, keep: &Keep, output: &mut dyn FnMut(&str)) -> Result<(), Error> {
    let root = Path::new("/");
    let skip = |r: &[u8]| keep.skip(r);
    let before = snapshot::scan(root, &skip)
        .map_err(|e| Error::Setup(format!("snapshotting the container's root filesystem: {e}")))?;
    let prog = super::exec::find_program(spec).map_err(|e| Error::Failed {
        code: Some(127),
        signal: None,
        tail: vec![format!("kiln: {e}")],
    })?;
    let (mut out_r, out_w) = super::pipe().map_err(|e| Error::Setup(format!("a pipe: {e}")))?;
    let mut cmd = Command::new(&prog);
    cmd.arg0(&spec.argv[0])
        .args(&spec.argv[1..])
        .env_clear()
        .envs(spec.env.iter().filter_map(|e| e.split_once('=')))
        .current_dir(&spec.cwd)
        .stdin(Stdio::null())
        .stdout(out_w.try_clone().map_err(|e| Error::Setup(e.to_string()))?)
        .stderr(out_w);
    let (uid, gid, groups) = (spec.uid, spec.gid, spec.groups.clone());
    // SAFETY: only raw, async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // A session of its own: what it leaves running is killed after.
            libc::setsid();
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0 && !groups.is_empty() {
                return Err(io::Error::last_os_error());
            }
            if libc::setresgid(gid, gid, gid) != 0 || libc::setresuid(uid, uid, uid) != 0 {
                return Err(io::Error::last_os_error());
            }
            libc::umask(0o022);
            libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                libc::c_uint::MAX,
                0 as libc::c_uint,
            );
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| Error::Failed {
        code: Some(127),
        signal: None,
        tail: vec![format!(
            "kiln: executing {} (in {}, as {uid}:{gid}): {e}",
            prog.display(),
            spec.cwd
        )],
    })?;
    drop(cmd);
    let _interrupt = crate::interrupt::kill_on_interrupt(child.id());
    let lines = super::pump(&mut out_r, None, output, |_| {});
    let status = child
        .wait()
        .map_err(|e| Error::Setup(format!("waiting for the command: {e}")))?;
    // SAFETY: kills the command's session (its pid is the session's id).
    unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
    {
        use std::os::unix::process::ExitStatusExt;
        if !status.success() {
            return Err(Error::Failed {
                code: status.code(),
                signal: status.signal(),
                tail: lines.tail.into_iter().collect(),
            });
        }
    }
    let found = snapshot::changes(root, &before, &skip)
        .map_err(|e| Error::Setup(format!("comparing the container's root filesystem: {e}")))?;
    // The lowers as they are: directories, or a RUN's tar applied in
    // place (read by its index), to leave out what a step left unchanged.
    let lowers: Vec<super::capture::Lower> = spec
        .lowers
        .iter()
        .map(|l| {
            let d = l.with_extension("dir");
            if !l.is_file() {
                Ok(super::capture::Lower::Dir(l.clone()))
            } else if d.is_dir() {
                Ok(super::capture::Lower::Dir(d))
            } else {
                super::capture::TarLower::open(l).map(super::capture::Lower::Tar)
            }
        })
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Setup(format!("reading an earlier step's layer: {e}")))?;
    let below = super::capture::Below(&lowers);
    super::capture::write(
        root,
        found,
        &[],
        &below,
        &spec.capture,
        spec.timestamp,
        spec.reproducible,
    )
    .map_err(|e| {
        Error::Setup(format!(
            "writing the step's layer {}: {e}",
            spec.capture.display()
        ))
    })?;
    // --reproducible: the root holds what the layer does (a removed
    // cache gone, an emptied log empty), as the sandbox's next step sees.
    // Reached beneath `/` with no link followed: what a step left behind
    // cannot turn the edit onto another file.
    if let Ok(done) = std::fs::read_to_string(spec.capture.with_extension("normalized")) {
        let top = crate::fsx::DirFd::open(root)
            .map_err(|e| Error::Setup(format!("opening the root filesystem: {e}")))?;
        for line in done.lines() {
            if let Some(p) = line.strip_prefix("removed ") {
                let p = Path::new(p);
                if let (Some(parent), Some(name)) = (p.parent(), p.file_name()) {
                    let _ = top.dir(parent).and_then(|d| d.remove(name));
                }
            } else if let Some(p) = line.strip_prefix("emptied ") {
                let _ = top.open_rw(p).and_then(|f| f.set_len(0));
            }
        }
    }
    APPLIED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(spec.capture.clone());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_paths_cover_their_trees_and_name_their_parents() {
        let keep = Keep {
            paths: vec![b"kiln".to_vec(), b"usr/local/bin/kiln".to_vec()],
        };
        assert!(keep.skip(b"kiln"));
        assert!(keep.skip(b"kiln/cache/x"));
        assert!(!keep.skip(b"kilnx"));
        assert!(!keep.skip(b"usr/local/bin"));
        assert!(keep.holds(b"usr/local/bin"));
        assert!(keep.holds(b"usr"));
        assert!(!keep.holds(b"us"));
        assert!(!keep.holds(b"etc"));
    }

    #[test]
    fn container_mode_is_never_chosen_outside_a_container_or_as_a_user() {
        let refused = || Some("creating namespaces is refused".to_string());
        let err = decide(Isolation::Container, false, true, refused).unwrap_err();
        assert!(err.contains("only inside a container"), "{err}");
        let err = decide(Isolation::Container, true, false, refused).unwrap_err();
        assert!(err.contains("needs root"), "{err}");
        // auto: outside a container, or not root, the sandbox (and its error).
        assert_eq!(
            decide(Isolation::Auto, false, true, refused).unwrap().0,
            Isolation::Sandbox
        );
        assert_eq!(
            decide(Isolation::Auto, true, false, refused).unwrap().0,
            Isolation::Sandbox
        );
        assert_eq!(
            decide(Isolation::Auto, true, true, || None).unwrap().0,
            Isolation::Sandbox
        );
        let (mode, why) = decide(Isolation::Auto, true, true, refused).unwrap();
        assert_eq!(mode, Isolation::Container);
        assert!(why.contains("creating namespaces is refused"), "{why}");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/a\\040b"), PathBuf::from("/a b"));
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
    }
}
