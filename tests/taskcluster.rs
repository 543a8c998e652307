//! kiln as Taskcluster's image builder (`kiln taskcluster build-image`):
//! a fake queue on 127.0.0.1 serves context tars made by taskgraph's own
//! `create_context_tar` and a parent's `image.tar.zst`; the parent's base
//! comes from the CNCF registry on 127.0.0.1. A parent and then a child
//! (`FROM $DOCKER_IMAGE_PARENT`, no ARG) build; the child's `.zst` loads
//! through taskgraph's `load_image` and runs; a wrong HASH and a missing
//! artifact fail with what a task log reader needs.

mod common;

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, Write};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};

use common::registry::*;
use common::*;

/// A fake queue: GET of a path in `files` answers its bytes; a path in
/// `moved` answers 303 to another path (the queue redirects artifact
/// downloads to storage); anything else 404.
#[derive(Clone, Default)]
struct Queue {
    files: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    moved: Arc<Mutex<HashMap<String, String>>>,
    addr: String,
}

impl Queue {
    fn start() -> Queue {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let q = Queue {
            addr: listener.local_addr().unwrap().to_string(),
            ..Default::default()
        };
        let served = q.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let served = served.clone();
                std::thread::spawn(move || {
                    let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
                    while let Some(head) = read_head(&mut r) {
                        let path = head
                            .lines()
                            .next()
                            .and_then(|l| l.split(' ').nth(1))
                            .unwrap_or("")
                            .to_string();
                        let moved = served.moved.lock().unwrap().get(&path).cloned();
                        let answer = if let Some(to) = moved {
                            format!("HTTP/1.1 303 See Other\r\nLocation: {to}\r\nContent-Length: 0\r\n\r\n").into_bytes()
                        } else if let Some(b) = served.files.lock().unwrap().get(&path) {
                            let mut a =
                                format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", b.len())
                                    .into_bytes();
                            a.extend_from_slice(b);
                            a
                        } else {
                            let body =
                                br#"{"code":"ResourceNotFound","message":"Artifact not found"}"#;
                            let mut a = format!("HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
                            a.extend_from_slice(body);
                            a
                        };
                        if conn.write_all(&answer).is_err() {
                            break;
                        }
                    }
                    let _ = r.fill_buf();
                });
            }
        });
        q
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Serves `bytes` as `task`'s artifact `name`, through a redirect.
    fn artifact(&self, task: &str, name: &str, bytes: Vec<u8>) {
        let path = format!("/api/queue/v1/task/{task}/artifacts/{name}");
        let storage = format!("/storage/{task}/{name}");
        self.files.lock().unwrap().insert(storage.clone(), bytes);
        self.moved.lock().unwrap().insert(path, storage);
    }
}

/// taskgraph's `create_context_tar` of `image` (under `tree`); its hash.
fn context_tar(tree: &Path, image: &str, out: &Path, args: &str) -> String {
    let py = taskgraph_python();
    let code = format!(
        "from taskgraph.util.docker import create_context_tar\nprint(create_context_tar({tree:?}, {img:?}, {out:?}, args={args}))",
        tree = tree.to_str().unwrap(),
        img = format!("taskcluster/docker/{image}"),
        out = out.to_str().unwrap(),
    );
    ok(Command::new(py).args(["-c", &code])).trim().to_string()
}

/// `kiln taskcluster build-image` with a task's environment (and nothing
/// else of this process's).
fn image_task(ws: &Path, env: &[(&str, &str)], flags: &[&str]) -> std::process::Output {
    let mut c = kiln();
    c.env_remove("TASKCLUSTER_ROOT_URL")
        .env_remove("TASKCLUSTER_PROXY_URL")
        .env("XDG_CACHE_HOME", ws.join("cache"))
        .args(["taskcluster", "build-image", "--workspace"])
        .arg(ws)
        .arg("--")
        .args(flags);
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c)
}

#[test]
fn a_parent_and_a_child_image_task_build_and_the_child_loads_through_taskgraph() {
    let reg = Registry::start(None);
    let d = tempfile::tempdir().unwrap();
    busybox_store(d.path());
    ok(kiln()
        .arg("push")
        .arg(d.path().join("bb.oci.tar"))
        .arg("--to")
        .arg(format!("{}/library/busybox:1", reg.addr))
        .arg("--insecure"));
    let tree = d.path().join("tree");
    write(
        &tree,
        "taskcluster/docker/parent/Dockerfile",
        format!(
            "FROM {}/library/busybox:1\nRUN echo parent > /parent-note\n",
            reg.addr
        )
        .as_bytes(),
    );
    write(&tree, "kiln-test/hello.txt", b"hello from topsrcdir\n");
    write(
        &tree,
        "taskcluster/docker/child/Dockerfile",
        b"FROM $DOCKER_IMAGE_PARENT\n# %include kiln-test/hello.txt\nCOPY topsrcdir/kiln-test/hello.txt /hello.txt\nARG GREETING\nARG TASKCLUSTER_ROOT_URL\nRUN echo \"$GREETING from $TASKCLUSTER_ROOT_URL\" > /greeting\nCMD [\"cat\", \"/parent-note\", \"/hello.txt\", \"/greeting\"]\n",
    );
    let q = Queue::start();
    let parent_hash = context_tar(&tree, "parent", &d.path().join("parent.tar.gz"), "None");
    let child_hash = context_tar(&tree, "child", &d.path().join("child.tar.gz"), "None");
    q.artifact(
        "CtxParent",
        "public/docker-contexts/parent.tar.gz",
        fs::read(d.path().join("parent.tar.gz")).unwrap(),
    );
    q.artifact(
        "CtxChild",
        "public/docker-contexts/child.tar.gz",
        fs::read(d.path().join("child.tar.gz")).unwrap(),
    );
    let root = q.url();
    // The parent task.
    let ws = d.path().join("ws-parent");
    let out = image_task(
        &ws,
        &[
            ("IMAGE_NAME", "parent"),
            ("CONTEXT_TASK_ID", "CtxParent"),
            ("CONTEXT_PATH", "public/docker-contexts/parent.tar.gz"),
            ("HASH", &parent_hash),
            ("DOCKER_BUILD_ARGS", "{}"),
            ("DOCKER_IMAGE_ZSTD_LEVEL", "5"),
            ("CHOWN_OUTPUT", "1234:4321"),
            ("TASKCLUSTER_ROOT_URL", &root),
        ],
        &["--insecure"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("context hash {parent_hash} matches HASH")),
        "{err}"
    );
    for f in ["image.tar", "image.tar.zst"] {
        let md = fs::metadata(ws.join("out").join(f)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((md.uid(), md.gid()), (1234, 4321), "{f}");
    }
    // image.tar.zst is the zstd stream of image.tar.
    let raw = zstd::decode_all(&fs::read(ws.join("out/image.tar.zst")).unwrap()[..]).unwrap();
    assert_eq!(raw, fs::read(ws.join("out/image.tar")).unwrap());
    q.artifact(
        "ParentTask",
        "public/image.tar.zst",
        fs::read(ws.join("out/image.tar.zst")).unwrap(),
    );
    // The child task: FROM $DOCKER_IMAGE_PARENT with no ARG.
    let ws = d.path().join("ws-child");
    let child_env = |hash: &str, ctx_path: &str| -> Vec<(String, String)> {
        vec![
            ("IMAGE_NAME".into(), "child".into()),
            ("CONTEXT_TASK_ID".into(), "CtxChild".into()),
            ("CONTEXT_PATH".into(), ctx_path.into()),
            ("HASH".into(), hash.into()),
            ("PARENT_TASK_ID".into(), "ParentTask".into()),
            (
                "DOCKER_BUILD_ARGS".into(),
                r#"{"GREETING": "hello", "DOCKER_IMAGE_PARENT": "parent:abc"}"#.into(),
            ),
            ("TASKCLUSTER_ROOT_URL".into(), root.clone()),
        ]
    };
    let as_refs = |v: &[(String, String)]| -> Vec<(String, String)> { v.to_vec() };
    let env = as_refs(&child_env(
        &child_hash,
        "public/docker-contexts/child.tar.gz",
    ));
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = image_task(&ws, &env_refs, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("DOCKER_IMAGE_PARENT=docker-image-parent@sha256:"),
        "{err}"
    );
    // A wrong HASH: both hashes named, no output.
    let bad = "0".repeat(64);
    let env = child_env(&bad, "public/docker-contexts/child.tar.gz");
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let ws_bad = d.path().join("ws-bad");
    let out = image_task(&ws_bad, &env_refs, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&child_hash) && err.contains(&bad) && err.contains("HASH"),
        "{err}"
    );
    assert!(!ws_bad.join("out/image.tar").exists());
    // A missing artifact: the URL and the status.
    let env = child_env(&child_hash, "public/docker-contexts/nothing.tar.gz");
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = image_task(&ws_bad, &env_refs, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{root}/api/queue/v1/task/CtxChild/artifacts/public/docker-contexts/nothing.tar.gz: HTTP 404"
        )),
        "{err}"
    );

    // taskgraph's load_image takes the child's image.tar.zst, and it runs.
    if !docker_available() {
        return;
    }
    q.artifact(
        "ChildTask",
        "public/image.tar.zst",
        fs::read(ws.join("out/image.tar.zst")).unwrap(),
    );
    let tag = format!("kiln-tc-child-{}", std::process::id());
    let code = format!(
        "import json\nfrom taskgraph.docker import load_image\nprint(json.dumps(load_image({url:?}, imageName={tag:?}, imageTag='t')))",
        url = format!("{root}/api/queue/v1/task/ChildTask/artifacts/public/image.tar.zst"),
    );
    let said = ok(Command::new(taskgraph_python())
        .args(["-c", &code])
        .env("NO_PROXY", "127.0.0.1"));
    assert!(said.contains(&format!("Loaded image: {tag}:t")), "{said}");
    let ran =
        ok(Command::new("docker").args(["run", "--rm", "--network", "none", &format!("{tag}:t")]));
    let _ = Command::new("docker")
        .args(["rmi", "-f", &format!("{tag}:t")])
        .output();
    assert_eq!(
        ran,
        format!("parent\nhello from topsrcdir\nhello from {root}\n")
    );
}
