//! The Dockerfile front end: parse, then expand every instruction's text
//! with Docker's rules. Any input must give Ok or Err, never a panic or hang.
#![no_main]

use kiln::dockerfile::expand::{expand_vars_only, expand_word, split_words, Vars};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut vars = Vars::new();
    vars.insert("A".into(), "a b".into());
    vars.insert("EMPTY".into(), String::new());
    if let Ok(df) = kiln::dockerfile::parse(text) {
        for ins in &df.instructions {
            for w in split_words(&ins.text, df.escape) {
                let _ = expand_word(&w, &vars, df.escape);
                let _ = expand_vars_only(&w, &vars, df.escape);
            }
        }
    }
    let _ = expand_word(text, &vars, '\\');
    let _ = expand_word(text, &vars, '`');
});
