//! kiln's outputs read by the real tools: umoci, oci-image-tool, skopeo,
//! podman and (where an engine answers) docker. setup.sh installs them.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// An image tree whose image runs: a static hello binary as /hello.
fn runnable_tree() -> tempfile::TempDir {
    require("cc");
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY hello /hello\nCOPY etc /etc/\nENV GREETING=kiln\nCMD [\"/hello\"]\n"),
        ("img/etc/os-release", b"ID=kiln-test\n"),
        ("src/hello.c", b"#include <stdio.h>\n#include <stdlib.h>\nint main(void){printf(\"hello from %s\\n\", getenv(\"GREETING\"));return 0;}\n"),
    ]);
    ok(Command::new("cc")
        .args(["-static", "-Os", "-o"])
        .arg(d.path().join("img/hello"))
        .arg(d.path().join("src/hello.c")));
    d
}

fn s(v: &serde_json::Value) -> String {
    v.as_str().unwrap().to_string()
}

#[test]
fn umoci_and_oci_image_tool_accept_gzip_oci_output() {
    require("umoci");
    require("oci-image-tool");
    let d = runnable_tree();
    build(
        d.path(),
        "layout",
        &[
            "--format",
            "oci-dir",
            "--layer-compression",
            "gzip",
            "-t",
            "hello:1",
        ],
    );
    let layout = d.path().join("layout");
    let bundle = d.path().join("bundle");
    ok(Command::new("umoci")
        .args(["unpack", "--rootless", "--image"])
        .arg(format!("{}:1", layout.display()))
        .arg(&bundle));
    assert_eq!(
        fs::read(bundle.join("rootfs/etc/os-release")).unwrap(),
        b"ID=kiln-test\n"
    );
    assert_eq!(
        fs::read(bundle.join("rootfs/hello")).unwrap(),
        fs::read(d.path().join("img/hello")).unwrap()
    );
    let out = run(Command::new("oci-image-tool")
        .args(["validate", "--type", "image"])
        .arg(&layout));
    let all =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && all.contains("Validation succeeded"),
        "{all}"
    );
    // and it fails on a corrupted layout, so the check above means something
    let blob = fs::read_dir(layout.join("blobs/sha256"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max_by_key(|p| fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    fs::write(&blob, bytes).unwrap();
    assert!(!run(Command::new("oci-image-tool")
        .args(["validate", "--type", "image"])
        .arg(&layout))
    .status
    .success());
}

fn skopeo_inspect(reference: &str) -> serde_json::Value {
    json(&ok(Command::new("skopeo").args(["inspect", reference])))
}

#[test]
fn skopeo_reads_and_copies_every_format() {
    require("skopeo");
    let d = runnable_tree();
    let cases: Vec<(&str, Vec<&str>, String)> = vec![
        (
            "layout",
            vec!["--format", "oci-dir", "-t", "hello:1"],
            format!("oci:{}:1", d.path().join("layout").display()),
        ),
        (
            "gzlayout",
            vec![
                "--format",
                "oci-dir",
                "--layer-compression",
                "gzip",
                "-t",
                "hello:1",
            ],
            format!("oci:{}:1", d.path().join("gzlayout").display()),
        ),
        (
            "a.oci.tar",
            vec!["-t", "hello:1"],
            format!("oci-archive:{}", d.path().join("a.oci.tar").display()),
        ),
        (
            "d.tar",
            vec!["-t", "hello:1"],
            format!("docker-archive:{}", d.path().join("d.tar").display()),
        ),
        (
            "dz.tar",
            vec!["--layer-compression", "zstd", "-t", "hello:1"],
            format!("docker-archive:{}", d.path().join("dz.tar").display()),
        ),
    ];
    for (out, flags, reference) in cases {
        let v = build(d.path(), out, &flags);
        let info = skopeo_inspect(&reference);
        assert_eq!(info["Env"][1], "GREETING=kiln", "{reference}");
        assert_eq!(info["Layers"].as_array().unwrap().len(), 2, "{reference}");
        if reference.starts_with("oci") {
            // OCI references show kiln's own manifest
            assert_eq!(info["Digest"], v["manifest_digest"], "{reference}");
        }
        let config = json(&ok(
            Command::new("skopeo").args(["inspect", "--config", &reference])
        ));
        assert_eq!(
            config["rootfs"]["diff_ids"][0], v["layers"][0]["diff_id"],
            "{reference}"
        );
        let dest: PathBuf = d.path().join(format!("copy-{out}"));
        ok(Command::new("skopeo")
            .args(["copy", &reference])
            .arg(format!("oci:{}:copied", dest.display())));
        let copied = skopeo_inspect(&format!("oci:{}:copied", dest.display()));
        assert_eq!(copied["Env"], info["Env"], "{reference}");
    }
}

fn podman(root: &Path) -> Command {
    let mut c = Command::new("podman");
    c.arg("--root")
        .arg(root.join("root"))
        .arg("--runroot")
        .arg(root.join("run"))
        .args(["--storage-driver", "vfs"]);
    c
}

#[test]
fn podman_loads_the_docker_archive() {
    require("podman");
    let d = runnable_tree();
    let v = build(d.path(), "d.tar", &["-t", "kiln-interop/hello:1"]);
    let root = tempfile::tempdir().unwrap();
    let out = ok(podman(root.path())
        .arg("load")
        .arg("-i")
        .arg(d.path().join("d.tar")));
    assert!(out.contains("kiln-interop/hello:1"), "{out}");
    let id = ok(podman(root.path()).args([
        "image",
        "inspect",
        "--format",
        "{{.Id}}",
        "kiln-interop/hello:1",
    ]));
    assert_eq!(format!("sha256:{}", id.trim()), s(&v["image_id"]));
}

/// A docker tag unique to this test run.
fn docker_tag(name: &str) -> String {
    format!("kiln-interop-{name}-{}:t", std::process::id())
}

/// The loaded image has kiln's config digest as its id, runs, and is removed.
fn docker_verify(tag: &str, image_id: &str) {
    let id = ok(Command::new("docker").args(["image", "inspect", "--format", "{{.Id}}", tag]));
    assert_eq!(id.trim(), image_id);
    let hello = ok(Command::new("docker").args(["run", "--rm", "--network", "none", tag]));
    assert_eq!(hello, "hello from kiln\n");
    let _ = run(Command::new("docker").args(["rmi", "-f", tag]));
}

fn docker_check(archive: &Path, tag: &str, image_id: &str) {
    let out = ok(Command::new("docker").arg("load").arg("-i").arg(archive));
    assert!(out.contains(tag), "{out}");
    docker_verify(tag, image_id);
}

#[test]
fn docker_loads_and_runs_the_docker_archive_and_the_taskcluster_artifact() {
    if !docker_available() {
        eprintln!("SKIPPED: no Docker engine answers on this machine");
        return;
    }
    let d = runnable_tree();
    let tag = docker_tag("plain");
    let v = build(d.path(), "d.tar", &["-t", &tag]);
    docker_check(&d.path().join("d.tar"), &tag, &s(&v["image_id"]));

    let tag = docker_tag("zst");
    let v = build(d.path(), "image.tar.zst", &["-t", &tag]);
    let raw = zstd::decode_all(&fs::read(d.path().join("image.tar.zst")).unwrap()[..]).unwrap();
    let tar = d.path().join("unzst.tar");
    fs::write(&tar, raw).unwrap();
    docker_check(&tar, &tag, &s(&v["image_id"]));
}

#[test]
fn taskgraphs_image_loader_loads_image_tar_zst() {
    if !docker_available() {
        eprintln!("SKIPPED: no Docker engine answers on this machine");
        return;
    }
    let py = taskgraph_python();
    let d = runnable_tree();
    let v = build(d.path(), "image.tar.zst", &[]);
    let tag = docker_tag("tg");
    let (name, t) = tag.split_once(':').unwrap();
    // Serve the artifact on loopback and let taskgraph's own loader fetch, rewrite and load it.
    let code = format!(
        r#"
import functools, http.server, json, threading
from taskgraph.docker import load_image
handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory={dir:?})
srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
threading.Thread(target=srv.serve_forever, daemon=True).start()
info = load_image("http://127.0.0.1:%d/image.tar.zst" % srv.server_address[1], imageName={name:?}, imageTag={t:?})
srv.shutdown()
print(json.dumps(info))
"#,
        dir = d.path().to_str().unwrap(),
    );
    let out = ok(Command::new(&py)
        .args(["-c", &code])
        .env("NO_PROXY", "127.0.0.1"));
    assert!(out.contains(&format!("Loaded image: {tag}")), "{out}");
    // taskgraph reports what the artifact's `repositories` file said before it retagged
    let info = json(out.lines().last().unwrap());
    assert_eq!(
        (info["image"].as_str(), info["tag"].as_str()),
        (Some("img"), Some("latest"))
    );
    docker_verify(&tag, &s(&v["image_id"]));
}

#[test]
fn a_skopeo_docker_archive_is_imported_and_serves_as_a_base_that_runs() {
    require("skopeo");
    require("podman");
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.exists(),
        "/bin/busybox is missing: run `bash setup.sh` (it installs busybox-static)"
    );
    // A base made from Debian's busybox-static, turned by skopeo into a
    // legacy docker-archive (manifest.json only), a format kiln never writes.
    let d = tree(&[
        (
            "img/Dockerfile",
            b"FROM scratch\nCOPY busybox /bin/busybox\nCOPY etc /etc/\n",
        ),
        (
            "img/etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nbb:x:4242:4242::/home/bb:/bin/sh\n",
        ),
        ("img/etc/group", b"root:x:0:\nbb:x:4242:\n"),
    ]);
    fs::copy(busybox, d.path().join("img/busybox")).unwrap();
    chmod(&d.path().join("img/busybox"), 0o755);
    build(d.path(), "base.oci.tar", &["--layer-compression", "gzip"]);
    let legacy = d.path().join("bb.tar");
    ok(Command::new("skopeo")
        .arg("copy")
        .arg(format!(
            "oci-archive:{}",
            d.path().join("base.oci.tar").display()
        ))
        .arg(format!(
            "docker-archive:{}:kiln-interop/busybox:1",
            legacy.display()
        )));
    let members: Vec<String> = tar::Archive::new(fs::File::open(&legacy).unwrap())
        .entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(!members.contains(&"index.json".to_string()), "{members:?}");
    assert!(
        members.contains(&"manifest.json".to_string()),
        "{members:?}"
    );

    let store = d.path().join("store");
    let out = ok(kiln()
        .args(["store", "add"])
        .arg(&legacy)
        .arg("--store")
        .arg(&store));
    let (name, digest) = out.trim().split_once('\t').unwrap();
    assert_eq!(
        name, "docker.io/kiln-interop/busybox:1",
        "the name skopeo recorded"
    );
    // The layers keep their digests: each is the sha256 of the layer file skopeo wrote.
    let mut ar = tar::Archive::new(fs::File::open(&legacy).unwrap());
    let mut files = std::collections::BTreeMap::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let p = e.path().unwrap().to_string_lossy().into_owned();
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut b).unwrap();
        files.insert(p, b);
    }
    let dm: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
    let m: kiln::image::Manifest = serde_json::from_slice(
        &fs::read(
            store
                .join("blobs/sha256")
                .join(digest.trim_start_matches("sha256:")),
        )
        .unwrap(),
    )
    .unwrap();
    let want: Vec<String> = dm[0]["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| format!("sha256:{}", sha256_hex(&files[l.as_str().unwrap()])))
        .collect();
    let got: Vec<String> = m.layers.iter().map(|l| l.digest.to_string()).collect();
    assert_eq!(got, want);

    // A child FROM the imported image, with a file owned by the base's user.
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM kiln-interop/busybox:1\nCOPY --chown=bb hello.sh /hello.sh\nCMD [\"/bin/busybox\", \"sh\", \"/hello.sh\"]\n",
    );
    write(
        d.path(),
        "img/hello.sh",
        b"echo \"hello from busybox, owner $(/bin/busybox stat -c %u /hello.sh)\"\n",
    );
    let tag = docker_tag("busybox");
    let v = build(
        d.path(),
        "child.tar",
        &["-t", &tag, "--store", store.to_str().unwrap()],
    );
    let root = tempfile::tempdir().unwrap();
    ok(podman(root.path())
        .arg("load")
        .arg("-i")
        .arg(d.path().join("child.tar")));
    let id = ok(podman(root.path()).args(["image", "inspect", "--format", "{{.Id}}", &tag]));
    assert_eq!(format!("sha256:{}", id.trim()), s(&v["image_id"]));
    if !docker_available() {
        eprintln!("SKIPPED (docker run part): no Docker engine answers on this machine");
        return;
    }
    ok(Command::new("docker")
        .arg("load")
        .arg("-i")
        .arg(d.path().join("child.tar")));
    let said = ok(Command::new("docker").args(["run", "--rm", "--network", "none", &tag]));
    let _ = run(Command::new("docker").args(["rmi", "-f", &tag]));
    assert_eq!(said, "hello from busybox, owner 4242\n");
}

#[test]
fn without_an_engine_ci_fails_instead_of_skipping() {
    let gone = "unix:///nonexistent/kiln-test-docker.sock";
    assert!(!docker_engine(Some(gone), false));
    let r = std::panic::catch_unwind(|| docker_engine(Some(gone), true));
    assert!(
        r.is_err(),
        "with CI set, a missing engine must fail the test"
    );
}

#[test]
fn dockerignore_classes_and_characters_match_docker_build() {
    if !docker_available() {
        eprintln!("SKIPPED: no Docker engine answers on this machine");
        return;
    }
    let files: &[(&str, &[u8])] = &[
        ("img/Dockerfile", b"FROM scratch\nCOPY . /ctx/\n"),
        (
            "img/.dockerignore",
            "[!a]x\ncaf?.txt\nDockerfile\n.dockerignore\n".as_bytes(),
        ),
        ("img/!x", b"1"),
        ("img/ax", b"2"),
        ("img/bx", b"3"),
        ("img/caf\u{e9}.txt", b"4"),
        ("img/cafe.txt", b"5"),
        ("img/keep", b"6"),
    ];
    let d = tree(files);
    build(d.path(), "k.tar", &[]);
    let mut ours: Vec<String> = layers(&d.path().join("k.tar"))
        .concat()
        .into_iter()
        .map(|i| i.path.trim_end_matches('/').to_string())
        .filter(|p| p != "ctx")
        .collect();
    ours.sort();
    let tag = docker_tag("ignore");
    ok(Command::new("docker")
        .env("DOCKER_BUILDKIT", "0")
        .args(["build", "-q", "-t", &tag])
        .arg(d.path().join("img")));
    let id = ok(Command::new("docker").args(["create", &tag, "/none"]));
    let id = id.trim();
    let tar = d.path().join("export.tar");
    ok(Command::new("sh")
        .arg("-c")
        .arg(format!("docker export {id} > {}", tar.display())));
    let _ = Command::new("docker").args(["rm", id]).output();
    let _ = Command::new("docker").args(["rmi", &tag]).output();
    let mut theirs: Vec<String> = tar::Archive::new(fs::File::open(&tar).unwrap())
        .entries()
        .unwrap()
        .map(|e| {
            String::from_utf8_lossy(&e.unwrap().path_bytes())
                .trim_end_matches('/')
                .to_string()
        })
        .filter(|p| p.starts_with("ctx/"))
        .collect();
    theirs.sort();
    assert_eq!(ours, theirs);
    // `[!a]x` is the class {!, a}: `!x` and `ax` are ignored, `bx` is kept;
    // `caf?.txt` takes the two-byte é.
    assert_eq!(ours, ["ctx/bx", "ctx/keep"]);
}

#[test]
fn outputs_for_docker_load_built_on_a_zstd_base_load_in_the_engine() {
    if !docker_available() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // A zstd base: busybox built to an OCI archive (zstd layers by default).
    let gz_store = busybox_store(d.path());
    write(
        d.path(),
        "z/Dockerfile",
        b"FROM t/busybox:1\nRUN echo zstd-base > /base-note\n",
    );
    ok(kiln()
        .arg("build")
        .arg(d.path().join("z"))
        .arg("--store")
        .arg(&gz_store)
        .args(["--no-index", "-t", "t/zbase:1", "-o"])
        .arg(d.path().join("zbase.oci.tar")));
    let store = d.path().join("zstore");
    ok(kiln()
        .args(["store", "add"])
        .arg(d.path().join("zbase.oci.tar"))
        .arg("--store")
        .arg(&store));
    let zbase = kiln::source::ImageFile::open(&d.path().join("zbase.oci.tar"))
        .unwrap()
        .summary()
        .unwrap();
    assert!(zbase
        .manifest
        .layers
        .iter()
        .any(|l| l.media_type.as_str().ends_with("+zstd")));
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/zbase:1\nRUN echo child > /child-note\nCMD [\"cat\", \"/base-note\", \"/child-note\"]\n",
    );
    for (out, tag) in [
        ("d.tar", docker_tag("zbase")),
        ("image.tar.zst", docker_tag("zbase-zst")),
    ] {
        let o = run(kiln()
            .arg("build")
            .arg(d.path().join("img"))
            .arg("--store")
            .arg(&store)
            .args([
                "--no-index",
                "--progress",
                "plain",
                "--json",
                "-t",
                &tag,
                "-o",
            ])
            .arg(d.path().join(out)));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(
            err.contains("(zstd) with ")
                && err.contains("Docker Engines before 23.0 cannot load zstd layers"),
            "{err}"
        );
        let archive = if out.ends_with(".zst") {
            let raw = zstd::decode_all(&fs::read(d.path().join(out)).unwrap()[..]).unwrap();
            let tar = d.path().join("unzst.tar");
            fs::write(&tar, raw).unwrap();
            tar
        } else {
            d.path().join(out)
        };
        // No zstd layer is left in what Docker reads.
        let summary = kiln::source::ImageFile::open(&archive)
            .unwrap()
            .summary()
            .unwrap();
        assert!(
            summary
                .manifest
                .layers
                .iter()
                .all(|l| !l.media_type.as_str().contains("zstd")),
            "{:?}",
            summary.manifest.layers
        );
        // The diff_ids are the base's.
        assert_eq!(
            summary.config.rootfs.diff_ids[..zbase.config.rootfs.diff_ids.len()],
            zbase.config.rootfs.diff_ids[..]
        );
        ok(Command::new("docker").arg("load").arg("-i").arg(&archive));
        let said = ok(Command::new("docker").args(["run", "--rm", "--network", "none", &tag]));
        let _ = run(Command::new("docker").args(["rmi", "-f", &tag]));
        assert_eq!(said, "zstd-base\nchild\n");
    }
}
