//! Palisade's node agent as a library: the pure policy pipeline (manifests -> store -> compiled
//! map entries, with a model of the datapath for explain and tests) and the edges that touch the
//! kernel (loading and attaching the programs, writing the maps, finding pod interfaces).

// Pure logic: no kernel, no I/O beyond reading manifest files.
pub mod compile;
pub mod datapath_model;
pub mod error;
pub mod manifest;
pub mod model;
pub mod reference;
pub mod selector;
pub mod state;

// Edges: BPF and the host.
pub mod ct_sweep;
pub mod interfaces;
pub mod loader;
pub mod maps;
pub mod run;

// Cluster mode, Services, the CNI plugin, probes.
pub mod cni;
pub mod health;
pub mod kube_source;
pub mod services;

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
