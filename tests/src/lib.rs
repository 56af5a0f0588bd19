//! Test infrastructure shared by the netns tests, the conformance runner and the demo: a
//! netns "node" rig with pods, servers and probes ([`rig`]), and the agent as a child process
//! ([`agent`]).
pub mod agent;
pub mod dns;
pub mod netns;
pub mod probe;
pub mod rig;
pub mod sctp;
pub mod server;

pub use rig::{ChildGuard, Node, NodeSpec, Pod, PodSpec, ProbeSpec, Proto, require_root};
