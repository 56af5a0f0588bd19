//! Palisade's userspace datapath: loading the eBPF object, pinning its maps and programs,
//! attaching the programs to pod interfaces (and upgrading them in place), writing the policy
//! maps from a compiled `DesiredState`, and keeping conntrack within its quotas. Everything
//! here talks to the kernel; what to write comes from the pure `palisade-policy` crate.
//!
//! Modules: `loader` (the object and its attachments), `pins` (the pin directory the agent and
//! the CNI plugin share), `pinned` (reading another process's pinned maps), `upgrade` (which pinned maps an object may adopt), `writer` (the
//! policy maps), `ct_sweep` (conntrack expiry and quota accounting), `sys` (the raw BPF
//! syscalls aya does not wrap), `netlink` (links, addresses and routes over rtnetlink, for the
//! host view and the CNI plugin).
pub mod ct_sweep;
pub mod dns;
pub mod error;
pub mod loader;
pub mod netlink;
pub mod pinned;
pub mod pins;
mod sys;
pub mod upgrade;
pub mod writer;

pub use error::{DatapathError, Result};
pub use loader::{Datapath, FROM_POD, LoadOptions, TO_POD};
pub use sys::clock_ns;
pub use writer::MapWriter;
