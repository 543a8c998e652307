//! `kiln diff A B`: says exactly why two images differ, top down: manifest
//! and config digests, config fields, then each layer pair: identical,
//! same content under other compression (naming the compressors from the
//! layers' annotations), or different content, listing the entries added,
//! removed or changed (type, mode, owner, mtime, size, link target,
//! content with the first differing byte). Layers are streamed; only entry
//! metadata and content hashes are held in memory.

use std::collections::BTreeMap;
use std::io::{self, Read};

use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::image::{Descriptor, ANNOTATION_COMPRESSOR};
use crate::image::{ImageConfig, Manifest};
use crate::source::{first_image, resolve, Error, Source};

/// One image of a diff: its manifest and config.
struct Summary {
    manifest_digest: String,
    image_id: String,
    manifest: Manifest,
    config: ImageConfig,
}

fn summary(src: &dyn Source) -> Result<Summary, Error> {
    let (first, _) = first_image(src)?;
    let r = resolve(src, &first, None)?;
    Ok(Summary {
        manifest_digest: r.descriptor.digest.to_string(),
        image_id: r.manifest.config.digest.to_string(),
        manifest: r.manifest,
        config: r.config,
    })
}

/// One differing config field.
#[derive(Clone, Debug, Serialize)]
pub struct FieldDiff {
    pub field: String,
    pub a: serde_json::Value,
    pub b: serde_json::Value,
}

/// One side of a layer pair.
#[derive(Clone, Debug, Serialize)]
pub struct LayerSide {
    pub digest: String,
    pub diff_id: String,
    pub media_type: String,
    pub size: u64,
    pub compressor: Option<String>,
}

/// One differing entry of a layer pair.
#[derive(Clone, Debug, Serialize)]
pub struct EntryDiff {
    pub path: String,
    /// `added` (only in B), `removed` (only in A) or `changed`.
    pub change: String,
    /// For `changed`: field → (A, B).
    pub fields: BTreeMap<String, (String, String)>,
    /// For changed content: the first differing byte.
    pub first_difference: Option<u64>,
}

/// A layer pair.
#[derive(Clone, Debug, Serialize)]
pub struct LayerDiff {
    pub index: usize,
    pub a: Option<LayerSide>,
    pub b: Option<LayerSide>,
    /// `identical`, `compression` (same diff_id), `content`, `only in A`, `only in B`.
    pub verdict: String,
    pub entries: Vec<EntryDiff>,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub identical: bool,
    pub manifest: (String, String),
    pub config: (String, String),
    pub config_fields: Vec<FieldDiff>,
    pub layers: Vec<LayerDiff>,
}

fn side(s: &Summary, i: usize) -> Option<LayerSide> {
    let d: &Descriptor = s.manifest.layers.get(i)?;
    Some(LayerSide {
        digest: d.digest.to_string(),
        diff_id: s
            .config
            .rootfs
            .diff_ids
            .get(i)
            .map(|d| d.to_string())
            .unwrap_or_default(),
        media_type: d.media_type.to_string(),
        size: d.size,
        compressor: d.annotations.get(ANNOTATION_COMPRESSOR).cloned(),
    })
}

fn fields(prefix: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<FieldDiff>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                let null = Value::Null;
                fields(
                    &p,
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        _ if a != b => out.push(FieldDiff {
            field: prefix.to_string(),
            a: a.clone(),
            b: b.clone(),
        }),
        _ => {}
    }
}

/// What one tar entry is, with a hash of its content.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Info {
    kind: char,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    size: u64,
    link: String,
    sha256: [u8; 32],
}

fn io_err(d: &Descriptor) -> impl Fn(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: std::path::PathBuf::from(format!("layer {}", d.digest)),
        source,
    }
}

fn entries(r: &dyn Source, d: &Descriptor) -> Result<BTreeMap<String, Info>, Error> {
    let mut out = BTreeMap::new();
    let mut ar = tar::Archive::new(r.layer_tar(d)?);
    let err = io_err(d);
    for e in ar.entries().map_err(&err)? {
        let mut e = e.map_err(&err)?;
        let h = e.header().clone();
        let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = e.read(&mut buf).map_err(&err)?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
        }
        out.insert(
            path,
            Info {
                // An old-style regular file ('\0') is a regular file ('0').
                kind: match h.entry_type().as_byte() {
                    0 => '0',
                    b => b as char,
                },
                // The permission bits: some writers (Docker's) keep the
                // file type in the mode field too (040755 for 0755).
                mode: h.mode().unwrap_or(0) & 0o7777,
                uid: h.uid().unwrap_or(0),
                gid: h.gid().unwrap_or(0),
                mtime: h.mtime().unwrap_or(0),
                size: e.size(),
                link,
                sha256: hash.finalize().into(),
            },
        );
    }
    Ok(out)
}

/// The first byte at which entry `path` differs between two layers.
fn first_difference(
    ra: &dyn Source,
    da: &Descriptor,
    rb: &dyn Source,
    db: &Descriptor,
    path: &str,
) -> Result<Option<u64>, Error> {
    let mut aa = tar::Archive::new(ra.layer_tar(da)?);
    let mut ab = tar::Archive::new(rb.layer_tar(db)?);
    let (ea, eb) = (io_err(da), io_err(db));
    let mut ia = aa.entries().map_err(&ea)?;
    let mut ib = ab.entries().map_err(&eb)?;
    let mut x = loop {
        match ia.next() {
            Some(e) => {
                let e = e.map_err(&ea)?;
                if String::from_utf8_lossy(&e.path_bytes()) == path {
                    break e;
                }
            }
            None => return Ok(None),
        }
    };
    let mut y = loop {
        match ib.next() {
            Some(e) => {
                let e = e.map_err(&eb)?;
                if String::from_utf8_lossy(&e.path_bytes()) == path {
                    break e;
                }
            }
            None => return Ok(None),
        }
    };
    let (mut bx, mut by) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    let mut offset = 0u64;
    loop {
        let nx = read_full(&mut x, &mut bx).map_err(&ea)?;
        let ny = read_full(&mut y, &mut by).map_err(&eb)?;
        let n = nx.min(ny);
        if let Some(i) = (0..n).find(|&i| bx[i] != by[i]) {
            return Ok(Some(offset + i as u64));
        }
        if nx != ny {
            return Ok(Some(offset + n as u64));
        }
        if nx == 0 {
            return Ok(None);
        }
        offset += n as u64;
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        let n = r.read(&mut buf[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    Ok(got)
}

/// How many changed entries get a first-difference offset (each costs a pass).
const OFFSETS: usize = 20;

fn entry_diffs(
    ra: &dyn Source,
    da: &Descriptor,
    rb: &dyn Source,
    db: &Descriptor,
) -> Result<Vec<EntryDiff>, Error> {
    let a = entries(ra, da)?;
    let b = entries(rb, db)?;
    let mut out = Vec::new();
    let paths: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let mut offsets = 0;
    for p in paths {
        match (a.get(p), b.get(p)) {
            (Some(_), None) => out.push(EntryDiff {
                path: p.clone(),
                change: "removed".into(),
                fields: BTreeMap::new(),
                first_difference: None,
            }),
            (None, Some(_)) => out.push(EntryDiff {
                path: p.clone(),
                change: "added".into(),
                fields: BTreeMap::new(),
                first_difference: None,
            }),
            (Some(x), Some(y)) if x != y => {
                let mut f = BTreeMap::new();
                let mut put = |k: &str, a: String, b: String| {
                    if a != b {
                        f.insert(k.to_string(), (a, b));
                    }
                };
                put("type", x.kind.to_string(), y.kind.to_string());
                put("mode", format!("{:04o}", x.mode), format!("{:04o}", y.mode));
                put(
                    "uid/gid",
                    format!("{}:{}", x.uid, x.gid),
                    format!("{}:{}", y.uid, y.gid),
                );
                put("mtime", x.mtime.to_string(), y.mtime.to_string());
                put("size", x.size.to_string(), y.size.to_string());
                put("link", x.link.clone(), y.link.clone());
                put(
                    "content",
                    hex::encode(x.sha256)[..12].to_string(),
                    hex::encode(y.sha256)[..12].to_string(),
                );
                let first_difference = if x.sha256 != y.sha256 && offsets < OFFSETS {
                    offsets += 1;
                    first_difference(ra, da, rb, db, p)?
                } else {
                    None
                };
                out.push(EntryDiff {
                    path: p.clone(),
                    change: "changed".into(),
                    fields: f,
                    first_difference,
                });
            }
            _ => {}
        }
    }
    Ok(out)
}

/// Compares two images.
pub fn diff(ra: &dyn Source, rb: &dyn Source) -> Result<Report, Error> {
    let (a, b) = (summary(ra)?, summary(rb)?);
    let mut config_fields = Vec::new();
    let mut ca = serde_json::to_value(&a.config).unwrap_or_default();
    let mut cb = serde_json::to_value(&b.config).unwrap_or_default();
    // Layers are compared below, one by one.
    for c in [&mut ca, &mut cb] {
        if let Some(o) = c.as_object_mut() {
            o.remove("rootfs");
        }
    }
    fields("", &ca, &cb, &mut config_fields);
    let n = a.manifest.layers.len().max(b.manifest.layers.len());
    let mut layers = Vec::new();
    for i in 0..n {
        let (sa, sb) = (side(&a, i), side(&b, i));
        let (verdict, entries) = match (&sa, &sb) {
            (Some(x), Some(y)) if x.digest == y.digest => ("identical".to_string(), Vec::new()),
            (Some(x), Some(y)) if x.diff_id == y.diff_id && !x.diff_id.is_empty() => {
                ("compression".to_string(), Vec::new())
            }
            (Some(_), Some(_)) => (
                "content".to_string(),
                entry_diffs(ra, &a.manifest.layers[i], rb, &b.manifest.layers[i])?,
            ),
            (Some(_), None) => ("only in A".to_string(), Vec::new()),
            _ => ("only in B".to_string(), Vec::new()),
        };
        layers.push(LayerDiff {
            index: i,
            a: sa,
            b: sb,
            verdict,
            entries,
        });
    }
    Ok(Report {
        identical: a.manifest_digest == b.manifest_digest,
        manifest: (a.manifest_digest, b.manifest_digest),
        config: (a.image_id, b.image_id),
        config_fields,
        layers,
    })
}

/// The report as text, top down.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    let pair = |label: &str, (a, b): &(String, String)| {
        if a == b {
            format!("{label}: identical {a}\n")
        } else {
            format!("{label}: {a} vs {b}\n")
        }
    };
    out.push_str(&pair("manifest", &r.manifest));
    out.push_str(&pair("config", &r.config));
    for f in &r.config_fields {
        out.push_str(&format!("  config field {}: {} vs {}\n", f.field, f.a, f.b));
    }
    for l in &r.layers {
        let digest =
            |s: &Option<LayerSide>| s.as_ref().map_or("-".to_string(), |s| s.digest.clone());
        match l.verdict.as_str() {
            "identical" => {
                out.push_str(&format!("layer {}: identical {}\n", l.index, digest(&l.a)))
            }
            "compression" => {
                let (a, b) = (l.a.as_ref().unwrap(), l.b.as_ref().unwrap());
                let name =
                    |s: &LayerSide| s.compressor.clone().unwrap_or_else(|| s.media_type.clone());
                out.push_str(&format!(
                    "layer {}: same content (diff_id {}), only the compressed bytes differ: {} ({} bytes) vs {} ({} bytes)\n",
                    l.index,
                    a.diff_id,
                    name(a),
                    a.size,
                    name(b),
                    b.size
                ));
            }
            "content" => {
                let (a, b) = (l.a.as_ref().unwrap(), l.b.as_ref().unwrap());
                out.push_str(&format!(
                    "layer {}: content differs (diff_id {} vs {})\n",
                    l.index, a.diff_id, b.diff_id
                ));
                for e in &l.entries {
                    match e.change.as_str() {
                        "added" => out.push_str(&format!("  added    {} (only in B)\n", e.path)),
                        "removed" => out.push_str(&format!("  removed  {} (only in A)\n", e.path)),
                        _ => {
                            let mut parts: Vec<String> = e
                                .fields
                                .iter()
                                .filter(|(k, _)| k.as_str() != "content")
                                .map(|(k, (x, y))| format!("{k} {x} vs {y}"))
                                .collect();
                            if e.fields.contains_key("content") {
                                parts.push(match e.first_difference {
                                    Some(o) => format!("content (first difference at byte {o})"),
                                    None => "content".to_string(),
                                });
                            }
                            out.push_str(&format!("  changed  {}: {}\n", e.path, parts.join(", ")));
                        }
                    }
                }
            }
            v => out.push_str(&format!(
                "layer {}: {v} {}\n",
                l.index,
                digest(if v == "only in A" { &l.a } else { &l.b })
            )),
        }
    }
    out
}
