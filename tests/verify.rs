//! `kiln verify`: every corruption class in every layer compression is
//! found and named, and a sound image passes.

mod common;

use std::fs;
use std::path::Path;

use common::*;

fn blob(dir: &Path, digest: &str) -> std::path::PathBuf {
    dir.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn put(dir: &Path, bytes: &[u8]) -> (String, usize) {
    let d = format!("sha256:{}", sha256_hex(bytes));
    fs::write(blob(dir, &d), bytes).unwrap();
    (d, bytes.len())
}

/// The (manifest digest, manifest text) the layout's index.json names.
fn top(dir: &Path) -> (String, String) {
    let idx: serde_json::Value =
        serde_json::from_slice(&fs::read(dir.join("index.json")).unwrap()).unwrap();
    let d = idx["manifests"][0]["digest"].as_str().unwrap().to_string();
    let m = fs::read_to_string(blob(dir, &d)).unwrap();
    (d, m)
}

/// Replaces the manifest with `new` and points index.json at it.
fn set_manifest(dir: &Path, new: &str) {
    let (old_d, old) = top(dir);
    let (d, size) = put(dir, new.as_bytes());
    let idx = fs::read_to_string(dir.join("index.json")).unwrap();
    let idx = idx.replace(&old_d, &d).replace(
        &format!("\"size\":{}", old.len()),
        &format!("\"size\":{size}"),
    );
    fs::write(dir.join("index.json"), idx).unwrap();
}

fn verify(dir: &Path) -> (bool, String) {
    let out = run(kiln().arg("verify").arg(dir));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match out.status.code() {
        Some(0) => (true, text),
        Some(1) => (false, text),
        other => panic!(
            "verify exited {other:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

#[test]
fn every_corruption_class_is_named_in_every_compression() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY a /a\nCOPY b /b\n"),
        ("img/a", b"first layer"),
        ("img/b", b"second layer, a little longer"),
    ]);
    for compression in ["zstd", "gzip", "none"] {
        let base = d.path().join(format!("img-{compression}"));
        ok(&mut build_cmd(
            d.path(),
            &format!("img-{compression}"),
            &[
                "--no-index",
                "--format",
                "oci-dir",
                "--layer-compression",
                compression,
            ],
        ));
        let (ok_, text) = verify(&base);
        assert!(ok_ && text.starts_with("ok: "), "{compression}: {text}");
        let (_, m) = top(&base);
        let manifest: kiln::image::Manifest = serde_json::from_str(&m).unwrap();
        let layer = manifest.layers[1].digest.to_string();
        let config = manifest.config.digest.to_string();
        let case = |name: &str, corrupt: &dyn Fn(&Path), expect: &[String]| {
            let dir = d.path().join(format!("{compression}-{name}"));
            ok(std::process::Command::new("cp")
                .arg("-a")
                .arg(&base)
                .arg(&dir));
            corrupt(&dir);
            let (sound, text) = verify(&dir);
            assert!(!sound, "{compression}/{name} passed:\n{text}");
            for e in expect {
                assert!(
                    text.contains(e.as_str()),
                    "{compression}/{name}: expected {e:?} in:\n{text}"
                );
            }
        };
        case(
            "byte",
            &|dir| {
                let p = blob(dir, &layer);
                let mut b = fs::read(&p).unwrap();
                let i = b.len() / 2;
                b[i] ^= 0x01;
                fs::write(&p, b).unwrap();
            },
            &[format!("{layer}: layer content has digest")],
        );
        case(
            "size",
            &|dir| {
                let p = blob(dir, &layer);
                let mut b = fs::read(&p).unwrap();
                b.extend_from_slice(&[0; 512]);
                fs::write(&p, b).unwrap();
            },
            &[format!(
                "{layer}: layer is {} bytes, but its descriptor says {}",
                manifest.layers[1].size + 512,
                manifest.layers[1].size
            )],
        );
        case(
            "config",
            &|dir| {
                let p = blob(dir, &config);
                let c = fs::read_to_string(&p).unwrap().replace("linux", "LINUX");
                fs::write(&p, c).unwrap();
            },
            &[format!("{config}: config: content has digest")],
        );
        case(
            "manifest",
            &|dir| {
                let (md, m) = top(dir);
                fs::write(
                    blob(dir, &md),
                    m.replace("schemaVersion\":2", "schemaVersion\":3"),
                )
                .unwrap();
            },
            &["manifest: content has digest".to_string()],
        );
        case(
            "diff_id",
            &|dir| {
                let c = fs::read_to_string(blob(dir, &config)).unwrap();
                let cfg: kiln::image::ImageConfig = serde_json::from_str(&c).unwrap();
                let wrong = format!("sha256:{}", "e".repeat(64));
                let c2 = c.replace(cfg.rootfs.diff_ids[1].as_str(), &wrong);
                let (cd, cs) = put(dir, c2.as_bytes());
                let (_, m) = top(dir);
                let m2 = m
                    .replace(&config, &cd)
                    .replace(&format!("\"size\":{}", c.len()), &format!("\"size\":{cs}"));
                set_manifest(dir, &m2);
            },
            &[
                format!("{layer}: layer's uncompressed content has digest"),
                format!("but the config's diff_id is sha256:{}", "e".repeat(64)),
            ],
        );
        case(
            "size-field",
            &|dir| {
                let (_, m) = top(dir);
                let s = manifest.layers[1].size;
                let m2 = m.replace(&format!("\"size\":{s}}}"), &format!("\"size\":{}}}", s + 1));
                assert_ne!(m, m2);
                set_manifest(dir, &m2);
            },
            &[format!(
                "{layer}: layer is {} bytes, but its descriptor says {}",
                manifest.layers[1].size,
                manifest.layers[1].size + 1
            )],
        );
        case(
            "missing",
            &|dir| fs::remove_file(blob(dir, &layer)).unwrap(),
            &[
                format!("{layer}: layer: "),
                format!("blob {layer} is missing"),
            ],
        );
    }
}

#[test]
fn archives_and_the_taskcluster_artifact_verify_and_problems_are_all_listed() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY a /a\nCOPY a /b\n"),
        ("img/a", b"x"),
    ]);
    for out in ["i.tar", "i.oci.tar", "image.tar.zst"] {
        ok(&mut build_cmd(d.path(), out, &["--no-index"]));
        let (sound, text) = verify(&d.path().join(out));
        assert!(sound, "{out}: {text}");
    }
    // Two problems at once: both are listed.
    ok(&mut build_cmd(
        d.path(),
        "two",
        &[
            "--no-index",
            "--format",
            "oci-dir",
            "--layer-compression",
            "none",
        ],
    ));
    let dir = d.path().join("two");
    let (_, m) = top(&dir);
    let manifest: kiln::image::Manifest = serde_json::from_str(&m).unwrap();
    for l in &manifest.layers {
        fs::remove_file(blob(&dir, l.digest.as_str())).unwrap();
    }
    let (sound, text) = verify(&dir);
    assert!(!sound);
    assert!(text.contains("2 problem(s)"), "{text}");
    let out = run(kiln().arg("verify").arg("--json").arg(&dir));
    assert_eq!(out.status.code(), Some(1));
    let v = json(&String::from_utf8_lossy(&out.stdout));
    let blobs: Vec<String> = v["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["blob"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = manifest
        .layers
        .iter()
        .map(|l| l.digest.to_string())
        .collect();
    assert_eq!(blobs, want);
}
