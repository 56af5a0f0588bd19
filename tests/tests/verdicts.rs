//! Verdicts, the CLI and metrics on the netns rig: after real allowed and denied traffic, the
//! CLI's JSON names the right pods, ports, verdicts and policies; `policy show` and `explain`
//! decode the pinned maps; audit mode records and does not drop; a flood of denied packets
//! stays within the per-endpoint rate limit and is counted. Needs root; under CI=true that is
//! a failure, not a skip.
mod support;

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use palisade_common::{EVENT_BURST, EVENT_RATE_PER_SEC};
use palisade_tests::rig::{Proto, require_root};
use serde_json::Value;
use support::Setup;

/// Pods a, b, c (see `support`) with `policies` in `policies.yaml`, the agent run with
/// `agent_args`.
fn setup(tag: &str, policies: &str, agent_args: &[&str]) -> Setup {
    Setup::start(tag, false, &[("policies.yaml", policies)], agent_args)
}

impl Setup {
    fn ip(&self, name: &str) -> IpAddr {
        self.pod(name).ip(false)
    }

    /// `palisade verdicts -o json <args>`, polled until `done` holds (or 10 s pass).
    fn verdicts_until(&self, args: &[&str], done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut all = vec!["verdicts"];
        all.extend_from_slice(args);
        loop {
            let v = self.json(&all);
            let list = v.as_array().expect("verdicts -o json is an array").clone();
            if done(&list) || Instant::now() > deadline {
                return list;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn s<'a>(v: &'a Value, path: &[&str]) -> &'a str {
    let mut cur = v;
    for p in path {
        cur = &cur[*p];
    }
    cur.as_str().unwrap_or("")
}

/// The verdict on `from -> to:port` taken at the destination's ingress (a flow between two
/// local pods is judged twice: at the source's egress, then at the destination's ingress).
fn find<'a>(
    list: &'a [Value],
    verdict: &str,
    from: &str,
    to: &str,
    port: u64,
) -> Option<&'a Value> {
    find_at(list, verdict, to, from, to, port)
}

fn find_at<'a>(
    list: &'a [Value],
    verdict: &str,
    endpoint: &str,
    from: &str,
    to: &str,
    port: u64,
) -> Option<&'a Value> {
    list.iter().find(|v| {
        s(v, &["verdict"]) == verdict
            && s(v, &["endpoint"]) == endpoint
            && s(v, &["source", "pod"]) == from
            && s(v, &["destination", "pod"]) == to
            && v["destination"]["port"].as_u64() == Some(port)
    })
}

const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: demo}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress]
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
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: c-egress-web, namespace: demo}
spec:
  podSelector: {matchLabels: {app: c}}
  policyTypes: [Egress]
  egress:
    - to: [{ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}}]
    - to: [{podSelector: {}}]
      ports: [{port: 80}]
"#;

#[test]
fn cli_names_pods_ports_verdicts_and_policies() {
    if !require_root() {
        return;
    }
    let t = setup("cli", POLICIES, &[]);
    assert!(t.can("a", "b", 80, Proto::Tcp), "a -> b:80 allowed");
    assert!(!t.can("c", "b", 80, Proto::Tcp), "c -> b:80 denied");
    assert!(!t.can("a", "b", 81, Proto::Tcp), "a -> b:81 denied");
    assert!(
        !t.can("c", "a", 81, Proto::Tcp),
        "c -> a:81 denied (egress)"
    );

    let list = t.verdicts_until(&[], |l| {
        find(l, "allowed", "demo/a", "demo/b", 80).is_some()
            && find(l, "dropped", "demo/c", "demo/b", 80).is_some()
            && find(l, "dropped", "demo/a", "demo/b", 81).is_some()
            && find_at(l, "dropped", "demo/c", "demo/c", "demo/a", 81).is_some()
    });
    let allowed = find(&list, "allowed", "demo/a", "demo/b", 80)
        .unwrap_or_else(|| panic!("allowed a -> b:80 recorded: {list:#?}"));
    assert_eq!(s(allowed, &["protocol"]), "TCP");
    assert_eq!(s(allowed, &["endpoint"]), "demo/b");
    assert_eq!(s(allowed, &["direction"]), "ingress");
    assert_eq!(s(allowed, &["reason"]), "policy-allow");
    assert_eq!(s(allowed, &["rule", "namespace"]), "demo");
    assert_eq!(s(allowed, &["rule", "policy"]), "b-from-a");
    assert_eq!(s(allowed, &["rule", "direction"]), "ingress");
    assert_eq!(allowed["rule"]["index"], 0);
    assert_eq!(s(allowed, &["source", "ip"]), t.ip("a").to_string());
    assert_eq!(s(allowed, &["destination", "ip"]), t.ip("b").to_string());

    let denied = find(&list, "dropped", "demo/c", "demo/b", 80).expect("c -> b:80 recorded");
    assert_eq!(s(denied, &["endpoint"]), "demo/b");
    assert_eq!(s(denied, &["reason"]), "no-rule-matched");
    let policies: Vec<&str> = denied["policies"]
        .as_array()
        .expect("a denial names the isolating policies")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        policies,
        vec!["demo/b-from-a", "demo/default-deny-ingress"],
        "{denied:#}"
    );
    assert!(denied.get("rule").is_none());
    // The egress denial is judged at c, by c's egress policy.
    let egress =
        find_at(&list, "dropped", "demo/c", "demo/c", "demo/a", 81).expect("c -> a:81 recorded");
    assert_eq!(s(egress, &["endpoint"]), "demo/c");
    assert_eq!(s(egress, &["direction"]), "egress");
    assert_eq!(egress["policies"][0], "demo/c-egress-web");
    // Only new flows are recorded: the allowed connection appears once at b's ingress.
    let repeats = list
        .iter()
        .filter(|v| {
            s(v, &["verdict"]) == "allowed"
                && s(v, &["endpoint"]) == "demo/b"
                && s(v, &["source", "pod"]) == "demo/a"
                && v["destination"]["port"] == 80
                && s(v, &["protocol"]) == "TCP"
        })
        .count();
    assert_eq!(repeats, 1, "one event per new flow, not per packet");

    // Filters.
    let dropped = t.json(&["verdicts", "--verdict", "dropped"]);
    let dropped = dropped.as_array().unwrap();
    assert!(!dropped.is_empty() && dropped.iter().all(|v| v["verdict"] == "dropped"));
    let of_c = t.json(&["verdicts", "--pod", "demo/c"]);
    let of_c = of_c.as_array().unwrap();
    assert!(!of_c.is_empty());
    assert!(of_c.iter().all(|v| {
        s(v, &["source", "pod"]) == "demo/c"
            || s(v, &["destination", "pod"]) == "demo/c"
            || s(v, &["endpoint"]) == "demo/c"
    }));
    assert_eq!(
        t.json(&["verdicts", "--namespace", "elsewhere"]),
        Value::Array(vec![])
    );
    assert_eq!(
        t.json(&["verdicts", "--since", "1h"])
            .as_array()
            .unwrap()
            .len(),
        t.json(&["verdicts"]).as_array().unwrap().len()
    );
    // The table form names the same things.
    let table = t.agent.cli(&["verdicts"]).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("demo/b-from-a ingress[0]"), "{table}");
    assert!(
        table.contains("demo/b-from-a,demo/default-deny-ingress"),
        "{table}"
    );

    // policy show: decoded from the pinned maps.
    let b = t.json(&["policy", "show", "demo/b"]);
    assert_eq!(b["ingress"]["isolated"], true);
    assert_eq!(b["egress"]["isolated"], false);
    assert_eq!(
        b["ingress"]["policies"],
        serde_json::json!(["demo/b-from-a", "demo/default-deny-ingress"])
    );
    let rules = b["ingress"]["rules"].as_array().unwrap();
    assert_eq!(rules.len(), 2, "TCP and UDP 80: {b:#}");
    for r in rules {
        assert_eq!(s(r, &["rule", "policy"]), "b-from-a");
        assert_eq!(r["peer"]["kind"], "pods");
        assert_eq!(r["peer"]["pods"], serde_json::json!(["demo/a"]));
        assert_eq!(r["ports"], serde_json::json!([{"from": 80, "to": 80}]));
    }
    let c = t.json(&["policy", "show", "demo/c"]);
    let rules = c["egress"]["rules"].as_array().unwrap();
    let cidr = rules
        .iter()
        .find(|r| r["rule"]["index"] == 0)
        .expect("ipBlock rule");
    assert_eq!(cidr["peer"]["kind"], "cidrs");
    assert_eq!(cidr["peer"]["prefixes"], serde_json::json!(["0.0.0.0/0"]));
    assert_eq!(cidr["peer"]["except"], serde_json::json!(["10.0.0.0/8"]));
    assert!(cidr["protocol"].is_null() && cidr["ports"] == serde_json::json!([]));
    let text = t.agent.cli(&["policy", "show", "demo/b"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("pods demo/a") && text.contains("TCP/80"),
        "{text}"
    );

    // explain agrees with what happened.
    let e = t.json(&[
        "explain", "--from", "demo/c", "--to", "demo/b", "--port", "80",
    ]);
    assert_eq!(e["verdict"], "dropped", "{e:#}");
    let steps = e["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0]["pod"], "demo/c");
    assert_eq!(steps[0]["direction"], "egress");
    assert_eq!(steps[0]["verdict"], "allowed");
    assert_eq!(steps[0]["rule"]["policy"], "c-egress-web");
    assert_eq!(steps[1]["pod"], "demo/b");
    assert_eq!(steps[1]["verdict"], "dropped");
    assert_eq!(steps[1]["reason"], "no-rule-matched");
    assert!(
        steps[1]["hints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h.as_str().unwrap().contains("demo/b-from-a ingress[0]")),
        "{e:#}"
    );
    let e = t.json(&[
        "explain",
        "--from",
        "demo/a",
        "--to",
        &t.ip("b").to_string(),
        "--port",
        "80",
        "--protocol",
        "udp",
    ]);
    assert_eq!(e["verdict"], "allowed");
    assert_eq!(e["to"]["pod"], "demo/b");
    assert_eq!(e["steps"][1]["rule"]["policy"], "b-from-a");
    let e = t.json(&[
        "explain", "--from", "demo/c", "--to", "demo/a", "--port", "81",
    ]);
    assert_eq!(e["verdict"], "dropped");
    assert_eq!(e["steps"][0]["reason"], "no-rule-matched");

    // stats: per-rule counters, drops by reason, maps, conntrack.
    let st = t.json(&["stats"]);
    let b_from_a = st["policies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["policy"] == "demo/b-from-a")
        .expect("per-policy counters");
    assert!(
        b_from_a["packets"].as_u64().unwrap() >= 3,
        "SYN, ACK and data of a -> b at least: {b_from_a}"
    );
    assert!(b_from_a["bytes"].as_u64().unwrap() > 100);
    assert!(st["drops_by_reason"]["no-rule-matched"].as_u64().unwrap() >= 3);
    assert!(st["conntrack"]["entries"].as_u64().unwrap() >= 1);
    let maps: Vec<&str> = st["maps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["map"].as_str().unwrap())
        .collect();
    for m in ["ENDPOINTS", "POLICY", "CIDRS", "IDENTITIES", "CT_FLOWS"] {
        assert!(maps.contains(&m), "{maps:?}");
    }
    assert!(st["events"]["recorded"].as_u64().unwrap() >= 4);

    // Only root gets in: the socket is 0600 in a 0700 directory.
    use std::os::unix::fs::PermissionsExt;
    let sock = t.agent.socket();
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(sock), 0o600);
    assert_eq!(mode(sock.parent().unwrap()), 0o700);
    let out = t.agent.cli_as_nobody(&["stats"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("Permission denied"),
        "nobody must not reach the socket: {err}"
    );

    // Prometheus.
    let m = t.metrics();
    assert!(m.starts_with("HTTP/1.1 200"), "{m}");
    assert!(
        m.contains(
            r#"palisade_verdicts_total{namespace="demo",policy="b-from-a",verdict="allowed"}"#
        ),
        "{m}"
    );
    assert!(
        m.contains(
            r#"palisade_rule_packets_total{namespace="demo",policy="b-from-a",rule="ingress[0]"}"#
        ),
        "{m}"
    );
    assert!(
        m.contains(r#"palisade_verdicts_total{namespace="demo",policy="b-from-a,default-deny-ingress",verdict="dropped"}"#),
        "{m}"
    );
    assert!(
        m.contains(r#"palisade_drops_total{reason="no-rule-matched"}"#),
        "{m}"
    );
    assert!(
        m.contains(r#"palisade_map_fill_ratio{map="POLICY"}"#),
        "{m}"
    );
    assert!(
        m.contains("palisade_enforcement_latency_seconds_bucket"),
        "{m}"
    );
    assert!(m.contains("palisade_events_suppressed_total"), "{m}");
}

#[test]
fn follow_streams_new_verdicts() {
    if !require_root() {
        return;
    }
    let t = setup("follow", POLICIES, &[]);
    let mut child = t
        .agent
        .cli(&["verdicts", "--follow", "--pod", "demo/c", "-o", "json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!t.can("c", "b", 80, Proto::Tcp));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = None;
    while Instant::now() < deadline {
        if let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) {
            let v: Value = serde_json::from_str(&line).expect("one JSON verdict per line");
            assert!(
                s(&v, &["source", "pod"]) == "demo/c" || s(&v, &["destination", "pod"]) == "demo/c"
            );
            if v["verdict"] == "dropped" && s(&v, &["destination", "pod"]) == "demo/b" {
                seen = Some(v);
                break;
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.is_some(), "the denial was streamed");
}

const AUDIT_POLICIES: &str = r#"
# b: selected only by an audit policy -> its denials are "would drop".
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: audit-b, namespace: demo, annotations: {palisade.io/audit: "true"}}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: a}}}]
      ports: [{port: 80, protocol: TCP}]
---
# c: an enforcing policy isolates it; an audit policy's allow must not open anything.
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: enforce-c, namespace: demo}
spec:
  podSelector: {matchLabels: {app: c}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: a}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: audit-c, namespace: demo, annotations: {palisade.io/audit: "true"}}
spec:
  podSelector: {matchLabels: {app: c}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: b}}}]
"#;

#[test]
fn audit_policies_record_would_drop_and_do_not_drop() {
    if !require_root() {
        return;
    }
    let t = setup("audit", AUDIT_POLICIES, &[]);
    assert!(t.can("c", "b", 80, Proto::Tcp), "audited denial passes");
    assert!(
        t.can("c", "b", 80, Proto::Udp),
        "audited denial passes (UDP)"
    );
    assert!(
        t.can("a", "b", 80, Proto::Tcp),
        "allowed by the audit policy"
    );
    assert!(
        !t.can("b", "c", 80, Proto::Tcp),
        "audit allows open nothing"
    );
    assert!(t.can("a", "c", 80, Proto::Tcp), "enforcing allow");

    let list = t.verdicts_until(&[], |l| {
        find(l, "would-drop", "demo/c", "demo/b", 80).is_some()
            && find(l, "dropped", "demo/b", "demo/c", 80).is_some()
    });
    let would = find(&list, "would-drop", "demo/c", "demo/b", 80)
        .unwrap_or_else(|| panic!("would-drop recorded: {list:#?}"));
    assert_eq!(would["policies"], serde_json::json!(["demo/audit-b"]));
    assert_eq!(s(would, &["reason"]), "no-rule-matched");
    assert!(
        find(&list, "dropped", "demo/c", "demo/b", 80).is_none(),
        "nothing dropped at b"
    );
    let allowed = find(&list, "allowed", "demo/a", "demo/b", 80).expect("a -> b recorded");
    assert_eq!(allowed["rule"]["policy"], "audit-b");
    assert_eq!(allowed["rule"]["audit"], true);
    let real = find(&list, "dropped", "demo/b", "demo/c", 80).unwrap();
    assert_eq!(real["policies"], serde_json::json!(["demo/enforce-c"]));
    // The rest of an audited flow is not recorded again.
    let would_tcp = list
        .iter()
        .filter(|v| {
            v["verdict"] == "would-drop"
                && s(v, &["source", "pod"]) == "demo/c"
                && s(v, &["protocol"]) == "TCP"
        })
        .count();
    assert_eq!(would_tcp, 1, "one would-drop per audited flow");

    let b = t.json(&["policy", "show", "demo/b"]);
    assert_eq!(b["ingress"]["audit"], true);
    assert_eq!(b["ingress"]["rules"][0]["rule"]["audit"], true);
    let c = t.json(&["policy", "show", "demo/c"]);
    assert_eq!(c["ingress"]["audit"], false);
    assert_eq!(
        c["ingress"]["policies"],
        serde_json::json!(["demo/enforce-c"])
    );
    assert_eq!(
        c["ingress"]["audit_ignored"],
        serde_json::json!(["demo/audit-c"])
    );

    let e = t.json(&[
        "explain", "--from", "demo/c", "--to", "demo/b", "--port", "80",
    ]);
    assert_eq!(e["verdict"], "would-drop");
    let e = t.json(&[
        "explain", "--from", "demo/b", "--to", "demo/c", "--port", "80",
    ]);
    assert_eq!(e["verdict"], "dropped");

    let st = t.json(&["stats"]);
    assert!(
        st["would_drop_by_reason"]["no-rule-matched"]
            .as_u64()
            .unwrap()
            >= 2
    );
    assert!(st["conntrack"]["audited"].as_u64().unwrap() >= 1);
}

const ENFORCING: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: demo}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: a}}}]
"#;

#[test]
fn node_wide_audit_mode() {
    if !require_root() {
        return;
    }
    let t = setup("audit-all", ENFORCING, &["--audit"]);
    assert!(t.can("c", "b", 80, Proto::Tcp), "run --audit drops nothing");
    let list = t.verdicts_until(&["--verdict", "would-drop"], |l| {
        find(l, "would-drop", "demo/c", "demo/b", 80).is_some()
    });
    let v = find(&list, "would-drop", "demo/c", "demo/b", 80).expect("recorded");
    assert_eq!(v["policies"], serde_json::json!(["demo/b-from-a"]));
    let b = t.json(&["policy", "show", "demo/b"]);
    assert_eq!(b["ingress"]["audit"], true);
}

const FLOOD: u64 = 3000;

#[test]
fn flood_of_denied_packets_is_rate_limited_and_counted() {
    if !require_root() {
        return;
    }
    // Only b is isolated: the flood from c meets b's ingress and nothing else.
    let t = setup("flood", ENFORCING, &[]);
    let target = SocketAddr::new(t.ip("b"), 80);
    let started = Instant::now();
    t.pod("c")
        .in_netns(move || {
            let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
            for i in 0..FLOOD {
                let _ = sock.send_to(&i.to_be_bytes(), target);
            }
        })
        .unwrap();
    let flood_secs = started.elapsed().as_secs_f64();
    // The allowed peer is still recorded afterwards (the bucket refills at the rate).
    std::thread::sleep(Duration::from_millis(1200));
    assert!(t.can("a", "b", 80, Proto::Tcp), "a -> b still allowed");
    let list = t.verdicts_until(&["--pod", "demo/b"], |l| {
        find(l, "allowed", "demo/a", "demo/b", 80).is_some()
    });
    assert!(
        find(&list, "allowed", "demo/a", "demo/b", 80).is_some(),
        "the flood did not starve later verdicts"
    );
    let flood_events = list
        .iter()
        .filter(|v| {
            v["verdict"] == "dropped"
                && s(v, &["endpoint"]) == "demo/b"
                && s(v, &["source", "pod"]) == "demo/c"
                && s(v, &["protocol"]) == "UDP"
        })
        .count() as u64;
    let budget = EVENT_BURST + (EVENT_RATE_PER_SEC as f64 * (flood_secs + 0.5)) as u64;
    assert!(
        flood_events <= budget,
        "{flood_events} events for a {FLOOD}-packet flood in {flood_secs:.2} s (budget {budget})"
    );
    assert!(
        flood_events >= EVENT_BURST / 2,
        "the flood was recorded at all"
    );

    let st = t.json(&["stats"]);
    let suppressed = st["events"]["suppressed_by_endpoint"]["demo/b"]
        .as_u64()
        .unwrap_or(0);
    assert!(
        suppressed + flood_events >= FLOOD,
        "every refused event is counted: {suppressed} suppressed + {flood_events} recorded < {FLOOD}"
    );
    assert!(st["events"]["suppressed"].as_u64().unwrap() >= suppressed);
    assert!(st["drops_by_reason"]["no-rule-matched"].as_u64().unwrap() >= FLOOD);
    let m = t.metrics();
    let line = m
        .lines()
        .find(|l| l.starts_with("palisade_events_suppressed_total "))
        .unwrap_or_else(|| panic!("{m}"));
    let n: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(n >= suppressed, "{line}");
}
