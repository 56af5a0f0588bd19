//! Conformance runner: upstream policy conformance cases, as data, on the netns rig with the
//! standalone agent fed by files. Each file is a case, run on a fresh node and agent; its
//! `schema_version` says which suite it belongs to:
//!
//! - 1: the Kubernetes NetworkPolicy e2e cases (tests/conformance/README.md), [`netpol`];
//! - 2: the ClusterNetworkPolicy conformance cases (tests/conformance/cnp/README.md), [`cnp`].
//!
//! With `--nodes N` (N > 1) the NetworkPolicy cases run over N nodes, each with its own agent
//! in cluster mode against one fake API server ([`nodes`]), once per pod layout (`--layout`).
//!
//! Prints a line per case and ends with `N passed, M failed` (with several layouts, a line per
//! layout first); non-zero exit on any failure (or when no case ran).
mod cnp;
mod common;
mod netpol;
mod nodes;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::Parser;

#[derive(Parser)]
#[command(about = "Run NetworkPolicy and ClusterNetworkPolicy conformance cases on the netns rig")]
pub struct Args {
    /// The palisade agent binary.
    #[arg(long)]
    agent: PathBuf,
    /// Directory of case files (schema v1 or v2, see the READMEs under tests/conformance);
    /// may be given more than once.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/conformance/cases"))]
    cases: Vec<PathBuf>,
    /// Only cases whose name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// Give pods IPv6 addresses and probe over IPv6.
    #[arg(long)]
    ipv6: bool,
    /// Per-probe timeout in milliseconds (a deny must time out: it costs this much).
    #[arg(long, default_value_t = 800)]
    probe_timeout_ms: u64,
    /// How long a mismatching probe (or schema v1 matrix) is retried before it fails, in
    /// milliseconds.
    #[arg(long, default_value_t = 6000)]
    converge_ms: u64,
    /// Also compute every probe with `palisade explain` (from the pinned maps) and fail the
    /// probe if it differs from the probed one.
    #[arg(long)]
    check_explain: bool,
    /// Spread the pods over this many nodes, each with its own agent in cluster mode against
    /// one fake API server (NetworkPolicy cases only).
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// With --nodes N > 1: how pods are placed (more than once, or comma-separated; default
    /// both layouts, one after the other).
    #[arg(long, value_enum, value_delimiter = ',')]
    layout: Vec<nodes::Layout>,
}

/// A case file, by schema.
enum Case {
    NetworkPolicy(netpol::Case),
    ClusterNetworkPolicy(cnp::Case),
}

impl Case {
    fn read(file: &Path) -> Result<Case> {
        let text = std::fs::read_to_string(file)?;
        let doc = common::first_document(&text)?;
        Ok(match common::schema_version(&doc)? {
            1 => Case::NetworkPolicy(common::decode(doc)?),
            2 => Case::ClusterNetworkPolicy(cnp::Case::from_document(doc)?),
            v => bail!("schema_version: {v} is not one this runner reads (1, 2)"),
        })
    }

    fn name(&self) -> &str {
        match self {
            Case::NetworkPolicy(c) => &c.name,
            Case::ClusterNetworkPolicy(c) => &c.name,
        }
    }

    /// Runs the case: (probes, failed probes).
    fn run(&self, args: &Args, work: &Path, layout: nodes::Layout) -> Result<(usize, usize)> {
        match self {
            Case::NetworkPolicy(c) => netpol::run(args, c, work, layout),
            Case::ClusterNetworkPolicy(_) if args.nodes > 1 => bail!(
                "ClusterNetworkPolicy cases describe one node (its address, its host-network \
                 pods): they run with --nodes 1"
            ),
            Case::ClusterNetworkPolicy(c) => cnp::run(args, c, work),
        }
    }
}

struct CaseResult {
    name: String,
    probes: usize,
    failed_probes: usize,
    elapsed: Duration,
    error: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("conformance needs root (BPF, TCX, network namespaces)");
        return ExitCode::FAILURE;
    }
    // Each directory's files in name order, the directories in the order given.
    let mut files: Vec<PathBuf> = Vec::new();
    for dir in &args.cases {
        let mut in_dir: Vec<PathBuf> = match std::fs::read_dir(dir) {
            Ok(rd) => rd
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
                .collect(),
            Err(e) => {
                eprintln!("{}: {e}", dir.display());
                return ExitCode::FAILURE;
            }
        };
        in_dir.sort();
        files.extend(in_dir);
    }
    // Case names are their file names: the column fits the longest.
    let width = files
        .iter()
        .filter_map(|f| f.file_stem())
        .map(|s| s.len())
        .max()
        .unwrap_or(0)
        .max(48);
    if !(1..=palisade_tests::multinode::MAX_NODES).contains(&args.nodes) {
        eprintln!(
            "--nodes: 1 to {} nodes",
            palisade_tests::multinode::MAX_NODES
        );
        return ExitCode::FAILURE;
    }
    if args.check_explain && args.nodes > 1 {
        eprintln!("--check-explain reads one node's maps: it needs --nodes 1");
        return ExitCode::FAILURE;
    }
    let family = if args.ipv6 { "IPv6" } else { "IPv4" };
    let dirs: Vec<String> = args.cases.iter().map(|d| d.display().to_string()).collect();
    let layouts: Vec<nodes::Layout> = match (args.nodes, args.layout.is_empty()) {
        (1, _) => vec![nodes::Layout::PerNamespace],
        (_, true) => vec![nodes::Layout::PerNamespace, nodes::Layout::RoundRobin],
        (_, false) => args.layout.clone(),
    };
    let mut results = Vec::new();
    let mut summaries = Vec::new();
    for layout in layouts {
        let on = if args.nodes > 1 {
            format!(", {} nodes, layout {}", args.nodes, layout.name())
        } else {
            String::new()
        };
        println!("conformance ({family}{on}), cases from {}", dirs.join(", "));
        let started = Instant::now();
        let these = run_cases(&args, &files, width, layout);
        let (passed, failed) = tally(&these);
        summaries.push(format!(
            "{passed} passed, {failed} failed ({family}{on}, {:.0} s)",
            started.elapsed().as_secs_f64()
        ));
        results.extend(these);
    }
    if summaries.len() > 1 {
        for s in &summaries {
            println!("{s}");
        }
    }
    let (passed, failed) = tally(&results);
    println!("{passed} passed, {failed} failed");
    if failed == 0 && passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// (passed, failed) of `results`.
fn tally(results: &[CaseResult]) -> (usize, usize) {
    let passed = results
        .iter()
        .filter(|r| r.error.is_none() && r.failed_probes == 0)
        .count();
    (passed, results.len() - passed)
}

/// Runs every case of `files` (with `--nodes`, laid out by `layout`), a line each.
fn run_cases(
    args: &Args,
    files: &[PathBuf],
    width: usize,
    layout: nodes::Layout,
) -> Vec<CaseResult> {
    println!(
        "{:<width$} {:>6} {:>8}  result",
        "case", "probes", "seconds"
    );
    let mut results = Vec::new();
    for file in files {
        let started = Instant::now();
        let case = match Case::read(file) {
            Ok(c) => c,
            Err(e) => {
                let name = file.display().to_string();
                println!(
                    "{name:<width$} {:>6} {:>8}  ERROR cannot read case: {e:#}",
                    0, "-"
                );
                results.push(CaseResult {
                    name,
                    probes: 0,
                    failed_probes: 0,
                    elapsed: started.elapsed(),
                    error: Some(format!("cannot read case: {e:#}")),
                });
                continue;
            }
        };
        if let Some(f) = &args.filter
            && !case.name().contains(f.as_str())
        {
            continue;
        }
        let work = std::env::temp_dir().join(format!(
            "palisade-conformance-{}-{}",
            std::process::id(),
            case.name()
        ));
        let _ = std::fs::remove_dir_all(&work);
        let outcome = std::fs::create_dir_all(&work)
            .map_err(anyhow::Error::from)
            .and_then(|_| case.run(args, &work, layout));
        let r = match outcome {
            Ok((probes, failed)) => CaseResult {
                name: case.name().to_string(),
                probes,
                failed_probes: failed,
                elapsed: started.elapsed(),
                error: None,
            },
            Err(e) => CaseResult {
                name: case.name().to_string(),
                probes: 0,
                failed_probes: 0,
                elapsed: started.elapsed(),
                error: Some(format!("{e:#}")),
            },
        };
        let verdict = match (&r.error, r.failed_probes) {
            (Some(e), _) => format!("ERROR {e}"),
            (None, 0) => "pass".to_string(),
            (None, n) => format!("FAIL ({n} probes)"),
        };
        println!(
            "{:<width$} {:>6} {:>8.1}  {verdict}",
            r.name,
            r.probes,
            r.elapsed.as_secs_f64()
        );
        if r.error.is_none() && r.failed_probes == 0 {
            let _ = std::fs::remove_dir_all(&work);
        }
        results.push(r);
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shipped case reads (and, for schema v2, passes the checks), as its schema.
    #[test]
    fn shipped_cases_read() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance");
        for (dir, schema, at_least) in [
            ("cases", 1, 36),
            ("cnp/cases", 2, 69),
            ("cnp/palisade", 2, 4),
        ] {
            let mut n = 0;
            for entry in std::fs::read_dir(root.join(dir)).unwrap() {
                let path = entry.unwrap().path();
                if path.extension().is_none_or(|e| e != "yaml") {
                    continue;
                }
                let case =
                    Case::read(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                let got = match case {
                    Case::NetworkPolicy(_) => 1,
                    Case::ClusterNetworkPolicy(_) => 2,
                };
                assert_eq!(got, schema, "{}", path.display());
                assert_eq!(
                    Some(case.name()),
                    path.file_stem().and_then(|s| s.to_str()),
                    "{}",
                    path.display()
                );
                n += 1;
            }
            assert!(n >= at_least, "{dir}: {n} cases");
        }
    }
}
