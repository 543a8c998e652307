//! The analysis of a Dockerfile, done once by the plan: its stages, the
//! global ARG scope (with the automatic platform ARGs), the target, which
//! stages the target needs (its `FROM` chain and every `COPY --from`),
//! which of them others copy from, and the images it takes from outside.

use std::collections::BTreeMap;

use super::stage::{at, Planned, StageError};
use super::BuildOptions;
use crate::dockerfile::expand::{expand_word, split_words, Vars};
use crate::dockerfile::{Dockerfile, Kind};
use crate::image::host_platform;

/// One stage of the Dockerfile: instructions `start..end`, `start` its FROM.
pub struct StageDef {
    pub start: usize,
    pub end: usize,
    pub name: Option<String>,
}

/// Earlier stages' results, for `FROM stage`, `COPY --from` and
/// `RUN --mount from=`: the stages a stage depends on are there, built
/// (the executor starts a stage only then); the others are `None`, so a
/// stage never sees one it does not depend on, whatever the order in
/// which independent stages finished.
pub struct Earlier<'a> {
    pub defs: &'a [StageDef],
    pub done: Vec<Option<std::sync::Arc<Planned>>>,
}

/// The stages' names, for messages: `builder, test`, or `none named`.
pub fn stage_names(defs: &[StageDef]) -> String {
    let names: Vec<&str> = defs.iter().filter_map(|d| d.name.as_deref()).collect();
    if names.is_empty() {
        "none named".to_string()
    } else {
        names.join(", ")
    }
}

impl Earlier<'_> {
    /// The message for `FLAGVALUE` (`--from=X`, `--mount from=X`) that
    /// names neither an earlier stage nor an image a store has (`m`, the
    /// store's message). A value that could be a stage's name (no `/`,
    /// `:` or `@`) lists the stages it could have meant: a typo in
    /// `--from=buidler` shows `builder`.
    pub fn not_found(&self, flag: &str, value: &str, m: &str) -> String {
        if value.contains(['/', ':', '@']) {
            return m.to_string();
        }
        format!(
            "{flag}{value}: no stage is named {value} (the stages before this one: {}), and {m}",
            stage_names(&self.defs[..self.done.len()])
        )
    }

    /// The earlier stage a `FROM`/`--from` value names (a name, or for
    /// `--from` an index).
    pub fn find(&self, value: &str, by_index: bool) -> Option<usize> {
        if by_index {
            if let Ok(i) = value.parse::<usize>() {
                return (i < self.done.len()).then_some(i);
            }
        }
        self.defs[..self.done.len()].iter().position(|d| {
            d.name
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(value))
        })
    }
}

pub fn automatic_args() -> Vars {
    let p = host_platform();
    let platform = p.to_string();
    let mut v = Vars::new();
    for prefix in ["TARGET", "BUILD"] {
        v.insert(format!("{prefix}PLATFORM"), platform.clone());
        v.insert(format!("{prefix}OS"), p.os.clone());
        v.insert(format!("{prefix}ARCH"), p.architecture.clone());
        v.insert(
            format!("{prefix}VARIANT"),
            p.variant.clone().unwrap_or_default(),
        );
    }
    v
}

/// Parses `NAME[=default]` words of an ARG and applies them to `scope`.
pub fn declare_args(
    text: &str,
    scope: &mut Vars,
    global: &Vars,
    overrides: &BTreeMap<String, String>,
    escape: char,
    expand_with: &Vars,
) -> Result<(), String> {
    for word in split_words(text, escape) {
        let (name, default) = match word.split_once('=') {
            Some((n, d)) => (
                n.to_string(),
                Some(expand_word(d, expand_with, escape).map_err(|e| e.0)?),
            ),
            None => (word.clone(), None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("invalid ARG name {name:?}"));
        }
        let value = overrides
            .get(&name)
            .cloned()
            .or(default)
            .or_else(|| global.get(&name).cloned());
        match value {
            Some(v) => {
                scope.insert(name, v);
            }
            None => {
                scope.remove(&name);
            }
        }
    }
    Ok(())
}

/// The stage a `FROM` value or `--from` flag refers to, if any, for the
/// dependency analysis (words are expanded with the global ARGs only).
fn stage_ref(defs: &[StageDef], before: usize, value: &str, by_index: bool) -> Option<usize> {
    Earlier {
        defs,
        done: vec![None; before],
    }
    .find(value, by_index)
}

/// The Dockerfile's stages, the target, which stages it needs and which
/// of them others copy from (they keep every file in their filesystem).
pub struct Analysis {
    pub global: Vars,
    pub defs: Vec<StageDef>,
    pub target: usize,
    pub needed: Vec<bool>,
    pub keep_all: Vec<bool>,
    /// The earlier stages each stage needs built first: its `FROM` stage
    /// and every stage it copies or binds from (the step graph's edges
    /// between stages).
    pub deps: Vec<Vec<usize>>,
}

pub fn analyze(df: &Dockerfile, opts: &BuildOptions) -> Result<Analysis, StageError> {
    let escape = df.escape;
    // Global scope: ARGs before the first FROM, plus the automatic platform args.
    let mut global = automatic_args();
    let mut defs: Vec<StageDef> = Vec::new();
    for (i, ins) in df.instructions.iter().enumerate() {
        match &ins.kind {
            Kind::From { name, .. } => {
                if let Some(last) = defs.last_mut() {
                    last.end = i;
                }
                defs.push(StageDef {
                    start: i,
                    end: df.instructions.len(),
                    name: name.clone(),
                });
            }
            Kind::Arg(text) if defs.is_empty() => {
                let g = global.clone();
                declare_args(text, &mut global, &g, &opts.context.args, escape, &g)
                    .map_err(|m| at(ins, m))?;
            }
            _ => {}
        }
    }
    // kaniko's rule, which taskgraph's Dockerfiles rely on (`FROM
    // $DOCKER_IMAGE_PARENT` with no ARG): every build argument reaches FROM.
    if opts.args_in_from {
        for (k, v) in &opts.context.args {
            global.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    let target = match &opts.target {
        Some(t) => defs
            .iter()
            .position(|d| d.name.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(t)))
            .ok_or_else(|| {
                StageError::Whole(format!(
                    "--target {t}: no stage is named {t} (FROM ... AS {t}); the stages are: {}",
                    stage_names(&defs)
                ))
            })?,
        None => defs
            .len()
            .checked_sub(1)
            .ok_or_else(|| StageError::Whole("no FROM instruction".into()))?,
    };

    // Which stages the target needs, and which of them others copy from.
    let expand_global = |w: &str| expand_word(w, &global, escape).unwrap_or_else(|_| w.to_string());
    let mut from_stage: Vec<Option<usize>> = vec![None; defs.len()];
    let mut copies: Vec<Vec<usize>> = vec![Vec::new(); defs.len()];
    for (n, d) in defs.iter().enumerate() {
        if let Kind::From { image, .. } = &df.instructions[d.start].kind {
            from_stage[n] = stage_ref(&defs, n, &expand_global(image), false);
        }
        for ins in &df.instructions[d.start + 1..d.end] {
            for from in sources_from(&ins.kind) {
                if let Some(j) = stage_ref(&defs, n, &expand_global(&from), true) {
                    copies[n].push(j);
                }
            }
        }
    }
    let mut needed = vec![false; defs.len()];
    let mut keep_all = vec![false; defs.len()];
    let mut todo = vec![target];
    while let Some(n) = todo.pop() {
        if std::mem::replace(&mut needed[n], true) {
            continue;
        }
        todo.extend(from_stage[n]);
        for &j in &copies[n] {
            keep_all[j] = true;
            todo.push(j);
        }
    }
    for n in (0..defs.len()).rev() {
        if keep_all[n] {
            if let Some(j) = from_stage[n] {
                keep_all[j] = true;
            }
        }
    }
    let deps = (0..defs.len())
        .map(|n| {
            let mut d: Vec<usize> = from_stage[n]
                .into_iter()
                .chain(copies[n].iter().copied())
                .collect();
            d.sort_unstable();
            d.dedup();
            d
        })
        .collect();
    Ok(Analysis {
        global,
        defs,
        target,
        needed,
        keep_all,
        deps,
    })
}

/// The stages or images an instruction reads files from (unexpanded):
/// `COPY --from=X`, `ADD --from=X`, and `RUN --mount=type=bind,from=X`.
fn sources_from(kind: &Kind) -> Vec<String> {
    match kind {
        Kind::Copy(spec) | Kind::Add(spec) => spec
            .flags
            .iter()
            .filter(|(f, _)| f == "from")
            .map(|(_, v)| v.clone().unwrap_or_default())
            .collect(),
        Kind::Run(spec) => spec
            .flags
            .iter()
            .filter(|(f, _)| f == "mount")
            .filter_map(|(_, v)| {
                let kv: Vec<(&str, &str)> = v
                    .as_deref()?
                    .split(',')
                    .filter_map(|p| p.split_once('='))
                    .collect();
                let bind = kv.iter().all(|(k, t)| *k != "type" || *t == "bind");
                bind.then(|| {
                    kv.iter()
                        .find(|(k, _)| *k == "from")
                        .map(|(_, f)| f.to_string())
                })
                .flatten()
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// The image references (expanded with the global ARGs) that the stages the
/// target needs take from outside the Dockerfile: `FROM IMAGE` and
/// `COPY --from=IMAGE`; not scratch, not stages.
/// Each comes with the line and text of the instruction naming it.
pub fn external_refs(df: &Dockerfile, a: &Analysis) -> Vec<(usize, String, String)> {
    let ex = |w: &str| expand_word(w, &a.global, df.escape).unwrap_or_else(|_| w.to_string());
    let mut out = Vec::new();
    for (n, d) in a.defs.iter().enumerate() {
        if !a.needed[n] {
            continue;
        }
        if let Kind::From { image, .. } = &df.instructions[d.start].kind {
            let image = ex(image);
            // (An empty name is the stage's own error, naming the variable.)
            if !image.is_empty()
                && !image.eq_ignore_ascii_case("scratch")
                && stage_ref(&a.defs, n, &image, false).is_none()
            {
                let ins = &df.instructions[d.start];
                out.push((ins.line, ins.text.clone(), image));
            }
        }
        for ins in &df.instructions[d.start + 1..d.end] {
            for from in sources_from(&ins.kind) {
                let v = ex(&from);
                if !v.is_empty() && stage_ref(&a.defs, n, &v, true).is_none() {
                    out.push((ins.line, ins.text.clone(), v));
                }
            }
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    out.retain(|(_, _, r)| seen.insert(r.clone()));
    out
}
