//! Test servers on loopback: Debian's `docker-registry` (the CNCF
//! distribution registry), started per test with a free port, temporary
//! storage and config, and killed by PID at the end; and the request-head
//! reader the hand-written servers share.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use super::{ok, require};

pub struct Registry {
    child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
}

impl Registry {
    /// Starts a registry; `htpasswd` (user, password) turns on basic auth.
    pub fn start(htpasswd: Option<(&str, &str)>) -> Registry {
        Registry::start_on(free_port(), htpasswd)
    }

    pub fn start_on(port: u16, htpasswd: Option<(&str, &str)>) -> Registry {
        Registry::start_with(port, htpasswd, "")
    }

    /// A pull-through cache of `upstream` (a Docker Hub mirror's stand-in).
    pub fn start_proxy(upstream: &str) -> Registry {
        Registry::start_with(
            free_port(),
            None,
            &format!("proxy:\n  remoteurl: http://{upstream}\n"),
        )
    }

    pub fn start_with(port: u16, htpasswd: Option<(&str, &str)>, extra: &str) -> Registry {
        require("docker-registry");
        let dir = tempfile::tempdir().unwrap();
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {addr}\n",
            dir.path().join("data").display()
        );
        if let Some((user, password)) = htpasswd {
            require("htpasswd");
            let out = ok(Command::new("htpasswd").args(["-Bbn", user, password]));
            fs::write(dir.path().join("htpasswd"), out).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                dir.path().join("htpasswd").display()
            ));
        }
        config.push_str(extra);
        fs::write(dir.path().join("config.yml"), config).unwrap();
        let log = fs::File::create(dir.path().join("log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(dir.path().join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let r = Registry { child, addr, dir };
        for _ in 0..100 {
            if std::net::TcpStream::connect(&r.addr).is_ok() {
                return r;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("the registry did not start:\n{}", r.log());
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// How many requests of `method` to paths containing `path` the access log shows.
    pub fn count(&self, method: &str, path: &str) -> usize {
        let needle = format!("\"{method} /v2/{path}");
        self.log().lines().filter(|l| l.contains(&needle)).count()
    }

    /// The file the registry keeps a blob in.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads one request head (up to the blank line) from a test server's
/// connection; None when the client hung up.
pub fn read_head(r: &mut impl std::io::BufRead) -> Option<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).unwrap_or(0) == 0 {
            return None;
        }
        if line == "\r\n" {
            return Some(head);
        }
        head.push_str(&line);
    }
}
