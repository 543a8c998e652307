//! RUN where kaniko runs: kiln inside `docker run` with Docker's defaults
//! (root in the container, no `--privileged`, no `--cap-add`, the default
//! seccomp and AppArmor profiles), where its namespace sandbox cannot
//! start. Container mode gives the same layers as the sandbox on the host,
//! leaves kiln's own files and every mount alone, starts each stage from
//! its own base, and refuses what needs a namespace with the fix.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

/// The image_builder image (kiln at /kiln/bin/kiln, the libraries it
/// links), loaded under a tag of this test's own; the tag.
fn kiln_image(d: &Path) -> String {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let tag = format!(
        "kilntest/kiln-in-container:{}-{}",
        std::process::id(),
        N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let archive = d.join("kiln-image.tar");
    image_builder_archive(&archive, &["-t", &tag]);
    ok(Command::new("docker").arg("load").arg("-i").arg(&archive));
    tag
}

struct Image(String);

impl Drop for Image {
    fn drop(&mut self) {
        let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
    }
}

/// `docker run` of kiln with Docker's defaults, `d` mounted at /w.
fn in_docker(image: &str, d: &Path, args: &str) -> std::process::Output {
    run(Command::new("docker")
        .args(["run", "--rm", "--entrypoint", "/kiln/bin/kiln"])
        .args(["-e", "XDG_CACHE_HOME=/w/cache", "-v"])
        .arg(format!("{}:/w", d.display()))
        .arg(image)
        .args(args.split_whitespace()))
}

fn digest(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    json(&String::from_utf8_lossy(&out.stdout))["manifest_digest"]
        .as_str()
        .unwrap()
        .to_string()
}

const MULTI: &str = "FROM t/busybox:1 AS builder
RUN mkdir -p /out && echo built > /out/artifact && rm /etc/base-file
FROM t/busybox:1
RUN echo hi > /hello && rm -rf /opt/olddir && mkdir -p /opt/olddir && echo new > /opt/olddir/b && echo 'worker:x:1234:1234::/home/worker:/bin/sh' >> /etc/passwd && echo 'worker:x:1234:' >> /etc/group
COPY --from=builder /out/artifact /artifact
RUN cat /artifact /etc/base-file > /both && chown worker /both && chmod 1777 /tmp
RUN chown -R 0:0 /opt /etc/group && echo x > /x
USER worker
RUN id > /tmp/id
";

#[test]
fn kiln_inside_docker_run_builds_run_steps_with_the_host_s_digests() {
    if !docker_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    write(d.path(), "img/Dockerfile", MULTI.as_bytes());
    let host = digest(&run(kiln()
        .arg("build")
        .arg(d.path().join("img"))
        .arg("--store")
        .arg(&store)
        .args(["--no-index", "--json", "-o"])
        .arg(d.path().join("host.tar"))));
    let image = Image(kiln_image(d.path()));
    let out = in_docker(
        &image.0,
        d.path(),
        "build /w/img --store /w/store --no-index --json --progress plain -o /w/out/cont.tar",
    );
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(digest(&out), host, "{err}");
    assert!(
        err.contains("RUN isolation: container (kiln's sandbox cannot start here: creating namespaces is refused"),
        "{err}"
    );
    // Each stage from its own base: the builder's removal of
    // /etc/base-file never reached the final stage.
    let l = layers(&d.path().join("out/cont.tar"));
    let both = l.iter().flatten().find(|i| i.path == "both").unwrap();
    assert_eq!(both.data, b"built\nbase\n");
    // Nothing of the container (kiln, /proc, /etc/hosts) in any layer.
    for item in l.iter().flatten() {
        for p in [
            "kiln",
            "proc/",
            "etc/hosts",
            "etc/resolv.conf",
            "w/",
            ".dockerenv",
        ] {
            assert!(!item.path.starts_with(p), "{} captured", item.path);
        }
    }
    // An indexed build in the container, then one more step: every
    // earlier step is a step-cache hit (its layer unpacked in-process).
    let first = in_docker(
        &image.0,
        d.path(),
        "build /w/img --store /w/store --json -o /w/out/indexed.tar",
    );
    assert_eq!(digest(&first), host);
    write(
        d.path(),
        "img/Dockerfile",
        format!("{MULTI}RUN ls /tmp > /tmp/ls\n").as_bytes(),
    );
    let more = in_docker(
        &image.0,
        d.path(),
        "build /w/img --store /w/store --json -o /w/out/more.tar",
    );
    let v = json(&String::from_utf8_lossy(&more.stdout));
    let cached: Vec<bool> = v["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("{v} {}", String::from_utf8_lossy(&more.stderr)))
        .iter()
        .map(|s| s["cached"].as_bool().unwrap())
        .collect();
    assert_eq!(cached.last(), Some(&false), "{v}");
    assert!(cached[..cached.len() - 1].iter().all(|c| *c), "{v}");
    let ls = layers(&d.path().join("out/more.tar"))
        .into_iter()
        .flatten()
        .find(|i| i.path == "tmp/ls")
        .unwrap();
    // (The shell makes /tmp/ls before ls lists.)
    assert_eq!(ls.data, b"id\nls\n");

    // A base whose files lie where kiln keeps its own (/kiln/bin/kiln in
    // this image): they stay in the layer, the container's kiln stays.
    write(d.path(), "img/fake-kiln", b"not kiln\n");
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nCOPY fake-kiln /kiln/bin/kiln\nRUN echo after > /after\n",
    );
    let out = in_docker(
        &image.0,
        d.path(),
        "build /w/img --store /w/store --no-index --json -o /w/out/shadow.tar",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let l = layers(&d.path().join("out/shadow.tar"));
    let fake = l
        .iter()
        .flatten()
        .find(|i| i.path == "kiln/bin/kiln")
        .unwrap();
    assert_eq!(fake.data, b"not kiln\n");
    assert!(l.iter().flatten().any(|i| i.path == "after"));

    // What needs a namespace is refused with the mode and the fix.
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN --mount=type=tmpfs,target=/t true\n",
    );
    let out = in_docker(
        &image.0,
        d.path(),
        "build /w/img --store /w/store --no-index -o /w/x.tar",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("RUN --mount needs kiln's sandbox, and RUN runs in container mode here")
            && err.contains("--security-opt seccomp=unconfined"),
        "{err}"
    );
    write(d.path(), "img/Dockerfile", b"FROM t/busybox:1\nRUN true\n");
    let out = in_docker(
        &image.0,
        d.path(),
        "build /w/img --store /w/store --no-index --network none -o /w/x.tar",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("docker run --network none"), "{err}");
    // --isolation sandbox: the sandbox's own error, naming the cause.
    let out = in_docker(
        &image.0,
        d.path(),
        "build /w/img --store /w/store --no-index --isolation sandbox -o /w/x.tar",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("PID namespace"), "{err}");
    assert!(!d.path().join("x.tar").exists());
}

#[test]
fn the_taskcluster_style_debian_image_builds_inside_docker_run() {
    if !docker_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let Some(_) = debian_tc_tree(d.path(), &d.path().join("cache")) else {
        return;
    };
    let image = Image(kiln_image(d.path()));
    let out = in_docker(
        &image.0,
        d.path(),
        "build /w/tc/taskcluster/docker/tcimage --topsrcdir /w/tc --store /w/store --no-index --json -t kiln-tcimage-container:1 -o /w/out/tc.tar",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ok(Command::new("docker")
        .arg("load")
        .arg("-i")
        .arg(d.path().join("out/tc.tar")));
    let said = ok(Command::new("docker").args([
        "run",
        "--rm",
        "kiln-tcimage-container:1",
        "sh",
        "-c",
        DEBIAN_TC_CHECK,
    ]));
    let _ = Command::new("docker")
        .args(["rmi", "-f", "kiln-tcimage-container:1"])
        .output();
    assert_eq!(said, DEBIAN_TC_SAYS);
}
