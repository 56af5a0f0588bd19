//! `Compiler::update` against `Compiler::compile`: after every random change to a random
//! cluster, the incremental result must equal a full compile made from the same state (a clone
//! of the compiler, so ids are comparable), entry for entry.
use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;

use super::scenarios::{Gen, ip};
use super::*;
use crate::model::NamespaceInfo;

/// The local endpoints: every other pod, in a stable interface order.
fn endpoints(store: &Store, salt: usize) -> Vec<LocalEndpoint> {
    store
        .pods
        .keys()
        .enumerate()
        .filter(|(i, _)| (i + salt).is_multiple_of(2))
        .map(|(i, p)| LocalEndpoint {
            pod: p.clone(),
            ifindex: 100 + i as u32,
        })
        .collect()
}

/// One random change; returns what it was, for the failure message.
fn change(g: &mut Gen, store: &mut Store, next_pod: &mut usize, next_policy: &mut usize) -> String {
    let pods: Vec<PodRef> = store.pods.keys().cloned().collect();
    match g.rng.random_range(0..12) {
        0 | 1 => {
            *next_pod += 1;
            // Sometimes the number of an earlier pod: its addresses, claimed twice.
            let i = if g.chance(0.2) {
                g.rng.random_range(1..*next_pod)
            } else {
                *next_pod
            };
            let (mut pod, info) = g.pod(i);
            pod.name = format!("q{next_pod}").into();
            let what = format!("add pod {pod}");
            store.pods.insert(pod, info);
            what
        }
        2 if !pods.is_empty() => {
            let pod = g.pick(&pods).clone();
            store.pods.remove(&pod);
            format!("delete pod {pod}")
        }
        3 | 4 if !pods.is_empty() => {
            let pod = g.pick(&pods).clone();
            let (_, fresh) = g.pod(1);
            let info = store.pods.make_mut(&pod).expect("listed");
            info.labels = fresh.labels;
            format!("relabel pod {pod}")
        }
        5 if !pods.is_empty() => {
            let pod = g.pick(&pods).clone();
            let info = store.pods.make_mut(&pod).expect("listed");
            if info.ips.is_empty() || g.chance(0.3) {
                let i = g.rng.random_range(1..60);
                info.ips = vec![ip(&format!("10.0.{}.{i}", i % 4))];
            } else {
                info.ips.clear();
            }
            format!("readdress pod {pod}")
        }
        6 if !pods.is_empty() => {
            let pod = g.pick(&pods).clone();
            let (_, fresh) = g.pod(1);
            store.pods.make_mut(&pod).expect("listed").container_ports = fresh.container_ports;
            format!("ports of pod {pod}")
        }
        7 => {
            let ns = *g.pick(&["a", "b", "c", "d"]);
            let mut labels = BTreeMap::new();
            if g.chance(0.5) {
                labels.insert("env".to_string(), g.pick(&["x", "y"]).to_string());
            }
            if g.chance(0.5) {
                labels.insert("team".to_string(), g.pick(&["p", "q"]).to_string());
            }
            store
                .namespaces
                .insert(ns.to_string(), NamespaceInfo::new(ns, labels));
            format!("relabel namespace {ns}")
        }
        8 | 9 => {
            // A new policy, or a new version of an existing one (same name).
            let i = if g.chance(0.5) && *next_policy > 0 {
                g.rng.random_range(0..*next_policy)
            } else {
                *next_policy += 1;
                *next_policy
            };
            let p = g.policy(i);
            let what = format!("apply policy np{i}");
            store.apply(p).expect("generated policies are valid");
            what
        }
        10 if !store.policies.is_empty() => {
            let keys: Vec<(String, String)> = store.policies.keys().cloned().collect();
            let k = g.pick(&keys).clone();
            store.policies.remove(&k);
            format!("delete policy {}/{}", k.0, k.1)
        }
        _ => {
            if g.chance(0.5) {
                let i = g.rng.random_range(0..3);
                let p = g.cluster_policy(i);
                store.apply(p).expect("generated policies are valid");
                format!("apply cluster policy {i}")
            } else {
                let zone = *g.pick(&["a", "b"]);
                store.nodes.insert(
                    "n2".into(),
                    NodeInfo {
                        name: "n2".into(),
                        labels: [("zone".to_string(), zone.to_string())].into(),
                        addresses: vec![ip("10.1.0.1"), ip("fd01::1")],
                        ready: true,
                    },
                );
                format!("node n2 zone {zone}")
            }
        }
    }
}

#[test]
fn updates_equal_full_compiles() {
    const SEED: u64 = 0x1c4e_3e47;
    const SCENARIOS: u64 = 300;
    const STEPS: usize = 25;
    let hosts = vec![ip("10.9.9.9"), ip("fd09::9")];
    let mut partial = 0usize;
    let mut compiled = 0usize;
    let mut kept = 0usize;
    for scenario in 0..SCENARIOS {
        let seed = SEED + scenario;
        let mut g = Gen::new(seed, &[0u16, 53, 80, 443, 8080]);
        let mut store = g.store();
        let mut next_policy = 0;
        for _ in 0..g.rng.random_range(0..=4) {
            next_policy += 1;
            store.apply(g.policy(next_policy)).expect("valid");
        }
        if g.chance(0.3) {
            store.apply(g.cluster_policy(0)).expect("valid");
        }
        let mut next_pod = 20;
        let mut compiler = Compiler::default();
        compiler.update(&store, &endpoints(&store, 0), &hosts);
        let mut history = Vec::new();
        for step in 0..STEPS {
            let what = change(&mut g, &mut store, &mut next_pod, &mut next_policy);
            history.push(what);
            let eps = endpoints(&store, step / 10);
            let mut reference = compiler.clone();
            let want = reference.compile(&store, &eps, &hosts);
            let result = compiler.update(&store, &eps, &hosts);
            let (got, stats) = (result.state.clone(), result.stats);
            if !stats.full {
                partial += 1;
                compiled += stats.endpoints_compiled;
                kept += want
                    .endpoint_meta
                    .len()
                    .saturating_sub(stats.endpoints_compiled);
            }
            if got != want {
                let diff = |a: &DesiredState, b: &DesiredState| {
                    let pa: BTreeSet<_> = a.policy.iter().collect();
                    let pb: BTreeSet<_> = b.policy.iter().collect();
                    let ia: BTreeSet<_> = a.identities.iter().collect();
                    let ib: BTreeSet<_> = b.identities.iter().collect();
                    format!(
                        "policy only in update: {:?}\npolicy only in compile: {:?}\n\
                         identities only in update: {:?}\nidentities only in compile: {:?}",
                        pa.difference(&pb).take(5).collect::<Vec<_>>(),
                        pb.difference(&pa).take(5).collect::<Vec<_>>(),
                        ia.difference(&ib).take(5).collect::<Vec<_>>(),
                        ib.difference(&ia).take(5).collect::<Vec<_>>(),
                    )
                };
                let detail = diff(&got, &want);
                panic!(
                    "seed {seed}, step {step}: the update differs from a full compile in {:?}\n\
                     changes: {history:#?}\n{detail}",
                    got.differing_tables(&want)
                );
            }
        }
    }
    // The updates did skip work (else this test would prove nothing about skipping).
    assert!(partial > 1000, "only {partial} incremental updates");
    // Clusters this small are mostly reached by every change (empty selectors, few
    // namespaces); still, a good part of the endpoints must be kept.
    assert!(
        kept * 2 > compiled,
        "updates compiled {compiled} endpoints and kept {kept}: they skip too little"
    );
    eprintln!(
        "{partial} incremental updates: {compiled} endpoints compiled, {kept} kept as they were"
    );
}
