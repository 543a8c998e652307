//! The user-facing parts of the speed work: the hash cache never hides a
//! change, `--jobs` never changes bytes, and progress reporting goes where
//! it is asked to.

mod common;

use std::fs;
use std::time::Duration;

use common::*;

fn hash_json(dir: &std::path::Path, cache: Option<&std::path::Path>) -> serde_json::Value {
    let mut cmd = kiln();
    cmd.arg("hash")
        .arg(dir.join("img"))
        .arg("--topsrcdir")
        .arg(dir)
        .arg("--json");
    if let Some(c) = cache {
        cmd.arg("--hash-cache").arg(c);
    }
    json(&ok(&mut cmd))
}

#[test]
fn hash_cache_reuses_digests_and_always_sees_a_one_byte_change() {
    let d = tree(&[(
        "img/Dockerfile",
        b"# %include src\nFROM scratch\nCOPY topsrcdir/src /src\n",
    )]);
    for i in 0..50 {
        write(
            d.path(),
            &format!("src/d{}/f{i}", i % 5),
            format!("content {i:04}").as_bytes(),
        );
    }
    // Files changed within two seconds of a cache's writing are not trusted (racy
    // writes); let the tree settle so the second run can hit.
    std::thread::sleep(Duration::from_millis(2300));
    let cache = d.path().join("cache/hc");
    let plain = hash_json(d.path(), None);
    let first = hash_json(d.path(), Some(&cache));
    assert_eq!(first["context_hash"], plain["context_hash"]);
    // 50 files of src/ and the image directory's Dockerfile as walked
    assert_eq!(first["hash_cache"]["hashed"], 51);
    let second = hash_json(d.path(), Some(&cache));
    assert_eq!(second["context_hash"], plain["context_hash"]);
    assert_eq!(second["hash_cache"]["hits"], 51, "{second}");
    assert_eq!(second["hash_cache"]["hashed"], 0);

    // Change one byte, keep the size, and even put the old mtime back: the ctime still moves.
    let victim = d.path().join("src/d3/f13");
    let old_mtime = fs::metadata(&victim).unwrap().modified().unwrap();
    fs::write(&victim, b"content 0014").unwrap();
    fs::File::options()
        .write(true)
        .open(&victim)
        .unwrap()
        .set_modified(old_mtime)
        .unwrap();
    let changed = hash_json(d.path(), Some(&cache));
    let truth = hash_json(d.path(), None);
    assert_ne!(changed["context_hash"], plain["context_hash"]);
    assert_eq!(changed["context_hash"], truth["context_hash"]);
    assert_eq!(changed["hash_cache"]["hits"], 50);
    assert_eq!(changed["hash_cache"]["hashed"], 1);

    // A change right after a cached run, with a new mtime, is seen too.
    fs::write(&victim, b"content 0015").unwrap();
    let again = hash_json(d.path(), Some(&cache));
    assert_eq!(
        again["context_hash"],
        hash_json(d.path(), None)["context_hash"]
    );
    assert_ne!(again["context_hash"], changed["context_hash"]);
}

#[test]
fn a_corrupt_hash_cache_is_ignored_not_trusted() {
    let d = tree(&[("img/Dockerfile", b"FROM scratch\n"), ("img/f", b"f")]);
    let cache = d.path().join("hc");
    fs::write(&cache, b"KILNHC01 but truncated").unwrap();
    let v = hash_json(d.path(), Some(&cache));
    assert_eq!(v["context_hash"], hash_json(d.path(), None)["context_hash"]);
}

#[test]
fn jobs_do_not_change_any_byte() {
    let d = tree(&[(
        "img/Dockerfile",
        b"# %include src\nFROM scratch\nCOPY topsrcdir/src /src\nCOPY big /big\n",
    )]);
    for i in 0..300 {
        write(
            d.path(),
            &format!("src/d{}/f{i}", i % 7),
            &vec![i as u8; 100 + i * 37],
        );
    }
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    write(d.path(), "img/big", &big);
    let mut sums = Vec::new();
    for jobs in ["1", "2", "8"] {
        for out in ["o.oci.tar", "d.tar", "image.tar.zst"] {
            let name = format!("j{jobs}-{out}");
            let mut cmd = build_cmd(d.path(), &name, &["-j", jobs]);
            ok(&mut cmd);
            sums.push((out, sha256_hex(&fs::read(d.path().join(&name)).unwrap())));
        }
        let h = ok(kiln()
            .args(["-j", jobs, "hash"])
            .arg(d.path().join("img"))
            .arg("--topsrcdir")
            .arg(d.path()));
        sums.push(("hash", h));
    }
    for out in ["o.oci.tar", "d.tar", "image.tar.zst", "hash"] {
        let v: Vec<&String> = sums
            .iter()
            .filter(|(o, _)| *o == out)
            .map(|(_, s)| s)
            .collect();
        assert_eq!(v.len(), 3);
        assert!(v.windows(2).all(|w| w[0] == w[1]), "{out}: {v:?}");
    }
    let err = fails(kiln().args(["-j", "0", "hash"]).arg(d.path().join("img")));
    assert!(err.contains("--jobs 0"), "{err}");
}

#[test]
fn progress_plain_prints_one_line_per_step_and_auto_is_plain_off_a_terminal() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY f /f\n"),
        ("img/f", b"f"),
    ]);
    let out = run(&mut build_cmd(d.path(), "p.tar", &["--progress", "plain"]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("kiln: hashing context (kiln-v1): 2 files"),
        "{err}"
    );
    assert!(err.contains("kiln: writing layers:"), "{err}");
    // Off a terminal (a CI log) auto is plain, as Docker falls back to
    // plain output there.
    let auto = run(&mut build_cmd(d.path(), "q.tar", &[]));
    assert!(auto.status.success());
    let auto_err = String::from_utf8_lossy(&auto.stderr);
    assert!(auto_err.contains("kiln: writing layers:"), "{auto_err}");
    let never = run(&mut build_cmd(d.path(), "n.tar", &["--progress", "never"]));
    assert_eq!(String::from_utf8_lossy(&never.stderr), "");
}

/// kiln-v1 as README documents it, computed here from std::fs alone: one
/// sha256 over "<sha256 hex> <mode> <path>\n" lines in path-byte order.
fn kiln_v1_reference(root: &std::path::Path, prefix: &str) -> String {
    use sha2::{Digest, Sha256};
    use std::os::unix::fs::PermissionsExt;
    let mut lines: Vec<(Vec<u8>, String)> = Vec::new();
    let mut stack = vec![(root.to_path_buf(), prefix.to_string())];
    while let Some((dir, pre)) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            let path = format!("{pre}{name}");
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                stack.push((e.path(), format!("{path}/")));
            } else if ft.is_symlink() {
                let target = fs::read_link(e.path()).unwrap();
                let d = hex::encode(Sha256::digest(target.as_os_str().as_encoded_bytes()));
                lines.push((path.clone().into_bytes(), format!("{d} 120000 {path}\n")));
            } else {
                let bytes = fs::read(e.path()).unwrap();
                let exec = e.metadata().unwrap().permissions().mode() & 0o100 != 0;
                let mode = if exec { "100755" } else { "100644" };
                let d = hex::encode(Sha256::digest(&bytes));
                lines.push((path.clone().into_bytes(), format!("{d} {mode} {path}\n")));
            }
        }
    }
    lines.sort();
    let mut h = Sha256::new();
    for (_, l) in lines {
        h.update(l.as_bytes());
    }
    hex::encode(h.finalize())
}

#[test]
fn batched_and_one_at_a_time_reads_give_the_documented_digest() {
    // Sizes around the io_uring path's limits (128 KiB read whole; 64 files
    // a batch; 4 MiB a batch), an empty file, an executable, a symlink.
    let d = tree(&[("img/Dockerfile", b"FROM scratch\nCOPY . /\n")]);
    let img = d.path().join("img");
    for i in 0..150 {
        write(
            &img,
            &format!("many/f{i:03}"),
            format!("file {i}").as_bytes(),
        );
    }
    for (name, size) in [
        ("sizes/empty", 0usize),
        ("sizes/small-max", 128 * 1024),
        ("sizes/small-max+1", 128 * 1024 + 1),
        ("sizes/one-mib", 1 << 20),
    ] {
        let bytes: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
        write(&img, name, &bytes);
    }
    for i in 0..40 {
        // 40 files of 120 KiB: more than one batch's 4 MiB of buffer.
        write(&img, &format!("big/b{i:02}"), &vec![i as u8; 120 * 1024]);
    }
    write(&img, "run.sh", b"#!/bin/sh\n");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(img.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("many/f001", img.join("link")).unwrap();
    let want = kiln_v1_reference(&img, "");
    let batched = hash_json(d.path(), None);
    let plain = json(&ok(kiln()
        .env("KILN_NO_URING", "1")
        .args(["hash", "--json", "--topsrcdir"])
        .arg(d.path())
        .arg(&img)));
    assert_eq!(batched["context_hash"], want.as_str(), "{batched}");
    assert_eq!(plain["context_hash"], want.as_str(), "{plain}");
    assert_eq!(batched["files"], 150 + 4 + 40 + 3);
    assert_eq!(batched["bytes"], plain["bytes"]);
}
