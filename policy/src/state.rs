//! The compiled form of the cluster's policy for this node: exactly the entries the BPF maps
//! should hold. `compile` produces it from the store; `maps` diffs it against what is loaded and
//! writes only the difference; `datapath_model` evaluates packets against it the way the eBPF
//! programs do.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use palisade_common::{
    CidrKey, EndpointInfo, PeerAddr, PolicyKey, PolicyValue, PrefixLengths, PrefixLengthsKey,
};
use serde::{Deserialize, Serialize};

/// A pod, by namespace and name. Cheap to clone: the per-pod tables (the store's, the
/// identities', the observers') share its two strings.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: Name,
    pub name: Name,
}

impl PodRef {
    pub fn new(namespace: impl Into<Name>, name: impl Into<Name>) -> PodRef {
        PodRef {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

/// A Kubernetes name, shared rather than copied. Reads as a `str`.
#[derive(Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Name(Arc<str>);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for Name {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Name {
        Name(Arc::from(s))
    }
}

impl From<String> for Name {
    fn from(s: String) -> Name {
        Name(Arc::from(s))
    }
}

impl From<&String> for Name {
    fn from(s: &String) -> Name {
        Name(Arc::from(s.as_str()))
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0.to_string()
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        *self.0 == *other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<String> for Name {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl PartialEq<Name> for str {
    fn eq(&self, other: &Name) -> bool {
        *self == *other.0
    }
}

impl PartialEq<Name> for &str {
    fn eq(&self, other: &Name) -> bool {
        **self == *other.0
    }
}

impl PartialEq<Name> for String {
    fn eq(&self, other: &Name) -> bool {
        **self == *other.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub const BOTH: [Direction; 2] = [Direction::Ingress, Direction::Egress];

    /// The `DIR_*` value used in map keys.
    pub fn as_u8(self) -> u8 {
        match self {
            Direction::Ingress => palisade_common::DIR_INGRESS,
            Direction::Egress => palisade_common::DIR_EGRESS,
        }
    }

    pub fn from_u8(v: u8) -> Direction {
        if v == palisade_common::DIR_INGRESS {
            Direction::Ingress
        } else {
            Direction::Egress
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// A policy's tier. Admin is evaluated before NetworkPolicy, Baseline after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tier {
    Admin,
    Baseline,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What a matching rule does: `Accept` and `Deny` decide the direction, `Pass` skips the rest of
/// the tier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Action {
    Accept,
    Deny,
    Pass,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Where a rule id came from: `spec.<direction>[index]` of one NetworkPolicy or (`tier` set,
/// `namespace` empty) of one ClusterNetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RuleRef {
    pub namespace: String,
    pub policy: String,
    pub direction: Direction,
    pub index: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<TierRuleInfo>,
}

/// What a ClusterNetworkPolicy rule is, for people: its policy's tier and priority, its name
/// and its action.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TierRuleInfo {
    pub tier: Tier,
    pub priority: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// As written.
    pub action: Action,
    /// The rule has a peer this version does not know: an Accept rule matches nothing, a Deny
    /// or Pass rule denies everything.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fails_closed: bool,
}

impl RuleRef {
    /// The policy as `kubectl get` names it: `namespace/name` for a NetworkPolicy, the name
    /// for a ClusterNetworkPolicy.
    pub fn policy_id(&self) -> String {
        if self.tier.is_some() {
            self.policy.clone()
        } else {
            format!("{}/{}", self.namespace, self.policy)
        }
    }
}

impl fmt::Display for RuleRef {
    /// `ns/np ingress[0]`, or `ClusterNetworkPolicy cnp (Admin 10) egress[1] 'name' Deny`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Some(t) = &self.tier else {
            return write!(
                f,
                "{}/{} {}[{}]",
                self.namespace, self.policy, self.direction, self.index
            );
        };
        write!(
            f,
            "ClusterNetworkPolicy {} ({} {}) {}[{}]",
            self.policy, t.tier, t.priority, self.direction, self.index
        )?;
        if let Some(n) = &t.name {
            write!(f, " '{n}'")?;
        }
        write!(f, " {}", t.action)?;
        if t.fails_closed {
            f.write_str(" (unknown peer: fails closed)")?;
        }
        Ok(())
    }
}

/// A prefix of CIDRS: `key.addr` is masked to `prefix_len` address bits (0..=32 for IPv4,
/// 0..=128 for IPv6). `key.prefix_len` is 0 here; the map's key carries the length
/// (`map_key`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrEntry {
    pub key: CidrKey,
    pub prefix_len: u32,
}

impl CidrEntry {
    /// The entry of `key` masked to `prefix_len`.
    pub fn new(key: CidrKey, prefix_len: u32) -> CidrEntry {
        CidrEntry {
            key: CidrKey {
                prefix_len: 0,
                ..key.masked(prefix_len)
            },
            prefix_len,
        }
    }

    /// The CIDRS key.
    pub fn map_key(&self) -> CidrKey {
        CidrKey {
            prefix_len: self.prefix_len as u8,
            ..self.key
        }
    }

    /// The entry of a CIDRS key.
    pub fn from_map_key(key: CidrKey) -> CidrEntry {
        CidrEntry::new(key, u32::from(key.prefix_len))
    }

    /// A bound below every entry of `endpoint` (entries sort by endpoint first).
    pub fn first_of(endpoint: u32) -> CidrEntry {
        CidrEntry {
            key: CidrKey {
                endpoint,
                ..CidrKey::default()
            },
            prefix_len: 0,
        }
    }
}

/// A prefix of POLICY: `key` is masked to `prefix_len` bits of the whole key, one of
/// `POLICY_KEY_ANY_PROTO_BITS` (any protocol), `POLICY_KEY_ANY_PORT_BITS` (one protocol,
/// any port), up to `POLICY_KEY_FULL_BITS` (one port; in between: an aligned port block).
/// `key.prefix_len` is 0 here; the map's key carries the length (`map_key`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyEntry {
    pub key: PolicyKey,
    pub prefix_len: u32,
}

impl PolicyEntry {
    /// The entry of `key` masked to `prefix_len`.
    pub fn new(key: PolicyKey, prefix_len: u32) -> PolicyEntry {
        PolicyEntry {
            key: PolicyKey {
                prefix_len: 0,
                ..key.masked(prefix_len)
            },
            prefix_len,
        }
    }

    /// The POLICY key.
    pub fn map_key(&self) -> PolicyKey {
        PolicyKey {
            prefix_len: self.prefix_len as u8,
            ..self.key
        }
    }

    /// The entry of a POLICY key.
    pub fn from_map_key(key: PolicyKey) -> PolicyEntry {
        PolicyEntry::new(key, u32::from(key.prefix_len))
    }

    /// A bound below every entry of `endpoint` (entries sort by endpoint first).
    pub fn first_of(endpoint: u32) -> PolicyEntry {
        PolicyEntry {
            key: PolicyKey {
                endpoint,
                ..PolicyKey::default()
            },
            prefix_len: 0,
        }
    }
}

/// POLICY entries, in a persistent map (shared by clones, copied where they change).
pub type PolicyMap = imbl::OrdMap<PolicyEntry, PolicyValue>;

/// The prefix lengths CIDRS and POLICY entries use, per endpoint and direction
/// (PREFIX_LENGTHS), of one endpoint or of all (`None`).
pub fn prefix_lengths(
    cidrs: &BTreeMap<CidrEntry, u32>,
    policy: &PolicyMap,
    endpoint: Option<u32>,
) -> BTreeMap<PrefixLengthsKey, PrefixLengths> {
    let mut out: BTreeMap<PrefixLengthsKey, PrefixLengths> = BTreeMap::new();
    let key = |endpoint, dir| PrefixLengthsKey {
        endpoint,
        dir,
        _pad: [0; 3],
    };
    let (first, last) = match endpoint {
        Some(ep) => (ep, ep),
        None => (0, u32::MAX),
    };
    for e in cidrs.range(CidrEntry::first_of(first)..).map(|(e, _)| e) {
        if e.key.endpoint > last {
            break;
        }
        out.entry(key(e.key.endpoint, e.key.dir))
            .or_default()
            .add_cidr(e.key.family, e.prefix_len);
    }
    for e in policy.range(PolicyEntry::first_of(first)..).map(|(e, _)| e) {
        if e.key.endpoint > last {
            break;
        }
        out.entry(key(e.key.endpoint, e.key.dir))
            .or_default()
            .add_policy(e.prefix_len);
    }
    out
}

/// A local endpoint as the compiler saw it: which pod, which host interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointMeta {
    pub pod: PodRef,
    pub ifindex: u32,
    /// Policies whose rules are in force for the pod, per direction (namespace/name): the
    /// enforcing policies selecting it or, where only audit policies select it in that
    /// direction, those (the direction is then audited: `EP_AUDIT_*`).
    pub ingress_policies: Vec<String>,
    pub egress_policies: Vec<String>,
    /// Audit policies that select the pod but are not in force in that direction, because
    /// enforcing policies isolate it there (an audit policy's allows never open what enforcing
    /// policies deny).
    #[serde(default)]
    pub ingress_audit_ignored: Vec<String>,
    #[serde(default)]
    pub egress_audit_ignored: Vec<String>,
    /// ClusterNetworkPolicies (enforced, not audit) whose subject selects the pod and that have
    /// rules in that direction, in precedence order (the direction is then `EP_TIERED_*`).
    #[serde(default)]
    pub ingress_cluster_policies: Vec<String>,
    #[serde(default)]
    pub egress_cluster_policies: Vec<String>,
}

/// Everything the BPF maps should contain, plus what is needed to explain it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    /// ENDPOINTS, keyed by host-side ifindex. `revision` is left 0 by the compiler; the map
    /// writer sets it.
    pub endpoints: BTreeMap<u32, EndpointInfo>,
    /// IDENTITIES: pod addresses (every pod in the cluster, not only local ones) and this node's
    /// own addresses (`IDENTITY_HOST`).
    pub identities: BTreeMap<PeerAddr, u32>,
    /// EP_ADDRS: the addresses of the local endpoints -> endpoint id (source address
    /// verification and self traffic). This node's own addresses are never in it.
    pub endpoint_addrs: BTreeMap<PeerAddr, u32>,
    /// NODE_PORTS: node ports the node DNATs onward (NodePorts, hostPorts) -> the address and
    /// port a pod's egress to them is judged as.
    pub node_ports: BTreeMap<palisade_common::NodePortKey, palisade_common::NodePortTarget>,
    /// CIDRS: flattened ipBlock prefixes -> CIDR class id (or `CIDR_CLASS_NONE`).
    pub cidrs: BTreeMap<CidrEntry, u32>,
    /// POLICY: allow entries. A persistent map: the compiler's result and what the map
    /// writer knows the kernel holds share one copy (the largest table of all).
    pub policy: PolicyMap,
    /// Rule ids used in `policy`, decoded.
    pub rules: BTreeMap<u32, RuleRef>,
    /// Rule id -> its RULE_STATS slot (`PolicyValue::slot`); a rule without one (past
    /// `capacity::RULE_STATS - 1` rules) is not counted.
    pub rule_slots: BTreeMap<u32, u16>,
    /// Endpoint id -> what it is.
    pub endpoint_meta: BTreeMap<u32, EndpointMeta>,
    /// Identity id -> the pods that carry it (for naming peers in verdicts). A persistent
    /// map: the writer's copy and the observers' share all but what a change touches.
    pub identity_pods: imbl::OrdMap<u32, Vec<PodRef>>,
    /// Endpoint id -> the domain classes of its egress `domainNames` patterns: what the agent
    /// writes in FQDN_IPS for an address a DNS answer gave the endpoint.
    pub domains: BTreeMap<u32, DomainTable>,
    /// FQDN_IPS as the datapath holds it: (endpoint, address) -> domain class, for the entries
    /// that admit new flows now. The compiler leaves it empty (the agent's learner writes the
    /// map); read back from the pins for `explain`.
    pub learned: BTreeMap<(u32, PeerAddr), u32>,
    /// EgressGateways for this node's endpoints (`crate::egress`): EGW_DESTS entries and the
    /// groups the agent keeps EGW_GROUPS of, with the gateways' health.
    pub egress: EgressPlan,
}

impl DesiredState {
    /// The tables the compiler makes that differ between the two (for tests that hold an
    /// update to a full compile).
    pub fn differing_tables(&self, other: &DesiredState) -> Vec<&'static str> {
        [
            ("endpoints", self.endpoints == other.endpoints),
            ("identities", self.identities == other.identities),
            (
                "endpoint_addrs",
                self.endpoint_addrs == other.endpoint_addrs,
            ),
            ("node_ports", self.node_ports == other.node_ports),
            ("cidrs", self.cidrs == other.cidrs),
            ("policy", self.policy == other.policy),
            ("rules", self.rules == other.rules),
            ("rule_slots", self.rule_slots == other.rule_slots),
            ("endpoint_meta", self.endpoint_meta == other.endpoint_meta),
            ("identity_pods", self.identity_pods == other.identity_pods),
            ("domains", self.domains == other.domains),
        ]
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(name, _)| name)
        .collect()
    }
}

/// One endpoint's `domainNames` patterns, grouped: every set of patterns a DNS name can match
/// at once has a domain class (its POLICY entries are those of the rules naming the patterns).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainTable {
    /// (patterns, class), each set sorted.
    pub classes: Vec<(Vec<String>, u32)>,
    /// The same for the audit view (audited ClusterNetworkPolicies enforced); empty when the
    /// endpoint has none.
    pub audit_classes: Vec<(Vec<String>, u32)>,
}

/// Content stamps of a compiled state (`Compiler::update`): two states with the same nonzero
/// stamp for an endpoint hold the same POLICY and CIDRS entries for it (and so the same
/// PREFIX_LENGTHS), and with the same nonzero `identities` stamp the same IDENTITIES. Stamps
/// are never reused in a process. A hint that lets the map writer diff only what changed; a
/// state changed after the compiler made it has none.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stamps {
    pub identities: u64,
    /// Endpoint id -> stamp.
    pub endpoints: BTreeMap<u32, u64>,
}

impl Stamps {
    /// A stamp no other call in this process returns.
    pub fn fresh() -> u64 {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------------
// Egress gateways (compiled by `crate::egress`)
// ---------------------------------------------------------------------------------------------

/// One EGW_DESTS entry: the key data (address masked) and its destination prefix length (the
/// trie's is `EGW_DEST_FIXED_BITS` more).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestEntry {
    pub key: palisade_common::EgwDestKey,
    pub prefix_len: u8,
}

/// A candidate gateway node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct GatewayNode {
    pub name: String,
    /// The node's id in EGW_GROUPS and EGW_FLOWS (`node_id`).
    pub id: u32,
    pub v4: Option<std::net::Ipv4Addr>,
    pub v6: Option<std::net::Ipv6Addr>,
}

/// One EgressGateway, compiled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub egress_v4: Option<std::net::Ipv4Addr>,
    pub egress_v6: Option<std::net::Ipv6Addr>,
    /// Nodes the gateway selector selects, by name (at most `EGW_MAX_GATEWAYS` are used).
    pub gateways: Vec<GatewayNode>,
    /// The addresses of every pod (cluster-wide) it selects: a gateway masquerades their
    /// packets only.
    pub sources: Vec<std::net::IpAddr>,
    pub destinations: Vec<ipnetwork::IpNetwork>,
    pub excluded: Vec<ipnetwork::IpNetwork>,
}

/// The egress part of a node's desired state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressPlan {
    pub dests: BTreeMap<DestEntry, palisade_common::EgwDest>,
    /// Group id -> group.
    pub groups: BTreeMap<u32, Group>,
    /// Endpoint id -> the EgressGateways that select it (for explaining).
    pub selected: BTreeMap<u32, Vec<String>>,
    /// Every node's addresses: the only senders a gateway takes tunnelled packets from.
    pub nodes: Vec<std::net::IpAddr>,
}
