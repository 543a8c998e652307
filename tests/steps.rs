//! The step cache: a change to each key input invalidates that step and
//! every later one and nothing before it; cached and fresh builds give the
//! same bytes; concurrent builds share one cache; a corrupt cached layer is
//! rebuilt, never served; `kiln cache ls|prune` and `store gc`; and the
//! Debian image rebuilt after its last ADD changed.

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

/// `kiln build --json` of `dir/img` (default: indexed, so the step cache
/// is on) sharing `cache`; returns the JSON.
fn build_in(
    dir: &Path,
    store: &Path,
    cache: &Path,
    out: &str,
    extra: &[&str],
) -> serde_json::Value {
    json(&ok(kiln()
        .env("XDG_CACHE_HOME", cache)
        .arg("build")
        .arg(dir.join("img"))
        .arg("--store")
        .arg(store)
        .arg("-o")
        .arg(dir.join(out))
        .arg("--json")
        // The template's RUN asks for the host's network.
        .args(["--allow", "network.host"])
        .args(extra)))
}

fn cached(v: &serde_json::Value) -> Vec<bool> {
    v["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["cached"].as_bool().unwrap())
        .collect()
}

const TEMPLATE: &str = "FROM t/busybox:1
ARG A=1
ENV E=1
COPY one.txt /one.txt
RUN echo \"$A $E\" > /run1 && cat /one.txt >> /run1
USER root
WORKDIR /w
RUN --network=host --mount=type=cache,id=c1,target=/cache echo two > /run2
COPY two.txt /two.txt
SHELL [\"/bin/sh\", \"-c\"]
RUN cat /two.txt > /run3
";

#[test]
fn each_key_input_invalidates_its_step_and_every_later_one_and_nothing_before() {
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    let cache = d.path().join("cache");
    let setup = |df: &str, one: &str, two: &str| {
        write(d.path(), "img/Dockerfile", df.as_bytes());
        write(d.path(), "img/one.txt", one.as_bytes());
        write(d.path(), "img/two.txt", two.as_bytes());
    };
    setup(TEMPLATE, "one\n", "two\n");
    // Layer steps: COPY one, RUN 1, WORKDIR /w, RUN 2, COPY two, RUN 3.
    let first = build_in(d.path(), &store, &cache, "a.tar", &[]);
    assert_eq!(cached(&first), [false; 6]);
    let again = build_in(d.path(), &store, &cache, "b.tar", &["--no-cache"]);
    assert_eq!(cached(&again), [false; 6], "--no-cache looks nothing up");
    assert_eq!(first["manifest_digest"], again["manifest_digest"]);
    // (what changes, Dockerfile, one.txt, two.txt, flags, the first step that misses)
    type Case<'a> = (&'a str, String, &'a str, &'a str, Vec<&'a str>, usize);
    let cases: Vec<Case> = vec![
        (
            "a COPY source's content",
            TEMPLATE.into(),
            "ONE\n",
            "two\n",
            vec![],
            0,
        ),
        (
            "a later COPY source's content",
            TEMPLATE.into(),
            "one\n",
            "TWO\n",
            vec![],
            4,
        ),
        (
            "a build ARG",
            TEMPLATE.into(),
            "one\n",
            "two\n",
            vec!["--build-arg", "A=2"],
            1,
        ),
        (
            "an ENV",
            TEMPLATE.replace("ENV E=1", "ENV E=2"),
            "one\n",
            "two\n",
            vec![],
            0,
        ),
        (
            "the RUN command",
            TEMPLATE.replace("echo \"$A $E\"", "echo \"$A  $E\""),
            "one\n",
            "two\n",
            vec![],
            1,
        ),
        (
            "USER",
            TEMPLATE.replace("USER root", "USER 0:0"),
            "one\n",
            "two\n",
            vec![],
            2,
        ),
        (
            "WORKDIR",
            TEMPLATE.replace("WORKDIR /w", "WORKDIR /x"),
            "one\n",
            "two\n",
            vec![],
            2,
        ),
        (
            "a mount's id",
            TEMPLATE.replace("id=c1", "id=c2"),
            "one\n",
            "two\n",
            vec![],
            3,
        ),
        (
            "RUN's network",
            TEMPLATE.replace("--network=host", "--network=none"),
            "one\n",
            "two\n",
            vec![],
            3,
        ),
        (
            "SHELL",
            TEMPLATE.replace(
                "SHELL [\"/bin/sh\", \"-c\"]",
                "SHELL [\"/bin/sh\", \"-e\", \"-c\"]",
            ),
            "one\n",
            "two\n",
            vec![],
            5,
        ),
        (
            "the layer timestamp",
            TEMPLATE.into(),
            "one\n",
            "two\n",
            vec!["--timestamp", "1"],
            0,
        ),
    ];
    for (what, df, one, two, flags, first_miss) in cases {
        setup(&df, one, two);
        let v = build_in(d.path(), &store, &cache, "c.tar", &flags);
        let want: Vec<bool> = (0..6).map(|i| i < first_miss).collect();
        assert_eq!(cached(&v), want, "changing {what}");
        // Back to the original: everything hits, and the bytes are the first build's.
        setup(TEMPLATE, "one\n", "two\n");
        let back = build_in(d.path(), &store, &cache, "d.tar", &["--no-cache"]);
        assert_eq!(back["manifest_digest"], first["manifest_digest"]);
    }
    // A cached build and a fresh one give identical bytes (the index is
    // bypassed with a new tag, so the steps come from the cache).
    // (A fresh index: the image is not found there, its steps are.)
    let index2 = d.path().join("index2");
    let hit = build_in(
        d.path(),
        &store,
        &cache,
        "e.tar",
        &["--index", index2.to_str().unwrap()],
    );
    assert_eq!(cached(&hit), [true; 6]);
    let fresh = build_in(
        d.path(),
        &store,
        &d.path().join("fresh-cache"),
        "f.tar",
        &[],
    );
    assert_eq!(cached(&fresh), [false; 6]);
    assert_eq!(hit["manifest_digest"], fresh["manifest_digest"]);
    if fs::read(d.path().join("e.tar")).unwrap() != fs::read(d.path().join("f.tar")).unwrap() {
        let diff = run(kiln()
            .arg("diff")
            .arg(d.path().join("e.tar"))
            .arg(d.path().join("f.tar")));
        panic!(
            "cached and fresh outputs differ:\n{}",
            String::from_utf8_lossy(&diff.stdout)
        );
    }
}

#[test]
fn cached_lines_concurrent_builds_and_a_corrupt_layer() {
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    let cache = d.path().join("cache");
    write(d.path(), "img/one.txt", b"one\n");
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nCOPY one.txt /one.txt\nRUN cat /one.txt /one.txt > /two.txt\n",
    );
    // Two builds filling the same cache at once.
    let spawn = |out: &str| {
        kiln()
            .env("XDG_CACHE_HOME", &cache)
            .arg("build")
            .arg(d.path().join("img"))
            .arg("--store")
            .arg(&store)
            .arg("-o")
            .arg(d.path().join(out))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn("a.tar"), spawn("b.tar"));
    for c in [a, b] {
        let out = c.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // CACHED lines as BuildKit prints them.
    let out = run(kiln()
        .env("XDG_CACHE_HOME", &cache)
        .arg("build")
        .arg(d.path().join("img"))
        .args(["--store"])
        .arg(&store)
        .args(["--index"])
        .arg(d.path().join("index2"))
        .args(["--progress", "plain", "-o"])
        .arg(d.path().join("c.tar")));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("kiln: #2 CACHED COPY one.txt /one.txt"),
        "{err}"
    );
    assert!(
        err.contains("kiln: #3 CACHED RUN cat /one.txt /one.txt > /two.txt"),
        "{err}"
    );
    // kiln cache ls lists both steps.
    let ls = json(&ok(kiln()
        .env("XDG_CACHE_HOME", &cache)
        .args(["cache", "ls", "--json"])));
    assert_eq!(ls.as_array().unwrap().len(), 2, "{ls}");
    // Corrupt the RUN layer in the store: the step runs again, never served.
    let run_entry = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            e["entry"]["instruction"]
                .as_str()
                .unwrap()
                .starts_with("RUN")
        })
        .unwrap()
        .clone();
    let digest = run_entry["entry"]["layer"]["digest"].as_str().unwrap()[7..].to_string();
    let blob = cache.join("kiln/store/blobs/sha256").join(&digest);
    let mut bytes = fs::read(&blob).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&blob, &bytes).unwrap();
    let v = json(&ok(kiln()
        .env("XDG_CACHE_HOME", &cache)
        .arg("build")
        .arg(d.path().join("img"))
        .arg("--store")
        .arg(&store)
        .args(["--index"])
        .arg(d.path().join("index3"))
        .args(["--json", "-o"])
        .arg(d.path().join("d.tar"))));
    assert_eq!(cached(&v), [true, false], "{v}");
    ok(kiln().arg("verify").arg(d.path().join("d.tar")));
    assert_eq!(
        fs::read(d.path().join("a.tar")).unwrap().len(),
        fs::read(d.path().join("d.tar")).unwrap().len()
    );
    // store gc keeps cached layers; after cache prune (and the images'
    // names gone) it frees them.
    let user_store = cache.join("kiln/store");
    ok(kiln().env("XDG_CACHE_HOME", &cache).args(["store", "gc"]));
    assert!(blob.exists(), "a cached layer is kept");
    let names = json(&ok(kiln()
        .env("XDG_CACHE_HOME", &cache)
        .args(["store", "ls", "--json"])));
    for n in names.as_array().unwrap() {
        ok(kiln()
            .env("XDG_CACHE_HOME", &cache)
            .args(["store", "rm", n["name"].as_str().unwrap()]));
    }
    ok(kiln().env("XDG_CACHE_HOME", &cache).args(["store", "gc"]));
    assert!(blob.exists(), "still named by a step cache entry");
    let p = ok(kiln()
        .env("XDG_CACHE_HOME", &cache)
        .args(["cache", "prune", "--keep-bytes", "0"]));
    assert!(p.starts_with("removed 2 cached step(s)"), "{p}");
    ok(kiln().env("XDG_CACHE_HOME", &cache).args(["store", "gc"]));
    assert!(!blob.exists());
    assert_eq!(
        fs::read_dir(user_store.join("blobs/sha256"))
            .unwrap()
            .count(),
        0
    );
}

#[test]
fn the_debian_image_rebuilt_after_its_last_add_changed_reuses_the_apt_step() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    if debian_base(d.path(), &cache).is_none() {
        return;
    }
    let store = d.path().join("store");
    ok(kiln()
        .args(["store", "add"])
        .arg(d.path().join("base.tar"))
        .arg("--store")
        .arg(&store));
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM debian:bookworm-minbase
RUN groupadd -g 1000 worker && useradd -u 1000 -g 1000 -d /builds/worker -s /bin/bash -m worker
WORKDIR /builds/worker
RUN apt-get update && apt-get install -y --no-install-recommends git python3-requests && rm -rf /var/lib/apt/lists/*
ADD hello.txt /builds/worker/hello.txt
",
    );
    write(d.path(), "img/hello.txt", b"hello 1\n");
    let t0 = std::time::Instant::now();
    let a = build_in(d.path(), &store, &cache, "a.oci.tar", &[]);
    let first = t0.elapsed();
    write(d.path(), "img/hello.txt", b"hello 2\n");
    let t1 = std::time::Instant::now();
    let b = build_in(d.path(), &store, &cache, "b.oci.tar", &[]);
    let second = t1.elapsed();
    eprintln!("first build {first:?}, rebuild after the ADD changed {second:?}");
    assert_eq!(cached(&a), [false, false, false]);
    assert_eq!(cached(&b), [true, true, false], "{b}");
    // Every earlier layer byte-identical, the last one new.
    let (la, lb) = (
        a["layers"].as_array().unwrap(),
        b["layers"].as_array().unwrap(),
    );
    assert_eq!(la.len(), lb.len());
    for i in 0..la.len() - 1 {
        assert_eq!(la[i]["digest"], lb[i]["digest"], "layer {i}");
    }
    assert_ne!(la[la.len() - 1]["digest"], lb[lb.len() - 1]["digest"]);
    let _ = Command::new("true").status();
}

#[test]
fn a_builder_stages_steps_are_cached_too() {
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    let cache = d.path().join("cache");
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1 AS build\nRUN head -c 1000 /dev/urandom > /artifact\n\nFROM t/busybox:1\nCOPY --from=build /artifact /artifact\n",
    );
    let a = build_in(d.path(), &store, &cache, "a.tar", &[]);
    assert_eq!(cached(&a), [false, false]);
    // A fresh index: the image must be assembled again, its steps are not run.
    let index2 = d.path().join("index2");
    let b = build_in(
        d.path(),
        &store,
        &cache,
        "b.tar",
        &["--index", index2.to_str().unwrap()],
    );
    assert_eq!(cached(&b), [true, true]);
    // The random artifact is the first build's: the builder RUN did not run again.
    assert_eq!(a["manifest_digest"], b["manifest_digest"]);
}

#[test]
fn a_file_name_cannot_forge_another_tree_s_step_key() {
    // COPY of {a: "A", b: "B"} against COPY of one file named
    // "a\t644\t0\t0\tfile:<sha256 of A>:1\nb" holding "B": the step key
    // listed paths raw, so both described themselves in the same bytes
    // and the second build took the first one's layer.
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let store = busybox_store(d.path());
    // (At the root: a name cannot hold the `/` of a parent directory.)
    let df = b"FROM t/busybox:1\nCOPY src/ /\n";
    write(d.path(), "img/Dockerfile", df);
    write(d.path(), "img/src/a", b"A");
    write(d.path(), "img/src/b", b"B");
    let first = build_in(d.path(), &store, &cache, "a.tar", &[]);
    assert_eq!(cached(&first), [false]);
    let forged = format!("a\t644\t0\t0\tfile:{}:1\nb", sha256_hex(b"A"));
    fs::remove_dir_all(d.path().join("img/src")).unwrap();
    write(d.path(), &format!("img/src/{forged}"), b"B");
    let second = build_in(d.path(), &store, &cache, "b.tar", &[]);
    assert_eq!(cached(&second), [false], "{second}");
    let l = layers(&d.path().join("b.tar"));
    let names: Vec<&str> = l.last().unwrap().iter().map(|i| i.path.as_str()).collect();
    assert!(names.contains(&forged.as_str()), "{names:?}");
    assert!(!names.contains(&"b"), "{names:?}");
}

#[test]
fn all_with_no_index_neither_looks_up_nor_records_steps() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let store = busybox_store(d.path());
    write(
        d.path(),
        "t/taskcluster/docker/a/Dockerfile",
        b"FROM t/busybox:1\nRUN echo a > /a\n",
    );
    let all = |extra: &[&str]| {
        run(kiln()
            .env("XDG_CACHE_HOME", &cache)
            .arg("build")
            .arg(d.path().join("t/taskcluster/docker"))
            .arg("--all")
            .arg("--topsrcdir")
            .arg(d.path().join("t"))
            .arg("--store")
            .arg(&store)
            .arg("--out-dir")
            .arg(d.path().join("out"))
            .args(extra))
    };
    let o = all(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let entries = || fs::read_dir(cache.join("kiln/steps")).unwrap().count();
    let before = entries();
    assert!(before > 0);
    // --no-index: a scratch store, so the user's step cache (whose layers
    // are in the user store) is neither asked nor written.
    write(
        d.path(),
        "t/taskcluster/docker/a/Dockerfile",
        b"FROM t/busybox:1\nRUN echo a > /a\nRUN echo b > /b\n",
    );
    let o = all(&["--no-index"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(!err.contains("step cache entry"), "{err}");
    assert_eq!(entries(), before);
}
