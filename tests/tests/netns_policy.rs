//! Real traffic between netns pods through the TCX-attached programs, driven by the standalone
//! agent and ordinary NetworkPolicy YAML. Needs root; under CI=true that is a failure, not a
//! skip.
mod support;

use std::time::{Duration, SystemTime};

use palisade_tests::rig::{Proto, require_root};
use support::Setup;

/// Pods a, b, c (see `support`) with `policies` in `policies.yaml`.
fn setup(tag: &str, ipv6: bool, policies: &str) -> Setup {
    Setup::start(tag, ipv6, &[("policies.yaml", policies)], &[])
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
    let s = setup(
        if ipv6 { "ingress6" } else { "ingress4" },
        ipv6,
        INGRESS_POLICY,
    );
    // b is isolated both ways: a gets in on 80 (TCP and UDP), and b's replies leave only
    // because conntrack knows the connection (b has no egress rule at all).
    assert!(s.can("a", "b", 80, Proto::Tcp), "a -> b TCP 80 allowed");
    assert!(
        s.can("a", "b", 80, Proto::Udp),
        "a -> b UDP 80 allowed (reply passes)"
    );
    assert!(!s.can("a", "b", 81, Proto::Tcp), "a -> b TCP 81 denied");
    assert!(!s.can("c", "b", 80, Proto::Tcp), "c -> b TCP denied");
    assert!(!s.can("c", "b", 80, Proto::Udp), "c -> b UDP denied");
    assert!(
        !s.can("b", "a", 80, Proto::Tcp),
        "b -> a denied: b has no egress rule"
    );
    assert!(s.can("c", "a", 80, Proto::Tcp), "a is not isolated");
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
    let s = setup("egress", false, EGRESS_POLICY);
    assert!(s.can("a", "b", 80, Proto::Tcp), "a -> b:80 allowed");
    assert!(!s.can("a", "b", 81, Proto::Tcp), "a -> b:81 denied");
    assert!(!s.can("a", "c", 80, Proto::Tcp), "a -> c denied");
    assert!(!s.can("a", "c", 80, Proto::Udp), "a -> c UDP denied");
    // a is isolated for egress only: c reaches a, and a's replies pass by conntrack.
    assert!(
        s.can("c", "a", 80, Proto::Tcp),
        "c -> a allowed, replies pass"
    );
    assert!(s.can("c", "a", 80, Proto::Udp), "c -> a UDP answer passes");
}

#[test]
fn policy_changes_apply_and_bad_input_keeps_last_good_state() {
    if !require_root() {
        return;
    }
    let mut s = setup("changes", false, INGRESS_POLICY);
    assert!(!s.can("c", "b", 80, Proto::Tcp));
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
        !s.can("c", "b", 80, Proto::Tcp),
        "still denied after bad YAML"
    );
    assert!(
        s.can("a", "b", 80, Proto::Tcp),
        "still allowed after bad YAML"
    );
    // Removing the policies lifts isolation.
    let since = SystemTime::now();
    std::fs::remove_file(manifests.join("policies.yaml")).unwrap();
    s.agent
        .wait_reconciled(since, 3, Duration::from_secs(10))
        .unwrap();
    assert!(s.can("c", "b", 80, Proto::Tcp), "no policy: allowed");
}
