//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`): the object as read (`raw`) and its
//! validation into the model (`model`).
//!
//! Not wired in: the kind is no `model::Object`, and the manifest reader, the store, the compiler
//! and the agent ignore it. A ClusterNetworkPolicy accepted but not enforced would fail open.
pub mod model;
pub mod raw;

pub use model::*;
