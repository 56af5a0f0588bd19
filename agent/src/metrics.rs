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
use aya::maps::{HashMap, MapData, PerCpuArray, PerCpuHashMap};
use palisade_common::{CtEntry, CtKey, EndpointState, FragKey, FragPorts, RuleStats, map_names};
use prometheus_client::{
    metrics::{
        counter::Counter,
        family::Family,
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
        Metrics {
            registry,
            verdicts,
            reconciles,
            enforcement_latency,
        }
    }

    pub fn observe_verdict(&self, v: &Verdict) {
        let (namespace, policy) = Names::metric_labels(v);
        self.verdicts
            .get_or_create(&vec![
                ("namespace".into(), namespace),
                ("policy".into(), policy),
                ("verdict".into(), v.verdict.as_str().into()),
            ])
            .inc();
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
    pub(crate) rule_stats: PerCpuHashMap<MapData, u32, RuleStats>,
    pub(crate) conntrack: HashMap<MapData, CtKey, CtEntry>,
    pub(crate) ep_state: HashMap<MapData, u32, EndpointState>,
    pub(crate) fragments: HashMap<MapData, FragKey, FragPorts>,
}

impl DatapathReader {
    pub fn new(dp: &mut Datapath) -> Result<DatapathReader> {
        Ok(DatapathReader {
            maps: Mutex::new(ReaderMaps {
                counters: PerCpuArray::try_from(dp.take_map(map_names::COUNTERS)?)?,
                rule_stats: PerCpuHashMap::try_from(dp.take_map(map_names::RULE_STATS)?)?,
                conntrack: HashMap::try_from(dp.take_map(map_names::CONNTRACK)?)?,
                ep_state: HashMap::try_from(dp.take_map(map_names::EP_STATE)?)?,
                fragments: HashMap::try_from(dp.take_map(map_names::FRAGMENTS)?)?,
            }),
        })
    }

    /// Removes the counters of rules that no longer exist (ids are not reused before the id
    /// space runs out, so these would only fill the map).
    pub fn forget_rules(&self, rules: &BTreeMap<u32, RuleInfo>) {
        let mut m = self.maps.lock().expect("maps lock");
        let stale: Vec<u32> = m
            .rule_stats
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !rules.contains_key(k))
            .collect();
        for k in stale {
            let _ = m.rule_stats.remove(&k);
        }
    }
}
