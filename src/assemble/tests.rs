//! Table tests of the plan and its execution through the library API:
//! stage semantics, COPY/ADD, the filesystem view of a stage and the
//! config, each case a Dockerfile and files in, entries and config out.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use super::{execute, BuildOptions, Dest, Plan};
use crate::context::{Algorithm, ContextOptions, ModePolicy};
use crate::image::Manifest;
use crate::sink::Format;
use crate::source::{read_json, resolve, ImageFile, Source};

/// Options for a build of `<root>/img` (topsrcdir `root`) into `output`:
/// uncompressed OCI archive, timestamp 0, no stores.
fn options(root: &Path, output: &Path) -> BuildOptions {
    BuildOptions {
        reproducible: false,
        labels: Default::default(),
        context: ContextOptions {
            topsrcdir: root.to_path_buf(),
            ..Default::default()
        },
        algorithm: Algorithm::KilnV1,
        mode_policy: ModePolicy::Git,
        tags: vec![],
        compression: crate::Compression::None,
        timestamp: 0,
        format: Format::OciArchive,
        output: output.to_path_buf(),
        target: None,
        hash_cache: None,
        progress: crate::progress::Progress::none(),
        stores: crate::store::Stores::default(),
        parents: Default::default(),
        network: Default::default(),
        allow_network_host: false,
        isolation: Default::default(),
        args_in_from: false,
        secrets: Default::default(),
        steps: None,
        pull: Default::default(),
        sources: Default::default(),
    }
}

/// Every layer of the built image as `path kind mode uid:gid [content|target]` lines.
fn built(files: &[(&str, &str)], target: Option<&str>) -> (Vec<Vec<String>>, serde_json::Value) {
    let d = tempfile::tempdir().unwrap();
    for (p, c) in files {
        let f = d.path().join("img").join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(&f, c).unwrap();
    }
    let out = d.path().join("out.oci.tar");
    let mut opts = options(d.path(), &out);
    opts.tags = vec!["t:1".into()];
    opts.target = target.map(str::to_string);
    let plan = Plan::new(&d.path().join("img"), &opts, None).unwrap();
    execute(plan, &opts, Dest::Output).unwrap();
    let img = ImageFile::open(&out).unwrap();
    let (desc, _) = crate::source::first_image(&img).unwrap();
    let r = resolve(&img, &desc, None).unwrap();
    let m: Manifest = read_json(&img, &desc, "manifest").unwrap();
    let layers = m.layers.iter().map(|l| entries(&img, l)).collect();
    (layers, serde_json::to_value(&r.config.config).unwrap())
}

fn entries(img: &dyn Source, l: &crate::image::Descriptor) -> Vec<String> {
    let mut ar = tar::Archive::new(img.layer_tar(l).unwrap());
    let mut out = Vec::new();
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let mut content = String::new();
        e.read_to_string(&mut content).unwrap();
        let link = e
            .link_name()
            .unwrap()
            .map(|l| l.display().to_string())
            .unwrap_or_default();
        out.push(format!(
            "{path} {} {:o} {}:{} {content}{link}",
            h.entry_type().as_byte() as char,
            h.mode().unwrap(),
            h.uid().unwrap(),
            h.gid().unwrap()
        ));
    }
    out
}

#[test]
fn stage_semantics_and_copy_table() {
    type Case<'a> = (
        &'a str,
        &'a [(&'a str, &'a str)],
        Option<&'a str>,
        &'a [&'a [&'a str]],
        &'a [(&'a str, &'a str)],
    );
    let cases: &[Case] = &[
        (
            "COPY of one file into a new directory",
            &[("Dockerfile", "FROM scratch\nCOPY a.txt /dir/\n"), ("a.txt", "A")],
            None,
            &[&["dir/ 5 755 0:0 ", "dir/a.txt 0 644 0:0 A"]],
            &[],
        ),
        (
            "--chown and --chmod set owner and mode",
            &[("Dockerfile", "FROM scratch\nCOPY --chown=7:8 --chmod=600 a.txt /a\n"), ("a.txt", "A")],
            None,
            &[&["a 0 600 7:8 A"]],
            &[],
        ),
        (
            "WORKDIR that creates a directory is a layer; ENV and CMD are config",
            &[("Dockerfile", "FROM scratch\nENV X=1\nWORKDIR /w\nCMD [\"run\"]\n")],
            None,
            &[&["w/ 5 755 0:0 "]],
            &[("WorkingDir", "\"/w\""), ("Cmd", "[\"run\"]"), ("Env", "[\"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\",\"X=1\"]")],
        ),
        (
            "ARG expands in COPY, a later stage copies from an earlier one",
            &[
                ("Dockerfile", "FROM scratch AS one\nARG F=b.txt\nCOPY $F /in-one\nFROM scratch\nCOPY --from=one /in-one /copied\n"),
                ("b.txt", "B"),
            ],
            None,
            &[&["copied 0 644 0:0 B"]],
            &[],
        ),
        (
            "--target builds the named stage only; an unused broken stage never runs",
            &[
                ("Dockerfile", "FROM scratch AS first\nCOPY a.txt /a\nFROM scratch\nCOPY missing /x\n"),
                ("a.txt", "A"),
            ],
            Some("first"),
            &[&["a 0 644 0:0 A"]],
            &[],
        ),
        (
            ".dockerignore hides files from COPY of a directory",
            &[
                ("Dockerfile", "FROM scratch\nCOPY . /src/\n"),
                (".dockerignore", "*.log\nDockerfile\n.dockerignore\n"),
                ("keep.txt", "K"),
                ("drop.log", "D"),
            ],
            None,
            &[&["src/ 5 755 0:0 ", "src/keep.txt 0 644 0:0 K"]],
            &[],
        ),
    ];
    for (name, files, target, want_layers, want_config) in cases {
        let (layers, config) = built(files, *target);
        let want: Vec<Vec<String>> = want_layers
            .iter()
            .map(|l| l.iter().map(|s| s.to_string()).collect())
            .collect();
        assert_eq!(layers, want, "{name}");
        let got: BTreeMap<String, String> = config
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect();
        for (k, v) in *want_config {
            assert_eq!(got.get(*k).map(String::as_str), Some(*v), "{name}: {k}");
        }
    }
}

#[test]
fn the_plan_resolves_bases_once_and_a_pinned_digest_needs_no_store() {
    let d = tempfile::tempdir().unwrap();
    let pin = format!("sha256:{}", "ab".repeat(32));
    std::fs::create_dir_all(d.path().join("img")).unwrap();
    std::fs::write(
        d.path().join("img/Dockerfile"),
        format!("FROM example.org/base@{pin}\nCOPY --from=example.org/other:1 /x /x\n"),
    )
    .unwrap();
    let mut opts = options(d.path(), &d.path().join("o.tar"));
    opts.stores = crate::store::Stores {
        list: vec![crate::store::Store::new(d.path().join("empty"), "--store")],
    };
    let plan = Plan::new(&d.path().join("img"), &opts, None).unwrap();
    let refs: Vec<&str> = plan
        .bases
        .list
        .iter()
        .map(|b| b.reference.as_str())
        .collect();
    assert_eq!(
        refs,
        [
            "example.org/base@".to_string() + &pin,
            "example.org/other:1".into()
        ]
    );
    assert_eq!(plan.bases.list[0].digest.as_deref(), Some(pin.as_str()));
    // The unpinned COPY --from image is in no store: the index digest names its line.
    let e = plan.parent_digests(&opts).unwrap_err().to_string();
    assert!(
        e.contains(":2:") && e.contains("example.org/other:1"),
        "{e}"
    );
}
