//! `kiln build --reproducible`: what a package manager leaves in a RUN's
//! layer that carries the build's clock, handled file by file so that two
//! builds of an `apt-get install` step give the same layer, with nothing
//! the image needs removed. The anchor is the reproducible-containers
//! project's practice (drop the logs and caches that carry build-time
//! clocks); each rule here says what it does to which file and why.
//!
//! A rule applies only to what the step itself wrote (the layer's
//! entries); files below it are never touched. A removed file that a
//! lower layer also holds becomes a whiteout, so no stale copy shows
//! through. What was done is returned for the image's history.

use super::capture::{Changes, Found};

/// What a rule does to a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Left out of the layer (a whiteout where a lower layer has it): a
    /// cache its program regenerates when it is missing.
    Remove,
    /// Kept, empty: a log its program appends to; the file, its owner and
    /// mode stay.
    Empty,
}

/// One rule: a path pattern (a `*` matches any part of one name),
/// the action, and why.
pub struct Rule {
    pub pattern: &'static str,
    pub action: Action,
    pub why: &'static str,
}

/// The rules, for dpkg, apt, debconf, ldconfig and update-alternatives.
pub const RULES: &[Rule] = &[
    Rule {
        pattern: "var/cache/apt/pkgcache.bin",
        action: Action::Remove,
        why: "apt's binary package cache (holds build-time stamps; apt rebuilds it when missing)",
    },
    Rule {
        pattern: "var/cache/apt/srcpkgcache.bin",
        action: Action::Remove,
        why: "apt's binary source cache (as pkgcache.bin)",
    },
    Rule {
        pattern: "var/cache/ldconfig/aux-cache",
        action: Action::Remove,
        why: "ldconfig's auxiliary cache of file times (ldconfig rebuilds it; /etc/ld.so.cache is kept)",
    },
    Rule {
        pattern: "var/cache/debconf/*-old",
        action: Action::Remove,
        why: "debconf's backups of its databases (the databases are kept)",
    },
    Rule {
        pattern: "var/log/apt/history.log",
        action: Action::Empty,
        why: "apt's log of this build's times",
    },
    Rule {
        pattern: "var/log/apt/term.log",
        action: Action::Empty,
        why: "apt's terminal log with this build's times",
    },
    Rule {
        pattern: "var/log/apt/eipp.log.xz",
        action: Action::Remove,
        why: "apt's compressed solver log with this build's times",
    },
    Rule {
        pattern: "var/log/dpkg.log",
        action: Action::Empty,
        why: "dpkg's log of this build's times",
    },
    Rule {
        pattern: "var/log/alternatives.log",
        action: Action::Empty,
        why: "update-alternatives' log of this build's times",
    },
];

fn matches(pattern: &str, path: &[u8]) -> bool {
    match pattern.split_once('*') {
        Some((prefix, suffix)) => {
            path.len() >= prefix.len() + suffix.len()
                && path.starts_with(prefix.as_bytes())
                && path.ends_with(suffix.as_bytes())
                && !path[prefix.len()..path.len() - suffix.len()].contains(&b'/')
        }
        None => path == pattern.as_bytes(),
    }
}

/// The rule for a path, if any.
pub fn rule(path: &[u8]) -> Option<&'static Rule> {
    RULES.iter().find(|r| matches(r.pattern, path))
}

/// Applies the rules to a step's changes; `below` says whether a lower
/// layer holds a path. Returns what was done, one line per file
/// (`removed PATH`, `emptied PATH`), sorted.
pub fn apply(found: &mut Changes, below: &dyn Fn(&[u8]) -> bool) -> Vec<String> {
    let mut done = Vec::new();
    let paths: Vec<Vec<u8>> = found
        .iter()
        .filter(|(_, (w, _))| matches!(w, Found::File))
        .map(|(k, _)| k.clone())
        .collect();
    for path in paths {
        let Some(r) = rule(&path) else { continue };
        let shown = String::from_utf8_lossy(&path).into_owned();
        match r.action {
            Action::Remove if below(&path) => {
                found.insert(path, (Found::Whiteout, None));
                done.push(format!("removed {shown}"));
            }
            Action::Remove => {
                found.remove(&path);
                done.push(format!("removed {shown}"));
            }
            Action::Empty => {
                if let Some(slot) = found.get_mut(&path) {
                    slot.0 = Found::Empty;
                }
                done.push(format!("emptied {shown}"));
            }
        }
    }
    done.sort();
    done
}

/// Checks what a layer's annotation says `--reproducible` did against
/// the layer itself (a step cache entry is not trusted): every line is
/// `removed PATH` or `emptied PATH` for a path whose rule says so, a
/// removed path is not in the layer, an emptied one is an empty file.
pub fn verify_note(note: &str, layer: &crate::layer::scan::Scan) -> Result<(), String> {
    use crate::layer::scan::Kind;
    for line in note.lines() {
        let (action, path) = match line.split_once(' ') {
            Some(("removed", p)) => (Action::Remove, p),
            Some(("emptied", p)) => (Action::Empty, p),
            _ => return Err(format!("its reproducible annotation has the line {line:?}")),
        };
        if rule(path.as_bytes()).map(|r| r.action) != Some(action) {
            return Err(format!(
                "its reproducible annotation says {line:?}, which no rule does"
            ));
        }
        let member = layer.members.iter().find(|m| m.path == path.as_bytes());
        let borne_out = match (action, member.map(|m| &m.kind)) {
            (Action::Remove, None) => true,
            (Action::Empty, Some(Kind::File { size: 0 })) => true,
            (Action::Empty, Some(Kind::Small(b))) => b.is_empty(),
            _ => false,
        };
        if !borne_out {
            return Err(format!(
                "its reproducible annotation says {line:?}, and the layer says otherwise"
            ));
        }
    }
    Ok(())
}

/// Whether every path is one a rule handles (for `--check-reproducible`'s
/// suggestion).
pub fn handles_all<'a>(paths: impl IntoIterator<Item = &'a str>) -> bool {
    let mut any = false;
    for p in paths {
        if rule(p.trim_start_matches('/').as_bytes()).is_none() {
            return false;
        }
        any = true;
    }
    any
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_names() {
        assert!(rule(b"var/cache/apt/pkgcache.bin").is_some());
        assert!(rule(b"var/cache/debconf/config.dat-old").is_some());
        assert!(rule(b"var/cache/debconf/config.dat").is_none());
        assert!(rule(b"var/cache/debconf/x/y-old").is_none());
        assert!(rule(b"var/log/dpkg.log.1").is_none());
        assert!(handles_all([
            "var/log/dpkg.log",
            "var/cache/ldconfig/aux-cache"
        ]));
        assert!(!handles_all(["var/log/dpkg.log", "usr/bin/git"]));
        assert!(!handles_all([]));
    }
}
