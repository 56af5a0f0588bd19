//! The churn bench's cluster as the profiling examples use it: every object parsed, and the
//! node's endpoints (one pod per namespace).
use palisade_policy::compile::LocalEndpoint;
use palisade_policy::manifest::parse_str;
use palisade_policy::model::Object;
use palisade_policy::state::PodRef;

use super::cluster;

/// Every namespace's documents, parsed.
pub fn objects() -> Vec<Object> {
    let mut objects = Vec::new();
    for i in 0..cluster::NAMESPACES {
        let text = cluster::join_docs(&cluster::namespace_docs(i));
        objects.extend(parse_str(&text).unwrap());
    }
    objects
}

/// The node's pod of each namespace, on interfaces 100 and up.
pub fn endpoints() -> Vec<LocalEndpoint> {
    (0..cluster::NAMESPACES)
        .map(|i| LocalEndpoint {
            pod: PodRef {
                namespace: cluster::ns_name(i).into(),
                name: format!("pod-{:03}", cluster::local_pod(i)).into(),
            },
            ifindex: 100 + i as u32,
        })
        .collect()
}
