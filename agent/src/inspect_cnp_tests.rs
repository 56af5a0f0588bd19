//! `explain`, `policy show`, verdicts and stats naming ClusterNetworkPolicies: an Admin Deny,
//! an Admin Pass into NetworkPolicy, a Baseline Deny, from a store compiled as the agent does.
use std::path::Path;

use palisade_common::{
    AF_INET, DIR_EGRESS, DIR_INGRESS, Event, PROTO_TCP, PeerAddr, Reason, VERDICT_DROP,
};
use palisade_policy::{
    cnp::{Action, Tier},
    compile::{Compiler, LocalEndpoint},
    manifest::parse_str,
    model::Store,
    state::{Direction, PodRef},
};

use crate::inspect::{
    Explanation, PeerView, Query, RuleInfo, RuleRow, Snapshot, StateFile, Step, Target, VerdictKind,
};
use crate::verdicts::Names;

const MANIFESTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {kubernetes.io/metadata.name: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: vault, labels: {kubernetes.io/metadata.name: vault}}
---
apiVersion: v1
kind: Namespace
metadata: {name: free, labels: {kubernetes.io/metadata.name: free}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: secrets, namespace: vault, labels: {app: secrets}}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: app, namespace: free, labels: {app: app}}
spec: {containers: [{name: c, image: x}]}
status: {podIP: 10.0.0.4}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: web}}}]
      ports: [{port: 5432}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: no-vault}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {}}
  egress:
    - name: keep-out
      action: Deny
      to: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: vault}}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: shop-decides}
spec:
  tier: Admin
  priority: 20
  subject: {namespaces: {matchLabels: {kubernetes.io/metadata.name: shop}}}
  ingress:
    - name: to-netpol
      action: Pass
      from: [{namespaces: {}}]
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: default-deny}
spec:
  tier: Baseline
  priority: 100
  subject: {namespaces: {}}
  ingress:
    - name: deny-all
      action: Deny
      from: [{namespaces: {}}]
"#;

fn snapshot() -> Snapshot {
    let store = Store::from_objects(parse_str(MANIFESTS).expect("manifests parse"));
    assert!(store.errors().is_empty(), "{:?}", store.errors());
    let endpoints: Vec<LocalEndpoint> = [("shop", "web"), ("shop", "db"), ("vault", "secrets")]
        .into_iter()
        .chain([("free", "app")])
        .enumerate()
        .map(|(i, (ns, name))| LocalEndpoint {
            pod: PodRef {
                namespace: ns.into(),
                name: name.into(),
            },
            ifindex: 11 + i as u32,
        })
        .collect();
    let state = Compiler::default().compile(&store, &endpoints, &[]);
    let file = StateFile::build(&state, &store, &[], Path::new("/sys/fs/bpf/test"), false);
    Snapshot::from_parts(state, file)
}

fn explain(s: &Snapshot, from: &str, to: &str, port: u16) -> Explanation {
    s.explain(&Query {
        from: Target::Pod(from.into()),
        to: Target::Pod(to.into()),
        proto: PROTO_TCP,
        port,
        ipv6: false,
    })
    .unwrap()
}

fn step(e: &Explanation, dir: Direction) -> &Step {
    e.steps.iter().find(|s| s.direction == dir).unwrap()
}

fn tier_rule(r: &Option<RuleInfo>) -> (&str, Tier, u16, Action) {
    let r = r.as_ref().expect("a rule");
    let t = r.tier.as_ref().expect("a ClusterNetworkPolicy rule");
    (r.policy.as_str(), t.tier, t.priority, t.action)
}

#[test]
fn explain_names_an_admin_deny() {
    let s = snapshot();
    let e = explain(&s, "shop/web", "vault/secrets", 8200);
    assert_eq!(e.verdict, VerdictKind::Dropped);
    let out = step(&e, Direction::Egress);
    assert_eq!(out.verdict, VerdictKind::Dropped);
    assert_eq!(out.reason, "tier-deny");
    assert_eq!(
        tier_rule(&out.rule),
        ("no-vault", Tier::Admin, 10, Action::Deny)
    );
    assert_eq!(out.rule, out.admin);
    assert_eq!(out.baseline, None);
    assert_eq!(out.cluster_policies, vec!["no-vault".to_string()]);
    assert!(
        out.summary.starts_with(
            "dropped by ClusterNetworkPolicy no-vault (Admin 10) egress[0] 'keep-out' Deny (Admin tier"
        ),
        "{}",
        out.summary
    );
}

#[test]
fn explain_follows_an_admin_pass_into_network_policy() {
    let s = snapshot();
    // Allowed by the NetworkPolicy after the Pass; the Baseline deny is never reached.
    let e = explain(&s, "shop/web", "shop/db", 5432);
    assert_eq!(e.verdict, VerdictKind::Allowed, "{e:#?}");
    let st = step(&e, Direction::Ingress);
    assert_eq!(st.reason, "policy-allow");
    assert_eq!(
        st.rule.as_ref().unwrap().to_string(),
        "shop/db-from-web ingress[0]"
    );
    assert_eq!(
        tier_rule(&st.admin),
        ("shop-decides", Tier::Admin, 20, Action::Pass)
    );
    assert_eq!(
        st.baseline, None,
        "NetworkPolicy decides: Baseline is not consulted"
    );
    assert_eq!(
        st.summary,
        "allowed by shop/db-from-web ingress[0] (after ClusterNetworkPolicy shop-decides \
         (Admin 20) ingress[0] 'to-netpol' Pass: evaluation went on to the NetworkPolicies)"
    );
    // Another port: the NetworkPolicy denies, still after the Pass.
    let e = explain(&s, "shop/web", "shop/db", 80);
    let st = step(&e, Direction::Ingress);
    assert_eq!(
        (st.verdict, st.reason.as_str()),
        (VerdictKind::Dropped, "no-rule-matched")
    );
    assert!(
        st.summary
            .contains("isolated for ingress by shop/db-from-web")
            && st
                .summary
                .contains("'to-netpol' Pass: evaluation went on to the NetworkPolicies"),
        "{}",
        st.summary
    );
    assert!(
        st.hints
            .iter()
            .any(|h| h.contains("db-from-web") && h.contains("5432")),
        "{:?}",
        st.hints
    );
    // shop/web itself: Pass, no NetworkPolicy isolates it, so the Baseline deny decides.
    let e = explain(&s, "shop/db", "shop/web", 80);
    let st = step(&e, Direction::Ingress);
    assert_eq!(st.reason, "tier-deny");
    assert_eq!(
        tier_rule(&st.rule),
        ("default-deny", Tier::Baseline, 100, Action::Deny)
    );
    assert!(
        st.summary.contains("after ClusterNetworkPolicy shop-decides (Admin 20) ingress[0] 'to-netpol' Pass: evaluation went on to the Baseline tier"),
        "{}",
        st.summary
    );
}

#[test]
fn explain_names_a_baseline_deny_and_the_default_allow() {
    let s = snapshot();
    let e = explain(&s, "shop/web", "free/app", 80);
    assert_eq!(e.verdict, VerdictKind::Dropped);
    // Egress of shop/web: no-vault selects it, nothing matches: the default allows.
    let out = step(&e, Direction::Egress);
    assert_eq!(out.verdict, VerdictKind::Allowed);
    assert_eq!(out.reason, "not-isolated");
    assert!(
        out.summary.starts_with("allowed by default: no Admin rule matched; no NetworkPolicy isolates shop/web for egress; no Baseline rule matched"),
        "{}",
        out.summary
    );
    let st = step(&e, Direction::Ingress);
    assert_eq!(
        (st.verdict, st.reason.as_str()),
        (VerdictKind::Dropped, "tier-deny")
    );
    assert_eq!(
        tier_rule(&st.rule),
        ("default-deny", Tier::Baseline, 100, Action::Deny)
    );
    assert_eq!(st.rule, st.baseline);
    assert_eq!(st.admin, None);
    assert_eq!(
        st.summary,
        "dropped by ClusterNetworkPolicy default-deny (Baseline 100) ingress[0] 'deny-all' Deny \
         (Baseline tier: no Admin rule matched; no NetworkPolicy isolates free/app for ingress)"
    );
}

fn rows_of<'a>(rows: &'a [RuleRow], policy: &str) -> Vec<&'a RuleRow> {
    rows.iter().filter(|r| r.rule.policy == policy).collect()
}

#[test]
fn policy_show_lists_cluster_policies_and_their_rules() {
    let s = snapshot();
    let p = s.policy_of("shop/db").unwrap();
    assert!(p.ingress.isolated && p.ingress.tiered);
    assert_eq!(
        p.ingress.cluster_policies,
        vec!["shop-decides".to_string(), "default-deny".to_string()]
    );
    // Admin first, then NetworkPolicy, then Baseline; no row for "no rule" (id 0).
    let order: Vec<String> = p.ingress.rules.iter().map(|r| r.rule.policy_id()).collect();
    let first = |id: &str| order.iter().position(|p| p == id).unwrap();
    assert!(
        first("shop-decides") < first("shop/db-from-web"),
        "{order:?}"
    );
    assert!(
        first("shop/db-from-web") < first("default-deny"),
        "{order:?}"
    );
    assert!(
        !order.iter().any(|p| p.contains("unknown-rule")),
        "{order:?}"
    );
    let pass = rows_of(&p.ingress.rules, "shop-decides");
    assert!(!pass.is_empty());
    assert!(
        pass.iter()
            .all(|r| r.rule.tier.as_ref().unwrap().action == Action::Pass)
    );
    assert!(
        pass.iter().any(|r| matches!(&r.peer, PeerView::Pods { pods, .. } if pods.contains(&"free/app".to_string()))),
        "{pass:?}"
    );
    assert_eq!(p.egress.cluster_policies, vec!["no-vault".to_string()]);
    assert!(p.egress.tiered && !p.egress.isolated);
    let deny = rows_of(&p.egress.rules, "no-vault");
    assert_eq!(deny.len(), 1, "{deny:?}");
    assert_eq!(deny[0].peer.text(), "pods vault/secrets");
    assert_eq!(deny[0].ports_text(), "any protocol and port");
    let text = crate::cli::policy_text(&p);
    assert!(
        text.contains("ClusterNetworkPolicies: shop-decides, default-deny"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l.contains("no-vault (Admin 10)")
            && l.contains("egress[0] 'keep-out'")
            && l.contains("Deny")
            && l.contains("pods vault/secrets")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("shop/db-from-web") && l.contains("allow")),
        "{text}"
    );
}

#[test]
fn verdicts_and_stats_name_cluster_policy_rules() {
    let s = snapshot();
    let (id, info) = s
        .file
        .rules
        .iter()
        .find(|(_, r)| r.policy == "no-vault")
        .map(|(id, r)| (*id, r.clone()))
        .unwrap();
    let (endpoint, _) = s
        .file
        .endpoints
        .iter()
        .find(|(_, m)| m.pod.to_string() == "shop/web")
        .unwrap();
    let names = Names::new(s.file.clone(), &s.state);
    let ev = Event {
        ts_ns: 0,
        endpoint: *endpoint,
        rule: id,
        ifindex: 11,
        len: 60,
        src: PeerAddr::v4([10, 0, 0, 1]).addr,
        dst: PeerAddr::v4([10, 0, 0, 3]).addr,
        sport: 40000,
        dport: 8200,
        proto: PROTO_TCP,
        dir: DIR_EGRESS,
        family: AF_INET,
        verdict: VERDICT_DROP,
        reason: Reason::TierDeny as u8,
        _pad: [0; 7],
    };
    let v = names.decode(&ev, 0);
    assert_eq!(
        (v.verdict, v.reason.as_str()),
        (VerdictKind::Dropped, "tier-deny")
    );
    assert_eq!(v.destination.pod.as_deref(), Some("vault/secrets"));
    assert_eq!(
        v.policy_text(),
        "ClusterNetworkPolicy no-vault (Admin 10) egress[0] 'keep-out' Deny"
    );
    let l = Names::metric_labels(&v);
    assert_eq!(
        (
            l.namespace.as_str(),
            l.policy.as_str(),
            l.cluster_tier.as_deref()
        ),
        ("shop", "no-vault", Some("Admin"))
    );
    // A Baseline Deny at an ingress.
    let (bid, _) = s
        .file
        .rules
        .iter()
        .find(|(_, r)| r.policy == "default-deny")
        .unwrap();
    let v = names.decode(
        &Event {
            rule: *bid,
            dir: DIR_INGRESS,
            ..ev
        },
        0,
    );
    assert_eq!(
        v.policy_text(),
        "ClusterNetworkPolicy default-deny (Baseline 100) ingress[0] 'deny-all' Deny"
    );
    // Per-rule stats: kind and tier labels, the name as policy, no namespace.
    let text = crate::stats::rule_series_for_tests(&info, 3, 180);
    assert!(
        text.lines().any(|l| l
            == r#"palisade_rule_packets_total{namespace="",policy="no-vault",rule="egress[0]",kind="ClusterNetworkPolicy",tier="Admin"} 3"#),
        "{text}"
    );
}
