//! `.dockerignore` parsing and matching: the first line is a path, the
//! rest the ignore file.
#![no_main]

use kiln::dockerfile::ignore::{match_path, Ignore};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (path, rules) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    let ig = Ignore::parse(rules);
    let _ = ig.is_ignored(path);
    for line in rules.split(|&b| b == b'\n').take(8) {
        let _ = match_path(line, path);
    }
});
