//! Upstream's ClusterNetworkPolicy conformance suite, as data (`tests/conformance/cnp/cases`,
//! schema v2, see its README): every ClusterNetworkPolicy it applies must validate, and every
//! probe must get the suite's verdict from `reference`, decided by the rule its trace names.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::raw;
use super::reference::{self, Labels, NpVerdict, Packet, PeerFacts, PodFacts};
use super::{ClusterNetworkPolicy, NodeInfo};
use crate::compile::scenarios::{conformance_case_files, expand_placeholders};
use crate::model::{NamedPort, NamespaceInfo, Object, PodInfo, Protocol, Store};
use crate::reference::Endpoint;
use crate::state::{Direction, PodRef};

/// The cases, upstream's and Palisade's own (`cnp/palisade`: where the spec says more than
/// upstream tests); missing is a failure, not a skip.
fn case_files() -> Vec<PathBuf> {
    let mut files = conformance_case_files("cnp/cases");
    assert!(files.len() >= 69, "{} cases", files.len());
    let own = conformance_case_files("cnp/palisade");
    assert!(own.len() >= 4, "{} own cases", own.len());
    files.extend(own);
    files
}

fn read_case(file: &Path) -> Value {
    let text = std::fs::read_to_string(file).unwrap();
    let case = crate::manifest::yaml_documents(&text).unwrap().remove(0);
    assert_eq!(case["schema_version"], 2, "{}", file.display());
    case
}

/// The case's topology: namespaces and pods in a NetworkPolicy store, nodes, and an address for
/// every pod (`ns/pod`) and node (host-networked pods have their node's).
struct Topology {
    store: Store,
    nodes: Vec<NodeInfo>,
    addrs: BTreeMap<String, IpAddr>,
}

fn topology(case: &Value) -> Topology {
    let mut store = Store::default();
    for (ns, v) in case["namespaces"].as_object().unwrap() {
        let labels = serde_json::from_value(v["labels"].clone()).unwrap();
        store
            .namespaces
            .insert(ns.clone(), NamespaceInfo::new(ns, labels));
    }
    let mut addrs = BTreeMap::new();
    let mut nodes = Vec::new();
    for (i, n) in case["nodes"].as_array().unwrap().iter().enumerate() {
        let name = n["name"].as_str().unwrap().to_string();
        let ip = IpAddr::from([192, 168, 0, 1 + i as u8]);
        addrs.insert(name.clone(), ip);
        nodes.push(NodeInfo {
            name,
            labels: serde_json::from_value(n["labels"].clone()).unwrap(),
            addresses: vec![ip],
            ready: true,
        });
    }
    for (i, p) in case["pods"].as_array().unwrap().iter().enumerate() {
        let pod = PodRef {
            namespace: p["namespace"].as_str().unwrap().into(),
            name: p["name"].as_str().unwrap().into(),
        };
        let host_network = p["host_network"].as_bool().unwrap();
        let node = p["node"].as_str();
        let ip = match (host_network, node) {
            (true, Some(node)) => {
                *addrs
                    .entry(node.to_string())
                    .or_insert(IpAddr::from([192, 168, 1, 1 + i as u8]))
            }
            (true, None) => panic!("{pod}: host-networked without a node"),
            (false, _) => IpAddr::from([10, 244, 0, 1 + i as u8]),
        };
        addrs.insert(pod.to_string(), ip);
        let mut info = PodInfo {
            labels: serde_json::from_value(p["labels"].clone()).unwrap(),
            ips: vec![ip],
            host_network,
            node_name: node.map(str::to_string),
            ..PodInfo::default()
        };
        for port in p["ports"].as_array().unwrap() {
            // Only declared containerPorts have names a policy can use.
            if let (Some(true), Some(name)) = (port["declared"].as_bool(), port["name"].as_str()) {
                std::sync::Arc::make_mut(&mut info.container_ports).push(NamedPort {
                    name: name.into(),
                    port: port["port"].as_u64().unwrap() as u16,
                    protocol: Protocol::parse(port["protocol"].as_str().unwrap()).unwrap(),
                });
            }
        }
        std::sync::Arc::make_mut(&mut info.container_ports).sort();
        store.pods.insert(pod, info);
    }
    Topology {
        store,
        nodes,
        addrs,
    }
}

/// Every object of `policies`, by id, placeholders expanded.
fn policy_objects(case: &Value, addrs: &BTreeMap<String, IpAddr>) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for p in case["policies"].as_array().unwrap() {
        // Anything beyond the object (say, an expectation that it is refused) is unread here.
        let keys: Vec<&String> = p.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["id", "object"], "{}: unread fields", case["name"]);
        let text = expand_placeholders(&serde_json::to_string(&p["object"]).unwrap(), addrs);
        out.insert(
            p["id"].as_str().unwrap().to_string(),
            serde_json::from_str(&text).unwrap(),
        );
    }
    out
}

/// Reads and validates a ClusterNetworkPolicy. Nothing of it may be ignored: written back, the
/// raw object must be the one read.
fn validate(object: &Value) -> ClusterNetworkPolicy {
    let raw: raw::ClusterNetworkPolicy = serde_path_to_error::deserialize(object)
        .unwrap_or_else(|e| panic!("{}: {e}", object["metadata"]["name"]));
    assert_eq!(
        &serde_json::to_value(&raw).unwrap(),
        object,
        "a field was dropped"
    );
    ClusterNetworkPolicy::from_raw(&raw).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn every_conformance_policy_validates() {
    let mut checked = 0;
    for file in case_files() {
        let case = read_case(&file);
        let t = topology(&case);
        for (id, object) in policy_objects(&case, &t.addrs) {
            if object["kind"] == raw::KIND {
                let p = validate(&object);
                assert_eq!(id.split('#').next(), Some(p.name.as_str()));
                checked += 1;
            }
        }
    }
    assert!(checked >= 100, "{checked} ClusterNetworkPolicies");
}

/// `Admin p#3 egress[0] 'x' Pass; NetworkPolicy np -> allow` without the version suffixes and
/// the NetworkPolicy's name, which `reference` does not know.
fn normalize_trace(trace: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut words = trace.split_whitespace().peekable();
    while let Some(w) = words.next() {
        let w = match w.split_once('#') {
            Some((name, n)) if n.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => w,
        };
        out.push(w);
        if w == "NetworkPolicy" && words.peek().is_some_and(|n| *n != "->") {
            words.next();
        }
    }
    out.join(" ")
}

/// Applies one action of a step to the store. A ClusterNetworkPolicy must validate with
/// nothing of it ignored (`validate`) before it is applied.
fn apply_action(case: &str, a: &Value, objects: &BTreeMap<String, Value>, store: &mut Store) {
    let field = |k: &str| a[k].as_str().unwrap();
    match field("action") {
        "create_policy" | "update_policy" => {
            let object = &objects[field("policy")];
            let obj = if object["kind"] == raw::KIND {
                validate(object);
                Object::ClusterNetworkPolicy(Box::new(
                    serde_json::from_value(object.clone()).unwrap(),
                ))
            } else {
                Object::NetworkPolicy(Box::new(serde_json::from_value(object.clone()).unwrap()))
            };
            store.apply(obj).unwrap();
        }
        "delete_policy" => {
            let (ns, np) = field("policy").split_once('/').unwrap();
            assert_eq!(field("kind"), "NetworkPolicy");
            store.policies.remove(&(ns.to_string(), np.to_string()));
        }
        "set_namespace_labels" => {
            let ns = field("namespace");
            let labels = serde_json::from_value(a["labels"].clone()).unwrap();
            store
                .namespaces
                .insert(ns.to_string(), NamespaceInfo::new(ns, labels));
        }
        other => panic!("{case}: unknown action {other}"),
    }
}

#[test]
fn conformance_probes_through_the_reference() {
    let mut probes = 0;
    let mut failures = Vec::new();
    for file in case_files() {
        let case = read_case(&file);
        let name = case["name"].as_str().unwrap();
        let Topology {
            mut store,
            nodes,
            addrs,
        } = topology(&case);
        let objects = policy_objects(&case, &addrs);
        for step in case["steps"].as_array().unwrap() {
            for a in step["actions"].as_array().unwrap() {
                apply_action(name, a, &objects, &mut store);
            }
            let policies: Vec<ClusterNetworkPolicy> =
                store.cluster_policies.values().cloned().collect();
            for probe in step["probes"].as_array().unwrap() {
                probes += 1;
                let pod_ref = |k: &str| {
                    let (ns, pod) = probe[k].as_str().unwrap().split_once('/').unwrap();
                    PodRef {
                        namespace: ns.into(),
                        name: pod.into(),
                    }
                };
                let (src, dst) = (pod_ref("from"), pod_ref("to"));
                let target: IpAddr = expand_placeholders(probe["target"].as_str().unwrap(), &addrs)
                    .parse()
                    .unwrap();
                assert_eq!(store.pods[&dst].ips, [target], "{name}: target");
                let proto = Protocol::parse(probe["protocol"].as_str().unwrap()).unwrap();
                let packet = Packet {
                    proto: proto.number(),
                    port: probe["port"].as_u64().unwrap() as u16,
                };
                // NetworkPolicy's view: a host-networked pod is its node's address.
                let endpoint = |pod: &PodRef| {
                    let info = &store.pods[pod];
                    if info.host_network {
                        Endpoint::Host(info.ips[0])
                    } else {
                        Endpoint::Pod {
                            pod: pod.clone(),
                            ip: info.ips[0],
                        }
                    }
                };
                let (src_ep, dst_ep) = (endpoint(&src), endpoint(&dst));
                let ns_labels: BTreeMap<&PodRef, Labels> = [&src, &dst]
                    .into_iter()
                    .map(|p| (p, store.namespace_labels(&p.namespace).into_owned()))
                    .collect();
                let facts = |p: &PodRef| PodFacts::new(&ns_labels[p], &store.pods[p]);
                let peer = |p: &PodRef| {
                    let ip = store.pods[p].ips[0];
                    PeerFacts {
                        pod: Some(facts(p)),
                        node_labels: nodes
                            .iter()
                            .find(|n| n.addresses.contains(&ip))
                            .map(|n| &n.labels),
                        ..PeerFacts::address(ip)
                    }
                };
                let direction = |dir, subject: &PodRef, other: &PodRef| {
                    let np = NpVerdict::from_reference(
                        &store,
                        dir,
                        &src_ep,
                        &dst_ep,
                        packet.proto,
                        packet.port,
                    );
                    let v = reference::verdict(
                        &policies,
                        dir,
                        np,
                        &facts(subject),
                        &peer(other),
                        packet,
                    );
                    let trace = if store.pods[subject].host_network {
                        assert!(v.allowed);
                        let end = match dir {
                            Direction::Egress => "source",
                            Direction::Ingress => "destination",
                        };
                        format!("{end} is host-networked: not a CNP/NP subject")
                    } else {
                        v.to_string()
                    };
                    (v.allowed, trace)
                };
                let (e_ok, e_trace) = direction(Direction::Egress, &src, &dst);
                let (i_ok, i_trace) = direction(Direction::Ingress, &dst, &src);
                let got = if e_ok && i_ok { "allow" } else { "deny" };
                let trace = format!("egress: {e_trace} | ingress: {i_trace}");
                // Palisade's own cases state the verdict only.
                let want_trace = probe["model_trace"].as_str().map(normalize_trace);
                let trace_ok = want_trace
                    .as_ref()
                    .is_none_or(|want| normalize_trace(&trace) == *want);
                if got != probe["expect"] || !trace_ok {
                    failures.push(format!(
                        "{name} line {}: {src} -> {dst} {proto}/{}: got {got} ({trace}), want {} ({want_trace:?})",
                        probe["line"], packet.port, probe["expect"]
                    ));
                }
            }
        }
    }
    assert!(probes >= 200, "{probes} probes");
    assert!(
        failures.is_empty(),
        "{} of {probes} probes:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// The same probes through the compiler and the datapath's twin: every pod that is not
/// host-networked is an endpoint of one node (node-1, whose address the host-networked pods
/// share), and a probe is allowed when the source's egress and the destination's ingress both
/// allow it, as the programs on the two veths decide. Both address families.
#[test]
fn conformance_probes_through_the_compiler() {
    for v6 in [false, true] {
        let (probes, failures) = compiler_probes(v6);
        assert!(probes >= 190, "{probes} probes");
        assert!(
            failures.is_empty(),
            "{} (IPv6: {v6}) of {probes} probes:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
}

/// An IPv4 topology address as IPv6 (`fd00::` and its four bytes), when `v6`.
fn family(ip: IpAddr, v6: bool) -> IpAddr {
    match ip {
        IpAddr::V4(a) if v6 => {
            let [a, b, c, d] = a.octets();
            IpAddr::from([
                0xfd00,
                0,
                0,
                0,
                0,
                0,
                u16::from_be_bytes([a, b]),
                u16::from_be_bytes([c, d]),
            ])
        }
        _ => ip,
    }
}

fn compiler_probes(v6: bool) -> (usize, Vec<String>) {
    use crate::compile::{Compiler, LocalEndpoint};
    use crate::datapath_model;

    let mut probes = 0;
    let mut failures = Vec::new();
    for file in case_files() {
        let case = read_case(&file);
        let name = case["name"].as_str().unwrap();
        let Topology {
            mut store,
            nodes,
            addrs,
        } = topology(&case);
        let addrs: BTreeMap<String, IpAddr> = addrs
            .into_iter()
            .map(|(k, ip)| (k, family(ip, v6)))
            .collect();
        for info in store.pods.values_mut() {
            std::sync::Arc::make_mut(info).ips =
                info.ips.iter().map(|ip| family(*ip, v6)).collect();
        }
        for mut n in nodes {
            n.addresses = n.addresses.iter().map(|ip| family(*ip, v6)).collect();
            store.nodes.insert(n.name.clone(), n);
        }
        // Upstream writes pod CIDRs as /32, and /128 on IPv6 clusters.
        let objects: BTreeMap<String, Value> = policy_objects(&case, &addrs)
            .into_iter()
            .map(|(id, o)| {
                let text = serde_json::to_string(&o).unwrap();
                let text = if v6 {
                    text.replace("/32\"", "/128\"")
                } else {
                    text
                };
                (id, serde_json::from_str(&text).unwrap())
            })
            .collect();
        let host_addrs: Vec<IpAddr> = store
            .nodes
            .values()
            .flat_map(|n| n.addresses.clone())
            .collect();
        let endpoints: Vec<LocalEndpoint> = store
            .pods
            .iter()
            .filter(|(_, p)| !p.host_network)
            .enumerate()
            .map(|(i, (pod, _))| LocalEndpoint {
                pod: pod.clone(),
                ifindex: 100 + i as u32,
            })
            .collect();
        let ifindex = |pod: &PodRef| endpoints.iter().find(|e| e.pod == *pod).map(|e| e.ifindex);
        let mut compiler = Compiler::new();
        for step in case["steps"].as_array().unwrap() {
            for a in step["actions"].as_array().unwrap() {
                apply_action(name, a, &objects, &mut store);
            }
            let state = compiler.compile(&store, &endpoints, &host_addrs);
            for probe in step["probes"].as_array().unwrap() {
                probes += 1;
                let pod_ref = |k: &str| {
                    let (ns, pod) = probe[k].as_str().unwrap().split_once('/').unwrap();
                    PodRef {
                        namespace: ns.into(),
                        name: pod.into(),
                    }
                };
                let (src, dst) = (pod_ref("from"), pod_ref("to"));
                let proto = Protocol::parse(probe["protocol"].as_str().unwrap()).unwrap();
                let port = probe["port"].as_u64().unwrap() as u16;
                let (src_ip, dst_ip) = (store.pods[&src].ips[0], store.pods[&dst].ips[0]);
                let judge = |pod: &PodRef, dir: Direction, peer: IpAddr, local: IpAddr| {
                    match ifindex(pod) {
                        Some(i) => {
                            let v = datapath_model::evaluate(
                                &state,
                                i,
                                dir,
                                peer,
                                local,
                                proto.number(),
                                port,
                            );
                            let rule = v.rule.and_then(|r| state.rules.get(&r));
                            let by = rule.map_or(String::new(), |r| format!(" by {r}"));
                            (v.allowed, format!("{:?}{by}", v.reason))
                        }
                        None => (true, "host-networked".into()),
                    }
                };
                let (e_ok, e) = judge(&src, Direction::Egress, dst_ip, src_ip);
                let (i_ok, i) = judge(&dst, Direction::Ingress, src_ip, dst_ip);
                let got = if e_ok && i_ok { "allow" } else { "deny" };
                if got != probe["expect"] {
                    failures.push(format!(
                        "{name} line {}: {src} -> {dst} {proto}/{port}: got {got} (egress: {e} | ingress: {i}), want {} ({})",
                        probe["line"], probe["expect"], probe["model_trace"]
                    ));
                }
            }
        }
    }
    (probes, failures)
}
