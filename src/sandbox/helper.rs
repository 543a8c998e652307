//! The helper process (`kiln __sandbox SPEC`): single-threaded, it enters
//! the namespaces and runs one [`Action`]. It speaks to kiln on a channel
//! of its own ([`CONTROL_FD`], which the command never holds): its own
//! failures are one `kiln-sandbox-error: …` line and exit code 125, a
//! command's end one `kiln-sandbox-status: …` line. The command's output
//! is only ever output.

use std::ffi::CString;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, MountPropagationFlags, UnmountFlags};
use rustix::thread::UnshareFlags;

use super::masks::{self, bind, bind_fd};
use super::{
    Action, Mount, Network, RunSpec, Spec, CONTROL_FD, ERROR_PREFIX, SETUP_FAILED, STATUS_PREFIX,
};

/// Writes one control line to kiln.
fn control(line: &str) {
    let line = format!("{line}\n");
    // SAFETY: writes our own buffer to the control descriptor.
    unsafe { libc::write(CONTROL_FD, line.as_ptr().cast(), line.len()) };
}

/// Sends the helper's error line and exits 125.
fn fail(msg: impl std::fmt::Display) -> ! {
    control(&format!("{ERROR_PREFIX}{msg}"));
    std::process::exit(SETUP_FAILED)
}

/// Closes every descriptor from `first` up.
pub(super) fn close_from(first: i32) {
    // SAFETY: close_range closes descriptors this process owns; nothing
    // here uses them afterwards.
    unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            0 as libc::c_uint,
        )
    };
}

fn read_sysctl(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Why `unshare(CLONE_NEWUSER)` failed, and what to do.
pub fn userns_error(e: rustix::io::Errno) -> String {
    if e == rustix::io::Errno::NOSPC
        || read_sysctl("/proc/sys/user/max_user_namespaces").as_deref() == Some("0")
    {
        return "user namespaces are disabled (user.max_user_namespaces is 0): RUN needs one to run as an unprivileged user; enable them (sysctl -w user.max_user_namespaces=15000) or build as root".into();
    }
    if e == rustix::io::Errno::PERM {
        if read_sysctl("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").as_deref()
            == Some("1")
        {
            return "AppArmor forbids unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1): allow kiln with an AppArmor profile (userns,), set the sysctl to 0, or build as root".into();
        }
        if read_sysctl("/proc/sys/kernel/unprivileged_userns_clone").as_deref() == Some("0") {
            return "unprivileged user namespaces are disabled (kernel.unprivileged_userns_clone=0): set it to 1, or build as root".into();
        }
        return "creating a user namespace was refused (EPERM): a seccomp profile (a container's default one, say) or a security module forbids unshare(CLONE_NEWUSER); run kiln's container with --security-opt seccomp=unconfined, or build as root".into();
    }
    format!("creating a user namespace failed: {e}")
}

/// Enters a new user namespace, mapped by the parent (or by itself, to
/// the user alone, where the parent says "self").
fn enter_userns() {
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    // SAFETY: the helper is single-threaded, so no other thread sees its
    // file descriptor table change.
    if let Err(e) = unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWUSER) } {
        fail(userns_error(e));
    }
    control("userns");
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    match answer.trim() {
        "mapped" => {}
        "self" => {
            let write = |file: &str, text: String| {
                if let Err(e) = std::fs::write(file, text) {
                    let why = if e.kind() == std::io::ErrorKind::PermissionDenied {
                        " (AppArmor's restrict_unprivileged_userns, or a security module, forbids it)"
                    } else {
                        ""
                    };
                    fail(format!("writing {file}: {e}{why}"));
                }
            };
            write("/proc/self/setgroups", "deny".into());
            write("/proc/self/uid_map", format!("0 {uid} 1"));
            write("/proc/self/gid_map", format!("0 {gid} 1"));
        }
        _ => std::process::exit(SETUP_FAILED),
    }
}

/// The helper's entry point; never returns.
pub fn helper_main(spec_path: &Path) -> ! {
    // Die with kiln.
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // Only stdin, stdout, stderr and the control channel: whatever kiln's
    // caller left open (a directory of the host, say) stays outside.
    close_from(CONTROL_FD + 1);
    let spec: Spec = match std::fs::read(spec_path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice(&b).map_err(|e| e.to_string()))
    {
        Ok(s) => s,
        Err(e) => fail(format!("reading {}: {e}", spec_path.display())),
    };
    if spec.rootless {
        enter_userns();
    }
    match spec.action {
        Action::Extract { tar, dir, diff_id } => {
            if let Err(e) = super::extract::extract(&tar, &dir, diff_id.as_ref(), spec.rootless) {
                fail(e);
            }
            std::process::exit(0)
        }
        Action::Remove { dir } => {
            crate::fsx::force_remove_tree(&dir);
            std::process::exit(0)
        }
        Action::Run(run) => run_command(&run, spec.rootless),
    }
}

fn run_command(spec: &RunSpec, rootless: bool) -> ! {
    // SAFETY: single-threaded (see enter_userns).
    if let Err(e) = unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWPID) } {
        fail(format!("creating a PID namespace: {e}"));
    }
    let created = spec.capture.with_extension("mountpoints");
    let _ = std::io::stdout().flush();
    // SAFETY: single-threaded, so the child may run arbitrary code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        fail(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        pid1(spec, rootless, &created);
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 {
        if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            fail("waiting for the sandbox");
        }
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        // PID 1 printed the status (or the setup error).
        let code = if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            1
        };
        std::process::exit(if code == SETUP_FAILED {
            SETUP_FAILED
        } else {
            1
        });
    }
    let mountpoints: Vec<String> = std::fs::read(&created)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    let before_file = spec.capture.with_extension("before");
    let written = match std::fs::read(&before_file) {
        // Without overlayfs: what changed since the snapshot.
        Ok(b) => serde_json::from_slice::<Vec<(Vec<u8>, super::snapshot::Snap)>>(&b)
            .map_err(std::io::Error::other)
            .and_then(|before| {
                let before: std::collections::BTreeMap<_, _> = before.into_iter().collect();
                let found =
                    super::snapshot::changes(&spec.upper, &before, &super::snapshot::nothing)?;
                super::capture::write(
                    &spec.upper,
                    found,
                    &mountpoints,
                    &super::capture::Below(&super::capture::Lower::dirs(&spec.lowers)),
                    &spec.capture,
                    spec.timestamp,
                    spec.reproducible,
                )
            }),
        Err(_) => super::capture::capture(
            &spec.upper,
            &spec.lowers,
            &mountpoints,
            &spec.capture,
            spec.timestamp,
            spec.reproducible,
        ),
    };
    if let Err(e) = written {
        fail(format!(
            "writing the step's layer {}: {e}",
            spec.capture.display()
        ));
    }
    std::process::exit(0)
}

/// Makes `rel` (components under `root`) a directory, creating what is
/// missing (recorded in `created`); a symlink on the way is an error.
fn ensure_dir(root: &Path, rel: &str, created: &mut Vec<String>) -> PathBuf {
    let mut p = root.to_path_buf();
    let mut r = String::new();
    for c in rel.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if c == ".." {
            fail(format!("mount target {rel} climbs out of the root"));
        }
        p.push(c);
        if !r.is_empty() {
            r.push('/');
        }
        r.push_str(c);
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => {}
            Ok(m) if m.file_type().is_symlink() => fail(format!(
                "/{r} is a symlink in the image; kiln does not mount over a path through one"
            )),
            Ok(_) => fail(format!("/{r} is not a directory in the image")),
            Err(_) => {
                if let Err(e) = std::fs::create_dir(&p) {
                    fail(format!("creating the mount point /{r}: {e}"));
                }
                created.push(r.clone());
            }
        }
    }
    p
}

/// Makes `rel` an (empty, if new) regular file to mount over.
fn ensure_file(root: &Path, rel: &str, created: &mut Vec<String>) -> Option<PathBuf> {
    let rel = rel.trim_start_matches('/');
    let (parent, name) = match rel.rsplit_once('/') {
        Some((p, n)) => (p, n),
        None => ("", rel),
    };
    let dir = ensure_dir(root, parent, created);
    let p = dir.join(name);
    match std::fs::symlink_metadata(&p) {
        Ok(m) if m.file_type().is_symlink() => None,
        Ok(m) if m.is_file() => Some(p),
        Ok(_) => None,
        Err(_) => {
            if let Err(e) = std::fs::File::create(&p) {
                fail(format!("creating the mount point /{rel}: {e}"));
            }
            created.push(rel.to_string());
            Some(p)
        }
    }
}

/// The flags a bind of kiln's own files or the build's inputs gets:
/// never a device or a setuid bit through it, and read-only if asked.
fn bind_flags(readonly: bool) -> MountFlags {
    let f = MountFlags::NOSUID | MountFlags::NODEV;
    if readonly {
        f | MountFlags::RDONLY
    } else {
        f
    }
}

/// An `O_PATH` descriptor of `rel` beneath `root` (root itself when
/// `rel` is empty), resolved with no link followed; `what` names the
/// mount in an error.
fn resolve(root: &Path, rel: &str, what: &str) -> (std::os::fd::OwnedFd, bool) {
    let rel =
        String::from_utf8_lossy(&crate::dockerfile::ignore::clean(rel.as_bytes())).into_owned();
    let r = if rel.is_empty() {
        rustix::fs::open(
            root,
            rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(std::io::Error::from)
        .and_then(|fd| {
            let st = rustix::fs::fstat(&fd)?;
            Ok((
                fd,
                rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory,
            ))
        })
    } else {
        crate::fsx::DirFd::open(root).and_then(|d| d.open_path(&rel))
    };
    r.unwrap_or_else(|e| fail(format!("{what}: {e}")))
}

/// Binds the object `fd` names at `target` inside `root`, making the
/// mount point as needed.
fn bind_at(
    root: &Path,
    fd: &std::os::fd::OwnedFd,
    is_dir: bool,
    target: &str,
    readonly: bool,
    created: &mut Vec<String>,
) {
    let t = if is_dir {
        Some(ensure_dir(root, target, created))
    } else {
        ensure_file(root, target, created)
    };
    let Some(t) = t else {
        fail(format!(
            "mount target {target} is a symlink or not a file in the image"
        ));
    };
    if let Err(e) = bind_fd(fd, &t, bind_flags(readonly)) {
        fail(e);
    }
}

/// Brings `lo` up in a fresh network namespace.
fn loopback_up() -> Result<(), String> {
    // SAFETY: a plain socket and two ioctls on a zeroed ifreq naming "lo".
    unsafe {
        let s = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if s < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
        let mut req: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo\0".iter().enumerate() {
            req.ifr_name[i] = *b as libc::c_char;
        }
        if libc::ioctl(s, libc::SIOCGIFFLAGS as _, &mut req) < 0 {
            libc::close(s);
            return Err(std::io::Error::last_os_error().to_string());
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        let r = libc::ioctl(s, libc::SIOCSIFFLAGS as _, &req);
        libc::close(s);
        if r < 0 {
            return Err(std::io::Error::last_os_error().to_string());
        }
    }
    Ok(())
}

/// PID 1 of the sandbox: sets the root up, runs the command, reports.
fn pid1(spec: &RunSpec, rootless: bool, created_file: &Path) -> ! {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let mut flags = UnshareFlags::NEWNS | UnshareFlags::NEWUTS | UnshareFlags::NEWIPC;
    if spec.network == Network::None {
        flags |= UnshareFlags::NEWNET;
    }
    // SAFETY: single-threaded.
    if let Err(e) = unsafe { rustix::thread::unshare_unsafe(flags) } {
        fail(format!("creating mount, UTS and IPC namespaces: {e}"));
    }
    if let Err(e) = rustix::mount::mount_change(
        "/",
        MountPropagationFlags::PRIVATE | MountPropagationFlags::REC,
    ) {
        fail(format!("making the mounts private: {e}"));
    }
    let root = &spec.merged;
    let lowers: Vec<String> = spec
        .lowers
        .iter()
        .map(|l| l.display().to_string())
        .collect();
    let mut data = format!(
        "lowerdir={},upperdir={},workdir={}",
        lowers.join(":"),
        spec.upper.display(),
        spec.work.display()
    );
    // Plain copy-up: no metadata-only copies, no directory redirects, so
    // the upper directory holds exactly what the layer needs.
    // (userxattr, for a rootless mount, implies both off already.)
    data.push_str(if rootless {
        ",userxattr"
    } else {
        ",metacopy=off,redirect_dir=off,index=off"
    });
    let cdata = CString::new(data).expect("paths have no NUL");
    let forced = std::env::var_os("KILN_NO_OVERLAY").is_some_and(|v| v == "1");
    let overlay = if forced {
        Err(rustix::io::Errno::NODEV)
    } else {
        // nodev: a device node the command makes is never a way to the
        // host's disks (Docker's device cgroup does this there).
        rustix::mount::mount(
            "overlay",
            root,
            "overlay",
            MountFlags::NODEV,
            cdata.as_c_str(),
        )
    };
    if let Err(e) = overlay {
        // No overlayfs here: one writable copy of the lowers, compared
        // with its snapshot afterwards (see snapshot.rs).
        let snap = (|| -> std::io::Result<()> {
            super::snapshot::copy_lowers(&spec.lowers, &spec.upper, &super::snapshot::nothing)?;
            let before = super::snapshot::scan(&spec.upper, &super::snapshot::nothing)?;
            std::fs::write(
                spec.capture.with_extension("before"),
                serde_json::to_vec(&before.iter().collect::<Vec<_>>())
                    .map_err(std::io::Error::other)?,
            )
        })();
        if let Err(s) = snap {
            fail(format!(
                "overlayfs cannot mount at {} ({e}) and copying the root filesystem failed too: {s}; RUN needs overlayfs (Linux 5.11 or later when not root) with its upper directory on a file system that supports it",
                root.display()
            ));
        }
        if let Err(b) = bind(&spec.upper, root, MountFlags::NODEV) {
            fail(format!(
                "overlayfs cannot mount at {} ({e}), and {b}",
                root.display()
            ));
        }
    }
    let mut created = Vec::new();
    // /proc: a fresh one. Where that is refused (a rootless build in a
    // container whose /proc has masked paths), the host's bound read-only;
    // as root, never: a fresh one must be had.
    let proc_ = ensure_dir(root, "proc", &mut created);
    if let Err(e) = rustix::mount::mount(
        "proc",
        &proc_,
        "proc",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        None,
    ) {
        if !rootless {
            fail(format!("mounting a fresh /proc: {e}"));
        }
        if let Err(e) = bind(
            Path::new("/proc"),
            &proc_,
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        ) {
            fail(e);
        }
    }
    // /sys read-only where it can be had; never the host's writable.
    let sys = ensure_dir(root, "sys", &mut created);
    let _ = rustix::mount::mount(
        "sysfs",
        &sys,
        "sysfs",
        MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        None,
    );
    if let Err(e) = masks::apply(root) {
        fail(e);
    }
    // /dev: a tmpfs with the usual devices bound from the host.
    let dev = ensure_dir(root, "dev", &mut created);
    // nodev: only the devices bound below open; a node the command makes
    // with mknod does not.
    if let Err(e) = rustix::mount::mount(
        "tmpfs",
        &dev,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC | MountFlags::STRICTATIME,
        c"mode=755,size=65536k",
    ) {
        fail(format!("mounting /dev: {e}"));
    }
    for d in ["null", "zero", "full", "random", "urandom", "tty"] {
        let target = dev.join(d);
        if std::fs::File::create(&target).is_ok() {
            if let Err(e) = bind(&Path::new("/dev").join(d), &target, MountFlags::NOSUID) {
                if d != "tty" {
                    fail(e);
                }
            }
        }
    }
    let pts = dev.join("pts");
    let _ = std::fs::create_dir(&pts);
    let _ = rustix::mount::mount(
        "devpts",
        &pts,
        "devpts",
        MountFlags::NOSUID | MountFlags::NOEXEC,
        c"newinstance,ptmxmode=0666,mode=0620",
    );
    let shm = dev.join("shm");
    let _ = std::fs::create_dir(&shm);
    let _ = rustix::mount::mount(
        "shm",
        &shm,
        "tmpfs",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        c"mode=1777,size=65536k",
    );
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let _ = std::os::unix::fs::symlink(target, dev.join(link));
    }
    for (name, src) in &spec.etc {
        if let Some(target) = ensure_file(root, &format!("etc/{name}"), &mut created) {
            if let Err(e) = bind(src, &target, bind_flags(false)) {
                fail(e);
            }
        }
    }
    for m in &spec.mounts {
        match m {
            Mount::Bind {
                root: from,
                rel,
                target,
                readonly,
            } => {
                let (fd, is_dir) = resolve(from, rel, &format!("--mount target={target}"));
                bind_at(root, &fd, is_dir, target, *readonly, &mut created);
            }
            Mount::Stack {
                lowers,
                source,
                target,
            } => {
                // A read-only overlay of the lowers (no upper), in this
                // private mount namespace, then the source inside it,
                // resolved beneath it with no link followed, bound.
                let at = spec
                    .capture
                    .with_extension(format!("stack-{}", created.len()));
                let _ = std::fs::create_dir_all(&at);
                let l: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
                let data = if l.len() == 1 {
                    None
                } else {
                    Some(CString::new(format!("lowerdir={}", l.join(":"))).expect("no NUL"))
                };
                let r = match &data {
                    Some(d) => rustix::mount::mount(
                        "overlay",
                        &at,
                        "overlay",
                        MountFlags::RDONLY | MountFlags::NODEV | MountFlags::NOSUID,
                        d.as_c_str(),
                    ),
                    None => rustix::mount::mount_bind_recursive(&lowers[0], &at),
                };
                if let Err(e) = r {
                    fail(format!("mounting the filesystem for {target}: {e}"));
                }
                let (fd, is_dir) = resolve(
                    &at,
                    source,
                    &format!("--mount target={target}: source {source}"),
                );
                bind_at(root, &fd, is_dir, target, true, &mut created);
            }
            Mount::Tmpfs { target } => {
                let t = ensure_dir(root, target, &mut created);
                if let Err(e) = rustix::mount::mount(
                    "tmpfs",
                    &t,
                    "tmpfs",
                    MountFlags::NOSUID | MountFlags::NODEV,
                    c"mode=1777",
                ) {
                    fail(format!("mounting a tmpfs at {target}: {e}"));
                }
            }
        }
    }
    let _ = rustix::system::sethostname(spec.hostname.as_bytes());
    if spec.network == Network::None {
        if let Err(e) = loopback_up() {
            fail(format!("bringing lo up: {e}"));
        }
    }
    if let Err(e) = std::fs::write(
        created_file,
        serde_json::to_vec(&created).expect("strings serialize"),
    ) {
        fail(format!("writing {}: {e}", created_file.display()));
    }
    // Into the new root; the old one is detached, leaving nothing behind.
    if let Err(e) = std::env::set_current_dir(root)
        .map_err(|e| e.to_string())
        .and_then(|_| rustix::process::pivot_root(".", ".").map_err(|e| e.to_string()))
        .and_then(|_| rustix::mount::unmount(".", UnmountFlags::DETACH).map_err(|e| e.to_string()))
        .and_then(|_| std::env::set_current_dir("/").map_err(|e| e.to_string()))
    {
        fail(format!("pivot_root into {}: {e}", root.display()));
    }
    let _ = std::io::stdout().flush();
    // The command cannot read this process's memory or descriptors
    // through /proc/1 (it holds the control channel and full privileges).
    // SAFETY: prctl with PR_SET_DUMPABLE takes 0 or 1.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
    // SAFETY: single-threaded.
    let child = unsafe { libc::fork() };
    if child < 0 {
        fail(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if child == 0 {
        super::exec::exec_command(spec, true);
    }
    // Reap every orphan until the command itself ends.
    loop {
        let mut status = 0;
        // SAFETY: waits for any child of PID 1.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            fail("waiting for the command");
        }
        if pid != child {
            continue;
        }
        if libc::WIFEXITED(status) {
            let code = libc::WEXITSTATUS(status);
            if code == 0 {
                std::process::exit(0);
            }
            control(&format!("{STATUS_PREFIX}code={code}"));
        } else if libc::WIFSIGNALED(status) {
            control(&format!("{STATUS_PREFIX}signal={}", libc::WTERMSIG(status)));
        }
        // Exiting PID 1 kills everything else in the namespace.
        std::process::exit(1);
    }
}
