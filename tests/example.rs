//! The bundled example the README builds: it builds, and its digests are
//! pinned so any change to kiln's output bytes is a visible, reviewed change.

mod common;

use common::*;

#[test]
fn readme_example_builds_with_pinned_digests() {
    let out = tempfile::tempdir().unwrap();
    let repo = repo();
    let mut cmd = kiln();
    cmd.current_dir(&repo)
        .args([
            "build",
            "testdata/example/taskcluster/docker/hello",
            "--topsrcdir",
            "testdata/example",
            "--arg",
            "GREETING=hello",
            "--json",
            "-o",
        ])
        .arg(out.path().join("hello.tar.zst"));
    let v = json(&ok(&mut cmd));
    assert_eq!(v["tags"][0], "hello:1.0");
    assert_eq!(v["layers"].as_array().unwrap().len(), 4);
    let l = layers(&out.path().join("hello.tar.zst"));
    let script = l[1]
        .iter()
        .find(|i| i.path == "builds/worker/bin/hello.sh")
        .unwrap();
    assert_eq!((script.mode, script.uid, script.gid), (0o755, 1000, 1000));
    if cfg!(target_arch = "x86_64") {
        // Uncompressed layers: these digests depend on nothing but kiln's rules and the example's files.
        assert_eq!(
            v["context_hash"],
            "2407322bdec2a70321e0218853a9d80ad6a3a1822834ab20bf9c9c786a81c17b"
        );
        assert_eq!(
            v["image_id"],
            "sha256:09fa91ab936c288776523a1aaf7301f0ff3b6056f8d9667813ebc465c8e8f888"
        );
        assert_eq!(
            v["manifest_digest"],
            "sha256:57ae97a853ab4a40cdfda8e640499c60fffe7a3e68e2b31fb8b9194b52b44697"
        ); // The index digest: context hash, args, kiln-builder line (layer
           // format 1, no layer compression, mtime 0, git modes, linux/amd64).
        assert_eq!(
            v["index_digest"],
            "d326c62f426454296e1360aade6b6e153a638e8213c3ef386d71879c1289a8e0"
        );
    }
}

#[test]
fn vendor_images_is_reproducible_from_testdata() {
    let out = tempfile::tempdir().unwrap();
    let mut cmd = kiln();
    cmd.current_dir(repo())
        .args([
            "build",
            "testdata/images/base",
            "--format",
            "oci-dir",
            "-t",
            "kiln/base:1",
            "--layer-compression",
            "gzip",
            "-o",
        ])
        .arg(out.path().join("layout"));
    ok(&mut cmd);
    for f in ["index.json", "oci-layout"] {
        assert_eq!(
            std::fs::read(out.path().join("layout").join(f)).unwrap(),
            std::fs::read(repo().join("vendor-images").join(f)).unwrap(),
            "{f}"
        );
    }
}
