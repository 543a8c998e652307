//! Image trees, the way a Taskcluster repository holds them: every image
//! directory under `taskcluster/docker/`, parents declared in
//! `taskcluster/kinds/docker-image/kind.yml` (`tasks: {name: {parent, args,
//! definition}}`) and used as `FROM $DOCKER_IMAGE_PARENT` with
//! `# %ARG DOCKER_IMAGE_PARENT`, which kiln sets to `<parent>:<parent's
//! context hash>` as gecko's transform does. Images build in dependency
//! order, independent ones in parallel; a parent's result feeds its
//! children straight from the run's own blob directory.
//!
//! Each image goes through the index ([`crate::index`]): its index digest
//! chains its parent's, so an unchanged image is exported from the user
//! store (`up to date`) and a changed parent rebuilds its children.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::assemble::{self as build, BuildOptions, Parent};
use crate::image::Reference;
use crate::index::{self, IndexOptions};
use crate::sink::Format;

/// One image of the tree.
#[derive(Clone, Debug)]
pub struct TreeImage {
    /// The image (task) name.
    pub name: String,
    /// Its directory (`taskcluster/docker/<definition>`).
    pub dir: PathBuf,
    pub parent: Option<String>,
    /// Per-image args from kind.yml (over the command line's).
    pub args: BTreeMap<String, String>,
}

/// What happened to one image, as printed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TreeLine {
    pub name: String,
    pub tag: String,
    pub context_hash: String,
    /// None for an image that failed or was blocked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<crate::Digest>,
    /// The index digest (see the module docs).
    pub digest: String,
    /// `built`, `up to date`, or with `--keep-going` `failed` or `blocked`.
    pub status: String,
    pub seconds: f64,
    pub output: PathBuf,
    /// Why it failed, or which image's failure blocked it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl TreeLine {
    /// An image that was not built: `failed` (with its error) or
    /// `blocked` (by a parent that was not built).
    fn not_built(img: &TreeImage, status: &str, error: String) -> TreeLine {
        TreeLine {
            name: img.name.clone(),
            tag: tree_tag(img),
            context_hash: String::new(),
            manifest_digest: None,
            digest: String::new(),
            status: status.into(),
            seconds: 0.0,
            output: PathBuf::new(),
            error: Some(error),
        }
    }

    /// Whether the image is there (built or up to date).
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Errors of a tree build.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {message}", path.display())]
    Input { path: PathBuf, message: String },
    #[error("{message}")]
    Graph { message: String },
    #[error("image {name}: {source}")]
    Build {
        name: String,
        source: Box<index::Error>,
    },
}

/// kind.yml's path and its tasks by name.
type KindYml = (PathBuf, BTreeMap<String, TaskDecl>);

fn kind_yml(topsrcdir: &Path) -> Result<Option<KindYml>, Error> {
    for rel in [
        "taskcluster/kinds/docker-image/kind.yml",
        "taskcluster/ci/docker-image/kind.yml",
    ] {
        let path = topsrcdir.join(rel);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let bad = |message: String| Error::Input {
            path: path.clone(),
            message,
        };
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&text).map_err(|e| bad(format!("not valid YAML: {e}")))?;
        let tasks = doc
            .get("tasks")
            .or_else(|| doc.get("jobs"))
            .cloned()
            .unwrap_or(serde_yaml_ng::Value::Null);
        let mut out = BTreeMap::new();
        let Some(map) = tasks.as_mapping() else {
            return Ok(Some((path, out)));
        };
        for (k, v) in map {
            let name = k
                .as_str()
                .ok_or_else(|| bad("a task name under `tasks` is not a string".into()))?
                .to_string();
            let text_of = |key: &str| -> Result<Option<String>, Error> {
                match v.get(key) {
                    None | Some(serde_yaml_ng::Value::Null) => Ok(None),
                    Some(serde_yaml_ng::Value::String(s)) => Ok(Some(s.clone())),
                    Some(other) => Err(bad(format!(
                        "tasks.{name}.{key}: expected a string, got {other:?}"
                    ))),
                }
            };
            let mut args = BTreeMap::new();
            if let Some(a) = v.get("args").and_then(|a| a.as_mapping()) {
                for (ak, av) in a {
                    let ak = ak.as_str().unwrap_or_default().to_string();
                    let av = match av {
                        serde_yaml_ng::Value::String(s) => s.clone(),
                        serde_yaml_ng::Value::Number(n) => n.to_string(),
                        serde_yaml_ng::Value::Bool(b) => {
                            if *b { "True" } else { "False" }.to_string()
                        }
                        other => {
                            return Err(bad(format!(
                                "tasks.{name}.args.{ak}: expected a string, got {other:?}"
                            )))
                        }
                    };
                    args.insert(ak, av);
                }
            }
            out.insert(
                name.clone(),
                TaskDecl {
                    parent: text_of("parent")?,
                    definition: text_of("definition")?.unwrap_or(name),
                    args,
                },
            );
        }
        return Ok(Some((path, out)));
    }
    Ok(None)
}

struct TaskDecl {
    parent: Option<String>,
    definition: String,
    args: BTreeMap<String, String>,
}

/// The image directories named by `inputs`: each one holding a Dockerfile,
/// or each subdirectory (sorted) of one that does not.
fn image_dirs(inputs: &[PathBuf]) -> Result<Vec<PathBuf>, Error> {
    let mut out = Vec::new();
    for i in inputs {
        if i.join("Dockerfile").is_file() {
            out.push(i.clone());
            continue;
        }
        let rd = std::fs::read_dir(i).map_err(|e| Error::Input {
            path: i.clone(),
            message: format!("not a readable directory: {e}"),
        })?;
        let mut dirs: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("Dockerfile").is_file())
            .collect();
        if dirs.is_empty() {
            return Err(Error::Input {
                path: i.clone(),
                message: "holds no Dockerfile and no image directories (subdirectories with a Dockerfile)".into(),
            });
        }
        dirs.sort();
        out.extend(dirs);
    }
    Ok(out)
}

/// The base image a Dockerfile names directly (first FROM), if it is
/// another image of the tree by name (`FROM base` or `FROM base:TAG`).
fn direct_parent(dir: &Path, names: &BTreeSet<String>) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("Dockerfile")).ok()?;
    let df = crate::dockerfile::parse(&text).ok()?;
    let image = df.instructions.iter().find_map(|i| match &i.kind {
        crate::dockerfile::Kind::From { image, .. } => Some(image.clone()),
        _ => None,
    })?;
    let r = Reference::parse(&image).ok()?;
    let short = r.repository.rsplit('/').next()?.to_string();
    names.contains(&short).then_some(short)
}

/// Finds the images of a tree and their parents.
pub fn discover(inputs: &[PathBuf], topsrcdir: &Path) -> Result<Vec<TreeImage>, Error> {
    let dirs = image_dirs(inputs)?;
    let by_dir_name = |d: &Path| build::image_name(d);
    let mut images: Vec<TreeImage> = Vec::new();
    match kind_yml(topsrcdir)? {
        Some((path, tasks)) => {
            let mut covered = BTreeSet::new();
            for (name, t) in &tasks {
                let Some(dir) = dirs.iter().find(|d| by_dir_name(d) == t.definition) else {
                    continue;
                };
                covered.insert(dir.clone());
                images.push(TreeImage {
                    name: name.clone(),
                    dir: dir.clone(),
                    parent: t.parent.clone(),
                    args: t.args.clone(),
                });
            }
            for d in &dirs {
                if !covered.contains(d) {
                    images.push(TreeImage {
                        name: by_dir_name(d),
                        dir: d.clone(),
                        parent: None,
                        args: BTreeMap::new(),
                    });
                }
            }
            for i in &images {
                if let Some(p) = &i.parent {
                    if !images.iter().any(|x| &x.name == p) {
                        return Err(Error::Graph {
                            message: format!(
                                "image {}: its parent {p} (declared in {}) is not among the images being built; add taskcluster/docker/{p} or build it too",
                                i.name,
                                path.display()
                            ),
                        });
                    }
                }
            }
        }
        None => {
            let names: BTreeSet<String> = dirs.iter().map(|d| by_dir_name(d)).collect();
            for d in &dirs {
                let name = by_dir_name(d);
                let parent = direct_parent(d, &names).filter(|p| *p != name);
                images.push(TreeImage {
                    name,
                    dir: d.clone(),
                    parent,
                    args: BTreeMap::new(),
                });
            }
        }
    }
    images.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(images)
}

/// Orders images in levels: each level's parents are all in earlier levels.
pub fn levels(images: &[TreeImage]) -> Result<Vec<Vec<usize>>, Error> {
    let index: BTreeMap<&str, usize> = images
        .iter()
        .enumerate()
        .map(|(i, m)| (m.name.as_str(), i))
        .collect();
    let mut depth: Vec<Option<usize>> = vec![None; images.len()];
    for start in 0..images.len() {
        let mut chain = vec![start];
        let mut cur = start;
        while depth[cur].is_none() {
            let Some(p) = &images[cur].parent else { break };
            let Some(&pi) = index.get(p.as_str()) else {
                return Err(Error::Graph {
                    message: format!(
                        "image {}: its parent {p} is not among the images being built",
                        images[cur].name
                    ),
                });
            };
            if let Some(pos) = chain.iter().position(|&c| c == pi) {
                let mut names: Vec<&str> = chain[pos..]
                    .iter()
                    .map(|&c| images[c].name.as_str())
                    .collect();
                names.push(&images[pi].name);
                return Err(Error::Graph {
                    message: format!("the images' parents form a cycle: {}", names.join(" -> ")),
                });
            }
            chain.push(pi);
            cur = pi;
        }
        // Assign depths from the known end of the chain back to the start.
        let mut d = match depth[cur] {
            Some(d) => d,
            None => {
                depth[cur] = Some(0);
                0
            }
        };
        for &c in chain.iter().rev().skip(1) {
            d += 1;
            depth[c] = Some(d);
        }
    }
    let max = depth.iter().flatten().copied().max().unwrap_or(0);
    let mut out = vec![Vec::new(); max + 1];
    for (i, d) in depth.iter().enumerate() {
        out[d.unwrap_or(0)].push(i);
    }
    Ok(out)
}

/// The file extension (or directory) an output format implies.
pub fn output_name(name: &str, format: Format) -> String {
    format.file_name(name)
}

/// Splits `name[:tag]` into the repository and tag (`latest` by default).
fn split_tag(reference: &str) -> (&str, &str) {
    let last = reference.rfind('/').map_or(0, |i| i + 1);
    match reference[last..].rfind(':') {
        Some(i) => (&reference[..last + i], &reference[last + i + 1..]),
        None => (reference, "latest"),
    }
}

/// The default tag of a tree image: `<REGISTRY>/<name>:<VERSION>` from its directory.
fn tree_tag(img: &TreeImage) -> String {
    let dir_tag = build::default_tag(&img.dir);
    let (repo, tag) = split_tag(&dir_tag);
    let repo = match repo.rfind('/') {
        Some(i) => format!("{}/{}", &repo[..i], img.name),
        None => img.name.clone(),
    };
    format!("{repo}:{tag}")
}

/// The images whose Dockerfile takes a base from outside the tree that no
/// store has (and that nothing will fetch: no `--pull`), with why: every
/// image is planned before the first is built, from its Dockerfile alone.
fn unresolved(images: &[TreeImage], template: &BuildOptions) -> BTreeMap<usize, String> {
    // Images of the tree, by repository (children name them as
    // `name:context-hash`, by tag, or by bare name).
    let tree: BTreeSet<String> = images
        .iter()
        .flat_map(|img| [img.name.clone(), tree_tag(img)])
        .filter_map(|r| Reference::parse(&r).ok().map(|r| r.repository))
        .collect();
    let found: Vec<Option<String>> = images
        .par_iter()
        .map(|img| {
            let path = img.dir.join("Dockerfile");
            let text = std::fs::read_to_string(&path).ok()?;
            let opts = image_options(img, template, |_| "planned");
            let missing: Vec<String> = build::unresolved_bases(&text, &opts)
                .into_iter()
                .filter(|(_, r)| {
                    Reference::parse(r).map_or(true, |r| !tree.contains(&r.repository))
                })
                .map(|(line, r)| format!("{}:{line}: {r} is in no store", path.display()))
                .collect();
            (!missing.is_empty()).then(|| missing.join("; "))
        })
        .collect();
    found
        .into_iter()
        .enumerate()
        .filter_map(|(i, m)| Some((i, m?)))
        .collect()
}

/// The images that descend from `roots` (their children, theirs, …), by name.
fn descendants(images: &[TreeImage], roots: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    loop {
        let more: Vec<String> = images
            .iter()
            .filter(|img| !out.contains(&img.name) && !roots.contains(&img.name))
            .filter(|img| {
                img.parent
                    .as_ref()
                    .is_some_and(|p| roots.contains(p) || out.contains(p))
            })
            .map(|img| img.name.clone())
            .collect();
        if more.is_empty() {
            return out;
        }
        out.extend(more);
    }
}

/// Builds every image, parents first, printing a line per image through `report`.
///
/// Every image is planned first: a base that no store has fails the run
/// before anything is built, naming every image it would block; with
/// `keep_going` the image is `failed` from the start, its descendants are
/// `blocked`, and the others are built.
pub fn build_all(
    images: &[TreeImage],
    template: &BuildOptions,
    index: &IndexOptions,
    out_dir: &Path,
    report: &(dyn Fn(&TreeLine) + Sync),
    keep_going: bool,
) -> Result<Vec<TreeLine>, Error> {
    let order = levels(images)?;
    let unresolved = unresolved(images, template);
    let roots: BTreeSet<String> = unresolved.keys().map(|&i| images[i].name.clone()).collect();
    let blocked = descendants(images, &roots);
    if !unresolved.is_empty() && !keep_going {
        let why: Vec<String> = unresolved
            .iter()
            .map(|(&i, m)| format!("image {}: {m}", images[i].name))
            .collect();
        let mut stopped: Vec<&str> = roots.iter().map(String::as_str).collect();
        stopped.extend(blocked.iter().map(String::as_str));
        return Err(Error::Graph {
            message: format!(
                "nothing was built: {}. These images cannot be built: {}. Put the missing bases into a store (kiln store add FILE, kiln pull REFERENCE), build with --pull, or give --keep-going to build the others",
                why.join("; "),
                stopped.join(", ")
            ),
        });
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::Input {
        path: out_dir.to_path_buf(),
        message: format!("creating the output directory: {e}"),
    })?;
    // name → the image, for its children
    let mut done: BTreeMap<String, Parent> = BTreeMap::new();
    let mut lines: Vec<TreeLine> = Vec::new();
    for (&i, m) in &unresolved {
        let line = TreeLine::not_built(&images[i], "failed", m.clone());
        report(&line);
        lines.push(line);
    }
    for level in order {
        let level: Vec<usize> = level
            .into_iter()
            .filter(|i| !unresolved.contains_key(i))
            .collect();
        // Children find a parent as `$DOCKER_IMAGE_PARENT` (name:context-hash),
        // by its tag, or by its bare name.
        let mut parents = BTreeMap::new();
        for line in lines.iter().filter(|l| l.ok()) {
            let img = &done[&line.name];
            for r in [
                format!("{}:{}", line.name, line.context_hash),
                line.tag.clone(),
                line.name.clone(),
            ] {
                if let Ok(r) = Reference::parse(&r) {
                    parents.insert(r.name(), img.clone());
                }
            }
        }
        let parents = Arc::new(parents);
        let hashes: BTreeMap<&str, &str> = lines
            .iter()
            .filter(|l| l.ok())
            .map(|l| (l.name.as_str(), l.context_hash.as_str()))
            .collect();
        // With --keep-going, an image whose parent was not built is blocked.
        let not_built: BTreeMap<&str, &str> = lines
            .iter()
            .filter(|l| !l.ok())
            .map(|l| (l.name.as_str(), l.status.as_str()))
            .collect();
        let blocked_by = |img: &TreeImage| {
            img.parent
                .as_deref()
                .filter(|p| not_built.contains_key(p))
                .map(str::to_string)
        };
        let results: Vec<Result<(TreeLine, Parent), Error>> = level
            .par_iter()
            .filter(|&&i| blocked_by(&images[i]).is_none())
            .map(|&i| build_one(&images[i], template, index, out_dir, &hashes, &parents))
            .collect();
        let mut results = results.into_iter();
        let mut new_lines = Vec::new();
        for &i in &level {
            let img = &images[i];
            if let Some(p) = blocked_by(img) {
                let line =
                    TreeLine::not_built(img, "blocked", format!("its parent {p} was not built"));
                report(&line);
                new_lines.push(line);
                continue;
            }
            match results.next().expect("one result per image built") {
                Ok((line, built)) => {
                    report(&line);
                    done.insert(img.name.clone(), built);
                    new_lines.push(line);
                }
                Err(e) if keep_going => {
                    let line = TreeLine::not_built(img, "failed", e.to_string());
                    report(&line);
                    new_lines.push(line);
                }
                Err(e) => return Err(e),
            }
        }
        lines.extend(new_lines);
    }
    Ok(lines)
}

/// An image's build options: the command line's, its kind.yml args over
/// them, and `DOCKER_IMAGE_PARENT` as `<parent>:<parent_hash(parent)>`. As
/// taskgraph's image builder (kaniko's rule): build arguments, the parent
/// among them, reach FROM with no ARG (`FROM $DOCKER_IMAGE_PARENT`).
fn image_options<'a>(
    img: &'a TreeImage,
    template: &BuildOptions,
    parent_hash: impl FnOnce(&'a str) -> &'a str,
) -> BuildOptions {
    let mut opts = template.clone();
    opts.context.args.extend(img.args.clone());
    opts.args_in_from = true;
    if let Some(p) = &img.parent {
        let v = format!("{p}:{}", parent_hash(p));
        opts.context.args.insert("DOCKER_IMAGE_PARENT".into(), v);
    }
    opts
}

fn build_one(
    img: &TreeImage,
    template: &BuildOptions,
    index: &IndexOptions,
    out_dir: &Path,
    hashes: &BTreeMap<&str, &str>,
    parents: &Arc<BTreeMap<String, Parent>>,
) -> Result<(TreeLine, Parent), Error> {
    let start = Instant::now();
    let mut opts = image_options(img, template, |p| hashes[p]);
    opts.parents = parents.clone();
    opts.tags = vec![tree_tag(img)];
    opts.output = out_dir.join(output_name(&img.name, opts.format));
    // Images build side by side: their one-line reports are the progress.
    opts.progress = crate::progress::Progress::new(crate::progress::Mode::Never);
    let io = IndexOptions {
        name: img.name.clone(),
        ..index.clone()
    };
    let c = index::build_cached(&img.dir, &opts, &io, None).map_err(|e| Error::Build {
        name: img.name.clone(),
        source: Box::new(e),
    })?;
    let line = TreeLine {
        name: img.name.clone(),
        tag: opts.tags[0].clone(),
        context_hash: c.result.context_hash,
        manifest_digest: Some(c.result.manifest_digest),
        digest: c.index_digest,
        status: c.result.status,
        seconds: start.elapsed().as_secs_f64(),
        output: opts.output.clone(),
        error: None,
    };
    Ok((line, c.parent))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(name: &str, parent: Option<&str>) -> TreeImage {
        TreeImage {
            name: name.into(),
            dir: PathBuf::from(name),
            parent: parent.map(str::to_string),
            args: BTreeMap::new(),
        }
    }

    #[test]
    fn levels_put_parents_first_and_find_cycles() {
        let imgs = vec![
            img("child", Some("parent")),
            img("base", None),
            img("parent", Some("base")),
        ];
        let l = levels(&imgs).unwrap();
        assert_eq!(l, vec![vec![1], vec![2], vec![0]]);
        let cyc = vec![img("a", Some("b")), img("b", Some("a"))];
        let e = levels(&cyc).unwrap_err().to_string();
        assert_eq!(e, "the images' parents form a cycle: a -> b -> a");
        let missing = vec![img("a", Some("zz"))];
        assert!(levels(&missing)
            .unwrap_err()
            .to_string()
            .contains("parent zz"));
    }
}
