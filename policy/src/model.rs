//! The store: namespaces, pods and validated NetworkPolicies, reduced to what policy needs.
//!
//! Policies are validated and normalized on the way in (`Policy::from_k8s`). A policy that fails
//! validation never replaces a good one: the last good version of that policy stays in force and
//! the error is recorded (`Store::errors`) with the object and field it concerns.
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

pub use crate::error::{ConfigError, FieldError};
use crate::selector::Selector;
use crate::state::{Direction, PodRef};

/// The label the API server sets on every namespace, with the namespace's name as value.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Policy annotation: `"true"` puts the policy in audit mode.
pub const AUDIT_ANNOTATION: &str = "palisade.io/audit";
/// Pod annotations kept in `PodInfo::annotations` (the others are dropped).
pub const KEPT_POD_ANNOTATIONS: &[&str] = &["palisade.io/interface"];
/// Namespace of objects that name none (as `kubectl apply` does without a context namespace).
pub const DEFAULT_NAMESPACE: &str = "default";

// ---------------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Identifies an object: kind, namespace (empty for namespaces) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind == Kind::Namespace {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// A Kubernetes object the agent understands, as read (not yet validated).
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Box<Namespace>),
    /// Converted where it is read: sources keep no full k8s Pods (several kilobytes each even
    /// when their optional fields are empty; a cluster has many).
    Pod(Box<PodObject>),
    NetworkPolicy(Box<NetworkPolicy>),
}

/// A pod as read, reduced to what policy needs (`PodInfo`) and the problems of its fields.
#[derive(Clone, Debug, PartialEq)]
pub struct PodObject {
    key: ObjectKey,
    converted: Result<(PodRef, PodInfo, Vec<ConfigError>), ConfigError>,
}

impl PodObject {
    pub fn from_k8s(pod: &Pod) -> PodObject {
        PodObject {
            key: meta_key(Kind::Pod, &pod.metadata),
            converted: PodInfo::from_k8s(pod),
        }
    }

    /// What policy sees of the pod (`None`: it has no name).
    pub fn info(&self) -> Option<&PodInfo> {
        self.converted.as_ref().ok().map(|(_, info, _)| info)
    }
}

impl From<Pod> for Object {
    fn from(pod: Pod) -> Object {
        Object::Pod(Box::new(PodObject::from_k8s(&pod)))
    }
}

fn meta_key(kind: Kind, meta: &ObjectMeta) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: if kind == Kind::Namespace {
            String::new()
        } else {
            meta.namespace
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
        },
        name: meta.name.clone().unwrap_or_default(),
    }
}

impl Object {
    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Namespace(o) => meta_key(Kind::Namespace, &o.metadata),
            Object::Pod(o) => o.key.clone(),
            Object::NetworkPolicy(o) => meta_key(Kind::NetworkPolicy, &o.metadata),
        }
    }
}

/// The key of an object that must be named; an error naming the field otherwise.
fn named_key(kind: Kind, meta: &ObjectMeta) -> Result<ObjectKey, ConfigError> {
    let key = meta_key(kind, meta);
    if key.name.is_empty() {
        let object = if kind == Kind::Namespace {
            format!("{kind} <unnamed>")
        } else {
            format!("{kind} {}/<unnamed>", key.namespace)
        };
        return Err(ConfigError::new(object, "metadata.name", "is required"));
    }
    Ok(key)
}

// ---------------------------------------------------------------------------------------------
// Namespaces and pods
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NamespaceInfo {
    /// Always includes `kubernetes.io/metadata.name: <name>`.
    pub labels: BTreeMap<String, String>,
}

impl NamespaceInfo {
    /// The labels of a namespace named `name` with `labels` (the name label is enforced).
    pub fn new(name: &str, mut labels: BTreeMap<String, String>) -> Self {
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
        NamespaceInfo { labels }
    }
}

/// A protocol NetworkPolicy ports can name; the discriminant is the IP protocol number.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Protocol {
    Tcp = palisade_common::PROTO_TCP,
    Udp = palisade_common::PROTO_UDP,
    Sctp = palisade_common::PROTO_SCTP,
}

impl Protocol {
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// The IP protocol number.
    pub fn number(self) -> u8 {
        self as u8
    }

    pub fn from_number(n: u8) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.number() == n)
    }

    /// Kubernetes' spelling (`TCP`, `UDP`, `SCTP`; case-sensitive, as the API server is).
    pub fn parse(s: &str) -> Option<Protocol> {
        Protocol::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }

    /// Parses an optional `protocol` field (default TCP).
    fn from_field(p: Option<&String>, field: String) -> Result<Protocol, FieldError> {
        match p {
            None => Ok(Protocol::Tcp),
            Some(s) => Protocol::parse(s).ok_or_else(|| {
                FieldError::new(
                    field,
                    format!("unsupported protocol {s:?} (want TCP, UDP or SCTP)"),
                )
            }),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A named container port.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

/// A container port published on the node (`hostPort`: the portmap plugin DNATs the node's
/// addresses on `host_port` to the pod's `container_port`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct HostPort {
    pub host_port: u16,
    pub container_port: u16,
    pub protocol: Protocol,
}

/// What policy needs of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PodInfo {
    pub labels: BTreeMap<String, String>,
    /// `status.podIPs`, else `status.podIP`; empty for pods that have finished (phase Succeeded
    /// or Failed: their addresses may already belong to another pod).
    pub ips: Vec<IpAddr>,
    /// Named ports of the containers (and of sidecar init containers), sorted.
    pub container_ports: Vec<NamedPort>,
    /// Ports published on the node, sorted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub host_ports: Vec<HostPort>,
    pub host_network: bool,
    pub node_name: Option<String>,
    /// Only the annotations in `KEPT_POD_ANNOTATIONS`.
    pub annotations: BTreeMap<String, String>,
}

impl PodInfo {
    /// Converts a pod. It is lenient: an unparsable address or port is dropped (and reported)
    /// but the pod is kept, so that it stays an endpoint (dropping what cannot be parsed only
    /// ever allows less).
    pub fn from_k8s(pod: &Pod) -> Result<(PodRef, PodInfo, Vec<ConfigError>), ConfigError> {
        let key = named_key(Kind::Pod, &pod.metadata)?;
        let object = key.to_string();
        let mut errors = Vec::new();
        let mut info = PodInfo {
            labels: pod.metadata.labels.clone().unwrap_or_default(),
            ..PodInfo::default()
        };
        for (k, v) in pod.metadata.annotations.iter().flatten() {
            if KEPT_POD_ANNOTATIONS.contains(&k.as_str()) {
                info.annotations.insert(k.clone(), v.clone());
            }
        }
        if let Some(spec) = &pod.spec {
            info.host_network = spec.host_network.unwrap_or(false);
            info.node_name = spec.node_name.clone().filter(|n| !n.is_empty());
            let containers = spec
                .containers
                .iter()
                .enumerate()
                .map(|(i, c)| (format!("spec.containers[{i}]"), c));
            // Sidecars (init containers that keep running) serve their ports too.
            let sidecars = spec
                .init_containers
                .iter()
                .flatten()
                .enumerate()
                .filter(|(_, c)| c.restart_policy.as_deref() == Some("Always"))
                .map(|(i, c)| (format!("spec.initContainers[{i}]"), c));
            for (cfield, c) in containers.chain(sidecars) {
                for (j, p) in c.ports.iter().flatten().enumerate() {
                    if let (Some(h), Ok(cport), Ok(protocol)) = (
                        p.host_port,
                        u16::try_from(p.container_port),
                        Protocol::from_field(p.protocol.as_ref(), String::new()),
                    ) && let Ok(host_port) = u16::try_from(h)
                        && host_port != 0
                        && cport != 0
                    {
                        info.host_ports.push(HostPort {
                            host_port,
                            container_port: cport,
                            protocol,
                        });
                    }
                    let Some(name) = p.name.clone().filter(|n| !n.is_empty()) else {
                        continue;
                    };
                    let field = format!("{cfield}.ports[{j}]");
                    let port = match u16::try_from(p.container_port) {
                        Ok(n) if n != 0 => n,
                        _ => {
                            errors.push(ConfigError::new(
                                &object,
                                format!("{field}.containerPort"),
                                format!("{} is out of range (1-65535)", p.container_port),
                            ));
                            continue;
                        }
                    };
                    match Protocol::from_field(p.protocol.as_ref(), format!("{field}.protocol")) {
                        Ok(protocol) => info.container_ports.push(NamedPort {
                            name,
                            port,
                            protocol,
                        }),
                        Err(e) => errors.push(e.on(&object)),
                    }
                }
            }
        }
        info.container_ports.sort();
        info.container_ports.dedup();
        info.host_ports.sort();
        info.host_ports.dedup();
        if let Some(status) = &pod.status {
            let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
            let listed: Vec<(String, &String)> = match &status.pod_ips {
                Some(ips) if !ips.is_empty() => ips
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (format!("status.podIPs[{i}].ip"), &p.ip))
                    .collect(),
                _ => status
                    .pod_ip
                    .iter()
                    .filter(|s| !s.is_empty())
                    .map(|s| ("status.podIP".to_string(), s))
                    .collect(),
            };
            for (field, s) in listed {
                match s.parse::<IpAddr>() {
                    Ok(ip) if !finished && !info.ips.contains(&ip) => info.ips.push(ip),
                    Ok(_) => {}
                    Err(_) => errors.push(ConfigError::new(
                        &object,
                        field,
                        format!("{s:?} is not an IP address"),
                    )),
                }
            }
        }
        let pod_ref = PodRef {
            namespace: key.namespace,
            name: key.name,
        };
        Ok((pod_ref, info, errors))
    }

    /// The ports named `name` with protocol `protocol` (Kubernetes requires port names to be
    /// unique in a pod; all matches are returned if they are not).
    pub fn resolve_port<'a>(
        &'a self,
        name: &'a str,
        protocol: Protocol,
    ) -> impl Iterator<Item = u16> + 'a {
        self.container_ports
            .iter()
            .filter(move |p| p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

// ---------------------------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------------------------

/// A validated, normalized NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    /// Pods of `namespace` the policy applies to.
    pub pod_selector: Selector,
    /// `None`: the policy does not apply to ingress. `Some(vec![])`: isolates, allows nothing.
    pub ingress: Option<Vec<Rule>>,
    /// As `ingress`, for egress.
    pub egress: Option<Vec<Rule>>,
    /// `palisade.io/audit: "true"`.
    pub audit: bool,
}

/// One ingress or egress rule: traffic matching any peer AND any port is allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// `None`: no (or an empty) `from`/`to`: every peer, in the cluster or not.
    pub peers: Option<Vec<Peer>>,
    /// `None`: no (or an empty) `ports`: every port of every protocol.
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peer {
    /// Pods chosen by namespace AND pod selector.
    Pods {
        /// `None`: the policy's own namespace only. `Some(empty)`: every namespace.
        namespace_selector: Option<Selector>,
        /// `None`: every pod of the selected namespaces.
        pod_selector: Option<Selector>,
    },
    /// Every address inside `cidr` and not inside any of `except` (pod addresses included).
    /// Both are normalized (host bits zero); each except is strictly inside `cidr`.
    IpBlock {
        cidr: IpNetwork,
        except: Vec<IpNetwork>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortMatch {
    /// No `port`: every port of the protocol.
    Any,
    Number(u16),
    /// A container port name, resolved on the destination pod.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: PortMatch,
    /// With `PortMatch::Number(p)` only: the range `[p, end_port]` (`end_port >= p`).
    pub end_port: Option<u16>,
}

impl PortSpec {
    /// Does this spec match `proto`/`port`, named ports being looked up in `named_on`?
    pub fn matches(&self, proto: u8, port: u16, named_on: Option<&PodInfo>) -> bool {
        if self.protocol.number() != proto {
            return false;
        }
        match (&self.port, self.end_port) {
            (PortMatch::Any, _) => true,
            (PortMatch::Number(p), None) => port == *p,
            (PortMatch::Number(p), Some(e)) => (*p..=e).contains(&port),
            (PortMatch::Named(n), _) => {
                named_on.is_some_and(|pod| pod.resolve_port(n, self.protocol).any(|p| p == port))
            }
        }
    }
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.port, self.end_port) {
            (PortMatch::Any, _) => write!(f, "{}", self.protocol),
            (PortMatch::Number(p), None) => write!(f, "{}/{p}", self.protocol),
            (PortMatch::Number(p), Some(e)) => write!(f, "{}/{p}-{e}", self.protocol),
            (PortMatch::Named(n), _) => write!(f, "{}/{n}", self.protocol),
        }
    }
}

impl Policy {
    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    pub fn rules(&self, dir: Direction) -> Option<&[Rule]> {
        match dir {
            Direction::Ingress => self.ingress.as_deref(),
            Direction::Egress => self.egress.as_deref(),
        }
    }

    /// Validates and normalizes a NetworkPolicy. The error names the object and the field.
    pub fn from_k8s(np: &NetworkPolicy) -> Result<Policy, ConfigError> {
        let key = named_key(Kind::NetworkPolicy, &np.metadata)?;
        let object = key.to_string();
        Policy::from_spec(np, key).map_err(|e| e.on(object))
    }

    fn from_spec(np: &NetworkPolicy, key: ObjectKey) -> Result<Policy, FieldError> {
        let spec = np.spec.clone().unwrap_or_default();
        let pod_selector = match &spec.pod_selector {
            Some(s) => Selector::from_k8s(s, "spec.podSelector")?,
            None => Selector::everything(),
        };
        let mut types = (false, false);
        for (i, t) in spec.policy_types.iter().flatten().enumerate() {
            match t.as_str() {
                "Ingress" => types.0 = true,
                "Egress" => types.1 = true,
                _ => {
                    return Err(FieldError::new(
                        format!("spec.policyTypes[{i}]"),
                        format!("unsupported value {t:?} (want Ingress or Egress)"),
                    ));
                }
            }
        }
        let ingress_rules: Vec<Rule> = spec
            .ingress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                Rule::parse(
                    &format!("spec.ingress[{i}]"),
                    "from",
                    r.from.as_deref(),
                    r.ports.as_deref(),
                )
            })
            .collect::<Result<_, _>>()?;
        let egress_rules: Vec<Rule> = spec
            .egress
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, r)| {
                Rule::parse(
                    &format!("spec.egress[{i}]"),
                    "to",
                    r.to.as_deref(),
                    r.ports.as_deref(),
                )
            })
            .collect::<Result<_, _>>()?;
        // Without policyTypes (or with an empty list, as the API server defaults it): Ingress
        // always, Egress when there are egress rules.
        if spec.policy_types.as_ref().is_none_or(|t| t.is_empty()) {
            types = (true, !egress_rules.is_empty());
        }
        let audit = np
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(AUDIT_ANNOTATION))
            .is_some_and(|v| v == "true");
        Ok(Policy {
            namespace: key.namespace,
            name: key.name,
            pod_selector,
            ingress: types.0.then_some(ingress_rules),
            egress: types.1.then_some(egress_rules),
            audit,
        })
    }
}

impl Rule {
    fn parse(
        field: &str,
        peers_name: &str,
        peers: Option<&[NetworkPolicyPeer]>,
        ports: Option<&[NetworkPolicyPort]>,
    ) -> Result<Rule, FieldError> {
        let peers = peers.unwrap_or_default();
        let ports = ports.unwrap_or_default();
        let peers: Vec<Peer> = peers
            .iter()
            .enumerate()
            .map(|(j, p)| Peer::parse(&format!("{field}.{peers_name}[{j}]"), p))
            .collect::<Result<_, _>>()?;
        let ports: Vec<PortSpec> = ports
            .iter()
            .enumerate()
            .map(|(k, p)| PortSpec::parse(&format!("{field}.ports[{k}]"), p))
            .collect::<Result<_, _>>()?;
        Ok(Rule {
            peers: (!peers.is_empty()).then_some(peers),
            ports: (!ports.is_empty()).then_some(ports),
        })
    }
}

/// Parses a CIDR in `a.b.c.d/n` or `x::/n` notation and zeroes the host bits.
pub fn parse_cidr(s: &str) -> Result<IpNetwork, String> {
    if !s.contains('/') {
        return Err(format!(
            "invalid CIDR {s:?}: a prefix length is required (e.g. {s}/32)"
        ));
    }
    let net: IpNetwork = s.parse().map_err(|e| format!("invalid CIDR {s:?}: {e}"))?;
    Ok(IpNetwork::new(net.network(), net.prefix()).expect("prefix already validated"))
}

/// Is `inner` inside `outer` (same family, at least as long a prefix)?
pub fn cidr_contains(outer: &IpNetwork, inner: &IpNetwork) -> bool {
    outer.is_ipv4() == inner.is_ipv4()
        && outer.prefix() <= inner.prefix()
        && outer.contains(inner.network())
}

impl Peer {
    fn parse(field: &str, p: &NetworkPolicyPeer) -> Result<Peer, FieldError> {
        if let Some(block) = &p.ip_block {
            if p.pod_selector.is_some() || p.namespace_selector.is_some() {
                return Err(FieldError::new(
                    field,
                    "ipBlock cannot be combined with podSelector or namespaceSelector",
                ));
            }
            let cidr = parse_cidr(&block.cidr)
                .map_err(|m| FieldError::new(format!("{field}.ipBlock.cidr"), m))?;
            let mut except = Vec::new();
            for (k, e) in block.except.iter().flatten().enumerate() {
                let f = format!("{field}.ipBlock.except[{k}]");
                let net = parse_cidr(e).map_err(|m| FieldError::new(&f, m))?;
                if !cidr_contains(&cidr, &net) || net.prefix() == cidr.prefix() {
                    return Err(FieldError::new(
                        f,
                        format!("{net} is not inside cidr {cidr}"),
                    ));
                }
                except.push(net);
            }
            except.sort();
            except.dedup();
            return Ok(Peer::IpBlock { cidr, except });
        }
        if p.pod_selector.is_none() && p.namespace_selector.is_none() {
            return Err(FieldError::new(
                field,
                "must specify podSelector, namespaceSelector or ipBlock",
            ));
        }
        let namespace_selector = p
            .namespace_selector
            .as_ref()
            .map(|s| Selector::from_k8s(s, &format!("{field}.namespaceSelector")))
            .transpose()?;
        let pod_selector = p
            .pod_selector
            .as_ref()
            .map(|s| Selector::from_k8s(s, &format!("{field}.podSelector")))
            .transpose()?;
        Ok(Peer::Pods {
            namespace_selector,
            pod_selector,
        })
    }
}

/// An IANA service name, as Kubernetes requires of named ports: at most 15 characters of
/// `[a-z0-9-]`, at least one letter, no leading, trailing or double hyphen.
pub fn validate_port_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && name.chars().any(|c| c.is_ascii_lowercase())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is neither a port number nor a valid port name (at most 15 of a-z, 0-9 and '-', with a letter)"
        ))
    }
}

impl PortSpec {
    fn parse(field: &str, p: &NetworkPolicyPort) -> Result<PortSpec, FieldError> {
        let protocol = Protocol::from_field(p.protocol.as_ref(), format!("{field}.protocol"))?;
        let in_range = |n: i32, f: &str| {
            u16::try_from(n).ok().filter(|n| *n != 0).ok_or_else(|| {
                FieldError::new(
                    format!("{field}.{f}"),
                    format!("{n} is out of range (1-65535)"),
                )
            })
        };
        let port = match &p.port {
            None => PortMatch::Any,
            Some(IntOrString::Int(n)) => PortMatch::Number(in_range(*n, "port")?),
            Some(IntOrString::String(s)) => {
                validate_port_name(s).map_err(|m| FieldError::new(format!("{field}.port"), m))?;
                PortMatch::Named(s.clone())
            }
        };
        let end_port = match (p.end_port, &port) {
            (None, _) => None,
            (Some(e), PortMatch::Number(start)) => {
                let e = in_range(e, "endPort")?;
                if e < *start {
                    return Err(FieldError::new(
                        format!("{field}.endPort"),
                        format!("{e} is less than port {start}"),
                    ));
                }
                Some(e)
            }
            (Some(_), PortMatch::Named(n)) => {
                return Err(FieldError::new(
                    format!("{field}.endPort"),
                    format!("cannot be used with named port {n:?}"),
                ));
            }
            (Some(_), PortMatch::Any) => {
                return Err(FieldError::new(
                    format!("{field}.endPort"),
                    "requires a numeric port",
                ));
            }
        };
        Ok(PortSpec {
            protocol,
            port,
            end_port,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The store
// ---------------------------------------------------------------------------------------------

/// Everything policy is computed from.
#[derive(Clone, Debug, Default)]
pub struct Store {
    pub namespaces: BTreeMap<String, NamespaceInfo>,
    pub pods: BTreeMap<PodRef, PodInfo>,
    /// Keyed by (namespace, name).
    pub policies: BTreeMap<(String, String), Policy>,
    /// Current errors, per object (objects without a usable name under an empty name).
    errors: BTreeMap<ObjectKey, Vec<ConfigError>>,
}

impl Store {
    /// A store holding `objects` (errors in `errors()`).
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Store {
        let mut s = Store::default();
        s.replace_all(objects);
        s
    }

    /// Makes the store hold exactly `objects`, except that a policy that fails validation keeps
    /// its previous good version (if any). Returns the errors, which replace `errors()`.
    pub fn replace_all(&mut self, objects: impl IntoIterator<Item = Object>) -> Vec<ConfigError> {
        let mut old_policies = std::mem::take(&mut self.policies);
        self.namespaces.clear();
        self.pods.clear();
        self.errors.clear();
        for obj in objects {
            if let Object::NetworkPolicy(np) = &obj {
                let key = meta_key(Kind::NetworkPolicy, &np.metadata);
                if let Some(old) = old_policies.remove(&(key.namespace, key.name)) {
                    self.policies
                        .insert((old.namespace.clone(), old.name.clone()), old);
                }
            }
            // Errors are recorded by `apply`.
            let _ = self.apply(obj);
        }
        self.errors().into_iter().cloned().collect()
    }

    /// Adds or replaces one object. On error the object is not applied (a pod is applied
    /// without the parts in error) and the error is also kept in `errors()` until the object is
    /// applied successfully or removed.
    pub fn apply(&mut self, obj: Object) -> Result<(), ConfigError> {
        let key = obj.key();
        let result = match obj {
            Object::Namespace(ns) => named_key(Kind::Namespace, &ns.metadata).map(|k| {
                let labels = ns.metadata.labels.clone().unwrap_or_default();
                self.namespaces
                    .insert(k.name.clone(), NamespaceInfo::new(&k.name, labels));
                Vec::new()
            }),
            Object::Pod(pod) => pod.converted.map(|(r, info, errs)| {
                self.pods.insert(r, info);
                errs
            }),
            Object::NetworkPolicy(np) => Policy::from_k8s(&np).map(|p| {
                self.policies
                    .insert((p.namespace.clone(), p.name.clone()), p);
                Vec::new()
            }),
        };
        let errs = result.unwrap_or_else(|e| vec![e]);
        let first = errs.first().cloned();
        if errs.is_empty() {
            self.errors.remove(&key);
        } else {
            self.errors.insert(key, errs);
        }
        first.map_or(Ok(()), Err)
    }

    /// Removes an object (and its errors).
    pub fn remove(&mut self, key: &ObjectKey) {
        match key.kind {
            Kind::Namespace => {
                self.namespaces.remove(&key.name);
            }
            Kind::Pod => {
                self.pods.remove(&PodRef {
                    namespace: key.namespace.clone(),
                    name: key.name.clone(),
                });
            }
            Kind::NetworkPolicy => {
                self.policies
                    .remove(&(key.namespace.clone(), key.name.clone()));
            }
        }
        self.errors.remove(key);
    }

    /// Current configuration errors, by object.
    pub fn errors(&self) -> Vec<&ConfigError> {
        self.errors.values().flatten().collect()
    }

    /// A namespace's labels; a namespace the store does not hold has only its name label.
    pub fn namespace_labels(&self, ns: &str) -> Cow<'_, BTreeMap<String, String>> {
        match self.namespaces.get(ns) {
            Some(info) => Cow::Borrowed(&info.labels),
            None => Cow::Owned(NamespaceInfo::new(ns, BTreeMap::new()).labels),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Result<Policy, ConfigError> {
        let np: NetworkPolicy = serde_saphyr::from_str(yaml).unwrap();
        Policy::from_k8s(&np)
    }

    fn err(yaml: &str) -> String {
        policy(yaml).unwrap_err().to_string()
    }

    const HEAD: &str = "metadata: {name: foo, namespace: x}\n";

    #[test]
    fn policy_types_defaults() {
        let p = policy(&format!("{HEAD}spec: {{podSelector: {{}}}}")).unwrap();
        assert_eq!(p.ingress, Some(vec![]), "no policyTypes: Ingress, deny all");
        assert_eq!(p.egress, None);
        let p = policy(&format!("{HEAD}spec: {{egress: [{{}}]}}")).unwrap();
        assert!(p.ingress.is_some() && p.egress.as_ref().unwrap().len() == 1);
        let p = policy(&format!("{HEAD}spec: {{egress: []}}")).unwrap();
        assert_eq!(
            p.egress, None,
            "an empty egress list does not make an egress policy"
        );
        let p = policy(&format!(
            "{HEAD}spec: {{policyTypes: [Egress], ingress: [{{}}]}}"
        ))
        .unwrap();
        assert_eq!((p.ingress, p.egress), (None, Some(vec![])));
        let p = policy(&format!(
            "{HEAD}spec: {{ingress: [{{from: [], ports: []}}]}}"
        ))
        .unwrap();
        assert_eq!(
            p.ingress,
            Some(vec![Rule {
                peers: None,
                ports: None
            }])
        );
    }

    #[test]
    fn validation_errors_name_object_and_field() {
        let cases = [
            (
                "spec: {ingress: [{from: [{podSelector: {}}, {ipBlock: {cidr: 192.168.0.0/16, except: [10.1.0.0/16]}}]}]}",
                "NetworkPolicy x/foo: spec.ingress[0].from[1].ipBlock.except[0]: 10.1.0.0/16 is not inside cidr 192.168.0.0/16",
            ),
            (
                "spec: {egress: [{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}",
                "NetworkPolicy x/foo: spec.egress[0].to[0].ipBlock.cidr: invalid CIDR",
            ),
            (
                "spec: {egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]}]}",
                "spec.egress[0].to[0].ipBlock.except[0]: 10.0.0.0/8 is not inside cidr 10.0.0.0/8",
            ),
            (
                "spec: {egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: ['fd00::/64']}}]}]}",
                "spec.egress[0].to[0].ipBlock.except[0]: fd00::/64 is not inside cidr 10.0.0.0/8",
            ),
            (
                "spec: {ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}",
                "spec.ingress[0].from[0]: ipBlock cannot be combined",
            ),
            (
                "spec: {ingress: [{from: [{}]}]}",
                "spec.ingress[0].from[0]: must specify",
            ),
            (
                "spec: {ingress: [{ports: [{port: 70000}]}]}",
                "spec.ingress[0].ports[0].port: 70000 is out of range",
            ),
            (
                "spec: {ingress: [{ports: [{port: 0}]}]}",
                "spec.ingress[0].ports[0].port: 0 is out of range",
            ),
            (
                "spec: {ingress: [{}, {ports: [{port: 90, endPort: 80}]}]}",
                "spec.ingress[1].ports[0].endPort: 80 is less than port 90",
            ),
            (
                "spec: {ingress: [{ports: [{port: http, endPort: 80}]}]}",
                "spec.ingress[0].ports[0].endPort: cannot be used with named port \"http\"",
            ),
            (
                "spec: {ingress: [{ports: [{endPort: 80}]}]}",
                "spec.ingress[0].ports[0].endPort: requires a numeric port",
            ),
            (
                "spec: {ingress: [{ports: [{port: 80, protocol: ICMP}]}]}",
                "spec.ingress[0].ports[0].protocol: unsupported protocol \"ICMP\"",
            ),
            (
                "spec: {ingress: [{ports: [{port: Not_A_Name}]}]}",
                "spec.ingress[0].ports[0].port: \"Not_A_Name\" is neither",
            ),
            (
                "spec: {policyTypes: [Ingress, Sideways]}",
                "NetworkPolicy x/foo: spec.policyTypes[1]: unsupported value \"Sideways\"",
            ),
            (
                "spec: {podSelector: {matchExpressions: [{key: a, operator: Near}]}}",
                "spec.podSelector.matchExpressions[0].operator: unknown operator \"Near\"",
            ),
            (
                "spec: {egress: [{to: [{namespaceSelector: {matchExpressions: [{key: a, operator: In}]}}]}]}",
                "spec.egress[0].to[0].namespaceSelector.matchExpressions[0].values: must be non-empty",
            ),
            (
                "spec: {egress: [{to: [{podSelector: {matchExpressions: [{key: a, operator: Exists, values: [b]}]}}]}]}",
                "spec.egress[0].to[0].podSelector.matchExpressions[0].values: must be empty",
            ),
        ];
        for (spec, want) in cases {
            let got = err(&format!("{HEAD}{spec}"));
            assert!(
                got.contains(want),
                "got {got:?}, want it to contain {want:?}"
            );
            assert!(got.starts_with("NetworkPolicy x/foo: spec."), "{got}");
        }
        let got = err("metadata: {namespace: x}\nspec: {}");
        assert_eq!(got, "NetworkPolicy x/<unnamed>: metadata.name: is required");
    }

    #[test]
    fn cidrs_are_normalized_and_audit_parsed() {
        let p = policy(
            "metadata: {name: foo, namespace: x, annotations: {palisade.io/audit: 'true'}}\n\
             spec: {ingress: [{from: [{ipBlock: {cidr: 10.1.2.3/16, except: [10.1.200.7/24]}}]}]}",
        )
        .unwrap();
        assert!(p.audit);
        let rules = p.ingress.unwrap();
        assert_eq!(
            rules[0].peers.as_ref().unwrap()[0],
            Peer::IpBlock {
                cidr: "10.1.0.0/16".parse().unwrap(),
                except: vec!["10.1.200.0/24".parse().unwrap()],
            }
        );
    }

    fn np_obj(yaml: &str) -> Object {
        Object::NetworkPolicy(Box::new(serde_saphyr::from_str(yaml).unwrap()))
    }

    #[test]
    fn last_good_policy_stays_in_force() {
        let good =
            np_obj("metadata: {name: p, namespace: x}\nspec: {ingress: [{ports: [{port: 80}]}]}");
        let bad = np_obj(
            "metadata: {name: p, namespace: x}\nspec: {ingress: [{ports: [{port: 99999}]}]}",
        );
        let fixed =
            np_obj("metadata: {name: p, namespace: x}\nspec: {ingress: [{ports: [{port: 81}]}]}");
        let key = ("x".to_string(), "p".to_string());
        let port_of = |s: &Store| {
            s.policies[&key].ingress.as_ref().unwrap()[0]
                .ports
                .as_ref()
                .unwrap()[0]
                .port
                .clone()
        };

        // Incremental apply.
        let mut s = Store::default();
        s.apply(good.clone()).unwrap();
        let e = s.apply(bad.clone()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("NetworkPolicy x/p: spec.ingress[0].ports[0].port")
        );
        assert_eq!(port_of(&s), PortMatch::Number(80));
        assert_eq!(s.errors().len(), 1);
        s.apply(fixed.clone()).unwrap();
        assert_eq!(port_of(&s), PortMatch::Number(81));
        assert!(s.errors().is_empty());

        // Whole-set replacement (the standalone agent).
        let mut s = Store::from_objects([good.clone()]);
        let errs = s.replace_all([bad.clone()]);
        assert_eq!(errs.len(), 1);
        assert_eq!(port_of(&s), PortMatch::Number(80), "last good version kept");
        let errs = s.replace_all([bad]);
        assert_eq!(errs.len(), 1);
        assert_eq!(
            port_of(&s),
            PortMatch::Number(80),
            "still kept on the next load"
        );
        assert!(s.replace_all([]).is_empty());
        assert!(s.policies.is_empty(), "a policy gone from the input goes");
        // A new policy that has never been valid is simply absent.
        let s = Store::from_objects([np_obj(
            "metadata: {name: q, namespace: x}\nspec: {policyTypes: [Bogus]}",
        )]);
        assert!(s.policies.is_empty());
        assert_eq!(s.errors().len(), 1);
    }

    #[test]
    fn pods_and_namespaces() {
        let pod: Pod = serde_saphyr::from_str(
            r#"
metadata:
  name: p
  labels: {app: web}
  annotations: {palisade.io/interface: veth1, other: x}
spec:
  nodeName: n1
  containers:
    - name: c
      ports:
        - {name: http, containerPort: 8080}
        - {containerPort: 9090}
        - {name: dns, containerPort: 53, protocol: UDP}
        - {name: bad, containerPort: 70000}
  initContainers:
    - {name: side, restartPolicy: Always, ports: [{name: side, containerPort: 7000}]}
    - {name: once, ports: [{name: once, containerPort: 7001}]}
status:
  podIP: 10.0.0.1
  podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}, {ip: nonsense}]
"#,
        )
        .unwrap();
        let mut s = Store::default();
        let e = s.apply(Object::from(pod)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Pod default/p: spec.containers[0].ports[3].containerPort: 70000 is out of range (1-65535)"
        );
        assert_eq!(s.errors().len(), 2, "{:?}", s.errors());
        let info = &s.pods[&PodRef {
            namespace: "default".into(),
            name: "p".into(),
        }];
        assert_eq!(
            info.ips,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        let names: Vec<_> = info
            .container_ports
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["dns", "http", "side"]);
        assert_eq!(info.node_name.as_deref(), Some("n1"));
        assert_eq!(info.annotations.len(), 1);

        let ns: Namespace = serde_saphyr::from_str("metadata: {name: a, labels: {t: x}}").unwrap();
        s.apply(Object::Namespace(Box::new(ns))).unwrap();
        assert_eq!(s.namespace_labels("a")[NAMESPACE_NAME_LABEL], "a");
        assert_eq!(s.namespace_labels("a")["t"], "x");
        assert_eq!(s.namespace_labels("zzz")[NAMESPACE_NAME_LABEL], "zzz");
    }
}
