//! The second oracle: is a packet the datapath let through *justified* by NetworkPolicy and the
//! documented exceptions, read from the spec alone (`palisade_policy::reference`)?
//!
//! It shares none of the model's (nor the datapath's) conntrack machinery: no keys, roles,
//! closing states or revisions. A flow is a conversation the spec allowed its opener to start,
//! remembered by its two endpoints and ports; a packet is justified if policy allows it as a
//! new flow now, or if it continues or answers a remembered flow that policy still allows,
//! with the rules any reader of the spec would apply: an echo request is never an answer, a
//! bare SYN never answers, an ICMP error is about the flow it quotes. It checks one way only
//! (everything passed must be justified); false drops are the model's business.
use std::collections::HashSet;
use std::net::IpAddr;

use palisade_common::{AF_INET, AF_INET6, DIR_EGRESS, DIR_INGRESS, PROTO_ICMP, PROTO_ICMPV6};

use crate::model::{
    Ep, Frame, Kind, Pkt, Policy, TCP_ACK, TCP_SYN, addr as ip, link_local_or_unspecified,
};

/// One conversation the spec allowed: (endpoint, opening direction, local address and port,
/// remote address and port, protocol). For ICMP echo the "port" is the identifier.
type Flow = (usize, u8, IpAddr, u16, IpAddr, u16, u8);

#[derive(Default)]
pub struct Spec {
    flows: HashSet<Flow>,
}

/// An address as the model's tuples hold it (IPv4 in the first four bytes).
fn bytes(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(a) => {
            let mut b = [0u8; 16];
            b[..4].copy_from_slice(&a.octets());
            b
        }
        IpAddr::V6(a) => a.octets(),
    }
}

/// An ICMP echo's (identifier, is a request), from the parsed tuple.
fn echo(p: &Pkt) -> Option<(u16, bool)> {
    let icmp = (p.family == AF_INET && p.proto == PROTO_ICMP)
        || (p.family == AF_INET6 && p.proto == PROTO_ICMPV6);
    if !icmp || p.kind != Kind::Normal {
        return None;
    }
    match (p.sport, p.dport) {
        (id, 0) if p.role == crate::model::ROLE_REQUEST => Some((id, true)),
        (0, id) if p.role == crate::model::ROLE_RESPONSE => Some((id, false)),
        _ => None,
    }
}

impl Spec {
    pub fn clear(&mut self) {
        self.flows.clear();
    }

    /// Is passing `frame` at endpoint `ep` in `dir` justified? Remembers flows it justifies
    /// as new.
    pub fn justified(
        &mut self,
        policy: &Policy<'_>,
        eps: &[Ep],
        ep: Option<usize>,
        dir: u8,
        hairpin: bool,
        frame: &Frame,
    ) -> Result<(), &'static str> {
        let Some(e) = ep else {
            return Err("an interface without an endpoint");
        };
        let pod = &eps[e].pod;
        let own = |family: u8, a: &[u8; 16]| eps[e].own.contains(&ip(family, a));
        let from_pod = dir == DIR_EGRESS;
        let p = match frame {
            Frame::Malformed(_) => return Err("a malformed frame"),
            Frame::Arp(sender) => {
                return if !from_pod || *sender == [0; 16] || own(AF_INET, sender) {
                    Ok(())
                } else {
                    Err("ARP from a pod for an address not its own")
                };
            }
            Frame::OtherL2 if from_pod => return Err("a non-IP frame from a pod"),
            Frame::OtherL2 => {
                return if !policy.isolated(pod, dir) || policy.audited(pod, dir) {
                    Ok(())
                } else {
                    Err("a non-IP frame into an isolated pod")
                };
            }
            Frame::Ip(p) => p,
        };
        let (src, dst) = (ip(p.family, &p.outer_src), ip(p.family, &p.outer_dst));
        if from_pod {
            let link_local = p.family == AF_INET6 && link_local_or_unspecified(&p.outer_src);
            if !(own(p.family, &p.outer_src) || link_local) {
                return Err("a pod sending from an address not its own");
            }
            if dst.is_loopback() {
                return Err("a pod reaching a loopback address");
            }
        }
        if p.kind == Kind::Neighbor {
            return Ok(()); // the model holds the exact ND rules; the spec says nothing
        }
        if from_pod
            && policy.hosts.contains(&dst)
            && (matches!(p.outer_proto, 4 | 41 | 47 | 97)
                || (p.outer_proto == 17 && matches!(p.dport, 4789 | 8472 | 6081)))
        {
            return Err("a pod tunnelling into the node");
        }
        // NetworkPolicy never restricts a pod and its own node, nor a pod and itself. (A flow
        // with the node is a flow like any other for the errors about it.)
        let peer_outer = if from_pod { dst } else { src };
        if policy.hosts.contains(&peer_outer) {
            if p.kind == Kind::Normal && echo(p).is_none_or(|(_, req)| req) {
                let id = echo(p).map(|(id, _)| id);
                let (l, lp, r, rp) = if from_pod {
                    (ip(p.family, &p.src), p.sport, ip(p.family, &p.dst), p.dport)
                } else {
                    (ip(p.family, &p.dst), p.dport, ip(p.family, &p.src), p.sport)
                };
                let (lk, rk) = id.map_or((lp, rp), |id| (id, id));
                self.flows.insert((e, dir, l, lk, r, rk, p.proto));
            }
            return Ok(());
        }
        if p.src == p.dst && own(p.family, &p.dst) && (from_pod || hairpin) {
            return Ok(());
        }
        // What the packet is about: its own tuple, or for an ICMP error the quoted one.
        let (local, lport, remote, rport) = if from_pod {
            (ip(p.family, &p.src), p.sport, ip(p.family, &p.dst), p.dport)
        } else {
            (ip(p.family, &p.dst), p.dport, ip(p.family, &p.src), p.sport)
        };
        let allows = |open_dir: u8, port: u16| {
            let d = policy.allows(pod, open_dir, p.family, &bytes(remote), p.proto, port);
            d.allowed || d.audited
        };
        if p.kind == Kind::IcmpError {
            // About a flow the spec allowed (either way), or allowed as the ICMP it is.
            let icmp_quoted = p.proto == PROTO_ICMP || p.proto == PROTO_ICMPV6;
            let (lport, rport) = if icmp_quoted {
                // A quoted echo: its identifier, as echo flows are remembered.
                let id = lport.max(rport);
                (id, id)
            } else {
                (lport, rport)
            };
            let about = self.flows.iter().any(|f| {
                f.0 == e && f.2 == local && f.4 == remote && f.3 == lport && f.5 == rport
                    || f.0 == e && f.2 == local && f.4 == remote && f.3 == rport && f.5 == lport
            });
            let outer_peer = if from_pod { dst } else { src };
            let d = policy.allows(pod, dir, p.family, &bytes(outer_peer), p.outer_proto, 0);
            return if about || d.allowed || d.audited {
                Ok(())
            } else {
                Err("an ICMP error about no flow the spec allowed")
            };
        }
        let opposite = if dir == DIR_INGRESS {
            DIR_EGRESS
        } else {
            DIR_INGRESS
        };
        let (lkey, rkey) = match echo(p) {
            // Echo: the identifier on both sides; only a reply answers.
            Some((id, _)) => (id, id),
            None => (lport, rport),
        };
        // A continuation of a flow this side opened, still allowed.
        let opened_here = self
            .flows
            .contains(&(e, dir, local, lkey, remote, rkey, p.proto));
        let dport = if dir == DIR_INGRESS { lport } else { rport };
        if opened_here && allows(dir, if echo(p).is_some() { 0 } else { dport }) {
            let request_or_plain = echo(p).is_none_or(|(_, req)| req);
            if request_or_plain {
                return Ok(());
            }
        }
        // An answer to a flow the other side opened, still allowed there.
        let bare_syn = p.proto == 6 && p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let is_request = echo(p).is_some_and(|(_, req)| req);
        if !bare_syn
            && !is_request
            && self
                .flows
                .contains(&(e, opposite, local, lkey, remote, rkey, p.proto))
        {
            let port = if echo(p).is_some() {
                0
            } else if opposite == DIR_INGRESS {
                lport
            } else {
                rport
            };
            if allows(opposite, port) {
                return Ok(());
            }
        }
        // A new flow: what policy allows, with port 0 for what has none.
        let port = if echo(p).is_some() || p.kind == Kind::Untracked {
            0
        } else {
            dport
        };
        if allows(dir, port) {
            let answers_only = echo(p).is_some_and(|(_, req)| !req);
            if p.kind == Kind::Normal && !answers_only {
                self.flows
                    .insert((e, dir, local, lkey, remote, rkey, p.proto));
            }
            return Ok(());
        }
        Err("nothing in the spec allows it")
    }
}
