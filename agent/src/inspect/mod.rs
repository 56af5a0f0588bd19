//! Reading the enforced state back, for `palisade policy show` and `palisade explain`.
//!
//! The maps are the truth: the CLI opens the pinned ENDPOINTS, IDENTITIES, CIDRS and POLICY
//! maps and decodes them. What the maps cannot say (which pod an endpoint id is, which policy
//! a rule id came from, which pods carry an identity, pod addresses) the agent writes after
//! every reconcile to `state.json` beside its socket ([`StateFile`]); bpffs holds no regular
//! files. `explain` runs `datapath_model` (the datapath's twin) over what was read, so it
//! answers from the entries the programs use, not from a recompilation.
use std::sync::Arc;
use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use palisade_policy::{
    model::Store,
    state::{DesiredState, Direction, EndpointMeta, PodRef, RuleRef, TierRuleInfo},
};

mod names;
mod output;
mod snapshot;

pub use names::*;
pub use output::*;
pub use snapshot::*;

/// The file beside the socket that names what the maps hold.
pub const STATE_FILE: &str = "state.json";

/// Where the agent whose socket is `socket` keeps its state file.
pub fn state_path(socket: &Path) -> PathBuf {
    socket.with_file_name(STATE_FILE)
}

/// A rule id, decoded: `spec.<direction>[index]` of a policy, and whether that policy audits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleInfo {
    pub id: u32,
    pub namespace: String,
    pub policy: String,
    pub direction: Direction,
    pub index: usize,
    /// The policy is in audit mode (annotation or `run --audit`).
    pub audit: bool,
    /// Its RULE_STATS slot (0: not counted).
    #[serde(default)]
    pub slot: u16,
    /// A ClusterNetworkPolicy rule: its tier, priority, name and action.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<TierRuleInfo>,
}

impl RuleInfo {
    /// The rule as the compiler names it.
    pub fn rule_ref(&self) -> RuleRef {
        RuleRef {
            namespace: self.namespace.clone(),
            policy: self.policy.clone(),
            direction: self.direction,
            index: self.index,
            tier: self.tier.clone(),
        }
    }

    /// `namespace/name` of a NetworkPolicy, the name of a ClusterNetworkPolicy.
    pub fn policy_id(&self) -> String {
        self.rule_ref().policy_id()
    }
}

impl fmt::Display for RuleInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.rule_ref())?;
        if self.audit {
            f.write_str(" (audit)")?;
        }
        Ok(())
    }
}

/// A pod and its addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodAddrs {
    pub pod: String,
    pub ips: Vec<IpAddr>,
}

/// What the agent writes beside its socket after every reconcile.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    /// Where the maps are pinned.
    pub pin_dir: PathBuf,
    pub written_at_unix_ms: u64,
    /// `palisade run --audit`.
    pub audit_all: bool,
    /// Rule id -> rule.
    pub rules: BTreeMap<u32, RuleInfo>,
    /// Endpoint id -> pod, interface, policies in force.
    pub endpoints: BTreeMap<u32, EndpointMeta>,
    /// Identity -> pods that carry it.
    pub identities: imbl::OrdMap<u32, Vec<PodRef>>,
    /// Every pod with an address, cluster-wide.
    pub pods: Arc<Vec<PodAddrs>>,
    /// This node's addresses.
    pub node_addresses: Vec<IpAddr>,
}

impl StateFile {
    /// The names for `applied` (what the map writer wrote), from the store it was compiled from.
    pub fn build(
        applied: &DesiredState,
        store: &Store,
        node_addresses: &[IpAddr],
        pin_dir: &Path,
        audit_all: bool,
    ) -> StateFile {
        let pods = PodIndex::build(applied, store);
        StateFile::build_with(applied, store, node_addresses, pin_dir, audit_all, &pods)
    }

    /// `build`, with the pods' part made already (it changes only when pods do).
    pub fn build_with(
        applied: &DesiredState,
        store: &Store,
        node_addresses: &[IpAddr],
        pin_dir: &Path,
        audit_all: bool,
        pods: &PodIndex,
    ) -> StateFile {
        let rules = applied
            .rules
            .iter()
            .map(|(id, r)| {
                let audit = audit_all
                    || match r.tier {
                        Some(_) => store
                            .cluster_policies
                            .get(&r.policy)
                            .is_some_and(|p| p.audit),
                        None => store
                            .policies
                            .get(&(r.namespace.clone(), r.policy.clone()))
                            .is_some_and(|p| p.audit),
                    };
                let slot = applied.rule_slots.get(id).copied().unwrap_or(0);
                (*id, rule_info(*id, r, audit, slot))
            })
            .collect();
        StateFile {
            pin_dir: pin_dir.to_path_buf(),
            written_at_unix_ms: unix_ms(),
            audit_all,
            rules,
            endpoints: applied.endpoint_meta.clone(),
            identities: pods.identities.clone(),
            pods: pods.pods.clone(),
            node_addresses: node_addresses.to_vec(),
        }
    }

    /// Address -> pod (`namespace/name`).
    pub fn ip_owners(&self) -> HashMap<IpAddr, String> {
        ip_owners(&self.pods)
    }
}

fn ip_owners(pods: &[PodAddrs]) -> HashMap<IpAddr, String> {
    let mut out = HashMap::new();
    for p in pods {
        for ip in &p.ips {
            out.entry(*ip).or_insert_with(|| p.pod.clone());
        }
    }
    out
}

/// The cluster's pods as the state file and the verdicts' names hold them: built once per
/// change of the pods (the compiler's IDENTITIES stamp), shared until the next.
#[derive(Clone, Debug, Default)]
pub struct PodIndex {
    pub pods: Arc<Vec<PodAddrs>>,
    pub identities: imbl::OrdMap<u32, Vec<PodRef>>,
    /// Address -> pod (`namespace/name`).
    pub ip_owner: Arc<HashMap<IpAddr, String>>,
}

impl PodIndex {
    pub fn build(applied: &DesiredState, store: &Store) -> PodIndex {
        let pods: Vec<PodAddrs> = store
            .pods
            .iter()
            .filter(|(_, p)| !p.ips.is_empty() && !p.host_network)
            .map(|(r, p)| PodAddrs {
                pod: r.to_string(),
                ips: p.ips.clone(),
            })
            .collect();
        PodIndex {
            ip_owner: Arc::new(ip_owners(&pods)),
            pods: Arc::new(pods),
            identities: applied.identity_pods.clone(),
        }
    }
}

fn rule_info(id: u32, r: &RuleRef, audit: bool, slot: u16) -> RuleInfo {
    RuleInfo {
        id,
        namespace: r.namespace.clone(),
        policy: r.policy.clone(),
        direction: r.direction,
        index: r.index,
        audit,
        slot,
        tier: r.tier.clone(),
    }
}

pub use crate::files::{unix_ms, write_private};

/// The policy maps' entries, read from the pins under `pin_dir`.
pub fn read_pinned_maps(pin_dir: &Path) -> Result<DesiredState> {
    palisade_datapath::pinned::read_policy_maps(pin_dir)
        .context("is the agent running, and are you root?")
}
