//! Development aid: compiles the churn bench's cluster repeatedly, for `perf record`.
#[path = "../src/bin/bench/cluster.rs"]
#[allow(dead_code)]
mod cluster;

use std::time::Instant;

use palisade_policy::compile::{Compiler, LocalEndpoint};
use palisade_policy::manifest::parse_str;
use palisade_policy::model::Store;
use palisade_policy::state::PodRef;

fn main() {
    let mut objects = Vec::new();
    for i in 0..cluster::NAMESPACES {
        let text = cluster::join_docs(&cluster::namespace_docs(i));
        objects.extend(parse_str(&text).unwrap());
    }
    let store = Store::from_objects(objects);
    let endpoints: Vec<LocalEndpoint> = (0..cluster::NAMESPACES)
        .map(|i| LocalEndpoint {
            pod: PodRef {
                namespace: cluster::ns_name(i),
                name: format!("pod-{:03}", cluster::local_pod(i)),
            },
            ifindex: 100 + i as u32,
        })
        .collect();
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20);
    let mut c = Compiler::default();
    let mut v = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let d = c.compile(&store, &endpoints, &[]);
        v.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(d.endpoints.len(), cluster::NAMESPACES);
    }
    v.sort_by(f64::total_cmp);
    println!("compile: p50 {:.2} ms, min {:.2} ms", v[v.len() / 2], v[0]);
}
