//! What the datapath must do with a packet, written from the rules (ARCHITECTURE.md, "Packet
//! rules") rather than from the eBPF code: an independent parser over the frame's bytes, a
//! conntrack and fragment table, and NetworkPolicy semantics from `palisade_policy::reference` (the
//! plain reading of the spec, not the compiled maps).
//!
//! Conntrack is modelled exactly (forward and reply keys per endpoint and direction, echo
//! roles, TCP teardown per direction, a new SYN on a closing flow), except for revisions: every packet of a tracked flow
//! is re-checked against the current policy, which is what revisions must achieve.
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use palisade_common::{
    AF_INET, AF_INET6, DIR_EGRESS, DIR_INGRESS, PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP,
    PROTO_UDP,
};
use palisade_policy::cnp::ClusterNetworkPolicy;
use palisade_policy::cnp::reference::{
    self as tiers, DecidedBy, NpVerdict, Packet, PeerFacts, PodFacts,
};
use palisade_policy::model::Store;
use palisade_policy::reference::{self, Endpoint};
use palisade_policy::state::{Direction, PodRef};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Normal,
    IcmpError,
    Neighbor,
    UnknownFragment,
    /// ICMP that is neither echo, an error nor link-scoped ND: never tracked.
    Untracked,
}

/// Conntrack roles (echo request and reply); flipped in a reply's key.
pub const ROLE_NONE: u8 = 0;
pub const ROLE_REQUEST: u8 = 1;
pub const ROLE_RESPONSE: u8 = 2;

fn reply_role(r: u8) -> u8 {
    match r {
        ROLE_REQUEST => ROLE_RESPONSE,
        ROLE_RESPONSE => ROLE_REQUEST,
        r => r,
    }
}

/// A parsed IP packet: the tuple it is judged by, and its own addresses and protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkt {
    pub family: u8,
    pub proto: u8,
    pub kind: Kind,
    pub tcp_flags: u8,
    pub sport: u16,
    pub dport: u16,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub outer_src: [u8; 16],
    pub outer_dst: [u8; 16],
    pub outer_proto: u8,
    /// `ROLE_*`.
    pub role: u8,
    /// ICMPv6 type of a neighbour discovery packet.
    pub icmp_type: u8,
    /// The target address of a neighbour solicitation or advertisement.
    pub nd_target: [u8; 16],
    /// A first fragment: (key, ports) to remember for the later ones.
    pub first_fragment: Option<(FragKey, FragPorts)>,
    /// How many IPv6 extension headers were walked (for coverage).
    pub ext_headers: u8,
    /// A later fragment (known or not).
    pub later_fragment: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// ARP for IPv4 over Ethernet; the sender protocol address.
    Arp([u8; 16]),
    /// Any other non-IP EtherType (VLAN tags included).
    OtherL2,
    Ip(Box<Pkt>),
    /// Why it is malformed.
    Malformed(&'static str),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FragKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub id: u32,
    pub proto: u8,
    pub family: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub role: u8,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn v4(b: &[u8], at: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[..4].copy_from_slice(&b[at..at + 4]);
    a
}

fn v6(b: &[u8], at: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    a
}

fn v4_mapped(a: &[u8; 16]) -> bool {
    a[..10].iter().all(|x| *x == 0) && a[10] == 0xff && a[11] == 0xff
}

pub fn link_local_or_unspecified(a: &[u8; 16]) -> bool {
    (a[0] == 0xfe && a[1] & 0xc0 == 0x80) || a.iter().all(|x| *x == 0)
}

fn has_ports(proto: u8) -> bool {
    matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
}

fn l4_min(proto: u8) -> usize {
    match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => 12,
    }
}

fn echo_ports(ty: u8, id: u16) -> (u16, u16) {
    if ty == 8 || ty == 128 {
        (id, 0)
    } else {
        (0, id)
    }
}

type Malformed = &'static str;

/// Parses a frame. `frags` is the fragment table (read for later fragments; first fragments
/// are returned in `Pkt::first_fragment`, for the caller to record).
pub fn parse(b: &[u8], frags: &HashMap<FragKey, FragPorts>) -> Frame {
    if b.len() < 14 {
        return Frame::Malformed("shorter than Ethernet");
    }
    let r = match be16(b, 12) {
        0x0800 => parse_v4(b, frags),
        0x86dd => parse_v6(b, frags),
        0x0806 => {
            // htype 1, ptype IPv4, hlen 6, plen 4; the sender protocol address at 28.
            if b.len() < 14 + 18 {
                return Frame::Malformed("ARP truncated");
            }
            if b[14..20] != [0, 1, 8, 0, 6, 4] {
                return Frame::Malformed("not ARP for IPv4 over Ethernet");
            }
            return Frame::Arp(v4(b, 28));
        }
        _ => return Frame::OtherL2,
    };
    match r {
        Ok(mut p) => {
            if p.kind != Kind::IcmpError {
                p.outer_src = p.src;
                p.outer_dst = p.dst;
                p.outer_proto = p.proto;
            }
            Frame::Ip(Box::new(p))
        }
        Err(why) => Frame::Malformed(why),
    }
}

fn empty(family: u8, src: [u8; 16], dst: [u8; 16], proto: u8) -> Pkt {
    Pkt {
        family,
        proto,
        kind: Kind::Normal,
        tcp_flags: 0,
        sport: 0,
        dport: 0,
        src,
        dst,
        outer_src: src,
        outer_dst: dst,
        outer_proto: proto,
        role: ROLE_NONE,
        icmp_type: 0,
        nd_target: [0; 16],
        first_fragment: None,
        ext_headers: 0,
        later_fragment: false,
    }
}

fn later(p: &mut Pkt, key: FragKey, frags: &HashMap<FragKey, FragPorts>) {
    p.later_fragment = true;
    p.proto = key.proto;
    match frags.get(&key) {
        Some(f) => {
            p.sport = f.sport;
            p.dport = f.dport;
            p.proto = f.proto;
            p.role = f.role;
        }
        None => p.kind = Kind::UnknownFragment,
    }
}

fn first(p: &mut Pkt, id: u32, key_proto: u8) {
    if p.kind == Kind::IcmpError {
        return;
    }
    p.first_fragment = Some((
        FragKey {
            src: p.src,
            dst: p.dst,
            id,
            proto: key_proto,
            family: p.family,
        },
        FragPorts {
            sport: p.sport,
            dport: p.dport,
            proto: p.proto,
            role: p.role,
        },
    ));
}

fn parse_v4(b: &[u8], frags: &HashMap<FragKey, FragPorts>) -> Result<Pkt, Malformed> {
    if b.len() < 34 {
        return Err("IPv4 header truncated");
    }
    let ihl = usize::from(b[14] & 0x0f) * 4;
    let tot = usize::from(be16(b, 16));
    if b[14] >> 4 != 4 {
        return Err("IPv4 version");
    }
    if ihl < 20 {
        return Err("IPv4 ihl < 5");
    }
    if tot < ihl {
        return Err("IPv4 total length < header length");
    }
    if 14 + tot > b.len() {
        return Err("IPv4 total length beyond the frame");
    }
    let mut p = empty(AF_INET, v4(b, 26), v4(b, 30), b[23]);
    let frag = be16(b, 20);
    let id = u32::from(be16(b, 18));
    if frag & 0x1fff != 0 {
        let key = FragKey {
            src: p.src,
            dst: p.dst,
            id,
            proto: b[23],
            family: AF_INET,
        };
        later(&mut p, key, frags);
        return Ok(p);
    }
    parse_l4(b, &mut p, 14 + ihl, 14 + tot)?;
    if frag & 0x2000 != 0 {
        first(&mut p, id, b[23]);
    }
    Ok(p)
}

fn parse_v6(b: &[u8], frags: &HashMap<FragKey, FragPorts>) -> Result<Pkt, Malformed> {
    if b.len() < 54 {
        return Err("IPv6 header truncated");
    }
    if b[14] >> 4 != 6 {
        return Err("IPv6 version");
    }
    let plen = usize::from(be16(b, 18));
    if plen == 0 {
        return Err("IPv6 payload length 0 (jumbogram)");
    }
    if 54 + plen > b.len() {
        return Err("IPv6 payload length beyond the frame");
    }
    let (src, dst) = (v6(b, 22), v6(b, 38));
    if v4_mapped(&src) || v4_mapped(&dst) {
        return Err("IPv4-mapped address");
    }
    let end = 54 + plen;
    let mut p = empty(AF_INET6, src, dst, 0);
    let mut next = b[20];
    let mut off = 54usize;
    let mut fragment = None;
    for _ in 0..8 {
        match next {
            0 | 43 | 60 | 51 => {
                if off + 2 > b.len() {
                    return Err("extension header beyond the frame");
                }
                let len = usize::from(b[off + 1]);
                let size = if next == 51 {
                    (len + 2) * 4
                } else {
                    (len + 1) * 8
                };
                next = b[off];
                off += size;
            }
            44 => {
                if off + 8 > b.len() {
                    return Err("fragment header beyond the frame");
                }
                let nh = b[off];
                let of = be16(b, off + 2);
                let id = be32(b, off + 4);
                next = nh;
                off += 8;
                p.ext_headers += 1;
                if off > end {
                    return Err("extension header beyond the payload");
                }
                if of & 0xfff8 != 0 {
                    let key = FragKey {
                        src,
                        dst,
                        id,
                        proto: nh,
                        family: AF_INET6,
                    };
                    later(&mut p, key, frags);
                    return Ok(p);
                }
                if of & 1 != 0 {
                    fragment = Some((id, nh));
                }
                continue;
            }
            _ => break,
        }
        p.ext_headers += 1;
        if off > end {
            return Err("extension header beyond the payload");
        }
    }
    if matches!(next, 0 | 43 | 60 | 51 | 44) {
        return Err("more than 8 extension headers");
    }
    p.proto = next;
    parse_l4(b, &mut p, off, end)?;
    if let Some((id, nh)) = fragment {
        first(&mut p, id, nh);
    }
    Ok(p)
}

fn parse_l4(b: &[u8], p: &mut Pkt, l4: usize, end: usize) -> Result<(), Malformed> {
    let proto = p.proto;
    if has_ports(proto) {
        if l4 + l4_min(proto) > end {
            return Err("L4 header truncated");
        }
        p.sport = be16(b, l4);
        p.dport = be16(b, l4 + 2);
        if proto == PROTO_TCP {
            p.tcp_flags = b[l4 + 13];
        }
        return Ok(());
    }
    let v6 = p.family == AF_INET6;
    if (proto == PROTO_ICMP && !v6) || (proto == PROTO_ICMPV6 && v6) {
        if l4 + 8 > end {
            return Err("ICMP header truncated");
        }
        let ty = b[l4];
        let id = be16(b, l4 + 4);
        let echo = if v6 {
            ty == 128 || ty == 129
        } else {
            ty == 8 || ty == 0
        };
        let error = if v6 {
            (1..=4).contains(&ty)
        } else {
            matches!(ty, 3 | 4 | 5 | 11 | 12)
        };
        let neighbor = v6 && ((130..=137).contains(&ty) || ty == 143);
        let link_scoped = link_local_or_unspecified(&p.src)
            || (p.dst[0] == 0xfe && p.dst[1] & 0xc0 == 0x80)
            || (p.dst[0] == 0xff && p.dst[1] & 0x0f == 0x02);
        if echo {
            (p.sport, p.dport) = echo_ports(ty, id);
            p.role = if ty == 8 || ty == 128 {
                ROLE_REQUEST
            } else {
                ROLE_RESPONSE
            };
        } else if neighbor && link_scoped {
            p.kind = Kind::Neighbor;
            p.icmp_type = ty;
            if ty == 135 || ty == 136 {
                if l4 + 24 > end {
                    return Err("neighbour discovery target truncated");
                }
                p.nd_target = self::v6(b, l4 + 8);
            }
        } else if error {
            embedded(b, p, l4 + 8, end, v6)?;
        } else {
            p.kind = Kind::Untracked;
        }
    }
    Ok(())
}

fn embedded(b: &[u8], p: &mut Pkt, inner: usize, end: usize, v6: bool) -> Result<(), Malformed> {
    let (isrc, idst, iproto, il4) = if v6 {
        if inner + 40 > b.len() {
            return Err("quoted IPv6 header beyond the frame");
        }
        if b[inner] >> 4 != 6 {
            return Err("quoted IPv6 version");
        }
        (
            self::v6(b, inner + 8),
            self::v6(b, inner + 24),
            b[inner + 6],
            inner + 40,
        )
    } else {
        if inner + 20 > b.len() {
            return Err("quoted IPv4 header beyond the frame");
        }
        let ihl = usize::from(b[inner] & 0x0f) * 4;
        if b[inner] >> 4 != 4 || ihl < 20 {
            return Err("quoted IPv4 version or ihl");
        }
        (
            v4(b, inner + 12),
            v4(b, inner + 16),
            b[inner + 9],
            inner + ihl,
        )
    };
    if il4 > end {
        return Err("quoted header beyond the payload");
    }
    let (mut isport, mut idport) = (0u16, 0u16);
    if has_ports(iproto) {
        if il4 + 4 > end {
            return Err("quoted ports truncated");
        }
        isport = be16(b, il4);
        idport = be16(b, il4 + 2);
    } else if (iproto == PROTO_ICMP && !v6) || (iproto == PROTO_ICMPV6 && v6) {
        if il4 + 8 > end {
            return Err("quoted ICMP header truncated");
        }
        let ty = b[il4];
        let echo = if v6 {
            ty == 128 || ty == 129
        } else {
            ty == 8 || ty == 0
        };
        if echo {
            (isport, idport) = echo_ports(ty, be16(b, il4 + 4));
            // The quoted request, swapped, reads as its reply.
            p.role = if ty == 8 || ty == 128 {
                ROLE_RESPONSE
            } else {
                ROLE_REQUEST
            };
        }
    }
    p.outer_src = p.src;
    p.outer_dst = p.dst;
    p.outer_proto = p.proto;
    p.src = idst;
    p.dst = isrc;
    p.sport = idport;
    p.dport = isport;
    p.proto = iproto;
    p.kind = Kind::IcmpError;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Verdicts
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub ep: usize,
    pub dir: u8,
    pub family: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub role: u8,
}

/// A tracked flow's TCP teardown: FINs per direction, and an RST not followed by anything.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Teardown {
    pub fin_original: bool,
    pub fin_reply: bool,
    pub rst: bool,
}

impl Teardown {
    pub fn closing(&self) -> bool {
        self.rst || (self.fin_original && self.fin_reply)
    }
}

/// Why the model decided as it did (also the coverage classes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Why {
    NotAnEndpoint,
    Malformed,
    Arp,
    OtherL2Open,
    OtherL2Isolated,
    /// A non-IP, non-ARP frame from a pod.
    OtherL2FromPod,
    Spoofed,
    /// To a loopback address.
    Loopback,
    /// Into a node tunnel (IPIP, GRE, VXLAN, ...).
    Tunnel,
    Neighbor,
    Established,
    Revoked,
    IcmpErrorUnrelated,
    /// Denied in a direction isolated by audit policies alone: "would drop", passes.
    Audited,
    SelfTraffic,
    NotIsolated,
    Host,
    PolicyAllow,
    PolicyDeny,
}

/// A local endpoint as the model knows it.
pub struct Ep {
    pub pod: PodRef,
    /// Its own addresses (source verification, self traffic).
    pub own: Vec<IpAddr>,
}

pub struct Model {
    pub ct: HashMap<CtKey, Teardown>,
    pub frags: HashMap<FragKey, FragPorts>,
}

pub fn addr(family: u8, a: &[u8; 16]) -> IpAddr {
    if family == AF_INET {
        IpAddr::from([a[0], a[1], a[2], a[3]])
    } else {
        IpAddr::from(*a)
    }
}

/// An address for traces.
pub fn show(family: u8, a: &[u8; 16]) -> String {
    addr(family, a).to_string()
}

fn opposite(dir: u8) -> u8 {
    if dir == DIR_INGRESS {
        DIR_EGRESS
    } else {
        DIR_INGRESS
    }
}

/// Addresses a subject pod is never compared equal to (the reference's self-traffic rule
/// compares the peer with the subject's address; the model handles self traffic itself).
fn sentinel(family: u8) -> IpAddr {
    if family == AF_INET {
        IpAddr::from([240, 0, 0, 254])
    } else {
        "100::fe".parse().expect("valid")
    }
}

/// Policy, as the spec reads: is a new flow of endpoint `ep` in `dir` with `peer` allowed?
///
/// Audit policies (`palisade.io/audit: "true"`, ARCHITECTURE.md "Audit mode"): where enforcing
/// policies select the pod in a direction they alone decide; where only audit policies do, the
/// direction is *audited*: their rules decide, and what they deny passes anyway.
///
/// ClusterNetworkPolicies (`palisade_policy::cnp::reference`, the plain reading of the tiers):
/// the Admin tier, then NetworkPolicy if it isolates the pod, then the Baseline tier, then
/// allow. Those in audit mode decide nothing. A tier Deny is never audited; where NetworkPolicy
/// is audited only, its denial goes on to the Baseline tier, whose Deny drops.
pub struct Policy<'a> {
    pub store: &'a Store,
    /// The store without its audit policies.
    pub enforcing: Store,
    pub hosts: &'a [IpAddr],
    /// Address -> pod, for every pod address.
    pub owners: BTreeMap<IpAddr, PodRef>,
    /// The ClusterNetworkPolicies in force (not in audit mode).
    pub cluster: Vec<ClusterNetworkPolicy>,
}

/// A policy decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// Allowed as node traffic (not tracked).
    pub host: bool,
    /// Denied, but the direction is audited: the packet passes.
    pub audited: bool,
}

impl<'a> Policy<'a> {
    pub fn new(store: &'a Store, hosts: &'a [IpAddr]) -> Policy<'a> {
        let mut owners = BTreeMap::new();
        for (pod, info) in &store.pods {
            for ip in &info.ips {
                owners.entry(*ip).or_insert_with(|| pod.clone());
            }
        }
        let mut enforcing = store.clone();
        enforcing.policies.retain(|_, p| !p.audit);
        let cluster = store
            .cluster_policies
            .values()
            .filter(|p| !p.audit)
            .cloned()
            .collect();
        Policy {
            store,
            enforcing,
            hosts,
            owners,
            cluster,
        }
    }

    /// Selected in `dir` by a ClusterNetworkPolicy in force that has rules in that direction.
    pub fn tiered(&self, pod: &PodRef, dir: u8) -> bool {
        let Some(info) = self.store.pods.get(pod) else {
            return false;
        };
        let ns = self.store.namespace_labels(&pod.namespace);
        let facts = PodFacts::new(&ns, info);
        let dir = Direction::from_u8(dir);
        self.cluster
            .iter()
            .any(|p| !p.rules(dir).is_empty() && tiers::selects(&p.subject, &facts))
    }

    /// The tiers' verdict for the pod in `dir`, given NetworkPolicy's.
    #[allow(clippy::too_many_arguments)]
    fn tier_verdict(
        &self,
        pod: &PodRef,
        dir: u8,
        np: NpVerdict,
        peer: IpAddr,
        proto: u8,
        port: u16,
    ) -> tiers::Verdict {
        let info = &self.store.pods[pod];
        let ns = self.store.namespace_labels(&pod.namespace);
        let subject = PodFacts::new(&ns, info);
        let owner = self.owners.get(&peer);
        let owner_ns = owner.map(|o| self.store.namespace_labels(&o.namespace));
        let peer_pod = owner
            .zip(owner_ns.as_deref())
            .map(|(o, l)| PodFacts::new(l, &self.store.pods[o]));
        let node_labels = self
            .store
            .nodes
            .values()
            .find(|n| n.addresses.contains(&peer))
            .map(|n| &n.labels);
        let facts = PeerFacts {
            pod: peer_pod,
            node_labels,
            ..PeerFacts::address(peer)
        };
        tiers::verdict(
            &self.cluster,
            Direction::from_u8(dir),
            np,
            &subject,
            &facts,
            Packet { proto, port },
        )
    }

    fn selected(store: &Store, pod: &PodRef, dir: u8) -> bool {
        let Some(info) = store.pods.get(pod) else {
            return false;
        };
        !reference::isolating(store, pod, info, Direction::from_u8(dir)).is_empty()
    }

    pub fn isolated(&self, pod: &PodRef, dir: u8) -> bool {
        Self::selected(self.store, pod, dir)
    }

    /// Isolated in `dir` by audit policies alone.
    pub fn audited(&self, pod: &PodRef, dir: u8) -> bool {
        self.isolated(pod, dir) && !Self::selected(&self.enforcing, pod, dir)
    }

    pub fn allows(
        &self,
        pod: &PodRef,
        dir: u8,
        family: u8,
        peer: &[u8; 16],
        proto: u8,
        port: u16,
    ) -> Decision {
        let mut d = Decision {
            allowed: true,
            host: false,
            audited: false,
        };
        let isolated = self.isolated(pod, dir);
        let tiered = self.tiered(pod, dir);
        if !isolated && !tiered {
            return d;
        }
        let peer = addr(family, peer);
        let host = self.hosts.contains(&peer);
        if host && !tiered {
            // Node traffic: untracked, unless tiers apply to the pod in either direction (the
            // replies of what the node opens must then pass by conntrack).
            d.host = !self.tiered(pod, DIR_INGRESS) && !self.tiered(pod, DIR_EGRESS);
            return d;
        }
        // NetworkPolicy's verdict (node traffic is allowed; flows with the node are tracked
        // where tiers apply).
        let audited = isolated && self.audited(pod, dir);
        let np_allowed = host || !isolated || {
            let store = if audited { self.store } else { &self.enforcing };
            let peer_ep = match self.owners.get(&peer) {
                Some(p) => Endpoint::Pod {
                    pod: p.clone(),
                    ip: peer,
                },
                None => Endpoint::External(peer),
            };
            let subject = Endpoint::Pod {
                pod: pod.clone(),
                ip: sentinel(family),
            };
            if dir == DIR_INGRESS {
                reference::ingress_allowed(store, &peer_ep, &subject, proto, port)
            } else {
                reference::egress_allowed(store, &subject, &peer_ep, proto, port)
            }
        };
        if !tiered {
            d.allowed = np_allowed;
            d.audited = !d.allowed && audited;
            return d;
        }
        let np = match (isolated, np_allowed) {
            (false, _) => NpVerdict::NotIsolated,
            (true, true) => NpVerdict::Allowed,
            (true, false) => NpVerdict::Denied,
        };
        let v = self.tier_verdict(pod, dir, np, peer, proto, port);
        d.allowed = v.allowed;
        if !v.allowed && audited && v.decided_by == DecidedBy::NetworkPolicy {
            // NetworkPolicy's denial is audited only: the Baseline tier may still drop for
            // real; otherwise the packet passes as "would drop".
            let b = self.tier_verdict(pod, dir, NpVerdict::NotIsolated, peer, proto, port);
            let baseline_denies = !b.allowed && matches!(b.decided_by, DecidedBy::Rule(_));
            d.audited = !baseline_denies;
        }
        d
    }
}

impl Model {
    pub fn new() -> Model {
        Model {
            ct: HashMap::new(),
            frags: HashMap::new(),
        }
    }

    pub fn clear(&mut self) {
        self.ct.clear();
        self.frags.clear();
    }

    /// The verdict on `frame` at endpoint `ep` (`None`: an interface without an endpoint) in
    /// direction `dir`; updates conntrack and the fragment table as the datapath must.
    /// `hairpin`: the packet entered the node through this endpoint's own veth.
    pub fn verdict(
        &mut self,
        policy: &Policy<'_>,
        eps: &[Ep],
        ep: Option<usize>,
        dir: u8,
        hairpin: bool,
        frame: &Frame,
    ) -> (bool, Why) {
        let Some(e) = ep else {
            return (false, Why::NotAnEndpoint);
        };
        let endpoint = &eps[e];
        let pkt = match frame {
            Frame::Malformed(_) => return (false, Why::Malformed),
            Frame::Arp(sender) => {
                let own = endpoint.own.contains(&addr(AF_INET, sender));
                return if dir == DIR_EGRESS && *sender != [0; 16] && !own {
                    (false, Why::Spoofed)
                } else {
                    (true, Why::Arp)
                };
            }
            Frame::OtherL2 if dir == DIR_EGRESS => return (false, Why::OtherL2FromPod),
            Frame::OtherL2 => {
                return if !policy.isolated(&endpoint.pod, dir) {
                    (true, Why::OtherL2Open)
                } else if policy.audited(&endpoint.pod, dir) {
                    (true, Why::Audited)
                } else {
                    (false, Why::OtherL2Isolated)
                };
            }
            Frame::Ip(p) => p,
        };
        if let Some((k, v)) = pkt.first_fragment {
            self.frags.insert(k, v);
        }
        let own = |a: &[u8; 16]| endpoint.own.contains(&addr(pkt.family, a));
        if dir == DIR_EGRESS
            && !own(&pkt.outer_src)
            && !(pkt.family == AF_INET6 && link_local_or_unspecified(&pkt.outer_src))
        {
            return (false, Why::Spoofed);
        }
        if dir == DIR_EGRESS {
            let dst = addr(pkt.family, &pkt.outer_dst);
            if dst.is_loopback() {
                return (false, Why::Loopback);
            }
            if pkt.kind == Kind::Neighbor {
                let ok = match pkt.icmp_type {
                    134 | 137 => false,
                    136 => link_local_or_unspecified(&pkt.nd_target) || own(&pkt.nd_target),
                    _ => true,
                };
                if !ok {
                    return (false, Why::Spoofed);
                }
            } else {
                let tunnel = match pkt.outer_proto {
                    4 | 41 | 47 | 97 => true,
                    PROTO_UDP => matches!(pkt.dport, 4789 | 8472 | 6081),
                    _ => false,
                };
                if tunnel && policy.hosts.contains(&dst) {
                    return (false, Why::Tunnel);
                }
            }
        }
        if pkt.kind == Kind::Neighbor {
            return (true, Why::Neighbor);
        }
        let tracked = pkt.kind != Kind::Untracked;
        // Conntrack.
        let fwd = CtKey {
            ep: e,
            dir,
            family: pkt.family,
            src: pkt.src,
            dst: pkt.dst,
            sport: pkt.sport,
            dport: pkt.dport,
            proto: pkt.proto,
            role: pkt.role,
        };
        let rev = CtKey {
            ep: e,
            dir: opposite(dir),
            family: pkt.family,
            src: pkt.dst,
            dst: pkt.src,
            sport: pkt.dport,
            dport: pkt.sport,
            proto: pkt.proto,
            role: reply_role(pkt.role),
        };
        let syn_only = pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let hit = match self.ct.get(&fwd) {
            _ if !tracked => None,
            Some(t) if t.closing() && syn_only => {
                self.ct.remove(&fwd);
                None
            }
            Some(_) => Some(fwd),
            // A SYN without ACK is never a reply.
            None => (!syn_only && self.ct.contains_key(&rev)).then_some(rev),
        };
        if let Some(key) = hit {
            let peer = if key.dir == DIR_INGRESS {
                key.src
            } else {
                key.dst
            };
            let d = policy.allows(
                &endpoint.pod,
                key.dir,
                key.family,
                &peer,
                key.proto,
                key.dport,
            );
            if d.allowed || d.audited {
                // Errors pass with their flow but do not count as its packets.
                if pkt.proto == PROTO_TCP
                    && pkt.kind != Kind::IcmpError
                    && let Some(t) = self.ct.get_mut(&key)
                {
                    if pkt.tcp_flags & TCP_RST != 0 {
                        t.rst = true;
                    } else {
                        t.rst = false;
                        if pkt.tcp_flags & TCP_FIN != 0 {
                            if key.dir == dir {
                                t.fin_original = true;
                            } else {
                                t.fin_reply = true;
                            }
                        }
                    }
                }
                return (
                    true,
                    if d.allowed {
                        Why::Established
                    } else {
                        Why::Audited
                    },
                );
            }
            self.ct.remove(&key);
            return (false, Why::Revoked);
        }
        let peer_of = |src: &[u8; 16], dst: &[u8; 16]| if dir == DIR_INGRESS { *src } else { *dst };
        if pkt.kind == Kind::IcmpError {
            let peer = peer_of(&pkt.outer_src, &pkt.outer_dst);
            let d = policy.allows(&endpoint.pod, dir, pkt.family, &peer, pkt.outer_proto, 0);
            return match (d.allowed, d.audited) {
                (true, _) => (true, Why::PolicyAllow),
                (false, true) => (true, Why::Audited),
                (false, false) => (false, Why::IcmpErrorUnrelated),
            };
        }
        if pkt.src == pkt.dst && own(&pkt.dst) && (dir == DIR_EGRESS || hairpin) {
            return (true, Why::SelfTraffic);
        }
        let peer = peer_of(&pkt.src, &pkt.dst);
        let d = policy.allows(&endpoint.pod, dir, pkt.family, &peer, pkt.proto, pkt.dport);
        if !d.allowed {
            if d.audited {
                // "Would drop": passes, and the flow is tracked (not an untracked kind nor a
                // fragment of unknown ports).
                if tracked && pkt.kind != Kind::UnknownFragment && pkt.role != ROLE_RESPONSE {
                    // A flow the other way on this tuple (only a SYN gets here past one) is
                    // over: one entry per tuple, as the datapath keys flows from the pod's side.
                    self.ct.remove(&rev);
                    self.ct.insert(fwd, Teardown::default());
                }
                return (true, Why::Audited);
            }
            return (false, Why::PolicyDeny);
        }
        let host = d.host;
        // Only a request opens an echo flow.
        if !host && pkt.kind != Kind::UnknownFragment && tracked && pkt.role != ROLE_RESPONSE {
            // A flow the other way on this tuple (only a SYN gets here past one) is
            // over: one entry per tuple, as the datapath keys flows from the pod's side.
            self.ct.remove(&rev);
            self.ct.insert(fwd, Teardown::default());
        }
        let why = if host {
            Why::Host
        } else if !policy.isolated(&endpoint.pod, dir) {
            Why::NotIsolated
        } else {
            Why::PolicyAllow
        };
        (true, why)
    }
}

#[cfg(test)]
mod tests {
    //! The rules the fuzzer holds the datapath to, pinned on hand-made frames.
    use super::*;

    fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend(ethertype.to_be_bytes());
        f.extend(payload);
        f
    }

    fn v4(src: [u8; 4], dst: [u8; 4], proto: u8, frag: u16, payload: &[u8]) -> Vec<u8> {
        let mut h = vec![0u8; 20];
        h[0] = 0x45;
        h[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        h[4..6].copy_from_slice(&7u16.to_be_bytes());
        h[6..8].copy_from_slice(&frag.to_be_bytes());
        h[9] = proto;
        h[12..16].copy_from_slice(&src);
        h[16..20].copy_from_slice(&dst);
        h.extend(payload);
        h
    }

    fn v6(src: &str, dst: &str, next: u8, payload: &[u8]) -> Vec<u8> {
        let a: std::net::Ipv6Addr = src.parse().unwrap();
        let b: std::net::Ipv6Addr = dst.parse().unwrap();
        let mut h = vec![0u8; 40];
        h[0] = 0x60;
        h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
        h[6] = next;
        h[8..24].copy_from_slice(&a.octets());
        h[24..40].copy_from_slice(&b.octets());
        h.extend(payload);
        h
    }

    fn ip(frame: Frame) -> Pkt {
        match frame {
            Frame::Ip(p) => *p,
            other => panic!("not parsed as IP: {other:?}"),
        }
    }

    const A: [u8; 4] = [10, 0, 0, 1];
    const B: [u8; 4] = [10, 0, 0, 2];

    #[test]
    fn echo_request_and_reply_ports() {
        let none = HashMap::new();
        let req = ip(parse(
            &eth(0x0800, &v4(A, B, 1, 0, &[8, 0, 0, 0, 0x12, 0x34, 0, 1])),
            &none,
        ));
        assert_eq!((req.sport, req.dport), (0x1234, 0));
        let rep = ip(parse(
            &eth(0x0800, &v4(B, A, 1, 0, &[0, 0, 0, 0, 0x12, 0x34, 0, 1])),
            &none,
        ));
        assert_eq!(
            (rep.sport, rep.dport),
            (0, 0x1234),
            "the reply is the request reversed"
        );
    }

    #[test]
    fn neighbour_discovery_only_on_the_link() {
        let none = HashMap::new();
        let mut ns = vec![135u8, 0, 0, 0, 0, 0, 0, 0];
        ns.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        let kind =
            |src: &str, dst: &str| ip(parse(&eth(0x86dd, &v6(src, dst, 58, &ns)), &none)).kind;
        assert_eq!(kind("fe80::1", "fd00::1"), Kind::Neighbor);
        assert_eq!(kind("::", "ff02::1:ff00:1"), Kind::Neighbor);
        assert_eq!(kind("fd00::2", "ff02::1"), Kind::Neighbor);
        assert_eq!(kind("fd00::2", "fe80::1"), Kind::Neighbor);
        assert_eq!(
            kind("fd00::2", "fd00::1"),
            Kind::Untracked,
            "routed: plain ICMPv6, judged by policy"
        );
        assert_eq!(
            kind("fd00::2", "ff05::2"),
            Kind::Untracked,
            "beyond link scope"
        );
        let short = eth(0x86dd, &v6("fe80::1", "ff02::1", 58, &ns[..8]));
        assert!(
            matches!(parse(&short, &none), Frame::Malformed(_)),
            "a solicitation without its target"
        );
    }

    #[test]
    fn extension_chains_up_to_eight() {
        let none = HashMap::new();
        let chain = |n: usize| {
            let mut c = Vec::new();
            for i in 0..n {
                c.extend([if i + 1 == n { 17 } else { 60 }, 0, 0, 0, 0, 0, 0, 0]);
            }
            c.extend([0, 1, 0, 2, 0, 8, 0, 0]);
            eth(0x86dd, &v6("fd00::2", "fd00::1", 60, &c))
        };
        assert_eq!(ip(parse(&chain(8), &none)).dport, 2);
        assert!(matches!(parse(&chain(9), &none), Frame::Malformed(_)));
    }

    #[test]
    fn later_fragments_follow_the_first() {
        let mut frags = HashMap::new();
        let udp = [0u8, 1, 0, 53, 0, 8, 0, 0];
        let first = ip(parse(&eth(0x0800, &v4(A, B, 17, 0x2000, &udp)), &frags));
        let (k, v) = first
            .first_fragment
            .expect("a first fragment is remembered");
        frags.insert(k, v);
        let later = ip(parse(&eth(0x0800, &v4(A, B, 17, 3, &[0u8; 8])), &frags));
        assert_eq!((later.kind, later.dport), (Kind::Normal, 53));
        let orphan = ip(parse(&eth(0x0800, &v4(B, A, 17, 3, &[0u8; 8])), &frags));
        assert_eq!((orphan.kind, orphan.dport), (Kind::UnknownFragment, 0));
    }

    #[test]
    fn icmp_errors_quote_inside_their_payload() {
        let none = HashMap::new();
        let quoted = v4(B, A, 6, 0, &[0, 80, 0x9c, 0x40, 0, 0, 0, 0]);
        let mut icmp = vec![3u8, 3, 0, 0, 0, 0, 0, 0];
        icmp.extend(&quoted[..28]);
        let e = ip(parse(&eth(0x0800, &v4(A, B, 1, 0, &icmp)), &none));
        assert_eq!(e.kind, Kind::IcmpError);
        assert_eq!(
            (e.src, e.sport, e.dport, e.proto),
            (e.outer_src, 40000, 80, 6)
        );
        // The quoted header cut off by the error's own length.
        let mut short = v4(A, B, 1, 0, &icmp);
        short[2..4].copy_from_slice(&((20 + 8 + 10) as u16).to_be_bytes());
        assert!(matches!(
            parse(&eth(0x0800, &short), &none),
            Frame::Malformed(_)
        ));
        // A fragmented error is not remembered.
        let frag = ip(parse(&eth(0x0800, &v4(A, B, 1, 0x2000, &icmp)), &none));
        assert!(frag.first_fragment.is_none());
    }
}
