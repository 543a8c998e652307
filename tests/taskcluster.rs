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
    /// Paths answered 403 (a scope the task lacks).
    denied: Arc<Mutex<Vec<String>>>,
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
                        let denied = served.denied.lock().unwrap().contains(&path);
                        let answer = if denied {
                            let body =
                                br#"{"code":"InsufficientScopes","message":"missing scopes"}"#;
                            let mut a = format!(
                                "HTTP/1.1 403 Forbidden\r\nContent-Length: {}\r\n\r\n",
                                body.len()
                            )
                            .into_bytes();
                            a.extend_from_slice(body);
                            a
                        } else if let Some(to) = moved {
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

/// The registry with busybox, a taskgraph tree of a parent and a child
/// image, and their context tars on the fake queue.
struct Fixture {
    _reg: Registry,
    d: tempfile::TempDir,
    q: Queue,
    parent_hash: String,
    child_hash: String,
    root: String,
}

fn fixture() -> Fixture {
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
    for (task, name) in [("CtxParent", "parent"), ("CtxChild", "child")] {
        q.artifact(
            task,
            &format!("public/docker-contexts/{name}.tar.gz"),
            fs::read(d.path().join(format!("{name}.tar.gz"))).unwrap(),
        );
    }
    let root = q.url();
    Fixture {
        _reg: reg,
        d,
        q,
        parent_hash,
        child_hash,
        root,
    }
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

impl Fixture {
    fn parent_env(&self) -> Vec<(String, String)> {
        env(&[
            ("IMAGE_NAME", "parent"),
            ("CONTEXT_TASK_ID", "CtxParent"),
            ("CONTEXT_PATH", "public/docker-contexts/parent.tar.gz"),
            ("HASH", &self.parent_hash),
            ("DOCKER_BUILD_ARGS", "{}"),
            ("DOCKER_IMAGE_ZSTD_LEVEL", "5"),
            ("CHOWN_OUTPUT", "1234:4321"),
            ("TASKCLUSTER_ROOT_URL", &self.root),
        ])
    }

    fn child_env(&self, hash: &str, ctx_path: &str) -> Vec<(String, String)> {
        env(&[
            ("IMAGE_NAME", "child"),
            ("CONTEXT_TASK_ID", "CtxChild"),
            ("CONTEXT_PATH", ctx_path),
            ("HASH", hash),
            ("PARENT_TASK_ID", "ParentTask"),
            (
                "DOCKER_BUILD_ARGS",
                r#"{"GREETING": "hello", "DOCKER_IMAGE_PARENT": "parent:abc"}"#,
            ),
            ("TASKCLUSTER_ROOT_URL", &self.root),
        ])
    }

    /// taskgraph's load_image of `zst` served as `task`'s image.tar.zst,
    /// then `docker run` of it: what it printed.
    fn load_and_run(&self, task: &str, zst: &Path) -> String {
        self.q
            .artifact(task, "public/image.tar.zst", fs::read(zst).unwrap());
        let tag = format!("kiln-tc-{}-{}", task.to_lowercase(), std::process::id());
        let code = format!(
            "import json\nfrom taskgraph.docker import load_image\nprint(json.dumps(load_image({url:?}, imageName={tag:?}, imageTag='t')))",
            url = format!("{}/api/queue/v1/task/{task}/artifacts/public/image.tar.zst", self.root),
        );
        let said = ok(Command::new(taskgraph_python())
            .args(["-c", &code])
            .env("NO_PROXY", "127.0.0.1"));
        assert!(said.contains(&format!("Loaded image: {tag}:t")), "{said}");
        let image = format!("{tag}:t");
        let ran = ok(Command::new("docker").args(["run", "--rm", "--network", "none", &image]));
        let _ = Command::new("docker").args(["rmi", "-f", &image]).output();
        ran
    }

    fn expected_run(&self) -> String {
        format!("parent\nhello from topsrcdir\nhello from {}\n", self.root)
    }
}

#[test]
fn a_parent_and_a_child_image_task_build_and_the_child_loads_through_taskgraph() {
    let f = fixture();
    let ws = f.d.path().join("ws-parent");
    let out = image_task(&ws, &refs(&f.parent_env()), &["--insecure"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!("context hash {} matches HASH", f.parent_hash)),
        "{err}"
    );
    for name in ["image.tar", "image.tar.zst"] {
        let md = fs::metadata(ws.join("out").join(name)).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((md.uid(), md.gid()), (1234, 4321), "{name}");
    }
    // image.tar.zst is the zstd stream of image.tar.
    let raw = zstd::decode_all(&fs::read(ws.join("out/image.tar.zst")).unwrap()[..]).unwrap();
    assert_eq!(raw, fs::read(ws.join("out/image.tar")).unwrap());
    f.q.artifact(
        "ParentTask",
        "public/image.tar.zst",
        fs::read(ws.join("out/image.tar.zst")).unwrap(),
    );
    // The child: FROM $DOCKER_IMAGE_PARENT with no ARG.
    let ws = f.d.path().join("ws-child");
    let child = f.child_env(&f.child_hash, "public/docker-contexts/child.tar.gz");
    let out = image_task(&ws, &refs(&child), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("DOCKER_IMAGE_PARENT=docker-image-parent@sha256:"),
        "{err}"
    );
    // A wrong HASH: both hashes named, no output.
    let bad = "0".repeat(64);
    let ws_bad = f.d.path().join("ws-bad");
    let wrong = f.child_env(&bad, "public/docker-contexts/child.tar.gz");
    let out = image_task(&ws_bad, &refs(&wrong), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&f.child_hash) && err.contains(&bad) && err.contains("HASH"),
        "{err}"
    );
    assert!(!ws_bad.join("out/image.tar").exists());
    // A missing artifact: the URL and the status.
    let missing = f.child_env(&f.child_hash, "public/docker-contexts/nothing.tar.gz");
    let out = image_task(&ws_bad, &refs(&missing), &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "{}/api/queue/v1/task/CtxChild/artifacts/public/docker-contexts/nothing.tar.gz: HTTP 404",
            f.root
        )),
        "{err}"
    );
    // taskgraph's load_image takes the child's image.tar.zst, and it runs.
    if !docker_available() {
        return;
    }
    let ran = f.load_and_run("ChildTask", &ws.join("out/image.tar.zst"));
    assert_eq!(ran, f.expected_run());
}

#[test]
fn the_image_builder_image_kiln_builds_for_itself_runs_the_image_tasks() {
    if !docker_available() {
        return;
    }
    let f = fixture();
    // From scratch, twice: identical.
    let (a, b) = (f.d.path().join("ib-a.tar"), f.d.path().join("ib-b.tar"));
    assert_eq!(
        image_builder_archive(&a, &[]),
        image_builder_archive(&b, &[])
    );
    let loaded = ok(Command::new("docker").arg("load").arg("-i").arg(&a));
    let image = loaded
        .lines()
        .find_map(|l| l.strip_prefix("Loaded image: "))
        .unwrap()
        .trim()
        .to_string();
    struct Rmi(String);
    impl Drop for Rmi {
        fn drop(&mut self) {
            let _ = Command::new("docker").args(["rmi", "-f", &self.0]).output();
        }
    }
    let _rmi = Rmi(image.clone());
    // The task's container: Docker's defaults, --network host, the
    // workspace mounted; nothing else added.
    let task = |ws: &Path, vars: &[(String, String)], flags: &[&str]| {
        fs::create_dir_all(ws).unwrap();
        let mut c = Command::new("docker");
        c.args(["run", "--rm", "--network", "host", "-v"])
            .arg(format!("{}:/workspace", ws.display()));
        for (k, v) in vars {
            c.arg("-e").arg(format!("{k}={v}"));
        }
        c.arg(&image).arg("--").args(flags);
        run(&mut c)
    };
    let ws = f.d.path().join("ib-parent");
    let out = task(&ws, &f.parent_env(), &["--insecure"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("RUN isolation: container"), "{err}");
    f.q.artifact(
        "ParentTask",
        "public/image.tar.zst",
        fs::read(ws.join("out/image.tar.zst")).unwrap(),
    );
    let ws = f.d.path().join("ib-child");
    let out = task(
        &ws,
        &f.child_env(&f.child_hash, "public/docker-contexts/child.tar.gz"),
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let ran = f.load_and_run("ChildTaskInImage", &ws.join("out/image.tar.zst"));
    assert_eq!(ran, f.expected_run());
    // In the image too: a wrong HASH names both, a missing artifact its
    // URL and status.
    let bad = "0".repeat(64);
    let ws = f.d.path().join("ib-bad");
    let out = task(
        &ws,
        &f.child_env(&bad, "public/docker-contexts/child.tar.gz"),
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&f.child_hash) && err.contains(&bad), "{err}");
    let out = task(
        &ws,
        &f.child_env(&f.child_hash, "public/docker-contexts/nothing.tar.gz"),
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("nothing.tar.gz: HTTP 404"), "{err}");
    assert!(!ws.join("out/image.tar.zst").exists());
}

#[test]
fn balrog_s_pipeline_builds_tags_pushes_with_a_taskcluster_secret_and_writes_the_digest() {
    require("skopeo");
    let reg = Registry::start(Some(("balrog", "s3cret")));
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN echo balrog > /app\nCMD [\"cat\", \"/app\"]\n",
    );
    // The task's proxy serves the secrets service.
    let proxy = Queue::start();
    proxy.files.lock().unwrap().insert(
        "/api/secrets/v1/secret/project/releng/balrog/docker".into(),
        br#"{"secret": {"docker_username": "balrog", "docker_password": "s3cret"}, "expires": "3000-01-01T00:00:00.000Z"}"#.to_vec(),
    );
    proxy
        .denied
        .lock()
        .unwrap()
        .push("/api/secrets/v1/secret/project/releng/other".into());
    let repo = format!("{}/releng/balrog", reg.addr);
    let build = |secret: &str| {
        run(kiln()
            .env("TASKCLUSTER_PROXY_URL", proxy.url())
            .arg("build")
            .arg(d.path().join("img"))
            .arg("--store")
            .arg(&store)
            .args([
                "--no-index",
                "--insecure",
                "--push",
                "--taskcluster-secret",
                secret,
            ])
            .args([
                "--taskcluster-secret-keys",
                "docker_username:docker_password",
            ])
            .args([
                "-t",
                &format!("{repo}:main"),
                "-t",
                &format!("{repo}:20261205"),
            ])
            .arg("--digest-file")
            .arg(d.path().join("sha256.txt"))
            .arg("-o")
            .arg(d.path().join("o.tar")))
    };
    let out = build("project/releng/balrog/docker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}\n{}", reg.log());
    let digest = fs::read_to_string(d.path().join("sha256.txt")).unwrap();
    let digest = digest.trim();
    assert!(digest.starts_with("sha256:"), "{digest}");
    for tag in ["main", "20261205"] {
        let v = json(&ok(Command::new("skopeo").args([
            "inspect",
            "--tls-verify=false",
            "--creds",
            "balrog:s3cret",
            &format!("docker://{repo}:{tag}"),
        ])));
        assert_eq!(v["Digest"].as_str(), Some(digest), "{tag}: {v}");
    }
    // One upload of each blob, one manifest PUT per tag.
    let layers = config(&d.path().join("o.tar")).rootfs.diff_ids.len();
    assert_eq!(
        reg.count("POST", "releng/balrog/blobs/uploads"),
        layers + 1,
        "{}",
        reg.log()
    );
    assert_eq!(reg.count("PUT", "releng/balrog/manifests/main"), 1);
    assert_eq!(reg.count("PUT", "releng/balrog/manifests/20261205"), 1);
    // The secret refused: the error names it and the scope; no digest file.
    fs::remove_file(d.path().join("sha256.txt")).unwrap();
    let out = build("project/releng/other");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("project/releng/other")
            && err.contains("HTTP 403")
            && err.contains("secrets:get:project/releng/other"),
        "{err}"
    );
    assert!(!d.path().join("sha256.txt").exists());
}
