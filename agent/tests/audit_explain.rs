//! Audit semantics in the compiler, and `explain` / `policy show` over a compiled state (no
//! kernel: the same decoding the CLI does on the pinned maps, on the map writer's input).
use std::net::IpAddr;

use palisade::inspect::{PeerView, Query, Snapshot, StateFile, Target, VerdictKind};
use palisade_common::{
    EP_AUDIT_EGRESS, EP_AUDIT_INGRESS, EP_ISOLATED_EGRESS, EP_ISOLATED_INGRESS, POLICY_FLAG_AUDIT,
    PROTO_TCP, PROTO_UDP,
};
use palisade_policy::{
    compile::{Compiler, LocalEndpoint},
    manifest::parse_str,
    model::Store,
    state::{DesiredState, PodRef},
};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {kubernetes.io/metadata.name: shop}}
---
apiVersion: v1
kind: Namespace
metadata: {name: mon, labels: {kubernetes.io/metadata.name: mon, team: obs}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
spec: {containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: prom, namespace: mon, labels: {app: prom}}
status: {podIP: 10.0.1.1}
"#;

const POLICIES: &str = r#"
# api: only an audit policy -> audited ingress.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: api-from-web, namespace: shop, annotations: {palisade.io/audit: "true"}}
spec:
  podSelector: {matchLabels: {app: api}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: web}}}]
      ports: [{port: 9000, endPort: 9100}]
---
# db: enforced; the audit policy that would also admit prom is not in force.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-api, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress, Egress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: api}}}]
      ports: [{port: 5432}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-scrape, namespace: shop, annotations: {palisade.io/audit: "true"}}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
    - from: [{namespaceSelector: {matchLabels: {team: obs}}}]
---
# web: ipBlock egress with an except; ingress on a named port from anywhere.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress, Egress]
  ingress:
    - ports: [{port: http}]
  egress:
    - to: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.0.3/32]}}]
      ports: [{port: 9000, endPort: 9100}]
"#;

fn pod(s: &str) -> PodRef {
    let (namespace, name) = s.split_once('/').unwrap();
    PodRef {
        namespace: namespace.into(),
        name: name.into(),
    }
}

struct World {
    state: DesiredState,
    snap: Snapshot,
}

fn world(audit_all: bool) -> World {
    let store = Store::from_objects(parse_str(&format!("{CLUSTER}\n---\n{POLICIES}")).unwrap());
    assert!(store.errors().is_empty(), "{:?}", store.errors());
    let endpoints: Vec<LocalEndpoint> = ["shop/web", "shop/api", "shop/db", "mon/prom"]
        .iter()
        .enumerate()
        .map(|(i, p)| LocalEndpoint {
            pod: pod(p),
            ifindex: 10 + i as u32,
        })
        .collect();
    let mut compiler = Compiler::default();
    compiler.audit_all = audit_all;
    let hosts: Vec<IpAddr> = vec!["10.9.9.9".parse().unwrap()];
    let state = compiler.compile(&store, &endpoints, &hosts);
    let file = StateFile::build(&state, &store, &hosts, "/nonexistent".as_ref(), audit_all);
    // What the CLI reads: the map entries (names come from the state file).
    let maps = DesiredState {
        endpoints: state.endpoints.clone(),
        identities: state.identities.clone(),
        cidrs: state.cidrs.clone(),
        policy: state.policy.clone(),
        ..DesiredState::default()
    };
    World {
        snap: Snapshot::from_parts(maps, file),
        state,
    }
}

impl World {
    fn flags(&self, p: &str) -> u32 {
        let (_, info, _) = self.snap.endpoint_of(p).unwrap();
        info.flags
    }

    fn explain(
        &self,
        from: &str,
        to: &str,
        proto: u8,
        port: u16,
    ) -> palisade::inspect::Explanation {
        self.snap
            .explain(&Query {
                from: from.parse::<Target>().unwrap(),
                to: to.parse::<Target>().unwrap(),
                proto,
                port,
                ipv6: false,
            })
            .unwrap()
    }
}

#[test]
fn audit_only_directions_are_flagged_and_enforcing_policies_win() {
    let w = world(false);
    assert_eq!(w.flags("shop/api"), EP_ISOLATED_INGRESS | EP_AUDIT_INGRESS);
    assert_eq!(w.flags("shop/db"), EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS);
    assert_eq!(w.flags("mon/prom"), 0);
    let (_, api, meta) = w.snap.endpoint_of("shop/api").unwrap();
    assert_eq!(meta.ingress_policies, vec!["shop/api-from-web".to_string()]);
    // The audit policy's entries are flagged; the enforcing endpoint has none of db-scrape's.
    assert!(
        w.state
            .policy
            .iter()
            .filter(|(e, _)| e.key.endpoint == api.id)
            .all(|(_, v)| v.flags & POLICY_FLAG_AUDIT != 0)
    );
    let db = w.snap.policy_of("shop/db").unwrap();
    assert_eq!(db.ingress.policies, vec!["shop/db-from-api".to_string()]);
    assert_eq!(db.ingress.audit_ignored, vec!["shop/db-scrape".to_string()]);
    assert!(!db.ingress.audit);
    assert!(
        db.ingress
            .rules
            .iter()
            .all(|r| r.rule.policy == "db-from-api")
    );
    assert!(db.egress.isolated && db.egress.rules.is_empty());

    // explain: audited denial, audited allow, enforced denial despite an audit allow.
    let e = w.explain("shop/db", "shop/api", PROTO_TCP, 80);
    assert_eq!(e.verdict, VerdictKind::Dropped, "db has no egress: {e:#?}");
    let e = w.explain("mon/prom", "shop/api", PROTO_TCP, 9000);
    assert_eq!(e.verdict, VerdictKind::WouldDrop, "{e:#?}");
    assert_eq!(e.steps[1].reason, "no-rule-matched");
    assert!(e.steps[1].audit);
    let e = w.explain("shop/web", "shop/api", PROTO_TCP, 9050);
    assert_eq!(e.verdict, VerdictKind::Allowed);
    let rule = e.steps[1].rule.as_ref().unwrap();
    assert_eq!((rule.policy.as_str(), rule.audit), ("api-from-web", true));
    let e = w.explain("mon/prom", "shop/db", PROTO_TCP, 5432);
    assert_eq!(e.verdict, VerdictKind::Dropped, "audit allows open nothing");
    assert!(
        e.steps[1]
            .hints
            .iter()
            .any(|h| h.contains("shop/db-scrape")),
        "{e:#?}"
    );
    let e = w.explain("shop/api", "shop/db", PROTO_TCP, 5432);
    assert_eq!(e.verdict, VerdictKind::Allowed);
}

#[test]
fn node_wide_audit_turns_every_isolation_into_audit() {
    let w = world(true);
    assert_eq!(w.flags("shop/api"), EP_ISOLATED_INGRESS | EP_AUDIT_INGRESS);
    assert_eq!(
        w.flags("shop/db"),
        EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS | EP_AUDIT_INGRESS | EP_AUDIT_EGRESS
    );
    // With every policy in audit, db's two ingress policies are both in force.
    let db = w.snap.policy_of("shop/db").unwrap();
    assert_eq!(db.ingress.policies.len(), 2);
    assert!(db.ingress.audit_ignored.is_empty());
    let e = w.explain("shop/web", "shop/db", PROTO_TCP, 5432);
    assert_eq!(e.verdict, VerdictKind::WouldDrop);
    let e = w.explain("mon/prom", "shop/db", PROTO_TCP, 5432);
    assert_eq!(e.verdict, VerdictKind::Allowed, "db-scrape admits prom");
}

#[test]
fn explain_and_policy_show_decode_ports_peers_and_cidrs() {
    let w = world(false);
    // Named port resolved on the selected pod: ingress to web on 8080 from anywhere.
    let e = w.explain("mon/prom", "shop/web", PROTO_TCP, 8080);
    assert_eq!(e.verdict, VerdictKind::Allowed);
    assert_eq!(e.steps.len(), 2, "prom's egress, then web's ingress");
    assert_eq!(e.steps[0].reason, "not-isolated");
    assert_eq!(e.steps[1].reason, "policy-allow");
    let e = w.explain("mon/prom", "shop/web", PROTO_UDP, 8080);
    assert_eq!(e.verdict, VerdictKind::Dropped);
    // Egress ipBlock with except: api inside, db excepted, prom outside.
    assert_eq!(
        w.explain("shop/web", "shop/api", PROTO_TCP, 9000).steps[0].verdict,
        VerdictKind::Allowed
    );
    let e = w.explain("shop/web", "shop/db", PROTO_TCP, 9000);
    assert_eq!(e.steps[0].verdict, VerdictKind::Dropped);
    let e = w.explain("shop/web", "10.0.1.1", PROTO_TCP, 9000);
    assert_eq!(e.to.pod.as_deref(), Some("mon/prom"));
    assert_eq!(e.steps[0].verdict, VerdictKind::Dropped);
    let web = w.snap.policy_of("shop/web").unwrap();
    let egress = &web.egress.rules;
    assert_eq!(egress.len(), 1, "{egress:#?}");
    match &egress[0].peer {
        PeerView::Cidrs {
            prefixes, except, ..
        } => {
            assert_eq!(prefixes, &vec!["10.0.0.0/24".to_string()]);
            assert_eq!(except, &vec!["10.0.0.3/32".to_string()]);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(egress[0].ports_text(), "TCP/9000-9100");
    let ingress = &web.ingress.rules;
    assert!(
        ingress
            .iter()
            .any(|r| r.ports_text() == "TCP/8080" && r.peer.text() == "anywhere"),
        "{ingress:#?}"
    );
    // Node traffic and unknown pods.
    let e = w.explain("10.9.9.9", "shop/db", PROTO_TCP, 1);
    assert_eq!(e.verdict, VerdictKind::Allowed);
    assert_eq!(e.steps[0].reason, "node-traffic");
    assert!(
        w.snap
            .explain(&Query {
                from: Target::Pod("shop/nope".into()),
                to: Target::Pod("shop/db".into()),
                proto: PROTO_TCP,
                port: 1,
                ipv6: false,
            })
            .is_err()
    );
    assert!(w.snap.policy_of("shop/nope").is_err());
}
