//! Connection tracking, per endpoint and direction.
//!
//! An allowed new flow is recorded under the endpoint that evaluated it, with the direction it
//! was first seen in. Its later packets match the same key ("forward"); its replies match the
//! swapped tuple in the opposite direction ("reply"). Keying by endpoint keeps the two ends of
//! a pod-to-pod flow on one node apart: the source's egress verdict never stands in for the
//! destination's ingress verdict.
use palisade_common::{
    CT_FLAG_CLOSING, CT_FLAG_FIN_ORIGINAL, CT_FLAG_FIN_REPLY, CT_FLAG_RST, CT_REFRESH_NS,
    CT_TIMEOUT_OTHER_NS, CT_TIMEOUT_TCP_CLOSING_NS, CT_TIMEOUT_TCP_NS, CtEntry, CtKey, DIR_EGRESS,
    DIR_INGRESS, PROTO_TCP, ct_reply_role,
};

use crate::{
    maps::CONNTRACK,
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

pub enum Lookup {
    Miss,
    /// The entry, the key it is stored under (the flow's original direction).
    Hit(*mut CtEntry, CtKey),
}

#[inline(always)]
pub fn opposite(dir: u8) -> u8 {
    if dir == DIR_INGRESS {
        DIR_EGRESS
    } else {
        DIR_INGRESS
    }
}

/// The key of `pkt` as the first packet of a flow seen by `endpoint` in `dir`.
#[inline(always)]
pub fn forward_key(endpoint: u32, dir: u8, pkt: &Packet) -> CtKey {
    CtKey {
        endpoint,
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        dir,
        family: pkt.family,
        role: pkt.role,
    }
}

#[inline(always)]
fn timeout(proto: u8, flags: u32) -> u64 {
    if proto != PROTO_TCP {
        CT_TIMEOUT_OTHER_NS
    } else if flags & CT_FLAG_CLOSING != 0 {
        CT_TIMEOUT_TCP_CLOSING_NS
    } else {
        CT_TIMEOUT_TCP_NS
    }
}

/// Returns a live entry for `key`; stale entries are removed.
#[inline(always)]
fn live(key: &CtKey, now: u64) -> Option<*mut CtEntry> {
    let e = CONNTRACK.get_ptr_mut(key)?;
    let (last_seen, flags) = unsafe { ((*e).last_seen_ns, (*e).flags) };
    if now.saturating_sub(last_seen) > timeout(key.proto, flags) {
        let _ = CONNTRACK.remove(key);
        return None;
    }
    Some(e)
}

#[inline(always)]
pub fn lookup(endpoint: u32, dir: u8, pkt: &Packet, now: u64) -> Lookup {
    let key = forward_key(endpoint, dir, pkt);
    // A SYN without ACK opens a connection in its own direction: it is never a reply.
    let syn_only = pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if let Some(e) = live(&key, now) {
        // A new SYN on a closing connection's tuple starts a new flow: evaluate it afresh.
        if syn_only && unsafe { (*e).flags } & CT_FLAG_CLOSING != 0 {
            let _ = CONNTRACK.remove(key);
            return Lookup::Miss;
        }
        return Lookup::Hit(e, key);
    }
    if syn_only {
        // Matching it against the opposite direction's entries would let an entry the pod's
        // own packets created (a SYN-ACK from its port, say) admit a new connection to that
        // port past its ingress policy; the SYN is judged by policy instead.
        return Lookup::Miss;
    }
    let reply = CtKey {
        endpoint,
        src: pkt.dst,
        dst: pkt.src,
        sport: pkt.dport,
        dport: pkt.sport,
        proto: pkt.proto,
        dir: opposite(dir),
        family: pkt.family,
        role: ct_reply_role(pkt.role),
    };
    match live(&reply, now) {
        Some(e) => Lookup::Hit(e, reply),
        None => Lookup::Miss,
    }
}

/// Accounts a packet of a tracked flow; `original`: the packet travels in the direction the
/// flow was first seen in (not a reply).
///
/// TCP teardown is tracked per direction, as Linux and Cilium do: one side's FIN (a
/// half-close) leaves the other side free to send for as long as the flow's normal timeout;
/// only FINs from both sides make the entry closing. An RST makes it closing at once, but the
/// next packet that is not an RST undoes that: the receiver ignored the RST (out of window,
/// forged), so the connection lives on.
#[inline(always)]
pub fn touch(e: *mut CtEntry, pkt: &Packet, original: bool, len: u32, now: u64) {
    let e = unsafe { &mut *e };
    e.packets += 1;
    e.bytes += len as u64;
    if now.saturating_sub(e.last_seen_ns) > CT_REFRESH_NS {
        e.last_seen_ns = now;
    }
    if pkt.proto != PROTO_TCP {
        return;
    }
    let both_fins = CT_FLAG_FIN_ORIGINAL | CT_FLAG_FIN_REPLY;
    if pkt.tcp_flags & TCP_RST != 0 {
        e.flags |= CT_FLAG_RST | CT_FLAG_CLOSING;
        return;
    }
    if e.flags & CT_FLAG_RST != 0 {
        e.flags &= !CT_FLAG_RST;
        if e.flags & both_fins != both_fins {
            e.flags &= !CT_FLAG_CLOSING;
        }
        // A packet after an RST proves the flow alive: its idle time starts now.
        e.last_seen_ns = now;
    }
    if pkt.tcp_flags & TCP_FIN != 0 {
        e.flags |= if original {
            CT_FLAG_FIN_ORIGINAL
        } else {
            CT_FLAG_FIN_REPLY
        };
        if e.flags & both_fins == both_fins {
            e.flags |= CT_FLAG_CLOSING;
        }
    }
}

/// Records an allowed new flow. Returns false if the map refused the entry.
#[inline(always)]
pub fn create(key: &CtKey, rule: u32, revision: u32, flags: u32, len: u32, now: u64) -> bool {
    let entry = CtEntry {
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: len as u64,
        rule,
        revision,
        flags,
        _pad: 0,
    };
    CONNTRACK.insert(key, entry, 0).is_ok()
}

#[inline(always)]
pub fn remove(key: &CtKey) {
    let _ = CONNTRACK.remove(key);
}
