//! The image readers: fuzzed bytes as an image file (tar, image.tar.zst,
//! OCI archive, docker-archive), then everything kiln inspect and
//! kiln store add read from it. Errors are fine; panics, hangs and huge
//! allocations are not.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("image.tar");
    std::fs::write(&f, data).unwrap();
    let Ok(r) = kiln::store::ImageReader::open(&f) else {
        return;
    };
    if let Ok(images) = r.images() {
        for (d, _) in images.iter().take(4) {
            let _ = r.closure(d);
        }
    }
    let _ = r.summary();
    let store = kiln::store::Store::new(dir.path().join("store"), "fuzz");
    let _ = store.add(&r, &["fuzz/x:1".to_string()]);
});
