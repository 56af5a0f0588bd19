//! Where a case's pods run: on one node with the standalone agent fed by manifest files (the
//! default), or over the nodes of a cluster (`--nodes N`, [`palisade_tests::multinode`]), each
//! with its own agent in cluster mode against one fake API server, the pods placed by a
//! [`Layout`].
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use clap::ValueEnum;
use palisade_tests::{
    agent::AgentProcess,
    multinode::{Cluster, ClusterSpec, node_name},
    rig::{Node, NodeSpec, Pod, PodSpec},
};
use serde_json::Value;

use crate::common::write_docs;

/// How pods are spread over the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Layout {
    /// Each namespace on one node (the i-th namespace, in the case's order, on node i mod N).
    PerNamespace,
    /// Pod after pod over the nodes, round-robin: every namespace spans the nodes.
    RoundRobin,
}

impl Layout {
    pub fn name(self) -> &'static str {
        match self {
            Layout::PerNamespace => "per-namespace",
            Layout::RoundRobin => "round-robin",
        }
    }

    /// The node of each pod, given (namespace, pod) in the case's order.
    pub fn place(self, pods: &[(String, String)], nodes: usize) -> Vec<usize> {
        let mut namespaces: Vec<&str> = Vec::new();
        for (ns, _) in pods {
            if !namespaces.contains(&ns.as_str()) {
                namespaces.push(ns);
            }
        }
        pods.iter()
            .enumerate()
            .map(|(i, (ns, _))| match self {
                Layout::PerNamespace => {
                    namespaces.iter().position(|n| n == ns).unwrap_or(0) % nodes
                }
                Layout::RoundRobin => i % nodes,
            })
            .collect()
    }
}

/// A case's pods and agents (one per case: the variants' sizes do not matter).
#[allow(clippy::large_enum_variant)]
pub enum Rig {
    One {
        node: Node,
        agent: Option<AgentProcess>,
        manifests: PathBuf,
    },
    Many {
        cluster: Cluster,
        /// `ns/pod` -> node index.
        placement: BTreeMap<String, usize>,
        /// What the API holds, by kind/namespace/name.
        published: BTreeMap<(String, String, String), Value>,
    },
}

/// The rig's pod name of `ns/pod`.
fn rig_name(key: &str) -> String {
    key.replace('/', "-")
}

impl Rig {
    /// The nodes and pods (`ns/pod` keys, in order), no agent yet. `nodes` = 1: one node and
    /// the standalone agent; more: a cluster with `layout`.
    pub fn new(
        keys: &[String],
        ipv6: bool,
        nodes: usize,
        layout: Layout,
        work: &Path,
    ) -> Result<Rig> {
        if nodes <= 1 {
            let node = Node::new(NodeSpec {
                pods: keys.iter().map(|k| PodSpec { name: rig_name(k) }).collect(),
                ipv6,
            })
            .context("creating the netns node")?;
            let manifests = work.join("manifests");
            std::fs::create_dir_all(&manifests)?;
            return Ok(Rig::One {
                node,
                agent: None,
                manifests,
            });
        }
        let split: Vec<(String, String)> = keys
            .iter()
            .map(|k| {
                let (ns, pod) = k.split_once('/').unwrap_or(("", k));
                (ns.to_string(), pod.to_string())
            })
            .collect();
        let on = layout.place(&split, nodes);
        let mut per_node = vec![Vec::new(); nodes];
        for (key, k) in keys.iter().zip(&on) {
            per_node[*k].push(PodSpec {
                name: rig_name(key),
            });
        }
        let cluster = Cluster::new(ClusterSpec {
            nodes: per_node,
            ipv6,
        })
        .context("creating the netns cluster")?;
        Ok(Rig::Many {
            cluster,
            placement: keys.iter().cloned().zip(on).collect(),
            published: BTreeMap::new(),
        })
    }

    /// The pod `ns/pod`.
    pub fn pod(&self, key: &str) -> Result<&Pod> {
        let name = rig_name(key);
        match self {
            Rig::One { node, .. } => node.pod(&name),
            Rig::Many { cluster, .. } => cluster.find_pod(&name).map(|(_, p)| p),
        }
        .with_context(|| format!("no pod {key} in the rig"))
    }

    /// Starts the servers for `served` in every pod.
    pub fn serve(&self, served: &[(u16, palisade_tests::Proto)]) -> Result<()> {
        match self {
            Rig::One { node, .. } => node.serve(served),
            Rig::Many { cluster, .. } => cluster.nodes().iter().try_for_each(|n| n.serve(served)),
        }
    }

    /// Publishes `objects` (the whole cluster's: namespaces, pods, policies) and starts the
    /// agent(s), waiting until each enforces its pods.
    pub fn start(&mut self, agent_bin: &Path, work: &Path, objects: &[Value]) -> Result<()> {
        let pods = self.pod_count();
        match self {
            Rig::One {
                node,
                agent,
                manifests,
            } => {
                write_files(manifests, objects)?;
                let since = SystemTime::now();
                let mut a = AgentProcess::start(node, agent_bin, manifests, work)?;
                a.wait_reconciled(since, pods, Duration::from_secs(20))?;
                *agent = Some(a);
                Ok(())
            }
            Rig::Many { .. } => {
                self.publish(objects)?;
                let Rig::Many { cluster, .. } = self else {
                    unreachable!()
                };
                cluster.start_agents(agent_bin, work, Duration::from_secs(60))
            }
        }
    }

    /// Replaces the cluster's objects with `objects` and waits for every agent's reconcile of
    /// the change.
    pub fn update(&mut self, objects: &[Value]) -> Result<()> {
        let pods = self.pod_count();
        match self {
            Rig::One {
                agent, manifests, ..
            } => {
                let written = SystemTime::now();
                write_files(manifests, objects)?;
                agent.as_mut().context("no agent")?.wait_reconciled(
                    written,
                    pods,
                    Duration::from_secs(20),
                )?;
                Ok(())
            }
            Rig::Many { .. } => {
                if self.publish(objects)? {
                    let Rig::Many { cluster, .. } = self else {
                        unreachable!()
                    };
                    cluster.wait_reconciled(Duration::from_secs(30))?;
                }
                Ok(())
            }
        }
    }

    fn pod_count(&self) -> usize {
        match self {
            Rig::One { node, .. } => node.pods().len(),
            Rig::Many { placement, .. } => placement.len(),
        }
    }

    /// Makes the API hold exactly `objects` (Pods scheduled by the placement): applies what
    /// changed, deletes what went. Whether anything changed.
    fn publish(&mut self, objects: &[Value]) -> Result<bool> {
        let Rig::Many {
            cluster,
            placement,
            published,
        } = self
        else {
            bail!("only a cluster has an API server")
        };
        let mut wanted = BTreeMap::new();
        for o in objects {
            let mut o = o.clone();
            let kind = o["kind"]
                .as_str()
                .context("an object without kind")?
                .to_string();
            let ns = o["metadata"]["namespace"]
                .as_str()
                .unwrap_or("")
                .to_string();
            let name = o["metadata"]["name"]
                .as_str()
                .context("an object without name")?
                .to_string();
            if kind == "Pod" {
                let k = placement
                    .get(&format!("{ns}/{name}"))
                    .with_context(|| format!("pod {ns}/{name} is not placed"))?;
                o["spec"]["nodeName"] = Value::String(node_name(*k));
            }
            wanted.insert((kind, ns, name), o);
        }
        let mut changed = false;
        for (key, o) in &wanted {
            if published.get(key) != Some(o) {
                cluster.api.apply(&o.to_string());
                changed = true;
            }
        }
        for key in published.keys() {
            if !wanted.contains_key(key) {
                cluster.api.delete(&key.0, &key.1, &key.2);
                changed = true;
            }
        }
        *published = wanted;
        Ok(changed)
    }

    /// The standalone agent (one node only: `palisade explain` reads one node's maps).
    pub fn single_agent(&self) -> Option<&AgentProcess> {
        match self {
            Rig::One { agent, .. } => agent.as_ref(),
            Rig::Many { .. } => None,
        }
    }

    /// Where the agents' logs are.
    pub fn logs(&self) -> String {
        match self {
            Rig::One { agent, .. } => agent
                .as_ref()
                .map(|a| a.log_path().display().to_string())
                .unwrap_or_default(),
            Rig::Many { cluster, .. } => {
                let mut v = Vec::new();
                for k in 0..cluster.nodes().len() {
                    if let Some(a) = cluster.agent(k) {
                        v.push(format!("{}: {}", node_name(k), a.log.display()));
                    }
                }
                v.join(", ")
            }
        }
    }
}

/// The standalone agent's files: the cluster in `cluster.yaml`, the policies in
/// `policies.yaml`.
fn write_files(dir: &Path, objects: &[Value]) -> Result<()> {
    let (policies, cluster): (Vec<Value>, Vec<Value>) = objects
        .iter()
        .cloned()
        .partition(|o| o["kind"] == "NetworkPolicy");
    write_docs(&dir.join("cluster.yaml"), &cluster)?;
    write_docs(&dir.join("policies.yaml"), &policies)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> Vec<(String, String)> {
        ["x", "y", "z"]
            .iter()
            .flat_map(|ns| ["a", "b", "c"].map(|p| (ns.to_string(), p.to_string())))
            .collect()
    }

    #[test]
    fn layouts_place_namespaces_whole_or_spread() {
        assert_eq!(
            Layout::PerNamespace.place(&pods(), 3),
            [0, 0, 0, 1, 1, 1, 2, 2, 2]
        );
        assert_eq!(
            Layout::RoundRobin.place(&pods(), 3),
            [0, 1, 2, 0, 1, 2, 0, 1, 2]
        );
        assert_eq!(
            Layout::PerNamespace.place(&pods(), 2),
            [0, 0, 0, 1, 1, 1, 0, 0, 0]
        );
    }
}
