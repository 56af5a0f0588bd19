//! Schema v2: the ClusterNetworkPolicy conformance cases (tests/conformance/cnp/README.md):
//! upstream's (`tests/conformance/cnp/cases`) and Palisade's own (`tests/conformance/cnp/palisade`).
//!
//! For each case: a node whose pods are the case's pods (one network namespace each, serving
//! the ports the case lists) and whose own namespace serves the host-networked pods' ports on
//! the node's address; manifests for the namespaces, the node (`kind: Node`, its address as an
//! `InternalIP`), the pods and the policies (ClusterNetworkPolicy and NetworkPolicy); a fresh
//! bpffs and agent. Every probe of the file must connect before any policy exists. Then each
//! step's actions rewrite the manifests and, once the agent has reconciled them (without a
//! configuration error), the step's probes run side by side: each is retried until it holds or
//! the convergence window ends, then all are confirmed once more, as upstream's
//! `require.Eventually` and final assertion do. `deny` holds only for a timeout: a refusal (RST,
//! ICMP error, SCTP ABORT) fails it.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail, ensure};
use palisade_tests::{
    agent::AgentProcess,
    rig::{NODE_IP_V4, NODE_IP_V6, Node, NodeSpec, Outcome, Pod, PodSpec, ProbeSpec, Proto},
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    Args,
    common::{self, Addresses, write_docs},
};

type Labels = BTreeMap<String, String>;

const CNP_API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";
const NP_API_VERSION: &str = "networking.k8s.io/v1";

#[derive(Deserialize)]
pub struct Case {
    pub name: String,
    namespaces: BTreeMap<String, NamespaceDef>,
    nodes: Vec<NodeDef>,
    pods: Vec<PodDef>,
    #[serde(default)]
    policies: Vec<PolicyDef>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct NamespaceDef {
    #[serde(default)]
    labels: Labels,
}

#[derive(Deserialize)]
struct NodeDef {
    name: String,
    #[serde(default)]
    labels: Labels,
    /// A placeholder (`{{node-ip node-1}}`) or an address.
    address: String,
}

#[derive(Deserialize)]
struct PodDef {
    namespace: String,
    name: String,
    #[serde(default)]
    labels: Labels,
    #[serde(default)]
    host_network: bool,
    client_container: String,
    node: Option<String>,
    /// Never probed: the runner leaves it out.
    #[serde(default)]
    optional: bool,
    #[serde(default)]
    ports: Vec<PortDef>,
}

#[derive(Deserialize)]
struct PortDef {
    port: u16,
    #[serde(deserialize_with = "common::de_proto")]
    protocol: Proto,
    name: Option<String>,
    /// Listed in the pod spec's `containerPorts` (else only a listener).
    declared: bool,
    container: String,
}

#[derive(Deserialize)]
struct PolicyDef {
    id: String,
    object: Value,
}

#[derive(Deserialize)]
struct Step {
    description: String,
    #[serde(default)]
    actions: Vec<Action>,
    #[serde(default)]
    probes: Vec<ProbeDef>,
}

#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
enum Action {
    CreatePolicy { policy: String, kind: String },
    UpdatePolicy { policy: String },
    DeletePolicy { policy: String, kind: String },
    SetNamespaceLabels { namespace: String, labels: Labels },
}

#[derive(Deserialize)]
struct ProbeDef {
    from: String,
    to: String,
    target: String,
    #[serde(deserialize_with = "common::de_proto")]
    protocol: Proto,
    port: u16,
    expect: Expect,
    line: Option<u32>,
    model_trace: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Allow,
    Deny,
}

impl Expect {
    /// Whether `outcome` is what this expects: a connection, or a silent drop.
    fn holds(self, outcome: Outcome) -> bool {
        match self {
            Expect::Allow => outcome == Outcome::Connected,
            Expect::Deny => outcome == Outcome::TimedOut,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Expect::Allow => "allow (connected)",
            Expect::Deny => "deny (timed out)",
        }
    }
}

/// A policy object's identity: kind, namespace (empty for cluster-scoped), name.
type ObjectKey = (String, String, String);

/// A policy version of the case, checked: its object's kind and key.
struct PolicyVersion<'c> {
    kind: &'c str,
    key: ObjectKey,
    object: &'c Value,
    /// Where it is in the file, for errors: `policies[3] (id x)`.
    place: String,
}

impl PolicyVersion<'_> {
    /// `ClusterNetworkPolicy default`, `NetworkPolicy ns/name`.
    fn describe(&self) -> String {
        let (kind, namespace, name) = &self.key;
        if namespace.is_empty() {
            format!("{kind} {name}")
        } else {
            format!("{kind} {namespace}/{name}")
        }
    }
}

impl Case {
    pub fn from_document(doc: Value) -> Result<Case> {
        let case: Case = common::decode(doc)?;
        case.check()?;
        Ok(case)
    }

    fn pod_key(p: &PodDef) -> String {
        format!("{}/{}", p.namespace, p.name)
    }

    /// Everything the file refers to exists, and the policy objects are objects the actions can
    /// apply: errors name the field.
    fn check(&self) -> Result<()> {
        ensure!(
            self.nodes.len() == 1,
            "nodes: the rig is one node, the case lists {}",
            self.nodes.len()
        );
        let node = &self.nodes[0].name;
        let mut pods = BTreeSet::new();
        for (i, p) in self.pods.iter().enumerate() {
            let place = format!("pods[{i}] ({})", Self::pod_key(p));
            ensure!(
                self.namespaces.contains_key(&p.namespace),
                "{place}.namespace: no namespace {} in namespaces",
                p.namespace
            );
            ensure!(
                pods.insert(Self::pod_key(p)),
                "{place}: a second pod of that name"
            );
            if p.host_network && !p.optional {
                match &p.node {
                    Some(n) if n == node => {}
                    Some(n) => {
                        bail!("{place}.node: host-networked on {n}, but the rig's node is {node}")
                    }
                    None => bail!("{place}.node: a host-networked pod needs its node"),
                }
            }
        }
        let versions = self.policy_versions()?;
        // The objects that exist as the steps go: a create needs its object absent, an update
        // or a delete present.
        let mut existing: BTreeSet<&ObjectKey> = BTreeSet::new();
        for (s, step) in self.steps.iter().enumerate() {
            for (a, action) in step.actions.iter().enumerate() {
                let place = format!("steps[{s}].actions[{a}]");
                let version = |policy: &str| {
                    versions
                        .get(policy)
                        .with_context(|| format!("{place}.policy: no policy {policy}"))
                };
                match action {
                    Action::CreatePolicy { policy, kind }
                    | Action::DeletePolicy { policy, kind } => {
                        let v = version(policy)?;
                        ensure!(
                            v.kind == kind,
                            "{place}.kind: {kind}, but {} is a {}",
                            v.place,
                            v.kind
                        );
                        if matches!(action, Action::CreatePolicy { .. }) {
                            ensure!(
                                existing.insert(&v.key),
                                "{place}: creates {policy}, but {} exists then",
                                v.describe()
                            );
                        } else {
                            ensure!(
                                existing.remove(&v.key),
                                "{place}: deletes {policy}, but no {} exists then",
                                v.describe()
                            );
                        }
                    }
                    Action::UpdatePolicy { policy } => {
                        let v = version(policy)?;
                        ensure!(
                            existing.contains(&v.key),
                            "{place}: updates {policy}, but no {} exists then",
                            v.describe()
                        );
                    }
                    Action::SetNamespaceLabels { namespace, .. } => {
                        ensure!(
                            self.namespaces.contains_key(namespace),
                            "{place}.namespace: no namespace {namespace} in namespaces"
                        );
                    }
                }
            }
            for (p, probe) in step.probes.iter().enumerate() {
                let place = format!("steps[{s}].probes[{p}]");
                let from = self
                    .pod(&probe.from)
                    .with_context(|| format!("{place}.from: no pod {}", probe.from))?;
                ensure!(
                    !from.optional,
                    "{place}.from: {} is optional (the runner leaves it out)",
                    probe.from
                );
                let to = self
                    .pod(&probe.to)
                    .with_context(|| format!("{place}.to: no pod {}", probe.to))?;
                ensure!(
                    !to.optional,
                    "{place}.to: {} is optional (the runner leaves it out)",
                    probe.to
                );
                ensure!(
                    to.ports
                        .iter()
                        .any(|pd| pd.port == probe.port && pd.protocol == probe.protocol),
                    "{place}: {} does not serve {}/{}",
                    probe.to,
                    probe.protocol,
                    probe.port
                );
            }
        }
        Ok(())
    }

    fn pod(&self, key: &str) -> Option<&PodDef> {
        self.pods.iter().find(|p| Self::pod_key(p) == key)
    }

    /// The policy versions by id, each checked to be a ClusterNetworkPolicy or NetworkPolicy
    /// with a name (and a namespace for a NetworkPolicy).
    fn policy_versions(&self) -> Result<BTreeMap<&str, PolicyVersion<'_>>> {
        let mut out = BTreeMap::new();
        for (i, p) in self.policies.iter().enumerate() {
            let place = format!("policies[{i}] (id {})", p.id);
            let field = |name: &str| p.object.get(name).and_then(Value::as_str);
            let kind = field("kind").with_context(|| format!("{place}.object.kind: missing"))?;
            let want = match kind {
                "ClusterNetworkPolicy" => CNP_API_VERSION,
                "NetworkPolicy" => NP_API_VERSION,
                other => bail!(
                    "{place}.object.kind: {other} (a case applies ClusterNetworkPolicy and NetworkPolicy)"
                ),
            };
            ensure!(
                field("apiVersion") == Some(want),
                "{place}.object.apiVersion: {:?}, want {want} for a {kind}",
                field("apiVersion")
            );
            let meta = |name: &str| {
                p.object
                    .get("metadata")
                    .and_then(|m| m.get(name))
                    .and_then(Value::as_str)
            };
            let name =
                meta("name").with_context(|| format!("{place}.object.metadata.name: missing"))?;
            let namespace = match (kind, meta("namespace")) {
                ("NetworkPolicy", Some(ns)) => ns,
                ("NetworkPolicy", None) => {
                    bail!("{place}.object.metadata.namespace: missing for a NetworkPolicy")
                }
                (_, Some(ns)) => {
                    bail!("{place}.object.metadata.namespace: {ns}, but a {kind} is cluster-scoped")
                }
                (_, None) => "",
            };
            let version = PolicyVersion {
                kind,
                key: (kind.to_string(), namespace.to_string(), name.to_string()),
                object: &p.object,
                place: place.clone(),
            };
            ensure!(
                out.insert(p.id.as_str(), version).is_none(),
                "{place}.id: a second policy with id {}",
                p.id
            );
        }
        Ok(out)
    }
}

/// The cluster as the steps leave it, written to the manifest directory after each step.
struct Cluster<'a> {
    case: &'a Case,
    addresses: &'a Addresses,
    node_ip: IpAddr,
    /// The pods the rig runs (optional ones left out).
    pods: Vec<&'a PodDef>,
    namespace_labels: BTreeMap<String, Labels>,
    /// Current policy objects (placeholders expanded), by kind, namespace and name.
    policies: BTreeMap<ObjectKey, Value>,
}

impl Cluster<'_> {
    fn write(&self, dir: &Path) -> Result<()> {
        let mut docs = Vec::new();
        for (name, labels) in &self.namespace_labels {
            let mut labels = labels.clone();
            // The API server keeps this label whatever a patch says.
            labels.insert("kubernetes.io/metadata.name".into(), name.clone());
            docs.push(json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": labels},
            }));
        }
        let node = &self.case.nodes[0];
        docs.push(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node.name, "labels": node.labels},
            "status": {"addresses": [{"type": "InternalIP", "address": self.node_ip.to_string()}]},
        }));
        for p in &self.pods {
            docs.push(self.pod_manifest(p));
        }
        write_docs(&dir.join("cluster.yaml"), &docs)?;
        let policies: Vec<Value> = self.policies.values().cloned().collect();
        write_docs(&dir.join("policies.yaml"), &policies)
    }

    /// The pod as the API server would hold it once running: its client container first, then
    /// one container per `container` of its ports, declaring the `declared` ones.
    fn pod_manifest(&self, p: &PodDef) -> Value {
        let mut containers: Vec<(&str, Vec<Value>)> = vec![(p.client_container.as_str(), vec![])];
        for port in &p.ports {
            let i = match containers.iter().position(|(c, _)| *c == port.container) {
                Some(i) => i,
                None => {
                    containers.push((&port.container, Vec::new()));
                    containers.len() - 1
                }
            };
            if port.declared {
                let mut declared = json!({
                    "containerPort": port.port, "protocol": port.protocol.as_str(),
                });
                if let Some(name) = &port.name {
                    declared["name"] = json!(name);
                }
                containers[i].1.push(declared);
            }
        }
        let containers: Vec<Value> = containers
            .into_iter()
            .map(|(name, ports)| {
                let mut c = json!({"name": name, "image": "agnhost"});
                if !ports.is_empty() {
                    c["ports"] = json!(ports);
                }
                c
            })
            .collect();
        let ip = self.addresses.pods[&Case::pod_key(p)].to_string();
        let mut spec = json!({"nodeName": self.case.nodes[0].name, "containers": containers});
        if p.host_network {
            spec["hostNetwork"] = json!(true);
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
            "spec": spec,
            "status": {
                "phase": "Running",
                "hostIP": self.node_ip.to_string(),
                "podIP": ip,
                "podIPs": [{"ip": ip}],
            },
        })
    }

    /// Applies one action (`Case::check` made sure that what it creates is absent and what it
    /// updates or deletes present).
    fn apply(
        &mut self,
        action: &Action,
        versions: &BTreeMap<&str, PolicyVersion<'_>>,
    ) -> Result<()> {
        match action {
            Action::CreatePolicy { policy, .. } | Action::UpdatePolicy { policy } => {
                let v = &versions[policy.as_str()];
                let object = self
                    .addresses
                    .expand(v.object, &format!("{}.object", v.place))?;
                self.policies.insert(v.key.clone(), object);
            }
            Action::DeletePolicy { policy, .. } => {
                self.policies.remove(&versions[policy.as_str()].key);
            }
            Action::SetNamespaceLabels { namespace, labels } => {
                self.namespace_labels
                    .insert(namespace.clone(), labels.clone());
            }
        }
        Ok(())
    }
}

/// One probe of the file, resolved: where from (a rig pod, or the node for a host-networked
/// client), to which address.
struct Resolved<'a> {
    from: &'a Pod,
    /// The client is host-networked: `from` stands for the node's namespace.
    from_host: bool,
    target: IpAddr,
    def: &'a ProbeDef,
}

impl Resolved<'_> {
    fn spec(&self, timeout: Duration) -> ProbeSpec<'_> {
        ProbeSpec {
            from: self.from,
            to: self.target,
            port: self.def.port,
            proto: self.def.protocol,
            timeout,
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} -> {} ({}) {}/{}",
            self.def.from, self.def.to, self.target, self.def.protocol, self.def.port
        )
    }
}

/// The case placed on a rig node: its netns pods serving their ports, the host-networked
/// pods' ports served on the node's address, and every pod's and node's address.
struct Placed<'c> {
    node: Node,
    /// The pods of the case the rig runs (optional ones left out).
    pods: Vec<&'c PodDef>,
    /// Those in network namespaces of their own, in the order of `node.pods()`.
    netns_pods: Vec<&'c PodDef>,
    /// A host-networked client's stand-in: the node's own namespace and addresses.
    host_client: Pod,
    addresses: Addresses,
}

impl<'c> Placed<'c> {
    fn new(case: &'c Case, ipv6: bool) -> Result<Placed<'c>> {
        let pods: Vec<&PodDef> = case.pods.iter().filter(|p| !p.optional).collect();
        let netns_pods: Vec<&PodDef> = pods.iter().copied().filter(|p| !p.host_network).collect();
        let node = Node::new(NodeSpec {
            pods: netns_pods
                .iter()
                .map(|p| PodSpec {
                    name: p.name.clone(),
                })
                .collect(),
            ipv6,
        })
        .context("creating the netns node")?;
        let node_ip = node.node_ip(ipv6);
        let host_client = Pod {
            name: case.nodes[0].name.clone(),
            index: node.pods().len(),
            netns_name: node.netns_name.clone(),
            ipv4: NODE_IP_V4,
            ipv6: ipv6.then_some(NODE_IP_V6),
            host_ifname: String::new(),
            host_ifindex: 0,
        };
        let mut addresses = Addresses::default();
        addresses.nodes.insert(case.nodes[0].name.clone(), node_ip);
        let mut host_ports = BTreeSet::new();
        for p in pods.iter().filter(|p| p.host_network) {
            addresses.pods.insert(Case::pod_key(p), node_ip);
            host_ports.extend(p.ports.iter().map(|pd| (pd.port, pd.protocol)));
        }
        for (p, rig_pod) in netns_pods.iter().zip(node.pods()) {
            addresses.pods.insert(Case::pod_key(p), rig_pod.ip(ipv6));
            let ports: Vec<(u16, Proto)> =
                p.ports.iter().map(|pd| (pd.port, pd.protocol)).collect();
            node.serve_pod(rig_pod, &ports)
                .with_context(|| format!("servers of {}", Case::pod_key(p)))?;
        }
        if !host_ports.is_empty() {
            node.serve_host(&host_ports.into_iter().collect::<Vec<_>>())?;
        }
        let node_address = addresses
            .expand_str(&case.nodes[0].address)
            .context("nodes[0].address")?;
        ensure!(
            node_address.parse::<IpAddr>() == Ok(node_ip),
            "nodes[0].address: {node_address:?} is not the rig node's address {node_ip}"
        );
        Ok(Placed {
            node,
            pods,
            netns_pods,
            host_client,
            addresses,
        })
    }

    /// Every step's probes, resolved: the target expanded and checked to be the address of
    /// the destination, the client a rig pod or the host client.
    fn resolve<'p>(&'p self, case: &'p Case) -> Result<Vec<Vec<Resolved<'p>>>> {
        let mut steps = Vec::new();
        for (s, step) in case.steps.iter().enumerate() {
            let mut probes = Vec::new();
            for (i, def) in step.probes.iter().enumerate() {
                let place = format!("steps[{s}].probes[{i}]");
                let target = self
                    .addresses
                    .expand_str(&def.target)
                    .with_context(|| format!("{place}.target"))?;
                let target: IpAddr = target
                    .parse()
                    .with_context(|| format!("{place}.target: {target:?} is not an address"))?;
                ensure!(
                    self.addresses.pods.get(&def.to) == Some(&target),
                    "{place}.target: {target} is not the address of {}",
                    def.to
                );
                let (from, from_host) = match self
                    .netns_pods
                    .iter()
                    .position(|p| Case::pod_key(p) == def.from)
                {
                    Some(i) => (&self.node.pods()[i], false),
                    None => (&self.host_client, true),
                };
                probes.push(Resolved {
                    from,
                    from_host,
                    target,
                    def,
                });
            }
            steps.push(probes);
        }
        Ok(steps)
    }
}

/// Runs one case on a fresh node and agent: (probes, failed probes).
pub fn run(args: &Args, case: &Case, work: &Path) -> Result<(usize, usize)> {
    let versions = case.policy_versions()?;
    let placed = Placed::new(case, args.ipv6)?;
    let resolved = placed.resolve(case)?;
    let endpoints = placed.netns_pods.len();
    let mut cluster = Cluster {
        case,
        addresses: &placed.addresses,
        node_ip: placed.node.node_ip(args.ipv6),
        pods: placed.pods.clone(),
        namespace_labels: case
            .namespaces
            .iter()
            .map(|(n, d)| (n.clone(), d.labels.clone()))
            .collect(),
        policies: BTreeMap::new(),
    };
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    cluster.write(&manifests)?;
    let since = SystemTime::now();
    let mut agent = AgentProcess::start(&placed.node, &args.agent, &manifests, work)?;
    let status = agent.wait_reconciled(since, endpoints, Duration::from_secs(20))?;
    ensure!(
        status.errors.is_empty(),
        "the agent reports errors with no policy: {:?}; log: {}",
        status.errors,
        agent.log_path().display()
    );

    let timeout = Duration::from_millis(args.probe_timeout_ms);
    baseline(&placed.node, &resolved, timeout)?;

    let (mut probes, mut failed) = (0, 0);
    for (s, step) in case.steps.iter().enumerate() {
        for action in &step.actions {
            cluster.apply(action, &versions)?;
        }
        if !step.actions.is_empty() {
            let written = SystemTime::now();
            cluster.write(&manifests)?;
            let status = agent.wait_reconciled(written, endpoints, Duration::from_secs(20))?;
            ensure!(
                status.errors.is_empty(),
                "step {} ({}): the agent reports errors: {:?}; log: {}",
                s + 1,
                step.description,
                status.errors,
                agent.log_path().display()
            );
        }
        let step_probes = &resolved[s];
        if step_probes.is_empty() {
            continue;
        }
        probes += step_probes.len();
        let outcomes = probe_step(&placed.node, step_probes, timeout, args.converge_ms);
        let explained = if args.check_explain {
            let dropped = step_probes
                .iter()
                .map(|r| explain(&agent, r, args.ipv6))
                .collect::<Result<Vec<_>>>()?;
            Some(dropped)
        } else {
            None
        };
        for (i, (r, outcome)) in step_probes.iter().zip(&outcomes).enumerate() {
            let explained = explained.as_ref().map(|e| e[i]);
            if !judge(
                &format!("step {} ({}), probe {}", s + 1, step.description, i + 1),
                r,
                *outcome,
                explained,
            ) {
                failed += 1;
                println!("    agent log: {}", agent.log_path().display());
            }
        }
    }
    drop(agent);
    drop(placed);
    Ok((probes, failed))
}

/// Whether a probe's outcome is what it expects and, if `explain` was asked (`Some(dropped)`),
/// whether `explain` says dropped exactly when the probe timed out; prints what is wrong.
fn judge(place: &str, r: &Resolved<'_>, outcome: Outcome, explained: Option<bool>) -> bool {
    let holds = r.def.expect.holds(outcome);
    let explain_disagrees =
        explained.is_some_and(|dropped| dropped != (outcome == Outcome::TimedOut));
    if holds && !explain_disagrees {
        return true;
    }
    let line = r
        .def
        .line
        .map(|l| format!(", line {l}"))
        .unwrap_or_default();
    let what = format!("{place} ({}{line})", r.describe());
    if !holds {
        println!(
            "  {what}: MISMATCH: expected {}, got {outcome}",
            r.def.expect.as_str()
        );
    }
    if let Some(dropped) = explained.filter(|_| explain_disagrees) {
        println!(
            "  {what}: EXPLAIN DISAGREES WITH THE DATAPATH: probed {outcome}, explain says {}",
            if dropped { "dropped" } else { "allowed" }
        );
    }
    if let Some(trace) = &r.def.model_trace {
        println!("    model: {trace}");
    }
    false
}

/// With no policy, every probe of the file must connect (servers up, agent attached): up to 10
/// rounds, each asking again the probes that did not.
fn baseline(node: &Node, resolved: &[Vec<Resolved<'_>>], timeout: Duration) -> Result<()> {
    let mut unique: BTreeMap<(String, IpAddr, u16, Proto), &Resolved<'_>> = BTreeMap::new();
    for r in resolved.iter().flatten() {
        unique
            .entry((r.def.from.clone(), r.target, r.def.port, r.def.protocol))
            .or_insert(r);
    }
    let mut left: Vec<&Resolved<'_>> = unique.into_values().collect();
    let mut last = Vec::new();
    for _ in 0..10 {
        if left.is_empty() {
            return Ok(());
        }
        let specs: Vec<ProbeSpec<'_>> = left.iter().map(|r| r.spec(timeout)).collect();
        let outcomes = node.probe_outcomes(&specs);
        last = left
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| !o.connected())
            .map(|(r, o)| format!("{}: {o}", r.describe()))
            .collect();
        left = left
            .into_iter()
            .zip(outcomes)
            .filter(|(_, o)| !o.connected())
            .map(|(r, _)| r)
            .collect();
    }
    if left.is_empty() {
        return Ok(());
    }
    bail!(
        "baseline: with no policy, these do not connect: {}",
        last.join("; ")
    )
}

/// How often a probe that does not hold yet is asked again (upstream polls every 0.5 s).
const POLL: Duration = Duration::from_millis(500);

/// The timeout of a second chance for an allowed probe in the confirmation round (a loaded
/// machine misses deadlines); upstream's own probe timeout.
const SLOW_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs a step's probes side by side: each is asked again (every [`POLL`]) until it holds or
/// `converge_ms` is over; if all held, all are asked once more and judged on that, an allowed
/// probe that fails getting two more chances with [`SLOW_TIMEOUT`] (a deny that connects is
/// never asked again: that is a hole). Returns each probe's last outcome.
fn probe_step(
    node: &Node,
    probes: &[Resolved<'_>],
    timeout: Duration,
    converge_ms: u64,
) -> Vec<Outcome> {
    let deadline = Instant::now() + Duration::from_millis(converge_ms);
    let specs: Vec<ProbeSpec<'_>> = probes.iter().map(|r| r.spec(timeout)).collect();
    let mut outcomes = node.probe_outcomes(&specs);
    loop {
        let pending: Vec<usize> = (0..probes.len())
            .filter(|&i| !probes[i].def.expect.holds(outcomes[i]))
            .collect();
        if pending.is_empty() {
            break;
        }
        if Instant::now() + POLL > deadline {
            return outcomes;
        }
        std::thread::sleep(POLL);
        let again: Vec<ProbeSpec<'_>> = pending.iter().map(|&i| specs[i]).collect();
        for (i, o) in pending.iter().zip(node.probe_outcomes(&again)) {
            outcomes[*i] = o;
        }
    }
    // Every probe held: confirm.
    let mut confirmed = node.probe_outcomes(&specs);
    for _ in 0..2 {
        let retry: Vec<usize> = (0..probes.len())
            .filter(|&i| probes[i].def.expect == Expect::Allow && !confirmed[i].connected())
            .collect();
        if retry.is_empty() {
            break;
        }
        let slow: Vec<ProbeSpec<'_>> = retry
            .iter()
            .map(|&i| ProbeSpec {
                timeout: SLOW_TIMEOUT,
                ..specs[i]
            })
            .collect();
        for (i, o) in retry.iter().zip(node.probe_outcomes(&slow)) {
            confirmed[*i] = o;
        }
    }
    confirmed
}

/// Whether `palisade explain` (from the pinned maps) says the probe's packet is dropped.
fn explain(agent: &AgentProcess, r: &Resolved<'_>, ipv6: bool) -> Result<bool> {
    let from = if r.from_host {
        r.from.ip(ipv6).to_string()
    } else {
        r.def.from.clone()
    };
    let to = r.target.to_string();
    let port = r.def.port.to_string();
    let mut args = vec![
        "explain",
        "--from",
        &from,
        "--to",
        &to,
        "--port",
        &port,
        "--protocol",
        r.def.protocol.as_str(),
    ];
    if ipv6 {
        args.push("--ipv6");
    }
    let e = agent.cli_json(&args)?;
    match e["verdict"].as_str() {
        Some("dropped") => Ok(true),
        Some("allowed" | "would-drop") => Ok(false),
        other => bail!("explain {}: unexpected verdict {other:?}", r.describe()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small case: one pod of each kind, one policy, the steps given.
    fn case(steps: Value) -> Value {
        json!({
            "schema_version": 2,
            "name": "small",
            "namespaces": {"x": {"labels": {"kubernetes.io/metadata.name": "x"}}},
            "nodes": [{"name": "node-1", "labels": {}, "address": "{{node-ip node-1}}"}],
            "pods": [
                {"namespace": "x", "name": "a", "client_container": "c", "host_network": false,
                 "ports": [{"port": 80, "protocol": "TCP", "name": "web", "declared": true, "container": "s"}]},
                {"namespace": "x", "name": "h", "client_container": "c", "host_network": true, "node": "node-1",
                 "ports": [{"port": 34345, "protocol": "UDP", "declared": false, "container": "s"}]},
            ],
            "policies": [
                {"id": "p", "object": {"apiVersion": CNP_API_VERSION, "kind": "ClusterNetworkPolicy",
                                       "metadata": {"name": "p"}, "spec": {}}},
                {"id": "x/np", "object": {"apiVersion": NP_API_VERSION, "kind": "NetworkPolicy",
                                          "metadata": {"name": "np", "namespace": "x"}, "spec": {}}},
            ],
            "steps": steps,
        })
    }

    fn error(steps: Value) -> String {
        match Case::from_document(case(steps)) {
            Ok(_) => panic!("accepted"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn a_good_case_reads() {
        let c = Case::from_document(case(json!([
            {"description": "create", "actions": [
                {"action": "create_policy", "policy": "p", "kind": "ClusterNetworkPolicy"},
                {"action": "create_policy", "policy": "x/np", "kind": "NetworkPolicy"}]},
            {"description": "probe", "actions": [
                {"action": "update_policy", "policy": "p"},
                {"action": "delete_policy", "policy": "x/np", "kind": "NetworkPolicy"},
                {"action": "set_namespace_labels", "namespace": "x", "labels": {"a": "b"}}],
             "probes": [
                {"from": "x/a", "to": "x/h", "target": "{{node-ip node-1}}", "protocol": "UDP",
                 "port": 34345, "expect": "allow"},
                {"from": "x/h", "to": "x/a", "target": "{{ip x/a}}", "protocol": "tcp",
                 "port": 80, "expect": "deny"}]},
        ])))
        .unwrap();
        assert_eq!(c.steps[1].probes[1].protocol, Proto::Tcp);
        assert_eq!(c.steps[1].probes[1].expect, Expect::Deny);
    }

    #[test]
    fn bad_cases_name_the_field() {
        let create =
            json!({"action": "create_policy", "policy": "p", "kind": "ClusterNetworkPolicy"});
        for (steps, want) in [
            (
                json!([{"description": "d", "actions": [{"action": "update_policy", "policy": "p"}]}]),
                "steps[0].actions[0]: updates p, but no ClusterNetworkPolicy p exists then",
            ),
            (
                json!([{"description": "d", "actions": [create, create]}]),
                "steps[0].actions[1]: creates p, but ClusterNetworkPolicy p exists then",
            ),
            (
                json!([{"description": "d", "actions": [
                    {"action": "delete_policy", "policy": "x/np", "kind": "NetworkPolicy"}]}]),
                "steps[0].actions[0]: deletes x/np, but no NetworkPolicy x/np exists then",
            ),
            (
                json!([{"description": "d", "actions": [
                    {"action": "create_policy", "policy": "p", "kind": "NetworkPolicy"}]}]),
                "steps[0].actions[0].kind: NetworkPolicy, but policies[0] (id p) is a ClusterNetworkPolicy",
            ),
            (
                json!([{"description": "d", "actions": [{"action": "create_policy", "policy": "q", "kind": "NetworkPolicy"}]}]),
                "steps[0].actions[0].policy: no policy q",
            ),
            (
                json!([{"description": "d", "actions": [{"action": "label_pod", "pod": "x/a"}]}]),
                "steps[0].actions[0].action: unknown variant `label_pod`",
            ),
            (
                json!([{"description": "d", "probes": [{"from": "x/a", "to": "x/a", "target": "{{ip x/a}}",
                    "protocol": "TCP", "port": 81, "expect": "deny"}]}]),
                "steps[0].probes[0]: x/a does not serve TCP/81",
            ),
            (
                json!([{"description": "d", "probes": [{"from": "x/b", "to": "x/a", "target": "{{ip x/a}}",
                    "protocol": "TCP", "port": 80, "expect": "deny"}]}]),
                "steps[0].probes[0].from: no pod x/b",
            ),
            (
                json!([{"description": "d", "probes": [{"from": "x/a", "to": "x/a", "target": "{{ip x/a}}",
                    "protocol": "ICMP", "port": 80, "expect": "deny"}]}]),
                "steps[0].probes[0].protocol: unknown protocol ICMP",
            ),
            (
                json!([{"description": "d", "probes": [{"from": "x/a", "to": "x/a", "target": "{{ip x/a}}",
                    "protocol": "TCP", "port": 80, "expect": "maybe"}]}]),
                "steps[0].probes[0].expect: unknown variant `maybe`",
            ),
        ] {
            let got = error(steps);
            assert!(
                got.starts_with(want),
                "{got}\n  does not start with\n{want}"
            );
        }
        let mut c = case(json!([]));
        c["policies"][1]["object"]["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("namespace");
        let e = format!("{:#}", Case::from_document(c).err().unwrap());
        assert_eq!(
            e,
            "policies[1] (id x/np).object.metadata.namespace: missing for a NetworkPolicy"
        );
    }
}
