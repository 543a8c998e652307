//! Base images and image trees: the local store (`kiln store`), FROM
//! resolution, base layers passed through, config merging, multi-stage
//! builds with `COPY --from`, and `kiln build --all` over a Taskcluster tree.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn s(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

fn vendor() -> PathBuf {
    repo().join("vendor-images")
}

/// Builds `img/` of `d` with `extra` args and returns `--json` output.
fn build_json(d: &Path, out: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    json(&ok(&mut build_cmd(d, out, &args)))
}

/// `kiln store add IMAGE --store STORE [--name NAME]`; returns stdout.
fn store_add(store: &Path, image: &Path, name: Option<&str>) -> String {
    let mut c = kiln();
    c.args(["store", "add"])
        .arg(image)
        .arg("--store")
        .arg(store);
    if let Some(n) = name {
        c.args(["--name", n]);
    }
    ok(&mut c)
}

fn store_ls(store: &Path) -> serde_json::Value {
    json(&ok(kiln()
        .args(["store", "ls", "--json", "--store"])
        .arg(store)))
}

/// A base image made from kiln/base:1 with a user's environment, imported
/// into a new store as t/base:2. Returns (tree, store, manifest digest).
fn base_store() -> (tempfile::TempDir, PathBuf, String) {
    let d = tree(&[
        (
            "img/Dockerfile",
            b"FROM kiln/base:1\nCOPY tool /usr/bin/tool\nUSER worker\nWORKDIR /builds/worker\nENV HOME=/builds/worker\nLABEL a=b\nEXPOSE 80\nCMD [\"tool\"]\n",
        ),
        ("img/tool", b"#!/bin/sh\necho tool\n"),
    ]);
    chmod(&d.path().join("img/tool"), 0o755);
    let v = build_json(
        d.path(),
        "base.oci.tar",
        &["--store", vendor().to_str().unwrap()],
    );
    let store = d.path().join("store");
    let out = store_add(&store, &d.path().join("base.oci.tar"), Some("t/base:2"));
    let digest = s(&v["manifest_digest"]);
    assert_eq!(out.trim(), format!("t/base:2\t{digest}"));
    (d, store, digest)
}

#[test]
fn store_add_ls_rm_gc_keep_digests_and_free_blobs() {
    let (d, store, digest) = base_store();
    let ls = store_ls(&store);
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(s(&ls[0]["name"]), "t/base:2");
    assert_eq!(s(&ls[0]["digest"]), digest);
    // The same image from a docker-archive keeps the same manifest digest.
    ok(&mut build_cmd(
        d.path(),
        "base.tar",
        &[
            "--store",
            vendor().to_str().unwrap(),
            "--layer-compression",
            "zstd",
        ],
    ));
    let out = store_add(&store, &d.path().join("base.tar"), Some("t/again:1"));
    assert_eq!(out.trim(), format!("t/again:1\t{digest}"));
    // The store is an OCI layout other tools read by name.
    let idx: serde_json::Value =
        serde_json::from_slice(&fs::read(store.join("index.json")).unwrap()).unwrap();
    let names: Vec<String> = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| s(&m["annotations"]["io.containerd.image.name"]))
        .collect();
    assert_eq!(names, ["docker.io/t/again:1", "docker.io/t/base:2"]);

    let blobs = || fs::read_dir(store.join("blobs/sha256")).unwrap().count();
    assert_eq!(blobs(), 5, "manifest, config and three layers");
    ok(kiln()
        .args(["store", "rm", "t/base:2", "--store"])
        .arg(&store));
    assert_eq!(store_ls(&store).as_array().unwrap().len(), 1);
    let gc = ok(kiln().args(["store", "gc", "--store"]).arg(&store));
    assert!(gc.starts_with("removed 0 blobs (0 bytes)"), "{gc}");
    ok(kiln()
        .args(["store", "rm", "t/again:1", "--store"])
        .arg(&store));
    let gc = ok(kiln().args(["store", "gc", "--store"]).arg(&store));
    assert!(gc.starts_with("removed 5 blobs ("), "{gc}");
    assert_eq!(blobs(), 0);
    let err = fails(
        kiln()
            .args(["store", "rm", "t/again:1", "--store"])
            .arg(&store),
    );
    assert!(
        err.contains("t/again:1: no such image in the store"),
        "{err}"
    );
}

/// The manifest of an output.
fn manifest(image: &Path) -> kiln::image::Manifest {
    kiln::source::ImageFile::open(image)
        .unwrap()
        .summary()
        .unwrap()
        .manifest
}

fn store_manifest(store: &Path, digest: &str) -> kiln::image::Manifest {
    let hex = digest.trim_start_matches("sha256:");
    serde_json::from_slice(&fs::read(store.join("blobs/sha256").join(hex)).unwrap()).unwrap()
}

#[test]
fn from_a_store_passes_base_layers_through_and_merges_the_config() {
    let (d, store, digest) = base_store();
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/base:2\nCOPY --chown=worker:worker f ./\nLABEL c=d\n",
    );
    write(d.path(), "img/f", b"data");
    let st = store.to_str().unwrap();
    build_json(d.path(), "child", &["--store", st]);
    let base = store_manifest(&store, &digest);
    let child = manifest(&d.path().join("child"));
    assert_eq!(child.layers.len(), base.layers.len() + 1);
    for (b, c) in base.layers.iter().zip(&child.layers) {
        assert_eq!(b.digest, c.digest);
        let hex = b.digest.hex();
        assert_eq!(
            fs::read(store.join("blobs/sha256").join(hex)).unwrap(),
            fs::read(d.path().join("child/blobs/sha256").join(hex)).unwrap(),
            "base layer {} passes through byte for byte",
            b.digest
        );
    }
    let bc: kiln::image::ImageConfig = {
        let hex = base.config.digest.hex();
        serde_json::from_slice(&fs::read(store.join("blobs/sha256").join(hex)).unwrap()).unwrap()
    };
    let cc = config(&d.path().join("child"));
    assert_eq!(cc.config.user.as_deref(), Some("worker"));
    assert_eq!(cc.config.working_dir.as_deref(), Some("/builds/worker"));
    assert_eq!(cc.config.cmd, Some(vec!["tool".to_string()]));
    let labels = cc.config.labels.clone().unwrap();
    assert_eq!(labels.get("a").map(String::as_str), Some("b"));
    assert_eq!(labels.get("c").map(String::as_str), Some("d"));
    assert!(cc.config.exposed_ports.unwrap().contains_key("80/tcp"));
    assert_eq!(
        cc.config.env,
        Some(vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            "LANG=C.UTF-8".to_string(),
            "HOME=/builds/worker".to_string()
        ])
    );
    assert_eq!(cc.history[..bc.history.len()], bc.history[..]);
    assert_eq!(cc.history.len(), bc.history.len() + 2);
    assert_eq!(
        cc.rootfs.diff_ids[..bc.rootfs.diff_ids.len()],
        bc.rootfs.diff_ids[..]
    );
    // The COPY landed in the inherited WORKDIR, owned by the base's worker user.
    let top = layers(&d.path().join("child")).pop().unwrap();
    let f = top.iter().find(|i| i.path == "builds/worker/f").unwrap();
    assert_eq!(
        (f.uid, f.gid, f.data.as_slice()),
        (1000, 1000, &b"data"[..])
    );
    // The parent directories keep the base's metadata.
    let w = top.iter().find(|i| i.path == "builds/worker/").unwrap();
    assert_eq!(w.mode & 0o7777, 0o755);
}

#[test]
fn from_resolves_digests_and_args_and_searches_stores_in_order() {
    let (d, store, digest) = base_store();
    let st = store.to_str().unwrap();
    write(d.path(), "img/f", b"x");
    // The HASH convention: <registry>/<name>@<digest>; the name is not consulted.
    write(
        d.path(),
        "img/Dockerfile",
        format!("FROM registry.example/anything@{digest}\nCOPY f /f\n").as_bytes(),
    );
    build_json(d.path(), "by-digest.tar", &["--store", st]);
    let by_digest = manifest(&d.path().join("by-digest.tar"));
    write(
        d.path(),
        "img/Dockerfile",
        b"ARG BASE=t/base:2\nFROM $BASE\nCOPY f /f\n",
    );
    build_json(d.path(), "by-arg.tar", &["--store", st]);
    assert_eq!(manifest(&d.path().join("by-arg.tar")), by_digest);

    // A miss names the reference, every store searched, in order, and the fix.
    let mut c = build_cmd(
        d.path(),
        "x.tar",
        &["--store", st, "--arg", "BASE=t/other:1"],
    );
    c.env("KILN_STORE", d.path().join("envstore"))
        .env("XDG_CACHE_HOME", d.path().join("cache"));
    let err = fails(&mut c);
    assert!(err.contains("base image t/other:1"), "{err}");
    let order = [
        format!("1. {st} (--store)"),
        format!(
            "2. {} ($KILN_STORE, absent)",
            d.path().join("envstore").display()
        ),
        format!(
            "3. {} (user cache, absent)",
            d.path().join("cache/kiln/store").display()
        ),
    ];
    let mut at = 0;
    for o in &order {
        let i = err[at..]
            .find(o.as_str())
            .unwrap_or_else(|| panic!("{o} in {err}"));
        at += i;
    }
    assert!(err.contains("kiln store add"), "{err}");
    assert!(!d.path().join("x.tar").exists());

    // The first store holding the name wins: --store, then $KILN_STORE.
    let other = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY o /o\n"),
        ("img/o", b"other"),
    ]);
    ok(&mut build_cmd(other.path(), "o.oci.tar", &[]));
    let store2 = other.path().join("store2");
    store_add(&store2, &other.path().join("o.oci.tar"), Some("t/base:2"));
    let first_layer = |extra: &[&str], env: Option<&Path>| {
        // (An OCI archive: a docker-archive would recompress the zstd base.)
        let mut c = build_cmd(d.path(), "pick.oci.tar", extra);
        if let Some(e) = env {
            c.env("KILN_STORE", e);
        }
        ok(&mut c);
        manifest(&d.path().join("pick.oci.tar")).layers[0]
            .digest
            .clone()
    };
    let base_first = by_digest.layers[0].digest.clone();
    let s2 = store2.to_str().unwrap();
    let other_first = manifest(&other.path().join("o.oci.tar")).layers[0]
        .digest
        .clone();
    assert_eq!(
        first_layer(&["--store", st, "--store", s2], None),
        base_first
    );
    assert_eq!(
        first_layer(&["--store", s2, "--store", st], None),
        other_first
    );
    assert_eq!(first_layer(&["--store", st], Some(&store2)), base_first);
    assert_eq!(first_layer(&[], Some(&store2)), other_first);
}

#[test]
fn from_platform_must_match_the_store() {
    let (d, store, _) = base_store();
    let st = store.to_str().unwrap();
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM --platform=$BUILDPLATFORM t/base:2\nENV X=1\n",
    );
    build_json(d.path(), "ok.tar", &["--store", st]);
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM --platform=linux/s390x t/base:2\nENV X=1\n",
    );
    let err = fails(&mut build_cmd(d.path(), "no.tar", &["--store", st]));
    assert!(err.contains("Dockerfile:1:"), "{err}");
    assert!(err.contains(", not linux/s390x"), "{err}");
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM --platform=linux t/base:2\n",
    );
    let err = fails(&mut build_cmd(d.path(), "no.tar", &["--store", st]));
    assert!(err.contains("expected OS/ARCH"), "{err}");
}

#[test]
fn a_corrupt_store_blob_is_named_and_never_used() {
    let (d, store, digest) = base_store();
    let m = store_manifest(&store, &digest);
    let layer = &m.layers[1].digest;
    let p = store.join("blobs/sha256").join(layer.hex());
    let mut b = fs::read(&p).unwrap();
    let n = b.len();
    b[n / 2] ^= 0xff;
    fs::write(&p, &b).unwrap();
    write(d.path(), "img/Dockerfile", b"FROM t/base:2\nENV X=1\n");
    let err = fails(&mut build_cmd(
        d.path(),
        "bad.tar",
        &["--store", store.to_str().unwrap()],
    ));
    assert!(
        err.contains(&format!("blob {layer} does not match its digest or size")),
        "{err}"
    );
    assert!(!d.path().join("bad.tar").exists());
}

const MULTI: &str = "FROM t/base:2 AS builder
COPY src/ /work/
COPY secret.txt /work/secret.txt

FROM scratch AS unused
COPY not-there /x

FROM scratch
COPY --from=builder /work/out.bin /app/out.bin
COPY --from=0 /etc/os-release /etc/
COPY --from=t/base:2 /usr/bin/tool /bin/tool
";

#[test]
fn multi_stage_copies_only_what_it_names_and_builds_only_needed_stages() {
    let (d, store, _) = base_store();
    let st = store.to_str().unwrap();
    write(d.path(), "img/Dockerfile", MULTI.as_bytes());
    write(d.path(), "img/src/out.bin", b"built output");
    write(d.path(), "img/src/other.o", b"intermediate");
    write(d.path(), "img/secret.txt", b"secret");
    build_json(d.path(), "m.tar", &["--store", st]);
    let ls = layers(&d.path().join("m.tar"));
    let paths: Vec<Vec<(String, Vec<u8>)>> = ls
        .iter()
        .map(|l| l.iter().map(|i| (i.path.clone(), i.data.clone())).collect())
        .collect();
    let os_release = fs::read(repo().join("testdata/images/base/etc/os-release")).unwrap();
    assert_eq!(
        paths,
        vec![
            vec![
                ("app/".to_string(), vec![]),
                ("app/out.bin".to_string(), b"built output".to_vec())
            ],
            vec![
                ("etc/".to_string(), vec![]),
                ("etc/os-release".to_string(), os_release)
            ],
            vec![
                ("bin/".to_string(), vec![]),
                ("bin/tool".to_string(), b"#!/bin/sh\necho tool\n".to_vec())
            ],
        ]
    );
    let tool = &ls[2][1];
    assert_eq!((tool.mode & 0o7777, tool.uid), (0o755, 0));

    // --target builds the named stage: the base's three layers plus its own two.
    let v = build_json(d.path(), "b.tar", &["--store", st, "--target", "builder"]);
    assert_eq!(v["layers"].as_array().unwrap().len(), 3 + 2);
    let err = fails(&mut build_cmd(
        d.path(),
        "u.tar",
        &["--store", st, "--target", "unused"],
    ));
    assert!(
        err.contains("not-there: not found in build context"),
        "{err}"
    );
    let err = fails(&mut build_cmd(
        d.path(),
        "u.tar",
        &["--store", st, "--target", "nope"],
    ));
    assert!(err.contains("the stages are: builder, unused"), "{err}");

    // FROM an earlier stage continues it: its base, its layers, its config.
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/base:2 AS builder\nCOPY src/ /work/\nFROM builder AS final\nCOPY secret.txt /s\n",
    );
    build_json(d.path(), "f.tar", &["--store", st]);
    let b = manifest(&d.path().join("b.tar"));
    let f = manifest(&d.path().join("f.tar"));
    assert_eq!(f.layers.len(), 3 + 1 + 1);
    assert_eq!(f.layers[..4], b.layers[..4]);
    assert_eq!(
        config(&d.path().join("f.tar")).config.user.as_deref(),
        Some("worker")
    );

    write(
        d.path(),
        "img/Dockerfile",
        b"FROM scratch\nCOPY --from=t/missing:1 /a /a\n",
    );
    let err = fails(&mut build_cmd(d.path(), "x.tar", &["--store", st]));
    assert!(
        err.contains("Dockerfile:2: COPY --from=t/missing:1 /a /a: base image t/missing:1"),
        "{err}"
    );
}

/// A tar archive holding `(name, data)` files.
fn tar_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn copy_from_an_image_applies_whiteouts_and_opaque_directories() {
    // A base whose second layer deletes a/gone and replaces o/ (made by
    // kiln itself: ADD extracts the whiteout markers as they are).
    let d = tree(&[
        (
            "img/Dockerfile",
            b"FROM scratch\nCOPY tree/ /\nADD wh.tar /\n",
        ),
        ("img/tree/a/gone", b"1"),
        ("img/tree/a/kept", b"2"),
        ("img/tree/o/old", b"3"),
    ]);
    fs::write(
        d.path().join("img/wh.tar"),
        tar_of(&[
            ("a/.wh.gone", b""),
            ("o/.wh..wh..opq", b""),
            ("o/new", b"4"),
        ]),
    )
    .unwrap();
    ok(&mut build_cmd(d.path(), "wh.oci.tar", &[]));
    let store = d.path().join("store");
    store_add(&store, &d.path().join("wh.oci.tar"), Some("t/wh:1"));
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM scratch\nCOPY --from=t/wh:1 / /copy/\n",
    );
    ok(&mut build_cmd(
        d.path(),
        "out.tar",
        &["--store", store.to_str().unwrap()],
    ));
    let items: Vec<(String, Vec<u8>)> = layers(&d.path().join("out.tar"))
        .pop()
        .unwrap()
        .into_iter()
        .map(|i| (i.path, i.data))
        .collect();
    assert_eq!(
        items,
        vec![
            ("copy/".to_string(), vec![]),
            ("copy/a/".to_string(), vec![]),
            ("copy/a/kept".to_string(), b"2".to_vec()),
            ("copy/o/".to_string(), vec![]),
            ("copy/o/new".to_string(), b"4".to_vec()),
        ]
    );
}

/// A Taskcluster tree: base → parent → child, declared in kind.yml.
fn taskcluster_tree() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    let t = d.path();
    write(
        t,
        "taskcluster/kinds/docker-image/kind.yml",
        b"loader: taskgraph.loader.transform:loader\ntransforms:\n  - taskgraph.transforms.docker_image:transforms\ntasks:\n  base:\n    symbol: I(b)\n  parent:\n    parent: base\n    args:\n      FLAVOR: sweet\n  child:\n    parent: parent\n",
    );
    write(
        t,
        "taskcluster/docker/base/Dockerfile",
        b"FROM kiln/base:1\nCOPY b.txt /b.txt\n",
    );
    write(t, "taskcluster/docker/base/b.txt", b"b");
    write(
        t,
        "taskcluster/docker/parent/Dockerfile",
        b"# %ARG DOCKER_IMAGE_PARENT\nFROM $DOCKER_IMAGE_PARENT\nARG FLAVOR\nENV FLAVOR=$FLAVOR\nCOPY p.txt /p.txt\n",
    );
    write(t, "taskcluster/docker/parent/p.txt", b"p");
    write(
        t,
        "taskcluster/docker/child/Dockerfile",
        b"# %ARG DOCKER_IMAGE_PARENT\nFROM $DOCKER_IMAGE_PARENT\nCOPY c.txt /c.txt\n",
    );
    write(t, "taskcluster/docker/child/c.txt", b"c");
    d
}

fn build_all_cmd(t: &Path) -> Command {
    let mut c = kiln();
    c.env("XDG_CACHE_HOME", t.join("cache"))
        .args(["build", "--all"])
        .arg(t.join("taskcluster/docker"))
        .arg("--topsrcdir")
        .arg(t)
        .arg("--out-dir")
        .arg(t.join("out"))
        .arg("--store")
        .arg(vendor());
    c
}

/// `kiln build --all --json` of the tree; returns name → line.
fn build_all(t: &Path) -> std::collections::BTreeMap<String, serde_json::Value> {
    json(&ok(build_all_cmd(t).arg("--json")))
        .as_array()
        .unwrap()
        .iter()
        .map(|l| (s(&l["name"]), l.clone()))
        .collect()
}

#[test]
fn a_three_level_tree_rebuilds_exactly_what_a_change_touches() {
    let d = taskcluster_tree();
    let t = d.path();
    let first = build_all(t);
    let names: Vec<&String> = first.keys().collect();
    assert_eq!(names, ["base", "child", "parent"]);
    for l in first.values() {
        assert_eq!(s(&l["status"]), "built");
    }
    // The child stands on the parent, which stands on base, which stands on kiln/base:1.
    let child = manifest(&t.join("out/child.tar"));
    let parent = manifest(&t.join("out/parent.tar"));
    let base = manifest(&t.join("out/base.tar"));
    assert_eq!(child.layers[..parent.layers.len()], parent.layers[..]);
    assert_eq!(parent.layers[..base.layers.len()], base.layers[..]);
    assert_eq!(child.layers.len(), base.layers.len() + 2);
    let env = config(&t.join("out/child.tar")).config.env.unwrap();
    assert!(env.contains(&"FLAVOR=sweet".to_string()), "{env:?}");

    // The text output: name, context hash, manifest digest, status, time.
    let text = ok(&mut build_all_cmd(t));
    let line = text.lines().find(|l| l.starts_with("child\t")).unwrap();
    let cols: Vec<&str> = line.split('\t').collect();
    assert_eq!(
        cols[..4],
        [
            "child",
            s(&first["child"]["context_hash"]).as_str(),
            s(&first["child"]["manifest_digest"]).as_str(),
            "up to date"
        ]
    );
    assert!(cols[4].ends_with('s'), "{line}");

    let again = build_all(t);
    for (name, l) in &again {
        assert_eq!(s(&l["status"]), "up to date", "{name}");
        assert_eq!(l["manifest_digest"], first[name]["manifest_digest"]);
    }

    write(t, "taskcluster/docker/parent/p.txt", b"p2");
    let third = build_all(t);
    assert_eq!(s(&third["base"]["status"]), "up to date");
    assert_eq!(
        third["base"]["manifest_digest"],
        first["base"]["manifest_digest"]
    );
    for name in ["parent", "child"] {
        assert_eq!(s(&third[name]["status"]), "built", "{name}");
        assert_ne!(
            third[name]["manifest_digest"], first[name]["manifest_digest"],
            "{name}"
        );
        assert_ne!(third[name]["digest"], first[name]["digest"], "{name}");
    }
    // The child's own files did not change; its context hash did, through
    // DOCKER_IMAGE_PARENT (as in taskgraph).
    assert_ne!(
        third["child"]["context_hash"],
        first["child"]["context_hash"]
    );
}

#[test]
fn tree_cycles_and_missing_parents_are_named() {
    let d = taskcluster_tree();
    let t = d.path();
    let kind = "taskcluster/kinds/docker-image/kind.yml";
    write(
        t,
        kind,
        b"tasks:\n  base: {}\n  parent:\n    parent: child\n  child:\n    parent: parent\n",
    );
    let err = fails(&mut build_all_cmd(t));
    assert!(
        err.contains("the images' parents form a cycle: child -> parent -> child"),
        "{err}"
    );
    write(
        t,
        kind,
        b"tasks:\n  base: {}\n  parent:\n    parent: nothere\n  child:\n    parent: parent\n",
    );
    let err = fails(&mut build_all_cmd(t));
    assert!(err.contains("image parent: its parent nothere"), "{err}");
    assert!(
        !t.join("out/base.tar").exists(),
        "nothing is built when the graph is wrong"
    );
}

#[test]
fn without_kind_yml_a_from_naming_a_tree_image_makes_it_the_parent() {
    let d = taskcluster_tree();
    let t = d.path();
    fs::remove_dir_all(t.join("taskcluster/kinds")).unwrap();
    write(
        t,
        "taskcluster/docker/child/Dockerfile",
        b"FROM base\nCOPY c.txt /c.txt\n",
    );
    fs::remove_dir_all(t.join("taskcluster/docker/parent")).unwrap();
    let lines = build_all(t);
    assert_eq!(lines.len(), 2);
    let child = manifest(&t.join("out/child.tar"));
    let base = manifest(&t.join("out/base.tar"));
    assert_eq!(child.layers[..base.layers.len()], base.layers[..]);
}

#[test]
fn a_base_layer_is_scanned_and_verified_once_and_a_later_change_is_still_caught() {
    let (d, store, digest) = base_store();
    let st = store.to_str().unwrap();
    let m = store_manifest(&store, &digest);
    let cache = d.path().join("cache");
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/base:2\nCOPY f /etc/f\n",
    );
    write(d.path(), "img/f", b"file");
    let run = |out: &str| {
        let mut c = build_cmd(d.path(), out, &["--store", st, "--no-index"]);
        c.env("XDG_CACHE_HOME", &cache);
        c
    };
    ok(&mut run("one.tar"));
    // One record per base layer, named by its digest.
    for l in &m.layers {
        let rec = cache.join("kiln/scans").join(l.digest.hex());
        assert!(rec.is_file(), "no scan record {}", rec.display());
    }
    ok(&mut run("two.tar"));
    assert_eq!(
        fs::read(d.path().join("one.tar")).unwrap(),
        fs::read(d.path().join("two.tar")).unwrap(),
        "a build from the records writes the same bytes"
    );
    // Same size, one byte flipped: the file's ctime moved, the record no
    // longer stands, and the blob is verified again.
    let layer = &m.layers[1].digest;
    let p = store.join("blobs/sha256").join(layer.hex());
    let mut b = fs::read(&p).unwrap();
    let n = b.len();
    b[n / 2] ^= 0xff;
    fs::write(&p, &b).unwrap();
    let err = fails(&mut run("bad.tar"));
    assert!(
        err.contains(&format!("blob {layer} does not match its digest or size")),
        "{err}"
    );
    assert!(!d.path().join("bad.tar").exists());
}

#[test]
fn a_child_saying_from_docker_image_parent_with_no_arg_builds_under_all() {
    // taskgraph's decision and python images: no `# %ARG`, no `ARG`.
    let d = taskcluster_tree();
    let t = d.path();
    write(
        t,
        "taskcluster/docker/child/Dockerfile",
        b"FROM $DOCKER_IMAGE_PARENT\nCOPY c.txt /c.txt\n",
    );
    let lines = build_all(t);
    let child = &lines["child"];
    let l = layers(Path::new(&s(&child["output"])));
    let paths: Vec<String> = l.into_iter().flatten().map(|i| i.path).collect();
    for p in ["b.txt", "p.txt", "c.txt"] {
        assert!(paths.iter().any(|x| x == p), "{p} in {paths:?}");
    }
    // Alone, with nothing giving the variable: the error names it.
    let err = fails(
        kiln()
            .arg("build")
            .arg(t.join("taskcluster/docker/child"))
            .arg("--topsrcdir")
            .arg(t)
            .args(["--no-index", "-o"])
            .arg(t.join("alone.tar")),
    );
    assert!(
        err.contains("FROM names no image: $DOCKER_IMAGE_PARENT is empty or not set")
            && err.contains("--build-arg DOCKER_IMAGE_PARENT="),
        "{err}"
    );
}

#[test]
fn tags_follow_the_registry_file_of_taskcluster_docker() {
    // taskgraph's docker_image(): an image's REGISTRY, else
    // taskcluster/docker/REGISTRY; VERSION, else latest.
    let d = taskcluster_tree();
    let t = d.path();
    write(t, "taskcluster/docker/REGISTRY", b"registry.example/tc\n");
    write(
        t,
        "taskcluster/docker/base/REGISTRY",
        b"other.example/own\n",
    );
    write(t, "taskcluster/docker/parent/VERSION", b"5.0.1\n");
    let lines = build_all(t);
    assert_eq!(s(&lines["base"]["tag"]), "other.example/own/base:latest");
    assert_eq!(
        s(&lines["parent"]["tag"]),
        "registry.example/tc/parent:5.0.1"
    );
    assert_eq!(
        s(&lines["child"]["tag"]),
        "registry.example/tc/child:latest"
    );
}

/// The Taskcluster test tree with two more images: `broken` (its
/// Dockerfile is `broken`) and its child `brokenkid`.
fn broken_tree(broken: &[u8]) -> tempfile::TempDir {
    let d = taskcluster_tree();
    let t = d.path();
    write(
        t,
        "taskcluster/kinds/docker-image/kind.yml",
        b"tasks:\n  base: {}\n  parent:\n    parent: base\n    args:\n      FLAVOR: sweet\n  child:\n    parent: parent\n  broken: {}\n  brokenkid:\n    parent: broken\n",
    );
    write(t, "taskcluster/docker/broken/Dockerfile", broken);
    write(
        t,
        "taskcluster/docker/brokenkid/Dockerfile",
        b"FROM $DOCKER_IMAGE_PARENT\nCOPY k.txt /k.txt\n",
    );
    write(t, "taskcluster/docker/brokenkid/k.txt", b"k");
    d
}

#[test]
fn keep_going_builds_what_does_not_depend_on_a_failed_image() {
    let d = broken_tree(b"FROM nowhere/missing:1\nRUN true\n");
    let t = d.path();
    let out = run(build_all_cmd(t).args(["--keep-going", "--json"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("1 image(s) failed and 1 blocked; 3 built"),
        "{err}"
    );
    let lines = json(&String::from_utf8_lossy(&out.stdout));
    let status = |name: &str| {
        let l = lines
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {lines}"));
        (s(&l["status"]), s(&l["error"]))
    };
    for ok in ["base", "parent", "child"] {
        assert_eq!(status(ok).0, "built", "{lines}");
        assert!(t.join("out").join(format!("{ok}.tar")).exists());
    }
    let (st, e) = status("broken");
    assert_eq!(st, "failed");
    assert!(e.contains("nowhere/missing:1"), "{e}");
    assert_eq!(
        status("brokenkid"),
        ("blocked".into(), "its parent broken was not built".into())
    );
    assert!(!t.join("out/brokenkid.tar").exists());
}

/// `--all` plans every image before it builds one: a base that no store
/// has fails the run before anything is built, and the error names the
/// image, its Dockerfile line and every image it blocks.
#[test]
fn a_missing_base_fails_all_before_anything_is_built_naming_what_it_blocks() {
    let d = broken_tree(b"# a comment\nFROM nowhere/missing:1\nRUN true\n");
    let t = d.path();
    let err = fails(&mut build_all_cmd(t));
    assert!(
        err.contains("nothing was built: image broken: ")
            && err.contains(
                "taskcluster/docker/broken/Dockerfile:2: nowhere/missing:1 is in no store"
            )
            && err.contains("These images cannot be built: broken, brokenkid")
            && err.contains("--keep-going"),
        "{err}"
    );
    let out = t.join("out");
    let written: Vec<_> = fs::read_dir(&out)
        .map(|r| r.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(written.is_empty(), "{written:?}");
}
