//! The same inputs give the same bytes: two trees with the same content but
//! created in a different order, with different mtimes, owners and umasks,
//! give byte-identical outputs in every format.

mod common;

use std::fs;
use std::os::unix::fs::{chown, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime};

use common::*;

const FILES: &[(&str, &[u8], bool)] = &[
    ("img/Dockerfile", b"# %include src\nFROM scratch\nCOPY topsrcdir/src /src\nCOPY run.sh /usr/bin/\nADD data.tar /data/\nWORKDIR /work\nCMD [\"/usr/bin/run.sh\"]\n", false),
    ("img/run.sh", b"#!/bin/sh\necho run\n", true),
    ("src/a/one.txt", b"one", false),
    ("src/a/b/two.txt", b"two", false),
    ("src/tool", b"tool", true),
    ("src/empty", b"", false),
];

/// Creates the tree in `order`, with `umask`-like modes, owner `uid` and mtimes offset by `skew`.
fn make(root: &Path, reverse: bool, restrictive: bool, uid: u32, skew: u64) {
    let mut files: Vec<_> = FILES.to_vec();
    if reverse {
        files.reverse();
    }
    for (p, c, exec) in files {
        let f = write(root, p, c);
        let mode = match (restrictive, exec) {
            (false, false) => 0o644,
            (false, true) => 0o755,
            (true, false) => 0o600,
            (true, true) => 0o700,
        };
        fs::set_permissions(&f, fs::Permissions::from_mode(mode)).unwrap();
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000 + skew);
        fs::File::options()
            .write(true)
            .open(&f)
            .unwrap()
            .set_modified(t)
            .unwrap();
        let _ = chown(&f, Some(uid), Some(uid));
    }
    let mut tar = Vec::new();
    {
        let mut b = tar::Builder::new(&mut tar);
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_mtime(1);
        h.set_cksum();
        b.append_data(&mut h, "x.txt", &b"xyz"[..]).unwrap();
        b.finish().unwrap();
    }
    fs::write(root.join("img/data.tar"), tar).unwrap();
    if restrictive {
        for d in ["src", "src/a", "src/a/b", "img"] {
            fs::set_permissions(root.join(d), fs::Permissions::from_mode(0o700)).unwrap();
        }
    }
}

/// Every file under a directory (relative path → bytes).
fn snapshot(p: &Path) -> Vec<(String, Vec<u8>)> {
    if p.is_file() {
        return vec![(String::new(), fs::read(p).unwrap())];
    }
    let mut out: Vec<(String, Vec<u8>)> = walkdir::WalkDir::new(p)
        .sort_by_file_name()
        .into_iter()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().is_file())
        .map(|e| {
            (
                e.path()
                    .strip_prefix(p)
                    .unwrap()
                    .to_string_lossy()
                    .into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn different_order_mtimes_owner_and_umask_give_identical_bytes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    make(a.path(), false, false, 0, 0);
    make(b.path(), true, true, 1234, 98765);
    let outputs: &[(&str, &[&str])] = &[
        ("d.tar", &[]),
        ("o.oci.tar", &[]),
        ("image.tar.zst", &[]),
        ("dir", &["--format", "oci-dir"]),
        (
            "gz",
            &["--format", "oci-dir", "--layer-compression", "gzip"],
        ),
        ("none.oci.tar", &["--layer-compression", "none"]),
    ];
    for (out, flags) in outputs {
        let mut f: Vec<&str> = flags.to_vec();
        f.extend(["-t", "same:1"]);
        let va = build(a.path(), out, &f);
        // The perturbed tree is also built twice by --check-reproducible
        // (other thread count, reversed directory reads, other temp dir).
        f.push("--check-reproducible");
        let vb = build(b.path(), out, &f);
        assert_eq!(va["manifest_digest"], vb["manifest_digest"], "{out}");
        assert_eq!(
            va["context_hash"], vb["context_hash"],
            "{out}: kiln-v1 ignores order, mtime, owner and umask"
        );
        let (sa, sb) = (snapshot(&a.path().join(out)), snapshot(&b.path().join(out)));
        assert!(!sa.is_empty());
        assert!(sa == sb, "{out}: outputs differ");
    }
}

#[test]
fn thread_count_does_not_change_the_bytes() {
    let a = tempfile::tempdir().unwrap();
    make(a.path(), false, false, 0, 0);
    let mut digests = Vec::new();
    for threads in ["1", "2", "7"] {
        let out = format!("t{threads}.oci.tar");
        let mut cmd = kiln();
        cmd.arg("build")
            .arg(a.path().join("img"))
            .arg("--topsrcdir")
            .arg(a.path())
            .arg("-o")
            .arg(a.path().join(&out))
            .env("RAYON_NUM_THREADS", threads);
        ok(&mut cmd);
        digests.push(sha256_hex(&fs::read(a.path().join(&out)).unwrap()));
    }
    assert!(digests.windows(2).all(|w| w[0] == w[1]), "{digests:?}");
}

/// An `apt-get install` step that keeps apt's lists and caches: two
/// builds differ only in the logs and caches dpkg, apt and ldconfig write
/// with the build's clock, and `--check-reproducible` says so and
/// suggests `--reproducible`; with it the two builds are identical, the
/// logs are kept empty, the caches are gone, and the layer's annotation
/// lists what was done.
#[test]
fn reproducible_makes_two_apt_get_builds_identical_and_says_what_it_did() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let Some((store, tc)) = debian_tc_tree(d.path(), &cache) else {
        return;
    };
    write(
        &tc,
        "taskcluster/docker/apt/Dockerfile",
        b"FROM debian:bookworm-minbase\nRUN apt-get update && apt-get install -y --no-install-recommends python3-minimal\n",
    );
    let build = |extra: &[&str], out: &str| {
        let mut c = kiln();
        c.env("XDG_CACHE_HOME", &cache)
            .arg("build")
            .arg(tc.join("taskcluster/docker/apt"))
            .arg("--topsrcdir")
            .arg(&tc)
            .arg("--store")
            .arg(&store)
            .args(["--no-index", "--check-reproducible", "--json", "-o"])
            .arg(d.path().join(out))
            .args(extra);
        c
    };
    let err = fails(&mut build(&[], "plain.tar"));
    for f in [
        "var/cache/apt/pkgcache.bin",
        "var/cache/ldconfig/aux-cache",
        "var/log/apt/history.log",
        "var/log/dpkg.log",
    ] {
        assert!(err.contains(&format!("changed  {f}")), "{f}: {err}");
    }
    assert!(err.contains("build with --reproducible"), "{err}");

    let v = json(&ok(&mut build(&["--reproducible"], "repro.tar")));
    let l = layers(&d.path().join("repro.tar"));
    let apt = &l[1];
    let get = |p: &str| apt.iter().find(|i| i.path == p);
    assert!(get("var/cache/apt/pkgcache.bin").is_none());
    assert!(get("var/cache/ldconfig/aux-cache").is_none());
    assert_eq!(get("var/log/dpkg.log").unwrap().data, b"");
    assert!(get("usr/bin/python3.11").is_some_and(|i| !i.data.is_empty()));
    assert!(get("var/lib/dpkg/status").is_some_and(|i| !i.data.is_empty()));
    let manifest = kiln::source::ImageFile::open(&d.path().join("repro.tar"))
        .unwrap()
        .summary()
        .unwrap()
        .manifest;
    let note = manifest.layers[1]
        .annotations
        .get("dev.kiln.layer.reproducible")
        .unwrap_or_else(|| panic!("{:?}", manifest.layers[1]))
        .clone();
    assert!(note.contains("emptied var/log/dpkg.log"), "{note}");
    assert!(
        note.contains("removed var/cache/apt/pkgcache.bin"),
        "{note}"
    );
    assert!(v["manifest_digest"].is_string());
}
