//! Outputs meant for `docker load` must load in the Docker Engines CI
//! workers run: before 23.0 an engine cannot read a zstd layer
//! (`archive/tar: invalid tar header`). A base from an OCI store or
//! registry often has zstd layers, which a build otherwise passes through
//! byte for byte; for a docker-archive (and `image.tar.zst`) they are
//! recompressed with the output's layer compression instead: gzip, or none
//! inside `image.tar.zst`. The diff_ids stay; the layer digests change, and
//! plain progress says so.

use std::path::Path;

use super::{stage, BuildOptions, Error};
use crate::image::Codec;
use crate::layer::{self, Compression};
use crate::sink::{file, Format};

/// Whether `opts` writes something `docker load` reads, with a layer
/// compression every engine loads.
fn wanted(opts: &BuildOptions) -> bool {
    matches!(
        opts.format,
        Format::DockerArchive | Format::DockerArchiveZstd
    ) && !matches!(opts.compression, Compression::Zstd(_))
}

/// Recompresses the zstd base layers of `planned` into `blob_dir` (through
/// an uncompressed copy in `spool`), replacing their descriptors.
pub fn recompress_bases(
    planned: &mut stage::Planned,
    opts: &BuildOptions,
    blob_dir: &file::BlobDir,
    spool: &Path,
) -> Result<(), Error> {
    if !wanted(opts) {
        return Ok(());
    }
    for (desc, path) in planned.base.iter_mut() {
        if desc.media_type.codec() != Some(Codec::Zstd) {
            continue;
        }
        let into = match opts.compression {
            Compression::None => "no compression (inside image.tar.zst)".to_string(),
            c => c.describe().unwrap_or_default(),
        };
        opts.progress.say(&format!(
            "recompressing base layer {} (zstd) with {into}: Docker Engines before 23.0 cannot load zstd layers",
            desc.digest
        ));
        let src = path.clone();
        let rerr = |e: std::io::Error| {
            Error::Layer(layer::Error::Read {
                path: src.clone(),
                source: e,
            })
        };
        crate::fsx::create_private_dir(spool).map_err(rerr)?;
        let tar = spool.join(format!("base-{}.tar", desc.digest.hex()));
        {
            let mut r = crate::source::layer_file(path).map_err(rerr)?;
            let mut w = std::fs::File::create(&tar).map_err(rerr)?;
            std::io::copy(&mut r, &mut w).map_err(rerr)?;
        }
        let size = std::fs::metadata(&tar).map_err(rerr)?.len();
        let info = layer::write_layer(
            &layer::Planned::Tar {
                path: tar.clone(),
                size,
                files: 0,
                note: None,
            },
            opts.timestamp,
            opts.compression,
            blob_dir,
            &crate::progress::Step::none(),
        )?;
        let _ = std::fs::remove_file(&tar);
        let mut d = info.descriptor();
        // Other annotations (what --reproducible did) stay.
        for (k, v) in &desc.annotations {
            d.annotations.entry(k.clone()).or_insert_with(|| v.clone());
        }
        *path = blob_dir.path().join(info.digest.hex());
        *desc = d;
    }
    Ok(())
}
