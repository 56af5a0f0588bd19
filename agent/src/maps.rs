//! Writes a `DesiredState` into the BPF maps, touching only the entries that changed.
//!
//! Order matters for an enforcer: new and changed allow entries go in first, then endpoint
//! flags (so a pod becomes isolated only once its allows exist), then stale entries go out.
//! An endpoint whose entries cannot be written (a full map) is switched to `EP_PENDING`, which
//! drops its traffic: it fails closed, never open.
use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result};
use aya::maps::{HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use palisade_common::{
    CIDR_KEY_FIXED_BITS, CidrKey, EP_PENDING, EndpointInfo, PeerAddr, PolicyKey, PolicyValue,
    map_names,
};
use tracing::{error, warn};

use crate::{loader::Datapath, state::DesiredState};

/// What one `apply` changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub written: usize,
    pub removed: usize,
    pub failed: usize,
}

impl ApplyStats {
    pub fn changes(&self) -> usize {
        self.written + self.removed
    }
}

pub struct MapWriter {
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    identities: HashMap<MapData, PeerAddr, u32>,
    cidrs: LpmTrie<MapData, CidrKey, u32>,
    policy: LpmTrie<MapData, PolicyKey, PolicyValue>,
    /// What the maps hold now (as far as this writer knows).
    applied: DesiredState,
    /// Current revision per endpoint id.
    revisions: BTreeMap<u32, u32>,
}

fn take(dp: &mut Datapath, name: &str) -> Result<Map> {
    dp.take_map(name)
}

impl MapWriter {
    /// Takes the policy maps out of the datapath. Entries already in them (pinned maps of an
    /// earlier agent) are read back, so the first `apply` only writes the difference.
    pub fn new(dp: &mut Datapath) -> Result<Self> {
        let endpoints = HashMap::try_from(take(dp, map_names::ENDPOINTS)?)?;
        let identities = HashMap::try_from(take(dp, map_names::IDENTITIES)?)?;
        let cidrs = LpmTrie::try_from(take(dp, map_names::CIDRS)?)?;
        let policy = LpmTrie::try_from(take(dp, map_names::POLICY)?)?;
        let mut w = MapWriter {
            endpoints,
            identities,
            cidrs,
            policy,
            applied: DesiredState::default(),
            revisions: BTreeMap::new(),
        };
        w.read_back().context("reading pinned maps")?;
        Ok(w)
    }

    fn read_back(&mut self) -> Result<()> {
        for item in self.endpoints.iter() {
            let (ifindex, info) = item?;
            self.revisions.insert(info.id, info.revision);
            self.applied.endpoints.insert(ifindex, info);
        }
        for item in self.identities.iter() {
            let (addr, id) = item?;
            self.applied.identities.insert(addr, id);
        }
        for item in self.cidrs.iter() {
            let (key, class) = item?;
            let entry = crate::state::CidrEntry {
                key: key.data(),
                prefix_len: key.prefix_len() - CIDR_KEY_FIXED_BITS,
            };
            self.applied.cidrs.insert(entry, class);
        }
        for item in self.policy.iter() {
            let (key, value) = item?;
            let entry = crate::state::PolicyEntry {
                key: key.data(),
                prefix_len: key.prefix_len(),
            };
            self.applied.policy.insert(entry, value);
        }
        Ok(())
    }

    /// The state the maps hold, with the revisions that were written.
    pub fn applied(&self) -> &DesiredState {
        &self.applied
    }

    pub fn apply(&mut self, desired: &DesiredState) -> ApplyStats {
        let mut stats = ApplyStats::default();
        // Endpoints whose policy entries change get a new revision (conntrack re-checks their
        // flows); endpoints whose entries cannot be written fail closed.
        let mut touched: BTreeSet<u32> = BTreeSet::new();
        let mut failed: BTreeSet<u32> = BTreeSet::new();
        let mut identities_changed = false;

        // 1. Additions and changes.
        for (addr, id) in &desired.identities {
            if self.applied.identities.get(addr) != Some(id) {
                identities_changed |= self.applied.identities.contains_key(addr);
                match self.identities.insert(*addr, *id, 0) {
                    Ok(()) => {
                        self.applied.identities.insert(*addr, *id);
                        stats.written += 1;
                    }
                    Err(e) => {
                        error!(?addr, "IDENTITIES insert failed: {e}");
                        stats.failed += 1;
                    }
                }
            }
        }
        for (entry, class) in &desired.cidrs {
            if self.applied.cidrs.get(entry) != Some(class) {
                touched.insert(entry.key.endpoint);
                let key = Key::new(CIDR_KEY_FIXED_BITS + entry.prefix_len, entry.key);
                match self.cidrs.insert(&key, *class, 0) {
                    Ok(()) => {
                        self.applied.cidrs.insert(*entry, *class);
                        stats.written += 1;
                    }
                    Err(e) => {
                        error!(endpoint = entry.key.endpoint, "CIDRS insert failed: {e}");
                        failed.insert(entry.key.endpoint);
                        stats.failed += 1;
                    }
                }
            }
        }
        for (entry, value) in &desired.policy {
            if self.applied.policy.get(entry) != Some(value) {
                touched.insert(entry.key.endpoint);
                let key = Key::new(entry.prefix_len, entry.key);
                match self.policy.insert(&key, *value, 0) {
                    Ok(()) => {
                        self.applied.policy.insert(*entry, *value);
                        stats.written += 1;
                    }
                    Err(e) => {
                        error!(endpoint = entry.key.endpoint, "POLICY insert failed: {e}");
                        failed.insert(entry.key.endpoint);
                        stats.failed += 1;
                    }
                }
            }
        }
        // 2. Stale allow entries go before endpoint revisions are bumped, so that a flow
        //    re-checked under the new revision can never see an allow that is being removed.
        let stale: Vec<_> = self
            .applied
            .policy
            .keys()
            .filter(|e| !desired.policy.contains_key(e))
            .copied()
            .collect();
        for entry in stale {
            touched.insert(entry.key.endpoint);
            self.applied.policy.remove(&entry);
            match self.policy.remove(&Key::new(entry.prefix_len, entry.key)) {
                Ok(()) => stats.removed += 1,
                Err(e) => warn!(?entry, "POLICY remove: {e}"),
            }
        }
        let stale: Vec<_> = self
            .applied
            .cidrs
            .keys()
            .filter(|e| !desired.cidrs.contains_key(e))
            .copied()
            .collect();
        for entry in stale {
            touched.insert(entry.key.endpoint);
            self.applied.cidrs.remove(&entry);
            let key = Key::new(CIDR_KEY_FIXED_BITS + entry.prefix_len, entry.key);
            match self.cidrs.remove(&key) {
                Ok(()) => stats.removed += 1,
                Err(e) => warn!(?entry, "CIDRS remove: {e}"),
            }
        }
        let stale: Vec<_> = self
            .applied
            .identities
            .keys()
            .filter(|a| !desired.identities.contains_key(a))
            .copied()
            .collect();
        for addr in stale {
            identities_changed = true;
            self.applied.identities.remove(&addr);
            match self.identities.remove(&addr) {
                Ok(()) => stats.removed += 1,
                Err(e) => warn!(?addr, "IDENTITIES remove: {e}"),
            }
        }
        // 3. Endpoints.
        for (ifindex, want) in &desired.endpoints {
            let current = self.applied.endpoints.get(ifindex).copied();
            let mut info = *want;
            let mut revision = self.revisions.get(&want.id).copied().unwrap_or(0);
            let flags_changed = current.map(|c| c.flags) != Some(want.flags);
            if revision == 0
                || touched.contains(&want.id)
                || identities_changed
                || flags_changed
                || failed.contains(&want.id)
            {
                revision = revision.wrapping_add(1).max(1);
            }
            info.revision = revision;
            if failed.contains(&want.id) {
                warn!(
                    ifindex,
                    endpoint = want.id,
                    "policy entries could not be written: failing closed"
                );
                info.flags |= EP_PENDING;
            }
            if current == Some(info) {
                continue;
            }
            match self.endpoints.insert(*ifindex, info, 0) {
                Ok(()) => {
                    self.applied.endpoints.insert(*ifindex, info);
                    self.revisions.insert(want.id, revision);
                    stats.written += 1;
                }
                Err(e) => {
                    error!(ifindex, "ENDPOINTS insert failed: {e}");
                    stats.failed += 1;
                }
            }
        }

        // 4. Endpoints that are gone.
        let stale: Vec<u32> = self
            .applied
            .endpoints
            .keys()
            .filter(|i| !desired.endpoints.contains_key(i))
            .copied()
            .collect();
        for ifindex in stale {
            if let Some(info) = self.applied.endpoints.remove(&ifindex) {
                self.revisions.remove(&info.id);
            }
            match self.endpoints.remove(&ifindex) {
                Ok(()) => stats.removed += 1,
                Err(e) => warn!(ifindex, "ENDPOINTS remove: {e}"),
            }
        }
        self.applied.rules = desired.rules.clone();
        self.applied.endpoint_meta = desired.endpoint_meta.clone();
        self.applied.identity_pods = desired.identity_pods.clone();
        stats
    }
}
