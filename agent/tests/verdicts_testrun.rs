//! The datapath's verdict plumbing, run by the kernel on crafted packets (BPF_PROG_TEST_RUN):
//! per-rule packet and byte counters (new flows and conntrack hits), drops and audited
//! packets counted per reason, per-direction audit, and the ring-buffer events with verdict,
//! reason and rule. Needs root; under CI=true a missing privilege is a failure, not a skip.
mod support;

use aya::maps::{HashMap, MapData, PerCpuArray, RingBuf};
use palisade_common::*;
use palisade_datapath::{
    loader::{Datapath, FROM_POD, TO_POD},
    writer::MapWriter,
};
use palisade_policy::state::DesiredState;
use support::{
    ACK, EP, EXTERNAL, OTHER, PEER, PEER_ID, POD, SYN, SYN_ACK, TC_ACT_OK, TC_ACT_SHOT,
    allow_tcp_port, endpoint_state, load, require_root, tcp4, tcp4_ct_key, test_run,
};

/// BPF_PROG_TEST_RUN puts the skb on `lo`.
const IFINDEX: u32 = 1;
const RULE: u32 = 41;

/// An endpoint on `lo`, isolated both ways: ingress enforced (PEER may reach TCP 80, rule
/// `RULE`), egress audited with no allow at all.
fn state() -> DesiredState {
    let mut s = endpoint_state(
        IFINDEX,
        EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS | EP_AUDIT_EGRESS,
        [],
    );
    s.policy.insert(
        allow_tcp_port(EP, PEER_ID, DIR_INGRESS, 80),
        PolicyValue {
            rule: RULE,
            flags: 0,
            slot: RULE as u16,
            ..PolicyValue::default()
        },
    );
    s
}

struct Rig {
    dp: Datapath,
    _writer: MapWriter,
    counters: PerCpuArray<MapData, u64>,
    rule_stats: PerCpuArray<MapData, RuleStats>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    events: RingBuf<MapData>,
}

impl Rig {
    fn new() -> Rig {
        let (mut dp, mut writer) = load();
        assert_eq!(writer.apply(&state()).failed, 0);
        let take = |dp: &mut Datapath, name| dp.take_map(name).unwrap();
        Rig {
            counters: PerCpuArray::try_from(take(&mut dp, map_names::COUNTERS)).unwrap(),
            rule_stats: PerCpuArray::try_from(take(&mut dp, map_names::RULE_STATS)).unwrap(),
            conntrack: HashMap::try_from(take(&mut dp, map_names::CONNTRACK)).unwrap(),
            events: RingBuf::try_from(take(&mut dp, map_names::EVENTS)).unwrap(),
            dp,
            _writer: writer,
        }
    }

    fn run(&self, prog: &str, pkt: &[u8]) -> u32 {
        test_run(&self.dp, prog, pkt)
    }

    fn slot(&self, i: u32) -> u64 {
        support::counter(&self.counters, i)
    }

    /// Packets and bytes of the rule of stats slot `slot`.
    fn rule(&self, slot: u32) -> (u64, u64) {
        self.rule_stats
            .get(&slot, 0)
            .map(|v| {
                (
                    v.iter().map(|s| s.packets).sum(),
                    v.iter().map(|s| s.bytes).sum(),
                )
            })
            .unwrap_or((0, 0))
    }

    fn drain_events(&mut self) -> Vec<Event> {
        let mut out = Vec::new();
        while let Some(item) = self.events.next() {
            assert_eq!(item.len(), std::mem::size_of::<Event>());
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<Event>()) });
        }
        out
    }
}

#[test]
fn rule_counters_count_new_flows_and_conntrack_hits() {
    if !require_root() {
        return;
    }
    let rig = Rig::new();
    let syn = tcp4(PEER, POD, 40000, 80, SYN);
    let reply = tcp4(POD, PEER, 80, 40000, SYN_ACK);
    let ack = tcp4(PEER, POD, 40000, 80, ACK);
    assert_eq!(rig.run(TO_POD, &syn), TC_ACT_OK);
    assert_eq!(rig.run(FROM_POD, &reply), TC_ACT_OK, "reply by conntrack");
    assert_eq!(rig.run(TO_POD, &ack), TC_ACT_OK);
    let (packets, bytes) = rig.rule(RULE);
    assert_eq!(packets, 3, "the new flow and its two conntrack hits");
    assert_eq!(bytes, (syn.len() + reply.len() + ack.len()) as u64);
    // A denied packet counts for no rule.
    assert_eq!(
        rig.run(TO_POD, &tcp4(OTHER, POD, 40001, 80, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(rig.rule(RULE).0, 3);
    let counted = (0..capacity::RULE_STATS)
        .filter(|slot| rig.rule(*slot).0 > 0)
        .count();
    assert_eq!(counted, 1, "one slot counted, the allowing rule's");
}

#[test]
fn drops_and_audits_are_counted_by_reason_per_direction() {
    if !require_root() {
        return;
    }
    let rig = Rig::new();
    let no_rule = Reason::NoRuleMatched as u32;
    // Ingress is enforced: OTHER is dropped.
    assert_eq!(
        rig.run(TO_POD, &tcp4(OTHER, POD, 40001, 80, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(rig.slot(DROPPED_BY_REASON + no_rule), 1);
    assert_eq!(rig.slot(Counter::Dropped as u32), 1);
    // Egress is audited: nothing allows EXTERNAL, yet the flow passes, recorded once.
    let out = tcp4(POD, EXTERNAL, 40002, 443, SYN);
    assert_eq!(rig.run(FROM_POD, &out), TC_ACT_OK, "audited, not dropped");
    assert_eq!(rig.slot(AUDITED_BY_REASON + no_rule), 1);
    assert_eq!(rig.slot(Counter::Audited as u32), 1);
    let key = tcp4_ct_key(EP, DIR_EGRESS, (POD, 40002), (EXTERNAL, 443));
    let entry = rig.conntrack.get(&key, 0).expect("audited flow tracked");
    assert_ne!(entry.flags & CT_FLAG_AUDIT, 0);
    assert_eq!(entry.rule, 0);
    assert_eq!(
        rig.run(TO_POD, &tcp4(EXTERNAL, POD, 443, 40002, SYN_ACK)),
        TC_ACT_OK,
        "its reply passes by conntrack"
    );
    assert_eq!(
        rig.run(FROM_POD, &tcp4(POD, EXTERNAL, 40002, 443, ACK)),
        TC_ACT_OK
    );
    assert_eq!(
        rig.slot(Counter::Audited as u32),
        1,
        "later packets of the audited flow are not audited again"
    );
    assert_eq!(rig.slot(Counter::Dropped as u32), 1, "still one drop");
}

#[test]
fn events_carry_verdict_reason_rule_and_tuple() {
    if !require_root() {
        return;
    }
    let mut rig = Rig::new();
    assert_eq!(rig.run(TO_POD, &tcp4(PEER, POD, 40000, 80, SYN)), TC_ACT_OK);
    assert_eq!(rig.run(TO_POD, &tcp4(PEER, POD, 40000, 80, ACK)), TC_ACT_OK);
    assert_eq!(
        rig.run(TO_POD, &tcp4(OTHER, POD, 40001, 81, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(
        rig.run(FROM_POD, &tcp4(POD, EXTERNAL, 40002, 443, SYN)),
        TC_ACT_OK
    );
    let events = rig.drain_events();
    assert_eq!(
        events.len(),
        3,
        "new flow, drop, audit; no event per packet: {events:?}"
    );
    let allow = &events[0];
    assert_eq!(
        (
            allow.verdict,
            allow.reason,
            allow.rule,
            allow.endpoint,
            allow.dir
        ),
        (
            VERDICT_ALLOW,
            Reason::PolicyAllow as u8,
            RULE,
            EP,
            DIR_INGRESS
        )
    );
    assert_eq!(
        (
            allow.src,
            allow.dst,
            allow.sport,
            allow.dport,
            allow.proto,
            allow.family
        ),
        (
            PeerAddr::v4(PEER.octets()).addr,
            PeerAddr::v4(POD.octets()).addr,
            40000,
            80,
            PROTO_TCP,
            AF_INET
        )
    );
    let drop = &events[1];
    assert_eq!(
        (drop.verdict, drop.reason, drop.rule, drop.dport),
        (VERDICT_DROP, Reason::NoRuleMatched as u8, 0, 81)
    );
    let audit = &events[2];
    assert_eq!(
        (audit.verdict, audit.reason, audit.dir, audit.dport),
        (VERDICT_AUDIT, Reason::NoRuleMatched as u8, DIR_EGRESS, 443)
    );
    assert_eq!(rig.slot(Counter::EventsSent as u32), 3);
}

#[test]
fn events_are_rate_limited_per_endpoint_and_suppressions_counted() {
    if !require_root() {
        return;
    }
    let mut rig = Rig::new();
    let n = EVENT_BURST + 300;
    let started = std::time::Instant::now();
    for i in 0..n {
        let pkt = tcp4(OTHER, POD, 1000 + (i % 50_000) as u16, 81, SYN);
        assert_eq!(rig.run(TO_POD, &pkt), TC_ACT_SHOT);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let sent = rig.drain_events().len() as u64;
    let suppressed = rig.slot(Counter::EventsSuppressed as u32);
    let budget = EVENT_BURST + (EVENT_RATE_PER_SEC as f64 * (elapsed + 0.1)) as u64;
    assert!(sent <= budget, "{sent} events > budget {budget}");
    assert!(sent >= EVENT_BURST.min(n));
    assert_eq!(
        sent + suppressed,
        n,
        "every packet is either an event or counted"
    );
    assert_eq!(
        rig.slot(DROPPED_BY_REASON + Reason::NoRuleMatched as u32),
        n
    );
}
