//! Real traffic between netns pods through the TCX-attached programs, driven by the standalone
//! agent and ordinary NetworkPolicy YAML. Needs root; under CI=true that is a failure, not a
//! skip.
use std::time::{Duration, SystemTime};

use palisade_tests::{
    agent::{AgentProcess, agent_binary},
    rig::{Node, NodeSpec, Pod, PodSpec, Proto, require_root},
};

const TIMEOUT: Duration = Duration::from_millis(600);

/// Pods a, b, c in namespace `demo`, labelled `app: <name>`, serving TCP and UDP 80 and 81.
struct Setup {
    node: Node,
    agent: AgentProcess,
    work: tempdir::Dir,
}

mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);
    impl Dir {
        pub fn new(tag: &str) -> Dir {
            let p = std::env::temp_dir().join(format!(
                "palisade-netns-{tag}-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos()
            ));
            std::fs::create_dir_all(p.join("manifests")).unwrap();
            Dir(p)
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn cluster_yaml(node: &Node, ipv6: bool) -> String {
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

impl Setup {
    fn new(tag: &str, ipv6: bool, policies: &str) -> Setup {
        let node = Node::new(NodeSpec {
            pods: ["demo-a", "demo-b", "demo-c"]
                .iter()
                .map(|n| PodSpec {
                    name: n.to_string(),
                })
                .collect(),
            ipv6,
        })
        .expect("rig");
        node.serve(&[(80, Proto::Tcp), (80, Proto::Udp), (81, Proto::Tcp)])
            .expect("servers");
        let work = tempdir::Dir::new(tag);
        let manifests = work.path().join("manifests");
        std::fs::write(manifests.join("cluster.yaml"), cluster_yaml(&node, ipv6)).unwrap();
        std::fs::write(manifests.join("policies.yaml"), policies).unwrap();
        let since = SystemTime::now();
        let mut agent =
            AgentProcess::start(&node, &agent_binary(), &manifests, work.path()).expect("agent");
        agent
            .wait_reconciled(since, 3, Duration::from_secs(20))
            .expect("agent reconciles");
        Setup { node, agent, work }
    }

    fn pod(&self, name: &str) -> &Pod {
        self.node
            .pods()
            .iter()
            .find(|p| p.name == format!("demo-{name}"))
            .unwrap()
    }

    fn can(&self, from: &str, to: &str, port: u16, proto: Proto, ipv6: bool) -> bool {
        self.node
            .probe(self.pod(from), self.pod(to).ip(ipv6), port, proto, TIMEOUT)
    }

    fn manifests(&self) -> std::path::PathBuf {
        self.work.path().join("manifests")
    }
}

const INGRESS_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: demo}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress, Egress]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: demo}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: a}}}]
      ports: [{port: 80, protocol: TCP}, {port: 80, protocol: UDP}]
"#;

fn ingress_case(ipv6: bool) {
    if !require_root() {
        return;
    }
    let s = Setup::new(
        if ipv6 { "ingress6" } else { "ingress4" },
        ipv6,
        INGRESS_POLICY,
    );
    // b is isolated both ways: a gets in on 80 (TCP and UDP), and b's replies leave only
    // because conntrack knows the connection (b has no egress rule at all).
    assert!(
        s.can("a", "b", 80, Proto::Tcp, ipv6),
        "a -> b TCP 80 allowed"
    );
    assert!(
        s.can("a", "b", 80, Proto::Udp, ipv6),
        "a -> b UDP 80 allowed (reply passes)"
    );
    assert!(
        !s.can("a", "b", 81, Proto::Tcp, ipv6),
        "a -> b TCP 81 denied"
    );
    assert!(!s.can("c", "b", 80, Proto::Tcp, ipv6), "c -> b TCP denied");
    assert!(!s.can("c", "b", 80, Proto::Udp, ipv6), "c -> b UDP denied");
    assert!(
        !s.can("b", "a", 80, Proto::Tcp, ipv6),
        "b -> a denied: b has no egress rule"
    );
    assert!(s.can("c", "a", 80, Proto::Tcp, ipv6), "a is not isolated");
}

#[test]
fn default_deny_ingress_with_one_allowed_peer_ipv4() {
    ingress_case(false);
}

#[test]
fn default_deny_ingress_with_one_allowed_peer_ipv6() {
    ingress_case(true);
}

const EGRESS_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-egress-to-b, namespace: demo}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: b}}}]
      ports: [{port: 80}]
"#;

#[test]
fn egress_allow_list_and_replies() {
    if !require_root() {
        return;
    }
    let s = Setup::new("egress", false, EGRESS_POLICY);
    assert!(s.can("a", "b", 80, Proto::Tcp, false), "a -> b:80 allowed");
    assert!(!s.can("a", "b", 81, Proto::Tcp, false), "a -> b:81 denied");
    assert!(!s.can("a", "c", 80, Proto::Tcp, false), "a -> c denied");
    assert!(!s.can("a", "c", 80, Proto::Udp, false), "a -> c UDP denied");
    // a is isolated for egress only: c reaches a, and a's replies pass by conntrack.
    assert!(
        s.can("c", "a", 80, Proto::Tcp, false),
        "c -> a allowed, replies pass"
    );
    assert!(
        s.can("c", "a", 80, Proto::Udp, false),
        "c -> a UDP answer passes"
    );
}

#[test]
fn policy_changes_apply_and_bad_input_keeps_last_good_state() {
    if !require_root() {
        return;
    }
    let mut s = Setup::new("changes", false, INGRESS_POLICY);
    assert!(!s.can("c", "b", 80, Proto::Tcp, false));
    // A broken file: the agent reports it and keeps enforcing what it had.
    let manifests = s.manifests();
    let since = SystemTime::now();
    std::fs::write(manifests.join("policies.yaml"), "apiVersion: [unclosed").unwrap();
    let status = s
        .agent
        .wait_reconciled(since, 3, Duration::from_secs(10))
        .unwrap();
    assert!(
        status.errors.iter().any(|e| e.contains("policies.yaml")),
        "error names the file: {:?}",
        status.errors
    );
    assert!(
        !s.can("c", "b", 80, Proto::Tcp, false),
        "still denied after bad YAML"
    );
    assert!(
        s.can("a", "b", 80, Proto::Tcp, false),
        "still allowed after bad YAML"
    );
    // Removing the policies lifts isolation.
    let since = SystemTime::now();
    std::fs::write(manifests.join("policies.yaml"), "").unwrap();
    s.agent
        .wait_reconciled(since, 3, Duration::from_secs(10))
        .unwrap();
    assert!(s.can("c", "b", 80, Proto::Tcp, false), "no policy: allowed");
}
