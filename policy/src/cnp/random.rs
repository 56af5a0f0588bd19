//! Random clusters with ClusterNetworkPolicies, compiled (`crate::compile`) and judged by the
//! datapath's twin, against the plain reading of the spec (`super::reference`).
use std::collections::BTreeMap;

use palisade_common::{PROTO_SCTP as SCTP, PROTO_TCP as TCP, PROTO_UDP as UDP};
use rand::Rng;
use rand::seq::IndexedRandom;

use crate::compile::scenarios::{Gen, World, ip};
use crate::datapath_model::evaluate;
use crate::reference::Endpoint;
use crate::state::{Direction, Name};

/// Random clusters with ClusterNetworkPolicies (both tiers, ties of priority, every peer kind
/// but domain names, ports, ranges and named ports) and NetworkPolicies: every direction the
/// compiled maps decide (the datapath's twin) must decide as the plain reading of the spec
/// (`cnp::reference` over `reference`'s NetworkPolicy verdict).
#[test]
fn random_cluster_policies_match_the_reference() {
    use super::reference::{self as tiers, NpVerdict, Packet, PeerFacts, PodFacts};
    use crate::model::cluster::NodeInfo;
    const SEED: u64 = 0x0c1a_55e5;
    const SCENARIOS: u64 = 300;
    const PROBES: usize = 200;
    let (mut checked, mut allowed) = (0usize, 0usize);
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for scenario in 0..SCENARIOS {
        let seed = SEED + scenario;
        let mut g = Gen::new(seed, &[0u16, 1, 53, 80, 443, 3868, 8000, 8001, 8080, 65535]);
        let mut store = g.store();
        // This node (its addresses are the hosts) and another, whose address is outside.
        for (name, zone, addrs) in [
            ("n1", "a", ["10.9.9.9", "fd09::9"]),
            ("n2", "b", ["10.1.0.1", "fd01::1"]),
        ] {
            let labels = [("zone".to_string(), zone.to_string())].into();
            let addresses = addrs.iter().map(|a| ip(a)).collect();
            store.nodes.insert(
                name.into(),
                NodeInfo {
                    name: name.into(),
                    labels,
                    addresses,
                    ready: true,
                },
            );
        }
        for i in 0..g.rng.random_range(0..=3) {
            let p = g.policy(i);
            store
                .apply(p)
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        }
        for i in 0..g.rng.random_range(1..=4) {
            let p = g.cluster_policy(i);
            store
                .apply(p)
                .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        }
        let hosts = vec![ip("10.9.9.9"), ip("fd09::9")];
        let w = World::new(store, hosts.clone());
        let policies: Vec<_> = w.store.cluster_policies.values().cloned().collect();

        let mut ends: Vec<Endpoint> = Vec::new();
        for (pod, info) in &w.store.pods {
            for a in &info.ips {
                ends.push(Endpoint::Pod {
                    pod: pod.clone(),
                    ip: *a,
                });
            }
        }
        for h in hosts {
            ends.push(Endpoint::Host(h));
        }
        for e in [
            "10.0.1.77",
            "10.1.0.1",
            "192.168.0.1",
            "fd00::1:77",
            "fd01::1",
        ] {
            ends.push(Endpoint::External(ip(e)));
        }
        let ports: Vec<u16> = g.ports.iter().copied().collect();
        let ns_labels: BTreeMap<Name, BTreeMap<String, String>> = w
            .store
            .pods
            .keys()
            .map(|p| {
                let l = w.store.namespace_labels(&p.namespace).into_owned();
                (p.namespace.clone(), l)
            })
            .collect();
        for _ in 0..PROBES {
            let v6 = g.chance(0.3);
            let family: Vec<&Endpoint> = ends.iter().filter(|e| e.ip().is_ipv6() == v6).collect();
            let src = (*g.pick(&family)).clone();
            let dst = (*g.pick(&family)).clone();
            if src.ip() == dst.ip() {
                continue; // a pod's traffic to itself is not judged
            }
            let mut proto = *g.pick(&[TCP, TCP, UDP, SCTP]);
            let named = match &dst {
                Endpoint::Pod { pod, .. } if g.chance(0.4) => w.store.pods[pod]
                    .container_ports
                    .choose(&mut g.rng)
                    .map(|p| (p.protocol.number(), p.port)),
                _ => None,
            };
            let port = match named {
                Some((p, port)) => {
                    proto = p;
                    port
                }
                None => *g.pick(&ports),
            };
            for dir in Direction::BOTH {
                let (subject, peer) = match dir {
                    Direction::Egress => (&src, &dst),
                    Direction::Ingress => (&dst, &src),
                };
                let Endpoint::Pod { pod, ip: local } = subject else {
                    continue;
                };
                let info = &w.store.pods[pod];
                let np = NpVerdict::from_reference(&w.store, dir, &src, &dst, proto, port);
                let want = if info.host_network {
                    true
                } else {
                    let peer_pod = match peer {
                        Endpoint::Pod { pod, .. } => Some(PodFacts::new(
                            &ns_labels[&pod.namespace],
                            &w.store.pods[pod],
                        )),
                        _ => None,
                    };
                    let node_labels = w
                        .store
                        .nodes
                        .values()
                        .find(|n| n.addresses.contains(&peer.ip()))
                        .map(|n| &n.labels);
                    let facts = PeerFacts {
                        pod: peer_pod,
                        node_labels,
                        ..PeerFacts::address(peer.ip())
                    };
                    let subject = PodFacts::new(&ns_labels[&pod.namespace], info);
                    tiers::verdict(&policies, dir, np, &subject, &facts, Packet { proto, port })
                        .allowed
                };
                let got = match w.ifindex(pod) {
                    Some(ifindex) => {
                        evaluate(&w.state, ifindex, dir, peer.ip(), *local, proto, port)
                    }
                    None => unreachable!("every pod is an endpoint"),
                };
                *reasons.entry(format!("{:?}", got.reason)).or_default() += 1;
                assert_eq!(
                    got.allowed, want,
                    "seed {seed}: {dir} at {pod}: {src:?} -> {dst:?} proto {proto} port {port}: \
                     compiled {got:?}, reference {want}\ncluster policies: {policies:#?}\n\
                     policies: {:#?}\npods: {:#?}\nnamespaces: {:?}",
                    w.store.policies, w.store.pods, w.store.namespaces
                );
                checked += 1;
                allowed += usize::from(want);
            }
        }
    }
    eprintln!("{allowed}/{checked} allowed; model reasons: {reasons:?}");
    // Most directions of most probes are not restricted; enough are, both ways.
    assert!(
        allowed > checked / 5 && checked - allowed > checked / 20,
        "{allowed}/{checked}"
    );
    for r in [
        "TierAccept",
        "TierDeny",
        "PolicyAllow",
        "NoRuleMatched",
        "NotIsolated",
    ] {
        assert!(
            reasons.get(r).copied().unwrap_or(0) > 100,
            "{r}: {reasons:?}"
        );
    }
}
