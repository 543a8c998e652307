//! The stores a build searches for `FROM` and `COPY --from` images, in
//! order, and the error that names every one of them on a miss.

use std::path::{Path, PathBuf};

use super::{BaseImage, Error, Store};
use crate::image::{Descriptor, Platform, Reference};

/// The stores a build searches, in order.
#[derive(Clone, Debug, Default)]
pub struct Stores {
    pub list: Vec<Store>,
}

impl Stores {
    /// `--store` dirs, then `$KILN_STORE` (colon-separated), then
    /// `<topsrcdir>/vendor-images` if present, then the user cache.
    pub fn search_order(flags: &[PathBuf], topsrcdir: Option<&Path>) -> Stores {
        let mut list: Vec<Store> = flags.iter().map(|d| Store::new(d, "--store")).collect();
        if let Some(env) = std::env::var_os("KILN_STORE") {
            for d in std::env::split_paths(&env).filter(|d| !d.as_os_str().is_empty()) {
                list.push(Store::new(d, "$KILN_STORE"));
            }
        }
        if let Some(t) = topsrcdir {
            let v = t.join("vendor-images");
            if v.join("index.json").is_file() {
                list.push(Store::new(v, "<topsrcdir>/vendor-images"));
            }
        }
        list.push(Store::user());
        Stores { list }
    }

    /// The search order as text, for errors.
    pub fn describe(&self) -> String {
        self.list
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let missing = if s.exists() { "" } else { ", absent" };
                format!("{}. {} ({}{missing})", i + 1, s.dir.display(), s.origin)
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Resolves a FROM reference in the first store that has it.
    pub fn resolve(
        &self,
        reference: &str,
        platform: Option<&Platform>,
    ) -> Result<BaseImage, Error> {
        let (s, d) = self.find(reference)?;
        s.load(&d, reference, platform, true)
    }

    /// The first store holding a reference, and its descriptor there (nothing verified yet).
    pub fn find(&self, reference: &str) -> Result<(&Store, Descriptor), Error> {
        let r = Reference::parse(reference).map_err(|message| Error::NotFound { message })?;
        for s in &self.list {
            if let Some(d) = s.find(&r)? {
                return Ok((s, d));
            }
        }
        let what = match &r.digest {
            Some(d) => format!("an image with digest {d}"),
            None => r.name(),
        };
        Err(Error::NotFound {
            message: format!(
                "base image {reference}: {what} is in none of the image stores searched, in order: {}. kiln pulls nothing unless asked: build with --pull to fetch it from its registry, import it with `kiln store add IMAGE.tar --name {}` (e.g. from `docker save` or `skopeo copy`), or pass --store DIR",
                self.describe(),
                if r.digest.is_some() { "NAME:TAG".to_string() } else { reference.to_string() }
            ),
        })
    }
}
