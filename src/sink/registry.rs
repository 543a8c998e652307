//! A registry as a sink: blobs the repository lacks are mounted from a
//! sibling repository or uploaded (from their file where they lie on disk,
//! so a retry can start again), manifests follow their blobs, and the
//! commit puts the tags.

use std::collections::HashMap;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use super::{Blob, Sink};
use crate::image::{Descriptor, Digest, MediaType};
use crate::registry::{Client, Payload};
use crate::source::{read_error, Error};

/// What a push did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PushReport {
    pub repository: String,
    pub manifest_digest: Option<Digest>,
    pub tags: Vec<String>,
    /// Blobs sent, blobs the repository already had, blobs mounted.
    pub uploaded: u64,
    pub present: u64,
    pub mounted: u64,
    pub bytes_uploaded: u64,
}

/// One repository of a registry, written to.
pub struct RegistrySink {
    client: Arc<Client>,
    repo: String,
    tags: Vec<String>,
    /// Repositories of the same registry to mount missing blobs from.
    pub mount_from: Vec<String>,
    /// Upload in PATCH chunks of this many bytes (0: one PUT per blob).
    pub chunk: u64,
    manifests: Mutex<HashMap<Digest, (MediaType, Vec<u8>)>>,
    report: Mutex<PushReport>,
}

impl RegistrySink {
    pub fn new(client: Arc<Client>, repo: &str, tags: &[String]) -> RegistrySink {
        RegistrySink {
            client,
            repo: repo.to_string(),
            tags: tags.to_vec(),
            mount_from: Vec::new(),
            chunk: 64 << 20,
            manifests: Mutex::new(HashMap::new()),
            report: Mutex::new(PushReport {
                repository: repo.to_string(),
                tags: tags.to_vec(),
                ..Default::default()
            }),
        }
    }

    pub fn report(&self) -> PushReport {
        self.report.lock().unwrap().clone()
    }

    fn upload(&self, location: &str, blob: &Blob<'_>) -> Result<(), Error> {
        let d = blob.desc;
        if let Some(f) = blob.file() {
            let payload = Payload::File {
                path: &f.path,
                offset: f.offset,
                len: f.len,
            };
            // The registry checks the digest it is given on the final PUT.
            return Ok(self
                .client
                .upload(location, d.digest.as_str(), &payload, self.chunk)?);
        }
        // A stream: spooled to a file (verified on the way) so a retry can
        // send it again.
        let spool = tempfile::tempfile().map_err(|source| Error::Write {
            path: std::env::temp_dir(),
            source,
        })?;
        {
            let mut w = BufWriter::new(&spool);
            std::io::copy(&mut blob.reader()?, &mut w)
                .map_err(|e| read_error(blob.from(), d, e))?;
            w.flush().map_err(|source| Error::Write {
                path: std::env::temp_dir(),
                source,
            })?;
        }
        let path = PathBuf::from(format!(
            "/proc/self/fd/{}",
            std::os::fd::AsRawFd::as_raw_fd(&spool)
        ));
        let payload = Payload::File {
            path: &path,
            offset: 0,
            len: d.size,
        };
        Ok(self
            .client
            .upload(location, d.digest.as_str(), &payload, self.chunk)?)
    }
}

impl Sink for RegistrySink {
    fn location(&self) -> PathBuf {
        PathBuf::from(format!("{}/{}", self.client.host, self.repo))
    }

    fn has_blob(&self, d: &Descriptor) -> Result<bool, Error> {
        if d.media_type.is_index() || d.media_type.is_manifest() {
            return Ok(false);
        }
        let there = self.client.blob_exists(&self.repo, d.digest.as_str())?;
        if there {
            self.report.lock().unwrap().present += 1;
        }
        Ok(there)
    }

    fn put_blob(&self, blob: Blob<'_>) -> Result<(), Error> {
        let d = blob.desc;
        let mut location = None;
        for from in self.mount_from.iter().filter(|f| **f != self.repo) {
            match self
                .client
                .start_upload(&self.repo, d.digest.as_str(), Some(from))?
            {
                None => {
                    self.report.lock().unwrap().mounted += 1;
                    return Ok(());
                }
                // The mount failed and opened an upload session instead:
                // the one before (an earlier failed mount's) is closed.
                Some(loc) => {
                    if let Some(old) = location.replace(loc) {
                        self.client.cancel_upload(&old);
                    }
                }
            }
        }
        // A failed upload session is not retried: a new one is opened (the
        // registry may have restarted and forgotten the old one).
        let mut attempt = 0;
        loop {
            let location = match location.take() {
                Some(l) => l,
                None => self
                    .client
                    .start_upload(&self.repo, d.digest.as_str(), None)?
                    .expect("an upload without a mount gives a location"),
            };
            match self.upload(&location, &blob) {
                Ok(()) => break,
                Err(Error::Registry(e))
                    if attempt < self.client.retries()
                        && crate::registry::Client::upload_retryable(&e) =>
                {
                    attempt += 1;
                    self.client.backoff(attempt);
                }
                Err(e) => return Err(e),
            }
        }
        let mut r = self.report.lock().unwrap();
        r.uploaded += 1;
        r.bytes_uploaded += d.size;
        Ok(())
    }

    fn put_manifest(&self, d: &Descriptor, bytes: &[u8]) -> Result<(), Error> {
        let media_type = match &d.media_type {
            MediaType::Other(s) if s.is_empty() => MediaType::OciManifest,
            m => m.clone(),
        };
        self.client
            .put_manifest(&self.repo, d.digest.as_str(), media_type.as_str(), bytes)?;
        self.manifests
            .lock()
            .unwrap()
            .insert(d.digest.clone(), (media_type, bytes.to_vec()));
        Ok(())
    }

    fn parallel(&self) -> bool {
        true
    }

    fn commit(&self, images: &[(Descriptor, Vec<String>)]) -> Result<(), Error> {
        let manifests = self.manifests.lock().unwrap();
        for (d, _) in images {
            let Some((media_type, bytes)) = manifests.get(&d.digest) else {
                continue;
            };
            for t in &self.tags {
                self.client
                    .put_manifest(&self.repo, t, media_type.as_str(), bytes)?;
            }
            self.report.lock().unwrap().manifest_digest = Some(d.digest.clone());
        }
        Ok(())
    }
}
