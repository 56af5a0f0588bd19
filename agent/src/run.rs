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

use palisade_datapath::{Datapath, MapWriter, loader, pins};

use crate::{
    api::Problems,
    compile::Compiler,
    interfaces::HostView,
    manifest::ManifestDir,
    model::{ConfigError, Store},
    observe::{ObserveConfig, Observer},
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
    /// Node-wide audit mode: every policy's denials are "would drop" (ARCHITECTURE.md).
    pub audit: bool,
    /// The CLI socket (`state.json` goes beside it); `None`: no socket.
    pub socket: Option<PathBuf>,
    /// The Prometheus endpoint; `None`: off.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Verdicts kept for `palisade verdicts`.
    pub history: usize,
    /// Live conntrack entries per endpoint (`CT_QUOTA`).
    pub conntrack_per_pod: u32,
}

impl From<&RunConfig> for ObserveConfig {
    fn from(cfg: &RunConfig) -> ObserveConfig {
        ObserveConfig {
            socket: cfg.socket.clone(),
            metrics_addr: cfg.metrics_addr,
            history: cfg.history,
            pin_dir: cfg.pin_dir.clone(),
            audit_all: cfg.audit,
        }
    }
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
    /// Current configuration errors (each names its object and field), failed map writes
    /// (each names the endpoint that fails closed because of it) and failed attachments.
    pub errors: Vec<String>,
    /// Configuration errors among `errors` (bad manifests and objects).
    #[serde(default)]
    pub config_errors: usize,
    /// Endpoints failing closed (`EP_PENDING`) because their entries could not be written:
    /// `namespace/name (ifindex N)`.
    #[serde(default)]
    pub pending_endpoints: Vec<String>,
    /// Map writes that failed since the agent started (each one failed closed).
    #[serde(default)]
    pub map_write_failures_total: u64,
    /// Endpoints whose programs could not be attached (retried on every poll).
    #[serde(default)]
    pub attach_failures: usize,
    /// Pins put back and links re-attached since the agent started (`Datapath::repair`).
    #[serde(default)]
    pub repairs_total: u64,
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
    /// Something failed that a later reconcile may fix (a map write, an attachment): the main
    /// loop reconciles again without waiting for a change.
    retry: bool,
    repairs_total: u64,
    /// See `hold_if_incomplete`.
    incomplete: Vec<String>,
    /// When endpoints failing closed for a full map are tried again.
    retry_at: Option<Instant>,
    /// Verdict reader, CLI socket, metrics (absent if the event maps could not be taken).
    observer: Option<Observer>,
    /// The conntrack sweep's thread (stops with the agent).
    _ct_sweep: palisade_datapath::ct_sweep::SweepHandle,
    /// Services and EndpointSlices (Service VIPs in egress policy: `services`), set by the
    /// source before `enforce`.
    services: crate::services::ServiceStore,
    service_ids: crate::services::ServiceIds,
    /// Where the CNI plugin records the interfaces it provisions (`cni`).
    cni_state_dir: Option<PathBuf>,
    cni_seen: Vec<(std::ffi::OsString, Option<std::time::SystemTime>)>,
    /// Interfaces with a CNI record at the last reconcile.
    cni_provisioned: std::collections::BTreeSet<u32>,
}

impl Agent {
    pub fn start(cfg: RunConfig, object: &[u8]) -> Result<Self> {
        if let Some(parent) = cfg.pin_dir.parent() {
            pins::ensure_bpffs(parent)?;
        }
        let opts = loader::LoadOptions {
            ct_quota: Some(cfg.conntrack_per_pod),
            ..Default::default()
        };
        let mut datapath = Datapath::load_with(object, Some(&cfg.pin_dir), &opts)?;
        for p in datapath.program_stats() {
            info!(
                program = p.name,
                verified_instructions = p.verified_instructions,
                "program loaded"
            );
        }
        // Before the writer and readers take the object's map handles.
        let ct_sweep = palisade_datapath::ct_sweep::Sweeper::new(&datapath)
            .and_then(|s| s.spawn(palisade_datapath::ct_sweep::INTERVAL))
            .context("the conntrack sweep")?;
        let writer = MapWriter::new(&mut datapath)?;
        let source = ManifestDir::new(&cfg.manifests);
        let observer = Observer::start(ObserveConfig::from(&cfg), &mut datapath)
            .map_err(|e| error!("verdicts, CLI socket and metrics are off: {e:#}"))
            .ok();
        let mut compiler = Compiler::default();
        compiler.audit_all = cfg.audit;
        Ok(Agent {
            cfg,
            datapath,
            writer,
            source,
            store: Store::default(),
            compiler,
            host: HostView::default(),
            first: true,
            retry: false,
            repairs_total: 0,
            incomplete: Vec::new(),
            retry_at: None,
            observer,
            _ct_sweep: ct_sweep,
            services: Default::default(),
            service_ids: Default::default(),
            cni_state_dir: None,
            cni_seen: Vec::new(),
            cni_provisioned: Default::default(),
        })
    }

    /// Re-reads the manifests (standalone source) and enforces them. With `settled` (the
    /// directory's fingerprint seen unchanged over a poll), a file that differs from it keeps
    /// its last good objects: see `ManifestDir::load_settled`.
    pub fn reconcile(&mut self, settled: Option<&crate::manifest::Fingerprint>) -> Result<()> {
        let started_at_unix_ms = unix_ms();
        let loaded = self.source.load_settled(settled);
        let mut errors: Vec<ConfigError> = loaded.errors;
        let policies: Vec<_> = loaded
            .objects
            .iter()
            .filter(|o| matches!(o, crate::model::Object::NetworkPolicy(_)))
            .map(|o| o.key())
            .collect();
        errors.extend(self.store.replace_all(loaded.objects));
        errors.extend(unresolved_named_ports(&self.store));
        let (services, service_errors) = crate::services::ServiceStore::from_manifests(
            &loaded.services,
            &loaded.endpoint_slices,
        );
        errors.extend(service_errors);
        self.set_services(services);
        // What this view of the configuration lacks for want of a last good version: files
        // that never parsed, policies that never validated (since this agent started).
        let mut incomplete: Vec<String> = loaded
            .failed
            .iter()
            .map(|f| format!("{f} does not parse"))
            .collect();
        incomplete.extend(
            policies
                .iter()
                .filter(|k| {
                    !self
                        .store
                        .policies
                        .contains_key(&(k.namespace.clone(), k.name.clone()))
                })
                .map(|k| format!("{k} is invalid")),
        );
        self.hold_if_incomplete(incomplete);
        let store = std::mem::take(&mut self.store);
        let result = self.enforce(&store, errors, started_at_unix_ms);
        self.store = store;
        result
    }

    /// Tells the next `enforce` what its store lacks (objects that never parsed or validated,
    /// so have no last good version). On the first reconcile of an agent that adopted pinned
    /// enforcement, an incomplete store is not applied: the pinned state (the last good
    /// configuration of the agent before) stays in force until the configuration is complete,
    /// rather than losing, say, a deny policy that fails validation after a restart.
    pub fn hold_if_incomplete(&mut self, missing: Vec<String>) {
        self.incomplete = missing;
    }

    /// The one pipeline every source feeds: reads the host, compiles `store` for this node's
    /// endpoints, attaches new endpoints, writes what changed, detaches what is gone.
    pub fn enforce(
        &mut self,
        store: &Store,
        config_errors: Vec<ConfigError>,
        started_at_unix_ms: u128,
    ) -> Result<()> {
        let started = Instant::now();
        self.retry = false;
        self.retry_at = None;
        for e in &config_errors {
            error!("{e}");
        }
        let config = config_errors;
        let mut errors: Vec<String> = config.iter().map(|e| e.to_string()).collect();
        let config_errors = config.len();
        let incomplete = std::mem::take(&mut self.incomplete);
        let adopted = self.writer.applied();
        if self.first && !incomplete.is_empty() && !adopted.endpoints.is_empty() {
            let msg = format!(
                "holding the enforcement left pinned by the agent before ({} endpoints) until the \
                 configuration is complete: {}",
                adopted.endpoints.len(),
                incomplete.join("; ")
            );
            error!("{msg}");
            errors.push(msg);
            self.retry = true;
            let status = Status {
                started_at_unix_ms,
                reconciled_at_unix_ms: unix_ms(),
                endpoints: adopted.endpoints.len(),
                policy_entries: adopted.policy.len(),
                errors,
                config_errors,
                pending_endpoints: Vec::new(),
                map_write_failures_total: self.writer.failures_total(),
                attach_failures: 0,
                repairs_total: self.repairs_total,
            };
            return self.write_status(&status, &config);
        }
        self.host = HostView::read().context("reading interfaces and routes")?;
        // Pods the CNI plugin provisioned: their interface, and their addresses before the
        // API server reports them.
        let records = match &self.cni_state_dir {
            Some(dir) => crate::cni::Records::read(dir, &self.host),
            None => crate::cni::Records::default(),
        };
        // An interface the plugin provisioned since the last reconcile: its ENDPOINTS entry
        // is the plugin's now, whatever the writer last wrote there.
        let recorded = records.ifindexes();
        for ifindex in recorded.difference(&self.cni_provisioned) {
            self.writer.forget_endpoint(*ifindex);
        }
        // Interfaces whose record the plugin removed (CNI DEL): their pod is gone for certain.
        let released: std::collections::BTreeSet<u32> = self
            .cni_provisioned
            .difference(&recorded)
            .copied()
            .collect();
        self.cni_provisioned = recorded;
        let overlaid = records.overlay(store);
        let store: &Store = &overlaid;
        let mut endpoints = self
            .host
            .local_endpoints(store, self.cfg.node_name.as_deref());
        records.endpoints(store, self.cfg.node_name.as_deref(), &mut endpoints);
        if self.first {
            // Keep the endpoint ids of the agent that ran before (pinned ENDPOINTS): its
            // conntrack entries are keyed by them. (Not the CNI plugin's provisional ids.)
            let old = &self.writer.applied().endpoints;
            for ep in &endpoints {
                if let Some(info) = old.get(&ep.ifindex)
                    && !crate::cni::is_provisional(info.id)
                {
                    self.compiler.adopt_endpoint_id(&ep.pod, info.id);
                }
            }
        }
        let mut desired = self
            .compiler
            .compile(store, &endpoints, &self.host.addresses);
        let expanded = crate::services::expand(
            &mut desired,
            &self.services,
            &mut self.service_ids,
            self.cfg.node_name.as_deref(),
        );
        errors.extend(expanded.errors);
        for fenced in self.fence_vanished(&mut desired, &released) {
            warn!("{fenced}");
            errors.push(fenced);
        }

        // Maps first: an interface gets its programs only once its entry exists (an attached
        // interface without one drops everything), and a replaced program finds its maps full.
        let stats = self.writer.apply(&desired);
        if let Some(o) = &self.observer {
            o.publish(
                self.writer.applied(),
                store,
                &self.host.addresses,
                started_at_unix_ms,
                stats,
            );
        }
        let mut attach_failures = 0;
        for ifindex in desired.endpoints.keys() {
            if let Err(e) = self.datapath.attach(*ifindex) {
                warn!(ifindex, "{e:#}");
                attach_failures += 1;
                let pod = desired
                    .endpoints
                    .get(ifindex)
                    .and_then(|info| desired.endpoint_meta.get(&info.id))
                    .map_or_else(|| format!("ifindex {ifindex}"), |m| m.pod.to_string());
                errors.push(format!(
                    "endpoint {pod}: attaching the programs failed: {e:#}"
                ));
            }
        }
        for ifindex in self.datapath.attached_ifindexes() {
            if !desired.endpoints.contains_key(&ifindex) {
                self.datapath.detach(ifindex);
            }
        }
        if self.first {
            // Every link runs this agent's programs now (maps whose layout changed: see
            // `Datapath::finish_upgrade`).
            for line in self.datapath.finish_upgrade() {
                info!("{line}");
            }
        }
        errors.extend(self.writer.failures().iter().map(|f| f.to_string()));
        let pending: Vec<String> = self
            .writer
            .pending()
            .into_iter()
            .map(|(ifindex, id)| {
                desired.endpoint_meta.get(&id).map_or_else(
                    || format!("endpoint id {id} (ifindex {ifindex})"),
                    |m| format!("{} (ifindex {ifindex})", m.pod),
                )
            })
            .collect();
        // Attachments are retried at once; a full map only frees up when something changes,
        // so pending endpoints are retried now and then.
        self.retry = attach_failures > 0;
        if !pending.is_empty() {
            self.retry_at = Some(Instant::now() + PENDING_RETRY);
        }
        if self.first {
            // Links pinned by an earlier agent for interfaces that are no longer endpoints.
            // Not those the CNI plugin attached to a pod this agent does not know yet: they
            // hold the pod's first packets (provisional entry) until it is compiled.
            let provisioned = records.ifindexes();
            for ifindex in self.datapath.pinned_link_ifindexes() {
                if !desired.endpoints.contains_key(&ifindex) && !provisioned.contains(&ifindex) {
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
        let status = Status {
            started_at_unix_ms,
            reconciled_at_unix_ms: unix_ms(),
            endpoints: desired.endpoints.len(),
            policy_entries: desired.policy.len(),
            errors,
            config_errors,
            pending_endpoints: pending,
            map_write_failures_total: self.writer.failures_total(),
            attach_failures,
            repairs_total: self.repairs_total,
        };
        self.write_status(&status, &config)
    }

    /// Interfaces this agent enforces on (attached, or pinned by the agent before) that are
    /// still on the host but whose pod this view does not place there (its host routes went
    /// away for a moment, its object is missing or late): they are fenced, not detached. They
    /// keep the programs, with their last entry switched to `EP_PENDING` (every packet
    /// dropped), until the pod is seen on them again or the interface goes. Detaching would
    /// leave a possibly running pod with no policy at all. Not those the CNI plugin `released`
    /// (a DEL says the pod is gone). One line per fenced interface.
    fn fence_vanished(
        &self,
        desired: &mut crate::state::DesiredState,
        released: &std::collections::BTreeSet<u32>,
    ) -> Vec<String> {
        let present: std::collections::BTreeSet<u32> = self.host.links.values().copied().collect();
        let mut candidates = self.datapath.attached_ifindexes();
        if self.first {
            candidates.extend(self.datapath.pinned_link_ifindexes());
        }
        let previous = self.writer.applied();
        let mut out = Vec::new();
        for ifindex in candidates {
            if desired.endpoints.contains_key(&ifindex)
                || !present.contains(&ifindex)
                || released.contains(&ifindex)
            {
                continue;
            }
            let Some(info) = previous.endpoints.get(&ifindex) else {
                continue; // no entry: the attached programs drop everything already
            };
            desired.endpoints.insert(
                ifindex,
                palisade_common::EndpointInfo {
                    flags: info.flags | palisade_common::EP_PENDING,
                    ..*info
                },
            );
            let pod = match previous.endpoint_meta.get(&info.id) {
                Some(meta) => {
                    let pod = meta.pod.to_string();
                    desired
                        .endpoint_meta
                        .entry(info.id)
                        .or_insert_with(|| meta.clone());
                    pod
                }
                None => format!("endpoint id {}", info.id),
            };
            out.push(format!(
                "interface ifindex {ifindex} of {pod} is still on this host but its pod is not \
                 seen on it: fenced (every packet dropped) until it is, or the interface goes"
            ));
        }
        out
    }

    /// Writes the status file and hands the problems to `palisade stats` and the metrics.
    fn write_status(&self, status: &Status, config: &[ConfigError]) -> Result<()> {
        if let Some(o) = &self.observer {
            o.set_problems(Problems {
                config_errors: config.to_vec(),
                errors: status.errors[status.config_errors.min(status.errors.len())..].to_vec(),
                pending_endpoints: status.pending_endpoints.clone(),
                map_write_failures_total: status.map_write_failures_total,
            });
        }
        if let Some(path) = &self.cfg.status_file {
            write_atomically(path, &serde_json::to_vec_pretty(status)?)?;
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

    /// The check both sources run every `host_poll`: whether the host's interfaces or routes
    /// changed, pins had to be put back (`repair`) or failed work is due again; any of them
    /// wants a reconcile.
    pub fn poll_host(&mut self) -> bool {
        let host_changed = HostView::read().map(|v| v != self.host).unwrap_or(true);
        let repaired = self.repair();
        host_changed || repaired || self.wants_retry()
    }

    /// Puts back pins removed by hand and re-attaches links detached behind our back (see
    /// `Datapath::repair`); true if anything was repaired.
    pub fn repair(&mut self) -> bool {
        let repaired = self.datapath.repair();
        for r in &repaired {
            warn!("repaired: {r}");
        }
        self.repairs_total += repaired.len() as u64;
        !repaired.is_empty()
    }

    /// A failed write or attachment wants another reconcile.
    pub fn wants_retry(&self) -> bool {
        self.retry || self.retry_at.is_some_and(|t| Instant::now() >= t)
    }

    pub fn datapath_mut(&mut self) -> &mut Datapath {
        &mut self.datapath
    }

    /// The Services the next `enforce` applies (see `services`).
    pub fn set_services(&mut self, services: crate::services::ServiceStore) {
        self.services = services;
    }

    /// Where the CNI plugin records what it provisioned (see `cni`); `None`: no plugin.
    pub fn set_cni_state_dir(&mut self, dir: Option<PathBuf>) {
        self.cni_state_dir = dir;
    }

    /// Whether the CNI plugin added or removed records since the last call.
    pub fn cni_records_changed(&mut self) -> bool {
        let Some(dir) = &self.cni_state_dir else {
            return false;
        };
        let mut seen: Vec<_> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                    .map(|e| {
                        (
                            e.file_name(),
                            e.metadata().ok().and_then(|m| m.modified().ok()),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        seen.sort();
        let changed = seen != self.cni_seen;
        self.cni_seen = seen;
        changed
    }
}

/// Named ports that no pod declares (with that protocol): valid, as the API server accepts
/// them, but they match nothing, which is rarely what was meant.
pub(crate) fn unresolved_named_ports(store: &Store) -> Vec<ConfigError> {
    use crate::model::PortMatch;
    use crate::state::Direction;
    let declared: std::collections::BTreeSet<(&str, crate::model::Protocol)> = store
        .pods
        .values()
        .flat_map(|p| {
            p.container_ports
                .iter()
                .map(|n| (n.name.as_str(), n.protocol))
        })
        .collect();
    let mut out = Vec::new();
    for p in store.policies.values() {
        for dir in Direction::BOTH {
            for (i, rule) in p.rules(dir).unwrap_or_default().iter().enumerate() {
                for (k, port) in rule.ports.iter().flatten().enumerate() {
                    if let PortMatch::Named(name) = &port.port
                        && !declared.contains(&(name.as_str(), port.protocol))
                    {
                        out.push(ConfigError::new(
                            format!("NetworkPolicy {}/{}", p.namespace, p.name),
                            format!("spec.{dir}[{i}].ports[{k}].port"),
                            format!(
                                "no pod declares a {} port named {name:?}: it matches nothing",
                                port.protocol
                            ),
                        ));
                    }
                }
            }
        }
    }
    out
}

/// Hands the heap a reconcile freed (parsed manifests, compiled state, diffs) back to the
/// kernel: glibc keeps it mapped otherwise, and the agent's resident set would stay at its peak.
pub(crate) fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
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

/// How often endpoints that fail closed because a map is full are written again.
const PENDING_RETRY: Duration = Duration::from_secs(30);

/// Runs until SIGTERM or SIGINT. Pinned maps and links stay: enforcement goes on while no agent
/// runs, and the next agent adopts them.
pub async fn run_standalone(cfg: RunConfig, object: &[u8]) -> Result<()> {
    run_standalone_with(cfg, object, SourceOptions::default()).await
}

/// What both sources take beside `RunConfig`.
#[derive(Clone, Debug, Default)]
pub struct SourceOptions {
    /// Where the CNI plugin records the interfaces it provisions (`None`: no plugin).
    pub cni_state_dir: Option<PathBuf>,
    /// `/healthz` and `/readyz` (`None`: off).
    pub health_addr: Option<std::net::SocketAddr>,
}

/// `run_standalone`, with the CNI plugin's records and the health endpoint.
pub async fn run_standalone_with(cfg: RunConfig, object: &[u8], opts: SourceOptions) -> Result<()> {
    let health = crate::health::Health::default();
    health.beat();
    if let Some(addr) = opts.health_addr {
        health.serve(addr);
    }
    let mut agent = Agent::start(cfg.clone(), object)?;
    agent.set_cni_state_dir(opts.cni_state_dir.clone());
    let notify = match &opts.cni_state_dir {
        Some(dir) => crate::cni::bind_notify(dir)
            .map_err(|e| error!("CNI wake-ups are off (the records are still read): {e:#}"))
            .ok(),
        None => None,
    };
    let mut notify_buf = [0u8; 64];
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(cfg.poll);
    let mut fingerprint = None;
    let mut previous = None;
    let mut last_host_read = Instant::now() - cfg.host_poll;
    info!(manifests = %cfg.manifests.display(), pin_dir = %cfg.pin_dir.display(), "standalone agent running");
    loop {
        let mut woken = false;
        tokio::select! {
            _ = tick.tick() => {}
            r = async {
                match &notify {
                    Some(s) => s.recv(&mut notify_buf).await,
                    None => std::future::pending().await,
                }
            } => woken = r.is_ok(),
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        health.beat();
        let cni_changed = agent.cni_records_changed() || woken;
        let fp = agent.source.fingerprint();
        // Manifests are read once they have stayed the same for a poll, so that a file being
        // written in place (truncated, then filled) is not taken half-way. Every reconcile
        // reads them against the last settled fingerprint, those the host or the CNI plugin
        // cause too: a file that changed since keeps its last good objects until it settles.
        // (Writing a temporary file and renaming it over the old one avoids the question.)
        let settled = previous.as_ref() == Some(&fp);
        previous = Some(fp.clone());
        let mut host_wants_reconcile = false;
        if last_host_read.elapsed() >= cfg.host_poll {
            last_host_read = Instant::now();
            host_wants_reconcile = agent.poll_host();
        }
        let manifests_changed = settled && fingerprint.as_ref() != Some(&fp);
        if manifests_changed {
            fingerprint = Some(fp);
        }
        if fingerprint.is_none() {
            continue; // the first reconcile waits for settled manifests
        }
        if manifests_changed || host_wants_reconcile || cni_changed {
            match agent.reconcile(fingerprint.as_ref()) {
                Ok(()) => health.set_ready(true),
                Err(e) => {
                    error!("reconcile failed: {e:#}");
                    health.set_ready(false);
                }
            }
            release_freed_memory();
        }
    }
    info!("stopping; pinned maps and links keep enforcing");
    Ok(())
}
