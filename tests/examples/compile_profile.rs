//! Development aid: compiles the churn bench's cluster repeatedly, for `perf record`.
#[path = "support/bench_cluster.rs"]
mod bench_cluster;
#[path = "../src/bin/bench/cluster.rs"]
#[allow(dead_code)]
mod cluster;

use std::time::Instant;

use palisade_policy::compile::Compiler;
use palisade_policy::manifest::parse_str;
use palisade_policy::model::Store;
use palisade_policy::state::PodRef;

fn main() {
    let objects = bench_cluster::objects();
    let store = Store::from_objects(objects);
    let endpoints = bench_cluster::endpoints();
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    let mut c = Compiler::default();
    let mut v = Vec::new();
    let compiles: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(n);
    for _ in 0..compiles {
        let t = Instant::now();
        let d = c.compile(&store, &endpoints, &[]);
        v.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(d.endpoints.len(), cluster::NAMESPACES);
    }
    v.sort_by(f64::total_cmp);
    println!("compile: p50 {:.2} ms, min {:.2} ms", v[v.len() / 2], v[0]);
    // Updates: one change each (a pod relabelled, a policy's port), as the churn bench makes.
    let mut store = store;
    c.update(&store, &endpoints, &[]);
    let mut u = Vec::new();
    for k in 0..n {
        let i = (k * 13) % cluster::NAMESPACES;
        if k % 2 == 0 {
            let pod = PodRef {
                namespace: cluster::ns_name(i).into(),
                name: format!("pod-{:03}", (k * 7) % 100).into(),
            };
            let info = store.pods.make_mut(&pod).unwrap();
            std::sync::Arc::make_mut(&mut info.labels).insert("rev".into(), k.to_string());
        } else {
            let docs = cluster::allow_app_yaml(i, k % 7, 9000 + k as u16);
            for o in parse_str(&docs).unwrap() {
                store.apply(o).unwrap();
            }
        }
        let t = Instant::now();
        let u1 = c.update(&store, &endpoints, &[]);
        let (d, s) = (u1.state, u1.stats);
        u.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(d.endpoints.len(), cluster::NAMESPACES);
        if k < 4 {
            println!("update {k}: {s:?}");
        }
    }
    u.sort_by(f64::total_cmp);
    println!(
        "update: p50 {:.2} ms, max {:.2} ms",
        u[u.len() / 2],
        u[u.len() - 1]
    );
}
