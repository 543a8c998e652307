//! The Dockerfile front end: parsing into kiln's instruction list
//! (`parse`), Docker's variable expansion (`expand`) and `.dockerignore`
//! matching (`ignore`).

pub mod expand;
pub mod ignore;
pub mod parse;

pub use parse::{
    parse, CommandForm, CopySource, CopySpec, Dockerfile, Health, Instr, Kind, RunSpec,
};

/// A Dockerfile syntax error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}{message}", if *line == 0 { String::new() } else { format!("line {line} column {column}: ") })]
    Syntax {
        line: usize,
        column: usize,
        message: String,
    },
}
