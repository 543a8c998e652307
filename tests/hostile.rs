//! Hostile input: links and paths that try to leave the source tree,
//! special files, symlink loops, odd names, huge sparse files, files that
//! change under the build. Every refusal names the file or line, and
//! nothing is written outside the output path.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use kiln::source::Source;

/// `kiln hash` of `img/` in `d` with the given algorithm.
fn hash_cmd(d: &Path, algorithm: &str) -> Command {
    let mut c = kiln();
    c.arg("hash")
        .arg(d.join("img"))
        .arg("--topsrcdir")
        .arg(d)
        .args(["--algorithm", algorithm]);
    c
}

/// Files in `d` other than `keep` (relative paths), recursively.
fn stray_files(d: &Path, keep: &[&str]) -> Vec<String> {
    walkdir::WalkDir::new(d)
        .into_iter()
        .filter_map(Result::ok)
        .map(|e| {
            e.path()
                .strip_prefix(d)
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|p| {
            !p.is_empty()
                && !keep
                    .iter()
                    .any(|k| p == k || p.starts_with(&format!("{k}/")))
        })
        .collect()
}

#[test]
fn links_out_of_the_source_tree_are_never_followed() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY link /x\n"),
        ("src/ok.txt", b"ok"),
    ]);
    let t = d.path();
    symlink("/etc/passwd", t.join("img/link")).unwrap();
    let err = fails(&mut build_cmd(t, "o.tar", &["--no-index"]));
    assert!(
        err.contains("Dockerfile:2: COPY link /x: link: is a symlink to /etc/passwd outside the build context"),
        "{err}"
    );
    assert_eq!(stray_files(t, &["img", "src"]), Vec::<String>::new());
    // The taskgraph hash would follow it: kiln refuses, naming the link.
    let err = fails(&mut hash_cmd(t, "taskgraph"));
    assert!(
        err.contains("img/link: symlink to /etc/passwd leads outside the source tree"),
        "{err}"
    );
    // kiln-v1 hashes the link itself; a COPY of its directory stores the link, not the file.
    ok(&mut hash_cmd(t, "kiln-v1"));
    write(t, "img/Dockerfile", b"FROM scratch\nCOPY . /c/\n");
    ok(&mut build_cmd(t, "o.tar", &["--no-index"]));
    let l = layers(&t.join("o.tar")).pop().unwrap();
    let link = l.iter().find(|i| i.path == "c/link").unwrap();
    assert_eq!(
        (link.kind, link.link.as_str(), link.data.len()),
        ('2', "/etc/passwd", 0)
    );
    let passwd = fs::read("/etc/passwd").unwrap();
    assert!(l.iter().all(|i| i.data != passwd));

    // A link inside the source tree is fine, from the image dir too.
    fs::remove_file(t.join("img/link")).unwrap();
    symlink("../src/ok.txt", t.join("img/link")).unwrap();
    write(t, "img/Dockerfile", b"FROM scratch\nCOPY link /x\n");
    ok(&mut build_cmd(t, "o.tar", &["--no-index"]));
    ok(&mut hash_cmd(t, "taskgraph"));
}

#[test]
fn includes_that_leave_topsrcdir_are_refused_with_their_line() {
    let d = tree(&[(
        "img/Dockerfile",
        b"FROM scratch\n# %include src/out/hostname\n",
    )]);
    let t = d.path();
    fs::create_dir_all(t.join("src")).unwrap();
    symlink("/etc", t.join("src/out")).unwrap();
    for algorithm in ["kiln-v1", "taskgraph"] {
        let err = fails(&mut hash_cmd(t, algorithm));
        assert!(
            err.contains("Dockerfile:2: extra include path leads outside topsrcdir through a symlink: src/out/hostname"),
            "{algorithm}: {err}"
        );
    }
    write(
        t,
        "img/Dockerfile",
        b"FROM scratch\n# %include /etc/hostname\n",
    );
    let err = fails(&mut hash_cmd(t, "kiln-v1"));
    assert!(
        err.contains("Dockerfile:2: extra include path cannot be absolute: /etc/hostname"),
        "{err}"
    );
    write(
        t,
        "img/Dockerfile",
        b"FROM scratch\n\n# %include ../../etc/hostname\n",
    );
    let err = fails(&mut hash_cmd(t, "kiln-v1"));
    assert!(
        err.contains("Dockerfile:3: extra include path outside topsrcdir"),
        "{err}"
    );
    write(
        t,
        "img/Dockerfile",
        b"FROM scratch\nCOPY ../../etc/hostname /x\n",
    );
    let err = fails(&mut build_cmd(t, "o.tar", &["--no-index"]));
    assert!(err.contains("Dockerfile:2: COPY ../../etc/hostname /x: ../../etc/hostname: source path is outside the build context"), "{err}");
    assert!(!t.join("o.tar").exists());
}

#[test]
fn fifos_sockets_and_loops_are_errors_not_hangs() {
    let d = tree(&[("img/Dockerfile", b"FROM scratch\nCOPY . /c/\n")]);
    let t = d.path();
    let fifo = t.join("img/fifo");
    ok(Command::new("mkfifo").arg(&fifo));
    let run_with_timeout = |mut c: Command| {
        let child = c
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let out = child.wait_with_output().unwrap();
        assert!(start.elapsed() < Duration::from_secs(20), "kiln hung");
        out
    };
    for algorithm in ["kiln-v1", "taskgraph"] {
        let out = run_with_timeout(hash_cmd(t, algorithm));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("img/fifo: is a FIFO; only regular files, directories and symlinks"),
            "{err}"
        );
    }
    fs::remove_file(&fifo).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(t.join("img/sock")).unwrap();
    let err = fails(&mut build_cmd(t, "o.tar", &["--no-index"]));
    assert!(err.contains("img/sock: is a socket"), "{err}");
    fs::remove_file(t.join("img/sock")).unwrap();

    symlink("loop-b", t.join("img/loop-a")).unwrap();
    symlink("loop-a", t.join("img/loop-b")).unwrap();
    // Stored as the links they are.
    ok(&mut build_cmd(t, "o.tar", &["--no-index"]));
    let l = layers(&t.join("o.tar")).pop().unwrap();
    assert!(l
        .iter()
        .any(|i| i.path == "c/loop-a" && i.kind == '2' && i.link == "loop-b"));
    let err = fails(&mut hash_cmd(t, "taskgraph"));
    assert!(
        err.contains("loop-a: broken symlink or symlink loop"),
        "{err}"
    );
    write(t, "img/Dockerfile", b"FROM scratch\nCOPY loop-a /x\n");
    let err = fails(&mut build_cmd(t, "o.tar", &["--no-index"]));
    assert!(
        err.contains("loop-a: is a symlink to loop-b which is not a regular file"),
        "{err}"
    );
}

#[test]
fn odd_names_are_stored_and_hashed_exactly() {
    use std::os::unix::ffi::OsStrExt;
    let d = tree(&[("img/Dockerfile", b"FROM scratch\nCOPY . /c/\n")]);
    let t = d.path();
    let latin1 = std::ffi::OsStr::from_bytes(b"caf\xe9.txt");
    fs::write(t.join("img").join(latin1), b"latin-1 name").unwrap();
    let long = "n".repeat(200);
    fs::write(t.join("img").join(&long), b"200-byte name").unwrap();
    let deep = format!(
        "{}/{}/{}",
        "d".repeat(100),
        "e".repeat(100),
        "f".repeat(100)
    );
    write(t, &format!("img/{deep}"), b"path over 255 bytes");
    ok(&mut hash_cmd(t, "kiln-v1"));
    ok(&mut build_cmd(t, "o.tar", &["--no-index"]));
    let l = layers(&t.join("o.tar")).pop().unwrap();
    let names: Vec<&str> = l.iter().map(|i| i.path.as_str()).collect();
    assert!(names.contains(&"c/caf\u{fffd}.txt"), "{names:?}");
    let long_path = format!("c/{long}");
    assert!(l
        .iter()
        .any(|i| i.path == long_path && i.data == b"200-byte name"));
    let deep_path = format!("c/{deep}");
    assert!(l
        .iter()
        .any(|i| i.path == deep_path && i.data == b"path over 255 bytes"));
}

#[test]
fn a_file_over_8_gib_is_stored_with_its_exact_size() {
    let d = tree(&[("img/Dockerfile", b"FROM scratch\nCOPY big /big\n")]);
    let t = d.path();
    let size: u64 = (8 << 30) + 3;
    let f = fs::File::create(t.join("img/big")).unwrap();
    f.set_len(size).unwrap();
    {
        use std::os::unix::fs::FileExt;
        f.write_all_at(b"end", size - 3).unwrap();
    }
    let v = json(&ok(&mut build_cmd(
        t,
        "big.oci.tar",
        &["--no-index", "--json", "--layer-compression", "zstd"],
    )));
    assert_eq!(v["layers"].as_array().unwrap().len(), 1);
    // The layer's header carries the exact size (more than the 8 GiB an
    // octal ustar field holds): read the header, not the 8 GiB.
    let r = kiln::source::ImageFile::open(&t.join("big.oci.tar")).unwrap();
    let m = r.summary().unwrap().manifest;
    let blob = r.read_blob(&m.layers[0]).unwrap();
    let dec = zstd::stream::read::Decoder::new(&blob[..]).unwrap();
    let mut ar = tar::Archive::new(dec);
    let first = ar.entries().unwrap().next().unwrap().unwrap();
    assert_eq!(first.path().unwrap().to_string_lossy(), "big");
    assert_eq!(first.size(), size);
}

#[test]
fn a_file_changed_under_the_build_fails_it() {
    use std::io::BufRead;
    let d = tree(&[("img/Dockerfile", b"FROM scratch\nCOPY files /files/\n")]);
    let t = d.path();
    // Enough data that the layer is still being written when the file changes.
    for i in 0..40 {
        write(t, &format!("img/files/f{i:02}"), &vec![b'a'; 4 << 20]);
    }
    let target = t.join("img/files/f39");
    let mut child = build_cmd(
        t,
        "o.tar",
        &[
            "--no-index",
            "--progress",
            "plain",
            "--layer-compression",
            "gzip",
            "--compression-level",
            "9",
        ],
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .unwrap();
    // Once the context is hashed, change a file: same size, new bytes.
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
        if line.contains("hashing context") {
            fs::write(&target, vec![b'b'; 4 << 20]).unwrap();
            break;
        }
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    seen.push_str(&rest);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "the build must notice: {seen}");
    assert!(
        seen.contains("f39: the file changed while kiln read it"),
        "{seen}"
    );
    assert!(!t.join("o.tar").exists());
    assert_eq!(stray_files(t, &["img"]), Vec::<String>::new());
}

/// Names in `dir` that start with `.kiln-`.
fn kiln_temps(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".kiln-"))
        .collect()
}

#[test]
fn kill_9_leaves_the_old_output_or_none_and_the_next_run_cleans_up() {
    use std::io::BufRead;
    let d = tree(&[("img/Dockerfile", b"FROM scratch\nCOPY files /files/\n")]);
    let t = d.path();
    for i in 0..40 {
        write(
            t,
            &format!("img/files/f{i:02}"),
            &vec![b'a' + (i % 26) as u8; 4 << 20],
        );
    }
    let out_dir = t.join("out");
    fs::create_dir_all(&out_dir).unwrap();
    for (out, extra) in [("o.tar", "docker-archive"), ("o.oci", "oci-dir")] {
        // An old output at the target, then a build killed while it writes.
        fs::write(out_dir.join(out), b"old output").ok();
        if extra == "oci-dir" {
            let _ = fs::remove_file(out_dir.join(out));
        }
        let mut child = kiln()
            .arg("build")
            .arg(t.join("img"))
            .arg("--topsrcdir")
            .arg(t)
            .arg("-o")
            .arg(out_dir.join(out))
            .args(["--format", extra, "--no-index", "--progress", "plain"])
            .args(["--layer-compression", "gzip", "--compression-level", "9"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        while stderr.read_line(&mut line).unwrap() > 0 && !line.contains("hashing context") {
            line.clear();
        }
        std::thread::sleep(Duration::from_millis(200));
        child.kill().unwrap();
        child.wait().unwrap();
        match extra {
            "docker-archive" => {
                assert_eq!(
                    fs::read(out_dir.join(out)).unwrap(),
                    b"old output",
                    "the old output stays"
                );
            }
            _ => assert!(!out_dir.join(out).exists(), "no partial layout"),
        }
        assert!(
            !kiln_temps(&out_dir).is_empty(),
            "the killed run left its temp files"
        );
        // The next run removes what the dead process left, and succeeds.
        ok(kiln()
            .arg("build")
            .arg(t.join("img"))
            .arg("--topsrcdir")
            .arg(t)
            .arg("-o")
            .arg(out_dir.join(out))
            .args(["--format", extra, "--no-index"]));
        assert_eq!(kiln_temps(&out_dir), Vec::<String>::new());
    }
}

#[test]
fn a_full_disk_is_a_clear_error_and_leaves_no_partial_output() {
    let d = tree(&[("img/Dockerfile", b"FROM scratch\nCOPY big /big\n")]);
    let t = d.path();
    // 4 MiB of incompressible bytes; the file-size limit is 1 MiB.
    let mut x: u64 = 7;
    let big: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            (x >> 56) as u8
        })
        .collect();
    write(t, "img/big", &big);
    let kiln_bin = env!("CARGO_BIN_EXE_kiln");
    let out = t.join("out/o.tar");
    fs::create_dir_all(t.join("out")).unwrap();
    let script = format!(
        "trap '' XFSZ; ulimit -f 1024; exec '{kiln_bin}' build '{}' --topsrcdir '{}' -o '{}' --no-index",
        t.join("img").display(),
        t.display(),
        out.display()
    );
    let err = fails(
        Command::new("bash")
            .arg("-c")
            .arg(script)
            .env_remove("KILN_STORE"),
    );
    assert!(err.contains("File too large"), "{err}");
    assert!(err.contains("kiln: error: "), "{err}");
    assert!(!out.exists());
    assert_eq!(kiln_temps(&t.join("out")), Vec::<String>::new());
}

/// A tar with raw names (the tar crate refuses to write `..` and absolute
/// paths, so headers are filled by hand).
fn raw_tar(entries: &[(&str, u8, &str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, link, data) in entries {
        let mut h = tar::Header::new_old();
        {
            let b = h.as_mut_bytes();
            b[..name.len()].copy_from_slice(name.as_bytes());
            b[157..157 + link.len()].copy_from_slice(link.as_bytes());
        }
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_entry_type(tar::EntryType::new(*kind));
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

#[test]
fn layers_with_absolute_and_climbing_names_stay_inside_the_rootfs() {
    let d = tree(&[(
        "img/Dockerfile",
        b"FROM scratch\nCOPY --from=t/evil:1 / /c/\n",
    )]);
    let t = d.path();
    let layer = raw_tar(&[
        ("/abs/file", b'0', "", b"abs"),
        ("../../escape", b'0', "", b"esc"),
        ("ok/../up", b'0', "", b"up"),
        ("link", b'2', "/etc/passwd", b""),
        ("hard", b'1', "../../abs/file", b""),
    ]);
    let (store, _) = evil_store(t, &layer, None);
    ok(&mut build_cmd(
        t,
        "o.tar",
        &["--no-index", "--store", store.to_str().unwrap()],
    ));
    let l = layers(&t.join("o.tar")).pop().unwrap();
    let got: Vec<(String, char, String, Vec<u8>)> = l
        .iter()
        .map(|i| (i.path.clone(), i.kind, i.link.clone(), i.data.clone()))
        .collect();
    let f = |p: &str, data: &[u8]| (p.to_string(), '0', String::new(), data.to_vec());
    assert!(got.contains(&f("c/abs/file", b"abs")), "{got:?}");
    assert!(got.contains(&f("c/escape", b"esc")), "{got:?}");
    assert!(got.contains(&f("c/up", b"up")), "{got:?}");
    // The link is kept as a link, never followed: /etc/passwd is not read.
    assert!(
        got.contains(&("c/link".into(), '2', "/etc/passwd".into(), vec![])),
        "{got:?}"
    );
    assert!(
        got.iter()
            .all(|g| !g.0.contains("..") && !g.0.starts_with('/')),
        "{got:?}"
    );
    assert_eq!(
        stray_files(t, &["img", "evil-store", "o.tar"]),
        Vec::<String>::new()
    );
}

#[test]
fn broken_images_in_a_store_are_named_errors() {
    let d = tree(&[("img/Dockerfile", b"FROM t/evil:1\nCOPY Dockerfile /x\n")]);
    let t = d.path();
    let layer = raw_tar(&[("f", b'0', "", b"data")]);
    let build = |store: &Path| {
        fails(&mut build_cmd(
            t,
            "o.tar",
            &["--no-index", "--store", store.to_str().unwrap()],
        ))
    };

    // Truncated layer blob.
    let (store, ld) = evil_store(t, &layer, None);
    let p = store
        .join("blobs/sha256")
        .join(ld.trim_start_matches("sha256:"));
    fs::write(&p, &layer[..1000]).unwrap();
    let err = build(&store);
    assert!(
        err.contains(&format!("blob {ld} does not match its digest or size")),
        "{err}"
    );
    // Missing layer blob.
    fs::remove_file(&p).unwrap();
    let err = build(&store);
    assert!(
        err.contains(&format!("blob {ld} is missing from the image")),
        "{err}"
    );
    fs::remove_dir_all(&store).unwrap();
    // A config that is not JSON.
    let (store, _) = evil_store(t, &layer, Some(b"{not json"));
    let err = build(&store);
    assert!(
        err.contains("config sha256:") && err.contains("is not valid JSON"),
        "{err}"
    );
    fs::remove_dir_all(&store).unwrap();
    // A config that declares an absurd size is never read into memory.
    let (store, _) = evil_store(t, &layer, None);
    let idx = fs::read_to_string(store.join("index.json")).unwrap();
    let mdigest = idx
        .split("\"digest\":\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let mpath = store
        .join("blobs/sha256")
        .join(mdigest.trim_start_matches("sha256:"));
    let m = fs::read_to_string(&mpath).unwrap();
    let huge = m.replacen("\"size\":", "\"size\":99999999999,\"x\":", 1);
    let huge_digest = format!("sha256:{}", sha256_hex(huge.as_bytes()));
    fs::write(
        store
            .join("blobs/sha256")
            .join(huge_digest.trim_start_matches("sha256:")),
        &huge,
    )
    .unwrap();
    fs::write(
        store.join("index.json"),
        idx.replace(&mdigest, &huge_digest).replace(
            &format!("\"size\":{}", m.len()),
            &format!("\"size\":{}", huge.len()),
        ),
    )
    .unwrap();
    let err = build(&store);
    assert!(
        err.contains("declares 99999999999 bytes; kiln reads manifests and configs of at most"),
        "{err}"
    );
    assert!(!t.join("o.tar").exists());
}

#[test]
fn a_decompression_bomb_given_to_add_is_refused() {
    use std::io::Write;
    let d = tree(&[("img/Dockerfile", b"FROM scratch\nADD bomb.tar.gz /b/\n")]);
    let t = d.path();
    // A tar of one 3 GiB file of zeros, gzip-compressed to about 3 MB.
    let f = fs::File::create(t.join("img/bomb.tar.gz")).unwrap();
    let mut gz =
        flate2::write::GzEncoder::new(std::io::BufWriter::new(f), flate2::Compression::best());
    let size: u64 = 3 << 30;
    let mut h = tar::Header::new_gnu();
    h.set_path("zeros").unwrap();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    gz.write_all(h.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(size >> 20) {
        gz.write_all(&zeros).unwrap();
    }
    gz.write_all(&[0u8; 1024]).unwrap();
    gz.finish().unwrap().flush().unwrap();
    let err = fails(&mut build_cmd(t, "o.tar", &["--no-index"]));
    assert!(
        err.contains("bomb.tar.gz: decompresses to more than 1000 times its size"),
        "{err}"
    );
    assert!(!t.join("o.tar").exists());
    assert_eq!(stray_files(t, &["img"]), Vec::<String>::new());
}

#[test]
fn a_layer_with_a_wrong_media_type_is_refused() {
    let d = tree(&[("img/Dockerfile", b"FROM t/evil:1\nCOPY Dockerfile /x\n")]);
    let t = d.path();
    let layer = raw_tar(&[("f", b'0', "", b"data")]);
    let (store, ld) = evil_store(t, &layer, None);
    // Rewrite the manifest with a JSON media type for the layer.
    let idx = fs::read_to_string(store.join("index.json")).unwrap();
    let md = idx
        .split("\"digest\":\"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    let mp = store
        .join("blobs/sha256")
        .join(md.trim_start_matches("sha256:"));
    let m = fs::read_to_string(&mp).unwrap();
    let bad = m.replace("application/vnd.oci.image.layer.v1.tar", "application/json");
    let bd = format!("sha256:{}", sha256_hex(bad.as_bytes()));
    fs::write(
        store
            .join("blobs/sha256")
            .join(bd.trim_start_matches("sha256:")),
        &bad,
    )
    .unwrap();
    fs::write(
        store.join("index.json"),
        idx.replace(&md, &bd).replace(
            &format!("\"size\":{}", m.len()),
            &format!("\"size\":{}", bad.len()),
        ),
    )
    .unwrap();
    let err = fails(&mut build_cmd(
        t,
        "o.tar",
        &["--no-index", "--store", store.to_str().unwrap()],
    ));
    assert!(
        err.contains(&format!(
            "layer {ld} has media type \"application/json\", which is not a layer"
        )),
        "{err}"
    );
    assert!(!t.join("o.tar").exists());
}

#[test]
fn malformed_dockerfiles_are_errors_with_line_column_and_text() {
    let d = tree(&[("img/f", b"x")]);
    let t = d.path();
    let cases: &[(&[u8], &str)] = &[
        (b"FROM scratch\nFOO bar\n", "Dockerfile: line 2 column 1: unknown instruction 'FOO'"),
        (b"# only a comment\n", "Dockerfile: expected at least one FROM instruction"),
        (b"COPY f /f\nFROM scratch\n", "Dockerfile: line 1 column 1: expected FROM"),
        (b"FROM scratch\nCOPY <<EOF /x\nhello\n", "Dockerfile: line 4 column 1: expected end of here-document (EOF)"),
        (
            b"FROM scratch\nCMD [\"a\", \"b\"\n",
            "Dockerfile: line 2 column 1: CMD [\"a\", \"b\": [\"a\", \"b\" looks like a JSON array but is not valid JSON",
        ),
        (
            b"FROM scratch\nCOPY --chmod=999 f /x\n",
            "Dockerfile:2: COPY --chmod=999 f /x: --chmod=999: expected an octal mode between 0 and 7777",
        ),
        (
            b"FROM scratch\nCOPY --chown=: f /x\n",
            "Dockerfile:2: COPY --chown=: f /x: --chown=:: expected USER[:GROUP]",
        ),
        (
            b"FROM scratch\nCOPY --bogus f /x\n",
            "Dockerfile:2: COPY --bogus f /x: unknown flag --bogus for COPY",
        ),
        (
            b"FROM scratch\nCOPY --from=nostage /a /b\n",
            "Dockerfile:2: COPY --from=nostage /a /b: --from=nostage: no stage is named nostage (the stages before this one: none named), and base image nostage:",
        ),
        (
            b"FROM scratch AS builder\nFROM scratch AS test\nFROM scratch\nCOPY --from=buidler /a /b\n",
            "Dockerfile:4: COPY --from=buidler /a /b: --from=buidler: no stage is named buidler (the stages before this one: builder, test), and base image buidler:",
        ),
        (
            b"FROM scratch AS builder\nFROM scratch\nRUN --mount=type=bind,from=buidler,target=/m true\n",
            "Dockerfile:3: RUN --mount=type=bind,from=buidler,target=/m true: --mount from=buidler: no stage is named buidler (the stages before this one: builder), and base image buidler:",
        ),
    ];
    // The same message whether the index is consulted (the plan finds
    // the error) or not (the build does).
    for extra in [&["--no-index"][..], &[][..]] {
        for (text, want) in cases {
            write(t, "img/Dockerfile", text);
            let err = fails(build_cmd(t, "o.tar", extra).env("XDG_CACHE_HOME", t.join("cache")));
            assert!(
                err.contains(want),
                "{extra:?} for {:?}:\n{err}",
                String::from_utf8_lossy(text)
            );
            assert!(!t.join("o.tar").exists());
        }
    }
}

#[test]
fn a_closed_pipe_ends_kiln_quietly() {
    let d = tree(&[("img/Dockerfile", b"FROM scratch\nENV A=1\n")]);
    ok(&mut build_cmd(d.path(), "o.tar", &["--no-index"]));
    // stdout is a pipe nobody reads: its read end is closed before kiln starts.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = kiln()
        .arg("inspect")
        .arg(d.path().join("o.tar"))
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(13),
        "ended by SIGPIPE, like any filter"
    );
}

#[test]
fn a_file_named_like_a_hash_line_never_collides_with_two_files() {
    // {a, b} against one file named "a\n<sha256 of b> 100644 b" holding a's
    // bytes: the kiln-v1 lines of the two trees were the same bytes.
    let two = tree(&[
        ("img/Dockerfile", b"FROM scratch\n"),
        ("img/a", b"A"),
        ("img/b", b"B"),
    ]);
    let forged = format!("img/a\n{} 100644 b", sha256_hex(b"B"));
    let one = tree(&[("img/Dockerfile", b"FROM scratch\n"), (&forged, b"A")]);
    let h = |t: &Path| ok(&mut hash_cmd(t, "kiln-v1")).trim().to_string();
    assert_ne!(h(two.path()), h(one.path()));
    // A tree without `\` or newline in its names keeps its hash: the
    // bundled example's is pinned in README and tests/example.rs.
}
