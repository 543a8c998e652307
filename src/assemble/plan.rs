//! The plan: an image directory's context and hash, its Dockerfile parsed
//! and analyzed once (stages, target, what the target needs), and every
//! image it takes from outside resolved once, to a store and a descriptor.
//! The same plan gives the index digest and drives the build, so a build
//! never parses twice and never looks a base up twice.

use std::path::Path;

use super::analysis::{self, Analysis};
use super::stage::StageError;
use super::{stage_error, BuildOptions, Error};
use crate::context::{self, Context, HashCache};
use crate::dockerfile::{self, Dockerfile};
use crate::image::{Descriptor, Platform, Reference};
use crate::store::{BaseImage, Store};

/// An image built earlier in the same run (`build --all`), handed to its
/// children through the store it was built into.
#[derive(Clone, Debug)]
pub struct Parent {
    pub store: Store,
    pub descriptor: Descriptor,
    /// Its index digest, which children chain into theirs.
    pub index_digest: String,
}

/// One image the Dockerfile takes from outside (`FROM IMAGE`, `COPY --from=IMAGE`).
#[derive(Clone, Debug)]
pub struct Base {
    /// The reference, expanded.
    pub reference: String,
    /// The Dockerfile line and text naming it first.
    pub line: usize,
    pub text: String,
    /// Where it is: a parent of this run or a store, and its descriptor
    /// there; None when no store has it.
    pub found: Option<(Store, Descriptor)>,
    /// What it adds to the index digest: a parent's index digest, a
    /// store image's manifest digest, or a pinned digest (`name@sha256:…`,
    /// the HASH-file convention) even when no store has it.
    pub digest: Option<String>,
}

/// The bases of a plan, by reference.
#[derive(Clone, Debug, Default)]
pub struct Bases {
    pub list: Vec<Base>,
}

/// Finds a reference among the parents of the run, else in the stores.
fn locate(reference: &str, opts: &BuildOptions) -> Result<(Store, Descriptor, String), String> {
    if let Some(p) = Reference::parse(reference)
        .ok()
        .and_then(|r| opts.parents.get(&r.name()))
    {
        return Ok((
            p.store.clone(),
            p.descriptor.clone(),
            p.index_digest.clone(),
        ));
    }
    let pulled = |r: &Reference| -> Result<(Store, Descriptor, String), String> {
        // Into the user store, named as given (a pinned digest as NAME:pulled).
        let user = Store::user();
        let name = format!("{}:{}", r.repository, r.tag.as_deref().unwrap_or("pulled"));
        let d = crate::registry::pull_any(r, &opts.sources, &user, &[name], false)
            .map_err(|e| format!("pulling {reference}: {e}"))?
            .map_err(|tried| {
                format!(
                    "{reference}: no store has it and no registry either ({})",
                    tried.join("; ")
                )
            })?;
        let digest = d.digest.to_string();
        Ok((user, d, digest))
    };
    let parsed = Reference::parse(reference).ok();
    if let Some(r) = parsed
        .as_ref()
        .filter(|r| opts.pull == super::PullPolicy::Always && r.digest.is_none())
    {
        return pulled(r);
    }
    match opts.stores.find(reference) {
        Ok((s, d)) => {
            let digest = d.digest.to_string();
            Ok((s.clone(), d, digest))
        }
        Err(e) => match parsed.filter(|_| opts.pull != super::PullPolicy::Never) {
            Some(r) => pulled(&r),
            None => Err(e.to_string()),
        },
    }
}

impl Bases {
    /// Loads a base (verifying its blobs); a reference the plan did not
    /// meet (a name computed from a stage-local ARG) is looked up now.
    pub fn load(
        &self,
        reference: &str,
        platform: Option<&Platform>,
        opts: &BuildOptions,
        verify_layers: bool,
    ) -> Result<BaseImage, String> {
        let (store, d) = match self.list.iter().find(|b| b.reference == reference) {
            Some(Base {
                found: Some((s, d)),
                ..
            }) => (s.clone(), d.clone()),
            _ => {
                let (s, d, _) = locate(reference, opts)?;
                (s, d)
            }
        };
        store
            .load(&d, reference, platform, verify_layers)
            .map_err(|e| e.to_string())
    }
}

/// What a build will do, worked out before it does anything.
pub struct Plan {
    pub context: Context,
    pub context_hash: String,
    pub dockerfile: Dockerfile,
    pub analysis: Analysis,
    pub bases: Bases,
}

/// Parses the context's (rewritten) Dockerfile; errors name the line of the original.
fn parse_dockerfile(ctx: &Context) -> Result<Dockerfile, Error> {
    dockerfile::parse(ctx.dockerfile_text()).map_err(|e| {
        let dockerfile::Error::Syntax {
            line,
            column,
            message,
        } = e;
        Error::Dockerfile {
            dockerfile: ctx.dockerfile_path(),
            source: dockerfile::Error::Syntax {
                line: ctx.original_line(line),
                column,
                message,
            },
        }
    })
}

/// The images a Dockerfile's target takes from outside that no store has
/// and that nothing will fetch (without `--pull`): `(line, reference)`,
/// found from the Dockerfile's text alone, before any context is hashed.
/// Parents of the run (`opts.parents`) count as found; a Dockerfile that
/// does not parse has none here (its build reports the error).
pub fn unresolved_bases(dockerfile: &str, opts: &BuildOptions) -> Vec<(usize, String)> {
    if opts.pull != super::PullPolicy::Never {
        return Vec::new();
    }
    let Ok(df) = dockerfile::parse(dockerfile) else {
        return Vec::new();
    };
    let Ok(a) = analysis::analyze(&df, opts) else {
        return Vec::new();
    };
    analysis::external_refs(&df, &a)
        .into_iter()
        .filter(|(_, _, r)| {
            let parent = Reference::parse(r)
                .ok()
                .is_some_and(|r| opts.parents.contains_key(&r.name()));
            !parent && opts.stores.find(r).is_err()
        })
        .map(|(line, _, r)| (line, r))
        .collect()
}

/// Collects and hashes the context of `image_dir` as `opts` say (with the
/// hash cache, if any).
pub fn collect(image_dir: &Path, opts: &BuildOptions) -> Result<(Context, String), Error> {
    let cache = opts.hash_cache.as_deref().map(HashCache::load);
    Ok(context::collect_and_hash(
        image_dir,
        &opts.context,
        opts.algorithm,
        opts.mode_policy,
        cache.as_ref(),
        &opts.progress,
    )?)
}

impl Plan {
    /// Plans the build of `image_dir`; `collected` is the context and its
    /// hash when the caller already has them.
    pub fn new(
        image_dir: &Path,
        opts: &BuildOptions,
        collected: Option<(Context, String)>,
    ) -> Result<Plan, Error> {
        let (context, context_hash) = match collected {
            Some(c) => c,
            None => collect(image_dir, opts)?,
        };
        let dockerfile = parse_dockerfile(&context)?;
        let analysis =
            analysis::analyze(&dockerfile, opts).map_err(|e| stage_error(&context, e))?;
        let mut bases = Bases::default();
        for (line, text, reference) in analysis::external_refs(&dockerfile, &analysis) {
            let pinned = Reference::parse(&reference)
                .ok()
                .and_then(|r| r.digest)
                .map(|d| d.to_string());
            let (found, digest) = match locate(&reference, opts) {
                Ok((s, d, digest)) => (Some((s, d)), Some(digest)),
                Err(_) => (None, pinned),
            };
            bases.list.push(Base {
                reference,
                line,
                text,
                found,
                digest,
            });
        }
        Ok(Plan {
            context,
            context_hash,
            dockerfile,
            analysis,
            bases,
        })
    }

    /// The digests the bases add to the index digest; a base that no store
    /// has and whose digest is not pinned is an error naming its line.
    pub fn parent_digests(&self, opts: &BuildOptions) -> Result<Vec<String>, Error> {
        let mut out = Vec::new();
        for b in &self.bases.list {
            match &b.digest {
                Some(d) => out.push(d.clone()),
                None => {
                    let mut message = match locate(&b.reference, opts) {
                        Err(m) => m,
                        Ok(_) => "appeared while kiln planned".into(),
                    };
                    // `COPY --from=` and `RUN --mount from=` name a stage
                    // or an image: a typo of a stage's name lists them, as
                    // the build itself says.
                    let df = &self.dockerfile;
                    if let Some(ix) = df.instructions.iter().position(|i| i.line == b.line) {
                        let flag = match df.instructions[ix].kind {
                            dockerfile::Kind::From { .. } => None,
                            dockerfile::Kind::Run(_) => Some("--mount from="),
                            _ => Some("--from="),
                        };
                        let n = self.analysis.defs.iter().rposition(|d| d.start <= ix);
                        if let (Some(flag), Some(n)) = (flag, n) {
                            let earlier = analysis::Earlier {
                                defs: &self.analysis.defs,
                                done: vec![None; n],
                            };
                            message = earlier.not_found(flag, &b.reference, &message);
                        }
                    }
                    return Err(stage_error(
                        &self.context,
                        StageError::At {
                            line: b.line,
                            text: b.text.clone(),
                            message,
                        },
                    ));
                }
            }
        }
        Ok(out)
    }

    /// The index digest of this build.
    pub fn index_digest(&self, opts: &BuildOptions) -> Result<String, Error> {
        Ok(crate::index::index_digest(
            &self.context_hash,
            &opts.context.args,
            &crate::index::builder_line(opts),
            &self.parent_digests(opts)?,
        ))
    }
}
