//! Exhaustion: the real programs (BPF_PROG_TEST_RUN) with maps loaded tiny
//! (`Datapath::load_with`), written through the agent's own map writer. A full policy map, CIDR
//! trie, address or endpoint table makes the affected endpoint fail closed, with the failure
//! recorded; a full conntrack or fragment table never lets a denied packet through; a full ring
//! buffer is counted and never blocks. Needs root; under CI=true that is a failure, not a skip.
mod support;

use std::net::Ipv4Addr;
use std::time::Instant;

use aya::maps::{HashMap, MapData, PerCpuArray};
use palisade_common::*;
use palisade_datapath::{
    loader::{Datapath, FROM_POD, LoadOptions, TO_POD},
    writer::MapWriter,
};
use palisade_policy::state::DesiredState;
use support::{
    EP, PEER, PEER_ID, POD, SYN, SYN_ACK, TC_ACT_OK as OK, TC_ACT_SHOT as SHOT, allow_tcp_port,
    cidr4, endpoint_state, ipv4_fragment, load_with, peer_addr, private_interfaces, require_root,
    tcp4, test_run_on,
};

const EP2: u32 = 8;
const POD2: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 20);

/// Endpoint EP (on `ifindex`), isolated both ways, PEER allowed in on TCP `ports`.
fn state(ifindex: u32, ports: impl IntoIterator<Item = u16>) -> DesiredState {
    endpoint_state(ifindex, EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS, ports)
}

struct Rig {
    dp: Datapath,
    writer: MapWriter,
    counters: PerCpuArray<MapData, u64>,
}

impl Rig {
    fn new(max_entries: &[(&'static str, u32)]) -> Rig {
        let (mut dp, writer) = load_with(&LoadOptions {
            max_entries: max_entries.to_vec(),
            ..Default::default()
        });
        let counters = PerCpuArray::try_from(dp.take_map(map_names::COUNTERS).unwrap()).unwrap();
        Rig {
            dp,
            writer,
            counters,
        }
    }

    fn run(&self, prog: &str, ifindex: u32, pkt: &[u8]) -> u32 {
        test_run_on(&self.dp, prog, ifindex, pkt)
    }

    fn ingress(&self, ifindex: u32, pkt: &[u8]) -> u32 {
        self.run(TO_POD, ifindex, pkt)
    }

    fn egress(&self, ifindex: u32, pkt: &[u8]) -> u32 {
        self.run(FROM_POD, ifindex, pkt)
    }

    fn counter(&self, slot: u32) -> u64 {
        support::counter(&self.counters, slot)
    }

    fn pending(&self, ifindex: u32) -> bool {
        self.writer.applied().endpoints[&ifindex].flags & EP_PENDING != 0
    }
}

#[test]
fn full_policy_map_fails_closed_and_recovers() {
    if !require_root() {
        return;
    }
    let ifs = private_interfaces(2);
    let mut rig = Rig::new(&[(map_names::POLICY, 4)]);
    let s = state(ifs[0], [80, 81]);
    assert_eq!(rig.writer.apply(&s).failed, 0);
    assert_eq!(rig.ingress(ifs[0], &tcp4(PEER, POD, 1000, 80, SYN)), OK);
    assert_eq!(rig.ingress(ifs[0], &tcp4(PEER, POD, 1001, 82, SYN)), SHOT);

    // Eight allow entries do not fit in four: the endpoint fails closed, whole.
    let big = state(ifs[0], 80..88);
    let stats = rig.writer.apply(&big);
    assert!(stats.failed > 0, "{stats:?}");
    assert!(rig.pending(ifs[0]), "endpoint marked EP_PENDING");
    let failures = rig.writer.failures();
    assert!(
        failures
            .iter()
            .any(|f| f.map == map_names::POLICY && f.endpoint == Some(EP)),
        "failure names the map and the endpoint: {failures:?}"
    );
    // What the operator reads (log, `palisade status`, metrics): the map, what failed, the
    // kernel's answer, and that the endpoint fails closed.
    let shown = failures
        .iter()
        .find(|f| f.map == map_names::POLICY)
        .unwrap()
        .to_string();
    assert!(
        shown.starts_with(&format!("endpoint id {EP}: POLICY insert failed: "))
            && shown.ends_with(": failing closed (EP_PENDING)"),
        "{shown}"
    );
    let dropped_pending = rig.counter(DROPPED_BY_REASON + Reason::Pending as u32);
    for (port, what) in [
        (80, "allowed before"),
        (84, "would be allowed"),
        (99, "never"),
    ] {
        assert_eq!(
            rig.ingress(ifs[0], &tcp4(PEER, POD, 2000 + port, port, SYN)),
            SHOT,
            "port {port} ({what}) while pending"
        );
    }
    assert_eq!(
        rig.egress(ifs[0], &tcp4(POD, PEER, 80, 1000, SYN_ACK)),
        SHOT,
        "even replies of an established flow"
    );
    assert!(rig.counter(DROPPED_BY_REASON + Reason::Pending as u32) >= dropped_pending + 4);
    assert!(rig.writer.failures_total() > 0);

    // A policy that fits again: the endpoint is enforced normally.
    let stats = rig.writer.apply(&s);
    assert_eq!(stats.failed, 0, "{:?}", rig.writer.failures());
    assert!(!rig.pending(ifs[0]));
    assert!(rig.writer.failures().is_empty());
    assert_eq!(rig.ingress(ifs[0], &tcp4(PEER, POD, 3000, 81, SYN)), OK);
    assert_eq!(rig.ingress(ifs[0], &tcp4(PEER, POD, 3001, 84, SYN)), SHOT);
}

#[test]
fn full_map_affects_only_the_endpoint_that_needs_more() {
    if !require_root() {
        return;
    }
    let ifs = private_interfaces(2);
    let mut rig = Rig::new(&[(map_names::POLICY, 6)]);
    // EP2 (second interface) needs one entry and gets it; EP needs eight and cannot.
    let mut s = state(ifs[0], 80..88);
    s.endpoints.insert(
        ifs[1],
        EndpointInfo {
            id: EP2,
            flags: EP_ISOLATED_INGRESS,
            ..EndpointInfo::default()
        },
    );
    s.endpoint_addrs.insert(peer_addr(POD2.into()), EP2);
    s.policy.insert(
        allow_tcp_port(EP2, PEER_ID, DIR_INGRESS, 80),
        PolicyValue {
            rule: 50,
            flags: 0,
            ..PolicyValue::default()
        },
    );
    // EP2's entry sorts after EP's in the write order: write it first so it is the one that
    // fits (the point is that one endpoint's overflow leaves the other enforced as written).
    let mut first = s.clone();
    first.policy = std::mem::take(&mut first.policy)
        .into_iter()
        .filter(|(e, _)| e.key.endpoint == EP2)
        .collect();
    first.endpoints.remove(&ifs[0]);
    assert_eq!(rig.writer.apply(&first).failed, 0);
    let stats = rig.writer.apply(&s);
    assert!(stats.failed > 0);
    assert!(rig.pending(ifs[0]));
    assert!(!rig.pending(ifs[1]));
    assert_eq!(rig.ingress(ifs[0], &tcp4(PEER, POD, 1, 80, SYN)), SHOT);
    assert_eq!(rig.ingress(ifs[1], &tcp4(PEER, POD2, 1, 80, SYN)), OK);
    assert_eq!(rig.ingress(ifs[1], &tcp4(PEER, POD2, 1, 81, SYN)), SHOT);
}

#[test]
fn full_cidr_trie_fails_closed() {
    if !require_root() {
        return;
    }
    let ifs = private_interfaces(2);
    let mut rig = Rig::new(&[(map_names::CIDRS, 2)]);
    let mut s = state(ifs[0], []);
    let class = CIDR_CLASS_BIT | 1;
    for (i, net) in [[192, 0, 2, 0], [198, 51, 100, 0], [203, 0, 113, 0]]
        .into_iter()
        .enumerate()
    {
        s.cidrs
            .insert(cidr4(EP, DIR_EGRESS, net, 24), class + i as u32);
    }
    let stats = rig.writer.apply(&s);
    assert!(stats.failed > 0);
    assert!(rig.pending(ifs[0]));
    assert!(
        rig.writer
            .failures()
            .iter()
            .any(|f| f.map == map_names::CIDRS && f.endpoint == Some(EP))
    );
    assert_eq!(
        rig.egress(ifs[0], &tcp4(POD, Ipv4Addr::new(192, 0, 2, 1), 1, 443, SYN)),
        SHOT
    );
}

#[test]
fn full_address_table_fails_closed() {
    if !require_root() {
        return;
    }
    let ifs = private_interfaces(2);
    let mut rig = Rig::new(&[(map_names::EP_ADDRS, 1)]);
    let mut s = state(ifs[0], [80]);
    s.endpoint_addrs.insert(
        PeerAddr::v6([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]),
        EP,
    );
    let stats = rig.writer.apply(&s);
    assert!(stats.failed > 0);
    assert!(rig.pending(ifs[0]));
    assert!(
        rig.writer
            .failures()
            .iter()
            .any(|f| f.map == map_names::EP_ADDRS && f.endpoint == Some(EP))
    );
    assert_eq!(rig.ingress(ifs[0], &tcp4(PEER, POD, 1, 80, SYN)), SHOT);
}

#[test]
fn full_identity_table_allows_less_never_more() {
    if !require_root() {
        return;
    }
    let ifs = private_interfaces(2);
    let mut rig = Rig::new(&[(map_names::IDENTITIES, 1)]);
    // A second peer with the same identity cannot be registered: it is a stranger to the
    // datapath, and strangers are denied.
    let other = Ipv4Addr::new(10, 244, 0, 12);
    let mut s = state(ifs[0], [80]);
    s.identities.insert(peer_addr(other.into()), PEER_ID);
    let stats = rig.writer.apply(&s);
    assert!(stats.failed > 0);
    assert!(
        rig.writer
            .failures()
            .iter()
            .any(|f| f.map == map_names::IDENTITIES)
    );
    let results = [
        rig.ingress(ifs[0], &tcp4(PEER, POD, 1, 80, SYN)),
        rig.ingress(ifs[0], &tcp4(other, POD, 1, 80, SYN)),
    ];
    // Whichever of the two got the one slot is allowed; the other is denied, never both open
    // beyond policy.
    assert!(results.contains(&SHOT), "{results:?}");
    assert_eq!(rig.ingress(ifs[0], &tcp4(other, POD, 2, 81, SYN)), SHOT);
}

#[test]
fn endpoint_without_entry_fails_closed() {
    if !require_root() {
        return;
    }
    let ifs = private_interfaces(2);
    let mut rig = Rig::new(&[(map_names::ENDPOINTS, 1)]);
    let mut s = state(ifs[0], [80]);
    s.endpoints.insert(
        ifs[1],
        EndpointInfo {
            id: EP2,
            flags: 0,
            ..EndpointInfo::default()
        },
    );
    s.endpoint_addrs.insert(peer_addr(POD2.into()), EP2);
    let stats = rig.writer.apply(&s);
    assert!(stats.failed > 0);
    assert!(
        rig.writer
            .failures()
            .iter()
            .any(|f| f.map == map_names::ENDPOINTS && f.endpoint == Some(EP2))
    );
    // EP2 is not isolated at all, yet its interface (which has the programs) drops: without
    // its entry the datapath cannot tell, and fails closed.
    let before = rig.counter(DROPPED_BY_REASON + Reason::UnknownEndpoint as u32);
    assert_eq!(rig.ingress(ifs[1], &tcp4(PEER, POD2, 1, 80, SYN)), SHOT);
    assert_eq!(rig.egress(ifs[1], &tcp4(POD2, PEER, 1, 80, SYN)), SHOT);
    assert_eq!(
        rig.counter(DROPPED_BY_REASON + Reason::UnknownEndpoint as u32),
        before + 2
    );
    assert_eq!(rig.ingress(ifs[0], &tcp4(PEER, POD, 1, 80, SYN)), OK);
}

/// A full conntrack table refuses new flows (dropped, counted) and never evicts the flows it
/// holds: their replies keep passing, whatever was attempted since.
#[test]
fn full_conntrack_refuses_new_flows_and_keeps_established_ones() {
    if !require_root() {
        return;
    }
    let ifs = private_interfaces(2);
    let mut rig = Rig::new(&[(map_names::CONNTRACK, 16)]);
    assert_eq!(rig.writer.apply(&state(ifs[0], [80])).failed, 0);
    let full_before = rig.counter(DROPPED_BY_REASON + Reason::CtFull as u32);
    // 500 allowed flows through a 16-entry table, each followed by denied traffic.
    for i in 0..500u16 {
        let sport = 10_000 + i;
        let expected = if i < 16 { OK } else { SHOT };
        assert_eq!(
            rig.ingress(ifs[0], &tcp4(PEER, POD, sport, 80, SYN)),
            expected,
            "flow {i}: the table holds 16"
        );
        assert_eq!(
            rig.ingress(ifs[0], &tcp4(PEER, POD, sport, 81, SYN)),
            SHOT,
            "denied port, flow {i}"
        );
        assert_eq!(
            rig.egress(ifs[0], &tcp4(POD, PEER, 80, sport + 1000, SYN_ACK)),
            SHOT,
            "reply to a flow that never was, flow {i}"
        );
    }
    assert_eq!(
        rig.counter(DROPPED_BY_REASON + Reason::CtFull as u32) - full_before,
        484,
        "every refused flow is counted"
    );
    for i in 0..16u16 {
        assert_eq!(
            rig.egress(ifs[0], &tcp4(POD, PEER, 80, 10_000 + i, SYN_ACK)),
            OK,
            "established flow {i} was evicted"
        );
    }
    assert_eq!(
        rig.egress(ifs[0], &tcp4(POD, PEER, 80, 10_016, SYN_ACK)),
        SHOT,
        "a refused flow has no entry to reply through"
    );
}

#[test]
fn full_fragment_table_never_opens_a_port() {
    if !require_root() {
        return;
    }
    let ifs = private_interfaces(2);
    let mut rig = Rig::new(&[(map_names::FRAGMENTS, 8)]);
    assert_eq!(rig.writer.apply(&state(ifs[0], [80])).failed, 0);
    let mut first = vec![0u8; 20];
    first[0..2].copy_from_slice(&5000u16.to_be_bytes());
    first[2..4].copy_from_slice(&80u16.to_be_bytes());
    first[12] = 0x50;
    first[13] = SYN;
    for id in 0..200u16 {
        assert_eq!(
            rig.ingress(
                ifs[0],
                &ipv4_fragment(PEER, POD, PROTO_TCP, &first, id, 0x2000)
            ),
            OK
        );
    }
    // Later fragments: those whose first fragment is still remembered follow it; the others
    // are judged with port 0, which TCP/80 does not allow.
    let mut passed = 0;
    for id in 0..200u16 {
        if rig.ingress(
            ifs[0],
            &ipv4_fragment(PEER, POD, PROTO_TCP, &[0u8; 16], id, 3),
        ) == OK
        {
            passed += 1;
        }
    }
    assert!(
        passed <= 8 + 2 * 128,
        "{passed}: at most what the table can hold"
    );
    assert!(passed < 200, "some first fragments were forgotten");
    // Never anything for a port that is not allowed, remembered or not.
    let mut denied_first = first.clone();
    denied_first[2..4].copy_from_slice(&81u16.to_be_bytes());
    for id in 1000..1100u16 {
        assert_eq!(
            rig.ingress(
                ifs[0],
                &ipv4_fragment(PEER, POD, PROTO_TCP, &denied_first, id, 0x2000)
            ),
            SHOT
        );
        assert_eq!(
            rig.ingress(
                ifs[0],
                &ipv4_fragment(PEER, POD, PROTO_TCP, &[0u8; 16], id, 3)
            ),
            SHOT
        );
    }
}

#[test]
fn full_ring_buffer_is_counted_and_never_blocks() {
    if !require_root() {
        return;
    }
    let ifs = private_interfaces(2);
    let mut rig = Rig::new(&[(map_names::EVENTS, 4096)]);
    assert_eq!(rig.writer.apply(&state(ifs[0], [80])).failed, 0);
    // Unlimited event tokens for the endpoint, never refilled (so never capped back to the
    // burst): every drop tries to emit.
    let mut ep_state: HashMap<MapData, u32, EndpointState> =
        HashMap::try_from(rig.dp.take_map(map_names::EP_STATE).unwrap()).unwrap();
    ep_state
        .insert(
            EP,
            EndpointState {
                tokens: u64::MAX / 2,
                last_refill_ns: u64::MAX / 2,
                ..Default::default()
            },
            0,
        )
        .unwrap();
    let sent = rig.counter(Counter::EventsSent as u32);
    let lost = rig.counter(Counter::EventsLost as u32);
    let suppressed = rig.counter(Counter::EventsSuppressed as u32);
    let started = Instant::now();
    for i in 0..2000u16 {
        assert_eq!(
            rig.ingress(ifs[0], &tcp4(PEER, POD, i, 9, SYN)),
            SHOT,
            "denied with the ring buffer full, packet {i}"
        );
    }
    let elapsed = started.elapsed();
    let sent = rig.counter(Counter::EventsSent as u32) - sent;
    let lost = rig.counter(Counter::EventsLost as u32) - lost;
    let suppressed = rig.counter(Counter::EventsSuppressed as u32) - suppressed;
    assert!(
        sent > 0 && sent < 100,
        "a 4 KiB ring holds a few dozen events: {sent}"
    );
    assert_eq!(suppressed, 0);
    assert_eq!(
        sent + lost,
        2000,
        "every event is either sent or counted lost"
    );
    assert!(
        elapsed.as_secs() < 5,
        "2000 packets took {elapsed:?}: the datapath never waits"
    );
    // Allowed traffic is unaffected.
    assert_eq!(rig.ingress(ifs[0], &tcp4(PEER, POD, 1, 80, SYN)), OK);
}

#[test]
fn token_bucket_suppresses_and_counts() {
    if !require_root() {
        return;
    }
    let ifs = private_interfaces(2);
    let mut rig = Rig::new(&[]);
    assert_eq!(rig.writer.apply(&state(ifs[0], [80])).failed, 0);
    let suppressed = rig.counter(Counter::EventsSuppressed as u32);
    for i in 0..(EVENT_BURST as u16 + 300) {
        assert_eq!(rig.ingress(ifs[0], &tcp4(PEER, POD, i, 9, SYN)), SHOT);
    }
    assert!(rig.counter(Counter::EventsSuppressed as u32) >= suppressed + 250);
}
