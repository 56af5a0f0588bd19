//! Validated ClusterNetworkPolicies: tier, priority, subject, and ordered rules whose first match
//! decides (see `super::reference` for what they mean together).
//!
//! `ClusterNetworkPolicy::from_raw` accepts what the API server admits under the experimental
//! CRD (cnp-spec §9), with these additions: selectors must be valid label selectors, an ingress
//! peer may not use the egress-only peers (`networks`, `nodes`, `domainNames`), and
//! `domainNames` only go with `Accept`.
use std::fmt;
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::raw;
use crate::error::{ConfigError, FieldError};
use crate::model::{AUDIT_ANNOTATION, Protocol};
use crate::selector::Selector;
use crate::state::Direction;

/// Highest `spec.priority`.
pub const MAX_PRIORITY: u16 = 1000;
/// Most rules per direction.
pub const MAX_RULES: usize = 25;
/// Most peers (`from`, `to`) per rule.
pub const MAX_PEERS: usize = 25;
/// Most `protocols` entries per rule.
pub const MAX_PROTOCOLS: usize = 25;
/// Most CIDRs per `networks` peer.
pub const MAX_NETWORKS: usize = 25;
/// Most names per `domainNames` peer.
pub const MAX_DOMAIN_NAMES: usize = 25;
/// Longest rule name, in characters.
pub const MAX_RULE_NAME: usize = 100;
/// Longest CIDR string.
pub const MAX_CIDR_LEN: usize = 43;

pub use crate::state::{Action, Tier};

/// A validated ClusterNetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterNetworkPolicy {
    pub name: String,
    pub tier: Tier,
    /// 0..=1000; lower is evaluated first within the tier.
    pub priority: u16,
    pub subject: Subject,
    /// In list order, the first rule first. Empty: the policy does not affect ingress.
    pub ingress: Vec<TierRule>,
    /// As `ingress`, for egress.
    pub egress: Vec<TierRule>,
    /// `palisade.io/audit: "true"`.
    pub audit: bool,
}

/// The pods a policy applies to (never host-networked pods).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Subject {
    /// Every pod of the namespaces the selector matches.
    Namespaces(Selector),
    /// Pods matching `pod_selector` in namespaces matching `namespace_selector` (absent in the
    /// object: every namespace).
    Pods {
        namespace_selector: Selector,
        pod_selector: Selector,
    },
}

/// One rule: traffic matching any peer AND (if `ports` is set) any port gets `action`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TierRule {
    /// No meaning; for people and logs.
    pub name: Option<String>,
    /// Position in `spec.ingress` or `spec.egress`.
    pub index: usize,
    pub action: Action,
    /// Never empty.
    pub peers: Vec<TierPeer>,
    /// `None`: no `protocols`: every protocol and port. `Some` is never empty.
    pub ports: Option<Vec<TierPort>>,
}

impl TierRule {
    /// A peer of the rule has no field this version knows: the rule fails closed (an `Accept`
    /// rule matches nothing, a `Deny` or `Pass` rule denies everything).
    pub fn fails_closed(&self) -> bool {
        self.peers
            .iter()
            .any(|p| matches!(p, TierPeer::Unsupported(_)))
    }
}

/// The other end of a connection, as a rule selects it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum TierPeer {
    /// Every pod (not host-networked) of the namespaces the selector matches.
    Namespaces(Selector),
    /// Pods (not host-networked) matching `pod_selector` in namespaces matching
    /// `namespace_selector` (absent in the object: every namespace).
    Pods {
        namespace_selector: Selector,
        pod_selector: Selector,
    },
    /// Egress only. Every address inside one of the CIDRs, pods and nodes included. Host bits
    /// zeroed, sorted, no duplicates.
    Networks(Vec<IpNetwork>),
    /// Egress only. The addresses of the nodes the selector matches.
    Nodes(Selector),
    /// Egress and `Accept` only. Lower case, without a trailing dot, sorted, no duplicates; an
    /// exact name or `*.` and a suffix (see `domain_matches`).
    DomainNames(Vec<String>),
    /// A peer that had only fields this version does not know (a newer CRD); they are listed.
    /// Its rule fails closed (`TierRule::fails_closed`).
    Unsupported(Vec<String>),
}

/// A destination port filter.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TierPort {
    /// `proto` to a destination port in `first..=last` (`first == last` for one port).
    Port {
        proto: Protocol,
        first: u16,
        last: u16,
    },
    /// A container port name, resolved on the destination pod (with its protocol).
    NamedPort(String),
}

impl fmt::Display for TierPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TierPort::Port { proto, first, last } if first == last => write!(f, "{proto}/{first}"),
            TierPort::Port { proto, first, last } => write!(f, "{proto}/{first}-{last}"),
            TierPort::NamedPort(n) => write!(f, "named port {n}"),
        }
    }
}

impl ClusterNetworkPolicy {
    /// The rules of one direction, in order.
    pub fn rules(&self, dir: Direction) -> &[TierRule] {
        match dir {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// The total evaluation order: Admin before Baseline, then lower priority first, then name
    /// ascending (ties of priority are the implementation's choice; this is kube-network-policies').
    pub fn precedence_key(&self) -> (Tier, u16, &str) {
        (self.tier, self.priority, &self.name)
    }

    /// Validates a ClusterNetworkPolicy. The error names the object and the field.
    pub fn from_raw(raw: &raw::ClusterNetworkPolicy) -> Result<ClusterNetworkPolicy, ConfigError> {
        let name = raw.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(ConfigError::new(
                format!("{} <unnamed>", raw::KIND),
                "metadata.name",
                "is required",
            ));
        }
        let object = format!("{} {name}", raw::KIND);
        parse(raw, name).map_err(|e| e.on(object))
    }
}

fn required(field: impl Into<String>) -> FieldError {
    FieldError::new(field, "is required")
}

fn parse(
    raw: &raw::ClusterNetworkPolicy,
    name: String,
) -> Result<ClusterNetworkPolicy, FieldError> {
    // Absent: the caller already chose the kind (a typed client, a test).
    for (field, got, want) in [
        ("apiVersion", &raw.api_version, raw::API_VERSION),
        ("kind", &raw.kind, raw::KIND),
    ] {
        if !got.is_empty() && got != want {
            return Err(FieldError::new(
                field,
                format!("unsupported value {got:?} (want {want})"),
            ));
        }
    }
    let spec = raw.spec.as_ref().ok_or_else(|| required("spec"))?;
    let tier = match spec.tier.as_deref() {
        None => return Err(required("spec.tier")),
        Some("Admin") => Tier::Admin,
        Some("Baseline") => Tier::Baseline,
        Some(t) => {
            return Err(FieldError::new(
                "spec.tier",
                format!("unsupported value {t:?} (want Admin or Baseline)"),
            ));
        }
    };
    let priority = match spec.priority {
        None => return Err(required("spec.priority")),
        Some(p) => u16::try_from(p)
            .ok()
            .filter(|p| *p <= MAX_PRIORITY)
            .ok_or_else(|| {
                FieldError::new(
                    "spec.priority",
                    format!("{p} is out of range (0-{MAX_PRIORITY})"),
                )
            })?,
    };
    let subject = parse_subject(spec.subject.as_ref())?;
    let ingress = parse_rules(
        "spec.ingress",
        spec.ingress.as_deref().unwrap_or_default(),
        |f, r| {
            let peers = r.from.as_deref().map(|peers| {
                peers
                    .iter()
                    .enumerate()
                    .map(|(j, p)| parse_ingress_peer(&format!("{f}.from[{j}]"), p))
                    .collect::<Result<Vec<_>, _>>()
            });
            RuleParts {
                name: r.name.as_deref(),
                action: r.action.as_deref(),
                peers_field: "from",
                peers: peers.transpose(),
                protocols: r.protocols.as_deref(),
            }
        },
    )?;
    let egress = parse_rules(
        "spec.egress",
        spec.egress.as_deref().unwrap_or_default(),
        |f, r| {
            let peers = r.to.as_deref().map(|peers| {
                peers
                    .iter()
                    .enumerate()
                    .map(|(j, p)| parse_egress_peer(&format!("{f}.to[{j}]"), p))
                    .collect::<Result<Vec<_>, _>>()
            });
            RuleParts {
                name: r.name.as_deref(),
                action: r.action.as_deref(),
                peers_field: "to",
                peers: peers.transpose(),
                protocols: r.protocols.as_deref(),
            }
        },
    )?;
    for rule in &egress {
        check_egress_rule(rule)?;
    }
    let audit = raw
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(AUDIT_ANNOTATION))
        .is_some_and(|v| v == "true");
    Ok(ClusterNetworkPolicy {
        name,
        tier,
        priority,
        subject,
        ingress,
        egress,
        audit,
    })
}

fn parse_subject(subject: Option<&raw::Subject>) -> Result<Subject, FieldError> {
    const F: &str = "spec.subject";
    let s = subject.ok_or_else(|| required(F))?;
    match (&s.namespaces, &s.pods) {
        (Some(ns), None) => Ok(Subject::Namespaces(Selector::from_k8s(
            ns,
            &format!("{F}.namespaces"),
        )?)),
        (None, Some(pods)) => {
            let (namespace_selector, pod_selector) =
                parse_namespaced_pod(&format!("{F}.pods"), pods)?;
            Ok(Subject::Pods {
                namespace_selector,
                pod_selector,
            })
        }
        (None, None) => Err(FieldError::new(
            F,
            "must set exactly one of namespaces or pods",
        )),
        (Some(_), Some(_)) => Err(FieldError::new(
            F,
            "must set exactly one of namespaces or pods, not both",
        )),
    }
}

fn parse_namespaced_pod(
    field: &str,
    p: &raw::NamespacedPod,
) -> Result<(Selector, Selector), FieldError> {
    let pod_selector = p
        .pod_selector
        .as_ref()
        .ok_or_else(|| required(format!("{field}.podSelector")))?;
    let namespace_selector = match &p.namespace_selector {
        Some(s) => Selector::from_k8s(s, &format!("{field}.namespaceSelector"))?,
        None => Selector::everything(),
    };
    let pod_selector = Selector::from_k8s(pod_selector, &format!("{field}.podSelector"))?;
    Ok((namespace_selector, pod_selector))
}

/// A rule of either direction, seen the same way.
struct RuleParts<'a> {
    name: Option<&'a str>,
    action: Option<&'a str>,
    peers_field: &'static str,
    /// Parsed already, each peer naming its own field.
    peers: Result<Option<Vec<TierPeer>>, FieldError>,
    protocols: Option<&'a [raw::Protocol]>,
}

fn parse_rules<'r, R>(
    field: &str,
    rules: &'r [R],
    parts: impl Fn(&str, &'r R) -> RuleParts<'r>,
) -> Result<Vec<TierRule>, FieldError> {
    if rules.len() > MAX_RULES {
        return Err(FieldError::new(
            field,
            format!("must have at most {MAX_RULES} items (has {})", rules.len()),
        ));
    }
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let f = format!("{field}[{i}]");
            parse_rule(&f, i, parts(&f, r))
        })
        .collect()
}

fn parse_rule(field: &str, index: usize, r: RuleParts<'_>) -> Result<TierRule, FieldError> {
    let name = r.name.filter(|n| !n.is_empty());
    if let Some(n) = name
        && n.chars().count() > MAX_RULE_NAME
    {
        return Err(FieldError::new(
            format!("{field}.name"),
            format!(
                "must be at most {MAX_RULE_NAME} characters (has {})",
                n.chars().count()
            ),
        ));
    }
    let action = match r.action {
        None => return Err(required(format!("{field}.action"))),
        Some("Accept") => Action::Accept,
        Some("Deny") => Action::Deny,
        Some("Pass") => Action::Pass,
        Some(a) => {
            return Err(FieldError::new(
                format!("{field}.action"),
                format!("unsupported value {a:?} (want Accept, Deny or Pass)"),
            ));
        }
    };
    let peers_field = format!("{field}.{}", r.peers_field);
    let peers = r.peers?.ok_or_else(|| required(&peers_field))?;
    check_count(&peers_field, peers.len(), MAX_PEERS)?;
    let ports = match r.protocols {
        None => None,
        Some(protocols) => {
            let f = format!("{field}.protocols");
            check_count(&f, protocols.len(), MAX_PROTOCOLS)?;
            Some(
                protocols
                    .iter()
                    .enumerate()
                    .map(|(k, p)| parse_protocol(&format!("{f}[{k}]"), p))
                    .collect::<Result<Vec<_>, _>>()?,
            )
        }
    };
    Ok(TierRule {
        name: name.map(str::to_string),
        index,
        action,
        peers,
        ports,
    })
}

/// `1..=max` items.
fn check_count(field: &str, n: usize, max: usize) -> Result<(), FieldError> {
    if n == 0 {
        Err(FieldError::new(field, "must have at least 1 item"))
    } else if n > max {
        Err(FieldError::new(
            field,
            format!("must have at most {max} items (has {n})"),
        ))
    } else {
        Ok(())
    }
}

/// The names of the fields a peer had that this version does not know (`null` ones were never
/// there).
fn pruned_names(pruned: &std::collections::BTreeMap<String, serde_json::Value>) -> Vec<String> {
    pruned
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, _)| k.clone())
        .collect()
}

/// The one field set of a peer, or the error (none, several) or the unsupported peer.
fn one_of<T>(
    field: &str,
    set: Vec<(&'static str, T)>,
    pruned: Vec<String>,
    names: &str,
) -> Result<Result<T, TierPeer>, FieldError> {
    let mut set = set.into_iter();
    match (set.next(), set.next()) {
        (Some((_, v)), None) => Ok(Ok(v)),
        (Some((a, _)), Some((b, _))) => Err(FieldError::new(
            field,
            format!("must set exactly one of {names} (has {a} and {b})"),
        )),
        (None, _) if !pruned.is_empty() => Ok(Err(TierPeer::Unsupported(pruned))),
        (None, _) => Err(FieldError::new(
            field,
            format!("must set exactly one of {names}"),
        )),
    }
}

/// A peer field, while it is being told apart from the others.
enum PeerField<'a> {
    Namespaces(&'a LabelSelector),
    Pods(&'a raw::NamespacedPod),
    Nodes(&'a LabelSelector),
    Networks(&'a [String]),
    DomainNames(&'a [String]),
}

fn parse_ingress_peer(field: &str, p: &raw::IngressPeer) -> Result<TierPeer, FieldError> {
    let pruned = pruned_names(&p.pruned);
    for egress_only in ["networks", "nodes", "domainNames"] {
        if pruned.iter().any(|k| k == egress_only) {
            return Err(FieldError::new(
                format!("{field}.{egress_only}"),
                "is only allowed in egress peers (spec.egress[].to[])",
            ));
        }
    }
    let mut set = Vec::new();
    if let Some(s) = &p.namespaces {
        set.push(("namespaces", PeerField::Namespaces(s)));
    }
    if let Some(s) = &p.pods {
        set.push(("pods", PeerField::Pods(s)));
    }
    match one_of(field, set, pruned, "namespaces or pods")? {
        Ok(f) => parse_peer_field(field, f),
        Err(unsupported) => Ok(unsupported),
    }
}

fn parse_egress_peer(field: &str, p: &raw::EgressPeer) -> Result<TierPeer, FieldError> {
    let mut set = Vec::new();
    if let Some(s) = &p.namespaces {
        set.push(("namespaces", PeerField::Namespaces(s)));
    }
    if let Some(s) = &p.pods {
        set.push(("pods", PeerField::Pods(s)));
    }
    if let Some(s) = &p.nodes {
        set.push(("nodes", PeerField::Nodes(s)));
    }
    if let Some(n) = &p.networks {
        set.push(("networks", PeerField::Networks(n)));
    }
    if let Some(d) = &p.domain_names {
        set.push(("domainNames", PeerField::DomainNames(d)));
    }
    let names = "namespaces, pods, nodes, networks or domainNames";
    match one_of(field, set, pruned_names(&p.pruned), names)? {
        Ok(f) => parse_peer_field(field, f),
        Err(unsupported) => Ok(unsupported),
    }
}

fn parse_peer_field(field: &str, p: PeerField<'_>) -> Result<TierPeer, FieldError> {
    Ok(match p {
        PeerField::Namespaces(s) => {
            TierPeer::Namespaces(Selector::from_k8s(s, &format!("{field}.namespaces"))?)
        }
        PeerField::Pods(p) => {
            let (namespace_selector, pod_selector) =
                parse_namespaced_pod(&format!("{field}.pods"), p)?;
            TierPeer::Pods {
                namespace_selector,
                pod_selector,
            }
        }
        PeerField::Nodes(s) => TierPeer::Nodes(Selector::from_k8s(s, &format!("{field}.nodes"))?),
        PeerField::Networks(list) => {
            let f = format!("{field}.networks");
            check_count(&f, list.len(), MAX_NETWORKS)?;
            let mut nets = Vec::new();
            for (k, s) in list.iter().enumerate() {
                let fk = format!("{f}[{k}]");
                if list[..k].contains(s) {
                    return Err(FieldError::new(fk, format!("duplicate value {s:?}")));
                }
                if s.len() > MAX_CIDR_LEN {
                    return Err(FieldError::new(
                        fk,
                        format!(
                            "must be at most {MAX_CIDR_LEN} characters (has {})",
                            s.len()
                        ),
                    ));
                }
                nets.push(parse_network(s).map_err(|m| FieldError::new(fk, m))?);
            }
            nets.sort();
            nets.dedup();
            TierPeer::Networks(nets)
        }
        PeerField::DomainNames(list) => {
            let f = format!("{field}.domainNames");
            check_count(&f, list.len(), MAX_DOMAIN_NAMES)?;
            let mut names = Vec::new();
            for (k, s) in list.iter().enumerate() {
                let fk = format!("{f}[{k}]");
                if list[..k].contains(s) {
                    return Err(FieldError::new(fk, format!("duplicate value {s:?}")));
                }
                validate_domain_name(s).map_err(|m| FieldError::new(fk, m))?;
                let s = s.strip_suffix('.').unwrap_or(s);
                names.push(s.to_ascii_lowercase());
            }
            names.sort();
            names.dedup();
            TierPeer::DomainNames(names)
        }
    })
}

fn parse_protocol(field: &str, p: &raw::Protocol) -> Result<TierPort, FieldError> {
    let mut set = Vec::new();
    for (name, ports, proto) in [
        ("tcp", &p.tcp, Protocol::Tcp),
        ("udp", &p.udp, Protocol::Udp),
        ("sctp", &p.sctp, Protocol::Sctp),
    ] {
        if let Some(ports) = ports {
            set.push((name, Ok((ports, proto))));
        }
    }
    if let Some(n) = &p.destination_named_port {
        set.push(("destinationNamedPort", Err(n)));
    }
    let names = "tcp, udp, sctp or destinationNamedPort";
    let mut set = set.into_iter();
    let (name, which) = match (set.next(), set.next()) {
        (Some(one), None) => one,
        (Some((a, _)), Some((b, _))) => {
            return Err(FieldError::new(
                field,
                format!("must set exactly one of {names} (has {a} and {b})"),
            ));
        }
        (None, _) => {
            return Err(FieldError::new(
                field,
                format!("must set exactly one of {names}"),
            ));
        }
    };
    let (ports, proto) = match which {
        Ok(x) => x,
        // Not validated further by the API: a name no container port has matches nothing.
        Err(named) => return Ok(TierPort::NamedPort(named.clone())),
    };
    let field = format!("{field}.{name}");
    let port = ports
        .destination_port
        .as_ref()
        .ok_or_else(|| FieldError::new(&field, "must set destinationPort"))?;
    let field = format!("{field}.destinationPort");
    let in_range = |n: i64, f: &str| {
        u16::try_from(n).ok().filter(|n| *n != 0).ok_or_else(|| {
            FieldError::new(
                format!("{field}.{f}"),
                format!("{n} is out of range (1-65535)"),
            )
        })
    };
    match (port.number, &port.range) {
        (Some(n), None) => {
            let n = in_range(n, "number")?;
            Ok(TierPort::Port {
                proto,
                first: n,
                last: n,
            })
        }
        (None, Some(r)) => {
            let start = r
                .start
                .ok_or_else(|| required(format!("{field}.range.start")))?;
            let end = r
                .end
                .ok_or_else(|| required(format!("{field}.range.end")))?;
            let (first, last) = (in_range(start, "range.start")?, in_range(end, "range.end")?);
            if first >= last {
                return Err(FieldError::new(
                    format!("{field}.range"),
                    format!("start port {first} must be less than end port {last}"),
                ));
            }
            Ok(TierPort::Port { proto, first, last })
        }
        (Some(_), Some(_)) => Err(FieldError::new(
            field,
            "must set exactly one of number or range (has number and range)",
        )),
        (None, None) => Err(FieldError::new(
            field,
            "must set exactly one of number or range",
        )),
    }
}

/// The checks of an egress rule across its fields: the experimental CRD's rule against named
/// ports with address peers, and `domainNames` in `Accept` rules only.
fn check_egress_rule(rule: &TierRule) -> Result<(), FieldError> {
    let field = format!("spec.egress[{}]", rule.index);
    let named = rule
        .ports
        .iter()
        .flatten()
        .position(|p| matches!(p, TierPort::NamedPort(_)));
    let address_peer = rule.peers.iter().position(|p| {
        matches!(
            p,
            TierPeer::Networks(_) | TierPeer::Nodes(_) | TierPeer::DomainNames(_)
        )
    });
    if let (Some(k), Some(j)) = (named, address_peer) {
        return Err(FieldError::new(
            field,
            format!(
                "networks/nodes/domainNames peer (to[{j}]) cannot be set with namedPorts \
                 (protocols[{k}].destinationNamedPort) since there are no namedPorts for \
                 networks/nodes/domainNames"
            ),
        ));
    }
    if rule.action != Action::Accept
        && let Some(j) = rule
            .peers
            .iter()
            .position(|p| matches!(p, TierPeer::DomainNames(_)))
    {
        return Err(FieldError::new(
            format!("{field}.to[{j}].domainNames"),
            format!(
                "is only supported in Accept rules (action is {})",
                rule.action
            ),
        ));
    }
    Ok(())
}

/// Parses a CIDR as the API server's `isCIDR` does (Go's `netip.ParsePrefix`, IPv4-mapped IPv6
/// refused): an address, `/`, and a decimal prefix length without sign or leading zero. Host
/// bits may be set; they are zeroed.
pub fn parse_network(s: &str) -> Result<IpNetwork, String> {
    let invalid = |why: &str| format!("invalid CIDR {s:?}: {why}");
    let (addr, bits) = s
        .split_once('/')
        .ok_or_else(|| invalid("a prefix length is required"))?;
    let addr: IpAddr = addr
        .parse()
        .map_err(|_| invalid(&format!("{addr:?} is not an IP address")))?;
    if let IpAddr::V6(v6) = addr
        && v6.to_ipv4_mapped().is_some()
    {
        return Err(invalid("IPv4-mapped IPv6 addresses are not allowed"));
    }
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let canonical = !bits.is_empty()
        && bits.bytes().all(|b| b.is_ascii_digit())
        && (bits == "0" || !bits.starts_with('0'));
    let prefix = bits
        .parse::<u8>()
        .ok()
        .filter(|p| canonical && *p <= max)
        .ok_or_else(|| invalid(&format!("bad prefix length {bits:?} (0-{max})")))?;
    let net = IpNetwork::new(addr, prefix).map_err(|e| invalid(&e.to_string()))?;
    IpNetwork::new(net.network(), prefix).map_err(|e| invalid(&e.to_string()))
}

/// The CRD's pattern for a domain name, `^(\*\.)?(L\.)+L\.?$` with labels
/// `L = [a-zA-z0-9]([-a-zA-Z0-9_]*[a-zA-Z0-9])?`: at least two labels, `*.` only as a prefix, an
/// optional trailing dot. The first character's class is upstream's `[a-zA-z0-9]` (sic), which
/// also admits `[`, `\`, `]`, `^`, `_` and a backtick: what the API server admits is admitted.
pub fn validate_domain_name(s: &str) -> Result<(), String> {
    fn label_ok(l: &[u8]) -> bool {
        let first = |c: u8| c.is_ascii_digit() || (b'A'..=b'z').contains(&c);
        let middle = |c: u8| c.is_ascii_alphanumeric() || c == b'-' || c == b'_';
        match l {
            [] => false,
            [c] => first(*c),
            [c, middle_part @ .., last] => {
                first(*c) && last.is_ascii_alphanumeric() && middle_part.iter().all(|c| middle(*c))
            }
        }
    }
    let body = s.strip_prefix("*.").unwrap_or(s);
    let body = body.strip_suffix('.').unwrap_or(body);
    let labels: Vec<&str> = body.split('.').collect();
    if labels.len() >= 2 && labels.iter().all(|l| label_ok(l.as_bytes())) {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a domain name (at least two labels of letters, digits, '-' and '_', \
             optionally a trailing dot, '*.' only as a prefix)"
        ))
    }
}

/// Does a `domainNames` entry (as normalized in `TierPeer::DomainNames`) match a DNS name? An
/// exact name matches only itself; `*.suffix` matches names of one or more labels more than
/// `suffix`, never `suffix` itself. Case and a trailing dot of `name` do not matter.
pub fn domain_matches(pattern: &str, name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .strip_suffix(suffix)
            .and_then(|head| head.strip_suffix('.'))
            .is_some_and(|head| !head.is_empty()),
        None => name == pattern,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEAD: &str = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: p}\n";

    fn raw(yaml: &str) -> raw::ClusterNetworkPolicy {
        let docs = crate::manifest::yaml_documents(yaml).unwrap();
        serde_json::from_value(docs.into_iter().next().unwrap()).unwrap()
    }

    fn cnp(yaml: &str) -> Result<ClusterNetworkPolicy, ConfigError> {
        ClusterNetworkPolicy::from_raw(&raw(yaml))
    }

    /// A policy of `HEAD` and this `spec` (flow YAML).
    fn spec(spec: &str) -> Result<ClusterNetworkPolicy, ConfigError> {
        cnp(&format!("{HEAD}spec: {spec}\n"))
    }

    /// An Admin policy with these ingress and egress rules (flow YAML lists).
    fn rules(ingress: &str, egress: &str) -> Result<ClusterNetworkPolicy, ConfigError> {
        spec(&format!(
            "{{tier: Admin, priority: 10, subject: {{namespaces: {{}}}}, ingress: {ingress}, egress: {egress}}}"
        ))
    }

    fn egress(rule: &str) -> Result<ClusterNetworkPolicy, ConfigError> {
        rules("[]", &format!("[{rule}]"))
    }

    fn ingress(rule: &str) -> Result<ClusterNetworkPolicy, ConfigError> {
        rules(&format!("[{rule}]"), "[]")
    }

    /// An egress Accept rule to these peers (flow YAML list) with these protocols (or none).
    fn to(peers: &str, protocols: Option<&str>) -> Result<ClusterNetworkPolicy, ConfigError> {
        let protocols = protocols.map_or(String::new(), |p| format!(", protocols: {p}"));
        egress(&format!("{{action: Accept, to: {peers}{protocols}}}"))
    }

    fn tcp(port: &str) -> Option<String> {
        Some(format!("[{{tcp: {{destinationPort: {port}}}}}]"))
    }

    #[track_caller]
    fn refused(got: Result<ClusterNetworkPolicy, ConfigError>, field: &str, message: &str) {
        let e = got.expect_err("must be refused");
        assert_eq!(e.object, "ClusterNetworkPolicy p", "{e}");
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains(message), "{e}: want {message:?}");
    }

    fn list(n: usize, item: impl Fn(usize) -> String) -> String {
        format!("[{}]", (0..n).map(item).collect::<Vec<_>>().join(", "))
    }

    const NS: &str = "{namespaces: {}}";

    #[test]
    fn object_and_spec() {
        let e = cnp("apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {}\nspec: {}").unwrap_err();
        assert_eq!(
            e.to_string(),
            "ClusterNetworkPolicy <unnamed>: metadata.name: is required"
        );
        refused(cnp(HEAD), "spec", "is required");
        refused(
            cnp(&HEAD.replace("v1alpha2", "v1alpha1")),
            "apiVersion",
            "unsupported value \"policy.networking.k8s.io/v1alpha1\"",
        );
        refused(
            cnp(&HEAD.replace("kind: ClusterNetworkPolicy", "kind: AdminNetworkPolicy")),
            "kind",
            "unsupported value \"AdminNetworkPolicy\"",
        );
        let ok = "{tier: Admin, priority: 10, subject: {namespaces: {}}}";
        assert!(spec(ok).is_ok());
        // §9.1: tier, priority, subject.
        refused(
            spec("{priority: 1, subject: {namespaces: {}}}"),
            "spec.tier",
            "is required",
        );
        refused(
            spec(&ok.replace("Admin", "Middle")),
            "spec.tier",
            "unsupported value \"Middle\" (want Admin or Baseline)",
        );
        refused(
            spec(&ok.replace("Admin", "admin")),
            "spec.tier",
            "\"admin\"",
        );
        refused(
            spec("{tier: Admin, subject: {namespaces: {}}}"),
            "spec.priority",
            "is required",
        );
        refused(
            spec(&ok.replace("10", "-1")),
            "spec.priority",
            "-1 is out of range (0-1000)",
        );
        refused(
            spec(&ok.replace("10", "1001")),
            "spec.priority",
            "1001 is out of range",
        );
        refused(
            spec(&ok.replace("10", "4294967296")),
            "spec.priority",
            "out of range",
        );
        assert_eq!(spec(&ok.replace("10", "0")).unwrap().priority, 0);
        assert_eq!(spec(&ok.replace("10", "1000")).unwrap().priority, 1000);
        assert_eq!(
            spec(&ok.replace("Admin", "Baseline")).unwrap().tier,
            Tier::Baseline
        );
        refused(
            spec("{tier: Admin, priority: 1}"),
            "spec.subject",
            "is required",
        );
        // §9.2: exactly one subject field; pods need podSelector.
        refused(
            spec("{tier: Admin, priority: 1, subject: {}}"),
            "spec.subject",
            "must set exactly one of namespaces or pods",
        );
        refused(
            spec("{tier: Admin, priority: 1, subject: {namespaces: {}, pods: {podSelector: {}}}}"),
            "spec.subject",
            "not both",
        );
        refused(
            spec("{tier: Admin, priority: 1, subject: {pods: {namespaceSelector: {}}}}"),
            "spec.subject.pods.podSelector",
            "is required",
        );
        refused(
            spec(
                "{tier: Admin, priority: 1, subject: {namespaces: {matchExpressions: [{key: a, operator: Near}]}}}",
            ),
            "spec.subject.namespaces.matchExpressions[0].operator",
            "unknown operator \"Near\"",
        );
        let p = spec(
            "{tier: Admin, priority: 1, subject: {pods: {podSelector: {matchLabels: {app: web}}}}}",
        )
        .unwrap();
        let Subject::Pods {
            namespace_selector,
            pod_selector,
        } = &p.subject
        else {
            panic!("{p:?}")
        };
        assert!(
            namespace_selector.is_empty(),
            "no namespaceSelector: every namespace"
        );
        assert_eq!(pod_selector.to_string(), "app=web");
        assert!(p.ingress.is_empty() && p.egress.is_empty() && !p.audit);
    }

    #[test]
    fn rules_are_checked() {
        // §9.3: action, from/to, name, counts.
        refused(
            ingress(&format!("{{from: [{NS}]}}")),
            "spec.ingress[0].action",
            "is required",
        );
        refused(
            ingress(&format!("{{action: Allow, from: [{NS}]}}")),
            "spec.ingress[0].action",
            "unsupported value \"Allow\" (want Accept, Deny or Pass)",
        );
        refused(
            ingress("{action: Deny}"),
            "spec.ingress[0].from",
            "is required",
        );
        refused(egress("{action: Deny}"), "spec.egress[0].to", "is required");
        refused(
            ingress("{action: Deny, from: []}"),
            "spec.ingress[0].from",
            "at least 1",
        );
        refused(
            egress(&format!(
                "{{action: Deny, to: {}}}",
                list(26, |_| NS.into())
            )),
            "spec.egress[0].to",
            "at most 25 items (has 26)",
        );
        assert!(
            egress(&format!(
                "{{action: Deny, to: {}}}",
                list(25, |_| NS.into())
            ))
            .is_ok()
        );
        let named = |n: &str| ingress(&format!("{{name: '{n}', action: Pass, from: [{NS}]}}"));
        refused(
            named(&"x".repeat(101)),
            "spec.ingress[0].name",
            "at most 100 characters (has 101)",
        );
        assert!(named(&"x".repeat(100)).is_ok());
        assert!(named(&"é".repeat(100)).is_ok(), "characters, not bytes");
        let rule = format!("{{action: Deny, from: [{NS}]}}");
        refused(
            rules(&list(26, |_| rule.clone()), "[]"),
            "spec.ingress",
            "at most 25 items (has 26)",
        );
        let rule = format!("{{action: Deny, to: [{NS}]}}");
        refused(
            rules("[]", &list(26, |_| rule.clone())),
            "spec.egress",
            "at most 25 items",
        );
        let p = rules("[]", &list(25, |_| rule.clone())).unwrap();
        assert_eq!(p.egress.len(), 25);
        assert_eq!(p.egress[24].index, 24);
        assert_eq!(p.egress[0].name, None);
        assert_eq!(p.egress[0].ports, None);
        // A later rule's error names its index.
        refused(
            rules(
                "[]",
                &format!("[{rule}, {rule}, {{action: Deny, to: [{{}}]}}]"),
            ),
            "spec.egress[2].to[0]",
            "must set exactly one",
        );
    }

    #[test]
    fn peers_are_exactly_one_of() {
        // §9.4: exactly one field per peer.
        refused(
            to(&format!("[{NS}, {{}}]"), None),
            "spec.egress[0].to[1]",
            "must set exactly one of namespaces, pods, nodes, networks or domainNames",
        );
        refused(
            to("[{namespaces: {}, pods: {podSelector: {}}}]", None),
            "spec.egress[0].to[0]",
            "(has namespaces and pods)",
        );
        refused(
            to("[{nodes: {}, networks: [10.0.0.0/8]}]", None),
            "spec.egress[0].to[0]",
            "(has nodes and networks)",
        );
        refused(
            ingress("{action: Deny, from: [{}]}"),
            "spec.ingress[0].from[0]",
            "must set exactly one of namespaces or pods",
        );
        refused(
            ingress("{action: Deny, from: [{namespaces: {}, pods: {podSelector: {}}}]}"),
            "spec.ingress[0].from[0]",
            "(has namespaces and pods)",
        );
        refused(
            to("[{pods: {namespaceSelector: {}}}]", None),
            "spec.egress[0].to[0].pods.podSelector",
            "is required",
        );
        refused(
            to(
                "[{nodes: {matchExpressions: [{key: a, operator: In}]}}]",
                None,
            ),
            "spec.egress[0].to[0].nodes.matchExpressions[0].values",
            "must be non-empty",
        );
        // Ingress peers select pods only.
        for f in [
            "networks: [10.0.0.0/8]",
            "nodes: {}",
            "domainNames: [example.com]",
        ] {
            let name = f.split(':').next().unwrap();
            refused(
                ingress(&format!("{{action: Accept, from: [{{{f}}}]}}")),
                &format!("spec.ingress[0].from[0].{name}"),
                "is only allowed in egress peers",
            );
        }
        // A peer with only fields this version does not know (a newer CRD) fails closed; null
        // fields were never there; unknown fields beside a known one are pruned.
        let p = to(&format!("[{NS}, {{fqdn: {{name: x}}, other: 1}}]"), None).unwrap();
        assert_eq!(
            p.egress[0].peers[1],
            TierPeer::Unsupported(vec!["fqdn".into(), "other".into()])
        );
        assert!(p.egress[0].fails_closed());
        let p = ingress("{action: Deny, from: [{anything: {}}]}").unwrap();
        assert!(p.ingress[0].fails_closed());
        refused(
            to("[{fqdn: null}]", None),
            "spec.egress[0].to[0]",
            "must set exactly one",
        );
        let p = to("[{namespaces: {}, fqdn: x}]", None).unwrap();
        assert_eq!(
            p.egress[0].peers,
            vec![TierPeer::Namespaces(Selector::everything())]
        );
        assert!(!p.egress[0].fails_closed());
    }

    #[test]
    fn networks() {
        // §9.5: CIDR syntax as isCIDR, at most 43 characters, no duplicates, 1..=25.
        let nets = |list: &str| to(&format!("[{{networks: {list}}}]"), None);
        let f1 = "spec.egress[0].to[0].networks[1]";
        refused(
            nets("[10.0.0.0/8, 10.0.0.0/33]"),
            f1,
            "invalid CIDR \"10.0.0.0/33\"",
        );
        refused(
            nets("[10.0.0.0/8, 10.0.0.1]"),
            f1,
            "a prefix length is required",
        );
        refused(nets("[10.0.0.0/8, 10.0.0/8]"), f1, "is not an IP address");
        refused(
            nets("[10.0.0.0/8, 010.0.0.0/8]"),
            f1,
            "is not an IP address",
        );
        refused(
            nets("[10.0.0.0/8, 10.0.0.0/08]"),
            f1,
            "bad prefix length \"08\"",
        );
        refused(nets("[10.0.0.0/8, 10.0.0.0/+8]"), f1, "bad prefix length");
        refused(
            nets("[10.0.0.0/8, 10.0.0.0/255.0.0.0]"),
            f1,
            "bad prefix length",
        );
        refused(nets("[10.0.0.0/8, 10.0.0.0/]"), f1, "bad prefix length");
        refused(
            nets("[10.0.0.0/8, '10.0.0.0/8/9']"),
            f1,
            "bad prefix length",
        );
        refused(
            nets("[10.0.0.0/8, 'fd00::/129']"),
            f1,
            "bad prefix length \"129\" (0-128)",
        );
        refused(
            nets("[10.0.0.0/8, 'fe80::1%eth0/64']"),
            f1,
            "is not an IP address",
        );
        refused(
            nets("[10.0.0.0/8, '::ffff:10.0.0.0/104']"),
            f1,
            "IPv4-mapped IPv6",
        );
        let long = "0000:0000:0000:0000:0000:0000:0000:0000/128";
        assert_eq!(long.len(), 43);
        assert!(nets(&format!("['{long}']")).is_ok());
        refused(
            nets(&format!("[10.0.0.0/8, '{long} ']")),
            f1,
            "at most 43 characters (has 44)",
        );
        refused(
            nets("[10.0.0.0/8, 192.168.0.0/16, 10.0.0.0/8]"),
            "spec.egress[0].to[0].networks[2]",
            "duplicate value \"10.0.0.0/8\"",
        );
        refused(nets("[]"), "spec.egress[0].to[0].networks", "at least 1");
        refused(
            nets(&list(26, |i| format!("10.0.{i}.0/24"))),
            "spec.egress[0].to[0].networks",
            "at most 25 items (has 26)",
        );
        assert!(nets(&list(25, |i| format!("10.0.{i}.0/24"))).is_ok());
        // Host bits are zeroed (isCIDR admits them), then duplicates merge.
        let p = nets("[10.1.2.3/8, 10.0.0.0/8, 'fd00::1/64', 0.0.0.0/0, '::/0', 192.168.1.1/32]")
            .unwrap();
        let got: Vec<String> = match &p.egress[0].peers[0] {
            TierPeer::Networks(n) => n.iter().map(|n| n.to_string()).collect(),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            got,
            [
                "0.0.0.0/0",
                "10.0.0.0/8",
                "192.168.1.1/32",
                "::/0",
                "fd00::/64"
            ]
        );
    }

    #[test]
    fn protocols() {
        // §9.6: exactly one protocol field, destinationPort required, exactly one of number and
        // range, ports 1..=65535, start < end, 1..=25 entries.
        let f = "spec.ingress[0].protocols[0]";
        let with = |p: &str| ingress(&format!("{{action: Deny, from: [{NS}], protocols: [{p}]}}"));
        refused(
            with("{}"),
            f,
            "must set exactly one of tcp, udp, sctp or destinationNamedPort",
        );
        refused(
            with("{tcp: {destinationPort: {number: 80}}, udp: {destinationPort: {number: 80}}}"),
            f,
            "(has tcp and udp)",
        );
        refused(
            with("{sctp: {destinationPort: {number: 80}}, destinationNamedPort: web}"),
            f,
            "(has sctp and destinationNamedPort)",
        );
        refused(
            with("{tcp: {}}"),
            &format!("{f}.tcp"),
            "must set destinationPort",
        );
        refused(with("{udp: null}"), f, "must set exactly one");
        let port = |p: &str| with(&format!("{{udp: {{destinationPort: {p}}}}}"));
        let fp = format!("{f}.udp.destinationPort");
        refused(port("{}"), &fp, "must set exactly one of number or range");
        refused(
            port("{number: 80, range: {start: 1, end: 2}}"),
            &fp,
            "(has number and range)",
        );
        refused(
            port("{number: 0}"),
            &format!("{fp}.number"),
            "0 is out of range (1-65535)",
        );
        refused(
            port("{number: 65536}"),
            &format!("{fp}.number"),
            "65536 is out of range",
        );
        refused(
            port("{number: -80}"),
            &format!("{fp}.number"),
            "-80 is out of range",
        );
        refused(
            port("{range: {end: 90}}"),
            &format!("{fp}.range.start"),
            "is required",
        );
        refused(
            port("{range: {start: 80}}"),
            &format!("{fp}.range.end"),
            "is required",
        );
        refused(
            port("{range: {start: 0, end: 90}}"),
            &format!("{fp}.range.start"),
            "out of range",
        );
        refused(
            port("{range: {start: 80, end: 70000}}"),
            &format!("{fp}.range.end"),
            "out of range",
        );
        refused(
            port("{range: {start: 90, end: 80}}"),
            &format!("{fp}.range"),
            "start port 90 must be less than end port 80",
        );
        refused(
            port("{range: {start: 80, end: 80}}"),
            &format!("{fp}.range"),
            "start port 80 must be less than end port 80",
        );
        refused(
            ingress(&format!("{{action: Deny, from: [{NS}], protocols: []}}")),
            "spec.ingress[0].protocols",
            "at least 1",
        );
        let many = |n| {
            list(n, |i| {
                format!("{{tcp: {{destinationPort: {{number: {}}}}}}}", i + 1)
            })
        };
        refused(
            ingress(&format!(
                "{{action: Deny, from: [{NS}], protocols: {}}}",
                many(26)
            )),
            "spec.ingress[0].protocols",
            "at most 25 items (has 26)",
        );
        assert!(
            ingress(&format!(
                "{{action: Deny, from: [{NS}], protocols: {}}}",
                many(25)
            ))
            .is_ok()
        );
        let p = with("{sctp: {destinationPort: {range: {start: 1, end: 65535}}}}").unwrap();
        assert_eq!(
            p.ingress[0].ports,
            Some(vec![TierPort::Port {
                proto: Protocol::Sctp,
                first: 1,
                last: 65535
            }])
        );
        let p = with("{destinationNamedPort: dns}").unwrap();
        assert_eq!(
            p.ingress[0].ports,
            Some(vec![TierPort::NamedPort("dns".into())])
        );
    }

    #[test]
    fn named_ports_only_with_pod_peers() {
        // §9.7 (the experimental CRD's rule): no destinationNamedPort with networks, nodes or
        // domainNames peers in one egress rule.
        let named = Some("[{tcp: {destinationPort: {number: 80}}}, {destinationNamedPort: web}]");
        for peer in [
            "{networks: [10.0.0.0/8]}",
            "{nodes: {}}",
            "{domainNames: [example.com]}",
        ] {
            refused(
                to(&format!("[{NS}, {peer}]"), named),
                "spec.egress[0]",
                "networks/nodes/domainNames peer (to[1]) cannot be set with namedPorts (protocols[1].destinationNamedPort)",
            );
        }
        assert!(to("[{pods: {podSelector: {}}}, {namespaces: {}}]", named).is_ok());
        assert!(to("[{networks: [10.0.0.0/8]}]", tcp("{number: 80}").as_deref()).is_ok());
        assert!(
            ingress(&format!(
                "{{action: Accept, from: [{NS}], protocols: [{{destinationNamedPort: web}}]}}"
            ))
            .is_ok()
        );
    }

    #[test]
    fn domain_names() {
        // §9.8: the CRD's pattern, no duplicates, 1..=25; Accept rules only.
        let names = |list: &str| to(&format!("[{{domainNames: {list}}}]"), None);
        let f0 = "spec.egress[0].to[0].domainNames[0]";
        for bad in [
            "com",
            "'*'",
            "'*.com'",
            "'a.*.com'",
            "'*example.com'",
            "'**.example.com'",
            "'exa mple.com'",
            "-a.com",
            "a-.com",
            "a..com",
            "'.a.com'",
            "'a.com..'",
            "'é.com'",
            "'a.com/x'",
            "'a.-b.com'",
        ] {
            refused(names(&format!("[{bad}]")), f0, "is not a domain name");
        }
        let p = names(
            "['*.Example.COM', 'kubernetes.io.', 'a_b.example.com', '1.2.3.4', 'x.y', 'kubernetes.io']",
        );
        let p = p.unwrap();
        assert_eq!(
            p.egress[0].peers[0],
            TierPeer::DomainNames(
                [
                    "*.example.com",
                    "1.2.3.4",
                    "a_b.example.com",
                    "kubernetes.io",
                    "x.y"
                ]
                .map(String::from)
                .to_vec()
            )
        );
        // Upstream's first-character class `[a-zA-z0-9]` admits `_` and `^`: so does Palisade.
        assert!(names("['_a.example.com', '^.example.com']").is_ok());
        refused(
            names("[a.com, b.com, a.com]"),
            "spec.egress[0].to[0].domainNames[2]",
            "duplicate value \"a.com\"",
        );
        refused(
            names("[]"),
            "spec.egress[0].to[0].domainNames",
            "at least 1",
        );
        refused(
            names(&list(26, |i| format!("d{i}.example.com"))),
            "spec.egress[0].to[0].domainNames",
            "at most 25",
        );
        for action in ["Deny", "Pass"] {
            refused(
                egress(&format!(
                    "{{action: {action}, to: [{NS}, {{domainNames: [a.com]}}]}}"
                )),
                "spec.egress[0].to[1].domainNames",
                &format!("is only supported in Accept rules (action is {action})"),
            );
        }
        assert!(domain_matches("kubernetes.io", "kubernetes.io"));
        assert!(domain_matches("kubernetes.io", "Kubernetes.IO."));
        assert!(!domain_matches("kubernetes.io", "www.kubernetes.io"));
        assert!(domain_matches("*.kubernetes.io", "www.kubernetes.io"));
        assert!(domain_matches(
            "*.kubernetes.io",
            "latest.blog.kubernetes.io"
        ));
        assert!(!domain_matches("*.kubernetes.io", "kubernetes.io"));
        assert!(!domain_matches("*.kubernetes.io", "my-kubernetes.io"));
        assert!(!domain_matches("*.kubernetes.io", ".kubernetes.io"));
    }

    /// The examples of upstream's CRD validation tests (`pkg/crdtest/testdata`), as cnp-spec §9.9
    /// describes them.
    #[test]
    fn upstream_crd_test_examples() {
        let invalid_action = "{tier: Admin, priority: 1, subject: {namespaces: {}}, ingress: [{action: Invalid, from: [{namespaces: {}}]}]}";
        refused(
            spec(invalid_action),
            "spec.ingress[0].action",
            "unsupported value \"Invalid\"",
        );
        let cluster_wide_deny = "{tier: Admin, priority: 0, subject: {namespaces: {}}, ingress: [{name: deny-all, action: Deny, from: [{pods: {namespaceSelector: {}, podSelector: {}}}]}]}";
        let p = spec(cluster_wide_deny).unwrap();
        assert_eq!(p.priority, 0);
        assert_eq!(
            p.ingress[0].peers,
            vec![TierPeer::Pods {
                namespace_selector: Selector::everything(),
                pod_selector: Selector::everything()
            }]
        );
        let deny_with_ports = "{tier: Baseline, priority: 5, subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {}}], protocols: [\
            {tcp: {destinationPort: {number: 80}}}, {tcp: {destinationPort: {range: {start: 8080, end: 9090}}}}, \
            {udp: {destinationPort: {number: 53}}}, {udp: {destinationPort: {number: 5353}}}, \
            {destinationNamedPort: http}, {destinationNamedPort: metrics}]}]}";
        let p = spec(deny_with_ports).unwrap();
        let ports: Vec<String> = p.ingress[0]
            .ports
            .iter()
            .flatten()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(
            ports,
            [
                "TCP/80",
                "TCP/8080-9090",
                "UDP/53",
                "UDP/5353",
                "named port http",
                "named port metrics"
            ]
        );
    }

    #[test]
    fn audit_precedence_and_pruning() {
        let p = cnp(&format!(
            "{}spec: {{tier: Baseline, priority: 3, subject: {{namespaces: {{}}}}, futureField: 1}}\nstatus: {{conditions: []}}",
            HEAD.replace("{name: p}", "{name: p, annotations: {palisade.io/audit: 'true'}}")
        ))
        .unwrap();
        assert!(p.audit, "audit annotation");
        assert_eq!(p.precedence_key(), (Tier::Baseline, 3, "p"));
        let named = |name: &str, tier: &str, priority: u16| {
            cnp(&format!(
                "metadata: {{name: {name}}}\nspec: {{tier: {tier}, priority: {priority}, subject: {{namespaces: {{}}}}}}"
            ))
            .unwrap()
        };
        let mut all = [
            named("b", "Admin", 5),
            named("z", "Baseline", 0),
            named("a", "Admin", 5),
            named("c", "Admin", 900),
            named("y", "Admin", 0),
        ];
        all.sort_by(|a, b| a.precedence_key().cmp(&b.precedence_key()));
        let order: Vec<&str> = all.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(
            order,
            ["y", "a", "b", "c", "z"],
            "Admin first, priority, then name"
        );
    }

    /// The raw types carry every field of the API under its own name: an object read and
    /// written again is the same object.
    #[test]
    fn raw_round_trips() {
        let yaml = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: everything, annotations: {palisade.io/audit: 'false'}}
spec:
  tier: Admin
  priority: 7
  subject: {pods: {namespaceSelector: {matchLabels: {a: b}}, podSelector: {matchExpressions: [{key: k, operator: Exists}]}}}
  ingress:
    - name: in
      action: Pass
      from: [{namespaces: {}}, {pods: {podSelector: {}}}]
      protocols: [{sctp: {destinationPort: {number: 9}}}, {destinationNamedPort: web}]
  egress:
    - action: Accept
      to: [{nodes: {}}, {networks: [10.0.0.0/8]}, {domainNames: ['*.example.com']}]
      protocols: [{tcp: {destinationPort: {range: {start: 1, end: 2}}}}, {udp: {destinationPort: {number: 53}}}]
status:
  conditions:
    - {type: Ready, status: 'True', reason: Ok, message: fine, lastTransitionTime: '2026-01-01T00:00:00Z'}
"#;
        let value = crate::manifest::yaml_documents(yaml).unwrap().remove(0);
        let raw: raw::ClusterNetworkPolicy = serde_json::from_value(value.clone()).unwrap();
        assert_eq!(serde_json::to_value(&raw).unwrap(), value);
        let p = ClusterNetworkPolicy::from_raw(&raw).unwrap();
        assert!(!p.audit);
        assert_eq!(p.ingress[0].name.as_deref(), Some("in"));
        assert_eq!(p.egress[0].peers.len(), 3);
    }
}
