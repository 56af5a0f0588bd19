//! ClusterNetworkPolicy tiers in the real programs (BPF_PROG_TEST_RUN on crafted packets), with
//! maps written from manifests compiled by the agent's compiler: the Admin tier before
//! NetworkPolicy, Pass into NetworkPolicy, the Baseline tier where no NetworkPolicy isolates, and
//! tier denies that NetworkPolicy's audit mode never turns into "would drop". Needs root; under
//! CI=true a missing privilege is a failure, not a skip.
mod support;

use palisade_common::*;
use palisade_policy::compile::{Compiler, LocalEndpoint};
use palisade_policy::model::Store;
use palisade_policy::state::PodRef;
use support::{
    EXTERNAL, IFINDEX, NODE, OTHER, PEER, POD, Rig, SYN, TC_ACT_OK, TC_ACT_SHOT, counter,
    require_root, tcp4,
};

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, labels: {app: db}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.244.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: api, namespace: shop, labels: {app: api}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.244.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: shop, labels: {app: intruder}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.244.0.12}
---
# NetworkPolicy opens db's port 80 to every pod of the namespace.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-ingress, namespace: shop, annotations: {palisade.io/audit: "AUDIT"}}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress: [{from: [{podSelector: {}}], ports: [{port: 80}]}]
---
# The administrator: the intruder may never reach db; api's port-80 traffic is left to the
# namespace's NetworkPolicy; everything else to db is accepted.
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: guard-db}
spec:
  tier: Admin
  priority: 10
  subject: {pods: {podSelector: {matchLabels: {app: db}}}}
  ingress:
    - {name: no-intruder, action: Deny, from: [{pods: {podSelector: {matchLabels: {app: intruder}}}}]}
    - {name: api-to-owners, action: Pass, from: [{pods: {podSelector: {matchLabels: {app: api}}}}], protocols: [{tcp: {destinationPort: {number: 80}}}]}
    - {name: rest, action: Accept, from: [{namespaces: {}}]}
---
# The default: no egress to documentation addresses but 192.0.2.7 on 443.
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: default-egress}
spec:
  tier: Baseline
  priority: 500
  subject: {namespaces: {}}
  egress:
    - {name: one-host, action: Accept, to: [{networks: [192.0.2.7/32]}], protocols: [{tcp: {destinationPort: {range: {start: 440, end: 450}}}}]}
    - {name: no-docs, action: Deny, to: [{networks: [192.0.2.0/24]}]}
"#;

fn rig(audit: bool) -> (Rig, Store) {
    let text = CLUSTER.replace("AUDIT", if audit { "true" } else { "false" });
    let store = Store::from_objects(palisade_policy::manifest::parse_str(&text).unwrap());
    assert!(store.errors().is_empty(), "{:?}", store.errors());
    let endpoints = [LocalEndpoint {
        pod: PodRef {
            namespace: "shop".into(),
            name: "db".into(),
        },
        ifindex: IFINDEX,
    }];
    let state = Compiler::new().compile(&store, &endpoints, &[NODE.into()]);
    let flags = state.endpoints[&IFINDEX].flags;
    assert_eq!(
        flags & (EP_TIERED | EP_ISOLATED_INGRESS | EP_ISOLATED_EGRESS),
        EP_TIERED | EP_ISOLATED_INGRESS
    );
    (Rig::new(&state), store)
}

fn tier_denies(rig: &Rig) -> u64 {
    counter(&rig.counters, DROPPED_BY_REASON + Reason::TierDeny as u32)
}

#[test]
fn admin_tier_then_network_policy_then_baseline() {
    if !require_root() {
        return;
    }
    for audit in [false, true] {
        let (rig, _) = rig(audit);
        let what = if audit {
            " (NetworkPolicy audited)"
        } else {
            ""
        };
        // Admin Deny beats NetworkPolicy's allow, and is never audited.
        assert_eq!(
            rig.ingress(&tcp4(OTHER, POD, 40000, 80, SYN)),
            TC_ACT_SHOT,
            "intruder to db:80{what}"
        );
        assert_eq!(tier_denies(&rig), 1, "{what}");
        // Pass: NetworkPolicy decides (allows 80).
        assert_eq!(
            rig.ingress(&tcp4(PEER, POD, 40001, 80, SYN)),
            TC_ACT_OK,
            "api to db:80{what}"
        );
        // api on another port: the Admin Accept rule.
        assert_eq!(
            rig.ingress(&tcp4(PEER, POD, 40002, 5432, SYN)),
            TC_ACT_OK,
            "api to db:5432{what}"
        );
        // Not a pod: no Admin rule matches; NetworkPolicy isolates db and allows only pods
        // (audited: would drop, passes).
        let external = rig.ingress(&tcp4(EXTERNAL, POD, 40003, 80, SYN));
        assert_eq!(
            external,
            if audit { TC_ACT_OK } else { TC_ACT_SHOT },
            "external to db:80{what}"
        );
        // Egress: no NetworkPolicy isolates db; the Baseline tier decides.
        assert_eq!(
            rig.egress(&tcp4(POD, EXTERNAL, 40004, 443, SYN)),
            TC_ACT_OK,
            "db to 192.0.2.7:443{what}"
        );
        assert_eq!(
            rig.egress(&tcp4(POD, EXTERNAL, 40005, 80, SYN)),
            TC_ACT_SHOT,
            "db to 192.0.2.7:80{what}"
        );
        assert_eq!(
            rig.egress(&tcp4(POD, [192, 0, 2, 99].into(), 40006, 443, SYN)),
            TC_ACT_SHOT,
            "db to 192.0.2.99:443{what}"
        );
        assert_eq!(tier_denies(&rig), 3, "{what}");
        // Nothing else is restricted: the default allows, the node is not a pod.
        assert_eq!(
            rig.egress(&tcp4(POD, [198, 51, 100, 1].into(), 40007, 80, SYN)),
            TC_ACT_OK,
            "db to 198.51.100.1{what}"
        );
        assert_eq!(
            rig.ingress(&tcp4(NODE, POD, 40008, 8080, SYN)),
            TC_ACT_OK,
            "kubelet probe{what}"
        );
    }
}

/// A ClusterNetworkPolicy in audit mode enforces nothing: a flow its Deny rule matches passes,
/// once recorded as "would drop" (tier-deny) when it opens; enforced policies decide as if it
/// were absent.
#[test]
fn an_audited_cluster_policy_records_what_it_would_drop() {
    if !require_root() {
        return;
    }
    let audited = r#"
---
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: trial-deny, annotations: {palisade.io/audit: "true"}}
spec:
  tier: Admin
  priority: 5
  subject: {pods: {podSelector: {matchLabels: {app: db}}}}
  ingress:
    - {name: not-api, action: Deny, from: [{pods: {podSelector: {matchLabels: {app: api}}}}], protocols: [{tcp: {destinationPort: {number: 5432}}}]}
  egress:
    - {name: no-web, action: Deny, to: [{networks: [198.51.100.0/24]}]}
"#;
    let text = format!("{}{audited}", CLUSTER.replace("AUDIT", "false"));
    let store = Store::from_objects(palisade_policy::manifest::parse_str(&text).unwrap());
    assert!(store.errors().is_empty(), "{:?}", store.errors());
    let endpoints = [LocalEndpoint {
        pod: PodRef {
            namespace: "shop".into(),
            name: "db".into(),
        },
        ifindex: IFINDEX,
    }];
    let state = Compiler::new().compile(&store, &endpoints, &[NODE.into()]);
    let flags = state.endpoints[&IFINDEX].flags;
    assert_eq!(
        flags & (EP_TIER_AUDIT_INGRESS | EP_TIER_AUDIT_EGRESS),
        EP_TIER_AUDIT_INGRESS | EP_TIER_AUDIT_EGRESS
    );
    let rig = Rig::new(&state);
    let audited = || counter(&rig.counters, AUDITED_BY_REASON + Reason::TierDeny as u32);
    // api to db:5432: the enforced Admin Accept allows; the audited Deny would have dropped it.
    assert_eq!(rig.ingress(&tcp4(PEER, POD, 41000, 5432, SYN)), TC_ACT_OK);
    assert_eq!(audited(), 1);
    // Its next packet passes by conntrack, not recorded again.
    assert_eq!(
        rig.ingress(&tcp4(PEER, POD, 41000, 5432, support::ACK)),
        TC_ACT_OK
    );
    assert_eq!(audited(), 1);
    // Not matched by the audited rule: nothing recorded.
    assert_eq!(rig.ingress(&tcp4(PEER, POD, 41001, 80, SYN)), TC_ACT_OK);
    assert_eq!(audited(), 1);
    // Egress, where only the Baseline tier is enforced (the default allows 198.51.100.1).
    assert_eq!(
        rig.egress(&tcp4(POD, [198, 51, 100, 1].into(), 41002, 80, SYN)),
        TC_ACT_OK
    );
    assert_eq!(audited(), 2);
    // Enforced denies still drop, and are not audited.
    assert_eq!(rig.ingress(&tcp4(OTHER, POD, 41003, 80, SYN)), TC_ACT_SHOT);
    assert_eq!(tier_denies(&rig), 1);
    assert_eq!(audited(), 2);
}
