//! Upgrades: which pinned maps an object may adopt, and the layouts that decide it.
use std::{
    collections::BTreeMap,
    fs,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use crate::{
    error::{DatapathError, Result},
    sys,
};

pub use crate::sys::MapLayout;

/// The layout of the map pinned at `path`, if there is one.
pub fn pinned_map_layout(path: &Path) -> Option<MapLayout> {
    let fd = sys::obj_get(path).ok()?;
    sys::map_layout(&fd).ok()
}

/// The layouts the object defines, with capacity overrides (`LoadOptions::max_entries`).
pub fn object_map_layouts(
    object: &[u8],
    max_entries: &[(&str, u32)],
) -> Result<BTreeMap<String, MapLayout>> {
    let obj = aya_obj::Object::parse(object).map_err(|e| DatapathError::Object(e.to_string()))?;
    Ok(obj
        .maps
        .iter()
        .map(|(name, m)| {
            let max_entries = max_entries
                .iter()
                .find(|(n, _)| n == name)
                .map_or(m.max_entries(), |(_, v)| *v);
            (
                name.clone(),
                MapLayout {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries,
                    map_flags: m.map_flags(),
                },
            )
        })
        .collect())
}

/// Map types whose entries `load_with` copies into a replacement of another capacity (plain
/// and LRU hashes, LPM tries, arrays; not per-CPU maps or ring buffers).
pub(crate) const COPYABLE_MAP_TYPES: &[u32] = &[1, 2, 9, 11];

/// Whether entries of a map of type `old` keep their meaning in one of type `new`: the same
/// type, or a plain hash and an LRU hash (CONNTRACK was an LRU hash before it had quotas).
pub(crate) fn same_kind(old: u32, new: u32) -> bool {
    const HASH: u32 = 1;
    const LRU_HASH: u32 = 9;
    old == new || matches!((old, new), (HASH, LRU_HASH) | (LRU_HASH, HASH))
}

/// A pinned map set aside because its layout differs from the object's.
pub(crate) struct Replaced {
    pub(crate) name: String,
    pub(crate) path: PathBuf,
    /// Held until its entries are copied (the old programs hold it too, until swapped).
    pub(crate) old_fd: OwnedFd,
    pub(crate) old: MapLayout,
    pub(crate) new: MapLayout,
}

/// Removes the pins of maps whose layout differs from the object's (keeping a descriptor on
/// each, to copy from).
pub(crate) fn unpin_incompatible_maps(
    object: &[u8],
    map_paths: &[(&str, PathBuf)],
    max_entries: &[(&str, u32)],
) -> Result<Vec<Replaced>> {
    let want = object_map_layouts(object, max_entries)?;
    let mut out = Vec::new();
    for (name, path) in map_paths {
        let Some(want) = want.get(*name) else {
            continue;
        };
        let Ok(fd) = sys::obj_get(path) else {
            continue;
        };
        let Ok(have) = sys::map_layout(&fd) else {
            continue;
        };
        if layouts_compatible(&have, want) {
            continue;
        }
        fs::remove_file(path).map_err(DatapathError::io("removing incompatible map pin", path))?;
        out.push(Replaced {
            name: name.to_string(),
            path: path.clone(),
            old_fd: fd,
            old: have,
            new: *want,
        });
    }
    Ok(out)
}

/// The kernel may report flags it added itself (e.g. for a ring buffer's or an LRU's
/// defaults); key, value, type and capacity must match, and every flag the object asks for.
fn layouts_compatible(have: &MapLayout, want: &MapLayout) -> bool {
    have.map_type == want.map_type
        && have.key_size == want.key_size
        && have.value_size == want.value_size
        && have.max_entries == want.max_entries
        && have.map_flags & want.map_flags == want.map_flags
}
