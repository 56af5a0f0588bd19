//! Policy churn and memory, with 1 000 policies and 10 000 pods (100 on this node).
//!
//! The rig makes a node of 100 pods. On a thread inside the node's network namespace, the
//! agent's own pipeline (`Agent::reconcile`: read the host's interfaces and routes, compile,
//! write the difference to the pinned maps, attach new endpoints) runs the way a cluster
//! source drives it: an object arrives, the store takes it, the agent enforces. The churn
//! figure is the time from the change's arrival (before `Store::apply`/`remove`) to `reconcile`
//! returning, when every map write has been made; each change is then checked in the kernel's
//! maps (outside the timed part). Changes cycle through: a policy's port changes, a pod is
//! added, a pod is relabelled (a new identity), a policy is added, the pod is deleted, the
//! policy is deleted, each in a different namespace.
//!
//! A full resync is a re-list: a new store built from every object, and `reconcile` on it.
//!
//! Memory: the real agent binary (release) runs standalone on the same manifests in the same
//! node; its resident set (VmRSS, and the peak VmHWM) is read after its first reconcile and
//! after a few manifest changes, and the BPF maps' memory is the kernel's own accounting
//! (`memlock` in each pinned map's fdinfo).
use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::fd::{AsFd, AsRawFd},
    path::{Path, PathBuf},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use aya::maps::{HashMap, Map, MapData};
use palisade::{
    interfaces::HostView,
    reconcile::{Agent, RunConfig, View},
};
use palisade_common::{
    DIR_INGRESS, EndpointInfo, POLICY_KEY_FULL_BITS, PROTO_TCP, PeerAddr, PolicyKey, PolicyValue,
    map_names,
};
use palisade_datapath::{loader::Datapath, writer::MapWriter};
use palisade_policy::{
    compile::Compiler,
    manifest::parse_str,
    model::{Kind, Object, ObjectKey, Store},
    services::ServiceStore,
};
use palisade_tests::{
    agent::AgentProcess,
    rig::{Node, NodeSpec, PodSpec},
};
use serde_json::{Value, json};

use crate::{
    cluster::{self, NAMESPACES, NODE_NAME, PODS_PER_NAMESPACE},
    stats::{Figure, heap_bytes, percentile, round, set},
};

pub struct Config {
    /// Rounds of changes (p50 and p99 per round).
    pub rounds: usize,
    pub changes_per_round: usize,
    pub resyncs: usize,
    /// Manifest changes made to the standalone agent process.
    pub file_changes: usize,
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

/// `store` as a source hands it over: no Services, no errors, nothing missing.
fn view_of(store: &Store) -> View<'_> {
    static NO_SERVICES: std::sync::LazyLock<ServiceStore> =
        std::sync::LazyLock::new(ServiceStore::default);
    View {
        store,
        services: &NO_SERVICES,
        errors: Vec::new(),
        incomplete: Vec::new(),
        started_at_unix_ms: unix_ms(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn object(yaml: &str) -> Object {
    parse_str(yaml)
        .unwrap_or_else(|e| panic!("bench object: {e}\n{yaml}"))
        .into_iter()
        .next()
        .expect("one object")
}

/// What to check in the kernel's maps once a change is enforced.
enum Check {
    Identity {
        ip: Ipv4Addr,
        present: bool,
    },
    IdentityChanged {
        ip: Ipv4Addr,
        old: u32,
    },
    /// Ingress of namespace `ns`'s local pod from `peer` on TCP `port`.
    Allows {
        ns: usize,
        peer: Ipv4Addr,
        port: u16,
        allowed: bool,
    },
}

/// The kernel's maps, opened from their pins (the agent's writer owns its own handles).
struct KernelMaps {
    endpoints: HashMap<MapData, u32, EndpointInfo>,
    identities: HashMap<MapData, PeerAddr, u32>,
    policy: HashMap<MapData, PolicyKey, PolicyValue>,
}

fn open_pinned(pin_dir: &Path, name: &str) -> Result<Map> {
    let data = MapData::from_pin(pin_dir.join("maps").join(name))
        .with_context(|| format!("opening pinned map {name}"))?;
    Ok(Map::from_map_data(data)?)
}

impl KernelMaps {
    fn open(pin_dir: &Path) -> Result<KernelMaps> {
        Ok(KernelMaps {
            endpoints: HashMap::try_from(open_pinned(pin_dir, map_names::ENDPOINTS)?)?,
            identities: HashMap::try_from(open_pinned(pin_dir, map_names::IDENTITIES)?)?,
            policy: HashMap::try_from(open_pinned(pin_dir, map_names::POLICY)?)?,
        })
    }

    fn identity(&self, ip: Ipv4Addr) -> Option<u32> {
        self.identities.get(&PeerAddr::v4(ip.octets()), 0).ok()
    }

    fn check(&self, check: &Check, ifindexes: &[u32]) -> Result<()> {
        match *check {
            Check::Identity { ip, present } => {
                ensure!(
                    self.identity(ip).is_some() == present,
                    "IDENTITIES[{ip}] should be {}",
                    if present { "present" } else { "absent" }
                );
            }
            Check::IdentityChanged { ip, old } => {
                let now = self
                    .identity(ip)
                    .context("relabelled pod has no identity")?;
                ensure!(now != old, "IDENTITIES[{ip}] still holds identity {old}");
            }
            Check::Allows {
                ns,
                peer,
                port,
                allowed,
            } => {
                let ep = self
                    .endpoints
                    .get(&ifindexes[ns], 0)
                    .context("local endpoint missing from ENDPOINTS")?;
                let identity = self.identity(peer).context("peer has no identity")?;
                let key = PolicyKey {
                    endpoint: ep.id,
                    peer: identity,
                    dir: DIR_INGRESS,
                    proto: PROTO_TCP,
                    port_be: port.to_be(),
                    ..PolicyKey::default()
                };
                let hit = self
                    .policy
                    .get(&key.masked(POLICY_KEY_FULL_BITS), 0)
                    .is_ok();
                ensure!(
                    hit == allowed,
                    "POLICY: {peer} -> local pod of {} on {port} should be {}",
                    cluster::ns_name(ns),
                    if allowed { "allowed" } else { "denied" }
                );
            }
        }
        Ok(())
    }
}

/// The objects of the cluster, kept current as changes are made (for re-lists).
struct Objects {
    map: BTreeMap<ObjectKey, Object>,
}

impl Objects {
    fn apply(&mut self, store: &mut Store, obj: Object) -> Result<()> {
        store
            .apply(obj.clone())
            .map_err(|e| anyhow::anyhow!("bench change rejected: {e}"))?;
        self.map.insert(obj.key(), obj);
        Ok(())
    }

    fn remove(&mut self, store: &mut Store, key: ObjectKey) {
        store.remove(&key);
        self.map.remove(&key);
    }
}

/// A pod of namespace `i` (not the local one) with app `app` and tier web.
fn web_pod_with_app(i: usize, app: usize) -> Ipv4Addr {
    let j = (0..10)
        .map(|m| app + 10 * m)
        .find(|j| j % 3 == 0 && *j != cluster::local_pod(i))
        .expect("such a pod exists");
    cluster::pod_ip(i, j)
}

struct Churn {
    seq: usize,
    ports: Vec<u16>,
    added_pod: Option<(usize, String, Ipv4Addr)>,
    added_policy: Option<usize>,
}

impl Churn {
    /// Makes change number `seq` (timed by the caller from before this call), returning the
    /// check and a label.
    fn next(
        &mut self,
        store: &mut Store,
        objects: &mut Objects,
        kernel: &KernelMaps,
    ) -> Result<(&'static str, Vec<Check>)> {
        let s = self.seq;
        self.seq += 1;
        let i = (s * 37) % NAMESPACES;
        let k = i % 7;
        let cycle = s / 6;
        Ok(match s % 6 {
            0 => {
                let old = self.ports[i];
                let port = if old == 8080 { 8081 } else { 8080 };
                self.ports[i] = port;
                objects.apply(store, object(&cluster::allow_app_yaml(i, k, port)))?;
                let peer = web_pod_with_app(i, (k + 1) % 10);
                (
                    "policy-update",
                    vec![
                        Check::Allows {
                            ns: i,
                            peer,
                            port,
                            allowed: true,
                        },
                        Check::Allows {
                            ns: i,
                            peer,
                            port: old,
                            allowed: false,
                        },
                    ],
                )
            }
            1 => {
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 0)) + cycle as u32);
                let name = format!("extra-{cycle}");
                objects.apply(
                    store,
                    object(&cluster::pod_yaml(i, &name, "app-3", "web", ip, "node-7")),
                )?;
                self.added_pod = Some((i, name, ip));
                ("pod-add", vec![Check::Identity { ip, present: true }])
            }
            2 => {
                let j = 98;
                let ip = cluster::pod_ip(i, j);
                let old = kernel
                    .identity(ip)
                    .context("pod to relabel has no identity")?;
                objects.apply(
                    store,
                    object(&cluster::pod_yaml(
                        i,
                        &format!("pod-{j:03}"),
                        &format!("app-r{s}"),
                        cluster::tier_of(j),
                        ip,
                        "node-3",
                    )),
                )?;
                ("pod-relabel", vec![Check::IdentityChanged { ip, old }])
            }
            3 => {
                let yaml = format!(
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
                     metadata: {{name: extra, namespace: {}}}\n\
                     spec:\n  podSelector: {{matchLabels: {{app: app-{k}}}}}\n  ingress:\n  \
                     - from: [{{podSelector: {{matchLabels: {{app: app-{}}}}}}}]\n    ports: [{{port: 9999}}]\n",
                    cluster::ns_name(i),
                    (k + 2) % 10
                );
                objects.apply(store, object(&yaml))?;
                self.added_policy = Some(i);
                (
                    "policy-add",
                    vec![Check::Allows {
                        ns: i,
                        peer: web_pod_with_app(i, (k + 2) % 10),
                        port: 9999,
                        allowed: true,
                    }],
                )
            }
            4 => {
                let (ns, name, ip) = self.added_pod.take().context("no pod to delete")?;
                objects.remove(
                    store,
                    ObjectKey {
                        kind: Kind::Pod,
                        namespace: cluster::ns_name(ns),
                        name,
                    },
                );
                ("pod-delete", vec![Check::Identity { ip, present: false }])
            }
            _ => {
                let ns = self.added_policy.take().context("no policy to delete")?;
                objects.remove(
                    store,
                    ObjectKey {
                        kind: Kind::NetworkPolicy,
                        namespace: cluster::ns_name(ns),
                        name: "extra".into(),
                    },
                );
                (
                    "policy-delete",
                    vec![Check::Allows {
                        ns,
                        peer: web_pod_with_app(ns, (ns % 7 + 2) % 10),
                        port: 9999,
                        allowed: false,
                    }],
                )
            }
        })
    }
}

struct InProcess {
    cold_ms: f64,
    churn: Vec<Vec<(String, f64)>>,
    resync: Vec<f64>,
    host_read_ms: f64,
    compile_ms: f64,
    diff_ms: f64,
    entries: Value,
    /// Live heap of the store (validated objects), and of the agent after its first
    /// reconcile (compiler tables, the maps' state, observers), bytes.
    store_heap: usize,
    agent_heap: usize,
    /// Per change: (host read, compile, map writes, observers, endpoints compiled), ms.
    phases: Vec<[f64; 5]>,
}

fn in_process(
    cfg: &Config,
    obj: &[u8],
    objects: Vec<Object>,
    work: &Path,
    ifindexes: &[u32],
) -> Result<InProcess> {
    let bpffs = work.join("bpffs-inproc");
    std::fs::create_dir_all(&bpffs)?;
    let pin_dir = bpffs.join("palisade");
    let result = in_process_pinned(cfg, obj, objects, &pin_dir, ifindexes);
    // Dropping the pins detaches the links and frees the maps.
    let _ = nix::mount::umount2(&bpffs, nix::mount::MntFlags::MNT_DETACH);
    result
}

fn in_process_pinned(
    cfg: &Config,
    obj: &[u8],
    objects: Vec<Object>,
    pin_dir: &Path,
    ifindexes: &[u32],
) -> Result<InProcess> {
    let run_cfg = RunConfig {
        pin_dir: pin_dir.to_path_buf(),
        node_name: Some(NODE_NAME.to_string()),
        host_poll: Duration::from_secs(1),
        status_file: None,
        audit: false,
        socket: None,
        admin_addr: None,
        history: 1000,
        conntrack_per_pod: palisade_common::CT_QUOTA_DEFAULT,
        cni_state_dir: None,
        fqdn: Default::default(),
        egress: palisade::egress::EgressConfig {
            health_port: 0,
            ..Default::default()
        },
    };
    // The agent runs its observers (verdict reader) on a current-thread runtime, as
    // `palisade run` does; they progress between changes.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let _runtime = rt.enter();
    let idle = || rt.block_on(tokio::time::sleep(Duration::from_millis(2)));
    let t = Instant::now();
    let heap0 = heap_bytes();
    let mut store = Store::from_objects(objects.iter().cloned());
    let store_heap = heap_bytes().saturating_sub(heap0);
    ensure!(
        store.errors().is_empty(),
        "bench cluster has errors: {:?}",
        store.errors()
    );
    let mut agent = Agent::start(run_cfg, obj)?;
    agent.reconcile(view_of(&store))?;
    let cold_ms = ms(t.elapsed());
    let agent_heap = heap_bytes().saturating_sub(heap0 + store_heap);
    let applied = agent.applied();
    ensure!(
        applied.endpoints.len() == NAMESPACES,
        "the agent found {} local endpoints, expected {NAMESPACES}",
        applied.endpoints.len()
    );
    let entries = json!({
        "endpoints": applied.endpoints.len(),
        "identities": applied.identities.len(),
        "policy_entries": applied.policy.len(),
        "cidr_entries": applied.cidrs.len(),
    });
    eprintln!("bench: churn: cold sync {cold_ms:.0} ms, maps hold {entries}");
    let kernel = KernelMaps::open(pin_dir)?;
    let mut objs = Objects {
        map: objects.into_iter().map(|o| (o.key(), o)).collect(),
    };

    // Where the time goes: the host read, a compile, and a diff that writes nothing.
    let mut host_read = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        let _ = HostView::read()?;
        host_read.push(ms(t.elapsed()));
    }
    let host = HostView::read()?;
    let endpoints = host.local_endpoints(&store, Some(NODE_NAME));
    let mut compiler = Compiler::default();
    let mut compile = Vec::new();
    let mut desired = None;
    for _ in 0..5 {
        let t = Instant::now();
        desired = Some(compiler.compile(&store, &endpoints, &host.addresses));
        compile.push(ms(t.elapsed()));
    }
    let desired = desired.expect("compiled");
    let diff_ms = {
        let mut dp = Datapath::load(obj, None)?;
        let mut writer = MapWriter::new(&mut dp)?;
        writer.apply(&desired);
        let mut v = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let stats = writer.apply(&desired);
            v.push(ms(t.elapsed()));
            ensure!(stats.changes() == 0, "a repeated apply changed {stats:?}");
        }
        percentile(&v, 50.0)
    };

    let mut churn = Churn {
        seq: 0,
        ports: vec![8080; NAMESPACES],
        added_pod: None,
        added_policy: None,
    };
    let mut rounds = Vec::new();
    let mut phases = Vec::new();
    for round in 0..cfg.rounds {
        let mut samples = Vec::new();
        for _ in 0..cfg.changes_per_round {
            let t = Instant::now();
            let (label, checks) = churn.next(&mut store, &mut objs, &kernel)?;
            agent.enforce(view_of(&store))?;
            let dt = ms(t.elapsed());
            // The observers and the status file are told after the change is enforced
            // (the agent's main loop defers this while more changes wait).
            agent.publish(&store)?;
            let ph = agent.phases();
            phases.push([
                ms(ph.host),
                ms(ph.compile),
                ms(ph.write),
                ms(ph.observe),
                ph.endpoints_compiled as f64,
            ]);
            for check in &checks {
                kernel
                    .check(check, ifindexes)
                    .with_context(|| format!("after change {} ({label})", churn.seq - 1))?;
            }
            samples.push((label.to_string(), dt));
            idle();
        }
        let v: Vec<f64> = samples.iter().map(|s| s.1).collect();
        let med = |k: usize| {
            let v: Vec<f64> = phases
                .iter()
                .rev()
                .take(v.len())
                .map(|p: &[f64; 5]| p[k])
                .collect();
            percentile(&v, 50.0)
        };
        eprintln!(
            "bench: churn round {round}: phases p50: host {:.1} ms, compile {:.1} ms ({} endpoints), write {:.1} ms, observers {:.1} ms",
            med(0),
            med(1),
            med(4),
            med(2),
            med(3)
        );
        eprintln!(
            "bench: churn round {round}: p50 {:.1} ms, p99 {:.1} ms over {} changes",
            percentile(&v, 50.0),
            percentile(&v, 99.0),
            v.len()
        );
        rounds.push(samples);
    }

    let mut resync = Vec::new();
    for _ in 0..cfg.resyncs {
        let t = Instant::now();
        let fresh = Store::from_objects(objs.map.values().cloned());
        agent.reconcile(view_of(&fresh))?;
        resync.push(ms(t.elapsed()));
        store = fresh;
        idle();
    }
    drop(store);
    drop(agent);
    Ok(InProcess {
        cold_ms,
        churn: rounds,
        resync,
        host_read_ms: percentile(&host_read, 50.0),
        compile_ms: percentile(&compile, 50.0),
        diff_ms,
        entries,
        store_heap,
        agent_heap,
        phases,
    })
}

/// Where a process's resident set is, MiB: its heap, its binary's pages, the BPF maps it has
/// mapped (the ring buffers, whose data pages are mapped twice), the rest.
fn rss_by_mapping(pid: u32) -> Result<serde_json::Value> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let exe = exe.to_string_lossy();
    let (mut heap, mut binary, mut bpf, mut other) = (0u64, 0u64, 0u64, 0u64);
    let mut mapping = String::new();
    for line in smaps.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.first() {
            Some(f) if f.contains('-') && !f.ends_with(':') => {
                mapping = fields.get(5).map_or(String::new(), |s| s.to_string());
            }
            Some(&"Rss:") => {
                let kb: u64 = fields.get(1).and_then(|v| v.parse().ok()).unwrap_or(0);
                match mapping.as_str() {
                    "[heap]" | "" => heap += kb,
                    m if m == exe => binary += kb,
                    m if m.starts_with("anon_inode:bpf") => bpf += kb,
                    _ => other += kb,
                }
            }
            _ => {}
        }
    }
    let mib = |kb: u64| round(kb as f64 / 1024.0);
    Ok(json!({
        "heap": mib(heap),
        "binary": mib(binary),
        "bpf_mapped": mib(bpf),
        "other": mib(other),
    }))
}

/// VmRSS and VmHWM of a process, MiB.
fn rss_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .with_context(|| format!("{name} missing from /proc/{pid}/status"))?;
        let kb: f64 = line
            .split_whitespace()
            .nth(1)
            .context("malformed status line")?
            .parse()?;
        Ok(kb / 1024.0)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// The agent process using `pin_dir` (found by its command line).
fn agent_pid(pin_dir: &Path) -> Result<u32> {
    let needle = pin_dir.to_string_lossy().to_string();
    for entry in std::fs::read_dir("/proc")? {
        let entry = entry?;
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).to_string())
            .collect();
        if args.iter().any(|a| a == "run") && args.contains(&needle) {
            return Ok(pid);
        }
    }
    bail!("no agent process with pin dir {needle}")
}

/// The kernel's memory accounting of every pinned map (fdinfo `memlock`), MiB by map.
fn map_memory(pin_dir: &Path) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(pin_dir.join("maps"))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let data = MapData::from_pin(entry.path())
            .with_context(|| format!("opening pinned map {name}"))?;
        let fd = data.fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))?;
        let bytes: f64 = info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .context("fdinfo has no memlock")?
            .trim()
            .parse()?;
        out.insert(name, bytes / (1024.0 * 1024.0));
    }
    Ok(out)
}

pub fn run(
    cfg: &Config,
    obj: &[u8],
    agent_bin: &Path,
    work: &Path,
    report: &mut Value,
) -> Result<()> {
    let started = Instant::now();
    let work: PathBuf = work.join("churn");
    let _ = std::fs::remove_dir_all(&work);
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    eprintln!(
        "bench: churn: generating {NAMESPACES} namespaces, {} pods, {} policies",
        NAMESPACES * PODS_PER_NAMESPACE,
        NAMESPACES * 10
    );
    let heap_before = heap_bytes();
    let mut objects = Vec::new();
    for i in 0..NAMESPACES {
        let text = cluster::join_docs(&cluster::namespace_docs(i));
        std::fs::write(
            manifests.join(format!("{}.yaml", cluster::ns_name(i))),
            &text,
        )?;
        objects.extend(parse_str(&text).map_err(|e| anyhow::anyhow!("{e}"))?);
    }
    let objects_heap = heap_bytes().saturating_sub(heap_before);
    let t = Instant::now();
    let node = Node::new(NodeSpec {
        pods: (0..NAMESPACES)
            .map(|i| PodSpec {
                name: format!("p{i}"),
            })
            .collect(),
        ipv6: false,
    })?;
    eprintln!(
        "bench: churn: node of {NAMESPACES} pods in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let ifindexes: Vec<u32> = node.pods().iter().map(|p| p.host_ifindex).collect();

    let ip = node.in_netns(|| in_process(cfg, obj, objects, &work, &ifindexes))??;

    let mut per_round_p50 = Figure::default();
    let mut per_round_p99 = Figure::default();
    let mut by_kind: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for round in &ip.churn {
        let v: Vec<f64> = round.iter().map(|s| s.1).collect();
        per_round_p50.push(percentile(&v, 50.0));
        per_round_p99.push(percentile(&v, 99.0));
        for (label, dt) in round {
            by_kind.entry(label.clone()).or_default().push(*dt);
        }
    }
    let all: Vec<f64> = ip.churn.iter().flatten().map(|s| s.1).collect();
    set(report, "churn_ms.p50", per_round_p50.json());
    set(report, "churn_ms.p99", per_round_p99.json());
    set(
        report,
        "churn_detail",
        json!({
            "changes": all.len(),
            "p50_all": round(percentile(&all, 50.0)),
            "p99_all": round(percentile(&all, 99.0)),
            "max_all": round(percentile(&all, 100.0)),
            "samples_ms": all.iter().map(|v| round(*v)).collect::<Vec<_>>(),
            "by_kind_p50": by_kind.iter().map(|(k, v)| (k.clone(), json!(round(percentile(v, 50.0))))).collect::<serde_json::Map<_, _>>(),
            "by_kind_max": by_kind.iter().map(|(k, v)| (k.clone(), json!(round(percentile(v, 100.0))))).collect::<serde_json::Map<_, _>>(),
            "phases_p50_ms": {
                "host_read": round(percentile(&ip.phases.iter().map(|p| p[0]).collect::<Vec<_>>(), 50.0)),
                "compile": round(percentile(&ip.phases.iter().map(|p| p[1]).collect::<Vec<_>>(), 50.0)),
                "write": round(percentile(&ip.phases.iter().map(|p| p[2]).collect::<Vec<_>>(), 50.0)),
                "observers": round(percentile(&ip.phases.iter().map(|p| p[3]).collect::<Vec<_>>(), 50.0)),
                "endpoints_compiled": round(percentile(&ip.phases.iter().map(|p| p[4]).collect::<Vec<_>>(), 50.0)),
            },
            "phases_p99_ms": {
                "compile": round(percentile(&ip.phases.iter().map(|p| p[1]).collect::<Vec<_>>(), 99.0)),
                "write": round(percentile(&ip.phases.iter().map(|p| p[2]).collect::<Vec<_>>(), 99.0)),
                "observers": round(percentile(&ip.phases.iter().map(|p| p[3]).collect::<Vec<_>>(), 99.0)),
            },
            "host_read_ms": round(ip.host_read_ms),
            "compile_ms": round(ip.compile_ms),
            "noop_diff_ms": round(ip.diff_ms),
            "cold_sync_ms": round(ip.cold_ms),
            "maps": ip.entries,
        }),
    );
    set(report, "resync_ms", Figure::new(ip.resync.clone()).json());

    // The agent binary, standalone, on the same manifests.
    let proc_work = work.join("agent-process");
    std::fs::create_dir_all(&proc_work)?;
    let since = SystemTime::now();
    let t = Instant::now();
    let mut agent = AgentProcess::start(&node, agent_bin, &manifests, &proc_work)?;
    let status = agent.wait_reconciled(since, NAMESPACES, Duration::from_secs(600))?;
    let start_ms = ms(t.elapsed());
    ensure!(
        status.errors.is_empty(),
        "the agent reports errors: {:?}",
        status.errors
    );
    let pid = agent_pid(agent.pin_dir())?;
    let (rss_first, _) = rss_mib(pid)?;
    let kernel = KernelMaps::open(agent.pin_dir())?;
    let mut file_latency = Vec::new();
    for c in 0..cfg.file_changes {
        // Change one policy's port (to one it never had), through its namespace's file.
        let i = (c * 13) % NAMESPACES;
        let k = i % 7;
        let port = 8100 + c as u16;
        let mut docs = cluster::namespace_docs(i);
        docs[1 + PODS_PER_NAMESPACE + 1 + k] = cluster::allow_app_yaml(i, k, port);
        let tmp = manifests.join(format!(".{}.tmp", cluster::ns_name(i)));
        std::fs::write(&tmp, cluster::join_docs(&docs))?;
        let check = Check::Allows {
            ns: i,
            peer: web_pod_with_app(i, (k + 1) % 10),
            port,
            allowed: true,
        };
        let mut since = SystemTime::now();
        let written = unix_ms();
        std::fs::rename(
            &tmp,
            manifests.join(format!("{}.yaml", cluster::ns_name(i))),
        )?;
        // A reconcile may have started in the same millisecond, before the rename: wait until
        // the change is in the kernel's maps.
        let done = loop {
            let status = agent.wait_reconciled(since, NAMESPACES, Duration::from_secs(120))?;
            if kernel.check(&check, &ifindexes).is_ok() {
                break status.reconciled_at_unix_ms;
            }
            since = UNIX_EPOCH + Duration::from_millis(status.started_at_unix_ms as u64);
        };
        file_latency.push(done.saturating_sub(written) as f64);
    }
    // Let it settle, then read its memory.
    std::thread::sleep(Duration::from_secs(1));
    let (rss, hwm) = rss_mib(pid)?;
    let rss_by_mapping = rss_by_mapping(pid)?;
    let maps = map_memory(agent.pin_dir())?;
    let total: f64 = maps.values().sum();
    eprintln!(
        "bench: agent process: reconciled {NAMESPACES} endpoints in {start_ms:.0} ms; RSS {rss:.1} MiB (peak {hwm:.1}); BPF maps {total:.1} MiB"
    );
    set(report, "agent_rss_mib", Figure::new(vec![rss]).json());
    set(report, "bpf_map_mib", Figure::new(vec![total]).json());
    set(
        report,
        "memory_detail",
        json!({
            "agent_rss_after_first_reconcile_mib": round(rss_first),
            "agent_rss_mib": round(rss),
            "agent_peak_rss_mib": round(hwm),
            "agent_rss_by_mapping_mib": rss_by_mapping,
            "bpf_maps_mib": maps.iter().map(|(k, v)| (k.clone(), json!(round(*v)))).collect::<serde_json::Map<_, _>>(),
            "agent_start_to_enforced_ms": round(start_ms),
            "heap_mib": {
                "k8s_objects": round(objects_heap as f64 / 1048576.0),
                "store": round(ip.store_heap as f64 / 1048576.0),
                "agent_state": round(ip.agent_heap as f64 / 1048576.0),
            },
            "file_change_to_enforced_ms": Figure::new(file_latency).json(),
        }),
    );
    drop(agent);
    drop(node);
    set(
        report,
        "sections.churn_s",
        json!(round(started.elapsed().as_secs_f64())),
    );
    Ok(())
}
