//! The local index: an unchanged image is not rebuilt, a one-byte change
//! in an included file is, concurrent builds of one image both succeed and
//! leave one entry, and `kiln routes` / `kiln index` show what is filed.

mod common;

use std::fs;
use std::path::Path;

use common::*;

fn s(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// An image that `# %include`s a file of the source tree.
fn included_tree() -> tempfile::TempDir {
    tree(&[
        (
            "img/Dockerfile",
            b"FROM scratch\n# %include shared/data.txt\nCOPY topsrcdir/shared/data.txt /data.txt\n",
        ),
        ("shared/data.txt", b"version 1\n"),
    ])
}

/// `kiln build --json` of `img/` with the user cache at `<dir>/cache`.
fn cached_build(d: &Path, out: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["--json"];
    args.extend_from_slice(extra);
    let mut c = build_cmd(d, out, &args);
    c.env("XDG_CACHE_HOME", d.join("cache"));
    json(&ok(&mut c))
}

#[test]
fn an_unchanged_image_is_exported_not_rebuilt_and_a_one_byte_change_misses() {
    let d = included_tree();
    let t = d.path();
    let first = cached_build(t, "a.tar", &[]);
    assert_eq!(s(&first["status"]), "built");
    let route = s(&first["route"]);
    assert_eq!(
        route,
        format!(
            "kiln.cache.level-3.docker-images.v2.img.hash.{}",
            s(&first["index_digest"])
        )
    );
    // A hit writes the same bytes from the user store.
    let second = cached_build(t, "b.tar", &[]);
    assert_eq!(s(&second["status"]), "up to date");
    assert_eq!(second["manifest_digest"], first["manifest_digest"]);
    assert_eq!(second["route"], first["route"]);
    assert_eq!(
        fs::read(t.join("a.tar")).unwrap(),
        fs::read(t.join("b.tar")).unwrap()
    );
    // --no-cache builds anyway (and gets the same image).
    let forced = cached_build(t, "c.tar", &["--no-cache"]);
    assert_eq!(s(&forced["status"]), "built");
    assert_eq!(forced["manifest_digest"], first["manifest_digest"]);
    // Other layer settings are another image.
    let gz = cached_build(t, "d.tar", &["--layer-compression", "none"]);
    assert_eq!(s(&gz["status"]), "built");
    assert_ne!(gz["index_digest"], first["index_digest"]);

    // One byte of an included file changes: a miss, a new image.
    write(t, "shared/data.txt", b"version 2\n");
    let third = cached_build(t, "e.tar", &[]);
    assert_eq!(s(&third["status"]), "built");
    assert_ne!(third["index_digest"], first["index_digest"]);
    assert_ne!(third["manifest_digest"], first["manifest_digest"]);
    // Back to the old bytes: the old entry hits again.
    write(t, "shared/data.txt", b"version 1\n");
    let fourth = cached_build(t, "f.tar", &[]);
    assert_eq!(s(&fourth["status"]), "up to date");
    assert_eq!(fourth["manifest_digest"], first["manifest_digest"]);
}

#[test]
fn a_lookup_tries_levels_three_down_to_the_requested_one() {
    let d = included_tree();
    let t = d.path();
    let l3 = cached_build(t, "a.tar", &["--level", "3"]);
    let l1 = cached_build(t, "b.tar", &["--level", "1"]);
    assert_eq!(s(&l1["status"]), "up to date");
    assert_eq!(
        s(&l1["route"]),
        s(&l3["route"]),
        "the level-3 entry serves level 1"
    );
    // A level-1 entry does not serve a level-3 lookup.
    let other = tree(&[("img/Dockerfile", b"FROM scratch\nENV X=1\n")]);
    fs::rename(t.join("cache"), other.path().join("cache")).unwrap();
    let o1 = cached_build(other.path(), "o.tar", &["--level", "1"]);
    assert_eq!(s(&o1["status"]), "built");
    assert!(s(&o1["route"]).starts_with("kiln.cache.level-1."), "{o1}");
    let o3 = cached_build(other.path(), "o3.tar", &["--level", "3"]);
    assert_eq!(s(&o3["status"]), "built");
}

#[test]
fn an_entry_whose_image_left_the_store_is_rebuilt() {
    let d = included_tree();
    let t = d.path();
    let first = cached_build(t, "a.tar", &[]);
    let store = t.join("cache/kiln/store");
    let name = format!("kiln.local/index/img:{}", s(&first["index_digest"]));
    ok(kiln().args(["store", "rm", &name, "--store"]).arg(&store));
    ok(kiln().args(["store", "gc", "--store"]).arg(&store));
    let again = cached_build(t, "b.tar", &[]);
    assert_eq!(s(&again["status"]), "built");
    assert_eq!(again["manifest_digest"], first["manifest_digest"]);
}

#[test]
fn concurrent_builds_of_one_image_both_succeed_and_leave_one_entry() {
    let d = included_tree();
    let t = d.path();
    // Enough files that the two builds overlap.
    for i in 0..300 {
        write(
            t,
            &format!("img/files/f{i}"),
            format!("{i}").repeat(500).as_bytes(),
        );
    }
    write(
        t,
        "img/Dockerfile",
        b"FROM scratch\n# %include shared/data.txt\nCOPY topsrcdir/shared/data.txt /data.txt\nCOPY files /files/\n",
    );
    let children: Vec<_> = (0..2)
        .map(|i| {
            let mut c = build_cmd(t, &format!("out{i}.tar"), &["--json"]);
            c.env("XDG_CACHE_HOME", t.join("cache"));
            c.stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<serde_json::Value> = children
        .into_iter()
        .map(|c| {
            let o = c.wait_with_output().unwrap();
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            json(&String::from_utf8_lossy(&o.stdout))
        })
        .collect();
    assert_eq!(outs[0]["manifest_digest"], outs[1]["manifest_digest"]);
    assert_eq!(
        fs::read(t.join("out0.tar")).unwrap(),
        fs::read(t.join("out1.tar")).unwrap()
    );
    let ls = json(&ok(kiln()
        .env("XDG_CACHE_HOME", t.join("cache"))
        .args(["index", "ls", "--json", "*.hash.*"])));
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
    assert_eq!(ls[0]["manifest_digest"], outs[0]["manifest_digest"]);
    // And the store names the image once.
    let store = json(&ok(kiln()
        .env("XDG_CACHE_HOME", t.join("cache"))
        .args(["store", "ls", "--json"])));
    assert_eq!(store.as_array().unwrap().len(), 1, "{store}");
    let after = cached_build(t, "again.tar", &[]);
    assert_eq!(s(&after["status"]), "up to date");
}

#[test]
fn routes_and_index_commands_show_what_is_filed() {
    let d = included_tree();
    let t = d.path();
    let routes = |extra: &[&str]| {
        let mut c = kiln();
        c.env("XDG_CACHE_HOME", t.join("cache"))
            .arg("routes")
            .arg(t.join("img"))
            .arg("--topsrcdir")
            .arg(t)
            .args(["--json", "--index-prefix", "gecko", "--level", "2"])
            .args(extra);
        json(&ok(&mut c))
    };
    let before = routes(&[]);
    let digest = s(&before["index_digest"]);
    assert_eq!(
        before["lookup"],
        serde_json::json!([
            format!("gecko.cache.level-3.docker-images.v2.img.hash.{digest}"),
            format!("gecko.cache.level-2.docker-images.v2.img.hash.{digest}"),
        ])
    );
    assert_eq!(before["hits"], serde_json::json!([null, null]));
    let write = before["write"].as_array().unwrap();
    assert_eq!(
        s(&write[1]),
        "gecko.cache.level-2.docker-images.v2.img.latest"
    );
    assert!(s(&write[2]).starts_with("gecko.cache.level-2.docker-images.v2.img.pushdate."));
    // kiln routes builds nothing.
    assert!(!t.join("cache/kiln/index").exists());

    let built = cached_build(t, "a.tar", &["--index-prefix", "gecko", "--level", "2"]);
    assert_eq!(s(&built["index_digest"]), digest, "routes and build agree");
    let after = routes(&[]);
    assert_eq!(
        after["hits"][1]["manifest_digest"],
        built["manifest_digest"]
    );

    let cmd = |args: &[&str]| {
        let mut c = kiln();
        c.env("XDG_CACHE_HOME", t.join("cache")).args(args);
        c
    };
    let ls = ok(&mut cmd(&["index", "ls"]));
    assert_eq!(ls.lines().count(), 3, "{ls}");
    let hash_route = format!("gecko.cache.level-2.docker-images.v2.img.hash.{digest}");
    let show = json(&ok(&mut cmd(&["index", "show", &hash_route])));
    assert_eq!(show["manifest_digest"], built["manifest_digest"]);
    assert_eq!(show["context_hash"], built["context_hash"]);
    let err = fails(&mut cmd(&["index", "show", "gecko.nothing"]));
    assert!(err.contains("gecko.nothing: no such route"), "{err}");
    ok(&mut cmd(&["index", "rm", "*.latest"]));
    assert_eq!(ok(&mut cmd(&["index", "ls"])).lines().count(), 2);
    let err = fails(&mut cmd(&["index", "rm", "*.latest"]));
    assert!(err.contains("no index entry matches *.latest"), "{err}");
}

#[test]
fn routes_of_a_digest_pinned_from_need_no_store() {
    let pin = format!("sha256:{}", "c".repeat(64));
    let d = tree(&[(
        "img/Dockerfile",
        format!("FROM registry.example/base:1@{pin}\n").as_bytes(),
    )]);
    let t = d.path();
    let routes = |df: &str| {
        write(t, "img/Dockerfile", df.as_bytes());
        let mut c = kiln();
        c.env("XDG_CACHE_HOME", t.join("cache"))
            .arg("routes")
            .arg(t.join("img"))
            .arg("--topsrcdir")
            .arg(t)
            .arg("--json");
        c
    };
    // No store holds the base: the pin is its digest in the index digest.
    let v = json(&ok(&mut routes(&format!(
        "FROM registry.example/base:1@{pin}\n"
    ))));
    assert_eq!(v["parents"], serde_json::json!([pin]));
    // Without a pin, the missing base is an error naming its line.
    let err = fails(&mut routes("FROM registry.example/base:1\n"));
    assert!(
        err.contains("Dockerfile:1") && err.contains("registry.example/base:1"),
        "{err}"
    );
}

/// Every file of a directory tree, relative path → bytes.
fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                out.push((rel, fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn no_index_an_indexed_build_and_a_hit_write_the_same_archive_bytes() {
    // A base layer from a store, a cached-nothing build: the archive takes
    // the base layer, this build's layer (streamed into the user store and
    // the output at once) and the config, in one order on every path.
    let d = included_tree();
    let t = d.path();
    let vendor = repo().join("vendor-images");
    write(
        t,
        "img/Dockerfile",
        b"FROM kiln/base:1\n# %include shared/data.txt\nCOPY topsrcdir/shared/data.txt /data.txt\n",
    );
    let st = vendor.to_str().unwrap();
    let plain = json(&ok(&mut build_cmd(
        t,
        "plain.tar",
        &["--store", st, "--no-index", "--json"],
    )));
    let built = cached_build(t, "built.tar", &["--store", st]);
    let hit = cached_build(t, "hit.tar", &["--store", st]);
    assert_eq!(s(&built["status"]), "built");
    assert_eq!(s(&hit["status"]), "up to date");
    assert_eq!(plain["manifest_digest"], built["manifest_digest"]);
    let bytes = |n: &str| fs::read(t.join(n)).unwrap();
    assert!(
        bytes("plain.tar") == bytes("built.tar"),
        "--no-index and indexed archives differ"
    );
    assert!(
        bytes("built.tar") == bytes("hit.tar"),
        "a built and an exported archive differ"
    );
    // The user store holds the layer the build streamed into it.
    let layer = built["layers"].as_array().unwrap().last().unwrap()["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let stored = t.join("cache/kiln/store/blobs/sha256").join(&layer);
    assert!(stored.is_file(), "{} missing", stored.display());
}

#[test]
fn a_layout_export_of_a_damaged_stored_blob_is_refused_and_leaves_nothing() {
    let d = included_tree();
    let t = d.path();
    let built = cached_build(t, "lay", &["--format", "oci-dir"]);
    assert_eq!(s(&built["status"]), "built");
    let first = files_of(&t.join("lay"));
    // A hit hard-links (or copies) each blob out of the user store, verified once.
    let again = cached_build(t, "lay2", &["--format", "oci-dir"]);
    assert_eq!(s(&again["status"]), "up to date");
    assert_eq!(files_of(&t.join("lay2")), first);
    // Same size, one byte flipped, in the user store: the export refuses it.
    let layer = built["layers"].as_array().unwrap()[0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let p = t
        .join("cache/kiln/store/blobs/sha256")
        .join(layer.trim_start_matches("sha256:"));
    let mut b = fs::read(&p).unwrap();
    let n = b.len();
    b[n / 2] ^= 0xff;
    fs::remove_file(&p).unwrap(); // the first layout may share its inode
    fs::write(&p, &b).unwrap();
    let mut c = build_cmd(t, "lay3", &["--format", "oci-dir"]);
    c.env("XDG_CACHE_HOME", t.join("cache"));
    let err = fails(&mut c);
    assert!(
        err.contains(&format!("blob {layer} does not match its digest or size")),
        "{err}"
    );
    assert!(!t.join("lay3").exists(), "no output from a damaged store");
    assert_eq!(files_of(&t.join("lay")), first, "earlier outputs untouched");
}
