//! `kiln diff` on pairs of images that differ in exactly one way, and
//! `kiln build --check-reproducible`.

mod common;

use std::path::Path;

use common::*;

fn diff(a: &Path, b: &Path) -> (i32, String) {
    let out = run(kiln().arg("diff").arg(a).arg(b));
    (
        out.status.code().unwrap(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Builds `img/` with `extra` to `out` (OCI archive, zstd).
fn img(d: &Path, out: &str, extra: &[&str]) -> std::path::PathBuf {
    let mut args = vec!["--no-index"];
    args.extend_from_slice(extra);
    ok(&mut build_cmd(d, out, &args));
    d.join(out)
}

#[test]
fn each_single_difference_is_named_exactly() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nENV A=1 B=2\nCOPY f /f\n"),
        ("img/f", b"hello world"),
    ]);
    let t = d.path();
    let base = img(t, "base.oci.tar", &[]);
    let (code, text) = diff(&base, &base);
    assert_eq!(code, 0, "{text}");
    assert!(text.starts_with("manifest: identical sha256:"), "{text}");

    // mtime: --timestamp changes every entry's mtime and the config's created.
    let other = img(t, "mtime.oci.tar", &["--timestamp", "7"]);
    let (code, text) = diff(&base, &other);
    assert_eq!(code, 1);
    assert!(text.contains("changed  f: mtime 0 vs 7\n"), "{text}");
    assert!(
        text.contains("config field created: \"1970-01-01T00:00:00Z\" vs \"1970-01-01T00:00:07Z\""),
        "{text}"
    );

    // mode
    chmod(&t.join("img/f"), 0o755);
    let other = img(t, "mode.oci.tar", &[]);
    let (_, text) = diff(&base, &other);
    assert!(text.contains("changed  f: mode 0644 vs 0755\n"), "{text}");
    chmod(&t.join("img/f"), 0o644);

    // owner
    write(
        t,
        "img/Dockerfile",
        b"FROM scratch\nENV A=1 B=2\nCOPY --chown=7:8 f /f\n",
    );
    let other = img(t, "owner.oci.tar", &[]);
    let (_, text) = diff(&base, &other);
    assert!(text.contains("changed  f: uid/gid 0:0 vs 7:8\n"), "{text}");
    assert!(
        text.contains("config field history:"),
        "the instruction text differs too: {text}"
    );

    // content: same size, one byte
    write(
        t,
        "img/Dockerfile",
        b"FROM scratch\nENV A=1 B=2\nCOPY f /f\n",
    );
    write(t, "img/f", b"hello World");
    let other = img(t, "content.oci.tar", &[]);
    let (_, text) = diff(&base, &other);
    assert!(
        text.contains("changed  f: content (first difference at byte 6)\n"),
        "{text}"
    );
    write(t, "img/f", b"hello world");

    // compression level: same content, only the compressed bytes differ
    let other = img(t, "level.oci.tar", &["--compression-level", "19"]);
    let (code, text) = diff(&base, &other);
    assert_eq!(code, 1);
    assert!(
        text.contains("only the compressed bytes differ: zstd"),
        "{text}"
    );
    assert!(
        text.contains("level 3 (multithreaded encoder)")
            && text.contains("level 19 (multithreaded encoder)"),
        "{text}"
    );
    assert!(!text.contains("changed  "), "{text}");

    // config env order
    write(
        t,
        "img/Dockerfile",
        b"FROM scratch\nENV B=2 A=1\nCOPY f /f\n",
    );
    let other = img(t, "env.oci.tar", &[]);
    let (_, text) = diff(&base, &other);
    assert!(text.contains("config field config.Env: [\"PATH="), "{text}");
    assert!(text.contains("layer 0: identical"), "{text}");

    // Added and removed entries, and --json.
    write(
        t,
        "img/Dockerfile",
        b"FROM scratch\nENV A=1 B=2\nCOPY f /g\n",
    );
    let other = img(t, "moved.oci.tar", &[]);
    let (_, text) = diff(&base, &other);
    assert!(
        text.contains("removed  f (only in A)") && text.contains("added    g (only in B)"),
        "{text}"
    );
    let out = run(kiln().args(["diff", "--json"]).arg(&base).arg(&other));
    assert_eq!(out.status.code(), Some(1));
    let v = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(v["identical"], false);
    assert_eq!(v["layers"][0]["verdict"], "content");

    // An unreadable image is exit 2.
    let (code, text) = diff(&base, &t.join("missing.tar"));
    assert_eq!(code, 2, "{text}");
}

#[test]
fn check_reproducible_builds_twice_and_agrees() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY . /app/\n"),
        ("img/a/b/c", b"1"),
        ("img/a/d", b"2"),
        ("img/z", b"3"),
    ]);
    for out in ["r.tar", "r.oci.tar", "image.tar.zst"] {
        let o = run(&mut build_cmd(
            d.path(),
            out,
            &["--check-reproducible", "-j", "2"],
        ));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{err}");
        assert!(
            err.contains("kiln: reproducible: a second build (1 thread(s) instead of 2, directories read in reverse"),
            "{err}"
        );
    }
}

#[test]
fn check_reproducible_fails_with_the_diff_report_when_the_second_build_differs() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY a /a\n"),
        ("img/a", b"1"),
    ]);
    let o = run(build_cmd(d.path(), "r.tar", &["--check-reproducible"])
        .env(kiln::assemble::PERTURB_ENV, "1"));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("not reproducible: the second build"), "{err}");
    // The report names what differs: the mtime of the one entry and `created`.
    assert!(err.contains("created"), "{err}");
    assert!(err.contains("mtime"), "{err}");
}

#[test]
fn check_reproducible_with_all_is_refused_naming_the_flag() {
    let d = tree(&[("img/Dockerfile", b"FROM scratch\n")]);
    let err = fails(kiln().current_dir(d.path()).args([
        "build",
        "--all",
        "img",
        "--out-dir",
        "out",
        "--check-reproducible",
    ]));
    assert!(
        err.contains("--check-reproducible checks one image"),
        "{err}"
    );
    assert!(!d.path().join("out").exists());
}

/// A one-layer tar of a directory `d/` (0755) and a file `d/f` (0644)
/// whose header mode fields hold `dir_mode` and `file_mode` as written.
fn typed_tar(dir_mode: u32, file_mode: u32, kind: u8) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(dir_mode);
    h.set_size(0);
    b.append_data(&mut h, "d/", std::io::empty()).unwrap();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::new(kind));
    h.set_mode(file_mode);
    h.set_size(2);
    b.append_data(&mut h, "d/f", &b"hi"[..]).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn mode_fields_with_file_type_bits_are_not_differences() {
    // Docker's writer keeps the type in the mode field (040755, 0100644)
    // and some writers mark regular files '\0'; kiln writes 0755 and '0'.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (sa, _) = evil_store(a.path(), &typed_tar(0o040755, 0o100644, b'\0'), None);
    let (sb, _) = evil_store(b.path(), &typed_tar(0o755, 0o644, b'0'), None);
    let (code, out) = diff(&sa, &sb);
    assert!(!out.contains("mode"), "{out}");
    assert!(!out.contains("type"), "{out}");
    assert!(!out.contains("changed"), "{out}");
    assert_eq!(code, 1, "the layer digests still differ: {out}");
    // A real permission difference is still one.
    let (c, _) = (tempfile::tempdir().unwrap(), ());
    let (sc, _) = evil_store(c.path(), &typed_tar(0o755, 0o600, b'0'), None);
    let (_, out) = diff(&sb, &sc);
    assert!(
        out.contains("mode 0644 vs 0600") || out.contains("0644") && out.contains("0600"),
        "{out}"
    );
}
