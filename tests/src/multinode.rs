//! A Kubernetes cluster on one machine: N rig nodes ([`Node`], each with its pods on ptp-style
//! veths), joined as kind joins its nodes with a ptp CNI, and each running its own agent in
//! cluster mode against one fake API server ([`FakeApi`]).
//!
//! Wiring: a fabric namespace (`pal-<pid>-f<n>-fabric`) holds a bridge `br0` with
//! 10.243.0.254/24, where the API server listens. Node k (named `node-<k+1>`) has an uplink
//! veth `up0` on that bridge carrying its own addresses 10.243.0.(k+1)/24 and
//! fd00:243::(k+1)/64 (its InternalIPs), owns the pod range 10.244.k.0/24 (fd00:244:0:k::/64,
//! see [`crate::rig`]) and routes every other node's range via that node's address. Pod traffic
//! between nodes keeps its pod addresses (no masquerade), so the source node's agent judges
//! the client's egress and the destination node's agent the server's ingress.
//!
//! Each agent pins under a bpffs of its own (`<work>/node-<k+1>/bpffs`), gets
//! `--node-name node-<k+1>` and enforces only its node's pods: the API lists every pod, and
//! an agent's endpoints are the pods scheduled on its node whose host routes it finds.
//! Dropping the cluster stops the agents, the API server, and deletes every namespace.
//!
//! For `kubectl palisade`: [`Cluster::serve_agent_pods`] publishes each node's agent as the
//! DaemonSet's pod (`palisade-system`, its labels, the node's name and address) and makes the
//! pod's `exec` run the node's `palisade` CLI against that node's agent socket, as the agent's
//! container would; [`Cluster::operator_command`] runs a command where an operator's kubectl
//! runs, on the fabric (it reaches the API server, not the nodes).
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result, bail};
use serde_json::json;

use crate::{
    fakeapi::{ClusterAgent, FakeApi},
    netns,
    rig::{Node, NodeSpec, Pod, PodSpec, remove_stale_namespaces},
};

/// At most this many nodes (one /24 of 10.244.0.0/16 each, addresses .1 .. .253 on the fabric).
pub const MAX_NODES: usize = 200;

/// Where the API server listens, on the fabric's bridge.
pub const API_IP: Ipv4Addr = Ipv4Addr::new(10, 243, 0, 254);

/// Node `k`'s own addresses (on its uplink): 10.243.0.(k+1) and fd00:243::(k+1). Node 0's are
/// a lone node's ([`crate::rig::NODE_IP_V4`]).
pub fn node_ips(k: usize) -> (Ipv4Addr, Ipv6Addr) {
    (
        Ipv4Addr::new(10, 243, 0, (k + 1) as u8),
        Ipv6Addr::new(0xfd00, 0x243, 0, 0, 0, 0, 0, (k + 1) as u16),
    )
}

/// Node `k`'s name in the API (`node-1` for node 0).
pub fn node_name(k: usize) -> String {
    format!("node-{}", k + 1)
}

/// Node `k`'s agent pod's name, as a DaemonSet names its pods (`palisade-` and five
/// characters that do not say which node).
pub fn agent_pod_name(k: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut x = (k as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let suffix: String = (0..5)
        .map(|_| {
            let c = ALPHABET[(x % ALPHABET.len() as u64) as usize] as char;
            x /= ALPHABET.len() as u64;
            c
        })
        .collect();
    format!("palisade-{suffix}")
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSpec {
    /// The pods of each node.
    pub nodes: Vec<Vec<PodSpec>>,
    /// Give pods IPv6 addresses too (and routes between the nodes' IPv6 ranges).
    pub ipv6: bool,
}

/// The namespace that joins the nodes; deleted on drop.
struct Fabric(String);

impl Drop for Fabric {
    fn drop(&mut self) {
        if let Err(e) = netns::delete(&self.0) {
            eprintln!("multinode: deleting netns {}: {e:#}", self.0);
        }
    }
}

static FABRICS: AtomicU64 = AtomicU64::new(0);

pub struct Cluster {
    // Dropped in this order: the agents, the API server, the nodes, the fabric.
    agents: Vec<Option<ClusterAgent>>,
    pub api: FakeApi,
    nodes: Vec<Node>,
    _fabric: Fabric,
    ipv6: bool,
    kubeconfig: Option<PathBuf>,
    /// Extra arguments for every agent's `palisade run` (`{dir}`: the agent's work directory).
    pub agent_args: Vec<String>,
}

impl Cluster {
    /// Creates the nodes and the fabric, starts the API server and publishes the Node objects
    /// (no agent runs yet: see [`Cluster::start_agents`]).
    pub fn new(spec: ClusterSpec) -> Result<Cluster> {
        if spec.nodes.is_empty() || spec.nodes.len() > MAX_NODES {
            bail!("a cluster has 1 to {MAX_NODES} nodes");
        }
        remove_stale_namespaces();
        let fabric_name = format!(
            "pal-{}-f{}-fabric",
            std::process::id(),
            FABRICS.fetch_add(1, Ordering::SeqCst)
        );
        netns::create(
            &fabric_name,
            &[
                ("net/ipv6/conf/all/accept_dad", "0"),
                ("net/ipv6/conf/default/accept_dad", "0"),
                ("net/ipv6/conf/all/accept_ra", "0"),
                ("net/ipv6/conf/default/accept_ra", "0"),
            ],
        )?;
        let fabric = Fabric(fabric_name.clone());
        netns::ip_batch(
            Some(&fabric_name),
            &[
                "link set lo up".into(),
                "link add br0 type bridge".into(),
                "link set br0 up".into(),
                format!("addr add {API_IP}/24 dev br0"),
            ],
        )
        .context("the fabric's bridge")?;
        let n = spec.nodes.len();
        let nodes: Vec<Node> = std::thread::scope(|s| {
            let handles: Vec<_> = spec
                .nodes
                .iter()
                .enumerate()
                .map(|(k, pods)| {
                    let node_spec = NodeSpec {
                        pods: pods.clone(),
                        ipv6: spec.ipv6,
                    };
                    s.spawn(move || Node::new_member(node_spec, k as u8, node_ips(k)))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))
                })
                .collect::<Result<Vec<Node>>>()
        })?;
        for (k, node) in nodes.iter().enumerate() {
            let (v4, v6) = node_ips(k);
            let mut cmds = vec![
                format!("link add up0 type veth peer name n{k} netns {fabric_name}"),
                "link set up0 up".to_string(),
                format!("addr add {v4}/24 dev up0"),
                format!("addr add {v6}/64 dev up0 nodad"),
            ];
            for j in (0..n).filter(|j| *j != k) {
                let (via4, via6) = node_ips(j);
                cmds.push(format!("route add 10.244.{j}.0/24 via {via4} dev up0"));
                if spec.ipv6 {
                    cmds.push(format!("route add fd00:244:0:{j}::/64 via {via6} dev up0"));
                }
            }
            netns::ip_batch(Some(&node.netns_name), &cmds)
                .with_context(|| format!("the uplink of {}", node_name(k)))?;
            netns::ip_batch(
                Some(&fabric_name),
                &[
                    format!("link set n{k} master br0"),
                    format!("link set n{k} up"),
                ],
            )
            .with_context(|| format!("the fabric port of {}", node_name(k)))?;
        }
        let api = FakeApi::start_in(&fabric_name, SocketAddr::new(API_IP.into(), 0))
            .context("the API server")?;
        let cluster = Cluster {
            agents: Vec::new(),
            api,
            nodes,
            _fabric: fabric,
            ipv6: spec.ipv6,
            kubeconfig: None,
            agent_args: Vec::new(),
        };
        for k in 0..n {
            cluster.api.apply(&cluster.node_object(k).to_string());
        }
        Ok(cluster)
    }

    /// Node `k` as the API reports it: its name, hostname label and InternalIP(s).
    pub fn node_object(&self, k: usize) -> serde_json::Value {
        let (v4, v6) = node_ips(k);
        let mut addresses = vec![json!({"type": "InternalIP", "address": v4.to_string()})];
        if self.ipv6 {
            addresses.push(json!({"type": "InternalIP", "address": v6.to_string()}));
        }
        addresses.push(json!({"type": "Hostname", "address": node_name(k)}));
        json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": node_name(k), "labels": {
                "kubernetes.io/hostname": node_name(k), "kubernetes.io/os": "linux"}},
            "status": {"addresses": addresses},
        })
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    pub fn ipv6(&self) -> bool {
        self.ipv6
    }

    /// The namespace of the fabric (its bridge `br0` joins the nodes' uplinks).
    pub fn fabric(&self) -> &str {
        &self._fabric.0
    }

    /// The node a pod (by its rig name) is on, and the pod.
    pub fn find_pod(&self, name: &str) -> Option<(usize, &Pod)> {
        self.nodes
            .iter()
            .enumerate()
            .find_map(|(k, n)| n.pod(name).map(|p| (k, p)))
    }

    /// Starts the agent of every node (`--node-name node-<k+1>`, its own bpffs, status file
    /// and log under `work/node-<k+1>/`) and waits until each has reconciled its node's pods
    /// (the pods must be in the API by then).
    pub fn start_agents(&mut self, agent: &Path, work: &Path, timeout: Duration) -> Result<()> {
        let kubeconfig = work.join("kubeconfig");
        self.api.kubeconfig(&kubeconfig)?;
        let since = SystemTime::now();
        self.agents.clear();
        for (k, node) in self.nodes.iter().enumerate() {
            let dir = work.join(node_name(k));
            std::fs::create_dir_all(&dir)?;
            let extra: Vec<String> = self
                .agent_args
                .iter()
                .map(|a| a.replace("{dir}", &dir.display().to_string()))
                .collect();
            let a = ClusterAgent::start_with(node, &node_name(k), agent, &kubeconfig, &dir, &extra)
                .with_context(|| format!("the agent of {}", node_name(k)))?;
            self.agents.push(Some(a));
        }
        self.kubeconfig = Some(kubeconfig);
        for k in 0..self.nodes.len() {
            self.wait_agent(k, since, timeout)?;
        }
        Ok(())
    }

    /// Node `k`'s agent (None while it is killed).
    pub fn agent(&self, k: usize) -> Option<&ClusterAgent> {
        self.agents.get(k).and_then(|a| a.as_ref())
    }

    pub fn agent_mut(&mut self, k: usize) -> Option<&mut ClusterAgent> {
        self.agents.get_mut(k).and_then(|a| a.as_mut())
    }

    /// SIGKILL to node `k`'s agent (its pins stay and keep enforcing).
    pub fn kill_agent(&mut self, k: usize) {
        if let Some(a) = self.agent_mut(k) {
            a.kill();
        }
    }

    /// Starts node `k`'s agent again (it adopts its pins).
    pub fn restart_agent(&mut self, k: usize, agent: &Path) -> Result<()> {
        let node = &self.nodes[k];
        let a = self
            .agents
            .get_mut(k)
            .and_then(|a| a.as_mut())
            .context("no such agent")?;
        a.spawn(node, agent)
    }

    /// Waits for a reconcile of node `k`'s agent that started after `since` and enforces
    /// every pod of the node.
    pub fn wait_agent(&mut self, k: usize, since: SystemTime, timeout: Duration) -> Result<()> {
        let want = self.nodes[k].pods().len();
        let a = self.agent_mut(k).context("no such agent")?;
        a.wait(since, timeout, |s| s.endpoints == want)
            .with_context(|| format!("the agent of {}", node_name(k)))?;
        Ok(())
    }

    /// Waits until the API server has sent every agent's watches the history up to its
    /// current resource version, then for a reconcile of every agent started after that (see
    /// [`FakeApi::wait_delivered`]).
    pub fn wait_reconciled(&mut self, timeout: Duration) -> Result<()> {
        let all: Vec<usize> = (0..self.nodes.len()).collect();
        self.wait_reconciled_on(&all, timeout)
    }

    /// As [`Cluster::wait_reconciled`], for the agents of nodes `which` only (the others may
    /// be down).
    pub fn wait_reconciled_on(&mut self, which: &[usize], timeout: Duration) -> Result<()> {
        let rv = self.api.resource_version();
        let peers: Vec<IpAddr> = which.iter().map(|k| IpAddr::V4(node_ips(*k).0)).collect();
        let delivered = self.api.wait_delivered(&peers, rv, timeout)?;
        for (k, since) in which.iter().zip(delivered) {
            self.wait_agent(*k, since, timeout)?;
        }
        Ok(())
    }

    /// The kubeconfig the agents use (once they are started): the API server's.
    pub fn kubeconfig(&self) -> Option<&Path> {
        self.kubeconfig.as_deref()
    }

    /// A command run on the fabric, where the API server listens (an operator's machine: it
    /// reaches the API server and no node's agent).
    pub fn operator_command(&self, program: impl AsRef<std::ffi::OsStr>) -> std::process::Command {
        netns::command_in(&self._fabric.0, program)
    }

    /// Node `k`'s agent pod as the DaemonSet in `manifests/` makes it: namespace
    /// `palisade-system`, the DaemonSet's labels, host network, running and ready.
    pub fn agent_pod_object(&self, k: usize) -> serde_json::Value {
        let ip = node_ips(k).0.to_string();
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {
                "name": agent_pod_name(k), "namespace": "palisade-system",
                "generateName": "palisade-",
                "creationTimestamp": "2026-12-06T10:00:00Z",
                "labels": {"app.kubernetes.io/name": "palisade",
                    "app.kubernetes.io/component": "agent", "pod-template-generation": "1"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet",
                    "name": "palisade", "uid": "uid-daemonset-palisade", "controller": true}],
            },
            "spec": {"nodeName": node_name(k), "hostNetwork": true,
                "serviceAccountName": "palisade",
                "containers": [{"name": "agent", "image": "ghcr.io/palisade-dev/palisade:0.1.0",
                    "command": ["palisade"], "args": ["run"]}]},
            "status": {"phase": "Running", "hostIP": ip, "podIP": ip, "podIPs": [{"ip": ip}],
                "containerStatuses": [{"name": "agent", "ready": true, "restartCount": 0,
                    "image": "ghcr.io/palisade-dev/palisade:0.1.0", "imageID": "",
                    "started": true, "state": {"running": {"startedAt": "2026-12-06T10:00:05Z"}}}]},
        })
    }

    /// Publishes every node's agent pod ([`Cluster::agent_pod_object`]) and serves its
    /// `exec`: `palisade ARGS` runs `agent ARGS` in the node's network namespace with
    /// `PALISADE_SOCKET` set to that node's agent socket (the agent's container has its socket
    /// at the default path); another program runs as named. Call after `start_agents`.
    pub fn serve_agent_pods(&self, agent: &Path) -> Result<()> {
        for (k, node) in self.nodes.iter().enumerate() {
            let socket = self
                .agent(k)
                .with_context(|| format!("no agent on {}", node_name(k)))?
                .socket()
                .to_path_buf();
            self.api.apply(&self.agent_pod_object(k).to_string());
            let (netns_name, agent) = (node.netns_name.clone(), agent.to_path_buf());
            self.api.serve_exec(
                "palisade-system",
                &agent_pod_name(k),
                std::sync::Arc::new(move |argv: &[String]| {
                    let program = match argv[0].as_str() {
                        "palisade" => agent.clone(),
                        other => PathBuf::from(other),
                    };
                    let mut cmd = netns::command_in(&netns_name, program);
                    cmd.args(&argv[1..])
                        .env("PALISADE_SOCKET", &socket)
                        .env_remove("KUBECONFIG");
                    cmd
                }),
            );
        }
        Ok(())
    }

    /// Every agent's log, each headed by its node's name.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (k, a) in self.agents.iter().enumerate() {
            if let Some(a) = a {
                out.push_str(&format!("== {} ({})\n", node_name(k), a.log.display()));
            }
        }
        out
    }
}
