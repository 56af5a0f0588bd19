//! Validated, normalized NetworkPolicies: rules, peers, ports.
use std::fmt;

use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{AUDIT_ANNOTATION, Kind, ObjectKey, PodInfo, Protocol, named_key};
use crate::error::{ConfigError, FieldError};
use crate::selector::Selector;
use crate::state::Direction;

/// A validated, normalized NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Rule {
    /// `None`: no (or an empty) `from`/`to`: every peer, in the cluster or not.
    pub peers: Option<Vec<Peer>>,
    /// `None`: no (or an empty) `ports`: every port of every protocol.
    pub ports: Option<Vec<PortSpec>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
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
