//! `kiln verify`: checks an image through and through and lists every
//! problem, not just the first: each blob's digest and size, each layer's
//! diff_id recomputed from its decompressed bytes (gzip, zstd or plain),
//! media types, the index → manifest → config → layers chain, tar
//! well-formedness of each layer, and a docker-archive's `manifest.json` and
//! `repositories` against the OCI layout beside them.

use std::collections::BTreeMap;
use std::io::{self, Read};

use serde::Serialize;

use crate::image::{Descriptor, DockerManifestEntry, ImageConfig, Index, Manifest};
use crate::source::{self, Source};

/// One problem, naming the blob (or file) it is about.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub blob: String,
    pub message: String,
}

/// What `verify` found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub format: String,
    pub manifests: Vec<String>,
    pub blobs_checked: usize,
    pub layers_checked: usize,
    pub problems: Vec<Problem>,
}

fn hashing<R: Read>(inner: R) -> crate::digest::HashingReader<R> {
    crate::digest::HashingReader::new(inner)
}

struct Checker<'a> {
    r: &'a dyn Source,
    report: Report,
}

impl Checker<'_> {
    fn problem(&mut self, blob: impl AsRef<str>, message: impl Into<String>) {
        let blob = blob.as_ref();
        self.report.problems.push(Problem {
            blob: blob.to_string(),
            message: message.into(),
        });
    }

    /// Reads a small blob, checking digest and size; None after a problem.
    fn small(&mut self, d: &Descriptor, what: &str) -> Option<Vec<u8>> {
        self.report.blobs_checked += 1;
        if d.size > crate::limits::MAX_JSON_BLOB {
            self.problem(
                &d.digest,
                format!(
                    "{what} declares {} bytes, more than a {what} can be",
                    d.size
                ),
            );
            return None;
        }
        let mut s = match self.r.open_blob(d) {
            Ok(s) => hashing(s),
            Err(e) => {
                self.problem(&d.digest, format!("{what}: {e}"));
                return None;
            }
        };
        let mut bytes = Vec::new();
        if let Err(e) = (&mut s)
            .take(crate::limits::MAX_JSON_BLOB + 1)
            .read_to_end(&mut bytes)
        {
            self.problem(&d.digest, format!("{what}: reading: {e}"));
            return None;
        }
        let got = s.digest().to_string();
        let mut ok = true;
        if got != d.digest.as_str() {
            self.problem(
                &d.digest,
                format!(
                    "{what}: content has digest {got}, not the {} that names it",
                    d.digest
                ),
            );
            ok = false;
        }
        if bytes.len() as u64 != d.size {
            self.problem(
                &d.digest,
                format!(
                    "{what}: {} bytes, but its descriptor says {}",
                    bytes.len(),
                    d.size
                ),
            );
            ok = false;
        }
        ok.then_some(bytes)
    }

    fn image(&mut self, d: &Descriptor, depth: usize) {
        let Some(bytes) = self.small(d, "manifest") else {
            return;
        };
        let v: serde_json::Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(e) => return self.problem(&d.digest, format!("manifest is not valid JSON: {e}")),
        };
        if v.get("manifests").is_some() || d.media_type.is_index() {
            match serde_json::from_value::<Index>(v) {
                Ok(index) if depth < 4 => {
                    for m in &index.manifests {
                        self.image(m, depth + 1);
                    }
                }
                Ok(_) => self.problem(&d.digest, "indexes nested too deeply"),
                Err(e) => self.problem(&d.digest, format!("image index is malformed: {e}")),
            }
            return;
        }
        let manifest: Manifest = match serde_json::from_value(v) {
            Ok(m) => m,
            Err(e) => return self.problem(&d.digest, format!("image manifest is malformed: {e}")),
        };
        self.report.manifests.push(d.digest.to_string());
        if !d.media_type.is_manifest() {
            self.problem(
                &d.digest,
                format!("manifest descriptor has media type {:?}", d.media_type),
            );
        }
        if let Some(mt) = &manifest.media_type {
            if mt != &d.media_type {
                self.problem(
                    &d.digest,
                    format!(
                        "manifest says mediaType {mt:?} but its descriptor says {:?}",
                        d.media_type
                    ),
                );
            }
        }
        if !manifest.config.media_type.is_config() {
            self.problem(
                &manifest.config.digest,
                format!("config has media type {:?}", manifest.config.media_type),
            );
        }
        let config: Option<ImageConfig> =
            self.small(&manifest.config, "config")
                .and_then(|b| match serde_json::from_slice(&b) {
                    Ok(c) => Some(c),
                    Err(e) => {
                        self.problem(
                            &manifest.config.digest,
                            format!("config is not a valid image config: {e}"),
                        );
                        None
                    }
                });
        if let Some(c) = &config {
            if c.rootfs.diff_ids.len() != manifest.layers.len() {
                self.problem(
                    &manifest.config.digest,
                    format!(
                        "config lists {} diff_ids for {} layers",
                        c.rootfs.diff_ids.len(),
                        manifest.layers.len()
                    ),
                );
            }
        }
        for (i, l) in manifest.layers.iter().enumerate() {
            let want = config
                .as_ref()
                .and_then(|c| c.rootfs.diff_ids.get(i))
                .cloned();
            self.layer(l, want.as_ref().map(|d| d.as_str()));
        }
    }

    fn layer(&mut self, d: &Descriptor, diff_id: Option<&str>) {
        self.report.blobs_checked += 1;
        self.report.layers_checked += 1;
        if !d.media_type.is_layer() {
            self.problem(
                &d.digest,
                format!("layer has media type {:?}", d.media_type),
            );
        }
        let raw = match self.r.open_blob(d) {
            Ok(s) => s,
            Err(e) => return self.problem(&d.digest, format!("layer: {e}")),
        };
        let mut compressed = hashing(raw);
        let mt = d.media_type.as_str();
        let result = (|| -> io::Result<(String, u64)> {
            let codec = d.media_type.codec().unwrap_or(crate::image::Codec::None);
            let decoder = source::decoder(codec, &mut compressed, &format!("layer {}", d.digest))?;
            let mut plain = hashing(decoder);
            {
                let mut ar = tar::Archive::new(&mut plain);
                for e in ar.entries()? {
                    let mut e = e?;
                    io::copy(&mut e, &mut io::sink())?;
                }
            }
            io::copy(&mut plain, &mut io::sink())?;
            Ok((plain.digest().to_string(), plain.count()))
        })();
        // Whatever the decompressor did not read still counts for the blob digest.
        let _ = io::copy(&mut compressed, &mut io::sink());
        let got = compressed.digest().to_string();
        if got != d.digest.as_str() {
            self.problem(
                &d.digest,
                format!(
                    "layer content has digest {got}, not the {} that names it",
                    d.digest
                ),
            );
        }
        if compressed.count() != d.size {
            self.problem(
                &d.digest,
                format!(
                    "layer is {} bytes, but its descriptor says {}",
                    compressed.count(),
                    d.size
                ),
            );
        }
        match result {
            Ok((uncompressed, _)) => {
                if let Some(want) = diff_id {
                    if uncompressed != want {
                        self.problem(&d.digest, format!("layer's uncompressed content has digest {uncompressed}, but the config's diff_id is {want}"));
                    }
                }
            }
            Err(e) => self.problem(&d.digest, format!("layer is not a well-formed {mt}: {e}")),
        }
    }

    /// A docker-archive's `manifest.json` and `repositories` against the layout.
    fn docker_files(&mut self, tops: &[Descriptor]) {
        let Ok(Some(mj)) = self.r.member("manifest.json") else {
            return;
        };
        let entries: Vec<DockerManifestEntry> = match serde_json::from_slice(&mj) {
            Ok(e) => e,
            Err(e) => return self.problem("manifest.json", format!("not valid JSON: {e}")),
        };
        if self.r.is_derived() {
            return;
        }
        let Some(top) = tops.first() else { return };
        let Ok(bytes) = self.r.read_blob(top) else {
            return;
        };
        let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else {
            return;
        };
        let path = |d: &crate::Digest| format!("blobs/sha256/{}", d.hex());
        for e in &entries {
            if e.config != path(&m.config.digest) {
                self.problem(
                    "manifest.json",
                    format!(
                        "Config is {} but the manifest's config is {}",
                        e.config, m.config.digest
                    ),
                );
            }
            let want: Vec<String> = m.layers.iter().map(|l| path(&l.digest)).collect();
            if e.layers != want {
                self.problem("manifest.json", "Layers do not match the manifest's layers");
            }
        }
        if let Ok(Some(repos)) = self.r.member("repositories") {
            match serde_json::from_slice::<BTreeMap<String, BTreeMap<String, String>>>(&repos) {
                Ok(map) => {
                    let top_layer = m.layers.last().map_or(&m.config.digest, |l| &l.digest);
                    let want = top_layer.hex();
                    for (repo, tags) in &map {
                        for (tag, id) in tags {
                            if id != want {
                                self.problem(
                                    "repositories",
                                    format!(
                                        "{repo}:{tag} points at {id}, not the top layer {want}"
                                    ),
                                );
                            }
                        }
                    }
                }
                Err(e) => self.problem("repositories", format!("not valid JSON: {e}")),
            }
        }
    }
}

/// Verifies every image in `r`.
pub fn verify(r: &dyn Source) -> Report {
    let mut c = Checker {
        r,
        report: Report {
            format: r.format().to_string(),
            ..Default::default()
        },
    };
    match r.images() {
        Ok(images) => {
            let tops: Vec<Descriptor> = images.iter().map(|(d, _)| d.clone()).collect();
            if tops.is_empty() {
                c.problem("index.json", "lists no images");
            }
            for d in &tops {
                c.image(d, 0);
            }
            c.docker_files(&tops);
        }
        Err(e) => c.problem("index.json", e.to_string()),
    }
    c.report
}
