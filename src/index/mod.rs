//! The image index: never build an image whose inputs have not changed.
//!
//! An image's **index digest** is the sha256 of the lines (joined by `\n`)
//! context hash, its args as Python's `json.dumps(args, sort_keys=True)`,
//! `kiln-builder:<layer format version>`, and its parents' digests, sorted
//! (a parent built by kiln contributes its index digest, a base image from
//! a store its manifest digest). The digest is filed under Taskcluster's
//! routes, `{prefix}.cache.level-{level}.docker-images.v2.{name}.hash.{digest}`
//! plus `.latest` and `.pushdate.{Y}.{m}.{d}.{YmdHMS}`; a lookup tries levels
//! 3 down to the requested one, as taskgraph does, and writes go to the
//! requested level.
//!
//! [`LocalIndex`] keeps one small JSON file per route in a directory; every
//! write is a rename, so concurrent kiln processes never see half an entry
//! and two builds of one image leave one entry. The images themselves live
//! in the user store ([`crate::store::Store`]) under `kiln.local/index/<name>:<digest>`
//! names, so `kiln store gc` keeps them.

mod cached;

pub use cached::{build_cached, routes, Cached, IndexOptions, RegistryIndex, RoutesReport};

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// The default route prefix.
pub const DEFAULT_PREFIX: &str = "kiln";

/// The line taskgraph gives its image builder in the digest; kiln's names
/// the layer format: its version and every setting that changes image
/// bytes for the same context (layer compression, timestamp, mode policy,
/// target stage, platform, and where given the RUN network and `--label`s).
pub fn builder_line(opts: &crate::assemble::BuildOptions) -> String {
    let format = opts.layer_format();
    let p = crate::image::host_platform();
    // The RUN network, where it is not the default (host): existing index
    // digests stay as they were.
    let network = match opts.network {
        crate::sandbox::Network::Host => String::new(),
        n => format!(" network={}", n.name()),
    };
    let fields: Vec<String> = format
        .fields()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    // `--label`s change the config, where given (other digests stay).
    let labels = if opts.labels.is_empty() {
        String::new()
    } else {
        format!(" labels={}", python_json(&opts.labels))
    };
    format!(
        "kiln-builder:{} {} target={} platform={}/{}{network}{labels}",
        crate::steps::LayerFormat::VERSION,
        fields.join(" "),
        opts.target.as_deref().unwrap_or(""),
        p.os,
        p.architecture
    )
}

/// `json.dumps(value)` of a string, as Python writes it (ASCII only).
fn py_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (c as u32) > 0x7e => {
                let mut buf = [0u16; 2];
                for u in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{u:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// `json.dumps(args, sort_keys=True)` as Python writes it.
pub fn python_json(args: &BTreeMap<String, String>) -> String {
    let mut out = String::from("{");
    for (i, (k, v)) in args.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        py_str(k, &mut out);
        out.push_str(": ");
        py_str(v, &mut out);
    }
    out.push('}');
    out
}

/// The index digest of an image, from its context hash, its args, the
/// builder line and its parents' digests.
pub fn index_digest(
    context_hash: &str,
    args: &BTreeMap<String, String>,
    builder: &str,
    parents: &[String],
) -> String {
    let mut lines = vec![
        context_hash.to_string(),
        python_json(args),
        builder.to_string(),
    ];
    let mut deps = parents.to_vec();
    deps.sort();
    lines.extend(deps);
    hex::encode(Sha256::digest(lines.join("\n").as_bytes()))
}

/// Where routes are filed.
#[derive(Clone, Debug)]
pub struct RouteOptions {
    pub prefix: String,
    /// 1 to 3.
    pub level: u8,
}

impl Default for RouteOptions {
    fn default() -> Self {
        RouteOptions {
            prefix: DEFAULT_PREFIX.into(),
            level: 3,
        }
    }
}

impl RouteOptions {
    fn base(&self, level: u8, name: &str) -> String {
        format!(
            "{}.cache.level-{level}.docker-images.v2.{name}",
            self.prefix
        )
    }

    /// The routes a lookup tries, best first: levels 3 down to ours.
    pub fn lookup(&self, name: &str, digest: &str) -> Vec<String> {
        (self.level..=3)
            .rev()
            .map(|l| format!("{}.hash.{digest}", self.base(l, name)))
            .collect()
    }

    /// The routes a build writes, at our level: hash, latest and pushdate.
    pub fn write(&self, name: &str, digest: &str, now: u64) -> Vec<String> {
        let base = self.base(self.level, name);
        let (y, m, d, hh, mm, ss) = crate::image::civil(now);
        vec![
            format!("{base}.hash.{digest}"),
            format!("{base}.latest"),
            format!("{base}.pushdate.{y:04}.{m:02}.{d:02}.{y:04}{m:02}{d:02}{hh:02}{mm:02}{ss:02}"),
        ]
    }
}

/// What a route points at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub route: String,
    /// The image (task) name.
    pub name: String,
    pub index_digest: String,
    pub context_hash: String,
    pub manifest_digest: crate::Digest,
    /// When it was filed (seconds since 1970).
    pub filed: u64,
}

/// Errors of the index.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("index {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{route}: not a valid route (letters, digits, '.', '-', '_' only)")]
    BadRoute { route: String },
    #[error("no index entry matches {pattern} in {}", dir.display())]
    NoMatch { pattern: String, dir: PathBuf },
    #[error("{0}")]
    Build(Box<crate::assemble::Error>),
    #[error("{0}")]
    Store(#[from] crate::store::Error),
    #[error("registry index: {0}")]
    Registry(#[from] crate::registry::Error),
}

impl From<crate::assemble::Error> for Error {
    fn from(e: crate::assemble::Error) -> Error {
        Error::Build(Box::new(e))
    }
}

/// The local index: a directory of route files.
#[derive(Clone, Debug)]
pub struct LocalIndex {
    pub dir: PathBuf,
}

fn valid_route(r: &str) -> bool {
    !r.is_empty()
        && !r.starts_with('.')
        && r.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

impl LocalIndex {
    pub fn new(dir: impl Into<PathBuf>) -> LocalIndex {
        LocalIndex { dir: dir.into() }
    }

    /// `$XDG_CACHE_HOME/kiln/index` (else `~/.cache/kiln/index`).
    pub fn default_dir() -> PathBuf {
        crate::cache_dir().join("index")
    }

    fn io(&self, path: &Path) -> impl Fn(io::Error) -> Error + '_ {
        let path = path.to_path_buf();
        move |source| Error::Io {
            path: path.clone(),
            source,
        }
    }

    /// The entry of a route, if any (an unreadable entry counts as none).
    pub fn get(&self, route: &str) -> Option<Entry> {
        if !valid_route(route) {
            return None;
        }
        // Never through a link; an entry is a few hundred bytes.
        let bytes = crate::fsx::DirFd::open(&self.dir)
            .ok()?
            .read(route, crate::limits::MAX_INDEX_ENTRY)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Files an entry under its route, atomically (last writer wins).
    pub fn put(&self, e: &Entry) -> Result<(), Error> {
        if !valid_route(&e.route) {
            return Err(Error::BadRoute {
                route: e.route.clone(),
            });
        }
        let target = self.dir.join(&e.route);
        crate::sink::file::write_atomic(
            &target,
            &serde_json::to_vec_pretty(e).expect("entries serialize"),
        )?;
        Ok(())
    }

    /// Every entry whose route matches `pattern` (`*` any run of characters), sorted.
    pub fn list(&self, pattern: Option<&str>) -> Result<Vec<Entry>, Error> {
        let rd = match fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(&self.dir)(e)),
        };
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(self.io(&self.dir))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if !valid_route(&name) || pattern.is_some_and(|p| !glob(p, &name)) {
                continue;
            }
            if let Some(e) = self.get(&name) {
                out.push(e);
            }
        }
        out.sort_by(|a, b| a.route.cmp(&b.route));
        Ok(out)
    }

    /// Removes the entries matching `pattern`; returns how many.
    pub fn remove(&self, pattern: &str) -> Result<usize, Error> {
        let doomed = self.list(Some(pattern))?;
        if doomed.is_empty() {
            return Err(Error::NoMatch {
                pattern: pattern.to_string(),
                dir: self.dir.clone(),
            });
        }
        for e in &doomed {
            let p = self.dir.join(&e.route);
            fs::remove_file(&p).map_err(self.io(&p))?;
        }
        Ok(doomed.len())
    }
}

/// `*` matches any run of characters; everything else matches itself.
fn glob(pattern: &str, s: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == s;
    }
    let mut rest = s;
    for (i, part) in parts.iter().enumerate() {
        if i == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if i == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(at) => rest = &rest[at + part.len()..],
                None => return false,
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_digest_is_the_sha256_of_the_documented_lines() {
        let mut a = BTreeMap::new();
        a.insert("X".to_string(), "1".to_string());
        let parents = vec!["bb".to_string(), "aa".to_string()];
        let text = "ctx\n{\"X\": \"1\"}\nkiln-builder:1 x\naa\nbb";
        assert_eq!(
            index_digest("ctx", &a, "kiln-builder:1 x", &parents),
            hex::encode(Sha256::digest(text))
        );
    }

    #[test]
    fn args_json_matches_python() {
        let mut a = BTreeMap::new();
        a.insert("B".to_string(), "x\"y é".to_string());
        a.insert("A".to_string(), "1".to_string());
        // python3 -c 'import json; print(json.dumps({"B": "x\"y é", "A": "1"}, sort_keys=True))'
        assert_eq!(python_json(&a), r#"{"A": "1", "B": "x\"y \u00e9"}"#);
        assert_eq!(python_json(&BTreeMap::new()), "{}");
    }

    #[test]
    fn routes_follow_taskcluster() {
        let r = RouteOptions {
            prefix: "gecko".into(),
            level: 1,
        };
        assert_eq!(
            r.lookup("img", "abc"),
            [
                "gecko.cache.level-3.docker-images.v2.img.hash.abc",
                "gecko.cache.level-2.docker-images.v2.img.hash.abc",
                "gecko.cache.level-1.docker-images.v2.img.hash.abc"
            ]
        );
        // 2026-11-23T21:30:05Z
        assert_eq!(
            r.write("img", "abc", 1795469405),
            [
                "gecko.cache.level-1.docker-images.v2.img.hash.abc",
                "gecko.cache.level-1.docker-images.v2.img.latest",
                "gecko.cache.level-1.docker-images.v2.img.pushdate.2026.11.23.20261123213005"
            ]
        );
    }

    #[test]
    fn local_index_files_and_globs_routes() {
        let d = tempfile::tempdir().unwrap();
        let idx = LocalIndex::new(d.path());
        let e = |route: &str| Entry {
            route: route.into(),
            name: "img".into(),
            index_digest: "d".into(),
            context_hash: "c".into(),
            manifest_digest: crate::Digest::of(b"m"),
            filed: 0,
        };
        idx.put(&e("kiln.cache.level-3.docker-images.v2.img.hash.d"))
            .unwrap();
        idx.put(&e("kiln.cache.level-3.docker-images.v2.img.latest"))
            .unwrap();
        assert_eq!(idx.list(Some("*.hash.*")).unwrap().len(), 1);
        assert_eq!(idx.list(None).unwrap().len(), 2);
        assert!(idx.put(&e("../escape")).is_err());
        assert_eq!(idx.remove("*.latest").unwrap(), 1);
        assert!(idx.remove("*.latest").is_err());
    }
}
