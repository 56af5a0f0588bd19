//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`) in the store: the object as read
//! (`raw`), its validation (`policy`), and the nodes its `nodes` peers select (`nodes`). The
//! plain reading of its precedence is `crate::cnp`.
pub mod nodes;
pub mod policy;
pub mod raw;

pub use nodes::NodeInfo;
pub use policy::*;
