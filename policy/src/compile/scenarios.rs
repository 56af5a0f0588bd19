//! End-to-end checks of the compiler: store → `compile` → `datapath_model`, against the plain
//! reading of the spec (`reference`), on a table of hand-written cases and on random clusters;
//! plus id stability, garbage collection and scale.
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use palisade_common::{
    CIDR_CLASS_BIT, CIDR_CLASS_NONE, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, IDENTITY_HOST,
    PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, PeerAddr, ip_of,
};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use super::*;
use crate::datapath_model::{ModelReason, evaluate};
use crate::manifest::parse_str;
use crate::model::{NamespaceInfo, Object, PodInfo, Store};
use crate::reference::{self, Endpoint};

const TCP: u8 = PROTO_TCP;
const UDP: u8 = PROTO_UDP;
const SCTP: u8 = PROTO_SCTP;
const ICMP: u8 = PROTO_ICMP;

// ---------------------------------------------------------------------------------------------
// A cluster, compiled with every pod a local endpoint
// ---------------------------------------------------------------------------------------------

pub(crate) struct World {
    pub(crate) store: Store,
    compiler: Compiler,
    endpoints: Vec<LocalEndpoint>,
    hosts: Vec<IpAddr>,
    pub(crate) state: DesiredState,
}

pub(crate) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

impl World {
    pub(crate) fn new(store: Store, hosts: Vec<IpAddr>) -> World {
        let endpoints = store
            .pods
            .keys()
            .enumerate()
            .map(|(i, p)| LocalEndpoint {
                pod: p.clone(),
                ifindex: 100 + i as u32,
            })
            .collect();
        let mut w = World {
            store,
            compiler: Compiler::default(),
            endpoints,
            hosts,
            state: DesiredState::default(),
        };
        w.recompile();
        w
    }

    fn from_yaml(docs: &[&str]) -> World {
        let objects = parse_str(&docs.join("\n---\n")).unwrap();
        let store = Store::from_objects(objects);
        assert!(store.errors().is_empty(), "{:?}", store.errors());
        World::new(store, vec![ip("10.9.9.9"), ip("fd09::9")])
    }

    fn recompile(&mut self) {
        self.state = self
            .compiler
            .compile(&self.store, &self.endpoints, &self.hosts);
        check_masked(&self.state);
    }

    pub(crate) fn ifindex(&self, pod: &PodRef) -> Option<u32> {
        self.endpoints
            .iter()
            .find(|e| e.pod == *pod)
            .map(|e| e.ifindex)
    }

    fn endpoint_id(&self, pod: &str) -> u32 {
        let (ns, name) = pod.split_once('/').unwrap();
        let r = PodRef {
            namespace: ns.into(),
            name: name.into(),
        };
        self.state.endpoints[&self.ifindex(&r).unwrap()].id
    }

    /// `ns/pod` (its IPv4 address), `ns/pod@6` (IPv6), `host`, `host@6` or an address.
    fn ep(&self, s: &str) -> Endpoint {
        let (name, v6) = match s.strip_suffix("@6") {
            Some(n) => (n, true),
            None => (s, false),
        };
        if name == "host" {
            return Endpoint::Host(*self.hosts.iter().find(|a| a.is_ipv6() == v6).unwrap());
        }
        if let Some((ns, pod)) = name.split_once('/') {
            let pod = PodRef {
                namespace: ns.into(),
                name: pod.into(),
            };
            let info = self
                .store
                .pods
                .get(&pod)
                .unwrap_or_else(|| panic!("no pod {s}"));
            let ip = *info
                .ips
                .iter()
                .find(|a| a.is_ipv6() == v6)
                .unwrap_or_else(|| panic!("{s} has no such address"));
            return Endpoint::Pod { pod, ip };
        }
        Endpoint::External(ip(name))
    }

    /// The compiled verdict, after checking it against the reference in each direction, and
    /// the model's reasons.
    fn verdict(
        &self,
        src: &Endpoint,
        dst: &Endpoint,
        proto: u8,
        port: u16,
    ) -> Result<(bool, Vec<ModelReason>), String> {
        let mut allowed = true;
        let mut reasons = Vec::new();
        for dir in Direction::BOTH {
            let (subject, peer) = match dir {
                Direction::Egress => (src, dst),
                Direction::Ingress => (dst, src),
            };
            let want = match dir {
                Direction::Egress => reference::egress_allowed(&self.store, src, dst, proto, port),
                Direction::Ingress => {
                    reference::ingress_allowed(&self.store, src, dst, proto, port)
                }
            };
            if let Endpoint::Pod { pod, ip } = subject
                && let Some(ifindex) = self.ifindex(pod)
            {
                let got = evaluate(&self.state, ifindex, dir, peer.ip(), *ip, proto, port);
                reasons.push(got.reason);
                if got.allowed != want {
                    return Err(format!(
                        "{dir} at {pod}: {src:?} -> {dst:?} proto {proto} port {port}: compiled {got:?}, reference {want}"
                    ));
                }
            } else if !want {
                return Err(format!(
                    "{dir}: reference restricts a non-endpoint {subject:?}"
                ));
            }
            allowed &= want;
        }
        if allowed != reference::allowed(&self.store, src, dst, proto, port) {
            return Err("reference::allowed disagrees with its two directions".into());
        }
        Ok((allowed, reasons))
    }

    /// Checks a table of `(src, dst, proto, port, allowed)`.
    fn check(&self, table: &[(&str, &str, u8, u16, bool)]) {
        let mut failures = Vec::new();
        for &(src, dst, proto, port, want) in table {
            match self.verdict(&self.ep(src), &self.ep(dst), proto, port) {
                Ok((got, _)) if got == want => {}
                Ok((got, _)) => failures.push(format!(
                    "{src} -> {dst} proto {proto} port {port}: got {got}, want {want}"
                )),
                Err(e) => failures.push(e),
            }
        }
        assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    }
}

/// Every prefix key has zero bits beyond its prefix (and 0 in its own `prefix_len`, which the
/// entry holds); classes and identities are in range; every allow counts into its rule's
/// stats slot, a slot per rule.
fn check_masked(s: &DesiredState) {
    let mut slots = std::collections::BTreeSet::new();
    for (rule, slot) in &s.rule_slots {
        assert!(s.rules.contains_key(rule) && *slot != 0);
        assert!(slots.insert(*slot), "slot {slot} given twice");
    }
    for (e, v) in &s.policy {
        let k = e.key;
        assert!((POLICY_KEY_ANY_PROTO_BITS..=POLICY_KEY_FULL_BITS).contains(&e.prefix_len));
        if e.prefix_len < POLICY_KEY_ANY_PORT_BITS {
            assert_eq!((k.proto, k.port_be), (0, 0), "{e:?}");
        }
        let port_bits = e.prefix_len.saturating_sub(POLICY_KEY_ANY_PORT_BITS);
        let port = u16::from_be(k.port_be);
        if port_bits < 16 {
            assert_eq!(u32::from(port) & ((1 << (16 - port_bits)) - 1), 0, "{e:?}");
        }
        assert!(k.peer >= IDENTITY_FIRST_POD, "{e:?}");
        // Some rule says something of the key: a NetworkPolicy allow or a tier's first rule,
        // each known and counted in its slot.
        let said = [
            (v.rule, v.slot),
            (v.admin.rule, v.admin.slot),
            (v.baseline.rule, v.baseline.slot),
        ];
        assert!(said.iter().any(|(r, _)| *r != 0), "{e:?} {v:?}");
        for (rule, slot) in said.into_iter().filter(|(r, _)| *r != 0) {
            assert!(s.rules.contains_key(&rule), "{e:?} {v:?}");
            assert_eq!(Some(&slot), s.rule_slots.get(&rule), "{e:?} {v:?}");
        }
        assert_eq!(k.prefix_len, 0);
    }
    for (e, class) in &s.cidrs {
        assert!(*class & CIDR_CLASS_BIT != 0);
        let bits = if e.key.family == palisade_common::AF_INET {
            32
        } else {
            128
        };
        assert!(e.prefix_len <= bits);
        assert_eq!(e.key.prefix_len, 0);
        let addr = u128::from_be_bytes(e.key.addr);
        let addr = if bits == 32 { addr >> 96 } else { addr };
        let host_bits = u128::MAX
            .checked_shr(e.prefix_len + 128 - bits)
            .unwrap_or(0);
        assert_eq!(addr & host_bits, 0, "{e:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

fn pod_yaml(ns: &str, name: &str, labels: &str, ports: &str, ips: &[&str], extra: &str) -> String {
    let ips: Vec<String> = ips.iter().map(|i| format!("{{ip: '{i}'}}")).collect();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {labels}}}\n\
         spec: {{containers: [{{name: c, ports: {ports}}}]{extra}}}\n\
         status: {{podIPs: [{}]}}",
        ips.join(", ")
    )
}

fn cluster() -> Vec<String> {
    vec![
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: prod, labels: {env: prod, team: a}}"
            .into(),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: dev, labels: {env: dev, team: b}}"
            .into(),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}".into(),
        pod_yaml(
            "prod",
            "web",
            "{app: web, tier: front}",
            "[{name: http, containerPort: 8080}, {name: metrics, containerPort: 9090}, {name: dns, containerPort: 53, protocol: UDP}]",
            &["10.0.1.1", "fd00::1:1"],
            "",
        ),
        pod_yaml(
            "prod",
            "api",
            "{app: api, tier: back}",
            "[{name: http, containerPort: 80}, {name: sig, containerPort: 3868, protocol: SCTP}]",
            &["10.0.1.2", "fd00::1:2"],
            "",
        ),
        pod_yaml(
            "prod",
            "db",
            "{app: db, tier: back, version: '1'}",
            "[{name: pg, containerPort: 5432}]",
            &["10.0.1.3"],
            "",
        ),
        pod_yaml(
            "prod",
            "batch",
            "{app: batch}",
            "[]",
            &["10.0.1.4", "fd00::1:4"],
            "",
        ),
        pod_yaml(
            "prod",
            "hostpod",
            "{app: web}",
            "[{name: http, containerPort: 8080}]",
            &["10.0.9.1"],
            ", hostNetwork: true",
        ),
        pod_yaml(
            "dev",
            "web",
            "{app: web, tier: front}",
            "[{name: http, containerPort: 8080}]",
            &["10.0.2.1", "fd00::2:1"],
            "",
        ),
        pod_yaml("dev", "tool", "{app: tool}", "[]", &["10.0.2.2"], ""),
        pod_yaml(
            "other",
            "client",
            "{app: client}",
            "[]",
            &["10.0.3.1", "fd00::3:1"],
            "",
        ),
        // A namespace without a Namespace object.
        pod_yaml("legacy", "old", "{app: old}", "[]", &["10.0.4.1"], ""),
        // A finished pod: its address is not its own any more.
        format!(
            "{}\n  phase: Succeeded",
            pod_yaml("prod", "done", "{app: web}", "[]", &["10.0.1.99"], "").replace(
                "status: {podIPs: [{ip: '10.0.1.99'}]}",
                "status:\n  podIP: 10.0.1.99"
            )
        ),
    ]
}

fn np(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}"
    )
}

fn world(policies: &[String]) -> World {
    let mut docs = cluster();
    docs.extend(policies.iter().cloned());
    let docs: Vec<&str> = docs.iter().map(String::as_str).collect();
    World::from_yaml(&docs)
}

const DENY_PROD: &str = "{podSelector: {}}";

#[test]
fn table_default_deny_host_self_other_namespaces() {
    let w = world(&[np("prod", "deny", DENY_PROD)]);
    w.check(&[
        ("other/client", "prod/web", TCP, 8080, false),
        ("other/client@6", "prod/web@6", TCP, 8080, false),
        ("prod/api", "prod/web", TCP, 8080, false),
        ("legacy/old", "prod/db", TCP, 5432, false),
        ("192.168.1.10", "prod/db", TCP, 5432, false),
        ("prod/web", "other/client", TCP, 80, true),
        ("prod/web", "192.168.1.10", UDP, 53, true),
        ("dev/tool", "dev/web", TCP, 8080, true),
        ("host", "prod/web", TCP, 8080, true),
        ("host@6", "prod/web@6", TCP, 1, true),
        ("prod/web", "prod/web", TCP, 8080, true),
        ("other/client", "prod/hostpod", TCP, 8080, true),
    ]);
    // Flags, hostNetwork and finished pods.
    let id = w.endpoint_id("prod/web");
    let info = w.state.endpoints.values().find(|e| e.id == id).unwrap();
    assert_eq!(info.flags, EP_ISOLATED_INGRESS);
    assert_eq!(w.state.endpoint_meta[&id].ingress_policies, ["prod/deny"]);
    let dev = w.endpoint_id("dev/web");
    assert_eq!(
        w.state
            .endpoints
            .values()
            .find(|e| e.id == dev)
            .unwrap()
            .flags,
        0
    );
    assert_eq!(
        w.state.endpoints.len(),
        w.store.pods.len() - 1,
        "hostpod is no endpoint"
    );
    assert!(
        !w.state
            .identities
            .contains_key(&PeerAddr::from_ip(ip("10.0.1.99")))
    );
    assert!(
        !w.state
            .identities
            .contains_key(&PeerAddr::from_ip(ip("10.0.9.1")))
    );
    assert_eq!(
        w.state.identities[&PeerAddr::from_ip(ip("10.9.9.9"))],
        IDENTITY_HOST
    );
    assert!(w.state.policy.is_empty() && w.state.cidrs.is_empty());
    // prod/web and dev/web look alike but live in different namespaces.
    let ident = |a: &str| w.state.identities[&PeerAddr::from_ip(ip(a))];
    assert_ne!(ident("10.0.1.1"), ident("10.0.2.1"));
    assert_eq!(ident("10.0.1.1"), ident("fd00::1:1"));
    assert_eq!(w.state.identity_pods[&ident("10.0.3.1")].len(), 1);
}

#[test]
fn table_allow_all_rule() {
    let w = world(&[
        np("prod", "deny", DENY_PROD),
        np(
            "prod",
            "web-open",
            "{podSelector: {matchLabels: {app: web}}, ingress: [{}]}",
        ),
    ]);
    w.check(&[
        ("other/client", "prod/web", TCP, 8080, true),
        ("other/client", "prod/web", UDP, 53, true),
        ("other/client", "prod/web", ICMP, 0, true),
        ("other/client", "prod/web", SCTP, 1, true),
        ("192.168.1.10", "prod/web", TCP, 1, true),
        ("2001:db8::1", "prod/web@6", PROTO_ICMPV6, 0, true),
        ("other/client", "prod/api", TCP, 80, false),
    ]);
}

#[test]
fn table_pod_and_namespace_selectors() {
    let w = world(&[
        np(
            "prod",
            "db-in",
            "{podSelector: {matchLabels: {app: db}}, ingress: [{from: [\
             {namespaceSelector: {matchLabels: {env: dev}}, podSelector: {matchLabels: {app: tool}}}, \
             {podSelector: {matchLabels: {tier: back}}}], ports: [{port: 5432}]}]}",
        ),
        np(
            "prod",
            "api-in",
            "{podSelector: {matchLabels: {app: api}}, ingress: [\
             {from: [{namespaceSelector: {matchExpressions: [{key: env, operator: In, values: [dev]}]}}]}, \
             {from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: legacy}}}], ports: [{port: 81}]}]}",
        ),
        np(
            "other",
            "all-ns",
            "{podSelector: {}, ingress: [{from: [{namespaceSelector: {}}]}]}",
        ),
    ]);
    w.check(&[
        // namespaceSelector AND podSelector.
        ("dev/tool", "prod/db", TCP, 5432, true),
        ("dev/tool", "prod/db", TCP, 5433, false),
        ("dev/tool", "prod/db", UDP, 5432, false),
        ("dev/web", "prod/db", TCP, 5432, false),
        // podSelector alone: the policy's namespace.
        ("prod/api", "prod/db", TCP, 5432, true),
        ("prod/web", "prod/db", TCP, 5432, false),
        ("other/client", "prod/db", TCP, 5432, false),
        // namespaceSelector alone: every pod of those namespaces.
        ("dev/web", "prod/api", TCP, 80, true),
        ("dev/tool", "prod/api", UDP, 9, true),
        ("dev/web@6", "prod/api@6", TCP, 80, true),
        ("prod/web", "prod/api", TCP, 80, false),
        ("other/client", "prod/api", TCP, 80, false),
        ("10.0.2.200", "prod/api", TCP, 80, false),
        // The name label of a namespace that has no Namespace object.
        ("legacy/old", "prod/api", TCP, 81, true),
        ("legacy/old", "prod/api", TCP, 80, false),
        // namespaceSelector {}: every pod, no external address, no hostNetwork pod.
        ("legacy/old", "other/client", TCP, 1, true),
        ("prod/web@6", "other/client@6", TCP, 1, true),
        ("prod/hostpod", "other/client", TCP, 1, false),
        ("192.168.1.10", "other/client", TCP, 1, false),
    ]);
}

#[test]
fn table_selector_operators() {
    let w = world(&[np(
        "prod",
        "ops",
        "{podSelector: {matchLabels: {app: web}}, ingress: [\
         {from: [{podSelector: {matchExpressions: [{key: tier, operator: NotIn, values: [front]}]}}], ports: [{port: 1000}]}, \
         {from: [{podSelector: {matchExpressions: [{key: version, operator: Exists}]}}], ports: [{port: 1001}]}, \
         {from: [{podSelector: {matchExpressions: [{key: tier, operator: DoesNotExist}]}}], ports: [{port: 1002}]}, \
         {from: [{podSelector: {matchExpressions: [{key: app, operator: In, values: [api, batch]}]}}], ports: [{port: 1003}]}]}",
    )]);
    let mut table = Vec::new();
    for (src, allowed) in [
        ("prod/api", [true, false, false, true]),
        ("prod/db", [true, true, false, false]),
        ("prod/batch", [true, false, true, true]),
        ("dev/tool", [false, false, false, false]),
    ] {
        for (i, a) in allowed.into_iter().enumerate() {
            table.push((src, "prod/web", TCP, 1000 + i as u16, a));
        }
    }
    w.check(&table);
}

#[test]
fn table_ip_blocks_with_excepts() {
    let w = world(&[
        np(
            "prod",
            "batch-out",
            "{podSelector: {matchLabels: {app: batch}}, policyTypes: [Egress], egress: [\
             {to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.2.0/24, 10.1.0.0/16]}}, \
                   {ipBlock: {cidr: 'fd00::/16', except: ['fd00::2:0/112']}}]}, \
             {to: [{ipBlock: {cidr: 10.0.2.0/24, except: [10.0.2.2/32]}}], ports: [{port: 22}]}]}",
        ),
        np(
            "prod",
            "api-out",
            "{podSelector: {matchLabels: {app: api}}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: '::/0'}}]}]}",
        ),
    ]);
    w.check(&[
        // Pod addresses are inside ipBlocks too.
        ("prod/batch", "prod/web", TCP, 80, true),
        ("prod/batch", "dev/web", TCP, 80, false),
        ("prod/batch", "dev/web", TCP, 22, true),
        ("prod/batch", "dev/tool", TCP, 22, false),
        ("prod/batch", "10.0.2.77", TCP, 22, true),
        ("prod/batch", "10.0.2.77", UDP, 22, false),
        ("prod/batch", "10.1.2.3", TCP, 80, false),
        ("prod/batch", "10.2.0.1", ICMP, 0, true),
        ("prod/batch", "192.168.1.10", TCP, 80, false),
        ("prod/batch", "host", TCP, 80, true),
        ("prod/batch@6", "prod/web@6", TCP, 80, true),
        ("prod/batch@6", "dev/web@6", TCP, 80, false),
        ("prod/batch@6", "fd00::5:5", TCP, 80, true),
        ("prod/batch@6", "2001:db8::1", TCP, 80, false),
        ("other/client", "prod/batch", TCP, 80, true),
        // An IPv6 block never matches IPv4.
        ("prod/api@6", "prod/web@6", TCP, 80, true),
        ("prod/api@6", "2001:db8::1", TCP, 80, true),
        ("prod/api", "prod/web", TCP, 80, false),
        ("prod/api", "192.168.1.10", TCP, 80, false),
    ]);
    // The except holes are CIDRS entries of class NONE.
    let ep = w.endpoint_id("prod/batch");
    let holes: Vec<String> = w
        .state
        .cidrs
        .iter()
        .filter(|(e, c)| e.key.endpoint == ep && **c == CIDR_CLASS_NONE)
        .map(|(e, _)| {
            let ip = ip_of(e.key.family, &e.key.addr).unwrap();
            format!("{ip}/{}", e.prefix_len)
        })
        .collect();
    assert_eq!(holes, ["10.0.2.2/32", "10.1.0.0/16", "fd00::2:0/112"]);
}

#[test]
fn table_port_ranges_and_protocols() {
    let w = world(&[
        np(
            "prod",
            "ranges",
            "{podSelector: {matchLabels: {app: web}}, ingress: [{ports: [\
             {port: 9000, endPort: 9100}, {protocol: UDP, port: 32768, endPort: 65535}]}]}",
        ),
        np(
            "prod",
            "protos",
            "{podSelector: {matchLabels: {app: api}}, ingress: [{ports: [{protocol: UDP}]}, \
             {ports: [{protocol: SCTP, port: 3868}]}]}",
        ),
        np(
            "prod",
            "db-from-api",
            "{podSelector: {matchLabels: {app: db}}, ingress: [{from: [{podSelector: {matchLabels: {app: api}}}]}]}",
        ),
    ]);
    w.check(&[
        ("other/client", "prod/web", TCP, 8999, false),
        ("other/client", "prod/web", TCP, 9000, true),
        ("other/client", "prod/web", TCP, 9050, true),
        ("other/client", "prod/web", TCP, 9100, true),
        ("other/client", "prod/web", TCP, 9101, false),
        ("other/client", "prod/web", UDP, 9000, false),
        ("other/client", "prod/web", SCTP, 9000, false),
        ("other/client", "prod/web", UDP, 32767, false),
        ("other/client", "prod/web", UDP, 32768, true),
        ("other/client", "prod/web", UDP, 65535, true),
        ("192.168.1.10", "prod/web", TCP, 9064, true),
        // Protocol-only port entries; a UDP rule never allows TCP.
        ("other/client", "prod/api", UDP, 1, true),
        ("other/client", "prod/api", UDP, 65535, true),
        ("other/client", "prod/api", TCP, 80, false),
        ("other/client", "prod/api", SCTP, 3868, true),
        ("other/client", "prod/api", SCTP, 3869, false),
        ("other/client", "prod/api", TCP, 3868, false),
        ("other/client", "prod/api", ICMP, 0, false),
        // A rule without ports allows every protocol, ICMP included.
        ("prod/api", "prod/db", ICMP, 0, true),
        ("prod/api", "prod/db", SCTP, 7, true),
        ("prod/web", "prod/db", ICMP, 0, false),
    ]);
    // The range 9000-9100 is stored as its 6 aligned blocks.
    let ep = w.endpoint_id("prod/web");
    let blocks = w
        .state
        .policy
        .keys()
        .filter(|e| e.key.endpoint == ep && e.key.proto == TCP)
        .count();
    assert_eq!(blocks, 6);
}

#[test]
fn table_named_ports() {
    let w = world(&[
        np(
            "prod",
            "batch-named-out",
            "{podSelector: {matchLabels: {app: batch}}, policyTypes: [Egress], egress: [\
             {to: [{podSelector: {}}], ports: [{port: http}]}, \
             {to: [{ipBlock: {cidr: 10.0.2.0/24}}], ports: [{port: http}]}, \
             {ports: [{port: metrics}]}, \
             {to: [{namespaceSelector: {}}], ports: [{port: dns, protocol: UDP}, {port: sig, protocol: TCP}]}]}",
        ),
        np(
            "prod",
            "named-in",
            "{podSelector: {matchLabels: {tier: back}}, ingress: [{ports: [{port: http}]}]}",
        ),
    ]);
    w.check(&[
        // Egress: resolved on each peer (web's http is 8080, api's is 80).
        ("prod/batch", "prod/web", TCP, 8080, true),
        ("prod/batch", "prod/web", TCP, 80, false),
        ("prod/batch", "prod/api", TCP, 80, true),
        ("prod/batch", "prod/api", TCP, 8080, false),
        ("prod/batch@6", "prod/web@6", TCP, 8080, true),
        // Through an ipBlock: only pods inside it that have the name.
        ("prod/batch", "dev/web", TCP, 8080, true),
        ("prod/batch", "dev/web", TCP, 80, false),
        ("prod/batch", "dev/tool", TCP, 8080, false),
        ("prod/batch", "10.0.2.200", TCP, 8080, false),
        ("prod/batch@6", "dev/web@6", TCP, 8080, false),
        // Without peers: every pod that has the name; external addresses have none.
        ("prod/batch", "prod/web", TCP, 9090, true),
        ("prod/batch", "other/client", TCP, 9090, false),
        ("prod/batch", "192.168.1.10", TCP, 9090, false),
        // The protocol must match the container port's.
        ("prod/batch", "prod/web", UDP, 53, true),
        ("prod/batch", "prod/web", TCP, 53, false),
        ("prod/batch", "prod/api", SCTP, 3868, false),
        ("prod/batch", "prod/api", TCP, 3868, false),
        // Ingress: resolved on the destination pod itself.
        ("other/client", "prod/api", TCP, 80, true),
        ("other/client", "prod/api", TCP, 8080, false),
        ("other/client", "prod/db", TCP, 80, false),
        ("other/client", "prod/db", TCP, 5432, false),
        ("other/client", "prod/hostpod", TCP, 1, true),
    ]);
}

#[test]
fn table_union_and_policy_types() {
    let w = world(&[
        np(
            "prod",
            "u1",
            "{podSelector: {matchLabels: {app: web}}, ingress: [{from: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: 8080}]}]}",
        ),
        np(
            "prod",
            "u2",
            "{podSelector: {matchLabels: {tier: front}}, ingress: [{from: [{namespaceSelector: {matchLabels: {env: dev}}}], ports: [{port: 9090}]}]}",
        ),
        // No policyTypes but egress rules: Ingress (nothing allowed) and Egress.
        np(
            "prod",
            "batch",
            "{podSelector: {matchLabels: {app: batch}}, egress: [{to: [{podSelector: {matchLabels: {app: db}}}]}]}",
        ),
        // policyTypes [Egress]: the ingress rules do not count, ingress is not isolated.
        np(
            "prod",
            "db",
            "{podSelector: {matchLabels: {app: db}}, policyTypes: [Egress], ingress: [{from: [{podSelector: {matchLabels: {app: none}}}]}]}",
        ),
    ]);
    w.check(&[
        ("prod/api", "prod/web", TCP, 8080, true),
        ("prod/api", "prod/web", TCP, 9090, false),
        ("dev/tool", "prod/web", TCP, 9090, true),
        ("dev/tool", "prod/web", TCP, 8080, false),
        ("other/client", "prod/web", TCP, 8080, false),
        ("prod/batch", "prod/db", TCP, 5432, true),
        ("prod/batch", "prod/web", TCP, 8080, false),
        ("other/client", "prod/batch", TCP, 1, false),
        ("host", "prod/batch", TCP, 1, true),
        ("other/client", "prod/db", TCP, 5432, true),
        ("prod/db", "other/client", TCP, 1, false),
        ("prod/db", "host", TCP, 1, true),
        ("prod/db", "prod/db", TCP, 5432, true),
    ]);
    let flags = |p: &str| {
        let id = w.endpoint_id(p);
        w.state
            .endpoints
            .values()
            .find(|e| e.id == id)
            .unwrap()
            .flags
    };
    assert_eq!(
        flags("prod/batch"),
        EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS
    );
    assert_eq!(flags("prod/db"), EP_ISOLATED_EGRESS);
    assert_eq!(flags("prod/api"), 0);
}

#[test]
fn table_host_network_peers_and_pod_ips_in_blocks() {
    let w = world(&[np(
        "other",
        "client-in",
        "{podSelector: {}, ingress: [\
         {from: [{podSelector: {matchLabels: {app: web}}, namespaceSelector: {matchLabels: {env: prod}}}]}, \
         {from: [{ipBlock: {cidr: 10.0.9.0/24}}], ports: [{port: 7}]}]}",
    )]);
    w.check(&[
        ("prod/web", "other/client", TCP, 80, true),
        ("prod/hostpod", "other/client", TCP, 80, false),
        ("prod/hostpod", "other/client", TCP, 7, true),
        ("dev/web", "other/client", TCP, 80, false),
    ]);
}

// ---------------------------------------------------------------------------------------------
// Randomized equivalence with the reference
// ---------------------------------------------------------------------------------------------

pub(crate) struct Gen {
    pub(crate) rng: StdRng,
    /// Addresses the generator likes to aim ipBlocks at.
    pub(crate) v4: Vec<IpAddr>,
    pub(crate) v6: Vec<IpAddr>,
    pub(crate) ports: BTreeSet<u16>,
}

const LABELS: &[(&str, &[&str])] = &[
    ("app", &["w", "x", "y"]),
    ("tier", &["f", "b"]),
    ("v", &["1"]),
];
const NS_LABELS: &[(&str, &[&str])] = &[("env", &["x", "y"]), ("team", &["p", "q"])];
const NAMESPACES: &[&str] = &["a", "b", "c", "d"];
const PORT_NAMES: &[&str] = &["http", "dns", "sig", "web", "nope"];

impl Gen {
    /// A generator seeded with `seed` that picks ports among `ports`.
    pub(crate) fn new(seed: u64, ports: &[u16]) -> Gen {
        Gen {
            rng: StdRng::seed_from_u64(seed),
            v4: Vec::new(),
            v6: Vec::new(),
            ports: ports.iter().copied().collect(),
        }
    }

    pub(crate) fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        xs.choose(&mut self.rng).unwrap()
    }

    pub(crate) fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }

    pub(crate) fn store(&mut self) -> Store {
        let mut store = Store::default();
        for ns in &NAMESPACES[..3] {
            if self.chance(0.85) {
                let mut labels = BTreeMap::new();
                for (k, vs) in NS_LABELS {
                    if self.chance(0.6) {
                        labels.insert(k.to_string(), self.pick(vs).to_string());
                    }
                }
                store
                    .namespaces
                    .insert(ns.to_string(), NamespaceInfo::new(ns, labels));
            }
        }
        let n = self.rng.random_range(3..=9);
        for i in 1..=n {
            let (pod, info) = self.pod(i);
            store.pods.insert(pod, info);
        }
        store
    }

    /// A random pod `p{i}` (addresses derived from `i`).
    pub(crate) fn pod(&mut self, i: usize) -> (PodRef, PodInfo) {
        let ns = *self.pick(NAMESPACES);
        let mut info = PodInfo::default();
        for (k, vs) in LABELS {
            if self.chance(0.6) {
                let v = self.pick(vs).to_string();
                Arc::make_mut(&mut info.labels).insert(k.to_string(), v);
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
            if self.chance(0.5) {
                let options: Vec<_> = candidates.iter().filter(|c| c.0 == name).collect();
                let (n, port, protocol) = **self.pick(&options);
                Arc::make_mut(&mut info.container_ports).push(NamedPort {
                    name: n.into(),
                    port,
                    protocol,
                });
            }
        }
        Arc::make_mut(&mut info.container_ports).sort();
        info.host_network = self.chance(0.1);
        let sub = self.rng.random_range(0..4u8);
        if info.host_network {
            info.ips.push(ip(&format!("10.0.9.{i}")));
        } else {
            if self.chance(0.9) {
                info.ips.push(ip(&format!("10.0.{sub}.{i}")));
            }
            if info.ips.is_empty() || self.chance(0.6) {
                info.ips.push(ip(&format!("fd00::{sub}:{i}")));
            }
        }
        for a in &info.ips {
            if a.is_ipv4() {
                self.v4.push(*a)
            } else {
                self.v6.push(*a)
            }
        }
        (
            PodRef {
                namespace: ns.into(),
                name: format!("p{i}").into(),
            },
            info,
        )
    }

    fn selector(&mut self, ns: bool) -> Value {
        let pool = if ns { NS_LABELS } else { LABELS };
        let mut ml = serde_json::Map::new();
        let mut exprs = Vec::new();
        for _ in 0..self.rng.random_range(0..=2) {
            let (k, vs) = *self.pick(pool);
            let (k, vs): (&str, &[&str]) = if ns && self.chance(0.2) {
                ("kubernetes.io/metadata.name", &["a", "b", "c", "d"])
            } else {
                (k, vs)
            };
            match self.rng.random_range(0..5) {
                0 => {
                    ml.insert(k.into(), json!(self.pick(vs)));
                }
                1 | 2 => {
                    let op = if self.chance(0.5) { "In" } else { "NotIn" };
                    let n = self.rng.random_range(1..=vs.len());
                    let values: Vec<&str> = vs.choose_multiple(&mut self.rng, n).copied().collect();
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
    fn ip_block(&mut self) -> Value {
        let v6 = self.chance(0.35);
        let (bits, lens): (u8, &[u8]) = if v6 {
            (128, &[0, 16, 64, 100, 110, 112, 120, 127, 128])
        } else {
            (32, &[0, 8, 16, 22, 23, 24, 25, 30, 31, 32])
        };
        let mut pool = if v6 { self.v6.clone() } else { self.v4.clone() };
        pool.push(if v6 {
            ip("fd00::1:77")
        } else {
            ip("10.0.1.77")
        });
        let base = *self.pick(&pool);
        let len = *self.pick(lens);
        let net = |a: IpAddr, l: u8| ipnetwork::IpNetwork::new(a, l).unwrap();
        let cidr = crate::model::parse_cidr(&net(base, len).to_string()).unwrap();
        let mut except = Vec::new();
        if len < bits {
            for _ in 0..self.rng.random_range(0..=3) {
                let inside: Vec<IpAddr> =
                    pool.iter().copied().filter(|a| cidr.contains(*a)).collect();
                let a = *self.pick(&inside);
                let l = self.rng.random_range(len + 1..=bits);
                except.push(
                    crate::model::parse_cidr(&net(a, l).to_string())
                        .unwrap()
                        .to_string(),
                );
            }
        }
        json!({"ipBlock": {"cidr": cidr.to_string(), "except": except}})
    }

    fn ports(&mut self) -> Option<Value> {
        if self.chance(0.2) {
            return None;
        }
        let mut out = Vec::new();
        for _ in 0..self.rng.random_range(0..=3) {
            let proto = *self.pick(&["TCP", "UDP", "SCTP"]);
            let mut p = json!({"protocol": proto});
            if self.chance(0.2) {
                p.as_object_mut().unwrap().remove("protocol"); // default TCP
            }
            let nums = [53u16, 80, 443, 3868, 8000, 8001, 8080];
            match self.rng.random_range(0..10) {
                0 => {}
                1..=3 => {
                    let n = *self.pick(&nums);
                    self.ports.insert(n);
                    p["port"] = json!(n);
                }
                5 | 6 => {
                    let n = *self.pick(&nums) - self.rng.random_range(0..5u16);
                    let e = n + self.rng.random_range(0..=40u16);
                    self.ports.extend([n.saturating_sub(1), n, e, e + 1]);
                    p["port"] = json!(n);
                    p["endPort"] = json!(e);
                }
                _ => p["port"] = json!(self.pick(PORT_NAMES)),
            }
            out.push(p);
        }
        Some(Value::Array(out))
    }

    fn rules(&mut self, peers_key: &str) -> Value {
        let mut rules = Vec::new();
        for _ in 0..self.rng.random_range(0..=3) {
            let mut rule = serde_json::Map::new();
            match self.rng.random_range(0..10) {
                0 => {} // no peers
                1 => {
                    rule.insert(peers_key.into(), json!([]));
                }
                _ => {
                    let mut peers = Vec::new();
                    for _ in 0..self.rng.random_range(1..=3) {
                        peers.push(match self.rng.random_range(0..4) {
                            0 => json!({"podSelector": self.selector(false)}),
                            1 => json!({"namespaceSelector": self.selector(true)}),
                            2 => json!({"namespaceSelector": self.selector(true),
                                        "podSelector": self.selector(false)}),
                            _ => self.ip_block(),
                        });
                    }
                    rule.insert(peers_key.into(), Value::Array(peers));
                }
            }
            if let Some(p) = self.ports() {
                rule.insert("ports".into(), p);
            }
            rules.push(Value::Object(rule));
        }
        Value::Array(rules)
    }

    pub(crate) fn policy(&mut self, i: usize) -> Object {
        let mut spec = serde_json::Map::new();
        let sel = if self.chance(0.4) {
            json!({})
        } else {
            self.selector(false)
        };
        spec.insert("podSelector".into(), sel);
        match self.rng.random_range(0..4) {
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
        if self.chance(0.8) {
            let r = self.rules("from");
            spec.insert("ingress".into(), r);
        }
        if self.chance(0.7) {
            let r = self.rules("to");
            spec.insert("egress".into(), r);
        }
        let v = json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": format!("np{i}"), "namespace": self.pick(NAMESPACES)},
            "spec": spec,
        });
        Object::NetworkPolicy(Box::new(serde_json::from_value(v).unwrap()))
    }
}

#[test]
fn random_clusters_match_the_reference() {
    const SEED: u64 = 0x9a11_5ade;
    const SCENARIOS: u64 = 500;
    const PROBES: usize = 200;
    let mut checked = 0usize;
    let mut allowed = 0usize;
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for scenario in 0..SCENARIOS {
        let seed = SEED + scenario;
        let mut g = Gen::new(seed, &[0u16, 1, 53, 80, 443, 3868, 8000, 8001, 8080, 65535]);
        let mut store = g.store();
        for i in 0..g.rng.random_range(1..=5) {
            let p = g.policy(i);
            if let Err(e) = store.apply(p) {
                panic!("seed {seed}: generated policy rejected: {e}");
            }
        }
        let hosts = vec![ip("10.9.9.9"), ip("fd09::9")];
        let w = World::new(store, hosts.clone());

        // Everything that can be an end: pods (hostNetwork ones too), outsiders, the node.
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
            "10.0.0.100",
            "10.0.1.101",
            "10.0.1.77",
            "10.0.2.102",
            "10.0.3.200",
            "10.1.0.1",
            "192.168.0.1",
            "fd00::1:77",
            "fd00::2:100",
            "fd00::3:0",
            "fd01::1",
            "2001:db8::1",
        ] {
            ends.push(Endpoint::External(ip(e)));
        }
        let ports: Vec<u16> = g.ports.iter().copied().collect();
        for _ in 0..PROBES {
            // Mostly pods (where policy applies), sometimes anything of the same family.
            let v6 = g.chance(0.3);
            let end = |g: &mut Gen| {
                let family: Vec<&Endpoint> =
                    ends.iter().filter(|e| e.ip().is_ipv6() == v6).collect();
                let pods: Vec<&Endpoint> = family
                    .iter()
                    .copied()
                    .filter(|e| matches!(e, Endpoint::Pod { .. }))
                    .collect();
                let pool = if !pods.is_empty() && g.chance(0.75) {
                    pods
                } else {
                    family
                };
                (*g.pick(&pool)).clone()
            };
            let src = end(&mut g);
            let mut dst = end(&mut g);
            if dst == src && g.chance(0.8) {
                dst = end(&mut g);
            }
            let icmp = if src.ip().is_ipv6() {
                PROTO_ICMPV6
            } else {
                ICMP
            };
            let mut proto = *g.pick(&[TCP, TCP, UDP, SCTP, icmp]);
            // Often one of the destination's named ports, the trickiest thing to resolve.
            let named = match &dst {
                Endpoint::Pod { pod, .. } if g.chance(0.4) => {
                    let ports = &w.store.pods[pod].container_ports;
                    ports
                        .choose(&mut g.rng)
                        .map(|p| (p.protocol.number(), p.port))
                }
                _ => None,
            };
            if let Some((p, _)) = named {
                proto = p;
            }
            let port = if let Some((_, port)) = named {
                port
            } else if proto == icmp {
                0
            } else if g.chance(0.1) {
                g.rng.random_range(1..=65535)
            } else {
                *g.pick(&ports)
            };
            match w.verdict(&src, &dst, proto, port) {
                Ok((a, rs)) => {
                    allowed += usize::from(a);
                    for r in rs {
                        *reasons.entry(format!("{r:?}")).or_default() += 1;
                    }
                }
                Err(e) => panic!(
                    "seed {seed} (scenario {scenario}): {e}\npolicies: {:#?}\npods: {:#?}\nnamespaces: {:?}",
                    w.store.policies, w.store.pods, w.store.namespaces
                ),
            }
            checked += 1;
        }
    }
    // The probes must exercise both outcomes, and the compiled paths.
    eprintln!("{allowed}/{checked} allowed; model reasons: {reasons:?}");
    assert!(
        allowed > checked / 5 && allowed < checked * 4 / 5,
        "{allowed}/{checked}"
    );
    for r in [
        "PolicyAllow",
        "NoRuleMatched",
        "NotIsolated",
        "SelfTraffic",
        "Host",
        "NotAnEndpoint",
    ] {
        assert!(
            reasons.get(r).copied().unwrap_or(0) > 50,
            "{r}: {reasons:?}"
        );
    }
}

impl Gen {
    /// A ClusterNetworkPolicy peer of one direction.
    fn tier_peer(&mut self, egress: bool) -> Value {
        let pods = |g: &mut Gen| {
            let mut p = serde_json::Map::new();
            if g.chance(0.6) {
                p.insert("namespaceSelector".into(), g.selector(true));
            }
            p.insert("podSelector".into(), g.selector(false));
            json!({"pods": p})
        };
        match self.rng.random_range(0..if egress { 6 } else { 3 }) {
            0 => json!({"namespaces": self.selector(true)}),
            1 | 2 => pods(self),
            3 | 4 => {
                let mut nets = Vec::new();
                for _ in 0..self.rng.random_range(1..=2) {
                    let cidr = self.ip_block()["ipBlock"]["cidr"].clone();
                    if !nets.contains(&cidr) {
                        nets.push(cidr);
                    }
                }
                json!({"networks": nets})
            }
            _ => {
                let zone = *self.pick(&["a", "b"]);
                if self.chance(0.3) {
                    json!({"nodes": {}})
                } else {
                    json!({"nodes": {"matchLabels": {"zone": zone}}})
                }
            }
        }
    }

    /// `protocols` of a rule, or none.
    fn tier_ports(&mut self) -> Option<Value> {
        if self.chance(0.35) {
            return None;
        }
        let mut out = Vec::new();
        for _ in 0..self.rng.random_range(1..=3) {
            if self.chance(0.25) {
                out.push(json!({"destinationNamedPort": self.pick(PORT_NAMES)}));
                continue;
            }
            let proto = *self.pick(&["tcp", "udp", "sctp"]);
            let nums = [53u16, 80, 443, 3868, 8000, 8001, 8080];
            let n = *self.pick(&nums);
            let port = if self.chance(0.5) {
                self.ports.insert(n);
                json!({"number": n})
            } else {
                let start = n - self.rng.random_range(0..5u16);
                let end = start + self.rng.random_range(1..=40u16);
                self.ports
                    .extend([start.saturating_sub(1), start, end, end + 1]);
                json!({"range": {"start": start, "end": end}})
            };
            out.push(json!({proto: {"destinationPort": port}}));
        }
        Some(Value::Array(out))
    }

    pub(crate) fn cluster_policy(&mut self, i: usize) -> Object {
        let subject = if self.chance(0.4) {
            json!({"namespaces": self.selector(true)})
        } else {
            let mut p = serde_json::Map::new();
            if self.chance(0.5) {
                p.insert("namespaceSelector".into(), self.selector(true));
            }
            p.insert("podSelector".into(), self.selector(false));
            json!({"pods": p})
        };
        let mut spec = json!({
            "tier": self.pick(&["Admin", "Baseline"]),
            // Few priorities: ties, broken by name, are common.
            "priority": self.pick(&[0, 10, 10, 20, 1000]),
            "subject": subject,
        });
        for (dir, peers_key) in [("ingress", "from"), ("egress", "to")] {
            if self.chance(0.3) {
                continue;
            }
            let mut rules = Vec::new();
            for _ in 0..self.rng.random_range(1..=3) {
                let peers: Vec<Value> = (0..self.rng.random_range(1..=2))
                    .map(|_| self.tier_peer(dir == "egress"))
                    .collect();
                let mut rule = json!({
                    "action": self.pick(&["Accept", "Deny", "Pass"]),
                    peers_key: peers.clone(),
                });
                if let Some(Value::Array(mut p)) = self.tier_ports() {
                    // Named ports only with pod peers (the API server's rule).
                    if peers
                        .iter()
                        .any(|q| q.get("networks").or(q.get("nodes")).is_some())
                    {
                        p.retain(|x| x.get("destinationNamedPort").is_none());
                    }
                    if !p.is_empty() {
                        rule["protocols"] = Value::Array(p);
                    }
                }
                rules.push(rule);
            }
            spec[dir] = Value::Array(rules);
        }
        let v = json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2",
            "kind": "ClusterNetworkPolicy",
            "metadata": {"name": format!("cnp{i}")},
            "spec": spec,
        });
        Object::ClusterNetworkPolicy(Box::new(serde_json::from_value(v).unwrap()))
    }
}

// ---------------------------------------------------------------------------------------------
// Stability, incremental changes, garbage collection
// ---------------------------------------------------------------------------------------------

fn rich_policies() -> Vec<String> {
    vec![
        np("prod", "deny", DENY_PROD),
        np(
            "prod",
            "web",
            "{podSelector: {matchLabels: {app: web}}, ingress: [{from: [{podSelector: {matchLabels: {tier: back}}}, {ipBlock: {cidr: 10.0.0.0/8, except: [10.0.2.0/24]}}], ports: [{port: http}, {port: 9000, endPort: 9010}]}]}",
        ),
        np(
            "prod",
            "batch",
            "{podSelector: {matchLabels: {app: batch}}, policyTypes: [Egress], egress: [{to: [{namespaceSelector: {}}], ports: [{port: http}]}, {to: [{ipBlock: {cidr: 10.0.0.0/16}}], ports: [{port: http}]}]}",
        ),
        np(
            "dev",
            "tool",
            "{podSelector: {matchLabels: {app: tool}}, ingress: [{from: [{namespaceSelector: {matchLabels: {env: prod}}}]}]}",
        ),
    ]
}

/// Entries whose endpoint is not one of `except`.
fn entries_of_others(
    s: &DesiredState,
    except: &[u32],
) -> (BTreeMap<PolicyEntry, PolicyValue>, BTreeMap<CidrEntry, u32>) {
    (
        s.policy
            .iter()
            .filter(|(e, _)| !except.contains(&e.key.endpoint))
            .map(|(e, v)| (*e, *v))
            .collect(),
        s.cidrs
            .iter()
            .filter(|(e, _)| !except.contains(&e.key.endpoint))
            .map(|(e, v)| (*e, *v))
            .collect(),
    )
}

#[test]
fn compiling_twice_is_identical() {
    let mut w = world(&rich_policies());
    let first = w.state.clone();
    assert!(!first.policy.is_empty() && !first.cidrs.is_empty());
    w.recompile();
    assert_eq!(w.state, first);
    // A fresh compiler compiles the same store to the same state.
    let mut fresh = Compiler::default();
    assert_eq!(fresh.compile(&w.store, &w.endpoints, &w.hosts), first);
}

#[test]
fn unrelated_changes_renumber_nothing() {
    let mut w = world(&rich_policies());
    let before = w.state.clone();

    // A new pod that no policy selects, in a new namespace.
    let objs = parse_str(&pod_yaml(
        "zzz",
        "new",
        "{app: lonely}",
        "[]",
        &["10.0.5.5"],
        "",
    ))
    .unwrap();
    w.store.apply(objs[0].clone()).unwrap();
    w.endpoints.push(LocalEndpoint {
        pod: PodRef {
            namespace: "zzz".into(),
            name: "new".into(),
        },
        ifindex: 999,
    });
    w.recompile();
    for (addr, id) in &before.identities {
        assert_eq!(w.state.identities.get(addr), Some(id));
    }
    assert_eq!(w.state.identities.len(), before.identities.len() + 1);
    assert_eq!(
        w.state.policy, before.policy,
        "the new pod's address is in 10.0.0.0/8 but no class changes"
    );
    assert_eq!(w.state.cidrs, before.cidrs);
    assert_eq!(w.state.rules, before.rules);
    for (ifindex, info) in &before.endpoints {
        assert_eq!(w.state.endpoints.get(ifindex), Some(info));
    }

    // A new policy selecting only dev/web.
    let before = w.state.clone();
    let objs = parse_str(&np(
        "dev",
        "web",
        "{podSelector: {matchLabels: {app: web}}, ingress: [{from: [{ipBlock: {cidr: 192.168.0.0/16}}], ports: [{port: 443}]}]}",
    ))
    .unwrap();
    w.store.apply(objs[0].clone()).unwrap();
    w.recompile();
    let dev_web = w.endpoint_id("dev/web");
    assert_eq!(
        entries_of_others(&w.state, &[dev_web]),
        entries_of_others(&before, &[dev_web])
    );
    for (id, r) in &before.rules {
        assert_eq!(w.state.rules.get(id), Some(r));
    }
    assert_eq!(w.state.identities, before.identities);
    assert!(w.state.policy.len() > before.policy.len());
}

#[test]
fn relabelling_a_pod_changes_only_what_involves_it() {
    let mut w = world(&rich_policies());
    let before = w.state.clone();
    let api = w.endpoint_id("prod/api");
    let api_ips = [
        PeerAddr::from_ip(ip("10.0.1.2")),
        PeerAddr::from_ip(ip("fd00::1:2")),
    ];
    let old_ident = before.identities[&api_ips[0]];

    let api_ref = PodRef {
        namespace: "prod".into(),
        name: "api".into(),
    };
    let relabelled = w.store.pods.make_mut(&api_ref).unwrap();
    Arc::make_mut(&mut relabelled.labels).insert("tier".into(), "front".into());
    w.recompile();
    let new_ident = w.state.identities[&api_ips[0]];
    assert_ne!(old_ident, new_ident);

    let involves = |e: &PolicyEntry| {
        e.key.endpoint == api || e.key.peer == old_ident || e.key.peer == new_ident
    };
    let keys: BTreeSet<&PolicyEntry> = before.policy.keys().chain(w.state.policy.keys()).collect();
    let mut changed = 0;
    for k in keys {
        if before.policy.get(k) != w.state.policy.get(k) {
            assert!(involves(k), "unrelated entry changed: {k:?}");
            changed += 1;
        }
    }
    assert!(changed > 0, "web no longer accepts api as tier=back");
    for (addr, id) in &before.identities {
        if !api_ips.contains(addr) {
            assert_eq!(w.state.identities.get(addr), Some(id));
        }
    }
    assert_eq!(
        entries_of_others(&w.state, &[api]).1,
        entries_of_others(&before, &[api]).1
    );
    // And the verdicts moved accordingly.
    w.check(&[
        ("prod/api", "prod/web", TCP, 8080, true), // still inside 10.0.0.0/8 and http
        ("prod/db", "prod/web", TCP, 9005, true),
        ("dev/web", "prod/web", TCP, 8080, false),
    ]);
}

#[test]
fn unused_ids_are_collected() {
    let mut w = world(&rich_policies());
    let full = w.compiler.sizes();
    assert!(full.rules > 0 && full.classes > 0 && full.identities > 0);
    let old_rules: BTreeSet<u32> = w.state.rules.keys().copied().collect();
    w.store.policies.clear();
    w.recompile();
    let empty = w.compiler.sizes();
    assert_eq!((empty.rules, empty.classes), (0, 0));
    assert_eq!(empty.identities, full.identities);
    w.store.pods.clear();
    w.recompile();
    assert_eq!(w.compiler.sizes(), InternerSizes::default());
    assert!(w.state.identities.len() == 2, "only the node's addresses");
    // Ids are not handed out again (while the id space lasts).
    let mut w2 = world(&rich_policies());
    w2.compiler = w.compiler;
    w2.recompile();
    let new_rules: BTreeSet<u32> = w2.state.rules.keys().copied().collect();
    assert!(old_rules.is_disjoint(&new_rules));
}

#[test]
fn lowest_rule_wins_and_entries_are_shared() {
    // Two rules allowing the same thing: the entry carries the lower rule id, deterministically.
    let w = world(&[np(
        "prod",
        "twice",
        "{podSelector: {matchLabels: {app: web}}, ingress: [{ports: [{port: 80}]}, {ports: [{port: 80}, {port: 81}]}]}",
    )]);
    let rule0 = w
        .state
        .rules
        .iter()
        .find(|(_, r)| r.index == 0)
        .map(|(id, _)| *id)
        .unwrap();
    let src = w.ep("192.168.1.1");
    let dst = w.ep("prod/web");
    let Endpoint::Pod { pod, ip } = &dst else {
        panic!()
    };
    let ifx = w.ifindex(pod).unwrap();
    let v = evaluate(&w.state, ifx, Direction::Ingress, src.ip(), *ip, TCP, 80);
    assert_eq!((v.reason, v.rule), (ModelReason::PolicyAllow, Some(rule0)));
    let v = evaluate(&w.state, ifx, Direction::Ingress, src.ip(), *ip, TCP, 81);
    assert_eq!(w.state.rules[&v.rule.unwrap()].index, 1);

    // The same with pod peers (identity entries) and across policies.
    let w = world(&[
        np(
            "prod",
            "b",
            "{podSelector: {matchLabels: {app: web}}, ingress: [{from: [{podSelector: {}}], ports: [{port: 80}]}]}",
        ),
        np(
            "prod",
            "a",
            "{podSelector: {matchLabels: {app: web}}, ingress: [{from: [{podSelector: {matchLabels: {app: api}}}], ports: [{port: 80}]}]}",
        ),
    ]);
    let src = w.ep("prod/api");
    let v = evaluate(&w.state, ifx, Direction::Ingress, src.ip(), *ip, TCP, 80);
    let rule = &w.state.rules[&v.rule.unwrap()];
    assert_eq!(rule.policy, "a", "prod/a's rule was interned first");
}

// ---------------------------------------------------------------------------------------------
// Scale
// ---------------------------------------------------------------------------------------------

fn big_store(pods: usize, namespaces: usize, policies_per_ns: usize) -> Store {
    let mut store = Store::default();
    for n in 0..namespaces {
        let labels = BTreeMap::from([
            ("team".to_string(), format!("t{}", n % 4)),
            ("env".to_string(), format!("e{}", n % 2)),
        ]);
        store.namespaces.insert(
            format!("ns{n}"),
            NamespaceInfo::new(&format!("ns{n}"), labels),
        );
    }
    for i in 0..pods {
        let app = i % 50;
        let info = PodInfo {
            labels: Arc::new(BTreeMap::from([
                ("app".to_string(), format!("a{app}")),
                ("version".to_string(), format!("v{}", i % 3)),
                ("shard".to_string(), format!("s{}", i % 7)),
            ])),
            ips: vec![
                IpAddr::from([10, 1, (i >> 8) as u8, i as u8]),
                IpAddr::from([0xfd00, 0, 0, 0, 0, 0, (i >> 16) as u16, i as u16]),
            ],
            container_ports: Arc::new(vec![NamedPort {
                name: "http".into(),
                port: if app % 2 == 0 { 8080 } else { 80 },
                protocol: Protocol::Tcp,
            }]),
            ..Default::default()
        };
        store.pods.insert(
            PodRef {
                namespace: format!("ns{}", i % namespaces).into(),
                name: format!("pod{i}").into(),
            },
            info,
        );
    }
    let mut objects = Vec::new();
    for n in 0..namespaces {
        for j in 0..policies_per_ns {
            let spec = format!(
                "{{podSelector: {{matchLabels: {{app: a{}}}}}, policyTypes: [Ingress, Egress], \
                 ingress: [{{from: [{{podSelector: {{matchLabels: {{app: a{}}}}}}}, \
                   {{namespaceSelector: {{matchLabels: {{team: t{}}}}}, podSelector: {{matchExpressions: [{{key: app, operator: In, values: [a{}, a{}]}}]}}}}], \
                   ports: [{{port: 8080}}, {{port: http}}]}}], \
                 egress: [{{to: [{{ipBlock: {{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}}}, {{podSelector: {{}}}}], \
                   ports: [{{port: 443}}, {{port: 5000, endPort: 5100}}, {{port: http}}]}}]}}",
                j % 50,
                (j + 1) % 50,
                j % 4,
                (j + 2) % 50,
                (j + 3) % 50
            );
            objects.push(np(&format!("ns{n}"), &format!("p{j}"), &spec));
        }
    }
    for obj in parse_str(&objects.join("\n---\n")).unwrap() {
        store.apply(obj).unwrap();
    }
    store
}

#[test]
fn scale_thousand_policies_ten_thousand_pods() {
    let store = big_store(10_000, 20, 50);
    assert_eq!(store.policies.len(), 1000);
    let endpoints: Vec<LocalEndpoint> = store
        .pods
        .keys()
        .step_by(100)
        .enumerate()
        .map(|(i, p)| LocalEndpoint {
            pod: p.clone(),
            ifindex: 10 + i as u32,
        })
        .collect();
    assert_eq!(endpoints.len(), 100);
    let mut c = Compiler::default();
    let t = Instant::now();
    let s = c.compile(&store, &endpoints, &[ip("10.9.9.9")]);
    let first = t.elapsed();
    let t = Instant::now();
    let again = c.compile(&store, &endpoints, &[ip("10.9.9.9")]);
    let second = t.elapsed();
    assert_eq!(s, again);
    eprintln!(
        "scale: {} identities, {} policy entries, {} cidr entries; compile {first:?}, again {second:?}",
        c.sizes().identities,
        s.policy.len(),
        s.cidrs.len()
    );
    assert_eq!(s.identities.len(), 20_001);
    assert!(s.policy.len() > 1000);
    // Debug builds are ~10x slower than release; this bound only catches blow-ups.
    assert!(first.as_secs_f64() < 30.0, "{first:?}");
}

#[test]
fn scale_hundred_thousand_cidrs_in_one_policy() {
    let mut store = Store::default();
    store.pods.insert(
        PodRef {
            namespace: "x".into(),
            name: "p".into(),
        },
        PodInfo {
            ips: vec![ip("10.0.0.1")],
            ..Default::default()
        },
    );
    let blocks: Vec<Value> = (0..100_000u32)
        .map(|i| json!({"ipBlock": {"cidr": format!("{}/32", std::net::Ipv4Addr::from(0x0b00_0000 + i * 3))}}))
        .collect();
    let excepts: Vec<String> = (0..100_000u32)
        .map(|i| format!("{}/32", std::net::Ipv4Addr::from(0x0c00_0000 + i * 5)))
        .collect();
    let v = json!({
        "metadata": {"name": "big", "namespace": "x"},
        "spec": {"policyTypes": ["Egress"], "egress": [
            {"to": blocks, "ports": [{"port": 443}]},
            {"to": [{"ipBlock": {"cidr": "12.0.0.0/8", "except": excepts}}]},
        ]},
    });
    let np: k8s_openapi::api::networking::v1::NetworkPolicy = serde_json::from_value(v).unwrap();
    store.apply(Object::NetworkPolicy(Box::new(np))).unwrap();
    let eps = [LocalEndpoint {
        pod: PodRef {
            namespace: "x".into(),
            name: "p".into(),
        },
        ifindex: 5,
    }];
    let mut c = Compiler::default();
    let t = Instant::now();
    let s = c.compile(&store, &eps, &[]);
    let took = t.elapsed();
    eprintln!(
        "100k+100k cidrs: {} cidr entries in {took:?}",
        s.cidrs.len()
    );
    assert_eq!(s.cidrs.len(), 200_001);
    assert_eq!(c.sizes().classes, 2);
    assert!(took.as_secs_f64() < 30.0, "{took:?}");
    let local = ip("10.0.0.1");
    let ev =
        |peer: &str, port| evaluate(&s, 5, Direction::Egress, ip(peer), local, TCP, port).allowed;
    assert!(ev("11.0.0.3", 443) && !ev("11.0.0.4", 443) && !ev("11.0.0.3", 80));
    assert!(ev("12.0.0.1", 80) && !ev("12.0.0.5", 80) && ev("12.0.0.6", 1));
}

// ---------------------------------------------------------------------------------------------
// The upstream e2e cases (tests/conformance, as data), through compiler, model and reference
// ---------------------------------------------------------------------------------------------

/// The `.yaml` case files under `tests/conformance/<sub>` (relative to the repository), sorted;
/// a missing directory is a failure, not a skip.
pub(crate) fn conformance_case_files(sub: &str) -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/conformance")
        .join(sub);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

/// Expands `{{ip ns/pod}}`, `{{cidr ns/pod len}}` (tests/conformance/README.md) and
/// `{{node-ip node}}` (tests/conformance/cnp/README.md).
pub(crate) fn expand_placeholders(text: &str, ips: &BTreeMap<String, IpAddr>) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = start + rest[start..].find("}}").expect("unterminated placeholder");
        let words: Vec<&str> = rest[start + 2..end].split_whitespace().collect();
        match words.as_slice() {
            ["ip" | "node-ip", what] => out.push_str(&ips[*what].to_string()),
            ["cidr", pod, len] => {
                let net = ipnetwork::IpNetwork::new(ips[*pod], len.parse().unwrap()).unwrap();
                out.push_str(&format!("{}/{}", net.network(), net.prefix()));
            }
            other => panic!("unknown placeholder {other:?}"),
        }
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

#[test]
fn upstream_conformance_cases() {
    let files = conformance_case_files("cases");
    assert!(files.len() >= 30, "{} cases", files.len());
    let mut failures = Vec::new();
    let mut pairs = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let case: Value = crate::manifest::yaml_documents(&text).unwrap().remove(0);
        let name = case["name"].as_str().unwrap().to_string();
        let mut store = Store::default();
        for (ns, v) in case["namespaces"].as_object().unwrap() {
            let labels = serde_json::from_value(v["labels"].clone()).unwrap_or_default();
            store
                .namespaces
                .insert(ns.clone(), NamespaceInfo::new(ns, labels));
        }
        let mut ips = BTreeMap::new();
        for (i, p) in case["pods"].as_array().unwrap().iter().enumerate() {
            let pod = PodRef {
                namespace: p["namespace"].as_str().unwrap().into(),
                name: p["name"].as_str().unwrap().into(),
            };
            let ip = IpAddr::from([10, 0, 0, 1 + i as u8]);
            ips.insert(pod.to_string(), ip);
            let mut info = PodInfo {
                labels: serde_json::from_value(p["labels"].clone()).unwrap(),
                ips: vec![ip],
                ..Default::default()
            };
            for port in p["ports"].as_array().unwrap() {
                Arc::make_mut(&mut info.container_ports).push(NamedPort {
                    name: port["name"].as_str().unwrap().into(),
                    port: port["port"].as_u64().unwrap() as u16,
                    protocol: Protocol::parse(port["protocol"].as_str().unwrap()).unwrap(),
                });
            }
            Arc::make_mut(&mut info.container_ports).sort();
            store.pods.insert(pod, info);
        }
        let policies: BTreeMap<&str, &Value> = case["policies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["id"].as_str().unwrap(), &p["object"]))
            .collect();
        let mut w = World::new(store, vec![ip("10.9.9.9")]);
        for (s, step) in case["steps"].as_array().unwrap().iter().enumerate() {
            for a in step["actions"].as_array().unwrap() {
                let field = |k: &str| a[k].as_str().unwrap();
                match field("action") {
                    "create_policy" | "update_policy" => {
                        let text = serde_json::to_string(policies[field("policy")]).unwrap();
                        let obj = serde_json::from_str(&expand_placeholders(&text, &ips)).unwrap();
                        w.store.apply(Object::NetworkPolicy(Box::new(obj))).unwrap();
                    }
                    "delete_all_policies" => w.store.policies.clear(),
                    "add_namespace_labels" => {
                        let labels: BTreeMap<String, String> =
                            serde_json::from_value(a["labels"].clone()).unwrap();
                        w.store
                            .namespaces
                            .get_mut(field("namespace"))
                            .unwrap()
                            .labels
                            .extend(labels);
                    }
                    "add_pod_labels" => {
                        let (ns, pod) = field("pod").split_once('/').unwrap();
                        let labels: BTreeMap<String, String> =
                            serde_json::from_value(a["labels"].clone()).unwrap();
                        let key = PodRef {
                            namespace: ns.into(),
                            name: pod.into(),
                        };
                        Arc::make_mut(&mut w.store.pods.make_mut(&key).unwrap().labels)
                            .extend(labels);
                    }
                    other => panic!("{name}: unknown action {other}"),
                }
            }
            w.recompile();
            for probe in step["probes"].as_array().unwrap() {
                let port = probe["port"].as_u64().unwrap() as u16;
                let proto = Protocol::parse(probe["protocol"].as_str().unwrap())
                    .unwrap()
                    .number();
                let deny: BTreeSet<(String, String)> =
                    serde_json::from_value(probe["expect"]["deny"].clone()).unwrap();
                for from in ips.keys() {
                    for to in ips.keys().filter(|t| *t != from) {
                        let want = !deny.contains(&(from.clone(), to.clone()));
                        pairs += 1;
                        match w.verdict(&w.ep(from), &w.ep(to), proto, port) {
                            Ok((got, _)) if got == want => {}
                            Ok((got, _)) => failures.push(format!(
                                "{name} step {s} {from} -> {to} {proto}/{port}: got {got}, want {want}"
                            )),
                            Err(e) => failures.push(format!("{name} step {s}: {e}")),
                        }
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    assert!(pairs > 2000, "{pairs} pairs checked");
}
