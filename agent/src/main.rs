//! `palisade`: the node agent and its CLI.
use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{Parser, Subcommand};
use palisade::{
    loader::Datapath,
    run::{RunConfig, run_standalone},
};
use tracing_subscriber::EnvFilter;

#[cfg(palisade_ebpf_missing)]
compile_error!(
    "the eBPF object is missing: build with `cargo xtask build` (it builds the eBPF crate first)"
);

/// The datapath object, built by `cargo xtask build`.
#[cfg(not(palisade_ebpf_missing))]
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("PALISADE_EBPF_OBJ"));
#[cfg(palisade_ebpf_missing)]
static EBPF_OBJECT: &[u8] = &[];

#[derive(Parser)]
#[command(
    name = "palisade",
    version,
    about = "Kubernetes NetworkPolicy enforcement on eBPF"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent. Standalone mode: Namespace, Pod and NetworkPolicy YAML from a directory.
    Run {
        /// Directory of manifests (multi-document YAML allowed), re-read on change.
        #[arg(long, value_name = "DIR")]
        manifests: PathBuf,
        /// Pin directory for maps and links (on a bpffs; mounted if absent).
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/palisade")]
        pin_dir: PathBuf,
        /// Only pods with this spec.nodeName are endpoints.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Manifest poll interval in milliseconds.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=60_000))]
        poll_ms: u64,
        /// Write a JSON status here after every reconcile.
        #[arg(long, value_name = "FILE")]
        status_file: Option<PathBuf>,
    },
    /// Load the datapath (without attaching) and print the verifier's instruction counts.
    Verify,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run {
            manifests,
            pin_dir,
            node_name,
            poll_ms,
            status_file,
        } => {
            let cfg = RunConfig {
                manifests,
                pin_dir,
                node_name,
                poll: Duration::from_millis(poll_ms),
                host_poll: Duration::from_secs(1),
                status_file,
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(run_standalone(cfg, EBPF_OBJECT))
        }
        Command::Verify => {
            let dp = Datapath::load(EBPF_OBJECT, None)?;
            for p in dp.program_stats() {
                println!(
                    "{}: verified, {} instructions processed by the verifier, {} bytes translated",
                    p.name,
                    p.verified_instructions
                        .map_or_else(|| "?".to_string(), |n| n.to_string()),
                    p.translated_bytes
                        .map_or_else(|| "?".to_string(), |n| n.to_string()),
                );
            }
            Ok(())
        }
    }
}
