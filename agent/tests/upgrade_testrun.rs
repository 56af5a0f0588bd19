//! Upgrades against pinned state (root): a pinned map whose layout differs from the datapath's
//! is replaced, never adopted; when only its capacity changed its entries are carried over;
//! maps that match are adopted with their contents; a plain restart replaces nothing.
mod support;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use aya::maps::{HashMap, MapData};
use palisade_common::{CtEntry, CtKey, DIR_EGRESS, EP_ISOLATED_INGRESS, EndpointInfo, map_names};
use palisade_datapath::writer::MapWriter;
use palisade_datapath::{
    loader::{Datapath, LoadOptions},
    pins::map_pin_path,
    upgrade::{object_map_layouts, pinned_map_layout},
};
use palisade_policy::state::DesiredState;
use support::{object, require_root, tcp4_ct_key};

/// The flow both generations of an upgrade must know: endpoint 3's egress TCP connection.
fn tracked_flow() -> CtKey {
    tcp4_ct_key(
        3,
        DIR_EGRESS,
        (Ipv4Addr::new(10, 0, 0, 1), 40000),
        (Ipv4Addr::new(10, 0, 0, 2), 80),
    )
}

/// A private bpffs, unmounted on drop.
struct Bpffs(PathBuf);

impl Bpffs {
    fn new(tag: &str) -> Bpffs {
        let p = std::env::temp_dir().join(format!("palisade-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        nix::mount::mount(
            Some("bpf"),
            &p,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        Bpffs(p)
    }

    fn pin_dir(&self) -> PathBuf {
        self.0.join("palisade")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Creates and pins a hash map of the given layout (what an older datapath left behind).
fn pin_foreign_map(path: &Path, key_size: u32, value_size: u32, max_entries: u32) {
    pin_foreign_map_of_type(path, 1, key_size, value_size, max_entries)
}

/// `pin_foreign_map` of BPF map type `map_type` (1 hash, 9 LRU hash).
fn pin_foreign_map_of_type(
    path: &Path,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
) {
    #[repr(C)]
    struct Create {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
        rest: [u32; 27],
    }
    let mut attr = Create {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags: 0,
        rest: [0; 27],
    };
    // SAFETY: BPF_MAP_CREATE (0) with a valid attr.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            &mut attr as *mut Create,
            std::mem::size_of::<Create>(),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    let mut pin = [0u64; 3];
    pin[0] = c.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: BPF_OBJ_PIN (6).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            6,
            pin.as_mut_ptr(),
            std::mem::size_of_val(&pin),
        )
    };
    assert_eq!(r, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    unsafe { libc::close(fd as i32) };
}

#[test]
fn a_changed_layout_is_replaced_never_adopted() {
    if !require_root() {
        return;
    }
    let fs = Bpffs::new("upgrade-layout");
    let pins = fs.pin_dir();
    let obj = object();
    let want = object_map_layouts(&obj, &LoadOptions::default().max_entries).unwrap();
    // An EP_STATE of another shape (value 8 bytes instead of 24) left by "an older version".
    let ep_state = map_pin_path(&pins, map_names::EP_STATE);
    pin_foreign_map(&ep_state, 4, 8, 16);
    let dp = Datapath::load(&obj, Some(&pins)).expect("loads despite the foreign map");
    let report = dp.replaced_maps().join("\n");
    assert!(
        report.contains("EP_STATE") && report.contains("starts empty"),
        "{report}"
    );
    assert_eq!(
        pinned_map_layout(&ep_state),
        Some(want[map_names::EP_STATE]),
        "the pin now holds the datapath's own layout"
    );
    drop(dp);
    // A restart with nothing changed replaces nothing.
    let dp = Datapath::load(&obj, Some(&pins)).unwrap();
    assert!(dp.replaced_maps().is_empty(), "{:?}", dp.replaced_maps());
}

#[test]
fn a_capacity_change_carries_entries_over() {
    if !require_root() {
        return;
    }
    let fs = Bpffs::new("upgrade-capacity");
    let pins = fs.pin_dir();
    let obj = object();
    let small = LoadOptions {
        max_entries: vec![(map_names::CONNTRACK, 1024)],
        ..Default::default()
    };
    // Generation 1: an endpoint and a tracked flow.
    let mut dp = Datapath::load_with(&obj, Some(&pins), &small).unwrap();
    let mut w = MapWriter::new(&mut dp).unwrap();
    let mut desired = DesiredState::default();
    desired.endpoints.insert(
        7,
        EndpointInfo {
            id: 3,
            flags: EP_ISOLATED_INGRESS,
            ..Default::default()
        },
    );
    assert_eq!(w.apply(&desired).failed, 0);
    let key = tracked_flow();
    let entry = CtEntry {
        packets: 5,
        revision: 1,
        ..Default::default()
    };
    {
        let mut ct: HashMap<MapData, CtKey, CtEntry> =
            HashMap::try_from(dp.take_map(map_names::CONNTRACK).unwrap()).unwrap();
        ct.insert(key, entry, 0).unwrap();
    }
    drop(w);
    drop(dp);

    // Generation 2, CONNTRACK at its real capacity: a new map with the flow in it; the other
    // maps adopted with their contents.
    let mut dp = Datapath::load(&obj, Some(&pins)).unwrap();
    let report = dp.replaced_maps().join("\n");
    assert!(
        report.contains("CONNTRACK") && report.contains("1 entries copied"),
        "{report}"
    );
    assert_eq!(dp.replaced_maps().len(), 1, "{report}");
    let ct_pin = map_pin_path(&pins, map_names::CONNTRACK);
    assert_eq!(
        pinned_map_layout(&ct_pin).unwrap().max_entries,
        palisade_common::capacity::CONNTRACK
    );
    let w = MapWriter::new(&mut dp).unwrap();
    assert_eq!(
        w.applied().endpoints.get(&7).map(|e| e.id),
        Some(3),
        "ENDPOINTS adopted"
    );
    let ct: HashMap<MapData, CtKey, CtEntry> =
        HashMap::try_from(dp.take_map(map_names::CONNTRACK).unwrap()).unwrap();
    assert_eq!(ct.get(&key, 0).unwrap().packets, 5, "the flow carried over");
    assert!(dp.finish_upgrade().iter().all(|l| l.contains("0 more")));
}

/// Before conntrack had quotas, CONNTRACK was an LRU hash. The new datapath's plain hash
/// replaces it and takes its entries: established flows keep their replies across the upgrade.
#[test]
fn an_lru_conntrack_of_an_older_agent_is_carried_into_the_hash() {
    if !require_root() {
        return;
    }
    let fs = Bpffs::new("upgrade-lru");
    let pins = fs.pin_dir();
    let obj = object();
    let ct_pin = map_pin_path(&pins, map_names::CONNTRACK);
    let (key_size, value_size) = (
        std::mem::size_of::<CtKey>() as u32,
        std::mem::size_of::<CtEntry>() as u32,
    );
    pin_foreign_map_of_type(&ct_pin, 9, key_size, value_size, 4096);
    let key = tracked_flow();
    {
        let old = aya::maps::Map::from_map_data(MapData::from_pin(&ct_pin).unwrap()).unwrap();
        let mut old: aya::maps::HashMap<MapData, CtKey, CtEntry> =
            aya::maps::HashMap::try_from(old).unwrap();
        let entry = CtEntry {
            packets: 9,
            ..Default::default()
        };
        old.insert(key, entry, 0).unwrap();
    }
    let mut dp = Datapath::load(&obj, Some(&pins)).unwrap();
    let report = dp.replaced_maps().join("\n");
    assert!(
        report.contains("CONNTRACK") && report.contains("1 entries copied"),
        "{report}"
    );
    assert_eq!(
        pinned_map_layout(&ct_pin).unwrap().map_type,
        1,
        "a plain hash now"
    );
    let ct: HashMap<MapData, CtKey, CtEntry> =
        HashMap::try_from(dp.take_map(map_names::CONNTRACK).unwrap()).unwrap();
    assert_eq!(ct.get(&key, 0).unwrap().packets, 9, "the flow carried over");
}
