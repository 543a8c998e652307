//! Runs the stages the plan's analysis ([`super::analysis`]) says the
//! target needs: each stage's base (scratch, an earlier stage, or an image
//! the plan resolved: [`base`]), then its instructions: ARG/ENV scopes, Docker's word
//! expansion, a layer for each COPY/ADD, each WORKDIR that creates a
//! directory and each RUN ([`run_step`]), every layer step looked up in the
//! step cache first ([`cache`]), and the image config and history merged
//! onto the base's.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use super::analysis::{declare_args, Earlier};
use super::config::{expose_ports, healthcheck};
use super::copy::{self, ContextView, CopyOptions, Src, Tree};
use super::fs::ImageFs;
use super::plan::{Bases, Plan};
use super::BuildOptions;
use crate::dockerfile::expand::{expand_vars_only, expand_word, split_words, Vars};
use crate::dockerfile::{CommandForm, CopySource, CopySpec, Instr, Kind};
use crate::image::{
    host_platform, rfc3339, Descriptor, Digest, Empty, History, ImageConfig, RunConfig,
};
use crate::layer::{Content, Entries, FileSource, LayerEntry, Planned as Layer};

mod base;
mod cache;
mod run_step;

/// Docker's default PATH, set on images whose base has none (as BuildKit does).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A stage failure, at an instruction or for the whole file.
#[derive(Debug)]
pub enum StageError {
    At {
        line: usize,
        text: String,
        message: String,
    },
    Whole(String),
}

/// The result of running a stage: the base layers it passes through, its
/// own layers' entries, its config (whose diff_ids are the base's), and
/// its filesystem (for stages that others copy from).
#[derive(Clone)]
pub struct Planned {
    pub base: Vec<(Descriptor, PathBuf)>,
    pub layers: Vec<Layer>,
    /// Each own layer's unpacked directory, once a RUN needed it (a RUN's
    /// is its upper directory).
    pub dirs: Vec<Option<PathBuf>>,
    pub config: ImageConfig,
    pub fs: ImageFs,
    /// The step cache key of the last layer (the next step's parent).
    pub chain: String,
    /// For each own layer a step made fresh: its key and instruction, to
    /// record once the layer is stored.
    pub keys: Vec<Option<(String, String)>>,
    /// Every layer-producing step, hit or not.
    pub reports: Vec<crate::steps::StepReport>,
    /// Layers other stages made fresh (key, instruction): written and
    /// recorded in the step cache, not part of the image.
    pub side: Vec<(Layer, String, String)>,
}

struct State<'a> {
    view: &'a ContextView<'a>,
    earlier: Earlier<'a>,
    /// Images named by `COPY --from=IMAGE`, loaded once.
    from_images: HashMap<String, ImageFs>,
    base: Vec<(Descriptor, PathBuf)>,
    diff_ids: Vec<Digest>,
    os: String,
    architecture: String,
    variant: Option<String>,
    opts: &'a BuildOptions,
    bases: &'a Bases,
    escape: char,
    args: Vars,
    env: Vec<(String, String)>,
    run: RunConfig,
    shell: Vec<String>,
    workdir: String,
    user: String,
    cmd_set: bool,
    author: Option<String>,
    fs: ImageFs,
    layers: Vec<Layer>,
    dirs: Vec<Option<PathBuf>>,
    /// The diff_ids of the base layers (the config's grow with own layers).
    base_diff_ids: Vec<Digest>,
    chain: String,
    /// A step missed the cache: every later one runs (as in Docker).
    missed: bool,
    keys: Vec<Option<(String, String)>>,
    reports: Vec<crate::steps::StepReport>,
    /// Context files' kiln-v1 digests, by path (built on first need).
    digests: Option<HashMap<PathBuf, [u8; 32]>>,
    history: Vec<History>,
    created: String,
    /// The build's spool (every stage's spool is under it).
    work: &'a Path,
    /// This stage's own spool directory.
    spool: &'a Path,
}

/// Runs the target stage of the plan and the stages it needs: each stage
/// once the stages it depends on are built (the analysis's `deps`), up to
/// `--jobs` stages at a time, so independent builder stages run side by
/// side. Each stage has its own spool directory; what a stage sees of
/// others is only what it depends on, so the result never depends on the
/// order in which stages finish. On a failure no further stage starts,
/// the running ones finish, and the error of the earliest failed stage is
/// returned.
pub fn run(plan: &Plan, opts: &BuildOptions, spool: &Path) -> Result<Planned, StageError> {
    let a = &plan.analysis;
    let view = ContextView::new(&plan.context);
    let jobs = rayon::current_num_threads().max(1);
    let mut pending: Vec<usize> = (0..=a.target).filter(|&n| a.needed[n]).collect();
    let mut done: Vec<Option<std::sync::Arc<Planned>>> = vec![None; a.target + 1];
    let mut failed: Vec<(usize, StageError)> = Vec::new();
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut running = 0;
        loop {
            while failed.is_empty() && running < jobs {
                let Some(i) = pending
                    .iter()
                    .position(|&n| a.deps[n].iter().all(|&d| done[d].is_some()))
                else {
                    break;
                };
                let n = pending.remove(i);
                let earlier = Earlier {
                    defs: &a.defs,
                    done: (0..n)
                        .map(|j| done[j].clone().filter(|_| a.deps[n].contains(&j)))
                        .collect(),
                };
                let (tx, view) = (tx.clone(), &view);
                let stage_spool = spool.join(format!("stage-{n}"));
                running += 1;
                scope.spawn(move || {
                    let r = run_stage(plan, opts, view, earlier, n, spool, &stage_spool);
                    let _ = tx.send((n, r));
                });
            }
            if running == 0 {
                break;
            }
            let (n, r) = rx.recv().expect("a stage thread reports");
            running -= 1;
            match r {
                Ok(p) => done[n] = Some(std::sync::Arc::new(p)),
                Err(e) => failed.push((n, e)),
            }
        }
    });
    if let Some(i) = (0..failed.len()).min_by_key(|&i| failed[i].0) {
        return Err(failed.swap_remove(i).1);
    }
    assert!(pending.is_empty(), "every needed stage ran");
    let mut done: Vec<Option<Planned>> = done
        .into_iter()
        .map(|p| p.map(|p| std::sync::Arc::try_unwrap(p).unwrap_or_else(|p| (*p).clone())))
        .collect();
    let mut target = done.pop().flatten().expect("the target stage was built");
    // `--label`: over the Dockerfile's LABELs, on the image (BuildKit's order).
    if !opts.labels.is_empty() {
        target
            .config
            .config
            .labels
            .get_or_insert_with(BTreeMap::new)
            .extend(opts.labels.clone());
    }
    // Steps of the other stages (a builder stage COPY --from reads) are
    // recorded too, and reported first; the target's own come after.
    let own: std::collections::HashSet<String> =
        target.reports.iter().map(|r| r.key.clone()).collect();
    let mut reports = Vec::new();
    for stage in done.into_iter().flatten() {
        for (layer, key) in stage.layers.into_iter().zip(stage.keys) {
            if let Some((k, instruction)) = key {
                if !own.contains(&k) && !target.side.iter().any(|s| s.1 == k) {
                    target.side.push((layer, k, instruction));
                }
            }
        }
        reports.extend(stage.reports.into_iter().filter(|r| !own.contains(&r.key)));
    }
    reports.dedup_by(|a, b| a.key == b.key);
    reports.append(&mut target.reports);
    target.reports = reports;
    Ok(target)
}

/// Runs stage `n`, whose dependencies `earlier` holds.
fn run_stage(
    plan: &Plan,
    opts: &BuildOptions,
    view: &ContextView<'_>,
    earlier: Earlier<'_>,
    n: usize,
    work: &Path,
    spool: &Path,
) -> Result<Planned, StageError> {
    let df = &plan.dockerfile;
    let a = &plan.analysis;
    let d = &a.defs[n];
    let mut st = State::new(view, earlier, opts, &plan.bases, df.escape, work, spool);
    st.fs.keep_all = a.keep_all[n];
    let from = &df.instructions[d.start];
    let makes_layers = df.instructions[d.start + 1..d.end].iter().any(|i| {
        matches!(
            i.kind,
            Kind::Copy(_) | Kind::Add(_) | Kind::Workdir(_) | Kind::Run(_)
        )
    });
    st.from(from, &a.global, makes_layers || a.keep_all[n])?;
    for ins in &df.instructions[d.start + 1..d.end] {
        st.instruction(ins, &a.global).map_err(|m| at(ins, m))?;
    }
    Ok(st.finish())
}

pub(super) fn at(ins: &Instr, message: String) -> StageError {
    StageError::At {
        line: ins.line,
        text: ins.text.clone(),
        message,
    }
}

impl<'a> State<'a> {
    fn vars(&self) -> Vars {
        let mut v = self.args.clone();
        for (k, val) in &self.env {
            v.insert(k.clone(), val.clone());
        }
        v
    }

    fn expand(&self, word: &str) -> Result<String, String> {
        expand_word(word, &self.vars(), self.escape).map_err(|e| e.0)
    }

    fn new(
        view: &'a ContextView<'a>,
        earlier: Earlier<'a>,
        opts: &'a BuildOptions,
        bases: &'a Bases,
        escape: char,
        work: &'a Path,
        spool: &'a Path,
    ) -> State<'a> {
        let p = host_platform();
        State {
            view,
            earlier,
            from_images: HashMap::new(),
            base: Vec::new(),
            diff_ids: Vec::new(),
            os: p.os,
            architecture: p.architecture,
            variant: p.variant,
            opts,
            bases,
            escape,
            args: Vars::new(),
            env: vec![("PATH".into(), DEFAULT_PATH.into())],
            run: RunConfig::default(),
            shell: vec!["/bin/sh".into(), "-c".into()],
            workdir: "/".into(),
            user: String::new(),
            cmd_set: false,
            author: None,
            fs: ImageFs::default(),
            layers: Vec::new(),
            dirs: Vec::new(),
            base_diff_ids: Vec::new(),
            chain: "scratch".into(),
            missed: false,
            keys: Vec::new(),
            reports: Vec::new(),
            digests: None,
            history: Vec::new(),
            created: rfc3339(opts.timestamp),
            work,
            spool,
        }
    }

    fn history_entry(&mut self, ins: &Instr, empty: bool) {
        self.history_as(ins.text.clone(), empty);
    }

    /// A history entry saying `created_by` (RUN's is the command Docker
    /// records, not the instruction's text).
    fn history_as(&mut self, created_by: String, empty: bool) {
        self.history.push(History {
            created: Some(self.created.clone()),
            created_by: Some(created_by),
            comment: Some("kiln".into()),
            empty_layer: empty,
            extra: Default::default(),
        });
    }

    fn set_env(&mut self, k: String, v: String) {
        match self.env.iter_mut().find(|(key, _)| *key == k) {
            Some(slot) => slot.1 = v,
            None => self.env.push((k, v)),
        }
    }

    fn key_values(&self, text: &str, what: &str) -> Result<Vec<(String, String)>, String> {
        let words = split_words(text, self.escape);
        let Some(first) = words.first() else {
            return Err(format!("{what} needs at least one argument"));
        };
        if !first.contains('=') {
            // Legacy form: KEY value with spaces.
            let rest = text.trim_start()[first.len()..].trim();
            if rest.is_empty() {
                return Err(format!(
                    "{what} {first}: missing value (write {first}=VALUE)"
                ));
            }
            return Ok(vec![(self.expand(first)?, self.expand(rest)?)]);
        }
        let mut out = Vec::new();
        for w in words {
            let expanded = self.expand(&w)?;
            let Some((k, v)) = expanded.split_once('=') else {
                return Err(format!("{what}: {w:?} is not of the form KEY=VALUE"));
            };
            if k.is_empty() {
                return Err(format!("{what}: empty key in {w:?}"));
            }
            out.push((k.to_string(), v.to_string()));
        }
        Ok(out)
    }

    fn command(&self, c: &CommandForm) -> Vec<String> {
        match c {
            CommandForm::Exec(v) => v.clone(),
            CommandForm::Shell(s) => {
                let mut v = self.shell.clone();
                v.push(s.clone());
                v
            }
        }
    }

    fn resolve_ids(&self, spec: &str, what: &str) -> Result<(u64, u64), String> {
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (spec, None),
        };
        if user.is_empty() || group == Some("") {
            return Err(format!("{what}={spec}: expected USER[:GROUP] with numeric ids or names from the image's /etc/passwd and /etc/group"));
        }
        let (uid, primary) = match user.parse::<u64>() {
            Ok(n) => (n, n),
            Err(_) => self.fs.lookup_user(user).ok_or_else(|| {
                format!("{what}={spec}: user {user} is not in the image's /etc/passwd; use a numeric id or COPY an /etc/passwd first")
            })?,
        };
        let gid = match group {
            None => primary,
            Some(g) => match g.parse::<u64>() {
                Ok(n) => n,
                Err(_) => self.fs.lookup_group(g).ok_or_else(|| {
                    format!("{what}={spec}: group {g} is not in the image's /etc/group; use a numeric id or COPY an /etc/group first")
                })?,
            },
        };
        Ok((uid, gid))
    }

    fn instruction(&mut self, ins: &Instr, global: &Vars) -> Result<(), String> {
        match &ins.kind {
            Kind::From { .. } => unreachable!("stages split at FROM"),
            Kind::Arg(text) => {
                let vars = self.vars();
                let mut args = std::mem::take(&mut self.args);
                let r = declare_args(
                    text,
                    &mut args,
                    global,
                    &self.opts.context.args,
                    self.escape,
                    &vars,
                );
                self.args = args;
                r?;
                self.history_entry(ins, true);
            }
            Kind::Env(text) => {
                for (k, v) in self.key_values(text, "ENV")? {
                    self.set_env(k, v);
                }
                self.history_entry(ins, true);
            }
            Kind::Label(text) => {
                let kvs = self.key_values(text, "LABEL")?;
                let labels = self.run.labels.get_or_insert_with(BTreeMap::new);
                labels.extend(kvs);
                self.history_entry(ins, true);
            }
            Kind::Maintainer(name) => {
                self.author = Some(name.clone());
                self.history_entry(ins, true);
            }
            Kind::Workdir(w) => {
                let w = self.expand(w)?;
                if w.is_empty() {
                    return Err("WORKDIR needs a path".into());
                }
                let (path, _) = copy::resolve_dest(&self.workdir, &w);
                self.workdir = format!("/{}", String::from_utf8_lossy(&path));
                self.run.working_dir = Some(self.workdir.clone());
                let path = self.fs.resolve(&path);
                if self.fs.is_dir(&path) {
                    self.history_entry(ins, true);
                } else {
                    let (uid, gid) = if self.user.is_empty() {
                        (0, 0)
                    } else {
                        self.resolve_ids(&self.user, "USER")?
                    };
                    let mut layer = Entries::new();
                    for cur in std::iter::once(&path[..]).chain(copy::parents(&path)) {
                        if !self.fs.is_dir(cur) {
                            layer.insert(cur.to_vec(), LayerEntry::dir(0o755, uid, gid));
                        } else {
                            layer.insert(cur.to_vec(), self.fs.nodes[cur].clone());
                        }
                    }
                    self.push_layer(ins, layer)?;
                }
            }
            Kind::User(u) => {
                let u = self.expand(u)?;
                self.user = u.clone();
                self.run.user = Some(u);
                self.history_entry(ins, true);
            }
            Kind::Cmd(c) => {
                self.run.cmd = Some(self.command(c));
                self.cmd_set = true;
                self.history_entry(ins, true);
            }
            Kind::Entrypoint(c) => {
                self.run.entrypoint = Some(self.command(c));
                if !self.cmd_set {
                    self.run.cmd = None;
                }
                self.history_entry(ins, true);
            }
            Kind::Expose(ports) => {
                let vars = self.vars();
                let mut keys = Vec::new();
                for p in ports {
                    for w in split_words(p, self.escape) {
                        let port = expand_word(&w, &vars, self.escape).map_err(|e| e.0)?;
                        keys.extend(expose_ports(&port)?);
                    }
                }
                let map = self.run.exposed_ports.get_or_insert_with(BTreeMap::new);
                map.extend(keys.into_iter().map(|k| (k, Empty {})));
                self.history_entry(ins, true);
            }
            Kind::Volume(vols) => {
                let vars = self.vars();
                let mut list = Vec::new();
                for v in vols {
                    let v = expand_vars_only(v, &vars, self.escape).map_err(|e| e.0)?;
                    if v.trim().is_empty() {
                        return Err("VOLUME specified can not be an empty string".into());
                    }
                    list.push(v);
                }
                let map = self.run.volumes.get_or_insert_with(BTreeMap::new);
                for v in list {
                    map.insert(v, Empty {});
                }
                self.history_entry(ins, true);
            }
            Kind::Stopsignal(s) => {
                let s = self.expand(s)?;
                self.run.stop_signal = Some(s);
                self.history_entry(ins, true);
            }
            Kind::Healthcheck(h) => {
                self.run.healthcheck = Some(healthcheck(h)?);
                self.history_entry(ins, true);
            }
            Kind::Shell(v) => {
                if v.is_empty() {
                    return Err("SHELL requires a JSON array with at least one element".into());
                }
                self.shell = v.clone();
                self.run.shell = Some(v.clone());
                self.history_entry(ins, true);
            }
            Kind::Onbuild(t) => {
                self.run
                    .on_build
                    .get_or_insert_with(Vec::new)
                    .push(t.clone());
                self.history_entry(ins, true);
            }
            Kind::Run(spec) => self.run_step(ins, spec)?,
            Kind::Unknown => return Err("unknown instruction".into()),
            Kind::Copy(spec) => self.copy(ins, spec, false)?,
            Kind::Add(spec) => self.copy(ins, spec, true)?,
        }
        Ok(())
    }

    /// A COPY, ADD or WORKDIR layer: from the step cache when it holds the
    /// step, else as laid out.
    fn push_layer(&mut self, ins: &Instr, layer: Entries) -> Result<(), String> {
        let described = self.describe(&layer)?;
        let mut key = self.key("layer");
        key.text("instruction", &ins.text)
            .text("entries", &described);
        let key = key.finish();
        if !self.try_cached(ins, &key)? {
            self.fs.apply(&layer);
            self.layers.push(Layer::Entries(layer));
            self.dirs.push(None);
            self.fresh(ins, key);
        }
        self.history_entry(ins, false);
        Ok(())
    }

    fn copy(&mut self, ins: &Instr, spec: &CopySpec, add: bool) -> Result<(), String> {
        let what = if add { "ADD" } else { "COPY" };
        let vars = self.vars();
        let ex = |s: &str| -> Result<String, String> {
            if spec.json {
                expand_vars_only(s, &vars, self.escape).map_err(|e| e.0)
            } else {
                expand_word(s, &vars, self.escape).map_err(|e| e.0)
            }
        };
        let mut opts = CopyOptions {
            policy: self.opts.mode_policy,
            add,
            ..Default::default()
        };
        let mut from: Option<String> = None;
        for (name, value) in &spec.flags {
            let value = value
                .as_deref()
                .map(|v| expand_word(v, &vars, self.escape).map_err(|e| e.0))
                .transpose()?;
            match (name.as_str(), value) {
                ("chown", Some(v)) => opts.chown = Some(self.resolve_ids(&v, "--chown")?),
                ("chmod", Some(v)) => {
                    let mode = u32::from_str_radix(&v, 8)
                        .ok()
                        .filter(|m| *m <= 0o7777)
                        .ok_or_else(|| {
                            format!("--chmod={v}: expected an octal mode between 0 and 7777")
                        })?;
                    opts.chmod = Some(mode);
                }
                ("link", _) => {}
                ("from", Some(v)) if v.is_empty() => {
                    return Err("--from needs a stage or image".into())
                }
                ("from", Some(v)) => from = Some(v),
                ("keep-git-dir", _) | ("checksum", _) if add => {
                    return Err(format!(
                        "--{name} applies to remote ADD sources, and kiln never downloads"
                    ));
                }
                (n, _) => return Err(format!("unknown flag --{n} for {what}")),
            }
        }
        let mut sources = Vec::new();
        for s in &spec.sources {
            sources.push(match s {
                CopySource::Path(p) => Src::Path(ex(p)?),
                CopySource::HereDoc {
                    name,
                    content,
                    expand,
                } => {
                    let content = if *expand {
                        expand_vars_only(content, &vars, self.escape).map_err(|e| e.0)?
                    } else {
                        content.clone()
                    };
                    Src::Bytes {
                        name: name.clone(),
                        content: content.into_bytes(),
                    }
                }
            });
        }
        let dest = ex(&spec.dest)?;
        let (dest_path, slash) = copy::resolve_dest(&self.workdir, &dest);
        let dest_path = self.fs.resolve(&dest_path);
        let spool = self
            .spool
            .join(format!("layer-{}-{}", self.layers.len(), ins.line));
        let label = match &from {
            Some(v) => Some(self.load_copy_source(v)?),
            None => None,
        };
        let src_fs: Option<&ImageFs> = match &from {
            Some(v) => match self.earlier.find(v, true) {
                Some(n) => self.earlier.done[n].as_ref().map(|p| &p.fs),
                None => self.from_images.get(v.as_str()),
            },
            None => None,
        };
        let tree = match (src_fs, &label) {
            (Some(fs), Some(l)) => Tree::Image(fs, l),
            _ => Tree::Context(self.view),
        };
        let planned = copy::plan(tree, &self.fs, &sources, (&dest_path, slash), &opts, &spool)?;
        let mut layer = planned.layer;
        if let (Some(fs), false) = (src_fs, planned.pending.is_empty()) {
            let wanted: Vec<Vec<u8>> = planned.pending.iter().map(|p| p.1.clone()).collect();
            let got = fs.extract(&wanted, &spool).map_err(|e| {
                format!(
                    "reading files out of {}: {e}",
                    label.as_deref().unwrap_or("")
                )
            })?;
            for (target, src) in &planned.pending {
                let file = got.get(src).ok_or_else(|| {
                    format!(
                        "{}: its bytes are not in the layer that lists it; the image is corrupt",
                        String::from_utf8_lossy(src)
                    )
                })?;
                let size = std::fs::metadata(file).map_err(|e| e.to_string())?.len();
                if let Some(e) = layer.get_mut(target) {
                    e.content = Content::File {
                        source: FileSource::Path(std::sync::Arc::from(file.as_path())),
                        size,
                    };
                }
            }
        }
        self.push_layer(ins, layer)?;
        Ok(())
    }

    fn finish(self) -> Planned {
        let mut run = self.run;
        run.env = Some(self.env.iter().map(|(k, v)| format!("{k}={v}")).collect());
        let config = ImageConfig {
            created: Some(self.created.clone()),
            author: self.author,
            architecture: self.architecture,
            os: self.os,
            variant: self.variant,
            config: run,
            rootfs: crate::image::RootFs {
                kind: "layers".into(),
                diff_ids: self.diff_ids,
            },
            history: self.history,
            extra: Default::default(),
        };
        Planned {
            base: self.base,
            layers: self.layers,
            dirs: self.dirs,
            config,
            fs: self.fs,
            chain: self.chain,
            keys: self.keys,
            reports: self.reports,
            side: Vec::new(),
        }
    }

    /// The filesystem `COPY --from=VALUE` reads: an earlier stage (by name
    /// or index), else an image from a parent or the stores.
    fn load_copy_source(&mut self, value: &str) -> Result<String, String> {
        if let Some(n) = self.earlier.find(value, true) {
            if self.earlier.done[n].is_none() {
                return Err(format!("--from={value}: stage {n} was not built (its name is computed from a stage-local ARG, which kiln does not follow)"));
            }
            return Ok(format!("stage {value}"));
        }
        if !self.from_images.contains_key(value) {
            let base = self
                .resolve_image(value, None, true)
                .map_err(|m| self.earlier.not_found("--from=", value, &m))?;
            let mut fs = ImageFs {
                keep_all: true,
                ..Default::default()
            };
            for (d, path) in &base.layers {
                fs.apply_blob(path)
                    .map_err(|e| format!("--from={value}: reading layer {}: {e}", d.digest))?;
            }
            self.from_images.insert(value.to_string(), fs);
        }
        Ok(format!("image {value}"))
    }
}
