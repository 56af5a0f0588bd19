//! The enforced state with its names: `policy show` and `explain` answer from it.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    path::Path,
};

use anyhow::{Context, Result, bail};
use palisade_common::{
    CIDR_CLASS_BIT, CIDR_CLASS_NONE, EP_PENDING, EndpointInfo, IDENTITY_HOST, IDENTITY_NONE,
    POLICY_FLAG_AUDIT, POLICY_KEY_ANY_PORT_BITS, POLICY_KEY_FULL_BITS, PeerAddr, PolicyValue,
    TIER_ACTION_ACCEPT, TIER_ACTION_DENY, TierMatch, audit_flag, ip_of, isolated_flag, tiered_flag,
};

use super::{
    DirectionPolicy, End, Explanation, PeerView, PodPolicy, PortRange, Query, RuleInfo, RuleRow,
    StateFile, Step, Target, VerdictKind, endpoints_with_allows, has_ports, proto_name,
    read_pinned_maps, reason_name, state_path,
};
use palisade_policy::{
    cnp::Tier,
    datapath_model::{self, ModelReason},
    state::{CidrEntry, DesiredState, Direction, EndpointMeta, PolicyEntry},
};

/// The enforced state with its names.
pub struct Snapshot {
    pub state: DesiredState,
    pub file: StateFile,
    ip_owner: HashMap<IpAddr, String>,
    with_allows: BTreeSet<(u32, u8)>,
    /// What the FQDN learner knows (`fqdn.json` beside the socket), to name a learned peer.
    pub learned: crate::fqdn::Learned,
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
        let mut snap = Snapshot::from_parts(state, file);
        snap.learned = crate::fqdn::Learned::load(&socket.with_file_name(crate::fqdn::FQDN_FILE));
        Ok(snap)
    }

    pub fn from_parts(mut state: DesiredState, file: StateFile) -> Snapshot {
        state.endpoint_meta = file.endpoints.clone();
        state.identity_pods = file.identities.clone();
        state.rules = file
            .rules
            .iter()
            .map(|(id, r)| (*id, r.rule_ref()))
            .collect();
        let ip_owner = file.ip_owners();
        let with_allows = endpoints_with_allows(&state);
        Snapshot {
            state,
            file,
            ip_owner,
            with_allows,
            learned: Default::default(),
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
            let (policies, ignored, cluster) = match dir {
                Direction::Ingress => (
                    &meta.ingress_policies,
                    &meta.ingress_audit_ignored,
                    &meta.ingress_cluster_policies,
                ),
                Direction::Egress => (
                    &meta.egress_policies,
                    &meta.egress_audit_ignored,
                    &meta.egress_cluster_policies,
                ),
            };
            DirectionPolicy {
                isolated: info.flags & isolated_flag(d) != 0,
                tiered: info.flags & tiered_flag(d) != 0,
                audit: info.flags & audit_flag(d) != 0,
                policies: policies.clone(),
                audit_ignored: ignored.clone(),
                cluster_policies: cluster.clone(),
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
        // An entry's rules: the NetworkPolicy rule that allows it (with its audit flag) and
        // each tier's first matching rule (ClusterNetworkPolicies are never audited).
        let rules_of = |v: &PolicyValue| {
            let tier = |m: TierMatch| (m.rule != 0).then_some((m.rule, false));
            [
                (v.rule != 0).then_some((v.rule, v.flags & POLICY_FLAG_AUDIT != 0)),
                tier(v.admin),
                tier(v.baseline),
            ]
            .into_iter()
            .flatten()
        };
        // Class -> the rules that have entries for it.
        let mut class_rules: HashMap<u32, BTreeSet<u32>> = HashMap::new();
        for (e, v) in &entries {
            if e.key.peer & CIDR_CLASS_BIT != 0 {
                class_rules
                    .entry(e.key.peer)
                    .or_default()
                    .extend(rules_of(v).map(|(r, _)| r));
            }
        }
        // (rule, audit flag, proto, pods?) -> (port blocks, peers)
        type GroupKey = (u32, bool, u8, bool);
        type Group = (Vec<(u32, u32)>, BTreeSet<u32>);
        let mut groups: BTreeMap<GroupKey, Group> = BTreeMap::new();
        for (e, v) in &entries {
            let is_class = e.key.peer & CIDR_CLASS_BIT != 0;
            let range = port_range(e);
            let proto = if e.prefix_len >= POLICY_KEY_ANY_PORT_BITS {
                e.key.proto
            } else {
                0
            };
            for (rule, audit) in rules_of(v) {
                let g = groups.entry((rule, audit, proto, !is_class)).or_default();
                g.0.push(range);
                g.1.insert(e.key.peer);
            }
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
                    slot: 0,
                    tier: None,
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
        // In evaluation order: Admin (by priority), NetworkPolicy, Baseline (by priority).
        let order = |r: &RuleInfo| match &r.tier {
            Some(t) if t.tier == Tier::Admin => (0, t.priority),
            None => (1, 0),
            Some(t) => (2, t.priority),
        };
        rows.sort_by(|a, b| {
            (
                order(&a.rule),
                a.rule.policy_id(),
                a.rule.index,
                &a.protocol,
            )
                .cmp(&(
                    order(&b.rule),
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
        let isolated = info.flags & isolated_flag(d) != 0;
        let tiered = info.flags & tiered_flag(d) != 0;
        let meta = self.file.endpoints.get(&info.id);
        let (policies, ignored, cluster) = match (meta, dir) {
            (Some(m), Direction::Ingress) => (
                m.ingress_policies.clone(),
                m.ingress_audit_ignored.clone(),
                m.ingress_cluster_policies.clone(),
            ),
            (Some(m), Direction::Egress) => (
                m.egress_policies.clone(),
                m.egress_audit_ignored.clone(),
                m.egress_cluster_policies.clone(),
            ),
            (None, _) => (Vec::new(), Vec::new(), Vec::new()),
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
        let name_of = |m: TierMatch| {
            self.rule(m.rule).map_or_else(
                || format!("ClusterNetworkPolicy rule {}", m.rule),
                RuleInfo::to_string,
            )
        };
        // The tiers on the way: Admin first; Baseline only where evaluation reached it (no
        // Admin Accept or Deny, and no NetworkPolicy isolating the pod, or only auditing).
        let admin_decided = v
            .admin
            .is_some_and(|m| matches!(m.action, TIER_ACTION_ACCEPT | TIER_ACTION_DENY));
        let admin_pass = v.admin.filter(|_| !admin_decided);
        let baseline_decided = !admin_decided
            && matches!(v.reason, ModelReason::TierAccept | ModelReason::TierDeny)
            && v.baseline.is_some_and(|m| Some(m.rule) == v.rule);
        let baseline_reached = tiered && !admin_decided && (!isolated || baseline_decided);
        let baseline = v.baseline.filter(|_| baseline_reached);
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
        // Where evaluation went after an Admin Pass, or that no Admin rule matched.
        let admin_clause = |next: &str| match admin_pass {
            Some(m) => format!("after {}: evaluation went on to {next}", name_of(m)),
            None => "no Admin rule matched".to_string(),
        };
        let mut hints = Vec::new();
        let summary = match v.reason {
            ModelReason::PolicyAllow => {
                let by = match &rule {
                    Some(r) => format!("allowed by {r}"),
                    None => format!("allowed by rule {}", v.rule.unwrap_or(0)),
                };
                match admin_pass {
                    Some(_) => format!("{by} ({})", admin_clause("the NetworkPolicies")),
                    None => by,
                }
            }
            ModelReason::TierAccept | ModelReason::TierDeny => {
                let head = if v.allowed { "allowed" } else { "dropped" };
                let by = match &rule {
                    Some(r) => format!("{head} by {r}"),
                    None => format!("{head} by rule {}", v.rule.unwrap_or(0)),
                };
                if admin_decided {
                    format!(
                        "{by} (Admin tier: NetworkPolicies and the Baseline tier are not consulted)"
                    )
                } else if isolated {
                    format!(
                        "{by} (Baseline tier: {}; {pod} is isolated for {towards} by {} only in audit mode)",
                        admin_clause("the NetworkPolicies"),
                        list(&policies)
                    )
                } else {
                    format!(
                        "{by} (Baseline tier: {}; no NetworkPolicy isolates {pod} for {towards})",
                        admin_clause("the Baseline tier")
                    )
                }
            }
            ModelReason::NotIsolated if tiered => {
                let baseline_part = match baseline {
                    Some(m) => format!("{} passes to the default", name_of(m)),
                    None => "no Baseline rule matched".to_string(),
                };
                format!(
                    "allowed by default: {}; no NetworkPolicy isolates {pod} for {towards}; {baseline_part}",
                    admin_clause("the next tier")
                )
            }
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
                match admin_pass {
                    Some(_) => format!("{head}: {body} ({})", admin_clause("the NetworkPolicies")),
                    None => format!("{head}: {body}"),
                }
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
            admin: v.admin.and_then(|m| self.rule(m.rule)).cloned(),
            baseline: baseline.and_then(|m| self.rule(m.rule)).cloned(),
            cluster_policies: cluster,
            policies,
            audit,
            audit_ignored: ignored,
            summary,
            hints,
            domain: v.domain_class.map(|_| self.domain_of(info.id, peer)),
        }
    }

    /// The name (and CNAME chain, and server) whose DNS answer gave endpoint `endpoint` the
    /// address `peer`.
    fn domain_of(&self, endpoint: u32, peer: IpAddr) -> String {
        let found = self.learned.endpoints.get(&endpoint).and_then(|n| {
            n.names
                .iter()
                .find(|(_, e)| e.addresses.contains_key(&peer))
        });
        match found {
            Some((name, e)) if e.chain.is_empty() => {
                format!("{name} (answered by {})", e.server)
            }
            Some((name, e)) => format!(
                "{name} (via {}, answered by {})",
                e.chain.join(" > "),
                e.server
            ),
            None => "a name this pod resolved (not yet in fqdn.json)".to_string(),
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
        let allowing = |r: &RuleInfo| {
            r.tier
                .as_ref()
                .is_none_or(|t| t.action == palisade_policy::cnp::Action::Accept)
        };
        for row in self
            .rule_rows(endpoint, dir)
            .into_iter()
            .filter(|r| allowing(&r.rule))
        {
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

#[cfg(test)]
mod tests {
    use super::*;

    use palisade_common::{CidrKey, POLICY_KEY_ANY_PROTO_BITS, PROTO_TCP, PROTO_UDP, PolicyKey};

    use crate::inspect::parse_proto;

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
