//! Reading the enforced state back, for `palisade policy show` and `palisade explain`.
//!
//! The maps are the truth: the CLI opens the pinned ENDPOINTS, IDENTITIES, CIDRS and POLICY
//! maps and decodes them. What the maps cannot say (which pod an endpoint id is, which policy
//! a rule id came from, which pods carry an identity, pod addresses) the agent writes after
//! every reconcile to `state.json` beside its socket ([`StateFile`]); bpffs holds no regular
//! files. `explain` runs `datapath_model` (the datapath's twin) over what was read, so it
//! answers from the entries the programs use, not from a recompilation.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use anyhow::{Context, Result, anyhow, bail};
use palisade_common::{
    CIDR_CLASS_BIT, CIDR_CLASS_NONE, EP_PENDING, EndpointInfo, IDENTITY_HOST, IDENTITY_NONE,
    POLICY_FLAG_AUDIT, POLICY_KEY_ANY_PORT_BITS, POLICY_KEY_FULL_BITS, PROTO_ICMP, PROTO_ICMPV6,
    PROTO_SCTP, PROTO_TCP, PROTO_UDP, PeerAddr, PolicyValue, Reason, audit_flag, ip_of,
    isolated_flag,
};
use serde::{Deserialize, Serialize};

use crate::{
    datapath_model::{self, ModelReason},
    model::Store,
    state::{CidrEntry, DesiredState, Direction, EndpointMeta, PodRef, PolicyEntry, RuleRef},
};

/// The file beside the socket that names what the maps hold.
pub const STATE_FILE: &str = "state.json";

/// Where the agent whose socket is `socket` keeps its state file.
pub fn state_path(socket: &Path) -> PathBuf {
    socket.with_file_name(STATE_FILE)
}

/// A rule id, decoded: `spec.<direction>[index]` of a policy, and whether that policy audits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleInfo {
    pub id: u32,
    pub namespace: String,
    pub policy: String,
    pub direction: Direction,
    pub index: usize,
    /// The policy is in audit mode (annotation or `run --audit`).
    pub audit: bool,
}

impl RuleInfo {
    /// `namespace/name` of the policy.
    pub fn policy_id(&self) -> String {
        format!("{}/{}", self.namespace, self.policy)
    }
}

impl fmt::Display for RuleInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{} {}[{}]",
            self.namespace, self.policy, self.direction, self.index
        )?;
        if self.audit {
            f.write_str(" (audit)")?;
        }
        Ok(())
    }
}

/// A pod and its addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodAddrs {
    pub pod: String,
    pub ips: Vec<IpAddr>,
}

/// What the agent writes beside its socket after every reconcile.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    /// Where the maps are pinned.
    pub pin_dir: PathBuf,
    pub written_at_unix_ms: u64,
    /// `palisade run --audit`.
    pub audit_all: bool,
    /// Rule id -> rule.
    pub rules: BTreeMap<u32, RuleInfo>,
    /// Endpoint id -> pod, interface, policies in force.
    pub endpoints: BTreeMap<u32, EndpointMeta>,
    /// Identity -> pods that carry it.
    pub identities: BTreeMap<u32, Vec<PodRef>>,
    /// Every pod with an address, cluster-wide.
    pub pods: Vec<PodAddrs>,
    /// This node's addresses.
    pub node_addresses: Vec<IpAddr>,
}

impl StateFile {
    /// The names for `applied` (what the map writer wrote), from the store it was compiled from.
    pub fn build(
        applied: &DesiredState,
        store: &Store,
        node_addresses: &[IpAddr],
        pin_dir: &Path,
        audit_all: bool,
    ) -> StateFile {
        let rules = applied
            .rules
            .iter()
            .map(|(id, r)| {
                let audit = audit_all
                    || store
                        .policies
                        .get(&(r.namespace.clone(), r.policy.clone()))
                        .is_some_and(|p| p.audit);
                (*id, rule_info(*id, r, audit))
            })
            .collect();
        let pods = store
            .pods
            .iter()
            .filter(|(_, p)| !p.ips.is_empty() && !p.host_network)
            .map(|(r, p)| PodAddrs {
                pod: r.to_string(),
                ips: p.ips.clone(),
            })
            .collect();
        StateFile {
            pin_dir: pin_dir.to_path_buf(),
            written_at_unix_ms: unix_ms(),
            audit_all,
            rules,
            endpoints: applied.endpoint_meta.clone(),
            identities: applied.identity_pods.clone(),
            pods,
            node_addresses: node_addresses.to_vec(),
        }
    }

    /// Address -> pod (`namespace/name`).
    pub fn ip_owners(&self) -> HashMap<IpAddr, String> {
        let mut out = HashMap::new();
        for p in &self.pods {
            for ip in &p.ips {
                out.entry(*ip).or_insert_with(|| p.pod.clone());
            }
        }
        out
    }
}

fn rule_info(id: u32, r: &RuleRef, audit: bool) -> RuleInfo {
    RuleInfo {
        id,
        namespace: r.namespace.clone(),
        policy: r.policy.clone(),
        direction: r.direction,
        index: r.index,
        audit,
    }
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Writes `bytes` to `path` through a temporary file and a rename, mode 0600.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(bytes)?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Names of things
// ---------------------------------------------------------------------------------------------

/// The name of a protocol number.
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

/// Which (endpoint, direction) have at least one allow entry.
pub fn endpoints_with_allows(state: &DesiredState) -> BTreeSet<(u32, u8)> {
    state
        .policy
        .keys()
        .map(|e| (e.key.endpoint, e.key.dir))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Pinned maps
// ---------------------------------------------------------------------------------------------

/// The policy maps' entries, read from the pins under `pin_dir`.
pub fn read_pinned_maps(pin_dir: &Path) -> Result<DesiredState> {
    palisade_datapath::pinned::read_policy_maps(pin_dir)
        .context("is the agent running, and are you root?")
}

// ---------------------------------------------------------------------------------------------
// Snapshot: maps + names
// ---------------------------------------------------------------------------------------------

/// The enforced state with its names.
pub struct Snapshot {
    pub state: DesiredState,
    pub file: StateFile,
    ip_owner: HashMap<IpAddr, String>,
    with_allows: BTreeSet<(u32, u8)>,
}

impl Snapshot {
    /// Reads the state file beside `socket`, then the maps pinned where it says.
    pub fn load(socket: &Path) -> Result<Snapshot> {
        let path = state_path(socket);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {} (written by `palisade run --socket {}`; is the agent running?)",
                path.display(),
                socket.display()
            )
        })?;
        let file: StateFile =
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
        let state = read_pinned_maps(&file.pin_dir)?;
        Ok(Snapshot::from_parts(state, file))
    }

    pub fn from_parts(mut state: DesiredState, file: StateFile) -> Snapshot {
        state.endpoint_meta = file.endpoints.clone();
        state.identity_pods = file.identities.clone();
        state.rules = file
            .rules
            .iter()
            .map(|(id, r)| {
                (
                    *id,
                    RuleRef {
                        namespace: r.namespace.clone(),
                        policy: r.policy.clone(),
                        direction: r.direction,
                        index: r.index,
                    },
                )
            })
            .collect();
        let ip_owner = file.ip_owners();
        let with_allows = endpoints_with_allows(&state);
        Snapshot {
            state,
            file,
            ip_owner,
            with_allows,
        }
    }

    pub fn pod_of_ip(&self, ip: &IpAddr) -> Option<&str> {
        self.ip_owner.get(ip).map(String::as_str)
    }

    pub fn is_node_address(&self, ip: &IpAddr) -> bool {
        self.state.identities.get(&PeerAddr::from_ip(*ip)) == Some(&IDENTITY_HOST)
            || self.file.node_addresses.contains(ip)
    }

    fn pod_ips(&self, pod: &str) -> Option<&[IpAddr]> {
        self.file
            .pods
            .iter()
            .find(|p| p.pod == pod)
            .map(|p| p.ips.as_slice())
    }

    /// The local endpoint of `pod`: (ifindex, map entry, names).
    pub fn endpoint_of(&self, pod: &str) -> Option<(u32, EndpointInfo, &EndpointMeta)> {
        self.file
            .endpoints
            .iter()
            .filter(|(_, m)| m.pod.to_string() == pod)
            .find_map(|(id, m)| {
                self.state
                    .endpoints
                    .get(&m.ifindex)
                    .filter(|info| info.id == *id)
                    .map(|info| (m.ifindex, *info, m))
            })
    }

    fn rule(&self, id: u32) -> Option<&RuleInfo> {
        self.file.rules.get(&id)
    }

    fn peer_desc(&self, ip: IpAddr) -> String {
        match self.pod_of_ip(&ip) {
            Some(p) => format!("{p} ({ip})"),
            None if self.is_node_address(&ip) => format!("node ({ip})"),
            None => ip.to_string(),
        }
    }

    // -----------------------------------------------------------------------------------------
    // policy show
    // -----------------------------------------------------------------------------------------

    /// The effective rules of a local pod, decoded from the maps.
    pub fn policy_of(&self, pod: &str) -> Result<PodPolicy> {
        let Some((ifindex, info, meta)) = self.endpoint_of(pod) else {
            if self.pod_ips(pod).is_some() {
                bail!("{pod} is not an endpoint on this node (no interface here)");
            }
            bail!("no pod {pod} is known to the agent");
        };
        let dir_policy = |dir: Direction| {
            let d = dir.as_u8();
            let (policies, ignored) = match dir {
                Direction::Ingress => (&meta.ingress_policies, &meta.ingress_audit_ignored),
                Direction::Egress => (&meta.egress_policies, &meta.egress_audit_ignored),
            };
            DirectionPolicy {
                isolated: info.flags & isolated_flag(d) != 0,
                audit: info.flags & audit_flag(d) != 0,
                policies: policies.clone(),
                audit_ignored: ignored.clone(),
                rules: self.rule_rows(info.id, dir),
            }
        };
        Ok(PodPolicy {
            pod: pod.to_string(),
            ifindex,
            endpoint: info.id,
            revision: info.revision,
            pending: info.flags & EP_PENDING != 0,
            ingress: dir_policy(Direction::Ingress),
            egress: dir_policy(Direction::Egress),
        })
    }

    /// The CIDRS entries of an endpoint and direction (any family).
    fn cidr_entries(&self, endpoint: u32, dir: u8) -> Vec<(CidrEntry, u32)> {
        self.state
            .cidrs
            .iter()
            .filter(|(e, _)| e.key.endpoint == endpoint && e.key.dir == dir)
            .map(|(e, c)| (*e, *c))
            .collect()
    }

    /// The allow entries of one endpoint and direction, grouped by rule, protocol, port range
    /// and kind of peer.
    pub fn rule_rows(&self, endpoint: u32, dir: Direction) -> Vec<RuleRow> {
        let d = dir.as_u8();
        let entries: Vec<(PolicyEntry, PolicyValue)> = self
            .state
            .policy
            .iter()
            .filter(|(e, _)| e.key.endpoint == endpoint && e.key.dir == d)
            .map(|(e, v)| (*e, *v))
            .collect();
        let cidrs = self.cidr_entries(endpoint, d);
        // Class -> the rules that have entries for it.
        let mut class_rules: HashMap<u32, BTreeSet<u32>> = HashMap::new();
        for (e, v) in &entries {
            if e.key.peer & CIDR_CLASS_BIT != 0 {
                class_rules.entry(e.key.peer).or_default().insert(v.rule);
            }
        }
        // (rule, audit flag, proto, pods?) -> (port blocks, peers)
        type GroupKey = (u32, bool, u8, bool);
        type Group = (Vec<(u32, u32)>, BTreeSet<u32>);
        let mut groups: BTreeMap<GroupKey, Group> = BTreeMap::new();
        for (e, v) in &entries {
            let is_class = e.key.peer & CIDR_CLASS_BIT != 0;
            let range = port_range(e);
            let g = groups
                .entry((
                    v.rule,
                    v.flags & POLICY_FLAG_AUDIT != 0,
                    if e.prefix_len >= POLICY_KEY_ANY_PORT_BITS {
                        e.key.proto
                    } else {
                        0
                    },
                    !is_class,
                ))
                .or_default();
            g.0.push(range);
            g.1.insert(e.key.peer);
        }
        let mut rows = Vec::new();
        for ((rule, audit_flag, proto, pods), (mut ranges, peers)) in groups {
            // A port set per peer would be exact; entries of one rule share their ports in
            // practice (named ports aside), so the union is shown once per group.
            ranges.sort_unstable();
            ranges.dedup();
            let mut merged: Vec<(u32, u32)> = Vec::new();
            for (lo, hi) in ranges {
                match merged.last_mut() {
                    Some(last) if lo <= last.1 + 1 => last.1 = last.1.max(hi),
                    _ => merged.push((lo, hi)),
                }
            }
            let peer = if pods {
                let mut names = BTreeSet::new();
                for id in &peers {
                    for p in self.state.identity_pods.get(id).into_iter().flatten() {
                        names.insert(p.to_string());
                    }
                }
                PeerView::Pods {
                    identities: peers.iter().copied().collect(),
                    pods: names.into_iter().collect(),
                }
            } else {
                let (prefixes, except) = describe_classes(&cidrs, &peers, rule, &class_rules);
                PeerView::Cidrs {
                    classes: peers.iter().copied().collect(),
                    prefixes,
                    except,
                }
            };
            let any_port = proto == 0 || merged == [(0, 65535)] || !has_ports(proto);
            rows.push(RuleRow {
                rule: self.rule(rule).cloned().unwrap_or(RuleInfo {
                    id: rule,
                    namespace: "?".into(),
                    policy: format!("unknown-rule-{rule}"),
                    direction: dir,
                    index: 0,
                    audit: audit_flag,
                }),
                peer,
                protocol: (proto != 0).then(|| proto_name(proto)),
                ports: if any_port {
                    Vec::new()
                } else {
                    merged
                        .into_iter()
                        .map(|(lo, hi)| PortRange {
                            from: lo as u16,
                            to: hi as u16,
                        })
                        .collect()
                },
            });
        }
        rows.sort_by(|a, b| {
            (a.rule.policy_id(), a.rule.index, &a.protocol).cmp(&(
                b.rule.policy_id(),
                b.rule.index,
                &b.protocol,
            ))
        });
        rows
    }

    // -----------------------------------------------------------------------------------------
    // explain
    // -----------------------------------------------------------------------------------------

    fn resolve(&self, t: &Target) -> Result<(Option<String>, Vec<IpAddr>)> {
        match t {
            Target::Ip(ip) => Ok((self.pod_of_ip(ip).map(str::to_string), vec![*ip])),
            Target::Pod(p) => match self.pod_ips(p) {
                Some(ips) if !ips.is_empty() => Ok((Some(p.clone()), ips.to_vec())),
                _ => bail!("no pod {p} with an address is known to the agent"),
            },
        }
    }

    /// The verdict on a new flow from `q.from` to `q.to`, as the datapath would take it.
    pub fn explain(&self, q: &Query) -> Result<Explanation> {
        let (from_pod, from_ips) = self.resolve(&q.from)?;
        let (to_pod, to_ips) = self.resolve(&q.to)?;
        let mut pairs: Vec<(IpAddr, IpAddr)> = Vec::new();
        for f in &from_ips {
            for t in &to_ips {
                if f.is_ipv6() == t.is_ipv6() {
                    pairs.push((*f, *t));
                }
            }
        }
        pairs.sort_by_key(|(f, _)| f.is_ipv6() != q.ipv6);
        let Some(&(src, dst)) = pairs.first() else {
            bail!("{} and {} have no address of the same family", q.from, q.to);
        };
        if has_ports(q.proto) && q.port == 0 {
            bail!("--port is needed for {}", proto_name(q.proto));
        }
        let port = if has_ports(q.proto) { q.port } else { 0 };
        let mut steps = Vec::new();
        let from_ep = from_pod.as_deref().and_then(|p| self.endpoint_of(p));
        let to_ep = to_pod.as_deref().and_then(|p| self.endpoint_of(p));
        if let (Some(p), Some((ifindex, info, _))) = (&from_pod, from_ep) {
            steps.push(self.step(p, ifindex, info, Direction::Egress, dst, src, q.proto, port));
        }
        if let (Some(p), Some((ifindex, info, _))) = (&to_pod, to_ep) {
            steps.push(self.step(
                p,
                ifindex,
                info,
                Direction::Ingress,
                src,
                dst,
                q.proto,
                port,
            ));
        }
        let verdict = if steps.iter().any(|s| s.verdict == VerdictKind::Dropped) {
            VerdictKind::Dropped
        } else if steps.iter().any(|s| s.verdict == VerdictKind::WouldDrop) {
            VerdictKind::WouldDrop
        } else {
            VerdictKind::Allowed
        };
        let mut notes = Vec::new();
        if steps.is_empty() {
            notes.push(
                "neither end is a pod on this node: nothing here judges this traffic".to_string(),
            );
        }
        Ok(Explanation {
            from: End {
                pod: from_pod,
                ip: src,
                local: from_ep.is_some(),
            },
            to: End {
                pod: to_pod,
                ip: dst,
                local: to_ep.is_some(),
            },
            protocol: proto_name(q.proto),
            port: has_ports(q.proto).then_some(port),
            verdict,
            steps,
            notes,
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        pod: &str,
        ifindex: u32,
        info: EndpointInfo,
        dir: Direction,
        peer: IpAddr,
        local: IpAddr,
        proto: u8,
        port: u16,
    ) -> Step {
        let v = datapath_model::evaluate(&self.state, ifindex, dir, peer, local, proto, port);
        let d = dir.as_u8();
        let audit = info.flags & audit_flag(d) != 0;
        let meta = self.file.endpoints.get(&info.id);
        let (policies, ignored) = match (meta, dir) {
            (Some(m), Direction::Ingress) => {
                (m.ingress_policies.clone(), m.ingress_audit_ignored.clone())
            }
            (Some(m), Direction::Egress) => {
                (m.egress_policies.clone(), m.egress_audit_ignored.clone())
            }
            (None, _) => (Vec::new(), Vec::new()),
        };
        let no_allows = !self.with_allows.contains(&(info.id, d));
        let verdict = if v.allowed {
            VerdictKind::Allowed
        } else if audit && v.reason != ModelReason::Pending {
            VerdictKind::WouldDrop
        } else {
            VerdictKind::Dropped
        };
        let reason = match v.reason {
            ModelReason::NotAnEndpoint => "not-an-endpoint",
            r => reason_name(r.as_reason(), no_allows),
        };
        let rule = v.rule.and_then(|r| self.rule(r)).cloned();
        let peer_desc = self.peer_desc(peer);
        let what = format!(
            "{}{}",
            proto_name(proto),
            if has_ports(proto) {
                format!("/{port}")
            } else {
                String::new()
            }
        );
        let (towards, from_to) = match dir {
            Direction::Ingress => ("ingress", "from"),
            Direction::Egress => ("egress", "to"),
        };
        let list = |v: &[String]| v.join(", ");
        let mut hints = Vec::new();
        let summary = match v.reason {
            ModelReason::PolicyAllow => match &rule {
                Some(r) => format!("allowed by {r}"),
                None => format!("allowed by rule {}", v.rule.unwrap_or(0)),
            },
            ModelReason::NotIsolated => {
                format!("allowed: no policy selects {pod} for {towards}")
            }
            ModelReason::Host => {
                "allowed: traffic between a pod and its own node is never restricted".into()
            }
            ModelReason::SelfTraffic => "allowed: a pod's traffic to itself".into(),
            ModelReason::NotAnEndpoint => "allowed: not an endpoint".into(),
            ModelReason::Pending => {
                "dropped: the endpoint's policy could not be written (pending, fails closed)".into()
            }
            ModelReason::NoRuleMatched => {
                let head = if audit {
                    "would drop (audit: passes)"
                } else {
                    "dropped"
                };
                let body = if no_allows {
                    format!(
                        "{pod} is isolated for {towards} by {}, which allow nothing",
                        list(&policies)
                    )
                } else {
                    format!(
                        "{pod} is isolated for {towards} by {} and no rule allows {what} {from_to} {peer_desc}",
                        list(&policies)
                    )
                };
                hints = self.near_misses(info.id, dir, v.identity, v.class, proto, port);
                format!("{head}: {body}")
            }
        };
        if !ignored.is_empty() && v.reason != ModelReason::NotIsolated {
            hints.push(format!(
                "audit policies not in force here (enforcing policies isolate {pod} for {towards}): {}",
                list(&ignored)
            ));
        }
        Step {
            pod: pod.to_string(),
            direction: dir,
            verdict,
            reason: reason.to_string(),
            rule,
            policies,
            audit,
            audit_ignored: ignored,
            summary,
            hints,
        }
    }

    /// Rules of the endpoint that admit this peer on other ports, or this port from other
    /// peers: what would have to change for the flow to pass.
    fn near_misses(
        &self,
        endpoint: u32,
        dir: Direction,
        identity: u32,
        class: Option<u32>,
        proto: u8,
        port: u16,
    ) -> Vec<String> {
        let mut out = Vec::new();
        for row in self.rule_rows(endpoint, dir) {
            let peer_matches = match &row.peer {
                PeerView::Pods { identities, .. } => {
                    identity != IDENTITY_NONE && identities.contains(&identity)
                }
                PeerView::Cidrs { classes, .. } => {
                    class.is_some_and(|c| c != CIDR_CLASS_NONE && classes.contains(&c))
                }
            };
            let port_matches = row
                .protocol
                .as_deref()
                .is_none_or(|p| p == proto_name(proto))
                && (row.ports.is_empty()
                    || row.ports.iter().any(|r| (r.from..=r.to).contains(&port)));
            if peer_matches && !port_matches {
                out.push(format!(
                    "{} allows this peer, but only on {}",
                    row.rule,
                    row.ports_text()
                ));
            } else if port_matches && !peer_matches {
                out.push(format!(
                    "{} allows {}, but only {} {}",
                    row.rule,
                    row.ports_text(),
                    match dir {
                        Direction::Ingress => "from",
                        Direction::Egress => "to",
                    },
                    row.peer.text()
                ));
            }
            if out.len() >= 6 {
                break;
            }
        }
        out
    }
}

/// A POLICY entry's port range (inclusive), from its prefix length.
fn port_range(e: &PolicyEntry) -> (u32, u32) {
    if e.prefix_len <= POLICY_KEY_ANY_PORT_BITS {
        return (0, 65535);
    }
    let bits = e.prefix_len.min(POLICY_KEY_FULL_BITS) - POLICY_KEY_ANY_PORT_BITS;
    let lo = u32::from(u16::from_be(e.key.port_be));
    (lo, lo + (1u32 << (16 - bits)) - 1)
}

fn prefix_text(e: &CidrEntry) -> String {
    match ip_of(e.key.family, &e.key.addr) {
        Some(ip) => format!("{ip}/{}", e.prefix_len),
        None => format!("?/{}", e.prefix_len),
    }
}

fn prefix_contains(outer: &CidrEntry, inner: &CidrEntry) -> bool {
    if outer.key.family != inner.key.family || outer.prefix_len > inner.prefix_len {
        return false;
    }
    let full = outer.prefix_len as usize;
    let (bytes, bits) = (full / 8, full % 8);
    if outer.key.addr[..bytes] != inner.key.addr[..bytes] {
        return false;
    }
    bits == 0 || {
        let mask = 0xffu8 << (8 - bits);
        outer.key.addr[bytes] & mask == inner.key.addr[bytes] & mask
    }
}

/// The prefixes where `classes` are found, and inside them the longer prefixes where `rule`
/// no longer applies (ipBlock excepts, as the flattened trie holds them).
fn describe_classes(
    cidrs: &[(CidrEntry, u32)],
    classes: &BTreeSet<u32>,
    rule: u32,
    class_rules: &HashMap<u32, BTreeSet<u32>>,
) -> (Vec<String>, Vec<String>) {
    let covers = |class: u32| class_rules.get(&class).is_some_and(|r| r.contains(&rule));
    let members: Vec<&CidrEntry> = cidrs
        .iter()
        .filter(|(_, c)| classes.contains(c))
        .map(|(e, _)| e)
        .collect();
    // Top-level prefixes: not inside another prefix of the rule.
    let tops: Vec<&CidrEntry> = members
        .iter()
        .copied()
        .filter(|e| {
            !cidrs
                .iter()
                .any(|(o, c)| o != *e && covers(*c) && prefix_contains(o, e))
        })
        .collect();
    let mut except = Vec::new();
    for (e, c) in cidrs {
        if covers(*c) {
            continue;
        }
        // Its nearest enclosing entry must be one where the rule applies.
        let parent = cidrs
            .iter()
            .filter(|(o, _)| o != e && prefix_contains(o, e))
            .max_by_key(|(o, _)| o.prefix_len);
        if let Some((_, pc)) = parent
            && covers(*pc)
        {
            except.push(prefix_text(e));
        }
    }
    (tops.into_iter().map(prefix_text).collect(), except)
}

// ---------------------------------------------------------------------------------------------
// Output types
// ---------------------------------------------------------------------------------------------

/// A verdict, as the CLI names it.
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
            "allowed" | "allow" => VerdictKind::Allowed,
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
    /// Denials are "would drop" (only audit policies select the pod in this direction).
    pub audit: bool,
    /// Policies in force.
    pub policies: Vec<String>,
    /// Audit policies selecting the pod that are not in force (enforcing ones are).
    pub audit_ignored: Vec<String>,
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
    pub fn text(&self) -> String {
        match self {
            PeerView::Pods { pods, .. } if pods.is_empty() => "pods (none running)".into(),
            PeerView::Pods { pods, .. } => {
                let shown: Vec<&str> = pods.iter().take(4).map(String::as_str).collect();
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
    /// The rule that allowed the flow.
    pub rule: Option<RuleInfo>,
    /// The policies in force for the pod in this direction.
    pub policies: Vec<String>,
    pub audit: bool,
    pub audit_ignored: Vec<String>,
    pub summary: String,
    /// Rules that come close (another port for this peer, this port for other peers).
    pub hints: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    use palisade_common::{CidrKey, POLICY_KEY_ANY_PROTO_BITS, PolicyKey};

    #[test]
    fn port_ranges_from_prefixes() {
        let e = |port: u16, prefix_len| PolicyEntry {
            key: PolicyKey {
                port_be: port.to_be(),
                proto: PROTO_TCP,
                ..PolicyKey::default()
            },
            prefix_len,
        };
        assert_eq!(port_range(&e(0, POLICY_KEY_ANY_PROTO_BITS)), (0, 65535));
        assert_eq!(port_range(&e(0, POLICY_KEY_ANY_PORT_BITS)), (0, 65535));
        assert_eq!(port_range(&e(80, POLICY_KEY_FULL_BITS)), (80, 80));
        assert_eq!(port_range(&e(9024, POLICY_KEY_FULL_BITS - 6)), (9024, 9087));
    }

    #[test]
    fn targets_and_verdicts_parse() {
        assert_eq!(
            "shop/db".parse::<Target>().unwrap(),
            Target::Pod("shop/db".into())
        );
        assert!(matches!("10.0.0.1".parse::<Target>(), Ok(Target::Ip(_))));
        assert!(matches!("fd00::1".parse::<Target>(), Ok(Target::Ip(_))));
        assert!("db".parse::<Target>().is_err());
        assert_eq!(
            "audit".parse::<VerdictKind>().unwrap(),
            VerdictKind::WouldDrop
        );
        assert_eq!(parse_proto("udp").unwrap(), PROTO_UDP);
        assert_eq!(parse_proto("47").unwrap(), 47);
    }

    #[test]
    fn prefixes_nest() {
        let c = |a: [u8; 4], len| CidrEntry {
            key: CidrKey {
                family: palisade_common::AF_INET,
                addr: PeerAddr::v4(a).addr,
                ..CidrKey::default()
            },
            prefix_len: len,
        };
        assert!(prefix_contains(&c([10, 0, 0, 0], 8), &c([10, 1, 0, 0], 16)));
        assert!(prefix_contains(&c([10, 0, 0, 0], 9), &c([10, 1, 0, 0], 16)));
        assert!(!prefix_contains(
            &c([10, 128, 0, 0], 9),
            &c([10, 1, 0, 0], 16)
        ));
        assert!(!prefix_contains(
            &c([10, 1, 0, 0], 16),
            &c([10, 0, 0, 0], 8)
        ));
        assert!(prefix_contains(&c([0, 0, 0, 0], 0), &c([192, 0, 2, 1], 32)));
    }
}
