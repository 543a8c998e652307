//! The `# %include` / `# %ARG` scanner: a fuzzed Dockerfile in a small
//! image directory, collected with an argument and an include root. It
//! must never read outside the temporary tree, panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img");
    std::fs::create_dir_all(img.join("sub")).unwrap();
    std::fs::create_dir_all(dir.path().join("src/inc")).unwrap();
    std::fs::write(dir.path().join("src/inc/file"), b"x").unwrap();
    std::fs::write(img.join("sub/a"), b"a").unwrap();
    std::fs::write(img.join("Dockerfile"), data).unwrap();
    let mut args = std::collections::BTreeMap::new();
    args.insert("NAME".to_string(), "src/inc".to_string());
    let opts = kiln::ContextOptions {
        topsrcdir: dir.path().to_path_buf(),
        args,
        run_task_dir: None,
        taskgraph_names: data.first().is_some_and(|b| b & 1 == 1),
    };
    if let Ok(ctx) = kiln::Context::collect(&img, &opts) {
        for p in ctx.entries.keys() {
            // Every entry is inside the context: no absolute or climbing paths.
            assert!(!p.starts_with(b"/"), "{p:?}");
            assert!(!p.split(|&c| c == b'/').any(|c| c == b".."), "{p:?}");
        }
        let _ = kiln::context::taskgraph::write_context_tar(&ctx, std::io::sink());
    }
});
