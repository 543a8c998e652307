//! A small client of the OCI distribution API, on ureq: blob existence
//! checks (HEAD) so unchanged blobs are never sent again, monolithic and
//! chunked uploads, cross-repository mounts, manifests pushed by tag and by
//! digest, verified pulls (a registry that serves other bytes than the
//! digest names is an error, never accepted), basic and bearer-token auth
//! from docker's or podman's auth files, plain HTTP with `insecure` for
//! loopback registries, and retries with backoff on 5xx and connection
//! errors.

pub mod auth;
mod transfer;
mod upload;

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ureq::http;

use crate::digest::Digest;
use crate::image::Descriptor;

pub use crate::sink::PushReport;
pub use transfer::{pull, pull_all_platforms, pull_any, push, PushOptions, Sources};

/// Registry errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{method} {url}: the registry answered {status}: {body}")]
    Http {
        method: String,
        url: String,
        status: u16,
        body: String,
    },
    #[error("{method} {url}: {message}")]
    Transport {
        method: String,
        url: String,
        message: String,
    },
    #[error("{what}: the registry served {got} ({size} bytes) for {want}; refusing it")]
    Digest {
        what: String,
        want: String,
        got: String,
        size: u64,
    },
    #[error("{url}: the registry asks for credentials; add them to $REGISTRY_AUTH_FILE or ~/.docker/config.json (docker login / podman login)")]
    NeedsAuth { url: String },
    #[error("{0}")]
    Reference(String),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{0}")]
    Image(#[from] crate::source::Error),
}

/// What a request sends.
#[derive(Clone, Copy)]
pub enum Payload<'a> {
    Empty,
    Bytes(&'a [u8]),
    /// `len` bytes of a file from `offset` (a blob inside an archive, too).
    File {
        path: &'a Path,
        offset: u64,
        len: u64,
    },
}

impl Payload<'_> {
    fn len(&self) -> u64 {
        match self {
            Payload::Empty => 0,
            Payload::Bytes(b) => b.len() as u64,
            Payload::File { len, .. } => *len,
        }
    }
}

/// Counts of what a client did, for reports and tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub requests: AtomicU64,
    pub blobs_uploaded: AtomicU64,
    pub blobs_present: AtomicU64,
    pub blobs_mounted: AtomicU64,
    pub bytes_uploaded: AtomicU64,
}

/// A client of one registry host.
pub struct Client {
    agent: ureq::Agent,
    pub host: String,
    scheme: &'static str,
    creds: Option<auth::Credentials>,
    /// Authorization values by scope (`*`: basic credentials), each with
    /// when it expires (a bearer token's `expires_in`, less a margin).
    tokens: Mutex<HashMap<String, (String, Option<std::time::Instant>)>>,
    /// Held while a token is fetched, so concurrent transfers share it.
    authorizing: Mutex<()>,
    pub stats: Stats,
    /// Retries after the first attempt, and the first backoff.
    retries: u32,
    backoff: Duration,
}

const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// Whether a registry host (with or without its port) is this machine:
/// `localhost`, 127.0.0.0/8 or `[::1]` (Docker's insecure-by-default set).
pub fn is_loopback(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, p)| {
            if p.chars().all(|c| c.is_ascii_digit()) {
                h
            } else {
                host
            }
        })
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Client {
    /// The same client with these credentials instead of those Docker's
    /// or podman's configuration holds (a Taskcluster secret's, say).
    pub fn with_credentials(mut self, creds: auth::Credentials) -> Client {
        self.creds = Some(creds);
        self
    }

    /// A client for `host`; `insecure` speaks plain HTTP.
    pub fn new(host: &str, insecure: bool) -> Client {
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(300)))
            // A stalled body ends; an endless one is cut at its declared size.
            .timeout_per_read(Some(Duration::from_secs(120)))
            // Credentials never follow a redirect (ureq's "same host"
            // ignores the port; blob redirects go to storage that needs none).
            .redirect_auth_headers(ureq::config::RedirectAuthHeaders::Never)
            .build();
        Client {
            agent: config.into(),
            host: host.to_string(),
            // As Docker: loopback registries speak plain HTTP by default.
            scheme: if insecure || is_loopback(host) {
                "http"
            } else {
                "https"
            },
            creds: auth::credentials(host),
            tokens: Mutex::new(HashMap::new()),
            authorizing: Mutex::new(()),
            stats: Stats::default(),
            retries: 4,
            backoff: Duration::from_millis(200),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}://{}{path}", self.scheme, self.host)
    }

    /// An upload location as an absolute URL.
    fn absolute(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else {
            self.url(location)
        }
    }

    fn body(payload: &Payload<'_>) -> io::Result<ureq::SendBody<'static>> {
        Ok(match payload {
            // No body at all (not an empty chunked one: GET and HEAD carry none).
            Payload::Empty => ureq::SendBody::none(),
            Payload::Bytes(b) => ureq::SendBody::from_owned_reader(io::Cursor::new(b.to_vec())),
            Payload::File { path, offset, len } => {
                let mut f = File::open(path)?;
                f.seek(SeekFrom::Start(*offset))?;
                ureq::SendBody::from_owned_reader(io::BufReader::with_capacity(
                    1 << 20,
                    f.take(*len),
                ))
            }
        })
    }

    fn once(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
        payload: &Payload<'_>,
        authorization: Option<&str>,
    ) -> Result<http::Response<ureq::Body>, Error> {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut b = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, v);
        }
        if let Some(a) = authorization {
            b = b.header("Authorization", a);
        }
        if !matches!(method, "GET" | "HEAD") {
            b = b.header("Content-Length", payload.len().to_string());
        }
        let terr = |message: String| Error::Transport {
            method: method.to_string(),
            url: url.to_string(),
            message,
        };
        let body = Self::body(payload).map_err(|e| terr(e.to_string()))?;
        let req = b.body(body).map_err(|e| terr(e.to_string()))?;
        self.agent.run(req).map_err(|e| terr(e.to_string()))
    }

    /// Sends a request: answers a 401 with basic or bearer credentials, and
    /// retries with backoff on connection errors and 5xx answers.
    pub fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
        payload: &Payload<'_>,
    ) -> Result<http::Response<ureq::Body>, Error> {
        self.send_with(method, url, headers, payload, self.retries)
    }

    /// Waits the backoff before retry number `attempt` (1, 2, ...).
    pub fn backoff(&self, attempt: u32) {
        std::thread::sleep(self.backoff * 2u32.pow(attempt.saturating_sub(1)));
    }

    /// Retries after the first attempt.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// [`Client::send`] with at most `retries` retries (0: an upload to a
    /// session, which a failure may have ended: the caller starts anew).
    fn send_with(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, String)],
        payload: &Payload<'_>,
        retries: u32,
    ) -> Result<http::Response<ureq::Body>, Error> {
        let mut authorization = self.cached_authorization(url);
        let mut authed = false;
        let mut attempt = 0;
        loop {
            let r = self.once(method, url, headers, payload, authorization.as_deref());
            match r {
                Ok(resp) if resp.status() == 401 && !authed => {
                    authed = true;
                    let challenge = resp
                        .headers()
                        .get("WWW-Authenticate")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    // One token per scope even for concurrent transfers:
                    // whoever waited finds the token the first one got.
                    let _one = self.authorizing.lock().unwrap();
                    authorization = match self.cached_authorization(url) {
                        Some(a) if Some(&a) != authorization.as_ref() => Some(a),
                        _ => Some(self.authorize(url, &challenge)?),
                    };
                }
                Ok(resp) if resp.status() == 401 => {
                    return Err(Error::NeedsAuth {
                        url: url.to_string(),
                    })
                }
                Ok(resp) if resp.status().is_server_error() && attempt < retries => {
                    attempt += 1;
                    self.backoff(attempt);
                }
                Err(Error::Transport { .. }) if attempt < retries => {
                    attempt += 1;
                    self.backoff(attempt);
                }
                other => return other,
            }
        }
    }

    /// A cached Authorization for `url`: basic credentials, else a bearer
    /// token whose scope covers the URL's repository (tokens are cached
    /// under the scope the registry asked for).
    fn cached_authorization(&self, url: &str) -> Option<String> {
        let mut tokens = self.tokens.lock().unwrap();
        // Expired tokens go; the next request is challenged again.
        let now = std::time::Instant::now();
        tokens.retain(|_, (_, until)| until.map_or(true, |u| u > now));
        if let Some((t, _)) = tokens.get("*") {
            return Some(t.clone());
        }
        let repo = repository_of(url)?;
        let prefix = format!("repository:{repo}:");
        tokens
            .iter()
            .filter(|(scope, _)| scope.split(' ').any(|s| s.starts_with(&prefix)))
            .max_by_key(|(scope, _)| scope.contains("push"))
            .map(|(_, (t, _))| t.clone())
    }

    /// Works out the Authorization header a 401 challenge asks for.
    fn authorize(&self, url: &str, challenge: &str) -> Result<String, Error> {
        if let Some(params) = auth::bearer_challenge(challenge) {
            let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let realm = get("realm").ok_or_else(|| Error::NeedsAuth {
                url: url.to_string(),
            })?;
            let mut token_url = realm.clone();
            let mut sep = if realm.contains('?') { '&' } else { '?' };
            for k in ["service", "scope"] {
                if let Some(v) = get(k) {
                    token_url.push(sep);
                    token_url.push_str(&format!("{k}={}", encode(&v)));
                    sep = '&';
                }
            }
            let mut resp = match self.creds.as_ref().and_then(|c| c.identity_token.as_ref()) {
                // An identity token (docker login's refresh token): the
                // OAuth2 exchange Docker does.
                Some(refresh) => {
                    let mut form = vec![
                        ("grant_type", "refresh_token".to_string()),
                        ("client_id", "kiln".to_string()),
                        ("refresh_token", refresh.clone()),
                    ];
                    for k in ["service", "scope"] {
                        if let Some(v) = get(k) {
                            form.push((k, v));
                        }
                    }
                    let body: Vec<String> = form
                        .iter()
                        .map(|(k, v)| format!("{k}={}", encode(v)))
                        .collect();
                    self.agent
                        .post(&realm)
                        .header("Content-Type", "application/x-www-form-urlencoded")
                        .send(body.join("&"))
                }
                None => {
                    let mut req = self.agent.get(&token_url);
                    if let Some(c) = &self.creds {
                        req = req.header("Authorization", &c.basic());
                    }
                    req.call()
                }
            }
            .map_err(|e| Error::Transport {
                method: "GET".into(),
                url: realm.clone(),
                message: e.to_string(),
            })?;
            if !resp.status().is_success() {
                return Err(Error::NeedsAuth {
                    url: url.to_string(),
                });
            }
            let text = resp
                .body_mut()
                .with_config()
                .limit(crate::limits::MAX_TOKEN_ANSWER)
                .read_to_string()
                .map_err(|e| Error::Transport {
                    method: "GET".into(),
                    url: realm.clone(),
                    message: format!("token answer: {e}"),
                })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Transport {
                    method: "GET".into(),
                    url: realm.clone(),
                    message: format!("token answer: {e}"),
                })?;
            let token = v
                .get("token")
                .or_else(|| v.get("access_token"))
                .and_then(|t| t.as_str())
                .ok_or_else(|| Error::NeedsAuth {
                    url: url.to_string(),
                })?;
            let value = format!("Bearer {token}");
            // Kept until `expires_in` (less 10 s of margin; 60 s when the
            // answer does not say, the spec's default).
            let ttl = v.get("expires_in").and_then(|e| e.as_u64()).unwrap_or(60);
            let until = std::time::Instant::now()
                + std::time::Duration::from_secs(ttl.saturating_sub(10).max(1));
            self.tokens.lock().unwrap().insert(
                get("scope").unwrap_or_default(),
                (value.clone(), Some(until)),
            );
            return Ok(value);
        }
        match &self.creds {
            Some(c)
                if challenge.to_ascii_lowercase().starts_with("basic") || challenge.is_empty() =>
            {
                let v = c.basic();
                self.tokens
                    .lock()
                    .unwrap()
                    .insert("*".into(), (v.clone(), None));
                Ok(v)
            }
            _ => Err(Error::NeedsAuth {
                url: url.to_string(),
            }),
        }
    }

    fn fail(method: &str, url: &str, mut resp: http::Response<ureq::Body>) -> Error {
        let status = resp.status().as_u16();
        let body = error_body(&mut resp);
        Error::Http {
            method: method.to_string(),
            url: url.to_string(),
            status,
            body: body.trim().to_string(),
        }
    }

    /// Whether the repository holds a blob.
    pub fn blob_exists(&self, repo: &str, digest: &str) -> Result<bool, Error> {
        let url = self.url(&format!("/v2/{repo}/blobs/{digest}"));
        let resp = self.send("HEAD", &url, &[], &Payload::Empty)?;
        match resp.status().as_u16() {
            200 => Ok(true),
            404 => Ok(false),
            _ => Err(Self::fail("HEAD", &url, resp)),
        }
    }

    /// Pushes a manifest under a tag or its digest; checks the digest the registry computed.
    pub fn put_manifest(
        &self,
        repo: &str,
        reference: &str,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<(), Error> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"));
        let resp = self.send(
            "PUT",
            &url,
            &[("Content-Type", media_type.to_string())],
            &Payload::Bytes(bytes),
        )?;
        if resp.status().as_u16() != 201 {
            return Err(Self::fail("PUT", &url, resp));
        }
        let want = Digest::of(bytes);
        if let Some(got) = resp
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
        {
            if got != want.as_str() {
                return Err(Error::Digest {
                    what: format!("manifest {repo}:{reference}"),
                    want: want.to_string(),
                    got: got.to_string(),
                    size: bytes.len() as u64,
                });
            }
        }
        Ok(())
    }

    /// Fetches a manifest by tag or digest: (bytes, media type, digest), or
    /// None if the registry does not have it. The bytes are checked against
    /// a digest reference and the registry's `Docker-Content-Digest`.
    pub fn get_manifest(
        &self,
        repo: &str,
        reference: &str,
    ) -> Result<Option<(Vec<u8>, String, Digest)>, Error> {
        let url = self.url(&format!("/v2/{repo}/manifests/{reference}"));
        let mut resp = self.send(
            "GET",
            &url,
            &[("Accept", ACCEPT.to_string())],
            &Payload::Empty,
        )?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            _ => return Err(Self::fail("GET", &url, resp)),
        }
        let media_type = resp
            .headers()
            .get("Content-Type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let header = resp
            .headers()
            .get("Docker-Content-Digest")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(crate::limits::MAX_JSON_BLOB)
            .read_to_vec()
            .map_err(|e| Error::Transport {
                method: "GET".into(),
                url: url.clone(),
                message: e.to_string(),
            })?;
        let got = Digest::of(&bytes);
        let want = if reference.starts_with("sha256:") {
            Some(reference.to_string())
        } else {
            header
        };
        if let Some(w) = want.filter(|w| w.as_str() != got.as_str()) {
            return Err(Error::Digest {
                what: format!("manifest {repo}:{reference}"),
                want: w,
                got: got.to_string(),
                size: bytes.len() as u64,
            });
        }
        Ok(Some((bytes, media_type, got)))
    }

    /// A blob's body as a stream, cut one byte past its declared size (the
    /// reader verifies digest and size: [`crate::source::Verified`]).
    pub fn blob_reader(&self, repo: &str, d: &Descriptor) -> Result<Box<dyn Read + Send>, Error> {
        let url = self.url(&format!("/v2/{repo}/blobs/{}", d.digest));
        let resp = self.send("GET", &url, &[], &Payload::Empty)?;
        if resp.status().as_u16() != 200 {
            return Err(Self::fail("GET", &url, resp));
        }
        let limit = d.size.saturating_add(1);
        let body = resp.into_body().into_with_config().limit(limit).reader();
        Ok(Box::new(body.take(limit)))
    }
}

/// The repository a registry API URL is about (`/v2/<repo>/blobs/…`).
fn repository_of(url: &str) -> Option<&str> {
    let path = url.split_once("/v2/")?.1;
    let end = ["/blobs/", "/manifests/", "/tags/"]
        .iter()
        .filter_map(|m| path.find(m))
        .min()?;
    Some(&path[..end])
}

/// Percent-encodes a query value.
fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The start of an error response's body (4 KiB at most), for messages.
fn error_body(resp: &mut http::Response<ureq::Body>) -> String {
    resp.body_mut()
        .with_config()
        .limit(4096)
        .read_to_string()
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_registries_are_plain_http_as_in_docker() {
        for h in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.3.4.5",
            "[::1]:5000",
        ] {
            assert!(is_loopback(h), "{h}");
        }
        for h in [
            "registry.example:5000",
            "10.0.0.1:5000",
            "localhost.example",
            "docker.io",
        ] {
            assert!(!is_loopback(h), "{h}");
        }
    }

    #[test]
    fn a_token_is_found_again_under_its_scope() {
        let c = Client::new("127.0.0.1:1", true);
        c.tokens.lock().unwrap().insert(
            "repository:a/b:pull,push".into(),
            ("Bearer t1".into(), None),
        );
        let url = "http://127.0.0.1:1/v2/a/b/blobs/sha256:00";
        assert_eq!(c.cached_authorization(url).as_deref(), Some("Bearer t1"));
        // An expired token is not used again.
        c.tokens.lock().unwrap().insert(
            "repository:a/old:pull".into(),
            ("Bearer t0".into(), Some(std::time::Instant::now())),
        );
        assert_eq!(
            c.cached_authorization("http://127.0.0.1:1/v2/a/old/manifests/1"),
            None
        );
        assert_eq!(
            c.cached_authorization("http://127.0.0.1:1/v2/a/c/manifests/1"),
            None
        );
        assert_eq!(
            repository_of("https://h/v2/x/y/z/blobs/uploads/"),
            Some("x/y/z")
        );
    }

    #[test]
    fn query_values_are_encoded() {
        assert_eq!(
            encode("repository:a/b:pull,push"),
            "repository%3Aa%2Fb%3Apull%2Cpush"
        );
    }
}
