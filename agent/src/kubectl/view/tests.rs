//! The plugin's pure logic, against recorded API responses (`testdata/`) and node answers.
use std::net::IpAddr;
use std::time::Duration;

use clap::Parser;

use super::*;
use crate::api::{FlowEnd, MapFill, ReconcileInfo};
use crate::cli::{Output, Row, render, render_rows};
use crate::inspect::Step;

fn pod_list(json: &str) -> Vec<Pod> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    serde_json::from_value(v["items"].clone()).unwrap()
}

#[test]
fn each_node_gets_its_running_agent_pod_from_a_recorded_list() {
    let pods = pod_list(include_str!("../testdata/agent-pods.json"));
    let agents = agents_by_node(&pods);
    let got: Vec<(&str, &str, &str, bool)> = agents
        .values()
        .map(|a| (a.node.as_str(), a.pod.as_str(), a.phase.as_str(), a.ready))
        .collect();
    assert_eq!(
        got,
        [
            ("kind-control-plane", "palisade-b5t8n", "Running", true),
            // A rolling update: the terminating pod of the old revision is passed over.
            ("kind-worker", "palisade-q9w4m", "Running", true),
            // Not running yet: kept, so the node is reported rather than forgotten.
            ("kind-worker2", "palisade-zz7rq", "Pending", false),
        ],
        "the unscheduled pod has no node and is left out"
    );
    assert!(!agents["kind-worker2"].running());
}

#[test]
fn a_workload_pods_node_from_a_recorded_get() {
    let pod: Pod = serde_json::from_str(include_str!("../testdata/workload-pod.json")).unwrap();
    assert_eq!(node_of(&pod), Some("kind-worker2"));
    let mut unscheduled = pod.clone();
    unscheduled.spec.as_mut().unwrap().node_name = None;
    assert_eq!(node_of(&unscheduled), None);
}

#[test]
fn exit_statuses_from_recorded_exec_statuses() {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Status;
    let dropped: Status =
        serde_json::from_str(include_str!("../testdata/exec-status-exit-1.json")).unwrap();
    assert_eq!(exit_code_of(&dropped), Some(1));
    let success: Status = serde_json::from_str(r#"{"metadata":{},"status":"Success"}"#).unwrap();
    assert_eq!(exit_code_of(&success), Some(0));
    let no_container: Status =
        serde_json::from_str(include_str!("../testdata/exec-status-no-container.json")).unwrap();
    assert_eq!(
        exit_code_of(&no_container),
        None,
        "not run at all: no exit status"
    );
}

#[derive(Parser)]
struct VerdictsCli {
    #[command(flatten)]
    a: VerdictsArgs,
}

#[derive(Parser)]
struct ExplainCli {
    #[command(flatten)]
    a: ExplainArgs,
}

#[test]
fn each_agent_runs_the_users_filters_and_answers_in_json() {
    let a = VerdictsCli::parse_from([
        "v",
        "--from-pod",
        "shop/frontend",
        "--verdict",
        "DROPPED",
        "--since",
        "5m",
        "--last",
        "20",
        "-o",
        "table",
    ])
    .a;
    assert_eq!(
        remote_verdicts_args(&a, None).join(" "),
        "palisade verdicts --from-pod shop/frontend --verdict dropped --since 300000ms --limit 20 -o json"
    );
    // Following: only the last stretch of history again (or less, if the user asked less).
    assert_eq!(
        remote_verdicts_args(&a, Some(Duration::from_secs(7))).join(" "),
        "palisade verdicts --from-pod shop/frontend --verdict dropped --since 7000ms --follow -o json"
    );
    let a = ExplainCli::parse_from([
        "e",
        "--from",
        "shop/frontend",
        "--to",
        "10.0.0.9",
        "--port",
        "80",
        "--ipv6",
    ])
    .a;
    assert_eq!(
        remote_explain_args(&a).join(" "),
        "palisade explain --from shop/frontend --to 10.0.0.9 --port 80 --protocol TCP --ipv6 -o json"
    );
    assert_eq!(
        remote_policy_show_args("shop/db").join(" "),
        "palisade policy show shop/db -o json"
    );
    assert_eq!(remote_stats_args().join(" "), "palisade stats -o json");
}

fn verdict(seq: u64, ms: u64, from: &str, to: &str, kind: VerdictKind) -> Verdict {
    let end = |pod: &str, ip: &str| FlowEnd {
        ip: ip.parse().unwrap(),
        port: Some(80),
        pod: Some(pod.to_string()),
        node: false,
    };
    Verdict {
        seq,
        time: format!("2026-12-06T10:00:{:02}.{:03}Z", ms / 1000 % 60, ms % 1000),
        time_unix_ms: ms,
        verdict: kind,
        reason: "no-rule-matched".into(),
        endpoint: Some(to.to_string()),
        direction: Direction::Ingress,
        source: end(from, "10.244.0.10"),
        destination: end(to, "10.244.1.10"),
        protocol: "TCP".into(),
        rule: None,
        policies: vec!["demo/b-ingress".into()],
        bytes: 60,
        domain: None,
        egress: None,
    }
}

#[test]
fn verdicts_are_merged_by_time_and_limited_to_the_most_recent() {
    let node1 = vec![
        verdict(1, 1_000, "demo/a0", "demo/b0", VerdictKind::Allowed),
        verdict(2, 3_000, "demo/a0", "demo/b0", VerdictKind::Dropped),
    ];
    let node2 = vec![
        verdict(7, 2_000, "demo/a0", "demo/b1", VerdictKind::Dropped),
        verdict(8, 3_000, "demo/a2", "demo/b1", VerdictKind::Allowed),
    ];
    let merged = merge_verdicts(
        vec![
            ("node-2".into(), node2.clone()),
            ("node-1".into(), node1.clone()),
        ],
        None,
    );
    let order: Vec<(&str, u64)> = merged
        .iter()
        .map(|v| (v.node.as_str(), v.verdict.seq))
        .collect();
    assert_eq!(
        order,
        [("node-1", 1), ("node-2", 7), ("node-1", 2), ("node-2", 8)],
        "by time; a tie by node"
    );
    let last = merge_verdicts(
        vec![("node-1".into(), node1), ("node-2".into(), node2)],
        Some(2),
    );
    assert_eq!(
        last.iter().map(|v| v.verdict.seq).collect::<Vec<_>>(),
        [2, 8],
        "--last 2: the two most recent in the cluster"
    );
}

#[test]
fn a_followed_node_repeats_no_verdict() {
    let mut seen = SeenVerdicts::default();
    let v = |node: &str, seq| NodeVerdict {
        node: node.into(),
        verdict: verdict(seq, seq * 10, "demo/a", "demo/b", VerdictKind::Allowed),
    };
    assert!(seen.admit(&v("node-1", 5)));
    assert!(seen.admit(&v("node-2", 3)), "nodes number their own");
    assert!(!seen.admit(&v("node-1", 4)), "the history again");
    assert!(!seen.admit(&v("node-1", 5)));
    assert!(seen.admit(&v("node-1", 6)));
}

#[test]
fn node_verdicts_render_with_their_node_in_every_format() {
    let cv = ClusterVerdicts {
        verdicts: vec![NodeVerdict {
            node: "node-2".into(),
            verdict: verdict(3, 2_500, "demo/a0", "demo/b1", VerdictKind::Dropped),
        }],
        failures: vec![NodeFailure {
            node: "node-3".into(),
            pod: Some("palisade-3".into()),
            error: "connecting to the agent at /run/palisade/palisade.sock: Connection refused"
                .into(),
        }],
    };
    let table = render(&cv, Output::Table).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NODE    TIME (UTC)"), "{table}");
    assert!(
        lines[1].starts_with("node-2  10:00:02.500  demo/a0"),
        "{table}"
    );
    assert_eq!(lines.len(), 2, "the failure goes to stderr: {table}");
    assert!(
        render(&cv, Output::Wide)
            .unwrap()
            .contains("10.244.1.10:80")
    );
    let json: serde_json::Value =
        serde_json::from_str(&render(&cv, Output::Json).unwrap()).unwrap();
    assert_eq!(json["verdicts"][0]["node"], "node-2");
    assert_eq!(
        json["verdicts"][0]["verdict"], "dropped",
        "the verdict's own fields, flat"
    );
    assert_eq!(json["failures"][0]["node"], "node-3");
    let back: ClusterVerdicts =
        serde_saphyr::from_str(&render(&cv, Output::Yaml).unwrap()).unwrap();
    assert_eq!(back, cv);
    assert_eq!(NodeVerdict::headers(false)[0], "NODE");
    assert_eq!(
        NodeVerdict::stream_widths(true).len(),
        NodeVerdict::headers(true).len()
    );
}

fn step(pod: &str, direction: Direction, verdict: VerdictKind, summary: &str) -> Step {
    Step {
        pod: pod.into(),
        direction,
        verdict,
        reason: String::new(),
        rule: None,
        admin: None,
        baseline: None,
        cluster_policies: vec![],
        policies: vec![],
        audit: false,
        audit_ignored: vec![],
        summary: summary.into(),
        hints: vec![],
        domain: None,
    }
}

fn end(pod: Option<&str>, ip: &str, local: bool) -> End {
    End {
        pod: pod.map(str::to_string),
        ip: ip.parse::<IpAddr>().unwrap(),
        local,
    }
}

/// What node `node` answers to `explain --from demo/a0 --to demo/b1 --port 80`: the steps
/// of the ends it has.
fn answer(node: &str, steps: Vec<Step>, from_local: bool, to_local: bool) -> NodeAnswer {
    NodeAnswer {
        node: node.into(),
        pod: format!("palisade-{node}"),
        explanation: Explanation {
            from: end(Some("demo/a0"), "10.244.0.10", from_local),
            to: end(Some("demo/b1"), "10.244.1.10", to_local),
            protocol: "TCP".into(),
            port: Some(80),
            verdict: combined_verdict(steps.iter().map(|s| s.verdict)),
            steps,
            notes: vec![],
        },
    }
}

#[test]
fn each_half_comes_from_the_node_that_enforces_it() {
    let source = answer(
        "node-1",
        vec![step(
            "demo/a0",
            Direction::Egress,
            VerdictKind::Allowed,
            "allowed: no policy selects demo/a0 for egress",
        )],
        true,
        false,
    );
    let destination = answer(
        "node-2",
        vec![step(
            "demo/b1",
            Direction::Ingress,
            VerdictKind::Dropped,
            "dropped: isolated",
        )],
        false,
        true,
    );
    let c = combine_halves(Some(&source), Some(&destination)).unwrap();
    assert_eq!(
        c.explanation.verdict,
        VerdictKind::Dropped,
        "dropped if either half drops"
    );
    assert_eq!(
        c.nodes
            .iter()
            .map(|n| (n.direction, n.node.as_str(), n.agent.as_str()))
            .collect::<Vec<_>>(),
        [
            (Direction::Egress, "node-1", "palisade-node-1"),
            (Direction::Ingress, "node-2", "palisade-node-2"),
        ]
    );
    assert!(c.explanation.from.local && c.explanation.to.local);
    let text = render(&c, Output::Table).unwrap();
    assert_eq!(
        text,
        "demo/a0 (10.244.0.10) -> demo/b1 (10.244.1.10) TCP/80: DROPPED\n  \
         egress of demo/a0 (on node-1): allowed: no policy selects demo/a0 for egress\n  \
         ingress of demo/b1 (on node-2): dropped: isolated\n"
    );
    let json: serde_json::Value = serde_json::from_str(&render(&c, Output::Json).unwrap()).unwrap();
    assert_eq!(json["verdict"], "dropped");
    assert_eq!(json["steps"][1]["pod"], "demo/b1");
    assert_eq!(json["nodes"][1]["node"], "node-2");
    let back: ClusterExplanation =
        serde_saphyr::from_str(&render(&c, Output::Yaml).unwrap()).unwrap();
    assert_eq!(back, c);

    // Both allowing: allowed; an audited denial: would-drop.
    let allowing = answer(
        "node-2",
        vec![step(
            "demo/b1",
            Direction::Ingress,
            VerdictKind::WouldDrop,
            "would drop",
        )],
        false,
        true,
    );
    let c = combine_halves(Some(&source), Some(&allowing)).unwrap();
    assert_eq!(c.explanation.verdict, VerdictKind::WouldDrop);
}

#[test]
fn one_node_answers_both_halves_of_a_flow_within_it() {
    let both = answer(
        "node-1",
        vec![
            step(
                "demo/a0",
                Direction::Egress,
                VerdictKind::Allowed,
                "allowed",
            ),
            step(
                "demo/b1",
                Direction::Ingress,
                VerdictKind::Allowed,
                "allowed",
            ),
        ],
        true,
        true,
    );
    let c = combine_halves(Some(&both), Some(&both)).unwrap();
    assert_eq!(c.explanation.verdict, VerdictKind::Allowed);
    assert_eq!(c.explanation.steps.len(), 2);
    assert!(c.nodes.iter().all(|n| n.node == "node-1"));
}

#[test]
fn a_half_nobody_judges_is_said_so() {
    // The destination is an address, not a pod: the source's node alone answers.
    let mut source = answer(
        "node-1",
        vec![step(
            "demo/a0",
            Direction::Egress,
            VerdictKind::Dropped,
            "dropped",
        )],
        true,
        false,
    );
    source.explanation.to = end(None, "192.0.2.7", false);
    let c = combine_halves(Some(&source), None).unwrap();
    assert_eq!(c.explanation.verdict, VerdictKind::Dropped);
    assert_eq!(
        c.explanation.notes,
        ["192.0.2.7 is not a pod: no node judges its ingress"]
    );
    // An address the source's node knows as a pod's: the note says to name the pod.
    source.explanation.to = end(Some("demo/b1"), "10.244.1.10", false);
    let c = combine_halves(Some(&source), None).unwrap();
    assert_eq!(
        c.explanation.notes,
        [
            "10.244.1.10 is demo/b1's address: name the pod (demo/b1) to have its node judge its ingress"
        ]
    );
    source.explanation.to = end(None, "192.0.2.7", false);
    // The pod's node has no endpoint for it (no interface yet): no step, a note.
    let destination = answer("node-2", vec![], false, false);
    let c = combine_halves(Some(&source), Some(&destination)).unwrap();
    assert_eq!(c.explanation.steps.len(), 1);
    assert!(
        c.explanation.notes[0].contains("has no endpoint on node-2"),
        "{:?}",
        c.explanation.notes
    );
    assert!(combine_halves(None, None).is_none());
}

fn report(new_allowed: u64, dropped: u64, policy_packets: u64) -> StatsReport {
    StatsReport {
        counters: [
            ("new_allowed".to_string(), new_allowed),
            ("dropped".to_string(), dropped),
        ]
        .into(),
        drops_by_reason: [("no-rule-matched".to_string(), dropped)].into(),
        policies: vec![PolicyStats {
            policy: "demo/b-ingress".into(),
            kind: "NetworkPolicy".into(),
            packets: policy_packets,
            bytes: policy_packets * 60,
            rules: vec![RuleCount {
                id: 3,
                rule: "ingress[0]".into(),
                packets: policy_packets,
                bytes: policy_packets * 60,
                ..Default::default()
            }],
            ..Default::default()
        }],
        maps: vec![MapFill {
            map: "ENDPOINTS".into(),
            entries: 2,
            capacity: 4096,
            fill: 2.0 / 4096.0,
        }],
        conntrack: ConntrackStats {
            entries: new_allowed,
            top_holders: vec![("demo/a0".into(), new_allowed)],
            ..Default::default()
        },
        events: EventStats {
            recorded: new_allowed + dropped,
            ..Default::default()
        },
        reconcile: Some(ReconcileInfo {
            endpoints: 2,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn stats_are_summed_over_the_nodes_that_answered() {
    let stats = ClusterStats::new(vec![
        NodeStats {
            node: "node-1".into(),
            agent: Some("palisade-a".into()),
            stats: Some(report(4, 1, 10)),
            error: None,
        },
        NodeStats {
            node: "node-2".into(),
            agent: Some("palisade-b".into()),
            stats: Some(report(6, 2, 5)),
            error: None,
        },
        NodeStats {
            node: "node-3".into(),
            agent: Some("palisade-c".into()),
            stats: None,
            error: Some("connecting to the agent: Connection refused".into()),
        },
    ]);
    let t = &stats.total;
    assert_eq!(t.counters["new_allowed"], 10);
    assert_eq!(t.counters["dropped"], 3);
    assert_eq!(t.drops_by_reason["no-rule-matched"], 3);
    assert_eq!(t.policies.len(), 1, "one policy, counted on two nodes");
    assert_eq!(
        (t.policies[0].packets, t.policies[0].rules[0].packets),
        (15, 15)
    );
    assert_eq!(t.conntrack.entries, 10);
    assert_eq!(t.conntrack.top_holders, [("demo/a0".to_string(), 10)]);
    assert_eq!(t.events.recorded, 13);
    assert!(t.maps.is_empty(), "maps are per node");
    assert_eq!(stats.failures().len(), 1);
    let mut troubled = report(1, 0, 0);
    troubled
        .problems
        .errors
        .push("attaching to lxc3: No such device".into());
    troubled
        .problems
        .pending_endpoints
        .push("demo/b (ifindex 7)".into());
    let named = ClusterStats::new(vec![NodeStats {
        node: "node-4".into(),
        agent: None,
        stats: Some(troubled),
        error: None,
    }]);
    assert_eq!(
        named.total.problems.errors,
        ["node-4: attaching to lxc3: No such device"]
    );
    assert_eq!(
        named.total.problems.pending_endpoints,
        ["node-4: demo/b (ifindex 7)"]
    );

    let table = render(&stats, Output::Table).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0],
        "NODE    AGENT POD   NEW ALLOWED  CT HITS  DROPPED  WOULD-DROP  CONNTRACK  VERDICTS  PROBLEMS"
    );
    assert_eq!(
        lines[1],
        "node-1  palisade-a  4            0        1        0           4          5         -"
    );
    assert_eq!(lines[3], "node-3  palisade-c  unreachable");
    assert_eq!(
        lines[4],
        "TOTAL               10           0        3        0           10         13        -"
    );
    assert_eq!(lines[5], "", "the reason goes to stderr");
    assert!(
        table.contains("Summed over 2 of 3 nodes:\nDatapath: 10 new allowed flows"),
        "{table}"
    );
    assert!(!table.contains("MAP "), "{table}");
    let wide = render(&stats, Output::Wide).unwrap();
    assert!(wide.contains("FULLEST MAP"), "{wide}");
    assert!(
        wide.contains("== node node-2 (agent pod palisade-b)"),
        "{wide}"
    );
    let json: serde_json::Value =
        serde_json::from_str(&render(&stats, Output::Json).unwrap()).unwrap();
    assert_eq!(json["total"]["counters"]["dropped"], 3);
    assert_eq!(
        json["nodes"][2]["error"],
        "connecting to the agent: Connection refused"
    );
    let back: ClusterStats =
        serde_saphyr::from_str(&render(&stats, Output::Yaml).unwrap()).unwrap();
    assert_eq!(back.total.counters, stats.total.counters);
}

#[test]
fn agent_pods_are_listed_per_node() {
    let pods = pod_list(include_str!("../testdata/agent-pods.json"));
    let agents: Vec<AgentPod> = agents_by_node(&pods).into_values().collect();
    assert_eq!(
        render_rows(&agents, Output::Table).unwrap(),
        "NODE                AGENT POD       PHASE    READY\n\
         kind-control-plane  palisade-b5t8n  Running  yes\n\
         kind-worker         palisade-q9w4m  Running  yes\n\
         kind-worker2        palisade-zz7rq  Pending  no\n"
    );
}
