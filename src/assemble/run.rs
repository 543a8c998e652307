//! RUN: the root filesystem a command sees (base layers unpacked once into
//! kiln's cache, keyed by diff_id; the stage's own layers unpacked into the
//! build's spool; earlier RUNs' upper directories), its `--mount`s, and the
//! sandbox call that leaves the step's layer tar.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::image::{Descriptor, Digest};
use crate::layer::Planned as Layer;
use crate::progress::Step;
use crate::sandbox::{self, Action, Mount, Network, Spec};

/// Where unpacked base layers live: `$XDG_CACHE_HOME/kiln/layers/<diff_id>`.
pub fn layer_cache() -> PathBuf {
    crate::cache_dir().join("layers")
}

/// Unpacks a layer (blob or tar) into `dir` with the sandbox helper (in the
/// user namespace when rootless, so owners map), unless it is there. A
/// directory of the layer cache is named by its diff_id and made only
/// when the layer's bytes have it.
fn unpack(tar: &Path, dir: &Path, diff_id: Option<&Digest>, spool: &Path) -> Result<(), String> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent() {
        // Private: a RUN may leave a setuid root binary in a layer.
        crate::fsx::create_private_dir(parent)
            .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        remove_stale_unpacks(parent);
    }
    if sandbox::container::active() {
        // In-process: once the container's root holds an image, kiln's
        // own binary may not start again (its libraries are gone).
        return sandbox::extract::extract(tar, dir, diff_id, true)
            .map_err(|e| format!("unpacking {}: {e}", tar.display()));
    }
    let spec = Spec {
        rootless: sandbox::rootless(),
        action: Action::Extract {
            tar: tar.to_path_buf(),
            dir: dir.to_path_buf(),
            diff_id: diff_id.cloned(),
        },
    };
    sandbox::run(&spec, spool, |_| {}).map_err(|e| format!("unpacking {}: {e}", tar.display()))
}

/// Removes the unpacks in progress (`.<name>.tmp-<pid>-<n>`) under `dir`
/// whose process is gone (killed mid-unpack); returns how many.
pub fn remove_stale_unpacks(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = name
            .strip_prefix('.')
            .and_then(|r| r.rsplit_once(sandbox::extract::TMP_INFIX))
            .and_then(|(_, rest)| rest.split('-').next()?.parse::<u32>().ok())
        else {
            continue;
        };
        if !crate::fsx::process_alive(pid) {
            sandbox::remove_tree(&e.path());
            n += 1;
        }
    }
    n
}

/// Records that an unpacked layer of the cache was used now (the mtime of
/// `<diff_id>.used` beside it; the layer's own directory is a lower of
/// the command's root and stays as unpacked).
fn mark_used(dir: &Path) {
    let _ = std::fs::File::create(dir.with_extension("used"));
}

/// `kiln cache prune` for `layers/`: removes the unpacks that killed
/// processes left, and every unpacked layer not used for `older` (all of
/// them with `older` zero). Returns (layers removed, leftovers removed).
pub fn prune_layers(older: std::time::Duration) -> (usize, usize) {
    let cache = layer_cache();
    let stale = remove_stale_unpacks(&cache);
    let Ok(rd) = std::fs::read_dir(&cache) else {
        return (0, stale);
    };
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
            continue;
        }
        let used = cache.join(format!("{name}.used"));
        let last = std::fs::metadata(&used)
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if now.duration_since(last).unwrap_or_default() >= older {
            sandbox::remove_tree(&e.path());
            let _ = std::fs::remove_file(&used);
            removed += 1;
        }
    }
    (removed, stale)
}

/// The lower directories of a RUN, topmost first: every base layer (from
/// the cache), then every own layer (unpacked on first need; a RUN's is its
/// upper directory). `dirs` records what was unpacked.
pub fn lowers(
    base: &[(Descriptor, PathBuf)],
    base_diff_ids: &[Digest],
    layers: &[Layer],
    dirs: &mut [Option<PathBuf>],
    spool: &Path,
    mtime: u64,
) -> Result<Vec<PathBuf>, String> {
    let mut out = Vec::new();
    let cache = layer_cache();
    crate::fsx::create_private_dir(spool)
        .map_err(|e| format!("creating {}: {e}", spool.display()))?;
    for (i, (d, blob)) in base.iter().enumerate() {
        let id = base_diff_ids
            .get(i)
            .ok_or_else(|| format!("base layer {} has no diff_id in its config", d.digest))?;
        let dir = cache.join(id.hex());
        unpack(blob, &dir, Some(id), spool)?;
        mark_used(&dir);
        out.push(dir);
    }
    for (i, layer) in layers.iter().enumerate() {
        if let Some(d) = &dirs[i] {
            out.push(d.clone());
            continue;
        }
        let tar = match layer {
            // A step cache hit: unpacked once into the cache, like a base layer.
            Layer::Cached { blob, diff_id, .. } => {
                let dir = cache.join(diff_id.hex());
                unpack(blob, &dir, Some(diff_id), spool)?;
                mark_used(&dir);
                dirs[i] = Some(dir.clone());
                out.push(dir);
                continue;
            }
            Layer::Tar { path, .. } => path.clone(),
            Layer::Entries(entries) => {
                let tar = spool.join(format!("layer-{i}.tar"));
                let f = std::fs::File::create(&tar)
                    .map_err(|e| format!("writing {}: {e}", tar.display()))?;
                let mut w = std::io::BufWriter::new(f);
                crate::layer::write_tar(entries, mtime, &mut w, &Step::none())
                    .map_err(|e| e.to_string())?;
                std::io::Write::flush(&mut w).map_err(|e| e.to_string())?;
                tar
            }
        };
        let dir = spool.join(format!("lower-{i}"));
        unpack(&tar, &dir, None, spool)?;
        dirs[i] = Some(dir.clone());
        out.push(dir);
    }
    if out.is_empty() {
        // FROM scratch: overlay needs one lower directory.
        let empty = spool.join("empty");
        std::fs::create_dir_all(&empty).map_err(|e| format!("{}: {e}", empty.display()))?;
        out.push(empty);
    }
    out.reverse();
    Ok(out)
}

/// Parses one `RUN --mount=…` into a sandbox mount; `context_dir` and the
/// secrets are where binds and secrets come from.
pub fn parse_mount(
    value: &str,
    context_dir: &Path,
    secrets: &BTreeMap<String, PathBuf>,
) -> Result<Option<(Mount, Option<std::fs::File>)>, String> {
    let mut kv: BTreeMap<String, String> = BTreeMap::new();
    for part in value.split(',') {
        let (k, v) = part.split_once('=').unwrap_or((part, "true"));
        kv.insert(k.trim().to_string(), v.trim().to_string());
    }
    let kind = kv.get("type").map_or("bind", String::as_str).to_string();
    let target = kv
        .get("target")
        .or_else(|| kv.get("dst"))
        .or_else(|| kv.get("destination"))
        .cloned();
    let need_target = || {
        target
            .clone()
            .ok_or_else(|| format!("--mount={value}: type={kind} needs target=PATH"))
    };
    match kind.as_str() {
        "cache" => {
            let target = need_target()?;
            let id = kv.get("id").cloned().unwrap_or_else(|| target.clone());
            let sharing = kv.get("sharing").map_or("shared", String::as_str);
            if !matches!(sharing, "shared" | "locked" | "private") {
                return Err(format!(
                    "--mount={value}: sharing={sharing}: expected shared, locked or private"
                ));
            }
            let key = crate::Digest::of(id.as_bytes());
            let caches = crate::cache_dir().join("run-cache");
            // Private: a root RUN may leave a setuid root binary in a cache.
            crate::fsx::create_private_dir(&caches)
                .map_err(|e| format!("{}: {e}", caches.display()))?;
            let dir = caches.join(&key.hex()[..32]);
            std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            // locked (and private, which kiln treats alike): one build at a time.
            let lock = if sharing == "shared" {
                None
            } else {
                let f = std::fs::File::create(dir.with_extension("lock"))
                    .map_err(|e| format!("{}: {e}", dir.display()))?;
                rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
                    .map_err(|e| format!("locking the cache {id}: {e}"))?;
                Some(f)
            };
            Ok(Some((
                Mount::Bind {
                    root: dir,
                    rel: String::new(),
                    target,
                    readonly: false,
                },
                lock,
            )))
        }
        "bind" => {
            let target = need_target()?;
            let source = kv
                .get("source")
                .or_else(|| kv.get("src"))
                .cloned()
                .unwrap_or_default();
            if kv.contains_key("from") {
                // Another stage's or image's files: resolved in the sandbox.
                return Err(format!("--mount={value}: from= is handled by the stage"));
            }
            let rel = String::from_utf8_lossy(&crate::dockerfile::ignore::clean(source.as_bytes()))
                .into_owned();
            // Beneath the context, with no link followed (as COPY): a link
            // would reach the host's files.
            let what = if source.is_empty() { "." } else { &source };
            if !rel.is_empty() {
                let ctx = crate::fsx::DirFd::open(context_dir)
                    .map_err(|e| format!("--mount={value}: {}: {e}", context_dir.display()))?;
                ctx.open_path(&rel).map_err(|e| match e.kind() {
                    std::io::ErrorKind::NotFound => format!(
                        "--mount={value}: {what} does not exist in the build context"
                    ),
                    _ => format!("--mount={value}: source {what}: {e}; kiln binds only files and directories of the context, never through a link"),
                })?;
            }
            let rw = kv.get("rw").or_else(|| kv.get("readwrite")).is_some();
            if rw {
                return Err(format!("--mount={value}: read-write bind mounts are not supported (kiln binds read-only, so the build cannot change its inputs)"));
            }
            Ok(Some((
                Mount::Bind {
                    root: context_dir.to_path_buf(),
                    rel,
                    target,
                    readonly: true,
                },
                None,
            )))
        }
        "secret" => {
            let id = kv
                .get("id")
                .cloned()
                .or_else(|| {
                    target
                        .as_ref()
                        .and_then(|t| t.rsplit('/').next().map(String::from))
                })
                .ok_or_else(|| format!("--mount={value}: type=secret needs id=ID"))?;
            let target = target.unwrap_or_else(|| format!("/run/secrets/{id}"));
            let required = kv.get("required").is_some_and(|v| v == "true");
            match secrets.get(&id) {
                Some(src) => Ok(Some((
                    Mount::Bind {
                        root: src.clone(),
                        rel: String::new(),
                        target,
                        readonly: true,
                    },
                    None,
                ))),
                None if required => Err(format!(
                    "--mount={value}: no secret {id}; give it with kiln build --secret id={id},src=FILE"
                )),
                // As BuildKit: a missing optional secret is simply absent.
                None => Ok(None),
            }
        }
        "tmpfs" => Ok(Some((
            Mount::Tmpfs {
                target: need_target()?,
            },
            None,
        ))),
        "ssh" => Err(format!(
            "--mount={value}: type=ssh is not supported; use a secret mount"
        )),
        other => Err(format!(
            "--mount={value}: unknown type={other} (bind, cache, secret and tmpfs are supported)"
        )),
    }
}

/// `/etc/hosts`, `/etc/hostname` and `/etc/resolv.conf` for the sandbox, as
/// copies in the spool (a command's edits stay there, never in a layer).
pub fn etc_files(
    spool: &Path,
    n: usize,
    network: Network,
) -> Result<Vec<(String, PathBuf)>, String> {
    let dir = spool.join(format!("etc-{n}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let resolv = match network {
        Network::Host => std::fs::read("/etc/resolv.conf").unwrap_or_default(),
        Network::None => Vec::new(),
    };
    let files = [
        (
            "hosts",
            b"127.0.0.1\tlocalhost kiln\n::1\tlocalhost ip6-localhost ip6-loopback\n".to_vec(),
        ),
        ("hostname", b"kiln\n".to_vec()),
        ("resolv.conf", resolv),
    ];
    let mut out = Vec::new();
    for (name, bytes) in files {
        let p = dir.join(name);
        std::fs::write(&p, bytes).map_err(|e| format!("{}: {e}", p.display()))?;
        out.push((name.to_string(), p));
    }
    Ok(out)
}

/// A user's supplementary groups from an `/etc/group` text, as Docker
/// computes them: the primary group, then the groups that list the user's
/// name as a member. A user without a name (a numeric USER with no passwd
/// entry, or root without one) is a member of nothing more; an empty
/// member list names no one.
pub fn supplementary_groups(group: &str, user: &str, primary: u32) -> Vec<u32> {
    let mut out = vec![primary];
    for g in crate::userdb::memberships(group, user) {
        let g = g as u32;
        if !out.contains(&g) {
            out.push(g);
        }
    }
    out
}
