//! `cargo xtask image`: the agent's container image, from the Dockerfile at the repository
//! root, whose build stage runs the steps of `cargo xtask build --release` one per layer.
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::build::root;

/// The image the DaemonSet in `manifests/` runs (tag: the workspace version).
pub const IMAGE: &str = "ghcr.io/palisade-dev/palisade";

/// `IMAGE:<version>`.
pub fn default_tag() -> String {
    format!("{IMAGE}:{}", env!("CARGO_PKG_VERSION"))
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .current_dir(root())
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Builds the image with Docker and tags it `tag` (default [`default_tag`]).
pub fn image(tag: Option<String>) -> Result<()> {
    let tag = tag.unwrap_or_else(default_tag);
    // The client alone is not enough: `docker info` needs the daemon.
    let docker = Command::new("docker").arg("info").output();
    if !docker.as_ref().is_ok_and(|o| o.status.success()) {
        let why = match docker {
            Ok(o) => String::from_utf8_lossy(&o.stderr)
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("no reason given")
                .trim()
                .to_string(),
            Err(e) => format!("docker: {e}"),
        };
        bail!(
            "cargo xtask image needs Docker, and `docker info` failed: {why}\n\
             (on a machine with Docker it runs `docker build -t {tag} .` at the repository \
             root; `cargo xtask build --release` builds the same binary without Docker)"
        );
    }
    // The build context has no .git (.dockerignore): pass what `palisade version` reports.
    let commit = git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into());
    let date = git(&["log", "-1", "--format=%ct"]).unwrap_or_default();
    let status = Command::new("docker")
        .current_dir(root())
        .args(["build", "-t", &tag])
        .args(["--build-arg", &format!("PALISADE_GIT_COMMIT={commit}")])
        .args(["--build-arg", &format!("SOURCE_DATE_EPOCH={date}")])
        .arg(".")
        .status()
        .context("running docker build")?;
    if !status.success() {
        bail!("docker build failed");
    }
    println!("built {tag}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::STEPS;

    /// The Dockerfile's instructions, continuation lines joined.
    fn instructions() -> Vec<String> {
        let text = std::fs::read_to_string(root().join("Dockerfile")).expect("./Dockerfile");
        let mut out = Vec::new();
        let mut cur = String::new();
        for line in text.lines() {
            let line = line.trim();
            if cur.is_empty() && (line.is_empty() || line.starts_with('#')) {
                continue;
            }
            match line.strip_suffix('\\') {
                Some(head) => {
                    cur.push_str(head.trim());
                    cur.push(' ');
                }
                None => {
                    cur.push_str(line);
                    out.push(std::mem::take(&mut cur));
                }
            }
        }
        out
    }

    fn runs() -> Vec<String> {
        instructions()
            .into_iter()
            .filter_map(|i| i.strip_prefix("RUN ").map(str::to_string))
            .collect()
    }

    #[test]
    fn the_dockerfile_runs_the_release_build_steps_in_order() {
        let build_runs: Vec<String> = runs().into_iter().filter(|r| r.contains("cargo")).collect();
        let want: Vec<String> = STEPS
            .iter()
            .map(|s| format!("cargo xtask build --release --step {}", s.name()))
            .collect();
        assert_eq!(
            build_runs, want,
            "the Dockerfile's cargo RUN lines must be the steps of `cargo xtask build --release`, \
             one per line, in order, and nothing else"
        );
    }

    #[test]
    fn the_runtime_image_has_the_tools_egress_gateways_drive() {
        // The agent runs `ip` and `nft` on gateway nodes (agent/src/egress.rs); without them a
        // gateway fails closed and no EgressGateway works.
        let runtime: Vec<String> = instructions()
            .into_iter()
            .skip_while(|i| !i.starts_with("FROM ") || i.contains(" AS build"))
            .collect();
        let installs = runtime
            .iter()
            .find(|i| i.starts_with("RUN ") && i.contains("apt-get install"))
            .expect("the runtime stage installs packages");
        for package in ["iproute2", "nftables"] {
            assert!(
                installs.split_whitespace().any(|w| w == package),
                "the runtime stage must install {package}: {installs}"
            );
        }
    }

    #[test]
    fn the_image_holds_the_release_binary_the_agent_step_builds() {
        let copies: Vec<String> = instructions()
            .into_iter()
            .filter(|i| i.starts_with("COPY --from=build"))
            .collect();
        assert_eq!(
            copies,
            ["COPY --from=build /src/target/release/palisade /usr/local/bin/palisade"],
            "the runtime stage copies the agent step's output"
        );
        let workdir = instructions()
            .into_iter()
            .find(|i| i.starts_with("WORKDIR "))
            .expect("a WORKDIR");
        assert_eq!(workdir, "WORKDIR /src");
    }

    #[test]
    fn the_daemonset_runs_the_image_by_its_documented_name() {
        let ds = std::fs::read_to_string(root().join("manifests/daemonset.yaml")).unwrap();
        let images: Vec<&str> = ds
            .lines()
            .filter_map(|l| l.trim().strip_prefix("image: "))
            .collect();
        assert_eq!(
            images,
            [default_tag(), default_tag()],
            "init container and agent"
        );
        let k = std::fs::read_to_string(root().join("manifests/kustomization.yaml")).unwrap();
        assert!(
            k.contains(&format!(
                "- name: {IMAGE}\n    newTag: {}",
                env!("CARGO_PKG_VERSION")
            )),
            "{k}"
        );
    }
}
