//! EgressGateways compiled for one node (`DesiredState::egress`): the EGW_DESTS entries of
//! its endpoints, and per EgressGateway (a group) its candidate gateway nodes, egress
//! addresses and what a gateway's masquerade matches (every selected pod's address, the
//! destinations). Health is not known here: the agent keeps, of each group's candidates, the
//! healthy ones in EGW_GROUPS (`active_gateways`).
use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use palisade_common::{
    AF_INET, AF_INET6, CIDR_MASKS, EGW_DEST_EXCLUDED, EGW_MAX_GATEWAYS, EgwDest, EgwDestKey,
};

use crate::model::Store;
use crate::model::egress::EgressGateway;
use crate::state::{DesiredState, PodRef};
pub use crate::state::{DestEntry, EgressPlan, GatewayNode, Group};

/// FNV-1a of `s`, never 0: ids that every agent derives alike from names, stable while the
/// name exists (a flow's sticky entry names its group and gateway by them).
pub fn name_id(s: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in s.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h.max(1)
}

/// A node's id in the maps.
pub fn node_id(name: &str) -> u32 {
    name_id(name)
}

fn selects(g: &EgressGateway, store: &Store, pod: &PodRef) -> bool {
    let Some(info) = store.pods.get(pod) else {
        return false;
    };
    !info.host_network
        && g.namespace_selector
            .matches(&store.namespace_labels(&pod.namespace))
        && g.pod_selector.matches(&info.labels)
}

fn dest_entry(endpoint: u32, net: &IpNetwork) -> DestEntry {
    let (family, mut addr) = match net.network() {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            (AF_INET, b)
        }
        IpAddr::V6(a) => (AF_INET6, a.octets()),
    };
    for (a, m) in addr.iter_mut().zip(&CIDR_MASKS[net.prefix() as usize]) {
        *a &= m;
    }
    DestEntry {
        key: EgwDestKey {
            endpoint,
            family,
            _pad: [0; 3],
            addr,
        },
        prefix_len: net.prefix(),
    }
}

/// Compiles the store's EgressGateways for the endpoints of `desired`.
pub fn compile(store: &Store, desired: &DesiredState) -> EgressPlan {
    let mut plan = EgressPlan::default();
    // Ids by name, in name order; a collision takes the next free id.
    for g in store.egress_gateways.values() {
        let mut id = name_id(&g.name);
        while plan.groups.contains_key(&id) {
            id = id.wrapping_add(1).max(1);
        }
        let gateways: Vec<GatewayNode> = store
            .nodes
            .values()
            .filter(|n| n.ready && g.gateway_nodes.matches(&n.labels))
            .map(|n| GatewayNode {
                name: n.name.clone(),
                id: node_id(&n.name),
                v4: n.addresses.iter().find_map(|a| match a {
                    IpAddr::V4(a) => Some(*a),
                    _ => None,
                }),
                v6: n.addresses.iter().find_map(|a| match a {
                    IpAddr::V6(a) => Some(*a),
                    _ => None,
                }),
            })
            .take(EGW_MAX_GATEWAYS)
            .collect();
        let mut sources: Vec<IpAddr> = store
            .pods
            .iter()
            .filter(|(r, _)| selects(g, store, r))
            .flat_map(|(_, p)| p.ips.iter().copied())
            .collect();
        sources.sort();
        sources.dedup();
        plan.groups.insert(
            id,
            Group {
                name: g.name.clone(),
                egress_v4: g.egress_v4,
                egress_v6: g.egress_v6,
                gateways,
                sources,
                destinations: g.destinations.clone(),
                excluded: g.excluded.clone(),
            },
        );
    }
    let by_name: BTreeMap<&str, u32> = plan
        .groups
        .iter()
        .map(|(id, g)| (g.name.as_str(), *id))
        .collect();
    // Node addresses are cluster-internal: never steered (pods and Service VIPs are found in
    // IDENTITIES by the datapath).
    let node_addrs: Vec<IpNetwork> = store
        .nodes
        .values()
        .flat_map(|n| n.addresses.iter().map(|a| IpNetwork::from(*a)))
        .collect();
    plan.nodes = store
        .nodes
        .values()
        .flat_map(|n| n.addresses.iter().copied())
        .collect();
    plan.nodes.sort();
    plan.nodes.dedup();
    for info in desired.endpoints.values() {
        let Some(meta) = desired.endpoint_meta.get(&info.id) else {
            continue;
        };
        for (name, id) in &by_name {
            let g = &store.egress_gateways[*name];
            if !selects(g, store, &meta.pod) {
                continue;
            }
            plan.selected
                .entry(info.id)
                .or_default()
                .push(name.to_string());
            // Name order decides between EgressGateways with the same prefix.
            for net in &g.destinations {
                plan.dests
                    .entry(dest_entry(info.id, net))
                    .or_insert(EgwDest {
                        group: *id,
                        flags: 0,
                    });
            }
            let inside = |a: &IpNetwork| {
                g.destinations.iter().any(|d| {
                    d.is_ipv4() == a.is_ipv4()
                        && d.prefix() <= a.prefix()
                        && d.contains(a.network())
                })
            };
            for net in g
                .excluded
                .iter()
                .chain(node_addrs.iter().filter(|a| inside(a)))
            {
                plan.dests.insert(
                    dest_entry(info.id, net),
                    EgwDest {
                        group: *id,
                        flags: EGW_DEST_EXCLUDED,
                    },
                );
            }
        }
    }
    plan
}

/// Health of the candidate gateways, as the agent sees it.
pub trait GatewayHealth {
    fn healthy(&self, node: &str) -> bool;
}

impl<F: Fn(&str) -> bool> GatewayHealth for F {
    fn healthy(&self, node: &str) -> bool {
        self(node)
    }
}

/// The gateways of `group` that flows may use now. With an egress address, one node holds it
/// at a time (the outside world routes it to one node): the first healthy candidate by name,
/// the others standing by. Without, each gateway masquerades to its own address, so every
/// healthy one takes flows (chosen per flow by hash).
pub fn active_gateways<'a>(group: &'a Group, health: &impl GatewayHealth) -> Vec<&'a GatewayNode> {
    let healthy = group.gateways.iter().filter(|n| health.healthy(&n.name));
    if group.egress_v4.is_some() || group.egress_v6.is_some() {
        healthy.take(1).collect()
    } else {
        healthy.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_str;
    use palisade_common::EndpointInfo;

    const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: a, labels: {team: x}}
---
apiVersion: v1
kind: Namespace
metadata: {name: b}
---
apiVersion: v1
kind: Pod
metadata: {name: p1, namespace: a, labels: {app: out}}
spec: {nodeName: node-1}
status: {podIPs: [{ip: 10.244.0.5}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p2, namespace: b, labels: {app: out}}
spec: {nodeName: node-1}
status: {podIPs: [{ip: 10.244.0.6}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p3, namespace: a, labels: {app: out}}
spec: {nodeName: node-2}
status: {podIPs: [{ip: 10.244.1.5}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-1, labels: {egress: "no"}}
status: {addresses: [{type: InternalIP, address: 10.243.0.1}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-3, labels: {egress: gw}}
status: {addresses: [{type: InternalIP, address: 10.243.0.3}, {type: InternalIP, address: "fd00:243::3"}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-2, labels: {egress: gw}}
status: {addresses: [{type: InternalIP, address: 10.243.0.2}]}
---
apiVersion: v1
kind: Node
metadata: {name: node-4, labels: {egress: gw}}
status:
  addresses: [{type: InternalIP, address: 10.243.0.4}]
  conditions: [{type: Ready, status: "False"}]
---
apiVersion: palisade.io/v1alpha1
kind: EgressGateway
metadata: {name: out}
spec:
  podSelector: {matchLabels: {app: out}}
  namespaceSelector: {matchLabels: {team: x}}
  destinationCIDRs: [10.243.0.0/16, 192.0.2.0/24]
  excludedCIDRs: [192.0.2.128/25]
  gatewayNodeSelector: {matchLabels: {egress: gw}}
  egressIPs: [10.243.0.100]
"#;

    fn state() -> (Store, DesiredState) {
        let store = Store::from_objects(parse_str(OBJECTS).unwrap());
        assert!(store.errors().is_empty(), "{:?}", store.errors());
        let mut d = DesiredState::default();
        for (ifindex, id, ns, name) in [(10, 300, "a", "p1"), (11, 301, "b", "p2")] {
            d.endpoints.insert(
                ifindex,
                EndpointInfo {
                    id,
                    ..Default::default()
                },
            );
            d.endpoint_meta.insert(
                id,
                crate::state::EndpointMeta {
                    pod: PodRef {
                        namespace: ns.into(),
                        name: name.into(),
                    },
                    ifindex,
                    ingress_policies: vec![],
                    egress_policies: vec![],
                    ingress_audit_ignored: vec![],
                    egress_audit_ignored: vec![],
                    ingress_cluster_policies: vec![],
                    egress_cluster_policies: vec![],
                },
            );
        }
        (store, d)
    }

    #[test]
    fn selected_endpoints_get_destinations_exclusions_and_node_addresses() {
        let (store, d) = state();
        let plan = compile(&store, &d);
        let id = name_id("out");
        let g = &plan.groups[&id];
        assert_eq!(
            g.gateways
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>(),
            ["node-2", "node-3"],
            "selected nodes that are Ready (node-4 is not), by name"
        );
        assert_eq!(g.gateways[1].v6, Some("fd00:243::3".parse().unwrap()));
        assert_eq!(
            g.sources,
            vec![
                "10.244.0.5".parse::<IpAddr>().unwrap(),
                "10.244.1.5".parse().unwrap()
            ],
            "every selected pod of the cluster, not p2 (namespace b)"
        );
        assert_eq!(plan.selected.keys().collect::<Vec<_>>(), [&300]);
        assert_eq!(
            plan.nodes.len(),
            5,
            "every node's addresses: {:?}",
            plan.nodes
        );
        let get = |net: &str| {
            plan.dests
                .get(&dest_entry(300, &net.parse().unwrap()))
                .copied()
        };
        assert_eq!(
            get("192.0.2.0/24"),
            Some(EgwDest {
                group: id,
                flags: 0
            })
        );
        assert_eq!(get("192.0.2.128/25").unwrap().flags, EGW_DEST_EXCLUDED);
        // Node addresses inside a destination are excluded; 10.243.0.100 (no node's) is not.
        for n in [
            "10.243.0.1/32",
            "10.243.0.2/32",
            "10.243.0.3/32",
            "10.243.0.4/32",
        ] {
            assert_eq!(get(n).unwrap().flags, EGW_DEST_EXCLUDED, "{n}");
        }
        assert_eq!(get("fd00:243::3/128"), None, "outside every destination");
        assert!(plan.dests.keys().all(|k| k.key.endpoint == 300));
        assert_eq!(plan.dests.len(), 2 + 1 + 4);
    }

    #[test]
    fn with_an_egress_address_one_gateway_is_active_without_every_healthy_one() {
        let (store, d) = state();
        let plan = compile(&store, &d);
        let mut g = plan.groups[&name_id("out")].clone();
        let names = |v: Vec<&GatewayNode>| v.iter().map(|n| n.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(active_gateways(&g, &|_: &str| true)), ["node-2"]);
        assert_eq!(
            names(active_gateways(&g, &|n: &str| n != "node-2")),
            ["node-3"],
            "the standby takes over"
        );
        assert!(
            active_gateways(&g, &|_: &str| false).is_empty(),
            "none: fail closed"
        );
        g.egress_v4 = None;
        assert_eq!(
            names(active_gateways(&g, &|_: &str| true)),
            ["node-2", "node-3"]
        );
    }

    #[test]
    fn ids_are_stable_and_nonzero() {
        assert_eq!(name_id("out"), name_id("out"));
        assert_ne!(name_id("out"), name_id("out2"));
        assert_ne!(name_id(""), 0);
    }
}
