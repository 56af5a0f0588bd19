//! `kubectl palisade` on the multi-node rig (`palisade_tests::multinode`): three nodes, an
//! agent each in cluster mode against one fake API server, which also serves the DaemonSet's
//! pods in `palisade-system`, workload pod lookups and each agent pod's `exec` (a WebSocket
//! speaking the exec subprotocol; the command runs the node's `palisade` CLI against that
//! node's agent socket). The plugin is the `palisade` binary linked as `kubectl-palisade`, run
//! on the fabric where the API server listens (as an operator's kubectl would: it reaches the
//! API server, never a node), with the rig's kubeconfig.
//!
//! Pods a0, b0 on node-1, a1, b1 on node-2, a2, b2 on node-3 (namespace demo); `b-ingress`
//! admits only `app: a` pods to `app: b` pods on TCP 80, so b0 -> b1:80 is dropped, by node-2
//! (b1's ingress), while node-1 allows its egress. Needs root; under CI=true that is a
//! failure, not a skip.
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use palisade_tests::{
    agent::{WorkDir, agent_binary},
    multinode::{Cluster, ClusterSpec, agent_pod_name, node_name},
    rig::{PodSpec, ProbeSpec, Proto, probe_expecting, require_root},
};
use serde_json::{Value, json};

const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-ingress, namespace: demo}\n\
    spec: {podSelector: {matchLabels: {app: b}}, policyTypes: [Ingress], ingress: [{from: [{podSelector: {matchLabels: {app: a}}}], ports: [{port: 80, protocol: TCP}]}]}\n";

/// Pod `name` on node `k` in the API (namespace demo, `app:` its first letter).
fn pod_object(c: &Cluster, name: &str, k: usize) -> String {
    let ip = c
        .find_pod(name)
        .expect("a pod of the rig")
        .1
        .ip(false)
        .to_string();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "labels": {"app": &name[..1]}},
        "spec": {"nodeName": node_name(k), "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
    .to_string()
}

/// A run of the plugin: its exit status and output.
struct Run {
    args: String,
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn from(args: &[&str], o: Output) -> Run {
        Run {
            args: args.join(" "),
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "{}: not JSON ({e}): {}\n{}",
                self.args, self.stdout, self.stderr
            )
        })
    }

    fn yaml(&self) -> Value {
        serde_saphyr::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!(
                "{}: not YAML ({e}): {}\n{}",
                self.args, self.stdout, self.stderr
            )
        })
    }

    /// Shows the run as an operator would see it (the test's output is the README's source).
    fn show(&self) -> &Self {
        eprintln!(
            "$ kubectl palisade {}\n{}{}",
            self.args, self.stdout, self.stderr
        );
        self
    }

    fn expect(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "kubectl palisade {}: exit status\nstdout:\n{}\nstderr:\n{}",
            self.args, self.stdout, self.stderr
        );
        self
    }
}

struct Plugin<'c> {
    cluster: &'c Cluster,
    /// `kubectl-palisade`, a link to the `palisade` binary.
    bin: PathBuf,
}

impl Plugin<'_> {
    fn command(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = self.cluster.operator_command(&self.bin);
        cmd.arg("--kubeconfig")
            .arg(self.cluster.kubeconfig().expect("agents started"))
            .args(args)
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Run {
        Run::from(
            args,
            self.command(args)
                .output()
                .expect("running kubectl-palisade"),
        )
    }

    /// Runs `args` until `ok` says its answer is complete (verdicts reach the agents' history
    /// a moment after the packets), at most 15 s.
    fn run_until(&self, args: &[&str], ok: impl Fn(&Run) -> bool) -> Run {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let r = self.run(args);
            if ok(&r) || Instant::now() > deadline {
                return r;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The link kubectl finds a plugin by: `kubectl-palisade` on the PATH, the `palisade`
/// binary.
fn plugin_link(work: &Path, agent: &Path) -> PathBuf {
    let dir = work.join("bin");
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("kubectl-palisade");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(agent, &link).unwrap();
    link
}

/// The dropped verdicts of b0 -> b1:80 in a `verdicts -o json` answer.
fn b0_to_b1_drops(v: &Value) -> Vec<Value> {
    v["verdicts"]
        .as_array()
        .expect("verdicts")
        .iter()
        .filter(|v| {
            v["source"]["pod"] == "demo/b0"
                && v["destination"]["pod"] == "demo/b1"
                && v["verdict"] == "dropped"
        })
        .cloned()
        .collect()
}

/// Every read command takes the four formats: table and wide say the same rows, JSON and
/// YAML the same data.
fn four_formats(p: &Plugin<'_>, args: &[&str], ok_code: i32, table_has: &str) -> Value {
    let with = |o: &str| {
        let mut a = args.to_vec();
        a.extend(["-o", o]);
        p.run(&a)
    };
    let table = with("table");
    table.expect(ok_code);
    assert!(
        table.stdout.contains(table_has),
        "{}:\n{}",
        table.args,
        table.stdout
    );
    let wide = with("wide");
    wide.expect(ok_code);
    assert!(
        wide.stdout.contains(table_has),
        "{}:\n{}",
        wide.args,
        wide.stdout
    );
    let json = with("json");
    json.expect(ok_code);
    let yaml = with("yaml");
    yaml.expect(ok_code);
    let (j, y) = (json.json(), yaml.yaml());
    assert_eq!(
        strip_volatile(&j),
        strip_volatile(&y),
        "{}: JSON and YAML carry the same data",
        json.args
    );
    j
}

/// Counters that move between two runs (the agents keep counting), and floats.
fn strip_volatile(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| {
                    !matches!(
                        k.as_str(),
                        "counters"
                            | "conntrack"
                            | "events"
                            | "maps"
                            | "policies"
                            | "total"
                            | "drops_by_reason"
                            | "reconcile"
                            | "fqdn"
                            | "ct_hit"
                    )
                })
                .map(|(k, v)| (k.clone(), strip_volatile(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(strip_volatile).collect()),
        other => other.clone(),
    }
}

#[test]
fn kubectl_palisade_answers_for_the_whole_cluster_from_each_nodes_agent() {
    if !require_root() {
        return;
    }
    let nodes: Vec<Vec<PodSpec>> = (0..3)
        .map(|k| {
            ["a", "b"]
                .iter()
                .map(|p| PodSpec {
                    name: format!("{p}{k}"),
                })
                .collect()
        })
        .collect();
    let mut c = Cluster::new(ClusterSpec { nodes, ipv6: false }).expect("cluster");
    for node in c.nodes() {
        node.serve(&[(80, Proto::Tcp)]).expect("servers");
    }
    c.api.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {kubernetes.io/metadata.name: demo}}\n",
    );
    for k in 0..3 {
        for p in ["a", "b"] {
            let o = pod_object(&c, &format!("{p}{k}"), k);
            c.api.apply(&o);
        }
    }
    c.api.apply(POLICY);
    let work = WorkDir::new("kubectl");
    let agent = agent_binary();
    c.start_agents(&agent, work.path(), Duration::from_secs(60))
        .expect("three agents enforce their pods");
    c.serve_agent_pods(&agent).expect("the agents' pods");
    let probe = |from: &str, to: &str| ProbeSpec {
        from: c.find_pod(from).unwrap().1,
        to: c.find_pod(to).unwrap().1.ip(false),
        port: 80,
        proto: Proto::Tcp,
        timeout: Duration::from_millis(800),
    };
    let flows = [("a0", "b1", true), ("b0", "b1", false), ("a1", "b1", true)];
    let specs: Vec<ProbeSpec<'_>> = flows.iter().map(|(f, t, _)| probe(f, t)).collect();
    let want: Vec<bool> = flows.iter().map(|f| f.2).collect();
    assert_eq!(probe_expecting(&specs, &want), want, "{flows:?}");

    let p = Plugin {
        cluster: &c,
        bin: plugin_link(work.path(), &agent),
    };

    // The agent pods, one per node.
    four_formats(&p, &["agents"], 0, &agent_pod_name(0));
    p.run(&["agents"]).show().expect(0);
    let listed = p.run(&["agents", "-o", "json"]).json();
    let listed: Vec<(String, String)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["node"].as_str().unwrap().into(),
                a["pod"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        (0..3)
            .map(|k| (node_name(k), agent_pod_name(k)))
            .collect::<Vec<_>>()
    );

    // verdicts --verdict dropped: b0 -> b1 dropped by node-2, at b1's ingress.
    let drops = p.run_until(&["verdicts", "--verdict", "dropped", "-o", "json"], |r| {
        r.code == 0 && !b0_to_b1_drops(&r.json()).is_empty()
    });
    drops.expect(0);
    let found = b0_to_b1_drops(&drops.json());
    assert!(!found.is_empty(), "no drop of b0 -> b1: {}", drops.stdout);
    for v in &found {
        assert_eq!(v["node"], "node-2", "{v}");
        assert_eq!(v["direction"], "ingress", "{v}");
        assert_eq!(v["policies"], json!(["demo/b-ingress"]), "{v}");
    }
    let all = drops.json();
    let times: Vec<u64> = all["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["time_unix_ms"].as_u64().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "merged by time: {times:?}"
    );
    assert!(all["failures"].as_array().unwrap().is_empty());
    let table = p.run(&["verdicts", "--verdict", "dropped"]);
    table.show().expect(0);
    assert!(
        table
            .stdout
            .lines()
            .next()
            .unwrap()
            .starts_with("NODE    TIME (UTC)"),
        "{}",
        table.stdout
    );
    assert!(
        table
            .stdout
            .lines()
            .any(|l| l.starts_with("node-2") && l.contains("demo/b0") && l.contains("dropped")),
        "{}",
        table.stdout
    );
    four_formats(
        &p,
        &["verdicts", "--verdict", "dropped", "--to-pod", "demo/b1"],
        0,
        "node-2",
    );
    // Every node's verdicts: node-1 judged a0's and b0's egress, node-2 the ingress.
    let everything = p.run(&["verdicts", "-o", "json"]).json();
    let judged_by: std::collections::BTreeSet<&str> = everything["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["node"].as_str().unwrap())
        .collect();
    assert!(
        judged_by.contains("node-1") && judged_by.contains("node-2"),
        "{judged_by:?}"
    );
    let last = p.run(&["verdicts", "--last", "2", "-o", "json"]).json();
    assert_eq!(
        last["verdicts"].as_array().unwrap().len(),
        2,
        "--last over the cluster"
    );

    // explain: each half from its node, the flow's verdict, explain's exit status.
    let before = (
        c.api
            .requests(&format!("exec palisade-system/{}", agent_pod_name(0))),
        c.api
            .requests(&format!("exec palisade-system/{}", agent_pod_name(1))),
        c.api
            .requests(&format!("exec palisade-system/{}", agent_pod_name(2))),
    );
    let dropped = p.run(&[
        "explain", "--from", "demo/b0", "--to", "demo/b1", "--port", "80",
    ]);
    dropped.show().expect(1);
    assert_eq!(
        (
            c.api
                .requests(&format!("exec palisade-system/{}", agent_pod_name(0))),
            c.api
                .requests(&format!("exec palisade-system/{}", agent_pod_name(1))),
            c.api
                .requests(&format!("exec palisade-system/{}", agent_pod_name(2))),
        ),
        (before.0 + 1, before.1 + 1, before.2),
        "asked node-1 (the source's) and node-2 (the destination's), not node-3"
    );
    assert!(
        dropped.stdout.starts_with("demo/b0 ("),
        "{}",
        dropped.stdout
    );
    assert!(
        dropped.stdout.contains("TCP/80: DROPPED"),
        "{}",
        dropped.stdout
    );
    assert!(
        dropped
            .stdout
            .contains("egress of demo/b0 (on node-1): allowed"),
        "{}",
        dropped.stdout
    );
    assert!(
        dropped
            .stdout
            .contains("ingress of demo/b1 (on node-2): dropped"),
        "{}",
        dropped.stdout
    );
    let e = four_formats(
        &p,
        &[
            "explain", "--from", "demo/b0", "--to", "demo/b1", "--port", "80",
        ],
        1,
        "DROPPED",
    );
    assert_eq!(e["verdict"], "dropped");
    assert_eq!(e["steps"][0]["direction"], "egress");
    assert_eq!(e["steps"][0]["verdict"], "allowed");
    assert_eq!(e["steps"][1]["direction"], "ingress");
    assert_eq!(e["steps"][1]["verdict"], "dropped");
    assert_eq!(e["nodes"][0]["node"], "node-1");
    assert_eq!(e["nodes"][0]["agent"], agent_pod_name(0).as_str());
    assert_eq!(e["nodes"][1]["node"], "node-2");
    let allowed = p.run(&[
        "explain", "--from", "demo/a0", "--to", "demo/b1", "--port", "80",
    ]);
    allowed.show().expect(0);
    assert!(
        allowed.stdout.contains("TCP/80: ALLOWED"),
        "{}",
        allowed.stdout
    );
    // Within one node: one agent answers both halves.
    let within = p.run(&[
        "explain", "--from", "demo/a1", "--to", "demo/b1", "--port", "80", "-o", "json",
    ]);
    within.expect(0);
    let within = within.json();
    assert_eq!(within["nodes"][0]["node"], "node-2");
    assert_eq!(within["nodes"][1]["node"], "node-2");

    // policy show, on the pod's node.
    let shown = p.run(&["policy", "show", "demo/b1"]);
    shown.show().expect(0);
    assert!(
        shown.stdout.starts_with(&format!(
            "node node-2 (agent pod {})\ndemo/b1",
            agent_pod_name(1)
        )),
        "{}",
        shown.stdout
    );
    let policy = four_formats(&p, &["policy", "show", "demo/b1"], 0, "demo/b-ingress");
    assert_eq!(policy["node"], "node-2");
    assert_eq!(policy["pod"], "demo/b1");
    assert_eq!(policy["ingress"]["isolated"], true);
    assert_eq!(policy["ingress"]["policies"], json!(["demo/b-ingress"]));
    assert_eq!(policy["egress"]["isolated"], false);

    // stats: per node and summed.
    let stats = p.run(&["stats"]);
    stats.show().expect(0);
    let lines: Vec<&str> = stats.stdout.lines().collect();
    assert!(
        lines[0].starts_with("NODE    AGENT POD"),
        "{}",
        stats.stdout
    );
    for k in 0..3 {
        assert!(
            lines[k + 1].starts_with(&format!("node-{}  {}", k + 1, agent_pod_name(k))),
            "{}",
            stats.stdout
        );
    }
    assert!(lines[4].starts_with("TOTAL"), "{}", stats.stdout);
    let s = four_formats(&p, &["stats"], 0, "TOTAL");
    let count = |v: &Value, k: &str| v["counters"][k].as_u64().unwrap_or(0);
    let nodes = s["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3);
    for key in ["dropped", "new_allowed"] {
        let sum: u64 = nodes.iter().map(|n| count(&n["stats"], key)).sum();
        assert_eq!(
            count(&s["total"], key),
            sum,
            "{key}: the total is the nodes' sum"
        );
    }
    assert!(
        count(&nodes[1]["stats"], "dropped") > 0,
        "node-2 dropped b0 -> b1"
    );
    assert_eq!(
        count(&nodes[2]["stats"], "dropped"),
        0,
        "node-3 dropped nothing"
    );

    // The same as `palisade cluster`, and with KUBECONFIG instead of --kubeconfig.
    let cluster = c
        .operator_command(&agent)
        .args(["cluster", "stats", "-o", "json"])
        .env("KUBECONFIG", c.kubeconfig().unwrap())
        .output()
        .unwrap();
    let cluster = Run::from(&["cluster", "stats"], cluster);
    cluster.expect(0);
    assert_eq!(cluster.json()["nodes"].as_array().unwrap().len(), 3);

    // --follow: the history, then what node-1 and node-2 record, as it comes, JSON lines.
    let mut follow = p
        .command(&["verdicts", "--follow", "--verdict", "dropped", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("following");
    let (tx, rx) = mpsc::channel::<String>();
    let stdout = follow.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // The history first (b0 -> b1 drops).
    let first = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("the history");
    let first: Value = serde_json::from_str(&first).expect("a JSON line");
    assert_eq!(first["verdict"], "dropped");
    std::thread::sleep(Duration::from_millis(1000));
    // The rest of the history (the streams repeat none of it).
    let history: Vec<String> = std::iter::once(first.to_string())
        .chain(rx.try_iter())
        .collect();
    // New drops on two nodes: b0 -> b1 (node-2 judges) and b2 -> b0 (node-1 judges b0's
    // ingress).
    let again = [probe("b0", "b1"), probe("b2", "b0")];
    assert_eq!(probe_expecting(&again, &[false, false]), [false, false]);
    let mut live_nodes = std::collections::BTreeSet::new();
    let mut live = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while live_nodes.len() < 2 && Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert_eq!(v["verdict"], "dropped", "{line}");
        live_nodes.insert(v["node"].as_str().unwrap().to_string());
        live.push(line);
    }
    let _ = follow.kill();
    let followed = follow.wait_with_output().expect("the follower's end");
    eprintln!(
        "$ kubectl palisade verdicts --follow --verdict dropped -o json   (the live lines)\n{}",
        live.join("\n")
    );
    assert_eq!(
        live_nodes,
        ["node-1".to_string(), "node-2".to_string()].into(),
        "live verdicts from both nodes, merged: {live:#?}\nhistory: {history:#?}\nstderr: {}",
        String::from_utf8_lossy(&followed.stderr)
    );

    // A missing pod: explain says so and exits 2; policy show exits 1.
    let missing = p.run(&[
        "explain",
        "--from",
        "demo/nope",
        "--to",
        "demo/b1",
        "--port",
        "80",
    ]);
    missing.show().expect(2);
    assert!(
        missing.stderr.contains("pod demo/nope not found"),
        "{}",
        missing.stderr
    );
    let missing = p.run(&["policy", "show", "demo/nope"]);
    missing.expect(1);
    assert!(
        missing.stderr.contains("pod demo/nope not found"),
        "{}",
        missing.stderr
    );

    // node-3's agent killed: named as not answering, the others still answer.
    let bin = p.bin.clone();
    c.kill_agent(2);
    let p = Plugin { cluster: &c, bin };
    let stats = p.run(&["stats"]);
    stats.show().expect(1);
    let node3 = format!("node node-3 (agent pod {})", agent_pod_name(2));
    assert!(stats.stderr.contains(&node3), "{}", stats.stderr);
    assert!(
        stats
            .stdout
            .lines()
            .any(|l| l.starts_with("node-3") && l.contains("unreachable")),
        "{}",
        stats.stdout
    );
    assert!(
        stats.stdout.contains("Summed over 2 of 3 nodes"),
        "{}",
        stats.stdout
    );
    let s = p.run(&["stats", "-o", "json"]);
    s.expect(1);
    let s = s.json();
    assert!(s["nodes"][0]["stats"].is_object() && s["nodes"][1]["stats"].is_object());
    let error = s["nodes"][2]["error"].as_str().expect("node-3's error");
    assert!(error.contains("connecting to the agent"), "{error}");
    let v = p.run(&["verdicts", "--verdict", "dropped", "-o", "json"]);
    v.expect(1);
    assert!(v.stderr.contains(&node3), "{}", v.stderr);
    let v = v.json();
    assert!(!b0_to_b1_drops(&v).is_empty(), "node-2 still answers");
    assert_eq!(v["failures"][0]["node"], "node-3");
    // explain and policy show read the node's pinned maps, which enforce while the agent is
    // down: node-3 still answers its half.
    let e = p.run(&[
        "explain", "--from", "demo/a2", "--to", "demo/b1", "--port", "80",
    ]);
    e.show().expect(0);
    assert!(
        e.stdout.contains("egress of demo/a2 (on node-3): allowed"),
        "{}",
        e.stdout
    );
    // Its pod not running (the container waits to restart): explain names the node, exits 2.
    let mut pod = c.agent_pod_object(2);
    pod["status"]["phase"] = json!("Pending");
    pod["status"]["containerStatuses"][0]["ready"] = json!(false);
    pod["status"]["containerStatuses"][0]["state"] =
        json!({"waiting": {"reason": "CrashLoopBackOff"}});
    c.api.apply(&pod.to_string());
    let e = p.run(&[
        "explain", "--from", "demo/a2", "--to", "demo/b1", "--port", "80",
    ]);
    e.show().expect(2);
    assert!(e.stderr.contains(&node3), "{}", e.stderr);
    assert!(e.stderr.contains("Pending, not Running"), "{}", e.stderr);
    p.run(&["agents"]).show().expect(0);
}
