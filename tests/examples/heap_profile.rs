//! Development aid: where the live heap goes for the churn bench's cluster (store, compiler,
//! compiled state), measured with a counting allocator.
#[path = "support/bench_cluster.rs"]
mod bench_cluster;
#[path = "../src/bin/bench/cluster.rs"]
#[allow(dead_code)]
mod cluster;
#[path = "../src/bin/bench/stats.rs"]
#[allow(dead_code)]
mod stats;

#[global_allocator]
static ALLOCATOR: stats::CountingAllocator = stats::CountingAllocator;

use palisade_policy::compile::Compiler;
use palisade_policy::model::Store;

fn mib(b: usize) -> f64 {
    b as f64 / 1048576.0
}

fn main() {
    let h0 = stats::heap_bytes();
    let objects = bench_cluster::objects();
    let h1 = stats::heap_bytes();
    println!("parsed objects: {:.1} MiB", mib(h1 - h0));
    let store = Store::from_objects(objects.iter().cloned());
    let h2 = stats::heap_bytes();
    println!("store: {:.1} MiB", mib(h2 - h1));
    drop(objects);
    let endpoints = bench_cluster::endpoints();
    let h3 = stats::heap_bytes();
    let mut c = Compiler::default();
    let state = c.update(&store, &endpoints, &[]).state.clone();
    let h4 = stats::heap_bytes();
    println!("compiler (with its state): {:.1} MiB", mib(h4 - h3) - 0.0);
    let h5 = stats::heap_bytes();
    let copy = state.clone();
    let h6 = stats::heap_bytes();
    println!("one copy of the compiled state: {:.1} MiB", mib(h6 - h5));
    let part = |name: &str, f: &dyn Fn() -> Box<dyn std::any::Any>| {
        let a = stats::heap_bytes();
        let x = f();
        println!("  {name}: {:.2} MiB", mib(stats::heap_bytes() - a));
        drop(x);
    };
    part("policy", &|| Box::new(copy.policy.clone()));
    part("identities", &|| Box::new(copy.identities.clone()));
    part("rules", &|| Box::new(copy.rules.clone()));
    part("endpoint_meta", &|| Box::new(copy.endpoint_meta.clone()));
    part("cidrs", &|| Box::new(copy.cidrs.clone()));
    part("identity_pods (unshared)", &|| {
        Box::new(
            copy.identity_pods
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect::<std::collections::BTreeMap<_, _>>(),
        )
    });
    drop(state);
}
