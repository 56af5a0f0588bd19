//! Writes a `DesiredState` into the BPF maps, touching only the entries that changed.
//!
//! Order matters for an enforcer: new and changed allow entries go in first, then stale ones go
//! out, then endpoint flags and revisions (so a pod becomes isolated only once its allows
//! exist, and a flow re-checked under a new revision never sees an allow being removed).
//!
//! Every failure fails closed, never open, and is recorded (`MapWriter::failures`, logged with
//! the endpoint it affects):
//! * an allow entry, own address or stale entry of an endpoint that cannot be written or
//!   removed (a full map) switches the endpoint to `EP_PENDING`: it drops everything until a
//!   later `apply` succeeds (entries that failed are retried by every `apply`);
//! * an identity that cannot be changed is removed (the address then has no identity, which
//!   only ever allows less); one that cannot be removed either makes every endpoint pending;
//! * an endpoint whose ENDPOINTS entry cannot be written loses its entry: the programs drop the
//!   traffic of an attached interface without one (`Reason::UnknownEndpoint`).
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use palisade_common::{
    CidrKey, CtEntry, CtKey, EP_ISOLATED_EGRESS, EP_MORE_ADDRS, EP_PENDING, EndpointInfo,
    EndpointSlot, NodePortKey, NodePortTarget, PeerAddr, PolicyKey, PolicyValue, PrefixLengths,
    PrefixLengthsKey, capacity, endpoint_slot, map_names,
};
use serde::Serialize;
use tracing::{error, warn};

use palisade_policy::state::{
    CidrEntry, DesiredState, PolicyEntry, PolicyMap, Stamps, prefix_lengths,
};

use crate::{
    error::{DatapathError, Result},
    loader::Datapath,
};

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

/// One map write that failed in the last `apply`, and whom it affects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct MapFailure {
    /// The map (`POLICY`, `CIDRS`, ...).
    pub map: &'static str,
    /// The endpoint that fails closed because of it (none for IDENTITIES).
    pub endpoint: Option<u32>,
    /// `namespace/name` of that endpoint's pod, when known.
    pub pod: Option<String>,
    /// What was done and the kernel's answer (the first such failure).
    pub error: String,
    /// Failed writes of this map for this endpoint in the apply (one is reported).
    pub count: usize,
}

impl std::fmt::Display for MapFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.pod, self.endpoint) {
            (Some(pod), _) => write!(f, "endpoint {pod}: {} {}", self.map, self.error)?,
            (None, Some(id)) => write!(f, "endpoint id {id}: {} {}", self.map, self.error)?,
            (None, None) => write!(f, "{} {}", self.map, self.error)?,
        }
        if self.count > 1 {
            write!(f, " (and {} more)", self.count - 1)?;
        }
        if self.endpoint.is_some() {
            f.write_str(": failing closed (EP_PENDING)")?;
        }
        Ok(())
    }
}

pub struct MapWriter {
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    endpoint_slots: Array<MapData, EndpointSlot>,
    /// What ENDPOINT_SLOTS holds (its non-empty slots).
    applied_slots: BTreeMap<u32, EndpointSlot>,
    identities: HashMap<MapData, PeerAddr, u32>,
    endpoint_addrs: HashMap<MapData, PeerAddr, u32>,
    node_ports: HashMap<MapData, NodePortKey, NodePortTarget>,
    cidrs: HashMap<MapData, CidrKey, u32>,
    policy: HashMap<MapData, PolicyKey, PolicyValue>,
    prefix_lengths: HashMap<MapData, PrefixLengthsKey, PrefixLengths>,
    /// What the maps hold now (as far as this writer knows).
    applied: DesiredState,
    /// What PREFIX_LENGTHS holds now (derived from what CIDRS and POLICY hold, or their union
    /// with what they are about to hold).
    applied_lengths: BTreeMap<PrefixLengthsKey, PrefixLengths>,
    /// Whether PREFIX_LENGTHS was checked whole against CIDRS and POLICY (the first apply).
    lengths_checked: bool,
    /// Current revision per endpoint id.
    revisions: BTreeMap<u32, u32>,
    /// The stamps of the last apply that wrote everything it had to (`apply_stamped`): what
    /// the maps hold for an endpoint whose stamp is unchanged needs no comparing.
    applied_stamps: Option<Stamps>,
    /// The next revision handed out. Revisions come from one counter for all endpoints and
    /// are never handed out twice: a conntrack entry stamped with a revision can only match
    /// the endpoint it was created for, after the change it was checked against (an endpoint
    /// id moving to another interface, or removed and given to a new pod, must not find old
    /// entries "current" again).
    next_revision: u32,
    /// Failures of the last `apply`.
    failures: Vec<MapFailure>,
    /// Failures since the writer was created (a metric).
    failures_total: u64,
}

/// The entries of `desired` that `applied` lacks or holds with another value (with the value
/// it holds), in key order: one pass over both sorted sequences instead of a tree search per
/// entry (the maps hold tens of thousands of entries and most applies change a few).
fn changed<'a, K: Ord + Copy + 'a, V: PartialEq + Copy + 'a>(
    desired: impl IntoIterator<Item = (&'a K, &'a V)>,
    applied: impl IntoIterator<Item = (&'a K, &'a V)>,
) -> Vec<(K, V, Option<V>)> {
    let mut out = Vec::new();
    let mut old = applied.into_iter().peekable();
    for (k, v) in desired {
        while old.next_if(|(o, _)| *o < k).is_some() {}
        match old.next_if(|(o, _)| *o == k) {
            Some((_, o)) if o == v => {}
            Some((_, o)) => out.push((*k, *v, Some(*o))),
            None => out.push((*k, *v, None)),
        }
    }
    out
}

/// The keys of `applied` that `desired` lacks, in key order (one pass over both).
fn stale_keys<'a, K: Ord + Copy + 'a, V: 'a>(
    applied: impl IntoIterator<Item = (&'a K, &'a V)>,
    desired: impl IntoIterator<Item = (&'a K, &'a V)>,
) -> Vec<K> {
    let mut out = Vec::new();
    let mut want = desired.into_iter().map(|(k, _)| k).peekable();
    for (k, _) in applied {
        while want.next_if(|w| *w < k).is_some() {}
        if want.next_if(|w| *w == k).is_none() {
            out.push(*k);
        }
    }
    out
}

/// What an apply compares: everything, or (stamps known on both sides) the identities if
/// their stamp changed and the POLICY and CIDRS entries of the endpoints whose stamp changed,
/// came or went.
#[derive(Debug)]
struct Scope {
    identities: bool,
    /// `None`: every endpoint.
    endpoints: Option<BTreeSet<u32>>,
}

impl Scope {
    const ALL: Scope = Scope {
        identities: true,
        endpoints: None,
    };

    fn of(desired: Option<&Stamps>, applied: Option<&Stamps>) -> Scope {
        let (Some(new), Some(old)) = (desired, applied) else {
            return Scope::ALL;
        };
        let differs = |a: Option<&u64>, b: Option<&u64>| a != b || a == Some(&0);
        let mut endpoints = BTreeSet::new();
        for (id, stamp) in &new.endpoints {
            if differs(Some(stamp), old.endpoints.get(id)) {
                endpoints.insert(*id);
            }
        }
        endpoints.extend(
            old.endpoints
                .keys()
                .filter(|id| !new.endpoints.contains_key(id)),
        );
        Scope {
            identities: new.identities == 0 || new.identities != old.identities,
            endpoints: Some(endpoints),
        }
    }

    /// The entries in scope of a map keyed by endpoint id first, in key order, given its
    /// `range`.
    fn entries<'a, K: Ord + 'a, V: 'a, I: Iterator<Item = (&'a K, &'a V)> + 'a>(
        &'a self,
        range: impl Fn((Bound<K>, Bound<K>)) -> I + 'a,
        first_of: fn(u32) -> K,
    ) -> Box<dyn Iterator<Item = (&'a K, &'a V)> + 'a> {
        match &self.endpoints {
            None => Box::new(range((Bound::Unbounded, Bound::Unbounded))),
            Some(ids) => Box::new(ids.iter().flat_map(move |&id| {
                let end = match id.checked_add(1) {
                    Some(next) => Bound::Excluded(first_of(next)),
                    None => Bound::Unbounded,
                };
                range((Bound::Included(first_of(id)), end))
            })),
        }
    }

    fn policy<'a>(
        &'a self,
        map: &'a PolicyMap,
    ) -> Box<dyn Iterator<Item = (&'a PolicyEntry, &'a PolicyValue)> + 'a> {
        self.entries(move |r| map.range(r), PolicyEntry::first_of)
    }

    fn cidrs<'a>(
        &'a self,
        map: &'a BTreeMap<CidrEntry, u32>,
    ) -> Box<dyn Iterator<Item = (&'a CidrEntry, &'a u32)> + 'a> {
        self.entries(move |r| map.range(r), CidrEntry::first_of)
    }
}

fn take<T: TryFrom<Map, Error = MapError>>(dp: &mut Datapath, name: &str) -> Result<T> {
    T::try_from(dp.take_map(name)?).map_err(DatapathError::map(name, "taking it"))
}

/// A removal that found nothing to remove did what it was asked.
pub fn is_not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

fn describe(e: &MapError) -> String {
    match e {
        MapError::SyscallError(s) => s.io_error.to_string(),
        other => other.to_string(),
    }
}

impl MapWriter {
    /// Takes the policy maps out of the datapath. Entries already in them (pinned maps of an
    /// earlier agent) are read back, so the first `apply` only writes the difference.
    pub fn new(dp: &mut Datapath) -> Result<Self> {
        let endpoints = take(dp, map_names::ENDPOINTS)?;
        let endpoint_slots = take(dp, map_names::ENDPOINT_SLOTS)?;
        let identities = take(dp, map_names::IDENTITIES)?;
        let endpoint_addrs = take(dp, map_names::EP_ADDRS)?;
        let node_ports = take(dp, map_names::NODE_PORTS)?;
        let cidrs = take(dp, map_names::CIDRS)?;
        let policy = take(dp, map_names::POLICY)?;
        let prefix_lengths = take(dp, map_names::PREFIX_LENGTHS)?;
        let mut w = MapWriter {
            endpoints,
            endpoint_slots,
            applied_slots: BTreeMap::new(),
            identities,
            endpoint_addrs,
            node_ports,
            cidrs,
            policy,
            prefix_lengths,
            applied: DesiredState::default(),
            applied_lengths: BTreeMap::new(),
            lengths_checked: false,
            revisions: BTreeMap::new(),
            next_revision: 1,
            applied_stamps: None,
            failures: Vec::new(),
            failures_total: 0,
        };
        w.read_back()?;
        // Above every revision in use, conntrack entries of removed endpoints included.
        let mut max = w.revisions.values().copied().max().unwrap_or(0);
        if let Some(ct) = dp.map(map_names::CONNTRACK) {
            let ct: HashMap<&MapData, CtKey, CtEntry> = HashMap::try_from(ct)
                .map_err(DatapathError::map(map_names::CONNTRACK, "opening it"))?;
            for item in ct.iter() {
                let (_, e) =
                    item.map_err(DatapathError::map(map_names::CONNTRACK, "reading it back"))?;
                max = max.max(e.revision);
            }
        }
        w.next_revision = max.wrapping_add(1).max(1);
        Ok(w)
    }

    fn read_back(&mut self) -> Result<()> {
        crate::pinned::read_policy_entries(
            &self.endpoints,
            &self.identities,
            &self.cidrs,
            &self.policy,
            &mut self.applied,
        )?;
        for info in self.applied.endpoints.values() {
            self.revisions.insert(info.id, info.revision);
        }
        for item in self.endpoint_addrs.iter() {
            let (addr, id) =
                item.map_err(DatapathError::map(map_names::EP_ADDRS, "reading it back"))?;
            self.applied.endpoint_addrs.insert(addr, id);
        }
        for item in self.node_ports.iter() {
            let (key, target) =
                item.map_err(DatapathError::map(map_names::NODE_PORTS, "reading it back"))?;
            self.applied.node_ports.insert(key, target);
        }
        for index in 0..capacity::ENDPOINTS {
            let slot = self
                .endpoint_slots
                .get(&index, 0)
                .map_err(DatapathError::map(
                    map_names::ENDPOINT_SLOTS,
                    "reading it back",
                ))?;
            if slot.ifindex != 0 {
                self.applied_slots.insert(index, slot);
            }
        }
        for item in self.prefix_lengths.iter() {
            let (key, lengths) = item.map_err(DatapathError::map(
                map_names::PREFIX_LENGTHS,
                "reading it back",
            ))?;
            self.applied_lengths.insert(key, lengths);
        }
        Ok(())
    }

    /// The state the maps hold, with the revisions that were written.
    /// Forgets what this writer believes ENDPOINTS holds for `ifindex`, because someone else
    /// (the CNI plugin) wrote it: the next `apply` writes the desired entry again.
    pub fn forget_endpoint(&mut self, ifindex: u32) {
        self.applied.endpoints.remove(&ifindex);
        self.applied_stamps = None;
    }

    pub fn applied(&self) -> &DesiredState {
        &self.applied
    }

    /// The writes that failed in the last `apply` (each fails closed; see the module doc).
    pub fn failures(&self) -> &[MapFailure] {
        &self.failures
    }

    /// Failed writes since the writer was created.
    pub fn failures_total(&self) -> u64 {
        self.failures_total
    }

    /// Endpoints (ifindex, endpoint id) switched to `EP_PENDING` because of failed writes.
    pub fn pending(&self) -> Vec<(u32, u32)> {
        self.applied
            .endpoints
            .iter()
            .filter(|(_, info)| info.flags & EP_PENDING != 0)
            .map(|(ifindex, info)| (*ifindex, info.id))
            .collect()
    }

    fn fail(
        &mut self,
        desired: &DesiredState,
        map: &'static str,
        endpoint: Option<u32>,
        error: String,
    ) {
        self.failures_total += 1;
        // One report per map and endpoint: a full map fails thousands of writes alike.
        if let Some(f) = self
            .failures
            .iter_mut()
            .find(|f| f.map == map && f.endpoint == endpoint)
        {
            f.count += 1;
            return;
        }
        let pod = endpoint
            .and_then(|id| desired.endpoint_meta.get(&id))
            .map(|m| m.pod.to_string());
        let f = MapFailure {
            map,
            endpoint,
            pod,
            error,
            count: 1,
        };
        error!("{f}");
        self.failures.push(f);
    }

    /// Writes what differs between `desired` and the maps, comparing everything.
    pub fn apply(&mut self, desired: &DesiredState) -> ApplyStats {
        self.apply_stamped(desired, None)
    }

    /// `apply`, comparing only what `stamps` (the compiler's, for `desired` exactly as it
    /// made it) say changed since the last apply that wrote all it had to.
    pub fn apply_stamped(&mut self, desired: &DesiredState, stamps: Option<&Stamps>) -> ApplyStats {
        let scope = Scope::of(stamps, self.applied_stamps.as_ref());
        // Until this apply has written all it had to, nothing is known by stamp.
        self.applied_stamps = None;
        let stats = self.apply_in(desired, &scope);
        if self.failures.is_empty() && stats.failed == 0 {
            self.applied_stamps = stamps.cloned();
        }
        stats
    }

    fn apply_in(&mut self, desired: &DesiredState, scope: &Scope) -> ApplyStats {
        self.failures.clear();
        let mut p = Pass {
            scope,
            stats: ApplyStats::default(),
            touched: BTreeSet::new(),
            failed: BTreeSet::new(),
            identities_changed: false,
            identity_stuck: false,
        };
        self.write_changes(desired, &mut p);
        // A prefix length is listed (for the union of the old and the new entries) before an
        // endpoint's flags can make its new entries matter, and unlisted only once its last
        // entry is gone.
        self.write_prefix_lengths(desired, &mut p);
        self.remove_stale(desired, &mut p);
        self.write_prefix_lengths(desired, &mut p);
        self.write_endpoints(desired, &mut p);
        self.remove_gone_endpoints(desired, &mut p);
        self.write_endpoint_slots(desired, &mut p);
        // A pass that wrote all it had to leaves POLICY as `desired` has it: keep that copy
        // (shared with the compiler's result) instead of an equal one of our own.
        if p.stats.failed == 0 && self.failures.is_empty() {
            self.applied.policy = desired.policy.clone();
        }
        p.stats
    }

    /// Phase 1: additions and changes.
    fn write_changes(&mut self, desired: &DesiredState, p: &mut Pass<'_>) {
        // 1. Additions and changes.
        let identities = if p.scope.identities {
            changed(&desired.identities, &self.applied.identities)
        } else {
            Vec::new()
        };
        for (addr, id, old) in identities {
            let (addr, id) = (&addr, &id);
            p.identities_changed |= old.is_some();
            match self.identities.insert(*addr, *id, 0) {
                Ok(()) => {
                    self.applied.identities.insert(*addr, *id);
                    p.stats.written += 1;
                }
                Err(e) => {
                    p.stats.failed += 1;
                    let mut msg = format!("insert {addr:?} -> {id} failed: {}", describe(&e));
                    if old.is_some() {
                        // The old identity must not keep its allows: no identity allows less.
                        match self.identities.remove(addr) {
                            Ok(()) => {
                                self.applied.identities.remove(addr);
                                msg.push_str("; the address's old identity was removed");
                            }
                            Err(e) if is_not_found(&e) => {
                                self.applied.identities.remove(addr);
                            }
                            Err(e) => {
                                p.identity_stuck = true;
                                msg.push_str(&format!(
                                    "; removing its old identity failed too ({}): every endpoint fails closed",
                                    describe(&e)
                                ));
                            }
                        }
                    }
                    self.fail(desired, map_names::IDENTITIES, None, msg);
                }
            }
        }
        for (addr, id) in &desired.endpoint_addrs {
            let old = self.applied.endpoint_addrs.get(addr).copied();
            if old == Some(*id) {
                continue;
            }
            match self.endpoint_addrs.insert(*addr, *id, 0) {
                Ok(()) => {
                    self.applied.endpoint_addrs.insert(*addr, *id);
                    p.stats.written += 1;
                }
                Err(e) => {
                    p.stats.failed += 1;
                    p.failed.insert(*id);
                    if let Some(old) = old {
                        // The address's previous owner must not keep it.
                        p.failed.insert(old);
                    }
                    let msg = format!("insert {addr:?} failed: {}", describe(&e));
                    self.fail(desired, map_names::EP_ADDRS, Some(*id), msg);
                }
            }
        }
        // A node port that cannot be written (or removed) would leave a DNAT onward judged
        // as node traffic, or as the wrong target: every egress-isolated endpoint fails closed.
        let egress_isolated: Vec<u32> = desired
            .endpoints
            .values()
            .filter(|i| i.flags & EP_ISOLATED_EGRESS != 0)
            .map(|i| i.id)
            .collect();
        for (key, target) in &desired.node_ports {
            if self.applied.node_ports.get(key) == Some(target) {
                continue;
            }
            match self.node_ports.insert(*key, *target, 0) {
                Ok(()) => {
                    self.applied.node_ports.insert(*key, *target);
                    p.stats.written += 1;
                }
                Err(e) => {
                    p.stats.failed += 1;
                    p.failed.extend(egress_isolated.iter().copied());
                    let msg = format!("insert {key:?} failed: {}", describe(&e));
                    self.fail(desired, map_names::NODE_PORTS, None, msg);
                }
            }
        }
        let stale = stale_keys(&self.applied.node_ports, &desired.node_ports);
        for key in stale {
            match self.node_ports.remove(&key) {
                Ok(()) => p.stats.removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    p.stats.failed += 1;
                    p.failed.extend(egress_isolated.iter().copied());
                    let msg = format!("remove of {key:?} failed: {}", describe(&e));
                    self.fail(desired, map_names::NODE_PORTS, None, msg);
                    continue;
                }
            }
            self.applied.node_ports.remove(&key);
        }
        let cidr_changes: Vec<_> = changed(
            p.scope.cidrs(&desired.cidrs),
            p.scope.cidrs(&self.applied.cidrs),
        )
        .into_iter()
        .map(|(e, c, _)| (e, c))
        .collect();
        for (entry, class) in cidr_changes {
            p.touched.insert(entry.key.endpoint);
            match self.cidrs.insert(entry.map_key(), class, 0) {
                Ok(()) => {
                    self.applied.cidrs.insert(entry, class);
                    p.stats.written += 1;
                }
                Err(e) => {
                    p.failed.insert(entry.key.endpoint);
                    p.stats.failed += 1;
                    let msg = format!("insert failed: {}", describe(&e));
                    self.fail(desired, map_names::CIDRS, Some(entry.key.endpoint), msg);
                }
            }
        }
        let policy_changes: Vec<_> = changed(
            p.scope.policy(&desired.policy),
            p.scope.policy(&self.applied.policy),
        )
        .into_iter()
        .map(|(e, v, _)| (e, v))
        .collect();
        for (entry, value) in policy_changes {
            p.touched.insert(entry.key.endpoint);
            match self.policy.insert(entry.map_key(), value, 0) {
                Ok(()) => {
                    self.applied.policy.insert(entry, value);
                    p.stats.written += 1;
                }
                Err(e) => {
                    p.failed.insert(entry.key.endpoint);
                    p.stats.failed += 1;
                    let msg = format!("insert failed: {}", describe(&e));
                    self.fail(desired, map_names::POLICY, Some(entry.key.endpoint), msg);
                }
            }
        }
    }

    /// PREFIX_LENGTHS of the endpoints whose CIDRS or POLICY entries changed (of every
    /// endpoint in the first apply: an earlier agent's maps are checked whole), from what
    /// those maps hold now.
    fn write_prefix_lengths(&mut self, desired: &DesiredState, p: &mut Pass<'_>) {
        let mut want = BTreeMap::new();
        let mut have = BTreeMap::new();
        if self.lengths_checked {
            for &ep in &p.touched {
                want.extend(prefix_lengths(
                    &self.applied.cidrs,
                    &self.applied.policy,
                    Some(ep),
                ));
                let bounds = |endpoint| PrefixLengthsKey {
                    endpoint,
                    ..PrefixLengthsKey::default()
                };
                have.extend(
                    self.applied_lengths
                        .range(bounds(ep)..bounds(ep.saturating_add(1)))
                        .map(|(k, v)| (*k, *v)),
                );
            }
        } else {
            want = prefix_lengths(&self.applied.cidrs, &self.applied.policy, None);
            have = self.applied_lengths.clone();
            self.lengths_checked = true;
        }
        for (key, lengths, _) in changed(&want, &have) {
            match self.prefix_lengths.insert(key, lengths, 0) {
                Ok(()) => {
                    self.applied_lengths.insert(key, lengths);
                    p.stats.written += 1;
                }
                Err(e) => {
                    p.failed.insert(key.endpoint);
                    p.stats.failed += 1;
                    let msg = format!("insert failed: {}", describe(&e));
                    self.fail(desired, map_names::PREFIX_LENGTHS, Some(key.endpoint), msg);
                }
            }
        }
        for key in stale_keys(&have, &want) {
            match self.prefix_lengths.remove(&key) {
                Ok(()) => p.stats.removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    p.failed.insert(key.endpoint);
                    p.stats.failed += 1;
                    let msg = format!("remove failed: {}", describe(&e));
                    self.fail(desired, map_names::PREFIX_LENGTHS, Some(key.endpoint), msg);
                    continue;
                }
            }
            self.applied_lengths.remove(&key);
        }
    }

    /// Phase 5: ENDPOINT_SLOTS, a copy of what ENDPOINTS now holds. A slot stays with the
    /// endpoint that has it while it lives; a free one goes to the lowest ifindex that maps to
    /// it (the others are read from ENDPOINTS); an emptied slot is zeroed.
    fn write_endpoint_slots(&mut self, desired: &DesiredState, p: &mut Pass<'_>) {
        let mut want: BTreeMap<u32, EndpointSlot> = BTreeMap::new();
        for (&index, slot) in &self.applied_slots {
            if let Some(&info) = self.applied.endpoints.get(&slot.ifindex) {
                let ifindex = slot.ifindex;
                want.insert(index, EndpointSlot { ifindex, info });
            }
        }
        for (&ifindex, &info) in &self.applied.endpoints {
            want.entry(endpoint_slot(ifindex))
                .or_insert(EndpointSlot { ifindex, info });
        }
        let empty = EndpointSlot::default();
        let changes: Vec<(u32, EndpointSlot)> = changed(&want, &self.applied_slots)
            .into_iter()
            .map(|(index, slot, _)| (index, slot))
            .chain(
                stale_keys(&self.applied_slots, &want)
                    .into_iter()
                    .map(|index| (index, empty)),
            )
            .collect();
        for (index, slot) in changes {
            match self.endpoint_slots.set(index, slot, 0) {
                Ok(()) => {
                    p.stats.written += 1;
                    if slot.ifindex == 0 {
                        self.applied_slots.remove(&index);
                    } else {
                        self.applied_slots.insert(index, slot);
                    }
                }
                Err(e) => {
                    // An array's update fails only for an index out of range, which
                    // `endpoint_slot` rules out; reported all the same.
                    p.stats.failed += 1;
                    let msg = format!("set of slot {index} failed: {}", describe(&e));
                    let endpoint = (slot.ifindex != 0).then_some(slot.info.id);
                    self.fail(desired, map_names::ENDPOINT_SLOTS, endpoint, msg);
                }
            }
        }
    }

    /// Phase 2: stale entries.
    fn remove_stale(&mut self, desired: &DesiredState, p: &mut Pass<'_>) {
        // 2. Stale entries go before endpoint revisions are bumped, so that a flow re-checked
        //    under the new revision can never see an allow that is being removed. An entry
        //    that cannot be removed stays known (and is retried by the next apply); its
        //    endpoint fails closed meanwhile.
        let stale = stale_keys(
            p.scope.policy(&self.applied.policy),
            p.scope.policy(&desired.policy),
        );
        for entry in stale {
            p.touched.insert(entry.key.endpoint);
            match self.policy.remove(&entry.map_key()) {
                Ok(()) => p.stats.removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    p.failed.insert(entry.key.endpoint);
                    p.stats.failed += 1;
                    let msg = format!("remove of a stale allow failed: {}", describe(&e));
                    self.fail(desired, map_names::POLICY, Some(entry.key.endpoint), msg);
                    continue;
                }
            }
            self.applied.policy.remove(&entry);
        }
        let stale = stale_keys(
            p.scope.cidrs(&self.applied.cidrs),
            p.scope.cidrs(&desired.cidrs),
        );
        for entry in stale {
            p.touched.insert(entry.key.endpoint);
            match self.cidrs.remove(&entry.map_key()) {
                Ok(()) => p.stats.removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    p.failed.insert(entry.key.endpoint);
                    p.stats.failed += 1;
                    let msg = format!("remove of a stale prefix failed: {}", describe(&e));
                    self.fail(desired, map_names::CIDRS, Some(entry.key.endpoint), msg);
                    continue;
                }
            }
            self.applied.cidrs.remove(&entry);
        }
        let stale: Vec<_> = self
            .applied
            .endpoint_addrs
            .iter()
            .filter(|(a, _)| !desired.endpoint_addrs.contains_key(a))
            .map(|(a, id)| (*a, *id))
            .collect();
        for (addr, id) in stale {
            match self.endpoint_addrs.remove(&addr) {
                Ok(()) => p.stats.removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    p.failed.insert(id);
                    p.stats.failed += 1;
                    let msg = format!("remove of {addr:?} failed: {}", describe(&e));
                    self.fail(desired, map_names::EP_ADDRS, Some(id), msg);
                    continue;
                }
            }
            self.applied.endpoint_addrs.remove(&addr);
        }
        let stale = if p.scope.identities {
            stale_keys(&self.applied.identities, &desired.identities)
        } else {
            Vec::new()
        };
        for addr in stale {
            p.identities_changed = true;
            match self.identities.remove(&addr) {
                Ok(()) => p.stats.removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => {
                    p.identity_stuck = true;
                    p.stats.failed += 1;
                    let msg = format!(
                        "remove of {addr:?} failed: {}: every endpoint fails closed",
                        describe(&e)
                    );
                    self.fail(desired, map_names::IDENTITIES, None, msg);
                    continue;
                }
            }
            self.applied.identities.remove(&addr);
        }
    }

    /// Phase 3: ENDPOINTS, with revisions and fail-closed flags.
    fn write_endpoints(&mut self, desired: &DesiredState, p: &mut Pass<'_>) {
        // 3. Endpoints. An endpoint id behind two interfaces gets one new revision.
        let mut bumped: BTreeMap<u32, u32> = BTreeMap::new();
        // The endpoints' own addresses, as EP_ADDRS holds them now (phases 1 and 2 wrote it),
        // go inline in their entries: the source check compares before it looks up. When an
        // address moves between two live endpoints, EP_ADDRS says so from phase 1 while the
        // losing endpoint's inline copy lasts until its entry is rewritten below: microseconds
        // in which both may send from it. The kernel's IPAM hands an address out again only
        // after the old sandbox is gone, so no live pod holds it then.
        let mut own: BTreeMap<u32, Vec<PeerAddr>> = BTreeMap::new();
        for (addr, id) in &self.applied.endpoint_addrs {
            own.entry(*id).or_default().push(*addr);
        }
        for (ifindex, want) in &desired.endpoints {
            let current = self.applied.endpoints.get(ifindex).copied();
            let mut info = with_own_addresses(want, own.get(&want.id));
            let mut revision = self.revisions.get(&want.id).copied().unwrap_or(0);
            let was = revision;
            let fails_closed = p.identity_stuck || p.failed.contains(&want.id);
            let flags_changed = current.map(|c| c.flags) != Some(info.flags);
            if let Some(r) = bumped.get(&want.id) {
                revision = *r;
            } else if revision == 0
                || p.touched.contains(&want.id)
                || p.identities_changed
                || flags_changed
                || fails_closed
            {
                revision = self.next_revision;
                bumped.insert(want.id, revision);
            }
            info.revision = revision;
            if fails_closed {
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
                    if revision != was {
                        self.next_revision = self.next_revision.wrapping_add(1).max(1);
                    }
                    p.stats.written += 1;
                }
                Err(e) => {
                    p.stats.failed += 1;
                    let mut msg = format!("insert for ifindex {ifindex} failed: {}", describe(&e));
                    // Without an entry the attached programs drop everything; an old entry
                    // (other flags, older revision) must not stay in force.
                    if current.is_some() {
                        match self.endpoints.remove(ifindex) {
                            Ok(()) => {
                                self.applied.endpoints.remove(ifindex);
                            }
                            Err(e) if is_not_found(&e) => {
                                self.applied.endpoints.remove(ifindex);
                            }
                            Err(e) => msg.push_str(&format!(
                                "; removing its old entry failed too: {}",
                                describe(&e)
                            )),
                        }
                    }
                    self.fail(desired, map_names::ENDPOINTS, Some(want.id), msg);
                }
            }
        }
    }

    /// Phase 4: endpoints that are gone, and the names the observers read.
    fn remove_gone_endpoints(&mut self, desired: &DesiredState, p: &mut Pass<'_>) {
        // 4. Endpoints that are gone.
        let stale: Vec<u32> = self
            .applied
            .endpoints
            .keys()
            .filter(|i| !desired.endpoints.contains_key(i))
            .copied()
            .collect();
        for ifindex in stale {
            if let Some(info) = self.applied.endpoints.remove(&ifindex)
                && !desired.endpoints.values().any(|e| e.id == info.id)
            {
                self.revisions.remove(&info.id);
            }
            match self.endpoints.remove(&ifindex) {
                Ok(()) => p.stats.removed += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => warn!(ifindex, "ENDPOINTS remove: {e}"),
            }
        }
        // Comparing first is cheaper than cloning (no allocation), and these rarely change.
        if self.applied.rule_slots != desired.rule_slots {
            self.applied.rule_slots = desired.rule_slots.clone();
        }
        if self.applied.rules != desired.rules {
            self.applied.rules = desired.rules.clone();
        }
        if self.applied.endpoint_meta != desired.endpoint_meta {
            self.applied.endpoint_meta = desired.endpoint_meta.clone();
        }
        if self.applied.domains != desired.domains {
            self.applied.domains = desired.domains.clone();
        }
        // The pods behind identities change only with IDENTITIES (its stamp).
        if p.scope.identities && !self.applied.identity_pods.ptr_eq(&desired.identity_pods) {
            self.applied.identity_pods = desired.identity_pods.clone();
        }
    }
}

/// What one `apply` carries from phase to phase.
struct Pass<'s> {
    /// What to compare.
    scope: &'s Scope,
    stats: ApplyStats,
    /// Endpoints whose policy entries change: they get a new revision (conntrack re-checks
    /// their flows).
    touched: BTreeSet<u32>,
    /// Endpoints whose entries could not be written: they fail closed.
    failed: BTreeSet<u32>,
    identities_changed: bool,
    /// An identity that could be neither changed nor removed: every endpoint fails closed.
    identity_stuck: bool,
}

/// `want` with its inline addresses (and `EP_MORE_ADDRS`) set from `addrs` alone.
fn with_own_addresses(want: &EndpointInfo, addrs: Option<&Vec<PeerAddr>>) -> EndpointInfo {
    let mut info = EndpointInfo {
        id: want.id,
        flags: want.flags & !EP_MORE_ADDRS,
        revision: want.revision,
        ..EndpointInfo::default()
    };
    for addr in addrs.into_iter().flatten() {
        info.add_own_address(addr);
    }
    info
}

#[cfg(test)]
mod diff_tests {
    use super::*;

    #[test]
    fn merge_diff_matches_lookups() {
        let desired: BTreeMap<u32, u32> = [(1, 10), (3, 30), (4, 41), (7, 70), (9, 90)].into();
        let applied: BTreeMap<u32, u32> = [(0, 0), (3, 30), (4, 40), (5, 50), (9, 90)].into();
        assert_eq!(
            changed(&desired, &applied),
            vec![(1, 10, None), (4, 41, Some(40)), (7, 70, None)]
        );
        assert_eq!(stale_keys(&applied, &desired), vec![0, 5]);
        assert!(changed(&desired, &desired).is_empty());
        assert_eq!(stale_keys(&desired, &BTreeMap::new()), vec![1, 3, 4, 7, 9]);
        assert_eq!(changed(&BTreeMap::new(), &applied), vec![]);
    }
}
