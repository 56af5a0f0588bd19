//! Incremental compilation down to the kernel (root): a cluster churns through pod, label,
//! namespace and policy changes; each change goes through `Compiler::update` and
//! `MapWriter::apply_stamped`, which compares only the endpoints whose stamps changed. After
//! every change the pinned maps, read back from the kernel, must hold exactly what a full
//! compile of the same store says, and most changes must have compiled few endpoints.
mod support;

use std::net::IpAddr;

use palisade_datapath::{
    loader::{Datapath, LoadOptions},
    pinned::read_policy_maps,
    writer::MapWriter,
};
use palisade_policy::{
    compile::{Compiler, LocalEndpoint},
    manifest::parse_str,
    model::Store,
    state::{DesiredState, PodRef},
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::{Bpffs, object, require_root};

const NAMESPACES: usize = 6;
const PODS: usize = 8;
const APPS: [&str; 3] = ["web", "api", "db"];

fn pod_yaml(ns: usize, j: usize, app: &str, rev: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: p{j}, namespace: ns{ns}, labels: {{app: {app}, rev: r{rev}}}}}\n\
         spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: {port}}}]}}]}}\n\
         status: {{podIP: 10.7.{ns}.{ip}, podIPs: [{{ip: 10.7.{ns}.{ip}}}]}}\n",
        port = 8000 + j,
        ip = 10 + j,
    )
}

fn namespace_yaml(ns: usize, env: &str) -> String {
    format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns{ns}, labels: {{env: {env}}}}}\n")
}

fn policy_yaml(ns: usize, k: usize, port: u16) -> String {
    let app = APPS[k % 3];
    let peer = APPS[(k + 1) % 3];
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np{k}, namespace: ns{ns}}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  policyTypes: [Ingress, Egress]\n\
         \x20 ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: {peer}}}}}}}, {{namespaceSelector: {{matchLabels: {{env: prod}}}}}}]\n\
         \x20   ports: [{{port: {port}}}, {{port: http}}]\n\
         \x20 egress:\n  - to: [{{ipBlock: {{cidr: 10.7.0.0/16, except: [10.7.{ns}.0/24]}}}}]\n\
         \x20   ports: [{{port: http}}]\n  - to: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: {peer}}}}}}}]\n"
    )
}

fn apply(store: &mut Store, yaml: &str) {
    for o in parse_str(yaml).expect("test yaml parses") {
        store.apply(o).expect("test object is valid");
    }
}

fn endpoints(store: &Store) -> Vec<LocalEndpoint> {
    store
        .pods
        .keys()
        .enumerate()
        .filter(|(i, _)| i % 2 == 0)
        .map(|(i, p)| LocalEndpoint {
            pod: p.clone(),
            ifindex: 1000 + i as u32,
        })
        .collect()
}

/// What the kernel must hold: the maps the writer compares by stamp.
fn check(pins: &std::path::Path, want: &DesiredState, step: usize, what: &str) {
    let got = read_policy_maps(pins).expect("read the pinned maps");
    let mut mismatch = Vec::new();
    if got.policy.keys().ne(want.policy.keys())
        || got
            .policy
            .iter()
            .zip(&want.policy)
            .any(|((_, a), (_, b))| a.rule != b.rule || a.flags != b.flags || a.slot != b.slot)
    {
        mismatch.push("POLICY");
    }
    if got.cidrs != want.cidrs {
        mismatch.push("CIDRS");
    }
    if got.identities != want.identities {
        mismatch.push("IDENTITIES");
    }
    let ids = |s: &DesiredState| {
        s.endpoints
            .iter()
            .map(|(k, v)| (*k, v.id, v.flags))
            .collect::<Vec<_>>()
    };
    if ids(&got) != ids(want) {
        mismatch.push("ENDPOINTS");
    }
    assert!(
        mismatch.is_empty(),
        "step {step} ({what}): the kernel's {mismatch:?} differ from a full compile"
    );
}

#[test]
fn stamped_applies_keep_the_kernel_equal_to_full_compiles() {
    if !require_root() {
        return;
    }
    let fs = Bpffs::new("incremental");
    let pins = fs.pin_dir();
    let mut dp = Datapath::load_with(&object(), Some(&pins), &LoadOptions::default())
        .expect("load the datapath");
    let mut writer = MapWriter::new(&mut dp).expect("map writer");

    let mut store = Store::default();
    for ns in 0..NAMESPACES {
        apply(
            &mut store,
            &namespace_yaml(ns, if ns % 2 == 0 { "prod" } else { "dev" }),
        );
        for j in 0..PODS {
            apply(&mut store, &pod_yaml(ns, j, APPS[j % 3], 0));
        }
        for k in 0..3 {
            apply(&mut store, &policy_yaml(ns, k, 9000));
        }
    }
    let hosts: Vec<IpAddr> = vec!["10.9.9.9".parse().unwrap()];
    let mut compiler = Compiler::default();
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let (mut partial, mut compiled_endpoints) = (0usize, 0usize);
    for step in 0..120 {
        let ns = rng.random_range(0..NAMESPACES);
        let j = rng.random_range(0..PODS);
        let what = match step % 6 {
            0 => {
                apply(
                    &mut store,
                    &pod_yaml(ns, j, APPS[rng.random_range(0..3)], step),
                );
                format!("relabel ns{ns}/p{j}")
            }
            1 => {
                let port = 9000 + rng.random_range(0..50);
                apply(&mut store, &policy_yaml(ns, rng.random_range(0..3), port));
                format!("policy port {port} in ns{ns}")
            }
            2 => {
                store.pods.remove(&PodRef {
                    namespace: format!("ns{ns}").into(),
                    name: format!("p{j}").into(),
                });
                format!("delete ns{ns}/p{j}")
            }
            3 => {
                apply(&mut store, &pod_yaml(ns, j, APPS[j % 3], 0));
                format!("restore ns{ns}/p{j}")
            }
            4 => {
                let env = if rng.random_bool(0.5) { "prod" } else { "dev" };
                apply(&mut store, &namespace_yaml(ns, env));
                format!("ns{ns} env={env}")
            }
            _ => {
                let k = rng.random_range(0..3);
                store
                    .policies
                    .remove(&(format!("ns{ns}"), format!("np{k}")));
                format!("delete policy ns{ns}/np{k}")
            }
        };
        let eps = endpoints(&store);
        let want = compiler.clone().compile(&store, &eps, &hosts);
        let compiled = compiler.update(&store, &eps, &hosts);
        let got = compiled.state;
        let differs = got.differing_tables(&want);
        if !differs.is_empty() {
            let a: std::collections::BTreeSet<_> = got.policy.iter().collect();
            let b: std::collections::BTreeSet<_> = want.policy.iter().collect();
            eprintln!(
                "only in update: {:?}",
                a.difference(&b).take(4).collect::<Vec<_>>()
            );
            eprintln!(
                "only in compile: {:?}",
                b.difference(&a).take(4).collect::<Vec<_>>()
            );
            let a: std::collections::BTreeSet<_> = got.cidrs.iter().collect();
            let b: std::collections::BTreeSet<_> = want.cidrs.iter().collect();
            eprintln!(
                "cidrs only in update: {:?}",
                a.difference(&b).take(4).collect::<Vec<_>>()
            );
            eprintln!(
                "cidrs only in compile: {:?}",
                b.difference(&a).take(4).collect::<Vec<_>>()
            );
        }
        assert!(
            differs.is_empty(),
            "step {step} ({what}): the update differs from a full compile in {differs:?}"
        );
        if step > 0 && !compiled.stats.full {
            partial += 1;
            compiled_endpoints += compiled.stats.endpoints_compiled;
        }
        let stats = writer.apply_stamped(compiled.state, Some(compiled.stamps));
        assert_eq!(
            stats.failed,
            0,
            "step {step} ({what}): {:?}",
            writer.failures()
        );
        check(&pins, &want, step, &what);
    }
    let local = endpoints(&store).len();
    eprintln!(
        "{partial} incremental changes compiled {compiled_endpoints} endpoints in all \
         ({local} local endpoints)"
    );
    assert!(partial >= 100);
    assert!(
        compiled_endpoints < partial * local / 2,
        "changes compiled {compiled_endpoints} endpoints over {partial} changes of {local}"
    );
    drop(writer);
    drop(dp);
}
