//! `kubectl palisade` on the multi-node rig (`palisade_tests::multinode`): three nodes, an
//! agent each in cluster mode against one fake API server, which also serves the DaemonSet's
//! pods in `palisade-system`, workload pod lookups and each agent pod's `exec` (a WebSocket
//! speaking the exec subprotocol; the command runs the node's `palisade` CLI against that
//! node's agent socket). The plugin is the `palisade` binary linked as `kubectl-palisade`, run
//! on the fabric where the API server listens (as an operator's kubectl would: it reaches the
//! API server, never a node), with the rig's kubeconfig.
//!
//! Namespace shop: `frontend` on node-1, `db` and `cache` on node-2, `backend` on node-3.
//! `db-from-backend` admits only the backend to the db on TCP 5432, `backend-from-frontend`
//! only the frontend to the backend on 8080. So frontend -> db:5432 is refused by node-2 (the
//! db's ingress) after node-1 let it out (the frontend's egress): the walk-through of README.md,
//! "Operating it", whose output is this test's (`--nocapture`). Needs root; under CI=true that
//! is a failure, not a skip.
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

/// An ingress policy of namespace shop: pods `app: to` admit pods `app: from` on TCP `port`.
fn ingress_policy(name: &str, to: &str, from: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: shop}}\n\
         spec: {{podSelector: {{matchLabels: {{app: {to}}}}}, policyTypes: [Ingress], \
         ingress: [{{from: [{{podSelector: {{matchLabels: {{app: {from}}}}}}}], ports: [{{port: {port}, protocol: TCP}}]}}]}}\n"
    )
}

/// The pods of each node.
const LAYOUT: [&[&str]; 3] = [&["frontend"], &["db", "cache"], &["backend"]];

/// Pod `name` on node `k` in the API (namespace shop, `app: name`).
fn pod_object(c: &Cluster, name: &str, k: usize) -> String {
    let ip = c
        .find_pod(name)
        .expect("a pod of the rig")
        .1
        .ip(false)
        .to_string();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
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

/// A TCP probe between two pods of the rig.
fn probe<'c>(c: &'c Cluster, from: &str, to: &str, port: u16) -> ProbeSpec<'c> {
    ProbeSpec {
        from: c.find_pod(from).unwrap().1,
        to: c.find_pod(to).unwrap().1.ip(false),
        port,
        proto: Proto::Tcp,
        timeout: Duration::from_millis(800),
    }
}

/// The dropped verdicts of frontend -> db in a `verdicts -o json` answer.
fn frontend_to_db_drops(v: &Value) -> Vec<Value> {
    v["verdicts"]
        .as_array()
        .expect("verdicts")
        .iter()
        .filter(|v| {
            v["source"]["pod"] == "shop/frontend"
                && v["destination"]["pod"] == "shop/db"
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
    let nodes: Vec<Vec<PodSpec>> = LAYOUT
        .iter()
        .map(|pods| {
            pods.iter()
                .map(|p| PodSpec {
                    name: p.to_string(),
                })
                .collect()
        })
        .collect();
    let mut c = Cluster::new(ClusterSpec { nodes, ipv6: false }).expect("cluster");
    for node in c.nodes() {
        node.serve(&[(5432, Proto::Tcp), (8080, Proto::Tcp)])
            .expect("servers");
    }
    c.api.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {kubernetes.io/metadata.name: shop}}\n",
    );
    for (k, pods) in LAYOUT.iter().enumerate() {
        for p in *pods {
            let o = pod_object(&c, p, k);
            c.api.apply(&o);
        }
    }
    c.api
        .apply(&ingress_policy("db-from-backend", "db", "backend", 5432));
    c.api.apply(&ingress_policy(
        "backend-from-frontend",
        "backend",
        "frontend",
        8080,
    ));
    let work = WorkDir::new("kubectl");
    let agent = agent_binary();
    c.start_agents(&agent, work.path(), Duration::from_secs(60))
        .expect("three agents enforce their pods");
    c.serve_agent_pods(&agent).expect("the agents' pods");
    let flows = [
        ("frontend", "backend", 8080, true), // node-1 -> node-3
        ("backend", "db", 5432, true),       // node-3 -> node-2
        ("frontend", "db", 5432, false),     // refused by node-2
        ("cache", "db", 5432, false),        // within node-2
    ];
    let specs: Vec<ProbeSpec<'_>> = flows
        .iter()
        .map(|(f, t, p, _)| probe(&c, f, t, *p))
        .collect();
    let want: Vec<bool> = flows.iter().map(|f| f.3).collect();
    assert_eq!(probe_expecting(&specs, &want), want, "{flows:?}");

    let bin = plugin_link(work.path(), &agent);
    let p = Plugin {
        cluster: &c,
        bin: bin.clone(),
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

    // verdicts --verdict dropped: frontend -> db dropped by node-2, at the db's ingress.
    let drops = p.run_until(&["verdicts", "--verdict", "dropped", "-o", "json"], |r| {
        r.code == 0 && !frontend_to_db_drops(&r.json()).is_empty()
    });
    drops.expect(0);
    let found = frontend_to_db_drops(&drops.json());
    assert!(
        !found.is_empty(),
        "no drop of frontend -> db: {}",
        drops.stdout
    );
    for v in &found {
        assert_eq!(v["node"], "node-2", "{v}");
        assert_eq!(v["direction"], "ingress", "{v}");
        assert_eq!(v["policies"], json!(["shop/db-from-backend"]), "{v}");
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
        table.stdout.lines().any(|l| l.starts_with("node-2")
            && l.contains("shop/frontend")
            && l.contains("dropped")),
        "{}",
        table.stdout
    );
    four_formats(
        &p,
        &[
            "verdicts",
            "--verdict",
            "dropped",
            "--from-pod",
            "shop/frontend",
        ],
        0,
        "node-2",
    );
    // Every node's verdicts: node-1 judged the frontend's egress, node-2 and node-3 their
    // pods' ingress.
    let everything = p.run(&["verdicts"]);
    everything.show().expect(0);
    let everything = p.run(&["verdicts", "-o", "json"]).json();
    let judged_by: std::collections::BTreeSet<&str> = everything["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["node"].as_str().unwrap())
        .collect();
    assert_eq!(
        judged_by,
        ["node-1", "node-2", "node-3"].into(),
        "{everything}"
    );
    let last = p.run(&["verdicts", "--last", "2", "-o", "json"]).json();
    assert_eq!(
        last["verdicts"].as_array().unwrap().len(),
        2,
        "--last over the cluster"
    );

    // explain: each half from its node, the flow's verdict, explain's exit status.
    let execs = |c: &Cluster| -> Vec<u64> {
        (0..3)
            .map(|k| {
                c.api
                    .requests(&format!("exec palisade-system/{}", agent_pod_name(k)))
            })
            .collect()
    };
    let before = execs(&c);
    let refused = p.run(&[
        "explain",
        "--from",
        "shop/frontend",
        "--to",
        "shop/db",
        "--port",
        "5432",
    ]);
    refused.show().expect(1);
    assert_eq!(
        execs(&c),
        [before[0] + 1, before[1] + 1, before[2]],
        "asked node-1 (the source's) and node-2 (the destination's), not node-3"
    );
    for line in [
        "TCP/5432: DROPPED",
        "egress of shop/frontend (on node-1): allowed",
        "ingress of shop/db (on node-2): dropped",
        "shop/db-from-backend ingress[0] allows TCP/5432, but only from pods shop/backend",
    ] {
        assert!(
            refused.stdout.contains(line),
            "{line:?} in {}",
            refused.stdout
        );
    }
    let e = four_formats(
        &p,
        &[
            "explain",
            "--from",
            "shop/frontend",
            "--to",
            "shop/db",
            "--port",
            "5432",
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
        "explain",
        "--from",
        "shop/backend",
        "--to",
        "shop/db",
        "--port",
        "5432",
    ]);
    allowed.show().expect(0);
    assert!(
        allowed.stdout.contains("TCP/5432: ALLOWED"),
        "{}",
        allowed.stdout
    );
    // Within one node: one agent answers both halves.
    let within = p.run(&[
        "explain",
        "--from",
        "shop/cache",
        "--to",
        "shop/db",
        "--port",
        "5432",
        "-o",
        "json",
    ]);
    within.expect(1);
    let within = within.json();
    assert_eq!(within["nodes"][0]["node"], "node-2");
    assert_eq!(within["nodes"][1]["node"], "node-2");

    // An address at one end: only the pod's node is asked, and the note says what to name.
    let db_ip = c.find_pod("db").unwrap().1.ip(false).to_string();
    let to_ip = p.run(&[
        "explain",
        "--from",
        "shop/frontend",
        "--to",
        &db_ip,
        "--port",
        "5432",
        "-o",
        "json",
    ]);
    to_ip.expect(0);
    let to_ip = to_ip.json();
    assert_eq!(to_ip["nodes"].as_array().unwrap().len(), 1, "{to_ip}");
    assert!(
        to_ip["notes"][0]
            .as_str()
            .unwrap()
            .contains("name the pod (shop/db)"),
        "{to_ip}"
    );

    // policy show, on the pod's node.
    let shown = p.run(&["policy", "show", "shop/db"]);
    shown.show().expect(0);
    assert!(
        shown.stdout.starts_with(&format!(
            "node node-2 (agent pod {})\nshop/db",
            agent_pod_name(1)
        )),
        "{}",
        shown.stdout
    );
    let policy = four_formats(
        &p,
        &["policy", "show", "shop/db"],
        0,
        "shop/db-from-backend",
    );
    assert_eq!(policy["node"], "node-2");
    assert_eq!(policy["pod"], "shop/db");
    assert_eq!(policy["ingress"]["isolated"], true);
    assert_eq!(
        policy["ingress"]["policies"],
        json!(["shop/db-from-backend"])
    );
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
        count(&nodes[1]["stats"], "dropped") >= 2,
        "node-2 dropped two flows"
    );
    assert_eq!(
        count(&nodes[0]["stats"], "dropped"),
        0,
        "node-1 dropped nothing"
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

    // --follow: the history, then what node-2 and node-3 record, as it comes, JSON lines.
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
    // The history first (the drops so far).
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
    // New drops on two nodes: frontend -> db (node-2 judges the db's ingress) and db ->
    // backend (node-3 judges the backend's).
    let again = [
        probe(&c, "frontend", "db", 5432),
        probe(&c, "db", "backend", 8080),
    ];
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
        ["node-2".to_string(), "node-3".to_string()].into(),
        "live verdicts from both nodes, merged: {live:#?}\nhistory: {history:#?}\nstderr: {}",
        String::from_utf8_lossy(&followed.stderr)
    );

    // A missing pod: explain says so and exits 2; policy show exits 1.
    let missing = p.run(&[
        "explain",
        "--from",
        "shop/nope",
        "--to",
        "shop/db",
        "--port",
        "5432",
    ]);
    missing.show().expect(2);
    assert!(
        missing.stderr.contains("pod shop/nope not found"),
        "{}",
        missing.stderr
    );
    let missing = p.run(&["policy", "show", "shop/nope"]);
    missing.expect(1);
    assert!(
        missing.stderr.contains("pod shop/nope not found"),
        "{}",
        missing.stderr
    );

    // The policy that allows the refused flow: once its node enforces it, explain says so.
    drop(p);
    c.api
        .apply(&ingress_policy("db-from-frontend", "db", "frontend", 5432));
    c.wait_reconciled(Duration::from_secs(60))
        .expect("every agent applies the new policy");
    let p = Plugin {
        cluster: &c,
        bin: bin.clone(),
    };
    let fixed = p.run(&[
        "explain",
        "--from",
        "shop/frontend",
        "--to",
        "shop/db",
        "--port",
        "5432",
    ]);
    fixed.show().expect(0);
    assert!(
        fixed.stdout.contains(
            "ingress of shop/db (on node-2): allowed by shop/db-from-frontend ingress[0]"
        ),
        "{}",
        fixed.stdout
    );
    assert_eq!(
        probe_expecting(&[probe(&c, "frontend", "db", 5432)], &[true]),
        [true],
        "and the datapath lets it through"
    );

    // node-3's agent killed: named as not answering, the others still answer.
    drop(p);
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
    let v = p.run(&["verdicts", "--verdict", "dropped"]);
    v.show().expect(1);
    assert!(v.stderr.contains(&node3), "{}", v.stderr);
    let v = p.run(&["verdicts", "--verdict", "dropped", "-o", "json"]);
    v.expect(1);
    let v = v.json();
    assert!(!frontend_to_db_drops(&v).is_empty(), "node-2 still answers");
    assert_eq!(v["failures"][0]["node"], "node-3");
    // explain and policy show read the node's pinned maps, which enforce while the agent is
    // down: node-3 still answers its half.
    let e = p.run(&[
        "explain",
        "--from",
        "shop/backend",
        "--to",
        "shop/db",
        "--port",
        "5432",
    ]);
    e.show().expect(0);
    assert!(
        e.stdout
            .contains("egress of shop/backend (on node-3): allowed"),
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
        "explain",
        "--from",
        "shop/backend",
        "--to",
        "shop/db",
        "--port",
        "5432",
    ]);
    e.show().expect(2);
    assert!(e.stderr.contains(&node3), "{}", e.stderr);
    assert!(e.stderr.contains("Pending, not Running"), "{}", e.stderr);
    p.run(&["agents"]).show().expect(0);
}
