//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`): the object as read (`raw`), its
//! validation into the model (`model`), the nodes its `nodes` peers select (`nodes`), and the
//! plain reading of its precedence over NetworkPolicy (`reference`), the oracle a compiler will
//! be checked against.
//!
//! Not wired in: the kind is no `model::Object`, and the manifest reader, the store, the compiler
//! and the agent ignore it. A ClusterNetworkPolicy accepted but not enforced would fail open.
pub mod model;
pub mod nodes;
pub mod raw;
pub mod reference;

pub use model::*;
pub use nodes::NodeInfo;

#[cfg(test)]
mod conformance;
