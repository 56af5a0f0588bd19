//! Map keys and values shared by the eBPF datapath and the agent.
//!
//! Every type here is `#[repr(C)]`, has no implicit padding (padding is spelled out as
//! `_pad` fields that are always zero, because the kernel hashes and compares raw bytes) and is
//! used unchanged on both sides. The `user` feature implements `aya::Pod` for them.
#![no_std]

/// Traffic towards the pod (the pod's ingress). Attached at the host-side veth's TC egress.
pub const DIR_INGRESS: u8 = 0;
/// Traffic from the pod (the pod's egress). Attached at the host-side veth's TC ingress.
pub const DIR_EGRESS: u8 = 1;
/// Set on the direction of CIDRS, POLICY and PREFIX_LENGTHS keys of an endpoint's **audit
/// view**: its policy as it would be if the ClusterNetworkPolicies in audit mode were enforced
/// (`EP_TIER_AUDIT_*`). Only new flows the enforced policy allows are judged again against it,
/// to record what it would drop.
pub const DIR_AUDIT_VIEW: u8 = 0x80;

pub const AF_INET: u8 = 4;
pub const AF_INET6: u8 = 6;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
pub const PROTO_SCTP: u8 = 132;

// ---------------------------------------------------------------------------------------------
// ENDPOINTS: HashMap<u32 (host-side ifindex), EndpointInfo>
// ---------------------------------------------------------------------------------------------

/// The pod is isolated for ingress: traffic to it needs an allow entry.
pub const EP_ISOLATED_INGRESS: u32 = 1 << 0;
/// The pod is isolated for egress: traffic from it needs an allow entry.
pub const EP_ISOLATED_EGRESS: u32 = 1 << 1;
/// The endpoint's policy is not compiled yet: drop everything (fail closed).
pub const EP_PENDING: u32 = 1 << 2;
/// Ingress is audited: a denial is recorded as "would drop" (`VERDICT_AUDIT`) and the packet
/// passes. Set only where the endpoint is isolated for ingress by audit policies alone (see
/// ARCHITECTURE.md, "Audit mode").
pub const EP_AUDIT_INGRESS: u32 = 1 << 3;
/// As `EP_AUDIT_INGRESS`, for egress.
pub const EP_AUDIT_EGRESS: u32 = 1 << 4;
/// Both directions audited.
pub const EP_AUDIT: u32 = EP_AUDIT_INGRESS | EP_AUDIT_EGRESS;
/// The endpoint has own addresses beyond those inline in its entry: look them up in EP_ADDRS.
pub const EP_MORE_ADDRS: u32 = 1 << 5;
/// ClusterNetworkPolicy rules apply to the pod's ingress: its new flows are evaluated (Admin
/// tier, NetworkPolicy if isolated, Baseline tier, default allow) even where no NetworkPolicy
/// isolates it.
pub const EP_TIERED_INGRESS: u32 = 1 << 6;
/// As `EP_TIERED_INGRESS`, for egress.
pub const EP_TIERED_EGRESS: u32 = 1 << 7;
/// Either direction tiered.
pub const EP_TIERED: u32 = EP_TIERED_INGRESS | EP_TIERED_EGRESS;
/// ClusterNetworkPolicies in audit mode select the pod for ingress: the endpoint has an audit
/// view (`DIR_AUDIT_VIEW`), and a new flow it would drop is recorded as "would drop".
pub const EP_TIER_AUDIT_INGRESS: u32 = 1 << 8;
/// As `EP_TIER_AUDIT_INGRESS`, for egress.
pub const EP_TIER_AUDIT_EGRESS: u32 = 1 << 9;
/// ClusterNetworkPolicy `domainNames` peers apply to the endpoint's egress: its DNS answers
/// from trusted servers are held until their addresses are learned (FQDN_IPS), and its new
/// egress flows also look their peer up there.
pub const EP_FQDN: u32 = 1 << 10;

#[inline(always)]
pub const fn isolated_flag(dir: u8) -> u32 {
    if dir == DIR_INGRESS {
        EP_ISOLATED_INGRESS
    } else {
        EP_ISOLATED_EGRESS
    }
}

#[inline(always)]
pub const fn tiered_flag(dir: u8) -> u32 {
    if dir == DIR_INGRESS {
        EP_TIERED_INGRESS
    } else {
        EP_TIERED_EGRESS
    }
}

#[inline(always)]
pub const fn tier_audit_flag(dir: u8) -> u32 {
    if dir == DIR_INGRESS {
        EP_TIER_AUDIT_INGRESS
    } else {
        EP_TIER_AUDIT_EGRESS
    }
}

#[inline(always)]
pub const fn audit_flag(dir: u8) -> u32 {
    if dir == DIR_INGRESS {
        EP_AUDIT_INGRESS
    } else {
        EP_AUDIT_EGRESS
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointInfo {
    /// Endpoint id used in POLICY and CIDRS keys; stable for the life of the pod.
    pub id: u32,
    /// `EP_*` flags.
    pub flags: u32,
    /// Bumped whenever the endpoint's compiled policy changes. Conntrack entries created under
    /// an older revision are re-checked against the current policy on their next packet, so a
    /// revoked allow takes effect on established flows too.
    pub revision: u32,
    /// How many of `ipv4` (0 or 1) and `ipv6` (0 to 2) hold the endpoint's own addresses.
    pub n_ipv4: u8,
    pub n_ipv6: u8,
    pub _pad: [u8; 2],
    /// The endpoint's own addresses (those EP_ADDRS gives to its id), inline so that source
    /// address verification costs compares, not a lookup; a pod with more sets
    /// `EP_MORE_ADDRS` and the rest are found in EP_ADDRS only.
    pub ipv4: [u8; 4],
    pub ipv6: [[u8; 16]; 2],
}

impl EndpointInfo {
    /// Adds `addr` to the inline addresses, or sets `EP_MORE_ADDRS` when they are full.
    pub fn add_own_address(&mut self, addr: &PeerAddr) {
        if addr.family == AF_INET && self.n_ipv4 == 0 {
            self.ipv4.copy_from_slice(&addr.addr[..4]);
            self.n_ipv4 = 1;
        } else if addr.family == AF_INET6 && (self.n_ipv6 as usize) < self.ipv6.len() {
            self.ipv6[self.n_ipv6 as usize] = addr.addr;
            self.n_ipv6 += 1;
        } else {
            self.flags |= EP_MORE_ADDRS;
        }
    }

    /// Whether `addr` is among the inline addresses (`EP_MORE_ADDRS`: EP_ADDRS may hold more).
    #[inline(always)]
    pub fn has_inline_address(&self, family: u8, addr: &[u8; 16]) -> bool {
        if family == AF_INET {
            self.n_ipv4 != 0 && addr[..4] == self.ipv4
        } else {
            (self.n_ipv6 > 0 && *addr == self.ipv6[0]) || (self.n_ipv6 > 1 && *addr == self.ipv6[1])
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ENDPOINT_SLOTS: Array<EndpointSlot>, indexed by `endpoint_slot(ifindex)`
// ---------------------------------------------------------------------------------------------
//
// ENDPOINTS looked up without hashing: slot `ifindex % capacity::ENDPOINTS` holds the entry of
// one endpoint whose ifindex maps there, tagged with that ifindex. A packet whose ifindex
// matches the tag reads its entry from the slot (an inlined array access); any other reads
// ENDPOINTS, which always holds every endpoint (two live ifindexes sharing a slot, an entry the
// CNI plugin wrote). The agent keeps the slots a copy of what it wrote to ENDPOINTS, rewritten
// at the end of every apply; the plugin clears a slot tagged with an ifindex it provisions.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointSlot {
    /// The host-side ifindex whose entry this is; 0: an empty slot.
    pub ifindex: u32,
    pub info: EndpointInfo,
}

/// The ENDPOINT_SLOTS index of `ifindex`.
#[inline(always)]
pub const fn endpoint_slot(ifindex: u32) -> u32 {
    ifindex & (capacity::ENDPOINTS - 1)
}

// ---------------------------------------------------------------------------------------------
// IDENTITIES: HashMap<PeerAddr, u32 identity>   (exact pod and node addresses)
// ---------------------------------------------------------------------------------------------

/// No identity: the address is not a known pod or node address.
pub const IDENTITY_NONE: u32 = 0;
/// An address of this node. Traffic between a pod and its own node is never restricted.
pub const IDENTITY_HOST: u32 = 1;
/// First identity the agent allocates for pods; ids below are reserved.
pub const IDENTITY_FIRST_POD: u32 = 256;
/// CIDR class ids (values of CIDRS) live above this bit, so they never collide with identities
/// in POLICY keys.
pub const CIDR_CLASS_BIT: u32 = 1 << 31;
/// CIDR class "nothing allowed": an `except` hole, stored so that it shadows shorter prefixes.
pub const CIDR_CLASS_NONE: u32 = CIDR_CLASS_BIT;

/// An IPv4 or IPv6 address. IPv4 occupies `addr[0..4]`, the rest is zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerAddr {
    /// `AF_INET` or `AF_INET6` (4 or 6, not the socket constants).
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

impl PeerAddr {
    pub const fn v4(a: [u8; 4]) -> Self {
        PeerAddr {
            family: AF_INET,
            _pad: [0; 3],
            addr: [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        }
    }
    pub const fn v6(addr: [u8; 16]) -> Self {
        PeerAddr {
            family: AF_INET6,
            _pad: [0; 3],
            addr,
        }
    }
    pub const fn from_ip(ip: core::net::IpAddr) -> Self {
        match ip {
            core::net::IpAddr::V4(a) => PeerAddr::v4(a.octets()),
            core::net::IpAddr::V6(a) => PeerAddr::v6(a.octets()),
        }
    }
    /// The address (`None` for an unknown family).
    pub fn ip(&self) -> Option<core::net::IpAddr> {
        ip_of(self.family, &self.addr)
    }
}

/// The address of a map key's family byte and 16 address bytes, IPv4 in the first four
/// (`None` for an unknown family).
pub fn ip_of(family: u8, addr: &[u8; 16]) -> Option<core::net::IpAddr> {
    match family {
        AF_INET => Some(core::net::IpAddr::from([
            addr[0], addr[1], addr[2], addr[3],
        ])),
        AF_INET6 => Some(core::net::IpAddr::from(*addr)),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// EP_ADDRS: HashMap<PeerAddr, u32 endpoint id>   (the addresses of this node's endpoints)
// ---------------------------------------------------------------------------------------------
//
// A packet leaving a pod must carry one of the pod's own addresses as its source (IPv6
// link-local and unspecified sources excepted: the node never forwards them), otherwise the pod
// could borrow an allowed peer's or the node's address. Self traffic (source = destination) is
// exempt from policy only for the endpoint's own addresses.

// ---------------------------------------------------------------------------------------------
// NODE_PORTS: HashMap<NodePortKey, NodePortTarget>   (what the node DNATs onward)
// ---------------------------------------------------------------------------------------------
//
// A pod's packet to one of the node's own addresses is node traffic, except where the node
// forwards it on: a Service's NodePort (kube-proxy DNATs it to a backend) or a pod's hostPort
// (the portmap plugin DNATs it to the pod). Both happen after the sender's TC hook, so the
// sender's egress verdict is taken here, for the address and port the DNAT leads to: the
// Service's ClusterIP and port (judged as a ClusterIP is), or the pod's address and
// container port.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodePortKey {
    pub family: u8,
    pub proto: u8,
    /// The node port, network byte order.
    pub port_be: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodePortTarget {
    /// The address the flow is judged as going to (a ClusterIP, or a pod address).
    pub addr: [u8; 16],
    /// The port it is judged as going to, host byte order.
    pub port: u16,
    pub _pad: u16,
}

// ---------------------------------------------------------------------------------------------
// CIDRS: HashMap<CidrKey, u32 class>   (ipBlock prefixes, per endpoint and direction)
// POLICY: HashMap<PolicyKey, PolicyValue>   (allow entries)
// PREFIX_LENGTHS: HashMap<PrefixLengthsKey, PrefixLengths>
// ---------------------------------------------------------------------------------------------
//
// Both CIDRS and POLICY answer a longest-prefix match, as one exact hash per prefix length: a
// key carries its prefix length and is masked to it, and PREFIX_LENGTHS lists, per endpoint
// and direction, the lengths its entries use. A lookup probes those lengths longest first and
// stops at the first hit, which is the longest match. Its cost depends on how many lengths an
// endpoint uses (real policies: a handful), never on how many entries there are, where an LPM
// trie walks about log2(entries) nodes.

/// Hash key of a CIDRS entry: the fixed fields select the endpoint, direction and address
/// family; `addr` is masked to `prefix_len` bits (0..=32 for IPv4, 0..=128 for IPv6). The
/// agent flattens every ipBlock of an endpoint's policies (cidr and except holes) into
/// disjoint-or-nested prefixes whose value is the class of rules that cover exactly that
/// prefix, so the longest match answers "which ipBlock rules contain this address", excepts
/// included.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CidrKey {
    pub endpoint: u32,
    pub dir: u8,
    pub family: u8,
    /// Address bits that count. In the compiler's `CidrEntry` it is 0 and the entry holds
    /// the length beside the key (`CidrEntry::map_key` puts it in).
    pub prefix_len: u8,
    pub _pad: u8,
    pub addr: [u8; 16],
}

/// `CIDR_MASKS[l]`: the mask of a /l prefix over the 16 address bytes (IPv4: the first 4).
pub static CIDR_MASKS: [[u8; 16]; 129] = {
    let mut out = [[0u8; 16]; 129];
    let mut l: usize = 0;
    while l <= 128 {
        let mut b = 0;
        while b < 16 {
            let kept = if l >= 8 * (b + 1) {
                8
            } else {
                l.saturating_sub(8 * b)
            };
            out[l][b] = if kept == 0 { 0 } else { 0xffu8 << (8 - kept) };
            b += 1;
        }
        l += 1;
    }
    out
};

impl CidrKey {
    /// `self` masked to `prefix_len` address bits (at most 128), with that length in the key.
    #[inline(always)]
    pub fn masked(mut self, prefix_len: u32) -> CidrKey {
        let mask = &CIDR_MASKS[prefix_len as usize];
        for (a, m) in self.addr.iter_mut().zip(mask) {
            *a &= m;
        }
        self.prefix_len = prefix_len as u8;
        self
    }
}

/// Prefix length of a POLICY key that matches any protocol (endpoint, peer, dir, padding:
/// the bits before the protocol).
pub const POLICY_KEY_ANY_PROTO_BITS: u32 = 72;
/// Prefix length that matches one protocol, any port.
pub const POLICY_KEY_ANY_PORT_BITS: u32 = 80;
/// Prefix length of a full key (one protocol, one port).
pub const POLICY_KEY_FULL_BITS: u32 = 96;

/// Hash key of an allow entry, a prefix of (endpoint, peer, dir, proto, port): its length is
/// `POLICY_KEY_ANY_PROTO_BITS` (any protocol: `proto` and `port_be` are 0),
/// `POLICY_KEY_ANY_PORT_BITS` (one protocol, any port), up to `POLICY_KEY_FULL_BITS` (one
/// port); in between, an aligned block of ports, so a range `[a, b]` is stored as the few
/// power-of-two blocks that cover it. The port is big-endian, so its high bits come first.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub endpoint: u32,
    /// A pod identity (>= IDENTITY_FIRST_POD) or a CIDR class (CIDR_CLASS_BIT set).
    pub peer: u32,
    pub dir: u8,
    pub proto: u8,
    /// Destination port, network byte order.
    pub port_be: u16,
    /// 72..=96. In the compiler's `PolicyEntry` it is 0 and the entry holds the length beside
    /// the key (`PolicyEntry::map_key` puts it in).
    pub prefix_len: u8,
    pub _pad: [u8; 3],
}

/// What of the protocol and the port a POLICY prefix keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyMask {
    pub proto: u8,
    /// Network byte order.
    pub port_be: u16,
}

/// `POLICY_MASKS[l - POLICY_KEY_ANY_PROTO_BITS]`: the mask of a prefix of `l` bits (72..=96).
pub static POLICY_MASKS: [PolicyMask; 25] = {
    let mut out = [PolicyMask {
        proto: 0,
        port_be: 0,
    }; 25];
    let mut i = 0;
    while i < 25 {
        let l = POLICY_KEY_ANY_PROTO_BITS + i as u32;
        if l >= POLICY_KEY_ANY_PORT_BITS {
            let port_bits = l - POLICY_KEY_ANY_PORT_BITS;
            let port: u16 = if port_bits == 0 {
                0
            } else {
                u16::MAX << (16 - port_bits)
            };
            out[i] = PolicyMask {
                proto: u8::MAX,
                port_be: port.to_be(),
            };
        }
        i += 1;
    }
    out
};

impl PolicyKey {
    /// `self` masked to `prefix_len` bits (72..=96), with that length in the key.
    #[inline(always)]
    pub fn masked(mut self, prefix_len: u32) -> PolicyKey {
        let mask = POLICY_MASKS[(prefix_len - POLICY_KEY_ANY_PROTO_BITS) as usize];
        self.proto &= mask.proto;
        self.port_be &= mask.port_be;
        self.prefix_len = prefix_len as u8;
        self
    }
}

/// An endpoint and a direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefixLengthsKey {
    pub endpoint: u32,
    pub dir: u8,
    pub _pad: [u8; 3],
}

/// The prefix lengths an endpoint's entries use in one direction, as bit sets: a lookup probes
/// exactly these, longest first. Bit `j` of a set stands for the `j`-th length from the
/// longest, so the lowest set bit is the longest length left to probe (isolated and counted
/// without a branch: the verifier explores every branch of every probe).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrefixLengths {
    /// POLICY: bit `j` = prefix length `POLICY_KEY_FULL_BITS - j` (j in 0..=24).
    pub policy: u32,
    pub _pad: u32,
    /// CIDRS, IPv4: bit `j` = /(32 - j) (j in 0..=32).
    pub v4: u64,
    /// CIDRS, IPv6: bit `j` of word `w` = /(128 - 64 w - j) (word 2: /0 alone).
    pub v6: [u64; 3],
}

impl PrefixLengths {
    /// Adds a POLICY prefix length (72..=96).
    pub fn add_policy(&mut self, prefix_len: u32) {
        self.policy |= 1 << (POLICY_KEY_FULL_BITS - prefix_len);
    }

    /// Adds a CIDRS prefix length of `family`.
    pub fn add_cidr(&mut self, family: u8, prefix_len: u32) {
        if family == AF_INET {
            self.v4 |= 1 << (32 - prefix_len);
        } else {
            let j = 128 - prefix_len;
            self.v6[(j / 64) as usize] |= 1 << (j % 64);
        }
    }
}

/// The allow entry is audited only: a policy in audit mode records instead of enforcing.
pub const POLICY_FLAG_AUDIT: u32 = 1 << 0;

/// No rule of the tier matches (`TierMatch::action`).
pub const TIER_ACTION_NONE: u8 = 0;
/// The rule accepts: allowed, the rest of the direction's evaluation is skipped.
pub const TIER_ACTION_ACCEPT: u8 = 1;
/// The rule denies: dropped silently.
pub const TIER_ACTION_DENY: u8 = 2;
/// The rule passes: the rest of its tier is skipped and evaluation goes to the next stage.
pub const TIER_ACTION_PASS: u8 = 3;

/// One ClusterNetworkPolicy tier's answer for a POLICY key: the first rule of the tier (in
/// precedence order: priority, then name, then rule order) whose peer and ports contain the key.
/// Of the two answers a new flow finds (its peer's identity, its peer's CIDR class), the lower
/// `rank` decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TierMatch {
    /// The rule's position in its tier's precedence order; `u32::MAX` with `TIER_ACTION_NONE`.
    pub rank: u32,
    /// Rule id (0: none).
    pub rule: u32,
    /// The rule's RULE_STATS slot.
    pub slot: u16,
    /// `TIER_ACTION_*`.
    pub action: u8,
    pub _pad: u8,
}

impl TierMatch {
    pub const NONE: TierMatch = TierMatch {
        rank: u32::MAX,
        rule: 0,
        slot: 0,
        action: TIER_ACTION_NONE,
        _pad: 0,
    };

    /// The one of `self` and `other` that decides first.
    #[inline(always)]
    pub fn first(self, other: TierMatch) -> TierMatch {
        if other.rank < self.rank { other } else { self }
    }
}

impl Default for TierMatch {
    fn default() -> Self {
        TierMatch::NONE
    }
}

/// What POLICY says of a key: the NetworkPolicy allow (`rule`, 0 when none) and each tier's
/// first matching rule. The compiler flattens port prefixes: the value of a key resolves every
/// rule whose ports contain it, so the longest matching key answers for all shorter ones.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyValue {
    /// NetworkPolicy rule id that allows the key (the agent maps it back to namespace/name and
    /// rule index); 0: no NetworkPolicy rule does.
    pub rule: u32,
    pub flags: u32,
    /// The rule's RULE_STATS slot (0: the rule has none and is not counted).
    pub slot: u16,
    pub _pad: u16,
    /// The Admin tier's first matching rule.
    pub admin: TierMatch,
    /// The Baseline tier's first matching rule.
    pub baseline: TierMatch,
}

// ---------------------------------------------------------------------------------------------
// CT_FLOWS: HashMap<CtKey, CtEntry>   (CT_RELEASED: HashMap<u32 endpoint id, u64>)
// ---------------------------------------------------------------------------------------------
//
// A plain (not LRU) hash: an entry leaves the table only when its flow ends or idles past its
// timeout, never because other flows need the room. An LRU table lets one pod that opens
// flows faster than the others evict their idle established flows, whose replies then drop.
// Instead, each endpoint may hold at most `CT_QUOTA` live entries (a load-time setting,
// `CT_QUOTA_DEFAULT` unless the agent sets it): a new flow beyond the quota, or beyond a full
// table, is dropped and counted (`Reason::CtQuota`, `Reason::CtFull`), as netfilter drops
// new connections when its table is full. What was established stays established.
//
// Accounting is exact: an endpoint's live entries are `EndpointState::ct_opened -
// ct_closed - CT_RELEASED[endpoint]`. The datapath adds to the first two atomically, for
// the entries it inserts and removes; the agent's sweep (which removes entries that expired
// without a later packet, and entries of endpoints that are gone) is the only writer of
// `CT_RELEASED`. A removal counts only where the kernel says it removed the entry, so an
// entry removed by two parties at once is counted once.

/// A flow of one endpoint, keyed from the pod's side: both directions of the flow (its
/// packets and their replies) have the same key, so one lookup finds the flow whichever way a
/// packet travels. The direction the flow was first seen in is in its entry (`CtEntry::dir`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub endpoint: u32,
    /// The pod's address: the source of its egress, the destination of its ingress.
    pub pod: [u8; 16],
    pub peer: [u8; 16],
    pub pod_port: u16,
    pub peer_port: u16,
    pub proto: u8,
    pub family: u8,
    /// `CT_ROLE_*` of the flow's packets that leave the pod (ICMP echo: whether the pod sent
    /// the request or the response), so that a request is never taken for the reply of a
    /// request that went the other way (echo id 0 included).
    pub role: u8,
    pub _pad: u8,
}

impl CtKey {
    /// The key of a packet `src:sport -> dst:dport` seen by `endpoint` in `dir`.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub const fn new(
        endpoint: u32,
        dir: u8,
        family: u8,
        proto: u8,
        (src, sport): ([u8; 16], u16),
        (dst, dport): ([u8; 16], u16),
        role: u8,
    ) -> CtKey {
        let egress = dir == DIR_EGRESS;
        CtKey {
            endpoint,
            pod: if egress { src } else { dst },
            peer: if egress { dst } else { src },
            pod_port: if egress { sport } else { dport },
            peer_port: if egress { dport } else { sport },
            proto,
            family,
            role: if egress { role } else { ct_reply_role(role) },
            _pad: 0,
        }
    }

    /// The flow's first packet as `(src, sport), (dst, dport)`, for a flow first seen in
    /// `dir`.
    #[inline(always)]
    pub const fn original(&self, dir: u8) -> (([u8; 16], u16), ([u8; 16], u16)) {
        if dir == DIR_EGRESS {
            ((self.pod, self.pod_port), (self.peer, self.peer_port))
        } else {
            ((self.peer, self.peer_port), (self.pod, self.pod_port))
        }
    }

    /// The destination port of the flow's first packet, for a flow first seen in `dir`.
    #[inline(always)]
    pub const fn original_dport(&self, dir: u8) -> u16 {
        if dir == DIR_EGRESS {
            self.peer_port
        } else {
            self.pod_port
        }
    }
}

/// A packet with no request/response role (TCP, UDP, SCTP).
pub const CT_ROLE_NONE: u8 = 0;
/// An ICMP echo request.
pub const CT_ROLE_REQUEST: u8 = 1;
/// An ICMP echo reply.
pub const CT_ROLE_RESPONSE: u8 = 2;

/// The role the reply of a packet of `role` carries.
pub const fn ct_reply_role(role: u8) -> u8 {
    match role {
        CT_ROLE_REQUEST => CT_ROLE_RESPONSE,
        CT_ROLE_RESPONSE => CT_ROLE_REQUEST,
        r => r,
    }
}

/// The entry's flow is closing: both sides sent a FIN, or an RST was seen and no packet
/// since. It expires after `CT_TIMEOUT_TCP_CLOSING_NS` idle.
pub const CT_FLAG_CLOSING: u32 = 1 << 0;
/// The flow was let through by audit mode only.
pub const CT_FLAG_AUDIT: u32 = 1 << 1;
/// A FIN was seen in the entry's original direction (the side that opened the flow is done
/// sending).
pub const CT_FLAG_FIN_ORIGINAL: u32 = 1 << 2;
/// A FIN was seen in the reply direction.
pub const CT_FLAG_FIN_REPLY: u32 = 1 << 3;
/// The last packet seen was an RST. A later packet that is not one clears it (an RST the
/// receiver ignored, RFC 5961, forged or out of window, does not end the flow's state).
pub const CT_FLAG_RST: u32 = 1 << 4;
/// A packet in the reply direction was seen. A TCP flow nobody answered (a SYN to a closed
/// port, a lone ACK or RST the receiver discards) keeps the short timeout: else every such
/// packet would hold a conntrack entry, of its pod's quota, for an hour.
pub const CT_FLAG_REPLIED: u32 = 1 << 5;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtEntry {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// Rule that allowed the flow (0: the endpoint was not isolated, or node traffic).
    pub rule: u32,
    /// Endpoint revision the verdict was taken under.
    pub revision: u32,
    pub flags: u32,
    /// The direction the flow was first seen in (`DIR_*`): its "original" direction, which
    /// policy judged and revalidation judges again.
    pub dir: u8,
    pub _pad: u8,
    /// `rule`'s RULE_STATS slot (0: not counted).
    pub slot: u16,
}

/// Idle timeouts, nanoseconds.
pub const CT_TIMEOUT_TCP_NS: u64 = 3600 * 1_000_000_000;
pub const CT_TIMEOUT_TCP_CLOSING_NS: u64 = 10 * 1_000_000_000;
pub const CT_TIMEOUT_OTHER_NS: u64 = 60 * 1_000_000_000;
/// A TCP flow not answered yet (Cilium's `CT_SYN_TIMEOUT` is 60 s too).
pub const CT_TIMEOUT_TCP_UNREPLIED_NS: u64 = 60 * 1_000_000_000;

/// How long an entry of `proto` with `flags` lives without a packet (the datapath and the
/// agent's sweep agree on it).
#[inline(always)]
pub const fn ct_timeout_ns(proto: u8, flags: u32) -> u64 {
    if proto != PROTO_TCP {
        CT_TIMEOUT_OTHER_NS
    } else if flags & CT_FLAG_CLOSING != 0 {
        CT_TIMEOUT_TCP_CLOSING_NS
    } else if flags & CT_FLAG_REPLIED == 0 {
        CT_TIMEOUT_TCP_UNREPLIED_NS
    } else {
        CT_TIMEOUT_TCP_NS
    }
}

/// Whether `entry` (of a flow of `proto`) has idled past its timeout at `now_ns`.
#[inline(always)]
pub const fn ct_expired(proto: u8, entry: &CtEntry, now_ns: u64) -> bool {
    now_ns.saturating_sub(entry.last_seen_ns) > ct_timeout_ns(proto, entry.flags)
}

/// Live conntrack entries an endpoint may hold unless the agent sets another quota: a
/// quarter of the table, so that a pod flooding new flows leaves three quarters to the rest.
pub const CT_QUOTA_DEFAULT: u32 = capacity::CONNTRACK / 4;

/// An endpoint's live conntrack entries (negative only for entries copied over by an
/// upgrade, which no `ct_opened` counted).
#[inline(always)]
pub const fn ct_live(ct_opened: u64, ct_closed: u64, released: u64) -> i64 {
    ct_opened.wrapping_sub(ct_closed).wrapping_sub(released) as i64
}
/// `last_seen_ns` is refreshed at most this often, to keep writes off the fast path.
pub const CT_REFRESH_NS: u64 = 1_000_000_000;

// ---------------------------------------------------------------------------------------------
// FRAGMENTS: LruHashMap<FragKey, FragPorts>
// ---------------------------------------------------------------------------------------------

/// Identifies the fragments of one datagram. Non-first fragments carry no L4 header; their
/// ports are taken from the first fragment, recorded here when it was parsed.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
    /// The datagram's upper-layer protocol, found after the extension headers of the first
    /// fragment (the key's `proto` is the Fragment header's next header).
    pub proto: u8,
    /// The first fragment's conntrack role (`CT_ROLE_*`): an echo request's later fragments
    /// are the request's.
    pub role: u8,
    pub _pad: [u8; 2],
}

// ---------------------------------------------------------------------------------------------
// EVENTS: RingBuf of Event;  COUNTERS: PerCpuArray<u64> indexed by Counter
// ---------------------------------------------------------------------------------------------

pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DROP: u8 = 2;
/// Would have been dropped; passed because of audit mode.
pub const VERDICT_AUDIT: u8 = 3;

/// Why a verdict was taken.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// An allow entry matched (`Event::rule` names it).
    PolicyAllow = 1,
    /// The endpoint is not isolated in this direction.
    NotIsolated = 2,
    /// Traffic between the pod and its own node.
    Host = 3,
    /// Isolated and no allow entry matched.
    NoRuleMatched = 4,
    /// The packet could not be parsed safely (truncated or inconsistent headers).
    Malformed = 5,
    /// The endpoint's policy is not compiled yet.
    Pending = 6,
    /// A later fragment whose first fragment was not seen.
    Fragment = 7,
    /// A non-IP frame other than ARP to or from an isolated endpoint.
    NonIp = 8,
    /// The pod's traffic to itself.
    SelfTraffic = 9,
    /// A packet from the pod whose source address is not one of the pod's (`EP_ADDRS`).
    Spoofed = 10,
    /// The interface has the programs attached but no `ENDPOINTS` entry (its entry could not
    /// be written, or was removed before the programs were detached): fail closed.
    UnknownEndpoint = 11,
    /// A packet from a pod to a loopback address (127.0.0.0/8, ::1): never the pod's own node
    /// in the sense policy exempts, whatever `route_localnet` says (CVE-2020-8558).
    Loopback = 12,
    /// A packet from a pod into one of the node's tunnels (IPIP, IPv6-in-IP, GRE, EtherIP,
    /// VXLAN, Geneve to a node address): what the node decapsulates was never checked.
    Tunnel = 13,
    /// A new flow beyond the endpoint's quota of conntrack entries (`CT_QUOTA`).
    CtQuota = 14,
    /// A new flow when the conntrack table is full.
    CtFull = 15,
    /// A ClusterNetworkPolicy rule (Admin or Baseline tier) accepted the flow (`Event::rule`
    /// names it).
    TierAccept = 16,
    /// A ClusterNetworkPolicy rule (Admin or Baseline tier) denied the flow (`Event::rule`
    /// names it).
    TierDeny = 17,
    /// An egress packet an EgressGateway selects while none of its gateways is healthy (or
    /// the node has no tunnel device of the family): dropped, never sent out through the
    /// pod's own node.
    EgressNoGateway = 18,
}

impl Reason {
    /// Every reason, for counters.
    pub const ALL: [Reason; 18] = [
        Reason::PolicyAllow,
        Reason::NotIsolated,
        Reason::Host,
        Reason::NoRuleMatched,
        Reason::Malformed,
        Reason::Pending,
        Reason::Fragment,
        Reason::NonIp,
        Reason::SelfTraffic,
        Reason::Spoofed,
        Reason::UnknownEndpoint,
        Reason::Loopback,
        Reason::Tunnel,
        Reason::CtQuota,
        Reason::CtFull,
        Reason::TierAccept,
        Reason::TierDeny,
        Reason::EgressNoGateway,
    ];

    /// The name the CLI and the metrics give the reason.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::PolicyAllow => "policy-allow",
            Reason::NotIsolated => "not-isolated",
            Reason::Host => "node-traffic",
            Reason::NoRuleMatched => "no-rule-matched",
            Reason::Malformed => "malformed",
            Reason::Pending => "pending",
            Reason::Fragment => "unknown-fragment",
            Reason::NonIp => "non-ip",
            Reason::SelfTraffic => "self",
            Reason::Spoofed => "spoofed-source",
            Reason::UnknownEndpoint => "unknown-endpoint",
            Reason::Loopback => "loopback",
            Reason::Tunnel => "tunnel",
            Reason::CtQuota => "conntrack-quota",
            Reason::CtFull => "conntrack-full",
            Reason::TierAccept => "tier-accept",
            Reason::TierDeny => "tier-deny",
            Reason::EgressNoGateway => "egress-no-gateway",
        }
    }

    pub const fn from_u8(v: u8) -> Option<Reason> {
        Some(match v {
            1 => Reason::PolicyAllow,
            2 => Reason::NotIsolated,
            3 => Reason::Host,
            4 => Reason::NoRuleMatched,
            5 => Reason::Malformed,
            6 => Reason::Pending,
            7 => Reason::Fragment,
            8 => Reason::NonIp,
            9 => Reason::SelfTraffic,
            10 => Reason::Spoofed,
            11 => Reason::UnknownEndpoint,
            12 => Reason::Loopback,
            13 => Reason::Tunnel,
            14 => Reason::CtQuota,
            15 => Reason::CtFull,
            16 => Reason::TierAccept,
            17 => Reason::TierDeny,
            18 => Reason::EgressNoGateway,
            _ => return None,
        })
    }
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    pub ts_ns: u64,
    pub endpoint: u32,
    pub rule: u32,
    pub ifindex: u32,
    pub len: u32,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub family: u8,
    pub verdict: u8,
    pub reason: u8,
    pub _pad: [u8; 7],
}

/// Per-CPU counters (index into COUNTERS). Drops and audited ("would drop") packets are also
/// counted per reason, at `DROPPED_BY_REASON + reason` and `AUDITED_BY_REASON + reason`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    CtHit = 0,
    NewAllowed = 1,
    Dropped = 2,
    Malformed = 3,
    Audited = 4,
    EventsSent = 5,
    EventsSuppressed = 6,
    EventsLost = 7,
    CtInsertFailed = 8,
    Revalidated = 9,
    /// DNS answers held for the agent to learn from (copied to DNS_ANSWERS and dropped).
    DnsHeld = 10,
    /// DNS answers passed without holding (no fresh agent heartbeat, or too large to copy);
    /// copied to DNS_ANSWERS when there was room.
    DnsUnheld = 11,
    /// DNS answers that could not be copied (DNS_ANSWERS full).
    DnsCopyFailed = 12,
    /// Replies from port 53 of a server not in DNS_SERVERS to a pod with domain rules: answers
    /// no address is learned from.
    DnsUntrusted = 13,
}
/// First slot of the drops-by-reason counters (indexed by `Reason as u32`).
pub const DROPPED_BY_REASON: u32 = 16;
/// First slot of the audited-by-reason counters (indexed by `Reason as u32`).
pub const AUDITED_BY_REASON: u32 = 48;
pub const COUNTER_SLOTS: u32 = 80;

// ---------------------------------------------------------------------------------------------
// RULE_STATS: PerCpuArray<RuleStats>, indexed by a rule's stats slot
// ---------------------------------------------------------------------------------------------
//
// Every packet a rule lets through is counted, so the count sits on the per-packet path: an
// array the verifier inlines (an index and a bounds check) costs a fraction of a hash lookup,
// and a per-CPU slot keeps each CPU on its own cache line. Slots are dense numbers the compiler
// gives rules (`PolicyValue::slot`, copied into a flow's `CtEntry::slot`): at most
// `capacity::RULE_STATS - 1` rules of a node are counted; slot 0 takes what no slot counts.

/// Packets and bytes let through by one rule (per CPU): the first packet of every flow the rule
/// allowed and every later packet of those flows (conntrack hits, both directions).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleStats {
    pub packets: u64,
    pub bytes: u64,
}

/// Events allowed per endpoint per second (token bucket refill rate), and the burst size.
pub const EVENT_RATE_PER_SEC: u64 = 100;
pub const EVENT_BURST: u64 = 200;

/// Per-endpoint datapath-owned state (EP_STATE: HashMap<u32 endpoint id, EndpointState>),
/// kept apart from ENDPOINTS so the agent never overwrites it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointState {
    pub tokens: u64,
    pub last_refill_ns: u64,
    pub suppressed: u64,
    /// Conntrack entries the datapath inserted for the endpoint, and removed (atomic adds).
    pub ct_opened: u64,
    pub ct_closed: u64,
}

// ---------------------------------------------------------------------------------------------
// FQDN egress: FQDN_IPS, DNS_SERVERS, DNS_ANSWERS, FQDN_CTL
// ---------------------------------------------------------------------------------------------
//
// Snoop, hold, release. `to_pod` recognises a DNS answer as the reply of a flow the pod opened
// to a trusted server (DNS_SERVERS) on port 53; while the agent's heartbeat (FQDN_CTL) is fresh
// it copies the frame into DNS_ANSWERS and drops it. The agent learns the answer's addresses
// for that endpoint (FQDN_IPS), then sends the frame again on the veth with `DNS_REINJECT_MARK`,
// which `to_pod` lets through. Without a fresh heartbeat answers pass (copied if there is
// room, learned when the agent reads them): DNS never depends on the agent being up.

/// `skb->mark` of an answer the agent sends again after learning from it. A pod cannot set
/// it: the mark is scrubbed when a packet crosses into the host's namespace.
pub const DNS_REINJECT_MARK: u32 = 0x5041_4c44;
/// The agent's heartbeat is fresh for this long (`FQDN_CTL[0]`, coarse monotonic ns).
pub const DNS_HOLD_FRESH_NS: u64 = 1_000_000_000;
/// Frame bytes a DNS_ANSWERS record holds; larger answers pass unheld.
pub const DNS_COPY_MAX: usize = 4096;
/// Learned domain classes: `CIDR_CLASS_BIT | DOMAIN_CLASS_BIT | n`, apart from ipBlock ones.
pub const DOMAIN_CLASS_BIT: u32 = 1 << 30;

/// (endpoint, address the endpoint's DNS answers resolved a `domainNames` pattern to).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FqdnKey {
    pub endpoint: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

impl FqdnKey {
    pub const fn new(endpoint: u32, peer: PeerAddr) -> FqdnKey {
        FqdnKey {
            endpoint,
            family: peer.family,
            _pad: [0; 3],
            addr: peer.addr,
        }
    }

    /// The learned address.
    pub const fn peer(&self) -> PeerAddr {
        PeerAddr {
            family: self.family,
            _pad: [0; 3],
            addr: self.addr,
        }
    }
}

/// The domain class (POLICY entries of the rules whose patterns the name matched), the audit
/// view's, and until when new flows may use it (coarse monotonic ns). Flows already open
/// outlive it: a re-check ignores the expiry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FqdnValue {
    pub class: u32,
    pub audit_class: u32,
    pub expires_ns: u64,
}

/// A DNS_ANSWERS record: the frame `to_pod` saw (its first `DNS_COPY_MAX` bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DnsAnswerRecord {
    pub ifindex: u32,
    pub endpoint: u32,
    /// The frame's length (bytes copied: at most `DNS_COPY_MAX`).
    pub len: u32,
    /// 1: held (the agent must send it again); 0: it passed.
    pub held: u32,
    /// Coarse monotonic ns (the clock of expiries).
    pub at_ns: u64,
    /// Monotonic ns (`bpf_ktime_get_ns`): how long the answer was held.
    pub seen_ns: u64,
    pub frame: [u8; DNS_COPY_MAX],
}

// ---------------------------------------------------------------------------------------------
// Egress gateways: EGW_CTL, EGW_DESTS, EGW_GROUPS, EGW_FLOWS
// ---------------------------------------------------------------------------------------------
//
// After policy allowed a pod's packet (new flow or established), `from_pod` looks its flow up
// in EGW_FLOWS (the gateway it already goes through) or else its destination in EGW_DESTS
// (endpoint, destination prefix -> the EgressGateway's group, or an exclusion). A matching
// packet is encapsulated to a gateway node (`bpf_skb_set_tunnel_key` and a redirect to the
// agent's collect-metadata VXLAN device, EGW_CTL) chosen per flow by hash among the group's
// healthy gateways (EGW_GROUPS, rewritten by the agent as health changes). A group without a
// healthy gateway drops (`Reason::EgressNoGateway`): never out through the pod's own node.

/// At most this many healthy gateways per group.
pub const EGW_MAX_GATEWAYS: usize = 8;
/// Bits of an EGW_DESTS key before the address (endpoint, family, padding): the trie's prefix
/// length is this plus the destination prefix's.
pub const EGW_DEST_FIXED_BITS: u32 = 64;
/// An EGW_DESTS entry that exempts its prefix (`excludedCIDRs`, node addresses).
pub const EGW_DEST_EXCLUDED: u32 = 1;

/// EGW_CTL[0]: whether any group is programmed, and the tunnel device.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgwCtl {
    /// Groups programmed (0: the datapath skips the egress lookups altogether).
    pub groups: u32,
    /// The agent's VXLAN device in collect-metadata mode (`pal-egw`); 0: none, steering drops.
    pub ifindex: u32,
    pub _pad: [u32; 2],
}

/// The Ethernet address of every node's `pal-egw` device: a steered frame is addressed to it,
/// so that the gateway's stack takes the decapsulated frame as its own (locally administered).
pub const EGW_DEVICE_MAC: [u8; 6] = [0x02, 0x50, 0x41, 0x4c, 0x45, 0x47];
/// The VXLAN network identifier of steered frames.
pub const EGW_VNI: u32 = 0x50_4c;
/// The UDP port of the egress tunnel (the IANA VXLAN port).
pub const EGW_VXLAN_PORT: u16 = 4789;

/// EGW_DESTS key data (an LPM trie: the prefix length counts `EGW_DEST_FIXED_BITS` first).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EgwDestKey {
    pub endpoint: u32,
    pub family: u8,
    pub _pad: [u8; 3],
    pub addr: [u8; 16],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EgwDest {
    /// The EgressGateway's group id (EGW_GROUPS key).
    pub group: u32,
    /// `EGW_DEST_*`.
    pub flags: u32,
}

const _: () = assert!(EGW_MAX_GATEWAYS.is_power_of_two());

/// One gateway node: its id (the agent's number for it, named in flow records) and its
/// addresses (tunnel endpoints; 0s where it has none of the family).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EgwGateway {
    pub node: u32,
    pub v4: [u8; 4],
    pub v6: [u8; 16],
}

/// EGW_GROUPS value: the group's healthy gateways (the first `n`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgwGroup {
    pub n: u32,
    pub _pad: u32,
    pub gateways: [EgwGateway; EGW_MAX_GATEWAYS],
}

impl EgwGroup {
    /// Whether `node` is among the healthy gateways.
    #[inline(always)]
    pub fn has(&self, node: u32) -> bool {
        let mut i = 0;
        while i < EGW_MAX_GATEWAYS {
            if (i as u32) < self.n && self.gateways[i].node == node {
                return true;
            }
            i += 1;
        }
        false
    }
}

/// EGW_FLOWS value (key: the flow's `CtKey`): the group and the gateway the flow goes
/// through, and when it was first steered.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EgwFlow {
    pub group: u32,
    pub _pad: u32,
    pub gateway: EgwGateway,
    pub created_ns: u64,
}

/// The gateway of a flow whose hash is `hash`, among the first `n` of `group` (`None`: none).
#[inline(always)]
pub fn egw_pick(group: &EgwGroup, hash: u32) -> Option<EgwGateway> {
    let n = group.n;
    if n == 0 || n as usize > EGW_MAX_GATEWAYS {
        return None;
    }
    let i = hash % n;
    // The verifier must see the index bounded: a volatile read hides from LLVM that it is
    // (below n, at most 8), so the mask stays in the program. It changes nothing: i < 8.
    let i = unsafe { core::ptr::read_volatile(&i) } as usize & (EGW_MAX_GATEWAYS - 1);
    Some(group.gateways[i])
}

/// Map names, as the eBPF object defines them and the agent pins them.
pub mod map_names {
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const ENDPOINT_SLOTS: &str = "ENDPOINT_SLOTS";
    pub const IDENTITIES: &str = "IDENTITIES";
    pub const CIDRS: &str = "CIDRS";
    pub const POLICY: &str = "POLICY";
    pub const PREFIX_LENGTHS: &str = "PREFIX_LENGTHS";
    /// Tracked flows. Named `CT_FLOWS` since its key is the pod's side of the flow; the
    /// earlier `CONNTRACK` (a key per direction) is translated on upgrade.
    pub const CONNTRACK: &str = "CT_FLOWS";
    /// The conntrack map of datapaths before `CT_FLOWS`.
    pub const LEGACY_CONNTRACK: &str = "CONNTRACK";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const EVENTS: &str = "EVENTS";
    pub const COUNTERS: &str = "COUNTERS";
    pub const EP_STATE: &str = "EP_STATE";
    pub const RULE_STATS: &str = "RULE_STATS";
    pub const EP_ADDRS: &str = "EP_ADDRS";
    pub const NODE_PORTS: &str = "NODE_PORTS";
    pub const CT_RELEASED: &str = "CT_RELEASED";
    pub const FQDN_IPS: &str = "FQDN_IPS";
    pub const DNS_SERVERS: &str = "DNS_SERVERS";
    pub const DNS_ANSWERS: &str = "DNS_ANSWERS";
    pub const FQDN_CTL: &str = "FQDN_CTL";
    pub const EGW_CTL: &str = "EGW_CTL";
    pub const EGW_DESTS: &str = "EGW_DESTS";
    pub const EGW_GROUPS: &str = "EGW_GROUPS";
    pub const EGW_FLOWS: &str = "EGW_FLOWS";
}

/// Map capacities, shared so the agent can report fill levels.
pub mod capacity {
    /// A power of two: ENDPOINT_SLOTS is indexed by `ifindex % ENDPOINTS`.
    pub const ENDPOINTS: u32 = 4096;
    pub const IDENTITIES: u32 = 131_072;
    pub const CIDRS: u32 = 262_144;
    pub const POLICY: u32 = 524_288;
    /// Two directions per endpoint, and as many audit views.
    pub const PREFIX_LENGTHS: u32 = 4 * ENDPOINTS;
    pub const CONNTRACK: u32 = 262_144;
    pub const FRAGMENTS: u32 = 8192;
    pub const EVENTS_BYTES: u32 = 1 << 20;
    pub const RULE_STATS: u32 = 65_536;
    pub const EP_ADDRS: u32 = 16_384;
    pub const NODE_PORTS: u32 = 16_384;
    pub const FQDN_IPS: u32 = 131_072;
    pub const DNS_SERVERS: u32 = 256;
    /// Room for about a thousand held answers of the largest size.
    pub const DNS_ANSWERS_BYTES: u32 = 4 << 20;
    /// (endpoint, destination prefix) entries of every EgressGateway.
    pub const EGW_DESTS: u32 = 65_536;
    pub const EGW_GROUPS: u32 = 1024;
    /// Flows through a gateway (LRU: a flow evicted here is steered again by EGW_DESTS).
    pub const EGW_FLOWS: u32 = CONNTRACK;
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for EndpointInfo {}
    unsafe impl aya::Pod for EndpointSlot {}
    unsafe impl aya::Pod for PeerAddr {}
    unsafe impl aya::Pod for NodePortKey {}
    unsafe impl aya::Pod for NodePortTarget {}
    unsafe impl aya::Pod for CidrKey {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for PrefixLengthsKey {}
    unsafe impl aya::Pod for PrefixLengths {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragPorts {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for EndpointState {}
    unsafe impl aya::Pod for RuleStats {}
    unsafe impl aya::Pod for FqdnKey {}
    unsafe impl aya::Pod for FqdnValue {}
    unsafe impl aya::Pod for EgwCtl {}
    unsafe impl aya::Pod for EgwDestKey {}
    unsafe impl aya::Pod for EgwDest {}
    unsafe impl aya::Pod for EgwGateway {}
    unsafe impl aya::Pod for EgwGroup {}
    unsafe impl aya::Pod for EgwFlow {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn every_reason_is_listed_once_with_its_own_name() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(Reason::from_u8(*r as u8), Some(*r));
            for other in &Reason::ALL[i + 1..] {
                assert_ne!(r.name(), other.name());
            }
        }
        let known = (0..=u8::MAX)
            .filter(|v| Reason::from_u8(*v).is_some())
            .count();
        assert_eq!(known, Reason::ALL.len());
    }

    #[test]
    fn a_flow_picks_among_the_healthy_gateways_only() {
        let mut g = EgwGroup::default();
        assert_eq!(egw_pick(&g, 7), None, "no gateway: none");
        for (i, gw) in g.gateways.iter_mut().enumerate() {
            gw.node = i as u32 + 1;
        }
        g.n = 3;
        for h in 0..100u32 {
            let gw = egw_pick(&g, h).unwrap();
            assert!((1..=3).contains(&gw.node));
            assert!(g.has(gw.node));
        }
        assert!(!g.has(4), "beyond n is not healthy");
        g.n = 99;
        assert_eq!(egw_pick(&g, 1), None, "a corrupt count picks nothing");
    }

    #[test]
    fn addresses_round_trip() {
        for ip in ["10.1.2.3", "fd00::1", "::ffff:10.0.0.1"] {
            let ip: core::net::IpAddr = ip.parse().unwrap();
            assert_eq!(PeerAddr::from_ip(ip).ip(), Some(ip));
        }
        assert_eq!(ip_of(0, &[0; 16]), None);
    }

    #[test]
    fn keys_are_masked_to_their_prefix() {
        let k = CidrKey {
            addr: [10, 1, 2, 3, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x80],
            ..CidrKey::default()
        };
        assert_eq!(k.masked(32).addr[..5], [10, 1, 2, 3, 0]);
        assert_eq!(k.masked(12).addr[..4], [10, 0, 0, 0]);
        assert_eq!(k.masked(12).prefix_len, 12);
        assert_eq!(k.masked(0).addr, [0; 16]);
        assert_eq!(k.masked(128).addr, k.addr);
        assert_eq!(k.masked(127).addr[15], 0x80);
        assert_eq!(k.masked(33).addr[4], 0x80);
        let p = PolicyKey {
            proto: PROTO_TCP,
            port_be: 0x1234u16.to_be(),
            ..PolicyKey::default()
        };
        assert_eq!(p.masked(POLICY_KEY_FULL_BITS).port_be, 0x1234u16.to_be());
        assert_eq!(
            p.masked(POLICY_KEY_FULL_BITS - 4).port_be,
            0x1230u16.to_be()
        );
        assert_eq!(p.masked(POLICY_KEY_ANY_PORT_BITS).port_be, 0);
        assert_eq!(p.masked(POLICY_KEY_ANY_PORT_BITS).proto, PROTO_TCP);
        assert_eq!(p.masked(POLICY_KEY_ANY_PROTO_BITS).proto, 0);
        let mut l = PrefixLengths::default();
        l.add_cidr(AF_INET6, 128);
        l.add_cidr(AF_INET6, 64);
        l.add_cidr(AF_INET, 32);
        l.add_policy(POLICY_KEY_FULL_BITS);
        assert_eq!(l.v6, [1, 1, 0]);
        assert_eq!(l.v4, 1);
        assert_eq!(l.policy, 1);
        l.add_cidr(AF_INET6, 0);
        l.add_cidr(AF_INET, 0);
        l.add_policy(POLICY_KEY_ANY_PROTO_BITS);
        assert_eq!(l.v6, [1, 1, 1]);
        assert_eq!(l.v4, 1 | 1 << 32);
        assert_eq!(l.policy, 1 | 1 << 24);
    }

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<EndpointInfo>(), 52);
        assert_eq!(size_of::<EndpointSlot>(), 56);
        const { assert!(capacity::ENDPOINTS.is_power_of_two()) };
        assert_eq!(size_of::<PeerAddr>(), 20);
        assert_eq!(size_of::<CidrKey>(), 24);
        assert_eq!(size_of::<PolicyKey>(), 16);
        assert_eq!(size_of::<PrefixLengthsKey>(), 8);
        assert_eq!(size_of::<PrefixLengths>(), 40);
        assert_eq!(size_of::<TierMatch>(), 12);
        assert_eq!(size_of::<PolicyValue>(), 36);
        assert_eq!(size_of::<CtKey>(), 44);
        assert_eq!(size_of::<CtEntry>(), 48);
        assert_eq!(size_of::<FragKey>(), 40);
        assert_eq!(size_of::<Event>(), 72);
        assert_eq!(size_of::<EndpointState>(), 40);
        assert_eq!(size_of::<RuleStats>(), 16);
        assert_eq!(size_of::<EgwCtl>(), 16);
        assert_eq!(size_of::<EgwDestKey>(), 24);
        assert_eq!(size_of::<EgwGateway>(), 24);
        assert_eq!(size_of::<EgwGroup>(), 8 + 24 * EGW_MAX_GATEWAYS);
        assert_eq!(size_of::<EgwFlow>(), 40);
        assert_eq!(EGW_DEST_FIXED_BITS as usize, 8 * 8);
        const { assert!(DROPPED_BY_REASON + 32 <= AUDITED_BY_REASON) };
        const { assert!(AUDITED_BY_REASON + 32 <= COUNTER_SLOTS) };
        assert!(Reason::ALL.iter().all(|r| (*r as u32) < 32));
        assert_eq!(POLICY_KEY_ANY_PROTO_BITS as usize, 8 * 9);
    }
}
