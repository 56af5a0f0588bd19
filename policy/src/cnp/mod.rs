//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`): the object as read (`raw`), its
//! validation into the model (`model`), and the nodes its `nodes` peers select (`nodes`).
//!
//! Not wired in: the kind is no `model::Object`, and the manifest reader, the store, the compiler
//! and the agent ignore it. A ClusterNetworkPolicy accepted but not enforced would fail open.
pub mod model;
pub mod nodes;
pub mod raw;

pub use model::*;
pub use nodes::NodeInfo;
