//! `cargo xtask docs-cli`: man pages and shell completions, generated from the `palisade`
//! binary's clap definitions (its hidden `generate-docs` command).
use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::build::{build_all, target_dir};

/// Builds the agent and writes `OUT/man/*.1` and `OUT/completions/*` (default
/// `<target>/docs-cli`).
pub fn docs_cli(out: Option<PathBuf>) -> Result<()> {
    let out = out.unwrap_or_else(|| target_dir().join("docs-cli"));
    let agent = build_all(false)?;
    let status = Command::new(&agent)
        .arg("generate-docs")
        .arg("--out")
        .arg(&out)
        .status()
        .with_context(|| format!("running {}", agent.display()))?;
    if !status.success() {
        bail!("palisade generate-docs failed");
    }
    println!(
        "man pages in {}, completions in {}",
        out.join("man").display(),
        out.join("completions").display()
    );
    Ok(())
}
