//! The plain reading of the Kubernetes NetworkPolicy specification, used to check the compiler
//! (through `datapath_model`). No maps, identities, classes or prefix matching: policies are
//! iterated and matched literally.
//!
//! * A pod is isolated for ingress (egress) when some policy of its namespace selects it by
//!   `podSelector` and has that policy type; an isolated pod accepts (sends) only what the union
//!   of those policies' rules allows.
//! * A connection is allowed when the source's egress AND the destination's ingress allow it.
//! * A rule allows when one of its peers matches (no peers: everything) and one of its ports
//!   matches (no ports: everything). Named ports are looked up on the destination pod.
//! * A pod peer is matched by namespace selector (absent: the policy's namespace) AND pod
//!   selector (absent: every pod); an ipBlock matches every address inside `cidr` and not inside
//!   any `except`, pod addresses included.
//! * Traffic between a pod and its node, and a pod's traffic to itself, is never restricted.
//!   hostNetwork pods are not endpoints and, as peers, are only their address.
use std::net::IpAddr;

use crate::model::{Peer, PodInfo, Policy, Rule, Store};
use crate::state::{Direction, PodRef};

/// One end of a connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// A pod, and the address of it the connection uses.
    Pod { pod: PodRef, ip: IpAddr },
    /// An address that is not a pod's (outside the cluster, another node, ...).
    External(IpAddr),
    /// An address of the node the other end runs on.
    Host(IpAddr),
}

impl Endpoint {
    pub fn ip(&self) -> IpAddr {
        match self {
            Endpoint::Pod { ip, .. } | Endpoint::External(ip) | Endpoint::Host(ip) => *ip,
        }
    }

    /// The pod, if this is a pod that policy applies to (not hostNetwork).
    fn pod<'s>(&self, store: &'s Store) -> Option<(&'s PodRef, &'s PodInfo)> {
        match self {
            Endpoint::Pod { pod, .. } => store
                .pods
                .get_key_value(pod)
                .filter(|(_, info)| !info.host_network)
                .map(|(k, info)| (k, &**info)),
            _ => None,
        }
    }
}

/// Is a connection from `src` to `dst` with this protocol and destination port allowed?
pub fn allowed(store: &Store, src: &Endpoint, dst: &Endpoint, proto: u8, port: u16) -> bool {
    egress_allowed(store, src, dst, proto, port) && ingress_allowed(store, src, dst, proto, port)
}

/// Does the source's egress policy allow the connection? (Always, if `src` is not a pod.)
pub fn egress_allowed(store: &Store, src: &Endpoint, dst: &Endpoint, proto: u8, port: u16) -> bool {
    direction_allowed(store, Direction::Egress, src, dst, dst, proto, port)
}

/// Does the destination's ingress policy allow the connection? (Always, if `dst` is not a pod.)
pub fn ingress_allowed(
    store: &Store,
    src: &Endpoint,
    dst: &Endpoint,
    proto: u8,
    port: u16,
) -> bool {
    direction_allowed(store, Direction::Ingress, dst, src, dst, proto, port)
}

/// The policies that isolate `pod` in `dir`.
pub fn isolating<'s>(
    store: &'s Store,
    pod: &PodRef,
    info: &PodInfo,
    dir: Direction,
) -> Vec<&'s Policy> {
    store
        .policies
        .values()
        .filter(|p| p.namespace == pod.namespace)
        .filter(|p| p.pod_selector.matches(&info.labels))
        .filter(|p| p.rules(dir).is_some())
        .collect()
}

/// `subject` is the pod whose policy is checked, `peer` the other end, `dst` the destination
/// (named ports are resolved on it).
fn direction_allowed(
    store: &Store,
    dir: Direction,
    subject: &Endpoint,
    peer: &Endpoint,
    dst: &Endpoint,
    proto: u8,
    port: u16,
) -> bool {
    let Some((pod_ref, info)) = subject.pod(store) else {
        return true;
    };
    if matches!(peer, Endpoint::Host(_)) || peer.ip() == subject.ip() {
        return true;
    }
    let policies = isolating(store, pod_ref, info, dir);
    if policies.is_empty() {
        return true;
    }
    let named_on = dst.pod(store).map(|(_, info)| info);
    policies.iter().any(|p| {
        p.rules(dir)
            .unwrap_or_default()
            .iter()
            .any(|r| rule_allows(store, p, r, peer, named_on, proto, port))
    })
}

fn rule_allows(
    store: &Store,
    policy: &Policy,
    rule: &Rule,
    peer: &Endpoint,
    named_on: Option<&PodInfo>,
    proto: u8,
    port: u16,
) -> bool {
    let peer_ok = match &rule.peers {
        None => true,
        Some(peers) => peers.iter().any(|p| peer_matches(store, policy, p, peer)),
    };
    let port_ok = match &rule.ports {
        None => true,
        Some(ports) => ports.iter().any(|p| p.matches(proto, port, named_on)),
    };
    peer_ok && port_ok
}

fn peer_matches(store: &Store, policy: &Policy, peer: &Peer, who: &Endpoint) -> bool {
    match peer {
        Peer::IpBlock { cidr, except } => {
            let ip = who.ip();
            cidr.contains(ip) && !except.iter().any(|e| e.contains(ip))
        }
        Peer::Pods {
            namespace_selector,
            pod_selector,
        } => {
            let Some((pod_ref, info)) = who.pod(store) else {
                return false;
            };
            let ns_ok = match namespace_selector {
                None => pod_ref.namespace == policy.namespace,
                Some(s) => s.matches(&store.namespace_labels(&pod_ref.namespace)),
            };
            ns_ok
                && pod_selector
                    .as_ref()
                    .is_none_or(|s| s.matches(&info.labels))
        }
    }
}
