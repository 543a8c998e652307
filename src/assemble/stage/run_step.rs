//! RUN: a stage step that runs its command in kiln's sandbox on the
//! stage's filesystem (the lower directories `super::super::run` stacks)
//! and takes the step's upper directory as its layer, or the step cache's.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{Layer, State};
use crate::dockerfile::expand::expand_word;
use crate::dockerfile::{Instr, RunSpec};
use crate::image::Digest;
use crate::sandbox::{self, Network};

impl State<'_> {
    /// What container mode leaves alone in `/`: kiln's binary, its cache,
    /// the build's work directory, the context, the stores, the output
    /// (and, in [`sandbox::container::Keep::new`], every mount point).
    fn container_keep(&self) -> sandbox::container::Keep {
        let mut keep: Vec<PathBuf> = vec![
            crate::cache_dir(),
            self.view.ctx.image_dir.clone(),
            self.view.ctx.topsrcdir.clone(),
            self.opts.output.clone(),
        ];
        // The output's directory whole (other files may lie there).
        keep.extend(self.opts.output.parent().map(|p| p.to_path_buf()));
        keep.extend(self.opts.hash_cache.clone());
        keep.extend(std::env::current_exe().ok());
        // The build's work directory (the spool and its blobs).
        keep.extend(self.work.parent().map(|p| p.to_path_buf()));
        keep.extend(self.opts.stores.list.iter().map(|s| s.dir.clone()));
        keep.extend(self.opts.secrets.values().cloned());
        keep.retain(|p| std::path::absolute(p).is_ok_and(|a| a != std::path::Path::new("/")));
        sandbox::container::Keep::new(&keep)
    }

    /// A step's `RUN --network=MODE` under the build's entitlements: a
    /// build-wide `--network none` binds every step, `default` is the
    /// build's mode, and `host` needs `kiln build --allow network.host`
    /// (BuildKit's entitlement).
    fn step_network(&self, mode: &str) -> Result<Network, String> {
        match mode {
            "default" => Ok(self.opts.network),
            "none" => Ok(Network::None),
            "host" if self.opts.network == Network::None => Err(
                "--network=host: the build runs with --network none, which binds every step; leave out --network none to give steps the network".into(),
            ),
            "host" if !self.opts.allow_network_host => Err(
                "--network=host needs the entitlement: run kiln build --allow network.host (or leave the flag out: steps get the build's network, the host's by default)".into(),
            ),
            "host" => Ok(Network::Host),
            other => Err(format!(
                "--network={other}: expected default, none or host"
            )),
        }
    }

    /// The lower directories of another stage or image, for
    /// `RUN --mount=type=bind,from=…`.
    fn stack_of(&mut self, from: &str) -> Result<Vec<PathBuf>, String> {
        if let Some(n) = self.earlier.find(from, true) {
            let Some(prev) = self.earlier.done[n].as_ref() else {
                return Err(format!("--mount from={from}: stage {n} was not built"));
            };
            let ids: Vec<Digest> = prev.config.rootfs.diff_ids.clone();
            let mut dirs = prev.dirs.clone();
            return crate::assemble::run::lowers(
                &prev.base,
                &ids,
                &prev.layers,
                &mut dirs,
                self.spool,
                self.opts.timestamp,
            );
        }
        let base = self
            .resolve_image(from, None, false)
            .map_err(|m| self.earlier.not_found("--mount from=", from, &m))?;
        crate::assemble::run::lowers(
            &base.layers,
            &base.config.rootfs.diff_ids,
            &[],
            &mut [],
            self.spool,
            self.opts.timestamp,
        )
    }

    /// RUN: the command in kiln's sandbox on this stage's filesystem; its
    /// changes become a layer.
    pub(super) fn run_step(&mut self, ins: &Instr, spec: &RunSpec) -> Result<(), String> {
        let vars = self.vars();
        let mut network = self.opts.network;
        let mut mounts = Vec::new();
        let mut locks = Vec::new();
        let mut stacks: Vec<(String, String, String)> = Vec::new();
        let mut context_binds: Vec<PathBuf> = Vec::new();
        for (name, value) in &spec.flags {
            let v = value
                .as_deref()
                .map(|v| expand_word(v, &vars, self.escape).map_err(|e| e.0))
                .transpose()?
                .unwrap_or_default();
            match name.as_str() {
                "network" => network = self.step_network(&v)?,
                "security" if v == "sandbox" => {}
                "security" => {
                    return Err(format!(
                        "--security={v}: kiln runs every step sandboxed; insecure is not supported"
                    ))
                }
                "mount" => {
                    // Binds from another stage or image need its layers.
                    let kv: BTreeMap<&str, &str> =
                        v.split(',').filter_map(|p| p.split_once('=')).collect();
                    if kv.get("type").map_or(true, |t| *t == "bind") {
                        if let Some(from) = kv.get("from") {
                            let target = kv
                                .get("target")
                                .or_else(|| kv.get("dst"))
                                .ok_or_else(|| format!("--mount={v}: needs target=PATH"))?;
                            let source = kv.get("source").or_else(|| kv.get("src")).unwrap_or(&"");
                            stacks.push((from.to_string(), source.to_string(), target.to_string()));
                            continue;
                        }
                    }
                    let ctx = self.view.ctx.image_dir.clone();
                    if let Some((m, lock)) =
                        crate::assemble::run::parse_mount(&v, &ctx, &self.opts.secrets)?
                    {
                        if kv.get("type").map_or(true, |t| *t == "bind") {
                            if let sandbox::Mount::Bind { root, rel, .. } = &m {
                                context_binds.push(root.join(rel));
                            }
                        }
                        mounts.push(m);
                        locks.extend(lock);
                    }
                }
                other => {
                    return Err(format!(
                        "unknown flag --{other} (RUN takes --mount and --network)"
                    ))
                }
            }
        }
        let stack_sources = stacks.clone();
        for (from, source, target) in stacks {
            let lowers = self.stack_of(&from)?;
            mounts.push(sandbox::Mount::Stack {
                lowers,
                source,
                target,
            });
        }
        let argv = self.command(&spec.command);
        // The environment: ENV, then the stage's ARGs (never in the config).
        let mut env: Vec<(String, String)> = self.env.clone();
        for (k, v) in &self.args {
            if !env.iter().any(|(e, _)| e == k) {
                env.push((k.clone(), v.clone()));
            }
        }
        let (uid, gid) = if self.user.is_empty() {
            (0, 0)
        } else {
            self.resolve_ids(&self.user, "USER")?
        };
        let passwd = self.fs.read_small(b"etc/passwd").unwrap_or_default();
        let passwd = String::from_utf8_lossy(&passwd);
        let group = self.fs.read_small(b"etc/group").unwrap_or_default();
        let entry = crate::userdb::user_by_uid(&passwd, uid);
        // A numeric USER without a group runs with its passwd entry's
        // group, else gid 0, as Docker runs it (COPY --chown=N differs:
        // there the gid is N).
        let gid = match self.user.split_once(':') {
            None if !self.user.is_empty() && self.user.parse::<u64>().is_ok() => {
                entry.as_ref().and_then(|e| e.gid).unwrap_or(0)
            }
            _ => gid,
        };
        // The user's name: as written, else the passwd entry of its uid
        // (root without USER is "root" where the image says so).
        let user_name = match self.user.split(':').next() {
            Some(u) if !u.is_empty() && u.parse::<u64>().is_err() => u.to_string(),
            _ => entry
                .as_ref()
                .map(|e| e.name.to_string())
                .unwrap_or_default(),
        };
        let groups = crate::assemble::run::supplementary_groups(
            &String::from_utf8_lossy(&group),
            &user_name,
            gid as u32,
        );
        for (k, v) in [
            (
                "HOME",
                entry
                    .as_ref()
                    .and_then(|e| e.home)
                    .map(String::from)
                    .unwrap_or_else(|| if uid == 0 { "/root".into() } else { "/".into() }),
            ),
            ("SOURCE_DATE_EPOCH", self.opts.timestamp.to_string()),
        ] {
            if !env.iter().any(|(e, _)| e == k) {
                env.push((k.to_string(), v));
            }
        }
        // The step's key: the common fields, the command, its mounts (ids
        // and targets; a bind's sources by content) and its network.
        let mut key = self.key("run");
        key.text("instruction", &ins.text)
            .list("argv", &argv)
            .text("network", network.name())
            .number("uid", uid)
            .number("gid", gid)
            .list("groups", groups.iter().map(|g| g.to_be_bytes()));
        let mut mount_values = Vec::new();
        for (name, value) in &spec.flags {
            if name == "mount" {
                let v = value
                    .as_deref()
                    .map(|v| expand_word(v, &vars, self.escape).map_err(|e| e.0))
                    .transpose()?
                    .unwrap_or_default();
                mount_values.push(v);
            }
        }
        key.list("mounts", &mount_values);
        // What the binds bring in: context files by content, another
        // stage by its key, an image by its digest (never a secret).
        let mut bind_from = Vec::new();
        for (from, _, _) in &stack_sources {
            bind_from.push(self.source_key(from)?);
        }
        key.list("bind-from", &bind_from);
        let mut binds = Vec::new();
        for src in &context_binds {
            binds.push(self.tree_digest(src)?);
        }
        key.list("binds", &binds);
        let key = key.finish();
        if self.try_cached(ins, &key)? {
            drop(locks);
            self.history_as(format!("RUN {}", argv.join(" ")), false);
            return Ok(());
        }
        let (isolation, why, first) = sandbox::container::choose(self.opts.isolation)?;
        if first {
            self.opts.progress.say(&format!(
                "#{} RUN isolation: {} ({why})",
                self.view.ctx.original_line(ins.line),
                isolation.name()
            ));
        }
        let container = isolation == sandbox::container::Isolation::Container;
        if container && !mounts.is_empty() {
            return Err(format!(
                "RUN --mount needs kiln's sandbox, and RUN runs in container mode here ({why}): drop the --mount, or run kiln where it may create namespaces (on a host, or in a container started with --security-opt seccomp=unconfined --cap-add SYS_ADMIN)"
            ));
        }
        if container && network == Network::None {
            return Err(format!(
                "--network none needs a network namespace, and RUN runs in container mode here ({why}): give the container itself no network (docker run --network none), or run kiln where it may create namespaces"
            ));
        }
        let n = self.layers.len();
        let lowers = crate::assemble::run::lowers(
            &self.base,
            &self.base_diff_ids,
            &self.layers,
            &mut self.dirs,
            self.spool,
            self.opts.timestamp,
        )?;
        let step_dir = self.spool.join(format!("run-{n}-{}", ins.line));
        let (upper, work, merged) = (
            step_dir.join("upper"),
            step_dir.join("work"),
            step_dir.join("merged"),
        );
        for d in [&upper, &work, &merged] {
            // 0755 whatever the umask: the upper directory is the root
            // directory the command sees. (The spool around it is 0700.)
            std::fs::create_dir_all(d)
                .and_then(|_| {
                    use std::os::unix::fs::PermissionsExt;
                    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                })
                .map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let capture = step_dir.join("layer.tar");
        let run = sandbox::RunSpec {
            lowers,
            upper: upper.clone(),
            work,
            merged,
            argv: argv.clone(),
            env: env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            cwd: self.workdir.clone(),
            uid: uid as u32,
            gid: gid as u32,
            groups,
            network,
            hostname: "kiln".into(),
            // (In container mode, the container's own.)
            etc: if container {
                Vec::new()
            } else {
                crate::assemble::run::etc_files(&step_dir, n, network)?
            },
            mounts,
            capture: capture.clone(),
            timestamp: self.opts.timestamp,
            reproducible: self.opts.reproducible,
        };
        let step = self.opts.progress.step(
            &format!("RUN (line {})", self.view.ctx.original_line(ins.line)),
            0,
            0,
        );
        let shown = argv.join(" ");
        if container {
            let keep = self.container_keep();
            sandbox::container::prepare(&run.lowers, &keep)?;
            sandbox::container::run(&run, &keep, &mut |line| step.line(line))
                .map_err(|e| e.to_string())?;
        } else {
            sandbox::run(
                &sandbox::Spec {
                    rootless: sandbox::rootless(),
                    action: sandbox::Action::Run(Box::new(run)),
                },
                self.spool,
                |line| step.line(line),
            )
            .map_err(|e| e.to_string())?;
        }
        step.finish();
        drop(locks);
        self.fs
            .apply_blob(&capture)
            .map_err(|e| format!("reading the step's layer {}: {e}", capture.display()))?;
        let size = std::fs::metadata(&capture).map_or(0, |m| m.len());
        // Without overlayfs the "upper" directory is a whole root, not a
        // layer: later steps unpack the layer tar instead. In container
        // mode the root holds the step already: the tar names it.
        let snapshot = capture.with_extension("before").exists();
        // --reproducible: what was removed or emptied, for the history;
        // the upper directory still holds the originals, so later steps
        // unpack the layer instead.
        let normalized =
            std::fs::read_to_string(capture.with_extension("normalized")).unwrap_or_default();
        let normalized: Vec<&str> = normalized.lines().collect();
        self.dirs.push(if container {
            Some(capture.clone())
        } else {
            (!snapshot && normalized.is_empty()).then_some(upper)
        });
        self.layers.push(Layer::Tar {
            path: capture,
            size,
            files: 0,
            note: (!normalized.is_empty()).then(|| normalized.join("\n")),
        });
        self.fresh(ins, key);
        // History as Docker records it: the command, never a secret's value.
        self.history_as(format!("RUN {shown}"), false);
        Ok(())
    }
}
