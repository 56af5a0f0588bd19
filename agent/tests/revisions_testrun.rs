//! Endpoint revisions never repeat: a conntrack entry is "current" only for the endpoint and
//! the policy change it was checked against. Found by `palisade-fuzz` (seed 1, packet 170 296):
//! an endpoint id that moved to another interface (a pod recreated under the same name) lost
//! its revision when the old interface's entry was removed, counted again from 1, and a flow
//! allowed at revision 2 passed unchecked after a later change brought the endpoint back to
//! revision 2 and isolated it. Real programs, BPF_PROG_TEST_RUN; needs root (CI=true: no skip).
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;

use aya::programs::{TestRun, TestRunOptions};
use palisade::{
    loader::{Datapath, FROM_POD, TO_POD},
    maps::MapWriter,
    state::{DesiredState, PolicyEntry},
};
use palisade_common::*;

const OK: u32 = 0;
const SHOT: u32 = 2;
const EP: u32 = 7;
const PEER_ID: u32 = 300;
const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const PEER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);

fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("this test needs root (BPF_PROG_TEST_RUN); CI=true forbids skipping");
    }
    eprintln!("skipping: needs root");
    false
}

fn object() -> Vec<u8> {
    let path = env!("PALISADE_EBPF_OBJ");
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}; run `cargo xtask build`"))
}

/// This thread in a network namespace of its own with a veth pair; their ifindexes.
fn private_interfaces() -> Vec<u32> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    let ok = Command::new("ip")
        .args(["link", "add", "rv0", "type", "veth", "peer", "name", "rv1"])
        .status()
        .expect("ip link add")
        .success();
    assert!(ok);
    let mut out: Vec<u32> = ["rv0", "rv1"]
        .iter()
        .map(|n| nix::net::if_::if_nametoindex(*n).expect("ifindex"))
        .collect();
    out.sort_unstable();
    out
}

fn peer_addr(ip: IpAddr) -> PeerAddr {
    match ip {
        IpAddr::V4(a) => PeerAddr::v4(a.octets()),
        IpAddr::V6(a) => PeerAddr::v6(a.octets()),
    }
}

/// EP on `ifindex` with `flags`; PEER allowed in on TCP each of `ports`.
fn state(ifindex: u32, flags: u32, ports: &[u16]) -> DesiredState {
    let mut s = DesiredState::default();
    s.endpoints.insert(
        ifindex,
        EndpointInfo {
            id: EP,
            flags,
            revision: 0,
            _pad: 0,
        },
    );
    s.identities.insert(peer_addr(PEER.into()), PEER_ID);
    s.endpoint_addrs.insert(peer_addr(POD.into()), EP);
    for (i, port) in ports.iter().enumerate() {
        s.policy.insert(
            PolicyEntry {
                key: PolicyKey {
                    endpoint: EP,
                    peer: PEER_ID,
                    dir: DIR_INGRESS,
                    proto: PROTO_TCP,
                    port_be: port.to_be(),
                },
                prefix_len: POLICY_KEY_FULL_BITS,
            },
            PolicyValue {
                rule: 1 + i as u32,
                flags: 0,
            },
        );
    }
    s
}

fn run(dp: &Datapath, prog: &str, ifindex: u32, pkt: &[u8]) -> u32 {
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    let mut out = vec![0u8; pkt.len() + 256];
    dp.program(prog)
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("test run of {prog}: {e}"))
        .return_value
}

fn tcp(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[8] = 64;
    ip[9] = PROTO_TCP;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    p.extend(ip);
    let mut t = vec![0u8; 20];
    t[0..2].copy_from_slice(&sport.to_be_bytes());
    t[2..4].copy_from_slice(&dport.to_be_bytes());
    t[12] = 0x50;
    t[13] = flags;
    p.extend(t);
    p
}

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

#[test]
fn an_endpoint_moving_interface_never_reuses_a_revision() {
    if !require_root() {
        return;
    }
    let ifs = private_interfaces();
    let mut dp = Datapath::load(&object(), None).expect("load");
    let mut w = MapWriter::new(&mut dp).expect("writer");
    let (x, y) = (ifs[0], ifs[1]);
    // The endpoint on x, then (same pod, same id, new interface) on y.
    w.apply(&state(x, 0, &[]));
    w.apply(&state(y, 0, &[]));
    // A flow while the pod is not isolated.
    assert_eq!(run(&dp, TO_POD, y, &tcp(PEER, POD, 4000, 9000, SYN)), OK);
    // An unrelated change, then isolation with nothing allowing the flow.
    w.apply(&state(y, 0, &[80]));
    w.apply(&state(y, EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS, &[80]));
    let revisions: Vec<u32> = w.applied().endpoints.values().map(|e| e.revision).collect();
    assert_eq!(
        run(&dp, TO_POD, y, &tcp(PEER, POD, 4000, 9000, ACK)),
        SHOT,
        "the established flow is re-checked and revoked (revisions {revisions:?})"
    );
    assert_eq!(
        run(&dp, FROM_POD, y, &tcp(POD, PEER, 9000, 4000, ACK)),
        SHOT,
        "its replies too"
    );
}

#[test]
fn revisions_stay_monotonic_across_removal() {
    if !require_root() {
        return;
    }
    let ifs = private_interfaces();
    let mut dp = Datapath::load(&object(), None).expect("load");
    let mut w = MapWriter::new(&mut dp).expect("writer");
    let y = ifs[0];
    let mut seen = Vec::new();
    for round in 0..4u16 {
        w.apply(&state(y, EP_ISOLATED_INGRESS, &[80, 81 + round]));
        seen.push(w.applied().endpoints[&y].revision);
        // The pod goes away and comes back (same name: same endpoint id).
        w.apply(&DesiredState::default());
    }
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted, seen, "revisions only grow, never repeat: {seen:?}");
}

/// A restarted agent keeps the endpoint ids it finds pinned (its conntrack entries are keyed by
/// them): here the pod that had id 2 keeps it although it is now the only pod (a fresh compiler
/// would number it 1).
#[test]
fn a_restarted_compiler_keeps_adopted_endpoint_ids() {
    use palisade::compile::{Compiler, LocalEndpoint};
    use palisade::model::Store;
    use palisade::state::PodRef;
    let pod = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: d}}\n\
             status: {{podIP: '{ip}'}}\n"
        )
    };
    let text = [pod("x", "10.0.0.1"), pod("y", "10.0.0.2")].join("---\n");
    let store = Store::from_objects(palisade::manifest::parse_str(&text).unwrap());
    let ep = |name: &str, ifindex| LocalEndpoint {
        pod: PodRef {
            namespace: "d".into(),
            name: name.into(),
        },
        ifindex,
    };
    let mut first = Compiler::default();
    let s = first.compile(&store, &[ep("x", 10), ep("y", 11)], &[]);
    let y_id = s.endpoints[&11].id;
    assert_ne!(y_id, s.endpoints[&10].id);

    // x is gone; a new agent adopts y's id from the pinned ENDPOINTS map.
    let mut second = Compiler::default();
    assert!(second.adopt_endpoint_id(&ep("y", 11).pod, y_id));
    let s2 = second.compile(&store, &[ep("y", 11)], &[]);
    assert_eq!(s2.endpoints[&11].id, y_id, "y keeps its id");
    // A pod new to this agent gets a fresh id, never an adopted one.
    let s3 = second.compile(&store, &[ep("x", 12), ep("y", 11)], &[]);
    assert_eq!(s3.endpoints[&11].id, y_id);
    assert_ne!(s3.endpoints[&12].id, y_id);
    assert_eq!(
        s3.endpoint_addrs.len(),
        2,
        "own addresses of both endpoints"
    );
}
