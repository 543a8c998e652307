/* Escape attempts from inside a RUN step, one line each:
 *   "<name> refused <errno text>"  the sandbox stopped it
 *   "<name> ALLOWED"               it went through (the test fails)
 * Built static by tests/sandbox_attacks.rs and copied into the image.
 * argv[1], argv[2]: major and minor of a host block device to try. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <unistd.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <linux/bpf.h>

static void report(const char *name, long r) {
    if (r < 0)
        printf("%s refused %s\n", name, strerror(errno));
    else
        printf("%s ALLOWED\n", name);
}

/* Writing: refused unless the write itself went through. */
static void try_write(const char *name, const char *path, const char *text) {
    int fd = open(path, O_WRONLY);
    if (fd < 0) { report(name, -1); return; }
    long r = write(fd, text, strlen(text));
    close(fd);
    report(name, r < 0 ? -1 : 0);
}

/* Reading a masked path: refused unless it gave bytes. */
static void try_read(const char *name, const char *path) {
    char buf[256];
    int fd = open(path, O_RDONLY);
    if (fd < 0) { report(name, -1); return; }
    long r = read(fd, buf, sizeof buf);
    close(fd);
    if (r > 0) { printf("%s ALLOWED\n", name); return; }
    printf("%s refused empty\n", name);
}

/* Listing a masked directory: refused unless it holds entries. */
static void try_list(const char *name, const char *path) {
    DIR *d = opendir(path);
    if (!d) { report(name, -1); return; }
    struct dirent *e;
    int n = 0;
    while ((e = readdir(d)))
        if (strcmp(e->d_name, ".") && strcmp(e->d_name, "..")) n++;
    closedir(d);
    if (n > 0) { printf("%s ALLOWED\n", name); return; }
    printf("%s refused empty\n", name);
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IONBF, 0);
    unsigned maj = argc > 2 ? atoi(argv[1]) : 8, min = argc > 2 ? atoi(argv[2]) : 0;

    try_write("core_pattern", "/proc/sys/kernel/core_pattern", "|/tmp/x.sh");
    try_write("sysrq_trigger", "/proc/sysrq-trigger", "h");
    try_write("proc_irq", "/proc/irq/default_smp_affinity", "1");
    try_read("proc_keys", "/proc/keys");
    try_read("proc_timer_list", "/proc/timer_list");
    try_read("proc_kcore", "/proc/kcore");
    try_list("sys_firmware", "/sys/firmware");

    /* Descriptors: nothing above 2 but this listing's own. */
    {
        DIR *d = opendir("/proc/self/fd");
        int extra = 0, own = d ? dirfd(d) : -1;
        struct dirent *e;
        while (d && (e = readdir(d))) {
            int fd = atoi(e->d_name);
            if (e->d_name[0] != '.' && fd > 2 && fd != own) extra++;
        }
        if (d) closedir(d);
        if (extra) printf("inherited_fds ALLOWED\n");
        else printf("inherited_fds refused none\n");
    }

    /* A host block device through a node made here. */
    {
        unlink("/tmp/blk");
        if (mknod("/tmp/blk", S_IFBLK | 0600, makedev(maj, min)) < 0) {
            report("block_device", -1);
        } else {
            int fd = open("/tmp/blk", O_RDONLY);
            report("block_device", fd);
            if (fd >= 0) close(fd);
        }
        unlink("/dev/blk");
        if (mknod("/dev/blk", S_IFBLK | 0600, makedev(maj, min)) < 0) {
            report("block_device_dev", -1);
        } else {
            int fd = open("/dev/blk", O_RDONLY);
            report("block_device_dev", fd);
            if (fd >= 0) close(fd);
        }
    }

    mkdir("/tmp/m", 0755);
    report("mount_tmpfs", mount("none", "/tmp/m", "tmpfs", 0, NULL));
    report("mount_proc", mount("proc", "/tmp/m", "proc", 0, NULL));
    report("unshare_user", unshare(CLONE_NEWUSER));
    report("unshare_mount", unshare(CLONE_NEWNS));
    report("ptrace_pid1", ptrace(PTRACE_ATTACH, 1, 0, 0));
    report("kexec_load", syscall(SYS_kexec_load, 0, 0, NULL, 0));
    {
        union bpf_attr a;
        memset(&a, 0, sizeof a);
        a.map_type = BPF_MAP_TYPE_ARRAY;
        a.key_size = 4;
        a.value_size = 4;
        a.max_entries = 1;
        report("bpf", syscall(SYS_bpf, BPF_MAP_CREATE, &a, sizeof a));
    }
    report("keyctl", syscall(SYS_keyctl, 1 /* KEYCTL_JOIN_SESSION_KEYRING */, "kiln-attack"));
    report("add_key", syscall(SYS_add_key, "user", "kiln", "x", 1, -3 /* session */));
    report("init_module", syscall(SYS_init_module, "", 0, ""));
    report("finit_module", syscall(SYS_finit_module, 0, "", 0));
    report("delete_module", syscall(SYS_delete_module, "loop", 0));
    report("open_pid1_root", open("/proc/1/root/etc/hostname", O_RDONLY));
    report("open_pid1_fd", open("/proc/1/fd/3", O_WRONLY));
    /* runc's CVE-2019-5736: kiln's own binary through the setup process. */
    report("open_pid1_exe", open("/proc/1/exe", O_RDONLY));
    report("pivot_root", syscall(SYS_pivot_root, "/tmp", "/tmp/m"));
    report("chroot_escape_setns", syscall(SYS_setns, -1, 0));
    report("clone3", syscall(SYS_clone3, NULL, 0));
    report("reboot", syscall(SYS_reboot, 0xfee1dead, 0x28121969, 0x4321fedc, NULL));
    report("swapon", syscall(SYS_swapon, "/tmp/blk", 0));
    printf("umask %04o\n", umask(0));
    return 0;
}
