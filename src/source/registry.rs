//! A registry as a source: the image a reference names, its manifests
//! fetched once and kept, its blobs streamed (and verified by the readers
//! of [`super`]) without a temporary store.

use std::collections::HashMap;
use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{Error, Source};
use crate::image::{Descriptor, Digest, MediaType, Reference};
use crate::registry::Client;

/// One image of a registry, as a reference names it.
pub struct RegistrySource {
    client: Arc<Client>,
    repo: String,
    reference: Reference,
    top: Descriptor,
    manifests: Mutex<HashMap<Digest, Vec<u8>>>,
}

/// The media type of a manifest from the registry's `Content-Type` and
/// the bytes (registries answer some with a generic JSON type).
fn manifest_type(content_type: &str, bytes: &[u8]) -> MediaType {
    let t = MediaType::parse(content_type.split(';').next().unwrap_or("").trim());
    if t.is_index() || t.is_manifest() {
        return t;
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<MediaType>,
    }
    match serde_json::from_slice::<Probe>(bytes)
        .ok()
        .and_then(|p| p.media_type)
    {
        Some(m) if m.is_index() || m.is_manifest() => m,
        _ if t.is_index_with(bytes) => MediaType::OciIndex,
        _ => MediaType::OciManifest,
    }
}

impl RegistrySource {
    /// Looks the reference up; `None` when the registry has no such image.
    pub fn open(
        client: Arc<Client>,
        reference: &Reference,
    ) -> Result<Option<RegistrySource>, Error> {
        let repo = reference.path().to_string();
        let Some((bytes, content_type, digest)) =
            client.get_manifest(&repo, &reference.object())?
        else {
            return Ok(None);
        };
        let top = Descriptor::new(
            manifest_type(&content_type, &bytes),
            digest.clone(),
            bytes.len() as u64,
        );
        Ok(Some(RegistrySource {
            client,
            repo,
            reference: reference.clone(),
            top,
            manifests: Mutex::new(HashMap::from([(digest, bytes)])),
        }))
    }

    /// The descriptor of the image the reference names.
    pub fn descriptor(&self) -> &Descriptor {
        &self.top
    }
}

impl Source for RegistrySource {
    fn location(&self) -> PathBuf {
        PathBuf::from(format!("{}/{}", self.client.host, self.repo))
    }

    fn format(&self) -> &str {
        "registry"
    }

    fn images(&self) -> Result<Vec<(Descriptor, Vec<String>)>, Error> {
        let name = match &self.reference.tag {
            Some(_) => vec![self.reference.name()],
            None => Vec::new(),
        };
        Ok(vec![(self.top.clone(), name)])
    }

    fn open_blob(&self, d: &Descriptor) -> Result<Box<dyn Read + Send + '_>, Error> {
        if let Some(b) = self.manifests.lock().unwrap().get(&d.digest) {
            return Ok(Box::new(io::Cursor::new(b.clone())));
        }
        if d.media_type.is_index() || d.media_type.is_manifest() {
            let Some((bytes, _, _)) = self.client.get_manifest(&self.repo, d.digest.as_str())?
            else {
                return Err(Error::Missing {
                    path: self.location(),
                    what: format!("manifest {}", d.digest),
                });
            };
            self.manifests
                .lock()
                .unwrap()
                .insert(d.digest.clone(), bytes.clone());
            return Ok(Box::new(io::Cursor::new(bytes)));
        }
        Ok(self.client.blob_reader(&self.repo, d)?)
    }
}
