//! What `policy show` and `explain` answer (serialized for `--output json`).
use std::{fmt, net::IpAddr, str::FromStr};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use super::RuleInfo;
use palisade_policy::state::Direction;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum VerdictKind {
    #[serde(rename = "allowed")]
    Allowed,
    #[serde(rename = "dropped")]
    Dropped,
    /// Denied by audit policies only: recorded, not dropped.
    #[serde(rename = "would-drop")]
    WouldDrop,
}

impl VerdictKind {
    pub fn as_str(self) -> &'static str {
        match self {
            VerdictKind::Allowed => "allowed",
            VerdictKind::Dropped => "dropped",
            VerdictKind::WouldDrop => "would-drop",
        }
    }
}

impl fmt::Display for VerdictKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for VerdictKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            // FORWARDED: Hubble's word.
            "allowed" | "allow" | "forwarded" => VerdictKind::Allowed,
            "dropped" | "drop" | "denied" => VerdictKind::Dropped,
            "would-drop" | "audit" | "audited" => VerdictKind::WouldDrop,
            _ => bail!("unknown verdict {s:?} (allowed, dropped or would-drop)"),
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodPolicy {
    pub pod: String,
    pub ifindex: u32,
    pub endpoint: u32,
    pub revision: u32,
    /// The endpoint fails closed (its entries could not be written).
    pub pending: bool,
    pub ingress: DirectionPolicy,
    pub egress: DirectionPolicy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionPolicy {
    /// Traffic needs an allow entry (otherwise everything is allowed).
    pub isolated: bool,
    /// ClusterNetworkPolicies select the pod in this direction: their tiers are consulted.
    #[serde(default)]
    pub tiered: bool,
    /// Denials are "would drop" (only audit policies select the pod in this direction).
    pub audit: bool,
    /// Policies in force.
    pub policies: Vec<String>,
    /// Audit policies selecting the pod that are not in force (enforcing ones are).
    pub audit_ignored: Vec<String>,
    /// ClusterNetworkPolicies whose subject selects the pod and that have rules in this
    /// direction, in precedence order (Admin by priority, then Baseline).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_policies: Vec<String>,
    /// NetworkPolicy allows, and the ClusterNetworkPolicy rules that are the first match of
    /// their tier for some peer and port (Admin rules first, then NetworkPolicy, then Baseline).
    pub rules: Vec<RuleRow>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRow {
    pub rule: RuleInfo,
    pub peer: PeerView,
    /// `None`: any protocol.
    pub protocol: Option<String>,
    /// Empty: any port.
    pub ports: Vec<PortRange>,
}

impl RuleRow {
    pub fn ports_text(&self) -> String {
        let proto = self.protocol.as_deref().unwrap_or("any protocol");
        if self.ports.is_empty() {
            if self.protocol.is_none() {
                return "any protocol and port".into();
            }
            return format!("{proto}/any");
        }
        let ranges: Vec<String> = self
            .ports
            .iter()
            .map(|r| {
                if r.from == r.to {
                    r.from.to_string()
                } else {
                    format!("{}-{}", r.from, r.to)
                }
            })
            .collect();
        format!("{proto}/{}", ranges.join(","))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub from: u16,
    pub to: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum PeerView {
    /// Pod identities (from podSelector / namespaceSelector peers).
    Pods {
        identities: Vec<u32>,
        pods: Vec<String>,
    },
    /// CIDR classes (ipBlocks, and rules without peers as 0.0.0.0/0 and ::/0).
    Cidrs {
        classes: Vec<u32>,
        prefixes: Vec<String>,
        except: Vec<String>,
    },
}

impl PeerView {
    /// The peer, its first four pods named.
    pub fn text(&self) -> String {
        self.text_naming(4)
    }

    /// The peer, every pod named (`-o wide`).
    pub fn text_all(&self) -> String {
        self.text_naming(usize::MAX)
    }

    fn text_naming(&self, at_most: usize) -> String {
        match self {
            PeerView::Pods { pods, .. } if pods.is_empty() => "pods (none running)".into(),
            PeerView::Pods { pods, .. } => {
                let shown: Vec<&str> = pods.iter().take(at_most).map(String::as_str).collect();
                let more = pods.len().saturating_sub(shown.len());
                if more > 0 {
                    format!("pods {} and {more} more", shown.join(", "))
                } else {
                    format!("pods {}", shown.join(", "))
                }
            }
            PeerView::Cidrs {
                prefixes, except, ..
            } => {
                let all = prefixes.len() == 2
                    && prefixes.iter().any(|p| p == "0.0.0.0/0")
                    && prefixes.iter().any(|p| p == "::/0");
                let mut s = if all {
                    "anywhere".to_string()
                } else {
                    prefixes.join(", ")
                };
                if !except.is_empty() {
                    s.push_str(&format!(" except {}", except.join(", ")));
                }
                s
            }
        }
    }
}

/// `explain`'s endpoints: a pod (`namespace/name`) or an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Pod(String),
    Ip(IpAddr),
}

impl FromStr for Target {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        if let Ok(ip) = s.parse() {
            return Ok(Target::Ip(ip));
        }
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(Target::Pod(s.to_string()))
            }
            _ => bail!("{s:?} is neither NAMESPACE/POD nor an IP address"),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Pod(p) => f.write_str(p),
            Target::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Query {
    pub from: Target,
    pub to: Target,
    pub proto: u8,
    pub port: u16,
    /// Prefer IPv6 addresses when both ends have both families.
    pub ipv6: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub pod: Option<String>,
    pub ip: IpAddr,
    /// A pod with an interface on this node (its policy is judged here).
    pub local: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub from: End,
    pub to: End,
    pub protocol: String,
    pub port: Option<u16>,
    /// Overall: dropped if any step drops; would-drop if any step only audits a denial.
    pub verdict: VerdictKind,
    /// The source's egress (if local), then the destination's ingress (if local).
    pub steps: Vec<Step>,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub pod: String,
    pub direction: Direction,
    pub verdict: VerdictKind,
    pub reason: String,
    /// The rule that decided: the NetworkPolicy rule that allowed the flow, or the
    /// ClusterNetworkPolicy rule that accepted or denied it.
    pub rule: Option<RuleInfo>,
    /// The Admin tier's first matching rule (a Pass shows here: evaluation went on), where the
    /// direction is subject to ClusterNetworkPolicies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<RuleInfo>,
    /// The Baseline tier's first matching rule, where evaluation reached the Baseline tier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<RuleInfo>,
    /// The ClusterNetworkPolicies selecting the pod in this direction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cluster_policies: Vec<String>,
    /// The policies in force for the pod in this direction.
    pub policies: Vec<String>,
    pub audit: bool,
    pub audit_ignored: Vec<String>,
    pub summary: String,
    /// Rules that come close (another port for this peer, this port for other peers).
    pub hints: Vec<String>,
    /// For egress to an address the pod's DNS answers gave a `domainNames` pattern: the name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
}
