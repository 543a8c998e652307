//! Image config, manifest and index models, serialized as canonical JSON
//! (keys sorted, no insignificant whitespace) so the same inputs always give
//! the same bytes and digests.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use crate::digest::Digest;
pub use media::{json_is_index, Codec, MediaType};
pub use platform::{host_platform, Platform};
pub use reference::Reference;

mod media;
pub mod platform;
mod reference;

/// Annotation naming the compressor of a layer, so digest differences can be explained.
pub const ANNOTATION_COMPRESSOR: &str = "dev.kiln.layer.compressor";
/// Annotation on a RUN layer built with `--reproducible`: what was removed
/// or emptied (`removed PATH`, `emptied PATH`, one per line).
pub const ANNOTATION_REPRODUCIBLE: &str = "dev.kiln.layer.reproducible";
pub const ANNOTATION_REF_NAME: &str = "org.opencontainers.image.ref.name";
pub const ANNOTATION_CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Fields of a JSON object that kiln does not model, kept as they were
/// read so that rewriting the object never drops them.
pub type Extra = BTreeMap<String, serde_json::Value>;

/// An empty JSON object, as used for ExposedPorts/Volumes values.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// HEALTHCHECK settings (durations in nanoseconds).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test: Vec<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interval: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_period: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_interval: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: i64,
}

fn is_zero(n: &i64) -> bool {
    *n == 0
}

/// The `config` object of an image config: how to run the image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, Empty>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<BTreeMap<String, Empty>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_build: Option<Vec<String>>,
    /// Keys kiln does not model (`ArgsEscaped`, `Hostname`, ...), kept.
    #[serde(flatten)]
    pub extra: Extra,
}

/// One history entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
    #[serde(flatten)]
    pub extra: Extra,
}

/// The root filesystem: the layers' diff_ids.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<Digest>,
}

/// An OCI image config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(default)]
    pub config: RunConfig,
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
    /// Keys kiln does not model (`os.version`, `container_config`, ...), kept.
    #[serde(flatten)]
    pub extra: Extra,
}

/// A content descriptor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: MediaType,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    /// `urls`, `artifactType`, `data` and whatever else: kept.
    #[serde(flatten)]
    pub extra: Extra,
}

impl Descriptor {
    /// A descriptor for a blob.
    pub fn new(media_type: MediaType, digest: Digest, size: u64) -> Descriptor {
        Descriptor {
            media_type,
            digest,
            size,
            annotations: BTreeMap::new(),
            platform: None,
            extra: Extra::new(),
        }
    }

    /// The same blob without annotations (an index entry's names stripped).
    pub fn bare(&self) -> Descriptor {
        Descriptor {
            annotations: BTreeMap::new(),
            ..self.clone()
        }
    }
}

/// An image manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<MediaType>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// `subject`, `artifactType`, ...: kept.
    #[serde(flatten)]
    pub extra: Extra,
}

/// An image index (`index.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<MediaType>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl Index {
    /// An empty OCI index.
    pub fn new() -> Index {
        Index {
            schema_version: 2,
            media_type: Some(MediaType::OciIndex),
            manifests: Vec::new(),
            annotations: BTreeMap::new(),
            extra: Extra::new(),
        }
    }
}

impl Default for Index {
    fn default() -> Self {
        Index::new()
    }
}

/// One entry of docker-archive's `manifest.json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerManifestEntry {
    #[serde(rename = "Config")]
    pub config: String,
    #[serde(rename = "RepoTags", default)]
    pub repo_tags: Vec<String>,
    #[serde(rename = "Layers")]
    pub layers: Vec<String>,
}

/// Serializes `v` as canonical JSON: keys sorted, no whitespace.
pub fn canonical_json<T: Serialize>(v: &T) -> Vec<u8> {
    // serde_json's Map is a BTreeMap (the preserve_order feature is off), so
    // going through Value sorts every object's keys.
    let value = serde_json::to_value(v).expect("image models always serialize");
    serde_json::to_vec(&value).expect("a Value always serializes")
}

/// Seconds since 1970 → (year, month, day, hour, minute, second), UTC
/// (civil-from-days, Howard Hinnant).
pub fn civil(epoch: u64) -> (i64, u32, u32, u64, u64, u64) {
    let days = (epoch / 86400) as i64;
    let secs = epoch % 86400;
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d, secs / 3600, secs / 60 % 60, secs % 60)
}

/// RFC 3339 UTC rendering of a Unix time, as Docker writes `created`.
pub fn rfc3339(epoch: u64) -> String {
    let (y, m, d, hh, mm, ss) = civil(epoch);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_kiln_does_not_model_survive_a_rewrite() {
        let index = r#"{"annotations":{"a":"b"},"manifests":[{"artifactType":"x/y","digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","mediaType":"application/vnd.oci.image.manifest.v1+json","platform":{"architecture":"amd64","os":"windows","os.features":["f"],"os.version":"10.0"},"size":1,"urls":["https://example.org/b"]}],"mediaType":"application/vnd.oci.image.index.v1+json","schemaVersion":2,"subject":{"digest":"sha256:2222222222222222222222222222222222222222222222222222222222222222","mediaType":"application/vnd.oci.image.manifest.v1+json","size":2}}"#;
        let parsed: Index = serde_json::from_str(index).unwrap();
        assert_eq!(String::from_utf8(canonical_json(&parsed)).unwrap(), index);
        let config = r#"{"architecture":"amd64","config":{"ArgsEscaped":true,"Cmd":["x"]},"container_config":{"Hostname":"h"},"docker_version":"20.10","history":[{"created_by":"x","extra":1}],"os":"linux","rootfs":{"diff_ids":[],"type":"layers"}}"#;
        let parsed: ImageConfig = serde_json::from_str(config).unwrap();
        assert_eq!(String::from_utf8(canonical_json(&parsed)).unwrap(), config);
        let manifest = r#"{"artifactType":"x/y","config":{"digest":"sha256:1111111111111111111111111111111111111111111111111111111111111111","mediaType":"application/vnd.oci.image.config.v1+json","size":1},"layers":[],"schemaVersion":2}"#;
        let parsed: Manifest = serde_json::from_str(manifest).unwrap();
        assert_eq!(
            String::from_utf8(canonical_json(&parsed)).unwrap(),
            manifest
        );
        // A digest that is not one is refused when read, not carried along.
        assert!(serde_json::from_str::<Descriptor>(
            r#"{"digest":"sha256:xyz","mediaType":"a","size":1}"#
        )
        .is_err());
    }

    #[test]
    fn canonical_json_sorts_keys_without_spaces() {
        let cfg = ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids: vec![],
            },
            config: RunConfig {
                env: Some(vec!["A=1".into()]),
                cmd: Some(vec!["x".into()]),
                ..Default::default()
            },
            ..Default::default()
        };
        let s = String::from_utf8(canonical_json(&cfg)).unwrap();
        assert_eq!(
            s,
            r#"{"architecture":"amd64","config":{"Cmd":["x"],"Env":["A=1"]},"os":"linux","rootfs":{"diff_ids":[],"type":"layers"}}"#
        );
    }

    #[test]
    fn rfc3339_renders_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1451606400), "2016-01-01T00:00:00Z");
        assert_eq!(rfc3339(1700000000), "2023-11-14T22:13:20Z");
    }
}
