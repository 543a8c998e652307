//! `kiln build -o`: a path, `-` (standard output), or BuildKit's
//! `type=…[,dest=…]` syntax, as `docker buildx build -o` takes it.

use std::path::PathBuf;

use anyhow::{bail, Result};
use kiln::Format;

/// Where a build goes, from `-o`.
#[derive(Debug, PartialEq, Eq)]
pub enum Dest {
    /// A file or directory (the format from `type=` or the extension).
    Path(PathBuf, Option<Format>),
    /// Standard output, as an archive of this format.
    Stdout(Format),
    /// Pushed to a registry under this name (`type=registry,name=…`).
    Registry(String),
}

/// Parses `-o VALUE`. A value that is neither a path nor BuildKit's
/// syntax kiln can honour is an error, never a directory of that name.
pub fn parse(value: &str) -> Result<Dest> {
    if value == "-" {
        return Ok(Dest::Stdout(Format::DockerArchive));
    }
    if !value.starts_with("type=") {
        if value.contains(",dest=") || value.starts_with("dest=") {
            bail!("-o {value}: BuildKit's form starts with type=… (type=docker,dest=FILE, type=oci,dest=FILE, type=registry,name=REF); a path is given alone");
        }
        return Ok(Dest::Path(PathBuf::from(value), None));
    }
    let mut kind = "";
    let (mut dest, mut name, mut push) = (None, None, None);
    for part in value.split(',') {
        let Some((k, v)) = part.split_once('=') else {
            bail!("-o {value}: {part:?} is not KEY=VALUE");
        };
        match k {
            "type" => kind = v,
            "dest" => dest = Some(v.to_string()),
            "name" => name = Some(v.to_string()),
            "push" => push = Some(v == "true"),
            _ => bail!("-o {value}: kiln does not know the key {k:?} (it takes type, dest, and for type=registry name)"),
        }
    }
    let format = match kind {
        "docker" => Format::DockerArchive,
        "oci" => Format::OciArchive,
        "registry" => {
            let Some(name) = name else {
                bail!("-o {value}: type=registry needs name=REGISTRY/REPOSITORY:TAG");
            };
            return Ok(Dest::Registry(name));
        }
        "image" if push == Some(true) && name.is_some() => {
            return Ok(Dest::Registry(name.unwrap_or_default()));
        }
        "tar" | "local" => bail!(
            "-o {value}: type={kind} exports the image's files, which kiln does not write: use type=docker,dest=FILE (for docker load) or type=oci,dest=FILE (an OCI archive)"
        ),
        other => bail!(
            "-o {value}: type={other} is not one kiln writes: use type=docker, type=oci or type=registry"
        ),
    };
    match dest.as_deref() {
        None | Some("-") => Ok(Dest::Stdout(format)),
        Some(d) => Ok(Dest::Path(PathBuf::from(d), Some(format))),
    }
}

/// An image written to a temporary file first (`-o -`, `type=registry`),
/// in kiln's cache directory: never beside the output or in the context.
pub struct Staged {
    dir: tempfile::TempDir,
    _interrupt: kiln::interrupt::Guard,
    /// Copy the image to standard output when the build is done.
    pub stdout: bool,
}

impl Staged {
    fn new(stdout: bool) -> Result<Staged> {
        let parent = kiln::cache_dir().join("tmp");
        std::fs::create_dir_all(&parent)
            .map_err(|e| anyhow::anyhow!("creating {}: {e}", parent.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("kiln-output-")
            .tempdir_in(&parent)
            .map_err(|e| anyhow::anyhow!("creating a directory in {}: {e}", parent.display()))?;
        let _interrupt = kiln::interrupt::remove_on_interrupt(dir.path());
        Ok(Staged {
            dir,
            _interrupt,
            stdout,
        })
    }

    /// Copies the finished image to standard output.
    pub fn to_stdout(&self, image: &std::path::Path) -> Result<()> {
        let mut f = std::fs::File::open(image)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", image.display()))?;
        let mut out = std::io::stdout().lock();
        std::io::copy(&mut f, &mut out)
            .and_then(|_| std::io::Write::flush(&mut out))
            .map_err(|e| anyhow::anyhow!("writing the image to standard output: {e}"))?;
        Ok(())
    }
}

/// Applies `-o` to the build's arguments: the path and format it names;
/// for standard output or a registry, a temporary file in kiln's cache
/// (returned, kept until the image is sent) and, for a registry, the name
/// as the first tag and `--push`.
pub fn apply(b: &mut crate::cli::BuildArgs) -> Result<Option<Staged>> {
    use crate::cli::FormatArg;
    let Some(o) = &b.output else {
        return Ok(None);
    };
    let as_arg = |f: Format| match f {
        Format::OciArchive => FormatArg::OciArchive,
        Format::OciDir => FormatArg::OciDir,
        Format::DockerArchiveZstd => FormatArg::DockerArchiveZstd,
        Format::DockerArchive => FormatArg::DockerArchive,
    };
    match parse(&o.to_string_lossy())? {
        Dest::Path(p, f) => {
            b.output = Some(p);
            b.format = b.format.or(f.map(as_arg));
            Ok(None)
        }
        Dest::Stdout(f) => {
            if b.ctx.json || b.quiet {
                bail!("-o - writes the image to standard output: leave out --json and -q (the summary goes to stderr)");
            }
            let s = Staged::new(true)?;
            b.output = Some(s.dir.path().join("image.tar"));
            b.format = b.format.or(Some(as_arg(f)));
            Ok(Some(s))
        }
        Dest::Registry(name) => {
            let s = Staged::new(false)?;
            b.output = Some(s.dir.path().join("image.tar"));
            b.tags.insert(0, name);
            b.push = true;
            Ok(Some(s))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buildkit_forms_and_paths() {
        assert_eq!(
            parse("type=docker,dest=x.tar").unwrap(),
            Dest::Path("x.tar".into(), Some(Format::DockerArchive))
        );
        assert_eq!(
            parse("type=oci,dest=-").unwrap(),
            Dest::Stdout(Format::OciArchive)
        );
        assert_eq!(parse("-").unwrap(), Dest::Stdout(Format::DockerArchive));
        assert_eq!(
            parse("type=registry,name=r.example/a:1").unwrap(),
            Dest::Registry("r.example/a:1".into())
        );
        assert_eq!(
            parse("out/img.tar").unwrap(),
            Dest::Path("out/img.tar".into(), None)
        );
        for bad in [
            "type=tar,dest=x",
            "type=local,dest=d",
            "type=docker,bogus=1",
            "type=registry",
            "type=weird",
            "dest=x.tar",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
