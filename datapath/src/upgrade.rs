//! Upgrades: which pinned maps an object may adopt, and the layouts that decide it.
use std::{
    collections::BTreeMap,
    fs,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use palisade_common::{CtEntry, CtKey, map_names};

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

/// The key of `CONNTRACK`, the conntrack map of datapaths before `CT_FLOWS`: a flow in the
/// direction it was first seen in (its replies were found by swapping the tuple). Its value
/// was today's `CtEntry` with the direction's bytes zero.
#[repr(C)]
#[derive(Clone, Copy)]
struct LegacyCtKey {
    endpoint: u32,
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    proto: u8,
    dir: u8,
    family: u8,
    role: u8,
}

/// A legacy `CONNTRACK` map found among the pins: its pin is removed at once (no datapath
/// reads it again once the links are swapped), its descriptor kept to translate from.
pub(crate) struct LegacyConntrack {
    pub(crate) old_fd: OwnedFd,
    pub(crate) layout: MapLayout,
}

impl LegacyConntrack {
    /// Unpins `maps_dir`'s legacy `CONNTRACK`, if there is one.
    pub(crate) fn unpin(maps_dir: &Path) -> Result<Option<LegacyConntrack>> {
        let path = maps_dir.join(map_names::LEGACY_CONNTRACK);
        let Ok(old_fd) = sys::obj_get(&path) else {
            return Ok(None);
        };
        let layout =
            sys::map_layout(&old_fd).map_err(DatapathError::io("reading the layout of", &path))?;
        fs::remove_file(&path).map_err(DatapathError::io("removing the legacy pin", &path))?;
        Ok(Some(LegacyConntrack { old_fd, layout }))
    }

    /// Whether its entries can be read as `LegacyCtKey` and `CtEntry`.
    pub(crate) fn translatable(&self) -> bool {
        self.layout.key_size as usize == size_of::<LegacyCtKey>()
            && self.layout.value_size as usize == size_of::<CtEntry>()
            && size_of::<LegacyCtKey>() == size_of::<CtKey>()
    }

    /// Copies its flows into `to` (a `CT_FLOWS`), each keyed from the pod's side with its
    /// direction in its entry; at most `limit`, and with `only_new` none over an entry the new
    /// programs wrote. Returns how many were copied.
    pub(crate) fn translate_into(
        &self,
        to: &OwnedFd,
        limit: u32,
        only_new: bool,
    ) -> std::io::Result<u32> {
        sys::copy_entries_with(&self.old_fd, to, &self.layout, limit, only_new, |k, v| {
            // SAFETY: `translatable`: the buffers have exactly these types' sizes, and both
            // are plain data.
            let old: LegacyCtKey = unsafe { std::ptr::read_unaligned(k.as_ptr().cast()) };
            let mut entry: CtEntry = unsafe { std::ptr::read_unaligned(v.as_ptr().cast()) };
            let key = CtKey::new(
                old.endpoint,
                old.dir,
                old.family,
                old.proto,
                (old.src, old.sport),
                (old.dst, old.dport),
                old.role,
            );
            entry.dir = old.dir;
            entry._pad = 0;
            entry.slot = 0;
            unsafe {
                std::ptr::write_unaligned(k.as_mut_ptr().cast(), key);
                std::ptr::write_unaligned(v.as_mut_ptr().cast(), entry);
            }
        })
    }
}
