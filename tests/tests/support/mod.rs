//! Shared by the netns tests: a node of pods `a`, `b`, `c`... (namespaces `demo-<name>`, in
//! namespace `demo` and labelled `app: <name>` in `cluster.yaml`, serving TCP 80 and 81 and
//! UDP 80) run by the standalone agent from a manifest directory, and expectations checked with
//! concurrent probes. `cluster` holds what the cluster-mode tests add.
#![allow(dead_code)]

pub mod cluster;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use palisade_tests::{
    agent::{AgentProcess, Status, WorkDir, agent_binary},
    rig::{Node, NodeSpec, Pod, PodSpec, ProbeSpec, Proto, probe_expecting},
};

pub const TIMEOUT: Duration = Duration::from_millis(600);

/// Polls `f` every 100 ms until it holds; fails the test, naming `what`, after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + timeout;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {timeout:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A node with pods `demo-<name>` for each of `names` (IPv6 too if `ipv6`), each serving TCP 80
/// and 81 and UDP 80.
pub fn demo_node(names: &[&str], ipv6: bool) -> Node {
    let node = Node::new(NodeSpec {
        pods: names
            .iter()
            .map(|n| PodSpec {
                name: format!("demo-{n}"),
            })
            .collect(),
        ipv6,
    })
    .expect("rig");
    node.serve(&[(80, Proto::Tcp), (80, Proto::Udp), (81, Proto::Tcp)])
        .expect("servers");
    node
}

/// Pod `demo-<name>` of `node`.
pub fn demo_pod<'n>(node: &'n Node, name: &str) -> &'n Pod {
    node.pod(&format!("demo-{name}")).expect("a pod of the rig")
}

/// Namespace `demo` and the node's pods in it (`app: <name>`, container port `web` = 80), with
/// their IPv6 addresses if `ipv6`, for the standalone agent.
pub fn cluster_yaml(node: &Node, ipv6: bool) -> String {
    let mut s = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {kubernetes.io/metadata.name: demo}}\n",
    );
    for pod in node.pods() {
        let name = pod.name.trim_start_matches("demo-");
        let ip = pod.ip(ipv6);
        s.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{app: {name}}}}}\n\
             spec: {{containers: [{{name: c, ports: [{{name: web, containerPort: 80}}]}}]}}\n\
             status: {{podIP: '{ip}', podIPs: [{{ip: '{ip}'}}]}}\n"
        ));
    }
    s
}

/// `b` and `c` isolated for ingress, each reachable from `a` on TCP 80 only; `a` open.
/// `c`'s policy is in a file of its own (`c.yaml`), for tests that change it.
pub const B_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-ingress, namespace: demo}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: a}}}]
      ports: [{port: 80, protocol: TCP}]
"#;

pub const C_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: c-ingress, namespace: demo}
spec:
  podSelector: {matchLabels: {app: c}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: a}}}]
      ports: [{port: 80, protocol: TCP}]
"#;

/// What `B_POLICY` and `C_POLICY` allow: (from, to, port, allowed).
pub const BASELINE: &[(&str, &str, u16, bool)] = &[
    ("a", "b", 80, true),
    ("a", "b", 81, false),
    ("c", "b", 80, false),
    ("a", "c", 80, true),
    ("b", "c", 80, false),
    ("b", "a", 80, true),
    ("c", "a", 81, true),
];

/// Loads `rules` into nftables in the node's namespace (kube-proxy-like DNAT); panics if nft
/// refuses them or is missing (`cargo xtask test` installs nftables).
pub fn nft(node: &Node, rules: &str) {
    use std::io::Write;
    let mut child = node
        .command("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft (cargo xtask test installs nftables)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft -f: {rules}");
}

pub struct Setup {
    pub node: Node,
    pub agent: AgentProcess,
    pub work: WorkDir,
}

impl Setup {
    /// `palisade <args> -o json` against this agent.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        self.agent
            .cli_json(args)
            .unwrap_or_else(|e| panic!("{e:#}; agent log: {}", self.agent.log_path().display()))
    }

    /// `GET /metrics` from the agent's default admin address, in the node's namespace.
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        self.node
            .in_netns(|| -> std::io::Result<String> {
                let mut s = std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::from(([127, 0, 0, 1], palisade::admin::DEFAULT_PORT)),
                    Duration::from_secs(2),
                )?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
                let mut out = String::new();
                s.read_to_string(&mut out)?;
                Ok(out)
            })
            .expect("node netns")
            .expect("metrics endpoint answers")
    }

    /// The node (pods a, b, c; IPv4), `cluster.yaml` and `files` in the manifest directory, and
    /// the agent, reconciled.
    pub fn new(tag: &str, files: &[(&str, &str)]) -> Setup {
        Setup::start(tag, false, files, &[])
    }

    /// As `new`, with IPv6 if `ipv6` (`cluster.yaml` then gives the pods their IPv6
    /// addresses, and `can` probes those) and extra `palisade run` arguments.
    pub fn start(tag: &str, ipv6: bool, files: &[(&str, &str)], agent_args: &[&str]) -> Setup {
        let node = demo_node(&["a", "b", "c"], ipv6);
        let work = WorkDir::new(tag);
        let manifests = work.manifests();
        std::fs::write(manifests.join("cluster.yaml"), cluster_yaml(&node, ipv6)).unwrap();
        for (name, text) in files {
            std::fs::write(manifests.join(name), text).unwrap();
        }
        let since = SystemTime::now();
        let mut agent =
            AgentProcess::start_with(&node, &agent_binary(), &manifests, work.path(), agent_args)
                .expect("agent");
        agent
            .wait_reconciled(since, 3, Duration::from_secs(30))
            .expect("agent reconciles");
        Setup { node, agent, work }
    }

    pub fn manifests(&self) -> PathBuf {
        self.work.manifests()
    }

    pub fn pod(&self, name: &str) -> &Pod {
        demo_pod(&self.node, name)
    }

    /// One probe `from -> to:port`, over IPv6 if the node has it.
    pub fn can(&self, from: &str, to: &str, port: u16, proto: Proto) -> bool {
        let to = self.pod(to).ip(self.node.ipv6());
        self.node.probe(self.pod(from), to, port, proto, TIMEOUT)
    }

    /// Writes (atomically: a temporary file renamed over it) or with `None` removes a manifest
    /// file, and waits for the reconcile it causes.
    pub fn write(&mut self, name: &str, text: Option<&str>) -> Status {
        let since = SystemTime::now();
        let path = self.manifests().join(name);
        match text {
            Some(t) => {
                let tmp = self.manifests().join(format!(".{name}.tmp"));
                std::fs::write(&tmp, t).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
            }
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
        self.agent
            .wait_reconciled(since, 3, Duration::from_secs(60))
            .expect("agent reconciles")
    }

    /// Probes every expectation at once; the ones that did not hold.
    pub fn mismatches(&self, expect: &[(&str, &str, u16, bool)]) -> Vec<String> {
        let specs: Vec<ProbeSpec<'_>> = expect
            .iter()
            .map(|(from, to, port, _)| ProbeSpec {
                from: self.pod(from),
                to: self.pod(to).ip(false),
                port: *port,
                proto: Proto::Tcp,
                timeout: TIMEOUT,
            })
            .collect();
        let want: Vec<bool> = expect.iter().map(|e| e.3).collect();
        let got = probe_expecting(&specs, &want);
        expect
            .iter()
            .zip(got)
            .filter(|((_, _, _, want), got)| want != got)
            .map(|((from, to, port, want), got)| {
                format!("{from} -> {to}:{port}: expected {want}, got {got}")
            })
            .collect()
    }

    /// Asserts `expect` (probes), naming `what` on failure.
    pub fn check(&self, what: &str, expect: &[(&str, &str, u16, bool)]) {
        let bad = self.mismatches(expect);
        assert!(
            bad.is_empty(),
            "{what}: {bad:?}\nagent log: {}",
            self.agent.log_path().display()
        );
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.agent.log_path()).unwrap_or_default()
    }
}
