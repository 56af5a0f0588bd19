//! A cluster on one machine at scale: the churn section's cluster (100 namespaces, 10 000
//! pods, 1 000 policies) served by the fake API server to three nodes of the multi-node rig,
//! each running its agent in cluster mode. Each namespace's local pod runs on node `i % 3`
//! (about 33 endpoints per node); the other pods are objects on nodes that do not exist. A
//! change is timed from the moment it is handed to the API server until every agent has
//! finished a reconcile that started after its watches were sent the change (the agents' own
//! status files say when).
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, ensure};
use palisade_tests::{
    multinode::{Cluster, ClusterSpec, node_ips, node_name},
    rig::PodSpec,
};
use serde_json::{Value, json};

use crate::cluster::{self, NAMESPACES, PODS_PER_NAMESPACE};
use crate::stats::{Figure, percentile, round, set};

const NODES: usize = 3;

pub struct Config {
    pub changes: usize,
}

/// The docs of namespace `i`, its local pod placed on its rig node with the rig's address.
fn namespace_docs(i: usize, rig_ip: Ipv4Addr) -> Vec<String> {
    let mut docs = vec![cluster::namespace_yaml(i)];
    for j in 0..PODS_PER_NAMESPACE {
        if j == cluster::local_pod(i) {
            docs.push(cluster::pod_yaml(
                i,
                &format!("pod-{j:03}"),
                &format!("app-{}", cluster::app_of(j)),
                cluster::tier_of(j),
                rig_ip,
                &node_name(i % NODES),
            ));
        } else {
            docs.push(cluster::pod_of(i, j));
        }
    }
    docs.extend(cluster::policies_yaml(i));
    docs
}

/// VmRSS of a process, MiB.
fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kb / 1024.0)
}

fn unix_ms(t: SystemTime) -> u128 {
    t.duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
}

pub fn run(cfg: &Config, agent_bin: &Path, work: &Path, report: &mut Value) -> Result<()> {
    let started = Instant::now();
    let work = work.join("nodes");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let mut c = Cluster::new(ClusterSpec {
        nodes: (0..NODES)
            .map(|k| {
                (0..NAMESPACES)
                    .filter(|i| i % NODES == k)
                    .map(|i| PodSpec {
                        name: format!("n{i}"),
                    })
                    .collect()
            })
            .collect(),
        ipv6: false,
    })?;
    eprintln!(
        "bench: nodes: {NODES} nodes of {:?} pods in {:.1} s",
        c.nodes().iter().map(|n| n.pods().len()).collect::<Vec<_>>(),
        started.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    for i in 0..NAMESPACES {
        let (_, pod) = c.find_pod(&format!("n{i}")).context("a rig pod")?;
        let std::net::IpAddr::V4(ip) = pod.ip(false) else {
            anyhow::bail!("the rig's pods have IPv4 addresses");
        };
        for doc in namespace_docs(i, ip) {
            c.api.apply(&doc);
        }
    }
    eprintln!(
        "bench: nodes: {} objects in the API server in {:.1} s",
        c.api.resource_version(),
        t.elapsed().as_secs_f64()
    );
    // First with LISTs (as against an API server without WatchList), then with the default.
    c.agent_args = vec!["--initial-list".into(), "list".into()];
    let t = Instant::now();
    c.start_agents(agent_bin, &work, Duration::from_secs(600))?;
    let first_sync_ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!("bench: nodes: every agent enforcing in {first_sync_ms:.0} ms");

    let peers: Vec<std::net::IpAddr> = (0..NODES).map(|k| node_ips(k).0.into()).collect();
    let mut samples = Vec::new();
    let mut per_node: Vec<Vec<f64>> = vec![Vec::new(); NODES];
    for n in 0..cfg.changes {
        let i = (n * 37) % NAMESPACES;
        // A policy's port, or a pod's labels (a new identity every agent must learn).
        let doc = if n % 2 == 0 {
            cluster::allow_app_yaml(i, n % 7, 8100 + (n % 500) as u16)
        } else {
            let j = (n * 11) % PODS_PER_NAMESPACE;
            if j == cluster::local_pod(i) {
                cluster::allow_app_yaml(i, n % 7, 8100 + (n % 500) as u16)
            } else {
                cluster::pod_yaml(
                    i,
                    &format!("pod-{j:03}"),
                    &format!("app-{}", (n / 2) % 10),
                    cluster::tier_of(j),
                    cluster::pod_ip(i, j),
                    &format!("node-{}", 10 + j % 50),
                )
            }
        };
        let t0 = SystemTime::now();
        c.api.apply(&doc);
        let rv = c.api.resource_version();
        let delivered = c.api.wait_delivered(&peers, rv, Duration::from_secs(60))?;
        let mut done = 0u128;
        for (k, since) in delivered.into_iter().enumerate() {
            let want = c.nodes()[k].pods().len();
            let a = c.agent_mut(k).context("agent")?;
            let st = a.wait(since, Duration::from_secs(60), |s| s.endpoints == want)?;
            ensure!(st.errors.is_empty(), "{}: {:?}", node_name(k), st.errors);
            let ms = st.reconciled_at_unix_ms.saturating_sub(unix_ms(t0));
            per_node[k].push(ms as f64);
            done = done.max(st.reconciled_at_unix_ms);
        }
        samples.push(done.saturating_sub(unix_ms(t0)) as f64);
        // The agents go idle between changes (as between real API events).
        std::thread::sleep(Duration::from_millis(20));
    }
    let agents_rss = |c: &Cluster| -> Result<Vec<f64>> {
        (0..NODES)
            .map(|k| {
                c.agent(k)
                    .and_then(|a| a.pid())
                    .map_or(Ok(f64::NAN), rss_mib)
            })
            .collect()
    };
    let rss = agents_rss(&c)?;
    eprintln!(
        "bench: nodes: change → enforced on all {NODES} nodes p50 {:.0} ms, p99 {:.0} ms; agents' RSS {rss:.1?} MiB",
        percentile(&samples, 50.0),
        percentile(&samples, 99.0)
    );
    // The same agents again (adopting their pins), each watch filled by a streaming list (the
    // default): the first read holds one object at a time instead of a LIST response of every
    // pod.
    c.agent_args = vec!["--initial-list".into(), "stream".into()];
    let t = Instant::now();
    c.start_agents(agent_bin, &work, Duration::from_secs(600))?;
    let stream_sync_ms = t.elapsed().as_secs_f64() * 1e3;
    std::thread::sleep(Duration::from_secs(1));
    let rss_stream = agents_rss(&c)?;
    eprintln!(
        "bench: nodes: with streaming lists every agent enforcing in {stream_sync_ms:.0} ms; agents' RSS {rss_stream:.1?} MiB"
    );
    set(
        report,
        "nodes_change_ms",
        json!({
            "p50": round(percentile(&samples, 50.0)),
            "p99": round(percentile(&samples, 99.0)),
            "max": round(percentile(&samples, 100.0)),
        }),
    );
    set(
        report,
        "nodes_detail",
        json!({
            "nodes": NODES,
            "changes": samples.len(),
            "endpoints_per_node": c.nodes().iter().map(|n| n.pods().len()).collect::<Vec<_>>(),
            "first_sync_ms": round(first_sync_ms),
            "per_node_p99_ms": per_node.iter().map(|v| round(percentile(v, 99.0))).collect::<Vec<_>>(),
            "agent_rss_mib": rss.iter().map(|v| round(*v)).collect::<Vec<_>>(),
            "streaming_lists": {
                "first_sync_ms": round(stream_sync_ms),
                "agent_rss_mib": rss_stream.iter().map(|v| round(*v)).collect::<Vec<_>>(),
            },
            "samples_ms": samples.iter().map(|v| round(*v)).collect::<Vec<_>>(),
        }),
    );
    set(report, "nodes_agent_rss_mib", Figure::new(rss).json());
    set(
        report,
        "sections.nodes_s",
        json!(round(started.elapsed().as_secs_f64())),
    );
    Ok(())
}
