//! Just enough SCTP (RFC 9260) to open and answer an association handshake from raw IP
//! sockets: this kernel has no SCTP stack (`CONFIG_IP_SCTP` is off), so the rig's servers and
//! probes speak INIT / INIT-ACK themselves over `socket(AF_INET{,6}, SOCK_RAW, IPPROTO_SCTP)`.
//!
//! Raw-socket facts this relies on (Linux): an IPv4 raw socket receives the IP header in front
//! of the payload, an IPv6 raw socket does not; on send, the kernel builds the IP header in both
//! cases (no `IP_HDRINCL`), and computes no SCTP checksum (CRC32c is ours to fill in). Every raw
//! SCTP socket of a network namespace gets a copy of every SCTP packet delivered there, and while
//! one exists the kernel sends no ICMP "protocol unreachable".
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use nix::sys::socket::{MsgFlags, SockaddrIn, SockaddrIn6, SockaddrStorage};

pub const IPPROTO_SCTP: i32 = 132;
pub const CHUNK_INIT: u8 = 1;
pub const CHUNK_INIT_ACK: u8 = 2;
pub const CHUNK_ABORT: u8 = 6;
/// State Cookie parameter of an INIT-ACK.
pub const PARAM_STATE_COOKIE: u16 = 7;
pub const COMMON_HEADER_LEN: usize = 12;

const CRC32C_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = i as u32;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
};

/// CRC32c (Castagnoli), as used by SCTP and iSCSI: `crc32c(b"123456789") == 0xE306_9283`.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc = CRC32C_TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

/// The checksum field of a packet whose checksum field is zero. SCTP stores the CRC32c
/// least-significant byte first (Linux: `cpu_to_le32(~crc32c(~0, ...))`).
fn set_checksum(packet: &mut [u8]) {
    packet[8..12].fill(0);
    let crc = crc32c(packet);
    packet[8..12].copy_from_slice(&crc.to_le_bytes());
}

/// Whether the packet's CRC32c checksum is right.
pub fn checksum_ok(packet: &[u8]) -> bool {
    if packet.len() < COMMON_HEADER_LEN {
        return false;
    }
    let mut copy = packet.to_vec();
    let stored = [copy[8], copy[9], copy[10], copy[11]];
    set_checksum(&mut copy);
    copy[8..12] == stored
}

/// A parsed SCTP packet: the common header and its first chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet<'a> {
    pub sport: u16,
    pub dport: u16,
    pub vtag: u32,
    pub chunk_type: u8,
    pub chunk_flags: u8,
    /// The first chunk's value (after its 4-byte chunk header), bounded by its length.
    pub chunk_value: &'a [u8],
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Parses an SCTP packet (starting at the common header); `None` if it is truncated or its
/// checksum is wrong.
pub fn parse(packet: &[u8]) -> Option<Packet<'_>> {
    if packet.len() < COMMON_HEADER_LEN + 4 || !checksum_ok(packet) {
        return None;
    }
    let chunk = &packet[COMMON_HEADER_LEN..];
    let len = be16(&chunk[2..4]) as usize;
    if len < 4 || len > chunk.len() {
        return None;
    }
    Some(Packet {
        sport: be16(&packet[0..2]),
        dport: be16(&packet[2..4]),
        vtag: be32(&packet[4..8]),
        chunk_type: chunk[0],
        chunk_flags: chunk[1],
        chunk_value: &chunk[4..len],
    })
}

impl Packet<'_> {
    pub fn is_init(&self) -> bool {
        self.chunk_type == CHUNK_INIT && self.vtag == 0 && self.init_fields().is_some()
    }

    pub fn is_init_ack(&self) -> bool {
        self.chunk_type == CHUNK_INIT_ACK && self.init_fields().is_some()
    }

    /// The INIT / INIT-ACK fields of the first chunk.
    pub fn init_fields(&self) -> Option<InitFields> {
        InitFields::parse(self.chunk_value)
    }
}

/// An INIT from `sport` to `dport` with initiate tag `tag`.
pub fn init(sport: u16, dport: u16, tag: u32) -> Vec<u8> {
    init_packet(
        sport,
        dport,
        &InitFields {
            initiate_tag: tag,
            a_rwnd: 65536,
            outbound_streams: 10,
            inbound_streams: 10,
            initial_tsn: tag.rotate_left(7),
        },
    )
}

/// The INIT-ACK answering the INIT `init_pkt`, with our initiate tag `tag` and a State Cookie.
pub fn init_ack(init_pkt: &Packet<'_>, tag: u32) -> Vec<u8> {
    let init = init_pkt.init_fields().unwrap_or(InitFields {
        initiate_tag: 0,
        a_rwnd: 0,
        outbound_streams: 10,
        inbound_streams: 10,
        initial_tsn: 0,
    });
    let ours = InitFields {
        initiate_tag: tag,
        a_rwnd: 65536,
        outbound_streams: 10,
        inbound_streams: 10,
        initial_tsn: tag.rotate_left(11),
    };
    let mut cookie = [0u8; 16];
    cookie[..4].copy_from_slice(&init.initiate_tag.to_be_bytes());
    cookie[4..8].copy_from_slice(&tag.to_be_bytes());
    cookie[8..10].copy_from_slice(&init_pkt.sport.to_be_bytes());
    cookie[10..12].copy_from_slice(&init_pkt.dport.to_be_bytes());
    init_ack_packet(init_pkt, &init, &ours, &cookie)
}

/// The fields shared by INIT and INIT-ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitFields {
    pub initiate_tag: u32,
    pub a_rwnd: u32,
    pub outbound_streams: u16,
    pub inbound_streams: u16,
    pub initial_tsn: u32,
}

impl InitFields {
    pub fn parse(chunk_value: &[u8]) -> Option<InitFields> {
        if chunk_value.len() < 16 {
            return None;
        }
        Some(InitFields {
            initiate_tag: be32(&chunk_value[0..4]),
            a_rwnd: be32(&chunk_value[4..8]),
            outbound_streams: be16(&chunk_value[8..10]),
            inbound_streams: be16(&chunk_value[10..12]),
            initial_tsn: be32(&chunk_value[12..16]),
        })
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.initiate_tag.to_be_bytes());
        out.extend_from_slice(&self.a_rwnd.to_be_bytes());
        out.extend_from_slice(&self.outbound_streams.to_be_bytes());
        out.extend_from_slice(&self.inbound_streams.to_be_bytes());
        out.extend_from_slice(&self.initial_tsn.to_be_bytes());
    }
}

fn packet(src_port: u16, dst_port: u16, vtag: u32, chunk_type: u8, value: &[u8]) -> Vec<u8> {
    let chunk_len = 4 + value.len();
    let mut p = Vec::with_capacity(COMMON_HEADER_LEN + chunk_len.next_multiple_of(4));
    p.extend_from_slice(&src_port.to_be_bytes());
    p.extend_from_slice(&dst_port.to_be_bytes());
    p.extend_from_slice(&vtag.to_be_bytes());
    p.extend_from_slice(&[0; 4]);
    p.push(chunk_type);
    p.push(0);
    p.extend_from_slice(&(chunk_len as u16).to_be_bytes());
    p.extend_from_slice(value);
    p.resize(COMMON_HEADER_LEN + chunk_len.next_multiple_of(4), 0);
    set_checksum(&mut p);
    p
}

/// An INIT packet (verification tag 0, as RFC 9260 requires for INIT).
pub fn init_packet(src_port: u16, dst_port: u16, init: &InitFields) -> Vec<u8> {
    let mut value = Vec::with_capacity(16);
    init.write(&mut value);
    packet(src_port, dst_port, 0, CHUNK_INIT, &value)
}

/// The INIT-ACK answering `init` (ports swapped, verification tag = the INIT's initiate tag),
/// with a State Cookie parameter.
pub fn init_ack_packet(
    init_pkt: &Packet<'_>,
    init: &InitFields,
    ours: &InitFields,
    cookie: &[u8],
) -> Vec<u8> {
    let mut value = Vec::with_capacity(16 + 4 + cookie.len() + 3);
    let ours = InitFields {
        // We may not open more outbound streams than the peer accepts inbound.
        outbound_streams: ours.outbound_streams.min(init.inbound_streams),
        ..*ours
    };
    ours.write(&mut value);
    value.extend_from_slice(&PARAM_STATE_COOKIE.to_be_bytes());
    value.extend_from_slice(&((4 + cookie.len()) as u16).to_be_bytes());
    value.extend_from_slice(cookie);
    packet(
        init_pkt.dport,
        init_pkt.sport,
        init.initiate_tag,
        CHUNK_INIT_ACK,
        &value,
    )
}

/// An ABORT (T bit clear) for the association whose peer tag is `peer_tag`.
pub fn abort_packet(src_port: u16, dst_port: u16, peer_tag: u32) -> Vec<u8> {
    packet(src_port, dst_port, peer_tag, CHUNK_ABORT, &[])
}

/// Random bytes from the kernel.
pub fn random_bytes(buf: &mut [u8]) {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            panic!("getrandom: {}", io::Error::last_os_error());
        }
    }
}

pub fn random_u32() -> u32 {
    let mut b = [0; 4];
    random_bytes(&mut b);
    u32::from_ne_bytes(b)
}

pub fn random_u64() -> u64 {
    let mut b = [0; 8];
    random_bytes(&mut b);
    u64::from_ne_bytes(b)
}

/// A non-blocking raw SCTP socket of the calling thread's network namespace.
pub fn raw_socket(ipv6: bool) -> io::Result<OwnedFd> {
    let family = if ipv6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: plain socket(2); the result is checked and owned below.
    let fd = unsafe {
        libc::socket(
            family,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            IPPROTO_SCTP,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sends an SCTP packet (common header onwards) to `to`; the kernel adds the IP header.
pub fn send_to(fd: &OwnedFd, packet: &[u8], to: IpAddr) -> io::Result<()> {
    let n = match to {
        IpAddr::V4(a) => nix::sys::socket::sendto(
            fd.as_raw_fd(),
            packet,
            &SockaddrIn::from(SocketAddrV4::new(a, 0)),
            MsgFlags::empty(),
        ),
        IpAddr::V6(a) => nix::sys::socket::sendto(
            fd.as_raw_fd(),
            packet,
            &SockaddrIn6::from(SocketAddrV6::new(a, 0, 0, 0)),
            MsgFlags::empty(),
        ),
    }
    .map_err(io::Error::from)?;
    if n != packet.len() {
        return Err(io::Error::other(format!(
            "short raw send: {n} of {}",
            packet.len()
        )));
    }
    Ok(())
}

/// One received SCTP packet: source and destination address and the SCTP bytes.
pub struct Received<'a> {
    pub src: IpAddr,
    /// Known for IPv4 (from the IP header); `None` for IPv6 (no header on IPv6 raw sockets).
    pub dst: Option<IpAddr>,
    pub sctp: &'a [u8],
}

/// Receives one packet from a raw SCTP socket (non-blocking: `WouldBlock` if none is queued),
/// stripping the IPv4 header that IPv4 raw sockets deliver.
pub fn recv_from<'b>(fd: &OwnedFd, buf: &'b mut [u8]) -> io::Result<Received<'b>> {
    let (n, from) = nix::sys::socket::recvfrom::<SockaddrStorage>(fd.as_raw_fd(), buf)
        .map_err(io::Error::from)?;
    let from = from.ok_or_else(|| io::Error::other("raw recvfrom without an address"))?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed IPv4 header");
    if let Some(sin) = from.as_sockaddr_in() {
        let pkt = &buf[..n];
        if pkt.len() < 20 || pkt[0] >> 4 != 4 {
            return Err(bad());
        }
        let ihl = (pkt[0] & 0x0f) as usize * 4;
        let total = be16(&pkt[2..4]) as usize;
        if ihl < 20 || pkt.len() < ihl || total < ihl {
            return Err(bad());
        }
        let end = total.min(pkt.len());
        let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
        Ok(Received {
            src: IpAddr::V4(sin.ip()),
            dst: Some(IpAddr::V4(dst)),
            sctp: &buf[ihl..end],
        })
    } else if let Some(sin6) = from.as_sockaddr_in6() {
        let src: Ipv6Addr = sin6.ip();
        Ok(Received {
            src: IpAddr::V6(src),
            dst: None,
            sctp: &buf[..n],
        })
    } else {
        Err(io::Error::other("raw recvfrom: unexpected address family"))
    }
}

/// Binds a raw SCTP socket to `addr`: it then receives only packets to that address, and its
/// packets leave from it.
pub fn bind(fd: &OwnedFd, addr: IpAddr) -> io::Result<()> {
    match addr {
        IpAddr::V4(a) => {
            nix::sys::socket::bind(fd.as_raw_fd(), &SockaddrIn::from(SocketAddrV4::new(a, 0)))
        }
        IpAddr::V6(a) => nix::sys::socket::bind(
            fd.as_raw_fd(),
            &SockaddrIn6::from(SocketAddrV6::new(a, 0, 0, 0)),
        ),
    }
    .map_err(io::Error::from)
}

/// How the peer answered an INIT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// The matching INIT-ACK.
    InitAck,
    /// An ABORT for our INIT (no listener, or a refusal).
    Abort,
    /// Nothing before the deadline.
    Silence,
}

/// Sends an INIT from the calling thread's network namespace and waits until `deadline` for
/// the matching INIT-ACK: from `to`, ports swapped, verification tag = our initiate tag.
pub fn handshake(to: IpAddr, port: u16, deadline: std::time::Instant) -> io::Result<bool> {
    Ok(handshake_answer(to, port, deadline)? == Answer::InitAck)
}

/// As [`handshake`], telling an ABORT (from `to`, ports swapped, verification tag = our
/// initiate tag, or the T bit set) from silence.
pub fn handshake_answer(to: IpAddr, port: u16, deadline: std::time::Instant) -> io::Result<Answer> {
    let fd = raw_socket(to.is_ipv6())?;
    let initiate_tag = random_u32().max(1);
    let src_port = 1024 + (random_u32() % (65536 - 1024)) as u16;
    let init = InitFields {
        initiate_tag,
        a_rwnd: 65536,
        outbound_streams: 10,
        inbound_streams: 10,
        initial_tsn: random_u32(),
    };
    send_to(&fd, &init_packet(src_port, port, &init), to)?;
    let mut buf = vec![0u8; 65536];
    loop {
        let now = std::time::Instant::now();
        if now >= deadline {
            return Ok(Answer::Silence);
        }
        if !wait_readable(&fd, deadline - now)? {
            return Ok(Answer::Silence);
        }
        loop {
            let rx = match recv_from(&fd, &mut buf) {
                Ok(rx) => rx,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::InvalidData => continue,
                Err(e) => return Err(e),
            };
            if rx.src != to {
                continue;
            }
            let Some(p) = parse(rx.sctp) else { continue };
            if p.chunk_type == CHUNK_INIT_ACK
                && p.sport == port
                && p.dport == src_port
                && p.vtag == initiate_tag
                && InitFields::parse(p.chunk_value).is_some()
            {
                return Ok(Answer::InitAck);
            }
            // RFC 9260 8.4 and 8.5.1: an ABORT answering an INIT carries the INIT's initiate
            // tag, or sets the T bit (reflected tag).
            if p.chunk_type == CHUNK_ABORT
                && p.sport == port
                && p.dport == src_port
                && (p.vtag == initiate_tag || p.chunk_flags & 1 != 0)
            {
                return Ok(Answer::Abort);
            }
        }
    }
}

/// Waits up to `timeout` for `fd` to become readable.
pub fn wait_readable(fd: &OwnedFd, timeout: std::time::Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    match n {
        n if n > 0 => Ok(true),
        0 => Ok(false),
        _ => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn init_and_init_ack_round_trip() {
        let init = InitFields {
            initiate_tag: 0x1234_5678,
            a_rwnd: 65536,
            outbound_streams: 10,
            inbound_streams: 5,
            initial_tsn: 42,
        };
        let pkt = init_packet(40000, 80, &init);
        assert_eq!(pkt.len(), 32);
        let p = parse(&pkt).expect("valid INIT");
        assert_eq!(
            (p.sport, p.dport, p.vtag, p.chunk_type),
            (40000, 80, 0, CHUNK_INIT)
        );
        assert_eq!(InitFields::parse(p.chunk_value), Some(init));

        let ours = InitFields {
            initiate_tag: 0x9abc_def0,
            a_rwnd: 65536,
            outbound_streams: 10,
            inbound_streams: 10,
            initial_tsn: 7,
        };
        let ack = init_ack_packet(&p, &init, &ours, &[1, 2, 3, 4, 5]);
        assert_eq!(ack.len() % 4, 0);
        let a = parse(&ack).expect("valid INIT-ACK");
        assert_eq!(
            (a.sport, a.dport, a.vtag, a.chunk_type),
            (80, 40000, 0x1234_5678, CHUNK_INIT_ACK)
        );
        let f = InitFields::parse(a.chunk_value).unwrap();
        assert_eq!(
            f.outbound_streams, 5,
            "capped by the INIT's inbound streams"
        );
        assert_eq!(be16(&a.chunk_value[16..18]), PARAM_STATE_COOKIE);
        assert_eq!(be16(&a.chunk_value[18..20]), 9);
        assert_eq!(&a.chunk_value[20..25], &[1, 2, 3, 4, 5]);

        let mut corrupt = ack.clone();
        corrupt[20] ^= 1;
        assert!(parse(&corrupt).is_none(), "bad checksum rejected");
    }
}
