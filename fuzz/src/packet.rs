//! Packet generator and mutator: valid packets of flows the generator remembers (so that
//! replies, repeats, ICMP errors and fragments refer to real state), then every kind of hostile
//! packet: truncated at every layer, lying lengths, IPv4 options, IPv4 and IPv6 fragments (first
//! and later, known and orphan), IPv6 extension-header chains (short, long, truncated), VLAN tags,
//! unknown EtherTypes, neighbour discovery from every scope, forged ICMP errors, spoofed sources,
//! random bytes.
use std::net::IpAddr;

use palisade_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP};

use crate::cluster::PORTS;
use crate::rng::Rng;

/// Where a packet is sent: an endpoint (index into `World::eps`) or an interface without one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Endpoint(usize),
    NoEndpoint,
}

/// A generated packet: where, which direction, the frame, and what the generator meant.
pub struct Sent {
    pub target: Target,
    pub dir: u8,
    pub frame: Vec<u8>,
    pub what: &'static str,
}

/// What the generator knows of the node.
pub struct World {
    /// Each endpoint's own addresses (v4, v6).
    pub eps: Vec<(Option<IpAddr>, Option<IpAddr>)>,
    pub v4: Vec<IpAddr>,
    pub v6: Vec<IpAddr>,
}

/// The header fields of a packet of a flow.
#[derive(Clone, Debug)]
struct Tuple {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    sport: u16,
    dport: u16,
    /// TCP flags, or the ICMP type.
    flags: u8,
}

impl Tuple {
    fn v6(&self) -> bool {
        self.src.is_ipv6()
    }

    fn reply(&self) -> Tuple {
        let flags = match (self.proto, self.flags) {
            (PROTO_TCP, f) if f & 0x02 != 0 => 0x12,
            (PROTO_TCP, _) => 0x10,
            (PROTO_ICMP, 8) => 0,
            (PROTO_ICMPV6, 128) => 129,
            (_, f) => f,
        };
        Tuple {
            src: self.dst,
            dst: self.src,
            proto: self.proto,
            sport: self.dport,
            dport: self.sport,
            flags,
        }
    }
}

/// A packet sent earlier, remembered for replies, repeats and errors.
#[derive(Clone)]
struct Memo {
    tuple: Tuple,
    ep: usize,
    dir: u8,
    /// The IP packet (no Ethernet header), for ICMP errors to quote.
    ip: Vec<u8>,
}

/// A first fragment sent earlier.
#[derive(Clone)]
struct FragMemo {
    src: IpAddr,
    dst: IpAddr,
    proto: u8,
    id: u32,
    ep: usize,
    dir: u8,
}

pub struct Generator {
    memo: Vec<Memo>,
    frags: Vec<FragMemo>,
    next_id: u32,
}

const MEMO: usize = 256;

fn octets(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

fn eth(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn ethertype_of(ip: &[u8]) -> u16 {
    if ip.first().is_some_and(|b| b >> 4 == 6) {
        0x86dd
    } else {
        0x0800
    }
}

/// The L4 header (and a little payload) of `t`.
fn l4(rng: &mut Rng, t: &Tuple) -> Vec<u8> {
    let mut h = match t.proto {
        PROTO_TCP => {
            let mut h = vec![0u8; 20];
            h[12] = 0x50;
            h[13] = t.flags;
            h
        }
        PROTO_UDP => {
            let mut h = vec![0u8; 8];
            h[4..6].copy_from_slice(&8u16.to_be_bytes());
            h
        }
        PROTO_SCTP => vec![0u8; 12],
        PROTO_ICMP | PROTO_ICMPV6 => {
            let mut h = vec![t.flags, 0, 0, 0, 0, 0, 0, 1];
            // Echo: the identifier is the request's source port / the reply's destination port.
            let id = if t.sport != 0 { t.sport } else { t.dport };
            h[4..6].copy_from_slice(&id.to_be_bytes());
            return h;
        }
        _ => {
            let n = rng.below(24);
            return rng.bytes(n);
        }
    };
    h[0..2].copy_from_slice(&t.sport.to_be_bytes());
    h[2..4].copy_from_slice(&t.dport.to_be_bytes());
    let extra = rng.below(12);
    h.extend(rng.bytes(extra));
    h
}

/// An IP packet (no Ethernet header). `frag`: (id, offset in 8-byte units, more fragments).
fn ip(t: &Tuple, payload: &[u8], frag: Option<(u32, u16, bool)>, options: usize) -> Vec<u8> {
    if t.v6() {
        let mut chain = Vec::new();
        let mut next = t.proto;
        if let Some((id, off, more)) = frag {
            chain.extend([t.proto, 0]);
            chain.extend(((off << 3) | u16::from(more)).to_be_bytes());
            chain.extend(id.to_be_bytes());
            next = 44;
        }
        ipv6(
            t.src,
            t.dst,
            next,
            64,
            &[chain.as_slice(), payload].concat(),
        )
    } else {
        let mut h = vec![0u8; 20 + options * 4];
        h[0] = 0x40 | (5 + options as u8);
        let tot = (h.len() + payload.len()) as u16;
        h[2..4].copy_from_slice(&tot.to_be_bytes());
        if let Some((id, off, more)) = frag {
            h[4..6].copy_from_slice(&(id as u16).to_be_bytes());
            h[6..8].copy_from_slice(&(off | if more { 0x2000 } else { 0 }).to_be_bytes());
        }
        h[8] = 64;
        h[9] = t.proto;
        h[12..16].copy_from_slice(&octets(t.src));
        h[16..20].copy_from_slice(&octets(t.dst));
        for (i, b) in h[20..].iter_mut().enumerate() {
            // NOP options ending in End of Options, with a record-route-looking start.
            *b = if i == 0 && options > 1 { 7 } else { 1 };
        }
        h.extend_from_slice(payload);
        h
    }
}

fn ipv6(src: IpAddr, dst: IpAddr, next: u8, hop_limit: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0u8; 40];
    h[0] = 0x60;
    h[4..6].copy_from_slice(&(payload.len() as u16).to_be_bytes());
    h[6] = next;
    h[7] = hop_limit;
    h[8..24].copy_from_slice(&octets(src));
    h[24..40].copy_from_slice(&octets(dst));
    h.extend_from_slice(payload);
    h
}

/// An IPv6 extension-header chain ending in `last`: types from the walked set (hop-by-hop,
/// routing, destination options, AH, fragment) and a few the datapath treats as upper layers.
fn ext_chain(rng: &mut Rng, len: usize, last: u8) -> (u8, Vec<u8>) {
    let types: Vec<u8> = (0..len)
        .map(|_| *rng.pick(&[0u8, 0, 43, 60, 60, 51, 44, 135, 139, 59]))
        .collect();
    let mut out = Vec::new();
    for (i, ty) in types.iter().enumerate() {
        let next = types.get(i + 1).copied().unwrap_or(last);
        match ty {
            44 => {
                // An atomic fragment most of the time; sometimes a real first fragment.
                let more = u8::from(rng.chance(0.2));
                out.extend([next, 0, 0, more]);
                out.extend(rng.bytes(4));
            }
            51 => {
                let l = rng.below(3) as u8 + 1;
                out.extend([next, l]);
                out.extend(rng.bytes((usize::from(l) + 2) * 4 - 2));
            }
            0 | 43 | 60 => {
                let l = if rng.chance(0.8) {
                    0
                } else {
                    rng.below(4) as u8
                };
                out.extend([next, l]);
                out.extend(rng.bytes((usize::from(l) + 1) * 8 - 2));
            }
            _ => {
                out.extend([next, 0]);
                out.extend(rng.bytes(6));
            }
        }
    }
    (types.first().copied().unwrap_or(last), out)
}

impl Generator {
    pub fn new() -> Generator {
        Generator {
            memo: Vec::new(),
            frags: Vec::new(),
            next_id: 1,
        }
    }

    pub fn clear(&mut self) {
        self.memo.clear();
        self.frags.clear();
    }

    fn remember(&mut self, rng: &mut Rng, m: Memo) {
        if self.memo.len() < MEMO {
            self.memo.push(m);
        } else {
            let i = rng.below(MEMO);
            self.memo[i] = m;
        }
    }

    fn addr(&self, rng: &mut Rng, w: &World, v6: bool) -> IpAddr {
        let pool = if v6 { &w.v6 } else { &w.v4 };
        if rng.chance(0.1) {
            // A random address near the pods'.
            return if v6 {
                IpAddr::from([
                    0xfd,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    rng.below(4) as u8,
                    0,
                    rng.u8(),
                ])
            } else {
                IpAddr::from([10, 0, rng.below(4) as u8, rng.u8()])
            };
        }
        *rng.pick(pool)
    }

    fn port(&self, rng: &mut Rng) -> u16 {
        match rng.below(10) {
            0 => 0,
            1 => 65535,
            2..=6 => rng
                .pick(PORTS)
                .wrapping_add(rng.range(0, 6) as u16)
                .wrapping_sub(2),
            _ => rng.u16(),
        }
    }

    /// A new flow's first packet at endpoint `ep` in `dir` (the endpoint's own address on its
    /// side, mostly).
    fn new_tuple(&self, rng: &mut Rng, w: &World, ep: usize, dir: u8) -> Tuple {
        let (o4, o6) = w.eps[ep];
        let v6 = match (o4, o6) {
            (Some(_), Some(_)) => rng.chance(0.4),
            (None, Some(_)) => !rng.chance(0.05),
            _ => rng.chance(0.05),
        };
        let own = if v6 { o6 } else { o4 };
        let local = match own {
            Some(a) if !rng.chance(0.08) => a,
            _ => self.addr(rng, w, v6),
        };
        let peer = if rng.chance(0.03) {
            local
        } else {
            self.addr(rng, w, v6)
        };
        let (src, dst) = if dir == 0 {
            (peer, local)
        } else {
            (local, peer)
        };
        let proto = match rng.weighted(&[35, 25, 10, 12, 4, 4]) {
            0 => PROTO_TCP,
            1 => PROTO_UDP,
            2 => PROTO_SCTP,
            3 | 4 => {
                if v6 {
                    PROTO_ICMPV6
                } else {
                    PROTO_ICMP
                }
            }
            _ => *rng.pick(&[
                0u8,
                2,
                4,
                41,
                47,
                50,
                89,
                103,
                255,
                PROTO_ICMP,
                PROTO_ICMPV6,
            ]),
        };
        let (sport, dport, flags) = match proto {
            PROTO_TCP => {
                let flags = *rng.pick(&[0x02u8, 0x02, 0x02, 0x12, 0x10, 0x11, 0x04, 0x18]);
                (self.port(rng), self.port(rng), flags)
            }
            PROTO_UDP | PROTO_SCTP => (self.port(rng), self.port(rng), 0),
            PROTO_ICMP | PROTO_ICMPV6 if (proto == PROTO_ICMPV6) == v6 => {
                let id = rng.u16();
                match rng.below(4) {
                    0 | 1 => (id, 0, if v6 { 128 } else { 8 }),
                    2 => (0, id, if v6 { 129 } else { 0 }),
                    _ => {
                        let ty = if v6 {
                            *rng.pick(&[100u8, 139, 140, 200, 255, 5, 127])
                        } else {
                            *rng.pick(&[13u8, 14, 9, 10, 17, 30, 255])
                        };
                        (0, 0, ty)
                    }
                }
            }
            _ => (0, 0, 0),
        };
        Tuple {
            src,
            dst,
            proto,
            sport,
            dport,
            flags,
        }
    }

    fn endpoint_of(&self, w: &World, a: IpAddr) -> Option<usize> {
        w.eps
            .iter()
            .position(|(v4, v6)| *v4 == Some(a) || *v6 == Some(a))
    }

    fn emit(&mut self, rng: &mut Rng, t: Tuple, ep: usize, dir: u8, what: &'static str) -> Sent {
        let payload = l4(rng, &t);
        let packet = ip(&t, &payload, None, 0);
        self.remember(
            rng,
            Memo {
                tuple: t,
                ep,
                dir,
                ip: packet.clone(),
            },
        );
        Sent {
            target: Target::Endpoint(ep),
            dir,
            frame: eth(ethertype_of(&packet), &packet),
            what,
        }
    }

    /// The next packet.
    pub fn next(&mut self, rng: &mut Rng, w: &World) -> Sent {
        let ep = rng.below(w.eps.len());
        let dir = rng.below(2) as u8;
        let have_memo = !self.memo.is_empty();
        let mut sent = match rng.weighted(&[28, 16, 6, 10, 8, 10, 7, 4, 4, 4, 1, 2]) {
            1 if have_memo => {
                let m = self.memo[rng.below(self.memo.len())].clone();
                let t = m.tuple.reply();
                self.emit(rng, t, m.ep, 1 - m.dir, "reply")
            }
            2 if have_memo => {
                // The same packet at the other end, when that end is a local pod too.
                let m = self.memo[rng.below(self.memo.len())].clone();
                let other = if m.dir == 0 { m.tuple.src } else { m.tuple.dst };
                match self.endpoint_of(w, other) {
                    Some(e) => self.emit(rng, m.tuple, e, 1 - m.dir, "other end"),
                    None => self.emit(rng, m.tuple.reply(), m.ep, 1 - m.dir, "reply"),
                }
            }
            3 if have_memo => {
                let m = self.memo[rng.below(self.memo.len())].clone();
                let mut t = m.tuple.clone();
                if t.proto == PROTO_TCP {
                    t.flags = *rng.pick(&[0x10u8, 0x18, 0x11, 0x14, 0x04, 0x02, 0x12]);
                }
                let t = if rng.chance(0.5) { t.reply() } else { t };
                let dir = if t.src == m.tuple.src {
                    m.dir
                } else {
                    1 - m.dir
                };
                self.emit(rng, t, m.ep, dir, "repeat")
            }
            4 if have_memo => self.icmp_error(rng, w),
            5 => self.fragment(rng, w, ep, dir),
            6 => self.ext_chain_packet(rng, w, ep, dir),
            7 => {
                let t = self.new_tuple(rng, w, ep, dir);
                let payload = l4(rng, &t);
                let packet = if t.v6() {
                    ip(&t, &payload, None, 0)
                } else {
                    ip(&t, &payload, None, rng.range(1, 10) as usize)
                };
                Sent {
                    target: Target::Endpoint(ep),
                    dir,
                    frame: eth(ethertype_of(&packet), &packet),
                    what: "IPv4 options",
                }
            }
            8 => self.neighbor(rng, w, ep, dir),
            9 => self.l2(rng, w, ep, dir),
            10 => {
                let t = self.new_tuple(rng, w, ep, dir);
                let mut s = self.emit(rng, t, ep, dir, "no endpoint");
                s.target = Target::NoEndpoint;
                s
            }
            11 => {
                let et = *rng.pick(&[0x0800u16, 0x86dd]);
                let n = rng.below(120);
                let mut body = rng.bytes(n);
                if let Some(b) = body.first_mut() {
                    *b = if et == 0x0800 { 0x45 } else { 0x60 };
                }
                Sent {
                    target: Target::Endpoint(ep),
                    dir,
                    frame: eth(et, &body),
                    what: "random bytes",
                }
            }
            _ => {
                let t = self.new_tuple(rng, w, ep, dir);
                self.emit(rng, t, ep, dir, "new flow")
            }
        };
        if rng.chance(0.2) {
            self.mutate(rng, &mut sent);
        }
        sent
    }

    /// An ICMP error about a remembered packet, from its destination (or a router), sometimes
    /// with the quoted header forged.
    fn icmp_error(&mut self, rng: &mut Rng, w: &World) -> Sent {
        let m = self.memo[rng.below(self.memo.len())].clone();
        let v6 = m.tuple.v6();
        // The error travels against the quoted packet: into the pod if the pod sent it.
        let dir = 1 - m.dir;
        let sender = if rng.chance(0.7) {
            m.tuple.dst
        } else {
            self.addr(rng, w, v6)
        };
        let mut quoted = m.ip.clone();
        let keep = if rng.chance(0.7) {
            quoted.len()
        } else {
            rng.below(quoted.len() + 1)
        };
        quoted.truncate(keep);
        let forged = rng.chance(0.25);
        if forged && !quoted.is_empty() {
            for _ in 0..rng.range(1, 3) {
                let i = rng.below(quoted.len());
                quoted[i] = rng.u8();
            }
        }
        let ty = if v6 {
            *rng.pick(&[1u8, 2, 3, 4])
        } else {
            *rng.pick(&[3u8, 4, 5, 11, 12])
        };
        let mut icmp = vec![ty, rng.below(4) as u8, 0, 0, 0, 0, 0, 0];
        icmp.extend(quoted);
        let proto = if v6 { PROTO_ICMPV6 } else { PROTO_ICMP };
        let t = Tuple {
            src: sender,
            dst: m.tuple.src,
            proto,
            sport: 0,
            dport: 0,
            flags: ty,
        };
        let fragmented = rng.chance(0.15);
        let frag = fragmented.then(|| {
            let id = self.next_id & if v6 { u32::MAX } else { 0xffff };
            self.next_id = self.next_id.wrapping_add(1);
            self.frags.push(FragMemo {
                src: t.src,
                dst: t.dst,
                proto,
                id,
                ep: m.ep,
                dir,
            });
            (id, 0, true)
        });
        if self.frags.len() > MEMO {
            self.frags.swap_remove(0);
        }
        let packet = ip(&t, &icmp, frag, 0);
        Sent {
            target: Target::Endpoint(m.ep),
            dir,
            frame: eth(ethertype_of(&packet), &packet),
            what: match (fragmented, forged) {
                (true, _) => "fragmented ICMP error",
                (false, true) => "forged ICMP error",
                (false, false) => "ICMP error",
            },
        }
    }

    fn fragment(&mut self, rng: &mut Rng, w: &World, ep: usize, dir: u8) -> Sent {
        if !self.frags.is_empty() && rng.chance(0.6) {
            // A later fragment of a datagram whose first fragment was sent (or a guess).
            let f = self.frags[rng.below(self.frags.len())].clone();
            let id = if rng.chance(0.85) { f.id } else { f.id ^ 1 };
            let proto = if rng.chance(0.9) { f.proto } else { PROTO_TCP };
            let t = Tuple {
                src: f.src,
                dst: f.dst,
                proto,
                sport: 0,
                dport: 0,
                flags: 0,
            };
            let off = rng.range(1, 200) as u16;
            let n = rng.below(64);
            let body = rng.bytes(n);
            let packet = ip(&t, &body, Some((id, off, rng.chance(0.5))), 0);
            let (ep, dir) = if rng.chance(0.85) {
                (f.ep, f.dir)
            } else {
                (ep, dir)
            };
            return Sent {
                target: Target::Endpoint(ep),
                dir,
                frame: eth(ethertype_of(&packet), &packet),
                what: "later fragment",
            };
        }
        let t = if !self.memo.is_empty() && rng.chance(0.4) {
            let m = self.memo[rng.below(self.memo.len())].clone();
            return self.first_fragment(rng, m.tuple, m.ep, m.dir);
        } else {
            self.new_tuple(rng, w, ep, dir)
        };
        if rng.chance(0.2) {
            // An orphan: a later fragment of a datagram never seen.
            let off = rng.range(1, 100) as u16;
            let n = rng.below(40);
            let body = rng.bytes(n);
            let id = rng.next_u64() as u32;
            let packet = ip(&t, &body, Some((id, off, false)), 0);
            return Sent {
                target: Target::Endpoint(ep),
                dir,
                frame: eth(ethertype_of(&packet), &packet),
                what: "orphan fragment",
            };
        }
        self.first_fragment(rng, t, ep, dir)
    }

    fn first_fragment(&mut self, rng: &mut Rng, t: Tuple, ep: usize, dir: u8) -> Sent {
        let id = if t.v6() {
            self.next_id
        } else {
            self.next_id & 0xffff
        };
        self.next_id = self.next_id.wrapping_add(1);
        let mut payload = l4(rng, &t);
        let n = rng.below(16);
        payload.extend(rng.bytes(n));
        let packet = ip(&t, &payload, Some((id, 0, true)), 0);
        let f = FragMemo {
            src: t.src,
            dst: t.dst,
            proto: t.proto,
            id,
            ep,
            dir,
        };
        if self.frags.len() < MEMO {
            self.frags.push(f);
        } else {
            let i = rng.below(MEMO);
            self.frags[i] = f;
        }
        self.remember(
            rng,
            Memo {
                tuple: t,
                ep,
                dir,
                ip: packet.clone(),
            },
        );
        Sent {
            target: Target::Endpoint(ep),
            dir,
            frame: eth(ethertype_of(&packet), &packet),
            what: "first fragment",
        }
    }

    fn ext_chain_packet(&mut self, rng: &mut Rng, w: &World, ep: usize, dir: u8) -> Sent {
        let mut t = self.new_tuple(rng, w, ep, dir);
        if !t.v6() {
            let o6 = w.eps[ep].1;
            let local = o6.unwrap_or_else(|| *rng.pick(&w.v6));
            let peer = *rng.pick(&w.v6);
            (t.src, t.dst) = if dir == 0 {
                (peer, local)
            } else {
                (local, peer)
            };
            if t.proto == PROTO_ICMP {
                t.proto = PROTO_ICMPV6;
                t.flags = 128;
            }
        }
        let len = match rng.below(10) {
            0..=5 => rng.range(1, 4) as usize,
            6..=8 => rng.range(5, 9) as usize,
            _ => rng.range(10, 14) as usize,
        };
        let (first, mut chain) = ext_chain(rng, len, t.proto);
        chain.extend(l4(rng, &t));
        let packet = ipv6(t.src, t.dst, first, 64, &chain);
        Sent {
            target: Target::Endpoint(ep),
            dir,
            frame: eth(0x86dd, &packet),
            what: "IPv6 extension headers",
        }
    }

    /// Neighbour discovery and MLD, from and to every scope.
    fn neighbor(&mut self, rng: &mut Rng, w: &World, ep: usize, dir: u8) -> Sent {
        let own = w.eps[ep]
            .1
            .unwrap_or_else(|| "fd00::1:1".parse().expect("valid"));
        let scoped: [IpAddr; 5] = [
            "fe80::1".parse().expect("valid"),
            "fe80::abcd".parse().expect("valid"),
            "::".parse().expect("valid"),
            "ff02::1".parse().expect("valid"),
            "ff02::1:ff00:1".parse().expect("valid"),
        ];
        let pick = |rng: &mut Rng| -> IpAddr {
            match rng.below(3) {
                0 => *rng.pick(&scoped),
                1 => own,
                _ => self.addr(rng, w, true),
            }
        };
        let (src, dst) = (pick(rng), pick(rng));
        let ty = *rng.pick(&[130u8, 131, 132, 133, 134, 135, 136, 137, 143]);
        let mut body = vec![ty, 0, 0, 0];
        let n = 4 + rng.below(24);
        body.extend(rng.bytes(n));
        let hop = *rng.pick(&[255u8, 1, 64]);
        let packet = ipv6(src, dst, PROTO_ICMPV6, hop, &body);
        Sent {
            target: Target::Endpoint(ep),
            dir,
            frame: eth(0x86dd, &packet),
            what: "neighbour discovery",
        }
    }

    fn l2(&mut self, rng: &mut Rng, w: &World, ep: usize, dir: u8) -> Sent {
        let t = self.new_tuple(rng, w, ep, dir);
        let payload = l4(rng, &t);
        let packet = ip(&t, &payload, None, 0);
        let (frame, what) = match rng.below(8) {
            0 => {
                let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
                arp.extend(rng.bytes(20));
                (eth(0x0806, &arp), "ARP")
            }
            6 => {
                // ARP speaking for the pod itself, another address, or nobody (A10).
                let sender: [u8; 4] = match (rng.below(3), w.eps[ep].0) {
                    (0, Some(IpAddr::V4(own))) => own.octets(),
                    (1, _) => [0; 4],
                    _ => match self.addr(rng, w, false) {
                        IpAddr::V4(a) => a.octets(),
                        IpAddr::V6(_) => [10, 0, 0, 1],
                    },
                };
                let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 2];
                arp.extend(rng.bytes(6));
                arp.extend(sender);
                arp.extend(rng.bytes(10));
                (eth(0x0806, &arp), "ARP claim")
            }
            7 => {
                // Stacked priority tags (VID 0) around a packet with any source (A3): the
                // kernel would deliver the packet inside.
                let mut tagged = vec![0, 0, 0x81, 0, 0, 0];
                tagged.extend(ethertype_of(&packet).to_be_bytes());
                tagged.extend(&packet);
                (eth(*rng.pick(&[0x8100u16, 0x88a8]), &tagged), "VID 0 tags")
            }
            1 | 2 => {
                // 802.1Q (or 802.1ad) tag, then the IP packet.
                let tpid = *rng.pick(&[0x8100u16, 0x88a8, 0x9100]);
                let mut tagged = (rng.u16() & 0x0fff).to_be_bytes().to_vec();
                tagged.extend(ethertype_of(&packet).to_be_bytes());
                tagged.extend(&packet);
                (eth(tpid, &tagged), "VLAN tag")
            }
            3 => {
                let et = *rng.pick(&[0x88ccu16, 0x8863, 0x8864, 0x0842, 0x8035, 0x22f0, 0x0000]);
                (eth(et, &packet), "unknown EtherType")
            }
            4 => {
                // The IP packet claims to be the other family.
                let et = if ethertype_of(&packet) == 0x0800 {
                    0x86dd
                } else {
                    0x0800
                };
                (eth(et, &packet), "wrong EtherType")
            }
            _ => {
                let n = rng.below(20);
                let mut f = eth(*rng.pick(&[0x0800u16, 0x86dd, 0x0806]), &packet);
                f.truncate(14 + n);
                (f, "short frame")
            }
        };
        Sent {
            target: Target::Endpoint(ep),
            dir,
            frame,
            what,
        }
    }

    /// Breaks a packet: truncation at any layer, flipped bytes, lying length fields.
    fn mutate(&self, rng: &mut Rng, s: &mut Sent) {
        let f = &mut s.frame;
        if f.len() <= 14 {
            return;
        }
        let v4 = f[12..14] == [0x08, 0x00];
        let v6 = f[12..14] == [0x86, 0xdd];
        match rng.below(7) {
            0 => {
                let n = rng.range(14, f.len() as u64 - 1) as usize;
                f.truncate(n);
                // Keep the IP length fields honest about the truncation now and then, so the
                // cut lands inside headers rather than just failing the length check.
                if rng.chance(0.5) {
                    if v4 && f.len() >= 18 {
                        let tot = (f.len() - 14) as u16;
                        f[16..18].copy_from_slice(&tot.to_be_bytes());
                    } else if v6 && f.len() >= 20 {
                        let plen = f.len().saturating_sub(54) as u16;
                        f[18..20].copy_from_slice(&plen.to_be_bytes());
                    }
                }
                s.what = "truncated";
            }
            1 | 2 => {
                for _ in 0..rng.range(1, 3) {
                    let i = rng.range(14, f.len() as u64 - 1) as usize;
                    f[i] = rng.u8();
                }
                s.what = "flipped bytes";
            }
            3 if v4 && f.len() >= 34 => {
                f[14] = (f[14] & 0xf0) | rng.below(16) as u8;
                s.what = "lying IHL";
            }
            4 if v4 && f.len() >= 34 => {
                let v = rng.u16() % 200;
                f[16..18].copy_from_slice(&v.to_be_bytes());
                s.what = "lying total length";
            }
            5 if v6 && f.len() >= 54 => {
                let v = rng.u16() % 200;
                f[18..20].copy_from_slice(&v.to_be_bytes());
                s.what = "lying payload length";
            }
            _ => {
                let n = rng.below(40);
                f.extend(rng.bytes(n));
                s.what = "trailing bytes";
            }
        }
    }
}
