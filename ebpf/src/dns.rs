//! Snoop, hold, release (`common`, FQDN egress): a DNS answer to a pod whose egress names
//! domains is copied for the agent and, while the agent is alive, dropped until the agent has
//! learned its addresses and sends it again.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    programs::TcContext,
};
use palisade_common::{
    Counter, CtKey, DNS_COPY_MAX, DNS_HOLD_FRESH_NS, DNS_REINJECT_MARK, DnsAnswerRecord, PROTO_TCP,
    PROTO_UDP, PeerAddr,
};

use crate::{
    events::count,
    maps::{DNS_ANSWERS, DNS_SERVERS, FQDN_CTL},
    packet::Packet,
};

/// Is this packet of the pod's flow `key` (a reply) an answer from a trusted DNS server, not
/// already released by the agent? (The key is passed by reference, as in `policy`.)
#[inline(always)]
#[allow(clippy::needless_borrows_for_generic_args)]
pub fn is_answer(ctx: &TcContext, key: &CtKey, pkt: &Packet) -> bool {
    if key.peer_port != 53 || !(pkt.proto == PROTO_UDP || pkt.proto == PROTO_TCP) {
        return false;
    }
    if unsafe { (*ctx.skb.skb).mark } == DNS_REINJECT_MARK {
        return false;
    }
    let server = PeerAddr {
        family: key.family,
        _pad: [0; 3],
        addr: key.peer,
    };
    let trusted = unsafe { DNS_SERVERS.get(&server) }.is_some();
    if !trusted {
        count(Counter::DnsUntrusted);
    }
    trusted
}

/// Copies the answer to DNS_ANSWERS; drops it (held) while the agent's heartbeat is fresh,
/// passes it otherwise. An answer that cannot be copied passes: DNS keeps working, and its
/// addresses are not learned (a `domainNames` rule fails closed). Returns the TC action.
#[inline(never)]
pub fn snoop(ctx: &TcContext, ifindex: u32, endpoint: u32, now: u64) -> i32 {
    let beat = FQDN_CTL.get(0).copied().unwrap_or(0);
    let fresh = beat != 0 && now.wrapping_sub(beat) < DNS_HOLD_FRESH_NS;
    let len = ctx.len();
    if len == 0 || len as usize > DNS_COPY_MAX {
        count(Counter::DnsUnheld);
        return TC_ACT_OK;
    }
    let Some(mut entry) = DNS_ANSWERS.reserve::<DnsAnswerRecord>(0) else {
        count(Counter::DnsCopyFailed);
        return TC_ACT_OK;
    };
    let rec = entry.as_mut_ptr();
    let copied = unsafe {
        (*rec).ifindex = ifindex;
        (*rec).endpoint = endpoint;
        (*rec).len = len;
        (*rec).held = u32::from(fresh);
        (*rec).at_ns = now;
        (*rec).seen_ns = bpf_ktime_get_ns();
        let n = len & (2 * DNS_COPY_MAX as u32 - 1);
        n as usize <= DNS_COPY_MAX
            && bpf_skb_load_bytes(
                ctx.skb.skb as *const _,
                0,
                (*rec).frame.as_mut_ptr() as *mut _,
                n,
            ) == 0
    };
    if !copied {
        entry.discard(0);
        count(Counter::DnsCopyFailed);
        return TC_ACT_OK;
    }
    entry.submit(0);
    if fresh {
        count(Counter::DnsHeld);
        return TC_ACT_SHOT;
    }
    count(Counter::DnsUnheld);
    TC_ACT_OK
}
