//! The cluster-wide answers of `kubectl palisade`, made of the nodes' answers: plain data and
//! plain functions (no API server, no exec), unit-tested. Which agent pod serves which node
//! ([`agents_by_node`]), the command each agent runs ([`remote_verdicts_args`], ...), verdicts
//! merged by time ([`merge_verdicts`]) and, while following, each node's verdicts once
//! ([`SeenVerdicts`]), an explanation whose halves come from the nodes that enforce them
//! ([`combine_halves`]), and stats per node with their sum ([`sum_reports`]).
use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use serde::{Deserialize, Serialize};

use crate::api::{
    ConntrackStats, EventStats, FqdnReport, PolicyStats, Problems, RuleCount, StatsReport, Verdict,
};
use crate::cli::{ExplainArgs, VerdictsArgs};
use crate::inspect::{End, Explanation, PodPolicy, VerdictKind};
use palisade_policy::state::Direction;

// ---------------------------------------------------------------------------------------------
// The agents
// ---------------------------------------------------------------------------------------------

/// The Palisade agent pod of a node: where its CLI is reached (by exec).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPod {
    pub node: String,
    /// The pod's name (in the Palisade namespace).
    pub pod: String,
    /// `Running`, `Pending`, ... (`status.phase`).
    pub phase: String,
    /// Every container ready.
    pub ready: bool,
}

impl AgentPod {
    pub fn running(&self) -> bool {
        self.phase == "Running"
    }
}

/// The DaemonSet's pods by node: one per node, the running one where a rolling update leaves
/// two (else the newest). Pods not scheduled yet are left out.
pub fn agents_by_node(pods: &[Pod]) -> BTreeMap<String, AgentPod> {
    let mut by_node: BTreeMap<String, (AgentPod, String)> = BTreeMap::new();
    for p in pods {
        let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) else {
            continue;
        };
        let Some(name) = p.metadata.name.clone() else {
            continue;
        };
        let status = p.status.as_ref();
        let phase = status
            .and_then(|s| s.phase.clone())
            .unwrap_or_else(|| "Unknown".into());
        let ready = status
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|cs| !cs.is_empty() && cs.iter().all(|c| c.ready));
        let created = p
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.to_string())
            .unwrap_or_default();
        let terminating = p.metadata.deletion_timestamp.is_some();
        let candidate = AgentPod {
            node: node.clone(),
            pod: name,
            phase,
            ready,
        };
        // Better: running and not terminating, then ready, then newer.
        let rank = |a: &AgentPod, created: &str, terminating: bool| {
            (a.running() && !terminating, a.ready, created.to_string())
        };
        let better = match by_node.get(&node) {
            None => true,
            Some((old, old_created)) => {
                rank(&candidate, &created, terminating) > rank(old, old_created, false)
            }
        };
        if better {
            by_node.insert(node, (candidate, created));
        }
    }
    by_node.into_iter().map(|(n, (a, _))| (n, a)).collect()
}

/// The node a workload pod is scheduled on.
pub fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

// ---------------------------------------------------------------------------------------------
// The commands the agents run
// ---------------------------------------------------------------------------------------------

/// The binary in the agent's image (`/usr/local/bin/palisade`, on its PATH).
pub const REMOTE_BINARY: &str = "palisade";

/// `palisade verdicts ... -o json` with the user's filters. `follow_since`: with `--follow`,
/// only the verdicts of this last stretch from the history (those fetched before are
/// recognised by their sequence numbers).
pub fn remote_verdicts_args(a: &VerdictsArgs, follow_since: Option<Duration>) -> Vec<String> {
    let mut v = vec![REMOTE_BINARY.to_string(), "verdicts".into()];
    let mut flag = |name: &str, value: Option<String>| {
        if let Some(value) = value {
            v.push(format!("--{name}"));
            v.push(value);
        }
    };
    flag("pod", a.pod.clone());
    flag("from-pod", a.from_pod.clone());
    flag("to-pod", a.to_pod.clone());
    flag("namespace", a.namespace.clone());
    flag("from-namespace", a.from_namespace.clone());
    flag("to-namespace", a.to_namespace.clone());
    flag("verdict", a.verdict.map(|k| k.as_str().to_string()));
    let since = match (a.since, follow_since) {
        (Some(s), Some(f)) => Some(s.min(f)),
        (s, f) => f.or(s),
    };
    flag("since", since.map(|d| format!("{}ms", d.as_millis())));
    if follow_since.is_some() {
        v.push("--follow".into());
    } else {
        flag("limit", a.limit.map(|n| n.to_string()));
    }
    v.extend(["-o".into(), "json".into()]);
    v
}

/// `palisade explain ... -o json` as the user asked it.
pub fn remote_explain_args(a: &ExplainArgs) -> Vec<String> {
    let mut v: Vec<String> = [
        REMOTE_BINARY,
        "explain",
        "--from",
        &a.from.to_string(),
        "--to",
        &a.to.to_string(),
        "--port",
        &a.port.to_string(),
        "--protocol",
        &a.protocol,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if a.ipv6 {
        v.push("--ipv6".into());
    }
    v.extend(["-o".into(), "json".into()]);
    v
}

pub fn remote_policy_show_args(pod: &str) -> Vec<String> {
    [REMOTE_BINARY, "policy", "show", pod, "-o", "json"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

pub fn remote_stats_args() -> Vec<String> {
    [REMOTE_BINARY, "stats", "-o", "json"]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------------------------

/// A node whose agent did not answer, and why (its pod is not running, the exec failed, the
/// agent's CLI failed there).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFailure {
    pub node: String,
    /// The agent pod that was asked (none: the node has no agent pod).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
    pub error: String,
}

impl std::fmt::Display for NodeFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.pod {
            Some(p) => write!(f, "node {} (agent pod {p}): {}", self.node, self.error),
            None => write!(f, "node {}: {}", self.node, self.error),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Verdicts
// ---------------------------------------------------------------------------------------------

/// A verdict and the node whose agent recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeVerdict {
    pub node: String,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// Every node's verdicts, merged by time; the nodes that did not answer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterVerdicts {
    pub verdicts: Vec<NodeVerdict>,
    pub failures: Vec<NodeFailure>,
}

/// The nodes' histories as one, oldest first (ties: by node, then the node's own order);
/// `limit`: the most recent that many.
pub fn merge_verdicts(
    per_node: Vec<(String, Vec<Verdict>)>,
    limit: Option<usize>,
) -> Vec<NodeVerdict> {
    let mut all: Vec<NodeVerdict> = per_node
        .into_iter()
        .flat_map(|(node, vs)| {
            vs.into_iter().map(move |verdict| NodeVerdict {
                node: node.clone(),
                verdict,
            })
        })
        .collect();
    all.sort_by(|a, b| {
        (a.verdict.time_unix_ms, &a.node, a.verdict.seq).cmp(&(
            b.verdict.time_unix_ms,
            &b.node,
            b.verdict.seq,
        ))
    });
    if let Some(n) = limit
        && all.len() > n
    {
        all.drain(..all.len() - n);
    }
    all
}

/// While following: the newest sequence number already shown per node, so the stretch of
/// history a follow stream repeats is not shown twice (an agent numbers its verdicts in the
/// order they arrive).
#[derive(Clone, Debug, Default)]
pub struct SeenVerdicts(BTreeMap<String, u64>);

impl SeenVerdicts {
    /// Records `v`; false if it (or a later verdict of its node) was shown already.
    pub fn admit(&mut self, v: &NodeVerdict) -> bool {
        match self.0.get(&v.node) {
            Some(&seen) if v.verdict.seq <= seen => false,
            _ => {
                self.0.insert(v.node.clone(), v.verdict.seq);
                true
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Explain
// ---------------------------------------------------------------------------------------------

/// A node's own `explain` answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeAnswer {
    pub node: String,
    pub pod: String,
    pub explanation: Explanation,
}

/// Which node judged a half of the flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JudgingNode {
    pub direction: Direction,
    /// The pod whose policy it is.
    pub pod: String,
    pub node: String,
    /// The agent pod that answered.
    pub agent: String,
}

/// `explain` across nodes: the source's egress as the source's node judges it, the
/// destination's ingress as the destination's node does, and the flow's verdict (dropped if
/// either half drops).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterExplanation {
    #[serde(flatten)]
    pub explanation: Explanation,
    /// The node of each step of `steps`, in the same order.
    pub nodes: Vec<JudgingNode>,
}

/// Dropped over would-drop over allowed.
pub fn combined_verdict(verdicts: impl IntoIterator<Item = VerdictKind>) -> VerdictKind {
    verdicts
        .into_iter()
        .fold(VerdictKind::Allowed, |acc, v| match (acc, v) {
            (VerdictKind::Dropped, _) | (_, VerdictKind::Dropped) => VerdictKind::Dropped,
            (VerdictKind::WouldDrop, _) | (_, VerdictKind::WouldDrop) => VerdictKind::WouldDrop,
            _ => VerdictKind::Allowed,
        })
}

/// One explanation from the answers of the source's node (`source`: its egress step) and the
/// destination's node (`destination`: its ingress step); either is absent when that end is
/// an address, not a pod. A node that has no endpoint for its pod (the pod has no interface
/// there yet) gives no step: a note says so.
pub fn combine_halves(
    source: Option<&NodeAnswer>,
    destination: Option<&NodeAnswer>,
) -> Option<ClusterExplanation> {
    let base = source.or(destination)?;
    let mut steps = Vec::new();
    let mut nodes = Vec::new();
    let mut notes = Vec::new();
    let mut half = |answer: Option<&NodeAnswer>, dir: Direction, end: &End| {
        let Some(a) = answer else {
            notes.push(match &end.pod {
                // The other node knows the address as a pod's.
                Some(pod) => format!(
                    "{} is {pod}'s address: name the pod ({pod}) to have its node judge its {dir}",
                    end.ip
                ),
                None => format!("{} is not a pod: no node judges its {dir}", end.ip),
            });
            return;
        };
        let pod = end.pod.clone().unwrap_or_else(|| end.ip.to_string());
        match a
            .explanation
            .steps
            .iter()
            .find(|s| s.direction == dir && s.pod == pod)
        {
            Some(step) => {
                steps.push(step.clone());
                nodes.push(JudgingNode {
                    direction: dir,
                    pod: step.pod.clone(),
                    node: a.node.clone(),
                    agent: a.pod.clone(),
                });
            }
            None => notes.push(format!(
                "{pod} has no endpoint on {} (no interface there yet?): its {dir} is not judged",
                a.node
            )),
        }
        for n in &a.explanation.notes {
            if !n.starts_with("neither end") {
                notes.push(format!("{}: {n}", a.node));
            }
        }
    };
    let from = source.map_or(&base.explanation.from, |s| &s.explanation.from);
    let to = destination.map_or(&base.explanation.to, |d| &d.explanation.to);
    half(source, Direction::Egress, from);
    half(destination, Direction::Ingress, to);
    let mut seen = std::collections::BTreeSet::new();
    notes.retain(|n| seen.insert(n.clone()));
    let local = |dir: Direction| nodes.iter().any(|n| n.direction == dir);
    let explanation = Explanation {
        from: End {
            local: local(Direction::Egress),
            ..from.clone()
        },
        to: End {
            local: local(Direction::Ingress),
            ..to.clone()
        },
        protocol: base.explanation.protocol.clone(),
        port: base.explanation.port,
        verdict: combined_verdict(steps.iter().map(|s| s.verdict)),
        steps,
        notes,
    };
    Some(ClusterExplanation { explanation, nodes })
}

// ---------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------

/// `policy show` as the pod's node answers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePolicy {
    pub node: String,
    /// The agent pod that answered.
    pub agent: String,
    #[serde(flatten)]
    pub policy: PodPolicy,
}

// ---------------------------------------------------------------------------------------------
// Stats
// ---------------------------------------------------------------------------------------------

/// A node's stats, or why its agent did not give them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStats {
    pub node: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stats: Option<StatsReport>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Every node's stats and their sum (over the nodes that answered).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterStats {
    pub nodes: Vec<NodeStats>,
    pub total: StatsReport,
}

impl ClusterStats {
    pub fn new(nodes: Vec<NodeStats>) -> Self {
        let total = sum_named_reports(
            nodes
                .iter()
                .filter_map(|n| n.stats.as_ref().map(|s| (Some(n.node.as_str()), s))),
        );
        ClusterStats { nodes, total }
    }

    pub fn failures(&self) -> Vec<NodeFailure> {
        self.nodes
            .iter()
            .filter_map(|n| {
                n.error.as_ref().map(|e| NodeFailure {
                    node: n.node.clone(),
                    pod: n.agent.clone(),
                    error: e.clone(),
                })
            })
            .collect()
    }
}

fn add_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (k, v) in from {
        *into.entry(k.clone()).or_default() += v;
    }
}

/// The sum of the nodes' reports: counters, drops and would-drops by reason, packets and bytes
/// per policy and rule, conntrack entries (the pods holding the most, over all nodes), events.
/// What is per node only (map fill, the last reconcile, hold percentiles) is left out;
/// problems are listed with their node.
pub fn sum_reports<'a>(reports: impl IntoIterator<Item = &'a StatsReport>) -> StatsReport {
    sum_named_reports(reports.into_iter().map(|r| (None, r)))
}

/// As [`sum_reports`], each problem prefixed with its node where one is given.
pub fn sum_named_reports<'a>(
    reports: impl IntoIterator<Item = (Option<&'a str>, &'a StatsReport)>,
) -> StatsReport {
    let mut t = StatsReport::default();
    let mut policies: BTreeMap<(String, String), PolicyStats> = BTreeMap::new();
    let mut holders: BTreeMap<String, u64> = BTreeMap::new();
    for (node, r) in reports {
        add_counts(&mut t.counters, &r.counters);
        add_counts(&mut t.drops_by_reason, &r.drops_by_reason);
        add_counts(&mut t.would_drop_by_reason, &r.would_drop_by_reason);
        for p in &r.policies {
            let sum = policies
                .entry((p.policy.clone(), p.kind.clone()))
                .or_insert_with(|| PolicyStats {
                    rules: Vec::new(),
                    packets: 0,
                    bytes: 0,
                    ..p.clone()
                });
            sum.packets += p.packets;
            sum.bytes += p.bytes;
            for rule in &p.rules {
                match sum.rules.iter_mut().find(|x| x.rule == rule.rule) {
                    Some(x) => {
                        x.packets += rule.packets;
                        x.bytes += rule.bytes;
                    }
                    None => sum.rules.push(RuleCount { ..rule.clone() }),
                }
            }
        }
        let c = &r.conntrack;
        t.conntrack = ConntrackStats {
            entries: t.conntrack.entries + c.entries,
            audited: t.conntrack.audited + c.audited,
            closing: t.conntrack.closing + c.closing,
            top_holders: Vec::new(),
        };
        for (pod, n) in &c.top_holders {
            *holders.entry(pod.clone()).or_default() += n;
        }
        let e = &r.events;
        let mut suppressed_by_endpoint = std::mem::take(&mut t.events.suppressed_by_endpoint);
        add_counts(&mut suppressed_by_endpoint, &e.suppressed_by_endpoint);
        t.events = EventStats {
            sent: t.events.sent + e.sent,
            suppressed: t.events.suppressed + e.suppressed,
            lost: t.events.lost + e.lost,
            recorded: t.events.recorded + e.recorded,
            history: t.events.history + e.history,
            history_capacity: t.events.history_capacity + e.history_capacity,
            undecodable: t.events.undecodable + e.undecodable,
            suppressed_by_endpoint,
        };
        let on = |s: &str| match node {
            Some(n) => format!("{n}: {s}"),
            None => s.to_string(),
        };
        let p = &r.problems;
        t.problems = Problems {
            config_errors: [t.problems.config_errors.clone(), p.config_errors.clone()].concat(),
            errors: t
                .problems
                .errors
                .iter()
                .cloned()
                .chain(p.errors.iter().map(|e| on(e)))
                .collect(),
            pending_endpoints: t
                .problems
                .pending_endpoints
                .iter()
                .cloned()
                .chain(p.pending_endpoints.iter().map(|e| on(e)))
                .collect(),
            map_write_failures_total: t.problems.map_write_failures_total
                + p.map_write_failures_total,
        };
        let f = &r.fqdn;
        t.fqdn = FqdnReport {
            answers: t.fqdn.answers + f.answers,
            released: t.fqdn.released + f.released,
            release_failures: t.fqdn.release_failures + f.release_failures,
            unparsed: t.fqdn.unparsed + f.unparsed,
            learned: t.fqdn.learned + f.learned,
            evicted: t.fqdn.evicted + f.evicted,
            expired: t.fqdn.expired + f.expired,
            write_failures: t.fqdn.write_failures + f.write_failures,
            addresses: t.fqdn.addresses + f.addresses,
            hold_p50_us: None,
            hold_p99_us: None,
        };
    }
    // A ConfigError names an object: every node reports the same ones.
    t.problems.config_errors.sort_by_key(|e| e.to_string());
    t.problems.config_errors.dedup();
    t.policies = policies.into_values().collect();
    let mut holders: Vec<(String, u64)> = holders.into_iter().collect();
    holders.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    holders.truncate(5);
    t.conntrack.top_holders = holders;
    t
}

// ---------------------------------------------------------------------------------------------
// The exit status of a command run by exec
// ---------------------------------------------------------------------------------------------

/// The exit status the API server's `Status` (channel 3 of the exec stream) reports: 0 for
/// `Success`, the `ExitCode` cause of a `NonZeroExitCode` failure; None for any other
/// failure (the command could not be run).
pub fn exit_code_of(
    status: &k8s_openapi::apimachinery::pkg::apis::meta::v1::Status,
) -> Option<i32> {
    if status.status.as_deref() == Some("Success") {
        return Some(0);
    }
    if status.reason.as_deref() != Some("NonZeroExitCode") {
        return None;
    }
    status
        .details
        .as_ref()?
        .causes
        .as_ref()?
        .iter()
        .find(|c| c.reason.as_deref() == Some("ExitCode"))?
        .message
        .as_ref()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests;
