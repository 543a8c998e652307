//! An OCI image layout in one tar file (`oci-archive:` to skopeo).

use std::path::Path;

use super::{layout_entries, write_archive, Error, ImageFiles, Writer};

pub struct OciArchive;

impl Writer for OciArchive {
    fn write(&self, img: &ImageFiles, out: &Path) -> Result<(), Error> {
        write_archive(&layout_entries(img), img.mtime, false, out)
    }
}
