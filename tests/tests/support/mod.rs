//! Shared by the bad-configuration, fault and security tests: a node of three pods (`a`, `b`,
//! `c` in namespace `demo`, labelled `app: <name>`, serving TCP 80 and 81) run by the standalone
//! agent from a manifest directory, and expectations checked with concurrent probes.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use palisade_tests::{
    agent::{AgentProcess, Status, agent_binary},
    rig::{Node, NodeSpec, Pod, PodSpec, ProbeSpec, Proto},
};

pub const TIMEOUT: Duration = Duration::from_millis(600);

pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "palisade-{tag}-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(p.join("manifests")).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn cluster_yaml(node: &Node) -> String {
    let mut s = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {kubernetes.io/metadata.name: demo}}\n",
    );
    for pod in node.pods() {
        let name = pod.name.trim_start_matches("demo-");
        let ip = pod.ip(false);
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

pub struct Setup {
    pub node: Node,
    pub agent: AgentProcess,
    pub work: TempDir,
}

impl Setup {
    /// The node, its servers, `cluster.yaml` and `files`, and the agent, reconciled.
    pub fn new(tag: &str, files: &[(&str, &str)]) -> Setup {
        let node = Node::new(NodeSpec {
            pods: ["demo-a", "demo-b", "demo-c"]
                .iter()
                .map(|n| PodSpec {
                    name: n.to_string(),
                })
                .collect(),
            ipv6: false,
        })
        .expect("rig");
        node.serve(&[(80, Proto::Tcp), (81, Proto::Tcp)])
            .expect("servers");
        let work = TempDir::new(tag);
        let manifests = work.path().join("manifests");
        std::fs::write(manifests.join("cluster.yaml"), cluster_yaml(&node)).unwrap();
        for (name, text) in files {
            std::fs::write(manifests.join(name), text).unwrap();
        }
        let since = SystemTime::now();
        let mut agent =
            AgentProcess::start(&node, &agent_binary(), &manifests, work.path()).expect("agent");
        agent
            .wait_reconciled(since, 3, Duration::from_secs(30))
            .expect("agent reconciles");
        Setup { node, agent, work }
    }

    pub fn manifests(&self) -> PathBuf {
        self.work.path().join("manifests")
    }

    pub fn pod(&self, name: &str) -> &Pod {
        self.node
            .pods()
            .iter()
            .find(|p| p.name == format!("demo-{name}"))
            .unwrap()
    }

    /// Writes (or with `None` removes) a manifest file and waits for the reconcile it causes.
    pub fn write(&mut self, name: &str, text: Option<&str>) -> Status {
        let since = SystemTime::now();
        let path = self.manifests().join(name);
        match text {
            Some(t) => std::fs::write(&path, t).unwrap(),
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
        let mut got = self.node.probe_many(&specs);
        // An allowed probe may miss its deadline on a loaded machine: ask again, slower.
        // (A denied probe that succeeds is never retried: that is a hole.)
        for _ in 0..2 {
            let retry: Vec<usize> = (0..expect.len())
                .filter(|i| expect[*i].3 && !got[*i])
                .collect();
            if retry.is_empty() {
                break;
            }
            let slow: Vec<ProbeSpec<'_>> = retry
                .iter()
                .map(|i| ProbeSpec {
                    timeout: Duration::from_secs(3),
                    ..specs[*i]
                })
                .collect();
            for (i, ok) in retry.iter().zip(self.node.probe_many(&slow)) {
                got[*i] = ok;
            }
        }
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
