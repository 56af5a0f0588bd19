//! Per-packet cost of the real programs, by BPF_PROG_TEST_RUN.
//!
//! For each number of rules N (1, 100, 10 000, 100 000) the agent's compiler builds the maps of
//! one endpoint (on `lo`, where test runs put the skb) whose ingress policy has N ipBlock rules
//! per address family, each one distinct CIDR and port, in a cluster of 10 000 peer pods; the
//! agent's map writer loads them. Then, per family:
//!
//! * `ct_hit`: the ACK of an established flow, `repeat` = 1 000 000 in one test run (the
//!   kernel reports the mean); `ct_reply` likewise for the flow's reply direction (forward
//!   lookup misses, reply lookup hits).
//! * `new_deny`: a SYN from a known pod inside one of the CIDRs, to a port no rule allows: the
//!   longest path (identity hit, identity policy miss, CIDR hit, CIDR policy miss) and a drop.
//!   Nothing is inserted, so one test run with `repeat` = 1 000 000 measures it.
//! * `new_allow`: the same peer, to the port of its CIDR's rule: the same lookups, the second
//!   policy lookup hits, and a conntrack entry is inserted. Repeating one packet would turn
//!   every run after the first into a conntrack hit, so each of the 1 000 000 runs is a
//!   *distinct* new flow (distinct destination address and source port), one test run each.
//!   A single run's reported duration includes the kernel's timer (two clock reads) and
//!   colder caches than a loop: that overhead is measured on the same established-flow packet
//!   (single runs minus the looped mean) and subtracted. The same correction applied to
//!   `new_deny` single runs is reported next to its looped value, as a check of the method.
//!   The conntrack table is emptied (outside the timed runs) whenever it reaches 150 000 of its
//!   262 144 entries, so inserts never evict.
//!
//! Then ClusterNetworkPolicy (`run_tiers`): at one scale (`TIER_SCALE` rules per family, the same
//! probe and packets), the same figures with 1 and with 1 000 ClusterNetworkPolicies whose
//! subject selects the endpoint (`cluster_policies_yaml`), to show that their number does not
//! change the per-packet cost (the compiler folds every tier into the POLICY values).
use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};
use aya::programs::{TestRun, TestRunOptions};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use palisade_common::{CtKey, EP_TIERED_INGRESS};
use palisade_datapath::{
    loader::{Datapath, FROM_POD, TO_POD},
    writer::MapWriter,
};
use palisade_policy::{
    compile::{Compiler, LocalEndpoint},
    manifest::parse_str,
    model::{Object, Peer, Policy, PortMatch, PortSpec, Protocol, Rule, Store},
    state::PodRef,
};
use serde_json::{Value, json};

use crate::stats::{Figure, set};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
/// BPF_PROG_TEST_RUN puts the skb on `lo`.
const LO_IFINDEX: u32 = 1;
const POD4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const POD6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x244, 0, 0, 0, 0, 0, 0xa);
const NODE4: Ipv4Addr = Ipv4Addr::new(10, 243, 0, 1);
pub const PEER_PODS: usize = 10_000;
const DENY_PORT: u16 = 9;
/// The bench's flows are removed (as the agent's sweep would) before the endpoint holds its
/// conntrack quota: past it, new flows are dropped (`CtQuota`), not measured.
const CT_CLEAR_AT: usize = (palisade_common::CT_QUOTA_DEFAULT / 2) as usize;

pub const SCALES: [usize; 4] = [1, 100, 10_000, 100_000];
/// The NetworkPolicy scale (ipBlock rules per family) of the ClusterNetworkPolicy figures.
pub const TIER_SCALE: usize = 100;
/// Numbers of ClusterNetworkPolicies selecting the endpoint, measured side by side.
pub const TIER_POLICIES: [usize; 2] = [1, 1000];
/// What `measure` returns, in order: the per-packet figures, then the method checks.
const KINDS: [&str; 7] = [
    "ct_hit",
    "ct_reply",
    "new_allow",
    "new_deny",
    "new_allow_uncorrected",
    "new_deny_single_run",
    "timer_overhead",
];
/// The per-packet figures reported with ClusterNetworkPolicies (the first of `KINDS`).
pub const TIER_KINDS: [&str; 4] = ["ct_hit", "ct_reply", "new_allow", "new_deny"];

pub struct Config {
    /// Measurements of every figure.
    pub repeats: usize,
    /// Runs per looped test run, and distinct flows per `new_allow` measurement.
    pub runs: u32,
    /// Single runs used to measure the timer overhead.
    pub calibration_runs: u32,
    /// Numbers of rules measured (`SCALES` unless overridden for development).
    pub scales: Vec<usize>,
    /// Development: only the looped established-flow figure (for profiling).
    pub ct_hit_only: bool,
    /// Numbers of ClusterNetworkPolicies measured at `tier_scale` (`TIER_POLICIES`; empty:
    /// none).
    pub tiers: Vec<usize>,
    /// The NetworkPolicy scale of the ClusterNetworkPolicy figures (`TIER_SCALE`).
    pub tier_scale: usize,
    /// Development: only the ClusterNetworkPolicy figures (no scales, no test-run floor, no
    /// building blocks).
    pub tiers_only: bool,
}

/// A deterministic generator (splitmix64), so every run measures the same rules.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// `n` distinct random public-looking /24s (never inside 10/8, 127/8, 0/8 or multicast).
pub fn random_v4_blocks(n: usize, seed: u64) -> Vec<Ipv4Network> {
    let mut rng = Rng::new(seed);
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let v = (rng.next() as u32) & 0xffff_ff00;
        let first = v >> 24;
        if first == 0 || first == 10 || first == 127 || first >= 224 || !seen.insert(v) {
            continue;
        }
        out.push(Ipv4Network::new(Ipv4Addr::from(v), 24).expect("valid"));
    }
    out
}

/// `n` distinct random /64s inside 2001:db8::/32.
pub fn random_v6_blocks(n: usize, seed: u64) -> Vec<Ipv6Network> {
    let mut rng = Rng::new(seed);
    let mut seen = HashSet::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let mid = rng.next() as u32;
        if !seen.insert(mid) {
            continue;
        }
        let bits = (0x2001_0db8u128 << 96) | (u128::from(mid) << 64);
        out.push(Ipv6Network::new(Ipv6Addr::from(bits), 64).expect("valid"));
    }
    out
}

fn port_of_rule(i: usize) -> u16 {
    10_000 + (i % 50_000) as u16
}

fn objects(yaml: &str) -> Vec<Object> {
    parse_str(yaml).unwrap_or_else(|e| panic!("bench manifest: {e}\n{yaml}"))
}

/// What a scale's packets need to know.
struct Probe {
    peer4: Ipv4Addr,
    peer6: Ipv6Addr,
    allow_port: u16,
}

/// The cluster shared by every scale: the endpoint's pod and 10 000 peer pods (dual stack).
fn base_store() -> Store {
    let mut store = Store::default();
    let mut docs = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n---\n\
         apiVersion: v1\nkind: Namespace\nmetadata: {name: peers, labels: {team: peers}}\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {name: target, namespace: bench, labels: {app: target}}\n\
         spec: {nodeName: bench-node, containers: [{name: c, ports: [{name: http, containerPort: 80}]}]}\n\
         status: {podIPs: [{ip: 10.244.0.10}, {ip: 'fd00:244::a'}]}\n",
    );
    for k in 0..PEER_PODS {
        let v4 = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + k as u32);
        let v6 =
            Ipv6Addr::from(u128::from(Ipv6Addr::new(0xfd00, 0x128, 0, 0, 0, 0, 0, 0)) + k as u128);
        docs.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: peer-{k}, namespace: peers, labels: {{app: peer-{}}}}}\n\
             spec: {{nodeName: node-{}, containers: [{{name: c}}]}}\n\
             status: {{podIPs: [{{ip: '{v4}'}}, {{ip: '{v6}'}}]}}\n",
            k % 50,
            k % 100
        ));
    }
    for obj in objects(&docs) {
        store.apply(obj).expect("bench object is valid");
    }
    store
}

/// The store of one scale: the base cluster, a probe pod inside the middle CIDR of each
/// family, and the policy with `n` ipBlock rules per family.
fn scale_store(base: &Store, n: usize) -> (Store, Probe) {
    let mut store = base.clone();
    let v4 = random_v4_blocks(n, 4);
    let v6 = random_v6_blocks(n, 6);
    let mid = n / 2;
    let peer4 = Ipv4Addr::from(u32::from(v4[mid].network()) + 7);
    let peer6 = Ipv6Addr::from(u128::from(v6[mid].network()) + 7);
    for obj in objects(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: probe, namespace: peers, labels: {{app: probe}}}}\n\
         spec: {{nodeName: node-1, containers: [{{name: c}}]}}\n\
         status: {{podIPs: [{{ip: '{peer4}'}}, {{ip: '{peer6}'}}]}}\n"
    )) {
        store.apply(obj).expect("probe pod");
    }
    // Some pod-selector rules too, so that the endpoint has identity entries (none for the
    // probe's identity: its identity lookup misses, then its CIDR is looked up).
    let mut yaml = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
         metadata: {name: cidrs, namespace: bench}\n\
         spec:\n  podSelector: {matchLabels: {app: target}}\n  policyTypes: [Ingress]\n  ingress:\n",
    );
    for k in 0..10 {
        yaml.push_str(&format!(
            "  - from: [{{namespaceSelector: {{matchLabels: {{team: peers}}}}, podSelector: {{matchLabels: {{app: peer-{k}}}}}}}]\n    ports: [{{port: {}}}]\n",
            80 + k
        ));
    }
    let Some(Object::NetworkPolicy(np)) = objects(&yaml).into_iter().next() else {
        panic!("bench policy");
    };
    let mut policy = Policy::from_k8s(&np).expect("bench policy is valid");
    let rules = policy.ingress.as_mut().expect("ingress rules");
    let tcp = |port| {
        Some(vec![PortSpec {
            protocol: Protocol::Tcp,
            port: PortMatch::Number(port),
            end_port: None,
        }])
    };
    for (i, net) in v4.iter().enumerate() {
        rules.push(Rule {
            peers: Some(vec![Peer::IpBlock {
                cidr: IpNetwork::V4(*net),
                except: vec![],
            }]),
            ports: tcp(port_of_rule(i)),
        });
    }
    for (i, net) in v6.iter().enumerate() {
        rules.push(Rule {
            peers: Some(vec![Peer::IpBlock {
                cidr: IpNetwork::V6(*net),
                except: vec![],
            }]),
            ports: tcp(port_of_rule(i)),
        });
    }
    store
        .policies
        .insert(("bench".into(), "cidrs".into()), policy);
    (
        store,
        Probe {
            peer4,
            peer6,
            allow_port: port_of_rule(mid),
        },
    )
}

/// The policy that lets the probe through the Admin tier: its first rule passes the probe's
/// flows on to NetworkPolicy, and the Deny after it never decides them (it ranks after the
/// Pass). Always the first of `cluster_policies_yaml`.
pub const PASS_POLICY: &str = "pass-probe";
/// Its priority (Admin tier): policies of lower priority numbers come before it, higher after.
const PASS_PRIORITY: u32 = 500;

/// `n` ClusterNetworkPolicies whose subject selects the bench endpoint (`app: target` in
/// `bench`), none of which decides the probe's flows (TCP to `allow_port`, an ipBlock port
/// from `port_of_rule`, or to `DENY_PORT`):
///
/// * `pass-probe` (Admin, priority 500): Pass from the probe, any port (the probe's flows go
///   on to NetworkPolicy); then Deny from the probe (never reached: the Pass ranks first); an
///   Accept from the peers' namespace (the probe included) on an aligned port range; an egress
///   Deny to networks.
/// * the others, alternately Admin and Baseline, with distinct priorities (1..=999 but 500,
///   which becomes 1 000), alternately selecting the endpoint by `pods` and by `namespaces`:
///   ingress from a group of 200 peer pods on one of 8 ports (not the probe), from the peers'
///   namespace (the probe included) on one of 4 ports below 10 000; every fifth, from the probe
///   on any port, after the Pass (Admin priority above 500) or in Baseline (which NetworkPolicy
///   isolation keeps from deciding); egress to two networks (one per family) and to a group of
///   peer pods. Actions rotate through Accept, Deny and Pass.
///
/// Every port used is below 10 000 and is not `DENY_PORT`, so the probe's ports are decided by
/// the Pass alone in the Admin tier.
pub fn cluster_policies_yaml(n: usize) -> String {
    const HEAD: &str =
        "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n";
    const PROBE: &str = "{pods: {namespaceSelector: {matchLabels: {team: peers}}, podSelector: {matchLabels: {app: probe}}}}";
    let mut out = String::new();
    if n == 0 {
        return out;
    }
    out.push_str(&format!(
        "{HEAD}metadata: {{name: {PASS_POLICY}}}\nspec:\n  tier: Admin\n  priority: {PASS_PRIORITY}\n\
         \x20 subject: {{pods: {{podSelector: {{matchLabels: {{app: target}}}}}}}}\n\
         \x20 ingress:\n\
         \x20 - {{name: pass-probe, action: Pass, from: [{PROBE}]}}\n\
         \x20 - {{name: deny-probe-after-pass, action: Deny, from: [{PROBE}]}}\n\
         \x20 - name: peers-range\n    action: Accept\n    from: [{{namespaces: {{matchLabels: {{team: peers}}}}}}]\n\
         \x20   protocols: [{{tcp: {{destinationPort: {{range: {{start: 7168, end: 7199}}}}}}}}]\n\
         \x20 egress:\n\
         \x20 - action: Deny\n    to: [{{networks: [10.199.0.0/16, 'fd00:199::/64']}}]\n\
         \x20   protocols: [{{tcp: {{destinationPort: {{number: 5432}}}}}}]\n"
    ));
    let actions = ["Accept", "Deny", "Pass"];
    for i in 1..n {
        let admin = i % 2 == 1;
        let priority = if i as u32 == PASS_PRIORITY {
            1000
        } else {
            i as u32
        };
        let subject = if i % 4 < 2 {
            "{pods: {namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: bench}}, podSelector: {matchLabels: {app: target}}}}"
        } else {
            "{namespaces: {matchLabels: {kubernetes.io/metadata.name: bench}}}"
        };
        let action = |k: usize| actions[(i + k) % actions.len()];
        out.push_str(&format!(
            "---\n{HEAD}metadata: {{name: cnp-{i}}}\nspec:\n  tier: {}\n  priority: {priority}\n  subject: {subject}\n  ingress:\n\
             \x20 - action: {}\n    from: [{{pods: {{namespaceSelector: {{matchLabels: {{team: peers}}}}, podSelector: {{matchLabels: {{app: peer-{}}}}}}}}}]\n\
             \x20   protocols: [{{tcp: {{destinationPort: {{number: {}}}}}}}]\n\
             \x20 - action: {}\n    from: [{{namespaces: {{matchLabels: {{team: peers}}}}}}]\n\
             \x20   protocols: [{{tcp: {{destinationPort: {{number: {}}}}}}}, {{udp: {{destinationPort: {{number: 53}}}}}}]\n",
            if admin { "Admin" } else { "Baseline" },
            action(0),
            i % 50,
            1000 + i % 8,
            action(1),
            7000 + i % 4,
        ));
        // After the Pass (or in Baseline): matches the probe on every port, never decides.
        if i % 5 == 0 && (!admin || priority > PASS_PRIORITY) {
            out.push_str(&format!("  - {{action: {}, from: [{PROBE}]}}\n", action(2)));
        }
        out.push_str(&format!(
            "  egress:\n\
             \x20 - action: {}\n    to: [{{networks: [10.{}.{}.0/24, 'fd00:200:{i:x}::/64']}}]\n\
             \x20   protocols: [{{tcp: {{destinationPort: {{number: {}}}}}}}]\n\
             \x20 - action: {}\n    to: [{{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: peer-{}}}}}}}}}]\n\
             \x20   protocols: [{{tcp: {{destinationPort: {{number: 443}}}}}}]\n",
            action(0),
            200 + i / 256,
            i % 256,
            5432 + i % 3,
            action(1),
            (i + 25) % 50,
        ));
    }
    out
}

// ---- packets ------------------------------------------------------------------------------

const SYN: u8 = 0x02;
const ACK: u8 = 0x10;

fn tcp_packet(src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut tcp = vec![0u8; 20];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[12] = 0x50;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let mut p = vec![0u8; 12];
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.extend_from_slice(&0x0800u16.to_be_bytes());
            let mut ip = vec![0u8; 20];
            ip[0] = 0x45;
            ip[2..4].copy_from_slice(&40u16.to_be_bytes());
            ip[8] = 64;
            ip[9] = 6;
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            p.extend(ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.extend_from_slice(&0x86ddu16.to_be_bytes());
            let mut ip = vec![0u8; 40];
            ip[0] = 0x60;
            ip[4..6].copy_from_slice(&20u16.to_be_bytes());
            ip[6] = 6;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            p.extend(ip);
        }
        _ => panic!("mixed families"),
    }
    p.extend(tcp);
    p
}

/// Where the destination address and source port of a TCP packet from `tcp_packet` are.
fn flow_offsets(v6: bool) -> (usize, usize, usize) {
    if v6 {
        (14 + 24, 16, 14 + 40)
    } else {
        (14 + 16, 4, 14 + 20)
    }
}

/// Rewrites the packet's destination address and source port to make flow `i` (distinct for
/// every `i` below 60 000 * 65 536).
fn make_flow(pkt: &mut [u8], v6: bool, i: u32) {
    let (dst, len, l4) = flow_offsets(v6);
    let sport = 1024 + (i % 60_000) as u16;
    let host = i / 60_000;
    // The pod's own address with the low bytes replaced: another address of the endpoint's
    // subnet for the conntrack key; policy does not look at the destination of ingress.
    pkt[dst + len - 2..dst + len].copy_from_slice(&(host as u16).to_be_bytes());
    pkt[l4..l4 + 2].copy_from_slice(&sport.to_be_bytes());
}

struct Bench {
    dp: Datapath,
    /// The bench endpoint's id.
    ep_id: u32,
    _writer: MapWriter,
    /// Removes the bench's flows as the agent's sweep does (releasing the endpoint's quota).
    sweeper: palisade_datapath::ct_sweep::Sweeper,
}

impl Bench {
    fn run(&self, prog: &str, pkt: &[u8], repeat: u32) -> Result<(u32, f64)> {
        let r = self
            .dp
            .program(prog)
            .test_run(TestRunOptions {
                data_in: Some(pkt),
                repeat,
                ..Default::default()
            })
            .with_context(|| format!("test run of {prog}"))?;
        Ok((r.return_value, r.duration.as_nanos() as f64))
    }

    /// Mean ns per run of `runs` single test runs of `pkt`.
    fn single_runs(&self, prog: &str, pkt: &[u8], runs: u32, want: u32) -> Result<f64> {
        let mut total = 0.0;
        for _ in 0..runs {
            let (ret, ns) = self.run(prog, pkt, 1)?;
            ensure!(ret == want, "{prog}: verdict {ret}, expected {want}");
            total += ns;
        }
        Ok(total / f64::from(runs))
    }

    fn clear_conntrack(&mut self, keys: &mut Vec<CtKey>) {
        let _ = self.sweeper.remove_flows(keys);
        keys.clear();
    }
}

fn ct_key(pkt: &[u8], v6: bool) -> CtKey {
    let mut src = [0u8; 16];
    let mut dst = [0u8; 16];
    let (s, d, l4, family) = if v6 {
        (14 + 8, 14 + 24, 14 + 40, palisade_common::AF_INET6)
    } else {
        (14 + 12, 14 + 16, 14 + 20, palisade_common::AF_INET)
    };
    let n = if v6 { 16 } else { 4 };
    src[..n].copy_from_slice(&pkt[s..s + n]);
    dst[..n].copy_from_slice(&pkt[d..d + n]);
    CtKey::new(
        0, // filled in by the caller
        palisade_common::DIR_INGRESS,
        family,
        palisade_common::PROTO_TCP,
        (src, u16::from_be_bytes([pkt[l4], pkt[l4 + 1]])),
        (dst, u16::from_be_bytes([pkt[l4 + 2], pkt[l4 + 3]])),
        0,
    )
}

/// Pins the calling thread to one CPU (test runs execute on the caller's CPU).
pub fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

pub fn unpin() {
    let mut set = nix::sched::CpuSet::new();
    for cpu in 0..num_cpus() {
        let _ = set.set(cpu);
    }
    let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
}

/// The machine's online CPUs (not this thread's affinity, which pinning narrows).
pub fn num_cpus() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    usize::try_from(n).unwrap_or(1).max(1)
}

pub fn run(cfg: &Config, object: &[u8], report: &mut Value) -> Result<()> {
    let started = Instant::now();
    pin_to_cpu(num_cpus() - 1);
    eprintln!("bench: per-packet cost: building the cluster ({PEER_PODS} peer pods)");
    let base = base_store();
    let families = [("ipv4", false), ("ipv6", true)];
    let kinds = KINDS;
    for &n in &cfg.scales {
        let (store, probe) = scale_store(&base, n);
        let (mut b, setup) = load(&store, object, &format!("scale {n}"))?;
        let ep_id = b.ep_id;
        eprintln!(
            "bench: {n} rules per family: {} CIDRS and {} POLICY entries (compiled in {:.0} ms, written in {:.0} ms)",
            setup.cidr_entries, setup.policy_entries, setup.compile_ms, setup.write_ms
        );
        set(report, &format!("packet_setup.{n}"), setup.json());
        for (fam, v6) in families {
            let (pod, peer): (IpAddr, IpAddr) = if v6 {
                (POD6.into(), probe.peer6.into())
            } else {
                (POD4.into(), probe.peer4.into())
            };
            let mut figs: Vec<Figure> = kinds.iter().map(|_| Figure::default()).collect();
            for r in 0..cfg.repeats {
                let m = measure(
                    &mut b,
                    cfg,
                    ep_id,
                    v6,
                    pod,
                    peer,
                    probe.allow_port,
                    r as u32,
                )?;
                for (i, v) in m.into_iter().enumerate() {
                    figs[i].push(v);
                }
            }
            eprintln!(
                "bench:   {fam}: ct_hit {:.0} ns, ct_reply {:.0} ns, new_allow {:.0} ns, new_deny {:.0} ns (timer overhead {:.0} ns)",
                figs[0].median(),
                figs[1].median(),
                figs[2].median(),
                figs[3].median(),
                figs[6].median()
            );
            for (kind, fig) in kinds.iter().zip(&figs) {
                let path = match *kind {
                    "ct_hit" | "new_allow" | "new_deny" => {
                        format!("ns_per_packet.{kind}.{fam}.{n}")
                    }
                    other => format!("ns_per_packet_detail.{other}.{fam}.{n}"),
                };
                set(report, &path, fig.json());
            }
        }
    }
    if !cfg.tiers.is_empty() {
        run_tiers(cfg, &base, object, report)?;
    }
    if !cfg.tiers_only {
        // The test-run machinery alone (an empty program), on the same CPU and packet size.
        let pkt = tcp_packet(POD4.into(), NODE4.into(), 1, 2, ACK);
        let mut floor = Figure::default();
        for _ in 0..cfg.repeats.max(3) {
            floor.push(crate::primitives::empty_program_ns(&pkt, cfg.runs)?);
        }
        eprintln!(
            "bench:   test-run floor (empty program): {:.0} ns",
            floor.median()
        );
        set(report, "ns_per_packet_detail.empty_program", floor.json());
        // The building blocks alone, above that floor: what the paths are made of.
        for (name, fig) in crate::primitives::measure(&pkt, cfg.runs, cfg.repeats.max(3))? {
            eprintln!("bench:   {name}: {:.1} ns", fig.median());
            set(report, &format!("ns_per_primitive.{name}"), fig.json());
        }
    }
    // Verifier statistics of the programs measured.
    let dp = Datapath::load(object, None)?;
    for p in dp.program_stats() {
        set(
            report,
            &format!("programs.{}", p.name),
            json!({
                "verified_instructions": p.verified_instructions,
                "translated_bytes": p.translated_bytes,
            }),
        );
    }
    unpin();
    set(
        report,
        "sections.packet_s",
        json!(crate::stats::round(started.elapsed().as_secs_f64())),
    );
    Ok(())
}

/// What compiling and writing one store took, and how big its maps are.
struct Setup {
    cidr_entries: usize,
    policy_entries: usize,
    identities: usize,
    compile_ms: f64,
    write_ms: f64,
}

impl Setup {
    fn json(&self) -> Value {
        json!({
            "cidr_entries": self.cidr_entries,
            "policy_entries": self.policy_entries,
            "identities": self.identities,
            "compile_ms": crate::stats::round(self.compile_ms),
            "write_ms": crate::stats::round(self.write_ms),
        })
    }
}

/// Compiles `store` for the bench endpoint with the agent's compiler and writes its maps into
/// a freshly loaded datapath with the agent's map writer.
fn load(store: &Store, object: &[u8], what: &str) -> Result<(Bench, Setup)> {
    let t = Instant::now();
    let endpoint = LocalEndpoint {
        pod: PodRef {
            namespace: "bench".into(),
            name: "target".into(),
        },
        ifindex: LO_IFINDEX,
    };
    let mut compiler = Compiler::default();
    let state = compiler.compile(store, &[endpoint], &[IpAddr::V4(NODE4)]);
    let compile_ms = t.elapsed().as_secs_f64() * 1e3;
    let ep = state
        .endpoints
        .get(&LO_IFINDEX)
        .context("the bench endpoint was not compiled")?;
    let ep_id = ep.id;
    if !store.cluster_policies.is_empty() {
        ensure!(
            ep.flags & EP_TIERED_INGRESS != 0,
            "{what}: the endpoint is not tiered for ingress"
        );
        let selected = state
            .endpoint_meta
            .get(&ep_id)
            .map_or(0, |m| m.ingress_cluster_policies.len());
        ensure!(
            selected == store.cluster_policies.len(),
            "{what}: {selected} of {} ClusterNetworkPolicies select the endpoint",
            store.cluster_policies.len()
        );
    }
    let mut dp = Datapath::load(object, None).context("loading the datapath")?;
    let sweeper = palisade_datapath::ct_sweep::Sweeper::new(&dp)?;
    let mut writer = MapWriter::new(&mut dp)?;
    let t = Instant::now();
    let stats = writer.apply(&state);
    let write_ms = t.elapsed().as_secs_f64() * 1e3;
    ensure!(
        stats.failed == 0,
        "{} map writes failed at {what}",
        stats.failed
    );
    Ok((
        Bench {
            dp,
            ep_id,
            _writer: writer,
            sweeper,
        },
        Setup {
            cidr_entries: state.cidrs.len(),
            policy_entries: state.policy.len(),
            identities: state.identities.len(),
            compile_ms,
            write_ms,
        },
    ))
}

/// The ClusterNetworkPolicy figures: the store of `cfg.tier_scale` (its probe, its
/// NetworkPolicy) plus each number of `cfg.tiers` ClusterNetworkPolicies, all loaded at once
/// and measured side by side (each repeat measures every setup, in alternating order), so
/// that a change of load hits them alike.
fn run_tiers(cfg: &Config, base: &Store, object: &[u8], report: &mut Value) -> Result<()> {
    let (np_store, probe) = scale_store(base, cfg.tier_scale);
    let mut setups = Vec::new();
    for &c in &cfg.tiers {
        let mut store = np_store.clone();
        for obj in objects(&cluster_policies_yaml(c)) {
            store
                .apply(obj)
                .map_err(|e| anyhow::anyhow!("bench ClusterNetworkPolicy: {e}"))?;
        }
        ensure!(
            store.cluster_policies.len() == c,
            "{} ClusterNetworkPolicies in the store, {c} generated",
            store.cluster_policies.len()
        );
        let rules: usize = store
            .cluster_policies
            .values()
            .map(|p| p.ingress.len() + p.egress.len())
            .sum();
        let (b, setup) = load(&store, object, &format!("{c} ClusterNetworkPolicies"))?;
        eprintln!(
            "bench: {} rules per family and {c} ClusterNetworkPolicies ({rules} rules): {} CIDRS and {} POLICY entries (compiled in {:.0} ms, written in {:.0} ms)",
            cfg.tier_scale,
            setup.cidr_entries,
            setup.policy_entries,
            setup.compile_ms,
            setup.write_ms
        );
        let mut json = setup.json();
        json["cluster_policies"] = json!(c);
        json["cluster_policy_rules"] = json!(rules);
        json["rules_per_family"] = json!(cfg.tier_scale);
        set(report, &format!("packet_setup.tiers.{c}"), json);
        setups.push((c, b));
    }
    let kinds = KINDS;
    for (fam, v6) in [("ipv4", false), ("ipv6", true)] {
        let (pod, peer): (IpAddr, IpAddr) = if v6 {
            (POD6.into(), probe.peer6.into())
        } else {
            (POD4.into(), probe.peer4.into())
        };
        let mut figs: Vec<Vec<Figure>> = setups
            .iter()
            .map(|_| kinds.iter().map(|_| Figure::default()).collect())
            .collect();
        for r in 0..cfg.repeats {
            let mut order: Vec<usize> = (0..setups.len()).collect();
            if r % 2 == 1 {
                order.reverse();
            }
            for s in order {
                let b = &mut setups[s].1;
                let ep_id = b.ep_id;
                let m = measure(b, cfg, ep_id, v6, pod, peer, probe.allow_port, r as u32)
                    .with_context(|| format!("{} ClusterNetworkPolicies, {fam}", setups[s].0))?;
                for (i, v) in m.into_iter().enumerate() {
                    figs[s][i].push(v);
                }
            }
        }
        for ((c, _), figs) in setups.iter().zip(&figs) {
            eprintln!(
                "bench:   {fam}, {c} ClusterNetworkPolicies: ct_hit {:.0} ns, ct_reply {:.0} ns, new_allow {:.0} ns, new_deny {:.0} ns (timer overhead {:.0} ns)",
                figs[0].median(),
                figs[1].median(),
                figs[2].median(),
                figs[3].median(),
                figs[6].median()
            );
            for (kind, fig) in kinds.iter().zip(figs) {
                let path = if TIER_KINDS.contains(kind) {
                    format!("ns_per_packet_tiers.{kind}.{fam}.{c}")
                } else {
                    format!("ns_per_packet_tiers_detail.{kind}.{fam}.{c}")
                };
                set(report, &path, fig.json());
            }
        }
    }
    Ok(())
}

/// One repeat of every per-packet figure for one family, in `KINDS` order.
#[allow(clippy::too_many_arguments)]
fn measure(
    b: &mut Bench,
    cfg: &Config,
    ep_id: u32,
    v6: bool,
    pod: IpAddr,
    peer: IpAddr,
    allow_port: u16,
    round: u32,
) -> Result<Vec<f64>> {
    // An established flow: its SYN inserts it, then its ACKs (and its replies) hit.
    let sport = 40_000 + round as u16;
    let syn = tcp_packet(peer, pod, sport, allow_port, SYN);
    let (ret, _) = b.run(TO_POD, &syn, 1)?;
    ensure!(ret == TC_ACT_OK, "allowed SYN was dropped ({ret})");
    let ack = tcp_packet(peer, pod, sport, allow_port, ACK);
    let (ret, ct_hit) = b.run(TO_POD, &ack, cfg.runs)?;
    ensure!(ret == TC_ACT_OK, "established ACK was dropped ({ret})");
    if cfg.ct_hit_only {
        return Ok(vec![ct_hit, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
    }
    let reply = tcp_packet(pod, peer, allow_port, sport, ACK);
    let (ret, ct_reply) = b.run(FROM_POD, &reply, cfg.runs)?;
    ensure!(ret == TC_ACT_OK, "reply was dropped ({ret})");

    // A denied new flow (nothing is inserted: every run is a new flow).
    let deny = tcp_packet(peer, pod, sport, DENY_PORT, SYN);
    let (ret, new_deny) = b.run(TO_POD, &deny, cfg.runs)?;
    ensure!(ret == TC_ACT_SHOT, "denied SYN passed ({ret})");

    // Timer overhead of a single run: the same established-flow packet, singly.
    let single_hit = b.single_runs(TO_POD, &ack, cfg.calibration_runs, TC_ACT_OK)?;
    let overhead = (single_hit - ct_hit).max(0.0);
    let single_deny = b.single_runs(TO_POD, &deny, cfg.calibration_runs, TC_ACT_SHOT)?;

    // Allowed new flows, each distinct.
    let mut pkt = tcp_packet(peer, pod, 0, allow_port, SYN);
    let mut keys: Vec<CtKey> = Vec::with_capacity(CT_CLEAR_AT);
    let mut total = 0.0;
    let offset = round * cfg.runs;
    for i in 0..cfg.runs {
        make_flow(&mut pkt, v6, offset + i);
        let (ret, ns) = b.run(TO_POD, &pkt, 1)?;
        if ret != TC_ACT_OK {
            bail!("allowed new flow {i} was dropped ({ret})");
        }
        total += ns;
        let mut key = ct_key(&pkt, v6);
        key.endpoint = ep_id;
        keys.push(key);
        if keys.len() >= CT_CLEAR_AT {
            b.clear_conntrack(&mut keys);
        }
    }
    b.clear_conntrack(&mut keys);
    let new_allow_raw = total / f64::from(cfg.runs);
    Ok(vec![
        ct_hit,
        ct_reply,
        (new_allow_raw - overhead).max(0.0),
        new_deny,
        new_allow_raw,
        (single_deny - overhead).max(0.0),
        overhead,
    ])
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use palisade_policy::{model::Store, state::Tier};

    use super::{PASS_POLICY, cluster_policies_yaml, objects};

    /// The generated policies are valid, as many as asked, in both tiers, with distinct
    /// priorities; the Pass policy is always there.
    #[test]
    fn cluster_policies_are_valid_and_distinct() {
        for n in [1, 2, 1000] {
            let mut store = Store::default();
            for obj in objects(&cluster_policies_yaml(n)) {
                store.apply(obj).expect("valid ClusterNetworkPolicy");
            }
            assert_eq!(store.cluster_policies.len(), n);
            assert!(store.cluster_policies.contains_key(PASS_POLICY));
            let priorities: HashSet<u16> = store
                .cluster_policies
                .values()
                .map(|p| p.priority)
                .collect();
            assert_eq!(priorities.len(), n, "distinct priorities");
            if n > 2 {
                for tier in [Tier::Admin, Tier::Baseline] {
                    assert!(store.cluster_policies.values().any(|p| p.tier == tier));
                }
            }
        }
    }
}
