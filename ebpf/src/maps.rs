//! Every map of the datapath. Keys and values come from `palisade_common`; ARCHITECTURE.md
//! documents each one.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use palisade_common::{
    COUNTER_SLOTS, CT_QUOTA_DEFAULT, CidrKey, CtEntry, CtKey, EVENT_BURST, EgwCtl, EgwDest,
    EgwDestKey, EgwFlow, EgwGroup, EndpointInfo, EndpointSlot, EndpointState, FqdnKey, FqdnValue,
    FragKey, FragPorts, NodePortKey, NodePortTarget, PeerAddr, PolicyKey, PolicyValue,
    PrefixLengths, PrefixLengthsKey, RuleStats, capacity,
};

use crate::packet::Packet;

/// Host-side ifindex -> endpoint, every endpoint. Written by the agent (the CNI plugin writes
/// provisional entries).
#[map]
pub static ENDPOINTS: HashMap<u32, EndpointInfo> =
    HashMap::with_max_entries(capacity::ENDPOINTS, 0);

/// `endpoint_slot(ifindex)` -> an endpoint's entry tagged with its ifindex: ENDPOINTS without
/// the hash, for the endpoint the slot's tag names (`common`, ENDPOINT_SLOTS). Written by the
/// agent.
#[map]
pub static ENDPOINT_SLOTS: Array<EndpointSlot> = Array::with_max_entries(capacity::ENDPOINTS, 0);

/// Exact pod and node addresses -> identity.
#[map]
pub static IDENTITIES: HashMap<PeerAddr, u32> = HashMap::with_max_entries(capacity::IDENTITIES, 0);

/// CIDRS and POLICY allocate an element when the agent writes it: they are sized for the
/// largest policies and mostly empty, and preallocated they would hold ~60 MiB of kernel
/// memory for nothing. Lookups cost the same; only the agent's writes allocate.
const BPF_F_NO_PREALLOC: u32 = 1;

/// (endpoint, direction, ipBlock prefix and its length) -> CIDR class.
#[map]
pub static CIDRS: HashMap<CidrKey, u32> =
    HashMap::with_max_entries(capacity::CIDRS, BPF_F_NO_PREALLOC);

/// (endpoint, peer, direction, protocol, port prefix and its length) -> allowing rule.
#[map]
pub static POLICY: HashMap<PolicyKey, PolicyValue> =
    HashMap::with_max_entries(capacity::POLICY, BPF_F_NO_PREALLOC);

/// (endpoint, direction) -> the prefix lengths its CIDRS and POLICY entries use: the probes a
/// longest-prefix match makes. Written by the agent only.
#[map]
pub static PREFIX_LENGTHS: HashMap<PrefixLengthsKey, PrefixLengths> =
    HashMap::with_max_entries(capacity::PREFIX_LENGTHS, 0);

/// Scratch space for the packet being judged (one per CPU): keeps the parsed packet off the
/// 512-byte BPF stack.
#[map]
pub static SCRATCH: PerCpuArray<Packet> = PerCpuArray::with_max_entries(1, 0);

/// The POLICY entries a new flow's verdict combines (its peer's identity's, its peer's CIDR
/// class's, its learned domain class's), copied here (one set per CPU): off the stack, and
/// whether a lookup hit or missed leaves no trace in the verifier's state (paths that would
/// double at every later branch).
#[map]
pub static MATCH_SCRATCH: PerCpuArray<[PolicyValue; 3]> = PerCpuArray::with_max_entries(1, 0);

/// (endpoint, address) -> the domain class its DNS answers gave the address, and until when
/// (`common`, FQDN egress). Written by the agent only.
#[map]
pub static FQDN_IPS: HashMap<FqdnKey, FqdnValue> =
    HashMap::with_max_entries(capacity::FQDN_IPS, BPF_F_NO_PREALLOC);

/// The DNS servers whose answers teach: addresses as the pods see them (a Service's ClusterIP,
/// a node-local cache, configured ones). Written by the agent only.
#[map]
pub static DNS_SERVERS: HashMap<PeerAddr, u8> = HashMap::with_max_entries(capacity::DNS_SERVERS, 0);

/// DNS answers for the agent (`common`, DnsAnswerRecord).
#[map]
pub static DNS_ANSWERS: RingBuf = RingBuf::with_byte_size(capacity::DNS_ANSWERS_BYTES, 0);

/// [0]: the agent's heartbeat (coarse monotonic ns); answers are held only while it is fresh.
#[map]
pub static FQDN_CTL: Array<u64> = Array::with_max_entries(1, 0);

/// The judged packet's endpoint entry, copied once per packet (one per CPU): a snapshot the
/// whole verdict reads, which a concurrent update of ENDPOINTS cannot change, and off the
/// 512-byte BPF stack.
#[map]
pub static EP_SCRATCH: PerCpuArray<EndpointInfo> = PerCpuArray::with_max_entries(1, 0);

/// Tracked flows, keyed from the pod's side: a plain hash, so no flow is ever evicted for
/// another (`common`, CT_FLOWS).
#[map]
pub static CT_FLOWS: HashMap<CtKey, CtEntry> = HashMap::with_max_entries(capacity::CONNTRACK, 0);

/// Endpoint id -> conntrack entries the agent's sweep removed. Written by the agent only.
#[map]
pub static CT_RELEASED: HashMap<u32, u64> = HashMap::with_max_entries(capacity::ENDPOINTS, 0);

/// Live conntrack entries per endpoint; the agent sets it at load time.
#[unsafe(no_mangle)]
pub static CT_QUOTA: u32 = CT_QUOTA_DEFAULT;

#[map]
pub static FRAGMENTS: LruHashMap<FragKey, FragPorts> =
    LruHashMap::with_max_entries(capacity::FRAGMENTS, 0);

#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::EVENTS_BYTES, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Endpoint id -> datapath-owned state (event rate limiter, conntrack accounting). Written by
/// the datapath only; the agent's sweep removes the entries of endpoints that are gone.
#[map]
pub static EP_STATE: HashMap<u32, EndpointState> =
    HashMap::with_max_entries(capacity::ENDPOINTS, 0);

/// A rule's stats slot -> packets and bytes it let through (per CPU). Written by the datapath;
/// the agent reads it and zeroes the slots of rules that are gone.
#[map]
pub static RULE_STATS: PerCpuArray<RuleStats> =
    PerCpuArray::with_max_entries(capacity::RULE_STATS, 0);

/// Addresses of this node's endpoints -> endpoint id: source address verification and self
/// traffic. Written by the agent only.
#[map]
pub static EP_ADDRS: HashMap<PeerAddr, u32> = HashMap::with_max_entries(capacity::EP_ADDRS, 0);

/// What the node DNATs onward: a NodePort or hostPort -> the address and port a pod's flow to
/// it is judged as going to (`common`, NODE_PORTS).
#[map]
pub static NODE_PORTS: HashMap<NodePortKey, NodePortTarget> =
    HashMap::with_max_entries(capacity::NODE_PORTS, 0);

/// The endpoint's EP_STATE entry, created (with a full event bucket) if it has none yet. Never
/// overwrites one another CPU created meanwhile: its counters would be lost.
#[inline(always)]
pub fn endpoint_state(endpoint: u32, now: u64) -> Option<*mut EndpointState> {
    if let Some(s) = EP_STATE.get_ptr_mut(endpoint) {
        return Some(s);
    }
    let fresh = EndpointState {
        tokens: EVENT_BURST,
        last_refill_ns: now,
        ..EndpointState::default()
    };
    const BPF_NOEXIST: u64 = 1;
    let _ = EP_STATE.insert(endpoint, fresh, BPF_NOEXIST);
    EP_STATE.get_ptr_mut(endpoint)
}

/// [0]: egress gateways programmed, and the tunnel devices (`common`, Egress gateways).
/// Written by the agent only.
#[map]
pub static EGW_CTL: Array<EgwCtl> = Array::with_max_entries(1, 0);

/// (endpoint, destination prefix) -> the EgressGateway group that steers it, or an exclusion.
/// Written by the agent only.
#[map]
pub static EGW_DESTS: LpmTrie<EgwDestKey, EgwDest> =
    LpmTrie::with_max_entries(capacity::EGW_DESTS, BPF_F_NO_PREALLOC);

/// Group id -> its healthy gateways. Written by the agent only (as gateways come and go).
#[map]
pub static EGW_GROUPS: HashMap<u32, EgwGroup> = HashMap::with_max_entries(capacity::EGW_GROUPS, 0);

/// Flow (`CtKey`) -> the gateway it goes through, so that it sticks to it. Written by the
/// datapath; the agent reads it to record the flows and removes the entries of ended ones.
#[map]
pub static EGW_FLOWS: LruHashMap<CtKey, EgwFlow> =
    LruHashMap::with_max_entries(capacity::EGW_FLOWS, 0);

/// `egress::steer`'s working space (one per CPU): keeps its keys off the BPF stack, which
/// `from_pod`'s frame mostly takes.
pub struct EgwScratch {
    pub key: CtKey,
    pub lpm: aya_ebpf::maps::lpm_trie::Key<EgwDestKey>,
    pub flow: EgwFlow,
    pub tk: aya_ebpf::bindings::bpf_tunnel_key,
}

#[map]
pub static EGW_SCRATCH: PerCpuArray<EgwScratch> = PerCpuArray::with_max_entries(1, 0);
