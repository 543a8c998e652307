//! The commands that manage kiln's local state: the store (`kiln store`),
//! the step cache (`kiln cache`) and the index (`kiln index`).

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _, Result};

use crate::cli::*;
use crate::print_json;
use kiln::source::ImageFile;
use kiln::store::Store;

pub fn cache(cmd: CacheCommand) -> Result<()> {
    let c = kiln::steps::StepCache::new(kiln::steps::StepCache::default_dir());
    match cmd {
        CacheCommand::Ls { json } => {
            let list = c.list()?;
            if json {
                let v: Vec<_> = list
                    .iter()
                    .map(|(e, used)| serde_json::json!({ "entry": e, "last_used": used }))
                    .collect();
                print_json(&v)?;
            } else {
                for (e, used) in &list {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        &e.key[..16],
                        e.layer.digest,
                        e.layer.size,
                        used,
                        e.instruction.lines().next().unwrap_or("")
                    );
                }
            }
        }
        CacheCommand::Prune {
            older_than,
            keep_bytes,
        } => {
            let older = match older_than {
                Some(s) => Some(kiln::steps::parse_duration(&s).ok_or_else(|| {
                    anyhow!("--older-than {s}: expected a number and s, m, h, d or w (30d, 12h)")
                })?),
                None => None,
            };
            if older.is_none() && keep_bytes.is_none() {
                bail!("kiln cache prune needs --older-than DURATION, --keep-bytes N, or both");
            }
            let (n, bytes) = c.prune(older, keep_bytes)?;
            println!(
                "removed {n} cached step(s) naming {bytes} bytes of layers; `kiln store gc` frees the layers no image uses"
            );
            // Unpacked layers (RUN's lower directories): by last use.
            let (layers, stale) =
                kiln::assemble::run::prune_layers(older.unwrap_or(std::time::Duration::ZERO));
            println!(
                "removed {layers} unpacked layer(s) of {} not used for that long, and {stale} unfinished unpack(s) of killed builds",
                kiln::assemble::run::layer_cache().display()
            );
        }
    }
    Ok(())
}

pub fn index(cmd: IndexCommand) -> Result<()> {
    let open = |d: Option<PathBuf>| {
        kiln::index::LocalIndex::new(d.unwrap_or_else(kiln::index::LocalIndex::default_dir))
    };
    match cmd {
        IndexCommand::Ls {
            pattern,
            index,
            json,
        } => {
            let list = open(index).list(pattern.as_deref())?;
            if json {
                print_json(&list)?;
            } else {
                for e in list {
                    println!("{}\t{}", e.route, e.manifest_digest);
                }
            }
        }
        IndexCommand::Show { route, index } => {
            let idx = open(index);
            let e = idx.get(&route).ok_or_else(|| {
                anyhow!("{route}: no such route in the index {}", idx.dir.display())
            })?;
            print_json(&e)?;
        }
        IndexCommand::Rm { pattern, index } => {
            let n = open(index).remove(&pattern)?;
            println!("removed {n} route(s)");
        }
    }
    Ok(())
}

pub fn store(cmd: StoreCommand) -> Result<()> {
    match cmd {
        StoreCommand::Add {
            image,
            names,
            store,
        } => {
            let s = store.store();
            let src = ImageFile::open(&image)?;
            let sel = kiln::Selection {
                names,
                all_platforms: true,
                ..Default::default()
            };
            let copied = kiln::copy(&src, &s, &sel)
                .inspect_err(|_| {
                    s.abandon();
                })
                .with_context(|| {
                    format!(
                        "importing {} into the store {}",
                        image.display(),
                        s.dir.display()
                    )
                })?;
            for (d, names) in copied.images {
                for n in names {
                    println!("{n}\t{}", d.digest);
                }
            }
        }
        StoreCommand::Ls { store, json } => {
            let s = store.store();
            let list = s.list()?;
            if json {
                print_json(&list)?;
            } else {
                for l in list {
                    println!("{}\t{}\t{}", l.name, l.digest, l.size);
                }
            }
        }
        StoreCommand::Rm { reference, store } => {
            let n = store.store().remove(&reference)?;
            println!("removed {n} name(s); run `kiln store gc` to free unreferenced blobs");
        }
        StoreCommand::Repair { store, index, json } => {
            let s = store.store();
            let idx = kiln::index::LocalIndex::new(
                index.unwrap_or_else(kiln::index::LocalIndex::default_dir),
            );
            let known: Vec<_> = idx
                .list(None)?
                .into_iter()
                .map(|e| {
                    (
                        e.manifest_digest,
                        format!("kiln.local/index/{}:{}", e.name, e.index_digest),
                    )
                })
                .collect();
            let r = s.repair(&known)?;
            if json {
                print_json(&r)?;
            } else {
                if let Some(m) = &r.moved {
                    println!("moved the unreadable index.json to {}", m.display());
                }
                println!("kept {} name(s) from index.json", r.kept);
                for n in &r.restored {
                    println!("restored {n} (from kiln's index)");
                }
                for n in &r.recovered {
                    println!("recovered {n} (an image with no name left)");
                }
            }
        }
        StoreCommand::Gc { store } => {
            let s = store.store();
            // The user store also keeps the layers step cache entries name.
            let steps = if s.dir == Store::user().dir {
                kiln::steps::StepCache::new(kiln::steps::StepCache::default_dir()).referenced()
            } else {
                Vec::new()
            };
            let swept = s.gc_keeping(&steps)?;
            println!("{}", swept.render());
        }
    }
    Ok(())
}
