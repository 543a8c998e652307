//! The kiln command line: argument parsing and output only; everything else
//! is in the library.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{anyhow, bail, Context as _, Result};
use clap::Parser;

mod cli;
mod manage;
mod output_arg;
mod taskcluster_cmd;
use cli::*;
use manage::{cache, index, store};

use kiln::assemble::image_name;
use kiln::context::taskgraph;
use kiln::image::Reference;
use kiln::source::ImageFile;
use kiln::store::Store;
use kiln::{Algorithm, BuildOptions, Compression, ContextOptions, Format};

fn main() -> ExitCode {
    // Like every Unix filter, end quietly when the reader of our output
    // goes away (`kiln inspect … | head`) instead of panicking in println!.
    // SAFETY: called before any other thread exists; SIG_DFL is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // The RUN sandbox's helper: kiln re-executed, single-threaded.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 3 && args[1] == kiln::sandbox::HELPER {
        kiln::sandbox::helper_main(std::path::Path::new(&args[2]));
    }
    // Before any thread: an interrupt removes kiln's temporary files.
    kiln::interrupt::install();
    raise_open_file_limit();
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kiln: error: {}", error_text(&e));
            ExitCode::from(1)
        }
    };
    // `--secret env=` files: gone on success and on failure alike.
    SECRET_FILES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clear();
    kiln::store::release_leases();
    code
}

/// The walk keeps a directory open while its subdirectories wait; a deep,
/// branching tree needs more descriptors than the usual soft limit of 1024.
fn raise_open_file_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a valid, owned struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// The error and its causes, skipping a cause whose text the message already holds.
fn error_text(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !out.contains(&text) {
            if !out.is_empty() {
                out.push_str(": ");
            }
            out.push_str(&text);
        }
    }
    out
}

/// Turns `ContextArgs` into checked `ContextOptions`.
fn context_options(a: &ContextArgs) -> Result<ContextOptions> {
    let mut args = BTreeMap::new();
    for kv in &a.args {
        // NAME alone takes its value from the environment, as with
        // `docker build --build-arg NAME` (unset: the argument is not given).
        let (k, v) = match kv.split_once('=') {
            Some((k, v)) => (k, Some(v.to_string())),
            None => (kv.as_str(), std::env::var(kv).ok()),
        };
        if k.is_empty() {
            bail!("--build-arg {kv}: empty NAME (expected NAME=VALUE, or NAME to take $NAME)");
        }
        if let Some(v) = v {
            args.insert(k.to_string(), v);
        }
    }
    if !a.image_dir.is_dir() {
        bail!(
            "image directory {} does not exist or is not a directory",
            a.image_dir.display()
        );
    }
    let topsrcdir = match &a.topsrcdir {
        Some(t) => t.clone(),
        None => match kiln::checkout_root(&a.image_dir) {
            Some(root) => root,
            None => std::env::current_dir().context("finding the working directory")?,
        },
    };
    Ok(ContextOptions {
        topsrcdir,
        args,
        run_task_dir: a.run_task_dir.clone(),
        dockerfile: a.file.clone(),
        plain_dockerfile: a.plain_dockerfile,
        ..Default::default()
    })
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

fn cache_path(p: PathBuf) -> PathBuf {
    if p.as_os_str().is_empty() {
        default_hash_cache()
    } else {
        p
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    if let Some(n) = cli.jobs {
        if n == 0 {
            bail!("--jobs 0: give at least one thread");
        }
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()
            .context("setting up the thread pool")?;
    }
    let progress = kiln::progress::Progress::new(match cli.progress {
        ProgressArg::Auto => kiln::progress::Mode::Auto,
        ProgressArg::Plain => kiln::progress::Mode::Plain,
        ProgressArg::Never => kiln::progress::Mode::Never,
    });
    match cli.command {
        Command::Hash {
            ctx,
            algorithm,
            mode_policy,
            hash_cache,
        } => {
            let mut opts = context_options(&ctx)?;
            opts.hash_only = true;
            let algorithm: Algorithm = algorithm.into();
            let cache = hash_cache.map(|p| kiln::context::HashCache::load(&cache_path(p)));
            let (c, h) = kiln::context::collect_and_hash(
                &ctx.image_dir,
                &opts,
                algorithm,
                mode_policy.into(),
                cache.as_ref(),
                &progress,
            )?;
            if ctx.json {
                let name = match algorithm {
                    Algorithm::KilnV1 => "kiln-v1",
                    Algorithm::Taskgraph => "taskgraph",
                };
                let mut v = serde_json::json!({ "algorithm": name, "context_hash": h, "files": c.len(), "bytes": c.total_size() });
                if let Some(cache) = &cache {
                    let (hits, hashed) = cache.counts();
                    v["hash_cache"] = serde_json::json!({ "hits": hits, "hashed": hashed });
                }
                print_json(&v)?;
            } else {
                println!("{h}");
            }
        }
        Command::Context { ctx, output } => {
            let mut opts = context_options(&ctx)?;
            opts.taskgraph_names = true;
            let c = kiln::Context::collect(&ctx.image_dir, &opts)?;
            let h = write_context_archive(&c, &output)?;
            if ctx.json {
                print_json(&serde_json::json!({ "context_hash": h, "output": output }))?;
            } else {
                println!("{h}");
            }
        }
        Command::Build(b) => return build(*b, progress),
        Command::Store(cmd) => store(cmd)?,
        Command::Routes(b) => return routes(*b, progress),
        Command::Verify { image, json, net } => return verify(&image, json, &net),
        Command::Diff { a, b, json, net } => {
            return Ok(match diff(&a, &b, json, &net) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("kiln: error: {}", error_text(&e));
                    ExitCode::from(2)
                }
            })
        }
        Command::Push {
            image,
            to,
            mount_from,
            net,
            json,
        } => push(&image, &to, mount_from, &net, json)?,
        Command::Pull {
            reference,
            all_platforms,
            mirrors,
            store,
            names,
            output,
            net,
            json,
        } => pull(
            &reference,
            all_platforms,
            &mirrors,
            &store,
            names,
            output,
            &net,
            json,
        )?,
        Command::Index(cmd) => index(cmd)?,
        Command::Cache(cmd) => cache(cmd)?,
        Command::Taskcluster(TaskclusterCommand::BuildImage {
            workspace,
            build_flags,
        }) => return taskcluster_cmd::build_image(&workspace, &build_flags),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "kiln", &mut std::io::stdout());
        }
        Command::Inspect { image, json } => {
            let r = ImageFile::open(&image)?;
            let s = r.summary()?;
            if json {
                print_json(&s)?;
            } else {
                print!("{}", s.render(&image));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes taskgraph's gzip context archive atomically; returns the hash.
fn write_context_archive(c: &kiln::Context, output: &Path) -> Result<String> {
    let dir = kiln::sink::file::parent_dir(output);
    let mut tmp = kiln::sink::file::Pending::create(&dir, "out", output)?;
    // gzip header as Python's GzipFile writes it for taskgraph: file name without .gz, fixed mtime.
    let base = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let fname = base.strip_suffix(".gz").unwrap_or(&base).to_string();
    let gz = flate2::GzBuilder::new()
        .filename(fname.as_bytes())
        .mtime(taskgraph::MTIME as u32)
        .operating_system(255)
        .write(
            std::io::BufWriter::new(tmp.file_mut()),
            flate2::Compression::best(),
        );
    let (h, gz) = taskgraph::write_context_tar(c, gz)?;
    gz.finish()
        .and_then(|mut w| w.flush())
        .with_context(|| format!("writing {}", output.display()))?;
    tmp.commit(output)?;
    Ok(h)
}

fn build(mut b: BuildArgs, progress: kiln::progress::Progress) -> Result<ExitCode> {
    let progress = if b.quiet {
        kiln::progress::Progress::new(kiln::progress::Mode::Never)
    } else {
        progress
    };
    // A context archive (`-` for standard input, or a tar file), as
    // `docker build - < context.tar.gz`: unpacked, and built as it is.
    let _unpacked = if !b.all && kiln::context::archive::is_archive(&b.ctx.image_dir) {
        let u = kiln::context::archive::unpack_named(&b.ctx.image_dir).with_context(|| {
            format!("reading the context archive {}", b.ctx.image_dir.display())
        })?;
        b.ctx.image_dir = u.path();
        b.ctx.topsrcdir = Some(u.path());
        b.ctx.plain_dockerfile = true;
        Some(u)
    } else {
        None
    };
    let staged = if b.all {
        None
    } else {
        output_arg::apply(&mut b)?
    };
    let opts = build_options(&b, progress)?;
    if b.all {
        return build_all(&b, opts);
    }
    if !b.more.is_empty() {
        bail!("several image directories given: add --all to build them all (with --out-dir)");
    }
    let (r, indexed) = if b.index.no_index {
        (kiln::build(&b.ctx.image_dir, &opts)?, None)
    } else {
        let io = b.index.options(&image_name(&b.ctx.image_dir))?;
        let c = kiln::index::build_cached(&b.ctx.image_dir, &opts, &io, None)?;
        (c.result, Some((c.index_digest, c.route)))
    };
    if b.check_reproducible {
        let again = kiln::assemble::check_reproducible(&b.ctx.image_dir, &opts, &r)?;
        match &again.report {
            None => eprintln!(
                "kiln: reproducible: a second build ({}) gave the same manifest digest {}",
                again.conditions, again.second.manifest_digest
            ),
            Some(report) => {
                eprint!("{}", kiln::diff::render(report));
                let paths = report
                    .layers
                    .iter()
                    .flat_map(|l| &l.entries)
                    .map(|e| e.path.as_str());
                if !b.reproducible && kiln::sandbox::reproducible::handles_all(paths) {
                    eprintln!("kiln: every file that differs is a log or cache that dpkg, apt, ldconfig or update-alternatives writes with the build's clock: build with --reproducible to remove or empty them (docs/run.md says which and how)");
                }
                bail!(
                    "not reproducible: the second build ({}) gave {} instead of {} (the report above compares them)",
                    again.conditions,
                    again.second.manifest_digest,
                    r.manifest_digest
                );
            }
        }
    }
    if b.push {
        push_tags(&r.output, &opts.tags, &b.index.net)?;
    }
    // --digest-file ends in a newline as it always has; --iidfile holds
    // the bare id, as docker and buildah write it.
    let files = [
        (&b.digest_file, format!("{}\n", r.manifest_digest)),
        (&b.iidfile, r.image_id.to_string()),
    ];
    for (file, text) in files {
        if let Some(f) = file {
            kiln::sink::file::write_atomic(f, text.as_bytes())
                .with_context(|| format!("writing {}", f.display()))?;
        }
    }
    if let Some(s) = staged.as_ref().filter(|s| s.stdout) {
        s.to_stdout(&r.output)?;
    }
    // With the image on stdout, the summary goes to stderr.
    let to_stderr = staged.as_ref().is_some_and(|s| s.stdout);
    macro_rules! say {
        ($($t:tt)*) => {
            if to_stderr { eprintln!($($t)*) } else { println!($($t)*) }
        };
    }
    if b.quiet {
        println!("{}", r.image_id);
    } else if b.ctx.json {
        let mut v = serde_json::to_value(&r)?;
        if let Some((digest, route)) = &indexed {
            v["index_digest"] = serde_json::json!(digest);
            v["route"] = serde_json::json!(route);
        }
        print_json(&v)?;
    } else {
        say!("context hash:    {}", r.context_hash);
        if let Some((digest, route)) = &indexed {
            say!("index digest:    {digest}");
            say!("route:           {route}");
        }
        say!("image id:        {}", r.image_id);
        say!("manifest digest: {}", r.manifest_digest);
        say!("tags:            {}", r.tags.join(", "));
        let size: u64 = r.layers.iter().map(|l| l.size).sum();
        say!(
            "{}: {} {} ({} layers, {} bytes of layers)",
            r.status,
            r.format,
            if to_stderr {
                "(standard output)".to_string()
            } else {
                r.output.display().to_string()
            },
            r.layers.len(),
            size
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn routes(b: BuildArgs, progress: kiln::progress::Progress) -> Result<ExitCode> {
    let opts = build_options(&b, progress)?;
    let io = b.index.options(&image_name(&b.ctx.image_dir))?;
    let r = kiln::index::routes(&b.ctx.image_dir, &opts, &io)?;
    if b.ctx.json {
        print_json(&r)?;
    } else {
        println!("context hash: {}", r.context_hash);
        println!("index digest: {}", r.index_digest);
        for (route, hit) in r.lookup.iter().zip(&r.hits) {
            let hit = match hit {
                Some(e) => format!("hit {}", e.manifest_digest),
                None => "miss".into(),
            };
            println!("lookup {route} ({hit})");
        }
        for route in &r.write {
            println!("write  {route}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn diff(a: &str, b: &str, json: bool, net: &NetArgs) -> Result<ExitCode> {
    let ra = kiln::source::open(a, net.insecure)?;
    let rb = kiln::source::open(b, net.insecure)?;
    let report = kiln::diff::diff(ra.as_ref(), rb.as_ref())?;
    if json {
        print_json(&report)?;
    } else {
        print!("{}", kiln::diff::render(&report));
    }
    Ok(if report.identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn verify(image: &str, json: bool, net: &NetArgs) -> Result<ExitCode> {
    let r = kiln::source::open(image, net.insecure)?;
    let report = kiln::verify::verify(r.as_ref());
    if json {
        print_json(&report)?;
    } else if report.problems.is_empty() {
        println!(
            "ok: {image} ({}): {} manifest(s) {}, {} blobs and {} layers verified",
            report.format,
            report.manifests.len(),
            report.manifests.join(", "),
            report.blobs_checked,
            report.layers_checked
        );
    } else {
        println!(
            "{image} ({}): {} problem(s):",
            report.format,
            report.problems.len()
        );
        for p in &report.problems {
            println!("  {}: {}", p.blob, p.message);
        }
    }
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn push(image: &Path, to: &str, mount_from: Vec<String>, net: &NetArgs, json: bool) -> Result<()> {
    let r = Reference::parse_remote(to).map_err(|m| anyhow!("--to {m}"))?;
    if r.digest.is_some() {
        bail!("--to {to}: push to a tag or to a bare repository, not to a digest");
    }
    let client = std::sync::Arc::new(net.client(r.host())?);
    let src = ImageFile::open(image)?;
    let (desc, _) = kiln::source::first_image(&src)?;
    let opts = kiln::registry::PushOptions {
        chunk: net.chunk_size,
        mount_from,
    };
    let tags: Vec<String> = r.tag.iter().cloned().collect();
    let report = kiln::registry::push(&client, &src, &desc, r.path(), &tags, &opts)
        .with_context(|| format!("pushing {} to {to}", image.display()))?;
    if json {
        print_json(&report)?;
    } else {
        println!("manifest digest: {}", desc.digest);
        println!(
            "pushed {}{}: {} blob(s) uploaded ({} bytes), {} already there, {} mounted",
            r.repository,
            tags.first().map(|t| format!(":{t}")).unwrap_or_default(),
            report.uploaded,
            report.bytes_uploaded,
            report.present,
            report.mounted
        );
    }
    Ok(())
}

/// `kiln build --push`: the built image to every tag's registry; each
/// repository gets the blobs and the manifest once, then a PUT per tag.
fn push_tags(output: &Path, tags: &[String], net: &NetArgs) -> Result<()> {
    let mut repos: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for t in tags {
        let r = Reference::parse_remote(t).map_err(|m| anyhow!("--push: -t {m}"))?;
        let tag = r
            .tag
            .clone()
            .ok_or_else(|| anyhow!("--push: -t {t} names no tag to push"))?;
        repos
            .entry((r.host().to_string(), r.path().to_string()))
            .or_default()
            .push(tag);
    }
    let src = ImageFile::open(output)?;
    let (desc, _) = kiln::source::first_image(&src)?;
    let opts = kiln::registry::PushOptions {
        chunk: net.chunk_size,
        mount_from: Vec::new(),
    };
    for ((host, path), tags) in &repos {
        let client = std::sync::Arc::new(net.client(host)?);
        let report = kiln::registry::push(&client, &src, &desc, path, tags, &opts)
            .with_context(|| format!("pushing {} to {host}/{path}", output.display()))?;
        for t in tags {
            eprintln!("kiln: pushed {host}/{path}:{t} ({})", desc.digest);
        }
        eprintln!(
            "kiln: {host}/{path}: {} blob(s) uploaded ({} bytes), {} already there",
            report.uploaded, report.bytes_uploaded, report.present
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn pull(
    reference: &str,
    all_platforms: bool,
    mirrors: &[String],
    store: &StoreArg,
    names: Vec<String>,
    output: Option<PathBuf>,
    net: &NetArgs,
    json: bool,
) -> Result<()> {
    let r = Reference::parse(reference).map_err(|m| anyhow!("{m}"))?;
    let s = store.store();
    let names = if names.is_empty() {
        // A pinned digest names no tag to keep (as before the image core:
        // `name:tag@sha256:…` is stored as `name:pulled`).
        vec![match (&r.digest, &r.tag) {
            (Some(_), _) => format!("{}:pulled", r.repository),
            (None, Some(t)) => format!("{}:{t}", r.repository),
            (None, None) => format!("{}:latest", r.repository),
        }]
    } else {
        names
    };
    let sources = kiln::registry::Sources::new(mirrors, net.insecure);
    let desc = kiln::registry::pull_any(&r, &sources, &s, &names, all_platforms)
        .with_context(|| format!("pulling {reference}"))?
        .map_err(|tried| anyhow!("{reference}: no registry has it ({})", tried.join("; ")))?;
    if let Some(out) = &output {
        let sink = kiln::sink::Output::create(out, Format::from_path(out), 0)?;
        kiln::copy(&s, &sink, &kiln::Selection::image(&desc, &names))?;
    }
    if json {
        print_json(
            &serde_json::json!({ "manifest_digest": desc.digest, "names": names, "store": s.dir, "output": output }),
        )?;
    } else {
        println!("manifest digest: {}", desc.digest);
        println!("stored as {} in {}", names.join(", "), s.dir.display());
    }
    Ok(())
}

fn build_options(b: &BuildArgs, progress: kiln::progress::Progress) -> Result<BuildOptions> {
    let context = context_options(&b.ctx)?;
    let output = b
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.tar", image_name(&b.ctx.image_dir))));
    let asked = b.format.map(|f| match f {
        FormatArg::OciDir => Format::OciDir,
        FormatArg::OciArchive => Format::OciArchive,
        FormatArg::DockerArchive => Format::DockerArchive,
        FormatArg::DockerArchiveZstd => Format::DockerArchiveZstd,
    });
    let format = Format::choose(asked, &output);
    let compression = match b.layer_compression {
        Some(CompressionArg::Zstd) => Compression::Zstd(b.compression_level.unwrap_or(3)),
        Some(CompressionArg::Gzip) => {
            Compression::Gzip(b.compression_level.unwrap_or(6).clamp(0, 9) as u32)
        }
        Some(CompressionArg::None) => Compression::None,
        None => format.default_compression(b.compression_level),
    };
    match (compression, b.compression_level) {
        (Compression::Zstd(l), _) if !(1..=22).contains(&l) => {
            bail!("--compression-level {l}: zstd levels run from 1 to 22")
        }
        (Compression::Gzip(_), Some(l)) if !(0..=9).contains(&l) => {
            bail!("--compression-level {l}: gzip levels run from 0 to 9")
        }
        _ => {}
    }
    let timestamp = match b.timestamp {
        Some(t) => t,
        None => match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(s) if !s.is_empty() => s
                .trim()
                .parse()
                .map_err(|_| anyhow!("SOURCE_DATE_EPOCH={s}: expected whole seconds since 1970"))?,
            _ => 0,
        },
    };
    let tags = if b.tags.is_empty() {
        vec![kiln::default_tag(&b.ctx.image_dir)]
    } else {
        b.tags.clone()
    };
    for t in &tags {
        Reference::parse(t).map_err(|m| anyhow!("-t {m}"))?;
    }
    let stores = kiln::store::Stores::search_order(&b.stores, Some(&context.topsrcdir));
    let opts = BuildOptions {
        context,
        algorithm: b.algorithm.into(),
        mode_policy: b.mode_policy.into(),
        tags,
        compression,
        timestamp,
        format,
        output,
        target: b.target.clone(),
        hash_cache: b.hash_cache.clone().map(cache_path),
        stores,
        parents: Default::default(),
        progress,
        network: kiln::sandbox::Network::parse(&b.network).unwrap_or_default(),
        allow_network_host: b.allow.iter().any(|a| a == "network.host"),
        isolation: kiln::sandbox::container::Isolation::parse(&b.isolation).unwrap_or_default(),
        args_in_from: b.build_args_in_from,
        secrets: secrets(&b.secrets)?,
        steps: None,
        pull: match b.pull.as_deref() {
            None | Some("never") | Some("false") => kiln::assemble::PullPolicy::Never,
            Some("missing") | Some("true") => kiln::assemble::PullPolicy::Missing,
            Some("always") => kiln::assemble::PullPolicy::Always,
            Some(other) => bail!("--pull={other}: expected missing, always or never"),
        },
        sources: kiln::registry::Sources::new(&b.mirrors, b.index.net.insecure),
        reproducible: b.reproducible,
        labels: b
            .labels
            .iter()
            .map(|l| match l.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (l.clone(), String::new()),
            })
            .collect(),
    };
    if let Some(k) = opts.labels.keys().find(|k| k.is_empty()) {
        bail!(
            "--label ={}: a label needs a key (KEY=VALUE)",
            opts.labels[k]
        );
    }
    Ok(opts)
}

/// The private files holding `--secret id=ID,env=VAR` values: removed when
/// kiln ends, and by an interrupt.
static SECRET_FILES: std::sync::Mutex<Vec<kiln::interrupt::TempFile>> =
    std::sync::Mutex::new(Vec::new());

/// `--secret id=ID,src=FILE` (or `env=VAR`, copied to a private file that
/// lives only as long as the build).
fn secrets(specs: &[String]) -> Result<std::collections::BTreeMap<String, PathBuf>> {
    let mut out = std::collections::BTreeMap::new();
    for spec in specs {
        let kv: std::collections::BTreeMap<&str, &str> =
            spec.split(',').filter_map(|p| p.split_once('=')).collect();
        let id = kv
            .get("id")
            .ok_or_else(|| anyhow!("--secret {spec}: expected id=ID,src=FILE"))?;
        let path = match (kv.get("src").or_else(|| kv.get("source")), kv.get("env")) {
            (Some(src), _) => {
                let p = PathBuf::from(src);
                if !p.is_file() {
                    bail!("--secret {spec}: {src} is not a file");
                }
                std::path::absolute(&p)?
            }
            (None, Some(var)) => {
                let value = std::env::var(var)
                    .map_err(|_| anyhow!("--secret {spec}: ${var} is not set"))?;
                let f = kiln::interrupt::TempFile::new(id, value.as_bytes())
                    .context("writing the secret to a private temporary file")?;
                let p = f.path().to_path_buf();
                SECRET_FILES
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(f);
                p
            }
            _ => bail!("--secret {spec}: expected id=ID,src=FILE or id=ID,env=VAR"),
        };
        out.insert(id.to_string(), path);
    }
    Ok(out)
}

fn build_all(b: &BuildArgs, opts: BuildOptions) -> Result<ExitCode> {
    if b.output.is_some()
        || !b.tags.is_empty()
        || b.target.is_some()
        || b.digest_file.is_some()
        || b.iidfile.is_some()
        || b.ctx.file.is_some()
        || b.quiet
    {
        bail!("--all builds many images: use --out-dir DIR instead of -o, and leave out -t, -f, -q, --target, --digest-file and --iidfile");
    }
    if b.check_reproducible {
        bail!("--check-reproducible checks one image: build each image of the tree with it (kiln build DIR --check-reproducible), not --all");
    }
    let out_dir = b
        .out_dir
        .clone()
        .ok_or_else(|| anyhow!("--all needs --out-dir DIR for the images it writes"))?;
    let mut inputs = vec![b.ctx.image_dir.clone()];
    inputs.extend(b.more.iter().cloned());
    let images = kiln::tree::discover(&inputs, &opts.context.topsrcdir)?;
    let json = b.ctx.json;
    let mut io = b.index.options("")?;
    // --no-index: a throwaway index and store, so nothing is kept.
    let scratch = tempfile::tempdir().context("creating a temporary index")?;
    if b.index.no_index {
        io.index = kiln::index::LocalIndex::new(scratch.path().join("index"));
        io.store = Store::new(scratch.path().join("store"), "this run");
        // Nothing kept, nothing looked up: the user's step cache names
        // blobs of the user store, not of this scratch one.
        io.step_cache = false;
    }
    let lines = kiln::tree::build_all(
        &images,
        &opts,
        &io,
        &out_dir,
        &|l| {
            if json {
                return;
            }
            match (&l.manifest_digest, &l.error) {
                (Some(d), _) => println!(
                    "{}\t{}\t{}\t{}\t{:.2}s",
                    l.name, l.context_hash, d, l.status, l.seconds
                ),
                (None, e) => println!("{}\t{}\t{}", l.name, l.status, e.as_deref().unwrap_or("")),
            }
        },
        b.keep_going,
    )?;
    if json {
        print_json(&lines)?;
    }
    let count = |s: &str| lines.iter().filter(|l| l.status == s).count();
    let (failed, blocked) = (count("failed"), count("blocked"));
    if failed + blocked > 0 {
        eprintln!(
            "kiln: error: {failed} image(s) failed and {blocked} blocked; {} built, {} up to date",
            count("built"),
            count("up to date")
        );
        return Ok(ExitCode::from(1));
    }
    Ok(ExitCode::SUCCESS)
}
