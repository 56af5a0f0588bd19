//! The review's bypass suspects that live in the programs themselves (datapath-review.md,
//! Part A), each on crafted packets run by the kernel (BPF_PROG_TEST_RUN): hostile L2 frames
//! (A3, A10), self-addressed packets from elsewhere (A4), TCP teardown (A6), ICMP roles and
//! errors (A8), loopback and tunnel destinations (A12, A2), conntrack fairness (A7). Where the
//! kernel around the program decides the outcome, netns tests show it end to end (A2's DNAT:
//! `tests/tests/relay.rs`; A1 and A5: `tests/tests/fail_closed.rs`).
//! Needs root; under CI=true a missing privilege is a failure, not a skip.
mod support;

use std::net::{Ipv4Addr, Ipv6Addr};

use aya::programs::{TestRun, TestRunOptions};
use palisade_common::*;
use palisade_datapath::loader::{FROM_POD, TO_POD};
use support::{
    ACK, EP, EXTERNAL, IFINDEX, NODE, OTHER, PEER, PEER6, POD, POD6, Rig, SYN, SYN_ACK, TC_ACT_OK,
    TC_ACT_SHOT, eth, ipv4, ipv6, l4, peer_addr, require_root, standard_state, tcp4,
};

const FIN: u8 = 0x01;
const RST: u8 = 0x04;
const PSH_ACK: u8 = 0x18;
const FIN_ACK: u8 = 0x11;

/// The standard endpoint with no isolation at all: what most pods are.
fn open_state() -> palisade_policy::state::DesiredState {
    let mut s = standard_state();
    s.endpoints.get_mut(&IFINDEX).unwrap().flags = 0;
    s
}

/// Runs `prog` with `__sk_buff.ingress_ifindex` set: the interface the packet entered the
/// node through (`skb->skb_iif`).
fn run_from(rig: &Rig, prog: &str, ingress_ifindex: u32, pkt: &[u8]) -> u32 {
    let mut ctx = [0u8; 44];
    ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    let mut out = vec![0u8; pkt.len() + 256];
    rig.dp
        .program(prog)
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("test run of {prog}: {e}"))
        .return_value
}

fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    ipv4(src, dst, PROTO_UDP, &l4(PROTO_UDP, sport, dport, 0))
}

fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16) -> Vec<u8> {
    ipv6(src, dst, PROTO_UDP, &l4(PROTO_UDP, sport, dport, 0))
}

/// An ICMP (IPv4) message of `ty` with identifier `id`.
fn icmp4(src: Ipv4Addr, dst: Ipv4Addr, ty: u8, id: u16) -> Vec<u8> {
    let mut m = vec![ty, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    ipv4(src, dst, PROTO_ICMP, &m)
}

/// An ICMPv6 neighbour discovery message of `ty` about `target`.
fn nd6(src: Ipv6Addr, dst: Ipv6Addr, ty: u8, target: Ipv6Addr) -> Vec<u8> {
    let mut m = vec![ty, 0, 0, 0, 0x20, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    ipv6(src, dst, PROTO_ICMPV6, &m)
}

/// An Ethernet ARP reply whose sender protocol address is `sender`.
fn arp(sender: Ipv4Addr) -> Vec<u8> {
    let mut p = eth(0x0806);
    p.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    p.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&sender.octets());
    p.extend_from_slice(&[0; 6]);
    p.extend_from_slice(&GATEWAY.octets());
    p
}

const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);

/// `frame` (an Ethernet frame) with VLAN tags of VID 0 pushed after the addresses: `tpids`
/// outermost first.
fn tagged(frame: &[u8], tpids: &[u16]) -> Vec<u8> {
    let mut p = frame[..12].to_vec();
    for tpid in tpids {
        p.extend_from_slice(&tpid.to_be_bytes());
        p.extend_from_slice(&[0, 0]);
    }
    p.extend_from_slice(&frame[12..]);
    p
}

fn drops(rig: &Rig, reason: Reason) -> u64 {
    support::counter(&rig.counters, DROPPED_BY_REASON + reason as u32)
}

/// A3. Frames from a pod that are neither IP nor ARP are dropped whatever its isolation: a
/// priority-tagged (VID 0) frame, single or stacked, is delivered by the kernel as the IP
/// packet inside, which the program would otherwise never judge (its forged source
/// included). Towards an unisolated pod such frames still pass.
#[test]
fn a3_tagged_and_other_l2_frames_from_a_pod_are_dropped() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(&open_state());
    let forged = udp4(OTHER, PEER, 5000, 80);
    assert_eq!(
        rig.egress(&forged),
        TC_ACT_SHOT,
        "untagged forged source: spoofed"
    );
    for tpids in [
        &[0x8100u16, 0x8100][..],
        &[0x88a8, 0x8100],
        &[0x8100],
        &[0x9100, 0x8100],
    ] {
        let frame = tagged(&forged, tpids);
        assert_eq!(
            rig.egress(&frame),
            TC_ACT_SHOT,
            "forged source inside VLAN tags {tpids:x?} from an unisolated pod"
        );
        let genuine = tagged(&udp4(POD, PEER, 5000, 80), tpids);
        assert_eq!(rig.egress(&genuine), TC_ACT_SHOT, "no tagged frame at all");
        assert_eq!(
            rig.ingress(&tagged(&udp4(PEER, POD, 80, 5000), tpids)),
            TC_ACT_OK,
            "towards an unisolated pod: not its egress"
        );
    }
    let mut lldp = eth(0x88cc);
    lldp.extend_from_slice(&[0; 32]);
    assert_eq!(rig.egress(&lldp), TC_ACT_SHOT, "any other EtherType");
    assert!(drops(&rig, Reason::NonIp) >= 9);
}

/// A10. On a shared link (bridge ports) a pod that answers ARP or neighbour discovery for
/// another pod's address takes that pod's traffic. ARP from a pod speaks for its own address
/// (or none: a probe); a neighbour advertisement names its own address or a link-local one;
/// router advertisements and redirects never come from pods.
#[test]
fn a10_arp_and_nd_from_a_pod_claim_only_its_own_addresses() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(&open_state());
    assert_eq!(rig.egress(&arp(POD)), TC_ACT_OK, "ARP for itself");
    assert_eq!(
        rig.egress(&arp(Ipv4Addr::UNSPECIFIED)),
        TC_ACT_OK,
        "ARP probe"
    );
    assert_eq!(rig.egress(&arp(PEER)), TC_ACT_SHOT, "ARP for another pod");
    assert_eq!(
        rig.ingress(&arp(PEER)),
        TC_ACT_OK,
        "the node's ARP to the pod"
    );
    let mut short = eth(0x0806);
    short.extend_from_slice(&[0, 1, 8, 0]);
    assert_eq!(rig.egress(&short), TC_ACT_SHOT, "truncated ARP");

    let ll: Ipv6Addr = "fe80::10".parse().unwrap();
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    let router: Ipv6Addr = "fe80::1".parse().unwrap();
    assert_eq!(
        rig.egress(&nd6(ll, all_nodes, 136, POD6)),
        TC_ACT_OK,
        "NA for itself"
    );
    assert_eq!(
        rig.egress(&nd6(ll, all_nodes, 136, ll)),
        TC_ACT_OK,
        "NA for its link-local"
    );
    assert_eq!(
        rig.egress(&nd6(ll, all_nodes, 136, PEER6)),
        TC_ACT_SHOT,
        "NA for another pod's address"
    );
    assert_eq!(
        rig.egress(&nd6(ll, router, 135, router)),
        TC_ACT_OK,
        "NS for the gateway"
    );
    assert_eq!(
        rig.egress(&nd6(ll, all_nodes, 134, ll)),
        TC_ACT_SHOT,
        "router advertisement"
    );
    assert_eq!(
        rig.egress(&nd6(ll, all_nodes, 137, PEER6)),
        TC_ACT_SHOT,
        "redirect"
    );
    assert_eq!(
        rig.ingress(&nd6(router, all_nodes, 136, PEER6)),
        TC_ACT_OK,
        "the node's ND to the pod"
    );
}

/// A4. `src == dst ==` the pod's address is the pod's own hairpin only when it entered the
/// node through the pod's own veth; from anywhere else (IPv6 forwards it, with no martian
/// check) it is judged by the pod's ingress policy.
#[test]
fn a4_a_self_addressed_packet_from_elsewhere_is_judged() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(&standard_state());
    let uplink = 77;
    for pkt in [udp6(POD6, POD6, 53, 53), udp4(POD, POD, 53, 53)] {
        assert_eq!(
            run_from(&rig, TO_POD, uplink, &pkt),
            TC_ACT_SHOT,
            "self-addressed, in from another interface"
        );
        assert_eq!(
            run_from(&rig, TO_POD, IFINDEX, &pkt),
            TC_ACT_OK,
            "the pod's own hairpin, back through its veth"
        );
        assert_eq!(
            run_from(&rig, FROM_POD, IFINDEX, &pkt),
            TC_ACT_OK,
            "the pod to itself"
        );
    }
}

/// A8. An echo request is never the reply of a request that went the other way (identifier
/// 0 included), and ICMP types without a reply (timestamp, unassigned) are judged by policy,
/// never matched against conntrack. An ICMP error about a flow does not keep it alive.
#[test]
fn a8_icmp_requests_are_never_replies_and_errors_do_not_refresh() {
    if !require_root() {
        return;
    }
    // The pod may send anything to 192.0.2.0/24 (EXTERNAL), which may send it nothing.
    let mut rig = Rig::new(&standard_state());
    for id in [0u16, 7] {
        assert_eq!(
            rig.egress(&icmp4(POD, EXTERNAL, 8, id)),
            TC_ACT_OK,
            "echo request out"
        );
        assert_eq!(
            rig.ingress(&icmp4(EXTERNAL, POD, 8, id)),
            TC_ACT_SHOT,
            "echo request id {id} in: not a reply"
        );
        assert_eq!(
            rig.ingress(&icmp4(EXTERNAL, POD, 0, id)),
            TC_ACT_OK,
            "echo reply id {id}"
        );
    }
    assert_eq!(rig.egress(&icmp4(POD, EXTERNAL, 13, 0)), TC_ACT_OK);
    for ty in [13u8, 14, 200] {
        assert_eq!(
            rig.ingress(&icmp4(EXTERNAL, POD, ty, 0)),
            TC_ACT_SHOT,
            "ICMP type {ty} in: no reply of anything"
        );
    }

    // An allowed UDP flow out, then its entry 50 s idle: an ICMP error about it passes (it is
    // about the flow) but leaves the idle time alone.
    let out = udp4(POD, EXTERNAL, 40000, 53);
    assert_eq!(rig.egress(&out), TC_ACT_OK);
    let key = CtKey::new(
        EP,
        DIR_EGRESS,
        AF_INET,
        PROTO_UDP,
        (peer_addr(POD.into()).addr, 40000),
        (peer_addr(EXTERNAL.into()).addr, 53),
        CT_ROLE_NONE,
    );
    age(&mut rig, &key, 50);
    let entry = rig.conntrack.get(&key, 0).expect("entry");
    let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
    icmp.extend_from_slice(&out[14..14 + 28]);
    assert_eq!(
        rig.ingress(&ipv4(EXTERNAL, POD, PROTO_ICMP, &icmp)),
        TC_ACT_OK,
        "related error"
    );
    let after = rig.conntrack.get(&key, 0).expect("entry");
    assert_eq!(
        after.last_seen_ns, entry.last_seen_ns,
        "the error did not refresh the entry"
    );
}

/// Ages the entry of `key` by `secs` seconds.
fn age(rig: &mut Rig, key: &CtKey, secs: u64) {
    let mut e = rig.conntrack.get(key, 0).expect("entry");
    e.last_seen_ns -= secs * 1_000_000_000;
    rig.conntrack.insert(*key, e, 0).unwrap();
}

fn flags(rig: &Rig, key: &CtKey) -> u32 {
    rig.conntrack.get(key, 0).expect("entry").flags
}

/// A6. TCP teardown per direction: after the client's FIN (a half-close) the server may
/// still answer after more than the closing timeout; an RST the receiver ignored (forged, out
/// of window) stops counting once the flow carries on; FINs from both sides close it.
#[test]
fn a6_teardown_is_per_direction_and_an_ignored_rst_does_not_end_a_flow() {
    if !require_root() {
        return;
    }
    // The pod (client) may connect to EXTERNAL; EXTERNAL may not connect to it.
    let mut rig = Rig::new(&standard_state());
    let (cport, sport) = (40000u16, 80u16);
    let key = CtKey::new(
        EP,
        DIR_EGRESS,
        AF_INET,
        PROTO_TCP,
        (peer_addr(POD.into()).addr, cport),
        (peer_addr(EXTERNAL.into()).addr, sport),
        CT_ROLE_NONE,
    );
    let out = |rig: &Rig, f| rig.egress(&tcp4(POD, EXTERNAL, cport, sport, f));
    let back = |rig: &Rig, f| rig.ingress(&tcp4(EXTERNAL, POD, sport, cport, f));
    assert_eq!(out(&rig, SYN), TC_ACT_OK);
    assert_eq!(back(&rig, SYN_ACK), TC_ACT_OK);
    assert_eq!(out(&rig, ACK), TC_ACT_OK);
    // The client is done sending; the server thinks for 12 s and answers.
    assert_eq!(out(&rig, FIN_ACK), TC_ACT_OK);
    assert_eq!(flags(&rig, &key) & CT_FLAG_CLOSING, 0, "half-closed only");
    age(&mut rig, &key, 12);
    assert_eq!(
        back(&rig, PSH_ACK),
        TC_ACT_OK,
        "the server's answer after a half-close"
    );

    // A forged RST from the server's side; the client ignores it and the flow goes on.
    assert_eq!(back(&rig, RST), TC_ACT_OK);
    assert_ne!(flags(&rig, &key) & CT_FLAG_CLOSING, 0, "an RST closes ...");
    assert_eq!(out(&rig, ACK), TC_ACT_OK);
    assert_eq!(
        flags(&rig, &key) & CT_FLAG_CLOSING,
        0,
        "... until the flow carries on"
    );
    age(&mut rig, &key, 12);
    assert_eq!(
        back(&rig, PSH_ACK),
        TC_ACT_OK,
        "12 s idle after an ignored RST"
    );

    // Both sides' FINs: closing, and gone after 10 s idle.
    assert_eq!(back(&rig, FIN | ACK), TC_ACT_OK);
    assert_ne!(flags(&rig, &key) & CT_FLAG_CLOSING, 0, "both FINs");
    age(&mut rig, &key, 12);
    assert_eq!(
        back(&rig, ACK),
        TC_ACT_SHOT,
        "a closed flow's entry expires"
    );
}

/// A12 and A2. Whatever its policy, a pod reaches neither the node's loopback addresses
/// (`route_localnet=1`, as kube-proxy sets it, would route them: CVE-2020-8558) nor the
/// node's tunnel endpoints (what a VXLAN, Geneve, IPIP or GRE device decapsulates never had
/// its source checked). Plain traffic to the node is still never restricted.
#[test]
fn a12_a2_loopback_and_node_tunnels_are_out_of_reach() {
    if !require_root() {
        return;
    }
    let rig = Rig::new(&open_state());
    let lo6: Ipv6Addr = "::1".parse().unwrap();
    assert_eq!(
        rig.egress(&udp4(POD, Ipv4Addr::LOCALHOST, 5000, 53)),
        TC_ACT_SHOT
    );
    assert_eq!(
        rig.egress(&tcp4(POD, Ipv4Addr::new(127, 1, 2, 3), 5000, 10250, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(rig.egress(&udp6(POD6, lo6, 5000, 53)), TC_ACT_SHOT);
    assert!(drops(&rig, Reason::Loopback) >= 3);

    for port in [4789u16, 8472, 6081] {
        assert_eq!(
            rig.egress(&udp4(POD, NODE, 5000, port)),
            TC_ACT_SHOT,
            "UDP {port} to the node"
        );
        assert_eq!(
            rig.egress(&udp4(POD, EXTERNAL, 5000, port)),
            TC_ACT_OK,
            "UDP {port} to elsewhere: plain egress"
        );
    }
    for proto in [4u8, 41, 47, 97] {
        assert_eq!(
            rig.egress(&ipv4(POD, NODE, proto, &[0u8; 40])),
            TC_ACT_SHOT,
            "IP protocol {proto} to the node"
        );
    }
    assert!(drops(&rig, Reason::Tunnel) >= 7);
    assert_eq!(
        rig.egress(&udp4(POD, NODE, 5000, 53)),
        TC_ACT_OK,
        "DNS on the node"
    );
    assert_eq!(
        rig.egress(&tcp4(POD, NODE, 5000, 10250, SYN)),
        TC_ACT_OK,
        "the kubelet"
    );
}

/// A2. A pod's egress to a port the node DNATs onward (a NodePort, a hostPort) is judged as
/// egress to where the DNAT leads, not as node traffic; other ports of the node stay node
/// traffic.
#[test]
fn a2_node_ports_are_egress_to_their_targets() {
    if !require_root() {
        return;
    }
    // The pod may send anything to 192.0.2.0/24 (EXTERNAL) and nothing to PEER.
    let mut state = standard_state();
    let port = |proto: u8, port: u16| NodePortKey {
        family: AF_INET,
        proto,
        port_be: port.to_be(),
    };
    let to = |ip: Ipv4Addr, port: u16| NodePortTarget {
        addr: peer_addr(ip.into()).addr,
        port,
        _pad: 0,
    };
    state
        .node_ports
        .insert(port(PROTO_UDP, 30080), to(EXTERNAL, 53));
    state
        .node_ports
        .insert(port(PROTO_UDP, 30081), to(PEER, 80));
    state.node_ports.insert(port(PROTO_TCP, 8080), to(PEER, 80));
    let rig = Rig::new(&state);
    assert_eq!(
        rig.egress(&udp4(POD, NODE, 5000, 30080)),
        TC_ACT_OK,
        "a NodePort to an allowed backend"
    );
    assert_eq!(
        rig.egress(&udp4(POD, NODE, 5000, 30081)),
        TC_ACT_SHOT,
        "a NodePort to a denied backend"
    );
    assert_eq!(
        rig.egress(&tcp4(POD, NODE, 5000, 8080, SYN)),
        TC_ACT_SHOT,
        "a hostPort of a denied pod"
    );
    assert_eq!(
        rig.egress(&udp4(POD, NODE, 5000, 53)),
        TC_ACT_OK,
        "any other port of the node: node traffic"
    );
    // The allowed flow's replies come back from the node's address (un-DNATed): conntrack.
    assert_eq!(rig.ingress(&udp4(NODE, POD, 30080, 5000)), TC_ACT_OK);
    // Unisolated pods reach every node port.
    let mut open = state.clone();
    open.endpoints.get_mut(&IFINDEX).unwrap().flags = 0;
    let rig = Rig::new(&open);
    assert_eq!(rig.egress(&udp4(POD, NODE, 5000, 30081)), TC_ACT_OK);
}

/// A7. One pod cannot evict the others' flows from conntrack, nor take the whole table. Pod A
/// floods more distinct UDP flows (two packets each, so an LRU would keep them over an idle
/// flow) than the table holds; pod B's established TCP connection, idle meanwhile, still
/// gets its replies (an LRU table evicted it). A is held to its quota, every refused flow
/// counted; B still opens new flows. The sweep then frees A's expired entries (A may open
/// flows again, B's live connection stays), and once A is gone, its entries and accounting.
#[test]
fn a7_one_pod_cannot_evict_the_others_flows() {
    if !require_root() {
        return;
    }
    const EP_B: u32 = 8;
    const POD_B: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 20);
    let ifs = support::private_interfaces(1);
    let (a, b) = (ifs[0], ifs[1]);
    // A: not isolated. B: isolated ingress, nothing allowed in: its replies pass only by
    // conntrack.
    let mut state = support::endpoint_state(a, 0, []);
    state.endpoints.insert(
        b,
        EndpointInfo {
            id: EP_B,
            flags: EP_ISOLATED_INGRESS,
            ..Default::default()
        },
    );
    state.endpoint_addrs.insert(peer_addr(POD_B.into()), EP_B);
    let mut dp = palisade_datapath::loader::Datapath::load_with(
        &support::object(),
        None,
        &Default::default(),
    )
    .expect("load datapath");
    let mut sweeper = palisade_datapath::ct_sweep::Sweeper::new(&dp).expect("sweeper");
    let mut writer = palisade_datapath::writer::MapWriter::new(&mut dp).expect("writer");
    assert_eq!(writer.apply(&state).failed, 0);
    let counters: aya::maps::PerCpuArray<_, u64> =
        aya::maps::PerCpuArray::try_from(dp.take_map(map_names::COUNTERS).unwrap()).unwrap();
    let run = |ifindex: u32, prog: &str, pkt: &[u8]| support::test_run_on(&dp, prog, ifindex, pkt);
    let dropped = |r: Reason| support::counter(&counters, DROPPED_BY_REASON + r as u32);

    // B's connection: handshake and a request, then idle.
    assert_eq!(
        run(b, FROM_POD, &tcp4(POD_B, PEER, 40000, 80, SYN)),
        TC_ACT_OK
    );
    assert_eq!(
        run(b, TO_POD, &tcp4(PEER, POD_B, 80, 40000, SYN_ACK)),
        TC_ACT_OK
    );
    assert_eq!(
        run(b, FROM_POD, &tcp4(POD_B, PEER, 40000, 80, ACK)),
        TC_ACT_OK
    );
    assert_eq!(
        run(b, FROM_POD, &tcp4(POD_B, PEER, 40000, 80, PSH_ACK)),
        TC_ACT_OK
    );

    // A's flood: 300 000 flows (the table holds 262 144), two packets each.
    let flows: u32 = 300_000;
    let mut pkt = udp4(POD, PEER, 0, 0);
    let (mut passed, started) = (0u32, std::time::Instant::now());
    for i in 0..flows {
        let (sport, dport) = (1024 + (i % 60_000) as u16, 1 + (i / 60_000) as u16);
        pkt[34..36].copy_from_slice(&sport.to_be_bytes());
        pkt[36..38].copy_from_slice(&dport.to_be_bytes());
        for _ in 0..2 {
            if run(a, FROM_POD, &pkt) == TC_ACT_OK {
                passed += 1;
            }
        }
    }
    eprintln!("flood of {flows} flows: {:?}", started.elapsed());
    assert_eq!(
        run(b, TO_POD, &tcp4(PEER, POD_B, 80, 40000, PSH_ACK)),
        TC_ACT_OK,
        "B's established connection lost its conntrack entry to A's flood"
    );
    let quota = CT_QUOTA_DEFAULT;
    assert_eq!(passed, 2 * quota, "A holds exactly its quota of flows");
    assert_eq!(
        dropped(Reason::CtQuota),
        u64::from(2 * (flows - quota)),
        "every packet of a refused flow is counted"
    );
    assert_eq!(dropped(Reason::CtFull), 0, "the table never filled");
    // B opens new flows as before, and their replies pass.
    assert_eq!(run(b, FROM_POD, &udp4(POD_B, PEER, 5353, 53)), TC_ACT_OK);
    assert_eq!(run(b, TO_POD, &udp4(PEER, POD_B, 53, 5353)), TC_ACT_OK);

    // The sweep, a minute later than now: A's UDP entries expired; B's connection did not.
    let later =
        palisade_datapath::ct_sweep::datapath_now_ns() + CT_TIMEOUT_OTHER_NS + 1_000_000_000;
    let started = std::time::Instant::now();
    let swept = sweeper.sweep(later).expect("sweep");
    eprintln!("sweep: {swept:?} in {:?}", started.elapsed());
    assert_eq!(
        swept.expired,
        u64::from(quota) + 1,
        "A's flows and B's UDP flow"
    );
    assert_eq!(swept.orphaned, 0);
    assert_eq!(
        run(b, TO_POD, &tcp4(PEER, POD_B, 80, 40000, PSH_ACK)),
        TC_ACT_OK
    );
    pkt[34..36].copy_from_slice(&7u16.to_be_bytes());
    assert_eq!(run(a, FROM_POD, &pkt), TC_ACT_OK, "A's quota was released");
    assert_eq!(dropped(Reason::CtQuota), u64::from(2 * (flows - quota)));

    // A goes: its entry and its accounting with it; B keeps its own.
    let mut without_a = state.clone();
    without_a.endpoints.remove(&a);
    assert_eq!(writer.apply(&without_a).failed, 0);
    let swept = sweeper
        .sweep(palisade_datapath::ct_sweep::datapath_now_ns())
        .expect("sweep");
    assert_eq!((swept.expired, swept.orphaned), (0, 1), "{swept:?}");
    assert_eq!(swept.endpoints_forgotten, 1, "{swept:?}");
    assert_eq!(
        run(b, TO_POD, &tcp4(PEER, POD_B, 80, 40000, PSH_ACK)),
        TC_ACT_OK
    );
}

/// A6, A7. A TCP flow nobody answered (a SYN to a closed port, a lone ACK the receiver
/// discards) keeps a conntrack entry, and its pod's quota, for a minute, not an hour; once
/// answered, the flow has the long timeout.
#[test]
fn a6_an_unanswered_tcp_flow_expires_in_a_minute() {
    if !require_root() {
        return;
    }
    let mut rig = Rig::new(&standard_state());
    let key = |sport: u16| support::tcp4_ct_key(EP, DIR_EGRESS, (POD, sport), (EXTERNAL, 443));
    // Egress to EXTERNAL is allowed; nothing from it is allowed in but replies.
    assert_eq!(rig.egress(&tcp4(POD, EXTERNAL, 1000, 443, SYN)), TC_ACT_OK);
    assert_eq!(rig.egress(&tcp4(POD, EXTERNAL, 1001, 443, SYN)), TC_ACT_OK);
    assert_eq!(
        rig.ingress(&tcp4(EXTERNAL, POD, 443, 1001, SYN_ACK)),
        TC_ACT_OK
    );
    assert_ne!(flags(&rig, &key(1001)) & CT_FLAG_REPLIED, 0);
    assert_eq!(flags(&rig, &key(1000)) & CT_FLAG_REPLIED, 0);
    age(&mut rig, &key(1000), 61);
    age(&mut rig, &key(1001), 61);
    assert_eq!(
        rig.ingress(&tcp4(EXTERNAL, POD, 443, 1000, SYN_ACK)),
        TC_ACT_SHOT,
        "an answer after a minute to a flow nobody had answered"
    );
    assert_eq!(
        rig.ingress(&tcp4(EXTERNAL, POD, 443, 1001, ACK)),
        TC_ACT_OK,
        "an answered flow idle for a minute"
    );
}

/// Source verification with more addresses than the endpoint's entry holds inline (one IPv4,
/// two IPv6): every own address is a valid source, the extra ones through EP_ADDRS, a foreign
/// one is spoofed; an address that moves to another endpoint stops being this one's.
#[test]
fn every_own_address_is_a_source_and_a_moved_one_is_not() {
    if !require_root() {
        return;
    }
    let v4b = Ipv4Addr::new(10, 244, 0, 50);
    let v6 = |last: u16| Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, last);
    let mut state = open_state();
    state.endpoint_addrs.insert(peer_addr(v4b.into()), EP);
    for last in [0x20, 0x21] {
        state.endpoint_addrs.insert(peer_addr(v6(last).into()), EP);
    }
    let mut rig = Rig::new(&state);
    let dst6 = v6(0x99);
    let own4 = [POD, v4b];
    let own6 = [POD6, v6(0x20), v6(0x21)];
    for src in own4 {
        assert_eq!(rig.egress(&udp4(src, PEER, 5000, 80)), TC_ACT_OK, "{src}");
    }
    for src in own6 {
        assert_eq!(rig.egress(&udp6(src, dst6, 5000, 80)), TC_ACT_OK, "{src}");
    }
    let spoofed = drops(&rig, Reason::Spoofed);
    assert_eq!(
        rig.egress(&udp4(Ipv4Addr::new(10, 244, 0, 51), PEER, 5000, 80)),
        TC_ACT_SHOT
    );
    assert_eq!(rig.egress(&udp6(v6(0x22), dst6, 5000, 80)), TC_ACT_SHOT);
    assert_eq!(drops(&rig, Reason::Spoofed), spoofed + 2);

    // The entry holds what fits and says that more is in EP_ADDRS.
    // The writer holds ENDPOINTS; open it again by id, through the program that uses it.
    let ids = rig.dp.program(FROM_POD).info().unwrap().map_ids().unwrap();
    let data = ids
        .unwrap()
        .into_iter()
        .map(|id| aya::maps::MapData::from_id(id).unwrap())
        .find(|m| m.info().unwrap().name_as_str() == Some(map_names::ENDPOINTS))
        .unwrap();
    let endpoints: aya::maps::HashMap<_, u32, EndpointInfo> =
        aya::maps::HashMap::try_from(aya::maps::Map::HashMap(data)).unwrap();
    let info = endpoints.get(&IFINDEX, 0).unwrap();
    assert_eq!((info.n_ipv4, info.n_ipv6), (1, 2));
    assert_ne!(info.flags & EP_MORE_ADDRS, 0);

    // Each address moves, in turn, to another endpoint: inline or not, it is no longer a source.
    let moved: Vec<std::net::IpAddr> = own4
        .iter()
        .map(|a| (*a).into())
        .chain(own6.iter().map(|a| (*a).into()))
        .collect();
    for addr in &moved {
        let mut s = state.clone();
        s.endpoint_addrs.insert(peer_addr(*addr), EP + 1);
        assert_eq!(rig.writer.apply(&s).failed, 0);
        let verdict = match addr {
            std::net::IpAddr::V4(a) => rig.egress(&udp4(*a, PEER, 5000, 80)),
            std::net::IpAddr::V6(a) => rig.egress(&udp6(*a, dst6, 5000, 80)),
        };
        assert_eq!(verdict, TC_ACT_SHOT, "{addr} moved to another endpoint");
        for other in moved.iter().filter(|o| *o != addr) {
            let verdict = match other {
                std::net::IpAddr::V4(a) => rig.egress(&udp4(*a, PEER, 5000, 80)),
                std::net::IpAddr::V6(a) => rig.egress(&udp6(*a, dst6, 5000, 80)),
            };
            assert_eq!(
                verdict, TC_ACT_OK,
                "{other} is still own after {addr} moved"
            );
        }
    }
}
