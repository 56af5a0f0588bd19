//! Upgrades against pinned state (root): a pinned map whose layout differs from the datapath's
//! is replaced, never adopted; when only its capacity changed its entries are carried over;
//! maps that match are adopted with their contents; a plain restart replaces nothing.
mod support;

use std::net::Ipv4Addr;
use std::path::Path;

use aya::maps::{HashMap, MapData};
use palisade_common::{CtEntry, CtKey, DIR_EGRESS, EP_ISOLATED_INGRESS, EndpointInfo, map_names};
use palisade_datapath::writer::MapWriter;
use palisade_datapath::{
    loader::{Datapath, LoadOptions},
    pins::map_pin_path,
    upgrade::{object_map_layouts, pinned_map_layout},
};
use palisade_policy::state::DesiredState;
use support::{Bpffs, object, require_root, tcp4_ct_key};

/// The flow both generations of an upgrade must know: endpoint 3's egress TCP connection.
fn tracked_flow() -> CtKey {
    tcp4_ct_key(
        3,
        DIR_EGRESS,
        (Ipv4Addr::new(10, 0, 0, 1), 40000),
        (Ipv4Addr::new(10, 0, 0, 2), 80),
    )
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

    // Generation 2, CT_FLOWS at its real capacity: a new map with the flow in it; the other
    // maps adopted with their contents.
    let mut dp = Datapath::load(&obj, Some(&pins)).unwrap();
    let report = dp.replaced_maps().join("\n");
    assert!(
        report.contains(map_names::CONNTRACK) && report.contains("1 entries copied"),
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

/// Datapaths before CT_FLOWS tracked flows in CONNTRACK, a key per direction (an LRU hash
/// before conntrack had quotas). The new datapath translates its flows, keyed from the pod's
/// side: the reply of an established flow still passes where ingress policy alone would drop it.
#[test]
fn a_legacy_conntrack_is_translated_and_its_replies_still_pass() {
    if !require_root() {
        return;
    }
    let fs = Bpffs::new("upgrade-legacy-ct");
    let pins = fs.pin_dir();
    let obj = object();
    let legacy_pin = map_pin_path(&pins, map_names::LEGACY_CONNTRACK);
    let (pod, peer) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
    for lru in [true, false] {
        // CONNTRACK as the old datapath left it: endpoint 3's egress flow pod:40000 -> peer:80.
        pin_foreign_map_of_type(&legacy_pin, if lru { 9 } else { 1 }, 44, 48, 4096);
        let mut key = [0u8; 44];
        key[0..4].copy_from_slice(&3u32.to_ne_bytes());
        key[4..8].copy_from_slice(&pod.octets());
        key[20..24].copy_from_slice(&peer.octets());
        key[36..38].copy_from_slice(&40000u16.to_ne_bytes());
        key[38..40].copy_from_slice(&80u16.to_ne_bytes());
        key[40] = palisade_common::PROTO_TCP;
        key[41] = DIR_EGRESS;
        key[42] = palisade_common::AF_INET;
        let mut value = [0u8; 48];
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec it is given.
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
        let now = ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64;
        value[0..8].copy_from_slice(&now.to_ne_bytes()); // created
        value[8..16].copy_from_slice(&now.to_ne_bytes()); // last seen
        value[16..24].copy_from_slice(&9u64.to_ne_bytes()); // packets
        value[40..44].copy_from_slice(&palisade_common::CT_FLAG_REPLIED.to_ne_bytes());
        {
            let old = aya::maps::Map::from_map_data(MapData::from_pin(&legacy_pin).unwrap());
            let mut old: HashMap<MapData, [u8; 44], [u8; 48]> =
                HashMap::try_from(old.unwrap()).unwrap();
            old.insert(key, value, 0).unwrap();
        }
        let mut dp = Datapath::load(&obj, Some(&pins)).unwrap();
        let report = dp.replaced_maps().join("\n");
        assert!(
            report.contains("CONNTRACK") && report.contains("1 flows translated"),
            "{report}"
        );
        assert!(!legacy_pin.exists(), "the legacy pin is gone");
        // Endpoint 3 on lo, isolated for ingress with no rule: only conntrack admits the reply.
        let mut w = MapWriter::new(&mut dp).unwrap();
        let mut desired = DesiredState::default();
        desired.endpoints.insert(
            support::IFINDEX,
            EndpointInfo {
                id: 3,
                flags: EP_ISOLATED_INGRESS,
                ..Default::default()
            },
        );
        assert_eq!(w.apply(&desired).failed, 0);
        {
            let ct: HashMap<&MapData, CtKey, CtEntry> =
                HashMap::try_from(dp.map(map_names::CONNTRACK).unwrap()).unwrap();
            let e = ct
                .get(&tracked_flow(), 0)
                .expect("the flow, keyed from the pod's side");
            assert_eq!((e.packets, e.dir), (9, DIR_EGRESS));
        }
        let reply = support::tcp4(peer, pod, 80, 40000, support::ACK);
        assert_eq!(
            support::test_run(&dp, palisade_datapath::loader::TO_POD, &reply),
            support::TC_ACT_OK,
            "the reply of a translated flow (lru: {lru})"
        );
        let unknown = support::tcp4(peer, pod, 80, 40001, support::ACK);
        assert_eq!(
            support::test_run(&dp, palisade_datapath::loader::TO_POD, &unknown),
            support::TC_ACT_SHOT,
            "a packet of no flow"
        );
        assert!(
            dp.finish_upgrade()
                .iter()
                .any(|l| l.contains("0 more flows"))
        );
        drop(w);
        drop(dp);
        let _ = std::fs::remove_dir_all(&pins);
    }
}
