//! Enforcement from a pod's first packet: the chained CNI plugin `palisade-cni`, and what the
//! agent reads of it.
//!
//! The DaemonSet installs the `palisade` binary as `/opt/cni/bin/palisade-cni` and appends
//! `{"type": "palisade-cni"}` to the node's CNI configuration list (`palisade cni-install`), so
//! the runtime calls it after the interface plugin (ptp, bridge, Calico, ...) has created the
//! pod's veth. On ADD it
//!
//! 1. finds the pod's host-side veth: the peer of the pod's interface, asked of the kernel
//!    inside the pod's network namespace (`IFLA_LINK` of `CNI_IFNAME`) and checked from the
//!    host side; else the one host-side veth in `prevResult.interfaces`;
//! 2. writes a **provisional** `ENDPOINTS` entry for it (only if there is none: never over the
//!    agent's), `EP_PENDING` (drop everything) by default, or not isolated with
//!    `"initialPolicy": "allow"`;
//! 3. attaches the agent's pinned programs to the veth (TCX, pinned links the agent adopts);
//! 4. records what it did in `<stateDir>/<container>-<ifname>.json` and wakes the agent through
//!    `<stateDir>/notify.sock` (best effort);
//! 5. passes `prevResult` on unchanged.
//!
//! All of this happens before the runtime starts the pod's containers, so the pod's first
//! packet meets the programs. The agent reads the records (the pod's interface and addresses
//! before the API server has them), compiles the pod's policy and replaces the provisional
//! entry with the real one in one map update. If the datapath is not there (no agent ever ran
//! on the node), ADD fails under `initialPolicy: deny` (the runtime retries; the pod never runs
//! unenforced) and passes with a warning under `allow`.
//!
//! The file follows the two sides: `records` is the agent's (what it reads of the plugin's
//! work), `plugin` the plugin's (the CNI commands, their typed errors in `error`), `install`
//! the DaemonSet's init container. This module holds what they share.

use std::net::IpAddr;

use palisade_policy::state::PodRef;
use serde::{Deserialize, Serialize};

mod error;
mod install;
mod plugin;
mod records;

pub use error::{CniError, ProvisionError};
pub use install::{InstallOptions, active_conf, install};
pub use plugin::plugin_main;
pub use records::{Records, bind_notify};

/// The plugin's binary name (the `type` in the CNI configuration).
pub const PLUGIN_TYPE: &str = "palisade-cni";
pub const DEFAULT_STATE_DIR: &str = "/run/palisade/cni";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/palisade";
/// The agent's wake-up socket, in the state directory.
pub const NOTIFY_SOCKET: &str = "notify.sock";
/// Provisional endpoint ids (written by the plugin, replaced by the agent) live above this;
/// the compiler hands out ids from 1 upwards and never gets near it.
pub const PROVISIONAL_ID_BASE: u32 = 0xf000_0000;

pub fn provisional_id(ifindex: u32) -> u32 {
    PROVISIONAL_ID_BASE | (ifindex & !PROVISIONAL_ID_BASE)
}

pub fn is_provisional(id: u32) -> bool {
    id >= PROVISIONAL_ID_BASE
}

/// What a new pod's endpoint does until the agent has compiled its policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitialPolicy {
    /// `EP_PENDING`: every packet is dropped (fail closed).
    #[default]
    Deny,
    /// Not isolated: everything passes until the real policy is in (fail open).
    Allow,
}

/// What the plugin did for one pod interface (`<stateDir>/<container>-<ifname>.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    /// From `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`).
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub host_ifindex: u32,
    pub host_ifname: String,
    /// The pod's addresses, from `prevResult.ips`.
    pub ips: Vec<IpAddr>,
    /// How the host-side interface was found: `netns-peer` or `prev-result`.
    pub found_by: String,
    pub initial_policy: InitialPolicy,
    pub added_at_unix_ms: u128,
}

impl Record {
    pub fn pod(&self) -> Option<PodRef> {
        Some(PodRef::new(
            self.namespace.as_deref()?,
            self.name.as_deref()?,
        ))
    }

    fn file_name(container_id: &str, ifname: &str) -> String {
        let safe = |s: &str| {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect::<String>()
        };
        format!("{}-{}.json", safe(container_id), safe(ifname))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provisional_ids_never_meet_compiled_ones() {
        assert!(is_provisional(provisional_id(1)));
        assert!(is_provisional(provisional_id(u32::MAX)));
        assert!(!is_provisional(1_000_000));
        assert_eq!(provisional_id(7) & !PROVISIONAL_ID_BASE, 7);
    }
}
