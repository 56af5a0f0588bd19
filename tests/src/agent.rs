//! The standalone agent as a child process inside a rig's node namespace, with its own bpffs,
//! manifest directory, status file and log.
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::rig::Node;

/// The agent's status file (see `palisade::run::Status`).
#[derive(Debug, Clone, Deserialize)]
pub struct Status {
    pub started_at_unix_ms: u128,
    pub reconciled_at_unix_ms: u128,
    pub endpoints: usize,
    pub policy_entries: usize,
    pub errors: Vec<String>,
}

pub struct AgentProcess {
    child: Option<Child>,
    bpffs: PathBuf,
    status: PathBuf,
    log: PathBuf,
    pin_dir: PathBuf,
}

/// The agent binary: `PALISADE_AGENT_BIN` (set by `cargo xtask test`) or the debug build.
pub fn agent_binary() -> PathBuf {
    std::env::var_os("PALISADE_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/palisade")
        })
}

fn unix_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl AgentProcess {
    /// Mounts a bpffs under `work`, then starts `agent run` in the node's network namespace.
    pub fn start(node: &Node, agent: &Path, manifests: &Path, work: &Path) -> Result<Self> {
        let bpffs = work.join("bpffs");
        std::fs::create_dir_all(&bpffs)?;
        nix::mount::mount(
            Some("bpf"),
            &bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting bpffs at {}", bpffs.display()))?;
        let mut agent_process = AgentProcess {
            child: None,
            pin_dir: bpffs.join("palisade"),
            bpffs,
            status: work.join("status.json"),
            log: work.join("agent.log"),
        };
        agent_process.spawn(node, agent, manifests)?;
        Ok(agent_process)
    }

    /// Starts (or restarts) the agent process, adopting whatever is pinned.
    pub fn spawn(&mut self, node: &Node, agent: &Path, manifests: &Path) -> Result<()> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = node.command(agent);
        cmd.arg("run")
            .arg("--manifests")
            .arg(manifests)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--status-file")
            .arg(&self.status)
            .args(["--poll-ms", "100"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", agent.display()))?,
        );
        Ok(())
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn status(&self) -> Option<Status> {
        let text = std::fs::read_to_string(&self.status).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Waits until a reconcile that started after `since` has finished with `endpoints`
    /// endpoints. Fails if the agent exits or the time runs out.
    pub fn wait_reconciled(
        &mut self,
        since: SystemTime,
        endpoints: usize,
        timeout: Duration,
    ) -> Result<Status> {
        let deadline = Instant::now() + timeout;
        let since = unix_ms(since);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("agent exited ({status}); log: {}", self.log.display());
            }
            if let Some(s) = self.status()
                && s.started_at_unix_ms > since
                && s.endpoints == endpoints
            {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "agent did not reconcile {endpoints} endpoints within {timeout:?} (status: {:?}); log: {}",
                    self.status(),
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: the agent gets no chance to clean up (pins keep enforcing).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.stop();
        // Unmounting the bpffs drops the pins; links of deleted veths are already gone.
        let _ = nix::mount::umount2(&self.bpffs, nix::mount::MntFlags::MNT_DETACH);
    }
}
