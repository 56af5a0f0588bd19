//! The datapath's twin: evaluates a new flow against a `DesiredState` exactly as the eBPF
//! programs evaluate it against the maps (`ebpf/src/policy.rs` and `pod_veth.rs`), with real
//! longest-prefix matching over the LPM entries. Backs `palisade explain` and the compiler's
//! cross-checks.
use std::net::IpAddr;

use palisade_common::{
    AF_INET, AF_INET6, CIDR_CLASS_NONE, CidrKey, EP_FQDN, EP_PENDING, IDENTITY_HOST, IDENTITY_NONE,
    POLICY_KEY_ANY_PROTO_BITS, POLICY_KEY_FULL_BITS, PeerAddr, PolicyKey, PolicyValue, Reason,
    TIER_ACTION_ACCEPT, TIER_ACTION_DENY, TierMatch, audit_flag, isolated_flag, tiered_flag,
};
use serde::Serialize;

use crate::state::{CidrEntry, DesiredState, Direction, PolicyEntry};

/// Why the model decided as it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ModelReason {
    /// The interface is not an endpoint: the programs pass the packet (not ours).
    NotAnEndpoint,
    /// The endpoint is `EP_PENDING`: everything is dropped.
    Pending,
    /// Source and destination address are equal: the pod talking to itself.
    SelfTraffic,
    NotIsolated,
    /// The peer is an address of this node.
    Host,
    PolicyAllow,
    NoRuleMatched,
    /// A ClusterNetworkPolicy rule accepted (Admin or Baseline tier).
    TierAccept,
    /// A ClusterNetworkPolicy rule denied.
    TierDeny,
}

impl ModelReason {
    /// The datapath's reason code, where there is one.
    pub fn as_reason(self) -> Option<Reason> {
        Some(match self {
            ModelReason::NotAnEndpoint => return None,
            ModelReason::Pending => Reason::Pending,
            ModelReason::SelfTraffic => Reason::SelfTraffic,
            ModelReason::NotIsolated => Reason::NotIsolated,
            ModelReason::Host => Reason::Host,
            ModelReason::PolicyAllow => Reason::PolicyAllow,
            ModelReason::NoRuleMatched => Reason::NoRuleMatched,
            ModelReason::TierAccept => Reason::TierAccept,
            ModelReason::TierDeny => Reason::TierDeny,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ModelVerdict {
    pub allowed: bool,
    pub reason: ModelReason,
    /// The deciding rule id (`state.rules` names it): the NetworkPolicy rule that allows, or
    /// the tier rule that accepts or denies.
    pub rule: Option<u32>,
    /// The Admin and Baseline tiers' first matching rules, where the endpoint is tiered in this
    /// direction and one matches (a Pass shows here: where evaluation went on from).
    #[serde(skip)]
    pub admin: Option<TierMatch>,
    #[serde(skip)]
    pub baseline: Option<TierMatch>,
    /// The peer's identity (`IDENTITY_NONE` when it has none).
    pub identity: u32,
    /// The CIDR class the peer's address fell in, when the CIDRS lookup was made and hit.
    pub class: Option<u32>,
    /// The domain class the endpoint's DNS answers gave the peer (`DesiredState::learned`).
    pub domain_class: Option<u32>,
}

impl ModelVerdict {
    fn new(allowed: bool, reason: ModelReason) -> Self {
        ModelVerdict {
            allowed,
            reason,
            rule: None,
            admin: None,
            baseline: None,
            identity: IDENTITY_NONE,
            class: None,
            domain_class: None,
        }
    }
}

/// Longest-prefix match in POLICY for `(endpoint, peer, dir, proto, port)` at full length.
pub fn policy_lookup(
    state: &DesiredState,
    endpoint: u32,
    peer: u32,
    dir: Direction,
    proto: u8,
    port: u16,
) -> Option<(PolicyEntry, PolicyValue)> {
    let full = PolicyKey {
        endpoint,
        peer,
        dir: dir.as_u8(),
        proto,
        port_be: port.to_be(),
        ..PolicyKey::default()
    };
    for prefix_len in (POLICY_KEY_ANY_PROTO_BITS..=POLICY_KEY_FULL_BITS).rev() {
        let entry = PolicyEntry::new(full, prefix_len);
        if let Some(v) = state.policy.get(&entry) {
            return Some((entry, *v));
        }
    }
    None
}

/// Longest-prefix match in CIDRS for `(endpoint, dir, address)`.
pub fn cidr_lookup(
    state: &DesiredState,
    endpoint: u32,
    dir: Direction,
    addr: IpAddr,
) -> Option<(CidrEntry, u32)> {
    let (family, bits) = match addr {
        IpAddr::V4(_) => (AF_INET, 32),
        IpAddr::V6(_) => (AF_INET6, 128),
    };
    let full = CidrKey {
        endpoint,
        dir: dir.as_u8(),
        family,
        addr: PeerAddr::from_ip(addr).addr,
        ..CidrKey::default()
    };
    for prefix_len in (0..=bits).rev() {
        let entry = CidrEntry::new(full, prefix_len);
        if let Some(class) = state.cidrs.get(&entry) {
            return Some((entry, *class));
        }
    }
    None
}

/// The verdict for a new flow at the endpoint behind `ifindex`, in direction `dir`, whose
/// peer address is `peer` (the source for ingress, the destination for egress) and whose local
/// address is `local`; `port` is the destination port (0 for protocols without ports).
pub fn evaluate(
    state: &DesiredState,
    ifindex: u32,
    dir: Direction,
    peer: IpAddr,
    local: IpAddr,
    proto: u8,
    port: u16,
) -> ModelVerdict {
    let Some(ep) = state.endpoints.get(&ifindex) else {
        return ModelVerdict::new(true, ModelReason::NotAnEndpoint);
    };
    if ep.flags & EP_PENDING != 0 {
        return ModelVerdict::new(false, ModelReason::Pending);
    }
    if peer == local {
        return ModelVerdict::new(true, ModelReason::SelfTraffic);
    }
    let isolated = ep.flags & isolated_flag(dir.as_u8()) != 0;
    let tiered = ep.flags & tiered_flag(dir.as_u8()) != 0;
    if !isolated && !tiered {
        return ModelVerdict::new(true, ModelReason::NotIsolated);
    }
    let identity = state
        .identities
        .get(&PeerAddr::from_ip(peer))
        .copied()
        .unwrap_or(IDENTITY_NONE);
    let mut v = ModelVerdict::new(false, ModelReason::NoRuleMatched);
    v.identity = identity;
    if identity == IDENTITY_HOST && !tiered {
        v.allowed = true;
        v.reason = ModelReason::Host;
        return v;
    }
    let by_identity = if identity != IDENTITY_NONE && identity != IDENTITY_HOST {
        policy_lookup(state, ep.id, identity, dir, proto, port).map(|(_, value)| value)
    } else {
        None
    };
    let by_cidr = match cidr_lookup(state, ep.id, dir, peer) {
        Some((_, class)) => {
            v.class = Some(class);
            (class != CIDR_CLASS_NONE)
                .then(|| policy_lookup(state, ep.id, class, dir, proto, port))
                .flatten()
                .map(|(_, value)| value)
        }
        None => None,
    };
    // Egress to an address the endpoint's DNS answers resolved a `domainNames` pattern to.
    let by_name = match state.learned.get(&(ep.id, PeerAddr::from_ip(peer))) {
        Some(class) if dir == Direction::Egress && ep.flags & EP_FQDN != 0 => {
            v.domain_class = Some(*class);
            policy_lookup(state, ep.id, *class, dir, proto, port).map(|(_, value)| value)
        }
        _ => None,
    };
    let (by_identity, by_cidr) = (by_identity.unwrap_or_default(), by_cidr.unwrap_or_default());
    let by_name = by_name.unwrap_or_default();
    let decided = |mut v: ModelVerdict, allowed: bool, reason: ModelReason, rule: u32| {
        v.allowed = allowed;
        v.reason = reason;
        v.rule = (rule != 0).then_some(rule);
        v
    };
    let tier = |m: TierMatch| match m.action {
        TIER_ACTION_ACCEPT => Some((true, ModelReason::TierAccept, m.rule)),
        TIER_ACTION_DENY => Some((false, ModelReason::TierDeny, m.rule)),
        _ => None,
    };
    if tiered {
        let admin = by_identity.admin.first(by_cidr.admin).first(by_name.admin);
        let baseline = by_identity
            .baseline
            .first(by_cidr.baseline)
            .first(by_name.baseline);
        v.admin = (admin.rule != 0).then_some(admin);
        v.baseline = (baseline.rule != 0).then_some(baseline);
        if let Some((allowed, reason, rule)) = tier(admin) {
            return decided(v, allowed, reason, rule);
        }
    }
    if isolated {
        if identity == IDENTITY_HOST {
            return decided(v, true, ModelReason::Host, 0);
        }
        for value in [by_identity, by_cidr] {
            if value.rule != 0 {
                return decided(v, true, ModelReason::PolicyAllow, value.rule);
            }
        }
        // NetworkPolicy denies; where it is only audited, Baseline may still drop for real.
        if !tiered || ep.flags & audit_flag(dir.as_u8()) == 0 {
            return v;
        }
    }
    if tiered
        && let Some(b) = v.baseline
        && let Some((allowed, reason, rule)) = tier(b)
        && (!allowed || !isolated)
    {
        return decided(v, allowed, reason, rule);
    }
    if isolated {
        return v;
    }
    decided(v, true, ModelReason::NotIsolated, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_common::{CIDR_CLASS_BIT, EP_ISOLATED_INGRESS, EndpointInfo, PROTO_TCP};

    fn state() -> DesiredState {
        let mut s = DesiredState::default();
        s.endpoints.insert(
            7,
            EndpointInfo {
                id: 1,
                flags: EP_ISOLATED_INGRESS,
                ..Default::default()
            },
        );
        s.identities
            .insert(PeerAddr::from_ip("10.0.0.2".parse().unwrap()), 300);
        s.identities.insert(
            PeerAddr::from_ip("10.0.0.254".parse().unwrap()),
            IDENTITY_HOST,
        );
        // identity 300: TCP 8000-8003 (one /94 block).
        s.policy.insert(
            PolicyEntry {
                key: PolicyKey {
                    endpoint: 1,
                    peer: 300,
                    dir: 0,
                    proto: PROTO_TCP,
                    port_be: 8000u16.to_be(),
                    ..PolicyKey::default()
                },
                prefix_len: 94,
            },
            PolicyValue {
                rule: 5,
                flags: 0,
                ..PolicyValue::default()
            },
        );
        // 10.0.0.0/8 -> class 1 (any protocol), except 10.1.0.0/16.
        let cidr = |a: [u8; 4], len| CidrEntry {
            key: CidrKey {
                endpoint: 1,
                dir: 0,
                family: AF_INET,
                addr: [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ..CidrKey::default()
            },
            prefix_len: len,
        };
        s.cidrs.insert(cidr([10, 0, 0, 0], 8), CIDR_CLASS_BIT | 1);
        s.cidrs.insert(cidr([10, 1, 0, 0], 16), CIDR_CLASS_NONE);
        s.policy.insert(
            PolicyEntry {
                key: PolicyKey {
                    endpoint: 1,
                    peer: CIDR_CLASS_BIT | 1,
                    dir: 0,
                    proto: 0,
                    port_be: 0,
                    ..PolicyKey::default()
                },
                prefix_len: POLICY_KEY_ANY_PROTO_BITS,
            },
            PolicyValue {
                rule: 9,
                flags: 0,
                ..PolicyValue::default()
            },
        );
        s
    }

    #[test]
    fn longest_prefix_semantics() {
        let s = state();
        let ip = |x: &str| x.parse::<IpAddr>().unwrap();
        let local = ip("10.0.0.1");
        let ev = |peer: &str, proto, port| {
            evaluate(&s, 7, Direction::Ingress, ip(peer), local, proto, port)
        };
        assert_eq!(
            evaluate(&s, 8, Direction::Ingress, local, local, 6, 1).reason,
            ModelReason::NotAnEndpoint
        );
        assert_eq!(ev("10.0.0.1", 6, 1).reason, ModelReason::SelfTraffic);
        assert_eq!(
            evaluate(&s, 7, Direction::Egress, ip("1.1.1.1"), local, 6, 1).reason,
            ModelReason::NotIsolated
        );
        assert_eq!(ev("10.0.0.254", 17, 1).reason, ModelReason::Host);
        // Identity entry: port block 8000-8003; other ports fall through to the CIDR class.
        for (port, rule) in [(7999, 9), (8000, 5), (8003, 5), (8004, 9)] {
            assert_eq!(
                ev("10.0.0.2", PROTO_TCP, port).rule,
                Some(rule),
                "port {port}"
            );
        }
        assert!(ev("10.200.0.1", 132, 0).allowed);
        let v = ev("10.1.2.3", 6, 80);
        assert!(
            !v.allowed && v.class == Some(CIDR_CLASS_NONE),
            "except hole"
        );
        assert!(!ev("11.0.0.1", 6, 80).allowed);
        assert!(!ev("::1", 6, 80).allowed);
    }
}
