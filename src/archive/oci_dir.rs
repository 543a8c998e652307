//! An OCI image layout directory. The layout is assembled in a temporary
//! directory beside the target and renamed into place; an existing layout
//! at the target is replaced only once the new one is complete.

use std::fs;
use std::path::Path;

use super::{index_json, io_err, parent_dir, Error, ImageFiles, Writer, OCI_LAYOUT};

pub struct OciDir;

fn is_replaceable(out: &Path) -> Result<bool, Error> {
    if !out.exists() {
        return Ok(true);
    }
    if out.join("oci-layout").is_file() {
        return Ok(true);
    }
    Ok(out.is_dir() && fs::read_dir(out).map_err(io_err(out))?.next().is_none())
}

impl Writer for OciDir {
    fn write(&self, img: &ImageFiles, out: &Path) -> Result<(), Error> {
        if !is_replaceable(out)? {
            return Err(Error::NotALayout {
                path: out.to_path_buf(),
            });
        }
        let parent = parent_dir(out);
        let stage = tempfile::Builder::new()
            .prefix(&super::temp_prefix("out"))
            .tempdir_in(&parent)
            .map_err(io_err(out))?;
        let blobs = stage.path().join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(io_err(out))?;
        let mut digests = vec![&img.manifest.digest, &img.config.digest];
        digests.extend(img.layers.iter().map(|l| &l.digest));
        for d in digests {
            let hex = d.trim_start_matches("sha256:");
            let (src, dst) = (img.blob_path(d), blobs.join(hex));
            if fs::hard_link(&src, &dst).is_err() {
                fs::copy(&src, &dst).map_err(io_err(&dst))?;
            }
        }
        fs::write(stage.path().join("oci-layout"), OCI_LAYOUT).map_err(io_err(out))?;
        fs::write(stage.path().join("index.json"), index_json(img)).map_err(io_err(out))?;
        {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(stage.path(), fs::Permissions::from_mode(0o755))
                .map_err(io_err(out))?;
        }
        let stage = stage.keep();
        if out.exists() {
            let old = tempfile::Builder::new()
                .prefix(&super::temp_prefix("old"))
                .tempdir_in(&parent)
                .map_err(io_err(out))?;
            let old_path = old.path().join("layout");
            fs::rename(out, &old_path).map_err(io_err(out))?;
            if let Err(e) = fs::rename(&stage, out) {
                let _ = fs::rename(&old_path, out);
                let _ = fs::remove_dir_all(&stage);
                return Err(Error::Io {
                    path: out.to_path_buf(),
                    source: e,
                });
            }
        } else if let Err(e) = fs::rename(&stage, out) {
            let _ = fs::remove_dir_all(&stage);
            return Err(Error::Io {
                path: out.to_path_buf(),
                source: e,
            });
        }
        Ok(())
    }
}
