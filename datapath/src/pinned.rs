//! The maps as another process finds them pinned: the CLI (`policy show`, `explain`) and the
//! CNI plugin open the agent's pins; the agent itself holds the object's handles.
use std::path::Path;

use aya::maps::{HashMap, Map, MapData, MapError};
use palisade_common::{CidrKey, EndpointInfo, PeerAddr, PolicyKey, PolicyValue, map_names};
use palisade_policy::state::{CidrEntry, DesiredState, PolicyEntry};

use crate::{
    error::{DatapathError, Result},
    pins::map_pin_path,
};

/// Map `name` pinned under `pin_dir`, as the map type `T` (`HashMap`, `PerCpuArray`, ...).
pub fn open<T: TryFrom<Map, Error = MapError>>(pin_dir: &Path, name: &str) -> Result<T> {
    let path = map_pin_path(pin_dir, name);
    MapData::from_pin(&path)
        .and_then(|data| T::try_from(Map::from_map_data(data)?))
        .map_err(|cause| DatapathError::Pinned {
            path,
            cause: Box::new(cause),
        })
}

/// The policy maps' entries (ENDPOINTS, IDENTITIES, CIDRS, POLICY), read from the pins under
/// `pin_dir`.
pub fn read_policy_maps(pin_dir: &Path) -> Result<DesiredState> {
    let mut state = DesiredState::default();
    read_policy_entries(
        &open(pin_dir, map_names::ENDPOINTS)?,
        &open(pin_dir, map_names::IDENTITIES)?,
        &open(pin_dir, map_names::CIDRS)?,
        &open(pin_dir, map_names::POLICY)?,
        &mut state,
    )?;
    // FQDN_IPS: the entries that admit new flows now (an older pin directory has none).
    if let Ok(ips) = open::<HashMap<MapData, palisade_common::FqdnKey, palisade_common::FqdnValue>>(
        pin_dir,
        map_names::FQDN_IPS,
    ) {
        let now = crate::dns::now_coarse_ns();
        for (k, v) in ips.iter().filter_map(|e| e.ok()) {
            if v.expires_ns > now {
                state.learned.insert((k.endpoint, k.peer()), v.class);
            }
        }
    }
    Ok(state)
}

/// Decodes the policy maps into `state`: what the CLI reads from the pins and what a new
/// `MapWriter` reads back from an earlier agent's maps.
pub(crate) fn read_policy_entries(
    endpoints: &HashMap<MapData, u32, EndpointInfo>,
    identities: &HashMap<MapData, PeerAddr, u32>,
    cidrs: &HashMap<MapData, CidrKey, u32>,
    policy: &HashMap<MapData, PolicyKey, PolicyValue>,
    state: &mut DesiredState,
) -> Result<()> {
    let reading = |map: &'static str| DatapathError::map(map, "reading it");
    for item in endpoints.iter() {
        let (ifindex, info) = item.map_err(reading(map_names::ENDPOINTS))?;
        state.endpoints.insert(ifindex, info);
    }
    for item in identities.iter() {
        let (addr, id) = item.map_err(reading(map_names::IDENTITIES))?;
        state.identities.insert(addr, id);
    }
    for item in cidrs.iter() {
        let (key, class) = item.map_err(reading(map_names::CIDRS))?;
        state.cidrs.insert(CidrEntry::from_map_key(key), class);
    }
    for item in policy.iter() {
        let (key, value) = item.map_err(reading(map_names::POLICY))?;
        state.policy.insert(PolicyEntry::from_map_key(key), value);
    }
    Ok(())
}
