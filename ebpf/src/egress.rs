//! Egress gateways (`common`, Egress gateways): after policy allowed a pod's packet, a flow an
//! EgressGateway selects is encapsulated to one of its group's healthy gateway nodes, or
//! dropped if there is none. Never sent out through the pod's own node.
// Keys are passed by reference on purpose: by value they would be copied onto the BPF stack,
// which `from_pod`'s frame mostly takes.
#![allow(clippy::needless_borrows_for_generic_args)]
use aya_ebpf::{
    bindings::{BPF_F_TUNINFO_IPV6, TC_ACT_OK, TC_ACT_SHOT, bpf_tunnel_key},
    helpers::{bpf_get_hash_recalc, bpf_redirect, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use palisade_common::{
    AF_INET, AF_INET6, DIR_EGRESS, EGW_DEST_EXCLUDED, EGW_DEST_FIXED_BITS, EGW_DEVICE_MAC, EGW_VNI,
    EgwDestKey, EgwFlow, EgwGroup, PeerAddr, Reason, VERDICT_DROP, egw_pick,
};

use crate::{
    conntrack,
    events::{count_drop, emit, now_ns},
    maps::{
        EGW_CTL, EGW_DESTS, EGW_FLOWS, EGW_GROUPS, EGW_SCRATCH, EP_SCRATCH, EgwScratch, IDENTITIES,
        SCRATCH,
    },
    packet::KIND_NEIGHBOR,
};

/// Called by `from_pod` for a packet policy let through (`TC_ACT_OK`): steers it to a gateway
/// (`TC_ACT_REDIRECT`), drops it (no healthy gateway), or lets it go on (`TC_ACT_OK`). A call
/// of its own, its keys in a per-CPU scratch (`maps::EGW_SCRATCH`): `from_pod`'s frame takes
/// most of the 512-byte stack.
#[inline(never)]
pub fn steer(ctx: &TcContext) -> i32 {
    let Some(ctl) = EGW_CTL.get(0) else {
        return TC_ACT_OK;
    };
    if ctl.groups == 0 {
        return TC_ACT_OK;
    }
    let (Some(pkt), Some(ep), Some(s)) = (
        SCRATCH.get_ptr(0),
        EP_SCRATCH.get_ptr(0),
        EGW_SCRATCH.get_ptr_mut(0),
    ) else {
        return TC_ACT_SHOT;
    };
    // SAFETY: per-CPU slots (`handle` filled the first two for this packet); a program runs
    // to completion on its CPU.
    let (pkt, ep, s) = unsafe { (&*pkt, &*ep, &mut *s) };
    // ARP, neighbour discovery: link-local, never steered. ICMP errors travel with the tuple
    // of the flow they are about (which is steered if that flow is).
    if (pkt.family != AF_INET && pkt.family != AF_INET6)
        || pkt.outer_proto == 0
        || pkt.kind == KIND_NEIGHBOR
    {
        return TC_ACT_OK;
    }
    s.key = conntrack::flow_key(ep.id, DIR_EGRESS, pkt);
    let ifindex = ctl.ifindex;
    let found = match unsafe { EGW_FLOWS.get(&s.key) } {
        Some(flow) => {
            s.flow = *flow;
            match unsafe { EGW_GROUPS.get(s.flow.group) } {
                // Sticks to its gateway while that one is healthy.
                Some(g) if g.has(s.flow.gateway.node) => true,
                // Its gateway is gone: the flow is broken either way (the new gateway has no
                // NAT state for it); it goes through a live one, or nowhere.
                Some(g) => pick(ctx, s, s.flow.group, g),
                None => {
                    // The EgressGateway is gone: the flow is no longer steered.
                    let _ = EGW_FLOWS.remove(&s.key);
                    return TC_ACT_OK;
                }
            }
        }
        None => {
            // Never cluster-internal: pods, nodes, Service VIPs (all have identities).
            let peer = PeerAddr {
                family: pkt.family,
                _pad: [0; 3],
                addr: pkt.outer_dst,
            };
            if unsafe { IDENTITIES.get(peer) }.is_some() {
                return TC_ACT_OK;
            }
            let plen = if pkt.family == AF_INET { 32 } else { 128 };
            s.lpm.prefix_len = EGW_DEST_FIXED_BITS + plen;
            s.lpm.data = EgwDestKey {
                endpoint: ep.id,
                family: pkt.family,
                _pad: [0; 3],
                addr: pkt.outer_dst,
            };
            let Some(dest) = EGW_DESTS.get(&s.lpm) else {
                return TC_ACT_OK;
            };
            if dest.flags & EGW_DEST_EXCLUDED != 0 {
                return TC_ACT_OK;
            }
            let group = dest.group;
            match unsafe { EGW_GROUPS.get(group) } {
                Some(g) => pick(ctx, s, group, g),
                None => false,
            }
        }
    };
    if !found || ifindex == 0 {
        return no_gateway(ctx);
    }
    let gw = s.flow.gateway;
    s.tk = unsafe { core::mem::zeroed() };
    s.tk.tunnel_id = EGW_VNI;
    s.tk.tunnel_ttl = 64;
    // The underlay: the gateway's IPv4 address if it has one (for both inner families: an
    // IPv4 outer packet may be fragmented on the way, so no path MTU problem), else IPv6.
    let flags = if gw.v4 != [0; 4] {
        s.tk.__bindgen_anon_1.remote_ipv4 = u32::from_be_bytes(gw.v4);
        0
    } else if gw.v6 != [0; 16] {
        let a = gw.v6;
        s.tk.__bindgen_anon_1.remote_ipv6 = [
            u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
            u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
            u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
            u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
        ];
        BPF_F_TUNINFO_IPV6 as u64
    } else {
        return no_gateway(ctx);
    };
    // Addressed to the gateway's device, whose stack then takes the frame as its own.
    if ctx.store(0, &EGW_DEVICE_MAC, 0).is_err() {
        return no_gateway(ctx);
    }
    let ret = unsafe {
        bpf_skb_set_tunnel_key(
            ctx.skb.skb,
            &mut s.tk,
            core::mem::size_of::<bpf_tunnel_key>() as u32,
            flags,
        )
    };
    if ret != 0 {
        return no_gateway(ctx);
    }
    unsafe { bpf_redirect(ifindex, 0) as i32 }
}

/// Chooses the flow's gateway among the group's healthy ones, by the packet's flow hash, and
/// remembers it (`s.flow`, EGW_FLOWS). False: none is healthy.
#[inline(always)]
fn pick(ctx: &TcContext, s: &mut EgwScratch, group: u32, g: &EgwGroup) -> bool {
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let Some(gw) = egw_pick(g, hash) else {
        return false;
    };
    s.flow = EgwFlow {
        group,
        _pad: 0,
        gateway: gw,
        created_ns: now_ns(),
    };
    let _ = EGW_FLOWS.insert(&s.key, &s.flow, 0);
    true
}

/// Fail closed: the packet is dropped, counted and reported.
#[inline(never)]
fn no_gateway(ctx: &TcContext) -> i32 {
    count_drop(Reason::EgressNoGateway);
    let (Some(pkt), Some(ep)) = (SCRATCH.get_ptr(0), EP_SCRATCH.get_ptr(0)) else {
        return TC_ACT_SHOT;
    };
    let (pkt, ep) = unsafe { (&*pkt, &*ep) };
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    emit(
        ep.id,
        ifindex,
        DIR_EGRESS,
        ctx.len(),
        Some(pkt),
        VERDICT_DROP,
        Reason::EgressNoGateway,
        0,
        now_ns(),
    );
    TC_ACT_SHOT
}
