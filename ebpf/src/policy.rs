//! Policy lookup for a new flow: at most one IDENTITIES lookup, one CIDRS lookup and two
//! POLICY lookups, whatever the number of policies.
//!
//! Precedence, in order:
//! 1. an endpoint not isolated in this direction allows everything;
//! 2. the node's own addresses (IDENTITY_HOST) are always allowed, except a pod's egress to a
//!    port the node DNATs onward (NODE_PORTS: a NodePort, a hostPort), which is judged as
//!    egress to where the DNAT leads (a ClusterIP and its port, a pod and its container port);
//! 3. an allow entry for the peer's pod identity;
//! 4. an allow entry for the CIDR class of the longest ipBlock prefix containing the peer
//!    (pod addresses included: ipBlock matches every address inside it);
//! 5. otherwise the flow is not allowed.
//!
//! NetworkPolicy has no deny rules, so any match allows and the order of 3 and 4 only decides
//! which rule is reported.
use aya_ebpf::maps::lpm_trie::Key;
use palisade_common::{
    AF_INET, CIDR_CLASS_NONE, CIDR_KEY_FIXED_BITS, CidrKey, DIR_EGRESS, EndpointInfo,
    IDENTITY_HOST, IDENTITY_NONE, NodePortKey, POLICY_KEY_FULL_BITS, PeerAddr, PolicyKey, Reason,
    isolated_flag,
};

use crate::maps::{CIDRS, IDENTITIES, NODE_PORTS, POLICY};

pub struct Verdict {
    pub allowed: bool,
    pub reason: Reason,
    /// The allowing rule, 0 when none.
    pub rule: u32,
}

#[inline(always)]
fn allow(reason: Reason, rule: u32) -> Verdict {
    Verdict {
        allowed: true,
        reason,
        rule,
    }
}

/// Is `addr` one of this node's own addresses (`IDENTITY_HOST`)?
#[inline(always)]
pub fn is_node_address(family: u8, addr: &[u8; 16]) -> bool {
    let key = PeerAddr {
        family,
        _pad: [0; 3],
        addr: *addr,
    };
    matches!(unsafe { IDENTITIES.get(key) }, Some(id) if *id == IDENTITY_HOST)
}

#[inline(always)]
pub fn evaluate(
    ep: &EndpointInfo,
    dir: u8,
    family: u8,
    peer: &[u8; 16],
    proto: u8,
    port: u16,
) -> Verdict {
    if ep.flags & isolated_flag(dir) == 0 {
        return allow(Reason::NotIsolated, 0);
    }
    let identity = identity_of(family, peer);
    if identity == IDENTITY_HOST {
        if dir == DIR_EGRESS {
            let key = NodePortKey {
                family,
                proto,
                port_be: port.to_be(),
            };
            if let Some(t) = unsafe { NODE_PORTS.get(key) } {
                let t = *t;
                let target = identity_of(family, &t.addr);
                if target == IDENTITY_HOST {
                    return allow(Reason::Host, 0);
                }
                return lookup(ep, dir, family, &t.addr, target, proto, t.port);
            }
        }
        return allow(Reason::Host, 0);
    }
    lookup(ep, dir, family, peer, identity, proto, port)
}

#[inline(always)]
fn identity_of(family: u8, addr: &[u8; 16]) -> u32 {
    let key = PeerAddr {
        family,
        _pad: [0; 3],
        addr: *addr,
    };
    unsafe { IDENTITIES.get(key) }
        .copied()
        .unwrap_or(IDENTITY_NONE)
}

/// Steps 3-5 for `peer` (of `identity`).
#[inline(always)]
fn lookup(
    ep: &EndpointInfo,
    dir: u8,
    family: u8,
    peer: &[u8; 16],
    identity: u32,
    proto: u8,
    port: u16,
) -> Verdict {
    let port_be = port.to_be();
    if identity != IDENTITY_NONE {
        let key = Key::new(
            POLICY_KEY_FULL_BITS,
            PolicyKey {
                endpoint: ep.id,
                peer: identity,
                dir,
                proto,
                port_be,
            },
        );
        if let Some(v) = POLICY.get(&key) {
            return allow(Reason::PolicyAllow, v.rule);
        }
    }
    let addr_bits = if family == AF_INET { 32 } else { 128 };
    let cidr_key = Key::new(
        CIDR_KEY_FIXED_BITS + addr_bits,
        CidrKey {
            endpoint: ep.id,
            dir,
            family,
            _pad: [0; 2],
            addr: *peer,
        },
    );
    if let Some(class) = CIDRS.get(&cidr_key) {
        let class = *class;
        if class != CIDR_CLASS_NONE {
            let key = Key::new(
                POLICY_KEY_FULL_BITS,
                PolicyKey {
                    endpoint: ep.id,
                    peer: class,
                    dir,
                    proto,
                    port_be,
                },
            );
            if let Some(v) = POLICY.get(&key) {
                return allow(Reason::PolicyAllow, v.rule);
            }
        }
    }
    Verdict {
        allowed: false,
        reason: Reason::NoRuleMatched,
        rule: 0,
    }
}
