//! Turns `parse-dockerfile`'s syntax tree into kiln's own instruction list,
//! each instruction carrying its line and column and its source text (for
//! history entries and error messages).

use parse_dockerfile as pd;

use super::Error;

/// The shell or exec form of CMD, ENTRYPOINT, HEALTHCHECK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandForm {
    Exec(Vec<String>),
    Shell(String),
}

/// One source of COPY/ADD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CopySource {
    Path(String),
    HereDoc {
        name: String,
        content: String,
        expand: bool,
    },
}

/// COPY or ADD.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CopySpec {
    pub flags: Vec<(String, Option<String>)>,
    pub sources: Vec<CopySource>,
    pub dest: String,
    /// Whether the arguments were a JSON array (then quotes are not removed).
    pub json: bool,
}

/// HEALTHCHECK.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Health {
    None,
    Cmd {
        flags: Vec<(String, Option<String>)>,
        command: CommandForm,
    },
}

/// What an instruction says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    From {
        image: String,
        name: Option<String>,
        flags: Vec<(String, Option<String>)>,
    },
    Arg(String),
    Env(String),
    Label(String),
    Copy(CopySpec),
    Add(CopySpec),
    Workdir(String),
    User(String),
    Cmd(CommandForm),
    Entrypoint(CommandForm),
    Expose(Vec<String>),
    Volume(Vec<String>),
    Stopsignal(String),
    Healthcheck(Health),
    Shell(Vec<String>),
    Onbuild(String),
    Maintainer(String),
    Run(RunSpec),
    /// An instruction kiln does not know (the parser refuses them first).
    Unknown,
}

/// RUN: its flags (`--mount`, `--network`) and the command. A shell-form
/// command with here-documents is one shell script (the first line, then
/// each document and its delimiter, as a POSIX shell reads them); a RUN
/// that is nothing but one here-document runs that document as the script.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunSpec {
    pub flags: Vec<(String, Option<String>)>,
    pub command: CommandForm,
}

/// One instruction with where it stands.
#[derive(Clone, Debug)]
pub struct Instr {
    /// 1-based line in the (rewritten) Dockerfile.
    pub line: usize,
    pub column: usize,
    /// The instruction as written, continuation lines joined.
    pub text: String,
    pub kind: Kind,
}

/// A parsed Dockerfile.
#[derive(Clone, Debug)]
pub struct Dockerfile {
    pub escape: char,
    pub instructions: Vec<Instr>,
}

/// `pos` moved down to the nearest character boundary of `text`.
fn floor_boundary(text: &str, pos: usize) -> usize {
    let mut p = pos.min(text.len());
    while !text.is_char_boundary(p) {
        p -= 1;
    }
    p
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, pos: usize) -> (usize, usize) {
    let before = &text[..floor_boundary(text, pos)];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// The instruction's text starting at `pos`: its first line plus continuation lines.
fn instruction_text(text: &str, pos: usize, escape: char) -> String {
    let mut out = String::new();
    for line in text[floor_boundary(text, pos)..].split('\n') {
        let trimmed = line.trim();
        if let Some(stripped) = trimmed.strip_suffix(escape) {
            out.push_str(stripped.trim_end());
            out.push(' ');
        } else {
            out.push_str(trimmed);
            break;
        }
    }
    out.trim().to_string()
}

fn flags(f: &[pd::Flag<'_>]) -> Vec<(String, Option<String>)> {
    f.iter()
        .map(|f| {
            (
                f.name.value.to_string(),
                f.value.as_ref().map(|v| v.value.to_string()),
            )
        })
        .collect()
}

fn command(c: &pd::Command<'_>) -> CommandForm {
    match c {
        pd::Command::Exec(v) => {
            CommandForm::Exec(v.value.iter().map(|s| s.value.to_string()).collect())
        }
        pd::Command::Shell(s) => CommandForm::Shell(s.value.trim().to_string()),
        _ => CommandForm::Shell(String::new()),
    }
}

fn run_spec(text: &str, r: &pd::RunInstruction<'_>) -> RunSpec {
    // parse-dockerfile takes the `<<NAME` markers out of the command line:
    // what is left is the command the documents feed (empty: the document
    // is the script).
    let command = match (&r.arguments, r.here_docs.as_slice()) {
        (pd::Command::Shell(s), docs) if !docs.is_empty() => {
            let rest = s.value.trim();
            if rest.is_empty() && docs.len() == 1 {
                CommandForm::Shell(docs[0].value.to_string())
            } else {
                let first_line = text[floor_boundary(text, r.run.span.start)..]
                    .split('\n')
                    .next()
                    .unwrap_or("");
                let names = heredoc_names(first_line);
                let mut script = rest.to_string();
                for (i, d) in docs.iter().enumerate() {
                    let name = names
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| format!("KILN_EOF_{i}"));
                    if d.expand {
                        script.push_str(&format!(" <<{name}"));
                    } else {
                        script.push_str(&format!(" <<'{name}'"));
                    }
                }
                for (i, d) in docs.iter().enumerate() {
                    let name = names
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| format!("KILN_EOF_{i}"));
                    script.push('\n');
                    script.push_str(&d.value);
                    if !d.value.ends_with('\n') {
                        script.push('\n');
                    }
                    script.push_str(&name);
                }
                CommandForm::Shell(script)
            }
        }
        (c, _) => command(c),
    };
    RunSpec {
        flags: flags(&r.options),
        command,
    }
}

/// The names of the here-documents in a COPY/ADD's first line, in order.
fn heredoc_names(first_line: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = first_line;
    while let Some(i) = rest.find("<<") {
        rest = &rest[i + 2..];
        let r = rest.strip_prefix('-').unwrap_or(rest);
        let (r, quote) = match r.chars().next() {
            Some(q @ ('"' | '\'')) => (&r[1..], Some(q)),
            _ => (r, None),
        };
        let end = r
            .find(|c: char| match quote {
                Some(q) => c == q,
                None => c.is_whitespace() || c == '"' || c == '\'',
            })
            .unwrap_or(r.len());
        names.push(r[..end].to_string());
        rest = &r[end..];
    }
    names
}

fn copy_spec(
    text: &str,
    start: usize,
    options: &[pd::Flag<'_>],
    src: &[pd::Source<'_>],
    dest: &pd::UnescapedString<'_>,
) -> CopySpec {
    let first_line = text[floor_boundary(text, start)..]
        .split('\n')
        .next()
        .unwrap_or("");
    let names = heredoc_names(first_line);
    let mut doc = 0;
    let mut json = false;
    let sources = src
        .iter()
        .map(|s| match s {
            pd::Source::Path(p) => {
                // JSON-form elements have spans inside quotes.
                if text.as_bytes().get(p.span.start.wrapping_sub(1)) == Some(&b'"') {
                    json = true;
                }
                CopySource::Path(p.value.to_string())
            }
            pd::Source::HereDoc(h) => {
                let name = names.get(doc).cloned().unwrap_or_default();
                doc += 1;
                CopySource::HereDoc {
                    name,
                    content: h.value.to_string(),
                    expand: h.expand,
                }
            }
            _ => CopySource::Path(String::new()),
        })
        .collect();
    CopySpec {
        flags: flags(options),
        sources,
        dest: dest.value.to_string(),
        json,
    }
}

fn convert(text: &str, escape: char, ins: &pd::Instruction<'_>) -> (usize, Kind) {
    use pd::Instruction as I;
    match ins {
        I::From(f) => (
            f.from.span.start,
            Kind::From {
                image: f.image.value.to_string(),
                name: f.as_.as_ref().map(|(_, n)| n.value.to_string()),
                flags: flags(&f.options),
            },
        ),
        I::Arg(a) => (a.arg.span.start, Kind::Arg(a.arguments.value.to_string())),
        I::Env(e) => (e.env.span.start, Kind::Env(e.arguments.value.to_string())),
        I::Label(l) => (
            l.label.span.start,
            Kind::Label(l.arguments.value.to_string()),
        ),
        I::Copy(c) => (
            c.copy.span.start,
            Kind::Copy(copy_spec(
                text,
                c.copy.span.start,
                &c.options,
                &c.src,
                &c.dest,
            )),
        ),
        I::Add(c) => (
            c.add.span.start,
            Kind::Add(copy_spec(
                text,
                c.add.span.start,
                &c.options,
                &c.src,
                &c.dest,
            )),
        ),
        I::Workdir(w) => (
            w.workdir.span.start,
            Kind::Workdir(w.arguments.value.to_string()),
        ),
        I::User(u) => (u.user.span.start, Kind::User(u.arguments.value.to_string())),
        I::Cmd(c) => (c.cmd.span.start, Kind::Cmd(command(&c.arguments))),
        I::Entrypoint(e) => (
            e.entrypoint.span.start,
            Kind::Entrypoint(command(&e.arguments)),
        ),
        I::Expose(e) => (
            e.expose.span.start,
            Kind::Expose(e.arguments.iter().map(|s| s.value.to_string()).collect()),
        ),
        I::Volume(v) => (
            v.volume.span.start,
            Kind::Volume(match &v.arguments {
                pd::JsonOrStringArray::Json(a) => {
                    a.value.iter().map(|s| s.value.to_string()).collect()
                }
                pd::JsonOrStringArray::String(a) => a.iter().map(|s| s.value.to_string()).collect(),
            }),
        ),
        I::Stopsignal(s) => (
            s.stopsignal.span.start,
            Kind::Stopsignal(s.arguments.value.to_string()),
        ),
        I::Healthcheck(h) => (
            h.healthcheck.span.start,
            Kind::Healthcheck(match &h.arguments {
                pd::HealthcheckArguments::Cmd { arguments, .. } => Health::Cmd {
                    flags: flags(&h.options),
                    command: command(arguments),
                },
                _ => Health::None,
            }),
        ),
        I::Shell(s) => (
            s.shell.span.start,
            Kind::Shell(s.arguments.iter().map(|s| s.value.to_string()).collect()),
        ),
        I::Onbuild(o) => {
            let t = instruction_text(text, o.onbuild.span.end, escape);
            (o.onbuild.span.start, Kind::Onbuild(t))
        }
        I::Maintainer(m) => (
            m.maintainer.span.start,
            Kind::Maintainer(m.name.value.to_string()),
        ),
        I::Run(r) => (r.run.span.start, Kind::Run(run_spec(text, r))),
        _ => (0, Kind::Unknown),
    }
}

/// Parses a Dockerfile's text.
pub fn parse(text: &str) -> Result<Dockerfile, Error> {
    // A byte-order mark is not part of the first instruction (Docker drops it too).
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let max = crate::limits::MAX_DOCKERFILE_LINE;
    if let Some((i, l)) = text.split('\n').enumerate().find(|(_, l)| l.len() > max) {
        return Err(Error::Syntax {
            line: i + 1,
            column: 1,
            message: format!(
                "the line is {} bytes; kiln reads Dockerfile lines of at most {max} bytes (1 MiB)",
                l.len()
            ),
        });
    }
    let df = pd::parse(text).map_err(|e| {
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        Error::Syntax {
            line: e.line(),
            column: e.column(),
            message: msg,
        }
    })?;
    let escape = df
        .parser_directives
        .escape
        .as_ref()
        .map_or('\\', |d| d.value.value);
    let instructions: Vec<Instr> = df
        .instructions
        .iter()
        .map(|ins| {
            let (start, kind) = convert(text, escape, ins);
            let (line, column) = line_col(text, start);
            Instr {
                line,
                column,
                text: instruction_text(text, start, escape),
                kind,
            }
        })
        .collect();
    if let Some(ins) = instructions.iter().find(|i| i.text.len() > max) {
        return Err(Error::Syntax {
            line: ins.line,
            column: ins.column,
            message: format!(
                "the instruction is {} bytes with its continuation lines; kiln reads instructions of at most {max} bytes (1 MiB)",
                ins.text.len()
            ),
        });
    }
    // Docker quietly runs a broken JSON array as a shell command
    // (`CMD ["a", "b"` runs `/bin/sh -c '["a", "b"'`); kiln refuses it.
    for ins in &instructions {
        let shell = match &ins.kind {
            Kind::Cmd(CommandForm::Shell(s)) | Kind::Entrypoint(CommandForm::Shell(s)) => Some(s),
            Kind::Healthcheck(Health::Cmd {
                command: CommandForm::Shell(s),
                ..
            }) => Some(s),
            _ => None,
        };
        if let Some(s) = shell.filter(|s| s.trim_start().starts_with('[')) {
            return Err(Error::Syntax {
                line: ins.line,
                column: ins.column,
                message: format!(
                    "{}: {s} looks like a JSON array but is not valid JSON (unterminated, or not double-quoted); write [\"cmd\", \"arg\"] or a plain shell command",
                    ins.text
                ),
            });
        }
    }
    Ok(Dockerfile {
        escape,
        instructions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_carry_lines_and_text() {
        let df = parse("FROM scratch\n# c\nCOPY a \\\n  b /x/\nCMD [\"/x\"]\n").unwrap();
        assert_eq!(df.instructions.len(), 3);
        assert_eq!(df.instructions[1].line, 3);
        assert_eq!(df.instructions[1].text, "COPY a b /x/");
        match &df.instructions[1].kind {
            Kind::Copy(c) => {
                assert_eq!(
                    c.sources,
                    vec![CopySource::Path("a".into()), CopySource::Path("b".into())]
                );
                assert_eq!(c.dest, "/x/");
                assert!(!c.json);
            }
            k => panic!("{k:?}"),
        }
        assert_eq!(
            df.instructions[2].kind,
            Kind::Cmd(CommandForm::Exec(vec!["/x".into()]))
        );
    }

    #[test]
    fn heredoc_copy_keeps_name_and_content() {
        let df = parse("FROM scratch\nCOPY <<EOF /etc/motd\nhello\nEOF\n").unwrap();
        match &df.instructions[1].kind {
            Kind::Copy(c) => assert_eq!(
                c.sources,
                vec![CopySource::HereDoc {
                    name: "EOF".into(),
                    content: "hello\n".into(),
                    expand: true
                }]
            ),
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn json_copy_is_marked() {
        let df = parse("FROM scratch\nCOPY [\"a b\", \"/c/\"]\n").unwrap();
        match &df.instructions[1].kind {
            Kind::Copy(c) => {
                assert!(c.json);
                assert_eq!(c.sources, vec![CopySource::Path("a b".into())]);
            }
            k => panic!("{k:?}"),
        }
    }

    #[test]
    fn syntax_errors_have_line_and_column() {
        let err = parse("FROM scratch\nBOGUS x\n").unwrap_err();
        let Error::Syntax {
            line,
            column,
            message,
        } = err;
        assert_eq!((line, column), (2, 1));
        assert!(message.contains("unknown instruction"), "{message}");
    }

    #[test]
    fn byte_order_marks_never_split_a_character() {
        // Found by the fuzzer: a BOM at the start and one inside a word.
        let text = "\u{feff}# comment\nFROM s\u{feff}x\nVOLUME /a\n";
        let df = parse(text).unwrap();
        assert_eq!(df.instructions[0].line, 2);
        assert!(df.instructions[1].text.starts_with("VOLUME"));
    }
}
