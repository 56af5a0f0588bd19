//! A synthetic cluster for the churn and memory figures: 100 namespaces of 100 pods (10 000
//! pods, 100 of them on this node: one per namespace, on the rig's veths) and 10 policies per
//! namespace (1 000 policies):
//!
//! * `default-deny` (every pod, ingress);
//! * `allow-app-0` .. `allow-app-6`: pods `app=app-k` accept `app=app-(k+1)` of their namespace
//!   on 8080, and `tier=api` pods of the namespaces of their team on the named port `http`;
//! * `egress-web`: `tier=web` pods may reach `tier=api` pods of every `env=prod` namespace on
//!   8080, `tier=db` pods of their team on 5432, and the internet (0.0.0.0/0 except the
//!   private ranges) on 443;
//! * `allow-partners`: `app=app-9` pods accept 16 partner CIDRs on 443.
//!
//! Pods are labelled `app=app-(j % 10)`, `tier=[web, api, db][j % 3]` (30 identities per
//! namespace, 3 000 in all) and name their port 8080 `http`.
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use palisade_tests::rig::pod_ipv4;

pub const NAMESPACES: usize = 100;
pub const PODS_PER_NAMESPACE: usize = 100;
pub const NODE_NAME: &str = "bench-node";
pub const TIERS: [&str; 3] = ["web", "api", "db"];

pub fn ns_name(i: usize) -> String {
    format!("ns-{i:03}")
}

/// The pod of namespace `i` that runs on this node (its app is `app-(i % 7)`, so an
/// `allow-app-*` policy selects it).
pub fn local_pod(i: usize) -> usize {
    10 * (i % 10) + (i % 7)
}

pub fn app_of(j: usize) -> usize {
    j % 10
}

pub fn tier_of(j: usize) -> &'static str {
    TIERS[j % 3]
}

/// The address of pod `j` of namespace `i`: the rig's address for the local pod.
pub fn pod_ip(i: usize, j: usize) -> Ipv4Addr {
    if j == local_pod(i) {
        pod_ipv4(i)
    } else {
        Ipv4Addr::from(
            u32::from(Ipv4Addr::new(10, 128, 0, 0)) + (i * PODS_PER_NAMESPACE + j) as u32,
        )
    }
}

pub fn namespace_yaml(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n  labels: {{team: t-{}, env: {}}}\n",
        ns_name(i),
        i % 10,
        if i.is_multiple_of(2) {
            "prod"
        } else {
            "staging"
        }
    )
}

pub fn pod_yaml(i: usize, name: &str, app: &str, tier: &str, ip: Ipv4Addr, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  \
         labels: {{app: {app}, tier: {tier}}}\nspec:\n  nodeName: {node}\n  containers:\n  \
         - name: main\n    image: registry.example/app:1\n    ports: [{{name: http, containerPort: 8080}}, {{name: metrics, containerPort: 9090}}]\n\
         status:\n  phase: Running\n  podIP: {ip}\n  podIPs: [{{ip: {ip}}}]\n",
        ns = ns_name(i)
    )
}

pub fn pod_of(i: usize, j: usize) -> String {
    let node = if j == local_pod(i) {
        NODE_NAME.to_string()
    } else {
        format!("node-{}", (i * PODS_PER_NAMESPACE + j) % 100)
    };
    pod_yaml(
        i,
        &format!("pod-{j:03}"),
        &format!("app-{}", app_of(j)),
        tier_of(j),
        pod_ip(i, j),
        &node,
    )
}

fn policy_head(i: usize, name: &str, selector: &str, types: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  namespace: {}\n\
         spec:\n  podSelector: {selector}\n  policyTypes: [{types}]\n",
        ns_name(i)
    )
}

/// `allow-app-k` with its first rule on `port` (8080 normally; churn toggles it).
pub fn allow_app_yaml(i: usize, k: usize, port: u16) -> String {
    let mut y = policy_head(
        i,
        &format!("allow-app-{k}"),
        &format!("{{matchLabels: {{app: app-{k}}}}}"),
        "Ingress",
    );
    let _ = write!(
        y,
        "  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: app-{}}}}}}}]\n    ports: [{{port: {port}}}]\n  \
         - from: [{{namespaceSelector: {{matchLabels: {{team: t-{}}}}}, podSelector: {{matchLabels: {{tier: api}}}}}}]\n    \
         ports: [{{port: http}}]\n",
        (k + 1) % 10,
        i % 10
    );
    y
}

pub fn partner_cidr(i: usize, c: usize) -> String {
    format!("{}.{}.{}.0/24", 20 + c, i % 250, (i * 7 + c) % 250)
}

pub fn policies_yaml(i: usize) -> Vec<String> {
    let mut out = vec![policy_head(i, "default-deny", "{}", "Ingress")];
    for k in 0..7 {
        out.push(allow_app_yaml(i, k, 8080));
    }
    let mut y = policy_head(i, "egress-web", "{matchLabels: {tier: web}}", "Egress");
    let _ = write!(
        y,
        "  egress:\n  - to: [{{namespaceSelector: {{matchLabels: {{env: prod}}}}, podSelector: {{matchLabels: {{tier: api}}}}}}]\n    \
         ports: [{{port: 8080}}]\n  \
         - to: [{{namespaceSelector: {{matchLabels: {{team: t-{}}}}}, podSelector: {{matchLabels: {{tier: db}}}}}}]\n    \
         ports: [{{port: 5432}}]\n  \
         - to: [{{ipBlock: {{cidr: 0.0.0.0/0, except: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]}}}}]\n    \
         ports: [{{port: 443}}]\n",
        i % 10
    );
    out.push(y);
    let mut y = policy_head(
        i,
        "allow-partners",
        "{matchLabels: {app: app-9}}",
        "Ingress",
    );
    y.push_str("  ingress:\n  - from:\n");
    for c in 0..16 {
        let _ = writeln!(y, "    - ipBlock: {{cidr: {}}}", partner_cidr(i, c));
    }
    y.push_str("    ports: [{port: 443}]\n");
    out.push(y);
    out
}

/// Every document of namespace `i`: the namespace, its pods, its policies.
pub fn namespace_docs(i: usize) -> Vec<String> {
    let mut docs = vec![namespace_yaml(i)];
    docs.extend((0..PODS_PER_NAMESPACE).map(|j| pod_of(i, j)));
    docs.extend(policies_yaml(i));
    docs
}

pub fn join_docs(docs: &[String]) -> String {
    docs.join("---\n")
}
