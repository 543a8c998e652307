//! Image references as Docker reads them: `[registry/]path[:tag][@sha256:…]`,
//! with Docker Hub's implied `docker.io/library/` prefix, so `debian:12`,
//! `library/debian:12` and `docker.io/library/debian:12` name one image.

use crate::digest::Digest;

/// Docker Hub's registry API host.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";

/// A parsed image reference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    /// The repository, fully qualified (`docker.io/library/debian`).
    pub repository: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
    /// Whether the text named a registry host (`localhost:5000/x`) rather
    /// than implying Docker Hub (`x`).
    pub explicit_host: bool,
}

fn valid_component(c: &str) -> bool {
    !c.is_empty()
        && c.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

impl Reference {
    /// Parses a reference; the error says what is wrong with it.
    pub fn parse(s: &str) -> Result<Reference, String> {
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (
                r,
                Some(Digest::parse(d).ok_or_else(|| {
                    format!("{s}: {d} is not a valid digest (expected sha256: and 64 lowercase hex digits)")
                })?),
            ),
            None => (s, None),
        };
        let last = rest.rfind('/').map_or(0, |i| i + 1);
        let (repo, tag) = match rest[last..].rfind(':') {
            Some(i) => (&rest[..last + i], Some(rest[last + i + 1..].to_string())),
            None => (rest, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !ok {
                return Err(format!("{s}: invalid tag {t:?}"));
            }
        }
        let mut parts: Vec<&str> = repo.split('/').collect();
        let domain = (parts.len() > 1
            && (parts[0].contains('.') || parts[0].contains(':') || parts[0] == "localhost"))
            .then(|| parts.remove(0));
        if parts.iter().any(|c| !valid_component(c)) {
            return Err(format!(
                "{s}: invalid image name (lowercase letters, digits, '.', '_', '-' and '/' only)"
            ));
        }
        let path = parts.join("/");
        // Docker Hub has two names; `docker.io` is the one Docker keeps.
        let domain = domain.map(|d| {
            if d == "index.docker.io" {
                "docker.io"
            } else {
                d
            }
        });
        let repository = match domain {
            Some(d) => format!("{d}/{path}"),
            None if parts.len() == 1 => format!("docker.io/library/{path}"),
            None => format!("docker.io/{path}"),
        };
        Ok(Reference {
            repository,
            tag,
            digest,
            explicit_host: domain.is_some(),
        })
    }

    /// Parses a reference that must name its registry host, as `push`,
    /// `pull` and registry indexes take them.
    pub fn parse_remote(s: &str) -> Result<Reference, String> {
        let r = Reference::parse(s)?;
        if !r.explicit_host {
            return Err(format!(
                "{s}: no registry host; expected REGISTRY/REPOSITORY[:TAG|@sha256:...], e.g. 127.0.0.1:5000/kiln/base:1"
            ));
        }
        Ok(r)
    }

    /// The registry host (`docker.io` for Docker Hub names).
    pub fn host(&self) -> &str {
        self.repository.split('/').next().unwrap_or_default()
    }

    /// The host that serves the registry API: Docker Hub's is
    /// `registry-1.docker.io` (`docker.io` serves none), as Docker uses.
    pub fn api_host(&self) -> &str {
        match self.host() {
            "docker.io" => DOCKER_HUB_API,
            h => h,
        }
    }

    /// Whether this is a Docker Hub image (registry mirrors apply).
    pub fn is_docker_hub(&self) -> bool {
        self.host() == "docker.io"
    }

    /// The repository path inside the registry (`library/debian`).
    pub fn path(&self) -> &str {
        self.repository.split_once('/').map_or("", |(_, p)| p)
    }

    /// What to ask the registry for: the digest if pinned, else the tag
    /// (`latest` when none is given).
    pub fn object(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".to_string(),
        }
    }

    /// Docker's short form of a name: `docker.io/library/foo:1` → `foo:1`.
    pub fn familiar(&self) -> String {
        let r = self
            .repository
            .strip_prefix("docker.io/")
            .unwrap_or(&self.repository);
        let r = r.strip_prefix("library/").unwrap_or(r);
        format!("{r}:{}", self.tag.as_deref().unwrap_or("latest"))
    }

    /// `repository:tag` with `latest` for a missing tag (no digest).
    pub fn name(&self) -> String {
        format!(
            "{}:{}",
            self.repository,
            self.tag.as_deref().unwrap_or("latest")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_hub_names_normalize() {
        for s in [
            "debian",
            "debian:latest",
            "library/debian",
            "docker.io/library/debian:latest",
        ] {
            assert_eq!(
                Reference::parse(s).unwrap().name(),
                "docker.io/library/debian:latest"
            );
        }
        assert_eq!(
            Reference::parse("localhost:5000/a/b:1").unwrap().name(),
            "localhost:5000/a/b:1"
        );
        assert_eq!(
            Reference::parse("me/x:2").unwrap().name(),
            "docker.io/me/x:2"
        );
    }

    #[test]
    fn docker_hub_is_reached_at_its_api_host() {
        let r = Reference::parse("debian:12-slim").unwrap();
        assert_eq!(
            (r.host(), r.api_host(), r.path()),
            ("docker.io", "registry-1.docker.io", "library/debian")
        );
        assert!(r.is_docker_hub());
        let r = Reference::parse("index.docker.io/me/x:1").unwrap();
        assert_eq!(r.name(), "docker.io/me/x:1");
        let r = Reference::parse("ghcr.io/o/x:1").unwrap();
        assert_eq!(r.api_host(), "ghcr.io");
        assert!(!r.is_docker_hub());
    }

    #[test]
    fn digests_parse_and_bad_ones_are_named() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let r = Reference::parse(&format!("reg.example/img@{d}")).unwrap();
        assert_eq!(r.digest.unwrap().as_str(), d);
        assert_eq!(r.repository, "reg.example/img");
        let e = Reference::parse("img@sha256:xyz").unwrap_err();
        assert!(e.contains("not a valid digest"), "{e}");
        assert!(Reference::parse("Upper/Case").is_err());
    }

    #[test]
    fn remote_references_name_their_host() {
        let r = Reference::parse_remote("127.0.0.1:5000/kiln/base:1").unwrap();
        assert_eq!(
            (r.host(), r.path(), r.object().as_str()),
            ("127.0.0.1:5000", "kiln/base", "1")
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse_remote(&format!("localhost/x@{d}")).unwrap();
        assert_eq!((r.path(), r.object()), ("x", d));
        let e = Reference::parse_remote("kiln/base:1").unwrap_err();
        assert!(e.contains("no registry host"), "{e}");
        assert_eq!(
            Reference::parse("docker.io/library/foo:1")
                .unwrap()
                .familiar(),
            "foo:1"
        );
        assert_eq!(
            Reference::parse("me/foo").unwrap().familiar(),
            "me/foo:latest"
        );
    }
}
