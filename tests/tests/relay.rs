//! A2, the node as a relay: a pod's traffic to a node address that the node DNATs onward (a
//! hostPort through the portmap plugin's kind of DNAT, a NodePort through kube-proxy's, here
//! nftables rules in the node's namespace, with masquerade) is egress to where it leads, not
//! node traffic. Needs root and nft; under CI=true that is a failure, not a skip.
mod support;

use std::time::Duration;

use palisade_tests::rig::{NODE_IP_V4, Proto, require_root};
use support::{Setup, TIMEOUT, cluster_yaml, nft};

/// `a` may reach `c` on TCP 80 and nothing else.
const A_EGRESS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-egress, namespace: demo}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: c}}}]
      ports: [{port: 80, protocol: TCP}]
"#;

#[test]
fn dnat_through_the_node_is_egress_to_the_backend() {
    if !require_root() {
        return;
    }
    let mut s = Setup::new("relay", &[("policies.yaml", A_EGRESS)]);
    let (b, c) = (s.pod("b").ipv4, s.pod("c").ipv4);
    // b publishes 80 as hostPort 8080, c as 8081; a Service's NodePort 30080 leads to b.
    let pods: Vec<String> = cluster_yaml(&s.node, false)
        .split("---\n")
        .map(|doc| {
            let host_port = if doc.contains("metadata: {name: b,") {
                Some(8080)
            } else if doc.contains("metadata: {name: c,") {
                Some(8081)
            } else {
                None
            };
            match host_port {
                Some(h) => doc.replace(
                    "containerPort: 80}",
                    &format!("containerPort: 80, hostPort: {h}}}"),
                ),
                None => doc.to_string(),
            }
        })
        .collect();
    let service = "apiVersion: v1\nkind: Service\nmetadata: {name: web-b, namespace: demo}\n\
                   spec: {type: NodePort, clusterIP: 10.96.0.80, selector: {app: b}, ports: [{port: 80, nodePort: 30080, protocol: TCP}]}\n\
                   ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
                   metadata: {name: web-b-1, namespace: demo, labels: {kubernetes.io/service-name: web-b}}\n\
                   ports: [{port: 80, protocol: TCP}]\n";
    let slice = format!("endpoints: [{{addresses: ['{b}'], conditions: {{ready: true}}}}]\n");
    s.write("cluster.yaml", Some(&pods.join("---\n")));
    s.write("services.yaml", Some(&format!("{service}{slice}")));
    nft(
        &s.node,
        &format!(
            "table ip relay {{\n\
               chain pre {{ type nat hook prerouting priority -100;\n\
                 ip daddr {NODE_IP_V4} tcp dport 8080 dnat to {b}:80\n\
                 ip daddr {NODE_IP_V4} tcp dport 8081 dnat to {c}:80\n\
                 ip daddr {NODE_IP_V4} tcp dport 30080 dnat to {b}:80\n\
               }}\n\
               chain post {{ type nat hook postrouting priority 100;\n\
                 ip daddr {{ {b}, {c} }} tcp dport 80 masquerade\n\
               }}\n\
             }}\n"
        ),
    );
    let node: std::net::IpAddr = NODE_IP_V4.into();
    let a = s.pod("a");
    let can = |port: u16| s.node.probe(a, node, port, Proto::Tcp, TIMEOUT);
    assert!(!s.can("a", "b", 80, Proto::Tcp), "a -> b directly: denied");
    assert!(s.can("a", "c", 80, Proto::Tcp), "a -> c directly: allowed");
    assert!(
        !can(8080),
        "a -> node:8080 (b's hostPort) is a -> b: denied"
    );
    assert!(
        !can(30080),
        "a -> node:30080 (a NodePort to b) is a -> b: denied"
    );
    // The allowed relay works (retried: a loaded machine misses deadlines).
    let ok = (0..3).any(|_| {
        s.node
            .probe(a, node, 8081, Proto::Tcp, Duration::from_secs(3))
    });
    assert!(ok, "a -> node:8081 (c's hostPort) is a -> c: allowed");
    // b, not egress-isolated, reaches c's hostPort; plain node traffic stays open.
    let b_pod = s.pod("b");
    assert!(
        s.node
            .probe(b_pod, node, 8081, Proto::Tcp, Duration::from_secs(3))
    );
}
