//! Registry credentials, read where docker, podman and skopeo keep them:
//! `$REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`, then
//! `$DOCKER_CONFIG/config.json` (else `~/.docker/config.json`): a
//! `credHelpers` entry for the host or a `credsStore` (each runs
//! `docker-credential-<name> get`), else `auths` keyed by host, with a
//! base64 `auth` of `user:password`, `username`/`password` fields or an
//! `identitytoken`. Docker Hub's keys (`docker.io`, `index.docker.io`,
//! `https://index.docker.io/v1/`) are one registry. Credentials are never
//! printed, not even in errors.

use std::path::PathBuf;

use base64::Engine as _;

/// A user name and password for one registry, or an identity token
/// (an OAuth refresh token, as `docker login` keeps for some registries).
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
    pub identity_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <hidden>)", self.user)
    }
}

impl Credentials {
    /// The `Authorization: Basic …` value.
    pub fn basic(&self) -> String {
        let raw = format!("{}:{}", self.user, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// Where credentials are looked for, in order (as podman, then Docker).
fn auth_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE") {
        out.push(PathBuf::from(p));
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR") {
        out.push(PathBuf::from(d).join("containers/auth.json"));
    }
    match std::env::var_os("DOCKER_CONFIG") {
        Some(d) => out.push(PathBuf::from(d).join("config.json")),
        None => {
            if let Some(h) = std::env::var_os("HOME") {
                out.push(PathBuf::from(h).join(".docker/config.json"));
            }
        }
    }
    out
}

/// A registry key as the files write it (`https://index.docker.io/v1/`,
/// `ghcr.io`, `localhost:5000/path`) reduced to its host; Docker Hub's
/// names are one.
fn key_host(key: &str) -> &str {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    let host = k.split('/').next().unwrap_or(k);
    match host {
        "index.docker.io" | "registry-1.docker.io" | "docker.io" => "docker.io",
        h => h,
    }
}

/// Runs `docker-credential-<helper> get` for `host`; None if it has none.
fn from_helper(helper: &str, host: &str, file: &std::path::Path) -> Option<Credentials> {
    use std::io::Write;
    let server = if host == "docker.io" {
        "https://index.docker.io/v1/".to_string()
    } else {
        host.to_string()
    };
    let program = format!("docker-credential-{helper}");
    let mut child = match std::process::Command::new(&program)
        .arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "kiln: warning: {}: credential helper {program} cannot run ({e}); looking further",
                file.display()
            );
            return None;
        }
    };
    let _ = child
        .stdin
        .take()
        .map(|mut i| i.write_all(server.as_bytes()));
    let out = child.wait_with_output().ok()?;
    if !out.status.success() {
        // "credentials not found": the helper has none for this registry.
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok().or_else(|| {
        eprintln!(
            "kiln: warning: {}: {program} answered something that is not JSON; looking further",
            file.display()
        );
        None
    })?;
    let user = v.get("Username")?.as_str()?.to_string();
    let secret = v.get("Secret")?.as_str()?.to_string();
    Some(if user == "<token>" {
        Credentials {
            user: String::new(),
            password: String::new(),
            identity_token: Some(secret),
        }
    } else {
        Credentials {
            user,
            password: secret,
            identity_token: None,
        }
    })
}

/// The credentials of one `auths` entry.
fn from_entry(e: &serde_json::Value) -> Option<Credentials> {
    if let Some(t) = e
        .get("identitytoken")
        .and_then(|t| t.as_str())
        .filter(|t| !t.is_empty())
    {
        return Some(Credentials {
            user: String::new(),
            password: String::new(),
            identity_token: Some(t.to_string()),
        });
    }
    if let Some(a) = e
        .get("auth")
        .and_then(|a| a.as_str())
        .filter(|a| !a.is_empty())
    {
        let decoded = base64::engine::general_purpose::STANDARD.decode(a).ok()?;
        let text = String::from_utf8(decoded).ok()?;
        let (user, password) = text.split_once(':')?;
        return Some(Credentials {
            user: user.to_string(),
            password: password.to_string(),
            identity_token: None,
        });
    }
    let (u, p) = (
        e.get("username").and_then(|u| u.as_str())?,
        e.get("password").and_then(|p| p.as_str())?,
    );
    Some(Credentials {
        user: u.to_string(),
        password: p.to_string(),
        identity_token: None,
    })
}

/// The credentials for `host` (e.g. `127.0.0.1:5000`, `docker.io`), from
/// the first file that has them: `credHelpers` for the host, else
/// `credsStore`, else `auths`. A file that cannot be read as JSON, or an
/// entry that cannot be decoded, is a warning naming the file, and the
/// search goes on.
pub fn credentials(host: &str) -> Option<Credentials> {
    let want = key_host(host);
    for f in auth_files() {
        let Ok(bytes) = std::fs::read(&f) else {
            continue;
        };
        let v = match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(v) => v,
            Err(e) => {
                eprintln!(
                    "kiln: warning: {} is not valid JSON ({e}); looking for credentials elsewhere",
                    f.display()
                );
                continue;
            }
        };
        let helper = v
            .get("credHelpers")
            .and_then(|h| h.as_object())
            .and_then(|h| h.iter().find(|(k, _)| key_host(k) == want))
            .and_then(|(_, n)| n.as_str())
            .or_else(|| v.get("credsStore").and_then(|s| s.as_str()));
        if let Some(name) = helper.filter(|n| !n.is_empty()) {
            if let Some(c) = from_helper(name, want, &f) {
                return Some(c);
            }
        }
        let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else {
            continue;
        };
        let Some((key, e)) = auths.iter().find(|(k, _)| key_host(k) == want) else {
            continue;
        };
        match from_entry(e) {
            Some(c) => return Some(c),
            None => eprintln!(
                "kiln: warning: {}: the auths entry for {key} has no usable auth, username/password or identitytoken; looking further",
                f.display()
            ),
        }
    }
    None
}

/// Parses a `WWW-Authenticate: Bearer realm="…",service="…",scope="…"` challenge.
pub fn bearer_challenge(header: &str) -> Option<Vec<(String, String)>> {
    let rest = header
        .strip_prefix("Bearer ")
        .or_else(|| header.strip_prefix("bearer "))?;
    let mut out = Vec::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            match after.find(',') {
                Some(i) => (&after[..i], &after[i..]),
                None => (after, ""),
            }
        };
        out.push((key.trim().to_string(), value.to_string()));
        s = next.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse() {
        let c = bearer_challenge(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(c[0], ("realm".into(), "https://auth.example/token".into()));
        assert_eq!(c[2], ("scope".into(), "repository:a/b:pull,push".into()));
        assert!(bearer_challenge("Basic realm=x").is_none());
    }

    #[test]
    fn docker_hub_keys_are_one_registry() {
        for k in [
            "https://index.docker.io/v1/",
            "index.docker.io",
            "docker.io",
            "registry-1.docker.io",
        ] {
            assert_eq!(key_host(k), "docker.io", "{k}");
        }
        assert_eq!(key_host("http://localhost:5000/x"), "localhost:5000");
        let e: serde_json::Value = serde_json::json!({"identitytoken": "tok"});
        assert_eq!(
            from_entry(&e).unwrap().identity_token.as_deref(),
            Some("tok")
        );
        assert!(from_entry(&serde_json::json!({"auth": "!!"})).is_none());
    }

    #[test]
    fn credentials_never_show_the_password() {
        let c = Credentials {
            user: "u".into(),
            password: "secret".into(),
            identity_token: None,
        };
        assert!(!format!("{c:?}").contains("secret"));
        assert_eq!(c.basic(), "Basic dTpzZWNyZXQ=");
    }
}
