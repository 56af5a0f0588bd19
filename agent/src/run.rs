//! The agent's main loop in standalone mode: manifests from a directory, re-read on change,
//! compiled and written to the maps; pods' interfaces followed as they come and go.
//!
//! Bad input never loosens enforcement: a file that fails to parse keeps its last good objects,
//! a policy that fails validation keeps its last good version (see `model`), and the errors are
//! logged with the object and field they concern.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    compile::Compiler,
    interfaces::HostView,
    loader::{self, Datapath},
    manifest::ManifestDir,
    maps::MapWriter,
    model::Store,
};

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub manifests: PathBuf,
    /// Where maps and links are pinned; must be on a bpffs (mounted if it is not).
    pub pin_dir: PathBuf,
    /// Only pods scheduled on this node are endpoints (all pods with a local interface when
    /// absent).
    pub node_name: Option<String>,
    /// How often the manifest directory is checked for changes.
    pub poll: Duration,
    /// How often interfaces, addresses and routes are re-read.
    pub host_poll: Duration,
    /// Where to write a JSON status after every reconcile (for tests and probes).
    pub status_file: Option<PathBuf>,
}

/// What the agent reports after each reconcile.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Status {
    /// When the reconcile started (it read the manifests after this), ms since the Unix epoch.
    pub started_at_unix_ms: u128,
    /// When the reconcile finished, milliseconds since the Unix epoch.
    pub reconciled_at_unix_ms: u128,
    /// Local endpoints enforced.
    pub endpoints: usize,
    pub policy_entries: usize,
    /// Current configuration errors (each names its object and field).
    pub errors: Vec<String>,
}

/// The pipeline state between two reconciles.
pub struct Agent {
    cfg: RunConfig,
    datapath: Datapath,
    writer: MapWriter,
    source: ManifestDir,
    store: Store,
    compiler: Compiler,
    host: HostView,
    first: bool,
}

impl Agent {
    pub fn start(cfg: RunConfig, object: &[u8]) -> Result<Self> {
        if let Some(parent) = cfg.pin_dir.parent() {
            loader::ensure_bpffs(parent)?;
        }
        let mut datapath = Datapath::load(object, Some(&cfg.pin_dir))?;
        for p in datapath.program_stats() {
            info!(
                program = p.name,
                verified_instructions = p.verified_instructions,
                "program loaded"
            );
        }
        let writer = MapWriter::new(&mut datapath)?;
        let source = ManifestDir::new(&cfg.manifests);
        Ok(Agent {
            cfg,
            datapath,
            writer,
            source,
            store: Store::default(),
            compiler: Compiler::default(),
            host: HostView::default(),
            first: true,
        })
    }

    /// Re-reads the manifests (standalone source) and enforces them.
    pub fn reconcile(&mut self) -> Result<()> {
        let started_at_unix_ms = unix_ms();
        let loaded = self.source.load();
        let mut errors: Vec<String> = loaded.errors.iter().map(|e| e.to_string()).collect();
        errors.extend(
            self.store
                .replace_all(loaded.objects)
                .iter()
                .map(|e| e.to_string()),
        );
        let store = std::mem::take(&mut self.store);
        let result = self.enforce(&store, errors, started_at_unix_ms);
        self.store = store;
        result
    }

    /// The one pipeline every source feeds: reads the host, compiles `store` for this node's
    /// endpoints, attaches new endpoints, writes what changed, detaches what is gone.
    pub fn enforce(
        &mut self,
        store: &Store,
        errors: Vec<String>,
        started_at_unix_ms: u128,
    ) -> Result<()> {
        let started = Instant::now();
        for e in &errors {
            error!("{e}");
        }
        self.host = HostView::read().context("reading interfaces and routes")?;
        let endpoints = self
            .host
            .local_endpoints(store, self.cfg.node_name.as_deref());
        let desired = self
            .compiler
            .compile(store, &endpoints, &self.host.addresses);

        for ifindex in desired.endpoints.keys() {
            if let Err(e) = self.datapath.attach(*ifindex) {
                warn!(ifindex, "{e:#}");
            }
        }
        let stats = self.writer.apply(&desired);
        for ifindex in self.datapath.attached_ifindexes() {
            if !desired.endpoints.contains_key(&ifindex) {
                self.datapath.detach(ifindex);
            }
        }
        if self.first {
            // Links pinned by an earlier agent for interfaces that are no longer endpoints.
            for ifindex in self.datapath.pinned_link_ifindexes() {
                if !desired.endpoints.contains_key(&ifindex) {
                    self.datapath.remove_stale_pins(ifindex);
                }
            }
            self.first = false;
        }
        info!(
            endpoints = desired.endpoints.len(),
            identities = desired.identities.len(),
            policy_entries = desired.policy.len(),
            cidr_entries = desired.cidrs.len(),
            written = stats.written,
            removed = stats.removed,
            failed = stats.failed,
            elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
            "reconciled"
        );
        if let Some(path) = &self.cfg.status_file {
            let status = Status {
                started_at_unix_ms,
                reconciled_at_unix_ms: unix_ms(),
                endpoints: desired.endpoints.len(),
                policy_entries: desired.policy.len(),
                errors,
            };
            write_atomically(path, &serde_json::to_vec_pretty(&status)?)?;
        }
        Ok(())
    }

    pub fn pin_dir(&self) -> &Path {
        &self.cfg.pin_dir
    }

    /// What the maps hold now, with rule and endpoint metadata (for the CLI).
    pub fn applied(&self) -> &crate::state::DesiredState {
        self.writer.applied()
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

/// Runs until SIGTERM or SIGINT. Pinned maps and links stay: enforcement goes on while no agent
/// runs, and the next agent adopts them.
pub async fn run_standalone(cfg: RunConfig, object: &[u8]) -> Result<()> {
    let mut agent = Agent::start(cfg.clone(), object)?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(cfg.poll);
    let mut fingerprint = None;
    let mut last_host_read = Instant::now() - cfg.host_poll;
    info!(manifests = %cfg.manifests.display(), pin_dir = %cfg.pin_dir.display(), "standalone agent running");
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        let fp = agent.source.fingerprint();
        let host_due = last_host_read.elapsed() >= cfg.host_poll;
        let host_changed = host_due && HostView::read().map(|v| v != agent.host).unwrap_or(true);
        if host_due {
            last_host_read = Instant::now();
        }
        if fingerprint.as_ref() != Some(&fp) || host_changed {
            fingerprint = Some(fp);
            if let Err(e) = agent.reconcile() {
                error!("reconcile failed: {e:#}");
            }
        }
    }
    info!("stopping; pinned maps and links keep enforcing");
    Ok(())
}
