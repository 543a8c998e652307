//! `kiln taskcluster build-image`: Taskcluster's image_builder task in one
//! command. The contract (the task's environment, the queue, the outputs)
//! is in `kiln::taskcluster`; the build is `kiln build` of the context
//! archive, with the flags the contract implies.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Parser;

use kiln::source::ImageFile;
use kiln::store::Store;
use kiln::taskcluster::{compress_zstd, fetch, Task, Workspace};

use crate::cli::Cli;

pub fn build_image(workspace: &Path, build_flags: &[String]) -> Result<ExitCode> {
    let task = Task::from_env().map_err(|e| anyhow!(e))?;
    let ws = Workspace(workspace.to_path_buf());
    let scratch = tempfile::Builder::new()
        .prefix(".kiln-image-task-")
        .tempdir()
        .context("creating a temporary directory")?;
    let _interrupt = kiln::interrupt::remove_on_interrupt(scratch.path());
    eprintln!("kiln: image task: building {}", task.image_name);

    // The context: the workspace's, else the context task's artifact.
    let context = if ws.context().is_file() {
        eprintln!("kiln: context: {}", ws.context().display());
        ws.context()
    } else {
        let (Some(id), Some(path)) = (&task.context_task_id, &task.context_path) else {
            bail!(
                "no context: {} does not exist and CONTEXT_TASK_ID and CONTEXT_PATH are not both set",
                ws.context().display()
            );
        };
        let url = task.artifact_url(id, path).map_err(|e| anyhow!(e))?;
        let dest = scratch.path().join("context.tar.gz");
        let n = fetch(&url, &dest).map_err(|e| anyhow!(e))?;
        eprintln!("kiln: context: fetched {url} ({n} bytes)");
        dest
    };
    // Integrity: taskgraph's context hash (the uncompressed tar's sha256).
    let got = kiln::context::archive::tar_sha256(&context)
        .with_context(|| format!("reading the context archive {}", context.display()))?;
    match &task.hash {
        Some(want) if *want != got => bail!(
            "the context {} has the context hash {got}, but the task's HASH is {want}: it is not the context the decision task hashed",
            context.display()
        ),
        Some(_) => eprintln!("kiln: context hash {got} matches HASH"),
        None => eprintln!("kiln: context hash {got} (no HASH to check it against)"),
    }

    // The parent: the workspace's parent.tar, else the parent task's image.tar.zst.
    let parent = if ws.parent().is_file() {
        Some(ws.parent())
    } else if let Some(id) = &task.parent_task_id {
        let url = task
            .artifact_url(id, "public/image.tar.zst")
            .map_err(|e| anyhow!(e))?;
        let dest = scratch.path().join("parent.tar.zst");
        let n = fetch(&url, &dest).map_err(|e| anyhow!(e))?;
        eprintln!("kiln: parent: fetched {url} ({n} bytes)");
        Some(dest)
    } else {
        None
    };
    let store_dir = scratch.path().join("store");
    let mut args: Vec<(String, String)> = task
        .build_args
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if let Some(root) = &task.root_url {
        args.push(("TASKCLUSTER_ROOT_URL".into(), root.clone()));
    }
    if let Some(p) = &parent {
        let store = Store::new(&store_dir, "the parent image");
        let src = ImageFile::open(p)
            .with_context(|| format!("reading the parent image {}", p.display()))?;
        let sel = kiln::Selection {
            all_platforms: true,
            ..Default::default()
        };
        let copied = kiln::copy(&src, &store, &sel)
            .with_context(|| format!("importing the parent image {}", p.display()))?;
        let (desc, _) = copied
            .images
            .first()
            .ok_or_else(|| anyhow!("the parent image {} holds no image", p.display()))?;
        // Pinned by digest: FROM $DOCKER_IMAGE_PARENT takes exactly these bytes.
        let pinned = format!("docker-image-parent@{}", desc.digest);
        eprintln!("kiln: parent: DOCKER_IMAGE_PARENT={pinned}");
        args.retain(|(k, _)| k != "DOCKER_IMAGE_PARENT");
        args.push(("DOCKER_IMAGE_PARENT".into(), pinned));
    }

    let out = ws.out();
    let image_tar = out.join("image.tar");
    let mut argv: Vec<String> = vec![
        "kiln".into(),
        "--progress".into(),
        "plain".into(),
        "build".into(),
    ];
    argv.push(context.display().to_string());
    argv.extend(
        [
            "--no-index",
            "--pull=missing",
            "--build-args-in-from",
            // image.tar.zst is a zstd stream over a docker-archive whose
            // layers are not compressed (Taskcluster's artifact format).
            "--layer-compression",
            "none",
            "-t",
        ]
        .map(String::from),
    );
    argv.push(task.image_name.clone());
    if parent.is_some() {
        argv.push("--store".into());
        argv.push(store_dir.display().to_string());
    }
    for (k, v) in &args {
        argv.push(format!("--build-arg={k}={v}"));
    }
    argv.push("-o".into());
    argv.push(image_tar.display().to_string());
    argv.extend(build_flags.iter().cloned());
    if task.debug {
        eprintln!("kiln: {}", argv.join(" "));
    }
    let cli = Cli::try_parse_from(&argv).map_err(|e| anyhow!("the build's flags: {e}"))?;
    let code = crate::run(cli)?;
    if code != ExitCode::SUCCESS {
        return Ok(code);
    }
    let zst = out.join("image.tar.zst");
    compress_zstd(&image_tar, &zst, task.zstd_level).map_err(|e| anyhow!(e))?;
    eprintln!(
        "kiln: wrote {} and {} (zstd level {})",
        image_tar.display(),
        zst.display(),
        task.zstd_level
    );
    if let Some((uid, gid)) = task.chown {
        for p in [&out, &image_tar, &zst] {
            std::os::unix::fs::lchown(p, Some(uid), Some(gid))
                .with_context(|| format!("CHOWN_OUTPUT: chown {uid}:{gid} {}", p.display()))?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
