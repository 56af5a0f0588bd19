//! Egress gateways on the multi-node rig (`palisade_tests::multinode`): three nodes, each with
//! its agent in cluster mode; an EgressGateway sends pod `a0`'s (node-1) traffic to the
//! documentation ranges through node-2 or node-3 with the egress addresses 10.243.0.100 and
//! fd00:243::100. The "external" world is a namespace of this test's own on the fabric's
//! bridge, owning 192.0.2.0/24 and 2001:db8::/32 (reachable from the nodes only), whose
//! server records the source address of every connection. The nodes masquerade other
//! traffic of their pods to those ranges to their own address (as a cloud NAT would).
//!
//! Checked: matching flows arrive from the egress address (IPv4 and IPv6); other pods',
//! and excluded destinations', from the pod's node; a flow the pod's NetworkPolicy denies
//! never leaves; every flow through a gateway is recorded (JSON lines, `palisade verdicts`);
//! failover when the active gateway's agent is killed and when its link goes down, with no
//! connection ever arriving from an unexpected source (also when the gateway's node stops
//! being Ready); with no live gateway, matching
//! traffic is dropped (`egress-no-gateway`), not sent out through the pod's node. Needs
//! root; under CI=true that is a failure, not a skip.
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use palisade_tests::{
    agent::{WorkDir, agent_binary},
    egress::{External, exchange, holds, outside_routes},
    multinode::{Cluster, ClusterSpec, node_ips, node_name},
    netns,
    rig::{Pod, PodSpec, require_root},
};
use serde_json::json;

const EGRESS_V4: &str = "10.243.0.100";
const EGRESS_V6: &str = "fd00:243::100";
/// Destinations: through the gateway; excluded (direct); for the unselected pod.
const DST_V4: &str = "192.0.2.10";
const DST_V6: &str = "2001:db8::10";
const DST_EXCLUDED: &str = "192.0.2.200";
const DST_OTHER: &str = "192.0.2.11";
const PORT: u16 = 8080;
/// A port a0's NetworkPolicy does not allow.
const DENIED_PORT: u16 = 9090;

/// The active gateway, and the standby.
const GW_A: usize = 1;
const GW_B: usize = 2;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// A VXLAN packet (the egress tunnel's VNI, to the devices' MAC) carrying a UDP datagram
/// `src:5555 -> dst:port` with one byte.
fn vxlan_udp(src: IpAddr, dst: IpAddr, port: u16) -> Vec<u8> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (src, dst) else {
        panic!("IPv4 only");
    };
    let vni = palisade_common::EGW_VNI.to_be_bytes();
    let mut p = vec![0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0];
    p.extend_from_slice(&palisade_common::EGW_DEVICE_MAC);
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00]);
    let mut ip4 = vec![0x45, 0, 0, 29, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip4.extend_from_slice(&src.octets());
    ip4.extend_from_slice(&dst.octets());
    let sum = ip4
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum::<u32>();
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = !(((sum & 0xffff) + (sum >> 16)) as u16);
    ip4[10..12].copy_from_slice(&sum.to_be_bytes());
    p.extend_from_slice(&ip4);
    p.extend_from_slice(&5555u16.to_be_bytes());
    p.extend_from_slice(&port.to_be_bytes());
    p.extend_from_slice(&[0, 9, 0, 0, b'x']);
    p
}

/// The sources of the datagrams a UDP socket in the external namespace on `port` receives
/// while and shortly after `send` runs.
fn udp_seen(ext: &External, port: u16, send: impl FnOnce()) -> Vec<IpAddr> {
    let sock = netns::in_netns(&ext.name, move || {
        std::net::UdpSocket::bind(("0.0.0.0", port)).expect("a UDP socket outside")
    })
    .unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(700)))
        .unwrap();
    send();
    let mut out = Vec::new();
    let mut b = [0u8; 64];
    while let Ok((_, from)) = sock.recv_from(&mut b) {
        out.push(from.ip());
    }
    out
}

/// The sources the external server saw for connections to `dst` since `t`.
fn sources(ext: &External, t: Instant, dst: &str, port: u16) -> Vec<IpAddr> {
    ext.seen_since(t)
        .into_iter()
        .filter(|s| s.1 == ip(dst) && s.2 == port)
        .map(|s| s.3)
        .collect()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !f() {
        if t.elapsed() >= timeout && std::env::var_os("PAL_EGW_HOLD").is_some() {
            eprintln!("HOLDING: {what}");
            std::thread::sleep(Duration::from_secs(240));
        }
        assert!(t.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    t.elapsed()
}

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {kubernetes.io/metadata.name: demo}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-egress, namespace: demo}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress:
    - to: [{ipBlock: {cidr: 192.0.2.0/24}}, {ipBlock: {cidr: "2001:db8::/32"}}]
      ports: [{port: 8080, protocol: TCP}]
---
apiVersion: palisade.io/v1alpha1
kind: EgressGateway
metadata: {name: partners}
spec:
  podSelector: {matchLabels: {app: a}}
  namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: demo}}
  destinationCIDRs: [192.0.2.0/24, "2001:db8::/32"]
  excludedCIDRs: [192.0.2.128/25]
  gatewayNodeSelector: {matchLabels: {egress: gw}}
  egressIPs: [10.243.0.100, "fd00:243::100"]
"#;

fn pod_object(c: &Cluster, name: &str, app: &str) -> String {
    let (k, p) = c.find_pod(name).expect("a pod of the rig");
    let ips: Vec<_> = p
        .ips()
        .iter()
        .map(|i| json!({"ip": i.to_string()}))
        .collect();
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "demo", "labels": {"app": app}},
        "spec": {"nodeName": node_name(k), "containers": [{"name": "c"}]},
        "status": {"phase": "Running", "podIP": p.ip(false).to_string(), "podIPs": ips},
    })
    .to_string()
}

/// Continuous clients from `pod` to `dsts` until `stop`: (when, destination, completed).
fn clients(
    pod: Pod,
    dsts: Vec<IpAddr>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(Instant, IpAddr, bool)>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            for d in &dsts {
                let t = Instant::now();
                let ok = exchange(&pod, *d, PORT, Duration::from_millis(300));
                out.push((t, *d, ok));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        out
    })
}

/// The longest time without a completed exchange to each destination, from `from` on.
fn longest_outage(results: &[(Instant, IpAddr, bool)], from: Instant) -> Duration {
    let mut worst = Duration::ZERO;
    let mut by_dst: BTreeMap<IpAddr, Instant> = BTreeMap::new();
    for (t, d, ok) in results.iter().filter(|r| r.0 >= from) {
        let last = by_dst.entry(*d).or_insert(from);
        if *ok {
            worst = worst.max(t.duration_since(*last));
            *last = *t;
        }
    }
    worst
}

struct Phase {
    name: &'static str,
    takeover: Duration,
    outage: Duration,
    failed: usize,
    total: usize,
}

/// Runs clients from a0 while `fault` happens; returns the phase's figures after checking that
/// every connection to the gateway destinations arrived from an egress address.
fn failover(
    c: &mut Cluster,
    ext: &External,
    name: &'static str,
    standby: usize,
    fault: impl FnOnce(&mut Cluster),
) -> Phase {
    let a0 = c.find_pod("a0").unwrap().1.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let h = clients(a0, vec![ip(DST_V4), ip(DST_V6)], stop.clone());
    std::thread::sleep(Duration::from_millis(1000));
    let at = Instant::now();
    fault(c);
    let takeover = wait_for(
        &format!("{name}: the standby takes the egress address"),
        Duration::from_secs(15),
        || holds(c, standby, EGRESS_V4) && holds(c, standby, EGRESS_V6),
    );
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let results = h.join().unwrap();
    let wrong: Vec<IpAddr> = sources(ext, started, DST_V4, PORT)
        .into_iter()
        .filter(|s| *s != ip(EGRESS_V4))
        .chain(
            sources(ext, started, DST_V6, PORT)
                .into_iter()
                .filter(|s| *s != ip(EGRESS_V6)),
        )
        .collect();
    assert!(
        wrong.is_empty(),
        "{name}: connections from a wrong source: {wrong:?}\n{}",
        c.logs()
    );
    let last_second = Instant::now() - Duration::from_secs(1);
    let recent: Vec<_> = results.iter().filter(|r| r.0 >= last_second).collect();
    if !recent.iter().all(|r| r.2) && std::env::var_os("PAL_EGW_HOLD").is_some() {
        eprintln!("HOLDING: {name}");
        std::thread::sleep(Duration::from_secs(240));
    }
    if recent.is_empty() || !recent.iter().all(|r| r.2) {
        let neigh = netns::command_in(&ext.name, "ip")
            .args(["neigh", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let logs: String = (0..3)
            .filter_map(|k| c.agent(k).map(|a| (k, a.log_text())))
            .map(|(k, l)| {
                let lines: Vec<&str> = l.lines().filter(|l| l.contains("egress")).collect();
                format!(
                    "== {}\n{}\n",
                    node_name(k),
                    lines[lines.len().saturating_sub(12)..].join("\n")
                )
            })
            .collect();
        panic!(
            "{name}: after failover every exchange completes: {recent:?}\nexternal neighbours:\n{neigh}\n{logs}"
        );
    }
    Phase {
        name,
        takeover,
        outage: longest_outage(&results, at),
        failed: results.iter().filter(|r| !r.2).count(),
        total: results.len(),
    }
}

#[test]
fn egress_gateways_masquerade_fail_over_and_fail_closed() {
    if !require_root() {
        return;
    }
    let spec = ClusterSpec {
        nodes: vec![
            vec![PodSpec { name: "a0".into() }, PodSpec { name: "c0".into() }],
            vec![PodSpec { name: "b1".into() }],
            vec![PodSpec { name: "b2".into() }],
        ],
        ipv6: true,
    };
    let mut c = Cluster::new(spec).expect("the cluster");
    let ext = External::start(&c, &["192.0.2.0/24", "2001:db8::/32"], &[PORT, DENIED_PORT])
        .expect("the outside world");
    // Routes to the outside world, and the nodes' own NAT for what does not go through a
    // gateway (priority srcnat: after the gateway's table).
    outside_routes(&c, &["192.0.2.0/24", "2001:db8::/32"]).expect("routes to the outside");
    for k in [GW_A, GW_B] {
        let mut n = c.node_object(k);
        n["metadata"]["labels"]["egress"] = json!("gw");
        c.api.apply(&n.to_string());
    }
    c.api.apply_all(OBJECTS);
    // b1 runs on the first gateway itself (selected too: its flows take the tunnel to its own
    // node); b2 on the standby, not selected.
    for (name, app) in [("a0", "a"), ("c0", "c"), ("b1", "a"), ("b2", "b")] {
        let o = pod_object(&c, name, app);
        c.api.apply(&o);
    }
    let work = WorkDir::new("egress-gateway");
    c.agent_args = vec![
        "--egress-log".into(),
        "{dir}/egress.jsonl".into(),
        "--egress-probe-ms".into(),
        "250".into(),
        "--egress-probe-misses".into(),
        "3".into(),
    ];
    let agent = agent_binary();
    c.start_agents(&agent, work.path(), Duration::from_secs(60))
        .expect("agents");
    c.wait_reconciled(Duration::from_secs(60))
        .expect("reconciled");
    let a0 = c.find_pod("a0").unwrap().1.clone();
    let c0 = c.find_pod("c0").unwrap().1.clone();
    let node1 = node_ips(0);

    // The first gateway by name holds the addresses; a0 gets through.
    wait_for(
        "node-2 holds the egress addresses",
        Duration::from_secs(20),
        || holds(&c, GW_A, EGRESS_V4) && holds(&c, GW_A, EGRESS_V6),
    );
    wait_for("the standby holds nothing", Duration::from_secs(10), || {
        !holds(&c, GW_B, EGRESS_V4) && !holds(&c, GW_B, EGRESS_V6)
    });
    wait_for("a0 reaches the outside", Duration::from_secs(20), || {
        exchange(&a0, ip(DST_V4), PORT, Duration::from_millis(500))
    });

    // Who arrives as whom.
    let t = Instant::now();
    for _ in 0..3 {
        assert!(exchange(&a0, ip(DST_V4), PORT, Duration::from_secs(2)));
        assert!(exchange(&a0, ip(DST_V6), PORT, Duration::from_secs(2)));
        assert!(exchange(&c0, ip(DST_OTHER), PORT, Duration::from_secs(2)));
        assert!(exchange(&c0, ip(DST_V6), PORT, Duration::from_secs(2)));
        assert!(exchange(
            &a0,
            ip(DST_EXCLUDED),
            PORT,
            Duration::from_secs(2)
        ));
    }
    assert!(
        !exchange(&a0, ip(DST_V4), DENIED_PORT, Duration::from_millis(500)),
        "a0's policy denies port {DENIED_PORT}"
    );
    let v4 = sources(&ext, t, DST_V4, PORT);
    let b1 = c.find_pod("b1").unwrap().1.clone();
    let t1 = Instant::now();
    assert!(exchange(&b1, ip(DST_V4), PORT, Duration::from_secs(2)));
    assert_eq!(
        sources(&ext, t1, DST_V4, PORT),
        vec![ip(EGRESS_V4)],
        "a selected pod on the active gateway itself: the egress address"
    );
    assert_eq!(
        v4,
        vec![ip(EGRESS_V4); 3],
        "a0 over IPv4: the egress address"
    );
    let v6: Vec<IpAddr> = sources(&ext, t, DST_V6, PORT);
    assert_eq!(
        v6.iter().filter(|s| **s == ip(EGRESS_V6)).count(),
        3,
        "a0 over IPv6: the egress address ({v6:?})"
    );
    assert_eq!(
        v6.iter().filter(|s| **s == IpAddr::V6(node1.1)).count(),
        3,
        "c0 (not selected) over IPv6: its node ({v6:?})"
    );
    assert_eq!(v6.len(), 6, "{v6:?}");
    assert_eq!(
        sources(&ext, t, DST_OTHER, PORT),
        vec![IpAddr::V4(node1.0); 3],
        "c0: its node's address"
    );
    assert_eq!(
        sources(&ext, t, DST_EXCLUDED, PORT),
        vec![IpAddr::V4(node1.0); 3],
        "an excluded destination: the pod's node"
    );
    assert!(
        ext.seen_since(t).iter().all(|s| s.2 != DENIED_PORT),
        "a flow the policy denies never leaves"
    );

    // Only nodes may use the tunnel: a VXLAN packet to the gateway carrying a0's address,
    // sent from outside, goes nowhere; the same packet from a node (the control) goes out.
    let spoof = vxlan_udp(a0.ip(false), ip(DST_V4), 7777);
    let gw_addr = SocketAddr::new(IpAddr::V4(node_ips(GW_A).0), 4789);
    let got = udp_seen(&ext, 7777, || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        s.send_to(&spoof, gw_addr).unwrap();
    });
    assert!(
        got.is_empty(),
        "a tunnelled packet from outside the cluster was forwarded: {got:?}"
    );
    let node3 = c.nodes()[GW_B].netns_name.clone();
    let got = udp_seen(&ext, 7777, || {
        netns::in_netns(&node3, || {
            let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
            s.send_to(&spoof, gw_addr).unwrap();
        })
        .unwrap();
    });
    assert_eq!(
        got,
        vec![ip(EGRESS_V4)],
        "the control: from a node, the same packet goes out as the egress address"
    );

    // On record: every flow through the gateway, when it ends.
    let log = work.path().join(node_name(0)).join("egress.jsonl");
    let mut records: Vec<serde_json::Value> = Vec::new();
    wait_for("the flows' records", Duration::from_secs(30), || {
        records = std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        let through = |dst: &str| {
            records
                .iter()
                .filter(|r| r["destination"]["ip"] == dst)
                .count()
        };
        through(DST_V4) >= 4 && through(DST_V6) >= 3
    });
    for r in &records {
        let e = &r["egress"];
        assert_eq!(r["endpoint"], "demo/a0", "{r}");
        assert_eq!(e["gateway"], "partners", "{r}");
        assert_eq!(e["node"], "node-2", "{r}");
        let want = if r["destination"]["ip"].as_str().unwrap().contains(':') {
            EGRESS_V6
        } else {
            EGRESS_V4
        };
        assert_eq!(e["egress_ip"], want, "{r}");
        assert!(
            e["packets"].as_u64().unwrap() >= 6,
            "a whole TCP exchange: {r}"
        );
        assert!(e["bytes"].as_u64().unwrap() > 0, "{r}");
    }
    assert!(
        records
            .iter()
            .all(|r| r["destination"]["ip"] != DST_EXCLUDED),
        "excluded destinations are not gateway flows"
    );
    let out = c.nodes()[0]
        .command(&agent)
        .args(["verdicts", "--socket"])
        .arg(c.agent(0).unwrap().socket())
        .args(["-o", "json"])
        .output()
        .expect("palisade verdicts");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("\"egress-gateway\"") && text.contains(EGRESS_V4),
        "palisade verdicts shows the gateway flows:\n{text}"
    );

    // The pod node's agent restarts: its pinned maps keep steering meanwhile, and the new
    // agent adopts them (nothing goes out as node-1 in between).
    let t = Instant::now();
    c.kill_agent(0);
    assert!(
        exchange(&a0, ip(DST_V4), PORT, Duration::from_secs(2)),
        "pinned steering"
    );
    c.restart_agent(0, &agent).expect("restart node-1's agent");
    for _ in 0..20 {
        exchange(&a0, ip(DST_V4), PORT, Duration::from_millis(300));
        std::thread::sleep(Duration::from_millis(50));
    }
    c.wait_reconciled_on(&[0], Duration::from_secs(30))
        .expect("node-1 reconciled");
    assert!(exchange(&a0, ip(DST_V4), PORT, Duration::from_secs(2)));
    let seen = sources(&ext, t, DST_V4, PORT);
    assert!(
        seen.len() >= 2 && seen.iter().all(|s| *s == ip(EGRESS_V4)),
        "across the pod node's agent restart, only the egress address: {seen:?}"
    );

    // The price of the detour: a short exchange (connect, one byte each way) direct from
    // node-1 (c0) and through the gateway (a0), medians of 40.
    let median = |pod: &Pod, dst: &str| {
        let mut v: Vec<Duration> = (0..40)
            .map(|_| {
                let t = Instant::now();
                assert!(exchange(pod, ip(dst), PORT, Duration::from_secs(2)));
                t.elapsed()
            })
            .collect();
        v.sort();
        v[v.len() / 2]
    };
    let direct = median(&c0, DST_OTHER);
    let through = median(&a0, DST_V4);
    eprintln!(
        "egress latency: a short TCP exchange direct {direct:?}, through the gateway {through:?} (median of 40)"
    );

    // Failover: the active gateway's node not Ready; its agent killed; its link down.
    let mut phases = Vec::new();
    let ready = |c: &Cluster, k: usize, status: &str| {
        let mut n = c.node_object(k);
        n["metadata"]["labels"]["egress"] = json!("gw");
        n["status"]["conditions"] = json!([{"type": "Ready", "status": status}]);
        c.api.apply(&n.to_string());
    };
    phases.push(failover(&mut c, &ext, "node not Ready", GW_B, |c| {
        ready(c, GW_A, "False")
    }));
    ready(&c, GW_A, "True");
    wait_for("node-2 active again", Duration::from_secs(20), || {
        holds(&c, GW_A, EGRESS_V4) && !holds(&c, GW_B, EGRESS_V4)
    });
    wait_for("a0 through node-2 again", Duration::from_secs(10), || {
        exchange(&a0, ip(DST_V4), PORT, Duration::from_millis(500))
    });
    phases.push(failover(&mut c, &ext, "agent killed", GW_B, |c| {
        c.kill_agent(GW_A)
    }));
    // The dead agent's node lets go of the address by itself (its lifetime runs out).
    wait_for(
        "the dead gateway's egress address expires",
        Duration::from_secs(5),
        || !holds(&c, GW_A, EGRESS_V4) && !holds(&c, GW_A, EGRESS_V6),
    );
    // Back: the first gateway by name takes over again once alive.
    c.restart_agent(GW_A, &agent).expect("restart");
    wait_for("node-2 active again", Duration::from_secs(20), || {
        holds(&c, GW_A, EGRESS_V4) && !holds(&c, GW_B, EGRESS_V4)
    });
    wait_for("a0 through node-2 again", Duration::from_secs(10), || {
        exchange(&a0, ip(DST_V4), PORT, Duration::from_millis(500))
    });
    let gw_a_ns = c.nodes()[GW_A].netns_name.clone();
    phases.push(failover(&mut c, &ext, "link down", GW_B, |_| {
        netns::ip_batch(Some(&gw_a_ns), &["link set up0 down".into()]).expect("link down");
    }));
    for p in &phases {
        eprintln!(
            "egress failover, {}: standby held the address after {:?}; longest outage {:?}; {} of {} exchanges failed; 0 from a wrong source",
            p.name, p.takeover, p.outage, p.failed, p.total
        );
        assert!(
            p.outage < Duration::from_secs(5),
            "{}: outage {:?}",
            p.name,
            p.outage
        );
    }

    // No live gateway: dropped and counted, never out through node-1.
    c.kill_agent(GW_B);
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let before = sources(&ext, t, DST_V4, PORT).len();
    for _ in 0..5 {
        assert!(
            !exchange(&a0, ip(DST_V4), PORT, Duration::from_millis(300)),
            "no live gateway: a0's flow does not complete"
        );
    }
    assert!(
        exchange(&c0, ip(DST_OTHER), PORT, Duration::from_secs(2)),
        "c0 unaffected"
    );
    let after = sources(&ext, t, DST_V4, PORT);
    assert!(
        after.len() == before && after.iter().all(|s| *s == ip(EGRESS_V4)),
        "nothing of a0's left while no gateway lived: {after:?}"
    );
    let stats = c.nodes()[0]
        .command(&agent)
        .args(["stats", "--socket"])
        .arg(c.agent(0).unwrap().socket())
        .output()
        .expect("palisade stats");
    let stats = String::from_utf8_lossy(&stats.stdout);
    assert!(
        stats.contains("egress-no-gateway"),
        "the drops are counted by reason:\n{stats}"
    );
}
