//! FQDN egress: what holding a DNS answer until its addresses are learned adds to the answer's
//! latency. Two pods of one node ask the same DNS server, turn and turn about: `held` is
//! subject to a `domainNames` policy (each answer is held, learned from, released), `plain` to
//! none (its answers pass untouched). Every lookup asks a name not asked before, so each held
//! answer teaches a new address.
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use palisade_tests::{
    agent::AgentProcess,
    dns::{DnsServer, Record, Zone, resolve},
    rig::{Node, NodeSpec, PodSpec, Proto},
};
use serde_json::{Value, json};

use crate::stats::{percentile, round, set};

pub struct Config {
    /// Lookups per pod.
    pub lookups: u32,
}

const POLICY: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: held-by-name}
spec:
  tier: Admin
  priority: 10
  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: held}}}}
  egress:
    - name: dns
      action: Accept
      to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: dns}}}}]
      protocols: [{udp: {destinationPort: {number: 53}}}]
    - name: names
      action: Accept
      to: [{domainNames: ["*.bench.test"]}]
      protocols: [{tcp: {destinationPort: {number: 443}}}]
    - name: rest
      action: Deny
      to: [{networks: [0.0.0.0/0]}]
"#;

pub fn run(cfg: &Config, agent: &Path, work: &Path, report: &mut Value) -> Result<()> {
    eprintln!(
        "bench: DNS answer latency, held and plain, {} lookups each",
        cfg.lookups
    );
    let node = Node::new(NodeSpec {
        pods: ["held", "plain", "dns"]
            .iter()
            .map(|n| PodSpec {
                name: format!("dns-bench-{n}"),
            })
            .collect(),
        ipv6: false,
    })?;
    node.serve(&[(443, Proto::Tcp)])?;
    let pod = |n: &str| node.pod(&format!("dns-bench-{n}")).expect("rig pod");
    let zone = Zone {
        generate: Some(Box::new(|name: &str| {
            let n: u32 = name
                .strip_prefix('n')?
                .strip_suffix(".bench.test")?
                .parse()
                .ok()?;
            let ip = std::net::Ipv4Addr::new(198, 18, (n / 250) as u8 % 250, (n % 250 + 1) as u8);
            Some(vec![Record::Addr(ip.into(), 300)])
        })),
        ..Zone::default()
    };
    let _dns = DnsServer::start(&pod("dns").netns_name, zone)?;
    let dir = work.join(format!("dns-{}", std::process::id()));
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let mut cluster = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n");
    for n in ["held", "plain", "dns"] {
        let ip = pod(n).ip(false);
        cluster.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {n}, namespace: bench, labels: {{app: {n}}}}}\n\
             spec: {{containers: [{{name: c}}]}}\nstatus: {{podIP: '{ip}', podIPs: [{{ip: '{ip}'}}]}}\n"
        ));
    }
    std::fs::write(manifests.join("cluster.yaml"), cluster)?;
    std::fs::write(manifests.join("policy.yaml"), POLICY)?;
    let server = pod("dns").ip(false);
    let since = SystemTime::now();
    let server_arg = server.to_string();
    let mut agent = AgentProcess::start_with(
        &node,
        agent,
        &manifests,
        &dir,
        &["--dns-server", &server_arg],
    )?;
    agent.wait_reconciled(since, 3, Duration::from_secs(60))?;

    let lookups = cfg.lookups;
    let time = |who: &'static str, n: u32| -> Result<f64> {
        pod(who).in_netns(move || -> Result<f64> {
            let name = format!("n{n}.bench.test");
            let t = Instant::now();
            resolve(server, &name, false, Duration::from_secs(3))
                .with_context(|| format!("{who}: {name}"))?;
            Ok(t.elapsed().as_secs_f64() * 1e6)
        })?
    };
    let (mut held, mut plain) = (Vec::new(), Vec::new());
    for n in 0..lookups {
        held.push(time("held", n)?);
        plain.push(time("plain", lookups + n)?);
    }
    let learned = agent
        .cli_json(&["stats"])
        .ok()
        .and_then(|s| s["fqdn"]["learned"].as_u64())
        .unwrap_or(0);
    agent.stop();
    let _ = std::fs::remove_dir_all(&dir);
    let fig = |v: &[f64]| {
        json!({
            "p50_us": round(percentile(v, 50.0)),
            "p99_us": round(percentile(v, 99.0)),
            "max_us": round(v.iter().cloned().fold(0.0, f64::max)),
        })
    };
    let added = |p: f64| round(percentile(&held, p) - percentile(&plain, p));
    set(
        report,
        "dns_latency",
        json!({
            "lookups": lookups,
            "held": fig(&held),
            "plain": fig(&plain),
            "added_p50_us": added(50.0),
            "added_p99_us": added(99.0),
            "addresses_learned": learned,
        }),
    );
    Ok(())
}
