//! `cargo xtask <command>`: builds the eBPF object and the agent, runs the demo, the tests and
//! the conformance suite. See README.md.
mod bench;
mod build;
mod docs;
mod image;
mod run;
mod setup;
mod soak;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Palisade's build and test driver")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install bpf-linker if needed, build the eBPF object, then the agent.
    Build {
        /// Build the agent in release mode.
        #[arg(long)]
        release: bool,
        /// Run one step only (the image's Dockerfile runs them one per layer).
        #[arg(long, value_enum)]
        step: Option<build::Step>,
    },
    /// Build the container image from ./Dockerfile (needs Docker); tag: the DaemonSet's,
    /// ghcr.io/palisade-dev/palisade:<version>.
    Image {
        #[arg(long)]
        tag: Option<String>,
    },
    /// Man pages and shell completions from the CLI's clap definitions: OUT/man/*.1,
    /// OUT/completions/* (default <target>/docs-cli).
    DocsCli {
        #[arg(long, value_name = "DIR")]
        out: Option<std::path::PathBuf>,
    },
    /// Run every test: unit, BPF program test runs, netns tests, NetworkPolicy (one node and
    /// three) and ClusterNetworkPolicy conformance (IPv4 and IPv6).
    Test {
        /// Skip the conformance suites.
        #[arg(long)]
        no_conformance: bool,
    },
    /// Create a demo node of netns pods, run the standalone agent with manifests/examples,
    /// send allowed and denied traffic and show what happened.
    Demo,
    /// Run the upstream NetworkPolicy e2e cases on the netns rig (the ClusterNetworkPolicy
    /// ones with --cases tests/conformance/cnp/cases, Palisade's own with --cases
    /// tests/conformance/cnp/palisade).
    Conformance {
        /// Extra arguments for the runner (--cases DIR, more than once if need be, --filter
        /// NAME, --ipv6, --check-explain, --nodes N [--layout per-namespace|round-robin]).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// fmt --check and clippy -D warnings on the workspace.
    Lint,
    /// Benchmarks against the alternatives (per-packet cost, throughput, churn, memory):
    /// target/bench/report.json, report.md, plot.png and per_packet.png. Needs root; installs
    /// iperf3, ipset, iptables, nftables and (in a virtualenv) matplotlib if missing.
    Bench {
        /// Fewer repeats and shorter runs (every figure is still measured).
        #[arg(long)]
        quick: bool,
        /// Extra arguments for the runner (--only packet,throughput,churn).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The netns suites and the conformance runner, round after round and side by side,
    /// while stress-ng loads every CPU; keeps every failure's output, agent logs, maps and
    /// conntrack table under <target>/soak. Prints rounds, probes and failures; fails on any.
    Soak {
        /// How long to go on starting rounds.
        #[arg(long, default_value_t = 30)]
        minutes: u64,
        /// stress-ng's load per CPU, in percent.
        #[arg(long, default_value_t = 60)]
        load: u32,
    },
    /// Random and malformed packets through the real programs (BPF test runs) under random
    /// policies, every verdict checked against the packet model; ends with `N packets, B
    /// bypasses` and fails on any mismatch.
    Fuzz {
        /// Packets to send.
        #[arg(long, default_value_t = 1_000_000)]
        packets: u64,
        /// Seed (a run is reproduced by its seed and packet count).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Build {
            release,
            step: None,
        } => build::build_all(release).map(|_| ()),
        Command::Build {
            release,
            step: Some(step),
        } => build::run_step(step, release).map(|_| ()),
        Command::Image { tag } => image::image(tag),
        Command::DocsCli { out } => docs::docs_cli(out),
        Command::Test { no_conformance } => run::test(!no_conformance),
        Command::Demo => run::demo(),
        Command::Conformance { args } => run::conformance(&args),
        Command::Lint => run::lint(),
        Command::Bench { quick, args } => bench::bench(quick, &args),
        Command::Soak { minutes, load } => soak::soak(minutes, load),
        Command::Fuzz { packets, seed } => run::fuzz(packets, seed, true),
    }
}
