//! `cargo xtask bench [--quick]`: installs what the benchmarks need (iperf3, ipset, iptables, nft;
//! matplotlib in a virtualenv under target/bench), builds the datapath, the agent and the
//! benchmark runner in release mode, runs it (tests/src/bin/bench) and draws the plot.
//! Writes target/bench/report.json, report.md, plot.png and per_packet.png.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Result, bail};

use crate::{
    build::{build_ebpf, root},
    run::{cargo, require_root, run},
    setup::{apt_install, ensure_packages},
};

/// A Python with matplotlib: a virtualenv under target/bench (created once).
fn plot_python(dir: &Path) -> Result<PathBuf> {
    let venv = dir.join("venv");
    let python = venv.join("bin/python");
    let ok = |python: &Path| {
        Command::new(python)
            .args(["-c", "import matplotlib"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if python.exists() && ok(&python) {
        return Ok(python);
    }
    ensure_packages(&[("python3", "python3")])?;
    let make_venv = |venv: &Path| {
        Command::new("python3")
            .args(["-m", "venv"])
            .arg(venv)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !make_venv(&venv) {
        // Debian's python3 needs python3-venv for `-m venv`.
        let _ = std::fs::remove_dir_all(&venv);
        apt_install(&["python3-venv"])?;
        if !make_venv(&venv) {
            bail!("python3 -m venv {} failed", venv.display());
        }
    }
    run(
        Command::new(venv.join("bin/pip")).args([
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "matplotlib",
        ]),
        "pip install matplotlib (into target/bench/venv)",
    )?;
    if !ok(&python) {
        bail!("matplotlib is not importable from {}", python.display());
    }
    Ok(python)
}

pub fn bench(quick: bool, extra: &[String]) -> Result<()> {
    let started = Instant::now();
    require_root("cargo xtask bench")?;
    let root = root();
    let out = crate::build::target_dir().join("bench");
    std::fs::create_dir_all(&out)?;
    ensure_packages(&[
        ("ip", "iproute2"),
        ("iperf3", "iperf3"),
        ("ipset", "ipset"),
        ("iptables", "iptables"),
        ("nft", "nftables"),
        ("taskset", "util-linux"),
    ])?;
    let python = plot_python(&out)?;

    let obj = build_ebpf()?;
    run(
        cargo()
            .args([
                "build",
                "--release",
                "-p",
                "palisade-agent",
                "--bin",
                "palisade",
                "-p",
                "palisade-tests",
                "--bin",
                "bench",
            ])
            .env("PALISADE_EBPF_OBJ", &obj),
        "cargo build --release (agent, bench)",
    )?;
    let release = crate::build::target_dir().join("release");
    let mut cmd = Command::new(release.join("bench"));
    cmd.current_dir(&root)
        .arg("--agent")
        .arg(release.join("palisade"))
        .arg("--ebpf-obj")
        .arg(&obj)
        .arg("--out")
        .arg(&out)
        .args(extra);
    if quick {
        cmd.arg("--quick");
    }
    run(
        &mut cmd,
        if quick {
            "benchmarks (quick)"
        } else {
            "benchmarks"
        },
    )?;

    let script = out.join("plot.py");
    std::fs::write(&script, include_str!("bench_plot.py"))?;
    run(
        Command::new(&python)
            .arg(&script)
            .arg(out.join("report.json"))
            .arg(out.join("plot.png")),
        "plot",
    )?;
    eprintln!(
        "xtask: benchmarks done in {:.0} s: {}",
        started.elapsed().as_secs_f64(),
        out.join("report.md").display()
    );
    Ok(())
}
