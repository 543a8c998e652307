//! RUN as a security boundary, tried as an attacker would: a Dockerfile
//! from a pull request gets nothing of the machine beyond what `docker
//! build` gives it. Each test is the attack; each must fail inside the
//! sandbox, as root and rootless (a user with a subordinate id range), and
//! the host (a canary, core_pattern, the context, kiln's cache) is left
//! as it was.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A directory every user can reach (tests run as root; the rootless half
/// runs as `kilnrun`).
fn shared_tempdir(prefix: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    chmod(d.path(), 0o755);
    d
}

/// kiln copied where `kilnrun` may execute it.
fn user_kiln(d: &Path) -> PathBuf {
    let exe = d.join("kiln");
    fs::copy(env!("CARGO_BIN_EXE_kiln"), &exe).unwrap();
    chmod(&exe, 0o755);
    exe
}

fn root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Whether the rootless half can run here (it needs root to create its
/// user); with CI set it must.
fn rootless_possible() -> bool {
    if root() {
        require("newuidmap");
        return true;
    }
    assert!(std::env::var_os("CI").is_none(), "CI runs as root");
    eprintln!("not root: the rootless half needs root to create its user");
    false
}

/// The file `path` of the image's layers (the topmost that has it).
fn file_in(image: &Path, path: &str) -> Option<Vec<u8>> {
    layers(image)
        .into_iter()
        .rev()
        .find_map(|l| l.into_iter().find(|i| i.path == path).map(|i| i.data))
}

/// Major and minor of a block device of this machine.
fn host_block_device() -> (u32, u32) {
    fs::read_dir("/sys/dev/block")
        .ok()
        .and_then(|mut rd| rd.next())
        .and_then(|e| e.ok())
        .and_then(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            let (a, b) = n.split_once(':')?;
            Some((a.parse().ok()?, b.parse().ok()?))
        })
        .unwrap_or((7, 0))
}

const PROBES: &[&str] = &[
    "core_pattern",
    "sysrq_trigger",
    "proc_irq",
    "proc_keys",
    "proc_timer_list",
    "proc_kcore",
    "sys_firmware",
    "inherited_fds",
    "block_device",
    "block_device_dev",
    "mount_tmpfs",
    "mount_proc",
    "unshare_user",
    "unshare_mount",
    "ptrace_pid1",
    "kexec_load",
    "bpf",
    "keyctl",
    "add_key",
    "init_module",
    "finit_module",
    "delete_module",
    "open_pid1_root",
    "open_pid1_fd",
    "open_pid1_exe",
    "pivot_root",
    "chroot_escape_setns",
    "clone3",
    "reboot",
    "swapon",
];

fn check_report(report: &str, who: &str) {
    for p in PROBES {
        let line = report
            .lines()
            .find(|l| l.split(' ').next() == Some(*p))
            .unwrap_or_else(|| panic!("{who}: no line for {p} in:\n{report}"));
        assert!(
            line.starts_with(&format!("{p} refused")),
            "{who}: {line}\n{report}"
        );
    }
    assert!(!report.contains("ALLOWED"), "{who}:\n{report}");
    assert!(report.contains("umask 0022"), "{who}:\n{report}");
}

/// What the attacks must leave alone.
struct Host {
    core_pattern: String,
    etc: Vec<Vec<u8>>,
    canary: (PathBuf, Vec<u8>),
    context: Vec<(String, Vec<u8>)>,
}

impl Host {
    fn snapshot(canary: &Path, context: &Path) -> Host {
        Host {
            core_pattern: fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap(),
            etc: ["/etc/passwd", "/etc/shadow", "/etc/group", "/etc/hosts"]
                .iter()
                .map(|p| fs::read(p).unwrap_or_default())
                .collect(),
            canary: (canary.to_path_buf(), fs::read(canary).unwrap()),
            context: walkdir::WalkDir::new(context)
                .sort_by_file_name()
                .into_iter()
                .map(|e| e.unwrap())
                .filter(|e| e.file_type().is_file())
                .map(|e| (e.path().display().to_string(), fs::read(e.path()).unwrap()))
                .collect(),
        }
    }

    fn unchanged(&self, context: &Path) {
        let now = Host::snapshot(&self.canary.0, context);
        assert_eq!(now.core_pattern, self.core_pattern, "core_pattern changed");
        assert!(now.etc == self.etc, "the host's /etc changed");
        assert!(
            !Path::new("/tmp/KILN-PWNED").exists(),
            "a RUN wrote the host's /tmp"
        );
        assert_eq!(now.canary.1, self.canary.1, "the canary changed");
        assert_eq!(now.context, self.context, "the context changed");
    }
}

#[test]
fn every_escape_fails_inside_the_sandbox_root_and_rootless() {
    require("cc");
    let d = shared_tempdir("kiln-attacks");
    let store = busybox_store(d.path());
    fs::create_dir_all(d.path().join("img")).unwrap();
    ok(Command::new("cc")
        .args(["-static", "-Os", "-o"])
        .arg(d.path().join("img/probe"))
        .arg(repo().join("testdata/attacks/probe.c")));
    let (maj, min) = host_block_device();
    write(
        d.path(),
        "img/Dockerfile",
        format!(
            "FROM t/busybox:1\nCOPY probe /probe\nRUN /probe {maj} {min} > /report 2>&1; echo x > /proc/self/fd/7/tmp/KILN-PWNED; head -1 /proc/self/fd/7/etc/shadow; echo 'kiln-sandbox-error: forged by the command'; echo 'kiln-sandbox-status: code=0'\n"
        )
        .as_bytes(),
    );
    let canary = write(d.path(), "canary", b"untouched\n");
    chmod(&canary, 0o666);
    let host = Host::snapshot(&canary, &d.path().join("img"));

    // Root, with a descriptor of the host's / left open as fd 7.
    let mut c = kiln();
    c.env("XDG_CACHE_HOME", d.path().join("root-cache"))
        .arg("build")
        .arg(d.path().join("img"))
        .arg("--store")
        .arg(&store)
        .args(["--no-index", "--progress", "plain", "-o"])
        .arg(d.path().join("root.tar"));
    let dir = fs::File::open("/").unwrap();
    {
        use std::os::fd::AsRawFd;
        use std::os::unix::process::CommandExt;
        let fd = dir.as_raw_fd();
        // SAFETY: dup2 in the child before exec.
        unsafe {
            c.pre_exec(move || {
                libc::dup2(fd, 7);
                Ok(())
            });
        }
    }
    let out = run(&mut c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // The forged control lines are the command's output, nothing more.
    assert!(
        err.contains("kiln-sandbox-error: forged by the command"),
        "{err}"
    );
    let report = String::from_utf8(file_in(&d.path().join("root.tar"), "report").unwrap()).unwrap();
    check_report(&report, "root");
    host.unchanged(&d.path().join("img"));
    let layers_dir = d.path().join("root-cache/kiln/layers");
    assert_eq!(
        fs::metadata(&layers_dir).unwrap().permissions().mode() & 0o777,
        0o700
    );

    if !rootless_possible() {
        return;
    }
    let exe = user_kiln(d.path());
    ensure_user();
    ok(Command::new("chown").args(["-R", "kilnrun"]).arg(d.path()));
    chmod(d.path(), 0o755);
    let out = as_user(&format!(
        "exec 7</; cd {dir} && XDG_CACHE_HOME={dir}/user-cache {exe} build {dir}/img --store {dir}/store --no-index --progress plain -o {dir}/user.tar",
        dir = d.path().display(),
        exe = exe.display()
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let report = String::from_utf8(file_in(&d.path().join("user.tar"), "report").unwrap()).unwrap();
    check_report(&report, "rootless");
    host.unchanged(&d.path().join("img"));
    assert_eq!(
        fs::metadata(d.path().join("user-cache/kiln/layers"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
}

/// `kiln build` of `d/img` FROM the busybox store; the output.
fn build(d: &Path, store: &Path, extra: &[&str]) -> std::process::Output {
    run(kiln()
        .env("XDG_CACHE_HOME", d.join("cache"))
        .arg("build")
        .arg(d.join("img"))
        .arg("--store")
        .arg(store)
        .arg("-o")
        .arg(d.join("o.tar"))
        .args(extra))
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn mount_sources_never_follow_a_link_to_the_host() {
    let d = shared_tempdir("kiln-links");
    let store = busybox_store(d.path());
    // A link in the context.
    fs::create_dir_all(d.path().join("img")).unwrap();
    std::os::unix::fs::symlink("/etc", d.path().join("img/etclink")).unwrap();
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN --mount=type=bind,source=etclink,target=/m head -1 /m/shadow > /leak\n",
    );
    let o = build(d.path(), &store, &["--no-index"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("etclink") && err.contains("symbolic link") && err.contains("Dockerfile:2"),
        "{err}"
    );
    assert!(!d.path().join("o.tar").exists());
    fs::remove_file(d.path().join("img/etclink")).unwrap();
    // A link another stage made, and a source that climbs.
    // (Stage a is used only by the mount: it is built all the same.)
    let stage_link = b"FROM t/busybox:1 AS a\nRUN ln -s /etc /hostetc\nFROM t/busybox:1\nRUN --mount=type=bind,from=a,source=hostetc,target=/m head -1 /m/shadow > /leak\n";
    write(d.path(), "img/Dockerfile", stage_link);
    let o = build(d.path(), &store, &["--no-index"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("hostetc") && err.contains("symbolic link"),
        "{err}"
    );
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1 AS a\nRUN true\nFROM t/busybox:1\nRUN --mount=type=bind,from=a,source=../../../../etc,target=/m cat /m/passwd > /seen\n",
    );
    let o = build(d.path(), &store, &["--no-index"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        file_in(&d.path().join("o.tar"), "seen").unwrap(),
        b"root:x:0:0:root:/root:/bin/sh\n",
        "the stage's own /etc, never the host's"
    );
    if !rootless_possible() {
        return;
    }
    let exe = user_kiln(d.path());
    write(d.path(), "img/Dockerfile", stage_link);
    ensure_user();
    ok(Command::new("chown").args(["-R", "kilnrun"]).arg(d.path()));
    let out = as_user(&format!(
        "XDG_CACHE_HOME={dir}/user-cache {exe} build {dir}/img --store {dir}/store --no-index -o {dir}/user.tar",
        dir = d.path().display(),
        exe = exe.display()
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("hostetc") && err.contains("symbolic link"),
        "{err}"
    );
}

#[test]
fn a_step_gets_the_host_network_only_with_the_entitlement() {
    let d = shared_tempdir("kiln-net");
    let store = busybox_store(d.path());
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN --network=host cat /proc/net/dev > /devs\n",
    );
    let o = build(d.path(), &store, &["--no-index", "--network", "none"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--network none, which binds every step"),
        "{err}"
    );
    let o = build(
        d.path(),
        &store,
        &["--no-index", "--network", "none", "--allow", "network.host"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = build(d.path(), &store, &["--no-index"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("kiln build --allow network.host"), "{err}");
    let o = build(d.path(), &store, &["--no-index", "--allow", "network.host"]);
    assert!(o.status.success(), "{}", stderr(&o));
    // `default` is the build's mode: under --network none, only loopback.
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN --network=default cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ' > /devs\n",
    );
    let o = build(d.path(), &store, &["--no-index", "--network", "none"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(file_in(&d.path().join("o.tar"), "devs").unwrap(), b"lo\n");
}

/// The first path under `dir` named `name` (as root, the test sees all).
fn find_named(dir: &Path, name: &str) -> Option<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .find(|e| e.file_name() == name)
        .map(|e| e.path().to_path_buf())
}

#[test]
fn another_user_reaches_no_setuid_file_of_a_run_during_or_after_the_build() {
    if !root() {
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        return;
    }
    let d = shared_tempdir("kiln-suid");
    let store = busybox_store(d.path());
    // (And one in a cache mount, which outlives the build.)
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN --mount=type=cache,target=/c cp /bin/busybox /c/kiln-cached-suid && chmod 4755 /c/kiln-cached-suid && cp /bin/busybox /kiln-suid-probe && chmod 4755 /kiln-suid-probe && sleep 4\nRUN true\n",
    );
    let mut child = kiln()
        .env("XDG_CACHE_HOME", d.path().join("cache"))
        .arg("build")
        .arg(d.path().join("img"))
        .arg("--store")
        .arg(&store)
        .arg("-o")
        .arg(d.path().join("o.tar"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let found = loop {
        if let Some(p) = find_named(d.path(), "kiln-suid-probe") {
            break p;
        }
        assert!(start.elapsed().as_secs() < 60, "the RUN never ran");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let nobody = |what: &Path| {
        run(Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "stat"])
            .arg(what))
    };
    let o = nobody(&found);
    assert!(!o.status.success(), "nobody reached {}", found.display());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(child.wait().unwrap().success());
    // After it: the unpacked layers (a cache hit's or a base's) are private.
    let layers = d.path().join("cache/kiln/layers");
    assert_eq!(
        fs::metadata(&layers).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert!(!nobody(&layers.join(".")).status.success());
    let cached = find_named(&d.path().join("cache"), "kiln-cached-suid").unwrap();
    assert!(
        fs::metadata(&cached).unwrap().permissions().mode() & 0o4000 != 0,
        "the cache mount kept the setuid file (as BuildKit's does)"
    );
    assert!(
        !nobody(&cached).status.success(),
        "nobody reached {}",
        cached.display()
    );
}

/// The step cache entry (JSON) of the build's first RUN.
fn first_run_entry(cache: &Path) -> (PathBuf, serde_json::Value) {
    let dir = cache.join("kiln/steps");
    fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter_map(|p| {
            let v: serde_json::Value = serde_json::from_slice(&fs::read(&p).ok()?).ok()?;
            v["instruction"]
                .as_str()?
                .contains("echo mine")
                .then_some((p, v))
        })
        .next()
        .expect("a step cache entry for the first RUN")
}

#[test]
fn a_forged_step_cache_entry_is_a_miss_and_never_reaches_the_layer_cache() {
    let d = shared_tempdir("kiln-forged");
    let store = busybox_store(d.path());
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN echo mine > /mine\nRUN cat /mine > /copied\n",
    );
    let first = build(d.path(), &store, &["--json"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let first = json(&String::from_utf8_lossy(&first.stdout));
    let good = config(&d.path().join("o.tar")).rootfs.diff_ids;
    // The entry claims the base layer's diff_id for its own layer: a use
    // would unpack it into layers/<the base's diff_id>, poisoning every
    // later build FROM the base.
    let base_id = good[0].clone();
    let (path, mut entry) = first_run_entry(&d.path().join("cache"));
    entry["diff_id"] = serde_json::Value::String(base_id.to_string());
    fs::write(&path, serde_json::to_vec(&entry).unwrap()).unwrap();
    sandbox_remove(&d.path().join("cache/kiln/layers"));
    // One more step, so the index misses and the steps are looked up.
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN echo mine > /mine\nRUN cat /mine > /copied\nRUN true\n",
    );
    let second = build(d.path(), &store, &["--json"]);
    let err = stderr(&second);
    assert!(second.status.success(), "{err}");
    assert!(
        err.contains("warning: step cache entry")
            && err.contains("not the")
            && err.contains(base_id.as_str()),
        "{err}"
    );
    let second = json(&String::from_utf8_lossy(&second.stdout));
    assert_ne!(second["manifest_digest"], first["manifest_digest"]);
    assert_eq!(
        config(&d.path().join("o.tar")).rootfs.diff_ids[..good.len()],
        good[..],
        "the config names the layers' true diff_ids"
    );
    let poisoned = d
        .path()
        .join("cache/kiln/layers")
        .join(base_id.hex())
        .join("mine");
    assert!(
        !poisoned.exists(),
        "the forged layer reached the layer cache"
    );
    // An unreachable cache registry is a miss, never a failure.
    let o = build(
        d.path(),
        &store,
        &[
            "--cache-registry",
            "127.0.0.1:9/nothing",
            "--insecure",
            "--no-cache",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let o = build(
        d.path(),
        &store,
        &["--cache-registry", "127.0.0.1:9/nothing", "--insecure"],
    );
    // (Cached locally; the registry is asked only on a local miss.)
    assert!(o.status.success(), "{}", stderr(&o));
    fs::remove_dir_all(d.path().join("cache/kiln/steps")).unwrap();
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN echo mine > /mine\nRUN cat /mine > /copied\nRUN true 3\n",
    );
    let o = build(
        d.path(),
        &store,
        &["--cache-registry", "127.0.0.1:9/nothing", "--insecure"],
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("cache registry"), "{err}");
}

/// A step cache entry whose layer descriptor claims what `--reproducible`
/// did ("removed etc/shadow") never puts that claim into an image: not
/// in a build without the option, and not in one with it when the layer
/// does not bear the claim out. The step runs again.
#[test]
fn a_forged_reproducible_annotation_in_the_step_cache_never_reaches_an_image() {
    let d = shared_tempdir("kiln-forged-note");
    let store = busybox_store(d.path());
    let note = "dev.kiln.layer.reproducible";
    for (extra, dockerfile) in [
        (&[][..], "FROM t/busybox:1\nRUN echo mine > /mine\n"),
        (
            &["--reproducible"][..],
            "FROM t/busybox:1\nRUN echo mine > /mine\n",
        ),
    ] {
        write(d.path(), "img/Dockerfile", dockerfile.as_bytes());
        let first = build(d.path(), &store, extra);
        assert!(first.status.success(), "{}", stderr(&first));
        let (path, mut entry) = first_run_entry(&d.path().join("cache"));
        entry["layer"]["annotations"][note] =
            serde_json::Value::String("removed etc/shadow\nemptied mine".into());
        fs::write(&path, serde_json::to_vec(&entry).unwrap()).unwrap();
        // One more step, so the index misses and the steps are looked up.
        write(
            d.path(),
            "img/Dockerfile",
            format!("{dockerfile}RUN true\n").as_bytes(),
        );
        let second = build(d.path(), &store, extra);
        let err = stderr(&second);
        assert!(second.status.success(), "{err}");
        assert!(
            err.contains("warning: step cache entry") && err.contains("reproducible"),
            "{extra:?}: {err}"
        );
        let m = kiln::source::ImageFile::open(&d.path().join("o.tar"))
            .unwrap()
            .summary()
            .unwrap()
            .manifest;
        for l in &m.layers {
            assert!(!l.annotations.contains_key(note), "{extra:?}: {l:?}");
        }
        fs::remove_dir_all(d.path().join("cache/kiln/steps")).unwrap();
    }
}

fn sandbox_remove(p: &Path) {
    let _ = Command::new("rm").arg("-rf").arg(p).status();
}

fn secret_files(tmp: &Path) -> Vec<String> {
    fs::read_dir(tmp)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("secret"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn an_env_secret_lives_only_as_long_as_the_build() {
    let d = shared_tempdir("kiln-secret");
    let store = busybox_store(d.path());
    let tmp = d.path().join("tmp");
    fs::create_dir_all(&tmp).unwrap();
    let with_secret = |df: &[u8]| {
        write(d.path(), "img/Dockerfile", df);
        let mut c = kiln();
        c.env("XDG_CACHE_HOME", d.path().join("cache"))
            .env("TMPDIR", &tmp)
            .env("KILN_TEST_SECRET", "s3cr3t-value")
            .arg("build")
            .arg(d.path().join("img"))
            .arg("--store")
            .arg(&store)
            .args([
                "--no-index",
                "--secret",
                "id=tok,env=KILN_TEST_SECRET",
                "-o",
            ])
            .arg(d.path().join("o.tar"));
        c
    };
    // Success.
    let o = run(&mut with_secret(
        b"FROM t/busybox:1\nRUN --mount=type=secret,id=tok test \"$(cat /run/secrets/tok)\" = s3cr3t-value\n",
    ));
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(secret_files(&tmp), Vec::<String>::new());
    // Failure.
    let o = run(&mut with_secret(
        b"FROM t/busybox:1\nRUN --mount=type=secret,id=tok false\n",
    ));
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(secret_files(&tmp), Vec::<String>::new());
    // Interrupt, while the step runs.
    let mut child = with_secret(b"FROM t/busybox:1\nRUN --mount=type=secret,id=tok sleep 987655\n")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while !String::from_utf8_lossy(
        &Command::new("pgrep")
            .args(["-f", "sleep 987655"])
            .output()
            .unwrap()
            .stdout,
    )
    .contains(char::is_numeric)
    {
        assert!(start.elapsed().as_secs() < 60, "the RUN never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(
        secret_files(&tmp).len(),
        1,
        "the secret's file exists during the step"
    );
    // SAFETY: kill of our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGINT));
    assert_eq!(secret_files(&tmp), Vec::<String>::new());
    // Nor is the build's work directory left beside the output.
    let left: Vec<String> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".kiln-build"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn groups_are_what_docker_build_gives() {
    let d = shared_tempdir("kiln-groups");
    let store = busybox_store(d.path());
    // A base whose /etc/group has groups with empty member lists.
    write(
        d.path(),
        "base/group",
        b"root:x:0:\nshadow:x:42:\nusers:x:100:\nstaff:x:50:root\nnogroup:x:65534:\n",
    );
    write(
        d.path(),
        "base/Dockerfile",
        b"FROM t/busybox:1\nCOPY group /etc/group\nRUN echo secret > /etc/gsecret && chown root:shadow /etc/gsecret && chmod 0640 /etc/gsecret && mkdir -m 1777 /out\n",
    );
    ok(kiln()
        .env("XDG_CACHE_HOME", d.path().join("cache"))
        .arg("build")
        .arg(d.path().join("base"))
        .arg("--store")
        .arg(&store)
        .args([
            "--no-index",
            "--layer-compression",
            "gzip",
            "-t",
            "kilntest/groups-base:1",
            "-o",
        ])
        .arg(d.path().join("base.tar")));
    ok(kiln()
        .args(["store", "add"])
        .arg(d.path().join("base.tar"))
        .arg("--store")
        .arg(&store));
    let probe = b"FROM kilntest/groups-base:1\nRUN id > /out/root && grep Groups /proc/self/status >> /out/root\nUSER 4242\nRUN id > /out/4242 && grep Groups /proc/self/status >> /out/4242 && (cat /etc/gsecret 2>/dev/null || echo denied) >> /out/4242\n";
    write(d.path(), "img/Dockerfile", probe);
    let o = build(d.path(), &store, &["--no-index"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let kiln_root =
        String::from_utf8(file_in(&d.path().join("o.tar"), "out/root").unwrap()).unwrap();
    let kiln_4242 =
        String::from_utf8(file_in(&d.path().join("o.tar"), "out/4242").unwrap()).unwrap();
    assert!(kiln_4242.contains("denied"), "{kiln_4242}");
    assert!(!kiln_4242.contains("42(shadow)"), "{kiln_4242}");
    assert!(
        kiln_root.contains("50(staff)"),
        "a named membership counts: {kiln_root}"
    );
    if !docker_available() {
        return;
    }
    ok(Command::new("docker")
        .arg("load")
        .arg("-i")
        .arg(d.path().join("base.tar")));
    let tag = format!("kilntest/groups-probe:{}", std::process::id());
    ok(Command::new("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "-q", "-t", &tag])
        .arg(d.path().join("img")));
    let docker = |f: &str| ok(Command::new("docker").args(["run", "--rm", &tag, "cat", f]));
    assert_eq!(kiln_root, docker("/out/root"));
    assert_eq!(kiln_4242, docker("/out/4242"));
    let _ = Command::new("docker")
        .args(["rmi", "-f", &tag, "kilntest/groups-base:1"])
        .output();
}

/// Runs `cmd`, returning its output and kiln's own peak resident memory
/// (VmHWM, read until it exits) in KiB: the command's processes in the
/// sandbox are not kiln.
fn peak_rss(cmd: &mut Command) -> (std::process::Output, u64) {
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = format!("/proc/{}/status", child.id());
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watch = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(kib) = fs::read_to_string(&status).ok().and_then(|t| {
                    t.lines()
                        .find_map(|l| l.strip_prefix("VmHWM:"))
                        .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
                }) {
                    peak = peak.max(kib);
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            peak
        })
    };
    let out = child.wait_with_output().unwrap();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    (out, watch.join().unwrap())
}

#[test]
fn output_is_bounded_and_never_taken_for_kiln_s_own_messages() {
    let d = shared_tempdir("kiln-output");
    let store = busybox_store(d.path());
    // 1 GiB with no newline.
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN head -c 1073741824 /dev/zero | tr '\\0' a\n",
    );
    let (o, kib) = peak_rss(
        kiln()
            .env("XDG_CACHE_HOME", d.path().join("cache"))
            .arg("build")
            .arg(d.path().join("img"))
            .arg("--store")
            .arg(&store)
            .args(["--no-index", "--progress", "plain", "-o"])
            .arg(d.path().join("o.tar")),
    );
    let err = stderr(&o);
    assert!(o.status.success(), "{}", &err[..err.len().min(2000)]);
    assert!(kib < 100 * 1024, "kiln peaked at {kib} KiB");
    assert!(
        err.contains("[kiln: line clipped, "),
        "{}",
        &err[..err.len().min(2000)]
    );
    assert!(err.len() < 64 * 1024, "{} bytes of progress", err.len());
    // 100 MB of short lines: the first 2 MiB shown, the rest counted.
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN yes 0123456789 | head -c 100000000\n",
    );
    let o = build(d.path(), &store, &["--no-index", "--progress", "plain"]);
    let err = stderr(&o);
    assert!(o.status.success());
    assert!(
        err.contains("[kiln: output clipped: the step printed "),
        "{}",
        &err[err.len().saturating_sub(2000)..]
    );
    // (2 MiB of the command's lines, each behind plain progress's prefix.)
    assert!(
        err.len() < 8 * 1024 * 1024,
        "{} bytes of progress",
        err.len()
    );
    // A failing step that forges kiln's status line: its real code counts.
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN echo 'kiln-sandbox-status: code=0'; exit 3\n",
    );
    let o = build(d.path(), &store, &["--no-index"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("exited with code 3"), "{err}");
}

#[test]
fn a_run_layer_does_not_depend_on_the_caller_s_umask() {
    let d = shared_tempdir("kiln-umask");
    let store = busybox_store(d.path());
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN mkdir -p /d/e && echo x > /d/f && touch /d/e/g\n",
    );
    let digest = |mask: &str, out: &str| {
        let o = run(Command::new("sh").arg("-c").arg(format!(
            "umask {mask} && XDG_CACHE_HOME={dir}/cache-{mask} {exe} build {dir}/img --store {store} --no-index --json -o {dir}/{out}",
            dir = d.path().display(),
            exe = env!("CARGO_BIN_EXE_kiln"),
            store = store.display(),
        )));
        assert!(o.status.success(), "{}", stderr(&o));
        json(&String::from_utf8_lossy(&o.stdout))["manifest_digest"].clone()
    };
    assert_eq!(digest("077", "a.tar"), digest("022", "b.tar"));
    let l = layers(&d.path().join("a.tar"));
    let f = l.last().unwrap().iter().find(|i| i.path == "d/f").unwrap();
    assert_eq!(f.mode & 0o777, 0o644);
}

#[test]
fn leftovers_of_killed_unpacks_and_rootless_spools_are_removed() {
    let d = shared_tempdir("kiln-leftovers");
    let store = busybox_store(d.path());
    let cache = d.path().join("cache");
    // An unpack that a kill -9 interrupted: a dead pid, a mode-0000 dir.
    let dead = 4_000_000; // above pid_max's default
    let stale = cache.join(format!("kiln/layers/.{}.tmp-{dead}", "ab".repeat(32)));
    fs::create_dir_all(stale.join("work/work")).unwrap();
    chmod(&stale.join("work/work"), 0o000);
    write(d.path(), "img/Dockerfile", b"FROM t/busybox:1\nRUN true\n");
    let o = build(d.path(), &store, &["--no-index"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stale.exists(), "the next run removes a dead unpack");
    // kiln cache prune: unpacked layers and leftovers.
    fs::create_dir_all(stale.join("x")).unwrap();
    let layers_dir = cache.join("kiln/layers");
    let unpacked = || {
        fs::read_dir(&layers_dir)
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                let n = n.to_string_lossy();
                n.len() == 64
            })
            .count()
    };
    assert!(unpacked() > 0);
    let out =
        ok(kiln()
            .env("XDG_CACHE_HOME", &cache)
            .args(["cache", "prune", "--older-than", "0s"]));
    assert!(out.contains("unfinished unpack(s)"), "{out}");
    assert_eq!(unpacked(), 0, "{out}");
    assert!(!stale.exists());
    if !rootless_possible() {
        return;
    }
    // A rootless build killed with -9 mid-RUN leaves its spool (files of
    // the namespace's ids, overlay's mode-0000 work dir); the next run
    // of the same user removes it.
    let exe = user_kiln(d.path());
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN mkdir /owned && chown 1000:1000 /owned && touch /owned/f && chown 1000 /owned/f && sleep 987656\n",
    );
    ensure_user();
    ok(Command::new("chown").args(["-R", "kilnrun"]).arg(d.path()));
    let script = format!(
        "XDG_CACHE_HOME={dir}/user-cache {exe} build {dir}/img --store {dir}/store --no-index -o {dir}/out/u.tar & \
         while ! pgrep -f 'sleep 987656' >/dev/null; do sleep 0.1; done; kill -9 $!; sleep 0.5",
        dir = d.path().display(),
        exe = exe.display()
    );
    let o = as_user(&script);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let spools = || -> Vec<String> {
        fs::read_dir(d.path().join("out"))
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(".kiln-build"))
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(spools().len(), 1, "kill -9 leaves the spool");
    write(d.path(), "img/Dockerfile", b"FROM t/busybox:1\nRUN true\n");
    ok(Command::new("chown")
        .args(["-R", "kilnrun"])
        .arg(d.path().join("img")));
    let o = as_user(&format!(
        "XDG_CACHE_HOME={dir}/user-cache {exe} build {dir}/img --store {dir}/store --no-index -o {dir}/out/u.tar",
        dir = d.path().display(),
        exe = exe.display()
    ));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(spools(), Vec::<String>::new());
}

#[test]
fn a_base_layer_is_never_unpacked_under_a_diff_id_it_does_not_have() {
    let d = shared_tempdir("kiln-diffid");
    let store = busybox_store(d.path());
    write(d.path(), "img/Dockerfile", b"FROM t/busybox:1\nRUN true\n");
    let o = build(d.path(), &store, &["--no-index"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let busybox_id = config(&d.path().join("o.tar")).rootfs.diff_ids[0].clone();
    sandbox_remove(&d.path().join("cache/kiln/layers"));
    // An image whose config names busybox's diff_id for a layer of its own.
    let mut layer = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(5);
    h.set_mode(0o755);
    layer
        .append_data(&mut h, "bin/evil", &b"evil\n"[..])
        .unwrap();
    let layer = layer.into_inner().unwrap();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{busybox_id}"]}}}}"#
    );
    let (evil, _) = evil_store(d.path(), &layer, Some(config.as_bytes()));
    write(d.path(), "img/Dockerfile", b"FROM t/evil:1\nRUN true\n");
    let o = build(d.path(), &evil, &["--no-index"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("not the diff_id {busybox_id}")),
        "{err}"
    );
    let dir = d.path().join("cache/kiln/layers").join(busybox_id.hex());
    assert!(!dir.exists(), "the forged layer was unpacked as busybox's");
    // A later build FROM the real base runs on the real files.
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN ls /bin/evil 2>&1 > /seen || echo absent > /seen\n",
    );
    let o = build(d.path(), &store, &["--no-index"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(
        file_in(&d.path().join("o.tar"), "seen").unwrap(),
        b"absent\n"
    );
}
