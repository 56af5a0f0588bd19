//! Palisade's policy engine, pure: manifests to objects, validation and selectors, the store,
//! the compiler from the store to the entries of the BPF maps (`state::DesiredState`), Service
//! expansion, and two evaluators: `datapath_model` (a packet over a `DesiredState`, exactly as
//! the programs decide) and `reference` (the plain reading of the NetworkPolicy spec, which
//! checks the compiler). No kernel, no file system, no async: the agent does the I/O.
#![forbid(unsafe_code)]

pub mod cnp;
pub mod compile;
pub mod datapath_model;
pub mod egress;
pub mod error;
pub mod fqdn;
pub mod manifest;
pub mod model;
pub mod reference;
pub mod selector;
pub mod services;
pub mod state;
