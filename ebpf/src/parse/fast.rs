//! The fast path: TCP and UDP over IPv4 without options or fragmentation, or over IPv6 with no
//! extension header, whose headers lie in the skb's linear area, read in place (direct packet
//! access) instead of copied out by `bpf_skb_load_bytes` (a helper call per header).
//!
//! It takes a packet only when every check the slow path makes passes; a packet it doubts
//! (too short, malformed, anything else) goes to the slow path untouched, which then decides,
//! so both paths give one answer for every packet. Nothing is written to `p` before the
//! packet is accepted.
use aya_ebpf::programs::TcContext;
use core::ptr::read_unaligned;
use palisade_common::{AF_INET, AF_INET6, PROTO_TCP, PROTO_UDP};

use super::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, TcpHead, finish};
use crate::packet::Packet;

const IPV4_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
/// The bytes of TCP read (ports to flags) and the header the slow path requires in full.
const TCP_HEAD: usize = core::mem::size_of::<TcpHead>();
const TCP_MIN: usize = 20;
const UDP_MIN: usize = 8;

/// A pointer to `len` bytes at `off`, if the linear area holds them.
#[inline(always)]
fn at(ctx: &TcContext, off: usize, len: usize) -> Option<usize> {
    let start = ctx.data();
    if start + off + len > ctx.data_end() {
        return None;
    }
    Some(start + off)
}

// Fields are read one by one into registers, and addresses copied straight into `p`: a
// header copied whole would land on the stack, which `handle` has little of to spare.

#[inline(always)]
fn u8_at(ptr: usize) -> u8 {
    unsafe { read_unaligned(ptr as *const u8) }
}

#[inline(always)]
fn be16_at(ptr: usize) -> u16 {
    u16::from_be(unsafe { read_unaligned(ptr as *const u16) })
}

#[inline(always)]
fn copy_to(dst: &mut [u8; 16], ptr: usize, len: usize) {
    unsafe { core::ptr::copy_nonoverlapping(ptr as *const u8, dst.as_mut_ptr(), len) };
}

/// Fills `p` and returns true if the packet is one the fast path takes.
#[inline(always)]
pub fn parse(ctx: &TcContext, p: &mut Packet) -> bool {
    let Some(eth) = at(ctx, 0, ETH_HLEN) else {
        return false;
    };
    match be16_at(eth + 12) {
        ETH_P_IP => ipv4(ctx, p),
        ETH_P_IPV6 => ipv6(ctx, p),
        _ => false,
    }
}

/// `(sport, dport, tcp flags)` of a TCP or UDP header at `l4`, with `room` bytes of IP
/// payload for it.
#[inline(always)]
fn ports(ctx: &TcContext, proto: u8, l4: usize, room: usize) -> Option<(u16, u16, u8)> {
    match proto {
        PROTO_TCP if room >= TCP_MIN => {
            let t = at(ctx, l4, TCP_HEAD)?;
            Some((be16_at(t), be16_at(t + 2), u8_at(t + 13)))
        }
        PROTO_UDP if room >= UDP_MIN => {
            let u = at(ctx, l4, 4)?;
            Some((be16_at(u), be16_at(u + 2), 0))
        }
        _ => None,
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, p: &mut Packet) -> bool {
    let Some(ip) = at(ctx, ETH_HLEN, IPV4_HLEN) else {
        return false;
    };
    let tot_len = be16_at(ip + 2) as usize;
    let proto = u8_at(ip + 9);
    // Version 4 with no options; no fragment (DF may be set).
    if u8_at(ip) != 0x45
        || tot_len < IPV4_HLEN
        || ETH_HLEN + tot_len > ctx.len() as usize
        || be16_at(ip + 6) & 0x3fff != 0
    {
        return false;
    }
    let Some((sport, dport, flags)) = ports(ctx, proto, ETH_HLEN + IPV4_HLEN, tot_len - IPV4_HLEN)
    else {
        return false;
    };
    // `p` is fresh: the rest of each address stays zero (`v4_addr`).
    p.family = AF_INET;
    copy_to(&mut p.src, ip + 12, 4);
    copy_to(&mut p.dst, ip + 16, 4);
    p.proto = proto;
    p.sport = sport;
    p.dport = dport;
    p.tcp_flags = flags;
    finish(p);
    true
}

/// `is_v4_mapped` of the address at `ptr`.
#[inline(always)]
fn v4_mapped_at(ptr: usize) -> bool {
    let (head, tail): (u64, u32) = unsafe {
        (
            read_unaligned(ptr as *const u64),
            read_unaligned((ptr + 8) as *const u32),
        )
    };
    head == 0 && tail == u32::from_ne_bytes([0, 0, 0xff, 0xff])
}

#[inline(always)]
fn ipv6(ctx: &TcContext, p: &mut Packet) -> bool {
    let Some(ip) = at(ctx, ETH_HLEN, IPV6_HLEN) else {
        return false;
    };
    let payload_len = be16_at(ip + 4) as usize;
    let next = u8_at(ip + 6);
    if u8_at(ip) >> 4 != 6
        || payload_len == 0
        || ETH_HLEN + IPV6_HLEN + payload_len > ctx.len() as usize
        || v4_mapped_at(ip + 8)
        || v4_mapped_at(ip + 24)
    {
        return false;
    }
    let Some((sport, dport, flags)) = ports(ctx, next, ETH_HLEN + IPV6_HLEN, payload_len) else {
        return false;
    };
    p.family = AF_INET6;
    copy_to(&mut p.src, ip + 8, 16);
    copy_to(&mut p.dst, ip + 24, 16);
    p.proto = next;
    p.sport = sport;
    p.dport = dport;
    p.tcp_flags = flags;
    finish(p);
    true
}
