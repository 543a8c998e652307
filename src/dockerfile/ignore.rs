//! `.dockerignore` with Docker's rules, and the glob matching that COPY/ADD
//! wildcards share with it: Go's `filepath.Match` per path component (`*`,
//! `?`, `[a-z]`, `[^a]`, `\` escapes), plus `**` for any number of components.

/// One token of a compiled component pattern.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    /// A character (or, in a name that is not UTF-8, one raw byte).
    Lit(u32),
    /// `?`: any one character.
    One,
    /// `*`: any run of characters.
    Star,
    /// `[...]`: a class of characters; negated only by `^`, as in Go's
    /// `filepath.Match` (so `[!a]` is the class of `!` and `a`).
    Class {
        negate: bool,
        ranges: Vec<(u32, u32)>,
    },
    /// A malformed pattern (an unterminated class): matches nothing.
    Bad,
}

/// The characters of a name: UTF-8 decoded; a byte that is not part of a
/// valid sequence stands for itself (above the Unicode range, so it never
/// equals a character).
fn chars(b: &[u8]) -> Vec<u32> {
    let mut out = Vec::with_capacity(b.len());
    let mut rest = b;
    while !rest.is_empty() {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.extend(s.chars().map(u32::from));
                break;
            }
            Err(e) => {
                let (ok, bad) = rest.split_at(e.valid_up_to());
                out.extend(std::str::from_utf8(ok).unwrap_or("").chars().map(u32::from));
                let n = e.error_len().unwrap_or(bad.len()).max(1);
                out.extend(bad[..n].iter().map(|&c| 0x11_0000 + u32::from(c)));
                rest = &bad[n..];
            }
        }
    }
    out
}

/// Compiles one component pattern.
fn compile_component(pat: &[u8]) -> Vec<Tok> {
    let p = chars(pat);
    let mut out = Vec::new();
    let mut i = 0;
    let bs = u32::from(b'\\');
    while i < p.len() {
        match char::from_u32(p[i]) {
            Some('*') => out.push(Tok::Star),
            Some('?') => out.push(Tok::One),
            Some('\\') if i + 1 < p.len() => {
                i += 1;
                out.push(Tok::Lit(p[i]));
            }
            Some('[') => {
                let mut j = i + 1;
                let negate = p.get(j) == Some(&u32::from(b'^'));
                if negate {
                    j += 1;
                }
                let mut ranges = Vec::new();
                let mut closed = false;
                let mut first = true;
                while j < p.len() {
                    if p[j] == u32::from(b']') && !first {
                        closed = true;
                        break;
                    }
                    first = false;
                    let mut lo = p[j];
                    if lo == bs && j + 1 < p.len() {
                        j += 1;
                        lo = p[j];
                    }
                    let mut hi = lo;
                    if j + 2 < p.len() && p[j + 1] == u32::from(b'-') && p[j + 2] != u32::from(b']')
                    {
                        j += 2;
                        hi = p[j];
                        if hi == bs && j + 1 < p.len() {
                            j += 1;
                            hi = p[j];
                        }
                    }
                    ranges.push((lo, hi));
                    j += 1;
                }
                if !closed {
                    return vec![Tok::Bad];
                }
                out.push(Tok::Class { negate, ranges });
                i = j;
            }
            _ => out.push(Tok::Lit(p[i])),
        }
        i += 1;
    }
    out
}

fn match_tokens(toks: &[Tok], name: &[u32]) -> bool {
    if toks.contains(&Tok::Bad) {
        return false;
    }
    let (mut t, mut n) = (0usize, 0usize);
    let (mut star_t, mut star_n) = (usize::MAX, 0usize);
    while n < name.len() {
        let step = match toks.get(t) {
            Some(Tok::Star) => {
                star_t = t;
                star_n = n;
                t += 1;
                continue;
            }
            Some(Tok::One) => true,
            Some(Tok::Lit(c)) => *c == name[n],
            Some(Tok::Class { negate, ranges }) => {
                ranges
                    .iter()
                    .any(|&(lo, hi)| lo <= name[n] && name[n] <= hi)
                    != *negate
            }
            Some(Tok::Bad) | None => false,
        };
        if step {
            t += 1;
            n += 1;
            continue;
        }
        if star_t != usize::MAX {
            t = star_t + 1;
            star_n += 1;
            n = star_n;
            continue;
        }
        return false;
    }
    toks[t..].iter().all(|k| *k == Tok::Star)
}

/// Matches one path component against one pattern component (Go `filepath.Match`).
pub fn match_component(pat: &[u8], name: &[u8]) -> bool {
    match_tokens(&compile_component(pat), &chars(name))
}

/// Whether a pattern has glob metacharacters.
pub fn has_magic(p: &[u8]) -> bool {
    p.iter().any(|c| matches!(c, b'*' | b'?' | b'['))
}

fn components(p: &[u8]) -> Vec<&[u8]> {
    p.split(|&c| c == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .collect()
}

/// A path pattern compiled once: components of tokens, `**` spanning any
/// number of components.
#[derive(Clone, Debug)]
pub struct Glob {
    comps: Vec<Option<Vec<Tok>>>,
}

impl Glob {
    pub fn new(pat: &[u8]) -> Glob {
        Glob {
            comps: components(pat)
                .into_iter()
                .map(|c| (c != b"**").then(|| compile_component(c)))
                .collect(),
        }
    }

    /// Whether the slash-separated `path` matches.
    pub fn matches(&self, path: &[u8]) -> bool {
        let names: Vec<Vec<u32>> = components(path).into_iter().map(chars).collect();
        self.matches_chars(&names)
    }

    fn matches_chars(&self, names: &[Vec<u32>]) -> bool {
        // The pattern as an automaton, run over the names: `active` holds
        // each i such that the first i pattern components can match the
        // names read so far. Linear in the path for a literal pattern,
        // O(pattern × path) at worst, and no recursion, so neither a deep
        // path nor a pattern of many `**` can blow the stack or the clock.
        let p = &self.comps;
        let mut seen = vec![usize::MAX; p.len() + 1];
        let add = |set: &mut Vec<usize>, seen: &mut Vec<usize>, step: usize, i: usize| {
            if seen[i] != step {
                seen[i] = step;
                set.push(i);
            }
        };
        // Adds what `**` reaches by matching nothing.
        let close = |set: &mut Vec<usize>, seen: &mut Vec<usize>, step: usize| {
            let mut k = 0;
            while k < set.len() {
                let i = set[k];
                if i < p.len() && p[i].is_none() {
                    add(set, seen, step, i + 1);
                }
                k += 1;
            }
        };
        let mut active = Vec::new();
        add(&mut active, &mut seen, 0, 0);
        close(&mut active, &mut seen, 0);
        for (step, name) in names.iter().enumerate() {
            let step = step + 1;
            let mut next = Vec::new();
            for &i in &active {
                match p.get(i) {
                    None => {}
                    // `**` takes this name and may take more.
                    Some(None) => add(&mut next, &mut seen, step, i),
                    Some(Some(toks)) if match_tokens(toks, name) => {
                        add(&mut next, &mut seen, step, i + 1)
                    }
                    Some(Some(_)) => {}
                }
            }
            close(&mut next, &mut seen, step);
            if next.is_empty() {
                return false;
            }
            active = next;
        }
        active.contains(&p.len())
    }
}

/// Matches a whole slash-separated path against a pattern with `**` support.
pub fn match_path(pat: &[u8], path: &[u8]) -> bool {
    Glob::new(pat).matches(path)
}

/// Parsed `.dockerignore` rules, each compiled once.
#[derive(Clone, Debug, Default)]
pub struct Ignore {
    rules: Vec<(bool, Glob)>,
}

impl Ignore {
    /// Parses `.dockerignore` text.
    pub fn parse(text: &[u8]) -> Ignore {
        let mut rules = Vec::new();
        for line in text.split(|&c| c == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.first() == Some(&b'#') {
                continue;
            }
            let line = trim(line);
            if line.is_empty() {
                continue;
            }
            let (exclude, pat) = match line.strip_prefix(b"!") {
                Some(rest) => (true, trim(rest)),
                None => (false, line),
            };
            let cleaned = clean(pat);
            if cleaned.is_empty() {
                continue;
            }
            rules.push((exclude, Glob::new(&cleaned)));
        }
        Ignore { rules }
    }

    /// Whether `path` (relative to the context root) is ignored: the last rule
    /// matching the path or one of its parents decides.
    pub fn is_ignored(&self, path: &[u8]) -> bool {
        let mut ignored = false;
        let names: Vec<Vec<u32>> = components(path).into_iter().map(chars).collect();
        for (exclude, glob) in &self.rules {
            if (1..=names.len()).any(|k| glob.matches_chars(&names[..k])) {
                ignored = !exclude;
            }
        }
        ignored
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

fn trim(s: &[u8]) -> &[u8] {
    let start = s
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(s.len());
    let end = s
        .iter()
        .rposition(|c| !c.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &s[start..end]
}

/// `filepath.Clean` without the leading slash: `..` stops at the root.
pub fn clean(p: &[u8]) -> Vec<u8> {
    let mut out: Vec<&[u8]> = Vec::new();
    for c in p.split(|&c| c == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out.join(&b'/')
}

#[cfg(test)]
mod tests {

    #[test]
    fn deep_paths_and_many_double_stars_match_without_recursion() {
        // Each pattern: 100,000 components, or 30 `**` (exponential when backtracking).
        let long = "a/".repeat(100_000);
        let path = format!("{long}f");
        assert!(Glob::new(path.as_bytes()).matches(path.as_bytes()));
        assert!(!Glob::new(format!("{long}g").as_bytes()).matches(path.as_bytes()));
        let stars = format!("{}x", "**/".repeat(30));
        let deep = format!("{}y", "a/".repeat(10_000));
        assert!(!Glob::new(stars.as_bytes()).matches(deep.as_bytes()));
        assert!(Glob::new(stars.as_bytes()).matches(format!("{}x", "a/".repeat(10_000)).as_bytes()));
        assert!(Glob::new(b"**").matches(b"a/b"));
        assert!(Glob::new(b"a/**/b").matches(b"a/b"));
        assert!(Glob::new(b"a/**/b").matches(b"a/x/y/b"));
        assert!(!Glob::new(b"a/**/b").matches(b"a/x/y/c"));
    }
    use super::*;

    #[test]
    fn go_match_semantics() {
        assert!(match_component(b"*.txt", b"a.txt"));
        assert!(!match_component(b"*.txt", b"a.txt.bak"));
        assert!(match_component(b"a?c", b"abc"));
        assert!(match_component(b"[a-c]x", b"bx"));
        assert!(!match_component(b"[^a-c]x", b"bx"));
        assert!(match_component(b"\\*", b"*"));
        assert!(!match_component(b"\\*", b"a"));
    }

    #[test]
    fn classes_negate_with_caret_only_and_match_characters() {
        // Go's filepath.Match: `!` is an ordinary member of a class.
        assert!(match_component(b"[!a]x", b"!x"));
        assert!(match_component(b"[!a]x", b"ax"));
        assert!(!match_component(b"[!a]x", b"bx"));
        assert!(match_component(b"[^a]x", b"bx"));
        // `?` and classes take a whole character, not a byte.
        assert!(match_component(
            "caf?.txt".as_bytes(),
            "café.txt".as_bytes()
        ));
        assert!(match_component("[é]".as_bytes(), "é".as_bytes()));
        assert!(match_component("[à-ü]".as_bytes(), "é".as_bytes()));
        assert!(!match_component(b"caf?.txt", b"caf.txt"));
        // An unterminated class matches nothing.
        assert!(!match_component(b"[ab", b"a"));
    }

    #[test]
    fn double_star_spans_directories() {
        assert!(match_path(b"**/*.go", b"a/b/c.go"));
        assert!(match_path(b"**/*.go", b"c.go"));
        assert!(match_path(b"a/**", b"a/b/c"));
        assert!(!match_path(b"a/*", b"a/b/c"));
    }

    #[test]
    fn dockerignore_last_rule_wins_and_parents_count() {
        let ig = Ignore::parse(b"# comment\n*.md\n!README.md\nbuild\n/tmp/\n");
        assert!(ig.is_ignored(b"notes.md"));
        assert!(!ig.is_ignored(b"README.md"));
        assert!(ig.is_ignored(b"build/out/x.o"));
        assert!(ig.is_ignored(b"tmp/a"));
        assert!(!ig.is_ignored(b"src/a.md"));
    }
}
