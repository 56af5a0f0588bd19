//! What a fresh machine lacks: Debian packages whose commands are missing, installed by the
//! command that needs them (`test`, `demo`, `bench`, `soak`), so that the README's commands do
//! all set-up themselves.
use std::process::Command;

use anyhow::Result;

use crate::run::run;

/// The Debian packages the netns rig and the tests need: iproute2 (the rig, the agent's
/// interface discovery), nftables (kube-proxy-like DNAT in the Service and relay tests).
pub const TEST_PACKAGES: &[(&str, &str)] = &[("ip", "iproute2"), ("nft", "nftables")];

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the Debian packages whose commands are missing.
pub fn ensure_packages(wanted: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(cmd, _)| !have(cmd))
        .map(|(_, pkg)| *pkg)
        .collect();
    apt_install(&missing)
}

pub fn apt_install(missing: &[&str]) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    run(
        Command::new("apt-get").args(["update", "-q"]),
        "apt-get update",
    )?;
    run(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
        &format!("apt-get install {}", missing.join(" ")),
    )
}
