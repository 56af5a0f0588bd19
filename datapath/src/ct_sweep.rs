//! The conntrack sweep: removes entries that expired without a later packet (the datapath
//! removes an expired entry only when a packet of its flow comes back) and the entries of
//! endpoints that are gone, and releases them from their endpoint's quota (`common`,
//! CONNTRACK: live = `ct_opened - ct_closed - CT_RELEASED`). The table never evicts, so
//! without the sweep a pod's one-off flows would hold its quota for good.
//!
//! It runs on a thread of its own with handles of its own on the maps, and is the only writer
//! of CT_RELEASED. Deleting an expired entry races nothing: an entry expired by the sweep's
//! clock (CLOCK_MONOTONIC_COARSE, the datapath's `bpf_ktime_get_coarse_ns`) is expired for
//! every later packet too, which would remove it the same way.
use std::{
    collections::{BTreeMap, BTreeSet},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use aya::maps::{HashMap, Map, MapData};
use palisade_common::{CtEntry, CtKey, EndpointInfo, EndpointState, ct_expired, map_names};
use tracing::{debug, warn};

use crate::{
    error::{DatapathError, Result},
    loader::Datapath,
    writer::is_not_found,
};

/// How often the sweep runs. An expired entry holds its endpoint's quota at most this much
/// longer than its timeout.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// The datapath's clock: CLOCK_MONOTONIC at tick resolution (`bpf_ktime_get_coarse_ns`).
pub fn datapath_now_ns() -> u64 {
    crate::sys::clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

/// What one sweep did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SweepStats {
    /// Entries read.
    pub scanned: u64,
    /// Expired entries removed.
    pub expired: u64,
    /// Entries of endpoints that are gone, removed.
    pub orphaned: u64,
    /// Endpoints that are gone whose EP_STATE and CT_RELEASED entries were removed.
    pub endpoints_forgotten: u64,
}

pub struct Sweeper {
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    ep_state: HashMap<MapData, u32, EndpointState>,
    released: HashMap<MapData, u32, u64>,
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    /// What CT_RELEASED holds (this sweeper is its only writer).
    released_by: BTreeMap<u32, u64>,
}

impl Sweeper {
    /// Opens handles of its own on the maps it works on (call before the readers take the
    /// object's handles) and reads back what an earlier agent released.
    pub fn new(dp: &Datapath) -> Result<Sweeper> {
        fn open<K: aya::Pod, V: aya::Pod>(
            dp: &Datapath,
            name: &str,
        ) -> Result<HashMap<MapData, K, V>> {
            Map::from_map_data(dp.open_map(name)?)
                .and_then(HashMap::try_from)
                .map_err(DatapathError::map(name, "opening it for the sweep"))
        }
        let released: HashMap<MapData, u32, u64> = open(dp, map_names::CT_RELEASED)?;
        let mut released_by = BTreeMap::new();
        for item in released.iter() {
            let (id, n) = item.map_err(DatapathError::map(map_names::CT_RELEASED, "reading it"))?;
            released_by.insert(id, n);
        }
        Ok(Sweeper {
            conntrack: open(dp, map_names::CONNTRACK)?,
            ep_state: open(dp, map_names::EP_STATE)?,
            released,
            endpoints: open(dp, map_names::ENDPOINTS)?,
            released_by,
        })
    }

    fn endpoint_ids(&self) -> Result<BTreeSet<u32>> {
        let mut ids = BTreeSet::new();
        for item in self.endpoints.iter() {
            let (_, info) = item.map_err(DatapathError::map(map_names::ENDPOINTS, "reading it"))?;
            ids.insert(info.id);
        }
        Ok(ids)
    }

    /// One pass over the table as of `now_ns` (the datapath's clock; tests pass a later time
    /// to age every entry).
    pub fn sweep(&mut self, now_ns: u64) -> Result<SweepStats> {
        let mut stats = SweepStats::default();
        // Endpoint ids are not reused while they may have entries (`compile`): an entry's
        // endpoint was in ENDPOINTS when the entry was made. One missing from ENDPOINTS both
        // before and after the pass is gone; one added meanwhile is spared.
        let stated: Vec<u32> = self.ep_state.keys().filter_map(|k| k.ok()).collect();
        let before = self.endpoint_ids()?;
        let mut expired: Vec<CtKey> = Vec::new();
        let mut strays: Vec<CtKey> = Vec::new();
        let mut remaining: BTreeMap<u32, u64> = BTreeMap::new();
        // A key removed under the iteration restarts it from the first key: bound the pass.
        let limit = u64::from(palisade_common::capacity::CONNTRACK) * 2;
        for item in self.conntrack.iter() {
            let Ok((key, entry)) = item else { continue };
            stats.scanned += 1;
            if stats.scanned > limit {
                break;
            }
            *remaining.entry(key.endpoint).or_default() += 1;
            if ct_expired(key.proto, &entry, now_ns) {
                expired.push(key);
            } else if !before.contains(&key.endpoint) {
                strays.push(key);
            }
        }
        let after = self.endpoint_ids()?;
        let mut freed: BTreeMap<u32, u64> = BTreeMap::new();
        for key in &expired {
            // Still expired (a packet after the read would have found it expired too, but a
            // packet that passed just before it may have refreshed it).
            let still = self
                .conntrack
                .get(key, 0)
                .is_ok_and(|e| ct_expired(key.proto, &e, now_ns));
            if still && self.remove(key, &mut freed)? {
                stats.expired += 1;
            }
        }
        for key in strays.iter().filter(|k| !after.contains(&k.endpoint)) {
            if self.remove(key, &mut freed)? {
                stats.orphaned += 1;
            }
        }
        self.release(&freed)?;
        // Endpoints that are gone and hold no entry any more: their accounting goes too
        // (EP_STATE would otherwise fill up over the node's life).
        for id in stated {
            if before.contains(&id) || after.contains(&id) {
                continue;
            }
            let held = remaining.get(&id).copied().unwrap_or(0);
            if held > freed.get(&id).copied().unwrap_or(0) {
                continue;
            }
            match self.ep_state.remove(&id) {
                Ok(()) => stats.endpoints_forgotten += 1,
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(entry_error(map_names::EP_STATE, id, "removing", e)),
            }
            match self.released.remove(&id) {
                Ok(()) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(entry_error(map_names::CT_RELEASED, id, "removing", e)),
            }
            self.released_by.remove(&id);
        }
        Ok(stats)
    }

    /// Removes the entries of `keys` and releases them from their endpoints' quotas: how the
    /// fuzzer and the bench start flows afresh (removing entries any other way would leave
    /// them counted against the quota). Returns how many were removed.
    pub fn remove_flows(&mut self, keys: &[CtKey]) -> Result<u64> {
        let mut freed: BTreeMap<u32, u64> = BTreeMap::new();
        for key in keys {
            self.remove(key, &mut freed)?;
        }
        self.release(&freed)?;
        Ok(freed.values().sum())
    }

    /// `remove_flows` for every entry.
    pub fn clear(&mut self) -> Result<u64> {
        let keys: Vec<CtKey> = self.conntrack.keys().filter_map(|k| k.ok()).collect();
        self.remove_flows(&keys)
    }

    fn release(&mut self, freed: &BTreeMap<u32, u64>) -> Result<()> {
        for (id, n) in freed {
            let total = self.released_by.entry(*id).or_default();
            *total += n;
            self.released
                .insert(*id, *total, 0)
                .map_err(|e| entry_error(map_names::CT_RELEASED, *id, "writing", e))?;
        }
        Ok(())
    }

    /// Removes `key`, counting it in `freed` under its endpoint; true if this call removed it
    /// (the datapath may have been first).
    fn remove(&mut self, key: &CtKey, freed: &mut BTreeMap<u32, u64>) -> Result<bool> {
        match self.conntrack.remove(key) {
            Ok(()) => {
                *freed.entry(key.endpoint).or_default() += 1;
                Ok(true)
            }
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(entry_error(
                map_names::CONNTRACK,
                key.endpoint,
                "removing a flow",
                e,
            )),
        }
    }

    /// Sweeps every `interval` on a thread of its own until `stop` is dropped.
    pub fn spawn(mut self, interval: Duration) -> Result<SweepHandle> {
        let (tx, rx) = mpsc::channel::<()>();
        thread::Builder::new()
            .name("ct-sweep".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(interval) {
                    let started = Instant::now();
                    match self.sweep(datapath_now_ns()) {
                        Ok(s) => debug!(
                            scanned = s.scanned,
                            expired = s.expired,
                            orphaned = s.orphaned,
                            endpoints_forgotten = s.endpoints_forgotten,
                            ms = started.elapsed().as_millis() as u64,
                            "conntrack swept"
                        ),
                        Err(e) => warn!("conntrack sweep: {e}"),
                    }
                }
            })
            .map_err(DatapathError::Thread)?;
        Ok(SweepHandle { _stop: tx })
    }
}

fn entry_error(
    map: &'static str,
    endpoint: u32,
    doing: &'static str,
    cause: aya::maps::MapError,
) -> DatapathError {
    DatapathError::MapEntry {
        map,
        endpoint,
        doing,
        cause: Box::new(cause),
    }
}

/// Stops the sweep thread when dropped.
pub struct SweepHandle {
    _stop: mpsc::Sender<()>,
}
