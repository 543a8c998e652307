//! Criterion benches: the kiln-v1 and taskgraph context hashes and layer
//! writing on a generated tree (seeded, never committed). The comparison
//! against taskgraph, buildah and docker lives in a later runner script.

use std::fs;
use std::path::Path;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kiln::context::{hash, taskgraph, Context, ContextOptions, ModePolicy};
use kiln::layer::{self, Compression, Content, Entries, FileSource, LayerEntry};

/// A tree of `n` files of 200 B – 12 KiB in 100 directories, with a Dockerfile that includes it.
fn generate(root: &Path, n: usize) {
    let mut rng: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for i in 0..n {
        let dir = root.join(format!("tree/d{}", i % 100));
        fs::create_dir_all(&dir).unwrap();
        let size = 200 + (next() % (12 * 1024 - 200)) as usize;
        let data: Vec<u8> = (0..size).map(|_| next() as u8).collect();
        fs::write(dir.join(format!("f{i}")), data).unwrap();
    }
    fs::create_dir_all(root.join("img")).unwrap();
    fs::write(
        root.join("img/Dockerfile"),
        "# %include tree\nFROM scratch\nCOPY topsrcdir/tree /tree\n",
    )
    .unwrap();
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path(), 5000);
    let opts = ContextOptions {
        topsrcdir: dir.path().to_path_buf(),
        ..Default::default()
    };
    let ctx = Context::collect(&dir.path().join("img"), &opts).unwrap();
    let bytes = ctx.total_size();

    let mut g = c.benchmark_group("context");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    g.bench_function("collect", |b| {
        b.iter(|| Context::collect(&dir.path().join("img"), &opts).unwrap())
    });
    g.bench_function("kiln-v1", |b| {
        b.iter(|| hash::kiln_v1(&ctx, ModePolicy::Git).unwrap())
    });
    g.bench_function("taskgraph", |b| b.iter(|| taskgraph::hash(&ctx).unwrap()));
    g.finish();

    let mut entries = Entries::new();
    for (p, e) in &ctx.entries {
        if let kiln::context::Source::File(path) = &e.source {
            entries.insert(
                p.clone(),
                LayerEntry {
                    content: Content::File {
                        source: FileSource::Path(path.clone()),
                        size: e.size,
                    },
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
            );
        }
    }
    let out = tempfile::tempdir().unwrap();
    let entries = layer::Planned::Entries(entries);
    let mut g = c.benchmark_group("layer");
    g.throughput(Throughput::Bytes(bytes));
    g.sample_size(10);
    for (name, comp) in [
        ("none", Compression::None),
        ("zstd-3", Compression::Zstd(3)),
        ("gzip-6", Compression::Gzip(6)),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| {
                layer::write_layer(
                    &entries,
                    0,
                    comp,
                    &kiln::sink::file::BlobDir::plain(out.path()).unwrap(),
                    &kiln::progress::Step::none(),
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

criterion_group!(kiln_benches, benches);
criterion_main!(kiln_benches);
