//! Verdicts: the datapath's ring-buffer events, named and kept.
//!
//! The datapath emits an `Event` for every dropped packet, every audited ("would drop") packet
//! and every new allowed flow, through a per-endpoint token bucket (suppressed events are
//! counted, see `stats`). The agent reads the ring buffer as it fills ([`spawn_reader`]),
//! names what it can with the current [`Names`] (pods for addresses, namespace/name and rule
//! index for rule ids, the policies isolating an endpoint for drops), keeps the last
//! `history` verdicts in a bounded [`History`] and hands each to `--follow` clients.
//!
//! [`Observer`] is what the main loop holds: it starts the reader, the CLI socket and the
//! metrics endpoint, and after every reconcile [`Observer::publish`] updates the names, the
//! state file beside the socket and the metrics.
use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use palisade_common::{
    DIR_INGRESS, Event, IDENTITY_HOST, Reason, VERDICT_ALLOW, VERDICT_AUDIT, ip_of, map_names,
};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{Interest, unix::AsyncFd},
    sync::broadcast,
};
use tracing::{debug, error, info, warn};

use crate::{
    inspect::{
        RuleInfo, StateFile, VerdictKind, endpoints_with_allows, has_ports, proto_name,
        reason_name, state_path, write_private,
    },
    loader::Datapath,
    maps::ApplyStats,
    metrics::{DatapathReader, Metrics},
    model::{ConfigError, Store},
    state::{DesiredState, Direction},
};

/// Verdicts kept by default.
pub const DEFAULT_HISTORY: usize = 10_000;

/// One end of a recorded flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEnd {
    pub ip: IpAddr,
    /// For TCP, UDP and SCTP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// `namespace/name` when the address is a known pod's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    /// An address of this node.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub node: bool,
}

impl FlowEnd {
    /// The pod name, "node", or the address.
    pub fn name(&self) -> String {
        match (&self.pod, self.node) {
            (Some(p), _) => p.clone(),
            (None, true) => format!("node:{}", self.ip),
            (None, false) => self.ip.to_string(),
        }
    }
}

/// A recorded verdict.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// Order of arrival at the agent (for `--follow` without gaps or repeats).
    pub seq: u64,
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub time_unix_ms: u64,
    pub verdict: VerdictKind,
    /// `policy-allow`, `not-isolated`, `node-traffic`, `no-rule-matched`, `default-deny`
    /// (isolated, and its policies allow nothing in this direction), `malformed`, `pending`,
    /// `unknown-fragment`, `non-ip`, `self`.
    pub reason: String,
    /// The pod whose program judged (`namespace/name`), and in which of its directions.
    pub endpoint: Option<String>,
    pub direction: Direction,
    pub source: FlowEnd,
    pub destination: FlowEnd,
    pub protocol: String,
    /// The rule that allowed the flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleInfo>,
    /// For denials: the policies isolating the endpoint in this direction (none allowed it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Length of the packet that was judged.
    pub bytes: u32,
}

impl Verdict {
    /// Every pod the verdict concerns.
    pub fn pods(&self) -> impl Iterator<Item = &str> {
        [&self.endpoint, &self.source.pod, &self.destination.pod]
            .into_iter()
            .filter_map(|p| p.as_deref())
    }

    /// `policy rule` or, for denials, the isolating policies.
    pub fn policy_text(&self) -> String {
        match (&self.rule, self.policies.is_empty()) {
            (Some(r), _) => r.to_string(),
            (None, false) => self.policies.join(","),
            (None, true) => "-".into(),
        }
    }
}

/// Which verdicts a client wants.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// `namespace/name`: verdicts where the pod is the source, the destination or the endpoint.
    pub pod: Option<String>,
    /// Verdicts that concern a pod of this namespace.
    pub namespace: Option<String>,
    pub verdict: Option<VerdictKind>,
    /// Only verdicts at or after this time.
    pub since_unix_ms: Option<u64>,
}

impl Filter {
    pub fn matches(&self, v: &Verdict) -> bool {
        if let Some(p) = &self.pod
            && !v.pods().any(|x| x == p)
        {
            return false;
        }
        if let Some(ns) = &self.namespace
            && !v
                .pods()
                .any(|x| x.split_once('/').is_some_and(|(n, _)| n == ns))
        {
            return false;
        }
        if let Some(k) = self.verdict
            && v.verdict != k
        {
            return false;
        }
        if let Some(t) = self.since_unix_ms
            && v.time_unix_ms < t
        {
            return false;
        }
        true
    }
}

/// The last `capacity` verdicts, and the channel `--follow` clients listen on.
pub struct History {
    capacity: usize,
    items: VecDeque<Arc<Verdict>>,
    next_seq: u64,
    tx: broadcast::Sender<Arc<Verdict>>,
}

impl History {
    pub fn new(capacity: usize) -> History {
        let (tx, _) = broadcast::channel(4096);
        History {
            capacity: capacity.max(1),
            items: VecDeque::with_capacity(capacity.clamp(1, 65_536)),
            next_seq: 1,
            tx,
        }
    }

    /// Records a verdict (its `seq` is assigned here).
    pub fn push(&mut self, mut v: Verdict) -> Arc<Verdict> {
        v.seq = self.next_seq;
        self.next_seq += 1;
        let v = Arc::new(v);
        if self.items.len() == self.capacity {
            self.items.pop_front();
        }
        self.items.push_back(v.clone());
        let _ = self.tx.send(v.clone());
        v
    }

    /// Matching verdicts, oldest first.
    pub fn query(&self, filter: &Filter) -> Vec<Arc<Verdict>> {
        self.items
            .iter()
            .filter(|v| filter.matches(v))
            .cloned()
            .collect()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Verdict>> {
        self.tx.subscribe()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Verdicts recorded since the agent started.
    pub fn total(&self) -> u64 {
        self.next_seq - 1
    }
}

/// What the agent knows to name an event: built after every reconcile.
#[derive(Default)]
pub struct Names {
    pub file: StateFile,
    ip_owner: HashMap<IpAddr, String>,
    node: BTreeSet<IpAddr>,
    /// (endpoint id, direction) with at least one allow entry.
    with_allows: BTreeSet<(u32, u8)>,
}

impl Names {
    pub fn new(file: StateFile, applied: &DesiredState) -> Names {
        let ip_owner = file.ip_owners();
        let mut node: BTreeSet<IpAddr> = file.node_addresses.iter().copied().collect();
        for (addr, id) in &applied.identities {
            if *id == IDENTITY_HOST
                && let Some(ip) = ip_of(addr.family, &addr.addr)
            {
                node.insert(ip);
            }
        }
        Names {
            with_allows: endpoints_with_allows(applied),
            file,
            ip_owner,
            node,
        }
    }

    fn end(&self, family: u8, addr: &[u8; 16], port: Option<u16>) -> FlowEnd {
        let ip = ip_of(family, addr).unwrap_or(IpAddr::from([0u8, 0, 0, 0]));
        FlowEnd {
            ip,
            port,
            pod: self.ip_owner.get(&ip).cloned(),
            node: self.node.contains(&ip),
        }
    }

    /// Names a datapath event. `wall_ms` is the event's time on the wall clock.
    pub fn decode(&self, ev: &Event, wall_ms: u64) -> Verdict {
        let dir = Direction::from_u8(ev.dir);
        let reason = Reason::from_u8(ev.reason);
        let meta = self.file.endpoints.get(&ev.endpoint);
        let verdict = match ev.verdict {
            VERDICT_ALLOW => VerdictKind::Allowed,
            VERDICT_AUDIT => VerdictKind::WouldDrop,
            _ => VerdictKind::Dropped,
        };
        let ports = has_ports(ev.proto);
        let no_allows = !self.with_allows.contains(&(ev.endpoint, ev.dir));
        let policies = match (verdict, reason, meta) {
            (VerdictKind::Allowed, _, _) => Vec::new(),
            (_, Some(Reason::NoRuleMatched | Reason::Fragment | Reason::NonIp), Some(m)) => {
                if ev.dir == DIR_INGRESS {
                    m.ingress_policies.clone()
                } else {
                    m.egress_policies.clone()
                }
            }
            _ => Vec::new(),
        };
        Verdict {
            seq: 0,
            time: rfc3339_ms(wall_ms),
            time_unix_ms: wall_ms,
            verdict,
            reason: reason_name(reason, no_allows).to_string(),
            endpoint: meta.map(|m| m.pod.to_string()),
            direction: dir,
            source: self.end(ev.family, &ev.src, ports.then_some(ev.sport)),
            destination: self.end(ev.family, &ev.dst, ports.then_some(ev.dport)),
            protocol: proto_name(ev.proto),
            rule: (ev.rule != 0)
                .then(|| self.file.rules.get(&ev.rule).cloned())
                .flatten(),
            policies,
            bytes: ev.len,
        }
    }

    /// The namespace and policy labels of a verdict for metrics: the judging pod's namespace
    /// (a NetworkPolicy selects pods of its own namespace only) and the deciding policy's name
    /// or, for denials, the isolating policies' names (comma-separated; empty when no policy
    /// decided).
    pub fn metric_labels(v: &Verdict) -> (String, String) {
        let ns = v
            .endpoint
            .as_deref()
            .and_then(|p| p.split_once('/'))
            .map(|(n, _)| n.to_string())
            .unwrap_or_default();
        let name = |p: &str| p.split_once('/').map_or(p, |(_, n)| n).to_string();
        let policy = match &v.rule {
            Some(r) => r.policy.clone(),
            None => v
                .policies
                .iter()
                .map(|p| name(p))
                .collect::<Vec<_>>()
                .join(","),
        };
        (ns, policy)
    }
}

/// `2024-05-01T12:00:00.123Z`.
pub fn rfc3339_ms(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let ms = unix_ms % 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The wall-clock time (ms since the epoch) of a `bpf_ktime_get_ns` timestamp.
pub fn wall_ms_of(ktime_ns: u64) -> u64 {
    let mono = clock_ns(libc::CLOCK_MONOTONIC);
    let real = clock_ns(libc::CLOCK_REALTIME);
    real.saturating_sub(mono.saturating_sub(ktime_ns)) / 1_000_000
}

// ---------------------------------------------------------------------------------------------
// The agent's side
// ---------------------------------------------------------------------------------------------

/// State shared by the event reader, the socket server and the metrics endpoint.
pub struct Hub {
    pub names: RwLock<Arc<Names>>,
    pub history: Mutex<History>,
    pub metrics: Metrics,
    pub datapath: DatapathReader,
    /// Events that could not be decoded (short records).
    pub undecodable: std::sync::atomic::AtomicU64,
    pub last_reconcile: Mutex<Option<ReconcileInfo>>,
    pub problems: Mutex<Problems>,
}

/// What is wrong now, as of the last reconcile (`palisade stats`, metrics).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problems {
    /// Bad manifests and objects, failing watches: each names its object and field. Objects
    /// that fail validation keep their last good version in force.
    pub config_errors: Vec<ConfigError>,
    /// Everything else: failed map writes and attachments, enforcement held at a restart.
    pub errors: Vec<String>,
    /// Endpoints failing closed because their entries could not be written.
    pub pending_endpoints: Vec<String>,
    /// Map writes that failed since the agent started (each one failed closed).
    pub map_write_failures_total: u64,
}

/// The last reconcile, for `palisade stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileInfo {
    pub at_unix_ms: u64,
    pub duration_ms: u64,
    pub endpoints: usize,
    pub policy_entries: usize,
    pub cidr_entries: usize,
    pub identities: usize,
    pub rules: usize,
    pub written: usize,
    pub removed: usize,
    pub failed: usize,
}

impl Hub {
    pub fn record(&self, ev: &Event) -> Arc<Verdict> {
        let names = self.names.read().expect("names lock").clone();
        let v = names.decode(ev, wall_ms_of(ev.ts_ns));
        self.metrics.observe_verdict(&v);
        self.history.lock().expect("history lock").push(v)
    }
}

/// Where the agent serves its CLI and metrics.
#[derive(Clone, Debug)]
pub struct ObserveConfig {
    /// The CLI's unix socket; `state.json` goes beside it. `None`: neither.
    pub socket: Option<PathBuf>,
    /// Prometheus endpoint. `None`: off.
    pub metrics_addr: Option<SocketAddr>,
    /// Verdicts kept for the CLI.
    pub history: usize,
    pub pin_dir: PathBuf,
    pub audit_all: bool,
}

impl ObserveConfig {
    pub fn of(cfg: &crate::run::RunConfig) -> ObserveConfig {
        ObserveConfig {
            socket: cfg.socket.clone(),
            metrics_addr: cfg.metrics_addr,
            history: cfg.history,
            pin_dir: cfg.pin_dir.clone(),
            audit_all: cfg.audit,
        }
    }
}

/// The agent's observation side: verdict reader, CLI socket, metrics endpoint.
pub struct Observer {
    pub hub: Arc<Hub>,
    cfg: ObserveConfig,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Observer {
    /// Takes the event and counter maps from the datapath and starts the reader, the socket
    /// server and the metrics endpoint on the current tokio runtime. A socket or metrics
    /// address that cannot be bound is logged, not fatal: enforcement matters more.
    pub fn start(cfg: ObserveConfig, dp: &mut Datapath) -> Result<Observer> {
        let ring = RingBuf::try_from(dp.take_map(map_names::EVENTS)?)?;
        let datapath = DatapathReader::new(dp)?;
        let hub = Arc::new(Hub {
            names: RwLock::new(Arc::new(Names::default())),
            history: Mutex::new(History::new(cfg.history)),
            metrics: Metrics::new(),
            datapath,
            undecodable: Default::default(),
            last_reconcile: Mutex::new(None),
            problems: Mutex::default(),
        });
        let mut tasks = vec![spawn_reader(ring, hub.clone())?];
        if let Some(path) = &cfg.socket {
            match crate::control::bind(path) {
                Ok(listener) => {
                    info!(socket = %path.display(), "serving the CLI");
                    tasks.push(tokio::spawn(crate::control::serve(listener, hub.clone())));
                }
                Err(e) => error!("CLI socket {}: {e:#}", path.display()),
            }
        }
        if let Some(addr) = cfg.metrics_addr {
            match std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|_| l))
                .and_then(tokio::net::TcpListener::from_std)
            {
                Ok(listener) => {
                    info!(addr = %listener.local_addr().unwrap_or(addr), "serving metrics");
                    tasks.push(tokio::spawn(crate::metrics::serve(listener, hub.clone())));
                }
                Err(e) => error!("metrics endpoint {addr}: {e}"),
            }
        }
        Ok(Observer { hub, cfg, tasks })
    }

    /// After a reconcile: new names for events, the state file for the CLI, metrics.
    pub fn publish(
        &self,
        applied: &DesiredState,
        store: &Store,
        node_addresses: &[IpAddr],
        started_at_unix_ms: u128,
        stats: ApplyStats,
    ) {
        let file = StateFile::build(
            applied,
            store,
            node_addresses,
            &self.cfg.pin_dir,
            self.cfg.audit_all,
        );
        if let Some(socket) = &self.cfg.socket {
            let path = state_path(socket);
            match serde_json::to_vec(&file) {
                Ok(bytes) => {
                    if let Err(e) = write_private(&path, &bytes) {
                        warn!("state file: {e:#}");
                    }
                }
                Err(e) => warn!("state file: {e}"),
            }
        }
        let now = crate::inspect::unix_ms();
        let elapsed_ms = now.saturating_sub(started_at_unix_ms as u64);
        self.hub
            .metrics
            .observe_reconcile(Duration::from_millis(elapsed_ms), stats.changes() > 0);
        self.hub.datapath.forget_rules(&file.rules);
        *self.hub.last_reconcile.lock().expect("lock") = Some(ReconcileInfo {
            at_unix_ms: now,
            duration_ms: elapsed_ms,
            endpoints: applied.endpoints.len(),
            policy_entries: applied.policy.len(),
            cidr_entries: applied.cidrs.len(),
            identities: applied.identities.len(),
            rules: file.rules.len(),
            written: stats.written,
            removed: stats.removed,
            failed: stats.failed,
        });
        *self.hub.names.write().expect("names lock") = Arc::new(Names::new(file, applied));
    }

    pub fn set_problems(&self, problems: Problems) {
        *self.hub.problems.lock().expect("problems lock") = problems;
    }

    pub fn socket(&self) -> Option<&Path> {
        self.cfg.socket.as_deref()
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(s) = &self.cfg.socket {
            let _ = std::fs::remove_file(s);
        }
    }
}

/// Reads the ring buffer whenever it has data and records every event.
pub fn spawn_reader(ring: RingBuf<MapData>, hub: Arc<Hub>) -> Result<tokio::task::JoinHandle<()>> {
    // SAFETY: the ring buffer owns its map fd, which stays open as long as the ring buffer
    // (moved into the AsyncFd) lives.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("polling the EVENTS ring buffer")?;
    Ok(tokio::spawn(async move {
        loop {
            let mut guard = match fd.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    error!("EVENTS ring buffer: {e}");
                    return;
                }
            };
            let ring = guard.get_inner_mut();
            let mut n = 0usize;
            let mut drained = false;
            loop {
                let Some(item) = ring.next() else {
                    drained = true;
                    break;
                };
                if item.len() < std::mem::size_of::<Event>() {
                    hub.undecodable
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                // SAFETY: the record holds an `Event` written by the datapath (plain data).
                let ev: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                drop(item);
                hub.record(&ev);
                n += 1;
                if n == 1024 {
                    // Let the socket server and the main loop run during a flood; the fd
                    // stays ready, so the rest is read on the next turn.
                    break;
                }
            }
            if drained {
                guard.clear_ready();
            }
            if n > 0 {
                debug!(events = n, "verdicts recorded");
            }
            tokio::task::yield_now().await;
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339_ms(1_700_000_000_000), "2023-11-14T22:13:20.000Z");
    }

    fn verdict(n: u64, kind: VerdictKind, src: &str, dst: &str) -> Verdict {
        Verdict {
            seq: 0,
            time: rfc3339_ms(n * 1000),
            time_unix_ms: n * 1000,
            verdict: kind,
            reason: "no-rule-matched".into(),
            endpoint: Some(dst.into()),
            direction: Direction::Ingress,
            source: FlowEnd {
                ip: "10.0.0.1".parse().unwrap(),
                port: Some(40000),
                pod: Some(src.into()),
                node: false,
            },
            destination: FlowEnd {
                ip: "10.0.0.2".parse().unwrap(),
                port: Some(80),
                pod: Some(dst.into()),
                node: false,
            },
            protocol: "TCP".into(),
            rule: None,
            policies: vec![],
            bytes: 60,
        }
    }

    #[test]
    fn history_is_bounded_and_filters() {
        let mut h = History::new(3);
        let mut rx = h.subscribe();
        for i in 0..5 {
            let kind = if i % 2 == 0 {
                VerdictKind::Dropped
            } else {
                VerdictKind::Allowed
            };
            h.push(verdict(i, kind, "a/x", "b/y"));
        }
        assert_eq!(h.len(), 3);
        assert_eq!(h.total(), 5);
        let all = h.query(&Filter::default());
        assert_eq!(all.iter().map(|v| v.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        let dropped = h.query(&Filter {
            verdict: Some(VerdictKind::Dropped),
            ..Filter::default()
        });
        assert_eq!(dropped.len(), 2);
        assert_eq!(
            h.query(&Filter {
                pod: Some("a/x".into()),
                since_unix_ms: Some(4000),
                ..Filter::default()
            })
            .len(),
            1
        );
        assert_eq!(
            h.query(&Filter {
                namespace: Some("b".into()),
                ..Filter::default()
            })
            .len(),
            3
        );
        assert!(
            h.query(&Filter {
                namespace: Some("c".into()),
                ..Filter::default()
            })
            .is_empty()
        );
        assert_eq!(rx.try_recv().unwrap().seq, 1);
    }

    #[test]
    fn decode_names_pods_rules_and_isolating_policies() {
        use crate::state::{EndpointMeta, PodRef};
        use palisade_common::{DIR_EGRESS, PROTO_TCP, PeerAddr, VERDICT_DROP};
        let mut file = StateFile::default();
        file.pods.push(crate::inspect::PodAddrs {
            pod: "shop/frontend".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
        });
        file.pods.push(crate::inspect::PodAddrs {
            pod: "shop/db".into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
        });
        file.endpoints.insert(
            5,
            EndpointMeta {
                pod: PodRef {
                    namespace: "shop".into(),
                    name: "db".into(),
                },
                ifindex: 9,
                ingress_policies: vec!["shop/default-deny".into()],
                egress_policies: vec![],
                ingress_audit_ignored: vec![],
                egress_audit_ignored: vec![],
            },
        );
        file.rules.insert(
            3,
            RuleInfo {
                id: 3,
                namespace: "shop".into(),
                policy: "db-from-backend".into(),
                direction: Direction::Ingress,
                index: 0,
                audit: false,
            },
        );
        let names = Names::new(file, &DesiredState::default());
        let ev = Event {
            ts_ns: 0,
            endpoint: 5,
            rule: 0,
            ifindex: 9,
            len: 60,
            src: PeerAddr::v4([10, 0, 0, 1]).addr,
            dst: PeerAddr::v4([10, 0, 0, 2]).addr,
            sport: 40000,
            dport: 5432,
            proto: PROTO_TCP,
            dir: DIR_INGRESS,
            family: palisade_common::AF_INET,
            verdict: VERDICT_DROP,
            reason: Reason::NoRuleMatched as u8,
            _pad: [0; 7],
        };
        let v = names.decode(&ev, 1_700_000_000_000);
        assert_eq!(v.verdict, VerdictKind::Dropped);
        assert_eq!(v.reason, "default-deny");
        assert_eq!(v.source.pod.as_deref(), Some("shop/frontend"));
        assert_eq!(v.destination.pod.as_deref(), Some("shop/db"));
        assert_eq!(v.destination.port, Some(5432));
        assert_eq!(v.endpoint.as_deref(), Some("shop/db"));
        assert_eq!(v.policies, vec!["shop/default-deny".to_string()]);
        assert_eq!(v.protocol, "TCP");
        let allowed = Event {
            verdict: VERDICT_ALLOW,
            reason: Reason::PolicyAllow as u8,
            rule: 3,
            ..ev
        };
        let v = names.decode(&allowed, 0);
        assert_eq!(v.verdict, VerdictKind::Allowed);
        assert_eq!(
            v.rule.as_ref().map(|r| r.to_string()).as_deref(),
            Some("shop/db-from-backend ingress[0]")
        );
        assert!(v.policies.is_empty());
        let egress = Event {
            dir: DIR_EGRESS,
            verdict: VERDICT_AUDIT,
            ..ev
        };
        assert_eq!(names.decode(&egress, 0).verdict, VerdictKind::WouldDrop);
    }
}
