//! `cargo xtask demo`: a demo node of netns pods, the standalone agent with the example
//! policies of manifests/examples/, allowed and denied traffic, and what happened.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::PathBuf,
    process::ExitCode,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use clap::Parser;
use palisade_tests::{
    agent::AgentProcess,
    rig::{Node, NodeSpec, PodSpec, ProbeSpec, Proto},
};
use serde_json::Value;

#[derive(Parser)]
struct Args {
    /// The palisade agent binary.
    #[arg(long)]
    agent: PathBuf,
    /// The example manifests (namespaces, pods, policies).
    #[arg(long)]
    examples: PathBuf,
}

/// (from, to, port, expected to connect, why)
const SCENARIOS: &[(&str, &str, u16, bool, &str)] = &[
    (
        "monitoring/prometheus",
        "shop/frontend",
        80,
        true,
        "frontend-public: named port http",
    ),
    (
        "shop/frontend",
        "shop/backend",
        8080,
        true,
        "backend-from-frontend",
    ),
    (
        "shop/db",
        "shop/backend",
        8080,
        false,
        "default-deny-ingress; only the frontend may call",
    ),
    ("shop/backend", "shop/db", 5432, true, "db-from-backend"),
    (
        "shop/frontend",
        "shop/db",
        5432,
        false,
        "default-deny-ingress; only the backend may",
    ),
    (
        "monitoring/prometheus",
        "shop/backend",
        9090,
        true,
        "allow-scrape: 9000-9100 from team=observability",
    ),
    (
        "monitoring/prometheus",
        "shop/frontend",
        9090,
        false,
        "allow-scrape does not select tier=web",
    ),
    (
        "shop/frontend",
        "shop/backend",
        9090,
        false,
        "allow-scrape admits only the monitoring namespace",
    ),
    (
        "shop/db",
        "monitoring/prometheus",
        9090,
        false,
        "db-no-egress",
    ),
    (
        "shop/backend",
        "monitoring/prometheus",
        9090,
        true,
        "monitoring is not isolated",
    ),
];

const SERVED: &[u16] = &[80, 443, 5432, 8080, 9090];

/// A namespace outside the cluster standing for the internet: it owns 203.0.113.0/24.
const INTERNET: &str = "internet";

fn documents(path: &std::path::Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    let docs = palisade_policy::manifest::yaml_documents(&text)
        .with_context(|| format!("{}", path.display()))?;
    Ok(docs.into_iter().filter(|v| !v.is_null()).collect())
}

fn run(args: &Args) -> Result<bool> {
    let pods = documents(&args.examples.join("pods.yaml"))?;
    let names: Vec<String> = pods
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["metadata"]["namespace"].as_str().unwrap_or("default"),
                p["metadata"]["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    println!(
        "Creating a demo node with {} pods: {}",
        names.len(),
        names.join(", ")
    );
    let node = Node::new(NodeSpec {
        pods: names
            .iter()
            .map(|n| n.replace('/', "-"))
            .chain([INTERNET.to_string()])
            .map(|name| PodSpec { name })
            .collect(),
        ipv6: false,
    })?;
    let internet = node.pod(INTERNET).context("the internet namespace")?;
    palisade_tests::netns::ip_batch(
        Some(&internet.netns_name),
        &["route add local 203.0.113.0/24 dev lo".to_string()],
    )?;
    palisade_tests::netns::ip_batch(
        Some(&node.netns_name),
        &[format!(
            "route add 203.0.113.0/24 dev {}",
            internet.host_ifname
        )],
    )?;
    let coredns = node.pod("kube-system-coredns").context("the coredns pod")?;
    let _dns = palisade_tests::dns::DnsServer::start(&coredns.netns_name, dns_zone())?;
    let served: Vec<(u16, Proto)> = SERVED.iter().map(|p| (*p, Proto::Tcp)).collect();
    node.serve(&served)?;
    let ips: BTreeMap<String, IpAddr> = names
        .iter()
        .zip(node.pods())
        .map(|(n, p)| (n.clone(), p.ip(false)))
        .collect();

    let work = std::env::temp_dir().join(format!("palisade-demo-{}", std::process::id()));
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    std::fs::copy(
        args.examples.join("namespaces.yaml"),
        manifests.join("namespaces.yaml"),
    )?;
    std::fs::copy(
        args.examples.join("policies.yaml"),
        manifests.join("policies.yaml"),
    )?;
    let mut text = String::new();
    for (pod, name) in pods.iter().zip(&names) {
        let mut pod = pod.clone();
        let ip = ips[name].to_string();
        pod["status"] = serde_json::json!({"podIP": ip, "podIPs": [{"ip": ip}]});
        text.push_str("---\n");
        text.push_str(&serde_saphyr::to_string(&pod)?);
    }
    std::fs::write(manifests.join("pods.yaml"), text)?;
    for (n, ip) in &ips {
        println!("  {n:<24} {ip}");
    }

    println!(
        "\nStarting the standalone agent with {}",
        args.examples.join("policies.yaml").display()
    );
    let since = SystemTime::now();
    // The cluster's DNS server, whose answers teach domainNames peers (in a cluster: the
    // kube-system/kube-dns Service, trusted without a flag).
    let dns_ip = coredns.ip(false).to_string();
    let mut agent = AgentProcess::start_with(
        &node,
        &args.agent,
        &manifests,
        &work,
        &["--dns-server", &dns_ip],
    )?;
    let status = agent.wait_reconciled(since, names.len(), Duration::from_secs(20))?;
    println!(
        "Agent enforcing: {} endpoints, {} policy map entries, {} config errors\n",
        status.endpoints,
        status.policy_entries,
        status.errors.len()
    );

    let pod_index: BTreeMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i))
        .collect();
    let specs: Vec<ProbeSpec> = SCENARIOS
        .iter()
        .map(|(from, to, port, _, _)| ProbeSpec {
            from: &node.pods()[pod_index[from]],
            to: ips[*to],
            port: *port,
            proto: Proto::Tcp,
            timeout: Duration::from_millis(800),
        })
        .collect();
    let results = node.probe_many(&specs);
    println!(
        "{:<22} {:<22} {:>5}  {:<9} {:<9} why",
        "from", "to", "port", "expected", "observed"
    );
    let mut all_ok = true;
    for ((from, to, port, want, why), got) in SCENARIOS.iter().zip(results) {
        let word = |b: bool| if b { "allowed" } else { "DROPPED" };
        let mark = if got == *want {
            ""
        } else {
            "   <-- unexpected"
        };
        all_ok &= got == *want;
        println!(
            "{from:<22} {to:<22} {port:>5}  {:<9} {:<9} {why}{mark}",
            word(*want),
            word(got)
        );
    }

    // What the agent saw, through its CLI (the same `palisade` binary, over its socket and
    // the pinned maps).
    let show = |args: &[&str]| show(&agent, args);
    // Verdicts are read from the ring buffer as they come; give the last ones a moment.
    std::thread::sleep(Duration::from_millis(500));
    show(&["policy", "show", "shop/backend"])?;
    show(&[
        "explain",
        "--from",
        "shop/frontend",
        "--to",
        "shop/db",
        "--port",
        "5432",
    ])?;
    show(&["stats"])?;
    println!(
        "\n$ curl -s http://127.0.0.1:{}/metrics | grep -E 'verdicts|drops|rule_packets'   # (in the node)",
        palisade::admin::DEFAULT_PORT
    );
    match node.in_netns(metrics) {
        Ok(Ok(text)) => {
            for line in text.lines().filter(|l| {
                !l.starts_with('#')
                    && (l.starts_with("palisade_verdicts_total")
                        || l.starts_with("palisade_drops_total")
                        || l.starts_with("palisade_rule_packets_total"))
            }) {
                println!("{line}");
            }
        }
        Ok(Err(e)) | Err(e) => println!("(metrics endpoint: {e:#})"),
    }
    show(&["verdicts"])?;

    all_ok &= operating_it(&node, &mut agent, &manifests, &ips, &names)?;
    all_ok &= cluster_policy(args, &node, &mut agent, &manifests, &ips, &names)?;
    all_ok &= fqdn_egress(
        args,
        &node,
        &mut agent,
        &manifests,
        names.len(),
        coredns.ip(false),
    )?;

    agent.stop();
    drop(agent);
    drop(node);
    let _ = std::fs::remove_dir_all(&work);
    all_ok &= egress_gateway(args)?;
    println!(
        "\n{}",
        if all_ok {
            "Every packet met the fate its policies give it. The demo node is cleaned up."
        } else {
            "Some traffic did not match the policies: see above."
        }
    );
    Ok(all_ok)
}

/// manifests/examples/egress-gateway.yaml on two nodes in cluster mode: shop/backend on node-1
/// reaches its payment provider (203.0.113.10, in an "outside" namespace) through node-2, the
/// gateway, which the provider sees as 198.51.100.7; the flow's record when it ends.
fn egress_gateway(args: &Args) -> Result<bool> {
    use palisade_tests::{
        egress::{External, exchange, holds, outside_routes},
        multinode::{Cluster, ClusterSpec, node_name},
    };
    println!(
        "\n== Egress gateway ({})",
        args.examples.join("egress-gateway.yaml").display()
    );
    let mut c = Cluster::new(ClusterSpec {
        nodes: vec![
            vec![PodSpec {
                name: "backend".into(),
            }],
            vec![PodSpec {
                name: "idle".into(),
            }],
        ],
        ipv6: false,
    })?;
    let ext = External::start(&c, &["203.0.113.0/24"], &[443])?;
    outside_routes(&c, &["203.0.113.0/24"])?;
    // The provider's network routes the egress address to the gateway node.
    palisade_tests::netns::ip_batch(
        Some(&ext.name),
        &["route add 198.51.100.7/32 via 10.243.0.2 dev e0".to_string()],
    )?;
    let mut gw = c.node_object(1);
    gw["metadata"]["labels"]["egress"] = serde_json::json!("partners");
    c.api.apply(&gw.to_string());
    let backend = c.find_pod("backend").context("backend")?.1.clone();
    let ip = backend.ip(false).to_string();
    c.api.apply_all(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{kubernetes.io/metadata.name: shop}}}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: backend, namespace: shop, labels: {{app: backend}}}}\n\
         spec: {{nodeName: node-1, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIP: '{ip}', podIPs: [{{ip: '{ip}'}}]}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: idle, namespace: shop, labels: {{app: idle}}}}\n\
         spec: {{nodeName: node-2, containers: [{{name: c}}]}}\nstatus: {{phase: Running, podIP: '{idle}', podIPs: [{{ip: '{idle}'}}]}}\n",
        idle = c.find_pod("idle").context("idle")?.1.ip(false),
    ));
    c.api.apply_all(&std::fs::read_to_string(
        args.examples.join("egress-gateway.yaml"),
    )?);
    let work = std::env::temp_dir().join(format!("palisade-demo-egw-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    c.agent_args = vec!["--egress-log".into(), "{dir}/egress.jsonl".into()];
    c.start_agents(&args.agent, &work, Duration::from_secs(60))?;
    c.wait_reconciled(Duration::from_secs(60))?;
    let t = std::time::Instant::now();
    while !holds(&c, 1, "198.51.100.7") && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
    }
    println!(
        "  node-2 (egress=partners) holds the egress address 198.51.100.7: {}",
        holds(&c, 1, "198.51.100.7")
    );
    let dst: IpAddr = "203.0.113.10".parse()?;
    let mut ok = false;
    for _ in 0..50 {
        if exchange(&backend, dst, 443, Duration::from_millis(500)) {
            ok = true;
            break;
        }
    }
    let seen = ext.seen_since(t);
    let from: Vec<String> = seen.iter().map(|s| s.3.to_string()).collect();
    println!(
        "  shop/backend ({ip}, on node-1) -> 203.0.113.10:443: {}; the provider saw it from {}",
        if ok { "connected" } else { "FAILED" },
        from.join(", ")
    );
    let log = work.join(node_name(0)).join("egress.jsonl");
    let mut record = None;
    let t = std::time::Instant::now();
    while record.is_none() && t.elapsed() < Duration::from_secs(20) {
        record = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .next()
            .map(str::to_string);
        std::thread::sleep(Duration::from_millis(100));
    }
    match &record {
        Some(r) => println!("  node-1's record of the flow (--egress-log), when it ended:\n  {r}"),
        None => println!("  no record of the flow within 20 s"),
    }
    let good = ok
        && !seen.is_empty()
        && seen.iter().all(|s| s.3.to_string() == "198.51.100.7")
        && record.is_some();
    drop(c);
    drop(ext);
    let _ = std::fs::remove_dir_all(&work);
    Ok(good)
}

/// The policy README.md's "Operating it" adds: shop/frontend may reach shop/db on 5432.
const DB_FROM_FRONTEND: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-frontend, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: frontend}}}]
      ports: [{port: 5432}]
";

/// README.md's "Operating it": a refused connection found (`verdicts --verdict dropped`),
/// explained (`explain`, exit status 1), the policy that allows it added, explained again
/// (exit status 0) and probed; then removed again.
fn operating_it(
    node: &Node,
    agent: &mut AgentProcess,
    manifests: &std::path::Path,
    ips: &BTreeMap<String, IpAddr>,
    names: &[String],
) -> Result<bool> {
    const FILE: &str = "db-from-frontend.yaml";
    let (from, to, port) = ("shop/frontend", "shop/db", 5432);
    let from_index = names
        .iter()
        .position(|n| n == from)
        .context("no frontend pod")?;
    let probe = || {
        node.probe_many(&[ProbeSpec {
            from: &node.pods()[from_index],
            to: ips[to],
            port,
            proto: Proto::Tcp,
            timeout: Duration::from_millis(800),
        }])[0]
    };
    println!("\n== Operating it: a refused connection ==");
    show(agent, &["verdicts", "--verdict", "dropped", "--to-pod", to])?;
    let explain = ["explain", "--from", from, "--to", to, "--port", "5432"];
    let before = show_status(agent, &explain)?;
    print!("\n$ cat {FILE}\n{DB_FROM_FRONTEND}");
    let since = SystemTime::now();
    std::fs::write(manifests.join(FILE), DB_FROM_FRONTEND)?;
    agent.wait_reconciled(since, names.len(), Duration::from_secs(20))?;
    let after = show_status(agent, &explain)?;
    let connects = probe();
    println!(
        "{from} -> {to}:{port} now: {}",
        if connects { "connects" } else { "DROPPED" }
    );
    let since = SystemTime::now();
    std::fs::remove_file(manifests.join(FILE))?;
    agent.wait_reconciled(since, names.len(), Duration::from_secs(20))?;
    let ok = before == Some(1) && after == Some(0) && connects;
    if !ok {
        println!(
            "   <-- unexpected (explain exit status {before:?} then {after:?}, connects {connects})"
        );
    }
    Ok(ok)
}

/// `show`, and the exit status (for `explain`: 0 allowed, 1 dropped).
fn show_status(agent: &AgentProcess, args: &[&str]) -> Result<Option<i32>> {
    println!("\n$ palisade {}; echo \"exit status $?\"", args.join(" "));
    let out = agent
        .cli(args)
        .output()
        .with_context(|| format!("running palisade {args:?}"))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !palisade_tests::agent::cli_answered(args, out.status) {
        print!("{}", String::from_utf8_lossy(&out.stderr));
        anyhow::bail!("palisade {args:?} failed ({})", out.status);
    }
    println!("exit status {}", out.status.code().unwrap_or(-1));
    Ok(out.status.code())
}

/// Runs `palisade ARGS` against the demo agent and prints what it says.
fn show(agent: &AgentProcess, args: &[&str]) -> Result<()> {
    println!("\n$ palisade {}", args.join(" "));
    let out = agent
        .cli(args)
        .output()
        .with_context(|| format!("running palisade {args:?}"))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !palisade_tests::agent::cli_answered(args, out.status) {
        print!("{}", String::from_utf8_lossy(&out.stderr));
        anyhow::bail!("palisade {args:?} failed ({})", out.status);
    }
    Ok(())
}

/// A ClusterNetworkPolicy: the Admin Deny of cluster-admin-deny.yaml beats the NetworkPolicy
/// allow-scrape for monitoring/prometheus -> shop/db:9090, and `explain` names its rule.
fn cluster_policy(
    args: &Args,
    node: &Node,
    agent: &mut AgentProcess,
    manifests: &std::path::Path,
    ips: &BTreeMap<String, IpAddr>,
    names: &[String],
) -> Result<bool> {
    const FILE: &str = "cluster-admin-deny.yaml";
    let (from, to, port) = ("monitoring/prometheus", "shop/db", 9090);
    let from_index = names
        .iter()
        .position(|n| n == from)
        .context("no prometheus pod")?;
    let probe = || {
        node.probe_many(&[ProbeSpec {
            from: &node.pods()[from_index],
            to: ips[to],
            port,
            proto: Proto::Tcp,
            timeout: Duration::from_millis(800),
        }])[0]
    };
    let before = probe();
    println!(
        "\nAdding {} (ClusterNetworkPolicy, Admin tier: evaluated before NetworkPolicies)",
        args.examples.join(FILE).display()
    );
    let since = SystemTime::now();
    std::fs::copy(args.examples.join(FILE), manifests.join(FILE))?;
    agent.wait_reconciled(since, names.len(), Duration::from_secs(20))?;
    let after = probe();
    let word = |b: bool| if b { "allowed" } else { "DROPPED" };
    let mark = |ok: bool| if ok { "" } else { "   <-- unexpected" };
    println!(
        "{:<22} {:<22} {:>5}  {:<9} {:<9} why",
        "from", "to", "port", "expected", "observed"
    );
    println!(
        "{from:<22} {to:<22} {port:>5}  {:<9} {:<9} before: allow-scrape admits team=observability{}",
        word(true),
        word(before),
        mark(before)
    );
    println!(
        "{from:<22} {to:<22} {port:>5}  {:<9} {:<9} after: Admin Deny db-only-from-shop beats allow-scrape{}",
        word(false),
        word(after),
        mark(!after)
    );
    show(
        agent,
        &["explain", "--from", from, "--to", to, "--port", "9090"],
    )?;
    Ok(before && !after)
}

/// What the demo's DNS server answers.
fn dns_zone() -> palisade_tests::dns::Zone {
    use palisade_tests::dns::Record;
    let mut z = palisade_tests::dns::Zone::default();
    z.names.insert(
        "api.payments.test".into(),
        vec![Record::Cname("edge1.cdn.payments.test".into(), 60)],
    );
    z.names.insert(
        "edge1.cdn.payments.test".into(),
        vec![Record::Addr("203.0.113.10".parse().unwrap(), 60)],
    );
    z.names.insert(
        "ads.tracker.test".into(),
        vec![Record::Addr("203.0.113.66".parse().unwrap(), 60)],
    );
    z
}

/// FQDN egress: cluster-fqdn-egress.yaml lets shop/backend reach api.payments.test by name and
/// nothing else outside; `palisade fqdn` and `explain` show what its DNS answers taught.
fn fqdn_egress(
    args: &Args,
    node: &Node,
    agent: &mut AgentProcess,
    manifests: &std::path::Path,
    endpoints: usize,
    dns: IpAddr,
) -> Result<bool> {
    const FILE: &str = "cluster-fqdn-egress.yaml";
    println!(
        "\nAdding {} (ClusterNetworkPolicy with domainNames: shop/backend may reach its payment API by name, nothing else outside)",
        args.examples.join(FILE).display()
    );
    let since = SystemTime::now();
    std::fs::copy(args.examples.join(FILE), manifests.join(FILE))?;
    agent.wait_reconciled(since, endpoints, Duration::from_secs(20))?;
    let backend = node.pod("shop-backend").context("the backend pod")?;
    // Resolve, then connect at once: the answer reached the pod only once its address was
    // in the maps.
    let lookup_and_connect = |name: &'static str| {
        backend.in_netns(move || -> Result<(IpAddr, bool)> {
            let ip = palisade_tests::dns::resolve(dns, name, false, Duration::from_secs(3))?
                .first()
                .copied()
                .context("no address")?;
            let ok = std::net::TcpStream::connect_timeout(
                &std::net::SocketAddr::new(ip, 443),
                Duration::from_millis(800),
            )
            .is_ok();
            Ok((ip, ok))
        })?
    };
    println!(
        "{:<22} {:<30} {:>5}  {:<9} {:<9} why",
        "from", "to", "port", "expected", "observed"
    );
    let mut all_ok = true;
    let mut payments = None;
    for (name, want, why) in [
        (
            "api.payments.test",
            true,
            "payments-api: its DNS answer (via a CNAME) opened it",
        ),
        (
            "ads.tracker.test",
            false,
            "no-other-egress: no pattern names it",
        ),
    ] {
        let (ip, got) = lookup_and_connect(name)?;
        if want {
            payments = Some(ip);
        }
        let word = |b: bool| if b { "allowed" } else { "DROPPED" };
        all_ok &= got == want;
        println!(
            "{:<22} {:<30} {:>5}  {:<9} {:<9} {why}{}",
            "shop/backend",
            format!("{name} ({ip})"),
            443,
            word(want),
            word(got),
            if got == want { "" } else { "   <-- unexpected" }
        );
    }
    // fqdn.json is written within a second of learning.
    std::thread::sleep(Duration::from_millis(1200));
    show(agent, &["fqdn"])?;
    if let Some(ip) = payments {
        show(
            agent,
            &[
                "explain",
                "--from",
                "shop/backend",
                "--to",
                &ip.to_string(),
                "--port",
                "443",
            ],
        )?;
    }
    Ok(all_ok)
}

/// The agent's Prometheus endpoint, from inside the node.
fn metrics() -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], palisade::admin::DEFAULT_PORT)),
        Duration::from_secs(2),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            if !nix::unistd::geteuid().is_root() {
                eprintln!("(the demo needs root)");
            }
            ExitCode::FAILURE
        }
    }
}
