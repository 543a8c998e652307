//! The taskgraph algorithm and `kiln context` against the real
//! taskcluster-taskgraph (installed from PyPI by setup.sh): same hash, same
//! uncompressed tar, same gzip header fields.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;

use common::*;

/// A tree with every case the issue names.
fn tricky_tree(root: &Path, crlf: bool) {
    let long = "d".repeat(60) + "/" + &"f".repeat(70) + ".txt"; // > 100 bytes with the prefix
    let df = [
        "# %ARG PARENT",
        "# %ARG VERSION",
        "# %include src/lib",
        "# %include src/single.txt",
        "# %include src/nested",
        "# %include src/nested/inner",
        "# %include-run-task",
        "FROM $PARENT:$VERSION",
        "LABEL v=$VERSION $VERSIONS ${VERSION}",
        "COPY topsrcdir/src /src",
        "",
    ];
    let sep = if crlf { "\r\n" } else { "\n" };
    write(
        root,
        "taskcluster/docker/img/Dockerfile",
        df.join(sep).as_bytes(),
    );
    write(root, "taskcluster/docker/img/files/empty", b"");
    let x = write(
        root,
        "taskcluster/docker/img/files/run.sh",
        b"#!/bin/sh\necho hi\n",
    );
    chmod(&x, 0o755);
    write(root, "taskcluster/docker/img/__pycache__/junk.pyc", b"junk");
    write(
        root,
        "taskcluster/docker/img/sub/__pycache__/x.pyc",
        b"junk",
    );
    write(root, &format!("src/lib/{long}"), b"long name");
    write(
        root,
        "src/lib/caf\u{e9}/\u{65e5}\u{672c}.txt",
        "non-ascii".as_bytes(),
    );
    write(root, "src/lib/a.txt", b"a");
    let g = write(root, "src/lib/group.txt", b"group-writable");
    chmod(&g, 0o664);
    write(root, "src/lib/__pycache__/m.pyc", b"cache");
    symlink("a.txt", root.join("src/lib/link-to-a")).unwrap();
    write(root, "src/single.txt", b"single");
    write(root, "src/nested/outer.txt", b"outer");
    write(root, "src/nested/inner/inner.txt", b"inner");
}

fn run_task_dir(py: &Path) -> String {
    let out = ok(Command::new(py).args(["-c", "import os, taskgraph; print(os.path.join(os.path.dirname(taskgraph.__file__), 'run-task'))"]));
    out.trim().to_string()
}

const ARGS: [&str; 2] = ["PARENT=base", "VERSION=1.0"];

fn py_args() -> String {
    ARGS.iter()
        .map(|a| {
            let (k, v) = a.split_once('=').unwrap();
            format!("'{k}': '{v}'")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn taskgraph_hash(py: &Path, topsrcdir: &Path, image: &str) -> String {
    let code = format!(
        "from taskgraph.util.docker import generate_context_hash as g; print(g({:?}, {:?}, {{{}}}))",
        topsrcdir.to_str().unwrap(),
        image,
        py_args()
    );
    ok(Command::new(py).args(["-c", &code])).trim().to_string()
}

fn kiln_args(cmd: &mut Command, topsrcdir: &Path, rt: &str) {
    cmd.arg("--topsrcdir")
        .arg(topsrcdir)
        .arg("--run-task-dir")
        .arg(rt);
    for a in ARGS {
        cmd.arg("--arg").arg(a);
    }
}

#[test]
fn taskgraph_hash_matches_taskgraph_on_tricky_trees() {
    let py = taskgraph_python();
    let rt = run_task_dir(&py);
    for crlf in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        tricky_tree(dir.path(), crlf);
        let expected = taskgraph_hash(&py, dir.path(), "taskcluster/docker/img");
        let mut cmd = kiln();
        cmd.args(["hash", "--algorithm", "taskgraph"])
            .arg(dir.path().join("taskcluster/docker/img"));
        kiln_args(&mut cmd, dir.path(), &rt);
        assert_eq!(ok(&mut cmd).trim(), expected, "crlf={crlf}");
    }
}

#[test]
fn context_archive_is_byte_identical_to_create_context_tar() {
    let py = taskgraph_python();
    let rt = run_task_dir(&py);
    let dir = tempfile::tempdir().unwrap();
    tricky_tree(dir.path(), false);
    let out = tempfile::tempdir().unwrap();
    let theirs = out.path().join("theirs.tar.gz");
    let code = format!(
        "from taskgraph.util.docker import create_context_tar as c; print(c({:?}, {:?}, {:?}, {{{}}}))",
        dir.path().to_str().unwrap(),
        "taskcluster/docker/img",
        theirs.to_str().unwrap(),
        py_args()
    );
    let their_hash = ok(Command::new(&py).args(["-c", &code])).trim().to_string();
    let ours = out.path().join("ours.tar.gz");
    let mut cmd = kiln();
    cmd.arg("context")
        .arg(dir.path().join("taskcluster/docker/img"))
        .arg("-o")
        .arg(&ours);
    kiln_args(&mut cmd, dir.path(), &rt);
    let our_hash = ok(&mut cmd).trim().to_string();
    assert_eq!(our_hash, their_hash);

    let (t, o) = (fs::read(&theirs).unwrap(), fs::read(&ours).unwrap());
    let (tt, ot) = (gunzip(&t), gunzip(&o));
    assert_eq!(tt.len(), ot.len());
    assert!(tt == ot, "decompressed context tars differ");
    assert_eq!(sha256_hex(&ot), our_hash);
    // gzip header: FLG.FNAME set, MTIME 1451606400, same file name field.
    assert_eq!(o[3] & 0x08, 0x08);
    assert_eq!(&o[4..8], &1451606400u32.to_le_bytes());
    let name = |b: &[u8]| b[10..].split(|&c| c == 0).next().unwrap().to_vec();
    // Python names the member after the output file it writes (theirs.tar), we after ours.
    assert_eq!(name(&t), b"theirs.tar");
    assert_eq!(name(&o), b"ours.tar");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(&ours).unwrap().permissions().mode() & 0o777,
        0o644
    );
}

#[test]
fn taskgraph_hash_matches_on_generated_trees() {
    let py = taskgraph_python();
    for seed in 1..=4u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = seed;
        let mut next = || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        write(
            dir.path(),
            "img/Dockerfile",
            b"# %include tree\nFROM scratch\nCOPY topsrcdir/tree /tree\n",
        );
        for i in 0..200 {
            let depth = next() % 4;
            let mut path = String::from("tree");
            for d in 0..depth {
                path.push_str(&format!("/d{}", (next() % 5) + d));
            }
            path.push_str(&format!("/f{i}"));
            let size = (next() % 3000) as usize;
            let content: Vec<u8> = (0..size).map(|_| next() as u8).collect();
            let p = write(dir.path(), &path, &content);
            if next() % 4 == 0 {
                chmod(&p, 0o755);
            }
        }
        let code = format!(
            "from taskgraph.util.docker import generate_context_hash as g; print(g({:?}, 'img', {{}}))",
            dir.path().to_str().unwrap()
        );
        let expected = ok(Command::new(&py).args(["-c", &code])).trim().to_string();
        let got = ok(kiln()
            .args(["hash", "--algorithm", "taskgraph", "--topsrcdir"])
            .arg(dir.path())
            .arg(dir.path().join("img")));
        assert_eq!(got.trim(), expected, "seed {seed}");
    }
}

#[test]
fn include_errors_use_taskgraph_words() {
    let dir = tempfile::tempdir().unwrap();
    for (line, words) in [
        (
            "# %include /etc/passwd",
            "extra include path cannot be absolute: /etc/passwd",
        ),
        (
            "# %include ../outside",
            "extra include path outside topsrcdir: ../outside",
        ),
        ("# %include nope", "extra include path does not exist: nope"),
        ("# %include-run-task", "needs --run-task-dir"),
        ("# %ARG MISSING", "missing argument: MISSING"),
    ] {
        write(
            dir.path(),
            "img/Dockerfile",
            format!("{line}\nFROM scratch\n").as_bytes(),
        );
        let err = fails(
            kiln()
                .args(["hash", "--topsrcdir"])
                .arg(dir.path())
                .arg(dir.path().join("img")),
        );
        assert!(err.contains(words), "{line}: {err}");
        assert!(err.contains("Dockerfile:1"), "{line}: {err}");
    }
}
