//! Egress gateway steering in `from_pod`, on crafted packets run by the kernel
//! (BPF_PROG_TEST_RUN): after policy, a selected flow is redirected to the tunnel (with its
//! gateway remembered), dropped and counted while its group has no healthy gateway, and left
//! alone when excluded, cluster-internal or denied by policy first. The end-to-end behaviour
//! (encapsulation, masquerade, failover) is `tests/tests/egress_gateway.rs`.
//! Needs root; under CI=true a missing privilege is a failure, not a skip.
mod support;

use aya::maps::{Array, HashMap, MapData, lpm_trie::Key, lpm_trie::LpmTrie};
use palisade_common::*;
use support::{EP, EXTERNAL, NODE, POD, Rig, SYN, TC_ACT_OK, TC_ACT_SHOT, require_root, tcp4};

const TC_ACT_REDIRECT: u32 = 7;
const GROUP: u32 = 5;
const TUNNEL_IFINDEX: u32 = 1;

struct Egw {
    ctl: Array<MapData, EgwCtl>,
    dests: LpmTrie<MapData, EgwDestKey, EgwDest>,
    groups: HashMap<MapData, u32, EgwGroup>,
    flows: HashMap<MapData, CtKey, EgwFlow>,
}

fn dest(addr: [u8; 4], len: u32) -> Key<EgwDestKey> {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&addr);
    Key::new(
        EGW_DEST_FIXED_BITS + len,
        EgwDestKey {
            endpoint: EP,
            family: AF_INET,
            _pad: [0; 3],
            addr: a,
        },
    )
}

fn gateway(node: u32, last: u8) -> EgwGateway {
    EgwGateway {
        node,
        v4: [10, 243, 0, last],
        v6: [0; 16],
    }
}

fn group(gws: &[EgwGateway]) -> EgwGroup {
    let mut g = EgwGroup {
        n: gws.len() as u32,
        ..EgwGroup::default()
    };
    g.gateways[..gws.len()].copy_from_slice(gws);
    g
}

fn flow_of(egw: &Egw) -> Vec<EgwFlow> {
    egw.flows.iter().map(|r| r.unwrap().1).collect()
}

#[test]
fn selected_flows_go_to_a_healthy_gateway_or_nowhere() {
    if !require_root() {
        return;
    }
    let mut rig = Rig::new(&support::standard_state());
    let egw = Egw {
        ctl: Array::try_from(rig.dp.take_map(map_names::EGW_CTL).unwrap()).unwrap(),
        dests: LpmTrie::try_from(rig.dp.take_map(map_names::EGW_DESTS).unwrap()).unwrap(),
        groups: HashMap::try_from(rig.dp.take_map(map_names::EGW_GROUPS).unwrap()).unwrap(),
        flows: HashMap::try_from(rig.dp.take_map(map_names::EGW_FLOWS).unwrap()).unwrap(),
    };
    let mut egw = egw;
    let no_gateway = |rig: &Rig| {
        support::counter(
            &rig.counters,
            DROPPED_BY_REASON + Reason::EgressNoGateway as u32,
        )
    };
    let to_external = |port: u16| tcp4(POD, EXTERNAL, 40000, port, SYN);

    // Nothing programmed: as before.
    assert_eq!(rig.egress(&to_external(443)), TC_ACT_OK);

    // 192.0.2.0/24 through group 5, which has no healthy gateway: fail closed.
    egw.dests
        .insert(
            &dest([192, 0, 2, 0], 24),
            EgwDest {
                group: GROUP,
                flags: 0,
            },
            0,
        )
        .unwrap();
    egw.dests
        .insert(
            &dest([192, 0, 2, 64], 26),
            EgwDest {
                group: GROUP,
                flags: EGW_DEST_EXCLUDED,
            },
            0,
        )
        .unwrap();
    egw.groups.insert(GROUP, group(&[]), 0).unwrap();
    egw.ctl
        .set(
            0,
            EgwCtl {
                groups: 1,
                ifindex: TUNNEL_IFINDEX,
                _pad: [0; 2],
            },
            0,
        )
        .unwrap();
    assert_eq!(rig.egress(&to_external(444)), TC_ACT_SHOT);
    assert_eq!(no_gateway(&rig), 1, "counted by reason");

    // No tunnel device: fail closed as well.
    egw.groups
        .insert(GROUP, group(&[gateway(2, 2)]), 0)
        .unwrap();
    egw.ctl
        .set(
            0,
            EgwCtl {
                groups: 1,
                ifindex: 0,
                _pad: [0; 2],
            },
            0,
        )
        .unwrap();
    assert_eq!(rig.egress(&to_external(445)), TC_ACT_SHOT);
    assert_eq!(no_gateway(&rig), 2);
    egw.ctl
        .set(
            0,
            EgwCtl {
                groups: 1,
                ifindex: TUNNEL_IFINDEX,
                _pad: [0; 2],
            },
            0,
        )
        .unwrap();
    for (k, _) in egw.flows.iter().map(|r| r.unwrap()).collect::<Vec<_>>() {
        egw.flows.remove(&k).unwrap();
    }

    // A healthy gateway: redirected, and remembered.
    assert_eq!(rig.egress(&to_external(443)), TC_ACT_REDIRECT);
    let flows = flow_of(&egw);
    assert_eq!(flows.len(), 1);
    assert_eq!((flows[0].group, flows[0].gateway.node), (GROUP, 2));
    // Established: sticks to its gateway while it is healthy, whatever joins.
    egw.groups
        .insert(GROUP, group(&[gateway(3, 3), gateway(2, 2)]), 0)
        .unwrap();
    for _ in 0..8 {
        assert_eq!(
            rig.egress(&tcp4(POD, EXTERNAL, 40000, 443, support::ACK)),
            TC_ACT_REDIRECT
        );
    }
    assert_eq!(flow_of(&egw)[0].gateway.node, 2, "sticky");
    // Its gateway dies: the flow moves to a live one.
    egw.groups
        .insert(GROUP, group(&[gateway(3, 3)]), 0)
        .unwrap();
    assert_eq!(
        rig.egress(&tcp4(POD, EXTERNAL, 40000, 443, support::ACK)),
        TC_ACT_REDIRECT
    );
    assert_eq!(flow_of(&egw)[0].gateway.node, 3);

    // Excluded prefix, a node address (cluster-internal, even inside a destination): direct.
    assert_eq!(
        rig.egress(&tcp4(POD, [192, 0, 2, 70].into(), 40001, 443, SYN)),
        TC_ACT_OK
    );
    egw.dests
        .insert(
            &dest([10, 243, 0, 0], 16),
            EgwDest {
                group: GROUP,
                flags: 0,
            },
            0,
        )
        .unwrap();
    assert_eq!(rig.egress(&tcp4(POD, NODE, 40002, 22, SYN)), TC_ACT_OK);

    // Policy first: a destination the pod may not reach is dropped by policy, never steered.
    let before = no_gateway(&rig);
    egw.groups.insert(GROUP, group(&[]), 0).unwrap();
    assert_eq!(
        rig.egress(&tcp4(POD, [192, 0, 2, 200].into(), 40003, 443, SYN)),
        TC_ACT_SHOT
    );
    assert_eq!(no_gateway(&rig), before, "denied by policy, not by egress");
    assert_eq!(
        support::counter(
            &rig.counters,
            DROPPED_BY_REASON + Reason::NoRuleMatched as u32
        ),
        1
    );
    // The group's EgressGateway removed: no longer steered.
    egw.groups.remove(&GROUP).unwrap();
    assert_eq!(
        rig.egress(&tcp4(POD, EXTERNAL, 40000, 443, support::ACK)),
        TC_ACT_OK
    );
    assert!(flow_of(&egw).is_empty(), "its sticky entry goes with it");
}
