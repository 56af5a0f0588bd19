//! Faults across nodes, on the multi-node rig (`palisade_tests::multinode`): three nodes, each
//! with its own agent in cluster mode against one fake API server, pods talking within and
//! across nodes while the policies churn. One node's agent is killed (-9) again and again: its
//! pods keep their enforcement (pins), the other nodes go on applying changes, the restarted
//! agent catches up with what changed while it was down. Then a compaction makes every
//! agent's watches answer `410 Gone` at once: all re-list, none opens a hole.
//!
//! Every probe is checked: a denied probe that passes and an allowed probe that fails (after
//! a slower retry: a loaded machine misses deadlines) are both failures. Needs root; under
//! CI=true that is a failure, not a skip.
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use palisade_tests::{
    agent::{WorkDir, agent_binary},
    multinode::{Cluster, ClusterSpec, node_name},
    rig::{Pod, PodSpec, ProbeSpec, Proto, probe_expecting, probe_many, require_root},
};
use serde_json::json;

/// The node whose agent is killed.
const VICTIM: usize = 1;

/// Pod `name` (`a0`, `b1`, ...) of the cluster.
fn pod<'c>(c: &'c Cluster, name: &str) -> &'c Pod {
    c.find_pod(name).expect("a pod of the rig").1
}

/// Pod `name` on node `k` in the API: namespace demo, `app: a|b` (its first letter), `id:
/// name` and `extra` labels, a container port `web` = 80.
fn pod_object(c: &Cluster, name: &str, k: usize, extra: &[(&str, &str)]) -> String {
    let ip = pod(c, name).ip(false).to_string();
    let mut labels = json!({"app": &name[..1], "id": name});
    for (key, v) in extra {
        labels[*key] = json!(v);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "labels": labels},
        "spec": {"nodeName": node_name(k), "containers": [{"name": "c",
            "ports": [{"name": "web", "containerPort": 80}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
    .to_string()
}

/// `b` pods admit `a` pods on TCP 80; `a` pods may reach `b` pods on TCP 80 only.
const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-ingress, namespace: demo}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: a}}}]
      ports: [{port: 80, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-egress, namespace: demo}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: b}}}]
      ports: [{port: 80, protocol: TCP}]
"#;

/// Churn that moves none of the probed flows: a duplicate of b-ingress's rule, and a rule
/// admitting to b pods (isolated for ingress already) pods nobody has, on TCP 81.
fn churn_policy(i: usize) -> String {
    if i.is_multiple_of(2) {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: churn-{i}, namespace: demo}}\n\
             spec: {{podSelector: {{matchLabels: {{app: b}}}}, policyTypes: [Ingress], ingress: [{{from: [{{podSelector: {{matchLabels: {{app: a}}}}}}], ports: [{{port: 80, protocol: TCP}}]}}]}}\n"
        )
    } else {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: churn-{i}, namespace: demo}}\n\
             spec: {{podSelector: {{matchLabels: {{app: b}}}}, policyTypes: [Ingress], ingress: [{{from: [{{podSelector: {{matchLabels: {{app: nobody}}}}}}], ports: [{{port: 81, protocol: TCP}}]}}]}}\n"
        )
    }
}

/// b1 admits b pods on TCP 81: only the victim node judges b0 -> b1:81 (b pods are not
/// isolated for egress), so it shows whether the restarted agent caught up.
const CATCH_UP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: catch-up, namespace: demo}\n\
    spec: {podSelector: {matchLabels: {id: b1}}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {matchLabels: {app: b}}}], ports: [{port: 81, protocol: TCP}]}]}\n";

/// b0 admits b2 on TCP 81: a change only nodes 0 and 2 enforce.
const B0_81: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b0-81, namespace: demo}\n\
    spec: {podSelector: {matchLabels: {id: b0}}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {matchLabels: {id: b2}}}], ports: [{port: 81, protocol: TCP}]}]}\n";

/// Probes `expect` over and over until `stop`: 300 ms probes; an allowed one that misses it is
/// asked again with 3 s before it counts as failed; a denied one that passes always counts.
fn probe_continuously(
    pods: &BTreeMap<String, Pod>,
    expect: &[(&str, &str, u16, bool)],
    stop: &AtomicBool,
    sent: &AtomicU64,
    wrong: &Mutex<Vec<String>>,
) {
    let specs: Vec<ProbeSpec<'_>> = expect
        .iter()
        .map(|(from, to, port, _)| ProbeSpec {
            from: &pods[*from],
            to: pods[*to].ip(false),
            port: *port,
            proto: Proto::Tcp,
            timeout: Duration::from_millis(300),
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        let first = probe_many(&specs);
        sent.fetch_add(specs.len() as u64, Ordering::Relaxed);
        for (i, ((from, to, port, allowed), got)) in expect.iter().zip(first).enumerate() {
            if !allowed && got {
                wrong.lock().unwrap().push(format!(
                    "{from} -> {to}:{port} passed (expected denied) at {:?}",
                    SystemTime::now()
                ));
            }
            if *allowed && !got {
                sent.fetch_add(1, Ordering::Relaxed);
                let retry = ProbeSpec {
                    timeout: Duration::from_secs(3),
                    ..specs[i]
                };
                if !probe_many(&[retry])[0] {
                    wrong.lock().unwrap().push(format!(
                        "{from} -> {to}:{port} failed (expected allowed) at {:?}",
                        SystemTime::now()
                    ));
                }
            }
        }
    }
}

/// Probes `expect` once (allowed ones retried), panicking on a mismatch.
fn check(c: &Cluster, what: &str, expect: &[(&str, &str, u16, bool)]) {
    let specs: Vec<ProbeSpec<'_>> = expect
        .iter()
        .map(|(from, to, port, _)| ProbeSpec {
            from: pod(c, from),
            to: pod(c, to).ip(false),
            port: *port,
            proto: Proto::Tcp,
            timeout: Duration::from_millis(800),
        })
        .collect();
    let want: Vec<bool> = expect.iter().map(|e| e.3).collect();
    let got = probe_expecting(&specs, &want);
    assert_eq!(got, want, "{what}: {expect:?}\nlogs: {}", c.logs());
}

fn relists(c: &Cluster, k: usize) -> usize {
    c.agent(k)
        .map(|a| a.log_text().matches("re-listed").count())
        .unwrap_or(0)
}

#[test]
fn killing_one_nodes_agent_affects_no_other_node_and_it_catches_up() {
    faults("list");
}

/// The same with streaming lists: every watch (and every re-list after the 410) is filled by
/// a watch that sends each object as an event, and the API server counts no LIST at all.
#[test]
fn with_streaming_lists_too() {
    faults("stream");
}

fn faults(initial_list: &str) {
    if !require_root() {
        return;
    }
    let names: Vec<Vec<PodSpec>> = (0..3)
        .map(|k| {
            ["a", "b"]
                .iter()
                .map(|p| PodSpec {
                    name: format!("{p}{k}"),
                })
                .collect()
        })
        .collect();
    let mut c = Cluster::new(ClusterSpec {
        nodes: names,
        ipv6: false,
    })
    .expect("cluster");
    for node in c.nodes() {
        node.serve(&[(80, Proto::Tcp), (81, Proto::Tcp)])
            .expect("servers");
    }
    c.api.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {kubernetes.io/metadata.name: demo}}\n",
    );
    for k in 0..3 {
        for p in ["a", "b"] {
            let o = pod_object(&c, &format!("{p}{k}"), k, &[]);
            c.api.apply(&o);
        }
    }
    c.api.apply_all(POLICIES);
    let work = WorkDir::new(&format!("multinode-{initial_list}"));
    let bin = agent_binary();
    c.agent_args = vec!["--initial-list".into(), initial_list.into()];
    c.start_agents(&bin, work.path(), Duration::from_secs(60))
        .expect("three agents enforce their pods");

    // (from, to, port, allowed), within and across nodes, each node judging some.
    let stable: Vec<(&str, &str, u16, bool)> = vec![
        ("a0", "b1", 80, true),  // node 1 judges the ingress
        ("a1", "b2", 80, true),  // node 1 judges the egress
        ("a2", "b0", 80, true),  // nodes 2 and 0
        ("a1", "b1", 80, true),  // within node 1
        ("b1", "a0", 80, true),  // nobody isolated that way
        ("a0", "b1", 81, false), // a's egress (node 0), b's ingress (node 1)
        ("a1", "a2", 80, false), // a's egress, at node 1
        ("b0", "b1", 80, false), // b1's ingress, at node 1
        ("b2", "b1", 80, false),
        ("b1", "b0", 80, false), // b0's ingress, at node 0
        ("b0", "b2", 80, false), // b2's ingress, at node 2
    ];
    check(&c, "the policy is in force on every node", &stable);
    check(
        &c,
        "before catch-up",
        &[("b0", "b1", 81, false), ("b2", "b0", 81, false)],
    );

    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let wrong = Mutex::new(Vec::<String>::new());
    let others: Vec<usize> = (0..3).filter(|k| *k != VICTIM).collect();
    let mut kills = 0;
    let mut changes = 0;
    // The prober's own copies of the pods (their namespaces and addresses).
    let pods: BTreeMap<String, Pod> = c
        .nodes()
        .iter()
        .flat_map(|n| n.pods())
        .map(|p| (p.name.clone(), p.clone()))
        .collect();
    std::thread::scope(|scope| {
        let (stop, sent, wrong, stable, pods) = (&stop, &sent, &wrong, &stable, &pods);
        let prober = scope.spawn(move || probe_continuously(pods, stable, stop, sent, wrong));
        // The prober stops however this ends (a panic too), or the scope would wait forever.
        struct Stop<'a>(&'a AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let _stop = Stop(stop);
        let c = &mut c;
        for cycle in 0..6 {
            let since = SystemTime::now();
            c.kill_agent(VICTIM);
            kills += 1;
            // While the victim is down: churn (policies, labels of pods on every node, the
            // victim's too) that the other nodes apply, each change waited for.
            for step in 0..3 {
                let i = cycle * 3 + step;
                c.api.apply(&churn_policy(i));
                if i >= 2 {
                    c.api
                        .delete("NetworkPolicy", "demo", &format!("churn-{}", i - 2));
                }
                let rev = i.to_string();
                for (name, k) in [("a0", 0), ("b1", 1), ("a2", 2)] {
                    let o = pod_object(c, name, k, &[("rev", &rev)]);
                    c.api.apply(&o);
                }
                changes += 1;
                c.wait_reconciled_on(&others, Duration::from_secs(60))
                    .expect("the other nodes apply the change");
            }
            // What only the victim enforces changes: on odd cycles b1 admits b0 on 81, on even
            // ones it stops. The other nodes meanwhile get a change of their own.
            let catch_up = cycle % 2 == 0;
            if catch_up {
                c.api.apply(CATCH_UP);
            } else {
                c.api.delete("NetworkPolicy", "demo", "catch-up");
            }
            if catch_up {
                c.api.apply(B0_81);
            } else {
                c.api.delete("NetworkPolicy", "demo", "b0-81");
            }
            changes += 1;
            c.wait_reconciled_on(&others, Duration::from_secs(60))
                .expect("the other nodes apply the change");
            if catch_up {
                check(
                    c,
                    "the other nodes enforce a change made while the victim is down",
                    &[("b2", "b0", 81, true)],
                );
            }
            // The victim's pods on its pins alone for a while longer, probed all along.
            std::thread::sleep(Duration::from_millis(800));
            let restarted = SystemTime::now();
            c.restart_agent(VICTIM, &bin).expect("restart");
            c.wait_agent(VICTIM, restarted, Duration::from_secs(60))
                .expect("the restarted agent reconciles");
            check(
                c,
                &format!("cycle {cycle}: the restarted agent caught up"),
                &[("b0", "b1", 81, catch_up), ("b2", "b0", 81, catch_up)],
            );
            eprintln!(
                "cycle {cycle}: victim down and back in {:.1} s",
                since.elapsed().unwrap_or_default().as_secs_f64()
            );
        }
        // 410 Gone on every agent's watches at once: all re-list and go on.
        let before: Vec<usize> = (0..3).map(|k| relists(c, k)).collect();
        c.api.compact();
        c.api.apply(&churn_policy(100));
        c.wait_reconciled(Duration::from_secs(60))
            .expect("every agent reconciles after the 410");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while (0..3).any(|k| relists(c, k) == before[k]) {
            assert!(
                std::time::Instant::now() < deadline,
                "not every agent re-listed after 410 Gone; logs: {}",
                c.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        c.api.apply(CATCH_UP);
        c.wait_reconciled(Duration::from_secs(60))
            .expect("every agent applies a change after the re-list");
        check(c, "after the re-list", &[("b0", "b1", 81, true)]);
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        prober.join().unwrap();
    });
    let wrong = wrong.into_inner().unwrap();
    let passed = wrong
        .iter()
        .filter(|w| w.contains("expected denied"))
        .count();
    let failed = wrong
        .iter()
        .filter(|w| w.contains("expected allowed"))
        .count();
    if initial_list == "stream" {
        for r in ["pods", "namespaces", "networkpolicies"] {
            assert_eq!(c.api.requests(&format!("list {r}")), 0, "{r} were listed");
            assert!(
                c.api.requests(&format!("stream {r}")) > 3,
                "{r} were not streamed"
            );
        }
    }
    eprintln!(
        "multi-node faults ({initial_list}): {kills} kill -9s of {}'s agent, {changes} changes while it was down, \
         one 410 for all; probes: {} sent ({} flows, probed continuously), {passed} wrongly \
         passed, {failed} wrongly failed",
        node_name(VICTIM),
        sent.load(Ordering::Relaxed),
        stable.len(),
    );
    assert!(wrong.is_empty(), "{wrong:#?}\nlogs: {}", c.logs());
    for k in 0..3 {
        let st = c.agent(k).and_then(|a| a.status()).expect("status");
        assert!(st.errors.is_empty(), "{}: {:?}", node_name(k), st.errors);
    }
}
