//! Registry credentials, read where docker, podman and skopeo keep them:
//! `$REGISTRY_AUTH_FILE`, then `$DOCKER_CONFIG/config.json` (else
//! `~/.docker/config.json`); entries under `auths` keyed by host, with a
//! base64 `auth` of `user:password` or `username`/`password` fields.
//! Credentials are never printed, not even in errors.

use std::path::PathBuf;

use base64::Engine as _;

/// A user name and password for one registry.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
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

fn auth_files() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(p) = std::env::var_os("REGISTRY_AUTH_FILE") {
        out.push(PathBuf::from(p));
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

/// The credentials for `host` (e.g. `127.0.0.1:5000`), if any file has them.
pub fn credentials(host: &str) -> Option<Credentials> {
    for f in auth_files() {
        let Ok(bytes) = std::fs::read(&f) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else {
            continue;
        };
        let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else {
            continue;
        };
        let entry = auths.iter().find(|(k, _)| {
            let k = k
                .trim_start_matches("https://")
                .trim_start_matches("http://");
            k == host || k.split('/').next() == Some(host)
        });
        let Some((_, e)) = entry else { continue };
        if let Some(a) = e.get("auth").and_then(|a| a.as_str()) {
            let decoded = base64::engine::general_purpose::STANDARD.decode(a).ok()?;
            let text = String::from_utf8(decoded).ok()?;
            let (user, password) = text.split_once(':')?;
            return Some(Credentials {
                user: user.to_string(),
                password: password.to_string(),
            });
        }
        if let (Some(u), Some(p)) = (
            e.get("username").and_then(|u| u.as_str()),
            e.get("password").and_then(|p| p.as_str()),
        ) {
            return Some(Credentials {
                user: u.to_string(),
                password: p.to_string(),
            });
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
    fn credentials_never_show_the_password() {
        let c = Credentials {
            user: "u".into(),
            password: "secret".into(),
        };
        assert!(!format!("{c:?}").contains("secret"));
        assert_eq!(c.basic(), "Basic dTpzZWNyZXQ=");
    }
}
