//! The attach point: the host side of a pod's veth.
//!
//! `to_pod` runs on the veth's TC egress (packets the node sends into the pod: the pod's
//! ingress); `from_pod` on its TC ingress (packets the pod sends: the pod's egress).
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    macros::classifier,
    programs::TcContext,
};
use palisade_common::{
    AF_INET6, CT_FLAG_AUDIT, Counter, DIR_EGRESS, DIR_INGRESS, EP_PENDING, EndpointInfo, PeerAddr,
    Reason, VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DROP, audit_flag, isolated_flag,
};

use crate::{
    conntrack::{self, Lookup},
    events::{count, count_audit, count_drop, count_rule, emit, now_ns},
    maps::{ENDPOINTS, EP_ADDRS, SCRATCH},
    parse::{self, Frame, KIND_ICMP_ERROR, KIND_NEIGHBOR, KIND_UNKNOWN_FRAGMENT, Packet},
    policy,
};

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    match handle(&ctx, DIR_INGRESS) {
        Ok(action) | Err(action) => action,
    }
}

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    match handle(&ctx, DIR_EGRESS) {
        Ok(action) | Err(action) => action,
    }
}

/// The peer of the endpoint for a packet in `dir`: the source of traffic to the pod, the
/// destination of traffic from it.
#[inline(always)]
fn peer(dir: u8, src: &[u8; 16], dst: &[u8; 16]) -> [u8; 16] {
    if dir == DIR_INGRESS { *src } else { *dst }
}

/// Is `addr` one of the endpoint's own addresses?
#[inline(always)]
fn own_address(ep: &EndpointInfo, family: u8, addr: &[u8; 16]) -> bool {
    let key = PeerAddr {
        family,
        _pad: [0; 3],
        addr: *addr,
    };
    matches!(unsafe { EP_ADDRS.get(key) }, Some(id) if *id == ep.id)
}

struct Ctx {
    ep: EndpointInfo,
    ifindex: u32,
    dir: u8,
    len: u32,
    now: u64,
}

/// Drops a packet that the policy of direction `judged` (the packet's own direction, or for a
/// re-checked flow the flow's original one) does not allow. Where that direction is audited,
/// the packet passes and the event says "would drop". Malformed and spoofed packets are never
/// audited.
#[inline(always)]
fn drop_packet(c: &Ctx, judged: u8, pkt: Option<&Packet>, reason: Reason) -> Result<i32, i32> {
    if c.ep.flags & audit_flag(judged) != 0
        && reason != Reason::Malformed
        && reason != Reason::Spoofed
    {
        count_audit(reason);
        emit(
            c.ep.id,
            c.ifindex,
            c.dir,
            c.len,
            pkt,
            VERDICT_AUDIT,
            reason,
            0,
            c.now,
        );
        return Ok(TC_ACT_OK);
    }
    count_drop(reason);
    emit(
        c.ep.id,
        c.ifindex,
        c.dir,
        c.len,
        pkt,
        VERDICT_DROP,
        reason,
        0,
        c.now,
    );
    Err(TC_ACT_SHOT)
}

#[inline(always)]
fn handle(ctx: &TcContext, dir: u8) -> Result<i32, i32> {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // The agent attaches the programs to endpoints only, after writing their entry, and
    // removes the entry only to detach them: an attached interface without an entry is one
    // whose entry could not be written. Fail closed.
    let ep = match unsafe { ENDPOINTS.get(ifindex) } {
        Some(ep) => *ep,
        None => {
            count_drop(Reason::UnknownEndpoint);
            return Err(TC_ACT_SHOT);
        }
    };
    let c = Ctx {
        ep,
        ifindex,
        dir,
        len: ctx.len(),
        now: now_ns(),
    };
    if ep.flags & EP_PENDING != 0 {
        count_drop(Reason::Pending);
        emit(
            ep.id,
            ifindex,
            dir,
            c.len,
            None,
            VERDICT_DROP,
            Reason::Pending,
            0,
            c.now,
        );
        return Err(TC_ACT_SHOT);
    }
    let pkt = match SCRATCH.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, and a program runs to completion on its CPU.
        Some(p) => unsafe { &mut *p },
        None => return Err(TC_ACT_SHOT),
    };
    *pkt = parse::empty_packet(0);
    match parse::parse(ctx, pkt) {
        Ok(Frame::Ip) => {}
        Ok(Frame::Arp) => return Ok(TC_ACT_OK),
        Ok(Frame::OtherL2) => {
            if ep.flags & isolated_flag(dir) == 0 {
                return Ok(TC_ACT_OK);
            }
            return drop_packet(&c, dir, None, Reason::NonIp);
        }
        Err(_) => {
            count(Counter::Malformed);
            return drop_packet(&c, dir, None, Reason::Malformed);
        }
    }
    // Source address verification: a pod sends from its own addresses only (IPv6 link-local
    // and unspecified sources excepted: they never leave the link).
    if dir == DIR_EGRESS
        && !own_address(&ep, pkt.family, &pkt.outer_src)
        && !(pkt.family == AF_INET6 && parse::is_link_local_or_unspecified(&pkt.outer_src))
    {
        return drop_packet(&c, dir, Some(pkt), Reason::Spoofed);
    }
    if pkt.kind == KIND_NEIGHBOR {
        return Ok(TC_ACT_OK);
    }

    match conntrack::lookup(ep.id, dir, pkt, c.now) {
        Lookup::Hit(entry, key) => {
            if unsafe { (*entry).revision } == ep.revision {
                count(Counter::CtHit);
                count_rule(unsafe { (*entry).rule }, c.len);
                conntrack::touch(entry, pkt, c.len, c.now);
                return Ok(TC_ACT_OK);
            }
            // Policy changed since the flow was allowed: check the flow's original direction
            // against the current policy.
            count(Counter::Revalidated);
            let v = policy::evaluate(
                &ep,
                key.dir,
                key.family,
                &peer(key.dir, &key.src, &key.dst),
                key.proto,
                key.dport,
            );
            if v.allowed {
                unsafe {
                    (*entry).revision = ep.revision;
                    (*entry).rule = v.rule;
                    (*entry).flags &= !CT_FLAG_AUDIT;
                }
                count_rule(v.rule, c.len);
                conntrack::touch(entry, pkt, c.len, c.now);
                return Ok(TC_ACT_OK);
            }
            if ep.flags & audit_flag(key.dir) != 0 {
                // Still only audited: the flow stays tracked as "would drop", recorded once
                // per policy change rather than once per packet.
                unsafe {
                    (*entry).revision = ep.revision;
                    (*entry).rule = 0;
                    (*entry).flags |= CT_FLAG_AUDIT;
                }
                conntrack::touch(entry, pkt, c.len, c.now);
                return drop_packet(&c, key.dir, Some(pkt), v.reason);
            }
            conntrack::remove(&key);
            return drop_packet(&c, key.dir, Some(pkt), v.reason);
        }
        Lookup::Miss => {}
    }

    if pkt.kind == KIND_ICMP_ERROR {
        // Not about any tracked flow: judge it as the ICMP packet it is.
        let v = policy::evaluate(
            &ep,
            dir,
            pkt.family,
            &peer(dir, &pkt.outer_src, &pkt.outer_dst),
            pkt.outer_proto,
            0,
        );
        if v.allowed {
            count_rule(v.rule, c.len);
            return Ok(TC_ACT_OK);
        }
        return drop_packet(&c, dir, Some(pkt), v.reason);
    }

    // The pod's traffic to itself (through a service hairpin) is never restricted.
    if pkt.src == pkt.dst && own_address(&ep, pkt.family, &pkt.dst) {
        return Ok(TC_ACT_OK);
    }

    let v = policy::evaluate(
        &ep,
        dir,
        pkt.family,
        &peer(dir, &pkt.src, &pkt.dst),
        pkt.proto,
        pkt.dport,
    );
    if !v.allowed {
        let reason = if pkt.kind == KIND_UNKNOWN_FRAGMENT {
            Reason::Fragment
        } else {
            v.reason
        };
        if ep.flags & audit_flag(dir) != 0 {
            // The rest of an audited flow (and its replies) passes by conntrack, quietly.
            let key = conntrack::forward_key(ep.id, dir, pkt);
            conntrack::create(&key, 0, ep.revision, CT_FLAG_AUDIT, c.len, c.now);
        }
        return drop_packet(&c, dir, Some(pkt), reason);
    }
    // Node traffic needs no entry; nor does a later fragment whose first fragment was not
    // seen (its port-0 tuple would admit other port-0 fragments as "replies").
    if v.reason != Reason::Host && pkt.kind != KIND_UNKNOWN_FRAGMENT {
        let key = conntrack::forward_key(ep.id, dir, pkt);
        if !conntrack::create(&key, v.rule, ep.revision, 0, c.len, c.now) {
            count(Counter::CtInsertFailed);
        }
    }
    count(Counter::NewAllowed);
    count_rule(v.rule, c.len);
    emit(
        ep.id,
        ifindex,
        dir,
        c.len,
        Some(pkt),
        VERDICT_ALLOW,
        v.reason,
        v.rule,
        c.now,
    );
    Ok(TC_ACT_OK)
}
