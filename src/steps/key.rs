//! The step key: one canonical, injective encoding of everything a layer
//! depends on, hashed with sha256.
//!
//! A key is a sequence of typed fields. Every field is written as its name
//! (length-prefixed), a type tag, and its value: bytes length-prefixed, a
//! number as eight big-endian bytes, a list as its length then each item
//! length-prefixed. No separator can occur inside a value, so no two
//! different sequences of fields encode to the same bytes, whatever the
//! values hold (newlines, tabs, NULs, invalid UTF-8). Nothing is encoded
//! through `{:?}`: every enum names itself ([`LayerFormat`]).
//!
//! The same fields describe a layer's entries ([`StepKey::new`] with kind
//! `entries`) and the trees a RUN binds, so a step key holds no lossy text.

use sha2::{Digest as _, Sha256};

/// Changes whenever what a key means, or what a layer holds, changes.
pub const VERSION: &str = "kiln-steps-2";

const BYTES: u8 = 1;
const NUMBER: u8 = 2;
const LIST: u8 = 3;

/// A step key under construction.
#[derive(Clone)]
pub struct StepKey {
    h: Sha256,
}

impl StepKey {
    /// A key of a `kind` of step (`run`, `layer`, `entries`, `tree`)
    /// whose parent is `parent` (a key, `image@sha256:…`, or `scratch`).
    pub fn new(kind: &str, parent: &str) -> StepKey {
        let mut k = StepKey { h: Sha256::new() };
        k.text("version", VERSION)
            .text("kind", kind)
            .text("parent", parent);
        k
    }

    fn len(&mut self, n: usize) {
        self.h.update((n as u64).to_be_bytes());
    }

    fn name(&mut self, name: &str, tag: u8) {
        self.len(name.len());
        self.h.update(name.as_bytes());
        self.h.update([tag]);
    }

    /// A field of raw bytes (a path, a link target).
    pub fn bytes(&mut self, name: &str, value: &[u8]) -> &mut StepKey {
        self.name(name, BYTES);
        self.len(value.len());
        self.h.update(value);
        self
    }

    /// A text field.
    pub fn text(&mut self, name: &str, value: &str) -> &mut StepKey {
        self.bytes(name, value.as_bytes())
    }

    /// A number.
    pub fn number(&mut self, name: &str, value: u64) -> &mut StepKey {
        self.name(name, NUMBER);
        self.h.update(value.to_be_bytes());
        self
    }

    /// A list of byte strings (argv, SHELL, mounts, ids).
    pub fn list<I, T>(&mut self, name: &str, items: I) -> &mut StepKey
    where
        I: IntoIterator<Item = T>,
        T: AsRef<[u8]>,
    {
        let items: Vec<T> = items.into_iter().collect();
        self.name(name, LIST);
        self.len(items.len());
        for i in &items {
            self.len(i.as_ref().len());
            self.h.update(i.as_ref());
        }
        self
    }

    /// A list of name/value pairs (ENV, ARGs), each side length-prefixed.
    pub fn pairs<'a, I>(&mut self, name: &str, pairs: I) -> &mut StepKey
    where
        I: IntoIterator<Item = (&'a str, &'a str)>,
    {
        self.list(name, pairs.into_iter().flat_map(|(k, v)| [k, v]))
    }

    /// The key: sha256 of the encoding, hex.
    pub fn finish(self) -> String {
        hex::encode(self.h.finalize())
    }
}

/// What a layer's bytes depend on besides its content: kiln's layer
/// format version, the compression, the timestamp and the mode policy.
/// The step key and the index digest's builder line both take it from
/// here, by name, never from `{:?}`.
#[derive(Clone, Copy, Debug)]
pub struct LayerFormat {
    pub compression: crate::layer::Compression,
    pub timestamp: u64,
    pub mode_policy: crate::context::ModePolicy,
    /// `--reproducible`: RUN layers go through `sandbox::reproducible`.
    pub reproducible: bool,
}

impl LayerFormat {
    /// The version of kiln's layer format: bumped whenever the same inputs
    /// would give other layer bytes, so older keys and index entries stop
    /// matching.
    pub const VERSION: u32 = 1;

    /// The format's fields, by name: `layers` (`zstd-3`, `gzip-6`, `none`),
    /// `mtime`, `modes` (`git`, `preserve`), and `runs=reproducible` only
    /// with `--reproducible` (so every other build keeps its digests).
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let compression = match self.compression {
            crate::layer::Compression::Zstd(l) => format!("zstd-{l}"),
            crate::layer::Compression::Gzip(l) => format!("gzip-{l}"),
            crate::layer::Compression::None => "none".to_string(),
        };
        let modes = match self.mode_policy {
            crate::context::ModePolicy::Git => "git",
            crate::context::ModePolicy::Preserve => "preserve",
        };
        let mut f = vec![
            ("layers", compression),
            ("mtime", self.timestamp.to_string()),
            ("modes", modes.to_string()),
        ];
        if self.reproducible {
            f.push(("runs", "reproducible".to_string()));
        }
        f
    }

    /// Adds the format to a key.
    pub fn add_to(&self, key: &mut StepKey) {
        key.number("format.version", Self::VERSION.into());
        for (name, value) in self.fields() {
            key.text(name, &value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(f: impl FnOnce(&mut StepKey)) -> String {
        let mut k = StepKey::new("run", "scratch");
        f(&mut k);
        k.finish()
    }

    #[test]
    fn every_field_changes_the_key() {
        let base = key(|k| {
            k.text("a", "x").number("n", 1).list("l", ["p", "q"]);
        });
        let variants = [
            key(|k| {
                k.text("a", "y").number("n", 1).list("l", ["p", "q"]);
            }),
            key(|k| {
                k.text("b", "x").number("n", 1).list("l", ["p", "q"]);
            }),
            key(|k| {
                k.text("a", "x").number("n", 2).list("l", ["p", "q"]);
            }),
            key(|k| {
                k.text("a", "x").number("n", 1).list("l", ["p", "r"]);
            }),
            key(|k| {
                k.text("a", "x").number("n", 1).list("l", ["q", "p"]);
            }),
            StepKey::new("layer", "scratch").finish(),
            StepKey::new("run", "other").finish(),
        ];
        for v in &variants {
            assert_ne!(&base, v);
        }
        assert_eq!(
            base,
            key(|k| {
                k.text("a", "x").number("n", 1).list("l", ["p", "q"]);
            })
        );
    }

    /// Values that would run together under a separator-based encoding
    /// never give the same key.
    #[test]
    fn no_two_different_inputs_encode_alike() {
        let cases: Vec<String> = vec![
            key(|k| {
                k.text("run", "a\nb");
            }),
            key(|k| {
                k.text("run", "a").text("b", "");
            }),
            key(|k| {
                k.list("argv", ["a\0b"]);
            }),
            key(|k| {
                k.list("argv", ["a", "b"]);
            }),
            key(|k| {
                k.list("argv", ["ab"]);
            }),
            key(|k| {
                k.list("argv", [""; 0]);
            }),
            key(|k| {
                k.list("argv", [""]);
            }),
            key(|k| {
                k.pairs("env", [("A", "1=B"), ("C", "2")]);
            }),
            key(|k| {
                k.pairs("env", [("A", "1"), ("B", "C=2")]);
            }),
            key(|k| {
                k.bytes("link", b"\xff");
            }),
            key(|k| {
                k.bytes("link", b"\xfe");
            }),
            key(|k| {
                k.bytes("link", "\u{fffd}".as_bytes());
            }),
            key(|k| {
                k.text("n", "1");
            }),
            key(|k| {
                k.number("n", 1);
            }),
        ];
        let unique: std::collections::HashSet<&String> = cases.iter().collect();
        assert_eq!(unique.len(), cases.len());
    }

    #[test]
    fn the_layer_format_names_itself() {
        let f = LayerFormat {
            compression: crate::layer::Compression::Gzip(6),
            timestamp: 7,
            mode_policy: crate::context::ModePolicy::Git,
            reproducible: false,
        };
        assert_eq!(
            f.fields()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            "layers=gzip-6 mtime=7 modes=git"
        );
    }
}
