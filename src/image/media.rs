//! Media types: one enum that knows the OCI and Docker names of every
//! manifest, index, config and layer kiln meets, and keeps any other name as
//! it was written.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    None,
    Gzip,
    Zstd,
}

/// A media type. Known names are variants; anything else is kept verbatim.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MediaType {
    OciManifest,
    OciIndex,
    OciConfig,
    OciLayer,
    OciLayerGzip,
    OciLayerZstd,
    OciForeignLayer,
    OciForeignLayerGzip,
    OciForeignLayerZstd,
    DockerManifest,
    DockerManifestList,
    DockerConfig,
    DockerLayer,
    DockerLayerGzip,
    DockerLayerZstd,
    DockerForeignLayerGzip,
    Other(String),
}

const NAMES: &[(MediaType, &str)] = &[
    (
        MediaType::OciManifest,
        "application/vnd.oci.image.manifest.v1+json",
    ),
    (
        MediaType::OciIndex,
        "application/vnd.oci.image.index.v1+json",
    ),
    (
        MediaType::OciConfig,
        "application/vnd.oci.image.config.v1+json",
    ),
    (
        MediaType::OciLayer,
        "application/vnd.oci.image.layer.v1.tar",
    ),
    (
        MediaType::OciLayerGzip,
        "application/vnd.oci.image.layer.v1.tar+gzip",
    ),
    (
        MediaType::OciLayerZstd,
        "application/vnd.oci.image.layer.v1.tar+zstd",
    ),
    (
        MediaType::OciForeignLayer,
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
    ),
    (
        MediaType::OciForeignLayerGzip,
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    ),
    (
        MediaType::OciForeignLayerZstd,
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    ),
    (
        MediaType::DockerManifest,
        "application/vnd.docker.distribution.manifest.v2+json",
    ),
    (
        MediaType::DockerManifestList,
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ),
    (
        MediaType::DockerConfig,
        "application/vnd.docker.container.image.v1+json",
    ),
    (
        MediaType::DockerLayer,
        "application/vnd.docker.image.rootfs.diff.tar",
    ),
    (
        MediaType::DockerLayerGzip,
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ),
    (
        MediaType::DockerLayerZstd,
        "application/vnd.docker.image.rootfs.diff.tar.zstd",
    ),
    (
        MediaType::DockerForeignLayerGzip,
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    ),
];

impl MediaType {
    /// The media type a name denotes.
    pub fn parse(s: &str) -> MediaType {
        NAMES
            .iter()
            .find(|(_, n)| *n == s)
            .map(|(m, _)| m.clone())
            .unwrap_or_else(|| MediaType::Other(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            MediaType::Other(s) => s,
            known => NAMES
                .iter()
                .find(|(m, _)| m == known)
                .map(|(_, n)| *n)
                .expect("every known media type has a name"),
        }
    }

    /// An image index (OCI) or manifest list (Docker).
    pub fn is_index(&self) -> bool {
        matches!(self, MediaType::OciIndex | MediaType::DockerManifestList)
    }

    /// A single-image manifest (OCI or Docker).
    pub fn is_manifest(&self) -> bool {
        matches!(self, MediaType::OciManifest | MediaType::DockerManifest)
    }

    pub fn is_config(&self) -> bool {
        matches!(self, MediaType::OciConfig | MediaType::DockerConfig)
    }

    /// Whether this is a layer type (a tar, plain, gzip or zstd).
    pub fn is_layer(&self) -> bool {
        self.codec().is_some()
    }

    /// A layer's compression; None for what is not a layer.
    pub fn codec(&self) -> Option<Codec> {
        use MediaType::*;
        match self {
            OciLayer | OciForeignLayer | DockerLayer => Some(Codec::None),
            OciLayerGzip | OciForeignLayerGzip | DockerLayerGzip | DockerForeignLayerGzip => {
                Some(Codec::Gzip)
            }
            OciLayerZstd | OciForeignLayerZstd | DockerLayerZstd => Some(Codec::Zstd),
            _ => None,
        }
    }

    /// Whether a blob of this type with these bytes is an index: by the
    /// type, else (a generic or missing type, as registries and unnamed
    /// store blobs give) by the content. The one index-or-manifest test.
    pub fn is_index_with(&self, bytes: &[u8]) -> bool {
        self.is_index() || (!self.is_manifest() && json_is_index(bytes))
    }

    /// The OCI name of the same bytes (Docker layer types become OCI ones).
    pub fn to_oci(&self) -> MediaType {
        use MediaType::*;
        match self {
            DockerLayer => OciLayer,
            DockerLayerGzip => OciLayerGzip,
            DockerLayerZstd => OciLayerZstd,
            DockerForeignLayerGzip => OciForeignLayerGzip,
            other => other.clone(),
        }
    }

    /// The OCI layer type for a codec.
    pub fn oci_layer(codec: Codec) -> MediaType {
        match codec {
            Codec::None => MediaType::OciLayer,
            Codec::Gzip => MediaType::OciLayerGzip,
            Codec::Zstd => MediaType::OciLayerZstd,
        }
    }
}

impl fmt::Display for MediaType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for MediaType {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for MediaType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(MediaType::parse(&String::deserialize(d)?))
    }
}

impl Default for MediaType {
    fn default() -> Self {
        MediaType::Other(String::new())
    }
}

/// Whether a blob's JSON is an index (it has `manifests`), for blobs
/// whose descriptor does not say (a store's unnamed blobs, registries that
/// answer with a generic content type).
pub fn json_is_index(bytes: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        manifests: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Probe>(bytes).is_ok_and(|p| p.manifests.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_kept() {
        for (m, n) in NAMES {
            assert_eq!(MediaType::parse(n), *m);
            assert_eq!(m.as_str(), *n);
        }
        let odd = MediaType::parse("application/x-odd");
        assert_eq!(odd.as_str(), "application/x-odd");
        assert!(!odd.is_layer() && !odd.is_index());
    }

    #[test]
    fn docker_layers_become_oci_and_know_their_codec() {
        assert_eq!(MediaType::DockerLayerGzip.to_oci(), MediaType::OciLayerGzip);
        assert_eq!(MediaType::OciLayerZstd.codec(), Some(Codec::Zstd));
        assert_eq!(MediaType::DockerManifest.codec(), None);
        assert!(MediaType::DockerManifestList.is_index());
    }

    #[test]
    fn index_json_is_detected_by_its_manifests() {
        assert!(json_is_index(br#"{"schemaVersion":2,"manifests":[]}"#));
        assert!(!json_is_index(br#"{"schemaVersion":2,"layers":[]}"#));
        assert!(!json_is_index(b"not json"));
    }
}
