//! Running in a cluster, on the netns rig: Services through a kube-proxy-like DNAT, the chained
//! CNI plugin enforcing from a pod's first packet, the agent in cluster mode (against a fake API
//! server) killed and restarted while probes run, Nodes and ClusterNetworkPolicies from the API
//! (without their CRD first, then enforced), and program upgrades swapped into live links.
//! Needs root; under CI=true that is a failure, not a skip.
mod support;

use std::io::{Read, Write};
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use palisade_tests::{
    agent::{AgentProcess, Bpffs, WorkDir, agent_binary},
    rig::{Node, ProbeSpec, Proto, probe_expecting, probe_many, require_root},
};
use support::cluster::{
    ClusterAgent, FakeApi, endpoint_entry, namespace, node_yaml, pod_yaml, run_cni,
};
use support::{B_POLICY, demo_node, demo_pod as pod, nft};

const TIMEOUT: Duration = Duration::from_millis(700);

/// Probes every (from, to address, port, protocol) at once; allowed probes that fail are asked
/// again, slower (a loaded machine misses deadlines; a denied probe that passes is never
/// retried: that is a hole).
fn probe_all(node: &Node, probes: &[(&str, IpAddr, u16, Proto, bool)]) -> Vec<bool> {
    let specs: Vec<ProbeSpec<'_>> = probes
        .iter()
        .map(|(from, to, port, proto, _)| ProbeSpec {
            from: pod(node, from),
            to: *to,
            port: *port,
            proto: *proto,
            timeout: TIMEOUT,
        })
        .collect();
    let expect: Vec<bool> = probes.iter().map(|p| p.4).collect();
    probe_expecting(&specs, &expect)
}

/// Probes `expect` over and over until `stop`: 300 ms probes, an allowed one that misses it
/// asked again with 3 s before it counts as failed (a denied one that passes always counts).
fn probe_continuously(
    node: &Node,
    expect: &[(&str, IpAddr, u16, Proto, bool)],
    stop: &AtomicBool,
    sent: &AtomicU64,
    slow_allowed: &AtomicU64,
    wrong: &Mutex<Vec<String>>,
) {
    let specs: Vec<ProbeSpec<'_>> = expect
        .iter()
        .map(|(from, to, port, proto, _)| ProbeSpec {
            from: pod(node, from),
            to: *to,
            port: *port,
            proto: *proto,
            timeout: Duration::from_millis(300),
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        let first = probe_many(&specs);
        sent.fetch_add(specs.len() as u64, Ordering::Relaxed);
        for (i, (e, got)) in expect.iter().zip(&first).enumerate() {
            if !e.4 && *got {
                wrong.lock().unwrap().push(format!(
                    "{} -> {}:{} passed (expected false) at {:?}",
                    e.0,
                    e.1,
                    e.2,
                    SystemTime::now()
                ));
            }
            if e.4 && !*got {
                slow_allowed.fetch_add(1, Ordering::Relaxed);
                sent.fetch_add(1, Ordering::Relaxed);
                let retry = ProbeSpec {
                    timeout: Duration::from_secs(3),
                    ..specs[i]
                };
                if !probe_many(&[retry])[0] {
                    wrong.lock().unwrap().push(format!(
                        "{} -> {}:{} failed (expected true) at {:?}",
                        e.0,
                        e.1,
                        e.2,
                        SystemTime::now()
                    ));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Services
// ---------------------------------------------------------------------------------------------

const SERVICE_POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: a-egress, namespace: demo}
spec:
  podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress, Ingress]
  egress:
    - to: [{podSelector: {matchLabels: {app: b}}}]
      ports: [{port: 80, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: c-egress, namespace: demo}
spec:
  podSelector: {matchLabels: {app: c}}
  policyTypes: [Egress]
  egress:
    - to: [{podSelector: {matchLabels: {app: a}}}]
      ports: [{port: web}]
    - to: [{podSelector: {matchLabels: {app: b}}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-from-a, namespace: demo}
spec:
  podSelector: {matchLabels: {app: b}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: a}}}]
"#;

/// A Service per pod (VIP 10.96.0.1x, TCP 8080 -> 80 by name, UDP 5353 -> 80) and its slice.
fn service_yaml(name: &str, ip: IpAddr, vip: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{name}, namespace: demo}}\n\
         spec: {{clusterIP: {vip}, clusterIPs: [{vip}], selector: {{app: {name}}}, ports: [\
         {{name: http, port: 8080, targetPort: web, protocol: TCP}}, {{name: dns, port: 5353, targetPort: 80, protocol: UDP}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\naddressType: IPv4\n\
         metadata: {{name: svc-{name}-x1, namespace: demo, labels: {{kubernetes.io/service-name: svc-{name}}}}}\n\
         ports: [{{name: http, port: 80, protocol: TCP}}, {{name: dns, port: 80, protocol: UDP}}]\n\
         endpoints: [{{addresses: ['{ip}'], conditions: {{ready: true}}, nodeName: node-1}}]\n"
    )
}

/// kube-proxy's nftables mode, reduced to what matters here: DNAT in prerouting.
fn dnat_rules(services: &[(String, IpAddr)]) -> String {
    let mut rules = String::from(
        "table ip palisade_kube_proxy {\n  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n",
    );
    for (vip, ip) in services {
        rules.push_str(&format!(
            "    ip daddr {vip} tcp dport 8080 dnat to {ip}:80\n    ip daddr {vip} udp dport 5353 dnat to {ip}:80\n"
        ));
    }
    rules.push_str("  }\n}\n");
    rules
}

#[test]
fn egress_through_a_service_vip_is_egress_to_its_backends() {
    if !require_root() {
        return;
    }
    let node = demo_node(&["a", "b", "c"], false);
    let work = WorkDir::new("services");
    let manifests = work.path().join("manifests");
    let mut cluster = namespace("demo");
    let mut vips = Vec::new();
    for (i, name) in ["a", "b", "c"].iter().enumerate() {
        let p = pod(&node, name);
        cluster.push_str("---\n");
        cluster.push_str(&pod_yaml(p, "node-1", true));
        let vip = format!("10.96.0.1{i}");
        cluster.push_str(&service_yaml(name, p.ip(false), &vip));
        vips.push((vip, p.ip(false)));
    }
    std::fs::write(manifests.join("cluster.yaml"), &cluster).unwrap();
    std::fs::write(manifests.join("policies.yaml"), SERVICE_POLICIES).unwrap();
    nft(&node, &dnat_rules(&vips));
    let since = SystemTime::now();
    let mut agent =
        AgentProcess::start(&node, &agent_binary(), &manifests, work.path()).expect("agent");
    let st = agent
        .wait_reconciled(since, 3, Duration::from_secs(30))
        .expect("reconciled");
    assert!(st.errors.is_empty(), "{:?}", st.errors);

    let vip = |name: &str| -> IpAddr {
        let i = ["a", "b", "c"].iter().position(|n| *n == name).unwrap();
        vips[i].0.parse().unwrap()
    };
    // (from, to, protocol, expected): to the pod's port 80, and through its Service.
    let matrix: Vec<(&str, &str, Proto, bool)> = vec![
        ("a", "b", Proto::Tcp, true),  // a's egress allows b:80, b admits a
        ("a", "c", Proto::Tcp, false), // a's egress: b only
        ("a", "b", Proto::Udp, false), // a's egress: TCP only
        ("b", "a", Proto::Tcp, false), // a admits nobody
        ("b", "c", Proto::Tcp, true),  // neither side isolated
        ("b", "c", Proto::Udp, true),
        ("c", "a", Proto::Tcp, false), // c's egress allows a:web, but a admits nobody
        ("c", "b", Proto::Tcp, false), // c's egress allows b, b admits only a
        ("c", "b", Proto::Udp, false),
    ];
    let mut probes = Vec::new();
    for (from, to, proto, want) in &matrix {
        let (direct, via) = match proto {
            Proto::Udp => (80, 5353),
            _ => (80, 8080),
        };
        probes.push((*from, pod(&node, to).ip(false), direct, *proto, *want));
        probes.push((*from, vip(to), via, *proto, *want));
    }
    let got = probe_all(&node, &probes);
    let mut wrong = Vec::new();
    for (i, (from, to, proto, want)) in matrix.iter().enumerate() {
        let (direct, via) = (got[2 * i], got[2 * i + 1]);
        eprintln!(
            "{from} -> {to} {proto}: pod IP {}, Service VIP {} (expected {})",
            direct, via, want
        );
        if direct != *want || via != *want {
            wrong.push(format!(
                "{from} -> {to} {proto}: direct {direct}, via VIP {via}, expected {want}"
            ));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");

    // Both directions of one connection through the VIP: a's answers come back from the VIP
    // (un-DNATed) and a admits nobody, so they pass only as the flow's replies.
    let mut conn = pod(&node, "a")
        .connect_tcp(vip("b"), 8080)
        .expect("a -> svc-b");
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    for i in 0..20u8 {
        let mut buf = [0u8; 1];
        conn.write_all(&[i]).unwrap();
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(buf[0], i);
    }

    // A backend change moves the VIP's meaning with it: svc-b now points at c.
    let moved = cluster.replace(
        &format!(
            "endpoints: [{{addresses: ['{}'], conditions: {{ready: true}}, nodeName: node-1}}]\n",
            pod(&node, "b").ip(false)
        ),
        &format!(
            "endpoints: [{{addresses: ['{}'], conditions: {{ready: true}}, nodeName: node-1}}]\n",
            pod(&node, "c").ip(false)
        ),
    );
    assert_ne!(moved, cluster);
    let since = SystemTime::now();
    let tmp = manifests.join("cluster.yaml.tmp");
    std::fs::write(&tmp, &moved).unwrap();
    std::fs::rename(&tmp, manifests.join("cluster.yaml")).unwrap();
    agent
        .wait_reconciled(since, 3, Duration::from_secs(30))
        .expect("reconciled");
    nft(&node, "flush table ip palisade_kube_proxy\n");
    let c_ip = pod(&node, "c").ip(false);
    let moved_vips: Vec<(String, IpAddr)> =
        vec![vips[0].clone(), (vips[1].0.clone(), c_ip), vips[2].clone()];
    nft(&node, &dnat_rules(&moved_vips));
    let got = probe_all(
        &node,
        &[
            // a may not reach c: through svc-b (now c) it is denied too.
            ("a", vip("b"), 8080, Proto::Tcp, false),
            // b -> svc-b (c): allowed like b -> c.
            ("b", vip("b"), 8080, Proto::Tcp, true),
        ],
    );
    assert_eq!(got, vec![false, true], "the VIP follows its backends");
}

// ---------------------------------------------------------------------------------------------
// The CNI plugin
// ---------------------------------------------------------------------------------------------

const D_POLICY: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: new-pods, namespace: demo}
spec:
  podSelector: {matchExpressions: [{key: app, operator: In, values: [d, e, f]}]}
  policyTypes: [Ingress, Egress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: a}}}]
  egress:
    - to: [{podSelector: {matchLabels: {app: b}}}]
"#;

/// Polls the pinned ENDPOINTS entry of `ifindex` until the agent's real entry replaced the
/// plugin's provisional one; the time it took.
fn wait_real_entry(pin_dir: &std::path::Path, ifindex: u32, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if let Some((id, flags)) = endpoint_entry(pin_dir, ifindex)
            && !palisade::cni::is_provisional(id)
            && flags & palisade_common::EP_PENDING == 0
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "no real entry for ifindex {ifindex} within {timeout:?}: {:?}",
            endpoint_entry(pin_dir, ifindex)
        );
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// Before the agent has loaded the datapath, ADD under `initialPolicy: deny` fails with the
/// CNI specification's "try again later" (11), so the runtime retries instead of giving up;
/// under `allow` it passes, unenforced.
#[test]
fn cni_add_before_the_datapath_is_loaded_says_try_again_later() {
    if !require_root() {
        return;
    }
    let node = demo_node(&["a"], false);
    let work = WorkDir::new("cni-early");
    let (pin_dir, cni_dir) = (work.path().join("no-pins"), work.path().join("cni"));
    let bin = agent_binary();
    let a = pod(&node, "a");
    let err = run_cni(&node, &bin, "ADD", a, &pin_dir, &cni_dir, "deny")
        .expect_err("ADD must fail without a datapath under initialPolicy deny")
        .to_string();
    let start = err.find('{').expect("a CNI error object on stdout");
    let end = err.rfind('}').unwrap() + 1;
    let v: serde_json::Value = serde_json::from_str(&err[start..end]).expect(&err);
    assert_eq!(v["code"], 11, "{v}");
    assert!(
        v["msg"].as_str().unwrap().contains("initialPolicy deny"),
        "{v}"
    );
    let out = run_cni(&node, &bin, "ADD", a, &pin_dir, &cni_dir, "allow").expect("ADD, allow");
    let v: serde_json::Value = serde_json::from_str(&out).expect("ADD prints a result");
    assert_eq!(v["ips"][0]["address"], format!("{}/32", a.ip(false)));
}

#[test]
fn cni_add_enforces_from_the_first_packet() {
    if !require_root() {
        return;
    }
    let node = demo_node(&["a", "b", "d", "e", "f"], false);
    let work = WorkDir::new("cni");
    let manifests = work.path().join("manifests");
    let cni_dir = work.path().join("cni");
    // d and e are in the API but have no address yet: the CNI ADD has not returned.
    let mut cluster = namespace("demo");
    for (name, ip) in [
        ("a", true),
        ("b", true),
        ("d", false),
        ("e", false),
        ("f", false),
    ] {
        cluster.push_str("---\n");
        cluster.push_str(&pod_yaml(pod(&node, name), "node-1", ip));
    }
    std::fs::write(manifests.join("cluster.yaml"), &cluster).unwrap();
    std::fs::write(manifests.join("policies.yaml"), D_POLICY).unwrap();
    let since = SystemTime::now();
    let cni_arg = cni_dir.display().to_string();
    let mut agent = AgentProcess::start_with(
        &node,
        &agent_binary(),
        &manifests,
        work.path(),
        &["--cni-state-dir", &cni_arg],
    )
    .expect("agent");
    agent
        .wait_reconciled(since, 2, Duration::from_secs(30))
        .expect("reconciled");
    let pin_dir = agent.pin_dir().to_path_buf();
    let bin = agent_binary();

    // ADD with the agent running: provisional entry and programs, then the real policy.
    let d = pod(&node, "d");
    let t0 = Instant::now();
    let out = run_cni(&node, &bin, "ADD", d, &pin_dir, &cni_dir, "deny").expect("ADD");
    let add_took = t0.elapsed();
    let v: serde_json::Value = serde_json::from_str(&out).expect("ADD prints a result");
    assert_eq!(v["ips"][0]["address"], format!("{}/32", d.ip(false)));
    let to_policy = add_took + wait_real_entry(&pin_dir, d.host_ifindex, Duration::from_secs(10));
    eprintln!(
        "CNI ADD returned in {:.1} ms; ADD to the pod's real policy: {:.1} ms",
        add_took.as_secs_f64() * 1e3,
        to_policy.as_secs_f64() * 1e3
    );
    let ip = |n: &str| pod(&node, n).ip(false);
    let got = probe_all(
        &node,
        &[
            ("a", ip("d"), 80, Proto::Tcp, true),
            ("b", ip("d"), 80, Proto::Tcp, false),
            ("d", ip("b"), 80, Proto::Tcp, true),
            ("d", ip("a"), 80, Proto::Tcp, false),
        ],
    );
    assert_eq!(got, vec![true, false, true, false], "d's policy");
    let rec = std::fs::read_dir(&cni_dir)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("ctr-d"))
        .expect("a record");
    let rec: palisade::cni::Record =
        serde_json::from_str(&std::fs::read_to_string(rec.path()).unwrap()).unwrap();
    assert_eq!(rec.found_by, "netns-peer");
    assert_eq!(rec.host_ifindex, d.host_ifindex);

    // ADD with no agent running: the pod's every packet is dropped until an agent compiles
    // its policy (fail closed), even what its policy will allow.
    agent.kill();
    let e = pod(&node, "e");
    run_cni(&node, &bin, "ADD", e, &pin_dir, &cni_dir, "deny").expect("ADD without agent");
    let (id, flags) = endpoint_entry(&pin_dir, e.host_ifindex).expect("provisional entry");
    assert!(palisade::cni::is_provisional(id));
    assert_ne!(flags & palisade_common::EP_PENDING, 0);
    let pending_probes = [
        ("a", ip("e"), 80, Proto::Tcp, false),
        ("e", ip("b"), 80, Proto::Tcp, false),
        ("b", ip("e"), 80, Proto::Tcp, false),
    ];
    for _ in 0..3 {
        assert_eq!(
            probe_all(&node, &pending_probes),
            vec![false; 3],
            "pending: nothing passes"
        );
    }
    // d keeps its policy meanwhile.
    assert_eq!(
        probe_all(&node, &[("a", ip("d"), 80, Proto::Tcp, true)]),
        vec![true]
    );
    let since = SystemTime::now();
    let started = Instant::now();
    agent
        .spawn(&node, &bin, &manifests)
        .expect("agent restarts");
    let took = wait_real_entry(&pin_dir, e.host_ifindex, Duration::from_secs(30));
    eprintln!(
        "agent started after the ADD: e's real policy {:.0} ms after the start",
        (started.elapsed().max(took)).as_secs_f64() * 1e3
    );
    agent
        .wait_reconciled(since, 4, Duration::from_secs(30))
        .expect("4 endpoints");
    let got = probe_all(
        &node,
        &[
            ("a", ip("e"), 80, Proto::Tcp, true),
            ("e", ip("b"), 80, Proto::Tcp, true),
            ("b", ip("e"), 80, Proto::Tcp, false),
        ],
    );
    assert_eq!(got, vec![true, true, false], "e's policy");

    // A leftover entry on the new pod's ifindex (an interface that had it before, removed
    // while no agent ran): it does not police the new pod; the pod starts pending and gets
    // its own policy.
    let f = pod(&node, "f");
    {
        use aya::maps::{HashMap, Map, MapData};
        let data = MapData::from_pin(pin_dir.join("maps/ENDPOINTS")).unwrap();
        let mut m: HashMap<MapData, u32, palisade_common::EndpointInfo> =
            HashMap::try_from(Map::HashMap(data)).unwrap();
        m.insert(
            f.host_ifindex,
            palisade_common::EndpointInfo {
                id: 4242,
                ..Default::default()
            },
            0,
        )
        .unwrap();
    }
    let t0 = Instant::now();
    run_cni(&node, &bin, "ADD", f, &pin_dir, &cni_dir, "deny").expect("ADD over a leftover");
    let (id, _) = endpoint_entry(&pin_dir, f.host_ifindex).unwrap();
    assert!(
        palisade::cni::is_provisional(id) || id != 4242,
        "the leftover entry was replaced"
    );
    wait_real_entry(&pin_dir, f.host_ifindex, Duration::from_secs(10));
    eprintln!(
        "ADD over a leftover entry to the real policy: {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );
    let got = probe_all(
        &node,
        &[
            ("a", ip("f"), 80, Proto::Tcp, true),
            ("b", ip("f"), 80, Proto::Tcp, false),
        ],
    );
    assert_eq!(got, vec![true, false], "f's own policy");

    // CHECK, then DEL: the record goes (the agent forgets the interface with the pod).
    run_cni(&node, &bin, "CHECK", e, &pin_dir, &cni_dir, "deny").expect("CHECK");
    run_cni(&node, &bin, "DEL", e, &pin_dir, &cni_dir, "deny").expect("DEL");
    run_cni(&node, &bin, "DEL", e, &pin_dir, &cni_dir, "deny").expect("DEL twice");
    assert!(
        !std::fs::read_dir(&cni_dir)
            .unwrap()
            .flatten()
            .any(|f| f.file_name().to_string_lossy().starts_with("ctr-e"))
    );
    let st = agent.status().expect("status");
    assert!(st.errors.is_empty(), "{:?}", st.errors);
}

// ---------------------------------------------------------------------------------------------
// Cluster mode: kill -9 and restart
// ---------------------------------------------------------------------------------------------

const CLUSTER_POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: b-ingress, namespace: demo}
spec:
  podSelector: {matchLabels: {app: b}}
  policyTypes: [Ingress, Egress]
  ingress:
    - from: [{podSelector: {matchLabels: {app: a}}}]
      ports: [{port: 80, protocol: TCP}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: c-d-ingress, namespace: demo}
spec:
  podSelector: {matchExpressions: [{key: app, operator: In, values: [c, d]}]}
  ingress:
    - from: [{podSelector: {matchLabels: {app: a}}}]
"#;

#[test]
fn cluster_mode_survives_kill_and_restart() {
    if !require_root() {
        return;
    }
    let node = demo_node(&["a", "b", "c", "d"], false);
    let work = WorkDir::new("cluster");
    let api = FakeApi::start(&node).expect("fake API server");
    // Kubernetes 1.33: the agent's streaming lists are refused, and it lists with LIST (the
    // other tests here stream).
    api.refuse_streaming_lists();
    let kubeconfig = work.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig).unwrap();
    api.apply(&namespace("demo"));
    api.apply(&namespace("other"));
    for name in ["a", "b", "c"] {
        api.apply(&pod_yaml(pod(&node, name), "node-1", true));
    }
    // d is scheduled here; the CNI ADD has not happened yet.
    api.apply(&pod_yaml(pod(&node, "d"), "node-1", false));
    // A pod of another node, a hostNetwork pod: peers and non-endpoints.
    api.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: far, namespace: other, labels: {app: far}}\n\
         spec: {nodeName: node-2, containers: [{name: c}]}\nstatus: {podIP: 10.244.9.9, podIPs: [{ip: 10.244.9.9}]}\n",
    );
    api.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: proxy, namespace: other}\n\
         spec: {nodeName: node-1, hostNetwork: true, containers: [{name: c}]}\nstatus: {podIP: 10.243.0.1}\n",
    );
    api.apply_all(CLUSTER_POLICIES);
    let since = SystemTime::now();
    let bin = agent_binary();
    let mut agent = ClusterAgent::start(&node, &bin, &kubeconfig, work.path()).expect("agent");
    agent
        .wait(since, Duration::from_secs(60), |s| s.endpoints == 3)
        .expect("cluster agent reconciles a, b, c");
    assert_eq!(agent.probe_health(&node, "/healthz"), Some(200));
    assert_eq!(agent.probe_health(&node, "/readyz"), Some(200));

    // The CNI ADD for d, in cluster mode: the agent learns d's address from the plugin's
    // record (the API has none yet) and compiles its policy.
    let d = pod(&node, "d");
    let t0 = Instant::now();
    run_cni(
        &node,
        &bin,
        "ADD",
        d,
        &agent.pin_dir,
        &agent.cni_dir,
        "deny",
    )
    .expect("ADD");
    let add_took = t0.elapsed();
    let to_policy =
        add_took + wait_real_entry(&agent.pin_dir, d.host_ifindex, Duration::from_secs(10));
    eprintln!(
        "cluster mode: CNI ADD returned in {:.1} ms; ADD to d's real policy: {:.1} ms",
        add_took.as_secs_f64() * 1e3,
        to_policy.as_secs_f64() * 1e3
    );
    // Then the kubelet reports the address.
    api.apply(&pod_yaml(d, "node-1", true));

    let ip = |n: &str| pod(&node, n).ip(false);
    // (from, to, port, allowed): probed continuously from here on.
    let expect: Vec<(&str, IpAddr, u16, Proto, bool)> = vec![
        ("a", ip("b"), 80, Proto::Tcp, true),
        ("a", ip("c"), 80, Proto::Tcp, true),
        ("a", ip("d"), 80, Proto::Tcp, true),
        ("c", ip("b"), 80, Proto::Tcp, false),
        ("a", ip("b"), 81, Proto::Tcp, false),
        ("b", ip("a"), 80, Proto::Tcp, false),
        ("b", ip("d"), 80, Proto::Tcp, false),
        ("c", ip("d"), 80, Proto::Tcp, false),
    ];
    assert_eq!(
        probe_all(&node, &expect),
        expect.iter().map(|e| e.4).collect::<Vec<_>>(),
        "the policy is in force"
    );
    // A long-lived connection a -> b:80. b is isolated for egress with no rule: its answers
    // pass only as the flow's replies (conntrack), across every restart.
    let mut conn = pod(&node, "a").connect_tcp(ip("b"), 80).expect("a -> b");
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let echo = |conn: &mut std::net::TcpStream, byte: u8| -> bool {
        let mut buf = [0u8; 1];
        conn.write_all(&[byte]).is_ok() && conn.read_exact(&mut buf).is_ok() && buf[0] == byte
    };
    assert!(echo(&mut conn, 1));

    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let wrong = Mutex::new(Vec::<String>::new());
    let slow_allowed = AtomicU64::new(0);
    let mut restarts: u32 = 0;
    let mut echoes = 0;
    std::thread::scope(|scope| {
        let (stop, sent, wrong, slow_allowed, node, expect) =
            (&stop, &sent, &wrong, &slow_allowed, &node, &expect);
        let prober =
            scope.spawn(move || probe_continuously(node, expect, stop, sent, slow_allowed, wrong));
        for cycle in 0..10 {
            agent.kill();
            restarts += 1;
            // While no agent runs: the pins enforce; the cluster changes (unrelated objects,
            // and a label change that moves no probed flow).
            api.apply(&format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: churn-{cycle}, namespace: other, labels: {{app: churn}}}}\n\
                 spec: {{nodeName: node-2, containers: [{{name: c}}]}}\nstatus: {{podIP: 10.244.8.{cycle}}}\n"
            ));
            if cycle % 2 == 1 {
                api.delete("Pod", "other", &format!("churn-{}", cycle - 1));
            }
            std::thread::sleep(Duration::from_millis(150 + 90 * cycle as u64));
            if cycle == 3 {
                // The history is compacted while the agent is down: its successor lists anew
                // anyway; the next compaction (below) hits a running agent's watches.
                api.compact();
            }
            let since = SystemTime::now();
            agent.spawn(node, &bin).expect("restart");
            agent
                .wait(since, Duration::from_secs(60), |s| s.endpoints == 4)
                .expect("restarted agent reconciles");
            assert!(
                echo(&mut conn, 10 + cycle as u8),
                "cycle {cycle}: connection"
            );
            echoes += 1;
            // Probes run against the restarted agent too, before the next kill.
            std::thread::sleep(Duration::from_millis(600));
            if cycle == 4 {
                // 410 Gone on every open watch: the agent re-lists and keeps enforcing.
                let lists = api.fills("pods");
                api.compact();
                api.apply(&namespace("after-gone"));
                let deadline = Instant::now() + Duration::from_secs(30);
                while api.fills("pods") == lists {
                    assert!(Instant::now() < deadline, "no re-list after 410");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        prober.join().unwrap();
    });
    let wrong = wrong.into_inner().unwrap();
    eprintln!(
        "{restarts} kill -9 + restarts: {} probes sent ({} flows, 5 denied, 3 allowed, probed \
         continuously), {} denied probes passed, {} allowed probes failed ({} missed a 300 ms \
         deadline and were asked again with 3 s); the long-lived connection echoed {} times",
        sent.load(Ordering::Relaxed),
        expect.len(),
        wrong
            .iter()
            .filter(|w| w.contains("expected false"))
            .count(),
        wrong.iter().filter(|w| w.contains("expected true")).count(),
        slow_allowed.load(Ordering::Relaxed),
        echoes + 2
    );
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert!(echo(&mut conn, 99), "the connection survived");
    let log = agent.log_text();
    assert!(log.contains("re-listed"), "the 410 led to a re-list");
    for r in ["pods", "namespaces", "networkpolicies"] {
        let (streams, lists) = (
            api.requests(&format!("stream {r}")),
            api.requests(&format!("list {r}")),
        );
        assert_eq!(
            streams,
            u64::from(restarts) + 1,
            "{r}: one refused streaming list per agent start, none after the 410"
        );
        assert!(lists >= streams, "{r}: listed with LIST ({lists})");
    }
    assert!(
        api.requests("list pods") > u64::from(restarts) + 1,
        "the re-list after the 410 was a LIST"
    );
    assert!(
        log.contains("refused a streaming list"),
        "the fallback is logged:\n{log}"
    );
    assert_eq!(agent.probe_health(&node, "/readyz"), Some(200));
    let st = agent.status().expect("status");
    assert!(st.errors.is_empty(), "{:?}", st.errors);
}

// ---------------------------------------------------------------------------------------------
// Cluster mode: Nodes and ClusterNetworkPolicies
// ---------------------------------------------------------------------------------------------

/// A ClusterNetworkPolicy (Admin tier) whose one ingress rule for b has action `action` and
/// admits or denies the pods `from` (app labels).
fn b_from(action: &str, from: &[&str]) -> String {
    format!(
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {{name: b-from}}\n\
         spec:\n  tier: Admin\n  priority: 10\n\
         \x20 subject: {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: b}}}}}}}}\n\
         \x20 ingress:\n\
         \x20   - name: from-pods\n\
         \x20     action: {action}\n\
         \x20     from: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchExpressions: [{{key: app, operator: In, values: {from:?}}}]}}}}}}]\n\
         \x20     protocols: [{{tcp: {{destinationPort: {{number: 80}}}}}}]\n"
    )
}

/// Waits until `ok` holds, failing after `timeout` with `what` and the agent's log.
fn wait_for(agent: &ClusterAgent, timeout: Duration, what: &str, ok: impl Fn() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; log:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cluster_mode_without_the_cnp_crd_enforces_network_policy_and_picks_the_crd_up_later() {
    if !require_root() {
        return;
    }
    let node = demo_node(&["a", "b", "c"], false);
    let work = WorkDir::new("cnp-crd");
    let api = FakeApi::start(&node).expect("fake API server");
    api.set_installed("ClusterNetworkPolicy", false);
    let kubeconfig = work.path().join("kubeconfig");
    api.kubeconfig(&kubeconfig).unwrap();
    api.apply(&namespace("demo"));
    api.apply(&node_yaml("node-1", "10.243.0.1"));
    for name in ["a", "b", "c"] {
        api.apply(&pod_yaml(pod(&node, name), "node-1", true));
    }
    api.apply(B_POLICY);
    let since = SystemTime::now();
    let bin = agent_binary();
    let mut agent = ClusterAgent::start(&node, &bin, &kubeconfig, work.path()).expect("agent");
    let st = agent
        .wait(since, Duration::from_secs(60), |s| s.endpoints == 3)
        .expect("NetworkPolicy is enforced without the CRD");
    assert!(st.errors.is_empty(), "{:?}", st.errors);
    assert_eq!(agent.probe_health(&node, "/readyz"), Some(200));
    let ip = |n: &str| pod(&node, n).ip(false);
    let expect = [
        ("a", ip("b"), 80, Proto::Tcp, true),
        ("c", ip("b"), 80, Proto::Tcp, false),
        ("c", ip("a"), 80, Proto::Tcp, true),
    ];
    assert_eq!(probe_all(&node, &expect), [true, false, true], "b-ingress");

    // The agent tries again with backoff, and says nothing more about it.
    wait_for(&agent, Duration::from_secs(30), "two more tries", || {
        api.fills("clusternetworkpolicies") >= 3
    });
    let not_installed =
        "ClusterNetworkPolicy CRD (policy.networking.k8s.io/v1alpha2) not installed";
    assert!(palisade::source::kube::CNP_NOT_INSTALLED.starts_with(not_installed));
    let log = agent.log_text();
    assert_eq!(log.matches(not_installed).count(), 1, "one message:\n{log}");
    assert!(!log.contains("watch failed"), "no failing watch:\n{log}");
    assert!(agent.status().unwrap().errors.is_empty());
    assert_eq!(agent.probe_health(&node, "/readyz"), Some(200));

    // Nodes are watched: one whose address is none is reported, naming the field.
    let since = SystemTime::now();
    api.apply(&node_yaml("node-9", "10.243.0.300"));
    let st = agent
        .wait(since, Duration::from_secs(30), |s| !s.errors.is_empty())
        .expect("the node's error");
    assert_eq!(
        st.errors,
        ["Node node-9: status.addresses[0].address: \"10.243.0.300\" is not an IP address"]
    );
    let since = SystemTime::now();
    api.delete("Node", "", "node-9");
    agent
        .wait(since, Duration::from_secs(30), |s| s.errors.is_empty())
        .expect("the error goes with the node");

    // The CRD is installed, and a policy admitting c to b (which b-ingress does not): the next
    // try lists it, and it is enforced.
    api.set_installed("ClusterNetworkPolicy", true);
    api.apply(&b_from("Accept", &["c"]));
    let installed = palisade::source::kube::CNP_INSTALLED;
    wait_for(&agent, Duration::from_secs(60), "the CRD noticed", || {
        agent.log_text().contains(installed)
    });
    wait_for(&agent, Duration::from_secs(30), "c admitted to b", || {
        probe_all(&node, &[("c", ip("b"), 80, Proto::Tcp, true)]) == [true]
    });
    assert_eq!(
        probe_all(&node, &expect),
        [true, true, true],
        "b-from (Admin) admits c"
    );
    // An invalid update: reported, naming the object and the field; the last good version
    // stays in force.
    let since = SystemTime::now();
    api.apply(&b_from("Drop", &["c"]));
    let st = agent
        .wait(since, Duration::from_secs(30), |s| !s.errors.is_empty())
        .expect("the policy's error");
    assert_eq!(
        st.errors,
        [
            "ClusterNetworkPolicy b-from: spec.ingress[0].action: unsupported value \"Drop\" \
             (want Accept, Deny or Pass)"
        ]
    );
    assert_eq!(
        probe_all(&node, &expect),
        [true, true, true],
        "the last good b-from"
    );
    // A valid update: denies a and c, whatever b-ingress admits.
    let since = SystemTime::now();
    api.apply(&b_from("Deny", &["a", "c"]));
    agent
        .wait(since, Duration::from_secs(30), |s| s.errors.is_empty())
        .expect("fixed");
    assert_eq!(
        probe_all(
            &node,
            &[
                ("a", ip("b"), 80, Proto::Tcp, false),
                ("c", ip("b"), 80, Proto::Tcp, false),
                ("c", ip("a"), 80, Proto::Tcp, true),
            ]
        ),
        [false, false, true],
        "b-from (Admin) denies a and c"
    );
    assert_eq!(agent.probe_health(&node, "/readyz"), Some(200));
    let log = agent.log_text();
    assert_eq!(log.matches(not_installed).count(), 1, "{log}");
    assert_eq!(log.matches(installed).count(), 1, "{log}");
    assert!(!log.contains("watch failed"), "{log}");
}

// ---------------------------------------------------------------------------------------------
// Program upgrades
// ---------------------------------------------------------------------------------------------

fn ebpf_object() -> Vec<u8> {
    // `cargo xtask test` sets it; otherwise the build's place beside this test's profile.
    let path = std::env::var("PALISADE_EBPF_OBJ").unwrap_or_else(|_| {
        let exe = std::env::current_exe().unwrap();
        let target = exe
            .ancestors()
            .nth(3)
            .expect("<target>/<profile>/deps/<test>");
        target
            .join("ebpf/x86_64-unknown-linux-gnu/release/libpalisade_ebpf.so")
            .display()
            .to_string()
    });
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e} (cargo xtask build)"))
}

/// The program a pinned TCX link runs (`bpf_link_info.prog_id`).
fn link_prog_id(pin: &std::path::Path) -> u32 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(pin.as_os_str().as_bytes()).unwrap();
    let mut get = [0u64; 3];
    get[0] = c.as_ptr() as u64;
    // SAFETY: BPF_OBJ_GET (7) with a valid attr prefix.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            7,
            get.as_mut_ptr(),
            std::mem::size_of_val(&get),
        )
    };
    assert!(fd >= 0, "BPF_OBJ_GET {}", pin.display());
    let mut info = [0u32; 32];
    let mut attr = [0u64; 2];
    attr[0] = (fd as u64) | ((std::mem::size_of_val(&info) as u64) << 32);
    attr[1] = info.as_mut_ptr() as u64;
    // SAFETY: BPF_OBJ_GET_INFO_BY_FD (15).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            15,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    unsafe { libc::close(fd as i32) };
    assert_eq!(r, 0);
    // struct bpf_link_info: type, id, prog_id.
    info[2]
}

#[test]
fn program_upgrades_swap_atomically_under_traffic() {
    use palisade_datapath::{
        loader::{Datapath, LoadOptions},
        pins::link_pin_path,
        writer::MapWriter,
    };
    use palisade_policy::{
        compile::{Compiler, LocalEndpoint},
        model::Store,
        state::PodRef,
    };
    if !require_root() {
        return;
    }
    let node = demo_node(&["a", "b", "c"], false);
    let work = WorkDir::new("upgrade");
    let bpffs = Bpffs::mount(work.path().join("bpffs")).unwrap();
    let pin_dir = bpffs.path().join("palisade");
    let mut text = namespace("demo");
    for n in ["a", "b", "c"] {
        text.push_str("---\n");
        text.push_str(&pod_yaml(pod(&node, n), "node-1", true));
    }
    text.push_str("---\n");
    text.push_str(CLUSTER_POLICIES);
    let store = Store::from_objects(palisade_policy::manifest::parse_str(&text).unwrap());
    let endpoints: Vec<LocalEndpoint> = ["a", "b", "c"]
        .iter()
        .map(|n| LocalEndpoint {
            pod: PodRef {
                namespace: "demo".into(),
                name: n.to_string().into(),
            },
            ifindex: pod(&node, n).host_ifindex,
        })
        .collect();
    let object = ebpf_object();
    let mut compiler = Compiler::default();
    let desired = compiler.compile(&store, &endpoints, &[]);
    let ifindexes: Vec<u32> = endpoints.iter().map(|e| e.ifindex).collect();

    // One "agent generation": load (adopting pins), write, swap into the links.
    let generation = |opts: &LoadOptions| -> (Datapath, MapWriter) {
        node.in_netns(|| {
            let mut dp = Datapath::load_with(&object, Some(&pin_dir), opts).expect("load");
            let mut w = MapWriter::new(&mut dp).expect("writer");
            assert_eq!(w.apply(&desired).failed, 0);
            for i in &ifindexes {
                dp.attach(*i).expect("attach");
            }
            dp.finish_upgrade();
            (dp, w)
        })
        .unwrap()
    };
    let small = LoadOptions {
        max_entries: vec![("CT_FLOWS", 65_536)],
        ..Default::default()
    };
    let mut current = Some(generation(&small));
    let ip = |n: &str| pod(&node, n).ip(false);
    let expect: Vec<(&str, IpAddr, u16, Proto, bool)> = vec![
        ("a", ip("b"), 80, Proto::Tcp, true),
        ("a", ip("c"), 80, Proto::Tcp, true),
        ("c", ip("b"), 80, Proto::Tcp, false),
        ("b", ip("a"), 80, Proto::Tcp, false),
        ("b", ip("c"), 80, Proto::Tcp, false),
    ];
    assert_eq!(
        probe_all(&node, &expect),
        vec![true, true, false, false, false]
    );
    let mut conn = pod(&node, "a").connect_tcp(ip("b"), 80).expect("a -> b");
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let link = link_pin_path(&pin_dir, pod(&node, "b").host_ifindex, "to_pod");
    let stop = AtomicBool::new(false);
    let sent = AtomicU64::new(0);
    let wrong = Mutex::new(Vec::<String>::new());
    let slow = AtomicU64::new(0);
    let mut swaps = 0;
    let mut prog_ids = vec![link_prog_id(&link)];
    std::thread::scope(|scope| {
        let (stop, sent, wrong, slow, node, expect) = (&stop, &sent, &wrong, &slow, &node, &expect);
        let prober = scope.spawn(move || probe_continuously(node, expect, stop, sent, slow, wrong));
        for round in 0..20 {
            // Round 10 changes a map's layout (CT_FLOWS's capacity): a new map, the entries
            // copied, then the links swapped to programs that use it.
            let opts = if round < 10 {
                small.clone()
            } else {
                LoadOptions::default()
            };
            let next = generation(&opts);
            if round == 10 {
                assert!(
                    next.0
                        .replaced_maps()
                        .iter()
                        .any(|r| r.contains("CT_FLOWS") && r.contains("copied")),
                    "{:?}",
                    next.0.replaced_maps()
                );
            } else {
                assert!(
                    next.0.replaced_maps().is_empty(),
                    "{:?}",
                    next.0.replaced_maps()
                );
            }
            // The old generation goes (its process would exit): the links keep the new one.
            current = Some(next);
            swaps += 1;
            prog_ids.push(link_prog_id(&link));
            let mut buf = [0u8; 1];
            conn.write_all(&[round]).unwrap();
            conn.read_exact(&mut buf)
                .unwrap_or_else(|e| panic!("round {round}: the connection broke: {e}"));
            std::thread::sleep(Duration::from_millis(250));
        }
        stop.store(true, Ordering::Relaxed);
        prober.join().unwrap();
    });
    drop(current);
    let wrong = wrong.into_inner().unwrap();
    let distinct: std::collections::BTreeSet<_> = prog_ids.iter().collect();
    eprintln!(
        "{swaps} program swaps (one with a changed CT_FLOWS layout) under continuous probes: {} \
         probes sent, {} wrong ({} allowed probes asked again after a 300 ms miss); link \
         programs {prog_ids:?}",
        sent.load(Ordering::Relaxed),
        wrong.len(),
        slow.load(Ordering::Relaxed)
    );
    assert_eq!(
        distinct.len(),
        prog_ids.len(),
        "every swap replaced the program"
    );
    assert!(wrong.is_empty(), "{wrong:#?}");
}
