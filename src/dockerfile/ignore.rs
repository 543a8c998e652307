//! `.dockerignore` with Docker's rules, and the glob matching that COPY/ADD
//! wildcards share with it: Go's `filepath.Match` per path component (`*`,
//! `?`, `[a-z]`, `[^a]`, `\` escapes), plus `**` for any number of components.

/// Matches one path component against one pattern component (Go `filepath.Match`).
pub fn match_component(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0usize, 0usize);
    let (mut star_p, mut star_n) = (usize::MAX, 0usize);
    while n < name.len() {
        if p < pat.len() {
            match pat[p] {
                b'*' => {
                    star_p = p;
                    star_n = n;
                    p += 1;
                    continue;
                }
                b'?' => {
                    p += 1;
                    n += 1;
                    continue;
                }
                b'[' => {
                    if let Some((ok, len)) = class(&pat[p..], name[n]) {
                        if ok {
                            p += len;
                            n += 1;
                            continue;
                        }
                    }
                }
                b'\\' if p + 1 < pat.len() && pat[p + 1] == name[n] => {
                    p += 2;
                    n += 1;
                    continue;
                }
                b'\\' if p + 1 < pat.len() => {}
                c if c == name[n] => {
                    p += 1;
                    n += 1;
                    continue;
                }
                _ => {}
            }
        }
        if star_p != usize::MAX {
            p = star_p + 1;
            star_n += 1;
            n = star_n;
            continue;
        }
        return false;
    }
    while p < pat.len() && pat[p] == b'*' {
        p += 1;
    }
    p == pat.len()
}

/// A `[...]` class at the start of `pat`: whether `c` matches, and the class length.
fn class(pat: &[u8], c: u8) -> Option<(bool, usize)> {
    let mut i = 1;
    let negate = matches!(pat.get(i), Some(b'^') | Some(b'!'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < pat.len() {
        if pat[i] == b']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        let mut lo = pat[i];
        if lo == b'\\' && i + 1 < pat.len() {
            i += 1;
            lo = pat[i];
        }
        let mut hi = lo;
        if i + 2 < pat.len() && pat[i + 1] == b'-' && pat[i + 2] != b']' {
            hi = pat[i + 2];
            if hi == b'\\' && i + 3 < pat.len() {
                i += 1;
                hi = pat[i + 2];
            }
            i += 2;
        }
        if lo <= c && c <= hi {
            matched = true;
        }
        i += 1;
    }
    None
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

/// Matches a whole slash-separated path against a pattern with `**` support.
pub fn match_path(pat: &[u8], path: &[u8]) -> bool {
    fn rec(p: &[&[u8]], n: &[&[u8]]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some(&b"**") => (0..=n.len()).any(|k| rec(&p[1..], &n[k..])),
            Some(pc) => !n.is_empty() && match_component(pc, n[0]) && rec(&p[1..], &n[1..]),
        }
    }
    rec(&components(pat), &components(path))
}

/// Parsed `.dockerignore` rules.
#[derive(Clone, Debug, Default)]
pub struct Ignore {
    rules: Vec<(bool, Vec<u8>)>,
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
            rules.push((exclude, cleaned));
        }
        Ignore { rules }
    }

    /// Whether `path` (relative to the context root) is ignored: the last rule
    /// matching the path or one of its parents decides.
    pub fn is_ignored(&self, path: &[u8]) -> bool {
        let mut ignored = false;
        let comps = components(path);
        for (exclude, pat) in &self.rules {
            let hit = (1..=comps.len()).any(|k| match_path(pat, &comps[..k].join(&b'/')));
            if hit {
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
