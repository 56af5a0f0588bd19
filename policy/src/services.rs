//! Services: egress policy through a Service's virtual IP means its backend pods.
//!
//! A pod usually reaches a peer through a Service. `from_pod` runs at the TC ingress of the
//! pod's host-side veth, before netfilter, so it sees the ClusterIP, not the backend kube-proxy
//! will pick (the DNAT happens in PREROUTING, after TC; the backend is chosen at random there).
//! The destination's `to_pod` runs after the DNAT and sees real addresses, and replies are
//! un-DNATed by the kernel before they reach the client's veth, so the client's conntrack entry
//! (keyed by the VIP) matches them. Only the client's egress verdict needs the Service.
//!
//! So the agent **compiles** Services instead of translating them in the datapath: every
//! virtual address of a Service (ClusterIPs, externalIPs and VIP-mode load-balancer IPs, which
//! kube-proxy DNATs alike) gets an identity of its own (`SERVICE_IDENTITY_FIRST..`), and an
//! endpoint isolated for egress gets an allow entry `(endpoint, service identity, egress,
//! protocol, service port)` exactly when its egress policy allows **every** backend of that
//! port on its target port (judged by `datapath_model`, i.e. exactly as the programs judge a
//! flow to the backend's own address; ipBlocks and named ports included). Since the backend is
//! not known before the DNAT, "every" is the only choice that never lets a pod reach, through
//! the VIP, a backend it could not reach directly; when backends are allowed unevenly the VIP
//! is denied (fail closed) and the agent reports it. A port without backends allows nothing.
//! ARCHITECTURE.md ("Services") has the reasons for not translating in the datapath.
//!
//! Backends are an EndpointSlice's ready endpoints (or, when a port has none, its serving and
//! terminating ones, as kube-proxy falls back to), restricted to this node's endpoints for
//! `internalTrafficPolicy: Local`.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use palisade_common::{
    CIDR_CLASS_BIT, EP_ISOLATED_EGRESS, EP_TIERED_EGRESS, IDENTITY_HOST, NodePortKey,
    NodePortTarget, POLICY_FLAG_AUDIT, POLICY_KEY_FULL_BITS, PeerAddr, PolicyKey, PolicyValue,
    TIER_ACTION_ACCEPT, TIER_ACTION_DENY, TIER_ACTION_PASS, TierMatch, ip_of,
};

use crate::datapath_model::{self, ModelReason, ModelVerdict};
use crate::model::{ConfigError, DEFAULT_NAMESPACE, Protocol};
use crate::state::{DesiredState, Direction, PolicyEntry};

/// Service identities: above every pod identity the compiler hands out in practice, below the
/// CIDR class bit. (The compiler's identity range formally reaches up to the class bit; a
/// compile that uses an id in this range turns Service expansion off, with an error, rather
/// than mixing the two.)
pub const SERVICE_IDENTITY_FIRST: u32 = 0x7f00_0000;
pub const SERVICE_IDENTITY_LAST: u32 = CIDR_CLASS_BIT - 1;

/// The label an EndpointSlice names its Service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// `namespace/name` of a Service or EndpointSlice.
pub type Key = (String, String);

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServicePortInfo {
    /// Empty for a Service's single unnamed port.
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
    /// The NodePort kube-proxy opens on every node address for this port, if any.
    pub node_port: Option<u16>,
}

/// What policy needs of a Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceInfo {
    /// Every address kube-proxy DNATs for this Service: ClusterIPs, externalIPs, VIP-mode
    /// load-balancer IPs. Empty for headless and ExternalName Services.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePortInfo>,
    /// `internalTrafficPolicy: Local`: pods reach only the endpoints on their own node.
    pub local_only: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<String>,
}

/// What policy needs of an EndpointSlice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SliceInfo {
    /// The Service it belongs to (same namespace).
    pub service: String,
    /// (port name, resolved target port, protocol); the name is empty for an unnamed port.
    pub ports: Vec<(String, u16, Protocol)>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// Services and EndpointSlices, as read from the API or from files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceStore {
    pub services: BTreeMap<Key, ServiceInfo>,
    pub slices: BTreeMap<Key, SliceInfo>,
    errors: BTreeMap<(bool, Key), ConfigError>,
}

fn namespace_of(ns: Option<&String>) -> String {
    ns.filter(|n| !n.is_empty())
        .cloned()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
}

fn protocol(p: Option<&String>, object: &str, field: String) -> Result<Protocol, ConfigError> {
    match p {
        None => Ok(Protocol::Tcp),
        Some(s) => Protocol::parse(s)
            .ok_or_else(|| ConfigError::new(object, field, format!("unsupported protocol {s:?}"))),
    }
}

fn port_number(n: i32, object: &str, field: String) -> Result<u16, ConfigError> {
    u16::try_from(n)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| ConfigError::new(object, field, format!("{n} is out of range (1-65535)")))
}

impl ServiceInfo {
    pub fn from_k8s(svc: &Service) -> Result<(Key, ServiceInfo), ConfigError> {
        let name = svc.metadata.name.clone().unwrap_or_default();
        let ns = namespace_of(svc.metadata.namespace.as_ref());
        let object = format!("Service {ns}/{name}");
        if name.is_empty() {
            return Err(ConfigError::new(object, "metadata.name", "is required"));
        }
        let mut info = ServiceInfo::default();
        let Some(spec) = &svc.spec else {
            return Ok(((ns, name), info));
        };
        if spec.type_.as_deref() == Some("ExternalName") {
            return Ok(((ns, name), info));
        }
        info.local_only = spec.internal_traffic_policy.as_deref() == Some("Local");
        let mut vips: Vec<(String, &String)> = Vec::new();
        match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => vips.extend(
                ips.iter()
                    .enumerate()
                    .map(|(i, ip)| (format!("spec.clusterIPs[{i}]"), ip)),
            ),
            _ => vips.extend(
                spec.cluster_ip
                    .iter()
                    .map(|ip| ("spec.clusterIP".to_string(), ip)),
            ),
        }
        vips.extend(
            spec.external_ips
                .iter()
                .flatten()
                .enumerate()
                .map(|(i, ip)| (format!("spec.externalIPs[{i}]"), ip)),
        );
        if let Some(lb) = svc.status.as_ref().and_then(|s| s.load_balancer.as_ref()) {
            for (i, ing) in lb.ingress.iter().flatten().enumerate() {
                // "Proxy" mode: the load balancer proxies, kube-proxy does not DNAT the IP.
                if ing.ip_mode.as_deref() == Some("Proxy") {
                    continue;
                }
                if let Some(ip) = &ing.ip {
                    vips.push((format!("status.loadBalancer.ingress[{i}].ip"), ip));
                }
            }
        }
        for (field, ip) in vips {
            if ip.is_empty() || ip == "None" {
                continue; // headless
            }
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| ConfigError::new(&object, field, format!("{ip:?} is not an IP")))?;
            if !info.vips.contains(&ip) {
                info.vips.push(ip);
            }
        }
        for (i, p) in spec.ports.iter().flatten().enumerate() {
            let field = format!("spec.ports[{i}]");
            info.ports.push(ServicePortInfo {
                name: p.name.clone().unwrap_or_default(),
                port: port_number(p.port, &object, format!("{field}.port"))?,
                protocol: protocol(p.protocol.as_ref(), &object, format!("{field}.protocol"))?,
                node_port: match p.node_port {
                    Some(n) if n != 0 => {
                        Some(port_number(n, &object, format!("{field}.nodePort"))?)
                    }
                    _ => None,
                },
            });
        }
        Ok(((ns, name), info))
    }
}

impl SliceInfo {
    pub fn from_k8s(slice: &EndpointSlice) -> Result<(Key, SliceInfo), ConfigError> {
        let name = slice.metadata.name.clone().unwrap_or_default();
        let ns = namespace_of(slice.metadata.namespace.as_ref());
        let object = format!("EndpointSlice {ns}/{name}");
        if name.is_empty() {
            return Err(ConfigError::new(object, "metadata.name", "is required"));
        }
        let service = slice
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(SERVICE_NAME_LABEL))
            .cloned()
            .unwrap_or_default();
        let mut info = SliceInfo {
            service,
            ..SliceInfo::default()
        };
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            return Ok(((ns, name), info)); // FQDN slices: not kube-proxy's.
        }
        for (i, p) in slice.ports.iter().flatten().enumerate() {
            let field = format!("ports[{i}]");
            let Some(port) = p.port else { continue };
            info.ports.push((
                p.name.clone().unwrap_or_default(),
                port_number(port, &object, format!("{field}.port"))?,
                protocol(p.protocol.as_ref(), &object, format!("{field}.protocol"))?,
            ));
        }
        for (i, e) in slice.endpoints.iter().flatten().enumerate() {
            let c = e.conditions.clone().unwrap_or_default();
            let mut addresses = Vec::new();
            for (j, a) in e.addresses.iter().enumerate() {
                let ip: IpAddr = a.parse().map_err(|_| {
                    ConfigError::new(
                        &object,
                        format!("endpoints[{i}].addresses[{j}]"),
                        format!("{a:?} is not an IP"),
                    )
                })?;
                addresses.push(ip);
            }
            info.endpoints.push(SliceEndpoint {
                addresses,
                // The API: a nil `ready` or `serving` is "unknown", to be read as true.
                ready: c.ready.unwrap_or(true),
                serving: c.serving.unwrap_or(c.ready.unwrap_or(true)),
                terminating: c.terminating.unwrap_or(false),
                node_name: e.node_name.clone(),
            });
        }
        Ok(((ns, name), info))
    }
}

/// The kinds this module reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
}

impl ServiceStore {
    /// Adds or replaces a Service. On error the previous version (if any) stays and the error is
    /// kept in `errors()` (an unreadable Service only ever allows less: its VIPs get no allows
    /// or keep the old ones).
    pub fn apply_service(&mut self, svc: &Service) -> Result<(), ConfigError> {
        let ns = namespace_of(svc.metadata.namespace.as_ref());
        let key = (ns, svc.metadata.name.clone().unwrap_or_default());
        match ServiceInfo::from_k8s(svc) {
            Ok((k, info)) => {
                self.errors.remove(&(false, k.clone()));
                self.services.insert(k, info);
                Ok(())
            }
            Err(e) => {
                self.errors.insert((false, key), e.clone());
                Err(e)
            }
        }
    }

    pub fn apply_slice(&mut self, slice: &EndpointSlice) -> Result<(), ConfigError> {
        let ns = namespace_of(slice.metadata.namespace.as_ref());
        let key = (ns, slice.metadata.name.clone().unwrap_or_default());
        match SliceInfo::from_k8s(slice) {
            Ok((k, info)) => {
                self.errors.remove(&(true, k.clone()));
                self.slices.insert(k, info);
                Ok(())
            }
            Err(e) => {
                // A slice that cannot be read has no backends: its Service's VIPs get no
                // allows from it (fail closed).
                self.slices.remove(&key);
                self.errors.insert((true, key), e.clone());
                Err(e)
            }
        }
    }

    pub fn remove(&mut self, kind: Kind, key: &Key) {
        let slice = kind == Kind::EndpointSlice;
        if slice {
            self.slices.remove(key);
        } else {
            self.services.remove(key);
        }
        self.errors.remove(&(slice, key.clone()));
    }

    /// The keys held of `kind` (for a relist: what it did not list is gone).
    pub fn keys(&self, kind: Kind) -> Vec<Key> {
        match kind {
            Kind::Service => self.services.keys().cloned().collect(),
            Kind::EndpointSlice => self.slices.keys().cloned().collect(),
        }
    }

    pub fn errors(&self) -> Vec<&ConfigError> {
        self.errors.values().collect()
    }

    /// The backends of one port of a Service: (address, target port), as kube-proxy on
    /// `node` would choose among them.
    pub fn backends(
        &self,
        key: &Key,
        svc: &ServiceInfo,
        port: &ServicePortInfo,
        node: Option<&str>,
    ) -> Vec<(IpAddr, u16)> {
        let mut ready = BTreeSet::new();
        let mut fallback = BTreeSet::new();
        let lo = (key.0.clone(), String::new());
        for ((_, _), slice) in self
            .slices
            .range(lo..)
            .take_while(|((ns, _), _)| *ns == key.0)
        {
            if slice.service != key.1 {
                continue;
            }
            let Some(target) = slice
                .ports
                .iter()
                .find(|(n, _, p)| *n == port.name && *p == port.protocol)
                .map(|(_, t, _)| *t)
            else {
                continue;
            };
            for e in &slice.endpoints {
                if svc.local_only && (node.is_none() || e.node_name.as_deref() != node) {
                    continue;
                }
                let set = if e.ready {
                    &mut ready
                } else if e.serving && e.terminating {
                    &mut fallback
                } else {
                    continue;
                };
                set.extend(e.addresses.iter().map(|a| (*a, target)));
            }
        }
        if ready.is_empty() { fallback } else { ready }
            .into_iter()
            .collect()
    }
}

/// Stable identity ids for Services (so that an unrelated change renumbers nothing and the map
/// writer's diff stays small).
#[derive(Clone, Debug, Default)]
pub struct ServiceIds {
    ids: BTreeMap<Key, u32>,
    next: u32,
}

impl ServiceIds {
    fn id(&mut self, key: &Key) -> u32 {
        if let Some(id) = self.ids.get(key) {
            return *id;
        }
        let used: BTreeSet<u32> = self.ids.values().copied().collect();
        let span = SERVICE_IDENTITY_LAST - SERVICE_IDENTITY_FIRST + 1;
        let mut n = self.next;
        let id = loop {
            let id = SERVICE_IDENTITY_FIRST + n % span;
            n = n.wrapping_add(1);
            if !used.contains(&id) {
                break id;
            }
        };
        self.next = n;
        self.ids.insert(key.clone(), id);
        id
    }

    fn retain(&mut self, keep: &BTreeSet<Key>) {
        self.ids.retain(|k, _| keep.contains(k));
    }
}

/// What `expand` did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExpandReport {
    /// Service VIP addresses given an identity.
    pub vips: usize,
    /// Allow entries added.
    pub entries: usize,
    /// Problems to report (each names the Service, and the endpoint where relevant).
    pub errors: Vec<String>,
}

/// `expand` on a compiled state that is shared (`Compiler::update`'s): it is copied only when
/// there are Services to add.
pub fn expand_compiled(
    desired: &mut std::borrow::Cow<'_, DesiredState>,
    services: &ServiceStore,
    ids: &mut ServiceIds,
    node: Option<&str>,
) -> ExpandReport {
    if services.services.is_empty() {
        ids.retain(&BTreeSet::new());
        return ExpandReport::default();
    }
    expand(desired.to_mut(), services, ids, node)
}

/// Adds the Service VIPs of `services` to `desired`: their identities and, for every endpoint
/// isolated for egress, the allow entries its policy earns through them (see the module doc).
/// `node` is this node's name (for `internalTrafficPolicy: Local`).
pub fn expand(
    desired: &mut DesiredState,
    services: &ServiceStore,
    ids: &mut ServiceIds,
    node: Option<&str>,
) -> ExpandReport {
    let mut report = ExpandReport::default();
    if services.services.is_empty() {
        ids.retain(&BTreeSet::new());
        return report;
    }
    if let Some(id) = desired
        .identities
        .values()
        .find(|id| (SERVICE_IDENTITY_FIRST..=SERVICE_IDENTITY_LAST).contains(*id))
    {
        report.errors.push(format!(
            "identity {id} of the compiler is in the Service identity range: Service VIPs are \
             not allowed anywhere until it is released"
        ));
        return report;
    }
    // Egress-isolated endpoints, by id (an id may sit behind two interfaces).
    let isolated: BTreeMap<u32, (u32, String)> = desired
        .endpoints
        .iter()
        .filter(|(_, info)| info.flags & (EP_ISOLATED_EGRESS | EP_TIERED_EGRESS) != 0)
        .map(|(ifindex, info)| {
            let pod = desired
                .endpoint_meta
                .get(&info.id)
                .map_or_else(|| format!("endpoint {}", info.id), |m| m.pod.to_string());
            (info.id, (*ifindex, pod))
        })
        .collect();
    let pod_addrs: BTreeSet<_> = desired.identities.keys().copied().collect();
    let mut judge = Judge::new(desired);
    let mut vip_ids: Vec<(IpAddr, u32)> = Vec::new();
    let mut node_ports = Vec::new();
    let mut entries: Vec<(PolicyEntry, PolicyValue)> = Vec::new();
    let mut keep = BTreeSet::new();
    for (key, svc) in &services.services {
        if svc.vips.is_empty() {
            continue;
        }
        let id = ids.id(key);
        keep.insert(key.clone());
        let ports: Vec<(&ServicePortInfo, Vec<(IpAddr, u16)>)> = svc
            .ports
            .iter()
            .map(|p| (p, services.backends(key, svc, p, node)))
            .collect();
        // A Service whose every backend is an address of this node is node traffic, which
        // NetworkPolicy never restricts.
        let all_host = ports.iter().all(|(_, b)| !b.is_empty())
            && ports.iter().flat_map(|(_, b)| b).all(|(ip, _)| {
                desired.identities.get(&PeerAddr::from_ip(*ip)).copied() == Some(IDENTITY_HOST)
            })
            && !ports.is_empty();
        for vip in &svc.vips {
            let addr = PeerAddr::from_ip(*vip);
            match desired.identities.get(&addr).copied() {
                // Pod addresses are never VIPs; an address that is both is a misconfiguration
                // where the pod's identity wins.
                Some(pid) if pid != IDENTITY_HOST && pod_addrs.contains(&addr) => {
                    report.errors.push(format!(
                        "Service {}/{}: VIP {vip} is also a pod address; it is judged as the pod",
                        key.0, key.1
                    ));
                    continue;
                }
                // IPVS mode binds VIPs to a local dummy interface: they are not node traffic.
                _ => vip_ids.push((*vip, if all_host { IDENTITY_HOST } else { id })),
            }
        }
        // NodePorts lead where the Service's first VIP of each family leads (its ClusterIP):
        // a pod's egress to a node address on that port is judged as to that VIP and port.
        for (port, _) in &ports {
            let Some(node_port) = port.node_port else {
                continue;
            };
            for family_v4 in [true, false] {
                let Some(vip) = svc.vips.iter().find(|v| v.is_ipv4() == family_v4) else {
                    continue;
                };
                let addr = PeerAddr::from_ip(*vip);
                node_ports.push((
                    NodePortKey {
                        family: addr.family,
                        proto: port.protocol.number(),
                        port_be: node_port.to_be(),
                    },
                    NodePortTarget {
                        addr: addr.addr,
                        port: port.port,
                        _pad: 0,
                    },
                ));
            }
        }
        if all_host {
            continue;
        }
        for (port, backends) in &ports {
            if backends.is_empty() {
                continue;
            }
            let proto = port.protocol.number();
            for (ep_id, (ifindex, pod)) in &isolated {
                let mut rule = u32::MAX;
                let mut audit = false;
                let mut allowed = 0;
                // A pod reaching itself through a Service is hairpinned (and masqueraded) by
                // kube-proxy; the model calls a flow to its own address self traffic.
                let local = own_address(desired, *ep_id)
                    .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
                if desired.endpoints[ifindex].flags & EP_TIERED_EGRESS != 0 {
                    let verdicts: Vec<ModelVerdict> = backends
                        .iter()
                        .map(|(ip, target)| {
                            datapath_model::evaluate(
                                desired,
                                *ifindex,
                                Direction::Egress,
                                *ip,
                                local,
                                proto,
                                *target,
                            )
                        })
                        .collect();
                    let denied = verdicts.iter().filter(|v| !v.allowed).count();
                    if denied > 0 && denied < verdicts.len() {
                        report.errors.push(format!(
                            "Service {}/{} port {}/{}: {pod} may reach {} of its {} backends \
                             directly; through the Service it reaches none",
                            key.0,
                            key.1,
                            port.protocol,
                            port.port,
                            verdicts.len() - denied,
                            verdicts.len()
                        ));
                    }
                    // The VIP's verdict is its backends' (the first denied one's, if any).
                    let decisive = verdicts.iter().find(|v| !v.allowed).unwrap_or(&verdicts[0]);
                    let value = reproducing(decisive, &desired.rule_slots);
                    entries.push((
                        PolicyEntry {
                            key: PolicyKey {
                                endpoint: *ep_id,
                                peer: id,
                                dir: Direction::Egress.as_u8(),
                                proto,
                                port_be: port.port.to_be(),
                                ..PolicyKey::default()
                            },
                            prefix_len: POLICY_KEY_FULL_BITS,
                        },
                        value,
                    ));
                    continue;
                }
                for (ip, target) in backends {
                    let v = judge.egress(*ifindex, *ip, local, proto, *target);
                    if !v.allowed {
                        continue;
                    }
                    allowed += 1;
                    if let Some(value) = v.value {
                        rule = rule.min(value.rule);
                        audit |= value.flags & POLICY_FLAG_AUDIT != 0;
                    }
                }
                if allowed == 0 {
                    continue;
                }
                if allowed < backends.len() {
                    report.errors.push(format!(
                        "Service {}/{} port {}/{}: {pod} may reach {allowed} of its {} backends \
                         directly; through the Service it reaches none (the backend is chosen \
                         after the program judges the flow)",
                        key.0,
                        key.1,
                        port.protocol,
                        port.port,
                        backends.len()
                    ));
                    continue;
                }
                if rule == u32::MAX {
                    // Allowed only as node traffic on some backends and not others: no rule
                    // to name, and too rare to invent one for.
                    continue;
                }
                entries.push((
                    PolicyEntry {
                        key: PolicyKey {
                            endpoint: *ep_id,
                            peer: id,
                            dir: Direction::Egress.as_u8(),
                            proto,
                            port_be: port.port.to_be(),
                            ..PolicyKey::default()
                        },
                        prefix_len: POLICY_KEY_FULL_BITS,
                    },
                    PolicyValue {
                        rule,
                        flags: if audit { POLICY_FLAG_AUDIT } else { 0 },
                        slot: desired.rule_slots.get(&rule).copied().unwrap_or(0),
                        ..PolicyValue::default()
                    },
                ));
            }
        }
    }
    ids.retain(&keep);
    report.vips = vip_ids.len();
    for (vip, id) in vip_ids {
        desired.identities.insert(PeerAddr::from_ip(vip), id);
    }
    desired.node_ports.extend(node_ports);
    report.entries = entries.len();
    for (e, v) in entries {
        desired
            .policy
            .entry(e)
            .and_modify(|old| {
                if v.rule < old.rule {
                    old.rule = v.rule;
                    old.slot = v.slot;
                }
                old.flags &= v.flags;
            })
            .or_insert(v);
    }
    report
}

/// A POLICY value that decides as `v` did, whatever else matches the VIP: its tier answers are
/// ranked first (0), so a CIDR class that contains the VIP (a `networks` peer) cannot decide
/// instead of the backends. A tier rule's decision is the rule at rank 0; anything else passes
/// both tiers, so NetworkPolicy (its allow in `rule`, if any) or the default decides.
fn reproducing(v: &ModelVerdict, slots: &BTreeMap<u32, u16>) -> PolicyValue {
    let at_rank_0 = |rule: u32, action: u8| TierMatch {
        rank: 0,
        rule,
        slot: slots.get(&rule).copied().unwrap_or(0),
        action,
        _pad: 0,
    };
    let pass = at_rank_0(0, TIER_ACTION_PASS);
    let rule = v.rule.unwrap_or(0);
    let action = if v.allowed {
        TIER_ACTION_ACCEPT
    } else {
        TIER_ACTION_DENY
    };
    let by_admin = v.admin.is_some_and(|m| m.rule == rule);
    match v.reason {
        ModelReason::TierAccept | ModelReason::TierDeny if by_admin => PolicyValue {
            admin: at_rank_0(rule, action),
            ..PolicyValue::default()
        },
        ModelReason::TierAccept | ModelReason::TierDeny => PolicyValue {
            admin: pass,
            baseline: at_rank_0(rule, action),
            ..PolicyValue::default()
        },
        ModelReason::PolicyAllow => PolicyValue {
            rule,
            slot: slots.get(&rule).copied().unwrap_or(0),
            admin: pass,
            baseline: pass,
            ..PolicyValue::default()
        },
        // Node traffic and self traffic among the backends: allowed, by no rule.
        ModelReason::Host | ModelReason::SelfTraffic | ModelReason::NotAnEndpoint => PolicyValue {
            admin: at_rank_0(0, TIER_ACTION_ACCEPT),
            ..PolicyValue::default()
        },
        // NetworkPolicy denies, or nothing decides (the default allows), or the endpoint is
        // pending (dropped anyway).
        ModelReason::NoRuleMatched | ModelReason::NotIsolated | ModelReason::Pending => {
            PolicyValue {
                admin: pass,
                baseline: pass,
                ..PolicyValue::default()
            }
        }
    }
}

/// One of the endpoint's own addresses (for the model's self-traffic check).
fn own_address(desired: &DesiredState, ep_id: u32) -> Option<IpAddr> {
    desired
        .endpoint_addrs
        .iter()
        .find(|(_, id)| **id == ep_id)
        .and_then(|(a, _)| ip_of(a.family, &a.addr))
}

/// An egress verdict (`value`: the allow entry that decided it, if one did).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub value: Option<PolicyValue>,
}

/// Egress verdicts over one compiled state, exactly as `datapath_model::evaluate` (and the
/// programs) give them, but fast enough to ask for every (endpoint, backend) pair of a large
/// cluster: policy lookups are memoized, and the CIDR longest-prefix match runs over the
/// endpoint's own egress prefixes (usually a handful) instead of one lookup per prefix length.
pub struct Judge<'d> {
    d: &'d DesiredState,
    /// Endpoint id -> its egress CIDR prefixes (family, address bits, length, class), longest
    /// first.
    prefixes: HashMap<u32, Vec<(u8, u128, u32, u32)>>,
    memo: HashMap<(u32, u32, u8, u16), Option<PolicyValue>>,
}

fn addr_bits(ip: IpAddr) -> (u8, u128, u32) {
    match ip {
        IpAddr::V4(a) => (palisade_common::AF_INET, u128::from(u32::from(a)), 32),
        IpAddr::V6(a) => (palisade_common::AF_INET6, u128::from(a), 128),
    }
}

impl<'d> Judge<'d> {
    pub fn new(d: &'d DesiredState) -> Judge<'d> {
        let mut prefixes: HashMap<u32, Vec<(u8, u128, u32, u32)>> = HashMap::new();
        for (entry, class) in &d.cidrs {
            if entry.key.dir != Direction::Egress.as_u8() {
                continue;
            }
            let Some(ip) = ip_of(entry.key.family, &entry.key.addr) else {
                continue;
            };
            let (family, bits, _) = addr_bits(ip);
            prefixes.entry(entry.key.endpoint).or_default().push((
                family,
                bits,
                entry.prefix_len,
                *class,
            ));
        }
        for v in prefixes.values_mut() {
            v.sort_by_key(|e| std::cmp::Reverse(e.2));
        }
        Judge {
            d,
            prefixes,
            memo: HashMap::new(),
        }
    }

    fn lookup(&mut self, ep: u32, peer: u32, proto: u8, port: u16) -> Option<PolicyValue> {
        let d = self.d;
        *self.memo.entry((ep, peer, proto, port)).or_insert_with(|| {
            datapath_model::policy_lookup(d, ep, peer, Direction::Egress, proto, port)
                .map(|(_, v)| v)
        })
    }

    /// The egress verdict at the endpoint behind `ifindex` for a new flow to `peer`.
    pub fn egress(
        &mut self,
        ifindex: u32,
        peer: IpAddr,
        local: IpAddr,
        proto: u8,
        port: u16,
    ) -> Verdict {
        let yes = |value| Verdict {
            allowed: true,
            value,
        };
        let no = Verdict {
            allowed: false,
            value: None,
        };
        let Some(ep) = self.d.endpoints.get(&ifindex).copied() else {
            return yes(None);
        };
        if ep.flags & palisade_common::EP_PENDING != 0 {
            return no;
        }
        if peer == local {
            return yes(None);
        }
        if ep.flags & EP_ISOLATED_EGRESS == 0 {
            return yes(None);
        }
        let identity = self
            .d
            .identities
            .get(&PeerAddr::from_ip(peer))
            .copied()
            .unwrap_or(palisade_common::IDENTITY_NONE);
        if identity == IDENTITY_HOST {
            return yes(None);
        }
        if identity != palisade_common::IDENTITY_NONE
            && let Some(v) = self.lookup(ep.id, identity, proto, port)
        {
            return yes(Some(v));
        }
        let (family, bits, width) = addr_bits(peer);
        let class = self.prefixes.get(&ep.id).and_then(|list| {
            list.iter().find_map(|(f, p, len, class)| {
                let mask = if *len == 0 {
                    0
                } else {
                    (u128::MAX << (128 - len)) >> (128 - width)
                };
                (*f == family && bits & mask == *p).then_some(*class)
            })
        });
        match class {
            Some(c) if c != palisade_common::CIDR_CLASS_NONE => {
                match self.lookup(ep.id, c, proto, port) {
                    Some(v) => yes(Some(v)),
                    None => no,
                }
            }
            _ => no,
        }
    }
}

impl ServiceStore {
    /// A store of the Services and EndpointSlices read from manifests (standalone mode), with
    /// an error for each one it cannot take.
    pub fn from_manifests(
        services: &[Service],
        endpoint_slices: &[EndpointSlice],
    ) -> (ServiceStore, Vec<ConfigError>) {
        let mut store = ServiceStore::default();
        let mut errors = Vec::new();
        for s in services {
            if let Err(e) = store.apply_service(s) {
                errors.push(e);
            }
        }
        for s in endpoint_slices {
            if let Err(e) = store.apply_slice(s) {
                errors.push(e);
            }
        }
        (store, errors)
    }
}

/// Service and EndpointSlice objects named in manifest text (for tests and tools).
pub fn parse_str(text: &str) -> Result<ServiceStore, String> {
    let (services, slices) = crate::manifest::parse_services(text).map_err(|e| e.to_string())?;
    let (store, errors) = ServiceStore::from_manifests(&services, &slices);
    match errors.into_iter().next() {
        Some(e) => Err(e.to_string()),
        None => Ok(store),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{Compiler, LocalEndpoint};
    use crate::datapath_model::evaluate;
    use crate::model::Store;
    use crate::state::PodRef;
    use palisade_common::PROTO_TCP;

    const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: demo, labels: {app: a}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.244.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: demo, labels: {app: b}}
spec: {nodeName: n1, containers: [{name: c, ports: [{name: web, containerPort: 80}]}]}
status: {podIP: 10.244.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: c, namespace: demo, labels: {app: c}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 10.244.1.12}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-egress, namespace: demo}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: b}}}]
      ports: [{port: web}]
    - to: [{ipBlock: {cidr: 192.0.2.0/24}}]
"#;

    fn svc(name: &str, vip: &str, port: u16, extra: &str) -> String {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: demo}}\n\
             spec: {{clusterIP: {vip}, clusterIPs: [{vip}], ports: [{{name: http, port: {port}, targetPort: 80}}]{extra}}}\n"
        )
    }

    fn slice(name: &str, svc: &str, eps: &[(&str, &str)]) -> String {
        let eps: Vec<String> = eps
            .iter()
            .map(|(ip, extra)| format!("{{addresses: ['{ip}']{extra}}}"))
            .collect();
        format!(
            "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
             metadata: {{name: {name}, namespace: demo, labels: {{kubernetes.io/service-name: {svc}}}}}\n\
             ports: [{{name: http, port: 80, protocol: TCP}}]\nendpoints: [{}]\n",
            eps.join(", ")
        )
    }

    struct World {
        desired: DesiredState,
        report: ExpandReport,
    }

    fn world(services_yaml: &str) -> World {
        world_with("", services_yaml)
    }

    fn world_of(store: Store, services_yaml: &str) -> World {
        let services = parse_str(services_yaml).unwrap();
        let pod = |n: &str| PodRef {
            namespace: "demo".into(),
            name: n.into(),
        };
        let eps = vec![
            LocalEndpoint {
                pod: pod("a"),
                ifindex: 10,
            },
            LocalEndpoint {
                pod: pod("b"),
                ifindex: 11,
            },
        ];
        let node: IpAddr = "10.243.0.1".parse().unwrap();
        let mut desired = Compiler::default().compile(&store, &eps, &[node]);
        let report = expand(
            &mut desired,
            &services,
            &mut ServiceIds::default(),
            Some("n1"),
        );
        World { desired, report }
    }

    fn a_to(w: &World, ip: &str, port: u16) -> (bool, Option<u32>) {
        let v = evaluate(
            &w.desired,
            10,
            Direction::Egress,
            ip.parse().unwrap(),
            "10.244.0.10".parse().unwrap(),
            PROTO_TCP,
            port,
        );
        (v.allowed, v.rule)
    }

    /// ClusterNetworkPolicy judges a VIP as its backends too: an Admin Deny of a pod is not
    /// bypassed through its Service when a lower Admin rule accepts every address (the VIP
    /// included), whether or not NetworkPolicy isolates the client.
    #[test]
    fn cluster_policies_judge_a_vip_as_its_backends() {
        let cnps = r#"
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: deny-c}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  egress: [{action: Deny, to: [{pods: {podSelector: {matchLabels: {app: c}}}}]}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: accept-all}
spec:
  tier: Admin
  priority: 20
  subject: {namespaces: {}}
  egress: [{action: Accept, to: [{networks: [0.0.0.0/0]}]}]
"#;
        let yaml = [
            svc("to-b", "10.96.0.11", 8080, ""),
            slice("to-b-1", "to-b", &[("10.244.0.11", "")]),
            svc("to-c", "10.96.0.12", 8080, ""),
            slice("to-c-1", "to-c", &[("10.244.1.12", "")]),
        ]
        .concat();
        let w = world_with(cnps, &yaml);
        let from = |ifindex: u32, local: &str, ip: &str, port: u16| {
            let v = evaluate(
                &w.desired,
                ifindex,
                Direction::Egress,
                ip.parse().unwrap(),
                local.parse().unwrap(),
                PROTO_TCP,
                port,
            );
            (
                v.allowed,
                v.rule
                    .and_then(|r| w.desired.rules.get(&r))
                    .map(|r| r.policy.clone()),
            )
        };
        for (ifindex, local) in [(10, "10.244.0.10"), (11, "10.244.0.11")] {
            let direct = from(ifindex, local, "10.244.1.12", 80);
            assert_eq!(direct, (false, Some("deny-c".to_string())), "{local} to c");
            assert_eq!(
                from(ifindex, local, "10.96.0.12", 8080),
                direct,
                "{local} to c's VIP"
            );
        }
        // a reaches b (its NetworkPolicy allows it, and the Admin tier accepts first), directly
        // and through the VIP.
        let direct = from(10, "10.244.0.10", "10.244.0.11", 80);
        assert_eq!(direct, (true, Some("accept-all".to_string())));
        assert_eq!(from(10, "10.244.0.10", "10.96.0.11", 8080), direct);
    }

    fn world_with(objects: &str, services_yaml: &str) -> World {
        let store = Store::from_objects(
            crate::manifest::parse_str(&format!("{CLUSTER}{objects}")).unwrap(),
        );
        assert!(store.errors().is_empty(), "{:?}", store.errors());
        world_of(store, services_yaml)
    }

    #[test]
    fn vip_means_its_backends() {
        let yaml = [
            svc("to-b", "10.96.0.11", 8080, ""),
            slice("to-b-1", "to-b", &[("10.244.0.11", "")]),
            svc("to-c", "10.96.0.12", 8080, ""),
            slice("to-c-1", "to-c", &[("10.244.1.12", "")]),
            svc("both", "10.96.0.13", 8080, ""),
            slice(
                "both-1",
                "both",
                &[("10.244.0.11", ""), ("10.244.1.12", "")],
            ),
            svc("empty", "10.96.0.14", 8080, ""),
            svc("ext", "10.96.0.15", 8080, ""),
            slice("ext-1", "ext", &[("192.0.2.7", "")]),
        ]
        .concat();
        let w = world(&yaml);
        let direct = a_to(&w, "10.244.0.11", 80);
        assert!(direct.0);
        assert_eq!(
            a_to(&w, "10.96.0.11", 8080),
            direct,
            "same rule as the backend"
        );
        assert!(
            !a_to(&w, "10.96.0.11", 80).0,
            "the Service port, not the target"
        );
        assert!(!a_to(&w, "10.244.1.12", 80).0);
        assert!(
            !a_to(&w, "10.96.0.12", 8080).0,
            "c is not allowed, nor its VIP"
        );
        assert!(!a_to(&w, "10.96.0.13", 8080).0, "uneven backends: denied");
        assert!(
            w.report.errors.iter().any(|e| e.contains("demo/both")),
            "{:?}",
            w.report.errors
        );
        assert!(!a_to(&w, "10.96.0.14", 8080).0, "no backends: nothing");
        assert!(a_to(&w, "10.96.0.15", 8080).0, "an ipBlock backend");
        // b is not isolated for egress: everything passes, VIPs included, with no entries.
        let v = evaluate(
            &w.desired,
            11,
            Direction::Egress,
            "10.96.0.12".parse().unwrap(),
            "10.244.0.11".parse().unwrap(),
            PROTO_TCP,
            8080,
        );
        assert!(v.allowed);
        assert_eq!(w.report.vips, 5);
    }

    #[test]
    fn readiness_local_traffic_and_node_backends() {
        let yaml = [
            // Not ready: ignored; the ready one decides.
            svc("r", "10.96.1.1", 8080, ""),
            slice(
                "r-1",
                "r",
                &[
                    ("10.244.0.11", ""),
                    ("10.244.1.12", ", conditions: {ready: false}"),
                ],
            ),
            // No ready endpoint: serving and terminating ones are used.
            svc("t", "10.96.1.2", 8080, ""),
            slice(
                "t-1",
                "t",
                &[(
                    "10.244.0.11",
                    ", conditions: {ready: false, serving: true, terminating: true}",
                )],
            ),
            // Local traffic policy: only this node's endpoint (b on n1) counts.
            svc("l", "10.96.1.3", 8080, ", internalTrafficPolicy: Local"),
            slice(
                "l-1",
                "l",
                &[
                    ("10.244.0.11", ", nodeName: n1"),
                    ("10.244.1.12", ", nodeName: n2"),
                ],
            ),
            // Every backend is this node: node traffic.
            svc("node", "10.96.1.4", 443, ""),
            slice("node-1", "node", &[("10.243.0.1", "")]),
        ]
        .concat();
        let w = world(&yaml);
        assert!(a_to(&w, "10.96.1.1", 8080).0);
        assert!(a_to(&w, "10.96.1.2", 8080).0);
        assert!(a_to(&w, "10.96.1.3", 8080).0);
        assert!(a_to(&w, "10.96.1.4", 443).0);
        assert_eq!(
            w.desired
                .identities
                .get(&PeerAddr::from_ip("10.96.1.4".parse().unwrap())),
            Some(&IDENTITY_HOST)
        );
        assert!(w.report.errors.is_empty(), "{:?}", w.report.errors);
    }

    /// `Judge` gives `datapath_model::evaluate`'s verdicts (and rules) for every endpoint and
    /// address of a state with pod peers, ipBlocks with excepts, rules without peers and audit.
    #[test]
    fn judge_agrees_with_the_model() {
        let store = Store::from_objects(
            crate::manifest::parse_str(&format!(
                "{CLUSTER}---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                 metadata: {{name: b-egress, namespace: demo, annotations: {{palisade.io/audit: 'true'}}}}\n\
                 spec: {{podSelector: {{matchLabels: {{app: b}}}}, policyTypes: [Egress], egress: [\
                 {{to: [{{ipBlock: {{cidr: 10.244.0.0/16, except: [10.244.1.0/24]}}}}], ports: [{{port: 80}}]}}, \
                 {{ports: [{{port: 53, protocol: UDP}}]}}]}}\n"
            ))
            .unwrap(),
        );
        let pod = |n: &str| PodRef {
            namespace: "demo".into(),
            name: n.into(),
        };
        let eps: Vec<LocalEndpoint> = ["a", "b", "c"]
            .iter()
            .enumerate()
            .map(|(i, n)| LocalEndpoint {
                pod: pod(n),
                ifindex: 10 + i as u32,
            })
            .collect();
        let d = Compiler::default().compile(&store, &eps, &["10.243.0.1".parse().unwrap()]);
        let mut judge = Judge::new(&d);
        let mut n = 0;
        for ifindex in [10, 11, 12, 99] {
            for peer in [
                "10.244.0.10",
                "10.244.0.11",
                "10.244.1.12",
                "10.244.7.7",
                "10.243.0.1",
                "192.0.2.1",
                "192.0.2.200",
                "fd00::1",
            ] {
                for (proto, port) in [(6u8, 80u16), (6, 81), (17, 53), (17, 80), (132, 80)] {
                    let peer: IpAddr = peer.parse().unwrap();
                    let local: IpAddr = "10.244.0.10".parse().unwrap();
                    let m = evaluate(&d, ifindex, Direction::Egress, peer, local, proto, port);
                    let j = judge.egress(ifindex, peer, local, proto, port);
                    assert_eq!(
                        (m.allowed, m.rule),
                        (j.allowed, j.value.map(|v| v.rule)),
                        "ifindex {ifindex} -> {peer} {proto}/{port}"
                    );
                    n += 1;
                }
            }
        }
        assert_eq!(n, 160);
    }

    /// Scale: 10 000 pods, 1 000 Services of 3 backends, 100 local endpoints isolated for
    /// egress (with a rule without peers, so every one has CIDR prefixes): every VIP gets its
    /// identity and exactly the allowed Services get entries. (It prints its timings with
    /// `--nocapture`; speed is measured by `cargo xtask bench`, not asserted here.)
    #[test]
    fn scale() {
        let mut text = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: s}\n");
        for i in 0..10_000u32 {
            text.push_str(&format!(
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: s, labels: {{app: a{}}}}}\n\
                 spec: {{nodeName: n{}, containers: []}}\nstatus: {{podIP: 10.{}.{}.{}}}\n",
                i % 1000,
                if i < 100 { 1 } else { 2 },
                i >> 16,
                (i >> 8) & 255,
                i & 255
            ));
        }
        text.push_str(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: e, namespace: s}\n\
             spec: {podSelector: {}, policyTypes: [Egress], egress: [\
             {to: [{podSelector: {matchExpressions: [{key: app, operator: In, values: [a1, a2, a3, a500]}]}}], ports: [{port: 80}]},\
             {ports: [{port: 53, protocol: UDP}]}]}\n",
        );
        let store = Store::from_objects(crate::manifest::parse_str(&text).unwrap());
        let mut svc = String::new();
        for k in 0..1000u32 {
            svc.push_str(&svc_yaml_scale(k));
        }
        let services = parse_str(&svc).unwrap();
        let eps: Vec<LocalEndpoint> = (0..100u32)
            .map(|i| LocalEndpoint {
                pod: PodRef {
                    namespace: "s".into(),
                    name: format!("p{i}").into(),
                },
                ifindex: 1000 + i,
            })
            .collect();
        let t = std::time::Instant::now();
        let mut d = Compiler::default().compile(&store, &eps, &[]);
        let compiled = t.elapsed();
        let t = std::time::Instant::now();
        let r = expand(&mut d, &services, &mut ServiceIds::default(), Some("n1"));
        eprintln!(
            "compile {compiled:?}; expand {:?}: {} VIPs, {} entries, {} reports",
            t.elapsed(),
            r.vips,
            r.entries,
            r.errors.len()
        );
        assert_eq!(r.vips, 1000);
        assert_eq!(
            r.entries,
            100 * 4,
            "100 endpoints x the 4 Services of a1, a2, a3, a500"
        );
    }

    fn svc_yaml_scale(k: u32) -> String {
        let ips: Vec<String> = (0..3u32)
            .map(|j| {
                let i = k + 1000 * j;
                format!(
                    "{{addresses: ['10.{}.{}.{}']}}",
                    i >> 16,
                    (i >> 8) & 255,
                    i & 255
                )
            })
            .collect();
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: v{k}, namespace: s}}\n\
             spec: {{clusterIP: 10.96.{}.{}, ports: [{{name: http, port: 8080, targetPort: 80}}]}}\n\
             ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
             metadata: {{name: v{k}-x, namespace: s, labels: {{kubernetes.io/service-name: v{k}}}}}\n\
             ports: [{{name: http, port: 80}}]\nendpoints: [{}]\n",
            k >> 8,
            k & 255,
            ips.join(", ")
        )
    }

    #[test]
    fn ids_are_stable_and_in_their_range() {
        let store =
            parse_str(&[svc("x", "10.96.0.1", 80, ""), svc("y", "10.96.0.2", 80, "")].concat())
                .unwrap();
        let mut ids = ServiceIds::default();
        let mut d = DesiredState::default();
        expand(&mut d, &store, &mut ids, None);
        let first = d.identities.clone();
        assert!(
            first
                .values()
                .all(|id| (SERVICE_IDENTITY_FIRST..=SERVICE_IDENTITY_LAST).contains(id))
        );
        let mut d = DesiredState::default();
        expand(&mut d, &store, &mut ids, None);
        assert_eq!(d.identities, first);
        // Headless and ExternalName Services have no VIP.
        let s = parse_str(
            "apiVersion: v1\nkind: Service\nmetadata: {name: h}\nspec: {clusterIP: None, ports: [{port: 80}]}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {name: e}\nspec: {type: ExternalName, externalName: example.com}\n",
        )
        .unwrap();
        assert!(s.services.values().all(|i| i.vips.is_empty()));
    }
}
