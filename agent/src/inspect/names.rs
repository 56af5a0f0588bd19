//! Names of things: protocols, reasons, which endpoints have allows.
use std::collections::BTreeSet;

use anyhow::{Result, anyhow};
use palisade_common::{PROTO_ICMP, PROTO_ICMPV6, PROTO_SCTP, PROTO_TCP, PROTO_UDP, Reason};

use palisade_policy::state::DesiredState;

pub fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        PROTO_SCTP => "SCTP".into(),
        PROTO_ICMP => "ICMP".into(),
        PROTO_ICMPV6 => "ICMPv6".into(),
        0 => "any".into(),
        n => format!("proto-{n}"),
    }
}

/// A protocol by name or number.
pub fn parse_proto(s: &str) -> Result<u8> {
    Ok(match s.to_ascii_uppercase().as_str() {
        "TCP" => PROTO_TCP,
        "UDP" => PROTO_UDP,
        "SCTP" => PROTO_SCTP,
        "ICMP" => PROTO_ICMP,
        "ICMPV6" => PROTO_ICMPV6,
        other => other.parse().map_err(|_| {
            anyhow!("unknown protocol {s:?} (TCP, UDP, SCTP, ICMP, ICMPv6 or a number)")
        })?,
    })
}

/// Whether the protocol has ports.
pub fn has_ports(proto: u8) -> bool {
    matches!(proto, PROTO_TCP | PROTO_UDP | PROTO_SCTP)
}

/// The CLI's name of a datapath reason. `NoRuleMatched` at an endpoint with no allow entry at
/// all in that direction is "default-deny" (its policies isolate it and allow nothing).
pub fn reason_name(reason: Option<Reason>, no_allows: bool) -> &'static str {
    match reason {
        Some(Reason::NoRuleMatched) if no_allows => "default-deny",
        Some(r) => r.name(),
        None => "unknown",
    }
}

/// Which (endpoint, direction) have at least one NetworkPolicy allow entry (entries that only
/// carry ClusterNetworkPolicy tier answers do not count: "default-deny" is NetworkPolicy's).
pub fn endpoints_with_allows(state: &DesiredState) -> BTreeSet<(u32, u8)> {
    state
        .policy
        .iter()
        .filter(|(_, v)| v.rule != 0)
        .map(|(e, _)| (e.key.endpoint, e.key.dir))
        .collect()
}
