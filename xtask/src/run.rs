//! Test, demo, conformance and lint drivers.
use std::{path::Path, process::Command, time::Instant};

use anyhow::{Context, Result, bail};

use crate::build::{build_all, ebpf_object, root};

pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<()> {
    eprintln!("xtask: {what}");
    let status = cmd.status().with_context(|| format!("starting: {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

pub(crate) fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

pub(crate) fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} needs root (BPF, TCX and network namespaces)");
    }
    Ok(())
}

/// Runs a binary of the palisade-tests package with the agent binary it drives.
fn tests_bin(bin: &str, agent: &Path, args: &[String]) -> Command {
    let mut c = cargo();
    c.args(["run", "--quiet", "-p", "palisade-tests", "--bin", bin, "--"])
        .arg("--agent")
        .arg(agent)
        .args(args)
        .env("PALISADE_EBPF_OBJ", ebpf_object());
    c
}

pub fn test(with_conformance: bool) -> Result<()> {
    let started = Instant::now();
    require_root("cargo xtask test")?;
    crate::setup::ensure_packages(crate::setup::TEST_PACKAGES)?;
    let agent = build_all(false)?;
    lint()?;
    run(
        cargo()
            .args(["test", "--workspace", "--no-fail-fast"])
            .env("PALISADE_EBPF_OBJ", ebpf_object())
            .env("PALISADE_AGENT_BIN", &agent),
        "cargo test --workspace (unit, BPF test runs, netns)",
    )?;
    fuzz(FUZZ_PACKETS_IN_TEST, 1, false)?;
    if with_conformance {
        let cnp: Vec<String> = CNP_CASES
            .iter()
            .flat_map(|dir| {
                [
                    "--cases".to_string(),
                    root().join(dir).display().to_string(),
                ]
            })
            .collect();
        let ipv6 = || vec!["--ipv6".to_string()];
        // NetworkPolicy cases over three nodes, an agent each: one pod layout per family (each
        // namespace on a node of its own in IPv4, pods dealt round-robin in IPv6), which keeps
        // the suite's time in bounds; `cargo xtask conformance --nodes 3` runs both.
        let nodes = |layout: &str| {
            ["--nodes", "3", "--layout", layout]
                .map(String::from)
                .to_vec()
        };
        for (what, args) in [
            ("conformance (IPv4)", vec![]),
            ("conformance (IPv6)", ipv6()),
            (
                "conformance, 3 nodes, a node per namespace (IPv4)",
                nodes("per-namespace"),
            ),
            (
                "conformance, 3 nodes, pods round-robin (IPv6)",
                [nodes("round-robin"), ipv6()].concat(),
            ),
            ("conformance, ClusterNetworkPolicy (IPv4)", cnp.clone()),
            (
                "conformance, ClusterNetworkPolicy (IPv6)",
                [cnp.clone(), ipv6()].concat(),
            ),
        ] {
            let started = Instant::now();
            run(&mut tests_bin("conformance", &agent, &args), what)?;
            eprintln!(
                "xtask: {what} took {:.0} s",
                started.elapsed().as_secs_f64()
            );
        }
    }
    eprintln!(
        "xtask: all tests passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Packets `cargo xtask test` fuzzes (`cargo xtask fuzz` defaults to a million).
const FUZZ_PACKETS_IN_TEST: u64 = 50_000;

/// Runs the packet fuzzer (`fuzz/`) against the eBPF object.
pub fn fuzz(packets: u64, seed: u64, release: bool) -> Result<()> {
    let obj = crate::build::build_ebpf()?;
    require_root("cargo xtask fuzz")?;
    let mut cmd = cargo();
    cmd.args(["run", "--quiet", "-p", "palisade-fuzz"]);
    if release {
        cmd.arg("--release");
    }
    cmd.arg("--")
        .args([
            "--packets",
            &packets.to_string(),
            "--seed",
            &seed.to_string(),
        ])
        .arg("--object")
        .arg(&obj)
        .env("PALISADE_EBPF_OBJ", &obj);
    run(&mut cmd, &format!("fuzz: {packets} packets, seed {seed}"))
}

pub fn demo() -> Result<()> {
    require_root("cargo xtask demo")?;
    crate::setup::ensure_packages(&crate::setup::TEST_PACKAGES[..1])?;
    let agent = build_all(false)?;
    let examples = root().join("manifests/examples");
    run(
        &mut tests_bin(
            "demo",
            &agent,
            &["--examples".to_string(), examples.display().to_string()],
        ),
        "demo",
    )
}

/// The ClusterNetworkPolicy cases (schema v2): upstream's and Palisade's own, relative to the
/// repository.
const CNP_CASES: [&str; 2] = [
    "tests/conformance/cnp/cases",
    "tests/conformance/cnp/palisade",
];

pub fn conformance(args: &[String]) -> Result<()> {
    require_root("cargo xtask conformance")?;
    crate::setup::ensure_packages(&crate::setup::TEST_PACKAGES[..1])?;
    let agent = build_all(false)?;
    let args = absolute_cases(args, &std::env::current_dir()?);
    run(&mut tests_bin("conformance", &agent, &args), "conformance")
}

/// The runner starts in the repository's root: a relative `--cases DIR` (or `--cases=DIR`) is
/// made absolute against `cwd`, where `cargo xtask` was called.
fn absolute_cases(args: &[String], cwd: &Path) -> Vec<String> {
    let absolute = |dir: &str| cwd.join(dir).display().to_string();
    let mut out = Vec::with_capacity(args.len());
    let mut iter = args.iter();
    while let Some(a) = iter.next() {
        if a == "--cases" {
            out.push(a.clone());
            if let Some(dir) = iter.next() {
                out.push(absolute(dir));
            }
        } else if let Some(dir) = a.strip_prefix("--cases=") {
            out.push(format!("--cases={}", absolute(dir)));
        } else {
            out.push(a.clone());
        }
    }
    out
}

pub fn lint() -> Result<()> {
    run(
        cargo().args(["fmt", "--all", "--check"]),
        "cargo fmt --check",
    )?;
    run(
        Command::new("cargo")
            .current_dir(root().join("ebpf"))
            .args(["fmt", "--check"]),
        "cargo fmt --check (ebpf)",
    )?;
    run(
        cargo()
            .args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])
            .env("PALISADE_EBPF_OBJ", ebpf_object()),
        "cargo clippy -D warnings",
    )?;
    let mut ebpf_clippy = Command::new("cargo");
    ebpf_clippy
        .current_dir(root().join("ebpf"))
        .args(["clippy", "--release", "--target-dir"])
        .arg(crate::build::ebpf_target_dir())
        .args(["--", "-D", "warnings"]);
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR"] {
        ebpf_clippy.env_remove(var);
    }
    run(&mut ebpf_clippy, "cargo clippy -D warnings (ebpf)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_cases_are_made_absolute() {
        let cwd = Path::new("/repo/tests");
        let args = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            absolute_cases(&args(&["--cases", "conformance/cnp/cases", "--ipv6"]), cwd),
            args(&["--cases", "/repo/tests/conformance/cnp/cases", "--ipv6"])
        );
        assert_eq!(
            absolute_cases(&args(&["--cases=/abs", "--filter", "x"]), cwd),
            args(&["--cases=/abs", "--filter", "x"])
        );
        assert_eq!(absolute_cases(&args(&["--cases"]), cwd), args(&["--cases"]));
    }
}
