//! Verdicts: the datapath's ring-buffer events, named and kept.
//!
//! The datapath emits an `Event` for every dropped packet, every audited ("would drop") packet
//! and every new allowed flow, through a per-endpoint token bucket (suppressed events are
//! counted, see `stats`). The agent reads the ring buffer as it fills ([`spawn_reader`]),
//! names what it can with the current [`Names`] (pods for addresses, namespace/name and rule
//! index for rule ids, the policies isolating an endpoint for drops), keeps the last
//! `history` verdicts in a bounded [`History`] and hands each to `--follow` clients.
//!
//! The reader itself, the socket and the metrics endpoint are started by `observe`.
use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    net::IpAddr,
    sync::Arc,
};

use palisade_common::{
    DIR_INGRESS, Event, IDENTITY_HOST, Reason, VERDICT_ALLOW, VERDICT_AUDIT, ip_of,
};
use tokio::sync::broadcast;

use crate::{
    api::{Filter, FlowEnd, Verdict},
    inspect::{StateFile, VerdictKind, endpoints_with_allows, has_ports, proto_name, reason_name},
};
use palisade_policy::state::{DesiredState, Direction};

/// Verdicts kept by default.
pub const DEFAULT_HISTORY: usize = 10_000;

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
    ip_owner: Arc<HashMap<IpAddr, String>>,
    node: BTreeSet<IpAddr>,
    /// (endpoint id, direction) with at least one allow entry.
    with_allows: BTreeSet<(u32, u8)>,
}

impl Names {
    pub fn new(file: StateFile, applied: &DesiredState) -> Names {
        let ip_owner = Arc::new(file.ip_owners());
        Names::with_owners(file, applied, ip_owner)
    }

    /// `new`, with the address owners made already (`PodIndex`).
    pub fn with_owners(
        file: StateFile,
        applied: &DesiredState,
        ip_owner: Arc<HashMap<IpAddr, String>>,
    ) -> Names {
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
            domain: None,
            egress: None,
        }
    }

    /// The namespace and policy labels of a verdict for metrics: the judging pod's namespace
    /// (a NetworkPolicy selects pods of its own namespace only) and the deciding policy's name
    /// or, for denials, the isolating policies' names (comma-separated; empty when no policy
    /// decided). A ClusterNetworkPolicy rule adds its kind and tier (`ClusterNetworkPolicy`,
    /// `Admin` or `Baseline`; empty otherwise).
    pub fn metric_labels(v: &Verdict) -> MetricLabels {
        let namespace = v
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
        let tier = v.rule.as_ref().and_then(|r| r.tier.as_ref());
        MetricLabels {
            namespace,
            policy,
            cluster_tier: tier.map(|t| t.tier.to_string()),
        }
    }
}

/// A verdict's metric labels (`Names::metric_labels`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MetricLabels {
    pub namespace: String,
    pub policy: String,
    /// The tier of the deciding ClusterNetworkPolicy rule.
    pub cluster_tier: Option<String>,
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

/// The wall-clock time (ms since the epoch) of a `bpf_ktime_get_ns` timestamp.
pub fn wall_ms_of(ktime_ns: u64) -> u64 {
    let mono = palisade_datapath::clock_ns(libc::CLOCK_MONOTONIC);
    let real = palisade_datapath::clock_ns(libc::CLOCK_REALTIME);
    real.saturating_sub(mono.saturating_sub(ktime_ns)) / 1_000_000
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inspect::RuleInfo;

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
            domain: None,
            egress: None,
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
        // Hubble's directional filters: a/x is every verdict's source, b/y its destination.
        let count = |f: Filter| h.query(&f).len();
        let from = |p: &str| Filter {
            from_pod: Some(p.into()),
            ..Filter::default()
        };
        let to = |p: &str| Filter {
            to_pod: Some(p.into()),
            ..Filter::default()
        };
        assert_eq!(count(from("a/x")), 3);
        assert_eq!(count(from("b/y")), 0);
        assert_eq!(count(to("b/y")), 3);
        assert_eq!(count(to("a/x")), 0);
        let ns = |from: &str, to: &str| Filter {
            from_namespace: Some(from.into()),
            to_namespace: Some(to.into()),
            ..Filter::default()
        };
        assert_eq!(count(ns("a", "b")), 3);
        assert_eq!(count(ns("b", "a")), 0);
        assert_eq!(rx.try_recv().unwrap().seq, 1);
    }

    #[test]
    fn decode_names_pods_rules_and_isolating_policies() {
        use palisade_common::{DIR_EGRESS, PROTO_TCP, PeerAddr, VERDICT_DROP};
        use palisade_policy::state::{EndpointMeta, PodRef};
        let mut file = StateFile::default();
        Arc::make_mut(&mut file.pods).push(crate::inspect::PodAddrs {
            pod: "shop/frontend".into(),
            ips: vec!["10.0.0.1".parse().unwrap()],
        });
        Arc::make_mut(&mut file.pods).push(crate::inspect::PodAddrs {
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
                ingress_cluster_policies: vec![],
                egress_cluster_policies: vec![],
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
                slot: 0,
                tier: None,
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
