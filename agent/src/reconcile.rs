//! The reconcile step every source feeds (`source`): a `View` of the configuration (a store
//! of objects, the Services, what is wrong with them) is compiled for this node's endpoints
//! against the host as it is now, written to the maps, attached, published to the observers,
//! and reported (status file, `palisade stats`, metrics).
//!
//! Bad input never loosens enforcement: a file that fails to parse keeps its last good objects,
//! a policy that fails validation keeps its last good version (see `model`), and the errors are
//! logged with the object and field they concern.
use std::{
    borrow::Cow,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tracing::{error, info, warn};

use palisade_datapath::{Datapath, MapWriter, loader, pins};

use crate::{
    api::Problems,
    health::Health,
    interfaces::HostView,
    observe::{ObserveConfig, Observer},
};
use palisade_policy::{
    compile::Compiler,
    model::{ConfigError, Store},
    services::ServiceStore,
    state::DesiredState,
};

/// How the agent runs, whatever its source.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Where maps and links are pinned; must be on a bpffs (mounted if it is not).
    pub pin_dir: PathBuf,
    /// Only pods scheduled on this node are endpoints (all pods with a local interface when
    /// absent).
    pub node_name: Option<String>,
    /// How often interfaces, addresses and routes are re-read.
    pub host_poll: Duration,
    /// Where to write a JSON status after every reconcile (for tests and probes).
    pub status_file: Option<PathBuf>,
    /// Node-wide audit mode: every policy's denials are "would drop" (ARCHITECTURE.md).
    pub audit: bool,
    /// The CLI socket (`state.json` goes beside it); `None`: no socket.
    pub socket: Option<PathBuf>,
    /// The admin HTTP server (`/metrics`, `/healthz`, `/readyz`); `None`: off.
    pub admin_addr: Option<std::net::SocketAddr>,
    /// Verdicts kept for `palisade verdicts`.
    pub history: usize,
    /// Live conntrack entries per endpoint (`CT_QUOTA`).
    pub conntrack_per_pod: u32,
    /// Where the CNI plugin records the interfaces it provisions (`cni`); `None`: no plugin.
    pub cni_state_dir: Option<PathBuf>,
    /// FQDN egress (`fqdn`); its state file is set beside the socket.
    pub fqdn: crate::fqdn::FqdnConfig,
    /// Egress gateways (`egress`).
    pub egress: crate::egress::EgressConfig,
}

impl From<&RunConfig> for ObserveConfig {
    fn from(cfg: &RunConfig) -> ObserveConfig {
        ObserveConfig {
            socket: cfg.socket.clone(),
            admin_addr: cfg.admin_addr,
            history: cfg.history,
            pin_dir: cfg.pin_dir.clone(),
            audit_all: cfg.audit,
        }
    }
}

/// One view of the configuration, as a source holds it: what a reconcile enforces.
#[derive(Debug)]
pub struct View<'a> {
    pub store: &'a Store,
    /// Services and EndpointSlices (Service VIPs in egress policy: `services`).
    pub services: &'a ServiceStore,
    /// What is wrong with this view, each naming its object and field.
    pub errors: Vec<ConfigError>,
    /// What this view lacks for want of a last good version (objects that never parsed or
    /// validated since the agent started). On the first reconcile of an agent that adopted
    /// pinned enforcement, an incomplete view is not applied: the pinned state (the last good
    /// configuration of the agent before) stays in force until the configuration is complete,
    /// rather than losing, say, a deny policy that fails validation after a restart.
    pub incomplete: Vec<String>,
    /// When the source began reading this view, ms since the Unix epoch.
    pub started_at_unix_ms: u128,
}

/// Where a reconcile's time went: reading the host, compiling (with Services and fencing),
/// writing the maps, publishing to the observers; the rest is attaching and the status.
#[derive(Clone, Copy, Debug, Default)]
pub struct Phases {
    pub host: Duration,
    pub compile: Duration,
    pub write: Duration,
    pub observe: Duration,
    pub total: Duration,
    pub endpoints_compiled: usize,
    pub full_compile: bool,
}

/// An enforced view that the observers and the status file have not been told of yet.
struct Unpublished {
    status: Status,
    config: Vec<ConfigError>,
    stats: palisade_datapath::writer::ApplyStats,
    /// The compiler's IDENTITIES stamp, when every write was made.
    pods_stamp: Option<u64>,
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
    compiler: Compiler,
    host: HostView,
    /// The kernel's notifications of link, address and route changes: `host` is dumped
    /// again only after one (or when they cannot be had).
    host_changes: Option<palisade_datapath::netlink::HostChanges>,
    /// This node's endpoints as the host view and the store's pods give them.
    endpoints: crate::interfaces::EndpointFinder,
    /// `host` must be read again before it is used (never read yet, or a read failed).
    host_stale: bool,
    first: bool,
    /// Something failed that a later reconcile may fix (a map write, an attachment): the main
    /// loop reconciles again without waiting for a change.
    retry: bool,
    repairs_total: u64,
    /// When endpoints failing closed for a full map are tried again.
    retry_at: Option<Instant>,
    /// Verdict reader, CLI socket, admin server (absent if the event maps could not be taken).
    observer: Option<Observer>,
    /// What `/healthz` and `/readyz` answer (the admin server's; the main loop sets it).
    health: Health,
    /// The conntrack sweep's thread (stops with the agent).
    _ct_sweep: palisade_datapath::ct_sweep::SweepHandle,
    /// The identities of Service VIPs (`services::expand`), kept across reconciles.
    service_ids: palisade_policy::services::ServiceIds,
    cni_seen: Vec<(std::ffi::OsString, Option<std::time::SystemTime>)>,
    /// Interfaces with a CNI record at the last reconcile.
    cni_provisioned: std::collections::BTreeSet<u32>,
    /// The FQDN learner (absent if its maps could not be opened: `domainNames` then match
    /// nothing).
    fqdn: Option<crate::fqdn::Fqdn>,
    /// Where the last reconcile's time went.
    phases: Phases,
    /// What the last `enforce` leaves for `publish`.
    unpublished: Option<Unpublished>,
    /// The CNI plugin's records as the last `enforce` read them (their pods' addresses name
    /// verdicts before the API server reports them).
    records: crate::cni::Records,
    /// Egress gateways. Not optional: without them a selected pod's traffic would leave
    /// through its own node, so an agent that cannot run them does not start.
    egress: crate::egress::Egress,
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
        let mut fqdn_cfg = cfg.fqdn.clone();
        fqdn_cfg.state_file = cfg
            .socket
            .as_ref()
            .map(|s| s.with_file_name(crate::fqdn::FQDN_FILE));
        let fqdn = crate::fqdn::Fqdn::start(&mut datapath, fqdn_cfg)
            .map_err(|e| error!("FQDN egress is off (domainNames peers match nothing): {e:#}"))
            .ok();
        let egress = crate::egress::Egress::start(&mut datapath, cfg.egress.clone())
            .context("egress gateways")?;
        let writer = MapWriter::new(&mut datapath)?;
        let health = Health::default();
        health.beat();
        let observer = Observer::start(ObserveConfig::from(&cfg), &mut datapath, health.clone())
            .map_err(|e| error!("verdicts, CLI socket and the admin server are off: {e:#}"))
            .ok();
        if let (Some(o), Some(f)) = (&observer, &fqdn) {
            let _ = o.hub.fqdn.set(f.stats());
        }
        if let Some(o) = &observer {
            egress.set_hub(o.hub.clone());
        }
        let mut compiler = Compiler::default();
        compiler.audit_all = cfg.audit;
        Ok(Agent {
            cfg,
            datapath,
            writer,
            compiler,
            host: HostView::default(),
            host_changes: palisade_datapath::netlink::HostChanges::subscribe()
                .map_err(|e| {
                    warn!("interfaces and routes are read on every reconcile: {e}");
                })
                .ok(),
            host_stale: true,
            endpoints: Default::default(),
            first: true,
            retry: false,
            repairs_total: 0,
            retry_at: None,
            observer,
            health,
            _ct_sweep: ct_sweep,
            service_ids: Default::default(),
            cni_seen: Vec::new(),
            cni_provisioned: Default::default(),
            fqdn,
            phases: Phases::default(),
            unpublished: None,
            records: Default::default(),
            egress,
        })
    }

    /// The one pipeline every source feeds: `enforce`, then `publish`.
    pub fn reconcile(&mut self, view: View<'_>) -> Result<()> {
        let store = view.store;
        self.enforce(view)?;
        self.publish(store)
    }

    /// Reads the host, compiles the view's store for this node's endpoints, attaches new
    /// endpoints, writes what changed, detaches what is gone. What the observers and the status
    /// file are told follows in `publish`: the main loop defers it while more changes wait, so
    /// that a burst is enforced first and published once.
    pub fn enforce(&mut self, view: View<'_>) -> Result<()> {
        let started = Instant::now();
        let View {
            store,
            services,
            errors: config,
            incomplete,
            started_at_unix_ms,
        } = view;
        self.retry = false;
        self.retry_at = None;
        for e in &config {
            error!("{e}");
        }
        let mut errors: Vec<String> = config.iter().map(|e| e.to_string()).collect();
        let config_errors = config.len();
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
            self.unpublished = None;
            return self.write_status(&status, &config);
        }
        self.refresh_host()?;
        // Pods the CNI plugin provisioned: their interface, and their addresses before the
        // API server reports them.
        let records = match &self.cfg.cni_state_dir {
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
            .endpoints
            .find(&self.host, store, self.cfg.node_name.as_deref());
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
            // And the domain classes its learned addresses name.
            if let Some(f) = &self.fqdn {
                for (ep, table) in &f.adopted {
                    self.compiler.adopt_domain_classes(*ep, table);
                }
            }
        }
        let host_read = started.elapsed();
        // Only what the change reaches is compiled again; the result is copied only when
        // Services or fenced interfaces add to it.
        let compiled = self
            .compiler
            .update(store, &endpoints, &self.host.addresses);
        let update = compiled.stats;
        let mut desired = Cow::Borrowed(compiled.state);
        let expanded = palisade_policy::services::expand_compiled(
            &mut desired,
            services,
            &mut self.service_ids,
            self.cfg.node_name.as_deref(),
        );
        errors.extend(expanded.errors);
        let previous = self.writer.applied();
        for fenced in fence_vanished(
            &self.host,
            &self.datapath,
            self.first,
            previous,
            &mut desired,
            &released,
        ) {
            warn!("{fenced}");
            errors.push(fenced);
        }
        let compiled_at = started.elapsed();

        // Maps first: an interface gets its programs only once its entry exists (an attached
        // interface without one drops everything), and a replaced program finds its maps full.
        // The stamps hold for the compiler's state as it is, not for one Services or fencing
        // added to: then the writer compares everything.
        let stamps = matches!(desired, Cow::Borrowed(_)).then_some(compiled.stamps);
        let stats = self.writer.apply_stamped(&desired, stamps);
        let written = started.elapsed();
        self.egress.set_plan(&desired);
        if let Some(f) = &self.fqdn {
            f.set_tables(crate::fqdn::Tables::of(self.writer.applied(), services));
        }
        // The pods' part of the names follows the compiler's IDENTITIES stamp (Services add
        // VIPs to IDENTITIES, not pods), when every write was made.
        let pods_stamp = (stats.failed == 0).then_some(compiled.stamps.identities);
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
            full_compile = update.full,
            endpoints_compiled = update.endpoints_compiled,
            host_ms = ms(host_read),
            compile_ms = ms(compiled_at - host_read),
            write_ms = ms(written - compiled_at),
            elapsed_ms = ms(started.elapsed()),
            "reconciled"
        );
        self.phases = Phases {
            host: host_read,
            compile: compiled_at - host_read,
            write: written - compiled_at,
            observe: Duration::ZERO,
            total: started.elapsed(),
            endpoints_compiled: update.endpoints_compiled,
            full_compile: update.full,
        };
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
        if let Some(o) = &self.observer {
            let elapsed = Duration::from_millis(
                status
                    .reconciled_at_unix_ms
                    .saturating_sub(started_at_unix_ms) as u64,
            );
            o.hub
                .metrics
                .observe_reconcile(elapsed, stats.changes() > 0);
        }
        self.records = records;
        self.unpublished = Some(Unpublished {
            status,
            config,
            stats,
            pods_stamp,
        });
        Ok(())
    }

    /// Whether an `enforce` has not been published yet.
    pub fn publish_due(&self) -> bool {
        self.unpublished.is_some()
    }

    /// Tells the observers (names for verdicts, the CLI's state file, metrics) and the status
    /// file what the last `enforce` did. `store` is the one it enforced.
    pub fn publish(&mut self, store: &Store) -> Result<()> {
        let Some(u) = self.unpublished.take() else {
            return Ok(());
        };
        let started = Instant::now();
        if let Some(o) = &self.observer {
            let overlaid = self.records.overlay(store);
            o.publish(
                self.writer.applied(),
                &overlaid,
                &self.host.addresses,
                crate::observe::Reconciled {
                    started_at_unix_ms: u.status.started_at_unix_ms,
                    reconciled_at_unix_ms: u.status.reconciled_at_unix_ms,
                    stats: u.stats,
                    pods_stamp: u.pods_stamp,
                },
            );
        }
        let written = self.write_status(&u.status, &u.config);
        self.phases.observe = started.elapsed();
        written
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

    /// Where the last reconcile's time went.
    pub fn phases(&self) -> Phases {
        self.phases
    }

    pub fn pin_dir(&self) -> &Path {
        &self.cfg.pin_dir
    }

    /// What the maps hold now, with rule and endpoint metadata (for the CLI).
    pub fn applied(&self) -> &palisade_policy::state::DesiredState {
        self.writer.applied()
    }

    /// The check the main loop runs every `host_poll`: whether the host's interfaces or routes
    /// changed, pins had to be put back (`repair`) or failed work is due again; any of them
    /// wants a reconcile.
    pub fn poll_host(&mut self) -> bool {
        let host_changed = self.refresh_host().unwrap_or(true);
        let repaired = self.repair();
        host_changed || repaired || self.wants_retry()
    }

    /// Reads the host's interfaces and routes again if the kernel said they changed since the
    /// last read (or the last read failed); true if the view is different. A notification is
    /// taken before the dump, so one that comes during it only makes the next call dump again.
    fn refresh_host(&mut self) -> Result<bool> {
        let noticed = self.host_changes.as_mut().is_none_or(|c| c.take());
        if !(noticed || self.host_stale) {
            return Ok(false);
        }
        self.host_stale = true;
        let view = HostView::read().context("reading interfaces and routes")?;
        self.host_stale = false;
        let changed = view != self.host;
        self.host = view;
        Ok(changed)
    }

    /// The socket that becomes readable when the host's interfaces or routes change, for the
    /// main loop to wake on (`poll_host` then takes the change).
    pub fn host_changes_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.host_changes.as_ref().map(|c| c.as_raw_fd())
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

    /// What `/healthz` and `/readyz` answer: the main loop beats it and sets readiness.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// Whether the CNI plugin added or removed records since the last call.
    pub fn cni_records_changed(&mut self) -> bool {
        let Some(dir) = &self.cfg.cni_state_dir else {
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

/// Milliseconds since the Unix epoch (the status file's timestamps).
fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn unix_ms() -> u128 {
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

/// Interfaces this agent enforces on (attached, or pinned by the agent before) that are
/// still on the host but whose pod this view does not place there (its host routes went
/// away for a moment, its object is missing or late): they are fenced, not detached. They
/// keep the programs, with their last entry switched to `EP_PENDING` (every packet
/// dropped), until the pod is seen on them again or the interface goes. Detaching would
/// leave a possibly running pod with no policy at all. Not those the CNI plugin `released`
/// (a DEL says the pod is gone). One line per fenced interface.
fn fence_vanished(
    host: &HostView,
    datapath: &Datapath,
    first: bool,
    previous: &DesiredState,
    desired: &mut Cow<'_, DesiredState>,
    released: &std::collections::BTreeSet<u32>,
) -> Vec<String> {
    let present: std::collections::BTreeSet<u32> = host.links.values().copied().collect();
    let mut candidates = datapath.attached_ifindexes();
    if first {
        candidates.extend(datapath.pinned_link_ifindexes());
    }
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
        let desired = desired.to_mut();
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
