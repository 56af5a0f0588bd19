//! Connection tracking, per endpoint.
//!
//! An allowed new flow is recorded under the endpoint that evaluated it, keyed from the pod's
//! side (`CtKey`: the pod's address and port, the peer's), with the direction it was first
//! seen in in its entry. Its later packets and its replies have the same key: one lookup finds
//! the flow either way. Keying by endpoint keeps the two ends of a pod-to-pod flow on one node
//! apart: the source's egress verdict never stands in for the destination's ingress verdict.
//!
//! The table never evicts: each endpoint holds at most its quota of entries, and every
//! insertion and removal here is counted in the endpoint's EP_STATE (`common`, CT_FLOWS).
use core::sync::atomic::{AtomicU64, Ordering};

use palisade_common::{
    CT_FLAG_CLOSING, CT_FLAG_FIN_ORIGINAL, CT_FLAG_FIN_REPLY, CT_FLAG_REPLIED, CT_FLAG_RST,
    CT_REFRESH_NS, CtEntry, CtKey, PROTO_TCP, Reason, ct_expired, ct_live,
};

use crate::{
    maps::{CT_FLOWS, CT_QUOTA, CT_RELEASED, EP_STATE, endpoint_state},
    packet::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
};

pub enum Lookup {
    Miss,
    /// The flow's key is taken by a flow the other way (the pod's own SYN-ACK from this port,
    /// say): this SYN starts a new flow, which replaces it if policy allows it.
    Occupied,
    /// The entry and its key.
    Hit(*mut CtEntry, CtKey),
}

/// The key of `pkt`'s flow at `endpoint`, which sees it in `dir`.
#[inline(always)]
pub fn flow_key(endpoint: u32, dir: u8, pkt: &Packet) -> CtKey {
    CtKey::new(
        endpoint,
        dir,
        pkt.family,
        pkt.proto,
        (pkt.src, pkt.sport),
        (pkt.dst, pkt.dport),
        pkt.role,
    )
}

/// `*counter += 1`, atomically: every CPU counts into the same EP_STATE entry.
#[inline(always)]
fn add_one(counter: *mut u64) {
    unsafe { AtomicU64::from_ptr(counter) }.fetch_add(1, Ordering::Relaxed);
}

/// Reads a counter other CPUs add to (an aligned 8-byte load is atomic on BPF; LLVM's BPF
/// backend has no relaxed atomic load to say so).
#[inline(always)]
fn load(counter: *mut u64) -> u64 {
    unsafe { core::ptr::read_volatile(counter) }
}

/// Removes `key`'s entry, counting it only if this call removed it.
#[inline(always)]
fn delete(key: &CtKey) {
    if CT_FLOWS.remove(key).is_ok()
        && let Some(state) = EP_STATE.get_ptr_mut(key.endpoint)
    {
        add_one(unsafe { &raw mut (*state).ct_closed });
    }
}

/// Returns a live entry for `key`; stale entries are removed.
#[inline(always)]
fn live(key: &CtKey, now: u64) -> Option<*mut CtEntry> {
    let e = CT_FLOWS.get_ptr_mut(key)?;
    if ct_expired(key.proto, unsafe { &*e }, now) {
        delete(key);
        return None;
    }
    Some(e)
}

#[inline(always)]
pub fn lookup(endpoint: u32, dir: u8, pkt: &Packet, now: u64) -> Lookup {
    let key = flow_key(endpoint, dir, pkt);
    let Some(e) = live(&key, now) else {
        return Lookup::Miss;
    };
    // A SYN without ACK opens a connection in its own direction: it is never a reply.
    let syn_only = pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if syn_only {
        if unsafe { (*e).dir } != dir {
            // Taking it for a reply would let an entry the pod's own packets created (a
            // SYN-ACK from its port, say) admit a new connection to that port past its
            // ingress policy; the SYN is judged by policy instead.
            return Lookup::Occupied;
        }
        // A new SYN on a closing connection's tuple starts a new flow: evaluate it afresh.
        if unsafe { (*e).flags } & CT_FLAG_CLOSING != 0 {
            delete(&key);
            return Lookup::Miss;
        }
    }
    Lookup::Hit(e, key)
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
    if !original && e.flags & CT_FLAG_REPLIED == 0 {
        // The first answer: from now on the flow has the long timeout.
        e.flags |= CT_FLAG_REPLIED;
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

/// Records an allowed new flow: `Err` names why it could not (the endpoint holds its quota,
/// or the table is full). A flow another CPU recorded meanwhile counts as recorded.
#[inline(always)]
pub fn create(
    key: &CtKey,
    dir: u8,
    (rule, slot): (u32, u16),
    revision: u32,
    flags: u32,
    len: u32,
    now: u64,
) -> Result<(), Reason> {
    let state = endpoint_state(key.endpoint, now).ok_or(Reason::CtFull)?;
    let released = unsafe { CT_RELEASED.get(key.endpoint) }
        .copied()
        .unwrap_or(0);
    let quota = unsafe { core::ptr::read_volatile(&CT_QUOTA) };
    let (opened, closed) = unsafe { (&raw mut (*state).ct_opened, &raw mut (*state).ct_closed) };
    // Racing CPUs of one endpoint may each see room for one more: the quota is exact to
    // within the number of CPUs, the accounting exactly.
    if ct_live(load(opened), load(closed), released) >= i64::from(quota) {
        return Err(Reason::CtQuota);
    }
    let entry = CtEntry {
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: len as u64,
        rule,
        revision,
        flags,
        dir,
        _pad: 0,
        slot,
    };
    const BPF_NOEXIST: u64 = 1;
    const EEXIST: i32 = 17;
    match CT_FLOWS.insert(key, entry, BPF_NOEXIST) {
        Ok(()) => {
            add_one(opened);
            Ok(())
        }
        Err(e) if e == -EEXIST => Ok(()),
        Err(_) => Err(Reason::CtFull),
    }
}

#[inline(always)]
pub fn remove(key: &CtKey) {
    delete(key);
}
