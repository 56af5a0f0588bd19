//! Packet parsing: Ethernet, IPv4, IPv6 with a bounded extension-header walk, and the first
//! bytes of TCP, UDP, SCTP, ICMP and ICMPv6 (including the packet embedded in ICMP errors).
//!
//! Most packets are TCP or UDP over IPv4 without options or IPv6 without extension headers,
//! with their headers in the skb's linear area: `fast` reads those in place (direct packet
//! access, one bounds check per header). Everything else (options, extension headers, ICMP,
//! fragments, ARP, headers beyond the linear area, anything the fast path doubts) is read
//! here with `bpf_skb_load_bytes` (one call per header, not per field), which works on
//! non-linear skbs too. Every length field is checked against what the packet really holds:
//! a header that claims more than the packet has is `Malformed`, never guessed.
use aya_ebpf::{cty::c_void, helpers::bpf_skb_load_bytes, programs::TcContext};
use palisade_common::{
    AF_INET, AF_INET6, CT_ROLE_REQUEST, CT_ROLE_RESPONSE, FragKey, FragPorts, PROTO_ICMP,
    PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP,
};

mod fast;

use crate::{
    maps::FRAGMENTS,
    packet::{
        KIND_ICMP_ERROR, KIND_NEIGHBOR, KIND_UNKNOWN_FRAGMENT, KIND_UNTRACKED, ND_NEIGHBOR_ADVERT,
        Packet,
    },
};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_ARP: u16 = 0x0806;

/// IPv6 extension headers walked before giving up (and dropping as malformed).
const MAX_IPV6_EXT_HEADERS: usize = 8;

pub enum Frame {
    /// IPv4 or IPv6: the packet was filled in.
    Ip,
    Arp,
    /// Any other EtherType (VLAN tags included): not evaluated, passes only where the endpoint
    /// is not isolated.
    OtherL2,
}

pub struct Malformed;

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    version_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    check: u16,
    src: [u8; 4],
    dst: [u8; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6FragHdr {
    next_header: u8,
    reserved: u8,
    offset_flags: u16,
    id: u32,
}

/// The first 14 bytes of TCP (through the flags); UDP and SCTP need only the ports.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpHead {
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    data_offset: u8,
    flags: u8,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ports {
    sport: u16,
    dport: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpHead {
    ty: u8,
    code: u8,
    check: u16,
    id: u16,
    seq: u16,
}

/// Copies `len` packet bytes at `off` into the packet's scratch buffer.
#[inline(always)]
fn load_raw(ctx: &TcContext, p: &mut Packet, off: usize, len: u32) -> Result<(), Malformed> {
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            off as u32,
            p.buf.as_mut_ptr() as *mut c_void,
            len,
        )
    };
    if ret != 0 {
        return Err(Malformed);
    }
    Ok(())
}

/// Reads a small header `T` at `off`.
#[inline(always)]
fn load<T: Copy>(ctx: &TcContext, p: &mut Packet, off: usize) -> Result<T, Malformed> {
    const { assert!(core::mem::size_of::<T>() <= 20) };
    load_raw(ctx, p, off, core::mem::size_of::<T>() as u32)?;
    // SAFETY: the buffer holds size_of::<T>() initialised bytes; T is plain data.
    Ok(unsafe { core::ptr::read_unaligned(p.buf.as_ptr() as *const T) })
}

/// Loads an IPv6 fixed header at `off` into the scratch buffer; returns (payload length,
/// next header) after checking the version. The addresses stay in `p.buf[8..40]`.
#[inline(always)]
fn load_ipv6(ctx: &TcContext, p: &mut Packet, off: usize) -> Result<(usize, u8), Malformed> {
    load_raw(ctx, p, off, 40)?;
    if p.buf[0] >> 4 != 6 {
        return Err(Malformed);
    }
    Ok((u16::from_be_bytes([p.buf[4], p.buf[5]]) as usize, p.buf[6]))
}

#[inline(always)]
fn buf_addr(p: &Packet, at: usize) -> [u8; 16] {
    let mut a = [0u8; 16];
    a.copy_from_slice(&p.buf[at..at + 16]);
    a
}

#[inline(always)]
fn v4_addr(a: [u8; 4]) -> [u8; 16] {
    [a[0], a[1], a[2], a[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
}

/// Minimum L4 header a port-carrying protocol must have in full.
#[inline(always)]
fn l4_min_len(proto: u8) -> usize {
    match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        PROTO_SCTP => 12,
        _ => 0,
    }
}

#[inline(always)]
fn has_ports(proto: u8) -> bool {
    proto == PROTO_TCP || proto == PROTO_UDP || proto == PROTO_SCTP
}

/// Parses the frame into `p` (which the caller provides so that it is built in place, keeping
/// the stack small).
#[inline(never)]
pub fn parse(ctx: &TcContext, p: &mut Packet) -> Result<Frame, Malformed> {
    if fast::parse(ctx, p) {
        return Ok(Frame::Ip);
    }
    let ethertype = u16::from_be(load::<u16>(ctx, p, 12)?);
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx, p).map(|_| Frame::Ip),
        ETH_P_IPV6 => parse_ipv6(ctx, p).map(|_| Frame::Ip),
        ETH_P_ARP => parse_arp(ctx, p).map(|_| Frame::Arp),
        _ => Ok(Frame::OtherL2),
    }
}

/// ARP for IPv4 over Ethernet (what a pod's ARP is): the sender protocol address into
/// `p.claimed`. Anything else calling itself ARP is `Malformed`.
#[inline(always)]
fn parse_arp(ctx: &TcContext, p: &mut Packet) -> Result<(), Malformed> {
    // htype(2) ptype(2) hlen(1) plen(1) oper(2) sha(6) spa(4)
    let h: [u8; 18] = load(ctx, p, ETH_HLEN)?;
    if h[0..2] != [0, 1] || h[2..4] != [0x08, 0x00] || h[4] != 6 || h[5] != 4 {
        return Err(Malformed);
    }
    p.family = AF_INET;
    p.claimed = v4_addr([h[14], h[15], h[16], h[17]]);
    Ok(())
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, p: &mut Packet) -> Result<(), Malformed> {
    let ip: Ipv4Hdr = load(ctx, p, ETH_HLEN)?;
    let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
    let tot_len = u16::from_be(ip.tot_len) as usize;
    if ip.version_ihl >> 4 != 4
        || ihl < 20
        || tot_len < ihl
        || ETH_HLEN + tot_len > ctx.len() as usize
    {
        return Err(Malformed);
    }
    p.family = AF_INET;
    p.src = v4_addr(ip.src);
    p.dst = v4_addr(ip.dst);
    p.proto = ip.proto;
    let l4 = ETH_HLEN + ihl;
    let end = ETH_HLEN + tot_len;

    let frag_off = u16::from_be(ip.frag_off);
    let more_fragments = frag_off & 0x2000 != 0;
    let offset = frag_off & 0x1fff;
    if offset != 0 {
        later_fragment(p, u16::from_be(ip.id) as u32, ip.proto);
        finish(p);
        return Ok(());
    }
    parse_l4(ctx, p, l4, end)?;
    if more_fragments {
        first_fragment(p, u16::from_be(ip.id) as u32, ip.proto);
    }
    finish(p);
    Ok(())
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, p: &mut Packet) -> Result<(), Malformed> {
    let (payload_len, first_next) = load_ipv6(ctx, p, ETH_HLEN)?;
    // payload_len 0 would mean a jumbogram: not on a pod veth.
    if payload_len == 0 || ETH_HLEN + 40 + payload_len > ctx.len() as usize {
        return Err(Malformed);
    }
    p.family = AF_INET6;
    p.src = buf_addr(p, 8);
    p.dst = buf_addr(p, 24);
    // IPv4-mapped addresses never appear on the wire; a pod using them would impersonate an
    // IPv4 peer in tables that are keyed by address.
    if is_v4_mapped(&p.src) || is_v4_mapped(&p.dst) {
        return Err(Malformed);
    }
    let end = ETH_HLEN + 40 + payload_len;
    let mut next = first_next;
    let mut off = ETH_HLEN + 40;
    let mut fragment: Option<(u32, u8, bool)> = None;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            // hop-by-hop, routing, destination options: length in 8-byte units, not counting
            // the first 8.
            0 | 43 | 60 => {
                let h: [u8; 2] = load(ctx, p, off)?;
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            // authentication header: length in 4-byte units, not counting the first 2.
            51 => {
                let h: [u8; 2] = load(ctx, p, off)?;
                next = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            44 => {
                let h: Ipv6FragHdr = load(ctx, p, off)?;
                let later = u16::from_be(h.offset_flags) & 0xfff8 != 0;
                let more = u16::from_be(h.offset_flags) & 1 != 0;
                next = h.next_header;
                off += 8;
                if off > end {
                    return Err(Malformed);
                }
                if later {
                    // What follows is payload, not headers.
                    later_fragment(p, u32::from_be(h.id), h.next_header);
                    finish(p);
                    return Ok(());
                }
                if more {
                    fragment = Some((u32::from_be(h.id), h.next_header, true));
                }
            }
            _ => break,
        }
        if off > end {
            return Err(Malformed);
        }
    }
    if matches!(next, 0 | 43 | 60 | 51 | 44) {
        // Longer chain than we walk: refuse rather than guess.
        return Err(Malformed);
    }
    p.proto = next;
    parse_l4(ctx, p, off, end)?;
    if let Some((id, frag_next, _)) = fragment {
        first_fragment(p, id, frag_next);
    }
    finish(p);
    Ok(())
}

#[inline(always)]
fn is_v4_mapped(a: &[u8; 16]) -> bool {
    a[0] == 0
        && a[1] == 0
        && a[2] == 0
        && a[3] == 0
        && a[4] == 0
        && a[5] == 0
        && a[6] == 0
        && a[7] == 0
        && a[8] == 0
        && a[9] == 0
        && a[10] == 0xff
        && a[11] == 0xff
}

/// Reads ports (or ICMP id / embedded packet) at `l4`; `end` is where the IP payload ends.
#[inline(always)]
fn parse_l4(ctx: &TcContext, p: &mut Packet, l4: usize, end: usize) -> Result<(), Malformed> {
    let proto = p.proto;
    if has_ports(proto) {
        if l4 + l4_min_len(proto) > end {
            return Err(Malformed);
        }
        if proto == PROTO_TCP {
            let t: TcpHead = load(ctx, p, l4)?;
            p.sport = u16::from_be(t.sport);
            p.dport = u16::from_be(t.dport);
            p.tcp_flags = t.flags;
        } else {
            let ports: Ports = load(ctx, p, l4)?;
            p.sport = u16::from_be(ports.sport);
            p.dport = u16::from_be(ports.dport);
        }
        return Ok(());
    }
    if proto == PROTO_ICMP && p.family == AF_INET {
        return parse_icmp(ctx, p, l4, end, false);
    }
    if proto == PROTO_ICMPV6 && p.family == AF_INET6 {
        return parse_icmp(ctx, p, l4, end, true);
    }
    Ok(())
}

#[inline(always)]
fn parse_icmp(
    ctx: &TcContext,
    p: &mut Packet,
    l4: usize,
    end: usize,
    v6: bool,
) -> Result<(), Malformed> {
    if l4 + 8 > end {
        return Err(Malformed);
    }
    let h: IcmpHead = load(ctx, p, l4)?;
    let (echo, error, neighbor) = if v6 {
        (
            h.ty == 128 || h.ty == 129,
            h.ty >= 1 && h.ty <= 4,
            (h.ty >= 130 && h.ty <= 137) || h.ty == 143,
        )
    } else {
        (
            h.ty == 8 || h.ty == 0,
            h.ty == 3 || h.ty == 4 || h.ty == 5 || h.ty == 11 || h.ty == 12,
            false,
        )
    };
    if echo {
        // Request and reply carry the same identifier: the request is (id -> 0), the reply
        // (0 -> id), so the reply's swapped tuple is the request's; the role (in the key, and
        // flipped for replies) keeps a request from ever being taken for the reply of one that
        // went the other way, identifier 0 included.
        (p.sport, p.dport) = echo_ports(h.ty, u16::from_be(h.id));
        p.role = if h.ty == 8 || h.ty == 128 {
            CT_ROLE_REQUEST
        } else {
            CT_ROLE_RESPONSE
        };
    } else if neighbor && link_scoped(p) {
        p.kind = KIND_NEIGHBOR;
        p.icmp_type = h.ty;
        if h.ty == 135 || h.ty == ND_NEIGHBOR_ADVERT {
            // Solicitations and advertisements carry their target after 4 reserved bytes.
            if l4 + 24 > end {
                return Err(Malformed);
            }
            load_raw(ctx, p, l4 + 8, 16)?;
            p.claimed = buf_addr(p, 0);
        }
    } else if error {
        parse_embedded(ctx, p, l4 + 8, end, v6)?;
    } else {
        p.kind = KIND_UNTRACKED;
    }
    Ok(())
}

/// The ports of an ICMP echo request (`id -> 0`) or reply (`0 -> id`).
#[inline(always)]
fn echo_ports(ty: u8, id: u16) -> (u16, u16) {
    if ty == 8 || ty == 128 {
        (id, 0)
    } else {
        (0, id)
    }
}

/// Neighbour discovery and MLD pass unconditionally only where they cannot leave the link: a
/// link-local or unspecified source (the node never forwards those), or a link-local or
/// link-scope multicast destination. Anything else of those types (a pod "soliciting" a remote
/// or global address through the node) is judged as the ICMPv6 it is, so the types cannot
/// carry data past policy.
#[inline(always)]
fn link_scoped(p: &Packet) -> bool {
    is_link_local_or_unspecified(&p.src)
        || (p.dst[0] == 0xfe && p.dst[1] & 0xc0 == 0x80)
        || (p.dst[0] == 0xff && p.dst[1] & 0x0f == 0x02)
}

/// fe80::/10 or ::.
#[inline(always)]
pub fn is_link_local_or_unspecified(a: &[u8; 16]) -> bool {
    (a[0] == 0xfe && a[1] & 0xc0 == 0x80) || *a == [0u8; 16]
}

/// The packet inside an ICMP error: the header of a packet of the flow the error is about.
#[inline(always)]
fn parse_embedded(
    ctx: &TcContext,
    p: &mut Packet,
    inner: usize,
    end: usize,
    v6: bool,
) -> Result<(), Malformed> {
    let (isrc, idst, iproto, il4) = if v6 {
        let (_, next) = load_ipv6(ctx, p, inner)?;
        (buf_addr(p, 8), buf_addr(p, 24), next, inner + 40)
    } else {
        let ip: Ipv4Hdr = load(ctx, p, inner)?;
        let ihl = ((ip.version_ihl & 0x0f) as usize) * 4;
        if ip.version_ihl >> 4 != 4 || ihl < 20 {
            return Err(Malformed);
        }
        (v4_addr(ip.src), v4_addr(ip.dst), ip.proto, inner + ihl)
    };
    // The quoted header must lie inside the error's own payload.
    if il4 > end {
        return Err(Malformed);
    }
    let mut isport = 0u16;
    let mut idport = 0u16;
    if has_ports(iproto) {
        // Errors quote at least 8 bytes of the offending L4 header: the ports are there.
        if il4 + 4 > end {
            return Err(Malformed);
        }
        let ports: Ports = load(ctx, p, il4)?;
        isport = u16::from_be(ports.sport);
        idport = u16::from_be(ports.dport);
    } else if (iproto == PROTO_ICMP && !v6) || (iproto == PROTO_ICMPV6 && v6) {
        if il4 + 8 > end {
            return Err(Malformed);
        }
        let h: IcmpHead = load(ctx, p, il4)?;
        let echo = if v6 {
            h.ty == 128 || h.ty == 129
        } else {
            h.ty == 8 || h.ty == 0
        };
        if echo {
            (isport, idport) = echo_ports(h.ty, u16::from_be(h.id));
            // Swapped below, the quoted request reads as its reply (and the other way round).
            p.role = if h.ty == 8 || h.ty == 128 {
                CT_ROLE_RESPONSE
            } else {
                CT_ROLE_REQUEST
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
    p.kind = KIND_ICMP_ERROR;
    Ok(())
}

/// Ensures the `outer_*` fields describe the packet itself for non-error packets.
#[inline(always)]
fn finish(p: &mut Packet) {
    if p.kind != KIND_ICMP_ERROR {
        p.outer_src = p.src;
        p.outer_dst = p.dst;
        p.outer_proto = p.proto;
    }
}

#[inline(always)]
fn frag_key(p: &Packet, id: u32, proto: u8) -> FragKey {
    FragKey {
        src: p.src,
        dst: p.dst,
        id,
        proto,
        family: p.family,
        _pad: [0; 2],
    }
}

/// Records the ports of a first fragment for the fragments that follow. Keyed by the
/// datagram's own addresses, IP id and protocol (what reassembly goes by). An ICMP error's tuple
/// is the quoted packet's, not the datagram's: its later fragments are judged as plain ICMP
/// (errors are never longer than the minimum MTU, so never fragmented by honest senders).
#[inline(always)]
fn first_fragment(p: &Packet, id: u32, key_proto: u8) {
    if p.kind == KIND_ICMP_ERROR {
        return;
    }
    let ports = FragPorts {
        sport: p.sport,
        dport: p.dport,
        proto: p.proto,
        role: p.role,
        _pad: [0; 2],
    };
    let _ = FRAGMENTS.insert(frag_key(p, id, key_proto), ports, 0);
}

/// A non-first fragment carries no L4 header: take its ports from the first fragment if it was
/// seen; otherwise the ports stay 0, which no port-specific rule allows.
#[inline(always)]
fn later_fragment(p: &mut Packet, id: u32, key_proto: u8) {
    p.proto = key_proto;
    match unsafe { FRAGMENTS.get(frag_key(p, id, key_proto)) } {
        Some(ports) => {
            p.sport = ports.sport;
            p.dport = ports.dport;
            p.proto = ports.proto;
            p.role = ports.role;
        }
        None => p.kind = KIND_UNKNOWN_FRAGMENT,
    }
}
