//! ClusterNetworkPolicy (`policy.networking.k8s.io/v1alpha2`): the object as read (`raw`), its
//! validation (`model`) and the nodes its `nodes` peers select (`nodes`), all kept in the store
//! (`crate::model::cluster`, re-exported here), and the plain reading of its precedence over
//! NetworkPolicy (`reference`), the oracle the compiler is checked against. The compiler
//! resolves the tiers into map data (`compile`).
pub mod reference;

pub use crate::model::cluster::policy as model;
pub use crate::model::cluster::{NodeInfo, policy::*};
pub use crate::model::cluster::{nodes, raw};

#[cfg(test)]
mod conformance;
#[cfg(test)]
mod random;
