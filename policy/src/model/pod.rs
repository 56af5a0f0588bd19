//! Namespaces and pods, reduced to what policy reads.
use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use serde::Serialize;

use super::{KEPT_POD_ANNOTATIONS, Kind, NAMESPACE_NAME_LABEL, named_key};
use crate::error::{ConfigError, FieldError};
use crate::state::PodRef;

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
    pub(crate) fn from_field(p: Option<&String>, field: String) -> Result<Protocol, FieldError> {
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
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct PodInfo {
    /// One copy of each label set (`shared::label_set`), which the identities the compiler makes
    /// of the pod share too.
    pub labels: Arc<BTreeMap<String, String>>,
    /// `status.podIPs`, else `status.podIP`; empty for pods that have finished (phase Succeeded
    /// or Failed: their addresses may already belong to another pod).
    pub ips: Vec<IpAddr>,
    /// Named ports of the containers (and of sidecar init containers), sorted.
    pub container_ports: Arc<Vec<NamedPort>>,
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
        let mut container_ports = Vec::new();
        let mut info = PodInfo {
            labels: super::shared::label_set(pod.metadata.labels.clone().unwrap_or_default()),
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
                        Ok(protocol) => container_ports.push(NamedPort {
                            name,
                            port,
                            protocol,
                        }),
                        Err(e) => errors.push(e.on(&object)),
                    }
                }
            }
        }
        container_ports.sort();
        container_ports.dedup();
        info.container_ports = super::shared::named_ports(container_ports);
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
        let pod_ref = PodRef::new(key.namespace, key.name);
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
