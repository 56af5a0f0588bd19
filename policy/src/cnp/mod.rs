//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`): the object as read (`raw`), its
//! validation into the model (`model`), the nodes its `nodes` peers select (`nodes`), and the
//! plain reading of its precedence over NetworkPolicy (`reference`), the oracle a compiler will
//! be checked against.
//! The store holds validated policies (`Store::cluster_policies`) and nodes; the compiler
//! resolves their tiers into map data (`compile`).
pub mod model;
pub mod nodes;
pub mod raw;
pub mod reference;

pub use model::*;
pub use nodes::NodeInfo;

#[cfg(test)]
mod conformance;
