//! Test infrastructure shared by the netns tests, the conformance runner and the demo: a
//! netns "node" rig with pods, servers and probes ([`rig`]), and the agent as a child process
//! ([`agent`]), a fake API server for the agent's cluster mode ([`fakeapi`]) and a cluster of
//! such nodes, each with its own agent against one API server ([`multinode`]).
pub mod agent;
pub mod dns;
pub mod egress;
pub mod fakeapi;
pub mod multinode;
pub mod netns;
pub mod probe;
pub mod rig;
pub mod sctp;
pub mod server;

pub use rig::{ChildGuard, Node, NodeSpec, Pod, PodSpec, ProbeSpec, Proto, require_root};
