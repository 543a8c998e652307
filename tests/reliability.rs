//! The store as a content store, tried as a hostile tester would: builds
//! sharing one cache, gc running beside them, `kill -9` at several points,
//! links planted in stores, trees 10,000 levels deep, oversized configs,
//! 64,000-component destinations, a truncated `index.json`, a full disk.

mod common;

use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A kiln command sharing the user cache `cache`.
fn kiln_in(cache: &Path) -> Command {
    let mut c = kiln();
    c.env("XDG_CACHE_HOME", cache);
    c
}

/// An image directory with two layers of `mb` MB of noise each.
fn image_dir(root: &Path, mb: usize, seed: u64) -> PathBuf {
    let img = root.join("img");
    write(
        root,
        "img/Dockerfile",
        b"FROM scratch\nCOPY a /a\nCOPY b /b\nENV K=v\n",
    );
    write(root, "img/a", &noise(mb << 20, seed));
    write(root, "img/b", &noise(mb << 19, seed + 1));
    img
}

/// The entry at `path` (long paths shortened in the message).
fn find<'a>(layer: &'a [Item], path: &str) -> &'a Item {
    layer.iter().find(|i| i.path == path).unwrap_or_else(|| {
        panic!(
            "{}... ({} bytes) is not among the layer's {} entries",
            &path[..path.len().min(80)],
            path.len(),
            layer.len()
        )
    })
}

/// The files under `.kiln/tmp` and the leases of a store.
fn leftovers(store: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for d in [".kiln/tmp", ".kiln/leases"] {
        if let Ok(rd) = fs::read_dir(store.join(d)) {
            out.extend(rd.map(|e| format!("{d}/{}", e.unwrap().file_name().to_string_lossy())));
        }
    }
    if let Ok(rd) = fs::read_dir(store.join("blobs/sha256")) {
        out.extend(
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with('.')),
        );
    }
    out
}

/// `kiln verify` of a store: every named image has every blob, verified.
fn verify_store(store: &Path) {
    let out = ok(kiln().arg("verify").arg(store));
    assert!(out.starts_with("ok: "), "{out}");
}

#[test]
fn eight_concurrent_builds_of_one_image_sharing_a_cache_all_succeed_alike() {
    let d = tempfile::tempdir().unwrap();
    let img = image_dir(d.path(), 2, 7);
    let cache = d.path().join("cache");
    for round in 0..10 {
        let children: Vec<_> = (0..8)
            .map(|i| {
                let mut c = kiln_in(&cache);
                c.arg("build")
                    .arg(&img)
                    .arg("-o")
                    .arg(d.path().join(format!("o{i}.tar")))
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped());
                // Half rebuild into the shared store, half may hit the index.
                if i % 2 == 0 {
                    c.arg("--no-cache");
                }
                c.spawn().unwrap()
            })
            .collect();
        for (i, c) in children.into_iter().enumerate() {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "round {round}, build {i}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let first = fs::read(d.path().join("o0.tar")).unwrap();
        for i in 1..8 {
            assert!(
                fs::read(d.path().join(format!("o{i}.tar"))).unwrap() == first,
                "round {round}: output {i} differs from output 0"
            );
        }
    }
    let store = cache.join("kiln/store");
    verify_store(&store);
    assert_eq!(leftovers(&store), Vec::<String>::new());
}

#[test]
fn gc_looping_beside_builds_removes_nothing_they_use() {
    let d = tempfile::tempdir().unwrap();
    let cache = d.path().join("cache");
    let store = cache.join("kiln/store");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc = {
        let (cache, stop) = (cache.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut runs = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let out = run(kiln_in(&cache).args(["store", "gc"]));
                assert!(
                    out.status.success(),
                    "gc failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
                runs += 1;
            }
            runs
        })
    };
    for round in 0..4u64 {
        // New content each round: its blobs are unnamed until each build names them.
        let dirs: Vec<_> = (0..4u64)
            .map(|i| {
                let t = tempfile::tempdir().unwrap();
                image_dir(t.path(), 1, round * 10 + i);
                t
            })
            .collect();
        let children: Vec<_> = dirs
            .iter()
            .map(|t| {
                kiln_in(&cache)
                    .arg("build")
                    .arg(t.path().join("img"))
                    .arg("-o")
                    .arg(t.path().join("o.oci"))
                    .arg("--no-cache")
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "a build beside gc failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for t in &dirs {
            verify_store(&t.path().join("o.oci"));
        }
        // Every image named so far keeps every blob.
        verify_store(&store);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let runs = gc.join().unwrap();
    assert!(runs > 0);
    // With the names removed, gc frees everything, leases and temporaries included.
    let names: Vec<String> = json(&ok(kiln_in(&cache).args(["store", "ls", "--json"])))
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names.len(), 16, "{names:?}");
    for n in &names {
        ok(kiln_in(&cache).args(["store", "rm", n]));
    }
    // The step cache keeps its layers until pruned.
    ok(kiln_in(&cache).args(["cache", "prune", "--keep-bytes", "0"]));
    let out = ok(kiln_in(&cache).args(["store", "gc"]));
    assert!(out.contains("removed "), "{out}");
    assert_eq!(
        fs::read_dir(store.join("blobs/sha256")).unwrap().count(),
        0,
        "{out}"
    );
    assert_eq!(leftovers(&store), Vec::<String>::new());
}

#[test]
fn kill_9_during_store_add_and_builds_leaves_a_store_that_verifies() {
    let d = tempfile::tempdir().unwrap();
    let img = image_dir(d.path(), 8, 3);
    let archive = d.path().join("img.oci.tar");
    ok(kiln()
        .arg("build")
        .arg(&img)
        .arg("--no-index")
        .arg("-o")
        .arg(&archive)
        .args(["-t", "t/kill:1"]));
    let cache = d.path().join("cache");
    let store = cache.join("kiln/store");
    let mut killed = 0;
    for ms in [5u64, 20, 60, 120, 250, 500] {
        killed += kill_after(
            kiln_in(&cache)
                .args(["store", "add"])
                .arg(&archive)
                .arg("--store")
                .arg(&store),
            Duration::from_millis(ms),
        ) as usize;
        killed += kill_after(
            kiln_in(&cache)
                .arg("build")
                .arg(&img)
                .arg("--no-cache")
                .arg("-o")
                .arg(d.path().join("o.tar")),
            Duration::from_millis(ms),
        ) as usize;
        // Whatever was killed where, what the store names verifies.
        if store.join("index.json").exists() {
            verify_store(&store);
        }
    }
    assert!(killed >= 4, "only {killed} runs were killed mid-way");
    let out = ok(kiln_in(&cache).args(["store", "gc"]));
    assert!(out.contains("stale leases"), "{out}");
    assert_eq!(leftovers(&store), Vec::<String>::new(), "{out}");
    // Nothing was published half-written: no output, or a whole one.
    if d.path().join("o.tar").exists() {
        verify_store(&d.path().join("o.tar"));
    }
    // And the store still works.
    ok(kiln_in(&cache)
        .args(["store", "add"])
        .arg(&archive)
        .arg("--store")
        .arg(&store));
    ok(kiln_in(&cache)
        .arg("build")
        .arg(&img)
        .arg("-o")
        .arg(d.path().join("o.tar")));
    verify_store(&store);
}

/// A store holding `t/base:1` and the digests of its manifest, config and layer.
fn base_store(d: &Path) -> (PathBuf, [String; 3]) {
    write(d, "base/Dockerfile", b"FROM scratch\nCOPY f /f\n");
    write(d, "base/f", b"base");
    let archive = d.join("base.oci.tar");
    ok(kiln()
        .arg("build")
        .arg(d.join("base"))
        .arg("--no-index")
        .arg("-o")
        .arg(&archive)
        .args(["-t", "t/base:1"]));
    let store = d.join("store");
    ok(kiln()
        .args(["store", "add"])
        .arg(&archive)
        .arg("--store")
        .arg(&store));
    let index = json(&fs::read_to_string(store.join("index.json")).unwrap());
    let m = index["manifests"][0]["digest"].as_str().unwrap()[7..].to_string();
    let manifest = json(&fs::read_to_string(store.join("blobs/sha256").join(&m)).unwrap());
    let c = manifest["config"]["digest"].as_str().unwrap()[7..].to_string();
    let l = manifest["layers"][0]["digest"].as_str().unwrap()[7..].to_string();
    (store, [m, c, l])
}

#[test]
fn symlinked_blobs_in_a_store_or_vendor_images_are_refused_and_nothing_outside_is_touched() {
    for (i, which) in ["manifest", "config", "layer"].iter().enumerate() {
        for vendor in [false, true] {
            let d = tempfile::tempdir().unwrap();
            let (store, digests) = base_store(d.path());
            let outside = d.path().join("outside");
            let secret = b"root:x:0:0:secret\n".repeat(4);
            fs::write(&outside, &secret).unwrap();
            let blob = store.join("blobs/sha256").join(&digests[i]);
            fs::remove_file(&blob).unwrap();
            std::os::unix::fs::symlink(&outside, &blob).unwrap();
            let src = tempfile::tempdir().unwrap();
            write(src.path(), "img/Dockerfile", b"FROM t/base:1\nCOPY g /g\n");
            write(src.path(), "img/g", b"g");
            let mut cmd = kiln();
            cmd.arg("build")
                .arg(src.path().join("img"))
                .arg("--no-index")
                .arg("-o")
                .arg(src.path().join("o.tar"));
            if vendor {
                fs::rename(&store, src.path().join("vendor-images")).unwrap();
                cmd.arg("--topsrcdir").arg(src.path());
            } else {
                cmd.arg("--store").arg(&store);
            }
            let err = fails(&mut cmd);
            assert!(
                err.contains(&digests[i]) && err.contains("is a symbolic link"),
                "{which} (vendor-images: {vendor}): {err}"
            );
            // Nothing about the target is printed: not its hash, not its size.
            assert!(!err.contains(&sha256_hex(&secret)), "{err}");
            assert!(!err.contains(&format!("{} bytes", secret.len())), "{err}");
            assert!(!src.path().join("o.tar").exists());
            assert_eq!(fs::read(&outside).unwrap(), secret);
        }
    }
    // A write never follows one either: the next import replaces the link.
    let d = tempfile::tempdir().unwrap();
    let (store, digests) = base_store(d.path());
    let outside = d.path().join("outside");
    fs::write(&outside, b"system file").unwrap();
    for h in &digests {
        let blob = store.join("blobs/sha256").join(h);
        fs::remove_file(&blob).unwrap();
        std::os::unix::fs::symlink(&outside, &blob).unwrap();
    }
    fs::remove_file(store.join(".kiln-lock")).unwrap();
    std::os::unix::fs::symlink(&outside, store.join(".kiln-lock")).unwrap();
    let err = fails(
        kiln()
            .args(["store", "add"])
            .arg(d.path().join("base.oci.tar"))
            .arg("--store")
            .arg(&store),
    );
    assert!(err.contains(".kiln-lock is a symbolic link"), "{err}");
    assert_eq!(fs::read(&outside).unwrap(), b"system file");
    fs::remove_file(store.join(".kiln-lock")).unwrap();
    ok(kiln()
        .args(["store", "add"])
        .arg(d.path().join("base.oci.tar"))
        .arg("--store")
        .arg(&store));
    assert_eq!(fs::read(&outside).unwrap(), b"system file");
    for h in &digests {
        let md = fs::symlink_metadata(store.join("blobs/sha256").join(h)).unwrap();
        assert!(md.file_type().is_file(), "{h} is a regular file again");
    }
    verify_store(&store);
}

#[test]
fn a_tree_ten_thousand_levels_deep_hashes_and_builds() {
    let d = tempfile::tempdir().unwrap();
    write(d.path(), "img/Dockerfile", b"FROM scratch\nCOPY . /ctx/\n");
    // Deeper than PATH_MAX: made with relative mkdir, one level at a time.
    let mut dir = kiln::fsx::DirFd::open(&d.path().join("img")).unwrap();
    for _ in 0..10_000 {
        dir = dir.create_dir("d").unwrap();
    }
    use std::io::Write;
    dir.create_new(std::ffi::OsStr::new("leaf"))
        .unwrap()
        .write_all(b"deep")
        .unwrap();
    for algorithm in ["kiln-v1", "taskgraph"] {
        let out = run(kiln()
            .arg("hash")
            .arg(d.path().join("img"))
            .args(["--algorithm", algorithm]));
        assert!(
            out.status.success(),
            "{algorithm}: {}",
            String::from_utf8_lossy(&out.stderr)
                .chars()
                .take(500)
                .collect::<String>()
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim().len(), 64);
    }
    let out = run(kiln()
        .arg("build")
        .arg(d.path().join("img"))
        .arg("-o")
        .arg(d.path().join("o.tar"))
        .arg("--json"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
            .chars()
            .take(500)
            .collect::<String>()
    );
    let l = layers(&d.path().join("o.tar"));
    let leaf = format!("ctx/{}leaf", "d/".repeat(10_000));
    assert_eq!(find(&l[0], &leaf).data, b"deep");
}

#[test]
fn a_config_larger_than_kiln_reads_is_refused_with_the_line_and_size() {
    // Twenty LABEL lines of 1,000,000 bytes: a 20 MB config.
    let mut df = b"FROM scratch\n".to_vec();
    for i in 0..20 {
        df.extend_from_slice(format!("LABEL l{i:02}={}\n", "x".repeat(1_000_000)).as_bytes());
    }
    let d = tree(&[("img/Dockerfile", &df)]);
    let err = build_fails(d.path(), "o.tar", &[]);
    assert!(
        err.contains("the image config would be")
            && err.contains("more than the 4194304 bytes")
            && err.contains("line 2 ("),
        "{err}"
    );
    assert!(!d.path().join("o.tar").exists());
    // One line over 1 MiB is refused before anything else.
    let long = format!("FROM scratch\nLABEL big={}\n", "x".repeat(10 << 20));
    let d = tree(&[("img/Dockerfile", long.as_bytes())]);
    let err = build_fails(d.path(), "o.tar", &[]);
    assert!(
        err.contains("line 2") && err.contains("at most 1048576 bytes"),
        "{err}"
    );
    // Just under the limit builds, and every kiln command reads it back.
    let mut df = b"FROM scratch\n".to_vec();
    for i in 0..3 {
        df.extend_from_slice(format!("LABEL l{i}={}\n", "x".repeat(600_000)).as_bytes());
    }
    let d = tree(&[("img/Dockerfile", &df)]);
    build(d.path(), "o.tar", &[]);
    ok(kiln().arg("verify").arg(d.path().join("o.tar")));
    ok(kiln().arg("inspect").arg(d.path().join("o.tar")));
    ok(kiln()
        .args(["store", "add"])
        .arg(d.path().join("o.tar"))
        .arg("--store")
        .arg(d.path().join("s")));
}

/// Runs `cmd` to the end; returns its status and peak resident memory in bytes.
// wait4 below reaps the child (and reads its rusage, which `wait` cannot).
#[allow(clippy::zombie_processes)]
fn run_measured(cmd: &mut Command) -> (std::process::ExitStatus, u64, String) {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut stderr = child.stderr.unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).unwrap();
        s
    });
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid);
    (
        std::process::ExitStatus::from_raw(status),
        usage.ru_maxrss as u64 * 1024,
        reader.join().unwrap(),
    )
}

#[test]
fn a_copy_destination_of_64000_components_is_linear() {
    let n = 64_000;
    let dest = format!("/{}/f", vec!["a"; n].join("/"));
    let workdir = format!("/{}", vec!["w"; n].join("/"));
    let df = format!("FROM scratch\nWORKDIR {workdir}\nCOPY f {dest}\n");
    let d = tree(&[("img/Dockerfile", df.as_bytes()), ("img/f", b"x")]);
    let (status, rss, err) = run_measured(&mut build_cmd(d.path(), "o.tar", &["--no-index"]));
    assert!(
        status.success(),
        "{}",
        err.chars().take(500).collect::<String>()
    );
    // 100 MiB is the bound (the release build peaks near 30 MiB);
    // a quadratic path handling needs gigabytes here.
    assert!(rss < 100 << 20, "peak memory {rss} bytes");
    let l = layers(&d.path().join("o.tar"));
    assert_eq!(find(&l[1], &dest[1..]).data, b"x");
    // Parents get entries while their paths stay under 4096 bytes; deeper
    // ones are implied.
    assert!(l[1].len() <= 2100, "{} entries", l[1].len());
    assert!(l[0].len() <= 2100, "{} entries", l[0].len());
}

#[test]
fn a_truncated_index_json_publishes_nothing_and_store_repair_restores_it() {
    let d = tempfile::tempdir().unwrap();
    let img = image_dir(d.path(), 1, 11);
    let cache = d.path().join("cache");
    let store = cache.join("kiln/store");
    let first = json(&ok(kiln_in(&cache)
        .arg("build")
        .arg(&img)
        .arg("-o")
        .arg(d.path().join("a.tar"))
        .arg("--json")));
    let index = store.join("index.json");
    let bytes = fs::read(&index).unwrap();
    fs::write(&index, &bytes[..bytes.len() / 2]).unwrap();
    // A rebuild, and a build of a new image: both fail, neither publishes.
    let b = d.path().join("b.tar");
    let err = fails(
        kiln_in(&cache)
            .arg("build")
            .arg(&img)
            .arg("--no-cache")
            .arg("-o")
            .arg(&b),
    );
    assert!(err.contains("kiln store repair --store"), "{err}");
    assert!(err.contains(&index.display().to_string()), "{err}");
    assert!(!b.exists());
    write(d.path(), "img/new", b"new");
    fs::write(
        img.join("Dockerfile"),
        b"FROM scratch\nCOPY a /a\nCOPY b /b\nCOPY new /new\n",
    )
    .unwrap();
    let c = d.path().join("c.tar");
    let err = fails(kiln_in(&cache).arg("build").arg(&img).arg("-o").arg(&c));
    assert!(err.contains("kiln store repair"), "{err}");
    assert!(!c.exists());
    let dir_entries: Vec<String> = fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".kiln"))
        .collect();
    assert_eq!(dir_entries, Vec::<String>::new());
    // Repair: the name comes back from kiln's index, and the old image is an index hit again.
    let out = ok(kiln_in(&cache).args(["store", "repair"]));
    assert!(out.contains("restored kiln.local/index/img:"), "{out}");
    assert!(store.join("index.json.corrupt").exists());
    verify_store(&store);
    fs::write(
        img.join("Dockerfile"),
        b"FROM scratch\nCOPY a /a\nCOPY b /b\nENV K=v\n",
    )
    .unwrap();
    fs::remove_file(img.join("new")).unwrap();
    let again = json(&ok(kiln_in(&cache)
        .arg("build")
        .arg(&img)
        .arg("-o")
        .arg(&b)
        .arg("--json")));
    assert_eq!(again["status"], "up to date");
    assert_eq!(again["manifest_digest"], first["manifest_digest"]);
}

#[test]
fn a_full_disk_is_reported_with_the_local_path_and_leaves_nothing_behind() {
    let Some(disk) = Tmpfs::mount("2m") else {
        return;
    };
    let d = tempfile::tempdir().unwrap();
    let img = image_dir(d.path(), 2, 5);
    let archive = d.path().join("img.oci.tar");
    ok(kiln()
        .arg("build")
        .arg(&img)
        .arg("--no-index")
        .arg("-o")
        .arg(&archive)
        .args(["-t", "t/full:1"]));
    // store add into a store on the full disk.
    let store = disk.path().join("store");
    let err = fails(
        kiln()
            .args(["store", "add"])
            .arg(&archive)
            .arg("--store")
            .arg(&store),
    );
    eprintln!("store add: {err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains(&format!("writing {}", store.display())),
        "names the store's file: {err}"
    );
    let left: Vec<String> = disk
        .files()
        .into_iter()
        .filter(|f| f.contains("blobs/sha256/") || f.contains(".kiln/tmp/"))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "{err}");
    // A build whose store is on the full disk.
    let cache = disk.path().join("cache");
    let out = d.path().join("o.tar");
    let err = fails(kiln_in(&cache).arg("build").arg(&img).arg("-o").arg(&out));
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains(&disk.path().display().to_string()), "{err}");
    assert!(!out.exists());
    // A build whose output is on the full disk.
    let out = disk.path().join("o.tar");
    let err = fails(
        kiln()
            .arg("build")
            .arg(&img)
            .arg("--no-index")
            .arg("-o")
            .arg(&out),
    );
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains(&disk.path().display().to_string()), "{err}");
    assert!(!out.exists());
    let left: Vec<String> = disk
        .files()
        .into_iter()
        .filter(|f| {
            f.contains("blobs/sha256/")
                || f.contains(".kiln/tmp/")
                || (f.contains(".kiln-") && !f.ends_with(".kiln-lock"))
        })
        .collect();
    assert_eq!(left, Vec::<String>::new());
}
