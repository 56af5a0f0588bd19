//! The real eBPF programs, run by the kernel on crafted packets (BPF_PROG_TEST_RUN), with map
//! contents written through the agent's own map writer. Needs root; under CI=true a missing
//! privilege is a failure, not a skip.
mod support;

use std::net::{Ipv4Addr, Ipv6Addr};

use palisade_common::*;
use palisade_datapath::loader::Datapath;
use support::{
    ACK, EP, EXTERNAL, IFINDEX, NODE, OTHER, PEER, PEER_ID, PEER6, POD, POD6, Rig, SYN, SYN_ACK,
    TC_ACT_OK, TC_ACT_SHOT, eth, ipv4, ipv4_fragment, ipv6, l4, object, policy_entry, require_root,
    standard_state, tcp4, tcp4_ct_key,
};

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

    // Where ingress policy allows the SYN, the new connection takes the tuple over: its entry
    // is the peer's connection to the pod, judged (and revalidated) as ingress by rule 1.
    let mut state = standard_state();
    state.policy.insert(
        policy_entry(PEER_ID, DIR_EGRESS, 0, 0, POLICY_KEY_ANY_PROTO_BITS),
        PolicyValue {
            rule: 6,
            flags: 0,
            ..PolicyValue::default()
        },
    );
    let rig = Rig::new(&state);
    assert_eq!(rig.egress(&tcp4(POD, PEER, 80, 40000, SYN_ACK)), TC_ACT_OK);
    let key = tcp4_ct_key(EP, DIR_INGRESS, (PEER, 40000), (POD, 80));
    let e = rig.conntrack.get(&key, 0).expect("the pod's flow");
    assert_eq!((e.dir, e.rule), (DIR_EGRESS, 6));
    assert_eq!(rig.ingress(&tcp4(PEER, POD, 40000, 80, SYN)), TC_ACT_OK);
    let e = rig.conntrack.get(&key, 0).expect("the peer's connection");
    assert_eq!((e.dir, e.rule, e.packets), (DIR_INGRESS, 1, 1));
    assert_eq!(rig.egress(&tcp4(POD, PEER, 80, 40000, SYN_ACK)), TC_ACT_OK);
    assert_eq!(
        rig.conntrack.get(&key, 0).unwrap().packets,
        2,
        "a reply now"
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
    let mut ns = vec![135u8, 0, 0, 0, 0, 0, 0, 0];
    ns.extend_from_slice(&POD6.octets());
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
    // ARP passes; what only calls itself ARP does not.
    let mut arp = eth(0x0806);
    arp.extend([0u8, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend([0u8; 20]);
    assert_eq!(rig.ingress(&arp), TC_ACT_OK, "ARP");
    let mut junk = eth(0x0806);
    junk.extend([0u8; 28]);
    assert_eq!(
        rig.ingress(&junk),
        TC_ACT_SHOT,
        "not ARP for IPv4 over Ethernet"
    );
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

/// `pkt` (IPv4, IHL 5) with four bytes of options (NOP, NOP, NOP, end): the same packet to
/// every rule, but one the parser's fast path leaves to the slow one.
fn with_ipv4_options(pkt: &[u8]) -> Vec<u8> {
    let mut p = pkt[..14 + 20].to_vec();
    p[14] = 0x46;
    let tot_len = u16::from_be_bytes([p[16], p[17]]) + 4;
    p[16..18].copy_from_slice(&tot_len.to_be_bytes());
    p.extend([1u8, 1, 1, 0]);
    p.extend_from_slice(&pkt[14 + 20..]);
    p
}

/// `pkt` (IPv6, no extension header) behind an empty destination-options header.
fn with_ipv6_dest_options(pkt: &[u8]) -> Vec<u8> {
    let mut p = pkt[..14 + 40].to_vec();
    let next = p[14 + 6];
    p[14 + 6] = 60;
    let payload = u16::from_be_bytes([p[18], p[19]]) + 8;
    p[18..20].copy_from_slice(&payload.to_be_bytes());
    p.extend([next, 0, 1, 4, 0, 0, 0, 0]);
    p.extend_from_slice(&pkt[14 + 40..]);
    p
}

/// TCP and UDP over IPv4 without options and IPv6 without extension headers are parsed in
/// place (direct packet access); everything else through `bpf_skb_load_bytes`. The two must
/// read one packet alike: the same verdicts, on good and on lying packets, and the same flow
/// (a flow opened through one path is found through the other).
#[test]
fn fast_and_slow_parsing_agree() {
    if !require_root() {
        return;
    }
    let udp4 = |src, dst, sport, dport| ipv4(src, dst, PROTO_UDP, &l4(PROTO_UDP, sport, dport, 0));
    let tcp6 = |src, dst, sport, dport, flags| {
        ipv6(src, dst, PROTO_TCP, &l4(PROTO_TCP, sport, dport, flags))
    };
    let lie_tot_len = |mut p: Vec<u8>| {
        p[16..18].copy_from_slice(&300u16.to_be_bytes());
        p
    };
    let short_tcp = |mut p: Vec<u8>| {
        // The IPv4 header claims 12 bytes of TCP: fewer than a TCP header.
        p[16..18].copy_from_slice(&32u16.to_be_bytes());
        p.truncate(14 + 32);
        p
    };
    let lie_payload6 = |mut p: Vec<u8>| {
        p[18..20].copy_from_slice(&500u16.to_be_bytes());
        p
    };
    let mapped: Ipv6Addr = "::ffff:10.244.0.11".parse().unwrap();
    let rig = Rig::new(&standard_state());
    let v4: Vec<(&str, Vec<u8>, u32)> = vec![
        ("allowed TCP", tcp4(PEER, POD, 41000, 80, SYN), TC_ACT_OK),
        ("denied port", tcp4(PEER, POD, 41001, 81, SYN), TC_ACT_SHOT),
        ("denied peer", tcp4(OTHER, POD, 41002, 80, SYN), TC_ACT_SHOT),
        ("allowed UDP", udp4(PEER, POD, 41003, 53), TC_ACT_OK),
        (
            "UDP, unknown peer",
            udp4(EXTERNAL, POD, 41004, 53),
            TC_ACT_SHOT,
        ),
        (
            "tot_len beyond the packet",
            lie_tot_len(tcp4(PEER, POD, 41005, 80, SYN)),
            TC_ACT_SHOT,
        ),
        (
            "TCP shorter than its header",
            short_tcp(tcp4(PEER, POD, 41006, 80, SYN)),
            TC_ACT_SHOT,
        ),
    ];
    for (what, pkt, want) in &v4 {
        assert_eq!(rig.ingress(pkt), *want, "{what}, fast path");
        let slow = with_ipv4_options(pkt);
        assert_eq!(rig.ingress(&slow), *want, "{what}, with IPv4 options");
    }
    let v6: Vec<(&str, Vec<u8>, u32)> = vec![
        ("allowed TCP", tcp6(PEER6, POD6, 42000, 443, SYN), TC_ACT_OK),
        (
            "denied port",
            tcp6(PEER6, POD6, 42001, 444, SYN),
            TC_ACT_SHOT,
        ),
        (
            "payload length beyond the packet",
            lie_payload6(tcp6(PEER6, POD6, 42002, 443, SYN)),
            TC_ACT_SHOT,
        ),
        (
            "IPv4-mapped source",
            tcp6(mapped, POD6, 42003, 443, SYN),
            TC_ACT_SHOT,
        ),
    ];
    for (what, pkt, want) in &v6 {
        assert_eq!(rig.ingress(pkt), *want, "{what}, fast path");
        let slow = with_ipv6_dest_options(pkt);
        assert_eq!(
            rig.ingress(&slow),
            *want,
            "{what}, with an extension header"
        );
    }
    // One flow, its packets through either path: opened by a SYN with options, answered and
    // continued without, and the other way round; IPv6 likewise.
    let flow = |sport| {
        (
            tcp4(PEER, POD, sport, 80, SYN),
            tcp4(POD, PEER, 80, sport, SYN_ACK),
            tcp4(PEER, POD, sport, 80, ACK),
        )
    };
    let (syn, syn_ack, ack) = flow(43000);
    assert_eq!(rig.ingress(&with_ipv4_options(&syn)), TC_ACT_OK);
    assert_eq!(rig.egress(&syn_ack), TC_ACT_OK, "reply, fast path");
    assert_eq!(rig.ingress(&ack), TC_ACT_OK, "established, fast path");
    let (syn, syn_ack, ack) = flow(43001);
    assert_eq!(rig.ingress(&syn), TC_ACT_OK);
    assert_eq!(
        rig.egress(&with_ipv4_options(&syn_ack)),
        TC_ACT_OK,
        "reply, slow path"
    );
    assert_eq!(
        rig.ingress(&with_ipv4_options(&ack)),
        TC_ACT_OK,
        "established, slow path"
    );
    assert_eq!(
        rig.egress(&tcp4(POD, PEER, 80, 43002, SYN_ACK)),
        TC_ACT_SHOT,
        "no flow: no reply"
    );
    let syn6 = tcp6(PEER6, POD6, 44000, 443, SYN);
    assert_eq!(rig.ingress(&with_ipv6_dest_options(&syn6)), TC_ACT_OK);
    assert_eq!(
        rig.egress(&tcp6(POD6, PEER6, 443, 44000, SYN_ACK)),
        TC_ACT_OK,
        "IPv6 reply, fast path"
    );
    let syn6 = tcp6(PEER6, POD6, 44001, 443, SYN);
    assert_eq!(rig.ingress(&syn6), TC_ACT_OK);
    assert_eq!(
        rig.egress(&with_ipv6_dest_options(&tcp6(
            POD6, PEER6, 443, 44001, SYN_ACK
        ))),
        TC_ACT_OK,
        "IPv6 reply, slow path"
    );
}

/// Nested ipBlocks of every prefix length of both families (/0 to /32, /0 to /128), each class
/// opening one port: a flow to an address inside the /l prefix and outside the /(l+1) one is
/// allowed on exactly that prefix's port. Every length is probed, longest first, including
/// both ends of each bit set and the boundaries between the words of an IPv6 set.
#[test]
fn every_prefix_length_is_probed_longest_first() {
    if !require_root() {
        return;
    }
    use palisade_policy::state::{CidrEntry, DesiredState};
    let base4 = u32::from(Ipv4Addr::new(203, 0, 113, 77));
    let base6 = u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0xa5a5, 0x5a5a, 1, 2, 3, 4));
    let port = |l: u32| 1000 + l as u16;
    let mut s: DesiredState = standard_state();
    s.cidrs.clear();
    s.policy = std::mem::take(&mut s.policy)
        .into_iter()
        .filter(|(e, _)| e.key.dir != DIR_EGRESS)
        .collect();
    for l in 0..=128u32 {
        let class = CIDR_CLASS_BIT | (10 + l);
        let key6 = CidrKey {
            endpoint: EP,
            dir: DIR_EGRESS,
            family: AF_INET6,
            addr: base6.to_be_bytes(),
            ..CidrKey::default()
        };
        s.cidrs.insert(CidrEntry::new(key6, l), class);
        if l <= 32 {
            let key4 = CidrKey {
                family: AF_INET,
                addr: PeerAddr::v4(base4.to_be_bytes()).addr,
                ..key6
            };
            // IPv4 prefixes have classes of their own (the maps are per family anyway).
            s.cidrs.insert(CidrEntry::new(key4, l), class | 0x1000);
            s.policy.insert(
                policy_entry(class | 0x1000, DIR_EGRESS, PROTO_TCP, port(l), 96),
                PolicyValue {
                    rule: 2000 + l,
                    flags: 0,
                    ..PolicyValue::default()
                },
            );
        }
        s.policy.insert(
            policy_entry(class, DIR_EGRESS, PROTO_TCP, port(l), 96),
            PolicyValue {
                rule: 1000 + l,
                flags: 0,
                ..PolicyValue::default()
            },
        );
    }
    let rig = Rig::new(&s);
    // Inside /l, outside /(l+1): flip bit l (counted from the top) of the base address.
    for l in 0..=32u32 {
        let addr = if l == 32 {
            base4
        } else {
            base4 ^ (1 << (31 - l))
        };
        let dst = Ipv4Addr::from(addr);
        for (p, want) in [(port(l), TC_ACT_OK), (port(l) + 1, TC_ACT_SHOT)] {
            let got = rig.egress(&tcp4(POD, dst, 41000, p, SYN));
            assert_eq!(got, want, "IPv4 /{l}: {dst} port {p}");
        }
    }
    for l in 0..=128u32 {
        let addr = if l == 128 {
            base6
        } else {
            base6 ^ (1 << (127 - l))
        };
        let dst = Ipv6Addr::from(addr);
        for (p, want) in [(port(l), TC_ACT_OK), (port(l) + 1, TC_ACT_SHOT)] {
            let pkt = ipv6(POD6, dst, PROTO_TCP, &l4(PROTO_TCP, 41000, p, SYN));
            assert_eq!(rig.egress(&pkt), want, "IPv6 /{l}: {dst} port {p}");
        }
    }
}

/// ENDPOINT_SLOTS: an endpoint whose slot another endpoint holds (ifindexes 4097 and 1 share
/// slot 1; 4097 came first and keeps it) is read from ENDPOINTS, with its own flags; once the
/// holder is gone, the slot is the endpoint's own. The two endpoints decide differently, so a
/// slot read without its tag check would show.
#[test]
fn an_endpoint_whose_slot_another_holds_is_read_from_endpoints() {
    if !require_root() {
        return;
    }
    use palisade_policy::state::DesiredState;
    let other = IFINDEX + capacity::ENDPOINTS;
    assert_eq!(endpoint_slot(other), endpoint_slot(IFINDEX));
    let unisolated = |s: &mut DesiredState, ifindex| {
        s.endpoints.insert(
            ifindex,
            EndpointInfo {
                id: 77,
                ..EndpointInfo::default()
            },
        );
    };
    let (dp, mut writer) = support::load();
    // First only the other endpoint, not isolated: it takes the slot.
    let mut first = standard_state();
    first.endpoints.clear();
    unisolated(&mut first, other);
    assert_eq!(writer.apply(&first).failed, 0);
    // Then the usual endpoint on `lo` too, isolated: it must be read from ENDPOINTS.
    let mut both = standard_state();
    unisolated(&mut both, other);
    assert_eq!(writer.apply(&both).failed, 0);
    let denied = tcp4(OTHER, POD, 40010, 80, SYN);
    let run = |pkt: &[u8]| support::test_run(&dp, palisade_datapath::loader::TO_POD, pkt);
    assert_eq!(run(&denied), TC_ACT_SHOT, "isolated, read from ENDPOINTS");
    assert_eq!(run(&tcp4(PEER, POD, 40011, 80, SYN)), TC_ACT_OK);
    // The holder leaves: the slot becomes the endpoint's, with the same verdicts.
    assert_eq!(writer.apply(&standard_state()).failed, 0);
    assert_eq!(run(&denied), TC_ACT_SHOT, "isolated, read from its slot");
    assert_eq!(run(&tcp4(PEER, POD, 40012, 80, SYN)), TC_ACT_OK);
    // And an unisolated entry in the slot is read as such.
    let mut open = standard_state();
    open.endpoints.clear();
    unisolated(&mut open, IFINDEX);
    assert_eq!(writer.apply(&open).failed, 0);
    assert_eq!(run(&denied), TC_ACT_OK, "not isolated, from its slot");
}

/// A policy change that swaps the prefix lengths an endpoint uses (an ipBlock /24 becomes a
/// /16, a port becomes a range, and back) takes effect in one apply each way: the new lengths
/// are probed, and an address or port only the old ones covered is denied again.
#[test]
fn prefix_lengths_follow_the_entries_across_changes() {
    if !require_root() {
        return;
    }
    use palisade_policy::state::DesiredState;
    let class = CIDR_CLASS_BIT | 7;
    let with = |len: u32, port_len: u32| {
        let mut s: DesiredState = standard_state();
        s.cidrs.clear();
        s.policy = std::mem::take(&mut s.policy)
            .into_iter()
            .filter(|(e, _)| e.key.dir != DIR_EGRESS)
            .collect();
        s.cidrs
            .insert(support::cidr4(EP, DIR_EGRESS, [198, 51, 0, 0], len), class);
        s.policy.insert(
            policy_entry(class, DIR_EGRESS, PROTO_TCP, 8000, port_len),
            PolicyValue {
                rule: 9,
                flags: 0,
                ..PolicyValue::default()
            },
        );
        s
    };
    let (dp, mut writer) = support::load();
    let run = |pkt: &[u8]| support::test_run(&dp, palisade_datapath::loader::FROM_POD, pkt);
    let near = Ipv4Addr::new(198, 51, 0, 9); // inside the /24 and the /16
    let far = Ipv4Addr::new(198, 51, 77, 9); // inside the /16 only
    let mut sport = 42000;
    let mut probe = |dst: Ipv4Addr, port: u16| {
        sport += 1;
        run(&tcp4(POD, dst, sport, port, SYN))
    };
    // /24, port 8000 exactly.
    assert_eq!(writer.apply(&with(24, 96)).failed, 0);
    assert_eq!(probe(near, 8000), TC_ACT_OK);
    assert_eq!(probe(far, 8000), TC_ACT_SHOT, "outside the /24");
    assert_eq!(probe(near, 8001), TC_ACT_SHOT, "another port");
    // /16, ports 8000-8007 (a block of 8).
    assert_eq!(writer.apply(&with(16, 93)).failed, 0);
    assert_eq!(probe(far, 8000), TC_ACT_OK, "inside the /16");
    assert_eq!(probe(near, 8007), TC_ACT_OK, "inside the port block");
    assert_eq!(probe(far, 8008), TC_ACT_SHOT, "past the port block");
    // Back: what only the /16 and the block opened is closed again.
    assert_eq!(writer.apply(&with(24, 96)).failed, 0);
    assert_eq!(probe(far, 8000), TC_ACT_SHOT, "the /16 is gone");
    assert_eq!(probe(near, 8007), TC_ACT_SHOT, "the block is gone");
    assert_eq!(probe(near, 8000), TC_ACT_OK);
}
