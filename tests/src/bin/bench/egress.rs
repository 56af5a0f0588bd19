//! Egress gateways on the three-node rig: the latency a gateway adds to a short TCP exchange
//! (connect, a byte each way) against the same exchange out through the pod's own node, and
//! the failover of the active gateway (its agent killed; its link down): when the standby held
//! the egress address, the longest time without a completed exchange, and connections that
//! arrived from another source than the egress address (must be 0).
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use palisade_tests::{
    egress::{External, exchange, holds, outside_routes},
    multinode::{Cluster, ClusterSpec},
    rig::PodSpec,
};
use serde_json::{Value, json};

use crate::stats::{percentile, round, set};

pub struct Config {
    pub exchanges: usize,
}

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {kubernetes.io/metadata.name: demo}}
---
apiVersion: palisade.io/v1alpha1
kind: EgressGateway
metadata: {name: bench}
spec:
  podSelector: {matchLabels: {app: a}}
  destinationCIDRs: [192.0.2.0/24]
  excludedCIDRs: [192.0.2.128/25]
  gatewayNodeSelector: {matchLabels: {egress: gw}}
  egressIPs: [10.243.0.100]
"#;
const EGRESS: &str = "10.243.0.100";

fn ms(d: Duration) -> f64 {
    round(d.as_secs_f64() * 1000.0)
}

pub fn run(
    cfg: &Config,
    agent: &std::path::Path,
    work: &std::path::Path,
    report: &mut Value,
) -> Result<()> {
    eprintln!("bench: egress gateways (three nodes)");
    let mut c = Cluster::new(ClusterSpec {
        nodes: vec![
            vec![PodSpec { name: "a0".into() }],
            vec![PodSpec { name: "b1".into() }],
            vec![PodSpec { name: "b2".into() }],
        ],
        ipv6: false,
    })?;
    let ext = External::start(&c, &["192.0.2.0/24"], &[8080])?;
    outside_routes(&c, &["192.0.2.0/24"])?;
    for k in [1, 2] {
        let mut n = c.node_object(k);
        n["metadata"]["labels"]["egress"] = json!("gw");
        c.api.apply(&n.to_string());
    }
    c.api.apply_all(OBJECTS);
    for (name, app) in [("a0", "a"), ("b1", "b"), ("b2", "b")] {
        let (k, p) = c.find_pod(name).context("pod")?;
        let ip = p.ip(false).to_string();
        c.api.apply(
            &json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "demo", "labels": {"app": app}},
                "spec": {"nodeName": palisade_tests::multinode::node_name(k), "containers": [{"name": "c"}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
            })
            .to_string(),
        );
    }
    let dir = work.join("egress");
    std::fs::create_dir_all(&dir)?;
    c.start_agents(agent, &dir, Duration::from_secs(60))?;
    c.wait_reconciled(Duration::from_secs(60))?;
    let a0 = c.find_pod("a0").context("a0")?.1.clone();
    let through: IpAddr = "192.0.2.10".parse()?;
    let direct: IpAddr = "192.0.2.200".parse()?;
    let t = Instant::now();
    while !exchange(&a0, through, 8080, Duration::from_millis(500)) {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("a0 never got through the gateway");
        }
    }
    // Latency: the same pod, to an excluded destination (out through its own node) and to one
    // through the gateway, interleaved.
    let (mut d, mut g) = (Vec::new(), Vec::new());
    for _ in 0..cfg.exchanges {
        for (dst, out) in [(direct, &mut d), (through, &mut g)] {
            let t = Instant::now();
            if !exchange(&a0, dst, 8080, Duration::from_secs(2)) {
                bail!("an exchange to {dst} failed");
            }
            out.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let figure = |v: &[f64]| json!({"p50_ms": round(percentile(v, 50.0)), "p99_ms": round(percentile(v, 99.0))});
    set(report, "egress.exchanges", json!(cfg.exchanges));
    set(report, "egress.direct", figure(&d));
    set(report, "egress.through_gateway", figure(&g));
    set(
        report,
        "egress.added_p50_ms",
        json!(round(percentile(&g, 50.0) - percentile(&d, 50.0))),
    );
    // Failover: clients every ~20 ms; the fault; the standby's takeover.
    let mut phases = Vec::new();
    for (name, fault) in [("agent_killed", 0), ("link_down", 1)] {
        if name == "link_down" {
            // Back to the first gateway (restarted), as before the first fault.
            c.restart_agent(1, agent)?;
            let t = Instant::now();
            while !holds(&c, 1, EGRESS) || holds(&c, 2, EGRESS) {
                if t.elapsed() > Duration::from_secs(20) {
                    bail!("node-2 did not take the address back");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let h = {
            let (a0, stop) = (a0.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut out = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    out.push((t, exchange(&a0, through, 8080, Duration::from_millis(300))));
                    std::thread::sleep(Duration::from_millis(20));
                }
                out
            })
        };
        std::thread::sleep(Duration::from_secs(1));
        let at = Instant::now();
        if fault == 0 {
            c.kill_agent(1);
        } else {
            palisade_tests::netns::ip_batch(
                Some(&c.nodes()[1].netns_name),
                &["link set up0 down".into()],
            )?;
        }
        while !holds(&c, 2, EGRESS) {
            if at.elapsed() > Duration::from_secs(20) {
                bail!("{name}: the standby never took over");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let takeover = at.elapsed();
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, Ordering::Relaxed);
        let results = h.join().map_err(|_| anyhow::anyhow!("client panicked"))?;
        let mut last = at;
        let mut outage = Duration::ZERO;
        for (t, ok) in results.iter().filter(|r| r.0 >= at) {
            if *ok {
                outage = outage.max(t.duration_since(last));
                last = *t;
            }
        }
        let wrong = ext
            .seen_since(started)
            .iter()
            .filter(|s| s.1 == through && s.3.to_string() != EGRESS)
            .count();
        phases.push(json!({
            "fault": name,
            "takeover_ms": ms(takeover),
            "longest_outage_ms": ms(outage),
            "exchanges": results.len(),
            "failed": results.iter().filter(|r| !r.1).count(),
            "wrong_source": wrong,
        }));
        eprintln!("bench: egress failover, {name}: {}", phases.last().unwrap());
    }
    set(report, "egress.failover", json!(phases));
    set(
        report,
        "egress.probe",
        json!({"interval_ms": 250, "misses": 3}),
    );
    Ok(())
}
