//! `build --check-reproducible`: build again under perturbations (another
//! thread count, directory entries read in reverse, another temporary
//! directory) and compare; a difference comes with the `kiln diff` report.

use std::path::Path;

use super::{build, BuildOptions, BuildResult, Error};
use crate::diff;
use crate::source::ImageFile;

/// What the second build showed.
pub struct Reproduced {
    /// How the second build differed in its conditions, for people.
    pub conditions: String,
    pub second: BuildResult,
    /// The comparison, when the digests differ.
    pub report: Option<diff::Report>,
}

/// Test-only: with this variable set, the second build uses another
/// timestamp, so the check must fail (the negative test of the check).
pub const PERTURB_ENV: &str = "KILN_TEST_PERTURB_SECOND_BUILD";

/// Builds `image_dir` a second time and compares it with `first`.
pub fn check_reproducible(
    image_dir: &Path,
    opts: &BuildOptions,
    first: &BuildResult,
) -> Result<Reproduced, Error> {
    let work = |source| Error::Work {
        path: opts.output.clone(),
        source,
    };
    let tmp = tempfile::Builder::new()
        .prefix("kiln-reproducible-")
        .tempdir_in(std::env::temp_dir())
        .map_err(work)?;
    let mut again = opts.clone();
    again.output = tmp.path().join(
        opts.output
            .file_name()
            .map_or_else(|| "image".into(), |n| n.to_owned()),
    );
    again.hash_cache = None;
    again.progress = crate::progress::Progress::none();
    again.context.reverse_read_order = true;
    if std::env::var_os(PERTURB_ENV).is_some() {
        again.timestamp += 1;
    }
    let threads = rayon::current_num_threads();
    let other = if threads > 1 { 1 } else { 3 };
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(other)
        .build()
        .map_err(|e| work(std::io::Error::other(e)))?;
    let second = pool.install(|| build(image_dir, &again))?;
    let conditions = format!(
        "{other} thread(s) instead of {threads}, directories read in reverse, in {}",
        tmp.path().display()
    );
    let report = if second.manifest_digest == first.manifest_digest {
        None
    } else {
        let a = ImageFile::open(&opts.output)?;
        let b = ImageFile::open(&again.output)?;
        Some(diff::diff(&a, &b)?)
    };
    Ok(Reproduced {
        conditions,
        second,
        report,
    })
}
