//! Shared by the agent's tests that load the real eBPF object: the root check, the object, the
//! addresses and identities of the usual test endpoint, its state, packet builders and
//! BPF_PROG_TEST_RUN wrappers. Each test file includes it with `mod support;` (Cargo builds no
//! test target of its own from `tests/support/mod.rs`).
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::Command;

use aya::{
    maps::{MapData, PerCpuArray},
    programs::{TestRun, TestRunOptions},
};
use palisade_common::{
    AF_INET, CIDR_CLASS_BIT, CIDR_CLASS_NONE, CidrKey, Counter, CtEntry, CtKey, DIR_EGRESS,
    DIR_INGRESS, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, EndpointInfo, IDENTITY_HOST,
    POLICY_KEY_ANY_PORT_BITS, POLICY_KEY_ANY_PROTO_BITS, POLICY_KEY_FULL_BITS, PROTO_SCTP,
    PROTO_TCP, PROTO_UDP, PeerAddr, PolicyKey, PolicyValue, map_names,
};
use palisade_datapath::{
    loader::{Datapath, FROM_POD, LoadOptions, TO_POD},
    writer::MapWriter,
};
use palisade_policy::state::{CidrEntry, DesiredState, PolicyEntry};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

pub const SYN: u8 = 0x02;
pub const SYN_ACK: u8 = 0x12;
pub const ACK: u8 = 0x10;

/// The endpoint under test, the identity of its allowed peer, and their addresses.
pub const EP: u32 = 7;
pub const PEER_ID: u32 = 300;
pub const POD: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
pub const PEER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
/// A pod address with an identity of its own (or none) but no allow entry.
pub const OTHER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 12);
/// An address outside the cluster.
pub const EXTERNAL: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 7);

/// True as root. Otherwise the test is skipped (false), except under CI=true, where a missing
/// privilege is a failure, never a skip.
pub fn require_root() -> bool {
    root_or("skipping: needs root")
}

/// `require_root`, saying `not_root` when the test goes on without root (what it still checks).
pub fn root_or(not_root: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "this test needs root (BPF maps, bpffs, BPF_PROG_TEST_RUN); CI=true forbids skipping"
    );
    eprintln!("{not_root}");
    false
}

/// The eBPF object built by `cargo xtask build`.
pub fn object() -> Vec<u8> {
    let path = env!("PALISADE_EBPF_OBJ");
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}; run `cargo xtask build`"))
}

/// The datapath (maps sized by `opts`, nothing pinned) and a map writer for it.
pub fn load_with(opts: &LoadOptions) -> (Datapath, MapWriter) {
    let mut dp = Datapath::load_with(&object(), None, opts).expect("load datapath");
    let writer = MapWriter::new(&mut dp).expect("map writer");
    (dp, writer)
}

/// `load_with` at the real capacities.
pub fn load() -> (Datapath, MapWriter) {
    load_with(&LoadOptions::default())
}

/// Runs `prog` on `pkt` (BPF_PROG_TEST_RUN puts the skb on `lo`); the program's return value.
pub fn test_run(dp: &Datapath, prog: &str, pkt: &[u8]) -> u32 {
    run_with_ctx(dp, prog, pkt, None)
}

/// `test_run` with the skb on `ifindex` (`__sk_buff.ifindex`, through the context).
pub fn test_run_on(dp: &Datapath, prog: &str, ifindex: u32, pkt: &[u8]) -> u32 {
    let mut ctx = [0u8; 44];
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    run_with_ctx(dp, prog, pkt, Some(&ctx))
}

fn run_with_ctx(dp: &Datapath, prog: &str, pkt: &[u8], ctx: Option<&[u8]>) -> u32 {
    let mut out = vec![0u8; pkt.len() + 256];
    dp.program(prog)
        .test_run(TestRunOptions {
            data_in: Some(pkt),
            data_out: Some(&mut out),
            ctx_in: ctx,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("test run of {prog}: {e}"))
        .return_value
}

/// A `COUNTERS` slot summed over the CPUs.
pub fn counter(counters: &PerCpuArray<MapData, u64>, slot: u32) -> u64 {
    counters.get(&slot, 0).map(|v| v.iter().sum()).unwrap_or(0)
}

/// Moves this test's thread into a network namespace of its own with `pairs` veth pairs;
/// returns their ifindexes, ascending (test runs take the skb's device from them).
pub fn private_interfaces(pairs: usize) -> Vec<u32> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET)");
    let mut out = Vec::new();
    for i in 0..pairs {
        let (a, b) = (format!("tv{i}"), format!("tvp{i}"));
        let ok = Command::new("ip")
            .args(["link", "add", &a, "type", "veth", "peer", "name", &b])
            .status()
            .expect("ip link add")
            .success();
        assert!(ok, "ip link add {a}");
        for n in [a, b] {
            out.push(nix::net::if_::if_nametoindex(n.as_str()).expect("ifindex"));
        }
    }
    out.sort_unstable();
    out
}

pub fn peer_addr(ip: IpAddr) -> PeerAddr {
    match ip {
        IpAddr::V4(a) => PeerAddr::v4(a.octets()),
        IpAddr::V6(a) => PeerAddr::v6(a.octets()),
    }
}

/// The allow entry for TCP `port` (exactly) from `peer` to `endpoint` in direction `dir`.
pub fn allow_tcp_port(endpoint: u32, peer: u32, dir: u8, port: u16) -> PolicyEntry {
    PolicyEntry {
        key: PolicyKey {
            endpoint,
            peer,
            dir,
            proto: PROTO_TCP,
            port_be: port.to_be(),
            ..PolicyKey::default()
        },
        prefix_len: POLICY_KEY_FULL_BITS,
    }
}

/// EP (address POD) on `ifindex` with `flags`; PEER (identity PEER_ID) allowed in on each TCP
/// port of `ports`, rules 1, 2, ...
pub fn endpoint_state(
    ifindex: u32,
    flags: u32,
    ports: impl IntoIterator<Item = u16>,
) -> DesiredState {
    let mut s = DesiredState::default();
    s.endpoints.insert(
        ifindex,
        EndpointInfo {
            id: EP,
            flags,
            ..EndpointInfo::default()
        },
    );
    s.identities.insert(peer_addr(PEER.into()), PEER_ID);
    s.endpoint_addrs.insert(peer_addr(POD.into()), EP);
    for (i, port) in ports.into_iter().enumerate() {
        s.policy.insert(
            allow_tcp_port(EP, PEER_ID, DIR_INGRESS, port),
            PolicyValue {
                rule: 1 + i as u32,
                flags: 0,
                slot: 1 + i as u16,
                ..PolicyValue::default()
            },
        );
    }
    s
}

/// The CIDRS entry for `addr/prefix_len` (IPv4) in direction `dir` of `endpoint`.
pub fn cidr4(endpoint: u32, dir: u8, addr: [u8; 4], prefix_len: u32) -> CidrEntry {
    CidrEntry {
        key: CidrKey {
            endpoint,
            dir,
            family: AF_INET,
            addr: PeerAddr::v4(addr).addr,
            ..CidrKey::default()
        },
        prefix_len,
    }
}

/// The conntrack key of the TCP/IPv4 flow `src:sport -> dst:dport` of `endpoint`, seen in
/// direction `dir`.
pub fn tcp4_ct_key(
    endpoint: u32,
    dir: u8,
    (src, sport): (Ipv4Addr, u16),
    (dst, dport): (Ipv4Addr, u16),
) -> CtKey {
    CtKey::new(
        endpoint,
        dir,
        AF_INET,
        PROTO_TCP,
        (PeerAddr::v4(src.octets()).addr, sport),
        (PeerAddr::v4(dst.octets()).addr, dport),
        0,
    )
}

// ---- the usual endpoint ----

/// BPF_PROG_TEST_RUN puts the skb on `lo`.
pub const IFINDEX: u32 = 1;
pub const OTHER_IDENTITY: u32 = 301;

pub const NODE: Ipv4Addr = Ipv4Addr::new(10, 243, 0, 1);
pub const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x10);
pub const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0x11);

/// The datapath with `standard_state`-like contents, its counters and conntrack table.
pub struct Rig {
    pub dp: Datapath,
    pub writer: MapWriter,
    pub counters: PerCpuArray<MapData, u64>,
    pub conntrack: aya::maps::HashMap<MapData, CtKey, CtEntry>,
}

pub fn policy_entry(peer: u32, dir: u8, proto: u8, port: u16, prefix_len: u32) -> PolicyEntry {
    // Masked to the prefix, as the compiler does.
    PolicyEntry::new(
        PolicyKey {
            endpoint: EP,
            peer,
            dir,
            proto,
            port_be: port.to_be(),
            ..PolicyKey::default()
        },
        prefix_len,
    )
}

/// An endpoint on `lo`, isolated both ways, with a few allow entries:
/// - ingress from PEER_ID on TCP 80 (rule 1);
/// - ingress from PEER_ID on UDP, any port (rule 2);
/// - ingress from OTHER_IDENTITY on TCP 8000-8007 (an aligned block, rule 3);
/// - ingress from PEER6 (IPv6 peer identity) on TCP 443 (rule 4);
/// - egress to 192.0.2.0/24 except 192.0.2.128/25, any protocol (rule 5).
pub fn standard_state() -> DesiredState {
    // PEER's identity and the pod's own address (source address verification) come with it.
    let mut s = endpoint_state(IFINDEX, EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS, []);
    s.identities.insert(peer_addr(OTHER.into()), OTHER_IDENTITY);
    s.identities.insert(peer_addr(PEER6.into()), PEER_ID);
    s.identities.insert(peer_addr(NODE.into()), IDENTITY_HOST);
    s.endpoint_addrs.insert(peer_addr(POD6.into()), EP);
    let allow = |s: &mut DesiredState, e: PolicyEntry, rule: u32| {
        s.policy.insert(
            e,
            PolicyValue {
                rule,
                flags: 0,
                slot: rule as u16,
                ..PolicyValue::default()
            },
        );
    };
    allow(
        &mut s,
        policy_entry(PEER_ID, DIR_INGRESS, PROTO_TCP, 80, POLICY_KEY_FULL_BITS),
        1,
    );
    allow(
        &mut s,
        policy_entry(PEER_ID, DIR_INGRESS, PROTO_UDP, 0, POLICY_KEY_ANY_PORT_BITS),
        2,
    );
    allow(
        &mut s,
        policy_entry(
            OTHER_IDENTITY,
            DIR_INGRESS,
            PROTO_TCP,
            8000,
            POLICY_KEY_FULL_BITS - 3,
        ),
        3,
    );
    allow(
        &mut s,
        policy_entry(PEER_ID, DIR_INGRESS, PROTO_TCP, 443, POLICY_KEY_FULL_BITS),
        4,
    );
    let class = CIDR_CLASS_BIT | 1;
    let cidr = |addr: [u8; 4], len: u32| cidr4(EP, DIR_EGRESS, addr, len);
    s.cidrs.insert(cidr([192, 0, 2, 0], 24), class);
    s.cidrs.insert(cidr([192, 0, 2, 128], 25), CIDR_CLASS_NONE);
    allow(
        &mut s,
        policy_entry(class, DIR_EGRESS, 0, 0, POLICY_KEY_ANY_PROTO_BITS),
        5,
    );
    s
}

impl Rig {
    pub fn new(state: &DesiredState) -> Rig {
        let (mut dp, mut writer) = load();
        let stats = writer.apply(state);
        assert_eq!(stats.failed, 0);
        let counters = PerCpuArray::try_from(dp.take_map(map_names::COUNTERS).unwrap()).unwrap();
        let conntrack =
            aya::maps::HashMap::try_from(dp.take_map(map_names::CONNTRACK).unwrap()).unwrap();
        Rig {
            dp,
            writer,
            counters,
            conntrack,
        }
    }

    /// Verdict for traffic to the pod (its ingress).
    pub fn ingress(&self, pkt: &[u8]) -> u32 {
        test_run(&self.dp, TO_POD, pkt)
    }

    /// Verdict for traffic from the pod (its egress).
    pub fn egress(&self, pkt: &[u8]) -> u32 {
        test_run(&self.dp, FROM_POD, pkt)
    }

    pub fn counter(&self, c: Counter) -> u64 {
        counter(&self.counters, c as u32)
    }
}

// ---- packet builders -------------------------------------------------------------------------

/// An Ethernet header (addresses zero).
pub fn eth(ethertype: u16) -> Vec<u8> {
    let mut p = vec![0u8; 12];
    p.extend_from_slice(&ethertype.to_be_bytes());
    p
}

/// A bare L4 header: TCP (with `tcp_flags`), UDP, SCTP; eight zero bytes for anything else.
pub fn l4(proto: u8, sport: u16, dport: u16, tcp_flags: u8) -> Vec<u8> {
    match proto {
        PROTO_TCP => {
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&sport.to_be_bytes());
            t[2..4].copy_from_slice(&dport.to_be_bytes());
            t[12] = 0x50;
            t[13] = tcp_flags;
            t
        }
        PROTO_UDP => {
            let mut u = vec![0u8; 8];
            u[0..2].copy_from_slice(&sport.to_be_bytes());
            u[2..4].copy_from_slice(&dport.to_be_bytes());
            u[4..6].copy_from_slice(&8u16.to_be_bytes());
            u
        }
        PROTO_SCTP => {
            let mut s = vec![0u8; 12];
            s[0..2].copy_from_slice(&sport.to_be_bytes());
            s[2..4].copy_from_slice(&dport.to_be_bytes());
            s
        }
        _ => vec![0u8; 8],
    }
}

/// An IPv4 packet (in its Ethernet frame) carrying `payload`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    ipv4_fragment(src, dst, proto, payload, 0, 0)
}

/// `ipv4` with identification `id` and the flags and fragment offset field `frag`.
pub fn ipv4_fragment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    payload: &[u8],
    id: u16,
    frag: u16,
) -> Vec<u8> {
    let mut p = eth(0x0800);
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    ip[4..6].copy_from_slice(&id.to_be_bytes());
    ip[6..8].copy_from_slice(&frag.to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    p.extend(ip);
    p.extend_from_slice(payload);
    p
}

/// An IPv6 packet (in its Ethernet frame) with next header `next`, carrying `payload`.
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = eth(0x86dd);
    let mut ip = vec![0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    ip[6] = next;
    ip[7] = 64;
    ip[8..24].copy_from_slice(&src.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    p.extend(ip);
    p.extend_from_slice(payload);
    p
}

/// A TCP segment with `flags` and no payload, over IPv4.
pub fn tcp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    ipv4(src, dst, PROTO_TCP, &l4(PROTO_TCP, sport, dport, flags))
}

/// A private bpffs, unmounted on drop.
pub struct Bpffs(std::path::PathBuf);

impl Bpffs {
    pub fn new(tag: &str) -> Bpffs {
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

    pub fn pin_dir(&self) -> std::path::PathBuf {
        self.0.join("palisade")
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
