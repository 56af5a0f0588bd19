//! Egress gateways, the agent's side (ARCHITECTURE.md, "Egress gateways").
//!
//! One thread, every `probe_interval`:
//! * **Health**: a TCP connect to every candidate gateway node's liveness port (this listener,
//!   `--egress-health-port`, on every agent); `misses` failures in a row make a node dead, one
//!   success alive again. A node starts dead until its first answer (fail closed).
//! * **Pod node**: EGW_DESTS from the compiled plan, EGW_GROUPS (each group's active gateways,
//!   `palisade_policy::egress::active_gateways`) and EGW_CTL (the tunnel devices), written
//!   where they differ from what was written.
//! * **Gateway node**: the collect-metadata VXLAN device (`pal-egw`, `external`, the same
//!   Ethernet address on every node) receives what pod nodes send; an nftables table of its own
//!   (`palisade_egress`) forwards a group's packets only where this node is the group's active
//!   gateway, source-NATs them to the egress address (or masquerades), and drops the rest of
//!   what came through the tunnels. The egress address is added to the interface holding the
//!   node's address while this node is active (announced by gratuitous ARP / unsolicited NA),
//!   and removed when it is not.
//! * **Records**: a flow in EGW_FLOWS whose conntrack entry closed, expired or is gone is
//!   recorded once (pod, destination, gateway, egress address, packets and bytes): a verdict
//!   in the history, a JSON line (`--egress-log`), and the per-gateway metrics.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    io::Write,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::maps::{
    Array, HashMap as BpfHashMap, MapData,
    lpm_trie::{Key, LpmTrie},
};
use palisade_common::{
    CT_FLAG_CLOSING, CtEntry, CtKey, EGW_DEST_FIXED_BITS, EGW_MAX_GATEWAYS, EgwCtl, EgwDest,
    EgwDestKey, EgwFlow, EgwGateway, EgwGroup, ct_expired, ip_of, map_names,
};
use palisade_datapath::Datapath;
use palisade_policy::egress::{DestEntry, EgressPlan, Group, active_gateways};
use tracing::{info, warn};

use crate::{
    api::{EgressFlow, FlowEnd, Verdict},
    hub::Hub,
    inspect::VerdictKind,
    verdicts::rfc3339_ms,
};

/// The liveness port every agent listens on for its peers' probes.
pub const DEFAULT_HEALTH_PORT: u16 = 4247;
/// The tunnel devices (collect metadata).
/// The tunnel device (VXLAN, collect metadata): this kernel family's tunnels of choice
/// (ipip, ip6tnl, geneve) are optional kernel features; VXLAN is the one every CNI needs.
pub const TUNNEL: &str = "pal-egw";
/// Lifetime of a held egress address, renewed every second while this node is active.
pub const EGRESS_IP_LIFETIME_S: u32 = 3;
/// The agent's nftables table (family inet).
pub const NFT_TABLE: &str = "palisade_egress";

#[derive(Clone, Debug)]
pub struct EgressConfig {
    pub node_name: Option<String>,
    /// 0: no listener (peers see this node's gateway as dead) and no probes.
    pub health_port: u16,
    pub probe_interval: Duration,
    /// Failed probes in a row that make a gateway dead.
    pub misses: u32,
    /// JSON lines of ended flows: a file, or `-` for stdout.
    pub log: Option<PathBuf>,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            node_name: None,
            health_port: DEFAULT_HEALTH_PORT,
            probe_interval: Duration::from_millis(250),
            misses: 3,
            log: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pure parts: health, groups, the nftables ruleset
// ---------------------------------------------------------------------------------------------

/// One gateway node's liveness, from probes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Liveness {
    pub misses: u32,
    /// Answered at least once since the last time it was dead.
    pub alive: bool,
}

impl Liveness {
    /// Records a probe; true when the node's state changed.
    pub fn probe(&mut self, ok: bool, max_misses: u32) -> bool {
        let was = self.alive;
        if ok {
            self.misses = 0;
            self.alive = true;
        } else {
            self.misses = self.misses.saturating_add(1);
            if self.misses >= max_misses {
                self.alive = false;
            }
        }
        was != self.alive
    }
}

fn gateway_value(n: &palisade_policy::egress::GatewayNode) -> EgwGateway {
    EgwGateway {
        node: n.id,
        v4: n.v4.map_or([0; 4], |a| a.octets()),
        v6: n.v6.map_or([0; 16], |a| a.octets()),
    }
}

/// EGW_GROUPS as it should be for `plan` with `healthy` deciding which nodes are alive.
pub fn group_values(plan: &EgressPlan, healthy: &dyn Fn(&str) -> bool) -> BTreeMap<u32, EgwGroup> {
    plan.groups
        .iter()
        .map(|(id, g)| {
            let mut v = EgwGroup::default();
            for (i, n) in active_gateways(g, &|n: &str| healthy(n))
                .into_iter()
                .take(EGW_MAX_GATEWAYS)
                .enumerate()
            {
                v.gateways[i] = gateway_value(n);
                v.n = i as u32 + 1;
            }
            (*id, v)
        })
        .collect()
}

/// What this node serves as a gateway: group id -> the group, for the groups whose active
/// gateways include `node`.
pub fn serving<'a>(
    plan: &'a EgressPlan,
    node: &str,
    healthy: &dyn Fn(&str) -> bool,
) -> BTreeMap<u32, &'a Group> {
    plan.groups
        .iter()
        .filter(|(_, g)| {
            active_gateways(g, &|n: &str| healthy(n))
                .iter()
                .any(|n| n.name == node)
        })
        .map(|(id, g)| (*id, g))
        .collect()
}

fn elements<T: ToString>(items: impl IntoIterator<Item = T>) -> Option<String> {
    let v: Vec<String> = items.into_iter().map(|i| i.to_string()).collect();
    (!v.is_empty()).then(|| v.join(", "))
}

/// The `palisade_egress` table for the groups this node serves (`nft -f` input, replacing the
/// table in one transaction). Whatever comes out of the tunnels and no served group claims is
/// dropped: a gateway forwards only what it masquerades.
pub fn nft_ruleset(served: &BTreeMap<u32, &Group>, nodes: &[IpAddr]) -> String {
    let mut sets = String::new();
    // The tunnel takes packets from the cluster's nodes only: else anyone who can reach a
    // gateway could send it a packet with a selected pod's address and have it translated.
    let port = palisade_common::EGW_VXLAN_PORT;
    let mut input = String::new();
    for (fam, ty, v6) in [("ip", "ipv4_addr", false), ("ip6", "ipv6_addr", true)] {
        match elements(nodes.iter().filter(|a| a.is_ipv6() == v6)) {
            Some(list) => {
                sets.push_str(&format!(
                    "  set nodes_{fam} {{ type {ty}; elements = {{ {list} }} }}\n"
                ));
                input.push_str(&format!(
                    "    {fam} saddr != @nodes_{fam} udp dport {port} counter drop\n"
                ));
            }
            None => input.push_str(&format!(
                "    meta nfproto {} udp dport {port} counter drop\n",
                if v6 { "ipv6" } else { "ipv4" }
            )),
        }
    }
    let mut accept = String::new();
    let mut nat = String::new();
    for (id, g) in served {
        for (fam, tun, v6) in [("ip", TUNNEL, false), ("ip6", TUNNEL, true)] {
            let ty = if v6 { "ipv6_addr" } else { "ipv4_addr" };
            let src = elements(g.sources.iter().filter(|a| a.is_ipv6() == v6));
            let dst = elements(g.destinations.iter().filter(|n| n.is_ipv6() == v6));
            let (Some(src), Some(dst)) = (src, dst) else {
                continue;
            };
            let name = format!("g{id}_{fam}");
            sets.push_str(&format!(
                "  set {name}_src {{ type {ty}; elements = {{ {src} }} }}\n  set {name}_dst {{ type {ty}; flags interval; auto-merge; elements = {{ {dst} }} }}\n"
            ));
            let mut m =
                format!("iifname \"{tun}\" {fam} saddr @{name}_src {fam} daddr @{name}_dst");
            if let Some(exc) = elements(g.excluded.iter().filter(|n| n.is_ipv6() == v6)) {
                sets.push_str(&format!(
                    "  set {name}_exc {{ type {ty}; flags interval; auto-merge; elements = {{ {exc} }} }}\n"
                ));
                m.push_str(&format!(" {fam} daddr != @{name}_exc"));
            }
            accept.push_str(&format!("    {m} accept\n"));
            let to = match g.egress_ip(v6) {
                Some(ip) => format!("snat {fam} to {ip}"),
                None => "masquerade".to_string(),
            };
            nat.push_str(&format!("    {m} counter {to} comment \"{}\"\n", g.name));
        }
    }
    format!(
        "table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\ntable inet {NFT_TABLE} {{\n{sets}  chain input {{\n    type filter hook input priority filter - 10; policy accept;\n{input}  }}\n  chain forward {{\n    type filter hook forward priority filter - 10; policy accept;\n{accept}    iifname \"{TUNNEL}\" counter drop\n  }}\n  chain postrouting {{\n    type nat hook postrouting priority srcnat - 10; policy accept;\n{nat}  }}\n}}\n"
    )
}

trait EgressIp {
    fn egress_ip(&self, v6: bool) -> Option<IpAddr>;
}

impl EgressIp for Group {
    fn egress_ip(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.egress_v6.map(IpAddr::V6)
        } else {
            self.egress_v4.map(IpAddr::V4)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The thread
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Input {
    plan: EgressPlan,
    /// Endpoint id -> `namespace/name`.
    pods: BTreeMap<u32, String>,
    version: u64,
}

struct Shared {
    input: Mutex<Input>,
    wake: Condvar,
    /// Node name -> alive, as of the last probes (for `status`).
    alive: Mutex<BTreeMap<String, bool>>,
    /// Where records and metrics go, once the observers run.
    hub: std::sync::OnceLock<Arc<Hub>>,
}

/// The egress gateway machinery of one agent.
pub struct Egress {
    shared: Arc<Shared>,
}

struct Maps {
    ctl: Array<MapData, EgwCtl>,
    dests: LpmTrie<MapData, EgwDestKey, EgwDest>,
    groups: BpfHashMap<MapData, u32, EgwGroup>,
    flows: BpfHashMap<MapData, CtKey, EgwFlow>,
    ct: BpfHashMap<MapData, CtKey, CtEntry>,
}

struct Open {
    flow: EgwFlow,
    recorded: bool,
    last: Option<CtEntry>,
}

struct Worker {
    cfg: EgressConfig,
    shared: Arc<Shared>,
    maps: Maps,
    log: Option<Box<dyn Write + Send>>,
    version: u64,
    plan: EgressPlan,
    pods: BTreeMap<u32, String>,
    live: BTreeMap<String, Liveness>,
    written_dests: BTreeMap<DestEntry, EgwDest>,
    written_groups: BTreeMap<u32, EgwGroup>,
    written_ctl: Option<EgwCtl>,
    nft: Option<String>,
    /// Egress addresses this agent added, with their interface.
    assigned: BTreeMap<IpAddr, String>,
    last_announce: Option<Instant>,
    open: HashMap<CtKey, Open>,
}

impl Egress {
    /// Takes the egress maps and starts the thread (and the liveness listener).
    /// Call before the map writer and the observers take their maps.
    pub fn start(dp: &mut Datapath, cfg: EgressConfig) -> Result<Egress> {
        let maps = Maps {
            ctl: Array::try_from(dp.take_map(map_names::EGW_CTL)?)?,
            dests: LpmTrie::try_from(dp.take_map(map_names::EGW_DESTS)?)?,
            groups: BpfHashMap::try_from(dp.take_map(map_names::EGW_GROUPS)?)?,
            flows: BpfHashMap::try_from(dp.take_map(map_names::EGW_FLOWS)?)?,
            ct: BpfHashMap::try_from(aya::maps::Map::HashMap(dp.open_map(map_names::CONNTRACK)?))?,
        };
        if cfg.health_port != 0 {
            // Without it, peers see this node's gateway as dead (fail closed): said, not fatal.
            match TcpListener::bind(SocketAddr::from((Ipv6Addr::UNSPECIFIED, cfg.health_port)))
                .or_else(|_| {
                    TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.health_port)))
                }) {
                Ok(l) => {
                    std::thread::Builder::new()
                        .name("egress-live".into())
                        .spawn(move || {
                            for c in l.incoming() {
                                drop(c);
                            }
                        })?;
                }
                Err(e) => warn!(
                    port = cfg.health_port,
                    "egress liveness port: {e} (peers will take this node's gateway for dead)"
                ),
            }
        }
        let log: Option<Box<dyn Write + Send>> = match &cfg.log {
            None => None,
            Some(p) if p.as_os_str() == "-" => Some(Box::new(std::io::stdout())),
            Some(p) => Some(Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .with_context(|| format!("--egress-log {}", p.display()))?,
            )),
        };
        let shared = Arc::new(Shared {
            input: Mutex::new(Input::default()),
            wake: Condvar::new(),
            alive: Mutex::new(BTreeMap::new()),
            hub: std::sync::OnceLock::new(),
        });
        let mut w = Worker {
            cfg,
            shared: shared.clone(),
            maps,
            log,
            version: 0,
            plan: EgressPlan::default(),
            pods: BTreeMap::new(),
            live: BTreeMap::new(),
            written_dests: BTreeMap::new(),
            written_groups: BTreeMap::new(),
            written_ctl: None,
            nft: None,
            assigned: BTreeMap::new(),
            last_announce: None,
            open: HashMap::new(),
        };
        // What a previous agent wrote: replaced by the first pass.
        w.adopt();
        std::thread::Builder::new()
            .name("egress".into())
            .spawn(move || w.run())?;
        Ok(Egress { shared })
    }

    /// Hands the thread a newly compiled plan (and the names of this node's endpoints).
    pub fn set_plan(&self, desired: &palisade_policy::state::DesiredState) {
        let mut i = self.shared.input.lock().expect("egress lock");
        if i.plan == desired.egress && i.version != 0 {
            return;
        }
        i.plan = desired.egress.clone();
        i.pods = desired
            .endpoint_meta
            .iter()
            .map(|(id, m)| (*id, m.pod.to_string()))
            .collect();
        i.version += 1;
        self.shared.wake.notify_all();
    }

    /// Records and metrics go to `hub` from now on.
    pub fn set_hub(&self, hub: Arc<Hub>) {
        let _ = self.shared.hub.set(hub);
    }

    /// Gateway node -> alive, as of the last probes.
    pub fn liveness(&self) -> BTreeMap<String, bool> {
        self.shared.alive.lock().expect("egress lock").clone()
    }
}

fn run_cmd(cmd: &mut Command, input: Option<&str>) -> Result<()> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("{cmd:?}"))?;
    if let Some(text) = input {
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn ifindex(name: &str) -> u32 {
    nix::net::if_::if_nametoindex(name).unwrap_or(0)
}

/// The interface holding `addr` (`ip -o addr`).
fn interface_of(addr: IpAddr) -> Option<String> {
    let out = Command::new("ip")
        .args(["-o", "addr", "show"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let needle = format!(" {addr}/");
    text.lines()
        .find(|l| l.contains(&needle))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(|s| {
            s.trim_end_matches(':')
                .split('@')
                .next()
                .unwrap_or(s)
                .to_string()
        })
}

impl Worker {
    /// What a previous agent wrote stays in force (its pinned maps keep steering) until this
    /// one has a plan: read back, so that the first write changes only what differs.
    fn adopt(&mut self) {
        for (k, v) in self.maps.dests.iter().filter_map(|r| r.ok()) {
            let prefix_len = k.prefix_len().saturating_sub(EGW_DEST_FIXED_BITS) as u8;
            self.written_dests.insert(
                DestEntry {
                    key: k.data(),
                    prefix_len,
                },
                v,
            );
        }
        for (k, v) in self.maps.groups.iter().filter_map(|r| r.ok()) {
            self.written_groups.insert(k, v);
        }
        self.written_ctl = self.maps.ctl.get(&0, 0).ok();
        // The flows a previous agent steered are recorded when they end, by this one.
        let flows: Vec<(CtKey, EgwFlow)> = self.maps.flows.iter().filter_map(|r| r.ok()).collect();
        for (k, f) in flows {
            self.open.insert(
                k,
                Open {
                    flow: f,
                    recorded: false,
                    last: None,
                },
            );
        }
    }

    fn run(mut self) {
        loop {
            let started = Instant::now();
            if let Err(e) = self.pass() {
                warn!("egress gateways: {e:#}");
            }
            let deadline = started + self.cfg.probe_interval;
            let i = self.shared.input.lock().expect("egress lock");
            let now = Instant::now();
            if now < deadline && i.version == self.version {
                let _ = self.shared.wake.wait_timeout(i, deadline - now);
            }
        }
    }

    fn pass(&mut self) -> Result<()> {
        {
            let i = self.shared.input.lock().expect("egress lock");
            if i.version != self.version {
                self.version = i.version;
                self.plan = i.plan.clone();
                self.pods = i.pods.clone();
            }
        }
        let me = self.cfg.node_name.clone().unwrap_or_default();
        if self.version == 0 {
            // No plan yet (the first reconcile has not run): what is pinned stays as it is.
            return Ok(());
        }
        self.probe(&me);
        let live = self.live.clone();
        let healthy = |n: &str| n == me || live.get(n).is_some_and(|l| l.alive);
        // Taking over from a better-placed gateway needs it confirmed dead (its misses), not
        // merely not heard from yet (this agent just started): no needless address moves.
        let max = self.cfg.misses;
        let not_dead = |n: &str| n == me || live.get(n).is_none_or(|l| l.alive || l.misses < max);
        // Gateway node first: the table that drops whatever comes out of the tunnel and no
        // served group claims exists before the tunnel does (else a decapsulated packet could
        // be forwarded, and masqueraded by the node's own NAT, as the node's address).
        let plan = self.plan.clone();
        let served = serving(&plan, &me, &not_dead);
        self.serve(&served)?;
        let tunnels = if self.plan.groups.is_empty() {
            ifindex(TUNNEL)
        } else {
            self.ensure_tunnels()
        };
        // Pod node: the maps.
        let ctl = EgwCtl {
            groups: self.plan.groups.len() as u32,
            ifindex: tunnels,
            _pad: [0; 2],
        };
        let groups = group_values(&self.plan, &healthy);
        self.write_maps(ctl, groups)?;
        if let Some(hub) = self.shared.hub.get() {
            for (id, g) in &self.plan.groups {
                let active = &self.written_groups.get(id);
                for n in &g.gateways {
                    let on = active.is_some_and(|v| v.has(n.id));
                    hub.metrics
                        .egress_healthy
                        .get_or_create(&vec![
                            ("gateway".into(), g.name.clone()),
                            ("node".into(), n.name.clone()),
                        ])
                        .set(i64::from(on));
                }
            }
        }
        self.records();
        Ok(())
    }

    fn ensure_tunnels(&mut self) -> u32 {
        if ifindex(TUNNEL) == 0 {
            let port = palisade_common::EGW_VXLAN_PORT.to_string();
            match run_cmd(
                Command::new("ip").args([
                    "link",
                    "add",
                    TUNNEL,
                    "type",
                    "vxlan",
                    "external",
                    "dstport",
                    &port,
                    "nolearning",
                ]),
                None,
            ) {
                Ok(()) => info!(device = TUNNEL, "egress tunnel device created"),
                Err(e) => warn!(device = TUNNEL, "creating the egress tunnel device: {e:#}"),
            }
        }
        let mac = palisade_common::EGW_DEVICE_MAC
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        let _ = run_cmd(
            Command::new("ip").args(["link", "set", TUNNEL, "address", &mac, "up"]),
            None,
        );
        // Decapsulated packets come from pods of other nodes, whose routes point elsewhere.
        let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{TUNNEL}/rp_filter"), "0");
        ifindex(TUNNEL)
    }

    fn probe(&mut self, me: &str) {
        let mut targets: BTreeMap<String, SocketAddr> = BTreeMap::new();
        for g in self.plan.groups.values() {
            for n in &g.gateways {
                if n.name == me {
                    continue;
                }
                let ip: Option<IpAddr> = n.v4.map(IpAddr::V4).or(n.v6.map(IpAddr::V6));
                if let Some(ip) = ip {
                    targets.insert(n.name.clone(), SocketAddr::new(ip, self.cfg.health_port));
                }
            }
        }
        self.live.retain(|n, _| targets.contains_key(n));
        if self.cfg.health_port == 0 {
            return;
        }
        let timeout = self.cfg.probe_interval.mul_f32(0.8);
        let results: Vec<(String, bool)> = std::thread::scope(|s| {
            let handles: Vec<_> = targets
                .iter()
                .map(|(n, a)| {
                    let a = *a;
                    let n = n.clone();
                    s.spawn(move || (n, TcpStream::connect_timeout(&a, timeout).is_ok()))
                })
                .collect();
            handles.into_iter().filter_map(|h| h.join().ok()).collect()
        });
        for (n, ok) in results {
            if !ok && let Some(hub) = self.shared.hub.get() {
                hub.metrics.egress_no_gateway.inc();
            }
            let l = self.live.entry(n.clone()).or_default();
            if l.probe(ok, self.cfg.misses) {
                if l.alive {
                    info!(node = n, "egress gateway alive");
                } else {
                    warn!(node = n, misses = l.misses, "egress gateway dead");
                }
            }
        }
        *self.shared.alive.lock().expect("egress lock") = self
            .live
            .iter()
            .map(|(n, l)| (n.clone(), l.alive))
            .collect();
    }

    fn write_maps(&mut self, ctl: EgwCtl, groups: BTreeMap<u32, EgwGroup>) -> Result<()> {
        // Groups before destinations (a destination never names a group the map lacks), and
        // CTL last; removals the other way round.
        for (id, v) in &groups {
            if self.written_groups.get(id) != Some(v) {
                self.maps.groups.insert(id, v, 0)?;
                self.written_groups.insert(*id, *v);
            }
        }
        let want = self.plan.dests.clone();
        for (e, v) in &want {
            if self.written_dests.get(e) != Some(v) {
                let key = Key::new(EGW_DEST_FIXED_BITS + u32::from(e.prefix_len), e.key);
                self.maps.dests.insert(&key, v, 0)?;
                self.written_dests.insert(*e, *v);
            }
        }
        if self.written_ctl != Some(ctl) {
            self.maps.ctl.set(0, ctl, 0)?;
            self.written_ctl = Some(ctl);
        }
        let stale: Vec<DestEntry> = self
            .written_dests
            .keys()
            .filter(|e| !want.contains_key(e))
            .copied()
            .collect();
        for e in stale {
            let key = Key::new(EGW_DEST_FIXED_BITS + u32::from(e.prefix_len), e.key);
            let _ = self.maps.dests.remove(&key);
            self.written_dests.remove(&e);
        }
        let stale: Vec<u32> = self
            .written_groups
            .keys()
            .filter(|g| !groups.contains_key(g))
            .copied()
            .collect();
        for g in stale {
            let _ = self.maps.groups.remove(&g);
            self.written_groups.remove(&g);
        }
        Ok(())
    }

    fn serve(&mut self, served: &BTreeMap<u32, &Group>) -> Result<()> {
        let me = self.cfg.node_name.clone().unwrap_or_default();
        let text = nft_ruleset(served, &self.plan.nodes);
        // Written whenever there are EgressGateways at all (or were): the drop rule holds on
        // every node that has the tunnel, gateway or not.
        if self.nft.as_ref() != Some(&text) && (!self.plan.groups.is_empty() || self.nft.is_some())
        {
            run_cmd(Command::new("nft").arg("-f").arg("-"), Some(&text))
                .context("the palisade_egress nftables table")?;
            info!(groups = served.len(), "egress gateway rules written");
            self.nft = Some(text);
        }
        // Egress addresses: held while this node is a group's active gateway.
        let mut want: BTreeMap<IpAddr, String> = BTreeMap::new();
        for g in served.values() {
            let Some(node) = g.gateways.iter().find(|n| n.name == me) else {
                continue;
            };
            for (eip, own) in [
                (g.egress_v4.map(IpAddr::V4), node.v4.map(IpAddr::V4)),
                (g.egress_v6.map(IpAddr::V6), node.v6.map(IpAddr::V6)),
            ] {
                if let (Some(eip), Some(own)) = (eip, own)
                    && let Some(dev) = interface_of(own)
                {
                    want.insert(eip, dev);
                }
            }
        }
        // Held with a lifetime the agent renews every second: a gateway whose agent dies
        // loses the address by itself within `EGRESS_IP_LIFETIME_S` (its kernel would
        // otherwise go on answering for it).
        let renew = self
            .last_announce
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        let mut added = false;
        for (ip, dev) in &want {
            let new = self.assigned.get(ip) != Some(dev);
            if new || renew {
                let cidr = if ip.is_ipv6() {
                    format!("{ip}/128")
                } else {
                    format!("{ip}/32")
                };
                let lft = EGRESS_IP_LIFETIME_S.to_string();
                let mut args = vec![
                    "addr",
                    "replace",
                    cidr.as_str(),
                    "dev",
                    dev.as_str(),
                    "valid_lft",
                    lft.as_str(),
                    "preferred_lft",
                    lft.as_str(),
                ];
                if ip.is_ipv6() {
                    args.push("nodad");
                }
                run_cmd(Command::new("ip").args(&args), None)
                    .with_context(|| format!("adding egress address {ip}"))?;
            }
            if new {
                // ARP requests this node sends carry its own address, never the egress
                // address: else a gateway that lost the address would claim it back in the
                // outside world's caches whenever it asks for a neighbour.
                let _ = std::fs::write(format!("/proc/sys/net/ipv4/conf/{dev}/arp_announce"), "2");
                info!(address = %ip, device = dev, "egress address held");
                self.assigned.insert(*ip, dev.clone());
                added = true;
            }
        }
        let gone: Vec<(IpAddr, String)> = self
            .assigned
            .iter()
            .filter(|(ip, _)| !want.contains_key(ip))
            .map(|(a, b)| (*a, b.clone()))
            .collect();
        for (ip, dev) in gone {
            let cidr = if ip.is_ipv6() {
                format!("{ip}/128")
            } else {
                format!("{ip}/32")
            };
            let _ = run_cmd(
                Command::new("ip").args(["addr", "del", cidr.as_str(), "dev", dev.as_str()]),
                None,
            );
            info!(address = %ip, device = dev, "egress address released");
            self.assigned.remove(&ip);
        }
        // Announce on taking an address, and every second while holding one: the outside
        // world's neighbour caches follow the active gateway.
        let due = self
            .last_announce
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        if !self.assigned.is_empty() && (added || due) {
            for (ip, dev) in &self.assigned {
                if let Err(e) = crate::egress_announce::announce(*ip, dev) {
                    warn!(address = %ip, "announcing the egress address: {e:#}");
                }
            }
            self.last_announce = Some(Instant::now());
        }
        Ok(())
    }

    fn records(&mut self) {
        let now = palisade_datapath::ct_sweep::datapath_now_ns();
        let flows: Vec<(CtKey, EgwFlow)> = self.maps.flows.iter().filter_map(|r| r.ok()).collect();
        let present: BTreeSet<[u8; 44]> = flows.iter().map(|(k, _)| key_bytes(k)).collect();
        for (k, f) in flows {
            let o = self.open.entry(k).or_insert(Open {
                flow: f,
                recorded: false,
                last: None,
            });
            o.flow = f;
        }
        let mut ended: Vec<CtKey> = Vec::new();
        let mut emit: Vec<(CtKey, EgwFlow, CtEntry)> = Vec::new();
        for (k, o) in self.open.iter_mut() {
            let ct = self.maps.ct.get(k, 0).ok();
            let over = match &ct {
                None => true,
                Some(e) => e.flags & CT_FLAG_CLOSING != 0 || ct_expired(k.proto, e, now),
            };
            if let Some(e) = ct {
                o.last = Some(e);
            }
            if over && !o.recorded {
                o.recorded = true;
                if let Some(e) = o.last {
                    emit.push((*k, o.flow, e));
                }
            }
            if ct.is_none() || !present.contains(&key_bytes(k)) {
                ended.push(*k);
            }
        }
        for (k, f, e) in emit {
            self.record(&k, &f, &e);
        }
        for k in ended {
            let _ = self.maps.flows.remove(&k);
            self.open.remove(&k);
        }
    }

    fn record(&mut self, k: &CtKey, f: &EgwFlow, e: &CtEntry) {
        let group = self.plan.groups.get(&f.group);
        let gateway = group.map_or_else(|| format!("#{}", f.group), |g| g.name.clone());
        let node = group
            .and_then(|g| g.gateways.iter().find(|n| n.id == f.gateway.node))
            .map_or_else(|| format!("#{}", f.gateway.node), |n| n.name.clone());
        let v6 = k.family == palisade_common::AF_INET6;
        let egress_ip = group.and_then(|g| g.egress_ip(v6));
        let (Some(src), Some(dst)) = (ip_of(k.family, &k.pod), ip_of(k.family, &k.peer)) else {
            return;
        };
        let pod = self.pods.get(&k.endpoint).cloned();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let ports = matches!(k.proto, 6 | 17 | 132);
        let v = Verdict {
            seq: 0,
            time: rfc3339_ms(wall),
            time_unix_ms: wall,
            verdict: VerdictKind::Allowed,
            reason: "egress-gateway".into(),
            endpoint: pod.clone(),
            direction: palisade_policy::state::Direction::Egress,
            source: FlowEnd {
                ip: src,
                port: ports.then_some(k.pod_port),
                pod,
                node: false,
            },
            destination: FlowEnd {
                ip: dst,
                port: ports.then_some(k.peer_port),
                pod: None,
                node: false,
            },
            protocol: crate::inspect::proto_name(k.proto),
            rule: None,
            policies: vec![format!("EgressGateway {gateway} via {node}")],
            bytes: 0,
            domain: None,
            egress: Some(EgressFlow {
                gateway: gateway.clone(),
                node: node.clone(),
                egress_ip,
                packets: e.packets,
                bytes: e.bytes,
                duration_ms: e.last_seen_ns.saturating_sub(e.created_ns) / 1_000_000,
            }),
        };
        if let Some(log) = &mut self.log
            && let Ok(line) = serde_json::to_string(&v)
        {
            let _ = writeln!(log, "{line}");
            let _ = log.flush();
        }
        if let Some(hub) = self.shared.hub.get() {
            let labels = vec![("gateway".into(), gateway), ("node".into(), node)];
            hub.metrics.egress_flows.get_or_create(&labels).inc();
            hub.metrics
                .egress_packets
                .get_or_create(&labels)
                .inc_by(e.packets);
            hub.metrics
                .egress_bytes
                .get_or_create(&labels)
                .inc_by(e.bytes);
            hub.history.lock().expect("history lock").push(v);
        }
    }
}

fn key_bytes(k: &CtKey) -> [u8; 44] {
    let mut b = [0u8; 44];
    b[..4].copy_from_slice(&k.endpoint.to_ne_bytes());
    b[4..20].copy_from_slice(&k.pod);
    b[20..36].copy_from_slice(&k.peer);
    b[36..38].copy_from_slice(&k.pod_port.to_ne_bytes());
    b[38..40].copy_from_slice(&k.peer_port.to_ne_bytes());
    b[40] = k.proto;
    b[41] = k.family;
    b[42] = k.role;
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::egress::GatewayNode;

    fn group(egress: bool) -> Group {
        Group {
            name: "out".into(),
            egress_v4: egress.then(|| Ipv4Addr::new(10, 243, 0, 100)),
            egress_v6: None,
            gateways: ["node-2", "node-3"]
                .iter()
                .enumerate()
                .map(|(i, n)| GatewayNode {
                    name: n.to_string(),
                    id: 10 + i as u32,
                    v4: Some(Ipv4Addr::new(10, 243, 0, 2 + i as u8)),
                    v6: None,
                })
                .collect(),
            sources: vec![
                "10.244.0.5".parse().unwrap(),
                "fd00:244::5".parse().unwrap(),
            ],
            destinations: vec!["192.0.2.0/24".parse().unwrap()],
            excluded: vec!["192.0.2.128/25".parse().unwrap()],
        }
    }

    #[test]
    fn a_gateway_dies_after_its_misses_and_lives_again_on_one_answer() {
        let mut l = Liveness::default();
        assert!(!l.alive, "dead until it answers");
        assert!(l.probe(true, 3));
        assert!(!l.probe(false, 3) && !l.probe(false, 3));
        assert!(l.alive, "two misses of three");
        assert!(l.probe(false, 3));
        assert!(!l.alive);
        assert!(l.probe(true, 3) && l.alive);
    }

    #[test]
    fn groups_hold_the_active_gateways_or_none() {
        let mut plan = EgressPlan::default();
        plan.groups.insert(7, group(true));
        let v = group_values(&plan, &|_| true);
        assert_eq!(v[&7].n, 1);
        assert_eq!(v[&7].gateways[0].node, 10);
        assert_eq!(v[&7].gateways[0].v4, [10, 243, 0, 2]);
        let v = group_values(&plan, &|n| n == "node-3");
        assert_eq!((v[&7].n, v[&7].gateways[0].node), (1, 11), "failover");
        let v = group_values(&plan, &|_| false);
        assert_eq!(v[&7].n, 0, "none healthy: the datapath drops");
        assert_eq!(serving(&plan, "node-2", &|_| true).len(), 1);
        assert!(serving(&plan, "node-3", &|_| true).is_empty(), "standby");
        plan.groups.insert(7, group(false));
        assert_eq!(group_values(&plan, &|_| true)[&7].n, 2, "no address: all");
        assert_eq!(serving(&plan, "node-3", &|_| true).len(), 1);
    }

    #[test]
    fn the_ruleset_forwards_and_translates_only_what_a_served_group_claims() {
        let g = group(true);
        let served = BTreeMap::from([(7, &g)]);
        let text = nft_ruleset(&served, &["10.243.0.1".parse().unwrap()]);
        assert!(
            text.starts_with("table inet palisade_egress {}\ndelete table inet palisade_egress\n")
        );
        assert!(
            text.contains("set g7_ip_src { type ipv4_addr; elements = { 10.244.0.5 } }"),
            "{text}"
        );
        assert!(text.contains("elements = { 192.0.2.0/24 }"), "{text}");
        assert!(text.contains(
            "iifname \"pal-egw\" ip saddr @g7_ip_src ip daddr @g7_ip_dst ip daddr != @g7_ip_exc counter snat ip to 10.243.0.100"
        ), "{text}");
        assert!(
            !text.contains("g7_ip6"),
            "no IPv6 destination: no IPv6 rule\n{text}"
        );
        assert!(text.contains("iifname \"pal-egw\" counter drop"));
        let g = group(false);
        let served = BTreeMap::from([(7, &g)]);
        assert!(text.contains("set nodes_ip { type ipv4_addr; elements = { 10.243.0.1 } }"));
        assert!(
            text.contains("ip saddr != @nodes_ip udp dport 4789 counter drop"),
            "{text}"
        );
        assert!(
            text.contains("meta nfproto ipv6 udp dport 4789 counter drop"),
            "no IPv6 node: no IPv6 tunnel traffic\n{text}"
        );
        assert!(nft_ruleset(&served, &[]).contains("counter masquerade"));
        let none = nft_ruleset(&BTreeMap::new(), &[]);
        assert!(none.contains("counter drop") && !none.contains("snat"));
    }
}
