//! `cargo xtask soak [--minutes N] [--load PCT]`: the netns suites and the conformance runner,
//! round after round and side by side, while stress-ng keeps every CPU busy. A test that
//! fails only under load is a bug in the test or in the agent; this is where it shows.
//!
//! The binaries are built once and copied to `<target>/soak/bin` (work on the checkout goes
//! on meanwhile). Each round runs two lanes at once: every netns suite of `palisade-tests`
//! one after the other, and the conformance runner (IPv4 and IPv6 in turn). For every failure
//! the round keeps the suite's output and, from every agent of a failing test, its log,
//! status, `palisade stats` and the pinned maps with the conntrack table
//! (`PALISADE_KEEP_FAILURES`). Prints rounds, probes and failures; exits non-zero on any.
use std::{
    io::BufRead,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::{
    build::{build_all, ebpf_object, root, target_dir},
    run::{cargo, require_root, run},
    setup::{TEST_PACKAGES, ensure_packages},
};

/// One child is given this long before it counts as hung (a failure).
const CHILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// The `palisade-tests` test targets (the netns suites), built; (name, executable).
fn netns_suites() -> Result<Vec<(String, PathBuf)>> {
    let out = cargo()
        .args([
            "test",
            "-p",
            "palisade-tests",
            "--no-run",
            "--message-format=json",
        ])
        .env("PALISADE_EBPF_OBJ", ebpf_object())
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the netns suites failed");
    }
    let mut suites = Vec::new();
    for line in out.stdout.lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        let is_test = v["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(exe), Some(name)) = (
            is_test,
            v["executable"].as_str(),
            v["target"]["name"].as_str(),
        ) {
            suites.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    if suites.is_empty() {
        bail!("no netns suites found in palisade-tests");
    }
    suites.sort();
    Ok(suites)
}

fn copy_to(dir: &Path, from: &Path, name: &str) -> Result<PathBuf> {
    let to = dir.join(name);
    std::fs::copy(from, &to).with_context(|| format!("copying {}", from.display()))?;
    Ok(to)
}

/// Waits for `child` up to `timeout`; false on failure or timeout (then it is killed).
fn wait(mut child: Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// Runs `cmd` with its output in `log`; true if it passed.
fn run_logged(mut cmd: Command, log: &Path) -> Result<bool> {
    let out = std::fs::File::create(log)?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    Ok(wait(child, CHILD_TIMEOUT))
}

fn probes_in(file: &Path) -> u64 {
    std::fs::read_to_string(file)
        .map(|s| s.lines().filter_map(|l| l.trim().parse::<u64>().ok()).sum())
        .unwrap_or(0)
}

pub fn soak(minutes: u64, load: u32) -> Result<()> {
    require_root("cargo xtask soak")?;
    let mut packages = TEST_PACKAGES.to_vec();
    packages.push(("stress-ng", "stress-ng"));
    ensure_packages(&packages)?;
    let agent = build_all(false)?;
    let suites = netns_suites()?;
    run(
        cargo()
            .args(["build", "-p", "palisade-tests", "--bin", "conformance"])
            .env("PALISADE_EBPF_OBJ", ebpf_object()),
        "cargo build (conformance runner)",
    )?;

    let soak_dir = target_dir().join("soak");
    let _ = std::fs::remove_dir_all(&soak_dir);
    let bin = soak_dir.join("bin");
    std::fs::create_dir_all(&bin)?;
    let agent = copy_to(&bin, &agent, "palisade")?;
    let obj = copy_to(&bin, &ebpf_object(), "palisade-ebpf.o")?;
    let conformance = copy_to(&bin, &target_dir().join("debug/conformance"), "conformance")?;
    let suites: Vec<(String, PathBuf)> = suites
        .into_iter()
        .map(|(name, exe)| copy_to(&bin, &exe, &name).map(|p| (name, p)))
        .collect::<Result<_>>()?;

    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    eprintln!(
        "xtask: soak for {minutes} min: {} suites ({}) and conformance, {cpus} CPUs loaded to {load}% by stress-ng",
        suites.len(),
        suites
            .iter()
            .map(|(n, _)| n.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut stress = Command::new("stress-ng")
        .args(["--cpu", &cpus.to_string(), "--cpu-load", &load.to_string()])
        .args(["--timeout", &format!("{}s", minutes * 60 + 1800)])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting stress-ng")?;

    let started = Instant::now();
    let deadline = started + Duration::from_secs(minutes * 60);
    let (mut rounds, mut probes) = (0u64, 0u64);
    let mut failures: Vec<String> = Vec::new();
    while rounds == 0 || Instant::now() < deadline {
        rounds += 1;
        let round = soak_dir.join(format!("round-{rounds}"));
        let kept = round.join("failures");
        std::fs::create_dir_all(&kept)?;
        let count = round.join("probes");
        let env = |cmd: &mut Command| {
            cmd.current_dir(root())
                .env("CI", "true")
                .env("PALISADE_AGENT_BIN", &agent)
                .env("PALISADE_EBPF_OBJ", &obj)
                .env("PALISADE_KEEP_FAILURES", &kept)
                .env("PALISADE_PROBE_COUNT", &count);
        };
        let ipv6 = rounds % 2 == 0;
        let (suite_results, conformance_ok) = std::thread::scope(|s| -> Result<_> {
            let lane = s.spawn(|| -> Result<Vec<(String, bool)>> {
                let mut results = Vec::new();
                for (name, exe) in &suites {
                    let mut cmd = Command::new(exe);
                    env(&mut cmd);
                    let ok = run_logged(cmd, &round.join(format!("{name}.log")))?;
                    results.push((name.clone(), ok));
                }
                Ok(results)
            });
            let mut cmd = Command::new(&conformance);
            cmd.arg("--agent").arg(&agent);
            if ipv6 {
                cmd.arg("--ipv6");
            }
            env(&mut cmd);
            let conformance_ok = run_logged(cmd, &round.join("conformance.log"))?;
            let suite_results = lane.join().expect("suite lane")?;
            Ok((suite_results, conformance_ok))
        })?;
        let mut failed: Vec<String> = suite_results
            .into_iter()
            .filter(|(_, ok)| !ok)
            .map(|(name, _)| name)
            .collect();
        if !conformance_ok {
            failed.push(format!(
                "conformance{}",
                if ipv6 { " (IPv6)" } else { " (IPv4)" }
            ));
        }
        let round_probes = probes_in(&count);
        probes += round_probes;
        eprintln!(
            "xtask: soak round {rounds} ({:.0} s in): {round_probes} probes, {} failures{}",
            started.elapsed().as_secs_f64(),
            failed.len(),
            if failed.is_empty() {
                String::new()
            } else {
                format!(
                    ": {} (outputs and evidence in {})",
                    failed.join(", "),
                    round.display()
                )
            }
        );
        failures.extend(failed.into_iter().map(|f| format!("round {rounds}: {f}")));
    }
    let _ = stress.kill();
    let _ = stress.wait();
    println!(
        "soak: {rounds} rounds, {probes} probes, {} failures in {:.0} min",
        failures.len(),
        started.elapsed().as_secs_f64() / 60.0
    );
    for f in &failures {
        println!("  {f}");
    }
    if !failures.is_empty() {
        bail!("{} failures under load", failures.len());
    }
    Ok(())
}
