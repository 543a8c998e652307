//! RUN in kiln's own sandbox, on a busybox base made from Debian's
//! busybox-static (applets as relative symlinks), imported into a store:
//! files, whiteouts, opaque directories, users and owners; ENV, ARG, USER,
//! WORKDIR and SHELL; exec form and heredocs; failures; --network none;
//! cache and secret mounts; COPY --from of RUN-made files; the same
//! digest twice, with -j 1 and 2, as root and rootless; docker run.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

/// A kiln build of `dir/img` FROM the busybox store, sharing `cache`.
fn run_build(dir: &Path, store: &Path, cache: &Path, out: &str, extra: &[&str]) -> Command {
    let mut c = kiln();
    c.env("XDG_CACHE_HOME", cache)
        .arg("build")
        .arg(dir.join("img"))
        .arg("--store")
        .arg(store)
        .arg("-o")
        .arg(dir.join(out))
        .args(extra);
    c
}

fn find<'a>(layer: &'a [Item], path: &str) -> Option<&'a Item> {
    layer.iter().find(|i| i.path == path)
}

fn paths(layer: &[Item]) -> Vec<String> {
    layer.iter().map(|i| i.path.clone()).collect()
}

const IMAGE: &str = r#"FROM t/busybox:1
ARG GREETING=hello
ENV FOO=bar
RUN echo "$GREETING $FOO" > /greeting && rm /etc/base-file && rm -rf /opt/olddir && mkdir /opt/olddir && echo new > /opt/olddir/b
RUN echo 'worker:x:1234:1234::/home/worker:/bin/sh' >> /etc/passwd && echo 'worker:x:1234:' >> /etc/group && mkdir -p /home/worker/data && chown worker:worker /home/worker /home/worker/data && touch /home/worker/data/f && chown 1234:1234 /home/worker/data/f
USER worker
WORKDIR /home/worker/w
RUN id > id.txt && pwd >> id.txt && echo "$HOME $GREETING $SOURCE_DATE_EPOCH" >> id.txt
USER root
SHELL ["/bin/sh", "-e", "-c"]
RUN ["/bin/sh", "-c", "echo exec-form > /exec"]
RUN <<EOF
echo heredoc > /heredoc
echo "second line" >> /heredoc
EOF
RUN <<EOT cat > /catted
catted $FOO
EOT
RUN <<'EOT' sh
echo 'not expanded: $FOO' > /quoted
EOT
"#;

#[test]
fn run_steps_become_layers_with_whiteouts_opaque_dirs_owners_and_the_stage_state() {
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    let cache = d.path().join("cache");
    write(d.path(), "img/Dockerfile", IMAGE.as_bytes());
    let a = json(&ok(&mut run_build(
        d.path(),
        &store,
        &cache,
        "a.tar",
        &["--no-index", "--json"],
    )));
    let l = layers(&d.path().join("a.tar"));
    // Base, four RUN layers, WORKDIR, and three more RUNs.
    let first = &l[1];
    assert_eq!(find(first, "greeting").unwrap().data, b"hello bar\n");
    assert!(
        find(first, "etc/.wh.base-file").is_some(),
        "{:?}",
        paths(first)
    );
    assert!(
        find(first, "opt/olddir/.wh..wh..opq").is_some(),
        "{:?}",
        paths(first)
    );
    assert_eq!(find(first, "opt/olddir/b").unwrap().data, b"new\n");
    // No mount point the sandbox made (proc, dev, sys, etc/hosts) is captured.
    for p in paths(first) {
        assert!(
            !p.starts_with("proc")
                && !p.starts_with("dev")
                && !p.starts_with("sys")
                && p != "etc/hosts"
                && p != "etc/resolv.conf",
            "{p} captured"
        );
    }
    let users = &l[2];
    let f = find(users, "home/worker/data/f").unwrap();
    assert_eq!((f.uid, f.gid), (1234, 1234));
    assert!(
        String::from_utf8_lossy(&find(users, "etc/passwd").unwrap().data).contains("worker:x:1234")
    );
    let all: Vec<&Item> = l.iter().flatten().collect();
    let id = all
        .iter()
        .find(|i| i.path == "home/worker/w/id.txt")
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&id.data),
        "uid=1234(worker) gid=1234(worker) groups=1234(worker)\n/home/worker/w\n/home/worker hello 0\n"
    );
    assert_eq!((id.uid, id.gid), (1234, 1234));
    let data = |p: &str| {
        all.iter()
            .find(|i| i.path == p)
            .map(|i| i.data.clone())
            .unwrap()
    };
    assert_eq!(data("exec"), b"exec-form\n");
    assert_eq!(data("heredoc"), b"heredoc\nsecond line\n");
    assert_eq!(data("catted"), b"catted bar\n");
    assert_eq!(data("quoted"), b"not expanded: $FOO\n");
    // Every mtime is the build timestamp (0), every name numeric.
    assert!(all.iter().all(|i| i.mtime == 0), "mtimes clamped");
    // ARG reaches RUN, never the config; ENV does.
    let c = config(&d.path().join("a.tar"));
    let env = c.config.env.clone().unwrap_or_default();
    assert!(env.contains(&"FOO=bar".to_string()), "{env:?}");
    assert!(!env.iter().any(|e| e.starts_with("GREETING")), "{env:?}");
    let history: Vec<String> = c
        .history
        .iter()
        .filter_map(|h| h.created_by.clone())
        .collect();
    assert!(
        history
            .iter()
            .any(|h| h.starts_with("RUN /bin/sh -c echo \"$GREETING $FOO\"")),
        "{history:?}"
    );
    // SHELL applies to the shell-form RUNs after it.
    assert!(
        history
            .iter()
            .any(|h| h.starts_with("RUN /bin/sh -e -c echo heredoc")),
        "{history:?}"
    );
    // The same digest again, and with another thread count and temp dir.
    let b = json(&ok(&mut run_build(
        d.path(),
        &store,
        &cache,
        "b.tar",
        &["--no-index", "--json", "-j", "1"],
    )));
    assert_eq!(a["manifest_digest"], b["manifest_digest"]);
    let fresh = d.path().join("cache2");
    let c2 = json(&ok(&mut run_build(
        d.path(),
        &store,
        &fresh,
        "c.tar",
        &["--no-index", "--json", "-j", "2"],
    )));
    assert_eq!(a["manifest_digest"], c2["manifest_digest"]);
    // Without overlayfs (KILN_NO_OVERLAY=1 takes the fallback: a copy of
    // the root compared with its snapshot), the same layers.
    let s = json(&ok(run_build(
        d.path(),
        &store,
        &cache,
        "s.tar",
        &["--no-index", "--json"],
    )
    .env("KILN_NO_OVERLAY", "1")));
    assert_eq!(a["manifest_digest"], s["manifest_digest"]);
}

#[test]
fn a_failing_run_names_the_line_the_code_and_its_output_and_leaves_no_output() {
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN echo fine\nRUN echo before the failure; echo to stderr >&2; exit 3\n",
    );
    let err = fails(&mut run_build(
        d.path(),
        &store,
        &d.path().join("cache"),
        "o.tar",
        &[],
    ));
    assert!(
        err.contains("Dockerfile:3: RUN echo before the failure"),
        "{err}"
    );
    assert!(err.contains("exited with code 3"), "{err}");
    assert!(
        err.contains("before the failure") && err.contains("to stderr"),
        "{err}"
    );
    assert!(!d.path().join("o.tar").exists());
    let left: Vec<_> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".kiln"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // A command that is not there: 127 and the shell's message.
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN no-such-command\n",
    );
    let err = fails(&mut run_build(
        d.path(),
        &store,
        &d.path().join("cache"),
        "o.tar",
        &[],
    ));
    assert!(
        err.contains("exited with code 127") && err.contains("no-such-command"),
        "{err}"
    );
}

#[test]
fn network_none_has_only_loopback_and_the_mode_is_in_the_index_key() {
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN --network=none ls /sys/class/net > /ifaces; cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' ' > /devs\nRUN ls /proc/net/dev > /host-net\n",
    );
    ok(&mut run_build(
        d.path(),
        &store,
        &d.path().join("cache"),
        "o.tar",
        &["--no-index"],
    ));
    let l = layers(&d.path().join("o.tar"));
    assert_eq!(find(&l[1], "devs").unwrap().data, b"lo\n");
    // A build-wide --network none changes the index digest; host does not.
    write(d.path(), "img/Dockerfile", b"FROM t/busybox:1\nRUN true\n");
    let cache = d.path().join("cache");
    let host = json(&ok(&mut run_build(
        d.path(),
        &store,
        &cache,
        "h.tar",
        &["--json"],
    )));
    let none = json(&ok(&mut run_build(
        d.path(),
        &store,
        &cache,
        "n.tar",
        &["--json", "--network", "none"],
    )));
    assert_ne!(host["index_digest"], none["index_digest"]);
    assert_eq!(none["status"], "built");
}

#[test]
fn cache_mounts_are_reused_and_never_captured_and_secrets_reach_no_layer() {
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    let cache = d.path().join("cache");
    let secret = d.path().join("token");
    fs::write(&secret, "s3cr3t-value\n").unwrap();
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN --mount=type=cache,target=/var/cache/thing echo run >> /var/cache/thing/log && cp /var/cache/thing/log /runs\nRUN --mount=type=secret,id=token,required=true wc -c < /run/secrets/token > /used\nRUN --mount=type=tmpfs,target=/scratch touch /scratch/x && ls /scratch > /listed\n",
    );
    let secret_arg = format!("id=token,src={}", secret.display());
    ok(&mut run_build(
        d.path(),
        &store,
        &cache,
        "a.tar",
        &["--no-index", "--secret", &secret_arg],
    ));
    let l = layers(&d.path().join("a.tar"));
    assert_eq!(find(&l[1], "runs").unwrap().data, b"run\n");
    assert!(
        paths(&l[1])
            .iter()
            .all(|p| !p.starts_with("var/cache/thing/")),
        "{:?}",
        paths(&l[1])
    );
    assert_eq!(find(&l[2], "used").unwrap().data, b"13\n");
    assert!(
        paths(&l[2]).iter().all(|p| !p.starts_with("run/secrets")),
        "{:?}",
        paths(&l[2])
    );
    assert_eq!(find(&l[3], "listed").unwrap().data, b"x\n");
    // The secret's value is nowhere in the output file.
    let bytes = fs::read(d.path().join("a.tar")).unwrap();
    let all_layers: Vec<u8> = l.iter().flatten().flat_map(|i| i.data.clone()).collect();
    for hay in [&bytes, &all_layers] {
        assert!(
            !hay.windows(12).any(|w| w == b"s3cr3t-value"),
            "the secret leaked"
        );
    }
    // Second build: the cache mount holds the first run's line.
    ok(&mut run_build(
        d.path(),
        &store,
        &cache,
        "b.tar",
        &["--no-index", "--secret", &secret_arg],
    ));
    let l = layers(&d.path().join("b.tar"));
    assert_eq!(find(&l[1], "runs").unwrap().data, b"run\nrun\n");
    // A required secret that is missing is an error naming the flag.
    let err = fails(&mut run_build(
        d.path(),
        &store,
        &cache,
        "c.tar",
        &["--no-index"],
    ));
    assert!(err.contains("--secret id=token"), "{err}");
}

#[test]
fn copy_from_a_stage_takes_files_its_run_made_and_run_sees_copied_files() {
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    write(d.path(), "img/input.txt", b"from the context\n");
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1 AS build\nCOPY input.txt /src/input.txt\nRUN tr a-z A-Z < /src/input.txt > /src/output.txt\n\nFROM t/busybox:1\nCOPY --from=build /src/output.txt /out.txt\nRUN --mount=type=bind,from=build,source=/src,target=/mnt cat /mnt/input.txt > /via-bind\n",
    );
    ok(&mut run_build(
        d.path(),
        &store,
        &d.path().join("cache"),
        "o.tar",
        &["--no-index"],
    ));
    let l = layers(&d.path().join("o.tar"));
    assert_eq!(find(&l[1], "out.txt").unwrap().data, b"FROM THE CONTEXT\n");
    assert_eq!(find(&l[2], "via-bind").unwrap().data, b"from the context\n");
}

#[test]
fn the_result_runs_under_docker_and_shows_the_files() {
    if !docker_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    write(d.path(), "img/Dockerfile", IMAGE.as_bytes());
    let v = json(&ok(&mut run_build(
        d.path(),
        &store,
        &d.path().join("cache"),
        "a.tar",
        &["--no-index", "--json", "-t", "kiln-run-test:1"],
    )));
    ok(Command::new("docker")
        .arg("load")
        .arg("-i")
        .arg(d.path().join("a.tar")));
    let out = ok(Command::new("docker").args([
        "run", "--rm", "kiln-run-test:1", "sh", "-c",
        "cat /greeting /heredoc; ls /etc/base-file 2>&1; ls /opt/olddir; stat -c %u /home/worker/data/f; id -u worker",
    ]));
    let _ = Command::new("docker")
        .args(["rmi", "-f", "kiln-run-test:1"])
        .output();
    assert_eq!(
        out,
        "hello bar\nheredoc\nsecond line\nls: /etc/base-file: No such file or directory\nb\n1234\n1234\n",
        "{v}"
    );
}

#[test]
fn rootless_through_a_subuid_range_gives_the_digest_root_gives() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("not root: run the rootless test as root (it creates its own user)");
        assert!(std::env::var_os("CI").is_none(), "CI runs as root");
        return;
    }
    require("newuidmap");
    let d = tempfile::Builder::new()
        .prefix("kiln-rootless")
        .tempdir_in("/tmp")
        .unwrap();
    let store = busybox_store(d.path());
    write(d.path(), "img/Dockerfile", IMAGE.as_bytes());
    let root = json(&ok(&mut run_build(
        d.path(),
        &store,
        &d.path().join("cache"),
        "root.tar",
        &["--no-index", "--json"],
    )));
    let exe = d.path().join("kiln");
    fs::copy(env!("CARGO_BIN_EXE_kiln"), &exe).unwrap();
    ensure_user();
    ok(Command::new("chown").args(["-R", "kilnrun"]).arg(d.path()));
    chmod(d.path(), 0o755);
    let script = format!(
        "cd {dir} && XDG_CACHE_HOME={dir}/user-cache {exe} build {dir}/img --store {dir}/store --no-index -o {dir}/user.tar --json",
        dir = d.path().display(),
        exe = exe.display()
    );
    let out = as_user(&script);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let user = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(user["manifest_digest"], root["manifest_digest"]);
    // Its spool (files of the namespace's ids) is gone too.
    let left: Vec<String> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".kiln"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    // User namespaces refused (user.max_user_namespaces=0, set inside a
    // child user namespace, with KILN_ROOTLESS=1 asking for the rootless
    // path): the error says so and what to do, and nothing is written.
    let mine = tempfile::tempdir().unwrap();
    let out = run(Command::new("unshare").args(["-Ur", "sh", "-c"]).arg(format!(
        "echo 0 > /proc/sys/user/max_user_namespaces && KILN_ROOTLESS=1 XDG_CACHE_HOME={m}/cache {exe} build {dir}/img --store {dir}/store --no-index -o {m}/x.tar",
        m = mine.path().display(),
        dir = d.path().display(),
        exe = env!("CARGO_BIN_EXE_kiln"),
    )));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("user namespaces are disabled (user.max_user_namespaces is 0)")
            && err.contains("sysctl -w user.max_user_namespaces="),
        "{err}"
    );
    assert!(!mine.path().join("x.tar").exists());
}

#[test]
fn a_taskcluster_style_debian_image_with_useradd_and_apt_get_builds_and_runs() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    // The base: FROM scratch, ADD the debootstrap tar (owners and setuid
    // bits kept); a Taskcluster image directory with a `# %include`.
    let Some((store, tc)) = debian_tc_tree(d.path(), &cache) else {
        return;
    };
    let base = layers(&d.path().join("base.tar"));
    let passwd = base[0].iter().find(|i| i.path == "usr/bin/passwd").unwrap();
    assert_eq!(passwd.mode & 0o4000, 0o4000, "setuid kept");
    let v = json(&ok(kiln()
        .env("XDG_CACHE_HOME", &cache)
        .arg("build")
        .arg(tc.join("taskcluster/docker/tcimage"))
        .arg("--topsrcdir")
        .arg(&tc)
        .arg("--store")
        .arg(&store)
        .args(["--no-index", "--json", "-t", "kiln-tcimage-test:1", "-o"])
        .arg(d.path().join("tc.tar"))));
    assert_eq!(v["layers"].as_array().unwrap().len(), 4, "{v}");
    if !docker_available() {
        return;
    }
    ok(Command::new("docker")
        .arg("load")
        .arg("-i")
        .arg(d.path().join("tc.tar")));
    let out = ok(Command::new("docker").args([
        "run",
        "--rm",
        "kiln-tcimage-test:1",
        "sh",
        "-c",
        DEBIAN_TC_CHECK,
    ]));
    let _ = Command::new("docker")
        .args(["rmi", "-f", "kiln-tcimage-test:1"])
        .output();
    assert_eq!(out, DEBIAN_TC_SAYS);
}

#[test]
fn interrupting_kiln_kills_the_whole_sandbox() {
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    // A marker no other process has: `sleep 987654` (and a child of it).
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN sleep 987654 & sleep 987654; true\n",
    );
    let mut child = run_build(
        d.path(),
        &store,
        &d.path().join("cache"),
        "o.tar",
        &["--no-index"],
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .unwrap();
    let count = || {
        let out = Command::new("pgrep")
            .args(["-f", "sleep 987654"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).lines().count()
    };
    let start = std::time::Instant::now();
    while count() < 2 {
        assert!(start.elapsed().as_secs() < 60, "the RUN never started");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SIGINT to kiln alone (not its group): the helper and PID 1 die with it.
    // SAFETY: kill of our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    child.wait().unwrap();
    let start = std::time::Instant::now();
    while count() > 0 {
        assert!(
            start.elapsed().as_secs() < 10,
            "sandboxed processes outlived kiln"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!d.path().join("o.tar").exists());
}

#[test]
fn a_stage_or_image_used_only_by_a_mount_is_built_and_in_the_index_digest() {
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    let cache = d.path().join("cache");
    let other = |content: &[u8]| {
        write(d.path(), "other/Dockerfile", b"FROM scratch\nCOPY f /f\n");
        write(d.path(), "other/f", content);
        ok(kiln()
            .arg("build")
            .arg(d.path().join("other"))
            .args(["--no-index", "-t", "t/other:1", "-o"])
            .arg(d.path().join("other.oci.tar")));
        ok(kiln()
            .args(["store", "add"])
            .arg(d.path().join("other.oci.tar"))
            .arg("--store")
            .arg(&store));
    };
    other(b"one\n");
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1 AS made\nRUN echo made > /made\nFROM t/busybox:1\nRUN --mount=type=bind,from=made,source=/made,target=/made --mount=type=bind,from=t/other:1,target=/m cat /made /m/f > /seen\n",
    );
    let v = json(&ok(&mut run_build(
        d.path(),
        &store,
        &cache,
        "a.tar",
        &["--json"],
    )));
    assert_eq!(v["status"], "built");
    let seen = |out: &str| {
        layers(&d.path().join(out))
            .into_iter()
            .flatten()
            .find(|i| i.path == "seen")
            .unwrap()
            .data
    };
    assert_eq!(seen("a.tar"), b"made\none\n");
    // The image behind the mount changed: the index digest changes with it.
    other(b"two\n");
    let w = json(&ok(&mut run_build(
        d.path(),
        &store,
        &cache,
        "b.tar",
        &["--json"],
    )));
    assert_ne!(w["index_digest"], v["index_digest"]);
    assert_eq!(w["status"], "built");
    assert_eq!(seen("b.tar"), b"made\ntwo\n");
}

#[test]
fn a_base_with_an_empty_working_dir_runs_in_the_root() {
    // `docker import` and the classic builder write "WorkingDir": "".
    let d = tempfile::tempdir().unwrap();
    busybox_store(d.path());
    let tar = fs::read(d.path().join("bb/rootfs.tar")).unwrap();
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"WorkingDir":"","Env":["PATH=/bin"]}},"rootfs":{{"type":"layers","diff_ids":["sha256:{}"]}}}}"#,
        sha256_hex(&tar)
    );
    let (store, _) = evil_store(d.path(), &tar, Some(config.as_bytes()));
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/evil:1\nRUN pwd > /pwd\n",
    );
    ok(&mut run_build(
        d.path(),
        &store,
        &d.path().join("cache"),
        "o.tar",
        &["--no-index"],
    ));
    let l = layers(&d.path().join("o.tar"));
    assert_eq!(find(l.last().unwrap(), "pwd").unwrap().data, b"/\n");
}

#[test]
fn progress_and_reports_name_the_original_dockerfile_lines() {
    // `# %ARG` lines leave the rewritten Dockerfile: its line numbers are
    // not the file's, which errors always used.
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    write(
        d.path(),
        "img/Dockerfile",
        b"# %ARG X\n# %ARG Y\nFROM t/busybox:1\nRUN echo $X $Y > /xy\n",
    );
    let out = run(&mut run_build(
        d.path(),
        &store,
        &d.path().join("cache"),
        "o.tar",
        &[
            "--arg",
            "X=1",
            "--arg",
            "Y=2",
            "--progress",
            "plain",
            "--json",
        ],
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("RUN (line 4)"), "{err}");
    let v = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(v["steps"][0]["line"], 4, "{v}");
}

/// Two stages whose own first layers are both laid out for a RUN: each
/// RUN sees its own stage's files, never the other stage's layer that
/// happens to have the same position (they once shared `lower-0`).
#[test]
fn each_stage_s_run_sees_its_own_layers_never_another_stage_s() {
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    write(d.path(), "img/a.txt", b"from a\n");
    write(d.path(), "img/b.txt", b"from b\n");
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1 AS a\nCOPY a.txt /x\nRUN cat /x > /y\n\nFROM t/busybox:1\nCOPY --from=a /y /from-a\nCOPY b.txt /x\nRUN cat /from-a /x > /z\n",
    );
    ok(&mut run_build(
        d.path(),
        &store,
        &d.path().join("cache"),
        "o.tar",
        &["--no-index", "--no-cache"],
    ));
    let l = layers(&d.path().join("o.tar"));
    assert_eq!(find(&l[3], "z").unwrap().data, b"from a\nfrom b\n");
}

/// Builder stages that do not depend on each other run at the same time
/// (bounded by --jobs): stage `listen` waits for stage `send` to connect
/// to it, which can only happen if both run at once. With `-j 1` they run
/// one after another, and the listener gives up. Independent stages give
/// the same image whatever the number of jobs.
#[test]
fn independent_stages_run_side_by_side_and_the_image_does_not_depend_on_jobs() {
    require("busybox");
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    // A port below the ephemeral range (32768 and up): no outgoing
    // connection of another test (apt-get's, say) can take it between
    // this choice and the listener's bind, as it could an ephemeral one.
    let port = (20000 + std::process::id() % 10000..30000)
        .chain(20000..30000)
        .find(|p| std::net::TcpListener::bind(("127.0.0.1", *p as u16)).is_ok())
        .expect("a free port below the ephemeral range") as u16;
    write(
        d.path(),
        "img/Dockerfile",
        format!(
            "FROM t/busybox:1 AS listen\nARG WAIT\nRUN (nc -l -p {port} > /got &) ; for i in $(seq $WAIT); do [ -s /got ] && exit 0; sleep 0.1; done; exit 1\n\n\
             FROM t/busybox:1 AS send\nRUN for i in $(seq 1200); do echo hi | nc 127.0.0.1 {port} && exit 0; sleep 0.1; done; exit 1\n\n\
             FROM t/busybox:1\nCOPY --from=listen /got /got\nCOPY --from=send /etc/base-file /sent\n"
        )
        .as_bytes(),
    );
    let cache = d.path().join("cache");
    ok(&mut run_build(
        d.path(),
        &store,
        &cache,
        "par.tar",
        // Two minutes for the other stage to start, on a loaded machine.
        &[
            "--no-index",
            "--no-cache",
            "-j",
            "2",
            "--build-arg",
            "WAIT=1200",
        ],
    ));
    let l = layers(&d.path().join("par.tar"));
    assert_eq!(find(&l[1], "got").unwrap().data, b"hi\n");
    let mut one = run_build(
        d.path(),
        &store,
        &cache,
        "seq.tar",
        &[
            "--no-index",
            "--no-cache",
            "-j",
            "1",
            "--build-arg",
            "WAIT=30",
        ],
    );
    let err = fails(&mut one);
    assert!(err.contains("Dockerfile:3: RUN (nc -l"), "{err}");
    assert!(!d.path().join("seq.tar").exists());

    // Independent stages without a rendezvous: -j 1 and -j 2 agree.
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1 AS a\nRUN echo a > /a && sleep 1\n\nFROM t/busybox:1 AS b\nRUN echo b > /b\n\nFROM t/busybox:1 AS c\nRUN echo c > /c\n\nFROM t/busybox:1\nCOPY --from=a /a /a\nCOPY --from=b /b /b\nCOPY --from=c /c /c\n",
    );
    let mut digests = Vec::new();
    for jobs in ["1", "2"] {
        let o = format!("j{jobs}.tar");
        let out = ok(&mut run_build(
            d.path(),
            &store,
            &cache,
            &o,
            &["--no-index", "--no-cache", "--json", "-j", jobs],
        ));
        digests.push(json(&out)["manifest_digest"].clone());
    }
    assert_eq!(digests[0], digests[1]);
}

/// A RUN that leaves files as they were (`chown -R` to the owner a tree
/// already has copies every file up) adds only what it changed; one that
/// changes nothing gives an empty layer. The same with and without
/// overlayfs.
#[test]
fn a_run_that_changes_nothing_adds_no_copied_up_files() {
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\n\
          RUN mkdir -p /data/sub && echo a > /data/a && echo b > /data/sub/b && ln -s a /data/l && chown -R 1000:1000 /data\n\
          RUN chown -R 1000:1000 /data && echo new > /data/new && echo changed > /data/sub/b\n\
          RUN chown -R 0:0 /etc && chmod 0644 /etc/passwd && chown 1000:1000 /data/a /data/sub\n",
    );
    let cache = d.path().join("cache");
    let mut digests = Vec::new();
    for (out, overlay) in [("o.tar", true), ("no-overlay.tar", false)] {
        let mut c = run_build(
            d.path(),
            &store,
            &cache,
            out,
            &["--no-index", "--no-cache", "--json"],
        );
        if !overlay {
            c.env("KILN_NO_OVERLAY", "1");
        }
        digests.push(json(&ok(&mut c))["manifest_digest"].clone());
        let l = layers(&d.path().join(out));
        assert_eq!(
            paths(&l[2]),
            ["data/", "data/new", "data/sub/", "data/sub/b"],
            "overlay: {overlay}"
        );
        assert_eq!(find(&l[2], "data/sub/b").unwrap().data, b"changed\n");
        assert!(
            paths(&l[3]).is_empty(),
            "overlay {overlay}: {:?}",
            paths(&l[3])
        );
    }
    assert_eq!(digests[0], digests[1]);
}
