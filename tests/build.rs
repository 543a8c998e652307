//! `kiln build` end to end on temp-dir fixtures: every instruction, Docker's
//! COPY/ADD semantics, the determinism rules, the summary and the errors.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::process::Command;

use common::*;

fn find<'a>(layer: &'a [Item], path: &str) -> &'a Item {
    layer.iter().find(|i| i.path == path).unwrap_or_else(|| {
        panic!(
            "{path} not in {:?}",
            layer.iter().map(|i| &i.path).collect::<Vec<_>>()
        )
    })
}

fn paths(layer: &[Item]) -> Vec<&str> {
    layer.iter().map(|i| i.path.as_str()).collect()
}

#[test]
fn copy_sources_destinations_and_wildcards() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY a.txt b.txt /multi/\nCOPY *.md /docs/\nCOPY dir /contents\nCOPY a.txt /renamed\nWORKDIR /w\nCOPY a.txt rel/\n"),
        ("img/a.txt", b"A"),
        ("img/b.txt", b"B"),
        ("img/x.md", b"X"),
        ("img/y.md", b"Y"),
        ("img/dir/sub/deep.txt", b"deep"),
        ("img/dir/top.txt", b"top"),
    ]);
    build(d.path(), "o.tar", &[]);
    let l = layers(&d.path().join("o.tar"));
    assert_eq!(l.len(), 6, "five COPYs and one WORKDIR that creates /w");
    assert_eq!(paths(&l[0]), ["multi/", "multi/a.txt", "multi/b.txt"]);
    assert_eq!(paths(&l[1]), ["docs/", "docs/x.md", "docs/y.md"]);
    // directory contents, not the directory itself
    assert_eq!(
        paths(&l[2]),
        [
            "contents/",
            "contents/sub/",
            "contents/sub/deep.txt",
            "contents/top.txt"
        ]
    );
    assert_eq!(find(&l[3], "renamed").data, b"A");
    assert_eq!(paths(&l[4]), ["w/"]);
    assert_eq!(paths(&l[5]), ["w/", "w/rel/", "w/rel/a.txt"]);
}

#[test]
fn multiple_sources_need_a_directory_destination() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY a b /file\n"),
        ("img/a", b"a"),
        ("img/b", b"b"),
    ]);
    let err = build_fails(d.path(), "o.tar", &[]);
    assert!(err.contains("Dockerfile:2: COPY a b /file:"), "{err}");
    assert!(
        err.contains("must be a directory and end with a /"),
        "{err}"
    );
    assert!(!d.path().join("o.tar").exists(), "no partial output");
}

#[test]
fn missing_source_names_the_path_and_line() {
    let d = tree(&[("img/Dockerfile", b"FROM scratch\n\nCOPY nothere /x\n")]);
    let err = build_fails(d.path(), "o.tar", &[]);
    assert!(
        err.contains("Dockerfile:3: COPY nothere /x: nothere: not found in build context"),
        "{err}"
    );
    let d = tree(&[(
        "img/Dockerfile",
        b"FROM scratch\nCOPY ../../etc/passwd /x\n",
    )]);
    let err = build_fails(d.path(), "o.tar", &[]);
    assert!(err.contains("outside the build context"), "{err}");
}

#[test]
fn layers_are_sorted_root_owned_and_timestamped() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY . /app/\n"),
        ("img/z.txt", b"z"),
        ("img/a/b/c.txt", b"c"),
        ("img/a-b.txt", b"ab"),
    ]);
    build(d.path(), "o.tar", &["--timestamp", "1700000000"]);
    let l = layers(&d.path().join("o.tar"));
    let p = paths(&l[0]);
    // byte order of the paths ("a-b.txt" < "a/b"); parents before children
    assert_eq!(
        p,
        [
            "app/",
            "app/Dockerfile",
            "app/a/",
            "app/a-b.txt",
            "app/a/b/",
            "app/a/b/c.txt",
            "app/z.txt"
        ]
    );
    for i in &l[0] {
        assert_eq!((i.uid, i.gid, i.mtime), (0, 0, 1700000000), "{}", i.path);
    }
    let cfg = config(&d.path().join("o.tar"));
    assert_eq!(cfg.created.as_deref(), Some("2023-11-14T22:13:20Z"));
    assert!(cfg
        .history
        .iter()
        .all(|h| h.created.as_deref() == Some("2023-11-14T22:13:20Z")));
}

#[test]
fn mode_policy_git_normalizes_and_preserve_keeps() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY f x /\n"),
        ("img/f", b"f"),
        ("img/x", b"x"),
    ]);
    chmod(&d.path().join("img/f"), 0o640);
    chmod(&d.path().join("img/x"), 0o750);
    build(d.path(), "git.tar", &[]);
    build(d.path(), "keep.tar", &["--mode-policy", "preserve"]);
    let g = layers(&d.path().join("git.tar"));
    assert_eq!(
        (find(&g[0], "f").mode, find(&g[0], "x").mode),
        (0o644, 0o755)
    );
    let k = layers(&d.path().join("keep.tar"));
    assert_eq!(
        (find(&k[0], "f").mode, find(&k[0], "x").mode),
        (0o640, 0o750)
    );
}

#[test]
fn setuid_sources_are_refused_unless_chmod_is_given() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY s /s\n"),
        ("img/s", b"s"),
    ]);
    chmod(&d.path().join("img/s"), 0o4755);
    let err = build_fails(d.path(), "o.tar", &[]);
    assert!(err.contains("setuid") && err.contains("--chmod"), "{err}");
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM scratch\nCOPY --chmod=0755 s /s\n",
    );
    build(d.path(), "o.tar", &[]);
    assert_eq!(find(&layers(&d.path().join("o.tar"))[0], "s").mode, 0o755);
}

#[test]
fn chown_chmod_and_link_flags() {
    let d = tree(&[
        (
            "img/Dockerfile",
            b"FROM scratch\nCOPY passwd group /etc/\nCOPY --chown=app:staff --chmod=600 f /opt/f\nCOPY --chown=7 --link f /n/f\nCOPY --chown=app f /u/f\n",
        ),
        ("img/passwd", b"root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n"),
        ("img/group", b"root:x:0:\nstaff:x:50:\n"),
        ("img/f", b"f"),
    ]);
    build(d.path(), "o.tar", &[]);
    let l = layers(&d.path().join("o.tar"));
    let f = find(&l[1], "opt/f");
    assert_eq!((f.uid, f.gid, f.mode), (1000, 50, 0o600));
    // created parents belong to the --chown user, as BuildKit makes them
    assert_eq!(
        (find(&l[1], "opt/").uid, find(&l[1], "opt/").gid),
        (1000, 50)
    );
    assert_eq!((find(&l[2], "n/f").uid, find(&l[2], "n/f").gid), (7, 7));
    assert_eq!(
        (find(&l[3], "u/f").uid, find(&l[3], "u/f").gid),
        (1000, 1001)
    );
}

#[test]
fn chown_names_need_the_image_passwd() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY --chown=app f /f\n"),
        ("img/f", b"f"),
    ]);
    let err = build_fails(d.path(), "o.tar", &[]);
    assert!(
        err.contains("user app is not in the image's /etc/passwd"),
        "{err}"
    );
    for bad in ["--chmod=999", "--chmod=abc", "--chown=:", "--chown=1:"] {
        write(
            d.path(),
            "img/Dockerfile",
            format!("FROM scratch\nCOPY {bad} f /f\n").as_bytes(),
        );
        let err = build_fails(d.path(), "o.tar", &[]);
        assert!(
            err.contains(bad) && err.contains("Dockerfile:2"),
            "{bad}: {err}"
        );
    }
}

#[test]
fn dockerignore_uses_dockers_rules() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY . /c/\n"),
        (
            "img/.dockerignore",
            b"# comment\n*.log\n!keep.log\nbuild\n**/*.tmp\n",
        ),
        ("img/a.log", b"x"),
        ("img/keep.log", b"x"),
        ("img/build/out.o", b"x"),
        ("img/src/deep/x.tmp", b"x"),
        ("img/src/deep/y.c", b"x"),
    ]);
    build(d.path(), "o.tar", &[]);
    let l = layers(&d.path().join("o.tar"));
    assert_eq!(
        paths(&l[0]),
        [
            "c/",
            "c/.dockerignore",
            "c/Dockerfile",
            "c/keep.log",
            "c/src/",
            "c/src/deep/",
            "c/src/deep/y.c"
        ]
    );
    write(d.path(), "img/Dockerfile", b"FROM scratch\nCOPY a.log /a\n");
    let err = build_fails(d.path(), "o.tar", &[]);
    assert!(err.contains("excluded by .dockerignore"), "{err}");
}

#[test]
fn symlinks_stay_links_inside_directories_and_are_followed_when_named() {
    let d = tree(&[
        (
            "img/Dockerfile",
            b"FROM scratch\nCOPY d /d\nCOPY d/l /named\n",
        ),
        ("img/d/t.txt", b"target"),
    ]);
    symlink("t.txt", d.path().join("img/d/l")).unwrap();
    build(d.path(), "o.tar", &[]);
    let l = layers(&d.path().join("o.tar"));
    let link = find(&l[0], "d/l");
    assert_eq!((link.kind, link.link.as_str()), ('2', "t.txt"));
    assert_eq!(find(&l[1], "named").data, b"target");
}

#[test]
fn hard_links_within_one_copy_become_hard_link_entries() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY d /d\n"),
        ("img/d/a", b"same"),
    ]);
    fs::hard_link(d.path().join("img/d/a"), d.path().join("img/d/b")).unwrap();
    build(d.path(), "o.tar", &[]);
    let l = layers(&d.path().join("o.tar"));
    assert_eq!(find(&l[0], "d/a").kind, '0');
    let b = find(&l[0], "d/b");
    assert_eq!((b.kind, b.link.as_str()), ('1', "d/a"));
}

#[test]
fn add_extracts_local_archives_and_refuses_urls() {
    let d = tree(&[("img/Dockerfile", b"FROM scratch\nADD a.tar /t/\nADD a.tar.gz /g/\nADD a.tar.xz /x/\nADD a.tar.zst /z/\nADD plain.txt /p.txt\n"), ("img/plain.txt", b"plain")]);
    let mut raw = Vec::new();
    {
        let mut b = tar::Builder::new(&mut raw);
        let mut h = tar::Header::new_gnu();
        h.set_size(5);
        h.set_mode(0o640);
        h.set_uid(5);
        h.set_gid(6);
        h.set_cksum();
        b.append_data(&mut h, "inner/file.txt", &b"hello"[..])
            .unwrap();
        b.finish().unwrap();
    }
    fs::write(d.path().join("img/a.tar"), &raw).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &raw).unwrap();
    fs::write(d.path().join("img/a.tar.gz"), gz.finish().unwrap()).unwrap();
    let mut xz = xz2::write::XzEncoder::new(Vec::new(), 6);
    std::io::Write::write_all(&mut xz, &raw).unwrap();
    fs::write(d.path().join("img/a.tar.xz"), xz.finish().unwrap()).unwrap();
    fs::write(
        d.path().join("img/a.tar.zst"),
        zstd::encode_all(&raw[..], 3).unwrap(),
    )
    .unwrap();
    build(d.path(), "o.tar", &[]);
    let l = layers(&d.path().join("o.tar"));
    for (i, dir) in ["t", "g", "x", "z"].iter().enumerate() {
        let f = find(&l[i], &format!("{dir}/inner/file.txt"));
        assert_eq!(
            (f.data.as_slice(), f.mode, f.uid, f.gid),
            (&b"hello"[..], 0o640, 5, 6),
            "{dir}"
        );
    }
    assert_eq!(find(&l[4], "p.txt").data, b"plain");
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM scratch\nADD https://example.com/x /x\n",
    );
    let err = build_fails(d.path(), "o.tar", &[]);
    assert!(err.contains("kiln never downloads"), "{err}");
}

#[test]
fn heredocs_in_copy() {
    let d = tree(&[("img/Dockerfile", b"FROM scratch\nARG WHO=world\nCOPY <<EOF /etc/motd\nhello $WHO\nEOF\nCOPY <<'A' <<B /two/\nraw $WHO\nA\nb\nB\n")]);
    build(d.path(), "o.tar", &[]);
    let l = layers(&d.path().join("o.tar"));
    assert_eq!(find(&l[0], "etc/motd").data, b"hello world\n");
    assert_eq!(find(&l[1], "two/A").data, b"raw $WHO\n");
    assert_eq!(find(&l[1], "two/B").data, b"b\n");
}

#[test]
fn config_instructions_fill_the_image_config() {
    let d = tree(&[(
        "img/Dockerfile",
        br#"ARG BASE=scratch
FROM ${BASE}
ARG V=1
ARG OVER=default
ENV A=$V B="two words" C=${MISSING:-fallback}
ENV LEGACY value with spaces
LABEL org.example.v=$V "quoted key"=x
MAINTAINER someone
USER 1000:1000
WORKDIR /srv
WORKDIR app
EXPOSE 80 53/udp 8000-8001
VOLUME ["/data", "/v$V"]
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --retries=3 CMD ["/bin/check", "-q"]
SHELL ["/bin/bash", "-c"]
ENTRYPOINT echo $OVER
ENV O=$OVER
CMD ["--help"]
ONBUILD COPY . /onbuild
"#,
    )]);
    build(d.path(), "o.tar", &["--arg", "OVER=given"]);
    let c = config(&d.path().join("o.tar"));
    let rc = &c.config;
    assert_eq!(
        rc.env.as_ref().unwrap(),
        &vec![
            "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
            "A=1".into(),
            "B=two words".into(),
            "C=fallback".into(),
            "LEGACY=value with spaces".into(),
            "O=given".into()
        ]
    );
    let labels = rc.labels.as_ref().unwrap();
    assert_eq!(labels.get("org.example.v").map(String::as_str), Some("1"));
    assert_eq!(labels.get("quoted key").map(String::as_str), Some("x"));
    assert_eq!(c.author.as_deref(), Some("someone"));
    assert_eq!(rc.user.as_deref(), Some("1000:1000"));
    assert_eq!(rc.working_dir.as_deref(), Some("/srv/app"));
    assert_eq!(
        rc.exposed_ports
            .as_ref()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["53/udp", "80/tcp", "8000/tcp", "8001/tcp"]
    );
    assert_eq!(
        rc.volumes.as_ref().unwrap().keys().collect::<Vec<_>>(),
        ["/data", "/v1"]
    );
    assert_eq!(rc.stop_signal.as_deref(), Some("SIGTERM"));
    let hc = rc.healthcheck.as_ref().unwrap();
    assert_eq!(hc.test, ["CMD", "/bin/check", "-q"]);
    assert_eq!(
        (hc.interval, hc.timeout, hc.retries),
        (30_000_000_000, 5_000_000_000, 3)
    );
    assert_eq!(rc.shell.as_ref().unwrap(), &["/bin/bash", "-c"]);
    // shell-form ENTRYPOINT uses the SHELL; CMD words are not expanded
    assert_eq!(
        rc.entrypoint.as_ref().unwrap(),
        &["/bin/bash", "-c", "echo $OVER"]
    );
    assert_eq!(rc.cmd.as_ref().unwrap(), &["--help"]);
    assert_eq!(rc.on_build.as_ref().unwrap(), &["COPY . /onbuild"]);
    // WORKDIR created /srv (owned by USER 1000) and /srv/app: two layers
    let l = layers(&d.path().join("o.tar"));
    assert_eq!(l.len(), 2);
    assert_eq!(
        (find(&l[0], "srv/").uid, find(&l[0], "srv/").gid),
        (1000, 1000)
    );
    assert_eq!(paths(&l[1]), ["srv/", "srv/app/"]);
    let by: Vec<&str> = c
        .history
        .iter()
        .map(|h| h.created_by.as_deref().unwrap())
        .collect();
    assert_eq!(by[0], "ARG V=1");
    assert!(by.contains(&"WORKDIR /srv"));
    assert_eq!(c.history.iter().filter(|h| !h.empty_layer).count(), 2);
}

#[test]
fn run_on_scratch_fails_naming_the_line_and_the_missing_shell() {
    let d = tree(&[(
        "img/Dockerfile",
        b"FROM scratch\nCOPY Dockerfile /\nRUN echo hi\n",
    )]);
    let err = build_fails(d.path(), "o.tar", &["--no-index"]);
    assert!(
        err.contains("Dockerfile:3: RUN echo hi: the command exited with code 127")
            && err.contains("executing /bin/sh: No such file or directory"),
        "{err}"
    );
    assert!(!d.path().join("o.tar").exists());
}

#[test]
fn syntax_errors_name_line_and_column_of_the_original_file() {
    let d = tree(&[("img/Dockerfile", b"# %ARG X\nFROM scratch\nBOGUS thing\n")]);
    let mut cmd = kiln();
    cmd.arg("build")
        .arg(d.path().join("img"))
        .arg("--topsrcdir")
        .arg(d.path())
        .arg("--arg")
        .arg("X=1")
        .arg("-o")
        .arg(d.path().join("o.tar"));
    let err = fails(&mut cmd);
    // line 3 of the file as written, though `# %ARG` lines are dropped before parsing
    assert!(err.contains("Dockerfile: line 3 column 1"), "{err}");
}

#[test]
fn base_images_are_refused_with_a_clear_error() {
    let d = tree(&[("img/Dockerfile", b"FROM debian:12\n")]);
    let err = build_fails(d.path(), "o.tar", &[]);
    assert!(
        err.contains("Dockerfile:1: FROM debian:12: base image debian:12"),
        "{err}"
    );
}

#[test]
fn summary_json_digest_file_and_default_tags() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY f /f\n"),
        ("img/f", b"f"),
        ("img/VERSION", b"1.2\n"),
        ("img/REGISTRY", b"registry.example/ci\n"),
    ]);
    let df = d.path().join("digest");
    let v = build(d.path(), "o.tar", &["--digest-file", df.to_str().unwrap()]);
    assert_eq!(v["status"], "built");
    assert_eq!(v["tags"][0], "registry.example/ci/img:1.2");
    assert_eq!(v["context_hash"].as_str().unwrap().len(), 64);
    let layer = &v["layers"][0];
    assert_eq!(
        layer["media_type"],
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );
    assert!(layer["digest"].as_str().unwrap().starts_with("sha256:"));
    assert!(layer["diff_id"].as_str().unwrap().starts_with("sha256:"));
    assert!(layer["size"].as_u64().unwrap() > 0);
    assert_eq!(
        fs::read_to_string(&df).unwrap().trim(),
        v["manifest_digest"].as_str().unwrap()
    );
    // the context hash in the summary is the one `kiln hash` prints
    let h = ok(kiln()
        .arg("hash")
        .arg(d.path().join("img"))
        .arg("--topsrcdir")
        .arg(d.path()));
    assert_eq!(h.trim(), v["context_hash"]);
    // without REGISTRY/VERSION: <dir>:latest; text output labels the three hashes
    fs::remove_file(d.path().join("img/VERSION")).unwrap();
    fs::remove_file(d.path().join("img/REGISTRY")).unwrap();
    let text = ok(kiln()
        .arg("build")
        .arg(d.path().join("img"))
        .arg("-o")
        .arg(d.path().join("p.tar")));
    assert!(
        text.contains("context hash:")
            && text.contains("image id:        sha256:")
            && text.contains("manifest digest: sha256:"),
        "{text}"
    );
    assert!(text.contains("img:latest"), "{text}");
}

#[test]
fn timestamp_comes_from_flag_then_source_date_epoch() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY f /f\n"),
        ("img/f", b"f"),
    ]);
    let mut cmd = kiln();
    cmd.arg("build")
        .arg(d.path().join("img"))
        .arg("-o")
        .arg(d.path().join("e.tar"))
        .env("SOURCE_DATE_EPOCH", "1234567890");
    ok(&mut cmd);
    assert_eq!(
        find(&layers(&d.path().join("e.tar"))[0], "f").mtime,
        1234567890
    );
    build(d.path(), "z.tar", &[]);
    assert_eq!(find(&layers(&d.path().join("z.tar"))[0], "f").mtime, 0);
    assert_eq!(
        config(&d.path().join("z.tar")).created.as_deref(),
        Some("1970-01-01T00:00:00Z")
    );
}

#[test]
fn every_format_holds_the_same_image() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY f /f\nCMD [\"/f\"]\n"),
        ("img/f", b"f"),
    ]);
    let zstd_dir = build(d.path(), "dir", &["--format", "oci-dir"]);
    let zstd_oci = build(d.path(), "o.oci.tar", &[]);
    let gz_docker = build(d.path(), "d.tar", &[]);
    let zst_whole = build(d.path(), "image.tar.zst", &[]);
    assert_eq!(zstd_dir["manifest_digest"], zstd_oci["manifest_digest"]);
    assert_eq!(
        zstd_dir["layers"][0]["media_type"],
        "application/vnd.oci.image.layer.v1.tar+zstd"
    );
    assert_eq!(
        zst_whole["layers"][0]["media_type"],
        "application/vnd.oci.image.layer.v1.tar"
    );
    // same content whatever the compression: same diff_ids
    for v in [&zstd_oci, &gz_docker, &zst_whole] {
        assert_eq!(v["layers"][0]["diff_id"], zstd_dir["layers"][0]["diff_id"]);
    }
    // the .tar.zst is zstd over a docker-archive with manifest.json and repositories
    let raw = zstd::decode_all(&fs::read(d.path().join("image.tar.zst")).unwrap()[..]).unwrap();
    let mut ar = tar::Archive::new(&raw[..]);
    let names: Vec<String> = ar
        .entries()
        .unwrap()
        .map(|e| String::from_utf8_lossy(&e.unwrap().path_bytes()).into_owned())
        .collect();
    for n in ["oci-layout", "index.json", "manifest.json", "repositories"] {
        assert!(names.contains(&n.to_string()), "{n} missing from {names:?}");
    }
    let inspect = ok(kiln().arg("inspect").arg(d.path().join("image.tar.zst")));
    assert!(
        inspect.contains(zst_whole["manifest_digest"].as_str().unwrap()),
        "{inspect}"
    );
    assert!(inspect.contains("Cmd: [\"/f\"]"), "{inspect}");
    let ij = json(&ok(kiln()
        .arg("inspect")
        .arg("--json")
        .arg(d.path().join("dir"))));
    assert_eq!(ij["image_id"], zstd_dir["image_id"]);
    // outputs are world-readable, like files docker save or skopeo write
    use std::os::unix::fs::PermissionsExt;
    for p in [d.path().join("d.tar"), d.path().join("image.tar.zst")] {
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o644,
            "{}",
            p.display()
        );
    }
    for e in fs::read_dir(d.path().join("dir/blobs/sha256")).unwrap() {
        assert_eq!(
            e.unwrap().metadata().unwrap().permissions().mode() & 0o777,
            0o644
        );
    }
}

#[test]
fn untracked_and_git_ignored_files_are_in_the_context() {
    let d = tree(&[
        (
            "img/Dockerfile",
            b"# %include src\nFROM scratch\nCOPY topsrcdir/src /src\n",
        ),
        (".gitignore", b"*.gen\n"),
        ("src/tracked.txt", b"t"),
        ("src/ignored.gen", b"g"),
    ]);
    assert!(std::process::Command::new("git")
        .arg("init")
        .arg("-q")
        .arg(d.path())
        .status()
        .unwrap()
        .success());
    // --build-arg is an alias of --arg; the default topsrcdir is the enclosing checkout
    let mut cmd = kiln();
    cmd.arg("build")
        .arg(d.path().join("img"))
        .arg("--build-arg")
        .arg("UNUSED=1")
        .arg("-o")
        .arg(d.path().join("o.tar"));
    ok(&mut cmd);
    let l = layers(&d.path().join("o.tar"));
    let names: Vec<&str> = l[0].iter().map(|i| i.path.as_str()).collect();
    assert_eq!(names, ["src/", "src/ignored.gen", "src/tracked.txt"]);
}

#[test]
fn oci_dir_refuses_to_replace_a_non_layout_directory() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY f /f\n"),
        ("img/f", b"f"),
        ("busy/keep.txt", b"mine"),
    ]);
    let err = build_fails(d.path(), "busy", &["--format", "oci-dir"]);
    assert!(err.contains("is not an OCI image layout"), "{err}");
    assert_eq!(fs::read(d.path().join("busy/keep.txt")).unwrap(), b"mine");
    // an existing layout is replaced
    build(d.path(), "lay", &["--format", "oci-dir"]);
    build(
        d.path(),
        "lay",
        &["--format", "oci-dir", "--layer-compression", "gzip"],
    );
    assert!(fs::read_to_string(d.path().join("lay/index.json"))
        .unwrap()
        .contains("application/vnd.oci.image.manifest.v1+json"));
}

#[test]
fn a_failed_build_leaves_no_output_or_temp_files() {
    let d = tree(&[
        (
            "img/Dockerfile",
            b"FROM scratch\nCOPY f /f\nCOPY missing /m\n",
        ),
        ("img/f", b"f"),
    ]);
    fs::create_dir_all(d.path().join("out")).unwrap();
    build_fails(d.path(), "out/o.tar", &[]);
    assert_eq!(
        fs::read_dir(d.path().join("out")).unwrap().count(),
        0,
        "nothing left behind"
    );
}

#[test]
fn compression_levels_out_of_range_are_usage_errors() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY f /f\n"),
        ("img/f", b"f"),
    ]);
    let err = build_fails(d.path(), "o.oci.tar", &["--compression-level", "30"]);
    assert!(err.contains("zstd levels run from 1 to 22"), "{err}");
    let err = build_fails(
        d.path(),
        "o.tar",
        &["--layer-compression", "gzip", "--compression-level", "12"],
    );
    assert!(err.contains("gzip levels run from 0 to 9"), "{err}");
    let fast = build(d.path(), "1.oci.tar", &["--compression-level", "1"]);
    let slow = build(d.path(), "19.oci.tar", &["--compression-level", "19"]);
    assert_eq!(fast["layers"][0]["diff_id"], slow["layers"][0]["diff_id"]);
    assert_ne!(
        fast["manifest_digest"], slow["manifest_digest"],
        "the level is in the compressor annotation"
    );
}

#[test]
fn identical_layers_are_stored_once_in_streamed_archives() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY f /f\nCOPY f /f\n"),
        ("img/f", b"same"),
    ]);
    for out in ["d.tar", "o.oci.tar"] {
        let v = build(d.path(), out, &[]);
        assert_eq!(v["layers"][0]["digest"], v["layers"][1]["digest"]);
        let raw = fs::read(d.path().join(out)).unwrap();
        let mut ar = tar::Archive::new(&raw[..]);
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| String::from_utf8_lossy(&e.unwrap().path_bytes()).into_owned())
            .collect();
        let layer = format!(
            "blobs/sha256/{}",
            v["layers"][0]["digest"]
                .as_str()
                .unwrap()
                .trim_start_matches("sha256:")
        );
        assert_eq!(
            names.iter().filter(|n| **n == layer).count(),
            1,
            "{out}: {names:?}"
        );
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len(), "{out}: no entry twice");
        // and the archive reads back whole: every blob verified
        assert_eq!(layers(&d.path().join(out)).len(), 2);
        assert_eq!(
            ok(kiln().arg("inspect").arg(d.path().join(out)))
                .matches("diff_id")
                .count(),
            2
        );
    }
}

#[test]
fn from_platform_must_be_the_host_platform() {
    let host = if cfg!(target_arch = "x86_64") {
        "linux/amd64"
    } else {
        "linux/arm64"
    };
    let d = tree(&[
        (
            "img/Dockerfile",
            format!("FROM --platform={host} scratch\nCOPY f /f\n").as_bytes(),
        ),
        ("img/f", b"f"),
    ]);
    let v = build(d.path(), "o.tar", &[]);
    assert_eq!(v["layers"].as_array().unwrap().len(), 1);
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM --platform=linux/s390x scratch\n",
    );
    let err = build_fails(d.path(), "o.tar", &[]);
    assert!(
        err.contains("--platform=linux/s390x") && err.contains("host platform"),
        "{err}"
    );
}

#[test]
fn dash_f_builds_a_plain_docker_context_with_its_dockerignore() {
    let d = tree(&[
        ("ctx/a.txt", b"A"),
        ("ctx/skip.log", b"S"),
        ("ctx/.dockerignore", b"*.log\n"),
        ("df/Build.Dockerfile", b"FROM scratch\nCOPY . /all/\n"),
    ]);
    let out = d.path().join("o.tar");
    let v = json(&ok(kiln()
        .current_dir(d.path())
        .args([
            "build",
            "-f",
            "df/Build.Dockerfile",
            "ctx",
            "--json",
            "--no-index",
            "-t",
            "x:1",
            "-o",
        ])
        .arg(&out)));
    assert_eq!(v["status"], "built");
    let names: Vec<String> = layers(&out).concat().into_iter().map(|i| i.path).collect();
    // The context root is ctx/; its .dockerignore hides skip.log; the
    // Dockerfile from elsewhere is not in the context.
    assert_eq!(names, ["all/", "all/.dockerignore", "all/a.txt"]);
    // Without -f, ctx/ has no Dockerfile: the error says so.
    let err = fails(
        kiln()
            .current_dir(d.path())
            .args(["build", "ctx", "-o", "p.tar"]),
    );
    assert!(err.contains("no Dockerfile in image directory"), "{err}");
    let err = fails(
        kiln()
            .current_dir(d.path())
            .args(["build", "-f", "df/none", "ctx", "-o", "p.tar"]),
    );
    assert!(
        err.contains("df/none") && err.contains("no such Dockerfile (-f)"),
        "{err}"
    );
}

#[test]
fn iidfile_holds_the_image_id_and_digest_file_the_manifest_digest() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY f /f\n"),
        ("img/f", b"f"),
    ]);
    let (iid, dig) = (d.path().join("iid"), d.path().join("digest"));
    let v = build(
        d.path(),
        "o.tar",
        &[
            "--iidfile",
            iid.to_str().unwrap(),
            "--digest-file",
            dig.to_str().unwrap(),
        ],
    );
    assert_eq!(
        fs::read_to_string(&iid).unwrap(),
        v["image_id"].as_str().unwrap()
    );
    assert_eq!(
        fs::read_to_string(&dig).unwrap(),
        format!("{}\n", v["manifest_digest"].as_str().unwrap())
    );
}

#[test]
fn completions_are_printed_for_each_shell() {
    for (shell, marker) in [
        ("bash", "_kiln()"),
        ("zsh", "#compdef kiln"),
        ("fish", "complete -c kiln"),
    ] {
        let out = ok(kiln().args(["completions", shell]));
        assert!(out.contains(marker), "{shell}: {out}");
        assert!(out.contains("iidfile"), "{shell} completes build's flags");
    }
    let o = run(kiln().args(["completions", "tcsh"]));
    assert_eq!(o.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&o.stderr).contains("tcsh"));
}

#[test]
fn docker_s_flag_habits_pull_before_the_context_and_build_arg_from_the_environment() {
    let d = tree(&[(
        "img/Dockerfile",
        b"FROM scratch\nARG GREETING\nARG UNSET\nLABEL greeting=$GREETING unset=x$UNSET\n",
    )]);
    // `--pull .` builds `.`; `--build-arg NAME` takes $NAME.
    let v = json(&ok(kiln()
        .current_dir(d.path().join("img"))
        .env("GREETING", "from-env")
        .env_remove("UNSET")
        .args([
            "build",
            "--pull",
            ".",
            "--build-arg",
            "GREETING",
            "--build-arg",
            "UNSET",
        ])
        .args(["--no-index", "--json", "-o"])
        .arg(d.path().join("o.tar"))));
    assert_eq!(v["status"], "built");
    let labels = config(&d.path().join("o.tar"))
        .config
        .labels
        .unwrap_or_default();
    assert_eq!(labels.get("greeting").map(String::as_str), Some("from-env"));
    assert_eq!(labels.get("unset").map(String::as_str), Some("x"));
}

/// `--label KEY=VALUE` (KEY alone: empty) goes over the Dockerfile's LABEL
/// of the same key, as `docker build --label` does (compared with the
/// machine's engine); a changed label is a rebuild, the same one is up to
/// date; a label with no key is an error.
#[test]
fn labels_from_the_command_line_go_over_the_dockerfile_s_as_docker_build_s() {
    let d = tree(&[
        (
            "img/Dockerfile",
            b"FROM scratch\nLABEL a=dockerfile keep=yes\nCOPY f /f\n",
        ),
        ("img/f", b"f"),
    ]);
    let t = d.path();
    let labels = ["--label", "a=cli", "--label", "c=d e", "--label", "empty"];
    let mut args = vec!["--no-index"];
    args.extend(labels);
    build(t, "o.tar", &args);
    let got = config(&t.join("o.tar")).config.labels.unwrap();
    let want: std::collections::BTreeMap<String, String> =
        [("a", "cli"), ("c", "d e"), ("empty", ""), ("keep", "yes")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    assert_eq!(got, want);

    let cache = t.join("cache");
    let status = |extra: &[&str]| {
        let v = json(&ok(build_cmd(t, "i.tar", extra)
            .arg("--json")
            .env("XDG_CACHE_HOME", &cache)));
        v["status"].as_str().unwrap().to_string()
    };
    assert_eq!(status(&["--label", "a=1"]), "built");
    assert_eq!(status(&["--label", "a=1"]), "up to date");
    assert_eq!(status(&["--label", "a=2"]), "built");
    assert_eq!(status(&[]), "built");

    let err = fails(&mut build_cmd(t, "x.tar", &["--no-index", "--label", "=v"]));
    assert!(err.contains("--label =v: a label needs a key"), "{err}");
    assert!(!t.join("x.tar").exists());

    if !docker_available() {
        return;
    }
    let tag = "kiln-label-test:1";
    ok(Command::new("docker")
        .args(["build", "-q", "-t", tag])
        .args(labels)
        .arg(t.join("img")));
    let out =
        ok(Command::new("docker").args(["inspect", "--format", "{{json .Config.Labels}}", tag]));
    let _ = Command::new("docker").args(["rmi", "-f", tag]).output();
    let docker: std::collections::BTreeMap<String, String> =
        serde_json::from_str(out.trim()).unwrap();
    assert_eq!(docker, want);
}

/// `-q` prints only the image id (`sha256:…`, one line, as `docker build
/// -q` does) and nothing on stderr; it is the id `--json` reports.
#[test]
fn quiet_prints_only_the_image_id() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY f /f\n"),
        ("img/f", b"f"),
    ]);
    let t = d.path();
    let out = run(&mut build_cmd(
        t,
        "q.tar",
        &["--no-index", "-q", "--progress", "plain"],
    ));
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
    let id = String::from_utf8(out.stdout).unwrap();
    let v = build(t, "j.tar", &["--no-index"]);
    assert_eq!(id, format!("{}\n", v["image_id"].as_str().unwrap()));
    assert!(id.starts_with("sha256:") && id.len() == 7 + 64 + 1, "{id}");
    // A usage error, as clap gives them (exit 2).
    let o = run(&mut build_cmd(t, "x.tar", &["--no-index", "-q", "--json"]));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("'--quiet' cannot be used with '--json'"),
        "{err}"
    );
}

/// `-o` as BuildKit takes it: `type=docker,dest=FILE` and
/// `type=oci,dest=FILE` write those archives; `-o -` writes the
/// docker-archive to standard output, byte for byte the file `-o FILE`
/// gives, with the summary on stderr; `type=tar` (a filesystem export)
/// and unknown forms are errors that create nothing, never a directory
/// named after the value.
#[test]
fn output_takes_buildkit_s_type_syntax_and_standard_output() {
    let d = tree(&[
        ("img/Dockerfile", b"FROM scratch\nCOPY f /f\n"),
        ("img/f", b"f"),
    ]);
    let t = d.path();
    let cache = t.join("cache");
    let kiln_o = |o: &str| {
        let mut c = kiln();
        c.arg("build")
            .arg(t.join("img"))
            .args(["--no-index", "-o", o])
            .env("XDG_CACHE_HOME", &cache)
            .current_dir(t);
        c
    };
    ok(&mut kiln_o("plain.tar"));
    ok(&mut kiln_o("type=docker,dest=docker.tar"));
    assert_eq!(
        fs::read(t.join("docker.tar")).unwrap(),
        fs::read(t.join("plain.tar")).unwrap()
    );
    ok(&mut kiln_o("type=oci,dest=oci.tar"));
    let oci = fs::read(t.join("oci.tar")).unwrap();
    assert!(
        oci.windows(10).any(|w| w == b"oci-layout"),
        "an OCI archive"
    );
    let out = run(&mut kiln_o("-"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.stdout, fs::read(t.join("plain.tar")).unwrap());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("built: docker-archive (standard output)"),
        "{err}"
    );
    // Its temporary file is gone, and was never in the context.
    let tmp: Vec<_> = fs::read_dir(cache.join("kiln/tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "{tmp:?}");
    for (bad, says) in [
        ("type=tar,dest=fs", "type=tar exports the image's files"),
        ("type=docker,bogus=1", "does not know the key \"bogus\""),
        ("dest=x.tar", "BuildKit's form starts with type="),
    ] {
        let err = fails(&mut kiln_o(bad));
        assert!(err.contains(says), "{bad}: {err}");
    }
    let mut names: Vec<String> = fs::read_dir(t)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["cache", "docker.tar", "img", "oci.tar", "plain.tar"]
    );
}
