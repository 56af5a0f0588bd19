//! Schema v1: the upstream Kubernetes NetworkPolicy e2e cases (tests/conformance/README.md).
//!
//! For each case: a node of 9 pod namespaces (x/a … z/c) serving the case's ports, a fresh
//! bpffs and agent (or, with `--nodes N`, the pods spread over N nodes, each with its own
//! agent in cluster mode: [`crate::nodes`]); each step's actions rewrite the manifest files
//! (or the API server's objects); after every agent has reconciled them, every probe's
//! 72-pair matrix is compared with the expectation, retried for a bounded convergence window.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::Path,
    time::Duration,
};

use anyhow::{Context, Result, bail};
use palisade_tests::{
    agent::AgentProcess,
    rig::{Pod, Proto},
};
use serde::Deserialize;
use serde_json::Value;

use crate::{
    Args,
    common::{self, Addresses},
    nodes::{Layout, Rig},
};

#[derive(Deserialize)]
pub struct Case {
    pub name: String,
    served: Served,
    namespaces: BTreeMap<String, NamespaceDef>,
    pods: Vec<PodDef>,
    #[serde(default)]
    policies: Vec<PolicyDef>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Served {
    ports: Vec<u16>,
    protocols: Vec<String>,
}

#[derive(Deserialize, Clone)]
struct NamespaceDef {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Clone)]
struct PodDef {
    namespace: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<PortDef>,
}

#[derive(Deserialize, Clone)]
struct PortDef {
    port: u16,
    protocol: String,
    name: String,
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
    probes: Vec<ProbeDef>,
}

#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
enum Action {
    CreatePolicy {
        policy: String,
    },
    UpdatePolicy {
        policy: String,
    },
    DeleteAllPolicies {
        #[serde(default)]
        #[allow(dead_code)]
        deletes: Vec<String>,
    },
    AddNamespaceLabels {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
    AddPodLabels {
        pod: String,
        labels: BTreeMap<String, String>,
    },
}

#[derive(Deserialize)]
struct ProbeDef {
    port: u16,
    protocol: String,
    expect: Expect,
}

#[derive(Deserialize)]
struct Expect {
    #[serde(default)]
    deny: Vec<(String, String)>,
}

/// The cluster as the files describe it, rewritten after every action.
struct World {
    namespaces: BTreeMap<String, NamespaceDef>,
    pods: Vec<PodDef>,
    /// Current policies by namespace/name.
    policies: BTreeMap<String, Value>,
    /// The pods' addresses (`ns/pod`), for placeholders and probes.
    addresses: Addresses,
}

impl World {
    fn pod_key(p: &PodDef) -> String {
        format!("{}/{}", p.namespace, p.name)
    }

    /// Every object of the cluster: namespaces, pods, policies.
    fn objects(&self) -> Vec<Value> {
        let mut docs = Vec::new();
        for (name, ns) in &self.namespaces {
            let mut labels = ns.labels.clone();
            labels.insert("kubernetes.io/metadata.name".into(), name.clone());
            docs.push(serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": labels},
            }));
        }
        for p in &self.pods {
            let ip = self.addresses.pods[&Self::pod_key(p)].to_string();
            let ports: Vec<_> = p
                .ports
                .iter()
                .map(|port| {
                    serde_json::json!({"name": port.name, "containerPort": port.port, "protocol": port.protocol})
                })
                .collect();
            docs.push(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
                "spec": {"containers": [{"name": "cont-80-tcp", "image": "agnhost", "ports": ports}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
            }));
        }
        docs.extend(
            self.policies
                .values()
                .map(|v| serde_json::to_value(v).expect("YAML value converts to JSON")),
        );
        docs
    }
}

fn render(columns: &[String], blocked: &BTreeSet<(String, String)>) -> String {
    let mut s = format!("{:>6} {}\n", "", columns.join(" "));
    for from in columns {
        s.push_str(&format!("{from:>6} "));
        for to in columns {
            let c = if from == to {
                '-'
            } else if blocked.contains(&(from.clone(), to.clone())) {
                'X'
            } else {
                '.'
            };
            s.push_str(&format!("{c:^3} "));
        }
        s.push('\n');
    }
    s
}

/// Runs one case on a fresh node and agent (or nodes and agents, laid out by `layout`):
/// (probes, failed probes).
pub fn run(args: &Args, case: &Case, work: &Path, layout: Layout) -> Result<(usize, usize)> {
    let pod_names: Vec<String> = case.pods.iter().map(World::pod_key).collect();
    let mut rig = Rig::new(&pod_names, args.ipv6, args.nodes, layout, work)?;
    let pods: Vec<&Pod> = pod_names
        .iter()
        .map(|k| rig.pod(k))
        .collect::<Result<_>>()?;
    let mut served = Vec::new();
    for port in &case.served.ports {
        for p in &case.served.protocols {
            served.push((*port, common::proto(p)?));
        }
    }
    rig.serve(&served).context("starting servers")?;
    let ips: BTreeMap<String, IpAddr> = pod_names
        .iter()
        .zip(&pods)
        .map(|(name, pod)| (name.clone(), pod.ip(args.ipv6)))
        .collect();
    drop(pods);
    let mut world = World {
        namespaces: case.namespaces.clone(),
        pods: case.pods.clone(),
        policies: BTreeMap::new(),
        addresses: Addresses {
            pods: ips,
            nodes: BTreeMap::new(),
        },
    };
    rig.start(&args.agent, work, &world.objects())?;

    let timeout = Duration::from_millis(args.probe_timeout_ms);
    // Baseline: with no policy, every pair connects (servers up, agent attached).
    for (port, p) in &served {
        let blocked = probe_matrix(
            &rig,
            &pod_names,
            &world,
            *port,
            *p,
            timeout,
            10,
            &BTreeSet::new(),
        )?;
        if !blocked.is_empty() {
            bail!(
                "baseline {port}/{p:?}: pairs blocked with no policy:\n{}",
                render(&pod_names, &blocked)
            );
        }
    }

    let policies: BTreeMap<&str, &Value> = case
        .policies
        .iter()
        .map(|p| (p.id.as_str(), &p.object))
        .collect();
    let (mut probes, mut failed) = (0, 0);
    for (i, step) in case.steps.iter().enumerate() {
        for action in &step.actions {
            match action {
                Action::CreatePolicy { policy } | Action::UpdatePolicy { policy } => {
                    let obj = policies
                        .get(policy.as_str())
                        .with_context(|| format!("no policy {policy}"))?;
                    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
                    let name = obj["metadata"]["name"]
                        .as_str()
                        .context("policy without name")?;
                    let obj = world
                        .addresses
                        .expand(obj, &format!("policies[id={policy}].object"))?;
                    world.policies.insert(format!("{ns}/{name}"), obj);
                }
                Action::DeleteAllPolicies { .. } => world.policies.clear(),
                Action::AddNamespaceLabels { namespace, labels } => {
                    world
                        .namespaces
                        .get_mut(namespace)
                        .with_context(|| format!("no namespace {namespace}"))?
                        .labels
                        .extend(labels.clone());
                }
                Action::AddPodLabels { pod, labels } => {
                    world
                        .pods
                        .iter_mut()
                        .find(|p| &World::pod_key(p) == pod)
                        .with_context(|| format!("no pod {pod}"))?
                        .labels
                        .extend(labels.clone());
                }
            }
        }
        rig.update(&world.objects())?;
        for probe in &step.probes {
            probes += 1;
            let p = common::proto(&probe.protocol)?;
            let expected: BTreeSet<(String, String)> = probe.expect.deny.iter().cloned().collect();
            let attempts = (args.converge_ms / args.probe_timeout_ms.max(1)).max(1) as usize;
            let observed = probe_matrix(
                &rig, &pod_names, &world, probe.port, p, timeout, attempts, &expected,
            )?;
            let mut explain_mismatch = None;
            if args.check_explain {
                let agent = rig
                    .single_agent()
                    .context("--check-explain needs one node")?;
                let explained = explain_matrix(agent, &pod_names, probe.port, p, args.ipv6)?;
                if explained != observed {
                    explain_mismatch = Some(explained);
                }
            }
            if let Some(explained) = &explain_mismatch {
                println!(
                    "  step {} ({}), probe {}/{:?}: EXPLAIN DISAGREES WITH THE DATAPATH\n  probed:\n{}  explain:\n{}  agent log: {}",
                    i + 1,
                    step.description,
                    probe.port,
                    p,
                    render(&pod_names, &observed),
                    render(&pod_names, explained),
                    rig.logs()
                );
            }
            if observed != expected || explain_mismatch.is_some() {
                failed += 1;
            }
            if observed != expected {
                println!(
                    "  step {} ({}), probe {}/{:?}: MISMATCH\n  expected:\n{}  observed:\n{}  agent log: {}",
                    i + 1,
                    step.description,
                    probe.port,
                    p,
                    render(&pod_names, &expected),
                    render(&pod_names, &observed),
                    rig.logs()
                );
            }
        }
    }
    drop(rig);
    Ok((probes, failed))
}

/// `palisade explain` for every ordered pair of distinct pods: the pairs it says are dropped.
fn explain_matrix(
    agent: &AgentProcess,
    pods: &[String],
    port: u16,
    proto: Proto,
    ipv6: bool,
) -> Result<BTreeSet<(String, String)>> {
    let port = port.to_string();
    let mut blocked = BTreeSet::new();
    for from in pods {
        for to in pods {
            if from == to {
                continue;
            }
            let mut args = vec![
                "explain",
                "--from",
                from,
                "--to",
                to,
                "--port",
                &port,
                "--protocol",
                proto.as_str(),
            ];
            if ipv6 {
                args.push("--ipv6");
            }
            let e = agent.cli_json(&args)?;
            match e["verdict"].as_str() {
                Some("dropped") => {
                    blocked.insert((from.clone(), to.clone()));
                }
                Some("allowed" | "would-drop") => {}
                other => bail!("explain {from} -> {to}: unexpected verdict {other:?}"),
            }
        }
    }
    Ok(blocked)
}

/// Probes every ordered pair of distinct pods; retries until the blocked set equals `want` or
/// `attempts` runs are done. Returns the blocked pairs of the last run.
#[allow(clippy::too_many_arguments)]
fn probe_matrix(
    rig: &Rig,
    pods: &[String],
    world: &World,
    port: u16,
    proto: Proto,
    timeout: Duration,
    attempts: usize,
    want: &BTreeSet<(String, String)>,
) -> Result<BTreeSet<(String, String)>> {
    let mut pairs = Vec::new();
    for (fi, from) in pods.iter().enumerate() {
        for (ti, to) in pods.iter().enumerate() {
            if fi != ti {
                pairs.push((fi, ti, from.clone(), to.clone()));
            }
        }
    }
    let pods: Vec<&Pod> = pods.iter().map(|k| rig.pod(k)).collect::<Result<_>>()?;
    let mut blocked = BTreeSet::new();
    for _ in 0..attempts {
        let specs: Vec<_> = pairs
            .iter()
            .map(|(fi, _, _, to)| palisade_tests::rig::ProbeSpec {
                from: pods[*fi],
                to: world.addresses.pods[to],
                port,
                proto,
                timeout,
            })
            .collect();
        let results = palisade_tests::rig::probe_many(&specs);
        blocked = pairs
            .iter()
            .zip(results)
            .filter(|(_, ok)| !ok)
            .map(|((_, _, f, t), _)| (f.clone(), t.clone()))
            .collect();
        if &blocked == want {
            break;
        }
    }
    Ok(blocked)
}
