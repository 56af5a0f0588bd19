//! Shell completions and man pages, generated from the clap definitions (`palisade completion
//! SHELL`, and `cargo xtask docs-cli --out DIR` through the hidden `palisade generate-docs`).
use std::path::{Path, PathBuf};

use clap::{Command, ValueEnum};
use clap_complete::Shell;

/// Generating failed: a file that could not be written.
#[derive(Debug, thiserror::Error)]
#[error("writing {path}: {source}")]
pub struct DocsError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The completion script for `shell` (what `palisade completion SHELL` prints).
pub fn completion(mut cmd: Command, shell: Shell) -> Vec<u8> {
    let name = cmd.get_name().to_string();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut out);
    out
}

/// Writes `DIR/man/<command>[-<subcommand>].1` for the command and every visible subcommand,
/// and `DIR/completions/` for every shell clap_complete knows (bash, elvish, fish, powershell,
/// zsh). Returns the files written, sorted.
pub fn write_docs(cmd: Command, out: &Path) -> Result<Vec<PathBuf>, DocsError> {
    let err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| DocsError { path, source }
    };
    let man = out.join("man");
    let completions = out.join("completions");
    for dir in [&man, &completions] {
        std::fs::create_dir_all(dir).map_err(err(dir))?;
    }
    clap_mangen::generate_to(cmd.clone(), &man).map_err(err(&man))?;
    for shell in Shell::value_variants() {
        let mut c = cmd.clone();
        let name = c.get_name().to_string();
        clap_complete::generate_to(*shell, &mut c, name, &completions)
            .map_err(err(&completions))?;
    }
    let mut files = Vec::new();
    for dir in [&man, &completions] {
        for e in std::fs::read_dir(dir).map_err(err(dir))? {
            files.push(e.map_err(err(dir))?.path());
        }
    }
    files.sort();
    Ok(files)
}
