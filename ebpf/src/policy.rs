//! Policy lookup for a new flow: one IDENTITIES lookup, one PREFIX_LENGTHS lookup, then
//! longest-prefix matches in POLICY and CIDRS, each a hash probe per prefix length the
//! endpoint uses (`common`, CIDRS and POLICY), whatever the number of policies.
//!
//! Precedence per direction (ClusterNetworkPolicy's, with NetworkPolicy in the middle):
//! 1. an endpoint neither isolated by NetworkPolicy nor selected by a ClusterNetworkPolicy in
//!    this direction allows everything;
//! 2. a pod's egress to a port the node DNATs onward (NODE_PORTS: a NodePort, a hostPort) is
//!    judged as egress to where the DNAT leads (a ClusterIP and its port, a pod and its
//!    container port);
//! 3. the Admin tier: of the entries found (the peer's pod identity, the CIDR class of the
//!    longest CIDRS prefix containing the peer, and for egress the domain class the endpoint's
//!    DNS answers gave the peer, FQDN_IPS, unexpired for a new flow), the lower-ranked Admin
//!    rule decides: Accept allows, Deny drops; Pass, or no Admin rule, goes on;
//! 4. NetworkPolicy, if it isolates the endpoint: the node's own addresses (IDENTITY_HOST) are
//!    allowed, then either entry's allow allows, else the flow is dropped (where NetworkPolicy
//!    is audited only, the Baseline tier is still asked whether it drops for real);
//! 5. the Baseline tier, as the Admin tier;
//! 6. otherwise allowed.
//!
//! The compiler resolved each entry's answer per tier (first matching rule, port prefixes
//! flattened), so a new flow compares two ranks whatever the number of policies.
// Keys are passed to `get` by reference: passed by value, LLVM once laid the CIDRS probe out so
// that a path read a register a helper call had clobbered (harmless to LLVM, "R4 !read_ok" to
// the verifier). `verifier_accepts_both_programs` guards it.
#![allow(clippy::needless_borrows_for_generic_args)]

use palisade_common::{
    AF_INET, CIDR_CLASS_NONE, CIDR_MASKS, CidrKey, DIR_AUDIT_VIEW, DIR_EGRESS, EP_FQDN,
    EndpointInfo, FqdnKey, IDENTITY_HOST, IDENTITY_NONE, NodePortKey, POLICY_KEY_FULL_BITS,
    POLICY_MASKS, PeerAddr, PolicyKey, PolicyValue, PrefixLengths, PrefixLengthsKey, Reason,
    TIER_ACTION_ACCEPT, TIER_ACTION_DENY, TierMatch, audit_flag, isolated_flag, tiered_flag,
};

use crate::events::now_ns;
use crate::maps::{CIDRS, FQDN_IPS, IDENTITIES, MATCH_SCRATCH, NODE_PORTS, POLICY, PREFIX_LENGTHS};

pub struct Verdict {
    pub allowed: bool,
    pub reason: Reason,
    /// The deciding rule (a NetworkPolicy allow, a tier's Accept or Deny), 0 when none.
    pub rule: u32,
    /// Its RULE_STATS slot.
    pub slot: u16,
}

#[inline(always)]
fn allow(reason: Reason, rule: u32, slot: u16) -> Verdict {
    Verdict {
        allowed: true,
        reason,
        rule,
        slot,
    }
}

/// No entry: no rule of any kind.
static NO_ENTRY: PolicyValue = PolicyValue {
    rule: 0,
    flags: 0,
    slot: 0,
    _pad: 0,
    admin: TierMatch::NONE,
    baseline: TierMatch::NONE,
};

#[inline(always)]
fn deny(reason: Reason, rule: u32, slot: u16) -> Verdict {
    Verdict {
        allowed: false,
        reason,
        rule,
        slot,
    }
}

/// Of two tier answers, the one that decides first (in place: no copy on the stack).
#[inline(always)]
fn first<'a>(a: &'a TierMatch, b: &'a TierMatch) -> &'a TierMatch {
    if b.rank < a.rank { b } else { a }
}

/// A tier's decision, if its first matching rule accepts or denies.
#[inline(always)]
fn tier_decides(m: &TierMatch) -> Option<Verdict> {
    if m.action == TIER_ACTION_ACCEPT {
        return Some(allow(Reason::TierAccept, m.rule, m.slot));
    }
    if m.action == TIER_ACTION_DENY {
        return Some(deny(Reason::TierDeny, m.rule, m.slot));
    }
    None
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

/// The verdict for a new flow (or, `recheck`, an established one) at endpoint `ep`, in
/// direction `dir`, with `peer` the other end's address and `port` the destination port.
#[inline(always)]
pub fn evaluate(
    ep: &EndpointInfo,
    dir: u8,
    family: u8,
    peer: &[u8; 16],
    proto: u8,
    port: u16,
    recheck: bool,
) -> Verdict {
    let query = u64::from(dir)
        | u64::from(family) << 8
        | u64::from(proto) << 16
        | u64::from(recheck) << 24
        | u64::from(port) << 32;
    let packed = evaluate_packed(ep, peer, query);
    Verdict {
        allowed: packed & 1 != 0,
        reason: Reason::from_u8((packed >> 8) as u8).unwrap_or(Reason::NoRuleMatched),
        slot: (packed >> 16) as u16,
        rule: (packed >> 32) as u32,
    }
}

/// `evaluate`'s body: a call of its own, not inlined at its three call sites (each copy's
/// frame would add to the handler's past the 512-byte stack limit). A BPF call takes at most
/// five arguments and returns one register, so the query and the verdict are packed: `query`
/// is dir | family << 8 | proto << 16 | recheck << 24 | port << 32, the result allowed |
/// reason << 8 | slot << 16 | rule << 32.
#[inline(never)]
fn evaluate_packed(ep: &EndpointInfo, peer: &[u8; 16], query: u64) -> u64 {
    let v = evaluate_inner(ep, query, peer);
    u64::from(v.allowed)
        | u64::from(v.reason as u8) << 8
        | u64::from(v.slot) << 16
        | u64::from(v.rule) << 32
}

#[inline(always)]
fn evaluate_inner(ep: &EndpointInfo, query: u64, peer: &[u8; 16]) -> Verdict {
    let (dir, family, proto, port) = (
        query as u8,
        (query >> 8) as u8,
        (query >> 16) as u8,
        (query >> 32) as u16,
    );
    let recheck = (query >> 24) as u8 != 0;
    // `view`: the direction in the keys (the audit view's has `DIR_AUDIT_VIEW`); `dir`: the
    // direction itself. The audit view is tiered by construction.
    let view = dir;
    let dir = dir & !DIR_AUDIT_VIEW;
    let tiered = ep.flags & tiered_flag(dir) != 0 || view != dir;
    if ep.flags & isolated_flag(dir) == 0 && !tiered {
        return allow(Reason::NotIsolated, 0, 0);
    }
    let identity = identity_of(family, peer);
    if identity == IDENTITY_HOST && dir == DIR_EGRESS {
        let key = NodePortKey {
            family,
            proto,
            port_be: port.to_be(),
        };
        if let Some(t) = unsafe { NODE_PORTS.get(key) } {
            let t = *t;
            let target = identity_of(family, &t.addr);
            return decide(
                ep, view, family, &t.addr, target, proto, t.port, tiered, recheck,
            );
        }
    }
    if identity == IDENTITY_HOST && !tiered {
        return allow(Reason::Host, 0, 0);
    }
    decide(
        ep, view, family, peer, identity, proto, port, tiered, recheck,
    )
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
) -> Option<&'static PolicyValue> {
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
            return Some(v);
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

/// The domain class the endpoint's DNS answers gave `addr` (the audit view's in the audit
/// view), if it has not expired; a re-checked flow keeps the class past its expiry (flows
/// outlive the answer's TTL).
#[inline(always)]
fn learned_class(
    ep: &EndpointInfo,
    audit_view: bool,
    family: u8,
    addr: &[u8; 16],
    recheck: bool,
) -> Option<u32> {
    let key = FqdnKey {
        endpoint: ep.id,
        family,
        _pad: [0; 3],
        addr: *addr,
    };
    let v = unsafe { FQDN_IPS.get(&key) }?;
    if !recheck && now_ns() >= v.expires_ns {
        return None;
    }
    Some(if audit_view { v.audit_class } else { v.class })
}

/// Steps 3-6 for `peer` (of `identity`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn decide(
    ep: &EndpointInfo,
    dir: u8,
    family: u8,
    peer: &[u8; 16],
    identity: u32,
    proto: u8,
    port: u16,
    tiered: bool,
    recheck: bool,
) -> Verdict {
    // Keys carry the view (`dir` with `DIR_AUDIT_VIEW` for the audit view); flags the direction.
    let view = dir;
    let dir = dir & !DIR_AUDIT_VIEW;
    let isolated = ep.flags & isolated_flag(dir) != 0;
    let Some(found) = MATCH_SCRATCH.get_ptr_mut(0) else {
        return deny(Reason::NoRuleMatched, 0, 0);
    };
    // SAFETY: per-CPU slot, and a program runs to completion on its CPU.
    let found = unsafe { &mut *found };
    found[0] = NO_ENTRY;
    found[1] = NO_ENTRY;
    found[2] = NO_ENTRY;
    let key = PrefixLengthsKey {
        endpoint: ep.id,
        dir: view,
        _pad: [0; 3],
    };
    let port_be = port.to_be();
    // No lengths: the endpoint has no entries in this direction.
    if let Some(lengths) = unsafe { PREFIX_LENGTHS.get(&key) } {
        if identity != IDENTITY_NONE
            && identity != IDENTITY_HOST
            && let Some(v) = policy_match(ep, view, identity, proto, port_be, lengths.policy)
        {
            found[0] = *v;
        }
        if let Some(class) = cidr_match(ep, view, family, peer, lengths)
            && class != CIDR_CLASS_NONE
            && let Some(v) = policy_match(ep, view, class, proto, port_be, lengths.policy)
        {
            found[1] = *v;
        }
        if dir == DIR_EGRESS
            && ep.flags & EP_FQDN != 0
            && let Some(class) = learned_class(ep, view != dir, family, peer, recheck)
            && let Some(v) = policy_match(ep, view, class, proto, port_be, lengths.policy)
        {
            found[2] = *v;
        }
    }
    let (by_identity, by_cidr, by_name) = (&found[0], &found[1], &found[2]);
    if tiered
        && let Some(v) = tier_decides(first(
            first(&by_identity.admin, &by_cidr.admin),
            &by_name.admin,
        ))
    {
        return v;
    }
    if isolated {
        if identity == IDENTITY_HOST {
            return allow(Reason::Host, 0, 0);
        }
        if by_identity.rule != 0 {
            return allow(Reason::PolicyAllow, by_identity.rule, by_identity.slot);
        }
        if by_cidr.rule != 0 {
            return allow(Reason::PolicyAllow, by_cidr.rule, by_cidr.slot);
        }
        // NetworkPolicy denies. Where it is only audited, it does not decide: the Baseline
        // tier may still drop for real; otherwise the caller records "would drop".
        if !tiered || ep.flags & audit_flag(dir) == 0 {
            return deny(Reason::NoRuleMatched, 0, 0);
        }
    }
    if tiered
        && let Some(v) = tier_decides(first(
            first(&by_identity.baseline, &by_cidr.baseline),
            &by_name.baseline,
        ))
        && (!v.allowed || !isolated)
    {
        return v;
    }
    if isolated {
        return deny(Reason::NoRuleMatched, 0, 0);
    }
    allow(Reason::NotIsolated, 0, 0)
}
