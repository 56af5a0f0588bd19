//! Policy lookup for a new flow: one IDENTITIES lookup, one PREFIX_LENGTHS lookup, then
//! longest-prefix matches in POLICY and CIDRS, each a hash probe per prefix length the
//! endpoint uses (`common`, CIDRS and POLICY), whatever the number of policies.
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
// Keys are passed to `get` by reference: passed by value, LLVM once laid the CIDRS probe out so
// that a path read a register a helper call had clobbered (harmless to LLVM, "R4 !read_ok" to
// the verifier). `verifier_accepts_both_programs` guards it.
#![allow(clippy::needless_borrows_for_generic_args)]

use palisade_common::{
    AF_INET, CIDR_CLASS_NONE, CIDR_MASKS, CidrKey, DIR_EGRESS, EndpointInfo, IDENTITY_HOST,
    IDENTITY_NONE, NodePortKey, POLICY_KEY_FULL_BITS, POLICY_MASKS, PeerAddr, PolicyKey,
    PolicyValue, PrefixLengths, PrefixLengthsKey, Reason, isolated_flag,
};

use crate::maps::{CIDRS, IDENTITIES, NODE_PORTS, POLICY, PREFIX_LENGTHS};

pub struct Verdict {
    pub allowed: bool,
    pub reason: Reason,
    /// The allowing rule, 0 when none.
    pub rule: u32,
    /// Its RULE_STATS slot.
    pub slot: u16,
}

#[inline(always)]
fn allow(reason: Reason, v: PolicyValue) -> Verdict {
    Verdict {
        allowed: true,
        reason,
        rule: v.rule,
        slot: v.slot,
    }
}

/// An allow no rule decided.
const NO_RULE: PolicyValue = PolicyValue {
    rule: 0,
    flags: 0,
    slot: 0,
    _pad: 0,
};

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
        return allow(Reason::NotIsolated, NO_RULE);
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
                    return allow(Reason::Host, NO_RULE);
                }
                return lookup(ep, dir, family, &t.addr, target, proto, t.port);
            }
        }
        return allow(Reason::Host, NO_RULE);
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

// The probes below take no branch but "miss, next length" and "hit": the verifier explores
// every branch of every probe at every call site, and a branch per address word or per bit
// of a length would multiply its paths past its limit. So lengths are bits taken lowest
// first (`PrefixLengths`), counted with a popcount, and masks come from tables.

/// The lowest set bit of `bits` and its index.
#[inline(always)]
fn lowest_bit(bits: u64) -> (u64, u32) {
    let low = bits & bits.wrapping_neg();
    (low, low.wrapping_sub(1).count_ones())
}

/// The longest POLICY entry for `(peer, proto, port)` among the lengths in `lengths`.
#[inline(always)]
fn policy_match(
    ep: &EndpointInfo,
    dir: u8,
    peer: u32,
    proto: u8,
    port_be: u16,
    lengths: u32,
) -> Option<PolicyValue> {
    let mut bits = u64::from(lengths);
    for _ in 0..POLICY_MASKS.len() {
        if bits == 0 {
            break;
        }
        let (low, j) = lowest_bit(bits);
        bits ^= low;
        if j as usize >= POLICY_MASKS.len() {
            break;
        }
        // Bit j: the prefix of POLICY_KEY_FULL_BITS - j bits.
        let mask = unsafe { POLICY_MASKS.get_unchecked(POLICY_MASKS.len() - 1 - j as usize) };
        let key = PolicyKey {
            endpoint: ep.id,
            peer,
            dir,
            proto: proto & mask.proto,
            port_be: port_be & mask.port_be,
            prefix_len: (POLICY_KEY_FULL_BITS - j) as u8,
            _pad: [0; 3],
        };
        if let Some(v) = unsafe { POLICY.get(&key) } {
            return Some(*v);
        }
    }
    None
}

/// The class of the longest CIDRS prefix containing `full.addr` among the lengths of one word
/// of a length set: bit `j` is the length `longest - j`.
#[inline(always)]
fn cidr_match_word(full: &CidrKey, longest: u32, bits: u64) -> Option<u32> {
    let addr: [u32; 4] = unsafe { core::mem::transmute(full.addr) };
    let mut bits = bits;
    for _ in 0..64 {
        if bits == 0 {
            break;
        }
        let (low, j) = lowest_bit(bits);
        bits ^= low;
        // LLVM knows `j <= 64` and would drop this check for the IPv6 words; the verifier
        // needs it to bound the table index. The volatile read hides what LLVM knows.
        let j = unsafe { core::ptr::read_volatile(&j) };
        if j > longest {
            break;
        }
        let len = longest - j;
        let mask: &[u32; 4] =
            unsafe { &*(CIDR_MASKS.get_unchecked(len as usize) as *const [u8; 16]).cast() };
        let masked = [
            addr[0] & mask[0],
            addr[1] & mask[1],
            addr[2] & mask[2],
            addr[3] & mask[3],
        ];
        let key = CidrKey {
            prefix_len: len as u8,
            addr: unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(masked) },
            ..*full
        };
        if let Some(class) = unsafe { CIDRS.get(&key) } {
            return Some(*class);
        }
    }
    None
}

/// The class of the longest CIDRS prefix containing `addr`.
#[inline(always)]
fn cidr_match(
    ep: &EndpointInfo,
    dir: u8,
    family: u8,
    addr: &[u8; 16],
    lengths: &PrefixLengths,
) -> Option<u32> {
    let full = CidrKey {
        endpoint: ep.id,
        dir,
        family,
        prefix_len: 0,
        _pad: 0,
        addr: *addr,
    };
    if family == AF_INET {
        return cidr_match_word(&full, 32, lengths.v4);
    }
    if let Some(c) = cidr_match_word(&full, 128, lengths.v6[0]) {
        return Some(c);
    }
    if let Some(c) = cidr_match_word(&full, 64, lengths.v6[1]) {
        return Some(c);
    }
    cidr_match_word(&full, 0, lengths.v6[2] & 1)
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
    let deny = Verdict {
        allowed: false,
        reason: Reason::NoRuleMatched,
        rule: 0,
        slot: 0,
    };
    let key = PrefixLengthsKey {
        endpoint: ep.id,
        dir,
        _pad: [0; 3],
    };
    // No lengths: the endpoint has no entries in this direction.
    let Some(lengths) = (unsafe { PREFIX_LENGTHS.get(&key) }) else {
        return deny;
    };
    let port_be = port.to_be();
    if identity != IDENTITY_NONE
        && let Some(v) = policy_match(ep, dir, identity, proto, port_be, lengths.policy)
    {
        return allow(Reason::PolicyAllow, v);
    }
    if let Some(class) = cidr_match(ep, dir, family, peer, lengths)
        && class != CIDR_CLASS_NONE
        && let Some(v) = policy_match(ep, dir, class, proto, port_be, lengths.policy)
    {
        return allow(Reason::PolicyAllow, v);
    }
    deny
}
