//! The seccomp filter a RUN command runs under: the semantics of Docker's
//! default profile for a container without `CAP_SYS_ADMIN`,
//! `CAP_SYS_PTRACE`, `CAP_SYS_MODULE` and the other capabilities Docker
//! does not grant, written as a small classic-BPF program.
//!
//! Docker's profile is an allow-list whose default answer is `EPERM`; for
//! the default capability set it comes down to refusing the syscalls
//! below (kernel keyrings, modules, kexec, mounts, namespaces, ptrace and
//! cross-process memory, BPF, perf, userfaultfd, clocks, swap, reboot, …),
//! `clone` with a namespace flag, `personality` other than the harmless
//! values, `socket(AF_VSOCK)`, and `clone3` as `ENOSYS` (so libc falls
//! back to `clone`, whose flags can be checked). A syscall of another ABI
//! (x32, or i386 through `int 0x80`) is refused whole: kiln does not keep
//! a second table for them.
//!
//! Why not a crate: seccompiler's `apply_filter` sets `no_new_privs`, which
//! would break `su` and `sudo` in a RUN (Docker leaves setuid working), and
//! its rules cannot say "every x32 syscall"; libseccomp is a C library and
//! a link-time dependency for a filter of some fifty comparisons.

/// `BPF_LD | BPF_W | BPF_ABS`
const LD_ABS: u16 = 0x20;
/// `BPF_JMP | BPF_JEQ | BPF_K`
const JEQ: u16 = 0x15;
/// `BPF_JMP | BPF_JGE | BPF_K`
const JGE: u16 = 0x35;
/// `BPF_JMP | BPF_JSET | BPF_K`
const JSET: u16 = 0x45;
/// `BPF_RET | BPF_K`
const RET: u16 = 0x06;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_ERRNO: u32 = 0x0005_0000;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// Offsets in `struct seccomp_data`.
const NR: u32 = 0;
const ARCH: u32 = 4;
/// The low 32 bits of argument `i` (little-endian).
const fn arg_lo(i: u32) -> u32 {
    16 + 8 * i
}

/// The syscalls refused outright (EPERM).
fn denied() -> Vec<libc::c_long> {
    let mut v = vec![
        libc::SYS_acct,
        libc::SYS_add_key,
        libc::SYS_bpf,
        libc::SYS_clock_adjtime,
        libc::SYS_clock_settime,
        libc::SYS_delete_module,
        libc::SYS_finit_module,
        libc::SYS_fanotify_init,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fsopen,
        libc::SYS_fspick,
        libc::SYS_get_mempolicy,
        libc::SYS_init_module,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_io_uring_setup,
        libc::SYS_kcmp,
        libc::SYS_kexec_file_load,
        libc::SYS_kexec_load,
        libc::SYS_keyctl,
        libc::SYS_lookup_dcookie,
        libc::SYS_mbind,
        libc::SYS_migrate_pages,
        libc::SYS_mount,
        libc::SYS_mount_setattr,
        libc::SYS_move_mount,
        libc::SYS_move_pages,
        libc::SYS_name_to_handle_at,
        libc::SYS_nfsservctl,
        libc::SYS_open_by_handle_at,
        libc::SYS_open_tree,
        libc::SYS_perf_event_open,
        libc::SYS_pidfd_getfd,
        libc::SYS_pivot_root,
        libc::SYS_process_madvise,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_ptrace,
        libc::SYS_quotactl,
        libc::SYS_quotactl_fd,
        libc::SYS_reboot,
        libc::SYS_request_key,
        libc::SYS_set_mempolicy,
        libc::SYS_setdomainname,
        libc::SYS_sethostname,
        libc::SYS_setns,
        libc::SYS_settimeofday,
        libc::SYS_swapoff,
        libc::SYS_swapon,
        libc::SYS_syslog,
        libc::SYS_umount2,
        libc::SYS_unshare,
        libc::SYS_userfaultfd,
        libc::SYS_vhangup,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        174, // create_module (gone from the kernel, refused all the same)
        177, // get_kernel_syms
        libc::SYS_ioperm,
        libc::SYS_iopl,
        178, // query_module
        libc::SYS__sysctl,
        libc::SYS_sysfs,
        libc::SYS_uselib,
        libc::SYS_ustat,
    ]);
    v
}

/// Namespace flags `clone` may not carry.
const CLONE_NS: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u32;

/// `personality` values Docker lets through.
const PERSONALITIES: [u32; 4] = [0x0, 0x8, 0x20000, 0x20008];

/// `AF_VSOCK`: Docker refuses sockets of this family.
const AF_VSOCK: u32 = 40;

type Insn = libc::sock_filter;

fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

fn errno(e: i32) -> u32 {
    RET_ERRNO | (e as u32 & 0xffff)
}

/// The filter program.
pub fn program() -> Vec<Insn> {
    let mut p = vec![
        stmt(LD_ABS, ARCH),
        // Another ABI: refused.
        jump(JEQ, AUDIT_ARCH, 1, 0),
        stmt(RET, errno(libc::EPERM)),
        stmt(LD_ABS, NR),
    ];
    // x32 syscalls carry bit 30 in their number on x86_64.
    #[cfg(target_arch = "x86_64")]
    {
        p.push(jump(JGE, 0x4000_0000, 0, 1));
        p.push(stmt(RET, errno(libc::EPERM)));
    }
    for nr in denied() {
        p.push(jump(JEQ, nr as u32, 0, 1));
        p.push(stmt(RET, errno(libc::EPERM)));
    }
    p.push(jump(JEQ, libc::SYS_clone3 as u32, 0, 1));
    p.push(stmt(RET, errno(libc::ENOSYS)));
    // clone: the flags are its first argument on both architectures.
    p.push(jump(JEQ, libc::SYS_clone as u32, 0, 3));
    p.push(stmt(LD_ABS, arg_lo(0)));
    p.push(jump(JSET, CLONE_NS, 0, 1));
    p.push(stmt(RET, errno(libc::EPERM)));
    // (The accumulator holds either the number or clone's flags here:
    // reload the number.)
    p.push(stmt(LD_ABS, NR));
    let n = PERSONALITIES.len() as u8;
    p.push(jump(JEQ, libc::SYS_personality as u32, 0, n + 3));
    p.push(stmt(LD_ABS, arg_lo(0)));
    for (i, v) in PERSONALITIES.iter().enumerate() {
        // Matched: jump to the ALLOW after the EPERM.
        p.push(jump(JEQ, *v, n - i as u8, 0));
    }
    p.push(stmt(RET, errno(libc::EPERM)));
    p.push(stmt(RET, RET_ALLOW));
    p.push(jump(JEQ, libc::SYS_socket as u32, 0, 3));
    p.push(stmt(LD_ABS, arg_lo(0)));
    p.push(jump(JEQ, AF_VSOCK, 0, 1));
    p.push(stmt(RET, errno(libc::EPERM)));
    p.push(stmt(RET, RET_ALLOW));
    p
}

/// Installs the filter on this thread (and so on everything it executes).
/// Needs `CAP_SYS_ADMIN` in the current user namespace, since kiln does
/// not set `no_new_privs` (setuid programs keep working, as in Docker).
pub fn install() -> std::io::Result<()> {
    let prog = program();
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut Insn,
    };
    // SAFETY: a valid sock_fprog whose filter outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            1 as libc::c_ulong, // SECCOMP_SET_MODE_FILTER
            0 as libc::c_ulong,
            &fprog as *const libc::sock_fprog,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_jump_lands_inside_the_program() {
        let p = program();
        for (i, insn) in p.iter().enumerate() {
            if insn.code & 0x07 == 0x05 {
                assert!(i + 1 + (insn.jt as usize) < p.len(), "jt of {i}");
                assert!(i + 1 + (insn.jf as usize) < p.len(), "jf of {i}");
            }
        }
        assert_eq!(p.last().unwrap().code, RET);
        assert!(p.len() < 4096);
    }
}
