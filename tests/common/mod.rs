//! Helpers shared by the integration tests: running kiln, building fixture
//! trees, and finding the real tools `setup.sh` installs.
#![allow(dead_code)]

pub mod registry;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The kiln binary under test.
pub fn kiln() -> Command {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    // Each command gets a user cache of its own (index, store, hash cache):
    // tests that share one set XDG_CACHE_HOME themselves.
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "cache-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    c.env_remove("SOURCE_DATE_EPOCH")
        .env_remove("KILN_STORE")
        .env("XDG_CACHE_HOME", cache);
    c
}

/// Runs a command, returning its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns stdout.
pub fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command that must fail with exit code 1; returns stderr.
pub fn fails(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{cmd:?} should fail with 1:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Writes a file, creating parents.
pub fn write(root: &Path, rel: &str, content: &[u8]) -> PathBuf {
    let p = root.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(&p, content).unwrap();
    p
}

pub fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python of the taskgraph venv that setup.sh creates.
pub fn taskgraph_python() -> PathBuf {
    let p = std::env::var_os("KILN_TASKGRAPH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".tools/taskgraph-venv/bin/python"));
    assert!(
        p.exists(),
        "{} is missing: run `bash setup.sh` first (it installs taskcluster-taskgraph)",
        p.display()
    );
    p
}

/// Whether a tool is on PATH; panics with the fix when it is not (setup.sh installs it).
pub fn require(tool: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(found, "{tool} is not installed: run `bash setup.sh` first");
}

/// Whether a Docker engine answers. With `CI` set, a missing engine is a
/// failure, never a skip: this machine kind has one, and a silent skip
/// would hide a broken set-up.
pub fn docker_available() -> bool {
    docker_engine(None, std::env::var_os("CI").is_some())
}

/// [`docker_available`] against `host` (DOCKER_HOST), as CI (`ci`) or not.
pub fn docker_engine(host: Option<&str>, ci: bool) -> bool {
    let mut c = Command::new("docker");
    c.args(["version", "--format", "{{.Server.Version}}"]);
    if let Some(h) = host {
        c.env("DOCKER_HOST", h);
    }
    let ok = c.output().map(|o| o.status.success()).unwrap_or(false);
    assert!(
        ok || !ci,
        "CI is set but no Docker engine answers `docker version`: start the engine; the interop tests do not skip in CI"
    );
    ok
}

/// Parses `kiln build --json` output.
pub fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad JSON ({e}): {s}"))
}

/// sha256 hex of bytes.
pub fn sha256_hex(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// Decompresses a gzip stream.
pub fn gunzip(b: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(b)
        .read_to_end(&mut out)
        .unwrap();
    out
}

/// One entry of a layer, as the tests look at it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    pub path: String,
    pub kind: char,
    pub mode: u32,
    pub uid: u64,
    pub gid: u64,
    pub mtime: u64,
    pub link: String,
    pub data: Vec<u8>,
}

/// Decompresses a layer blob according to its media type.
pub fn decompress(media_type: &str, blob: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    if media_type.ends_with("+zstd") {
        zstd::stream::read::Decoder::new(blob)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
    } else if media_type.ends_with("+gzip") || media_type.ends_with(".tar.gzip") {
        flate2::read::GzDecoder::new(blob)
            .read_to_end(&mut out)
            .unwrap();
    } else {
        out = blob.to_vec();
    }
    out
}

/// Reads every layer of an image output as a list of entries.
pub fn layers(image: &Path) -> Vec<Vec<Item>> {
    use std::io::Read;
    let r = kiln::source::ImageFile::open(image).unwrap();
    let s = r.summary().unwrap();
    s.manifest
        .layers
        .iter()
        .map(|d| {
            let tar = decompress(
                d.media_type.as_str(),
                &kiln::source::Source::read_blob(&r, d).unwrap(),
            );
            let mut ar = tar::Archive::new(&tar[..]);
            ar.entries()
                .unwrap()
                .map(|e| {
                    let mut e = e.unwrap();
                    let h = e.header().clone();
                    let mut data = Vec::new();
                    e.read_to_end(&mut data).unwrap();
                    Item {
                        path: String::from_utf8_lossy(&e.path_bytes()).into_owned(),
                        kind: h.entry_type().as_byte() as char,
                        mode: h.mode().unwrap(),
                        uid: h.uid().unwrap(),
                        gid: h.gid().unwrap(),
                        mtime: h.mtime().unwrap(),
                        link: e
                            .link_name_bytes()
                            .map(|l| String::from_utf8_lossy(&l).into_owned())
                            .unwrap_or_default(),
                        data,
                    }
                })
                .collect()
        })
        .collect()
}

/// The image config of an output.
pub fn config(image: &Path) -> kiln::image::ImageConfig {
    kiln::source::ImageFile::open(image)
        .unwrap()
        .summary()
        .unwrap()
        .config
}

/// A temp source tree: `files` under the root; the image dir is `img/`.
pub fn tree(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir_all(dir.path().join("img")).unwrap();
    for (p, c) in files {
        write(dir.path(), p, c);
    }
    dir
}

/// The `kiln build` command for `img/` in `dir`, writing `out` (relative to dir).
pub fn build_cmd(dir: &Path, out: &str, extra: &[&str]) -> Command {
    let mut cmd = kiln();
    cmd.arg("build")
        .arg(dir.join("img"))
        .arg("--topsrcdir")
        .arg(dir)
        .arg("-o")
        .arg(dir.join(out))
        .args(extra);
    cmd
}

/// `kiln build` that must succeed; returns the JSON summary.
pub fn build(dir: &Path, out: &str, extra: &[&str]) -> serde_json::Value {
    json(&ok(build_cmd(dir, out, extra).arg("--json")))
}

/// `kiln build` that must fail; returns stderr.
pub fn build_fails(dir: &Path, out: &str, extra: &[&str]) -> String {
    fails(&mut build_cmd(dir, out, extra))
}

/// A small tmpfs at a fresh directory (as root), unmounted on drop.
pub struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    pub fn mount(size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs as root: the full-disk tests need it to mount a tmpfs"
            );
            eprintln!("not root: the full-disk test cannot mount a tmpfs; run it as root");
            return None;
        }
        let d = tempfile::tempdir().unwrap();
        ok(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(d.path()));
        Some(Tmpfs(d))
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// Every file left on it, by relative path.
    pub fn files(&self) -> Vec<String> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
            for e in fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let p = e.path();
                if e.file_type().unwrap().is_dir() {
                    walk(root, &p, out);
                } else {
                    out.push(p.strip_prefix(root).unwrap().display().to_string());
                }
            }
        }
        let mut out = Vec::new();
        walk(self.path(), self.path(), &mut out);
        out.sort();
        out
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// A store holding `t/busybox:1`: busybox, its applets as relative links,
/// `/etc/passwd`, `/etc/group`, `/etc/base-file`, `/opt/olddir/a`.
pub fn busybox_store(d: &Path) -> PathBuf {
    require("busybox");
    let root = d.join("bb/rootfs");
    for dir in ["bin", "etc", "tmp", "root", "opt/olddir"] {
        fs::create_dir_all(root.join(dir)).unwrap();
    }
    let busybox =
        String::from_utf8(ok(Command::new("sh").args(["-c", "command -v busybox"])).into())
            .unwrap();
    fs::copy(busybox.trim(), root.join("bin/busybox")).unwrap();
    let list = ok(Command::new("busybox").arg("--list"));
    for applet in list.lines().filter(|a| !a.is_empty() && *a != "busybox") {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();
    fs::write(root.join("etc/base-file"), "base\n").unwrap();
    fs::write(root.join("opt/olddir/a"), "old\n").unwrap();
    ok(Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
        ])
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(d.join("bb/rootfs.tar"))
        .arg("."));
    fs::write(
        d.join("bb/Dockerfile"),
        "FROM scratch\nADD rootfs.tar /\nCMD [\"/bin/sh\"]\n",
    )
    .unwrap();
    ok(kiln()
        .arg("build")
        .arg(d.join("bb"))
        .arg("--no-index")
        .arg("-o")
        .arg(d.join("bb.oci.tar"))
        // gzip: the Docker engine the tests load images into predates zstd.
        .args(["-t", "t/busybox:1", "--layer-compression", "gzip"]));
    let store = d.join("store");
    ok(kiln()
        .args(["store", "add"])
        .arg(d.join("bb.oci.tar"))
        .arg("--store")
        .arg(&store));
    store
}

/// The Debian bookworm minbase root filesystem `setup.sh` makes once with
/// debootstrap, as an image `debian:bookworm-minbase` (FROM scratch, ADD;
/// gzip layers, which every Docker engine loads) written to `d/base.tar`
/// with the user cache `cache`. None (with `CI` set: a failure) where
/// setup.sh has not made it.
pub fn debian_base(d: &Path, cache: &Path) -> Option<PathBuf> {
    let rootfs = repo().join(".tools/debian-bookworm-minbase.tar");
    if !rootfs.is_file() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} is missing: run `bash setup.sh` as root (it makes it with debootstrap)",
            rootfs.display()
        );
        eprintln!(
            "{} is missing: run `bash setup.sh` as root",
            rootfs.display()
        );
        return None;
    }
    fs::create_dir_all(d.join("base")).unwrap();
    if fs::hard_link(&rootfs, d.join("base/rootfs.tar")).is_err() {
        fs::copy(&rootfs, d.join("base/rootfs.tar")).unwrap();
    }
    write(
        d,
        "base/Dockerfile",
        b"FROM scratch\nADD rootfs.tar /\nCMD [\"bash\"]\n",
    );
    let out = d.join("base.tar");
    ok(kiln()
        .env("XDG_CACHE_HOME", cache)
        .arg("build")
        .arg(d.join("base"))
        .args([
            "--no-index",
            "--layer-compression",
            "gzip",
            "-t",
            "debian:bookworm-minbase",
            "-o",
        ])
        .arg(&out));
    Some(out)
}

/// Deterministic incompressible bytes (a 64-bit LCG's top bytes).
pub fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 56) as u8
        })
        .collect()
}

/// Starts `cmd`, kills it with SIGKILL after `after`; returns whether it
/// was still running then (killed mid-way).
pub fn kill_after(cmd: &mut Command, after: std::time::Duration) -> bool {
    use std::os::unix::process::ExitStatusExt;
    let mut child = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while start.elapsed() < after {
        if child.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap().signal() == Some(9)
}

/// The unprivileged user `kilnrun`, created with a subordinate id range.
pub fn ensure_user() {
    if Command::new("id")
        .arg("kilnrun")
        .output()
        .is_ok_and(|o| !o.status.success())
    {
        ok(Command::new("useradd").args(["-m", "kilnrun"]));
    }
    let subuid = fs::read_to_string("/etc/subuid").unwrap_or_default();
    if !subuid.lines().any(|l| l.starts_with("kilnrun:")) {
        ok(Command::new("usermod").args([
            "--add-subuids",
            "200000-265535",
            "--add-subgids",
            "200000-265535",
            "kilnrun",
        ]));
    }
}

/// Runs a shell command as `kilnrun` (kiln's tests run as root).
pub fn as_user(cmd: &str) -> std::process::Output {
    ensure_user();
    Command::new("setpriv")
        .args([
            "--reuid=kilnrun",
            "--regid=kilnrun",
            "--init-groups",
            "--reset-env",
            "sh",
            "-c",
            cmd,
        ])
        .output()
        .unwrap()
}

/// A hand-made OCI layout store holding one image `t/evil:1` whose single
/// (uncompressed) layer is `layer`; returns the store and the layer digest.
pub fn evil_store(
    dir: &Path,
    layer: &[u8],
    config_json: Option<&[u8]>,
) -> (std::path::PathBuf, String) {
    let store = dir.join("evil-store");
    let blobs = store.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let put = |b: &[u8]| {
        let hex = sha256_hex(b);
        fs::write(blobs.join(&hex), b).unwrap();
        (format!("sha256:{hex}"), b.len())
    };
    let (ld, ls) = put(layer);
    let default_config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{ld}"]}}}}"#
    );
    let (cd, cs) = put(config_json.unwrap_or(default_config.as_bytes()));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{cd}","size":{cs}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{ld}","size":{ls}}}]}}"#
    );
    let (md, ms) = put(manifest.as_bytes());
    fs::write(
        store.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    fs::write(
        store.join("index.json"),
        format!(
            r#"{{"schemaVersion":2,"manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{md}","size":{ms},"annotations":{{"org.opencontainers.image.ref.name":"t/evil:1"}}}}]}}"#
        ),
    )
    .unwrap();
    (store, ld)
}

/// The Taskcluster-style Debian image: useradd, apt-get install, and an
/// ADD of a `# %include` (under `taskcluster/docker/tcimage` of a tree).
pub const DEBIAN_TC_IMAGE: &[u8] = b"FROM debian:bookworm-minbase
# %include kiln-test/hello.txt
RUN groupadd -g 1000 worker && useradd -u 1000 -g 1000 -d /builds/worker -s /bin/bash -m worker
WORKDIR /builds/worker
RUN apt-get update && apt-get install -y --no-install-recommends git python3-requests && rm -rf /var/lib/apt/lists/*
ADD topsrcdir/kiln-test/hello.txt /builds/worker/hello.txt
USER worker
";

/// What `docker run IMAGE sh -c DEBIAN_TC_CHECK` prints for that image.
pub const DEBIAN_TC_CHECK: &str = "git --version | cut -d' ' -f1-2; id -u worker; id -u; cat /builds/worker/hello.txt; python3 -c 'import requests; print(\"requests\")'";
pub const DEBIAN_TC_SAYS: &str = "git version\n1000\n1000\nhello from topsrcdir\nrequests\n";

/// The Debian base in the store `d/store` and the Taskcluster tree `d/tc`
/// holding [`DEBIAN_TC_IMAGE`]; None (with `CI` set: a failure) without
/// setup.sh's debootstrapped base.
pub fn debian_tc_tree(d: &Path, cache: &Path) -> Option<(PathBuf, PathBuf)> {
    debian_base(d, cache)?;
    let store = d.join("store");
    ok(kiln()
        .args(["store", "add"])
        .arg(d.join("base.tar"))
        .arg("--store")
        .arg(&store));
    let tc = d.join("tc");
    write(&tc, "kiln-test/hello.txt", b"hello from topsrcdir\n");
    write(
        &tc,
        "taskcluster/docker/tcimage/Dockerfile",
        DEBIAN_TC_IMAGE,
    );
    Some((store, tc))
}

/// Builds the image_builder image with examples/image-builder/build.sh,
/// packaging this kiln binary, into the docker-archive `out` (`extra`:
/// more `kiln build` flags); its manifest digest.
pub fn image_builder_archive(out: &Path, extra: &[&str]) -> String {
    let o = run(Command::new("bash")
        .arg(repo().join("examples/image-builder/build.sh"))
        .arg(out)
        .args(["--", "--json"])
        .args(extra)
        .env("KILN", env!("CARGO_BIN_EXE_kiln"))
        .env("XDG_CACHE_HOME", out.with_extension("cache")));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    json(&String::from_utf8_lossy(&o.stdout))["manifest_digest"]
        .as_str()
        .unwrap()
        .to_string()
}
