//! The machine's sha256 limit, for benches/compare.sh: in-memory buffers
//! hashed with the same sha2 crate kiln uses, on one core and on all cores.
//! Prints `one_core_GBps all_cores_GBps sha_ni(yes|no)`.

use std::time::Instant;

use sha2::{Digest, Sha256};

fn rate(threads: usize) -> f64 {
    let buf = vec![0x5au8; 64 << 20];
    let rounds = 16;
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut h = Sha256::new();
                for _ in 0..rounds {
                    h.update(&buf);
                }
                std::hint::black_box(h.finalize());
            });
        }
    });
    (threads * rounds * buf.len()) as f64 / start.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let one = (0..3).map(|_| rate(1)).fold(0.0, f64::max);
    let all = (0..3).map(|_| rate(cores)).fold(0.0, f64::max);
    let ni = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.contains(" sha_ni"))
        .unwrap_or(false);
    println!("{one:.3} {all:.3} {}", if ni { "yes" } else { "no" });
}
