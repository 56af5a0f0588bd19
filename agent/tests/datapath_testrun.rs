//! The real eBPF programs, run by the kernel on crafted packets (BPF_PROG_TEST_RUN), with map
//! contents written through the agent's own map writer. Needs root; under CI=true a missing
//! privilege is a failure, not a skip.
mod support;

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::maps::{HashMap, MapData, PerCpuArray};
use palisade::{
    loader::{Datapath, FROM_POD, TO_POD},
    maps::MapWriter,
    state::{DesiredState, PolicyEntry},
};
use palisade_common::*;
use support::{
    ACK, EP, EXTERNAL, OTHER, PEER, PEER_ID, POD, SYN, SYN_ACK, TC_ACT_OK, TC_ACT_SHOT, cidr4,
    endpoint_state, eth, ipv4, ipv4_fragment, ipv6, l4, load, object, peer_addr, require_root,
    tcp4, tcp4_ct_key, test_run,
};

/// BPF_PROG_TEST_RUN puts the skb on `lo`.
const IFINDEX: u32 = 1;
const OTHER_IDENTITY: u32 = 301;

const NODE: Ipv4Addr = Ipv4Addr::new(10, 243, 0, 1);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x10);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x11);

struct Rig {
    dp: Datapath,
    writer: MapWriter,
    counters: PerCpuArray<MapData, u64>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
}

fn policy_entry(peer: u32, dir: u8, proto: u8, port: u16, prefix_len: u32) -> PolicyEntry {
    // Mask the port to the prefix, as the compiler does.
    let port_bits = prefix_len.saturating_sub(POLICY_KEY_ANY_PORT_BITS);
    let mask: u16 = if port_bits == 0 {
        0
    } else {
        u16::MAX << (16 - port_bits)
    };
    PolicyEntry {
        key: PolicyKey {
            endpoint: EP,
            peer,
            dir,
            proto: if prefix_len <= POLICY_KEY_ANY_PROTO_BITS {
                0
            } else {
                proto
            },
            port_be: (port & mask).to_be(),
        },
        prefix_len,
    }
}

/// An endpoint on `lo`, isolated both ways, with a few allow entries:
/// - ingress from PEER_ID on TCP 80 (rule 1);
/// - ingress from PEER_ID on UDP, any port (rule 2);
/// - ingress from OTHER_IDENTITY on TCP 8000-8007 (an aligned block, rule 3);
/// - ingress from PEER6 (IPv6 peer identity) on TCP 443 (rule 4);
/// - egress to 192.0.2.0/24 except 192.0.2.128/25, any protocol (rule 5).
fn standard_state() -> DesiredState {
    // PEER's identity and the pod's own address (source address verification) come with it.
    let mut s = endpoint_state(IFINDEX, EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS, []);
    s.identities.insert(peer_addr(OTHER.into()), OTHER_IDENTITY);
    s.identities.insert(peer_addr(PEER6.into()), PEER_ID);
    s.identities.insert(peer_addr(NODE.into()), IDENTITY_HOST);
    s.endpoint_addrs.insert(peer_addr(POD6.into()), EP);
    let allow = |s: &mut DesiredState, e: PolicyEntry, rule: u32| {
        s.policy.insert(e, PolicyValue { rule, flags: 0 });
    };
    allow(
        &mut s,
        policy_entry(PEER_ID, DIR_INGRESS, PROTO_TCP, 80, POLICY_KEY_FULL_BITS),
        1,
    );
    allow(
        &mut s,
        policy_entry(PEER_ID, DIR_INGRESS, PROTO_UDP, 0, POLICY_KEY_ANY_PORT_BITS),
        2,
    );
    allow(
        &mut s,
        policy_entry(
            OTHER_IDENTITY,
            DIR_INGRESS,
            PROTO_TCP,
            8000,
            POLICY_KEY_FULL_BITS - 3,
        ),
        3,
    );
    allow(
        &mut s,
        policy_entry(PEER_ID, DIR_INGRESS, PROTO_TCP, 443, POLICY_KEY_FULL_BITS),
        4,
    );
    let class = CIDR_CLASS_BIT | 1;
    let cidr = |addr: [u8; 4], len: u32| cidr4(EP, DIR_EGRESS, addr, len);
    s.cidrs.insert(cidr([192, 0, 2, 0], 24), class);
    s.cidrs.insert(cidr([192, 0, 2, 128], 25), CIDR_CLASS_NONE);
    allow(
        &mut s,
        policy_entry(class, DIR_EGRESS, 0, 0, POLICY_KEY_ANY_PROTO_BITS),
        5,
    );
    s
}

impl Rig {
    fn new(state: &DesiredState) -> Rig {
        let (mut dp, mut writer) = load();
        let stats = writer.apply(state);
        assert_eq!(stats.failed, 0);
        let counters = PerCpuArray::try_from(dp.take_map(map_names::COUNTERS).unwrap()).unwrap();
        let conntrack = HashMap::try_from(dp.take_map(map_names::CONNTRACK).unwrap()).unwrap();
        Rig {
            dp,
            writer,
            counters,
            conntrack,
        }
    }

    /// Verdict for traffic to the pod (its ingress).
    fn ingress(&self, pkt: &[u8]) -> u32 {
        test_run(&self.dp, TO_POD, pkt)
    }

    /// Verdict for traffic from the pod (its egress).
    fn egress(&self, pkt: &[u8]) -> u32 {
        test_run(&self.dp, FROM_POD, pkt)
    }

    fn counter(&self, c: Counter) -> u64 {
        support::counter(&self.counters, c as u32)
    }
}

// ---- tests -------------------------------------------------------------------------------------

#[test]
fn isolated_pod_denies_by_default_and_allows_one_peer() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(&standard_state());
    assert_eq!(
        rig.ingress(&tcp4(PEER, POD, 40000, 80, SYN)),
        TC_ACT_OK,
        "allowed peer, port 80"
    );
    assert_eq!(
        rig.ingress(&tcp4(PEER, POD, 40001, 81, SYN)),
        TC_ACT_SHOT,
        "allowed peer, other port"
    );
    assert_eq!(
        rig.ingress(&tcp4(OTHER, POD, 40002, 80, SYN)),
        TC_ACT_SHOT,
        "other peer"
    );
    assert_eq!(
        rig.ingress(&tcp4(EXTERNAL, POD, 40003, 80, SYN)),
        TC_ACT_SHOT,
        "unknown address"
    );
    assert_eq!(
        rig.ingress(&ipv4(PEER, POD, PROTO_SCTP, &l4(PROTO_SCTP, 5000, 80, 0))),
        TC_ACT_SHOT,
        "SCTP is not TCP"
    );
    assert!(rig.counter(Counter::Dropped) >= 4);
    assert!(rig.counter(Counter::NewAllowed) >= 1);
}

#[test]
fn node_traffic_is_never_restricted() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(&standard_state());
    assert_eq!(
        rig.ingress(&tcp4(NODE, POD, 40000, 9999, SYN)),
        TC_ACT_OK,
        "kubelet probe"
    );
    assert_eq!(
        rig.egress(&tcp4(POD, NODE, 40000, 6443, SYN)),
        TC_ACT_OK,
        "pod to node"
    );
}

#[test]
fn wildcard_port_and_port_range() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(&standard_state());
    for port in [1u16, 53, 65535] {
        let pkt = ipv4(PEER, POD, PROTO_UDP, &l4(PROTO_UDP, 1000, port, 0));
        assert_eq!(rig.ingress(&pkt), TC_ACT_OK, "UDP any port: {port}");
    }
    for (port, want) in [
        (7999, TC_ACT_SHOT),
        (8000, TC_ACT_OK),
        (8007, TC_ACT_OK),
        (8008, TC_ACT_SHOT),
    ] {
        assert_eq!(
            rig.ingress(&tcp4(OTHER, POD, 41000 + port % 100, port, SYN)),
            want,
            "range 8000-8007: {port}"
        );
    }
}

#[test]
fn replies_pass_by_conntrack_and_nothing_else_does() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(&standard_state());
    // The pod is isolated for egress with no rule to PEER: only replies may leave.
    assert_eq!(
        rig.egress(&tcp4(POD, PEER, 80, 40000, SYN_ACK)),
        TC_ACT_SHOT,
        "no flow yet"
    );
    assert_eq!(rig.ingress(&tcp4(PEER, POD, 40000, 80, SYN)), TC_ACT_OK);
    assert_eq!(
        rig.egress(&tcp4(POD, PEER, 80, 40000, SYN_ACK)),
        TC_ACT_OK,
        "reply"
    );
    assert_eq!(
        rig.ingress(&tcp4(PEER, POD, 40000, 80, ACK)),
        TC_ACT_OK,
        "established"
    );
    assert_eq!(
        rig.egress(&tcp4(POD, PEER, 80, 40001, SYN_ACK)),
        TC_ACT_SHOT,
        "other flow"
    );
    assert_eq!(
        rig.egress(&tcp4(POD, PEER, 81, 40000, SYN_ACK)),
        TC_ACT_SHOT,
        "other port"
    );
    assert!(rig.counter(Counter::CtHit) >= 2);
    // An ICMP error about the allowed flow passes as related; a forged one does not.
    let mut quoted = tcp4(POD, PEER, 80, 40000, SYN_ACK)[14..14 + 28].to_vec();
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.append(&mut quoted);
    assert_eq!(
        rig.ingress(&ipv4(PEER, POD, PROTO_ICMP, &icmp)),
        TC_ACT_OK,
        "related ICMP error"
    );
    let mut forged = tcp4(POD, OTHER, 80, 40000, SYN_ACK)[14..14 + 28].to_vec();
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.append(&mut forged);
    assert_eq!(
        rig.ingress(&ipv4(OTHER, POD, PROTO_ICMP, &icmp)),
        TC_ACT_SHOT,
        "unrelated ICMP error"
    );
    // The flow is in the conntrack table under the endpoint, in its original direction.
    let key = tcp4_ct_key(EP, DIR_INGRESS, (PEER, 40000), (POD, 80));
    let entry = rig.conntrack.get(&key, 0).expect("conntrack entry");
    assert_eq!(entry.rule, 1);
    assert!(entry.packets >= 3);
}

#[test]
fn a_syn_is_never_a_reply() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(&standard_state());
    // The pod may send anything to 192.0.2.7 (rule 5), which may send it nothing. A SYN-ACK
    // from the pod's port 80 creates an entry in the pod's egress direction ...
    let x = std::net::Ipv4Addr::new(192, 0, 2, 7);
    assert_eq!(rig.egress(&tcp4(POD, x, 80, 40000, SYN_ACK)), TC_ACT_OK);
    // ... whose replies pass, but a new connection on the same tuple is judged by the pod's
    // ingress policy, not taken for a reply.
    assert_eq!(
        rig.ingress(&tcp4(x, POD, 40000, 80, SYN)),
        TC_ACT_SHOT,
        "a SYN to the pod's port past its ingress policy"
    );
    assert_eq!(
        rig.ingress(&tcp4(x, POD, 40000, 80, ACK)),
        TC_ACT_OK,
        "the reply of the pod's own packets"
    );
}

#[test]
fn revoked_allow_stops_established_flow() {
    if !require_root() {
        return;
    }
    let state = standard_state();
    let mut rig = Rig::new(&state);
    assert_eq!(rig.ingress(&tcp4(PEER, POD, 40000, 80, SYN)), TC_ACT_OK);
    assert_eq!(rig.ingress(&tcp4(PEER, POD, 40000, 80, ACK)), TC_ACT_OK);
    // Remove the rule: the established flow is re-checked and stops.
    let mut revoked = state.clone();
    revoked.policy.remove(&policy_entry(
        PEER_ID,
        DIR_INGRESS,
        PROTO_TCP,
        80,
        POLICY_KEY_FULL_BITS,
    ));
    let stats = rig.writer.apply(&revoked);
    assert_eq!(stats.removed, 1);
    assert_eq!(
        rig.ingress(&tcp4(PEER, POD, 40000, 80, ACK)),
        TC_ACT_SHOT,
        "revoked"
    );
    assert_eq!(
        rig.egress(&tcp4(POD, PEER, 80, 40000, ACK)),
        TC_ACT_SHOT,
        "its replies too"
    );
    // A change that keeps the flow allowed does not break it.
    let udp = ipv4(PEER, POD, PROTO_UDP, &l4(PROTO_UDP, 1000, 53, 0));
    assert_eq!(rig.ingress(&udp), TC_ACT_OK);
    rig.writer.apply(&state);
    assert_eq!(
        rig.ingress(&udp),
        TC_ACT_OK,
        "still allowed after an unrelated change"
    );
}

#[test]
fn ipblock_with_except_on_egress() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(&standard_state());
    let to = |a: [u8; 4]| tcp4(POD, Ipv4Addr::from(a), 40000, 443, SYN);
    assert_eq!(rig.egress(&to([192, 0, 2, 1])), TC_ACT_OK, "inside cidr");
    assert_eq!(
        rig.egress(&to([192, 0, 2, 127])),
        TC_ACT_OK,
        "edge of the hole"
    );
    assert_eq!(
        rig.egress(&to([192, 0, 2, 128])),
        TC_ACT_SHOT,
        "inside except"
    );
    assert_eq!(rig.egress(&to([192, 0, 3, 1])), TC_ACT_SHOT, "outside cidr");
    let ping = ipv4(
        POD,
        Ipv4Addr::new(192, 0, 2, 9),
        PROTO_ICMP,
        &[8, 0, 0, 0, 0, 7, 0, 1],
    );
    assert_eq!(rig.egress(&ping), TC_ACT_OK, "any protocol");
}

#[test]
fn ipv6_with_extension_headers() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(&standard_state());
    let mut chain = vec![60u8, 0, 1, 4, 0, 0, 0, 0]; // hop-by-hop -> destination options
    chain.extend([6u8, 0, 1, 4, 0, 0, 0, 0]); // destination options -> TCP
    chain.extend(l4(PROTO_TCP, 50000, 443, SYN));
    assert_eq!(
        rig.ingress(&ipv6(PEER6, POD6, 0, &chain)),
        TC_ACT_OK,
        "through two ext headers"
    );
    let direct = l4(PROTO_TCP, 50001, 444, SYN);
    assert_eq!(
        rig.ingress(&ipv6(PEER6, POD6, PROTO_TCP, &direct)),
        TC_ACT_SHOT,
        "other port"
    );
    let stranger = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x99);
    assert_eq!(
        rig.ingress(&ipv6(
            stranger,
            POD6,
            PROTO_TCP,
            &l4(PROTO_TCP, 1, 443, SYN)
        )),
        TC_ACT_SHOT
    );
    // Neighbour discovery passes on the link (here from a link-local source); from a routed
    // address it is the ICMPv6 it is, judged by policy.
    let ns = [135u8, 0, 0, 0, 0, 0, 0, 0];
    let link_local: Ipv6Addr = "fe80::99".parse().unwrap();
    assert_eq!(
        rig.ingress(&ipv6(link_local, POD6, PROTO_ICMPV6, &ns)),
        TC_ACT_OK,
        "neighbour solicitation"
    );
    assert_eq!(
        rig.ingress(&ipv6(stranger, POD6, PROTO_ICMPV6, &ns)),
        TC_ACT_SHOT,
        "a routed \"neighbour solicitation\" is policy's"
    );
    // IPv4-mapped source addresses are refused.
    let mapped: Ipv6Addr = "::ffff:10.244.0.11".parse().unwrap();
    assert_eq!(
        rig.ingress(&ipv6(mapped, POD6, PROTO_TCP, &l4(PROTO_TCP, 1, 443, SYN))),
        TC_ACT_SHOT
    );
}

#[test]
fn truncated_and_lying_packets_are_dropped() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(&standard_state());
    let good = tcp4(PEER, POD, 40000, 80, SYN);
    assert_eq!(rig.ingress(&good), TC_ACT_OK);
    // L4 cut short (a test run needs the full L3 header).
    assert_eq!(
        rig.ingress(&good[..14 + 20 + 3]),
        TC_ACT_SHOT,
        "3 bytes of TCP"
    );
    // IPv4 total length larger than the packet.
    let mut lying = tcp4(PEER, POD, 40001, 80, SYN);
    lying[16..18].copy_from_slice(&200u16.to_be_bytes());
    assert_eq!(
        rig.ingress(&lying),
        TC_ACT_SHOT,
        "tot_len beyond the packet"
    );
    // IHL pointing past the end.
    let mut ihl = tcp4(PEER, POD, 40002, 80, SYN);
    ihl[14] = 0x4f;
    assert_eq!(rig.ingress(&ihl), TC_ACT_SHOT, "ihl 60 bytes");
    // An extension-header chain longer than the datapath walks.
    let mut chain = Vec::new();
    for _ in 0..9 {
        chain.extend([60u8, 0, 1, 4, 0, 0, 0, 0]);
    }
    chain.extend(l4(PROTO_TCP, 1, 443, SYN));
    assert_eq!(
        rig.ingress(&ipv6(PEER6, POD6, 60, &chain)),
        TC_ACT_SHOT,
        "10 ext headers"
    );
    assert!(rig.counter(Counter::Malformed) >= 4);
    // ARP passes.
    let mut arp = eth(0x0806);
    arp.extend([0u8; 28]);
    assert_eq!(rig.ingress(&arp), TC_ACT_OK, "ARP");
}

#[test]
fn fragments_follow_their_first_fragment() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(&standard_state());
    let frag = |id: u16, offset_flags: u16, payload: &[u8]| {
        ipv4_fragment(PEER, POD, PROTO_UDP, payload, id, offset_flags)
    };
    // UDP from PEER is allowed on any port: first fragment (MF), then a later one.
    let mut first = l4(PROTO_UDP, 1000, 53, 0);
    first.extend([0u8; 16]);
    assert_eq!(
        rig.ingress(&frag(77, 0x2000, &first)),
        TC_ACT_OK,
        "first fragment"
    );
    assert_eq!(
        rig.ingress(&frag(77, 3, &[0u8; 16])),
        TC_ACT_OK,
        "later fragment of an allowed datagram"
    );
    // A later fragment whose first fragment was never seen, from a peer allowed only on TCP 80.
    let orphan = ipv4_fragment(OTHER, POD, PROTO_TCP, &[0u8; 16], 0, 3);
    assert_eq!(rig.ingress(&orphan), TC_ACT_SHOT, "orphan fragment");
}

#[test]
fn unisolated_endpoint_allows_and_pending_endpoint_drops() {
    if !require_root() {
        return;
    }
    let mut state = standard_state();
    state.endpoints.get_mut(&IFINDEX).unwrap().flags = 0;
    let mut rig = Rig::new(&state);
    assert_eq!(rig.ingress(&tcp4(EXTERNAL, POD, 1, 9, SYN)), TC_ACT_OK);
    assert_eq!(rig.egress(&tcp4(POD, EXTERNAL, 1, 9, SYN)), TC_ACT_OK);
    state.endpoints.get_mut(&IFINDEX).unwrap().flags = EP_PENDING;
    rig.writer.apply(&state);
    assert_eq!(
        rig.ingress(&tcp4(PEER, POD, 2, 80, SYN)),
        TC_ACT_SHOT,
        "pending fails closed"
    );
}

#[test]
fn verifier_accepts_both_programs() {
    if !require_root() {
        return;
    }
    let dp = Datapath::load(&object(), None).expect("load");
    for p in dp.program_stats() {
        let n = p
            .verified_instructions
            .expect("kernel reports verified instructions");
        eprintln!("{}: {} instructions processed by the verifier", p.name, n);
        assert!(n > 100, "{} looks empty ({n})", p.name);
    }
}
