//! The command's own process, forked by the sandbox's PID 1 after the
//! root is set up: the seccomp filter, Docker's capabilities, the user and
//! its groups, umask 022, the working directory, no descriptor above 2,
//! then `execve`. Nothing here reports on the control channel: a failure
//! is a line on the command's stderr and exit code 127, which PID 1 reports.

use std::ffi::{CString, OsStr};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::RunSpec;

/// Docker's default capabilities, no more: no CAP_SYS_ADMIN (mounts),
/// CAP_SYS_MODULE, CAP_SYS_PTRACE, CAP_NET_ADMIN, ... for the command.
pub const CAPABILITIES: [u32; 14] = [
    0,  // CHOWN
    1,  // DAC_OVERRIDE
    3,  // FOWNER
    4,  // FSETID
    5,  // KILL
    6,  // SETGID
    7,  // SETUID
    8,  // SETPCAP
    10, // NET_BIND_SERVICE
    13, // NET_RAW
    18, // SYS_CHROOT
    27, // MKNOD
    29, // AUDIT_WRITE
    31, // SETFCAP
];

/// Sets the capability sets explicitly: the bounding set and the
/// permitted and effective sets to [`CAPABILITIES`], the inheritable and
/// ambient sets empty (as Docker since 23.0).
fn set_capabilities() -> Result<(), String> {
    for cap in 0..64u32 {
        if !CAPABILITIES.contains(&cap) {
            // SAFETY: PR_CAPBSET_DROP takes a capability number; unknown
            // ones fail harmlessly with EINVAL.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        }
    }
    let mask: u64 = CAPABILITIES.iter().fold(0, |m, c| m | 1 << c);
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    let header = Header {
        version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
        pid: 0,
    };
    let data = [
        Data {
            effective: mask as u32,
            permitted: mask as u32,
            inheritable: 0,
        },
        Data {
            effective: (mask >> 32) as u32,
            permitted: (mask >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: a version-3 header and two data structs, as capset wants.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(format!(
            "setting capabilities: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: prctl with PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    Ok(())
}

/// In the command's process: in kiln's sandbox the seccomp filter and
/// Docker's capabilities (in container mode the container's own profile
/// is the boundary), then its user and groups, umask 022, its directory,
/// no descriptor above 2, then exec (searching `PATH` from its
/// environment).
pub(super) fn exec_command(spec: &RunSpec, sandboxed: bool) -> ! {
    let die = |msg: String| -> ! {
        let _ = writeln!(std::io::stderr(), "kiln: {msg}");
        // SAFETY: _exit in a forked child.
        unsafe { libc::_exit(127) }
    };
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    // The filter first, while this process still has CAP_SYS_ADMIN (kiln
    // sets no no_new_privs: setuid programs work, as under Docker).
    if sandboxed {
        if let Err(e) = super::seccomp::install() {
            die(format!("installing the seccomp filter: {e}"));
        }
        if let Err(e) = set_capabilities() {
            die(e);
        }
    }
    // SAFETY: plain credential syscalls with valid arguments.
    unsafe {
        let groups: Vec<libc::gid_t> = spec.groups.clone();
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0 && !groups.is_empty() {
            die(format!(
                "setting supplementary groups {:?}: {}",
                spec.groups,
                std::io::Error::last_os_error()
            ));
        }
        if libc::setresgid(spec.gid, spec.gid, spec.gid) != 0 {
            die(format!(
                "switching to gid {}: {} (without a /etc/subgid range only gid 0 exists)",
                spec.gid,
                std::io::Error::last_os_error()
            ));
        }
        if libc::setresuid(spec.uid, spec.uid, spec.uid) != 0 {
            die(format!(
                "switching to uid {}: {} (without a /etc/subuid range only uid 0 exists)",
                spec.uid,
                std::io::Error::last_os_error()
            ));
        }
        // As Docker sets it: the layer never depends on kiln's caller.
        libc::umask(0o022);
    }
    // SAFETY: open/dup2 of /dev/null onto stdin in the forked child.
    unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        if fd >= 0 {
            libc::dup2(fd, 0);
            libc::close(fd);
        }
    }
    if let Err(e) = std::env::set_current_dir(&spec.cwd) {
        die(format!("entering the working directory {}: {e}", spec.cwd));
    }
    let cstr = |s: &str| CString::new(s).unwrap_or_else(|_| die(format!("{s:?} holds a NUL byte")));
    let argv: Vec<CString> = spec.argv.iter().map(|a| cstr(a)).collect();
    let envp: Vec<CString> = spec.env.iter().map(|a| cstr(a)).collect();
    let path = find_program(spec).unwrap_or_else(|e| die(e));
    let cpath = CString::new(OsStr::new(&path).as_bytes()).expect("no NUL");
    let mut a: Vec<*const libc::c_char> = argv.iter().map(|c| c.as_ptr()).collect();
    a.push(std::ptr::null());
    let mut e: Vec<*const libc::c_char> = envp.iter().map(|c| c.as_ptr()).collect();
    e.push(std::ptr::null());
    // Nothing but stdin, stdout and stderr: not the control channel, not
    // a descriptor kiln's caller left open.
    super::helper::close_from(3);
    // SAFETY: NUL-terminated arrays of valid C strings that outlive the call.
    unsafe { libc::execve(cpath.as_ptr(), a.as_ptr(), e.as_ptr()) };
    die(format!(
        "executing {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    ))
}

/// The program a command names: a path as it is, else the first
/// executable file of that name on the `PATH` of its environment.
pub(super) fn find_program(spec: &RunSpec) -> Result<PathBuf, String> {
    let Some(prog) = spec.argv.first() else {
        return Err("empty command".into());
    };
    if prog.contains('/') {
        return Ok(PathBuf::from(prog));
    }
    let search = spec
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(crate::assemble::DEFAULT_PATH);
    search
        .split(':')
        .map(|d| Path::new(d).join(prog))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| {
                use std::os::unix::fs::PermissionsExt;
                m.is_file() && m.permissions().mode() & 0o111 != 0
            })
        })
        .ok_or_else(|| format!("{prog}: not found in PATH ({search})"))
}
