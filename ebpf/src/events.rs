//! Counters and verdict events. Events go to a ring buffer for new allowed flows and drops
//! only (never per packet of an established flow), through a per-endpoint token bucket so a
//! flood from one pod cannot starve the node; what the bucket refuses is counted.
use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use palisade_common::{
    AUDITED_BY_REASON, Counter, DROPPED_BY_REASON, EVENT_BURST, EVENT_RATE_PER_SEC, Event, Reason,
};

use crate::{
    maps::{COUNTERS, EVENTS, RULE_STATS, endpoint_state},
    packet::Packet,
};

#[inline(always)]
fn count_slot(slot: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(slot) {
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn count(counter: Counter) {
    count_slot(counter as u32);
}

/// A dropped packet, by reason.
#[inline(always)]
pub fn count_drop(reason: Reason) {
    count(Counter::Dropped);
    count_slot(DROPPED_BY_REASON + reason as u32);
}

/// A packet that would have been dropped and passed because of audit mode, by reason.
#[inline(always)]
pub fn count_audit(reason: Reason) {
    count(Counter::Audited);
    count_slot(AUDITED_BY_REASON + reason as u32);
}

/// A packet let through by the rule of stats slot `slot` (0: no rule, or one without a slot).
#[inline(always)]
pub fn count_rule(slot: u16, len: u32) {
    if let Some(s) = RULE_STATS.get_ptr_mut(u32::from(slot)) {
        unsafe {
            (*s).packets += 1;
            (*s).bytes += u64::from(len);
        }
    }
}

/// The monotonic clock at tick resolution (CLOCK_MONOTONIC_COARSE). Everything timed here
/// is in milliseconds or more (conntrack timeouts and refresh, the event token bucket, event
/// times), and the coarse clock costs a fraction of `bpf_ktime_get_ns`, which reads the TSC
/// (tens of ns per packet on virtual machines).
#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Takes a token from the endpoint's bucket; false when the event must be suppressed.
#[inline(always)]
fn take_token(endpoint: u32, now: u64) -> bool {
    let Some(state) = endpoint_state(endpoint, now) else {
        // EP_STATE is full: no bucket, so no limit rather than no events.
        return true;
    };
    let state = unsafe { &mut *state };
    let elapsed = now.saturating_sub(state.last_refill_ns);
    let refill = elapsed / (1_000_000_000 / EVENT_RATE_PER_SEC);
    if refill > 0 {
        let tokens = state.tokens + refill;
        state.tokens = if tokens > EVENT_BURST {
            EVENT_BURST
        } else {
            tokens
        };
        state.last_refill_ns = now;
    }
    if state.tokens == 0 {
        state.suppressed += 1;
        return false;
    }
    state.tokens -= 1;
    true
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn emit(
    endpoint: u32,
    ifindex: u32,
    dir: u8,
    len: u32,
    pkt: Option<&Packet>,
    verdict: u8,
    reason: Reason,
    rule: u32,
    now: u64,
) {
    if !take_token(endpoint, now) {
        count(Counter::EventsSuppressed);
        return;
    }
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            let mut ev = Event {
                ts_ns: now,
                endpoint,
                rule,
                ifindex,
                len,
                src: [0; 16],
                dst: [0; 16],
                sport: 0,
                dport: 0,
                proto: 0,
                dir,
                family: 0,
                verdict,
                reason: reason as u8,
                _pad: [0; 7],
            };
            if let Some(p) = pkt {
                ev.src = p.outer_src;
                ev.dst = p.outer_dst;
                ev.sport = p.sport;
                ev.dport = p.dport;
                ev.proto = p.outer_proto;
                ev.family = p.family;
            }
            entry.write(ev);
            entry.submit(0);
            count(Counter::EventsSent);
        }
        None => count(Counter::EventsLost),
    }
}
