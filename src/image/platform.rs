//! Platforms: the host's, `os/arch[/variant]` as users write them, and the
//! one place where a manifest is picked out of a multi-platform index.

use serde::{Deserialize, Serialize};

use super::{Descriptor, Extra, Index};

/// A platform in an index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// `os.version`, `os.features`, ...: kept.
    #[serde(flatten)]
    pub extra: Extra,
}

impl Platform {
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Platform {
        Platform {
            architecture: architecture.to_string(),
            os: os.to_string(),
            variant: variant.map(str::to_string),
            extra: Extra::new(),
        }
    }

    /// Parses `os/arch[/variant]`.
    pub fn parse(s: &str) -> Option<Platform> {
        let mut it = s.split('/');
        let os = it.next().filter(|s| !s.is_empty())?;
        let arch = it.next().filter(|s| !s.is_empty())?;
        let variant = it.next();
        if it.next().is_some() || variant == Some("") {
            return None;
        }
        Some(Platform::new(os, arch, variant))
    }

    /// Whether an image of `os/arch/variant` serves a request for `self`
    /// (a request without a variant takes any variant).
    pub fn accepts(&self, os: &str, arch: &str, variant: Option<&str>) -> bool {
        self.os == os
            && self.architecture == arch
            && (self.variant.is_none() || self.variant.as_deref() == variant)
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.variant {
            Some(v) => write!(f, "{}/{}/{v}", self.os, self.architecture),
            None => write!(f, "{}/{}", self.os, self.architecture),
        }
    }
}

/// The platform kiln builds for: the host's.
pub fn host_platform() -> Platform {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "arm" => "arm",
        "powerpc64" => "ppc64le",
        "s390x" => "s390x",
        "riscv64" => "riscv64",
        other => other,
    };
    Platform::new("linux", arch, (arch == "arm64").then_some("v8"))
}

/// Picks the manifest for `want` (else the host's platform) out of an
/// index; the error lists the platforms the index has.
pub fn select<'a>(index: &'a Index, want: Option<&Platform>) -> Result<&'a Descriptor, String> {
    let host = host_platform();
    let want = want.unwrap_or(&host);
    index
        .manifests
        .iter()
        .find(|m| {
            m.platform
                .as_ref()
                .is_some_and(|p| want.accepts(&p.os, &p.architecture, p.variant.as_deref()))
        })
        .ok_or_else(|| {
            let have: Vec<String> = index
                .manifests
                .iter()
                .filter_map(|m| m.platform.as_ref().map(|p| p.to_string()))
                .collect();
            format!(
                "no {want} image in the index (it has: {}); choose one of those with --platform",
                if have.is_empty() {
                    "no platforms named".to_string()
                } else {
                    have.join(", ")
                }
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::{Digest, MediaType};

    fn entry(p: &str) -> Descriptor {
        let mut d = Descriptor::new(MediaType::OciManifest, Digest::of(p.as_bytes()), 1);
        d.platform = Platform::parse(p);
        d
    }

    #[test]
    fn platforms_parse() {
        let p = Platform::parse("linux/arm64/v8").unwrap();
        assert_eq!((p.os.as_str(), p.architecture.as_str()), ("linux", "arm64"));
        assert_eq!(p.variant.as_deref(), Some("v8"));
        assert!(Platform::parse("linux").is_none());
        assert!(Platform::parse("linux/arm/v7/x").is_none());
        assert_eq!(p.to_string(), "linux/arm64/v8");
    }

    #[test]
    fn selection_honours_the_variant() {
        let mut index = Index::new();
        index.manifests = vec![entry("linux/arm/v6"), entry("linux/arm/v7")];
        let v7 = Platform::parse("linux/arm/v7").unwrap();
        assert_eq!(select(&index, Some(&v7)).unwrap(), &index.manifests[1]);
        let any = Platform::parse("linux/arm").unwrap();
        assert_eq!(select(&index, Some(&any)).unwrap(), &index.manifests[0]);
        let e = select(&index, Some(&Platform::parse("linux/s390x").unwrap())).unwrap_err();
        assert!(
            e.contains("no linux/s390x image") && e.contains("linux/arm/v6, linux/arm/v7"),
            "{e}"
        );
    }
}
