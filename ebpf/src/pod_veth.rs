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
    AF_INET6, CT_FLAG_AUDIT, CT_ROLE_RESPONSE, Counter, DIR_AUDIT_VIEW, DIR_EGRESS, DIR_INGRESS,
    EP_FQDN, EP_MORE_ADDRS, EP_PENDING, EP_TIERED, EndpointInfo, PROTO_UDP, PeerAddr, Reason,
    VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DROP, audit_flag, endpoint_slot, isolated_flag,
    tier_audit_flag,
};

use crate::{
    conntrack::{self, Lookup},
    dns,
    events::{count, count_audit, count_drop, count_rule, emit, now_ns},
    maps::{ENDPOINT_SLOTS, ENDPOINTS, EP_ADDRS, EP_SCRATCH, SCRATCH},
    packet::{
        KIND_ICMP_ERROR, KIND_NEIGHBOR, KIND_UNKNOWN_FRAGMENT, KIND_UNTRACKED, ND_NEIGHBOR_ADVERT,
        ND_REDIRECT, ND_ROUTER_ADVERT, Packet, empty_packet,
    },
    parse::{self, Frame},
    policy::{self, Verdict},
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
        // Allowed (or audited): an EgressGateway may steer it (`egress`).
        Ok(TC_ACT_OK) => crate::egress::steer(&ctx),
        Ok(action) | Err(action) => action,
    }
}

/// The peer of the endpoint for a packet in `dir`: the source of traffic to the pod, the
/// destination of traffic from it.
#[inline(always)]
fn peer(dir: u8, src: &[u8; 16], dst: &[u8; 16]) -> [u8; 16] {
    if dir == DIR_INGRESS { *src } else { *dst }
}

/// Is `addr` one of the endpoint's own addresses? Compares with those inline in its entry;
/// looks up EP_ADDRS only for an endpoint with more.
#[inline(always)]
fn own_address(ep: &EndpointInfo, family: u8, addr: &[u8; 16]) -> bool {
    if ep.has_inline_address(family, addr) {
        return true;
    }
    if ep.flags & EP_MORE_ADDRS == 0 {
        return false;
    }
    let key = PeerAddr {
        family,
        _pad: [0; 3],
        addr: *addr,
    };
    matches!(unsafe { EP_ADDRS.get(key) }, Some(id) if *id == ep.id)
}

struct Ctx<'a> {
    /// The endpoint's entry (a per-CPU copy: `maps::EP_SCRATCH`).
    ep: &'a EndpointInfo,
    ifindex: u32,
    dir: u8,
    len: u32,
    now: u64,
}

/// The verdict event of a packet at this endpoint (`events::emit`). A call of its own: the
/// event is built on the stack, and inlined at every call site its frame would push
/// `handle`'s past the verifier's 512-byte limit.
#[inline(never)]
fn report(c: &Ctx, pkt: Option<&Packet>, verdict: u8, reason: Reason, rule: u32) {
    emit(
        c.ep.id, c.ifindex, c.dir, c.len, pkt, verdict, reason, rule, c.now,
    );
}

/// Records `pkt` as the first packet of a flow in the direction being judged: allowed by `v`,
/// or (`None`) denied and let through by audit mode. A call of its own, not inlined: its frame
/// and `handle`'s together would pass the verifier's 512-byte stack limit (and a BPF call
/// takes at most five arguments).
#[inline(never)]
fn open_flow(c: &Ctx, pkt: &Packet, v: Option<&Verdict>, occupied: bool) -> Result<(), Reason> {
    let key = conntrack::flow_key(c.ep.id, c.dir, pkt);
    if occupied {
        // The flow the other way that held this key is over: this SYN starts another.
        conntrack::remove(&key);
    }
    let (rule, flags) = match v {
        Some(v) => ((v.rule, v.slot), 0),
        None => ((0, 0), CT_FLAG_AUDIT),
    };
    conntrack::create(&key, c.dir, rule, c.ep.revision, flags, c.len, c.now)
}

/// Drops a packet that the policy of direction `judged` (the packet's own direction, or for a
/// re-checked flow the flow's original one) does not allow. Where that direction is audited,
/// the packet passes and the event says "would drop". Hostile frames (malformed, spoofed,
/// loopback, tunnel, non-IP from a pod) and new flows conntrack has no room for are never
/// audited: policy does not decide them.
#[inline(always)]
fn drop_packet(c: &Ctx, judged: u8, pkt: Option<&Packet>, reason: Reason) -> Result<i32, i32> {
    match drop_action(c, judged, pkt, reason, 0) {
        TC_ACT_OK => Ok(TC_ACT_OK),
        action => Err(action),
    }
}

/// `drop_packet` for a flow policy does not allow, naming the rule that denied it if one did
/// (a ClusterNetworkPolicy Deny rule: never audited by NetworkPolicy's audit mode, and counted
/// in the rule's stats slot).
#[inline(always)]
fn deny_packet(c: &Ctx, judged: u8, pkt: Option<&Packet>, v: &Verdict) -> Result<i32, i32> {
    let rule = (u64::from(v.rule) << 16) | u64::from(v.slot);
    match drop_action(c, judged, pkt, v.reason, rule) {
        TC_ACT_OK => Ok(TC_ACT_OK),
        action => Err(action),
    }
}

/// `drop_packet`'s body, not inlined at each of its many call sites. `rule`: the denying rule
/// id above its 16-bit stats slot, 0 when none.
#[inline(never)]
fn drop_action(c: &Ctx, judged: u8, pkt: Option<&Packet>, reason: Reason, rule: u64) -> i32 {
    let not_policy = matches!(
        reason,
        Reason::Malformed
            | Reason::Spoofed
            | Reason::Loopback
            | Reason::Tunnel
            | Reason::CtQuota
            | Reason::CtFull
            | Reason::TierDeny
    ) || (reason == Reason::NonIp && c.dir == DIR_EGRESS);
    if c.ep.flags & audit_flag(judged) != 0 && !not_policy {
        count_audit(reason);
        report(c, pkt, VERDICT_AUDIT, reason, 0);
        return TC_ACT_OK;
    }
    count_drop(reason);
    if rule != 0 {
        count_rule(rule as u16, c.len);
    }
    report(c, pkt, VERDICT_DROP, reason, (rule >> 16) as u32);
    TC_ACT_SHOT
}

/// What a pod may never send, whatever its policy: a source that is not its own (IPv6
/// link-local and unspecified excepted: they never leave the link), a loopback destination,
/// a packet into one of the node's tunnels, and neighbour discovery that claims an address
/// that is not its own or speaks as a router.
#[inline(always)]
fn egress_guard(ep: &EndpointInfo, pkt: &Packet) -> Result<(), Reason> {
    let link_local_src =
        pkt.family == AF_INET6 && parse::is_link_local_or_unspecified(&pkt.outer_src);
    if !own_address(ep, pkt.family, &pkt.outer_src) && !link_local_src {
        return Err(Reason::Spoofed);
    }
    if is_loopback(pkt.family, &pkt.outer_dst) {
        return Err(Reason::Loopback);
    }
    if pkt.kind == KIND_NEIGHBOR {
        let ok = match pkt.icmp_type {
            ND_ROUTER_ADVERT | ND_REDIRECT => false,
            ND_NEIGHBOR_ADVERT => {
                parse::is_link_local_or_unspecified(&pkt.claimed)
                    || own_address(ep, AF_INET6, &pkt.claimed)
            }
            _ => true,
        };
        return if ok { Ok(()) } else { Err(Reason::Spoofed) };
    }
    if is_tunnel(pkt) && policy::is_node_address(pkt.family, &pkt.outer_dst) {
        return Err(Reason::Tunnel);
    }
    Ok(())
}

/// 127.0.0.0/8 or ::1.
#[inline(always)]
fn is_loopback(family: u8, a: &[u8; 16]) -> bool {
    if family == AF_INET6 {
        *a == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    } else {
        a[0] == 127
    }
}

/// IPIP, IPv6-in-IP, GRE, EtherIP, or UDP to the VXLAN (4789, and flannel's 8472) or Geneve
/// (6081) port: what a node's tunnel device would decapsulate.
#[inline(always)]
fn is_tunnel(pkt: &Packet) -> bool {
    match pkt.outer_proto {
        4 | 41 | 47 | 97 => true,
        PROTO_UDP => matches!(pkt.dport, 4789 | 8472 | 6081),
        _ => false,
    }
}

#[inline(always)]
fn handle(ctx: &TcContext, dir: u8) -> Result<i32, i32> {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // The agent attaches the programs to endpoints only, after writing their entry, and
    // removes the entry only to detach them: an attached interface without an entry is one
    // whose entry could not be written. Fail closed.
    let Some(ep) = EP_SCRATCH.get_ptr_mut(0) else {
        return Err(TC_ACT_SHOT);
    };
    // SAFETY: per-CPU slot, and a program runs to completion on its CPU.
    let ep = unsafe { &mut *ep };
    match ENDPOINT_SLOTS.get(endpoint_slot(ifindex)) {
        Some(slot) if slot.ifindex == ifindex => *ep = slot.info,
        _ => match unsafe { ENDPOINTS.get(ifindex) } {
            Some(entry) => *ep = *entry,
            None => {
                count_drop(Reason::UnknownEndpoint);
                return Err(TC_ACT_SHOT);
            }
        },
    }
    let c = Ctx {
        ep,
        ifindex,
        dir,
        len: ctx.len(),
        now: now_ns(),
    };
    if c.ep.flags & EP_PENDING != 0 {
        count_drop(Reason::Pending);
        report(&c, None, VERDICT_DROP, Reason::Pending, 0);
        return Err(TC_ACT_SHOT);
    }
    let pkt = match SCRATCH.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, and a program runs to completion on its CPU.
        Some(p) => unsafe { &mut *p },
        None => return Err(TC_ACT_SHOT),
    };
    *pkt = empty_packet(0);
    match parse::parse(ctx, pkt) {
        Ok(Frame::Ip) => {}
        Ok(Frame::Arp) => {
            // A pod's ARP speaks for its own address only (or none: a probe), or on a shared
            // link (bridge ports) it could take another pod's traffic.
            if dir == DIR_EGRESS
                && pkt.claimed != [0; 16]
                && !own_address(c.ep, pkt.family, &pkt.claimed)
            {
                return drop_packet(&c, dir, None, Reason::Spoofed);
            }
            return Ok(TC_ACT_OK);
        }
        Ok(Frame::OtherL2) => {
            // A pod sends IP and ARP only (Cilium drops the rest too). VLAN-tagged frames
            // above all: the kernel strips priority tags around the TC hook and delivers the
            // IP packet inside, which would never be judged nor its source checked.
            if dir == DIR_INGRESS && c.ep.flags & isolated_flag(dir) == 0 {
                return Ok(TC_ACT_OK);
            }
            return drop_packet(&c, dir, None, Reason::NonIp);
        }
        Err(_) => {
            count(Counter::Malformed);
            return drop_packet(&c, dir, None, Reason::Malformed);
        }
    }
    if dir == DIR_EGRESS
        && let Err(reason) = egress_guard(c.ep, pkt)
    {
        return drop_packet(&c, dir, Some(pkt), reason);
    }
    if pkt.kind == KIND_NEIGHBOR {
        return Ok(TC_ACT_OK);
    }

    let tracked = pkt.kind != KIND_UNTRACKED;
    let lookup = if tracked {
        conntrack::lookup(c.ep.id, dir, pkt, c.now)
    } else {
        Lookup::Miss
    };
    let occupied = matches!(lookup, Lookup::Occupied);
    match lookup {
        Lookup::Hit(entry, key) => {
            // An ICMP error about a flow passes with it but does not keep it alive: anyone
            // who knows a tuple could otherwise hold its entry open forever.
            let refresh = pkt.kind != KIND_ICMP_ERROR;
            let flow_dir = unsafe { (*entry).dir };
            let original = flow_dir == dir;
            // A DNS answer to a query the pod sent to a trusted server: held until the agent
            // has learned its addresses (`dns`).
            if !original
                && dir == DIR_INGRESS
                && c.ep.flags & EP_FQDN != 0
                && dns::is_answer(ctx, &key, pkt)
            {
                return Ok(dns::snoop(ctx, c.ifindex, c.ep.id, c.now));
            }
            if unsafe { (*entry).revision } == c.ep.revision {
                count(Counter::CtHit);
                count_rule(unsafe { (*entry).slot }, c.len);
                if refresh {
                    conntrack::touch(entry, pkt, original, c.len, c.now);
                }
                return Ok(TC_ACT_OK);
            }
            // Policy changed since the flow was allowed: check the flow's original direction
            // against the current policy.
            count(Counter::Revalidated);
            let v = policy::evaluate(
                c.ep,
                flow_dir,
                key.family,
                &key.peer,
                key.proto,
                key.original_dport(flow_dir),
                true,
            );
            if v.allowed {
                unsafe {
                    (*entry).revision = c.ep.revision;
                    (*entry).rule = v.rule;
                    (*entry).slot = v.slot;
                    (*entry).flags &= !CT_FLAG_AUDIT;
                }
                count_rule(v.slot, c.len);
                if refresh {
                    conntrack::touch(entry, pkt, original, c.len, c.now);
                }
                return Ok(TC_ACT_OK);
            }
            if c.ep.flags & audit_flag(flow_dir) != 0 && v.reason != Reason::TierDeny {
                // Still only audited: the flow stays tracked as "would drop", recorded once
                // per policy change rather than once per packet.
                unsafe {
                    (*entry).revision = c.ep.revision;
                    (*entry).rule = 0;
                    (*entry).slot = 0;
                    (*entry).flags |= CT_FLAG_AUDIT;
                }
                if refresh {
                    conntrack::touch(entry, pkt, original, c.len, c.now);
                }
                return deny_packet(&c, flow_dir, Some(pkt), &v);
            }
            conntrack::remove(&key);
            return deny_packet(&c, flow_dir, Some(pkt), &v);
        }
        Lookup::Miss | Lookup::Occupied => {}
    }

    if pkt.kind == KIND_ICMP_ERROR {
        // Not about any tracked flow: judge it as the ICMP packet it is.
        let v = policy::evaluate(
            c.ep,
            dir,
            pkt.family,
            &peer(dir, &pkt.outer_src, &pkt.outer_dst),
            pkt.outer_proto,
            0,
            false,
        );
        if v.allowed {
            count_rule(v.slot, c.len);
            return Ok(TC_ACT_OK);
        }
        return deny_packet(&c, dir, Some(pkt), &v);
    }

    // The pod's traffic to itself (through a service hairpin) is never restricted: on the way
    // out (its source is verified), and on the way back in only if it entered the node
    // through this same veth. `src == dst` from anywhere else (IPv6 has no martian check for
    // it) is judged like any other packet.
    if pkt.src == pkt.dst
        && own_address(c.ep, pkt.family, &pkt.dst)
        && (dir == DIR_EGRESS || unsafe { (*ctx.skb.skb).ingress_ifindex } == ifindex)
    {
        return Ok(TC_ACT_OK);
    }

    // What may open a conntrack entry: not a fragment of unknown ports (its port-0 tuple
    // would admit other port-0 fragments as "replies"), nothing untracked, and no echo reply
    // (only a request opens an echo flow: else a request could pass as the "reply" of a
    // reply the pod sent).
    let opens_flow = tracked && pkt.kind != KIND_UNKNOWN_FRAGMENT && pkt.role != CT_ROLE_RESPONSE;
    let v = policy::evaluate(
        c.ep,
        dir,
        pkt.family,
        &peer(dir, &pkt.src, &pkt.dst),
        pkt.proto,
        pkt.dport,
        false,
    );
    if !v.allowed {
        if pkt.kind == KIND_UNKNOWN_FRAGMENT && v.reason != Reason::TierDeny {
            return drop_packet(&c, dir, Some(pkt), Reason::Fragment);
        }
        if c.ep.flags & audit_flag(dir) != 0 && opens_flow && v.reason != Reason::TierDeny {
            // The rest of an audited flow (and its replies) passes by conntrack, quietly (if
            // there is no room for it, each packet is audited on its own).
            if open_flow(&c, pkt, None, occupied).is_err() {
                count(Counter::CtInsertFailed);
            }
        }
        return deny_packet(&c, dir, Some(pkt), &v);
    }
    // Node traffic needs no entry, unless ClusterNetworkPolicy rules apply to the pod (the
    // replies of what the node opens must pass where tier rules would judge them). A flow
    // that cannot be tracked is not let through: its replies would be dropped anyway, and an
    // untracked flow escapes revalidation.
    if (v.reason != Reason::Host || c.ep.flags & EP_TIERED != 0)
        && opens_flow
        && let Err(reason) = open_flow(&c, pkt, Some(&v), occupied)
    {
        count(Counter::CtInsertFailed);
        return drop_packet(&c, dir, Some(pkt), reason);
    }
    count(Counter::NewAllowed);
    count_rule(v.slot, c.len);
    // ClusterNetworkPolicies in audit mode: would they drop this flow? Recorded once, when it
    // opens (its later packets pass by conntrack).
    if c.ep.flags & tier_audit_flag(dir) != 0 && opens_flow {
        let w = policy::evaluate(
            c.ep,
            dir | DIR_AUDIT_VIEW,
            pkt.family,
            &peer(dir, &pkt.src, &pkt.dst),
            pkt.proto,
            pkt.dport,
            false,
        );
        if w.reason == Reason::TierDeny {
            count_audit(Reason::TierDeny);
            report(&c, Some(pkt), VERDICT_AUDIT, Reason::TierDeny, w.rule);
            return Ok(TC_ACT_OK);
        }
    }
    report(&c, Some(pkt), VERDICT_ALLOW, v.reason, v.rule);
    Ok(TC_ACT_OK)
}
