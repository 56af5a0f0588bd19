//! The compiler: store + this node's endpoints and addresses → the map entries
//! (`DesiredState`) the datapath evaluates (see `datapath_model` for how).
//!
//! * Pods get **identities**: pods that look the same to every selector and named-port lookup
//!   (namespace, labels, namespace labels, named ports) share one. Peer selectors are evaluated
//!   once per identity and cached per policy peer, so cost grows with distinct identities, not
//!   pods.
//! * Pod peers become POLICY entries `(endpoint, identity, dir, proto/port)`.
//! * ipBlocks (and rules without peers, as `0.0.0.0/0` and `::/0`) are **flattened** per
//!   endpoint and direction into nested-or-disjoint CIDRS prefixes whose value is a **class**:
//!   the set of (rule, ports) of every block that contains the prefix and does not except it.
//!   Classes are interned by content and get POLICY entries `(endpoint, class, dir, ...)`.
//! * Ids (endpoints, identities, rules, classes) are interned and stable: an unrelated change
//!   renumbers nothing, so the map writer's diff stays small. Ids not used by a compile are
//!   released at its end and are not handed out again before the id space is exhausted.
//!
//! Named ports are resolved here: for ingress on the endpoint's own pod; for egress on each
//! peer identity (pod peers and rules without peers: per identity entries; ipBlocks: a host
//! prefix is added for every pod address inside the block whose pod has the name, whose class
//! carries the resolved port).
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::Hash;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use palisade_common::{
    CIDR_CLASS_BIT, CIDR_CLASS_NONE, CidrKey, DIR_AUDIT_VIEW, DOMAIN_CLASS_BIT, EP_FQDN, EP_TIERED,
    EndpointInfo, IDENTITY_FIRST_POD, POLICY_FLAG_AUDIT, POLICY_KEY_ANY_PORT_BITS,
    POLICY_KEY_ANY_PROTO_BITS, POLICY_KEY_FULL_BITS, PeerAddr, PolicyKey, PolicyValue,
    TIER_ACTION_ACCEPT, TIER_ACTION_DENY, TIER_ACTION_PASS, TierMatch, audit_flag, isolated_flag,
    tier_audit_flag, tiered_flag,
};
use serde::Serialize;

use self::identities::{Ident, IdentityChanges, IdentityTable, digest};
use crate::model::cluster::{
    Action, ClusterNetworkPolicy, NodeInfo, Subject, Tier, TierPeer, TierPort, TierRule,
    domain_matches,
};
use crate::model::{NamedPort, Peer, PodInfo, Policy, PortMatch, PortSpec, Protocol, Store};
use crate::state::{
    CidrEntry, DesiredState, Direction, DomainTable, EndpointMeta, PodRef, PolicyEntry, PolicyMap,
    RuleRef, Stamps, TierRuleInfo,
};

/// A pod with an interface on this node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct LocalEndpoint {
    pub pod: PodRef,
    /// Host-side ifindex of the pod's interface.
    pub ifindex: u32,
}

// ---------------------------------------------------------------------------------------------
// Ports
// ---------------------------------------------------------------------------------------------

/// The protocol/port part of a POLICY entry: `prefix_len` is the whole key's prefix (72: any
/// protocol; 80: one protocol, any port; 81..=96: an aligned port block; 96: one port), and
/// `proto`/`port` are masked to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct PortKey {
    pub proto: u8,
    pub port: u16,
    pub prefix_len: u32,
}

impl PortKey {
    pub const ANY: PortKey = PortKey {
        proto: 0,
        port: 0,
        prefix_len: POLICY_KEY_ANY_PROTO_BITS,
    };

    pub fn any_port(proto: u8) -> PortKey {
        PortKey {
            proto,
            port: 0,
            prefix_len: POLICY_KEY_ANY_PORT_BITS,
        }
    }

    pub fn port(proto: u8, port: u16) -> PortKey {
        PortKey {
            proto,
            port,
            prefix_len: POLICY_KEY_FULL_BITS,
        }
    }
}

/// The minimal set of aligned power-of-two blocks covering `[lo, hi]`, as `(start, k)` for the
/// block `[start, start + 2^k - 1]` (`start` is a multiple of `2^k`).
pub fn port_range_blocks(lo: u16, hi: u16) -> Vec<(u16, u32)> {
    let mut out = Vec::new();
    let (mut a, hi) = (u32::from(lo), u32::from(hi));
    while a <= hi {
        let mut k = a.trailing_zeros().min(16);
        while a + (1 << k) - 1 > hi {
            k -= 1;
        }
        out.push((a as u16, k));
        a += 1 << k;
    }
    out
}

/// The POLICY port keys of a numeric port spec (or an already resolved named one).
fn numeric_keys(proto: Protocol, port: &PortMatch, end: Option<u16>, out: &mut Vec<PortKey>) {
    let proto = proto.number();
    match (port, end) {
        (PortMatch::Any, _) => out.push(PortKey::any_port(proto)),
        (PortMatch::Number(p), None) => out.push(PortKey::port(proto, *p)),
        (PortMatch::Number(p), Some(e)) => {
            for (start, k) in port_range_blocks(*p, e) {
                out.push(PortKey {
                    proto,
                    port: start,
                    prefix_len: POLICY_KEY_ANY_PORT_BITS + 16 - k,
                });
            }
        }
        (PortMatch::Named(_), _) => {}
    }
}

/// A rule's ports for one endpoint and direction: what is known (`fixed`) and, for egress,
/// the names that depend on the peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct PortPlan {
    fixed: Vec<PortKey>,
    named: Vec<(String, Protocol)>,
}

impl PortPlan {
    fn new(ports: Option<&[PortSpec]>, dir: Direction, endpoint_ports: &[NamedPort]) -> PortPlan {
        let mut plan = PortPlan::default();
        let Some(ports) = ports else {
            plan.fixed.push(PortKey::ANY);
            return plan;
        };
        for p in ports {
            match (&p.port, dir) {
                (PortMatch::Named(n), Direction::Ingress) => {
                    for cp in endpoint_ports {
                        if cp.name == *n && cp.protocol == p.protocol {
                            plan.fixed.push(PortKey::port(p.protocol.number(), cp.port));
                        }
                    }
                }
                (PortMatch::Named(n), Direction::Egress) => {
                    plan.named.push((n.clone(), p.protocol))
                }
                _ => numeric_keys(p.protocol, &p.port, p.end_port, &mut plan.fixed),
            }
        }
        plan.fixed.sort();
        plan.fixed.dedup();
        plan.named.sort();
        plan.named.dedup();
        plan
    }

    /// The plan of a ClusterNetworkPolicy rule's `protocols`. A named port has no protocol of
    /// its own: it matches the named container port whatever its protocol.
    fn for_tier(
        ports: Option<&[TierPort]>,
        dir: Direction,
        endpoint_ports: &[NamedPort],
    ) -> PortPlan {
        let mut plan = PortPlan::default();
        let Some(ports) = ports else {
            plan.fixed.push(PortKey::ANY);
            return plan;
        };
        for p in ports {
            match (p, dir) {
                (TierPort::Port { proto, first, last }, _) => {
                    let end = (last > first).then_some(*last);
                    numeric_keys(*proto, &PortMatch::Number(*first), end, &mut plan.fixed);
                }
                (TierPort::NamedPort(n), Direction::Ingress) => {
                    for cp in endpoint_ports.iter().filter(|cp| cp.name == *n) {
                        plan.fixed
                            .push(PortKey::port(cp.protocol.number(), cp.port));
                    }
                }
                (TierPort::NamedPort(n), Direction::Egress) => {
                    for proto in Protocol::ALL {
                        plan.named.push((n.clone(), proto));
                    }
                }
            }
        }
        plan.fixed.sort();
        plan.fixed.dedup();
        plan.named.sort();
        plan.named.dedup();
        plan
    }

    /// The plan without its named ports (for addresses, which have none).
    fn without_names(&self) -> PortPlan {
        PortPlan {
            fixed: self.fixed.clone(),
            named: Vec::new(),
        }
    }

    /// The named ports resolved on a peer's container ports.
    fn resolve<'a>(&'a self, peer_ports: &'a [NamedPort]) -> impl Iterator<Item = PortKey> + 'a {
        self.named.iter().flat_map(move |(n, proto)| {
            peer_ports
                .iter()
                .filter(move |cp| cp.name == *n && cp.protocol == *proto)
                .map(|cp| PortKey::port(cp.protocol.number(), cp.port))
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Interning
// ---------------------------------------------------------------------------------------------

/// Stable ids for keys. An id stays with its key as long as every compile uses the key; keys
/// a compile does not use are dropped at its end. Fresh ids come from a counter; only when the
/// range is exhausted are released ids reused (released ids were absent from the last compile's
/// output, so the maps no longer hold entries for them).
#[derive(Clone, Debug)]
struct Interner<K> {
    ids: HashMap<K, (u32, u64)>,
    live: HashSet<u32>,
    next: u64,
    first: u32,
    last: u32,
    reuse_cursor: u32,
    generation: u64,
}

impl<K: Hash + Eq + Clone> Interner<K> {
    fn new(first: u32, last: u32) -> Self {
        Interner {
            ids: HashMap::new(),
            live: HashSet::new(),
            next: u64::from(first),
            first,
            last,
            reuse_cursor: first,
            generation: 0,
        }
    }

    fn begin(&mut self) {
        self.generation += 1;
    }

    fn intern(&mut self, key: &K) -> u32 {
        self.try_intern(key).expect("id space exhausted")
    }

    /// `intern`, or `None` when every id of the range is live.
    fn try_intern(&mut self, key: &K) -> Option<u32> {
        if let Some(e) = self.ids.get_mut(key) {
            e.1 = self.generation;
            return Some(e.0);
        }
        let id = self.alloc()?;
        self.ids.insert(key.clone(), (id, self.generation));
        self.live.insert(id);
        Some(id)
    }

    /// A fresh id, else a released one; `None` when every id of the range is live.
    fn alloc(&mut self) -> Option<u32> {
        if self.next <= u64::from(self.last) {
            self.next += 1;
            return Some((self.next - 1) as u32);
        }
        let span = u64::from(self.last - self.first) + 1;
        if self.live.len() as u64 >= span {
            return None;
        }
        loop {
            let id = self.reuse_cursor;
            self.reuse_cursor = if id == self.last { self.first } else { id + 1 };
            if !self.live.contains(&id) {
                return Some(id);
            }
        }
    }

    /// Gives `key` the id `id` (an id handed out by an earlier run of the agent), unless either
    /// is already taken. The id stays live until a compile does not use it.
    fn adopt(&mut self, key: &K, id: u32) -> bool {
        if id < self.first
            || id > self.last
            || self.ids.contains_key(key)
            || self.live.contains(&id)
        {
            return false;
        }
        self.ids.insert(key.clone(), (id, self.generation));
        self.live.insert(id);
        self.next = self.next.max(u64::from(id) + 1);
        true
    }

    /// Releases the keys this compile did not use.
    fn finish(&mut self) {
        let g = self.generation;
        let live = &mut self.live;
        self.ids.retain(|_, (id, used)| {
            let keep = *used == g;
            if !keep {
                live.remove(id);
            }
            keep
        });
    }

    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// What makes two pods indistinguishable to policy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct IdentityKey {
    namespace: Arc<str>,
    /// The pod's own (shared with the store).
    labels: Arc<BTreeMap<String, String>>,
    /// One copy per namespace, shared by its identities.
    namespace_labels: Arc<BTreeMap<String, String>>,
    /// The pod's own (shared with the store).
    ports: Arc<Vec<NamedPort>>,
}

/// A class's content: its POLICY port keys, each with what the class's rules say of it.
type ClassKey = Vec<(PortKey, PolicyValue)>;

/// What one rule contributes to the POLICY values of the keys it covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Contribution {
    /// A NetworkPolicy rule allows.
    Allow(u32),
    /// A ClusterNetworkPolicy rule of a tier.
    Tier(Tier, TierMatch),
}

/// Adds a rule's contribution to a value: the lowest NetworkPolicy rule id allows (the one
/// reported), and in each tier the first rule by rank decides.
fn merge(v: &mut PolicyValue, c: Contribution) {
    match c {
        Contribution::Allow(rule) => {
            if v.rule == 0 || rule < v.rule {
                v.rule = rule;
            }
        }
        Contribution::Tier(Tier::Admin, m) => v.admin = v.admin.first(m),
        Contribution::Tier(Tier::Baseline, m) => v.baseline = v.baseline.first(m),
    }
}

/// `merge` of everything `other` says.
fn merge_value(v: &mut PolicyValue, other: &PolicyValue) {
    if other.rule != 0 {
        merge(v, Contribution::Allow(other.rule));
    }
    v.admin = v.admin.first(other.admin);
    v.baseline = v.baseline.first(other.baseline);
}

/// Compiles the store into map entries; holds the id tables between compiles.
#[derive(Clone, Debug)]
pub struct Compiler {
    endpoints: Interner<PodRef>,
    /// Keys shared with the identity table's (one copy of each).
    identities: Interner<Arc<IdentityKey>>,
    rules: Interner<RuleRef>,
    /// Rule id -> RULE_STATS slot (dense, 1..capacity::RULE_STATS).
    stats_slots: Interner<u32>,
    classes: Interner<ClassKey>,
    /// (endpoint, patterns, audit view) -> domain class: stable while the endpoint names the
    /// same patterns, so the agent's FQDN_IPS entries stay valid when rules' ports change.
    domain_classes: Interner<(u32, Vec<String>, bool)>,
    /// Node-wide audit mode (`palisade run --audit`): every policy is treated as an audit
    /// policy.
    pub audit_all: bool,
    /// Rule id -> where it came from, for the rules interned since the last full compile.
    rule_refs: HashMap<u32, RuleRef>,
    /// What the last compile saw and made, for the next `update`.
    memo: Memo,
}

impl Default for Compiler {
    fn default() -> Self {
        Compiler {
            endpoints: Interner::new(1, u32::MAX),
            identities: Interner::new(IDENTITY_FIRST_POD, CIDR_CLASS_BIT - 1),
            rules: Interner::new(1, u32::MAX),
            stats_slots: Interner::new(1, palisade_common::capacity::RULE_STATS - 1),
            classes: Interner::new(1, CIDR_CLASS_BIT - 1),
            domain_classes: Interner::new(1, DOMAIN_CLASS_BIT - 1),
            audit_all: false,
            rule_refs: HashMap::new(),
            memo: Memo::default(),
        }
    }
}

/// Sizes of the id tables (for metrics and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct InternerSizes {
    pub endpoints: usize,
    pub identities: usize,
    pub rules: usize,
    pub classes: usize,
}

// ---------------------------------------------------------------------------------------------
// What is kept between compiles
// ---------------------------------------------------------------------------------------------

/// Updates between two full compiles (which release the ids nothing uses any more).
pub const FULL_EVERY: u32 = 1024;

/// `Compiler::update`'s result: the state, its content stamps and what was compiled.
#[derive(Clone, Copy, Debug)]
pub struct Compiled<'c> {
    pub state: &'c DesiredState,
    pub stamps: &'c Stamps,
    pub stats: UpdateStats,
}

/// What `update` did (for metrics and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UpdateStats {
    /// Everything was compiled from scratch.
    pub full: bool,
    /// Endpoints compiled (the others kept their entries).
    pub endpoints_compiled: usize,
    /// POLICY entries those endpoints have.
    pub policy_entries_written: usize,
    /// Identities that came or went.
    pub identities_changed: usize,
    /// Pod addresses whose identity changed, came or went.
    pub addresses_changed: usize,
}

#[derive(Clone, Debug, Default)]
struct Memo {
    /// `None` until the first compile.
    table: Option<IdentityTable>,
    /// The last result, patched by each update.
    base: DesiredState,
    /// Pod peer selections, by content -> the identity slots they select; kept while an
    /// endpoint reads them, and patched when identities come and go.
    selections: HashMap<Arc<SelectionKey>, Arc<Vec<usize>>>,
    /// Each local endpoint's part of the result, by pod.
    pieces: BTreeMap<PodRef, Piece>,
    /// NetworkPolicy digests, by (namespace, name).
    policies: BTreeMap<(String, String), u64>,
    /// Where `policies` read the store's policies up to.
    policies_seen: crate::model::tracked::Mark,
    /// Digest of the ClusterNetworkPolicies and the node's audit mode.
    cluster: u64,
    /// Digest of the nodes.
    nodes: u64,
    /// The base's content stamps.
    stamps: Stamps,
    since_full: u32,
    last: UpdateStats,
}

/// One endpoint's compiled part, besides its POLICY and CIDRS entries (which are in the
/// base, keyed by its id first) and what it read to make it.
#[derive(Clone, Debug)]
struct Piece {
    id: u32,
    /// The first of its interfaces.
    ifindex: u32,
    /// Its pod's digest (fields and namespace labels) when it was compiled.
    pod_digest: u64,
    flags: u32,
    meta: EndpointMeta,
    addrs: Vec<(PeerAddr, u32)>,
    node_ports: Vec<(
        palisade_common::NodePortKey,
        palisade_common::NodePortTarget,
    )>,
    domains: Option<DomainTable>,
    /// Rule ids its POLICY values name.
    rules: BTreeSet<u32>,
    reads: Reads,
}

/// What compiling an endpoint read of the cluster besides its pod and its namespace's
/// policies: when any of it changes, the endpoint is compiled again.
#[derive(Clone, Debug, Default)]
struct Reads {
    /// Pod peer selections.
    selections: Vec<Arc<SelectionKey>>,
    /// Every identity (a rule without peers, with named ports).
    all_identities: bool,
    /// Pod addresses and their identities (ipBlocks with named ports).
    pod_addresses: bool,
}

/// The ClusterNetworkPolicies in precedence order: enforced ones, and with audited ones.
struct Tiers<'a, 'p> {
    cluster: &'a [(usize, &'p ClusterNetworkPolicy)],
    with_audited: &'a [(usize, &'p ClusterNetworkPolicy)],
}

/// Removes an endpoint's POLICY and CIDRS entries (one by one: splitting and appending a
/// tree would touch all of it).
fn remove_entries(out: &mut DesiredState, id: u32) {
    for e in run(out.policy.range(PolicyEntry::first_of(id)..), |e| {
        e.key.endpoint == id
    }) {
        out.policy.remove(&e);
    }
    for e in run(out.cidrs.range(CidrEntry::first_of(id)..), |e| {
        e.key.endpoint == id
    }) {
        out.cidrs.remove(&e);
    }
}

/// The keys of a sorted range up to the first for which `within` does not hold.
fn run<'m, K: Copy + 'm, V: 'm>(
    range: impl Iterator<Item = (&'m K, &'m V)>,
    within: impl Fn(&K) -> bool,
) -> Vec<K> {
    range.map(|(k, _)| *k).take_while(|k| within(k)).collect()
}

/// Does a selection select this identity?
fn selection_matches(key: &SelectionKey, ident: &Ident) -> bool {
    let (policy_ns, ns_sel, pod_sel) = key;
    let ns_ok = match ns_sel {
        None => policy_ns.as_deref() == Some(&*ident.key.namespace),
        Some(s) => s.matches(&ident.key.namespace_labels),
    };
    ns_ok
        && pod_sel
            .as_ref()
            .is_none_or(|s| s.matches(&ident.key.labels))
}

/// Patches the kept selections for the identities that came and went; returns the
/// selections that changed.
fn patch_selections(
    selections: &mut HashMap<Arc<SelectionKey>, Arc<Vec<usize>>>,
    table: &IdentityTable,
    changes: &IdentityChanges,
) -> HashSet<Arc<SelectionKey>> {
    let mut changed = HashSet::new();
    if !changes.identities_changed() {
        return changed;
    }
    for (key, sel) in selections.iter_mut() {
        let mut patched: Option<Vec<usize>> = None;
        for (slot, ident) in &changes.removed {
            if sel.contains(slot) || selection_matches(key, ident) {
                let v = patched.get_or_insert_with(|| sel.as_ref().clone());
                v.retain(|s| s != slot);
            }
        }
        for &slot in &changes.added {
            if selection_matches(key, table.ident(slot)) {
                let v = patched.get_or_insert_with(|| sel.as_ref().clone());
                if !v.contains(&slot) {
                    v.push(slot);
                }
            }
        }
        if let Some(v) = patched {
            *sel = Arc::new(v);
            changed.insert(key.clone());
        }
    }
    changed
}

// ---------------------------------------------------------------------------------------------
// Per-compile indexes
// ---------------------------------------------------------------------------------------------

/// An ipBlock of one rule, for one endpoint and direction.
struct Element<'p> {
    cidr: IpNetwork,
    except: Cow<'p, [IpNetwork]>,
    member: usize,
}

/// One rule as it appears in an endpoint's CIDR classes.
struct Member {
    contribution: Contribution,
    plan: Rc<PortPlan>,
}

/// Sorts and reduces excepts to the outermost ones (pairwise disjoint), which the flattening's
/// counting relies on; borrowed when already so.
fn outermost(except: &[IpNetwork]) -> Cow<'_, [IpNetwork]> {
    let key = |n: &IpNetwork| (n.is_ipv6(), ip_bits(n.network()), n.prefix());
    let canonical = except
        .windows(2)
        .all(|w| key(&w[0]) < key(&w[1]) && !contains(&w[0], &w[1]));
    if canonical {
        return Cow::Borrowed(except);
    }
    let mut v = except.to_vec();
    v.sort_by_key(key);
    let mut out: Vec<IpNetwork> = Vec::with_capacity(v.len());
    for n in v {
        if out.last().is_none_or(|l| !contains(l, &n)) {
            out.push(n);
        }
    }
    Cow::Owned(out)
}

fn ip_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn contains(outer: &IpNetwork, inner: &IpNetwork) -> bool {
    crate::model::cidr_contains(outer, inner)
}

fn all_v4() -> IpNetwork {
    "0.0.0.0/0".parse().expect("valid")
}

fn all_v6() -> IpNetwork {
    "::/0".parse().expect("valid")
}

/// Flags the allow entries of `endpoint` in `dir` as coming from audit policies.
fn mark_audit(policy: &mut PolicyMap, endpoint: u32, dir: Direction) {
    let range = PolicyEntry::first_of(endpoint)..PolicyEntry::first_of(endpoint.saturating_add(1));
    let marked: Vec<PolicyEntry> = policy
        .range(range)
        .map(|(e, _)| *e)
        .filter(|e| e.key.dir == dir.as_u8())
        .collect();
    for e in marked {
        if let Some(value) = policy.get_mut(&e) {
            value.flags |= POLICY_FLAG_AUDIT;
        }
    }
}

/// Adds a rule's contribution to the entry of a key.
fn put(
    policy: &mut PolicyMap,
    endpoint: u32,
    peer: u32,
    dir: Direction,
    pk: PortKey,
    contribution: Contribution,
) {
    let entry = PolicyEntry {
        key: PolicyKey {
            endpoint,
            peer,
            dir: dir.as_u8(),
            proto: pk.proto,
            port_be: pk.port.to_be(),
            ..PolicyKey::default()
        },
        prefix_len: pk.prefix_len,
    };
    merge(policy.entry(entry).or_default(), contribution);
}

/// Flattens port prefixes: the value of each key of `endpoint` also says what every shorter
/// key of the same peer says (a rule for any port, for one protocol, for a port block that
/// contains it). A lookup finds the longest key only, and "first matching rule" must hold for
/// it. NetworkPolicy alone needs none of this (any allow allows), so only endpoints with tier
/// rules are flattened.
fn flatten_ports(policy: &mut PolicyMap, endpoint: u32) {
    let range = PolicyEntry::first_of(endpoint)..PolicyEntry::first_of(endpoint.saturating_add(1));
    let own: Vec<(PolicyEntry, PolicyValue)> = policy.range(range).map(|(e, v)| (*e, *v)).collect();
    if own.len() < 2 {
        return;
    }
    let snapshot: HashMap<PolicyEntry, PolicyValue> = own.iter().copied().collect();
    for (entry, mut value) in own {
        let mut changed = false;
        for len in POLICY_KEY_ANY_PROTO_BITS..entry.prefix_len {
            if len > POLICY_KEY_ANY_PROTO_BITS && len < POLICY_KEY_ANY_PORT_BITS {
                continue;
            }
            if let Some(outer) = snapshot.get(&PolicyEntry::new(entry.key, len)) {
                let before = value;
                merge_value(&mut value, outer);
                changed |= value != before;
            }
        }
        if changed {
            policy.insert(entry, value);
        }
    }
}

impl Compiler {
    pub fn new() -> Self {
        Compiler::default()
    }

    pub fn sizes(&self) -> InternerSizes {
        InternerSizes {
            endpoints: self.endpoints.len(),
            identities: self.identities.len(),
            rules: self.rules.len(),
            classes: self.classes.len(),
        }
    }

    /// Keeps the endpoint id an earlier agent gave `pod` (read back from the pinned ENDPOINTS
    /// map), so that a restart renumbers no endpoint and its conntrack entries, keyed by
    /// endpoint id, stay its own. Call before the first compile; false if the pod or the id
    /// is taken already.
    pub fn adopt_endpoint_id(&mut self, pod: &PodRef, id: u32) -> bool {
        self.endpoints.adopt(pod, id)
    }

    /// Keeps the domain classes an earlier agent gave an endpoint (`DesiredState::domains`):
    /// the addresses it learned (FQDN_IPS) name them.
    pub fn adopt_domain_classes(&mut self, endpoint: u32, table: &DomainTable) {
        let all = [(false, &table.classes), (true, &table.audit_classes)];
        for (audit_view, classes) in all {
            for (patterns, class) in classes {
                let id = class & !(CIDR_CLASS_BIT | DOMAIN_CLASS_BIT);
                self.domain_classes
                    .adopt(&(endpoint, patterns.clone(), audit_view), id);
            }
        }
    }

    /// Compiles `store` for the `endpoints` of this node, whose own addresses are
    /// `host_addrs`: everything, from scratch (ids stay those of earlier compiles; ids this
    /// compile does not use are released).
    pub fn compile(
        &mut self,
        store: &Store,
        endpoints: &[LocalEndpoint],
        host_addrs: &[IpAddr],
    ) -> DesiredState {
        self.run(store, endpoints, host_addrs, true).clone()
    }

    /// The same result as `compile`, recompiling only what changed since the last call: the
    /// pods whose fields changed are regrouped into identities, and only the endpoints a
    /// change can reach are compiled again (see "Incremental compilation" in ARCHITECTURE.md).
    /// Ids are released only by a full compile: the first, one after the node's addresses
    /// change, and every `FULL_EVERY` updates. Returns the result and what was compiled.
    pub fn update(
        &mut self,
        store: &Store,
        endpoints: &[LocalEndpoint],
        host_addrs: &[IpAddr],
    ) -> Compiled<'_> {
        let full = self.memo.since_full >= FULL_EVERY
            || self
                .memo
                .table
                .as_ref()
                .is_none_or(|t| t.host != host_addrs);
        self.run(store, endpoints, host_addrs, full);
        Compiled {
            state: &self.memo.base,
            stamps: &self.memo.stamps,
            stats: self.memo.last,
        }
    }

    fn run(
        &mut self,
        store: &Store,
        endpoints: &[LocalEndpoint],
        host_addrs: &[IpAddr],
        full: bool,
    ) -> &DesiredState {
        if full {
            self.endpoints.begin();
            self.identities.begin();
            self.rules.begin();
            self.stats_slots.begin();
            self.classes.begin();
            self.domain_classes.begin();
            self.rule_refs.clear();
            let table = IdentityTable::new(host_addrs);
            let mut base = DesiredState::default();
            table.write_host(&mut base);
            self.memo = Memo {
                table: Some(table),
                base,
                ..Memo::default()
            };
        } else {
            self.memo.since_full += 1;
        }
        let mut table = self
            .memo
            .table
            .take()
            .expect("a table after the first compile");
        let mut out = std::mem::take(&mut self.memo.base);
        let mut selections = std::mem::take(&mut self.memo.selections);
        let mut pieces = std::mem::take(&mut self.memo.pieces);

        let idents = table.update(store, &mut self.identities, &mut out);
        let mut stamps = std::mem::take(&mut self.memo.stamps);
        if full || !idents.addresses.is_empty() {
            stamps.identities = Stamps::fresh();
        }
        let changed_selections = patch_selections(&mut selections, &table, &idents);

        // What else changed: NetworkPolicies by namespace; ClusterNetworkPolicies, nodes and
        // the node's audit mode reach every endpoint.
        // The policies changed since the last update, as the store's journal names them, or
        // else a digest of every one.
        let mut policy_namespaces: HashSet<String> = HashSet::new();
        let policies = match store.policies.changes_since(self.memo.policies_seen) {
            Some(keys) => {
                let mut policies = std::mem::take(&mut self.memo.policies);
                for k in keys {
                    let now = store.policies.get(k).map(digest);
                    if policies.get(k).copied() != now {
                        policy_namespaces.insert(k.0.clone());
                    }
                    match now {
                        Some(d) => policies.insert(k.clone(), d),
                        None => policies.remove(k),
                    };
                }
                policies
            }
            None => {
                let policies: BTreeMap<(String, String), u64> = store
                    .policies
                    .iter()
                    .map(|(k, p)| (k.clone(), digest(p)))
                    .collect();
                for (k, d) in &policies {
                    if self.memo.policies.get(k) != Some(d) {
                        policy_namespaces.insert(k.0.clone());
                    }
                }
                for k in self.memo.policies.keys() {
                    if !policies.contains_key(k) {
                        policy_namespaces.insert(k.0.clone());
                    }
                }
                policies
            }
        };
        let cluster = digest(&(&store.cluster_policies, self.audit_all));
        let nodes = digest(&*store.nodes);
        let everything = full || cluster != self.memo.cluster || nodes != self.memo.nodes;

        // Policies per namespace, with a stable index for the selection cache.
        let mut by_ns: BTreeMap<&str, Vec<(usize, &Policy)>> = BTreeMap::new();
        for (i, p) in store.policies.values().enumerate() {
            by_ns.entry(p.namespace.as_str()).or_default().push((i, p));
        }
        // ClusterNetworkPolicies in precedence order (tier, priority, name); a rule's rank is
        // its policy's position there, then its index. Those in audit mode are not enforced:
        // `cluster` leaves them out, `with_audited` (the audit view's order) has them.
        let audited = |p: &ClusterNetworkPolicy| p.audit || self.audit_all;
        let mut sorted: Vec<&ClusterNetworkPolicy> = store.cluster_policies.values().collect();
        sorted.sort_by(|a, b| a.precedence_key().cmp(&b.precedence_key()));
        let with_audited: Vec<(usize, &ClusterNetworkPolicy)> =
            sorted.iter().copied().enumerate().collect();
        let cluster_order: Vec<(usize, &ClusterNetworkPolicy)> = sorted
            .iter()
            .copied()
            .filter(|p| !audited(p))
            .enumerate()
            .collect();
        let tiers = Tiers {
            cluster: &cluster_order,
            with_audited: &with_audited,
        };

        // The endpoints, in interface order; a pod behind two interfaces is compiled once.
        let mut eps: Vec<&LocalEndpoint> = endpoints.iter().collect();
        eps.sort_by(|a, b| (a.ifindex, &a.pod).cmp(&(b.ifindex, &b.pod)));
        let mut seen_ifindex: HashSet<u32> = HashSet::new();
        let mut order: Vec<(u32, &PodRef)> = Vec::new();
        let mut first_ifindex: HashMap<&PodRef, u32> = HashMap::new();
        for ep in eps {
            if !seen_ifindex.insert(ep.ifindex) {
                continue;
            }
            let Some(pod) = store.pods.get(&ep.pod) else {
                continue;
            };
            if pod.host_network {
                continue;
            }
            first_ifindex.entry(&ep.pod).or_insert(ep.ifindex);
            order.push((ep.ifindex, &ep.pod));
        }

        let mut ctx = Ctx {
            index: &table,
            nodes: &store.nodes,
            selections: HashMap::new(),
            by_content: &mut selections,
            rule_ids: HashMap::new(),
            tier_rule_ids: HashMap::new(),
            reads: Reads::default(),
        };
        let mut stats = UpdateStats {
            full,
            ..UpdateStats::default()
        };
        // Pieces of pods that are no longer endpoints leave the maps.
        let gone: Vec<PodRef> = pieces
            .keys()
            .filter(|p| !first_ifindex.contains_key(p))
            .cloned()
            .collect();
        for pod in gone {
            let piece = pieces.remove(&pod).expect("listed");
            remove_entries(&mut out, piece.id);
            stamps.endpoints.remove(&piece.id);
        }
        let mut compiled_ids: HashSet<u32> = HashSet::new();
        for &(ifindex, pod_ref) in &order {
            if first_ifindex.get(pod_ref) != Some(&ifindex) {
                continue;
            }
            let pod = &store.pods[pod_ref];
            let clean = !everything
                && pieces.get(pod_ref).is_some_and(|piece| {
                    piece.ifindex == ifindex
                        && Some(piece.pod_digest) == table.pod_digest(pod_ref)
                        && !policy_namespaces.contains(pod_ref.namespace.as_str())
                        && !piece
                            .reads
                            .selections
                            .iter()
                            .any(|k| changed_selections.contains(k))
                        && (!piece.reads.all_identities || !idents.identities_changed())
                        && (!piece.reads.pod_addresses || idents.addresses.is_empty())
                });
            if clean {
                continue;
            }
            stats.endpoints_compiled += 1;
            let id = self.endpoints.intern(pod_ref);
            let mut scratch = DesiredState::default();
            ctx.reads = Reads::default();
            let (flags, meta) = self.compile_endpoint(
                &mut ctx,
                store,
                &by_ns,
                &tiers,
                (ifindex, pod_ref, pod),
                id,
                &mut scratch,
            );
            if let Some(old) = pieces.get(pod_ref) {
                remove_entries(&mut out, old.id);
            }
            compiled_ids.insert(id);
            stamps.endpoints.insert(id, Stamps::fresh());
            let rules: BTreeSet<u32> = scratch
                .policy
                .values()
                .flat_map(|v| [v.rule, v.admin.rule, v.baseline.rule])
                .filter(|r| *r != 0)
                .collect();
            stats.policy_entries_written += scratch.policy.len();
            // Inserted one by one (`append` would rebuild the whole tree).
            out.policy.extend(std::mem::take(&mut scratch.policy));
            out.cidrs.extend(std::mem::take(&mut scratch.cidrs));
            pieces.insert(
                pod_ref.clone(),
                Piece {
                    id,
                    ifindex,
                    pod_digest: table.pod_digest(pod_ref).unwrap_or_default(),
                    flags,
                    meta,
                    addrs: scratch.endpoint_addrs.into_iter().collect(),
                    node_ports: scratch.node_ports.into_iter().collect(),
                    domains: scratch.domains.remove(&id),
                    rules,
                    reads: std::mem::take(&mut ctx.reads),
                },
            );
        }
        drop(ctx);
        // Selections no endpoint reads any more are forgotten.
        if stats.endpoints_compiled > 0 || full {
            let used: HashSet<&SelectionKey> = pieces
                .values()
                .flat_map(|p| p.reads.selections.iter().map(|k| k.as_ref()))
                .collect();
            selections.retain(|k, _| used.contains(k.as_ref()));
        }

        // The small per-endpoint maps, rebuilt in interface order (the first claim wins).
        out.endpoints.clear();
        out.endpoint_meta.clear();
        out.endpoint_addrs.clear();
        out.node_ports.clear();
        out.domains.clear();
        for &(ifindex, pod_ref) in &order {
            let piece = &pieces[pod_ref];
            out.endpoints.insert(
                ifindex,
                EndpointInfo {
                    id: piece.id,
                    flags: piece.flags,
                    ..EndpointInfo::default()
                },
            );
            if first_ifindex.get(pod_ref) != Some(&ifindex) {
                continue;
            }
            out.endpoint_meta.insert(piece.id, piece.meta.clone());
            for (addr, id) in &piece.addrs {
                out.endpoint_addrs.entry(*addr).or_insert(*id);
            }
            for (k, v) in &piece.node_ports {
                out.node_ports.entry(*k).or_insert(*v);
            }
            if let Some(d) = &piece.domains {
                out.domains.insert(piece.id, d.clone());
            }
        }

        // Rules in use, with their stats slots in rule order (older rules first when they run
        // out); a rule keeps its slot for as long as it is in use.
        let rules: BTreeSet<u32> = pieces
            .values()
            .flat_map(|p| p.rules.iter().copied())
            .collect();
        out.rules = rules
            .iter()
            .filter_map(|r| self.rule_refs.get(r).map(|rr| (*r, rr.clone())))
            .collect();
        out.rule_slots.clear();
        for &rule in out.rules.keys() {
            if let Some(slot) = self.stats_slots.try_intern(&rule) {
                out.rule_slots.insert(rule, slot as u16);
            }
        }
        let slot = |rule: u32| out.rule_slots.get(&rule).copied().unwrap_or(0);
        for id in &compiled_ids {
            let range = PolicyEntry::first_of(*id)..PolicyEntry::first_of(id + 1);
            let mut fill: Vec<(PolicyEntry, [u16; 3])> = Vec::new();
            for (e, v) in out.policy.range(range) {
                fill.push((
                    *e,
                    [slot(v.rule), slot(v.admin.rule), slot(v.baseline.rule)],
                ));
            }
            for (e, [s, a, b]) in fill {
                let v = out.policy.get_mut(&e).expect("listed");
                v.slot = s;
                v.admin.slot = a;
                v.baseline.slot = b;
            }
        }
        if full {
            self.endpoints.finish();
            self.identities.finish();
            self.rules.finish();
            self.stats_slots.finish();
            self.classes.finish();
            self.domain_classes.finish();
        }
        // Egress gateways: from the store and the compiled identities, whole (there are few).
        out.egress = crate::egress::compile(store, &out);
        stats.identities_changed = idents.added.len() + idents.removed.len();
        stats.addresses_changed = idents.addresses.len();
        self.memo.table = Some(table);
        self.memo.selections = selections;
        self.memo.pieces = pieces;
        self.memo.policies = policies;
        self.memo.policies_seen = store.policies.mark();
        self.memo.cluster = cluster;
        self.memo.nodes = nodes;
        self.memo.last = stats;
        self.memo.base = out;
        self.memo.stamps = stamps;
        &self.memo.base
    }

    /// One endpoint's entries (into `out`), its flags and its meta.
    #[allow(clippy::too_many_arguments)]
    fn compile_endpoint(
        &mut self,
        ctx: &mut Ctx<'_>,
        store: &Store,
        by_ns: &BTreeMap<&str, Vec<(usize, &Policy)>>,
        tiers: &Tiers<'_, '_>,
        (ifindex, pod_ref, pod): (u32, &PodRef, &PodInfo),
        id: u32,
        out: &mut DesiredState,
    ) -> (u32, EndpointMeta) {
        let any_audited = tiers.cluster.len() < tiers.with_audited.len();
        let mut flags = 0;
        let mut names = [Vec::new(), Vec::new()];
        let mut audit_ignored = [Vec::new(), Vec::new()];
        let ns_labels = store.namespace_labels(&pod_ref.namespace);
        let mut cluster_names = [Vec::new(), Vec::new()];
        for (d, dir) in Direction::BOTH.into_iter().enumerate() {
            let selecting: Vec<(usize, &Policy)> = by_ns
                .get(pod_ref.namespace.as_str())
                .into_iter()
                .flatten()
                .filter(|(_, p)| p.rules(dir).is_some() && p.pod_selector.matches(&pod.labels))
                .copied()
                .collect();
            let tier_rules = self.tier_rules(ctx, tiers.cluster, dir, &ns_labels, &pod.labels);
            // The audit view: the tier rules as if the audited policies were enforced.
            let audit_view = if any_audited {
                let all = self.tier_rules(ctx, tiers.with_audited, dir, &ns_labels, &pod.labels);
                let differs = all
                    .iter()
                    .map(|t| t.matched.rule)
                    .ne(tier_rules.iter().map(|t| t.matched.rule));
                differs.then_some(all)
            } else {
                None
            };
            if selecting.is_empty() && tier_rules.is_empty() && audit_view.is_none() {
                continue;
            }
            if !tier_rules.is_empty() {
                flags |= tiered_flag(dir.as_u8());
                cluster_names[d] = tiers
                    .cluster
                    .iter()
                    .filter(|(_, p)| {
                        !p.rules(dir).is_empty() && selects(&p.subject, &ns_labels, &pod.labels)
                    })
                    .map(|(_, p)| p.name.clone())
                    .collect();
            }
            // Audit (ARCHITECTURE.md, "Audit mode"): enforcing policies alone decide where
            // there are any; audit policies decide, as "would drop", only where they alone
            // select the pod.
            let audit_all = self.audit_all;
            let (audit, enforcing): (Vec<_>, Vec<_>) = selecting
                .into_iter()
                .partition(|(_, p)| audit_all || p.audit);
            let audited = enforcing.is_empty() && !audit.is_empty();
            if !audited {
                audit_ignored[d] = audit.iter().map(|(_, p)| p.id()).collect();
            }
            let selecting = if audited { audit } else { enforcing };
            if !selecting.is_empty() {
                flags |= isolated_flag(dir.as_u8());
            }
            if audited {
                flags |= audit_flag(dir.as_u8());
            }
            names[d] = selecting.iter().map(|(_, p)| p.id()).collect();
            self.compile_direction(
                ctx,
                id,
                dir,
                &pod.container_ports,
                &selecting,
                &tier_rules,
                false,
                out,
            );
            if audited {
                mark_audit(&mut out.policy, id, dir);
            }
            if let Some(all) = audit_view {
                flags |= tier_audit_flag(dir.as_u8());
                let mut view = DesiredState::default();
                self.compile_direction(
                    ctx,
                    id,
                    dir,
                    &pod.container_ports,
                    &selecting,
                    &all,
                    true,
                    &mut view,
                );
                if audited {
                    mark_audit(&mut view.policy, id, dir);
                }
                flatten_ports(&mut view.policy, id);
                for (mut e, v) in view.policy {
                    e.key.dir |= DIR_AUDIT_VIEW;
                    out.policy.insert(e, v);
                }
                for (mut e, class) in view.cidrs {
                    e.key.dir |= DIR_AUDIT_VIEW;
                    out.cidrs.insert(e, class);
                }
                for (ep, t) in view.domains {
                    out.domains.entry(ep).or_default().audit_classes = t.audit_classes;
                }
            }
        }
        if flags & EP_TIERED != 0 {
            flatten_ports(&mut out.policy, id);
        }
        if out.domains.contains_key(&id) {
            flags |= EP_FQDN;
        }
        let host_addrs = &ctx.index.host;
        // The pod's own addresses, for source address verification (never the node's: a pod
        // claiming one must not send as the node).
        for ip in &pod.ips {
            if !host_addrs.contains(ip) {
                out.endpoint_addrs
                    .entry(PeerAddr::from_ip(*ip))
                    .or_insert(id);
            }
        }
        // Its hostPorts: other pods' egress to the node on them is egress to this pod.
        for hp in &pod.host_ports {
            for ip in pod.ips.iter().filter(|ip| !host_addrs.contains(ip)) {
                let addr = PeerAddr::from_ip(*ip);
                out.node_ports
                    .entry(palisade_common::NodePortKey {
                        family: addr.family,
                        proto: hp.protocol.number(),
                        port_be: hp.host_port.to_be(),
                    })
                    .or_insert(palisade_common::NodePortTarget {
                        addr: addr.addr,
                        port: hp.container_port,
                        _pad: 0,
                    });
            }
        }
        let [ingress_policies, egress_policies] = names;
        let [ingress_audit_ignored, egress_audit_ignored] = audit_ignored;
        let [ingress_cluster_policies, egress_cluster_policies] = cluster_names;
        let meta = EndpointMeta {
            pod: pod_ref.clone(),
            ifindex,
            ingress_policies,
            egress_policies,
            ingress_audit_ignored,
            egress_audit_ignored,
            ingress_cluster_policies,
            egress_cluster_policies,
        };
        (flags, meta)
    }

    fn rule_id(
        &mut self,
        ctx: &mut Ctx<'_>,
        policy: (usize, &Policy),
        dir: Direction,
        ix: usize,
    ) -> u32 {
        if let Some(id) = ctx.rule_ids.get(&(policy.0, dir, ix)) {
            return *id;
        }
        let r = RuleRef {
            namespace: policy.1.namespace.clone(),
            policy: policy.1.name.clone(),
            direction: dir,
            index: ix,
            tier: None,
        };
        let id = self.rules.intern(&r);
        ctx.rule_ids.insert((policy.0, dir, ix), id);
        self.rule_refs.insert(id, r);
        id
    }

    /// The tier rules of the ClusterNetworkPolicies (`cluster`, in precedence order) that
    /// select a pod, in one direction, with their ids and ranks.
    fn tier_rules<'p>(
        &mut self,
        ctx: &mut Ctx<'_>,
        cluster: &[(usize, &'p ClusterNetworkPolicy)],
        dir: Direction,
        ns_labels: &BTreeMap<String, String>,
        labels: &BTreeMap<String, String>,
    ) -> Vec<CompiledTierRule<'p>> {
        let mut out = Vec::new();
        for &(pos, policy) in cluster {
            let rules = policy.rules(dir);
            if rules.is_empty() || !selects(&policy.subject, ns_labels, labels) {
                continue;
            }
            for rule in rules {
                let key = (policy.name.clone(), dir, rule.index);
                let id = match ctx.tier_rule_ids.get(&key) {
                    Some(id) => *id,
                    None => {
                        let r = RuleRef {
                            namespace: String::new(),
                            policy: policy.name.clone(),
                            direction: dir,
                            index: rule.index,
                            tier: Some(TierRuleInfo {
                                tier: policy.tier,
                                priority: policy.priority,
                                name: rule.name.clone(),
                                action: rule.action,
                                fails_closed: rule.fails_closed(),
                            }),
                        };
                        let id = self.rules.intern(&r);
                        ctx.tier_rule_ids.insert(key, id);
                        self.rule_refs.insert(id, r);
                        id
                    }
                };
                // A rule that fails closed: an Accept matches nothing, a Deny or a Pass denies
                // everything.
                let action = match (rule.fails_closed(), rule.action) {
                    (true, Action::Accept) => continue,
                    (true, _) | (false, Action::Deny) => TIER_ACTION_DENY,
                    (false, Action::Accept) => TIER_ACTION_ACCEPT,
                    (false, Action::Pass) => TIER_ACTION_PASS,
                };
                out.push(CompiledTierRule {
                    tier: policy.tier,
                    matched: TierMatch {
                        rank: (pos as u32).saturating_mul(RULES_PER_RANK) + rule.index as u32,
                        rule: id,
                        slot: 0,
                        action,
                        _pad: 0,
                    },
                    rule,
                });
            }
        }
        out
    }

    /// The entries of one endpoint in one direction: NetworkPolicy allows and tier rules.
    #[allow(clippy::too_many_arguments)]
    fn compile_direction<'p>(
        &mut self,
        ctx: &mut Ctx<'_>,
        ep: u32,
        dir: Direction,
        ep_ports: &[NamedPort],
        selecting: &[(usize, &'p Policy)],
        tier_rules: &[CompiledTierRule<'_>],
        audit_view: bool,
        out: &mut DesiredState,
    ) {
        let index = ctx.index;
        let mut elements: Vec<Element<'p>> = Vec::new();
        let mut members: Vec<Member> = Vec::new();
        // (pattern, member) of every `domainNames` peer.
        let mut domains: Vec<(&str, usize)> = Vec::new();
        for t in tier_rules {
            let contribution = Contribution::Tier(t.tier, t.matched);
            if t.rule.fails_closed() {
                // Denies everything: every address, pods' included.
                members.push(Member {
                    contribution,
                    plan: Rc::new(PortPlan {
                        fixed: vec![PortKey::ANY],
                        named: Vec::new(),
                    }),
                });
                for cidr in [all_v4(), all_v6()] {
                    elements.push(Element {
                        cidr,
                        except: Cow::Borrowed(&[]),
                        member: members.len() - 1,
                    });
                }
                continue;
            }
            let plan = PortPlan::for_tier(t.rule.ports.as_deref(), dir, ep_ports);
            // Addresses (networks, nodes) have no named ports.
            members.push(Member {
                contribution,
                plan: Rc::new(plan.without_names()),
            });
            let member = members.len() - 1;
            for peer in &t.rule.peers {
                let (ns_sel, pod_sel) = match peer {
                    TierPeer::Namespaces(ns) => (ns, None),
                    TierPeer::Pods {
                        namespace_selector,
                        pod_selector,
                    } => (namespace_selector, Some(pod_selector)),
                    TierPeer::Networks(cidrs) => {
                        for cidr in cidrs {
                            elements.push(Element {
                                cidr: *cidr,
                                except: Cow::Borrowed(&[]),
                                member,
                            });
                        }
                        continue;
                    }
                    TierPeer::Nodes(sel) => {
                        for node in ctx.nodes.values().filter(|n| sel.matches(&n.labels)) {
                            for ip in &node.addresses {
                                let bits = if ip.is_ipv4() { 32 } else { 128 };
                                elements.push(Element {
                                    cidr: IpNetwork::new(*ip, bits).expect("host prefix"),
                                    except: Cow::Borrowed(&[]),
                                    member,
                                });
                            }
                        }
                        continue;
                    }
                    // Learned from DNS answers (`domain_classes`).
                    TierPeer::DomainNames(names) => {
                        domains.extend(names.iter().map(|n| (n.as_str(), member)));
                        continue;
                    }
                    TierPeer::Unsupported(_) => continue,
                };
                let (_, sel) = ctx.select((None, Some(ns_sel.clone()), pod_sel.cloned()));
                for &ix in sel.iter() {
                    let ident = index.ident(ix);
                    for pk in plan
                        .fixed
                        .iter()
                        .copied()
                        .chain(plan.resolve(&ident.key.ports))
                    {
                        put(&mut out.policy, ep, ident.id, dir, pk, contribution);
                    }
                }
            }
        }
        for &(pi, policy) in selecting {
            let rules = policy.rules(dir).unwrap_or_default();
            for (ri, rule) in rules.iter().enumerate() {
                let rule_id = self.rule_id(ctx, (pi, policy), dir, ri);
                let plan = Rc::new(PortPlan::new(rule.ports.as_deref(), dir, ep_ports));
                let allow = Contribution::Allow(rule_id);
                let emit = |out: &mut DesiredState, ident: &Ident| {
                    for pk in plan
                        .fixed
                        .iter()
                        .copied()
                        .chain(plan.resolve(&ident.key.ports))
                    {
                        put(&mut out.policy, ep, ident.id, dir, pk, allow);
                    }
                };
                match &rule.peers {
                    None => {
                        // Named ports are per-identity entries below, not CIDR classes.
                        let member = members.len();
                        members.push(Member {
                            contribution: allow,
                            plan: Rc::new(plan.without_names()),
                        });
                        for cidr in [all_v4(), all_v6()] {
                            elements.push(Element {
                                cidr,
                                except: Cow::Borrowed(&[]),
                                member,
                            });
                        }
                        // Names resolve per pod: per-identity entries (every pod address is
                        // inside the two blocks above).
                        if !plan.named.is_empty() {
                            ctx.reads.all_identities = true;
                            for (_, ident) in index.live() {
                                for pk in plan.resolve(&ident.key.ports) {
                                    put(&mut out.policy, ep, ident.id, dir, pk, allow);
                                }
                            }
                        }
                    }
                    Some(peers) => {
                        let member = members.len();
                        members.push(Member {
                            contribution: allow,
                            plan: plan.clone(),
                        });
                        for (qi, peer) in peers.iter().enumerate() {
                            match peer {
                                Peer::Pods {
                                    namespace_selector,
                                    pod_selector,
                                } => {
                                    let sel = match ctx.selections.get(&(pi, dir, ri, qi)) {
                                        Some((key, sel)) => {
                                            let (key, sel) = (key.clone(), sel.clone());
                                            ctx.reads.selections.push(key);
                                            sel
                                        }
                                        None => {
                                            // Policies of many namespaces often carry the same
                                            // peer (monitoring, DNS, a team's namespaces):
                                            // evaluate each distinct peer once.
                                            let found = ctx.select((
                                                namespace_selector
                                                    .is_none()
                                                    .then(|| policy.namespace.clone()),
                                                namespace_selector.clone(),
                                                pod_selector.clone(),
                                            ));
                                            let sel = found.1.clone();
                                            ctx.selections.insert((pi, dir, ri, qi), found);
                                            sel
                                        }
                                    };
                                    for &ix in sel.iter() {
                                        emit(out, index.ident(ix));
                                    }
                                }
                                Peer::IpBlock { cidr, except } => elements.push(Element {
                                    cidr: *cidr,
                                    except: outermost(except),
                                    member,
                                }),
                            }
                        }
                    }
                }
            }
        }
        if !domains.is_empty() {
            self.domain_classes(ep, dir, &domains, &members, audit_view, out);
        }
        if elements.is_empty() {
            return;
        }
        let mut emitted: HashSet<u32> = HashSet::new();
        for v6 in [false, true] {
            let fam: Vec<&Element<'_>> =
                elements.iter().filter(|e| e.cidr.is_ipv6() == v6).collect();
            if !fam.is_empty() {
                let mut reads = false;
                self.flatten(
                    index,
                    ep,
                    dir,
                    v6,
                    &fam,
                    &members,
                    &mut emitted,
                    &mut reads,
                    out,
                );
                ctx.reads.pod_addresses |= reads;
            }
        }
    }

    /// The domain classes of an endpoint's `domainNames` patterns (`DomainTable`): one per set
    /// of patterns a name can match at once. A name matches at most one exact pattern (itself)
    /// and the wildcards `*.d` for which it ends in `.d`, which are all those the longest of
    /// them matches; so the sets are those of each exact pattern and of `x.d` for each
    /// wildcard `*.d` (`x` a label no pattern names).
    fn domain_classes(
        &mut self,
        ep: u32,
        dir: Direction,
        domains: &[(&str, usize)],
        members: &[Member],
        audit_view: bool,
        out: &mut DesiredState,
    ) {
        let mut patterns: Vec<&str> = domains.iter().map(|(p, _)| *p).collect();
        patterns.sort_unstable();
        patterns.dedup();
        let probes = patterns.iter().map(|p| match p.strip_prefix("*.") {
            Some(suffix) => format!("\u{1}.{suffix}"),
            None => (*p).to_string(),
        });
        let mut sets: Vec<Vec<String>> = probes
            .map(|name| {
                patterns
                    .iter()
                    .filter(|p| domain_matches(p, &name))
                    .map(|p| (*p).to_string())
                    .collect::<Vec<_>>()
            })
            .filter(|s| !s.is_empty())
            .collect();
        sets.sort();
        sets.dedup();
        let mut table = Vec::new();
        for set in sets {
            let Some(n) = self
                .domain_classes
                .try_intern(&(ep, set.clone(), audit_view))
            else {
                continue;
            };
            let class = CIDR_CLASS_BIT | DOMAIN_CLASS_BIT | n;
            for &(p, m) in domains {
                if set.iter().any(|s| s == p) {
                    for &pk in &members[m].plan.fixed {
                        put(&mut out.policy, ep, class, dir, pk, members[m].contribution);
                    }
                }
            }
            table.push((set, class));
        }
        let t = out.domains.entry(ep).or_default();
        if audit_view {
            t.audit_classes = table;
        } else {
            t.classes = table;
        }
    }

    /// Flattens one family's ipBlocks into CIDRS prefixes and their classes.
    #[allow(clippy::too_many_arguments)]
    fn flatten(
        &mut self,
        index: &IdentityTable,
        ep: u32,
        dir: Direction,
        v6: bool,
        elements: &[&Element<'_>],
        members: &[Member],
        emitted: &mut HashSet<u32>,
        reads_pod_addresses: &mut bool,
        out: &mut DesiredState,
    ) {
        let bits: u8 = if v6 { 128 } else { 32 };
        // A prefix as (address bits, length), host bits zero.
        type Node = (u128, u8);
        let node = |n: &IpNetwork| -> Node { (ip_bits(n.network()), n.prefix()) };
        let mask = |len: u8| -> u128 {
            if len == 0 {
                0
            } else {
                (u128::MAX << (128 - u32::from(len))) >> (128 - u32::from(bits))
            }
        };
        let within =
            |outer: Node, inner: Node| outer.1 <= inner.1 && inner.0 & mask(outer.1) == outer.0;

        let mut starts: HashMap<Node, Vec<usize>> = HashMap::new();
        let mut ends: HashMap<Node, Vec<usize>> = HashMap::new();
        let mut nodes: Vec<Node> = Vec::new();
        for e in elements {
            let c = node(&e.cidr);
            nodes.push(c);
            starts.entry(c).or_default().push(e.member);
            for x in e.except.iter() {
                let x = node(x);
                nodes.push(x);
                ends.entry(x).or_default().push(e.member);
            }
            // Egress named ports: the addresses of pods that have one of the names.
            let plan = &members[e.member].plan;
            if !plan.named.is_empty() {
                let (lo, hi) = (e.cidr.network(), e.cidr.broadcast());
                *reads_pod_addresses = true;
                for (ip, ix) in index.ip_owner.range(lo..=hi) {
                    if plan.resolve(&index.ident(*ix).key.ports).next().is_some() {
                        nodes.push((ip_bits(*ip), bits));
                    }
                }
            }
        }
        nodes.sort_unstable();
        nodes.dedup();

        struct Frame {
            node: Node,
            /// (member, number of its blocks that contain the node), sorted by member.
            allow: Vec<(usize, u32)>,
            /// The class LPM finds for the node (its own or, when equal, an ancestor's).
            class: u32,
        }
        let mut stack: Vec<Frame> = Vec::new();
        let mut content: BTreeMap<PortKey, PolicyValue> = BTreeMap::new();
        for n in nodes {
            while stack.last().is_some_and(|f| !within(f.node, n)) {
                stack.pop();
            }
            let (mut allow, parent_class) = match stack.last() {
                Some(f) => (f.allow.clone(), f.class),
                None => (Vec::new(), CIDR_CLASS_NONE),
            };
            for m in starts.get(&n).into_iter().flatten() {
                match allow.binary_search_by_key(m, |a| a.0) {
                    Ok(i) => allow[i].1 += 1,
                    Err(i) => allow.insert(i, (*m, 1)),
                }
            }
            for m in ends.get(&n).into_iter().flatten() {
                if let Ok(i) = allow.binary_search_by_key(m, |a| a.0) {
                    allow[i].1 -= 1;
                    if allow[i].1 == 0 {
                        allow.remove(i);
                    }
                }
            }
            // The class: every allowed member's ports; named ones only on a pod address.
            content.clear();
            let owner = if n.1 == bits {
                let ip = if v6 {
                    IpAddr::V6(n.0.into())
                } else {
                    IpAddr::V4((n.0 as u32).into())
                };
                index.ip_owner.get(&ip).map(|ix| index.ident(*ix))
            } else {
                None
            };
            for (m, _) in &allow {
                let Member { contribution, plan } = &members[*m];
                let named = owner.into_iter().flat_map(|o| plan.resolve(&o.key.ports));
                for pk in plan.fixed.iter().copied().chain(named) {
                    merge(content.entry(pk).or_default(), *contribution);
                }
            }
            let class = if content.is_empty() {
                CIDR_CLASS_NONE
            } else {
                let key: ClassKey = content.iter().map(|(k, v)| (*k, *v)).collect();
                CIDR_CLASS_BIT | self.classes.intern(&key)
            };
            if class != parent_class {
                let mut addr = [0u8; 16];
                if v6 {
                    addr = n.0.to_be_bytes();
                } else {
                    addr[..4].copy_from_slice(&(n.0 as u32).to_be_bytes());
                }
                let key = CidrKey {
                    endpoint: ep,
                    dir: dir.as_u8(),
                    family: if v6 {
                        palisade_common::AF_INET6
                    } else {
                        palisade_common::AF_INET
                    },
                    addr,
                    ..CidrKey::default()
                };
                out.cidrs.insert(
                    CidrEntry {
                        key,
                        prefix_len: u32::from(n.1),
                    },
                    class,
                );
                if class != CIDR_CLASS_NONE && emitted.insert(class) {
                    for (pk, value) in &content {
                        let entry = PolicyEntry {
                            key: PolicyKey {
                                endpoint: ep,
                                peer: class,
                                dir: dir.as_u8(),
                                proto: pk.proto,
                                port_be: pk.port.to_be(),
                                ..PolicyKey::default()
                            },
                            prefix_len: pk.prefix_len,
                        };
                        out.policy.insert(entry, *value);
                    }
                }
            }
            stack.push(Frame {
                node: n,
                allow,
                class,
            });
        }
    }
}

/// Rules per direction of one ClusterNetworkPolicy, at most (`cnp::MAX_RULES`): a rule's rank
/// is its policy's position times this, plus its index.
const RULES_PER_RANK: u32 = 32;
const _: () = assert!(crate::model::cluster::MAX_RULES as u32 <= RULES_PER_RANK);

/// A ClusterNetworkPolicy rule that applies to an endpoint in one direction.
struct CompiledTierRule<'p> {
    tier: Tier,
    /// Rank, rule id and action (the slot is filled in at the end of the compile).
    matched: TierMatch,
    rule: &'p TierRule,
}

/// Does a ClusterNetworkPolicy's subject select a pod (never a host-networked one, which the
/// caller leaves out)?
fn selects(
    subject: &Subject,
    ns_labels: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    match subject {
        Subject::Namespaces(ns) => ns.matches(ns_labels),
        Subject::Pods {
            namespace_selector,
            pod_selector,
        } => namespace_selector.matches(ns_labels) && pod_selector.matches(labels),
    }
}

/// Per-compile caches.
struct Ctx<'i> {
    index: &'i IdentityTable,
    nodes: &'i BTreeMap<String, NodeInfo>,
    /// (policy, direction, rule, peer) -> its selection.
    selections: HashMap<(usize, Direction, usize, usize), Selection>,
    /// Selections by the peer's content: (the policy's namespace when the peer has no
    /// namespace selector, namespace selector, pod selector) -> selected identity slots. Kept
    /// between compiles.
    by_content: &'i mut HashMap<Arc<SelectionKey>, Arc<Vec<usize>>>,
    /// (policy, direction, rule) -> rule id.
    rule_ids: HashMap<(usize, Direction, usize), u32>,
    /// (ClusterNetworkPolicy, direction, rule) -> rule id.
    tier_rule_ids: HashMap<(String, Direction, usize), u32>,
    /// What the endpoint being compiled reads.
    reads: Reads,
}

impl Ctx<'_> {
    /// The identities a pod peer selects, evaluated once per distinct peer.
    fn select(&mut self, key: SelectionKey) -> Selection {
        let found = match self.by_content.get_key_value(&key) {
            Some((k, sel)) => (k.clone(), sel.clone()),
            None => {
                let (policy_ns, ns_sel, pod_sel) = &key;
                let sel = Arc::new(select(
                    self.index,
                    policy_ns.as_deref().unwrap_or(""),
                    ns_sel.as_ref(),
                    pod_sel.as_ref(),
                ));
                let key = Arc::new(key);
                self.by_content.insert(key.clone(), sel.clone());
                (key, sel)
            }
        };
        self.reads.selections.push(found.0.clone());
        found
    }
}

/// A selection's key and the identity slots it selects.
type Selection = (Arc<SelectionKey>, Arc<Vec<usize>>);

type SelectionKey = (
    Option<String>,
    Option<crate::selector::Selector>,
    Option<crate::selector::Selector>,
);

/// The identity slots a pod peer selects.
fn select(
    index: &IdentityTable,
    policy_ns: &str,
    namespace_selector: Option<&crate::selector::Selector>,
    pod_selector: Option<&crate::selector::Selector>,
) -> Vec<usize> {
    let pods_ok =
        |slot: &&usize| pod_selector.is_none_or(|s| s.matches(&index.ident(**slot).key.labels));
    match namespace_selector {
        None => index
            .by_ns
            .get(policy_ns)
            .map(|g| g.slots.iter().filter(pods_ok).copied().collect())
            .unwrap_or_default(),
        Some(ns_sel) => index
            .by_ns
            .values()
            .filter(|g| ns_sel.matches(&g.labels))
            .flat_map(|g| g.slots.iter().filter(pods_ok).copied())
            .collect(),
    }
}

mod identities;

#[cfg(test)]
pub(crate) mod scenarios;
#[cfg(test)]
mod updates;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_are_minimal_aligned_blocks() {
        assert_eq!(port_range_blocks(80, 80), vec![(80, 0)]);
        assert_eq!(port_range_blocks(0, 65535), vec![(0, 16)]);
        assert_eq!(port_range_blocks(1, 65535).len(), 16);
        assert_eq!(
            port_range_blocks(9000, 9100),
            vec![
                (9000, 3),
                (9008, 4),
                (9024, 6),
                (9088, 3),
                (9096, 2),
                (9100, 0)
            ]
        );
        assert_eq!(port_range_blocks(65535, 65535), vec![(65535, 0)]);
        // Exhaustive on a small window: blocks are aligned, disjoint and cover exactly.
        for lo in 0..70u16 {
            for hi in lo..70 {
                let blocks = port_range_blocks(lo, hi);
                let mut covered = Vec::new();
                for (s, k) in &blocks {
                    assert_eq!(u32::from(*s) % (1 << k), 0);
                    covered.extend(u32::from(*s)..u32::from(*s) + (1 << k));
                }
                assert_eq!(covered, (u32::from(lo)..=u32::from(hi)).collect::<Vec<_>>());
                assert!(blocks.len() <= 2 * 16);
            }
        }
    }

    #[test]
    fn interner_is_stable_and_reuses_only_when_exhausted() {
        let mut i: Interner<&str> = Interner::new(10, 12);
        i.begin();
        assert_eq!(
            (i.intern(&"a"), i.intern(&"b"), i.intern(&"a")),
            (10, 11, 10)
        );
        i.finish();
        i.begin();
        assert_eq!(i.intern(&"b"), 11);
        i.finish(); // "a" released
        i.begin();
        assert_eq!(i.intern(&"c"), 12, "fresh ids first");
        assert_eq!(i.intern(&"d"), 10, "then released ones");
        assert_eq!(i.intern(&"b"), 11);
        i.finish();
        assert_eq!(i.len(), 3);
        // Stats slots: a full range answers None instead of failing.
        i.begin();
        for k in ["b", "c", "d"] {
            assert!(i.try_intern(&k).is_some());
        }
        assert_eq!(i.try_intern(&"e"), None, "every slot is live");
        assert_eq!(i.try_intern(&"c"), Some(12), "a live key keeps its slot");
        i.finish();
    }

    #[test]
    fn outermost_excepts() {
        let n = |s: &str| s.parse::<IpNetwork>().unwrap();
        let v = vec![
            n("10.1.2.0/24"),
            n("10.1.0.0/16"),
            n("10.2.0.0/16"),
            n("10.1.0.0/16"),
        ];
        assert_eq!(
            outermost(&v).as_ref(),
            &[n("10.1.0.0/16"), n("10.2.0.0/16")]
        );
        let ok = vec![n("10.1.0.0/16"), n("10.2.0.0/16")];
        assert!(matches!(outermost(&ok), Cow::Borrowed(_)));
    }
}
