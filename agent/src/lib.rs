//! Palisade's node agent as a library: the edges that touch the kernel and the host (loading
//! and attaching the programs, writing the maps, finding pod interfaces), the sources (files,
//! the API server), and the observers. The policy engine itself is the pure `palisade-policy`
//! crate, re-exported here under its module names.

// The policy engine (`palisade-policy`): no kernel, no I/O.
pub use palisade_policy::{
    compile, datapath_model, error, model, reference, selector, services, state,
};

// The standalone source: manifest files (parsing is `palisade_policy::manifest`).
pub mod manifest;

// Edges: BPF and the host.
pub mod ct_sweep;
pub mod interfaces;
pub mod loader;
pub mod maps;
pub mod netlink;
pub mod run;

// Cluster mode, the CNI plugin, probes.
pub mod cni;
pub mod health;
pub mod kube_source;

// Observing: verdicts, the CLI socket and commands, metrics. `api` is what crosses the socket;
// `hub` the state the observers share; `observe` starts them.
pub mod api;
pub mod cli;
pub mod control;
pub mod hub;
pub mod inspect;
pub mod metrics;
pub mod observe;
pub mod stats;
pub mod verdicts;
