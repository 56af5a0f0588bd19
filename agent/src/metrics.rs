//! Counters for `palisade stats` and the Prometheus endpoint (`--metrics-addr`).
//!
//! Two sources: what the agent sees go by (recorded verdicts by namespace, policy and verdict;
//! reconciles and the time from a change to its enforcement), kept in a `prometheus-client`
//! registry; and what the datapath counts itself (per-CPU COUNTERS, with drops and "would
//! drop"s per reason, per-rule packets and bytes in RULE_STATS, suppressed events in
//! EP_STATE, map fill levels), read from the maps on every scrape or `stats` call
//! ([`stats_report`]). Recorded verdicts are rate-limited samples; the datapath counters are
//! exact.
use std::{collections::BTreeMap, sync::Mutex, time::Duration};

use anyhow::Result;
use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuValues};
use palisade_common::{CtEntry, CtKey, EndpointState, FragKey, FragPorts, RuleStats, map_names};
use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use palisade_datapath::Datapath;

use crate::{api::Verdict, inspect::RuleInfo, verdicts::Names};

type Labels = Vec<(String, String)>;

/// The agent's own metrics (the datapath's are read at scrape time).
pub struct Metrics {
    pub(crate) registry: Registry,
    verdicts: Family<Labels, Counter>,
    reconciles: Counter,
    enforcement_latency: Histogram,
    /// Egress gateways, by EgressGateway and gateway node (`egress`).
    pub egress_flows: Family<Labels, Counter>,
    pub egress_packets: Family<Labels, Counter>,
    pub egress_bytes: Family<Labels, Counter>,
    pub egress_healthy: Family<Labels, Gauge>,
    pub egress_no_gateway: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let verdicts = Family::<Labels, Counter>::default();
        registry.register(
            "palisade_verdicts",
            "Verdicts recorded from datapath events (new allowed flows, drops, would-drops; rate-limited per endpoint), by the judging pod's namespace, the deciding policy (for denials: the isolating policies) and verdict",
            verdicts.clone(),
        );
        let reconciles = Counter::default();
        registry.register(
            "palisade_reconciles",
            "Reconciles (store compiled and written to the maps)",
            reconciles.clone(),
        );
        let enforcement_latency = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "palisade_enforcement_latency_seconds",
            "Time from the reconcile that read a change (manifests, pods, host) to the change being in the maps, for reconciles that changed something",
            enforcement_latency.clone(),
        );
        let egress_flows = Family::<Labels, Counter>::default();
        registry.register(
            "palisade_egress_gateway_flows",
            "Flows of this node's pods that went out through an egress gateway and ended, by EgressGateway and gateway node",
            egress_flows.clone(),
        );
        let egress_packets = Family::<Labels, Counter>::default();
        registry.register(
            "palisade_egress_gateway_packets",
            "Packets (both directions) of ended flows through an egress gateway, by EgressGateway and gateway node",
            egress_packets.clone(),
        );
        let egress_bytes = Family::<Labels, Counter>::default();
        registry.register(
            "palisade_egress_gateway_bytes",
            "Bytes (both directions) of ended flows through an egress gateway, by EgressGateway and gateway node",
            egress_bytes.clone(),
        );
        let egress_healthy = Family::<Labels, Gauge>::default();
        registry.register(
            "palisade_egress_gateway_active",
            "1 while a gateway node takes new flows of an EgressGateway (healthy, and for a resource with an egress address the one holding it), else 0",
            egress_healthy.clone(),
        );
        let egress_no_gateway = Counter::default();
        registry.register(
            "palisade_egress_gateway_probes_failed",
            "Liveness probes of gateway nodes that failed",
            egress_no_gateway.clone(),
        );
        Metrics {
            registry,
            verdicts,
            reconciles,
            enforcement_latency,
            egress_flows,
            egress_packets,
            egress_bytes,
            egress_healthy,
            egress_no_gateway,
        }
    }

    pub fn observe_verdict(&self, v: &Verdict) {
        let l = Names::metric_labels(v);
        let mut labels: Labels = vec![
            ("namespace".into(), l.namespace),
            ("policy".into(), l.policy),
            ("verdict".into(), v.verdict.as_str().into()),
        ];
        // A ClusterNetworkPolicy decided: say so (NetworkPolicy series keep their labels).
        if let Some(tier) = l.cluster_tier {
            labels.push(("kind".into(), "ClusterNetworkPolicy".into()));
            labels.push(("tier".into(), tier));
        }
        self.verdicts.get_or_create(&labels).inc();
    }

    pub fn observe_reconcile(&self, elapsed: Duration, changed: bool) {
        self.reconciles.inc();
        if changed {
            self.enforcement_latency.observe(elapsed.as_secs_f64());
        }
    }
}

/// The datapath-owned maps the agent reads for counters.
pub struct DatapathReader {
    pub(crate) maps: Mutex<ReaderMaps>,
}

pub(crate) struct ReaderMaps {
    pub(crate) counters: PerCpuArray<MapData, u64>,
    pub(crate) rule_stats: PerCpuArray<MapData, RuleStats>,
    /// Stats slot -> the rule it counts for, as of the last `forget_rules`.
    slot_owners: BTreeMap<u16, u32>,
    pub(crate) conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub(crate) ep_state: HashMap<MapData, u32, EndpointState>,
    pub(crate) fragments: HashMap<MapData, FragKey, FragPorts>,
}

impl DatapathReader {
    pub fn new(dp: &mut Datapath) -> Result<DatapathReader> {
        Ok(DatapathReader {
            maps: Mutex::new(ReaderMaps {
                counters: PerCpuArray::try_from(dp.take_map(map_names::COUNTERS)?)?,
                rule_stats: PerCpuArray::try_from(dp.take_map(map_names::RULE_STATS)?)?,
                slot_owners: BTreeMap::new(),
                conntrack: HashMap::try_from(dp.take_map(map_names::CONNTRACK)?)?,
                ep_state: HashMap::try_from(dp.take_map(map_names::EP_STATE)?)?,
                fragments: HashMap::try_from(dp.take_map(map_names::FRAGMENTS)?)?,
            }),
        })
    }

    /// Zeroes the stats slots of rules that no longer exist, and of slots now given to another
    /// rule (the compiler hands a freed slot out again only once every other is taken).
    pub fn forget_rules(&self, rules: &BTreeMap<u32, RuleInfo>) {
        let mut m = self.maps.lock().expect("maps lock");
        let owners: BTreeMap<u16, u32> = rules
            .values()
            .filter(|r| r.slot != 0)
            .map(|r| (r.slot, r.id))
            .collect();
        let stale: Vec<u16> = m
            .slot_owners
            .iter()
            .filter(|(slot, rule)| owners.get(slot) != Some(rule))
            .map(|(slot, _)| *slot)
            .collect();
        let cpus = aya::util::nr_cpus().unwrap_or(1);
        for slot in stale {
            if let Ok(zero) = PerCpuValues::try_from(vec![RuleStats::default(); cpus]) {
                let _ = m.rule_stats.set(u32::from(slot), zero, 0);
            }
        }
        m.slot_owners = owners;
    }
}
