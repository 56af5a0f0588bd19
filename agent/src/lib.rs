//! Palisade's node agent as a library: the sources (files, the API server) and the one main
//! loop, the reconcile step, the host view, the CNI plugin, and the observers. The policy engine is the pure `palisade-policy` crate and
//! the kernel side the `palisade-datapath` crate; this crate joins them.

// Files written for the CLI and the next agent.
pub mod files;

// The manifest directory the standalone source reads (parsing is `palisade_policy::manifest`).
pub mod manifest;

// Edges: BPF and the host.
pub mod interfaces;

// The main loop and its sources (files, the API server), and the reconcile step they feed.
pub mod reconcile;
pub mod source;

// The CNI plugin.
pub mod cni;

// FQDN egress: learning from DNS answers.
pub mod egress;
mod egress_announce;
pub mod fqdn;

// Observing: verdicts, the CLI socket and commands, metrics and probes. `api` is what crosses
// the socket; `hub` the state the observers share; `admin` the HTTP server; `observe` starts
// them.
pub mod admin;
pub mod api;
pub mod cli;
pub mod control;
pub mod health;
pub mod hub;
pub mod inspect;
pub mod metrics;
pub mod observe;
pub mod stats;
pub mod verdicts;

// The CLI for the whole cluster (`kubectl palisade`): the agents of every node, by exec into
// their pods.
pub mod kubectl;

/// `explain`, `policy show`, verdicts and stats naming ClusterNetworkPolicies (beside `inspect`
/// and `verdicts`, which it tests together).
#[cfg(test)]
mod inspect_cnp_tests;
