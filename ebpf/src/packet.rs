//! The packet being judged, as the parser leaves it (one per CPU, in `maps::SCRATCH`), and the
//! vocabulary of its fields.
/// A plain packet: the tuple is the packet's own.
pub const KIND_NORMAL: u8 = 0;
/// An ICMP error: the tuple is the embedded packet's, swapped, so that it reads as a packet of
/// the flow the error is about, travelling in the error's direction.
pub const KIND_ICMP_ERROR: u8 = 1;
/// Neighbour discovery and MLD: link-local control traffic that always passes, like ARP.
pub const KIND_NEIGHBOR: u8 = 2;
/// A later fragment whose first fragment was not seen: its ports are unknown (0).
pub const KIND_UNKNOWN_FRAGMENT: u8 = 3;
/// ICMP that is neither echo, an error nor link-scoped neighbour discovery (timestamp,
/// unassigned types, ND aimed past the link): it has no reply to pair with, so conntrack
/// neither matches nor records it; every such packet is judged by policy.
pub const KIND_UNTRACKED: u8 = 4;

/// ICMPv6 neighbour discovery types a pod may not send: routers and redirects are not pods.
pub const ND_ROUTER_ADVERT: u8 = 134;
pub const ND_NEIGHBOR_ADVERT: u8 = 136;
pub const ND_REDIRECT: u8 = 137;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Aligned to 8 so that the BPF backend zeroes and copies it with 64-bit stores (at its natural
/// alignment of 2, zeroing it for every packet took 57 halfword stores).
#[repr(align(8))]
pub struct Packet {
    pub family: u8,
    /// Protocol of the tuple (for an ICMP error: of the embedded packet).
    pub proto: u8,
    pub kind: u8,
    pub tcp_flags: u8,
    pub sport: u16,
    pub dport: u16,
    /// Addresses of the tuple; IPv4 in the first 4 bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// The packet's own addresses and protocol (differ from the tuple only for ICMP errors).
    pub outer_src: [u8; 16],
    pub outer_dst: [u8; 16],
    pub outer_proto: u8,
    /// `CT_ROLE_*` (ICMP echo request or reply).
    pub role: u8,
    /// ICMP/ICMPv6 type of a `KIND_NEIGHBOR` packet.
    pub icmp_type: u8,
    /// For ARP (`Frame::Arp`): the sender protocol address (IPv4, in the first 4 bytes; 0 for
    /// a probe). For a neighbour solicitation or advertisement: its target address.
    pub claimed: [u8; 16],
    /// Where headers are read to: part of the per-CPU scratch value, so that loading a
    /// 40-byte IPv6 header costs no stack.
    pub(crate) buf: [u8; 40],
}

#[inline(always)]
pub const fn empty_packet(family: u8) -> Packet {
    Packet {
        family,
        proto: 0,
        kind: KIND_NORMAL,
        tcp_flags: 0,
        sport: 0,
        dport: 0,
        src: [0; 16],
        dst: [0; 16],
        outer_src: [0; 16],
        outer_dst: [0; 16],
        outer_proto: 0,
        role: 0,
        icmp_type: 0,
        claimed: [0; 16],
        buf: [0; 40],
    }
}
