//! kiln against a real registry: Debian's `docker-registry` (the CNCF
//! distribution registry), started per test on 127.0.0.1 with a free port,
//! temporary storage and config, and killed by PID at the end.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::registry::*;
use common::*;
use kiln::source::Source;

fn s(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// An image with three layers (one over 4 KiB), as an OCI archive.
fn image(d: &Path) -> serde_json::Value {
    write(
        d,
        "img/Dockerfile",
        b"FROM scratch\nCOPY a /a\nCOPY big /big\nCOPY c /c\nENV X=1\n",
    );
    write(d, "img/a", b"a");
    // Incompressible bytes, so the compressed layer is large too.
    write(d, "img/big", &noise(20_000, 42));
    write(d, "img/c", b"c");
    json(&ok(&mut build_cmd(
        d,
        "img.oci.tar",
        &["--json", "--no-index"],
    )))
}

fn push(reg: &Registry, image: &Path, to: &str, extra: &[&str]) -> serde_json::Value {
    json(&ok(kiln()
        .arg("push")
        .arg(image)
        .arg("--to")
        .arg(format!("{}/{to}", reg.addr))
        .args(["--insecure", "--json"])
        .args(extra)))
}

fn pull_cmd(reg: &Registry, from: &str, store: &Path) -> Command {
    let mut c = kiln();
    c.arg("pull")
        .arg(format!("{}/{from}", reg.addr))
        .args(["--insecure", "--json", "--store"])
        .arg(store);
    c
}

#[test]
fn push_then_pull_keeps_every_digest_and_a_second_push_sends_no_blob() {
    let reg = Registry::start(None);
    let d = tempfile::tempdir().unwrap();
    let built = image(d.path());
    let img = d.path().join("img.oci.tar");
    let first = push(&reg, &img, "kiln/t:1", &[]);
    assert_eq!(first["manifest_digest"], built["manifest_digest"]);
    assert_eq!(
        (first["uploaded"].as_u64(), first["present"].as_u64()),
        (Some(4), Some(0))
    );
    let uploads = reg.count("PUT", "kiln/t/blobs/uploads/");
    assert_eq!(uploads, 4, "config and three layers:\n{}", reg.log());

    let second = push(&reg, &img, "kiln/t:1", &[]);
    assert_eq!(
        (second["uploaded"].as_u64(), second["present"].as_u64()),
        (Some(0), Some(4))
    );
    assert_eq!(
        reg.count("PUT", "kiln/t/blobs/uploads/"),
        uploads,
        "no blob sent again"
    );
    assert_eq!(reg.count("POST", "kiln/t/blobs/uploads/"), 4);

    // skopeo sees the digest kiln printed.
    require("skopeo");
    let info = json(&ok(Command::new("skopeo").args([
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}/kiln/t:1", reg.addr),
    ])));
    assert_eq!(info["Digest"], built["manifest_digest"]);

    let store = d.path().join("store");
    let out = d.path().join("pulled.oci.tar");
    let pulled = json(&ok(pull_cmd(&reg, "kiln/t:1", &store).arg("-o").arg(&out)));
    assert_eq!(pulled["manifest_digest"], built["manifest_digest"]);
    // A tag pinned to a digest is stored under `:pulled`, as always.
    let md = built["manifest_digest"].as_str().unwrap();
    let pinned = json(&ok(&mut pull_cmd(
        &reg,
        &format!("kiln/t:1@{md}"),
        &d.path().join("pinned-store"),
    )));
    assert_eq!(pinned["manifest_digest"], built["manifest_digest"]);
    assert_eq!(pinned["names"][0], format!("{}/kiln/t:pulled", reg.addr));
    let a = kiln::source::ImageFile::open(&img).unwrap();
    let b = kiln::source::ImageFile::open(&out).unwrap();
    let (sa, sb) = (a.summary().unwrap(), b.summary().unwrap());
    assert_eq!(sa.manifest, sb.manifest);
    for l in &sa.manifest.layers {
        assert_eq!(a.read_blob(l).unwrap(), b.read_blob(l).unwrap());
    }
    // kiln verify reads the registry reference too.
    let verified = ok(kiln()
        .arg("verify")
        .arg(format!("{}/kiln/t:1", reg.addr))
        .arg("--insecure"));
    assert!(verified.starts_with("ok: "), "{verified}");
    assert!(
        verified.contains(&s(&built["manifest_digest"])),
        "{verified}"
    );
    // By digest too.
    let by_digest = json(&ok(&mut pull_cmd(
        &reg,
        &format!("kiln/t@{}", s(&built["manifest_digest"])),
        &d.path().join("store2"),
    )));
    assert_eq!(by_digest["manifest_digest"], built["manifest_digest"]);
}

#[test]
fn chunked_uploads_and_cross_repository_mounts() {
    let reg = Registry::start(None);
    let d = tempfile::tempdir().unwrap();
    let built = image(d.path());
    let img = d.path().join("img.oci.tar");
    let r = push(&reg, &img, "kiln/chunked:1", &["--chunk-size", "1024"]);
    assert_eq!(r["uploaded"], 4);
    assert!(
        reg.count("PATCH", "kiln/chunked/blobs/uploads/") >= 2,
        "{}",
        reg.log()
    );
    let pulled = json(&ok(&mut pull_cmd(
        &reg,
        "kiln/chunked:1",
        &d.path().join("s"),
    )));
    assert_eq!(pulled["manifest_digest"], built["manifest_digest"]);

    let m = push(
        &reg,
        &img,
        "kiln/mounted:1",
        &["--mount-from", "kiln/chunked"],
    );
    assert_eq!(
        (m["mounted"].as_u64(), m["uploaded"].as_u64()),
        (Some(4), Some(0))
    );
    assert_eq!(reg.count("PUT", "kiln/mounted/blobs/uploads/"), 0);
}

#[test]
fn a_corrupt_blob_served_by_the_registry_is_refused() {
    let reg = Registry::start(None);
    let d = tempfile::tempdir().unwrap();
    image(d.path());
    let img = d.path().join("img.oci.tar");
    push(&reg, &img, "kiln/t:1", &[]);
    let m = kiln::source::ImageFile::open(&img)
        .unwrap()
        .summary()
        .unwrap()
        .manifest;
    let layer = &m.layers[1].digest;
    let f = reg.blob_file(layer.as_str());
    let mut bytes = fs::read(&f).unwrap();
    bytes[100] ^= 0xff;
    fs::write(&f, bytes).unwrap();
    let store = d.path().join("store");
    let err = fails(&mut pull_cmd(&reg, "kiln/t:1", &store));
    assert!(err.contains(&format!("kiln/t: blob {layer}")), "{err}");
    assert!(err.contains("does not match its digest"), "{err}");
    assert!(!store.join("blobs/sha256").join(layer.hex()).exists());
    let names = fs::read_to_string(store.join("index.json")).unwrap_or_default();
    assert!(
        !names.contains("kiln/t"),
        "nothing is named after a failed pull: {names}"
    );
}

#[test]
fn basic_auth_comes_from_the_auth_file_and_is_never_printed() {
    let reg = Registry::start(Some(("alice", "s3cret-pw")));
    let d = tempfile::tempdir().unwrap();
    image(d.path());
    let img = d.path().join("img.oci.tar");
    let mut c = kiln();
    c.arg("push")
        .arg(&img)
        .arg("--to")
        .arg(format!("{}/kiln/t:1", reg.addr))
        .arg("--insecure")
        .env("REGISTRY_AUTH_FILE", d.path().join("none.json"))
        .env("HOME", d.path());
    let err = fails(&mut c);
    assert!(err.contains("the registry asks for credentials"), "{err}");
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cret-pw");
    let file = d.path().join("auth.json");
    fs::write(
        &file,
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, reg.addr),
    )
    .unwrap();
    let out = run(kiln()
        .arg("push")
        .arg(&img)
        .arg("--to")
        .arg(format!("{}/kiln/t:1", reg.addr))
        .arg("--insecure")
        .env("REGISTRY_AUTH_FILE", &file));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("s3cret") && !text.contains(&auth), "{text}");
}

#[test]
fn two_machines_share_builds_through_the_registry_index() {
    let reg = Registry::start(None);
    let d = tree(&[
        ("img/Dockerfile", b"FROM kiln/base:1\nCOPY f /f\n"),
        ("img/f", b"shared"),
    ]);
    let build = |cache: &str, out: &str| {
        let mut c = build_cmd(
            d.path(),
            out,
            &[
                "--json",
                "--store",
                repo().join("vendor-images").to_str().unwrap(),
                "--insecure",
                "--index-registry",
                &format!("{}/kiln-index", reg.addr),
            ],
        );
        c.env("XDG_CACHE_HOME", d.path().join(cache));
        json(&ok(&mut c))
    };
    let a = build("machine-a", "a.tar");
    assert_eq!(s(&a["status"]), "built");
    let b = build("machine-b", "b.tar");
    assert_eq!(s(&b["status"]), "up to date", "{b}");
    assert_eq!(a["manifest_digest"], b["manifest_digest"]);
    assert_eq!(
        s(&b["route"]),
        format!(
            "{}/kiln-index/3/img:hash-{}",
            reg.addr,
            s(&a["index_digest"])
        )
    );
    assert_eq!(
        fs::read(d.path().join("a.tar")).unwrap(),
        fs::read(d.path().join("b.tar")).unwrap()
    );
    // Machine B built nothing and pushed nothing.
    assert_eq!(
        reg.count("PUT", "kiln-index/3/img/manifests/"),
        3 + 1,
        "{}",
        reg.log()
    );
    // The routes are tags.
    let tags = ok(Command::new("skopeo").args([
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{}/kiln-index/3/img", reg.addr),
    ]));
    let tags: Vec<String> = json(&tags)["Tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(s)
        .collect();
    assert!(
        tags.contains(&format!("hash-{}", s(&a["index_digest"]))),
        "{tags:?}"
    );
    assert!(tags.contains(&"latest".to_string()), "{tags:?}");
    assert!(tags.iter().any(|t| t.starts_with("pushdate-")), "{tags:?}");
}

#[test]
fn connection_errors_are_retried_with_backoff() {
    let d = tempfile::tempdir().unwrap();
    let built = image(d.path());
    // kiln starts before the registry does: its first attempt reaches a
    // listener that hangs up, then the registry takes the port.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let child = kiln()
        .arg("push")
        .arg(d.path().join("img.oci.tar"))
        .arg("--to")
        .arg(format!("127.0.0.1:{port}/kiln/late:1"))
        .args(["--insecure", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for kiln's first connection (no fixed sleep), and refuse it.
    drop(listener.accept().unwrap());
    drop(listener);
    let reg = Registry::start_on(port, None);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        reg.log()
    );
    let v = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(v["manifest_digest"], built["manifest_digest"]);
}

/// A request head's Content-Length (0 without one).
fn content_length(head: &str) -> usize {
    head.to_ascii_lowercase()
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length: ")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A deliberately hostile registry on loopback: every request's head is
/// recorded, and `respond(head)` gives the raw HTTP answer (`None`: an
/// endless chunked body).
struct Hostile {
    addr: String,
    heads: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn hostile(respond: impl Fn(&str) -> Option<Vec<u8>> + Send + Sync + 'static) -> Hostile {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let respond = std::sync::Arc::new(respond);
    let h = heads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (h, respond) = (h.clone(), respond.clone());
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut w = stream;
                loop {
                    let Some(head) = read_head(&mut r) else {
                        return;
                    };
                    h.lock().unwrap().push(head.clone());
                    match respond(&head) {
                        Some(bytes) => {
                            if w.write_all(&bytes).is_err() {
                                return;
                            }
                        }
                        None => {
                            let _ = w.write_all(
                                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                            );
                            let chunk = format!("{:x}\r\n{}\r\n", 65536, "z".repeat(65536));
                            while w.write_all(chunk.as_bytes()).is_ok() {}
                            return;
                        }
                    }
                }
            });
        }
    });
    Hostile { addr, heads }
}

fn answer(status: &str, headers: &[(&str, String)], body: &[u8]) -> Option<Vec<u8>> {
    let mut out = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    Some(out)
}

/// A manifest with no layers whose config is `config`.
fn manifest_for(config: &[u8]) -> Vec<u8> {
    format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:{}","size":{}}},"layers":[]}}"#,
        sha256_hex(config),
        config.len()
    )
    .into_bytes()
}

const CONFIG: &[u8] =
    br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[test]
fn hostile_registry_answers_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let pull = |addr: &str| {
        let mut c = kiln();
        c.arg("pull")
            .arg(format!("{addr}/x/y:1"))
            .args(["--insecure", "--store"])
            .arg(d.path().join("store"));
        c
    };
    // Bad JSON.
    let h = hostile(|_| answer("200 OK", &[("Content-Type", OCI_MANIFEST.into())], b"{oops"));
    let err = fails(&mut pull(&h.addr));
    assert!(
        err.contains("x/y: manifest sha256:") && err.contains("is not valid JSON"),
        "{err}"
    );
    // A manifest whose bytes are not what the registry says they are.
    let h = hostile(|_| {
        answer(
            "200 OK",
            &[
                ("Content-Type", OCI_MANIFEST.into()),
                (
                    "Docker-Content-Digest",
                    format!("sha256:{}", "0".repeat(64)),
                ),
            ],
            &manifest_for(CONFIG),
        )
    });
    let err = fails(&mut pull(&h.addr));
    assert!(
        err.contains("manifest x/y:1: the registry served sha256:"),
        "{err}"
    );
    assert!(err.contains("refusing it"), "{err}");
    // An endless body for a 75-byte blob: cut at its size, refused, quickly.
    let h = hostile(|head| {
        if head.contains("/manifests/") {
            answer(
                "200 OK",
                &[("Content-Type", OCI_MANIFEST.into())],
                &manifest_for(CONFIG),
            )
        } else {
            None
        }
    });
    let start = std::time::Instant::now();
    let err = fails(&mut pull(&h.addr));
    assert!(start.elapsed() < std::time::Duration::from_secs(30));
    assert!(err.contains("does not match its digest or size"), "{err}");
    assert!(
        !d.path().join("store/index.json").exists()
            || !fs::read_to_string(d.path().join("store/index.json"))
                .unwrap()
                .contains("x/y")
    );
}

#[test]
fn credentials_never_follow_a_redirect_to_another_host() {
    let d = tempfile::tempdir().unwrap();
    // B serves the blob and records what it was sent.
    let b = hostile(|_| answer("200 OK", &[], CONFIG));
    let b_addr = b.addr.clone();
    // A wants credentials, then redirects blob reads to B.
    let a = hostile(move |head| {
        if !head
            .to_ascii_lowercase()
            .contains("\r\nauthorization: basic")
        {
            return answer(
                "401 Unauthorized",
                &[("WWW-Authenticate", "Basic realm=\"a\"".into())],
                b"",
            );
        }
        if head.contains("/manifests/") {
            answer(
                "200 OK",
                &[("Content-Type", OCI_MANIFEST.into())],
                &manifest_for(CONFIG),
            )
        } else {
            answer(
                "307 Temporary Redirect",
                &[("Location", format!("http://{b_addr}/blob"))],
                b"",
            )
        }
    });
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode("alice:secret");
    let file = d.path().join("auth.json");
    fs::write(
        &file,
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, a.addr),
    )
    .unwrap();
    let o = run(kiln()
        .arg("pull")
        .arg(format!("{}/x/y:1", a.addr))
        .args(["--insecure", "--store"])
        .arg(d.path().join("store"))
        .env("REGISTRY_AUTH_FILE", &file));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{}\nA saw:\n{}",
        String::from_utf8_lossy(&o.stderr),
        a.heads.lock().unwrap().join("\n")
    );
    assert!(out.contains("manifest digest: sha256:"), "{out}");
    let a_heads = a.heads.lock().unwrap().join("");
    assert!(
        a_heads
            .to_ascii_lowercase()
            .contains("authorization: basic"),
        "A got credentials"
    );
    let b_heads = b.heads.lock().unwrap().join("");
    assert!(b_heads.contains("GET /blob"), "{b_heads}");
    assert!(
        !b_heads.to_ascii_lowercase().contains("authorization"),
        "{b_heads}"
    );
}

/// A registry that demands bearer tokens, as Docker Hub and ghcr.io do: a
/// request without `Authorization: Bearer T` gets a 401 challenge naming
/// the token endpoint and the repository's pull scope.
fn token_registry() -> Hostile {
    hostile(|head| {
        let host = head
            .lines()
            .find_map(|l| {
                l.strip_prefix("Host: ")
                    .or_else(|| l.strip_prefix("host: "))
            })
            .unwrap_or("")
            .trim()
            .to_string();
        let first = head.lines().next().unwrap_or("");
        if first.starts_with("GET /token") {
            return answer("200 OK", &[], br#"{"token":"T","expires_in":300}"#);
        }
        if !head.contains("Authorization: Bearer T") && !head.contains("authorization: Bearer T") {
            let challenge = format!(
                r#"Bearer realm="http://{host}/token",service="test",scope="repository:x/y:pull""#
            );
            return answer("401 Unauthorized", &[("WWW-Authenticate", challenge)], b"");
        }
        if first.contains("/manifests/") {
            answer(
                "200 OK",
                &[("Content-Type", OCI_MANIFEST.into())],
                &manifest_for(CONFIG),
            )
        } else {
            answer("200 OK", &[], CONFIG)
        }
    })
}

#[test]
fn a_bearer_token_is_fetched_once_per_scope_and_reused() {
    let d = tempfile::tempdir().unwrap();
    let h = token_registry();
    ok(kiln()
        .arg("pull")
        .arg(format!("{}/x/y:1", h.addr))
        .args(["--insecure", "--store"])
        .arg(d.path().join("store")));
    let heads = h.heads.lock().unwrap().clone();
    let tokens = heads.iter().filter(|h| h.starts_with("GET /token")).count();
    let api: Vec<&String> = heads.iter().filter(|h| h.contains(" /v2/")).collect();
    let unauthorized = api
        .iter()
        .filter(|h| !h.to_ascii_lowercase().contains("authorization: bearer t"))
        .count();
    // The manifest and the config: two API requests after the first
    // challenge, one token for the one scope.
    assert_eq!(tokens, 1, "{heads:#?}");
    assert_eq!(unauthorized, 1, "{heads:#?}");
    assert_eq!(api.len(), 3, "{heads:#?}");
}

/// An OCI archive with a layer of `mb` MB of noise.
fn big_image(d: &Path, mb: usize) -> PathBuf {
    let noise = noise(mb << 20, 99);
    write(d, "big/Dockerfile", b"FROM scratch\nCOPY n /n\n");
    write(d, "big/n", &noise);
    let out = d.join("big.oci.tar");
    ok(kiln()
        .arg("build")
        .arg(d.join("big"))
        .arg("--no-index")
        .arg("-o")
        .arg(&out)
        .args(["-t", "t/big:1"]));
    out
}

#[test]
fn kill_9_during_pull_and_push_leaves_a_store_and_registry_that_work() {
    let reg = Registry::start(None);
    let d = tempfile::tempdir().unwrap();
    let archive = big_image(d.path(), 16);
    let to = format!("{}/kiln/big:1", reg.addr);
    let store = d.path().join("store");
    let mut killed = 0;
    for ms in [10u64, 40, 100, 200, 400] {
        killed += kill_after(
            kiln().arg("push").arg(&archive).arg("--to").arg(&to).args([
                "--insecure",
                "--chunk-size",
                "1048576",
            ]),
            std::time::Duration::from_millis(ms),
        ) as usize;
    }
    ok(kiln()
        .arg("push")
        .arg(&archive)
        .arg("--to")
        .arg(&to)
        .arg("--insecure"));
    for ms in [10u64, 40, 100, 200, 400] {
        killed += kill_after(
            kiln()
                .arg("pull")
                .arg(&to)
                .args(["--insecure", "--store"])
                .arg(&store),
            std::time::Duration::from_millis(ms),
        ) as usize;
        if store.join("index.json").exists() {
            ok(kiln().arg("verify").arg(&store));
        }
    }
    assert!(killed >= 3, "only {killed} transfers were killed mid-way");
    let gc = ok(kiln().args(["store", "gc", "--store"]).arg(&store));
    for dir in [".kiln/tmp", ".kiln/leases"] {
        let left: Vec<_> = fs::read_dir(store.join(dir)).map_or(Vec::new(), |r| r.collect());
        assert!(left.is_empty(), "{dir}: {left:?} after {gc}");
    }
    ok(kiln()
        .arg("pull")
        .arg(&to)
        .args(["--insecure", "--store"])
        .arg(&store));
    let v = ok(kiln().arg("verify").arg(&store));
    assert!(v.starts_with("ok: "), "{v}");
}

#[test]
fn pull_onto_a_full_disk_names_the_local_file_and_leaves_nothing() {
    let Some(disk) = Tmpfs::mount("2m") else {
        return;
    };
    let reg = Registry::start(None);
    let d = tempfile::tempdir().unwrap();
    let archive = big_image(d.path(), 4);
    let to = format!("{}/kiln/full:1", reg.addr);
    ok(kiln()
        .arg("push")
        .arg(&archive)
        .arg("--to")
        .arg(&to)
        .arg("--insecure"));
    let store = disk.path().join("store");
    let err = fails(
        kiln()
            .arg("pull")
            .arg(&to)
            .args(["--insecure", "--store"])
            .arg(&store),
    );
    assert!(err.contains("No space left on device"), "{err}");
    assert!(
        err.contains(&format!("writing {}", store.display())),
        "the local file, not the URL: {err}"
    );
    let left: Vec<String> = disk
        .files()
        .into_iter()
        .filter(|f| f.contains("blobs/sha256/") || f.contains(".kiln/tmp/"))
        .collect();
    assert_eq!(left, Vec::<String>::new(), "{err}");
}

/// A registry whose first `fail` upload sessions answer the blob PUT with
/// 500 (and hang up without reading the body), as one whose storage failed
/// or that restarted mid-push; later sessions work. Returns the server and
/// the request heads it saw.
fn flaky_uploads(fail: usize) -> Hostile {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let heads = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let h = heads.clone();
    let sessions = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (h, sessions) = (h.clone(), sessions.clone());
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut w = stream;
                loop {
                    let Some(head) = read_head(&mut r) else {
                        return;
                    };
                    h.lock().unwrap().push(head.clone());
                    let lower = head.to_ascii_lowercase();
                    let len = content_length(&head);
                    let first = head.lines().next().unwrap_or("").to_string();
                    let reply =
                        |w: &mut std::net::TcpStream, status: &str, extra: &str, body: &str| {
                            let _ = w.write_all(
                                format!(
                                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}\r\n{body}",
                                    body.len()
                                )
                                .as_bytes(),
                            );
                        };
                    if first.starts_with("HEAD ") {
                        reply(&mut w, "404 Not Found", "", "");
                    } else if first.starts_with("POST ") && first.contains("/blobs/uploads/") {
                        let n = sessions.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                        reply(
                            &mut w,
                            "202 Accepted",
                            &format!("Location: /v2/x/y/blobs/uploads/s{n}\r\n"),
                            "",
                        );
                    } else if first.starts_with("GET ") && first.contains("/blobs/uploads/") {
                        reply(
                            &mut w,
                            "404 Not Found",
                            "",
                            r#"{"errors":[{"code":"BLOB_UPLOAD_UNKNOWN"}]}"#,
                        );
                    } else if first.starts_with("PUT ") && first.contains("/blobs/uploads/s") {
                        let n: usize = first
                            .split("/blobs/uploads/s")
                            .nth(1)
                            .and_then(|t| t.split(['?', ' ']).next())
                            .and_then(|t| t.parse().ok())
                            .unwrap_or(0);
                        if n <= fail {
                            // Refuse without reading the body, and hang up.
                            reply(
                                &mut w,
                                "500 Internal Server Error",
                                "Connection: close\r\n",
                                "storage driver: disk is full",
                            );
                            return;
                        }
                        if lower.contains("expect: 100-continue") {
                            let _ = w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                        }
                        let mut body = vec![0u8; len];
                        if r.read_exact(&mut body).is_err() {
                            return;
                        }
                        reply(&mut w, "201 Created", "", "");
                    } else if first.starts_with("PUT ") && first.contains("/manifests/") {
                        let mut body = vec![0u8; len];
                        if r.read_exact(&mut body).is_err() {
                            return;
                        }
                        reply(
                            &mut w,
                            "201 Created",
                            &format!("Docker-Content-Digest: sha256:{}\r\n", sha256_hex(&body)),
                            "",
                        );
                    } else {
                        reply(&mut w, "404 Not Found", "", "");
                    }
                }
            });
        }
    });
    Hostile { addr, heads }
}

#[test]
fn a_failed_upload_session_is_replaced_and_its_500_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let archive = big_image(d.path(), 2);
    // The first session fails: kiln opens a second one and succeeds.
    let h = flaky_uploads(1);
    ok(kiln()
        .arg("push")
        .arg(&archive)
        .arg("--to")
        .arg(format!("{}/x/y:1", h.addr))
        .arg("--insecure"));
    let heads = h.heads.lock().unwrap().clone();
    let on_s1 = heads
        .iter()
        .filter(|h| h.starts_with("PUT /v2/x/y/blobs/uploads/s1"))
        .count();
    assert_eq!(on_s1, 1, "the dead session is not retried: {heads:#?}");
    assert!(
        heads
            .iter()
            .any(|h| h.starts_with("PUT /v2/x/y/blobs/uploads/s2")),
        "{heads:#?}"
    );
    // Every session fails: the error carries the registry's status and body,
    // not a bare broken pipe.
    let h = flaky_uploads(usize::MAX);
    let err = fails(
        kiln()
            .arg("push")
            .arg(&archive)
            .arg("--to")
            .arg(format!("{}/x/y:1", h.addr))
            .arg("--insecure"),
    );
    assert!(
        err.contains("500") && err.contains("storage driver: disk is full"),
        "{err}"
    );
}

#[test]
fn a_second_machine_reuses_run_layers_through_the_cache_registry_and_nothing_is_uploaded_twice() {
    let reg = Registry::start(None);
    let d = tempfile::tempdir().unwrap();
    let store = busybox_store(d.path());
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN head -c 300000 /dev/urandom > /noise && echo ran > /ran\nRUN echo second > /second\n",
    );
    let spec = format!("{}/kiln-steps", reg.addr);
    let build = |cache: &str, out: &str, extra: &[&str]| {
        json(&ok(kiln()
            .env("XDG_CACHE_HOME", d.path().join(cache))
            .arg("build")
            .arg(d.path().join("img"))
            .arg("--store")
            .arg(&store)
            .args(["--cache-registry", &spec, "--insecure", "--json", "-o"])
            .arg(d.path().join(out))
            .args(extra)))
    };
    let cached = |v: &serde_json::Value| -> Vec<bool> {
        v["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["cached"].as_bool().unwrap())
            .collect()
    };
    // Machine A builds (the noise makes its RUN layer unrepeatable).
    let a = build("machine-a", "a.tar", &[]);
    assert_eq!(cached(&a), [false, false]);
    let uploads = reg.count("PUT", "kiln-steps/steps/blobs/uploads");
    assert!(uploads >= 2, "the layers were pushed: {}", reg.log());
    // Machine B (another cache, nothing local) reuses both steps: the same
    // random bytes prove the layer came from A.
    let b = build("machine-b", "b.tar", &[]);
    assert_eq!(cached(&b), [true, true]);
    assert_eq!(a["manifest_digest"], b["manifest_digest"]);
    // A rebuilds with --no-cache: new steps are pushed, but a layer the
    // registry has is never uploaded again.
    write(
        d.path(),
        "img/Dockerfile",
        b"FROM t/busybox:1\nRUN head -c 300000 /dev/urandom > /noise && echo ran > /ran\nRUN echo second > /second\nRUN echo third > /third\n",
    );
    let c = build("machine-a", "c.tar", &[]);
    assert_eq!(cached(&c), [true, true, false]);
    let after = reg.count("PUT", "kiln-steps/steps/blobs/uploads");
    // One new layer and its entry's config; nothing for the two cached steps.
    assert_eq!(after - uploads, 2, "{}", reg.log());
    let d2 = build("machine-b", "d.tar", &[]);
    assert_eq!(cached(&d2), [true, true, true]);
    assert_eq!(reg.count("PUT", "kiln-steps/steps/blobs/uploads"), after);
}

#[test]
fn short_docker_hub_names_pull_through_a_registry_mirror() {
    // The upstream stands in for Docker Hub (holding library/kilnbase:1);
    // a docker-registry in proxy mode in front of it is the mirror.
    let hub = Registry::start(None);
    let mirror = Registry::start_proxy(&hub.addr);
    let d = tempfile::tempdir().unwrap();
    let built = image(d.path());
    ok(kiln()
        .arg("push")
        .arg(d.path().join("img.oci.tar"))
        .arg("--to")
        .arg(format!("{}/library/kilnbase:1", hub.addr))
        .arg("--insecure"));
    let store = d.path().join("store");
    let v = json(&ok(kiln()
        .args([
            "pull",
            "kilnbase:1",
            "--registry-mirror",
            &mirror.addr,
            "--insecure",
            "--json",
            "--store",
        ])
        .arg(&store)));
    assert_eq!(v["manifest_digest"], built["manifest_digest"]);
    assert_eq!(v["names"][0], "docker.io/library/kilnbase:1");
    assert!(
        mirror.count("GET", "library/kilnbase/manifests/1") >= 1,
        "{}",
        mirror.log()
    );
    // The same through $KILN_REGISTRY_MIRRORS, by digest, with a dead mirror first.
    let digest = s(&built["manifest_digest"]);
    let v = json(&ok(kiln()
        .env(
            "KILN_REGISTRY_MIRRORS",
            format!("127.0.0.1:1,{}", mirror.addr),
        )
        .args([
            "pull",
            &format!("kilnbase@{digest}"),
            "--insecure",
            "--json",
            "--store",
        ])
        .arg(d.path().join("store2"))));
    assert_eq!(v["manifest_digest"], built["manifest_digest"]);
    ok(kiln().arg("verify").arg(d.path().join("store2")));
}

#[test]
fn credential_helpers_stores_podman_files_and_malformed_files() {
    let reg = Registry::start(Some(("bob", "h3lper-pw")));
    let d = tempfile::tempdir().unwrap();
    image(d.path());
    let img = d.path().join("img.oci.tar");
    // A credential helper on PATH, as docker-credential-* are.
    let bin = d.path().join("bin");
    fs::create_dir_all(&bin).unwrap();
    let helper = bin.join("docker-credential-kilntest");
    fs::write(
        &helper,
        format!(
            "#!/bin/sh\nread server\n[ \"$1\" = get ] || exit 1\n[ \"$server\" = \"{}\" ] || {{ echo 'credentials not found in native keychain'; exit 1; }}\necho '{{\"ServerURL\":\"'$server'\",\"Username\":\"bob\",\"Secret\":\"h3lper-pw\"}}'\n",
            reg.addr
        ),
    )
    .unwrap();
    chmod(&helper, 0o755);
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let push = |home: &Path, env: &[(&str, &Path)], tag: &str| {
        let mut c = kiln();
        c.arg("push")
            .arg(&img)
            .arg("--to")
            .arg(format!("{}/kiln/c:{tag}", reg.addr))
            .arg("--insecure")
            .env("PATH", &path)
            .env("HOME", home)
            .env_remove("REGISTRY_AUTH_FILE")
            .env_remove("DOCKER_CONFIG")
            .env_remove("XDG_RUNTIME_DIR");
        for (k, v) in env {
            c.env(k, v);
        }
        run(&mut c)
    };
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    // credHelpers for the host.
    let home = d.path().join("home1");
    write(
        &home,
        ".docker/config.json",
        format!(r#"{{"credHelpers":{{"{}":"kilntest"}}}}"#, reg.addr).as_bytes(),
    );
    let out = push(&home, &[], "1");
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("h3lper-pw"));
    // credsStore for every host.
    let home = d.path().join("home2");
    write(
        &home,
        ".docker/config.json",
        br#"{"credsStore":"kilntest"}"#,
    );
    let out = push(&home, &[], "2");
    assert!(out.status.success(), "{}", text(&out));
    // podman's $XDG_RUNTIME_DIR/containers/auth.json; a malformed
    // $REGISTRY_AUTH_FILE before it is a warning naming it.
    let run_dir = d.path().join("run");
    write(
        &run_dir,
        "containers/auth.json",
        format!(
            r#"{{"auths":{{"{}":{{"username":"bob","password":"h3lper-pw"}}}}}}"#,
            reg.addr
        )
        .as_bytes(),
    );
    let bad = write(d.path(), "bad.json", b"{ not json");
    let home = d.path().join("home3");
    let out = push(
        &home,
        &[("XDG_RUNTIME_DIR", &run_dir), ("REGISTRY_AUTH_FILE", &bad)],
        "3",
    );
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    assert!(
        t.contains(&format!("warning: {} is not valid JSON", bad.display())),
        "{t}"
    );
    assert!(!t.contains("h3lper-pw"), "{t}");
}

#[test]
fn build_pull_fetches_missing_bases_and_accepts_only_the_pinned_bytes() {
    let reg = Registry::start(None);
    let d = tempfile::tempdir().unwrap();
    let built = image(d.path());
    let base = format!("{}/kiln/pbase:1", reg.addr);
    ok(kiln()
        .arg("push")
        .arg(d.path().join("img.oci.tar"))
        .arg("--to")
        .arg(&base)
        .arg("--insecure"));
    let digest = s(&built["manifest_digest"]);
    let src = tempfile::tempdir().unwrap();
    write(src.path(), "b/f", b"f");
    let cache = src.path().join("cache");
    let build = |from: &str, extra: &[&str]| {
        write(
            src.path(),
            "b/Dockerfile",
            format!("FROM {from}\nCOPY f /f\n").as_bytes(),
        );
        run(kiln()
            .env("XDG_CACHE_HOME", &cache)
            .arg("build")
            .arg(src.path().join("b"))
            .args(["--insecure", "--json", "-o"])
            // (An OCI archive: a docker-archive would recompress the zstd base.)
            .arg(src.path().join("o.oci.tar"))
            .args(extra))
    };
    // Without --pull: the network is never touched.
    let out = build(&base, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("build with --pull"), "{err}");
    assert_eq!(reg.count("GET", "kiln/pbase/manifests"), 0);
    // --pull: fetched into the user store, then built; its digest is in the index key.
    let out = build(&base, &["--pull"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = json(&String::from_utf8_lossy(&out.stdout));
    let layers = v["layers"].as_array().unwrap();
    assert_eq!(layers[0]["digest"], built["layers"][0]["digest"]);
    // The right pinned digest builds; --pull=always refetches the tag.
    let out = build(&format!("{}/kiln/pbase@{digest}", reg.addr), &["--pull"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = reg.count("GET", "kiln/pbase/manifests/1");
    let out = build(&base, &["--pull=always", "--no-cache"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(reg.count("GET", "kiln/pbase/manifests/1") > before);
    // A registry serving other bytes for a pinned digest: refused, naming both.
    let h = hostile(|head| {
        if head.lines().next().unwrap_or("").contains("/manifests/") {
            answer(
                "200 OK",
                &[("Content-Type", OCI_MANIFEST.into())],
                &manifest_for(CONFIG),
            )
        } else {
            answer("200 OK", &[], CONFIG)
        }
    });
    let wrong = format!("sha256:{}", "1".repeat(64));
    let _ = fs::remove_file(src.path().join("o.oci.tar"));
    let out = build(&format!("{}/x/y@{wrong}", h.addr), &["--pull"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&wrong)
            && err.contains(&format!("sha256:{}", sha256_hex(&manifest_for(CONFIG)))),
        "{err}"
    );
    assert!(!src.path().join("o.oci.tar").exists());
}

#[test]
fn a_failed_cross_repository_mount_closes_the_session_it_opened() {
    let reg = Registry::start(None);
    let d = tempfile::tempdir().unwrap();
    image(d.path());
    // Neither repository has the blobs: each mount attempt opens a session;
    // all but the one used for the upload are closed.
    let out = json(&ok(kiln()
        .arg("push")
        .arg(d.path().join("img.oci.tar"))
        .arg("--to")
        .arg(format!("{}/kiln/target:1", reg.addr))
        .args([
            "--insecure",
            "--json",
            "--mount-from",
            "kiln/none-a",
            "--mount-from",
            "kiln/none-b",
        ])));
    assert!(out["manifest_digest"].is_string());
    let posts = reg.count("POST", "kiln/target/blobs/uploads");
    let deletes = reg.count("DELETE", "kiln/target/blobs/uploads");
    // Two mount attempts per blob, one session closed per blob.
    assert!(posts >= 2, "{}", reg.log());
    assert_eq!(deletes * 2, posts, "{}", reg.log());
}

/// A registry that drops the connection after taking the second chunk of
/// an upload (without answering), and reports what a session holds on `GET`
/// of it. Returns it and its POST count.
fn dropping_registry() -> (Hostile, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::collections::HashMap;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::{Arc, Mutex};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let heads = Arc::new(Mutex::new(Vec::<String>::new()));
    let held: Arc<Mutex<HashMap<usize, Vec<u8>>>> = Arc::default();
    let posts = Arc::new(AtomicUsize::new(0));
    let patches = Arc::new(AtomicUsize::new(0));
    let (h, posts2) = (heads.clone(), posts.clone());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (h, held, posts, patches) =
                (h.clone(), held.clone(), posts2.clone(), patches.clone());
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut w = stream;
                loop {
                    let Some(head) = read_head(&mut r) else {
                        return;
                    };
                    h.lock().unwrap().push(head.clone());
                    let lower = head.to_ascii_lowercase();
                    let len = content_length(&head);
                    let first = head.lines().next().unwrap_or("").to_string();
                    let reply = |w: &mut std::net::TcpStream, status: &str, extra: &str| {
                        let _ = w.write_all(
                            format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n{extra}\r\n")
                                .as_bytes(),
                        );
                    };
                    if lower.contains("expect: 100-continue") {
                        let _ = w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let session_of = |f: &str| -> usize {
                        f.split("/blobs/uploads/u")
                            .nth(1)
                            .and_then(|t| t.split(['?', ' ']).next())
                            .and_then(|t| t.parse().ok())
                            .unwrap_or(0)
                    };
                    let loc = |n: usize| format!("Location: /v2/x/y/blobs/uploads/u{n}\r\n");
                    if first.starts_with("HEAD ") {
                        reply(&mut w, "404 Not Found", "");
                    } else if first.starts_with("POST ") {
                        let n = posts.fetch_add(1, SeqCst) + 1;
                        held.lock().unwrap().insert(n, Vec::new());
                        reply(&mut w, "202 Accepted", &loc(n));
                    } else if first.starts_with("PATCH ") {
                        let n = session_of(&first);
                        let end = {
                            let mut all = held.lock().unwrap();
                            let v = all.entry(n).or_default();
                            v.extend_from_slice(&body);
                            v.len() as i64 - 1
                        };
                        if patches.fetch_add(1, SeqCst) + 1 == 2 {
                            // Took the chunk, then the connection drops.
                            return;
                        }
                        reply(
                            &mut w,
                            "202 Accepted",
                            &format!("{}Range: 0-{end}\r\n", loc(n)),
                        );
                    } else if first.starts_with("GET ") && first.contains("/blobs/uploads/u") {
                        let n = session_of(&first);
                        let end = held
                            .lock()
                            .unwrap()
                            .get(&n)
                            .map_or(-1, |v| v.len() as i64 - 1);
                        reply(
                            &mut w,
                            "204 No Content",
                            &format!("{}Range: 0-{end}\r\n", loc(n)),
                        );
                    } else if first.starts_with("PUT ") && first.contains("/blobs/uploads/u") {
                        let n = session_of(&first);
                        let bytes = {
                            let mut all = held.lock().unwrap();
                            let v = all.entry(n).or_default();
                            v.extend_from_slice(&body);
                            v.clone()
                        };
                        let want = first
                            .split("digest=sha256")
                            .nth(1)
                            .map(|d| d.trim_start_matches(':').trim_start_matches("%3A"))
                            .map(|d| d.chars().take(64).collect::<String>())
                            .unwrap_or_default();
                        let status = if sha256_hex(&bytes) == want {
                            "201 Created"
                        } else {
                            "400 Bad Request"
                        };
                        reply(&mut w, status, "");
                    } else if first.starts_with("PUT ") && first.contains("/manifests/") {
                        reply(
                            &mut w,
                            "201 Created",
                            &format!("Docker-Content-Digest: sha256:{}\r\n", sha256_hex(&body)),
                        );
                    } else {
                        reply(&mut w, "404 Not Found", "");
                    }
                }
            });
        }
    });
    (Hostile { addr, heads }, posts)
}

#[test]
fn an_interrupted_chunked_upload_resumes_from_the_reported_offset() {
    let d = tempfile::tempdir().unwrap();
    // One layer of 300,000 incompressible bytes, sent in 100,000-byte chunks.
    let noise = noise(300_000, 7);
    write(d.path(), "img/Dockerfile", b"FROM scratch\nCOPY n /n\n");
    write(d.path(), "img/n", &noise);
    ok(kiln()
        .arg("build")
        .arg(d.path().join("img"))
        .args(["--no-index", "--layer-compression", "none", "-o"])
        .arg(d.path().join("i.oci.tar")));
    let (h, posts) = dropping_registry();
    ok(kiln()
        .arg("push")
        .arg(d.path().join("i.oci.tar"))
        .arg("--to")
        .arg(format!("{}/x/y:1", h.addr))
        .args(["--insecure", "--chunk-size", "100000"]));
    let heads = h.heads.lock().unwrap().clone();
    let status_asks = heads
        .iter()
        .filter(|l| l.starts_with("GET /v2/x/y/blobs/uploads/u"))
        .count();
    assert!(status_asks >= 1, "{heads:#?}");
    // The big layer went in one session (plus one each for config and the
    // small blobs): resumed, not restarted.
    let layer_sessions = posts.load(std::sync::atomic::Ordering::SeqCst);
    let blobs = heads.iter().filter(|l| l.starts_with("HEAD ")).count();
    assert_eq!(layer_sessions, blobs, "one session per blob: {heads:#?}");
}

/// Writes a blob into an OCI layout; returns its descriptor JSON.
fn layout_blob(dir: &Path, media_type: &str, bytes: &[u8]) -> serde_json::Value {
    let hex = sha256_hex(bytes);
    fs::write(dir.join("blobs/sha256").join(&hex), bytes).unwrap();
    serde_json::json!({"mediaType": media_type, "digest": format!("sha256:{hex}"), "size": bytes.len()})
}

/// An OCI layout holding one image index of the built image for each of
/// `archs` (configs differing only in architecture).
fn multi_platform_layout(d: &Path, archs: &[&str], name: &str) -> PathBuf {
    let dir = d.join(name);
    ok(kiln()
        .arg("build")
        .arg(d.join("img"))
        .args(["--no-index", "--format", "oci-dir", "-o"])
        .arg(&dir));
    let index = json(&fs::read_to_string(dir.join("index.json")).unwrap());
    let m = &index["manifests"][0];
    let read = |desc: &serde_json::Value| {
        json(&fs::read_to_string(dir.join("blobs/sha256").join(&s(&desc["digest"])[7..])).unwrap())
    };
    let manifest = read(m);
    let config = read(&manifest["config"]);
    let mut entries = Vec::new();
    for arch in archs {
        let mut c = config.clone();
        c["architecture"] = serde_json::json!(arch);
        let cd = layout_blob(
            &dir,
            "application/vnd.oci.image.config.v1+json",
            &serde_json::to_vec(&c).unwrap(),
        );
        let mut mm = manifest.clone();
        mm["config"] = cd;
        let mut md = layout_blob(&dir, OCI_MANIFEST, &serde_json::to_vec(&mm).unwrap());
        md["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        entries.push(md);
    }
    let idx = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json", "manifests": entries});
    let mut id = layout_blob(
        &dir,
        "application/vnd.oci.image.index.v1+json",
        &serde_json::to_vec(&idx).unwrap(),
    );
    id["annotations"] = serde_json::json!({"org.opencontainers.image.ref.name": "1"});
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [id]});
    fs::write(dir.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    dir
}

#[test]
fn multi_platform_images_push_whole_and_pull_whole_or_for_the_host() {
    let reg = Registry::start(None);
    let d = tempfile::tempdir().unwrap();
    image(d.path());
    let host_arch = kiln::image::host_platform().architecture;
    let other = if host_arch == "amd64" {
        "arm64"
    } else {
        "amd64"
    };
    let both = multi_platform_layout(d.path(), &[&host_arch, other], "both");
    let to = format!("{}/kiln/multi:1", reg.addr);
    ok(kiln()
        .arg("push")
        .arg(&both)
        .arg("--to")
        .arg(&to)
        .arg("--insecure"));
    // Every platform's manifest, then the index.
    assert_eq!(
        reg.count("PUT", "kiln/multi/manifests/sha256:"),
        3,
        "{}",
        reg.log()
    );
    // --all-platforms keeps the index; without it, the host's image.
    let all = d.path().join("all");
    let v = json(&ok(kiln()
        .args([
            "pull",
            &to,
            "--all-platforms",
            "--insecure",
            "--json",
            "--store",
        ])
        .arg(&all)));
    let stored = json(&fs::read_to_string(all.join("index.json")).unwrap());
    assert_eq!(
        stored["manifests"][0]["mediaType"],
        "application/vnd.oci.image.index.v1+json"
    );
    assert_eq!(stored["manifests"][0]["digest"], v["manifest_digest"]);
    ok(kiln().arg("verify").arg(&all));
    let one = d.path().join("one");
    ok(kiln()
        .args(["pull", &to, "--insecure", "--store"])
        .arg(&one));
    let stored = json(&fs::read_to_string(one.join("index.json")).unwrap());
    assert_eq!(
        stored["manifests"][0]["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    // An index without the host's platform: the error names what it has.
    let foreign = multi_platform_layout(d.path(), &["s390x", "ppc64le"], "foreign");
    let to2 = format!("{}/kiln/foreign:1", reg.addr);
    ok(kiln()
        .arg("push")
        .arg(&foreign)
        .arg("--to")
        .arg(&to2)
        .arg("--insecure"));
    let err = fails(
        kiln()
            .args(["pull", &to2, "--insecure", "--store"])
            .arg(d.path().join("x")),
    );
    assert!(
        err.contains("linux/s390x") && err.contains("linux/ppc64le"),
        "{err}"
    );
}

/// A token-issuing front for a real registry, as Docker Hub and ghcr.io
/// are: requests without `Bearer T` get a 401 challenge (scope pull for
/// reads, pull,push for writes); `/token` hands out T; the rest is relayed
/// to `upstream`. Returns its address and the (token requests, 401s) counts.
fn token_front(
    upstream: &str,
) -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::sync::Arc;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (tokens, denied) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (t2, d2, up) = (tokens.clone(), denied.clone(), upstream.to_string());
    let me = addr.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let (tokens, denied, up, me) = (t2.clone(), d2.clone(), up.clone(), me.clone());
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(stream.try_clone().unwrap());
                let mut w = stream;
                loop {
                    let Some(text) = read_head(&mut r) else {
                        return;
                    };
                    let len = content_length(&text);
                    let head: Vec<String> =
                        text.split_inclusive("\r\n").map(String::from).collect();
                    let first = head[0].clone();
                    let lower: Vec<String> = head.iter().map(|l| l.to_ascii_lowercase()).collect();
                    if lower.iter().any(|l| l.starts_with("expect: 100-continue")) {
                        let _ = w.write_all(b"HTTP/1.1 100 Continue\r\n\r\n");
                    }
                    let mut body = vec![0u8; len];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    let answer =
                        |w: &mut std::net::TcpStream, status: &str, extra: &str, b: &str| {
                            let _ = w.write_all(
                                format!(
                                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\n{extra}\r\n{b}",
                                    b.len()
                                )
                                .as_bytes(),
                            );
                        };
                    if first.starts_with("POST /token") {
                        // docker login's identity token, exchanged (OAuth2
                        // refresh_token grant) for an access token.
                        tokens.fetch_add(1, SeqCst);
                        denied.fetch_add(1000, SeqCst);
                        let form = String::from_utf8_lossy(&body).to_string();
                        if form.contains("grant_type=refresh_token")
                            && form.contains("refresh_token=RT-42")
                        {
                            let token = if form.contains("push") {
                                "tpush"
                            } else {
                                "tpull"
                            };
                            answer(
                                &mut w,
                                "200 OK",
                                "",
                                &format!(r#"{{"access_token":"{token}","expires_in":300}}"#),
                            );
                        } else {
                            answer(&mut w, "401 Unauthorized", "", "");
                        }
                        continue;
                    }
                    if first.starts_with("GET /token") {
                        tokens.fetch_add(1, SeqCst);
                        // A token for exactly the scope asked.
                        let token = if first.contains("push") {
                            "tpush"
                        } else {
                            "tpull"
                        };
                        answer(
                            &mut w,
                            "200 OK",
                            "",
                            &format!(r#"{{"token":"{token}","expires_in":300}}"#),
                        );
                        continue;
                    }
                    let write = !(first.starts_with("GET ") || first.starts_with("HEAD "));
                    let ok_token = lower.iter().any(|l| {
                        l.starts_with("authorization: bearer tpush")
                            || (!write && l.starts_with("authorization: bearer tpull"))
                    });
                    if !ok_token {
                        denied.fetch_add(1, SeqCst);
                        let repo = first
                            .split_whitespace()
                            .nth(1)
                            .and_then(|p| p.strip_prefix("/v2/"))
                            .and_then(|p| p.split("/blobs/").next())
                            .and_then(|p| p.split("/manifests/").next())
                            .unwrap_or("")
                            .to_string();
                        let actions = if first.starts_with("GET ") || first.starts_with("HEAD ") {
                            "pull"
                        } else {
                            "pull,push"
                        };
                        let challenge = format!(
                            r#"WWW-Authenticate: Bearer realm="http://{me}/token",service="test",scope="repository:{repo}:{actions}""#
                        );
                        answer(&mut w, "401 Unauthorized", &format!("{challenge}\r\n"), "");
                        continue;
                    }
                    // Relay to the registry, one connection per request.
                    let mut u = std::net::TcpStream::connect(&up).unwrap();
                    let mut req = String::new();
                    for l in &head {
                        let ll = l.to_ascii_lowercase();
                        if ll.starts_with("expect:") || ll.starts_with("connection:") {
                            continue;
                        }
                        req.push_str(l);
                    }
                    req.push_str("Connection: close\r\n\r\n");
                    u.write_all(req.as_bytes()).unwrap();
                    u.write_all(&body).unwrap();
                    let mut resp = Vec::new();
                    let _ = u.read_to_end(&mut resp);
                    let _ = w.write_all(&resp);
                    return;
                }
            });
        }
    });
    (addr, tokens, denied)
}

#[test]
fn a_token_registry_costs_one_token_per_scope_for_a_push_and_a_pull() {
    use std::sync::atomic::Ordering::SeqCst;
    let reg = Registry::start(None);
    let (front, tokens, denied) = token_front(&reg.addr);
    let d = tempfile::tempdir().unwrap();
    let built = image(d.path());
    let to = format!("{front}/kiln/tok:1");
    ok(kiln()
        .arg("push")
        .arg(d.path().join("img.oci.tar"))
        .arg("--to")
        .arg(&to)
        .arg("--insecure"));
    // Reads (pull scope) and writes (pull,push): two tokens, however many
    // blobs went up in parallel.
    assert_eq!(tokens.load(SeqCst), 2, "token requests for a push");
    assert!(
        denied.load(SeqCst) <= 3,
        "{} 401s for a push",
        denied.load(SeqCst)
    );
    let (t0, d0) = (tokens.load(SeqCst), denied.load(SeqCst));
    let v = json(&ok(kiln()
        .args(["pull", &to, "--insecure", "--json", "--store"])
        .arg(d.path().join("store"))));
    assert_eq!(v["manifest_digest"], built["manifest_digest"]);
    assert_eq!(tokens.load(SeqCst) - t0, 1, "one token for a pull");
    assert_eq!(denied.load(SeqCst) - d0, 1, "one 401 for a pull");
}

#[test]
fn an_identity_token_is_exchanged_for_access_tokens() {
    let reg = Registry::start(None);
    let (front, tokens, denied) = token_front(&reg.addr);
    let d = tempfile::tempdir().unwrap();
    image(d.path());
    let auth = write(
        d.path(),
        "auth.json",
        format!(r#"{{"auths":{{"{front}":{{"identitytoken":"RT-42"}}}}}}"#).as_bytes(),
    );
    let out = run(kiln()
        .arg("push")
        .arg(d.path().join("img.oci.tar"))
        .arg("--to")
        .arg(format!("{front}/kiln/idt:1"))
        .arg("--insecure")
        .env("REGISTRY_AUTH_FILE", &auth));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("RT-42"), "{text}");
    assert!(tokens.load(std::sync::atomic::Ordering::SeqCst) >= 1);
    // (The front counts each refresh-token exchange as 1000 in `denied`.)
    assert!(
        denied.load(std::sync::atomic::Ordering::SeqCst) >= 1000,
        "the identity token was exchanged"
    );
}

#[test]
fn a_loopback_registry_speaks_plain_http_without_insecure() {
    // As Docker treats localhost and 127.0.0.0/8.
    let reg = Registry::start(None);
    let d = tempfile::tempdir().unwrap();
    let built = image(d.path());
    for host in [reg.addr.clone(), reg.addr.replace("127.0.0.1", "localhost")] {
        let v = json(&ok(kiln()
            .arg("push")
            .arg(d.path().join("img.oci.tar"))
            .arg("--to")
            .arg(format!("{host}/kiln/plain:1"))
            .arg("--json")));
        assert_eq!(v["manifest_digest"], built["manifest_digest"], "{host}");
    }
}

/// `kiln build -o type=registry,name=REF` (BuildKit's form) pushes the
/// image under that name (a loopback registry speaks plain HTTP) and
/// leaves no file behind: the image went through kiln's cache.
#[test]
fn build_output_type_registry_pushes_the_image() {
    let reg = Registry::start(None);
    let d = tempfile::tempdir().unwrap();
    let built = image(d.path());
    let cache = d.path().join("cache");
    let name = format!("{}/kiln/o:1", reg.addr);
    let v = json(&ok(kiln()
        .arg("build")
        .arg(d.path().join("img"))
        .args(["--no-index", "--json", "-o"])
        .arg(format!("type=registry,name={name}"))
        .env("XDG_CACHE_HOME", &cache)));
    assert!(built["manifest_digest"].is_string());
    assert!(reg.count("PUT", "kiln/o/manifests/1") >= 1, "{}", reg.log());
    // The registry serves the manifest the build reported.
    let head = ok(Command::new("curl").args([
        "-sfI",
        "-H",
        "Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json",
        &format!("http://{}/v2/kiln/o/manifests/1", reg.addr),
    ]));
    let want = v["manifest_digest"].as_str().unwrap();
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("docker-content-digest: {want}")),
        "{head}"
    );
    let tmp: Vec<_> = fs::read_dir(cache.join("kiln/tmp")).unwrap().collect();
    assert!(tmp.is_empty(), "{tmp:?}");
}
