//! Docker's word expansion for the instructions that expand variables (ADD,
//! COPY, ENV, EXPOSE, FROM, LABEL, STOPSIGNAL, USER, VOLUME, WORKDIR):
//! `$X`, `${X}`, `${X:-d}`, `${X-d}`, `${X:+d}`, `${X+d}`, `${X:?msg}`,
//! `${X?msg}`, single and double quotes, and the escape character.

use std::collections::BTreeMap;

/// Variables visible to an instruction: name → value.
pub type Vars = BTreeMap<String, String>;

/// An expansion error (`${X:?message}` with X unset, or bad syntax).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpandError(pub String);

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    vars: &'a Vars,
    escape: char,
    /// Remove quotes (shell-form words) or keep them (JSON-form elements).
    quotes: bool,
}

/// Expands one word: variables substituted, quotes and escapes removed.
pub fn expand_word(word: &str, vars: &Vars, escape: char) -> Result<String, ExpandError> {
    let mut lx = Lexer {
        chars: word.chars().collect(),
        pos: 0,
        vars,
        escape,
        quotes: true,
    };
    lx.process(None)
}

/// Expands variables only, leaving quotes and escapes as they are (JSON-form arguments).
pub fn expand_vars_only(word: &str, vars: &Vars, escape: char) -> Result<String, ExpandError> {
    let mut lx = Lexer {
        chars: word.chars().collect(),
        pos: 0,
        vars,
        escape,
        quotes: false,
    };
    lx.process(None)
}

/// Splits `text` into words at unquoted whitespace, keeping quotes and escapes
/// in the words (they are removed later by [`expand_word`]).
pub fn split_words(text: &str, escape: char) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if quote.is_none() && c.is_whitespace() {
            if in_word {
                words.push(std::mem::take(&mut cur));
                in_word = false;
            }
            continue;
        }
        in_word = true;
        cur.push(c);
        if c == escape && quote != Some('\'') {
            if let Some(n) = chars.next() {
                cur.push(n);
            }
            continue;
        }
        match quote {
            None if c == '\'' || c == '"' => quote = Some(c),
            Some(q) if c == q => quote = None,
            _ => {}
        }
    }
    if in_word {
        words.push(cur);
    }
    words
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }
    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        self.pos += 1;
        c
    }

    /// Processes until `stop` (unquoted) or the end.
    fn process(&mut self, stop: Option<char>) -> Result<String, ExpandError> {
        let mut out = String::new();
        while let Some(c) = self.peek() {
            if Some(c) == stop {
                return Ok(out);
            }
            self.pos += 1;
            if self.quotes && c == '\'' {
                loop {
                    match self.next() {
                        Some('\'') => break,
                        Some(x) => out.push(x),
                        None => return Err(ExpandError(
                            "unexpected end of statement while looking for matching single-quote"
                                .into(),
                        )),
                    }
                }
            } else if self.quotes && c == '"' {
                loop {
                    match self.next() {
                        Some('"') => break,
                        Some('$') => out.push_str(&self.dollar()?),
                        Some(x) if x == self.escape => match self.peek() {
                            Some(n) if n == '"' || n == '$' || n == self.escape => {
                                self.pos += 1;
                                out.push(n);
                            }
                            _ => out.push(x),
                        },
                        Some(x) => out.push(x),
                        None => return Err(ExpandError(
                            "unexpected end of statement while looking for matching double-quote"
                                .into(),
                        )),
                    }
                }
            } else if c == self.escape && self.quotes {
                if let Some(n) = self.next() {
                    out.push(n);
                }
            } else if c == '$' {
                out.push_str(&self.dollar()?);
            } else {
                out.push(c);
            }
        }
        Ok(out)
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                self.pos += 1;
            } else {
                break;
            }
        }
        name
    }

    /// Called after a `$`.
    fn dollar(&mut self) -> Result<String, ExpandError> {
        match self.peek() {
            Some('{') => {
                self.pos += 1;
                let name = self.name();
                if name.is_empty() {
                    return Err(ExpandError(
                        "bad substitution: missing variable name after ${".into(),
                    ));
                }
                let value = self.vars.get(&name);
                match self.next() {
                    Some('}') => Ok(value.cloned().unwrap_or_default()),
                    Some(op @ (':' | '-' | '+' | '?')) => {
                        let colon = op == ':';
                        let op = if colon {
                            self.next().ok_or_else(|| {
                                ExpandError(format!("bad substitution in ${{{name}:"))
                            })?
                        } else {
                            op
                        };
                        let word = self.process(Some('}'))?;
                        if self.next() != Some('}') {
                            return Err(ExpandError(format!("missing '}}' in ${{{name}...")));
                        }
                        let set = match value {
                            Some(v) => !colon || !v.is_empty(),
                            None => false,
                        };
                        match op {
                            '-' => Ok(if set {
                                value.cloned().unwrap_or_default()
                            } else {
                                word
                            }),
                            '+' => Ok(if set { word } else { String::new() }),
                            '?' => {
                                if set {
                                    Ok(value.cloned().unwrap_or_default())
                                } else if word.is_empty() {
                                    Err(ExpandError(format!("{name}: is not allowed to be unset")))
                                } else {
                                    Err(ExpandError(format!("{name}: {word}")))
                                }
                            }
                            other => Err(ExpandError(format!(
                                "unsupported modifier ({other}) in substitution of {name}"
                            ))),
                        }
                    }
                    Some(other) => Err(ExpandError(format!(
                        "unsupported modifier ({other}) in substitution of {name}"
                    ))),
                    None => Err(ExpandError(format!("missing '}}' in ${{{name}"))),
                }
            }
            Some(c) if c.is_ascii_alphanumeric() || c == '_' => {
                let name = self.name();
                Ok(self.vars.get(&name).cloned().unwrap_or_default())
            }
            _ => Ok("$".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        let mut v = Vars::new();
        v.insert("A".into(), "a".into());
        v.insert("E".into(), "".into());
        v
    }

    #[test]
    fn simple_and_braced() {
        assert_eq!(
            expand_word("$A/${A}x/$B.", &vars(), '\\').unwrap(),
            "a/ax/."
        );
    }

    #[test]
    fn defaults_and_alternatives() {
        let v = vars();
        assert_eq!(expand_word("${B:-d}", &v, '\\').unwrap(), "d");
        assert_eq!(expand_word("${E:-d}", &v, '\\').unwrap(), "d");
        assert_eq!(expand_word("${E-d}", &v, '\\').unwrap(), "");
        assert_eq!(expand_word("${A:+x}", &v, '\\').unwrap(), "x");
        assert_eq!(expand_word("${B:+x}", &v, '\\').unwrap(), "");
        assert_eq!(expand_word("${B:-$A}", &v, '\\').unwrap(), "a");
        assert!(expand_word("${B:?needed}", &v, '\\')
            .unwrap_err()
            .0
            .contains("needed"));
    }

    #[test]
    fn quotes_and_escapes() {
        let v = vars();
        assert_eq!(
            expand_word("'$A' \"$A\" \\$A", &v, '\\').unwrap(),
            "$A a $A"
        );
        assert_eq!(expand_word("\"a\\\"b\"", &v, '\\').unwrap(), "a\"b");
        assert_eq!(expand_word("`$A", &v, '`').unwrap(), "$A");
    }

    #[test]
    fn split_keeps_quoted_spaces() {
        assert_eq!(
            split_words("a=\"x y\" b='1 2' c\\ d", '\\'),
            vec!["a=\"x y\"", "b='1 2'", "c\\ d"]
        );
    }
}
