//! The plain reading of ClusterNetworkPolicy precedence (cnp-spec §6), one direction of one
//! connection at a time: the oracle a compiler is checked against. Policies are sorted and
//! iterated, rules matched literally; nothing is indexed or precomputed.
//!
//! For the pod the direction belongs to (the source for egress, the destination for ingress):
//!
//! 1. Admin tier: the Admin policies whose subject selects the pod, in `precedence_key` order,
//!    and in each the rules of the direction in list order. The first rule that matches decides:
//!    `Accept` allows, `Deny` denies, `Pass` leaves the tier (the rest of it is skipped).
//! 2. NetworkPolicy: if NetworkPolicy isolates the pod in this direction, its verdict is final.
//! 3. Baseline tier: as the Admin tier; `Pass` goes on to the default.
//! 4. Default: allow.
//!
//! A connection is allowed when the egress verdict of its source and the ingress verdict of its
//! destination both allow it. Further:
//!
//! * A rule matches when one of its peers matches and, if it has `protocols`, one of its ports
//!   does. A rule with a peer this version does not know fails closed: an `Accept` rule matches
//!   nothing, a `Deny` or `Pass` rule denies everything.
//! * Host-networked pods are never subjects, nor matched by `namespaces` or `pods` peers; they are
//!   reached by address (`networks`, and `nodes` since their address is their node's).
//! * `networks` match every address, pods' included. Named ports are resolved on the destination
//!   pod: the subject for ingress, the peer for egress.
//! * The caller leaves out what ClusterNetworkPolicy does not judge: a pod's traffic to its own
//!   address (hairpin).
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use super::model::{
    Action, ClusterNetworkPolicy, Subject, Tier, TierPeer, TierPort, TierRule, domain_matches,
};
use crate::model::{NamedPort, PodInfo, Store};
use crate::reference::{Endpoint, egress_allowed, ingress_allowed, isolating};
use crate::state::Direction;

pub type Labels = BTreeMap<String, String>;

/// What NetworkPolicy decides for the pod in one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NpVerdict {
    /// No NetworkPolicy isolates the pod in this direction: evaluation goes on to Baseline.
    NotIsolated,
    Allowed,
    Denied,
}

impl NpVerdict {
    /// NetworkPolicy's verdict in `dir` for a connection from `src` to `dst`, as
    /// `crate::reference` reads the NetworkPolicy specification.
    pub fn from_reference(
        store: &Store,
        dir: Direction,
        src: &Endpoint,
        dst: &Endpoint,
        proto: u8,
        port: u16,
    ) -> NpVerdict {
        let subject = match dir {
            Direction::Egress => src,
            Direction::Ingress => dst,
        };
        let Endpoint::Pod { pod, .. } = subject else {
            return NpVerdict::NotIsolated;
        };
        let Some(info) = store.pods.get(pod).filter(|i| !i.host_network) else {
            return NpVerdict::NotIsolated;
        };
        if isolating(store, pod, info, dir).is_empty() {
            return NpVerdict::NotIsolated;
        }
        let allowed = match dir {
            Direction::Egress => egress_allowed(store, src, dst, proto, port),
            Direction::Ingress => ingress_allowed(store, src, dst, proto, port),
        };
        if allowed {
            NpVerdict::Allowed
        } else {
            NpVerdict::Denied
        }
    }
}

/// A pod as ClusterNetworkPolicy sees it.
#[derive(Clone, Copy, Debug)]
pub struct PodFacts<'a> {
    pub namespace_labels: &'a Labels,
    pub labels: &'a Labels,
    pub host_network: bool,
    /// Its named container ports (for `destinationNamedPort` when it is the destination).
    pub named_ports: &'a [NamedPort],
}

impl<'a> PodFacts<'a> {
    pub fn new(namespace_labels: &'a Labels, pod: &'a PodInfo) -> PodFacts<'a> {
        PodFacts {
            namespace_labels,
            labels: &pod.labels,
            host_network: pod.host_network,
            named_ports: &pod.container_ports,
        }
    }
}

/// The other end of the connection: its address and what is known to be at it.
#[derive(Clone, Copy, Debug)]
pub struct PeerFacts<'a> {
    pub ip: IpAddr,
    /// The pod at `ip`, if any (a host-networked pod is at its node's address).
    pub pod: Option<PodFacts<'a>>,
    /// If `ip` is a node's address (`NodeInfo::addresses`), that node's labels.
    pub node_labels: Option<&'a Labels>,
    /// The DNS names `ip` is known to be an address of (for `domainNames`).
    pub domain_names: &'a [String],
}

impl<'a> PeerFacts<'a> {
    /// An address with nothing known at it (outside the cluster).
    pub fn address(ip: IpAddr) -> PeerFacts<'a> {
        PeerFacts {
            ip,
            pod: None,
            node_labels: None,
            domain_names: &[],
        }
    }
}

/// The packet: IP protocol number and destination port (0 for protocols without ports).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Packet {
    pub proto: u8,
    pub port: u16,
}

/// A rule, named as a person would look for it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RuleRef {
    pub policy: String,
    pub tier: Tier,
    pub priority: u16,
    pub direction: Direction,
    pub index: usize,
    pub name: Option<String>,
    /// As written.
    pub action: Action,
    /// The rule failed closed (`TierRule::fails_closed`) and matched as a Deny-all rule.
    pub fail_closed: bool,
}

impl fmt::Display for RuleRef {
    /// `Admin p egress[1] 'deny-all' Deny`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {} {}[{}]",
            self.tier, self.policy, self.direction, self.index
        )?;
        if let Some(n) = &self.name {
            write!(f, " '{n}'")?;
        }
        write!(f, " {}", self.action)?;
        if self.fail_closed {
            f.write_str(" (unknown peer: fails closed, Deny)")?;
        }
        Ok(())
    }
}

/// Where evaluation went after a `Pass`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    NetworkPolicy,
    Baseline,
    Default,
}

/// What decided a direction.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DecidedBy {
    /// An `Accept` or `Deny` rule (or one that failed closed).
    Rule(RuleRef),
    /// NetworkPolicy, which isolates the pod in this direction.
    NetworkPolicy,
    /// Nothing did: the default allows.
    Default,
}

/// A `Pass` rule evaluation went through, and where it went next.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Passed {
    pub rule: RuleRef,
    pub next: Stage,
}

/// The verdict of one direction.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Verdict {
    pub allowed: bool,
    pub decided_by: DecidedBy,
    /// In order: at most one per tier.
    pub passes: Vec<Passed>,
}

impl fmt::Display for Verdict {
    /// The trace: `Admin p ingress[0] 'x' Pass; NetworkPolicy -> allow`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.passes {
            write!(f, "{}; ", p.rule)?;
        }
        let result = if self.allowed { "allow" } else { "deny" };
        match &self.decided_by {
            DecidedBy::Rule(r) => write!(f, "{r}"),
            DecidedBy::NetworkPolicy => write!(f, "NetworkPolicy -> {result}"),
            DecidedBy::Default => write!(f, "default {result}"),
        }
    }
}

/// The verdict of direction `dir` for `subject` (the source for egress, the destination for
/// ingress) and `peer` (the other end), given NetworkPolicy's verdict `np` for that direction.
pub fn verdict(
    policies: &[ClusterNetworkPolicy],
    dir: Direction,
    np: NpVerdict,
    subject: &PodFacts<'_>,
    peer: &PeerFacts<'_>,
    packet: Packet,
) -> Verdict {
    let mut sorted: Vec<&ClusterNetworkPolicy> = policies.iter().collect();
    sorted.sort_by(|a, b| a.precedence_key().cmp(&b.precedence_key()));
    let decided = |rule: RuleRef, allowed: bool, passes: Vec<Passed>| Verdict {
        allowed,
        decided_by: DecidedBy::Rule(rule),
        passes,
    };
    let mut passes = Vec::new();

    match first_match(&sorted, Tier::Admin, dir, subject, peer, packet) {
        Some((rule, Action::Accept)) => return decided(rule, true, passes),
        Some((rule, Action::Deny)) => return decided(rule, false, passes),
        Some((rule, Action::Pass)) => {
            let next = if np == NpVerdict::NotIsolated {
                Stage::Baseline
            } else {
                Stage::NetworkPolicy
            };
            passes.push(Passed { rule, next });
        }
        None => {}
    }

    match np {
        NpVerdict::Allowed | NpVerdict::Denied => {
            return Verdict {
                allowed: np == NpVerdict::Allowed,
                decided_by: DecidedBy::NetworkPolicy,
                passes,
            };
        }
        NpVerdict::NotIsolated => {}
    }

    match first_match(&sorted, Tier::Baseline, dir, subject, peer, packet) {
        Some((rule, Action::Accept)) => return decided(rule, true, passes),
        Some((rule, Action::Deny)) => return decided(rule, false, passes),
        Some((rule, Action::Pass)) => passes.push(Passed {
            rule,
            next: Stage::Default,
        }),
        None => {}
    }

    Verdict {
        allowed: true,
        decided_by: DecidedBy::Default,
        passes,
    }
}

/// The first rule of `tier` that matches, and the action it takes.
fn first_match(
    sorted: &[&ClusterNetworkPolicy],
    tier: Tier,
    dir: Direction,
    subject: &PodFacts<'_>,
    peer: &PeerFacts<'_>,
    packet: Packet,
) -> Option<(RuleRef, Action)> {
    for policy in sorted {
        if policy.tier != tier || !selects(&policy.subject, subject) {
            continue;
        }
        for rule in policy.rules(dir) {
            if let Some(action) = rule_action(rule, dir, subject, peer, packet) {
                let rule_ref = RuleRef {
                    policy: policy.name.clone(),
                    tier,
                    priority: policy.priority,
                    direction: dir,
                    index: rule.index,
                    name: rule.name.clone(),
                    action: rule.action,
                    fail_closed: rule.fails_closed(),
                };
                return Some((rule_ref, action));
            }
        }
    }
    None
}

/// Does the policy's subject select the pod?
pub fn selects(subject: &Subject, pod: &PodFacts<'_>) -> bool {
    if pod.host_network {
        return false;
    }
    match subject {
        Subject::Namespaces(ns) => ns.matches(pod.namespace_labels),
        Subject::Pods {
            namespace_selector,
            pod_selector,
        } => namespace_selector.matches(pod.namespace_labels) && pod_selector.matches(pod.labels),
    }
}

/// The action `rule` takes on the packet, `None` if it does not match.
fn rule_action(
    rule: &TierRule,
    dir: Direction,
    subject: &PodFacts<'_>,
    peer: &PeerFacts<'_>,
    packet: Packet,
) -> Option<Action> {
    if rule.fails_closed() {
        return match rule.action {
            Action::Accept => None,
            Action::Deny | Action::Pass => Some(Action::Deny),
        };
    }
    let destination = match dir {
        Direction::Ingress => Some(subject),
        Direction::Egress => peer.pod.as_ref().filter(|p| !p.host_network),
    };
    let peer_ok = rule.peers.iter().any(|p| peer_matches(p, peer));
    let port_ok = rule.ports.as_ref().is_none_or(|ports| {
        ports
            .iter()
            .any(|p| port_matches(p, destination.map(|d| d.named_ports), packet))
    });
    (peer_ok && port_ok).then_some(rule.action)
}

/// Does a rule's peer match the other end?
pub fn peer_matches(peer: &TierPeer, facts: &PeerFacts<'_>) -> bool {
    let pod = facts.pod.as_ref().filter(|p| !p.host_network);
    match peer {
        TierPeer::Namespaces(ns) => pod.is_some_and(|p| ns.matches(p.namespace_labels)),
        TierPeer::Pods {
            namespace_selector,
            pod_selector,
        } => pod.is_some_and(|p| {
            namespace_selector.matches(p.namespace_labels) && pod_selector.matches(p.labels)
        }),
        TierPeer::Networks(nets) => nets.iter().any(|n| n.contains(facts.ip)),
        TierPeer::Nodes(nodes) => facts.node_labels.is_some_and(|l| nodes.matches(l)),
        TierPeer::DomainNames(patterns) => facts
            .domain_names
            .iter()
            .any(|name| patterns.iter().any(|p| domain_matches(p, name))),
        TierPeer::Unsupported(_) => false,
    }
}

/// Does a port filter match the packet? `named` are the destination pod's named ports (`None`:
/// the destination is not a pod).
pub fn port_matches(port: &TierPort, named: Option<&[NamedPort]>, packet: Packet) -> bool {
    match port {
        TierPort::Port { proto, first, last } => {
            proto.number() == packet.proto && (*first..=*last).contains(&packet.port)
        }
        TierPort::NamedPort(name) => named.is_some_and(|ports| {
            ports.iter().any(|p| {
                &p.name == name && p.protocol.number() == packet.proto && p.port == packet.port
            })
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Protocol;
    use crate::state::PodRef;

    const TCP: u8 = Protocol::Tcp as u8;
    const UDP: u8 = Protocol::Udp as u8;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A policy from `metadata: {name}` and a flow-YAML spec.
    fn cnp(name: &str, spec: &str) -> ClusterNetworkPolicy {
        let yaml = format!("metadata: {{name: {name}}}\nspec: {spec}");
        let v = crate::manifest::yaml_documents(&yaml).unwrap().remove(0);
        ClusterNetworkPolicy::from_raw(&serde_json::from_value(v).unwrap()).unwrap()
    }

    /// A policy of `tier` and `priority` on every pod of namespace `a`, with these rules.
    fn on_a(name: &str, tier: &str, priority: u16, rules: &str) -> ClusterNetworkPolicy {
        cnp(
            name,
            &format!(
                "{{tier: {tier}, priority: {priority}, subject: {{namespaces: {{matchLabels: {{ns: a}}}}}}, {rules}}}"
            ),
        )
    }

    struct World {
        ns_a: Labels,
        ns_b: Labels,
        web: Labels,
        ports: Vec<NamedPort>,
    }

    impl World {
        fn new() -> World {
            World {
                ns_a: labels(&[("ns", "a")]),
                ns_b: labels(&[("ns", "b")]),
                web: labels(&[("app", "web")]),
                ports: vec![NamedPort {
                    name: "web".into(),
                    port: 80,
                    protocol: Protocol::Tcp,
                }],
            }
        }

        fn pod_a(&self) -> PodFacts<'_> {
            PodFacts {
                namespace_labels: &self.ns_a,
                labels: &self.web,
                host_network: false,
                named_ports: &self.ports,
            }
        }

        /// A pod of namespace b at 10.0.1.2, with no named ports.
        fn peer_b(&self) -> PeerFacts<'_> {
            PeerFacts {
                pod: Some(PodFacts {
                    namespace_labels: &self.ns_b,
                    labels: &self.web,
                    host_network: false,
                    named_ports: &[],
                }),
                ..PeerFacts::address("10.0.1.2".parse().unwrap())
            }
        }
    }

    const TCP80: Packet = Packet {
        proto: TCP,
        port: 80,
    };

    fn ingress(
        policies: &[ClusterNetworkPolicy],
        np: NpVerdict,
        w: &World,
        peer: &PeerFacts<'_>,
        packet: Packet,
    ) -> Verdict {
        verdict(policies, Direction::Ingress, np, &w.pod_a(), peer, packet)
    }

    const FROM_B: &str = "from: [{namespaces: {matchLabels: {ns: b}}}]";

    #[test]
    fn admin_deny_overrides_networkpolicy() {
        let w = World::new();
        let deny = on_a(
            "deny-b",
            "Admin",
            10,
            &format!("ingress: [{{name: no-b, action: Deny, {FROM_B}}}]"),
        );
        let v = ingress(
            std::slice::from_ref(&deny),
            NpVerdict::Allowed,
            &w,
            &w.peer_b(),
            TCP80,
        );
        assert!(!v.allowed);
        assert_eq!(v.to_string(), "Admin deny-b ingress[0] 'no-b' Deny");
        let DecidedBy::Rule(r) = &v.decided_by else {
            panic!("{v:?}")
        };
        assert_eq!(
            (r.priority, r.index, r.action, r.fail_closed),
            (10, 0, Action::Deny, false)
        );
        // The rule does not match egress, nor another peer: NetworkPolicy decides.
        let v = verdict(
            std::slice::from_ref(&deny),
            Direction::Egress,
            NpVerdict::Allowed,
            &w.pod_a(),
            &w.peer_b(),
            TCP80,
        );
        assert_eq!(v.to_string(), "NetworkPolicy -> allow");
        let outside = PeerFacts::address("192.0.2.1".parse().unwrap());
        let v = ingress(&[deny], NpVerdict::Denied, &w, &outside, TCP80);
        assert_eq!(
            (v.allowed, v.to_string().as_str()),
            (false, "NetworkPolicy -> deny")
        );
    }

    #[test]
    fn pass_goes_to_networkpolicy_then_baseline() {
        let w = World::new();
        let pass = on_a(
            "pass-b",
            "Admin",
            1,
            &format!("ingress: [{{name: to-np, action: Pass, {FROM_B}}}]"),
        );
        // Skipped by the Pass: the rest of the Admin tier, this policy's later rules included.
        let admin_deny = on_a(
            "admin-deny",
            "Admin",
            2,
            "ingress: [{action: Deny, from: [{namespaces: {}}]}]",
        );
        let baseline_deny = on_a(
            "baseline-deny",
            "Baseline",
            0,
            &format!("ingress: [{{name: no-b, action: Deny, {FROM_B}}}]"),
        );
        let all = [baseline_deny, admin_deny, pass];

        // Into NetworkPolicy, which isolates the pod: its verdict is final, Baseline unused.
        let v = ingress(&all, NpVerdict::Allowed, &w, &w.peer_b(), TCP80);
        assert!(v.allowed);
        assert_eq!(v.decided_by, DecidedBy::NetworkPolicy);
        assert_eq!(v.passes.len(), 1);
        assert_eq!(v.passes[0].next, Stage::NetworkPolicy);
        assert_eq!(
            v.to_string(),
            "Admin pass-b ingress[0] 'to-np' Pass; NetworkPolicy -> allow"
        );
        let v = ingress(&all, NpVerdict::Denied, &w, &w.peer_b(), TCP80);
        assert_eq!(
            (v.allowed, v.decided_by.clone()),
            (false, DecidedBy::NetworkPolicy)
        );

        // NetworkPolicy does not isolate: on to Baseline, whose Deny decides.
        let v = ingress(&all, NpVerdict::NotIsolated, &w, &w.peer_b(), TCP80);
        assert!(!v.allowed);
        assert_eq!(v.passes[0].next, Stage::Baseline);
        assert_eq!(
            v.to_string(),
            "Admin pass-b ingress[0] 'to-np' Pass; Baseline baseline-deny ingress[0] 'no-b' Deny"
        );

        // Without the Pass, the lower Admin Deny applies.
        let v = ingress(&all[..2], NpVerdict::Allowed, &w, &w.peer_b(), TCP80);
        assert_eq!(v.to_string(), "Admin admin-deny ingress[0] Deny");

        // A Baseline Pass goes to the default.
        let baseline_pass = on_a(
            "baseline-pass",
            "Baseline",
            0,
            "ingress: [{action: Pass, from: [{namespaces: {}}]}, {action: Deny, from: [{namespaces: {}}]}]",
        );
        let v = ingress(
            &[baseline_pass],
            NpVerdict::NotIsolated,
            &w,
            &w.peer_b(),
            TCP80,
        );
        assert!(v.allowed);
        assert_eq!(v.passes[0].next, Stage::Default);
        assert_eq!(
            v.to_string(),
            "Baseline baseline-pass ingress[0] Pass; default allow"
        );
    }

    #[test]
    fn baseline_only_where_networkpolicy_does_not_isolate() {
        let w = World::new();
        let accept = on_a(
            "b-accept",
            "Baseline",
            5,
            &format!("ingress: [{{action: Accept, {FROM_B}}}]"),
        );
        let deny = on_a(
            "b-deny",
            "Baseline",
            6,
            "ingress: [{action: Deny, from: [{namespaces: {}}]}]",
        );
        let all = [deny, accept];
        let v = ingress(&all, NpVerdict::NotIsolated, &w, &w.peer_b(), TCP80);
        assert_eq!(
            (v.allowed, v.to_string().as_str()),
            (true, "Baseline b-accept ingress[0] Accept")
        );
        let from_a = PeerFacts {
            pod: Some(w.pod_a()),
            ..PeerFacts::address("10.0.0.9".parse().unwrap())
        };
        let v = ingress(&all, NpVerdict::NotIsolated, &w, &from_a, TCP80);
        assert_eq!(
            (v.allowed, v.to_string().as_str()),
            (false, "Baseline b-deny ingress[0] Deny")
        );
        for np in [NpVerdict::Allowed, NpVerdict::Denied] {
            let v = ingress(&all, np, &w, &from_a, TCP80);
            assert_eq!(
                (v.allowed, v.decided_by),
                (np == NpVerdict::Allowed, DecidedBy::NetworkPolicy)
            );
        }
        let v = ingress(&[], NpVerdict::NotIsolated, &w, &from_a, TCP80);
        assert_eq!((v.allowed, v.to_string().as_str()), (true, "default allow"));
    }

    #[test]
    fn order_rules_then_priority_then_name() {
        let w = World::new();
        let rules = "ingress: [{name: first, action: Accept, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 80}}}]}, {name: second, action: Deny, from: [{namespaces: {}}]}]";
        let p = on_a("p", "Admin", 3, rules);
        let v = ingress(
            std::slice::from_ref(&p),
            NpVerdict::NotIsolated,
            &w,
            &w.peer_b(),
            TCP80,
        );
        assert_eq!(v.to_string(), "Admin p ingress[0] 'first' Accept");
        let tcp81 = Packet {
            proto: TCP,
            port: 81,
        };
        let v = ingress(&[p], NpVerdict::NotIsolated, &w, &w.peer_b(), tcp81);
        assert_eq!(v.to_string(), "Admin p ingress[1] 'second' Deny");

        // Same tier and priority: the name decides, whatever the input order.
        let accept = "ingress: [{action: Accept, from: [{namespaces: {}}]}]";
        let deny = "ingress: [{action: Deny, from: [{namespaces: {}}]}]";
        for (a, b, want) in [(accept, deny, true), (deny, accept, false)] {
            let pa = on_a("aa", "Admin", 7, a);
            let pb = on_a("bb", "Admin", 7, b);
            for set in [[pa.clone(), pb.clone()], [pb, pa]] {
                let v = ingress(&set, NpVerdict::NotIsolated, &w, &w.peer_b(), TCP80);
                assert_eq!(v.allowed, want);
                let DecidedBy::Rule(r) = v.decided_by else {
                    panic!()
                };
                assert_eq!(r.policy, "aa");
            }
        }
        // A lower priority number wins over the name.
        let v = ingress(
            &[on_a("aa", "Admin", 8, accept), on_a("zz", "Admin", 7, deny)],
            NpVerdict::NotIsolated,
            &w,
            &w.peer_b(),
            TCP80,
        );
        assert_eq!(v.to_string(), "Admin zz ingress[0] Deny");
    }

    #[test]
    fn named_ports_resolve_on_the_destination() {
        let w = World::new();
        let named = "protocols: [{destinationNamedPort: web}]";
        let ing = on_a(
            "in",
            "Admin",
            1,
            &format!("ingress: [{{action: Deny, from: [{{namespaces: {{}}}}], {named}}}]"),
        );
        let decided = |v: Verdict| matches!(v.decided_by, DecidedBy::Rule(_));
        // Ingress: the subject's ports (web = TCP/80).
        let np = NpVerdict::NotIsolated;
        assert!(decided(ingress(
            std::slice::from_ref(&ing),
            np,
            &w,
            &w.peer_b(),
            TCP80
        )));
        for other in [(UDP, 80), (TCP, 81)] {
            let p = Packet {
                proto: other.0,
                port: other.1,
            };
            assert!(!decided(ingress(
                std::slice::from_ref(&ing),
                np,
                &w,
                &w.peer_b(),
                p
            )));
        }
        let no_ports = PodFacts {
            named_ports: &[],
            ..w.pod_a()
        };
        let v = verdict(
            &[ing],
            Direction::Ingress,
            np,
            &no_ports,
            &w.peer_b(),
            TCP80,
        );
        assert!(!decided(v));

        // Egress: the peer's ports; never an address's, nor a host-networked pod's.
        let eg = on_a(
            "out",
            "Admin",
            1,
            &format!("egress: [{{action: Deny, to: [{{namespaces: {{}}}}], {named}}}]"),
        );
        let egress = |peer: &PeerFacts<'_>| {
            decided(verdict(
                std::slice::from_ref(&eg),
                Direction::Egress,
                np,
                &w.pod_a(),
                peer,
                TCP80,
            ))
        };
        assert!(!egress(&w.peer_b()), "peer b declares no named port");
        let to_a = PeerFacts {
            pod: Some(w.pod_a()),
            ..PeerFacts::address("10.0.0.9".parse().unwrap())
        };
        assert!(egress(&to_a));
        let host = PeerFacts {
            pod: Some(PodFacts {
                host_network: true,
                ..w.pod_a()
            }),
            ..to_a
        };
        assert!(!egress(&host));
    }

    #[test]
    fn networks_ipv4_and_ipv6() {
        let w = World::new();
        let p = on_a(
            "cidr",
            "Admin",
            1,
            "egress: [{action: Deny, to: [{networks: [10.0.0.0/16, 'fd00:1::/64']}]}]",
        );
        let denied = |ip: &str, pod: bool| {
            let peer = PeerFacts {
                pod: pod.then_some(w.peer_b().pod.unwrap()),
                ..PeerFacts::address(ip.parse().unwrap())
            };
            let v = verdict(
                std::slice::from_ref(&p),
                Direction::Egress,
                NpVerdict::NotIsolated,
                &w.pod_a(),
                &peer,
                TCP80,
            );
            !v.allowed
        };
        assert!(denied("10.0.255.255", false));
        assert!(denied("10.0.1.2", true), "pod addresses are matched too");
        assert!(!denied("10.1.0.0", false));
        assert!(denied("fd00:1::ffff", false));
        assert!(!denied("fd00:2::1", false));
        assert!(
            !denied("::ffff:10.0.0.1", false),
            "an IPv6 address is not IPv4"
        );
        // Networks are egress only; an ingress verdict is untouched.
        let v = ingress(&[p], NpVerdict::NotIsolated, &w, &w.peer_b(), TCP80);
        assert!(v.allowed);
    }

    #[test]
    fn host_network_nodes_and_domains() {
        let w = World::new();
        let node = labels(&[("kubernetes.io/os", "linux")]);
        let p = on_a(
            "out",
            "Admin",
            1,
            "egress: [\
               {name: pods, action: Accept, to: [{namespaces: {}}]},\
               {name: nodes, action: Pass, to: [{nodes: {matchLabels: {kubernetes.io/os: linux}}}]},\
               {name: names, action: Accept, to: [{domainNames: ['*.example.com']}]},\
               {name: rest, action: Deny, to: [{networks: [0.0.0.0/0]}]}]",
        );
        let egress = |subject: &PodFacts<'_>, peer: &PeerFacts<'_>| {
            verdict(
                std::slice::from_ref(&p),
                Direction::Egress,
                NpVerdict::NotIsolated,
                subject,
                peer,
                TCP80,
            )
            .to_string()
        };
        // A host-networked pod: not a pod peer, but its address is its node's.
        let host_pod = PeerFacts {
            pod: Some(PodFacts {
                host_network: true,
                ..w.peer_b().pod.unwrap()
            }),
            node_labels: Some(&node),
            ..PeerFacts::address("192.168.0.1".parse().unwrap())
        };
        assert_eq!(
            egress(&w.pod_a(), &host_pod),
            "Admin out egress[1] 'nodes' Pass; default allow"
        );
        let names = ["www.Example.com.".to_string()];
        let named = PeerFacts {
            domain_names: &names,
            ..PeerFacts::address("203.0.113.1".parse().unwrap())
        };
        assert_eq!(
            egress(&w.pod_a(), &named),
            "Admin out egress[2] 'names' Accept"
        );
        let outside = PeerFacts::address("203.0.113.2".parse().unwrap());
        assert_eq!(
            egress(&w.pod_a(), &outside),
            "Admin out egress[3] 'rest' Deny"
        );
        assert_eq!(
            egress(&w.pod_a(), &w.peer_b()),
            "Admin out egress[0] 'pods' Accept"
        );
        // A host-networked pod is never a subject.
        let host_subject = PodFacts {
            host_network: true,
            ..w.pod_a()
        };
        assert_eq!(egress(&host_subject, &outside), "default allow");
    }

    #[test]
    fn unknown_peers_fail_closed_and_protocols_filter() {
        let w = World::new();
        let rules = "ingress: [\
            {name: unknown-accept, action: Accept, from: [{namespaces: {}}, {future: {}}]},\
            {name: tcp-only, action: Deny, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {range: {start: 1, end: 65535}}}}]},\
            {name: unknown-pass, action: Pass, from: [{future: {}}]}]";
        let p = on_a("fc", "Admin", 1, rules);
        assert!(p.ingress[0].fails_closed() && p.ingress[2].fails_closed());
        let v = ingress(
            std::slice::from_ref(&p),
            NpVerdict::Allowed,
            &w,
            &w.peer_b(),
            TCP80,
        );
        assert_eq!(v.to_string(), "Admin fc ingress[1] 'tcp-only' Deny");
        let icmp = Packet { proto: 1, port: 0 };
        let v = ingress(&[p], NpVerdict::Allowed, &w, &w.peer_b(), icmp);
        assert!(!v.allowed, "a Pass rule that fails closed denies");
        assert_eq!(
            v.to_string(),
            "Admin fc ingress[2] 'unknown-pass' Pass (unknown peer: fails closed, Deny)"
        );
        // Without protocols a rule matches every protocol, ICMP included.
        let any = on_a(
            "any",
            "Admin",
            1,
            &format!("ingress: [{{action: Deny, {FROM_B}}}]"),
        );
        assert!(!ingress(&[any], NpVerdict::NotIsolated, &w, &w.peer_b(), icmp).allowed);
    }

    #[test]
    fn networkpolicy_verdict_from_the_reference() {
        let objects = crate::manifest::parse_str(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: only-b, namespace: a}\n\
             spec: {podSelector: {}, ingress: [{from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: b}}}]}]}",
        )
        .unwrap();
        let mut store = Store::from_objects(objects);
        for (ns, name, ip) in [
            ("a", "x", "10.0.0.1"),
            ("b", "y", "10.0.0.2"),
            ("c", "z", "10.0.0.3"),
        ] {
            let pod = PodRef {
                namespace: ns.into(),
                name: name.into(),
            };
            let info = PodInfo {
                ips: vec![ip.parse().unwrap()],
                ..PodInfo::default()
            };
            store.pods.insert(pod, info);
        }
        let ep = |ns: &str, name: &str, ip: &str| Endpoint::Pod {
            pod: PodRef {
                namespace: ns.into(),
                name: name.into(),
            },
            ip: ip.parse().unwrap(),
        };
        let (x, y, z) = (
            ep("a", "x", "10.0.0.1"),
            ep("b", "y", "10.0.0.2"),
            ep("c", "z", "10.0.0.3"),
        );
        let np = |dir, src: &Endpoint, dst: &Endpoint| {
            NpVerdict::from_reference(&store, dir, src, dst, TCP, 80)
        };
        assert_eq!(np(Direction::Ingress, &y, &x), NpVerdict::Allowed);
        assert_eq!(np(Direction::Ingress, &z, &x), NpVerdict::Denied);
        assert_eq!(np(Direction::Egress, &x, &z), NpVerdict::NotIsolated);
        assert_eq!(np(Direction::Ingress, &x, &z), NpVerdict::NotIsolated);
        let outside = Endpoint::External("192.0.2.1".parse().unwrap());
        assert_eq!(np(Direction::Egress, &outside, &x), NpVerdict::NotIsolated);
    }
}
