//! Counters and verdict events. Events go to a ring buffer for new allowed flows and drops
//! only (never per packet of an established flow), through a per-endpoint token bucket so a
//! flood from one pod cannot starve the node; what the bucket refuses is counted.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use palisade_common::{Counter, EVENT_BURST, EVENT_RATE_PER_SEC, EndpointState, Event, Reason};

use crate::{
    maps::{COUNTERS, EP_STATE, EVENTS},
    parse::Packet,
};

#[inline(always)]
pub fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    unsafe { bpf_ktime_get_ns() }
}

/// Takes a token from the endpoint's bucket; false when the event must be suppressed.
#[inline(always)]
fn take_token(endpoint: u32, now: u64) -> bool {
    let state = match EP_STATE.get_ptr_mut(endpoint) {
        Some(s) => s,
        None => {
            let fresh = EndpointState {
                tokens: EVENT_BURST - 1,
                last_refill_ns: now,
                suppressed: 0,
            };
            let _ = EP_STATE.insert(endpoint, fresh, 0);
            return true;
        }
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
