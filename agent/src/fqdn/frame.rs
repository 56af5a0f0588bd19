//! The bytes of a held DNS answer: where its DNS payload is, and the checksum it must carry
//! when sent on (a copy of a frame from the node's own stack may hold only a partial one).
use std::net::IpAddr;

/// The parts of an Ethernet + IPv4/IPv6 + UDP/TCP frame a held answer needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L4 {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub sport: u16,
    pub dport: u16,
    /// TCP sequence number (0 for UDP).
    pub seq: u32,
    /// Offset of the L3 header, of the L4 header, and of the payload.
    pub l3: usize,
    pub l4: usize,
    pub payload: usize,
    /// End of the L3 packet (frames may carry padding).
    pub end: usize,
}

const UDP: u8 = 17;
const TCP: u8 = 6;

/// Reads the headers of a frame; `None` if it is not unfragmented UDP or TCP over IP.
pub fn parse(frame: &[u8]) -> Option<L4> {
    let be16 = |o: usize| -> Option<u16> {
        Some(u16::from_be_bytes([*frame.get(o)?, *frame.get(o + 1)?]))
    };
    let l3 = 14;
    let (src, dst, proto, l4, end) = match be16(12)? {
        0x0800 => {
            let ihl = usize::from(frame.get(l3)? & 0x0f) * 4;
            let total = usize::from(be16(l3 + 2)?);
            let frag = be16(l3 + 6)?;
            if ihl < 20 || frag & 0x3fff != 0 {
                return None;
            }
            let a: [u8; 4] = frame.get(l3 + 12..l3 + 16)?.try_into().ok()?;
            let b: [u8; 4] = frame.get(l3 + 16..l3 + 20)?.try_into().ok()?;
            (
                IpAddr::from(a),
                IpAddr::from(b),
                *frame.get(l3 + 9)?,
                l3 + ihl,
                l3 + total,
            )
        }
        0x86dd => {
            let plen = usize::from(be16(l3 + 4)?);
            let a: [u8; 16] = frame.get(l3 + 8..l3 + 24)?.try_into().ok()?;
            let b: [u8; 16] = frame.get(l3 + 24..l3 + 40)?.try_into().ok()?;
            // No extension headers: DNS answers carry none.
            (
                IpAddr::from(a),
                IpAddr::from(b),
                *frame.get(l3 + 6)?,
                l3 + 40,
                l3 + 40 + plen,
            )
        }
        _ => return None,
    };
    if end > frame.len() || l4 > end {
        return None;
    }
    let (payload, seq) = match proto {
        UDP => (l4 + 8, 0),
        TCP => {
            let off = usize::from(frame.get(l4 + 12)? >> 4) * 4;
            let seq = u32::from_be_bytes(frame.get(l4 + 4..l4 + 8)?.try_into().ok()?);
            (l4 + off, seq)
        }
        _ => return None,
    };
    if payload > end {
        return None;
    }
    Some(L4 {
        src,
        dst,
        proto,
        sport: be16(l4)?,
        dport: be16(l4 + 2)?,
        seq,
        l3,
        l4,
        payload,
        end,
    })
}

/// Writes the full L4 checksum (and for IPv4 the header checksum) into `frame`.
pub fn fix_checksums(frame: &mut [u8], h: &L4) {
    let csum_at = h.l4 + if h.proto == UDP { 6 } else { 16 };
    if csum_at + 2 > h.end {
        return;
    }
    frame[csum_at] = 0;
    frame[csum_at + 1] = 0;
    let len = h.end - h.l4;
    let mut sum: u64 = 0;
    let mut add = |bytes: &[u8]| {
        for c in bytes.chunks(2) {
            sum += u64::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    match (h.src, h.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            add(&s.octets());
            add(&d.octets());
            add(&[0, h.proto]);
            add(&(len as u16).to_be_bytes());
        }
        (s, d) => {
            let o = |a: IpAddr| match a {
                IpAddr::V6(a) => a.octets(),
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            };
            add(&o(s));
            add(&o(d));
            add(&(len as u32).to_be_bytes());
            add(&[0, 0, 0, h.proto]);
        }
    }
    add(&frame[h.l4..h.end]);
    let mut folded = sum;
    while folded > 0xffff {
        folded = (folded & 0xffff) + (folded >> 16);
    }
    let mut c = !(folded as u16);
    if c == 0 && h.proto == UDP {
        c = 0xffff;
    }
    frame[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    if h.src.is_ipv4() {
        frame[h.l3 + 10] = 0;
        frame[h.l3 + 11] = 0;
        let mut s: u32 = 0;
        for c in frame[h.l3..h.l4].chunks(2) {
            s += u32::from(u16::from_be_bytes([c[0], c[1]]));
        }
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        frame[h.l3 + 10..h.l3 + 12].copy_from_slice(&(!(s as u16)).to_be_bytes());
    }
}

/// A TCP frame longer than `mtu` at L3 (a GSO segment the node's stack forwarded whole) as
/// frames of at most `mtu`, their sequence numbers and lengths adjusted (checksums are left to
/// `fix_checksums`). Anything else is returned as it is.
pub fn segment(frame: &[u8], h: &L4, mtu: usize) -> Vec<(Vec<u8>, L4)> {
    let headers = h.payload - h.l3;
    if h.proto != TCP || h.end - h.l3 <= mtu || headers >= mtu {
        return vec![(frame[..h.end].to_vec(), h.clone())];
    }
    let room = mtu - headers;
    let payload = &frame[h.payload..h.end];
    let chunks: Vec<&[u8]> = payload.chunks(room).collect();
    let last = chunks.len() - 1;
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, chunk)| {
            let mut f = frame[..h.payload].to_vec();
            f.extend_from_slice(chunk);
            let seq = h.seq.wrapping_add((i * room) as u32);
            f[h.l4 + 4..h.l4 + 8].copy_from_slice(&seq.to_be_bytes());
            if i != last {
                // FIN and PSH only on the last.
                f[h.l4 + 13] &= !0x09;
            }
            let l3_len = f.len() - h.l3;
            if h.src.is_ipv4() {
                f[h.l3 + 2..h.l3 + 4].copy_from_slice(&(l3_len as u16).to_be_bytes());
            } else {
                f[h.l3 + 4..h.l3 + 6].copy_from_slice(&((l3_len - 40) as u16).to_be_bytes());
            }
            let end = f.len();
            let l4 = L4 {
                seq,
                end,
                ..h.clone()
            };
            (f, l4)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + UDP frame 10.0.0.10:53 -> 10.0.0.2:40000 with `payload`.
    fn udp4(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12] = 0x08;
        let total = 20 + 8 + payload.len();
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0, 10, 0, 0, 10, 10, 0, 0, 2,
        ];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        f.extend(ip);
        f.extend(53u16.to_be_bytes());
        f.extend(40000u16.to_be_bytes());
        f.extend(((8 + payload.len()) as u16).to_be_bytes());
        f.extend([0xde, 0xad]);
        f.extend(payload);
        f
    }

    /// The one's-complement sum of `bytes` folded: 0xffff when a checksum inside is right.
    fn folded(bytes: &[u8]) -> u16 {
        let mut s: u32 = bytes
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    #[test]
    fn a_udp_answer_is_found_and_its_checksums_made_whole() {
        let mut f = udp4(b"hello dns");
        let h = parse(&f).unwrap();
        assert_eq!(h.sport, 53);
        assert_eq!(&f[h.payload..h.end], b"hello dns");
        fix_checksums(&mut f, &h);
        assert_eq!(folded(&f[14..34]), 0xffff, "IPv4 header checksum");
        let mut pseudo = Vec::new();
        pseudo.extend([10, 0, 0, 10, 10, 0, 0, 2, 0, 17]);
        pseudo.extend(((h.end - h.l4) as u16).to_be_bytes());
        pseudo.extend(&f[h.l4..h.end]);
        assert_eq!(folded(&pseudo), 0xffff, "UDP checksum");
    }

    #[test]
    fn a_large_tcp_segment_is_cut_to_the_mtu() {
        let mut f = udp4(&[7u8; 3000]);
        // Make it TCP: a 20-byte header in place of the UDP one.
        f[14 + 9] = 6;
        f.truncate(34);
        let mut tcp = vec![0u8; 20];
        tcp[0..2].copy_from_slice(&53u16.to_be_bytes());
        tcp[4..8].copy_from_slice(&1000u32.to_be_bytes());
        tcp[12] = 5 << 4;
        tcp[13] = 0x18; // PSH, ACK
        f.extend(tcp);
        f.extend(vec![7u8; 3000]);
        let total = (f.len() - 14) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        let h = parse(&f).unwrap();
        let parts = segment(&f, &h, 1500);
        assert_eq!(parts.len(), 3);
        let mut next = 1000u32;
        for (i, (p, ph)) in parts.iter().enumerate() {
            let again = parse(p).unwrap();
            assert_eq!(&again, ph);
            assert!(p.len() - 14 <= 1500);
            assert_eq!(again.seq, next);
            next += (again.end - again.payload) as u32;
            assert_eq!(p[34 + 13] & 0x08 != 0, i == 2, "PSH on the last only");
        }
        assert_eq!(next, 4000);
    }

    #[test]
    fn fragments_and_other_protocols_are_not_read() {
        let mut f = udp4(b"x");
        f[14 + 6] = 0x20; // more fragments
        assert!(parse(&f).is_none());
        let mut g = udp4(b"x");
        g[14 + 9] = 1; // ICMP
        assert!(parse(&g).is_none());
        assert!(parse(&g[..20]).is_none());
    }
}
