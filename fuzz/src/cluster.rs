//! Random clusters: namespaces, pods (some of them local endpoints), nodes and their addresses,
//! NetworkPolicies and ClusterNetworkPolicies (through the same validation as manifests), and
//! changes to them.
use std::collections::BTreeMap;
use std::net::IpAddr;

use palisade_policy::cnp::NodeInfo;
use palisade_policy::compile::LocalEndpoint;
use palisade_policy::model::{NamedPort, NamespaceInfo, Object, PodInfo, Protocol, Store};
use palisade_policy::state::PodRef;
use serde_json::{Value, json};

use crate::rng::Rng;

const LABELS: &[(&str, &[&str])] = &[
    ("app", &["w", "x", "y"]),
    ("tier", &["f", "b"]),
    ("v", &["1"]),
];
const NS_LABELS: &[(&str, &[&str])] = &[("env", &["x", "y"]), ("team", &["p", "q"])];
const NAMESPACES: &[&str] = &["a", "b", "c", "d"];
const PORT_NAMES: &[&str] = &["http", "dns", "sig", "web", "nope"];
/// Port numbers policies use (packets favour them and their neighbours).
pub const PORTS: &[u16] = &[53, 80, 443, 3868, 8000, 8001, 8080];

pub struct Cluster {
    pub store: Store,
    /// Pods with an interface on this node.
    pub local: Vec<LocalEndpoint>,
    /// This node's addresses.
    pub hosts: Vec<IpAddr>,
    /// Addresses packets are made of: pods, node, ipBlock edges, strangers.
    pub v4: Vec<IpAddr>,
    pub v6: Vec<IpAddr>,
    next_policy: usize,
    next_cluster_policy: usize,
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("valid address")
}

impl Cluster {
    /// A random cluster whose local pods sit on `ifindexes` (at most one pod each).
    pub fn random(rng: &mut Rng, ifindexes: &[u32]) -> Cluster {
        let mut store = Store::default();
        for ns in &NAMESPACES[..3] {
            if rng.chance(0.85) {
                let mut labels = BTreeMap::new();
                for (k, vs) in NS_LABELS {
                    if rng.chance(0.6) {
                        labels.insert(k.to_string(), rng.pick(vs).to_string());
                    }
                }
                store
                    .namespaces
                    .insert(ns.to_string(), NamespaceInfo::new(ns, labels));
            }
        }
        let hosts = vec![ip("10.0.9.1"), ip("fd00::9:1"), ip("fe80::1")];
        let mut v4 = vec![
            ip("10.0.9.1"),
            ip("10.0.1.77"),
            ip("10.0.3.200"),
            ip("192.0.2.1"),
            ip("8.8.8.8"),
            ip("0.0.0.0"),
            ip("255.255.255.255"),
            ip("127.0.0.1"),
            ip("224.0.0.1"),
        ];
        let mut v6 = vec![
            ip("fd00::9:1"),
            ip("fe80::1"),
            ip("fe80::1234"),
            ip("fd00::1:77"),
            ip("2001:db8::1"),
            ip("::"),
            ip("::1"),
            ip("ff02::1"),
            ip("ff02::2"),
            ip("ff02::1:ff00:1"),
            ip("ff05::2"),
            ip("64:ff9b::a00:1"),
        ];
        let n = rng.range(3, 10) as usize;
        let mut pods = Vec::new();
        for i in 1..=n {
            let ns = *rng.pick(NAMESPACES);
            let mut info = PodInfo::default();
            for (k, vs) in LABELS {
                if rng.chance(0.6) {
                    let v = rng.pick(vs).to_string();
                    std::sync::Arc::make_mut(&mut info.labels).insert(k.to_string(), v);
                }
            }
            let candidates: &[(&str, u16, Protocol)] = &[
                ("http", 80, Protocol::Tcp),
                ("http", 8080, Protocol::Tcp),
                ("dns", 53, Protocol::Udp),
                ("dns", 53, Protocol::Tcp),
                ("sig", 3868, Protocol::Sctp),
                ("web", 8000, Protocol::Tcp),
                ("web", 8001, Protocol::Udp),
            ];
            for name in ["http", "dns", "sig", "web"] {
                if rng.chance(0.5) {
                    let options: Vec<_> = candidates.iter().filter(|c| c.0 == name).collect();
                    let (n, port, protocol) = **rng.pick(&options);
                    std::sync::Arc::make_mut(&mut info.container_ports).push(NamedPort {
                        name: n.into(),
                        port,
                        protocol,
                    });
                }
            }
            std::sync::Arc::make_mut(&mut info.container_ports).sort();
            info.host_network = rng.chance(0.08);
            let sub = rng.below(4);
            if info.host_network {
                info.ips.push(ip(&format!("10.0.9.{}", 100 + i)));
            } else {
                if rng.chance(0.9) {
                    info.ips.push(ip(&format!("10.0.{sub}.{i}")));
                }
                if info.ips.is_empty() || rng.chance(0.6) {
                    info.ips.push(ip(&format!("fd00::{sub}:{i}")));
                }
            }
            for a in &info.ips {
                if a.is_ipv4() {
                    v4.push(*a)
                } else {
                    v6.push(*a)
                }
            }
            let pod = PodRef {
                namespace: ns.into(),
                name: format!("p{i}").into(),
            };
            if !info.host_network {
                pods.push(pod.clone());
            }
            store.pods.insert(pod, info);
        }
        // Local endpoints: a random subset of the (non-hostNetwork) pods.
        let mut local = Vec::new();
        for ifindex in ifindexes {
            if pods.is_empty() {
                break;
            }
            if !local.is_empty() && rng.chance(0.25) {
                continue;
            }
            let pod = pods.remove(rng.below(pods.len()));
            local.push(LocalEndpoint {
                pod,
                ifindex: *ifindex,
            });
        }
        let mut c = Cluster {
            store,
            local,
            hosts,
            v4,
            v6,
            next_policy: 0,
            next_cluster_policy: 0,
        };
        // This node and another (`nodes` peers): labels by zone.
        for (name, zone, addrs) in [
            ("self", "a", ["10.0.9.1", "fd00::9:1"]),
            ("other", "b", ["10.0.9.2", "fd00::9:2"]),
        ] {
            let addresses: Vec<IpAddr> = addrs.iter().map(|a| ip(a)).collect();
            for a in &addresses {
                let pool = if a.is_ipv4() { &mut c.v4 } else { &mut c.v6 };
                if !pool.contains(a) {
                    pool.push(*a);
                }
            }
            c.store.nodes.insert(
                name.into(),
                NodeInfo {
                    name: name.into(),
                    labels: [("zone".to_string(), zone.to_string())].into(),
                    addresses,
                    ready: true,
                },
            );
        }
        for _ in 0..rng.range(0, 8) {
            c.add_policy(rng);
        }
        for _ in 0..rng.range(0, 3) {
            c.add_cluster_policy(rng);
        }
        c
    }

    pub fn add_cluster_policy(&mut self, rng: &mut Rng) {
        let i = self.next_cluster_policy;
        self.next_cluster_policy += 1;
        let obj = self.cluster_policy(rng, i);
        self.store
            .apply(obj)
            .expect("generated cluster policies are valid");
    }

    pub fn add_policy(&mut self, rng: &mut Rng) {
        let i = self.next_policy;
        self.next_policy += 1;
        let obj = self.policy(rng, i);
        self.store.apply(obj).expect("generated policies are valid");
    }

    /// One random change: a policy or a cluster policy added, replaced or removed, or a pod
    /// relabelled.
    pub fn mutate(&mut self, rng: &mut Rng) -> String {
        if rng.chance(0.25) {
            let names: Vec<String> = self.store.cluster_policies.keys().cloned().collect();
            return match rng.below(3) {
                0 if !names.is_empty() => {
                    let name = rng.pick(&names).clone();
                    self.store.cluster_policies.remove(&name);
                    format!("cluster policy {name} removed")
                }
                1 if !names.is_empty() => {
                    let name = rng.pick(&names).clone();
                    let idx: usize = name.trim_start_matches("cnp").parse().unwrap_or(0);
                    let obj = self.cluster_policy(rng, idx);
                    self.store
                        .apply(obj)
                        .expect("generated cluster policies are valid");
                    format!("cluster policy {name} replaced")
                }
                _ => {
                    self.add_cluster_policy(rng);
                    "cluster policy added".into()
                }
            };
        }
        match rng.below(4) {
            0 => {
                self.add_policy(rng);
                "policy added".into()
            }
            1 if !self.store.policies.is_empty() => {
                let keys: Vec<_> = self.store.policies.keys().cloned().collect();
                let k = rng.pick(&keys).clone();
                self.store.policies.remove(&k);
                format!("policy {}/{} removed", k.0, k.1)
            }
            2 if !self.store.policies.is_empty() => {
                let keys: Vec<_> = self.store.policies.keys().cloned().collect();
                let (ns, name) = rng.pick(&keys).clone();
                let idx: usize = name.trim_start_matches("np").parse().unwrap_or(0);
                let obj = self.policy_in(rng, idx, &ns);
                self.store.apply(obj).expect("generated policies are valid");
                format!("policy {ns}/{name} replaced")
            }
            _ => {
                let keys: Vec<_> = self.store.pods.keys().cloned().collect();
                let k = rng.pick(&keys).clone();
                let (key, values) = *rng.pick(LABELS);
                let value = (!rng.chance(0.3)).then(|| rng.pick(values).to_string());
                let pod = self.store.pods.make_mut(&k).expect("listed");
                let labels = std::sync::Arc::make_mut(&mut pod.labels);
                match value {
                    None => labels.remove(key),
                    Some(v) => labels.insert(key.into(), v),
                };
                format!("pod {k} relabelled")
            }
        }
    }

    fn selector(&self, rng: &mut Rng, ns: bool) -> Value {
        let pool = if ns { NS_LABELS } else { LABELS };
        let mut ml = serde_json::Map::new();
        let mut exprs = Vec::new();
        for _ in 0..rng.range(0, 2) {
            let (k, vs) = *rng.pick(pool);
            let (k, vs): (&str, &[&str]) = if ns && rng.chance(0.2) {
                ("kubernetes.io/metadata.name", &["a", "b", "c", "d"])
            } else {
                (k, vs)
            };
            match rng.below(5) {
                0 => {
                    ml.insert(k.into(), json!(rng.pick(vs)));
                }
                1 | 2 => {
                    let op = if rng.chance(0.5) { "In" } else { "NotIn" };
                    let n = rng.range(1, vs.len() as u64) as usize;
                    let values: Vec<&str> = (0..n).map(|_| *rng.pick(vs)).collect();
                    exprs.push(json!({"key": k, "operator": op, "values": values}));
                }
                3 => exprs.push(json!({"key": k, "operator": "Exists"})),
                _ => exprs.push(json!({"key": k, "operator": "DoesNotExist"})),
            }
        }
        let mut sel = serde_json::Map::new();
        if !ml.is_empty() {
            sel.insert("matchLabels".into(), Value::Object(ml));
        }
        if !exprs.is_empty() {
            sel.insert("matchExpressions".into(), Value::Array(exprs));
        }
        Value::Object(sel)
    }

    /// A prefix around an interesting address, and excepts strictly inside it.
    fn ip_block(&self, rng: &mut Rng) -> Value {
        let v6 = rng.chance(0.35);
        let (bits, lens): (u8, &[u8]) = if v6 {
            (128, &[0, 16, 64, 100, 110, 112, 120, 127, 128])
        } else {
            (32, &[0, 8, 16, 22, 23, 24, 25, 30, 31, 32])
        };
        let pool: Vec<IpAddr> = if v6 { &self.v6 } else { &self.v4 }
            .iter()
            .copied()
            .filter(|a| !a.is_multicast() && !a.is_unspecified())
            .collect();
        let base = *rng.pick(&pool);
        let len = *rng.pick(lens);
        let net = |a: IpAddr, l: u8| ipnetwork::IpNetwork::new(a, l).expect("valid prefix");
        let cidr =
            palisade_policy::model::parse_cidr(&net(base, len).to_string()).expect("valid cidr");
        let mut except = Vec::new();
        if len < bits {
            for _ in 0..rng.range(0, 3) {
                let inside: Vec<IpAddr> =
                    pool.iter().copied().filter(|a| cidr.contains(*a)).collect();
                let a = *rng.pick(&inside);
                let l = rng.range(u64::from(len) + 1, u64::from(bits)) as u8;
                except.push(
                    palisade_policy::model::parse_cidr(&net(a, l).to_string())
                        .expect("valid cidr")
                        .to_string(),
                );
            }
        }
        json!({"ipBlock": {"cidr": cidr.to_string(), "except": except}})
    }

    fn ports(&self, rng: &mut Rng) -> Option<Value> {
        if rng.chance(0.2) {
            return None;
        }
        let mut out = Vec::new();
        for _ in 0..rng.range(0, 3) {
            let proto = *rng.pick(&["TCP", "UDP", "SCTP"]);
            let mut p = json!({"protocol": proto});
            if rng.chance(0.2) {
                p.as_object_mut().expect("object").remove("protocol");
            }
            match rng.below(10) {
                0 => {}
                1..=3 => p["port"] = json!(rng.pick(PORTS)),
                4..=6 => {
                    let n = *rng.pick(PORTS) - rng.range(0, 4) as u16;
                    let e = n + rng.range(0, 40) as u16;
                    p["port"] = json!(n);
                    p["endPort"] = json!(e);
                }
                _ => p["port"] = json!(rng.pick(PORT_NAMES)),
            }
            out.push(p);
        }
        Some(Value::Array(out))
    }

    fn rules(&self, rng: &mut Rng, peers_key: &str) -> Value {
        let mut rules = Vec::new();
        for _ in 0..rng.range(0, 3) {
            let mut rule = serde_json::Map::new();
            match rng.below(10) {
                0 => {}
                1 => {
                    rule.insert(peers_key.into(), json!([]));
                }
                _ => {
                    let mut peers = Vec::new();
                    for _ in 0..rng.range(1, 3) {
                        peers.push(match rng.below(4) {
                            0 => json!({"podSelector": self.selector(rng, false)}),
                            1 => json!({"namespaceSelector": self.selector(rng, true)}),
                            2 => json!({"namespaceSelector": self.selector(rng, true),
                                        "podSelector": self.selector(rng, false)}),
                            _ => self.ip_block(rng),
                        });
                    }
                    rule.insert(peers_key.into(), Value::Array(peers));
                }
            }
            if let Some(p) = self.ports(rng) {
                rule.insert("ports".into(), p);
            }
            rules.push(Value::Object(rule));
        }
        Value::Array(rules)
    }

    /// A ClusterNetworkPolicy peer of one direction.
    fn tier_peer(&self, rng: &mut Rng, egress: bool) -> Value {
        let pods = |rng: &mut Rng| {
            let mut p = serde_json::Map::new();
            if rng.chance(0.6) {
                p.insert("namespaceSelector".into(), self.selector(rng, true));
            }
            p.insert("podSelector".into(), self.selector(rng, false));
            json!({"pods": p})
        };
        match rng.below(if egress { 6 } else { 3 }) {
            0 => json!({"namespaces": self.selector(rng, true)}),
            1 | 2 => pods(rng),
            3 | 4 => {
                let mut nets = Vec::new();
                for _ in 0..rng.range(1, 2) {
                    let cidr = self.ip_block(rng)["ipBlock"]["cidr"].clone();
                    if !nets.contains(&cidr) {
                        nets.push(cidr);
                    }
                }
                json!({"networks": nets})
            }
            _ if rng.chance(0.3) => json!({"nodes": {}}),
            _ => json!({"nodes": {"matchLabels": {"zone": rng.pick(&["a", "b"])}}}),
        }
    }

    /// `protocols` of a ClusterNetworkPolicy rule (named ports only with pod peers).
    fn tier_ports(&self, rng: &mut Rng, named: bool) -> Option<Value> {
        if rng.chance(0.35) {
            return None;
        }
        let mut out = Vec::new();
        for _ in 0..rng.range(1, 3) {
            if named && rng.chance(0.25) {
                out.push(json!({"destinationNamedPort": rng.pick(PORT_NAMES)}));
                continue;
            }
            let proto = *rng.pick(&["tcp", "udp", "sctp"]);
            let n = *rng.pick(PORTS);
            let port = if rng.chance(0.5) {
                json!({"number": n})
            } else {
                let start = n - rng.range(0, 4) as u16;
                let end = start + rng.range(1, 40) as u16;
                json!({"range": {"start": start, "end": end}})
            };
            out.push(json!({proto: {"destinationPort": port}}));
        }
        Some(Value::Array(out))
    }

    fn cluster_policy(&self, rng: &mut Rng, i: usize) -> Object {
        let subject = if rng.chance(0.4) {
            json!({"namespaces": self.selector(rng, true)})
        } else {
            let mut p = serde_json::Map::new();
            if rng.chance(0.5) {
                p.insert("namespaceSelector".into(), self.selector(rng, true));
            }
            p.insert("podSelector".into(), self.selector(rng, false));
            json!({"pods": p})
        };
        let mut spec = json!({
            "tier": rng.pick(&["Admin", "Baseline"]),
            "priority": rng.pick(&[0, 10, 10, 20, 1000]),
            "subject": subject,
        });
        for (dir, peers_key) in [("ingress", "from"), ("egress", "to")] {
            if rng.chance(0.3) {
                continue;
            }
            let mut rules = Vec::new();
            for _ in 0..rng.range(1, 3) {
                let peers: Vec<Value> = (0..rng.range(1, 2))
                    .map(|_| self.tier_peer(rng, dir == "egress"))
                    .collect();
                let named = !peers
                    .iter()
                    .any(|q| q.get("networks").or(q.get("nodes")).is_some());
                let mut rule = json!({
                    "action": rng.pick(&["Accept", "Deny", "Pass"]),
                    peers_key: peers,
                });
                if let Some(p) = self.tier_ports(rng, named) {
                    rule["protocols"] = p;
                }
                rules.push(rule);
            }
            spec[dir] = Value::Array(rules);
        }
        let mut metadata = json!({"name": format!("cnp{i}")});
        if rng.chance(0.15) {
            metadata["annotations"] = json!({"palisade.io/audit": "true"});
        }
        let v = json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": metadata,
            "spec": spec,
        });
        Object::ClusterNetworkPolicy(Box::new(
            serde_json::from_value(v).expect("generated cluster policy decodes"),
        ))
    }

    fn policy(&self, rng: &mut Rng, i: usize) -> Object {
        let ns = *rng.pick(NAMESPACES);
        self.policy_in(rng, i, ns)
    }

    fn policy_in(&self, rng: &mut Rng, i: usize, ns: &str) -> Object {
        let mut spec = serde_json::Map::new();
        let sel = if rng.chance(0.4) {
            json!({})
        } else {
            self.selector(rng, false)
        };
        spec.insert("podSelector".into(), sel);
        match rng.below(4) {
            0 => {}
            1 => {
                spec.insert("policyTypes".into(), json!(["Ingress"]));
            }
            2 => {
                spec.insert("policyTypes".into(), json!(["Egress"]));
            }
            _ => {
                spec.insert("policyTypes".into(), json!(["Ingress", "Egress"]));
            }
        }
        if rng.chance(0.8) {
            spec.insert("ingress".into(), self.rules(rng, "from"));
        }
        if rng.chance(0.7) {
            spec.insert("egress".into(), self.rules(rng, "to"));
        }
        let mut metadata = json!({"name": format!("np{i}"), "namespace": ns});
        if rng.chance(0.15) {
            metadata["annotations"] = json!({"palisade.io/audit": "true"});
        }
        let v = json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": metadata,
            "spec": spec,
        });
        Object::NetworkPolicy(Box::new(
            serde_json::from_value(v).expect("generated policy decodes"),
        ))
    }
}
