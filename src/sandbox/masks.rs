//! The mounts of a RUN's root that are not the image: `/proc` with runc's
//! masked and read-only paths (Docker's defaults), `/sys` read-only with
//! its masks, and binds whose mount flags only ever gain `nodev`,
//! `nosuid` and `ro` (flags the source's mount already has are kept, as a
//! user namespace demands).

use std::os::fd::AsRawFd;
use std::path::Path;

use rustix::fs::StatVfsMountFlags;
use rustix::mount::MountFlags;

/// Paths of the fresh `/proc` and `/sys` a command never sees (runc's and
/// Docker's default masked paths): a file gets `/dev/null` bound over it,
/// a directory an empty read-only tmpfs.
pub const MASKED: &[&str] = &[
    "proc/acpi",
    "proc/asound",
    "proc/interrupts",
    "proc/kcore",
    "proc/keys",
    "proc/latency_stats",
    "proc/sched_debug",
    "proc/scsi",
    "proc/timer_list",
    "proc/timer_stats",
    "sys/devices/virtual/powercap",
    "sys/firmware",
];

/// Paths of `/proc` a command may read but never write (Docker's default
/// read-only paths): writing `/proc/sys/kernel/core_pattern` as root would
/// otherwise run a program of the command's choosing as root on the host.
pub const READ_ONLY: &[&str] = &[
    "proc/bus",
    "proc/fs",
    "proc/irq",
    "proc/sys",
    "proc/sysrq-trigger",
];

/// The per-mount flags `target`'s mount has now.
fn current_flags(target: &Path) -> MountFlags {
    let Ok(st) = rustix::fs::statvfs(target) else {
        return MountFlags::empty();
    };
    let f = st.f_flag;
    let mut out = MountFlags::empty();
    for (have, flag) in [
        (StatVfsMountFlags::RDONLY, MountFlags::RDONLY),
        (StatVfsMountFlags::NOSUID, MountFlags::NOSUID),
        (StatVfsMountFlags::NODEV, MountFlags::NODEV),
        (StatVfsMountFlags::NOEXEC, MountFlags::NOEXEC),
        (StatVfsMountFlags::NOATIME, MountFlags::NOATIME),
        (StatVfsMountFlags::NODIRATIME, MountFlags::NODIRATIME),
        (StatVfsMountFlags::RELATIME, MountFlags::RELATIME),
    ] {
        if f.contains(have) {
            out |= flag;
        }
    }
    out
}

/// Adds `flags` to the bind mount at `target` (keeping what it has).
pub fn restrict(target: &Path, flags: MountFlags) -> Result<(), String> {
    let all = current_flags(target) | flags;
    rustix::mount::mount_remount(target, MountFlags::BIND | all, "")
        .map_err(|e| format!("restricting the mount at {}: {e}", target.display()))
}

/// Binds `src` at `target` (recursively), then adds `flags` to it.
pub fn bind(src: &Path, target: &Path, flags: MountFlags) -> Result<(), String> {
    rustix::mount::mount_bind_recursive(src, target)
        .map_err(|e| format!("binding {} at {}: {e}", src.display(), target.display()))?;
    if !flags.is_empty() {
        restrict(target, flags)?;
    }
    Ok(())
}

/// Binds what the descriptor `fd` (an `O_PATH` one kiln resolved with no
/// link followed) names at `target`: the kernel takes the object itself,
/// so nothing can swap a link in on the way.
pub fn bind_fd(fd: &impl AsRawFd, target: &Path, flags: MountFlags) -> Result<(), String> {
    let src = format!("/proc/self/fd/{}", fd.as_raw_fd());
    bind(Path::new(&src), target, flags)
}

/// Masks and write-protects the paths above under `root` (the new root
/// before `pivot_root`, with `proc` and maybe `sys` mounted in it).
pub fn apply(root: &Path) -> Result<(), String> {
    for rel in MASKED {
        let p = root.join(rel);
        let Ok(md) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        let r = if md.is_dir() {
            rustix::mount::mount(
                "tmpfs",
                &p,
                "tmpfs",
                MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
                c"size=0,mode=555",
            )
            .map_err(|e| format!("masking /{rel}: {e}"))
        } else {
            bind(
                Path::new("/dev/null"),
                &p,
                MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NOEXEC,
            )
            .map_err(|e| format!("masking /{rel}: {e}"))
        };
        r?;
    }
    for rel in READ_ONLY {
        let p = root.join(rel);
        if std::fs::symlink_metadata(&p).is_err() {
            continue;
        }
        bind(
            &p,
            &p,
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        )
        .map_err(|e| format!("making /{rel} read-only: {e}"))?;
    }
    Ok(())
}
