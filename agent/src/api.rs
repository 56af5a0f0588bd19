//! Everything that crosses the CLI socket or the state file beside it: requests and replies,
//! recorded verdicts and their filter, the stats report, what is wrong now. Plain data with
//! serde; the observers fill it in, the CLI reads it.
use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::inspect::{RuleInfo, VerdictKind};
use palisade_policy::{model::ConfigError, state::Direction};

// ---------------------------------------------------------------------------------------------
// The socket
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "snake_case")]
pub enum Request {
    Verdicts {
        #[serde(default)]
        filter: Filter,
        #[serde(default)]
        follow: bool,
        /// At most this many of the most recent matching verdicts from the history.
        #[serde(default)]
        limit: Option<usize>,
    },
    Stats,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Verdict(Box<Verdict>),
    /// The history has been sent (without `follow`, the last line).
    End,
    /// A follower fell behind and this many verdicts were not sent to it.
    Lagged {
        missed: u64,
    },
    Stats(Box<StatsReport>),
    Error {
        message: String,
    },
}

// ---------------------------------------------------------------------------------------------
// Verdicts
// ---------------------------------------------------------------------------------------------

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
    /// Egress to an address the pod's DNS answers gave a `domainNames` pattern: the name (and
    /// its CNAME chain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// A flow that left through an egress gateway, recorded when it ended (`egress`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<EgressFlow>,
}

/// What went out through an egress gateway: which, as what, and how much (both directions).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressFlow {
    /// The EgressGateway.
    pub gateway: String,
    /// The gateway node the flow went through.
    pub node: String,
    /// The source address the outside world saw (`None`: the gateway node's own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress_ip: Option<IpAddr>,
    pub packets: u64,
    pub bytes: u64,
    pub duration_ms: u64,
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
    /// `namespace/name`: verdicts whose source is this pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_pod: Option<String>,
    /// `namespace/name`: verdicts whose destination is this pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_pod: Option<String>,
    /// Verdicts whose source is a pod of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_namespace: Option<String>,
    /// Verdicts whose destination is a pod of this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_namespace: Option<String>,
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
        let in_ns = |pod: &Option<String>, ns: &str| {
            pod.as_deref()
                .and_then(|p| p.split_once('/'))
                .is_some_and(|(n, _)| n == ns)
        };
        if let Some(p) = &self.from_pod
            && v.source.pod.as_ref() != Some(p)
        {
            return false;
        }
        if let Some(p) = &self.to_pod
            && v.destination.pod.as_ref() != Some(p)
        {
            return false;
        }
        if let Some(ns) = &self.from_namespace
            && !in_ns(&v.source.pod, ns)
        {
            return false;
        }
        if let Some(ns) = &self.to_namespace
            && !in_ns(&v.destination.pod, ns)
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

// ---------------------------------------------------------------------------------------------
// Stats
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// Datapath counters, summed over CPUs.
    pub counters: BTreeMap<String, u64>,
    pub drops_by_reason: BTreeMap<String, u64>,
    /// Denials let through by audit mode, by reason.
    pub would_drop_by_reason: BTreeMap<String, u64>,
    /// Packets and bytes let through, per policy and rule (exact, from RULE_STATS).
    pub policies: Vec<PolicyStats>,
    pub maps: Vec<MapFill>,
    pub conntrack: ConntrackStats,
    pub events: EventStats,
    pub reconcile: Option<ReconcileInfo>,
    /// Configuration errors, failures and endpoints failing closed, as of the last reconcile.
    #[serde(default)]
    pub problems: Problems,
    /// FQDN egress: what the learner did with the DNS answers it read.
    #[serde(default)]
    pub fqdn: FqdnReport,
}

/// The FQDN learner's counts since the agent started (`addresses`: in FQDN_IPS now).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FqdnReport {
    pub answers: u64,
    pub released: u64,
    pub release_failures: u64,
    pub unparsed: u64,
    pub learned: u64,
    pub evicted: u64,
    pub expired: u64,
    pub write_failures: u64,
    pub addresses: u64,
    /// How long the last (up to 1 024) held answers were held, from `to_pod` to their
    /// release, µs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_p50_us: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold_p99_us: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStats {
    /// `namespace/name` of a NetworkPolicy, the name of a ClusterNetworkPolicy.
    pub policy: String,
    /// `NetworkPolicy` or `ClusterNetworkPolicy`.
    #[serde(default)]
    pub kind: String,
    /// A ClusterNetworkPolicy's tier (`Admin`, `Baseline`) and priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u16>,
    pub audit: bool,
    pub packets: u64,
    pub bytes: u64,
    pub rules: Vec<RuleCount>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCount {
    pub id: u32,
    /// `ingress[0]`.
    pub rule: String,
    /// A ClusterNetworkPolicy rule's name and action (`Accept`, `Deny`, `Pass`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MapFill {
    pub map: String,
    pub entries: u64,
    pub capacity: u64,
    pub fill: f64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConntrackStats {
    pub entries: u64,
    /// Flows let through by audit mode only.
    pub audited: u64,
    /// TCP flows that saw FIN or RST.
    pub closing: u64,
    /// The endpoints holding the most entries (pod, entries), most first: who to look at
    /// when new flows drop for `conntrack-quota` or `conntrack-full`.
    #[serde(default)]
    pub top_holders: Vec<(String, u64)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventStats {
    /// Events the datapath wrote to the ring buffer.
    pub sent: u64,
    /// Events the per-endpoint rate limit refused.
    pub suppressed: u64,
    /// Events lost because the ring buffer was full.
    pub lost: u64,
    /// Verdicts the agent recorded since it started.
    pub recorded: u64,
    pub history: usize,
    pub history_capacity: usize,
    pub undecodable: u64,
    /// Suppressed events per endpoint (`namespace/name`), where any.
    pub suppressed_by_endpoint: BTreeMap<String, u64>,
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
