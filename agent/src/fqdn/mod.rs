//! FQDN egress in the agent: snoop, hold, release (`palisade_common`, "FQDN egress").
//!
//! A thread of its own reads the DNS answers `to_pod` copied, learns for the endpoint that
//! asked the addresses its `domainNames` patterns resolved to (FQDN_IPS: the domain class the
//! compiler gave the patterns the name matches, and an expiry), then sends a held answer on.
//! It beats the heartbeat that lets `to_pod` hold answers only once it knows the endpoints'
//! patterns and while it is running: a stopped agent holds nothing, so DNS never waits for it.
//! What it learned is kept in `fqdn.json` beside the CLI socket, for `palisade fqdn` and for
//! the next agent, which also learns the answers given while none ran (DNS_ANSWERS is pinned).
pub mod frame;
pub mod learned;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use palisade_common::{DNS_HOLD_FRESH_NS, FqdnKey, FqdnValue, PeerAddr};
use palisade_datapath::dns::{DnsPath, DnsRecord, now_coarse_ns};
use palisade_policy::{fqdn, state::DomainTable};
use tracing::{debug, info, warn};

pub use learned::{Learned, NameEntry};

/// The file beside the CLI socket.
pub const FQDN_FILE: &str = "fqdn.json";

/// How the learner works.
#[derive(Clone, Debug)]
pub struct FqdnConfig {
    /// DNS servers whose answers teach, besides the cluster's DNS Service (`Tables::servers`).
    pub trusted: Vec<IpAddr>,
    /// Hold answers until learned (off: they pass at once and the first connection may race
    /// the learning; for measurements).
    pub hold: bool,
    /// An answer's addresses admit new connections for at least this long (a TTL of 0 still
    /// admits the connection that follows it) and at most `max_ttl`.
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    /// Addresses kept per name and per endpoint (the earliest to expire go first).
    pub max_per_name: usize,
    pub max_per_endpoint: usize,
    /// `fqdn.json`; `None`: nothing is kept across restarts.
    pub state_file: Option<PathBuf>,
}

impl Default for FqdnConfig {
    fn default() -> Self {
        FqdnConfig {
            trusted: Vec::new(),
            hold: true,
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(24 * 3600),
            max_per_name: 256,
            max_per_endpoint: 4096,
            state_file: None,
        }
    }
}

/// What a reconcile tells the learner.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Tables {
    /// Endpoint id -> its domain classes.
    pub domains: BTreeMap<u32, DomainTable>,
    /// Endpoint id -> "namespace/name".
    pub pods: BTreeMap<u32, String>,
    /// The cluster's DNS servers (the kube-dns Service's addresses).
    pub servers: BTreeSet<IpAddr>,
}

/// The cluster's DNS Service, whose answers teach wherever the agent runs in cluster mode.
pub const CLUSTER_DNS: (&str, &str) = ("kube-system", "kube-dns");

impl Tables {
    /// What an applied state and the Services say.
    pub fn of(
        applied: &palisade_policy::state::DesiredState,
        services: &palisade_policy::services::ServiceStore,
    ) -> Tables {
        let key = (CLUSTER_DNS.0.to_string(), CLUSTER_DNS.1.to_string());
        Tables {
            domains: applied.domains.clone(),
            pods: applied
                .endpoint_meta
                .iter()
                .filter(|(id, _)| applied.domains.contains_key(id))
                .map(|(id, m)| (*id, format!("{}/{}", m.pod.namespace, m.pod.name)))
                .collect(),
            servers: services
                .services
                .get(&key)
                .map(|s| s.vips.iter().copied().collect())
                .unwrap_or_default(),
        }
    }
}

/// Counters for `/metrics` and `palisade stats`.
#[derive(Debug, Default)]
pub struct FqdnStats {
    pub answers: AtomicU64,
    pub released: AtomicU64,
    pub release_failures: AtomicU64,
    pub unparsed: AtomicU64,
    pub learned: AtomicU64,
    pub evicted: AtomicU64,
    pub expired: AtomicU64,
    pub write_failures: AtomicU64,
    /// Addresses in FQDN_IPS now.
    pub addresses: AtomicU64,
    /// (endpoint, address) -> the name (and CNAME chain) that opened it, for verdicts.
    peers: std::sync::RwLock<HashMap<(u32, IpAddr), String>>,
    /// How long the last held answers were held, µs (at most `HOLD_SAMPLES`).
    hold_us: Mutex<std::collections::VecDeque<u64>>,
}

/// Hold times kept for the percentiles.
const HOLD_SAMPLES: usize = 1024;

impl FqdnStats {
    /// The name whose DNS answer gave endpoint `endpoint` the address `ip`.
    pub fn name_of(&self, endpoint: u32, ip: IpAddr) -> Option<String> {
        self.peers.read().ok()?.get(&(endpoint, ip)).cloned()
    }

    /// The p50 and p99 of the last held answers' hold times, µs.
    pub fn hold_percentiles(&self) -> Option<(u64, u64)> {
        let h = self.hold_us.lock().ok()?;
        if h.is_empty() {
            return None;
        }
        let mut v: Vec<u64> = h.iter().copied().collect();
        v.sort_unstable();
        let at = |p: usize| v[(v.len() - 1) * p / 100];
        Some((at(50), at(99)))
    }

    fn held(&self, us: u64) {
        if let Ok(mut h) = self.hold_us.lock() {
            if h.len() == HOLD_SAMPLES {
                h.pop_front();
            }
            h.push_back(us);
        }
    }
}

/// "name" or "name (via a > b)".
fn peer_label(name: &str, chain: &[String]) -> String {
    if chain.is_empty() {
        name.to_string()
    } else {
        format!("{name} (via {})", chain.join(" > "))
    }
}

struct Shared {
    tables: Mutex<(u64, Tables)>,
    /// The generation of tables the learner works with (and beats for).
    taken: AtomicU64,
    stop: AtomicBool,
    stats: Arc<FqdnStats>,
}

/// The learner's thread; stops when dropped.
pub struct Fqdn {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Domain class ids the previous agent gave (to adopt before the first compile).
    pub adopted: BTreeMap<u32, DomainTable>,
}

impl Fqdn {
    /// Opens the DNS maps and starts the thread; it reads what an earlier agent learned, and
    /// learns and releases nothing until the first `set_tables`.
    pub fn start(dp: &mut palisade_datapath::Datapath, cfg: FqdnConfig) -> Result<Fqdn> {
        let path = DnsPath::new(dp).context("the DNS maps")?;
        let learned = cfg
            .state_file
            .as_deref()
            .map(Learned::load)
            .unwrap_or_default();
        let adopted = learned.classes.clone();
        let shared = Arc::new(Shared {
            tables: Mutex::new((0, Tables::default())),
            taken: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            stats: Arc::default(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fqdn".into())
            .spawn(move || Learner::new(path, cfg, learned, s).run())
            .context("starting the FQDN thread")?;
        Ok(Fqdn {
            shared,
            thread: Some(thread),
            adopted,
        })
    }

    /// After a reconcile: the endpoints' domain classes and the cluster's DNS servers. Returns
    /// once the learner works with them (or after `TAKE_WAIT`): a reconcile that named new
    /// patterns is done when their answers are learned from.
    pub fn set_tables(&self, tables: Tables) {
        let generation = {
            let mut t = self.shared.tables.lock().expect("fqdn tables");
            if t.0 != 0 && t.1 == tables {
                return;
            }
            t.0 += 1;
            t.1 = tables;
            t.0
        };
        let deadline = Instant::now() + TAKE_WAIT;
        while self.shared.taken.load(Ordering::Acquire) < generation && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The learner's counters (for the hub).
    pub fn stats(&self) -> Arc<FqdnStats> {
        self.shared.stats.clone()
    }
}

impl Drop for Fqdn {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How often the heartbeat is written (`DNS_HOLD_FRESH_NS` is 1 s), expired addresses looked
/// for, and `fqdn.json` written when something changed.
const BEAT: Duration = Duration::from_millis(200);
const GC: Duration = Duration::from_secs(5);
const SAVE: Duration = Duration::from_secs(1);
/// How long the learner may sleep between looks at new tables, and how long a reconcile waits
/// for it to take them.
const WAKE: Duration = Duration::from_millis(20);
const TAKE_WAIT: Duration = Duration::from_millis(500);
/// DNS_ANSWERS is read while some endpoint names domains (only their answers are copied),
/// and for this long after the last heartbeat, so that every answer held under it is sent on.
const HOLD_GRACE: Duration = Duration::from_secs(2 * DNS_HOLD_FRESH_NS / 1_000_000_000);
/// The largest L3 packet a released answer is sent as (pods' interfaces have at least this).
const RELEASE_MTU: usize = 1500;

struct Learner {
    path: DnsPath,
    cfg: FqdnConfig,
    learned: Learned,
    shared: Arc<Shared>,
    generation: u64,
    tables: Tables,
    /// TCP answers being put together, by (ifindex, server, server port, client port).
    streams: HashMap<(u32, IpAddr, u16, u16), Vec<u8>>,
    dirty: bool,
    /// FQDN_IPS entries an earlier agent wrote that `learned` does not name (it was killed
    /// before it wrote `fqdn.json`): kept until they expire, as long as their endpoint still
    /// names domains.
    orphans: BTreeMap<FqdnKey, FqdnValue>,
}

impl Learner {
    fn new(path: DnsPath, cfg: FqdnConfig, learned: Learned, shared: Arc<Shared>) -> Learner {
        let named: std::collections::BTreeSet<FqdnKey> = learned
            .endpoints
            .iter()
            .flat_map(|(ep, n)| {
                n.names
                    .values()
                    .flat_map(move |e| e.addresses.keys().map(move |ip| key(*ep, *ip)))
            })
            .collect();
        let orphans = path
            .entries()
            .into_iter()
            .filter(|(k, _)| !named.contains(k))
            .collect();
        Learner {
            orphans,
            path,
            cfg,
            learned,
            shared,
            generation: 0,
            tables: Tables::default(),
            streams: HashMap::new(),
            dirty: false,
        }
    }

    fn run(mut self) {
        // The last heartbeat, and whether it still stands (not stopped with 0).
        let mut last_beat: Option<Instant> = None;
        let mut holding = false;
        let mut last_gc = Instant::now();
        let mut last_save = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            self.take_tables();
            let names_domains = !self.tables.domains.is_empty();
            // Hold only once the patterns are known (an answer held before would be
            // released unlearned, and its connection would race), and only while some
            // endpoint names domains.
            if self.cfg.hold
                && self.generation > 0
                && names_domains
                && last_beat.is_none_or(|t| t.elapsed() >= BEAT)
            {
                if let Err(e) = self.path.beat(now_coarse_ns()) {
                    warn!("FQDN heartbeat: {e}");
                }
                last_beat = Some(Instant::now());
                holding = true;
            }
            if holding && !names_domains {
                // Stop holding at once: nothing is learned for anyone now.
                if let Err(e) = self.path.beat(0) {
                    warn!("FQDN heartbeat: {e}");
                }
                holding = false;
            }
            if self.generation > 0 {
                let read = names_domains || last_beat.is_some_and(|t| t.elapsed() < HOLD_GRACE);
                if read && let Err(e) = self.path.read_answers(true) {
                    warn!("mapping the DNS answers: {e}");
                }
                // The backlog first (answers given while no agent ran), then as they come.
                while let Some(r) = self.path.next_record() {
                    self.handle(r);
                }
                // Drained: unmapped until an endpoint names domains again.
                if !read {
                    let _ = self.path.read_answers(false);
                }
            }
            if last_gc.elapsed() >= GC && self.generation > 0 {
                self.expire();
                last_gc = Instant::now();
            }
            if self.dirty && last_save.elapsed() >= SAVE {
                self.save();
                last_save = Instant::now();
            }
            self.shared.taken.store(self.generation, Ordering::Release);
            self.path.wait(WAKE);
        }
        // Stop holding at once: DNS must not wait for an agent that is going away.
        let _ = self.path.beat(0);
        if self.dirty {
            self.save();
        }
    }

    fn save(&mut self) {
        if let Some(p) = &self.cfg.state_file {
            self.learned.classes = self.tables.domains.clone();
            if let Err(e) = self.learned.save(p) {
                warn!("{}: {e:#}", p.display());
            }
        }
        self.dirty = false;
    }

    /// Takes new tables from the reconcile: trusted servers, and every learned address
    /// written again with its name's class now (or removed).
    fn take_tables(&mut self) {
        let (generation, tables) = {
            let t = self.shared.tables.lock().expect("fqdn tables");
            if t.0 == self.generation {
                return;
            }
            (t.0, t.1.clone())
        };
        self.generation = generation;
        self.tables = tables;
        let servers: BTreeSet<PeerAddr> = self
            .cfg
            .trusted
            .iter()
            .chain(self.tables.servers.iter())
            .map(|ip| PeerAddr::from_ip(*ip))
            .collect();
        if let Err(e) = self.path.set_servers(&servers) {
            warn!("DNS servers: {e}");
        }
        self.learned
            .endpoints
            .retain(|ep, _| self.tables.domains.contains_key(ep));
        self.sync_map();
        self.dirty = true;
    }

    /// Makes FQDN_IPS what `learned` and the tables say.
    fn sync_map(&mut self) {
        let domains = &self.tables.domains;
        self.orphans
            .retain(|k, _| domains.contains_key(&k.endpoint));
        let mut want: BTreeMap<FqdnKey, FqdnValue> = self.orphans.clone();
        for (ep, names) in &mut self.learned.endpoints {
            let Some(table) = self.tables.domains.get(ep) else {
                continue;
            };
            names.names.retain(|name, _| table.matches(name));
            for (name, entry) in &names.names {
                let Some((class, audit_class)) = table.classes_of(name) else {
                    continue;
                };
                for (ip, expires) in &entry.addresses {
                    let key = key(*ep, *ip);
                    let v = want.entry(key).or_insert(FqdnValue {
                        class,
                        audit_class,
                        expires_ns: 0,
                    });
                    v.expires_ns = v.expires_ns.max(*expires);
                    // One address of two names: the class of the name learned last wins
                    // (both name the endpoint's own patterns).
                    v.class = class;
                    v.audit_class = audit_class;
                }
            }
        }
        let peers: HashMap<(u32, IpAddr), String> = self
            .learned
            .endpoints
            .iter()
            .flat_map(|(ep, n)| {
                n.names.iter().flat_map(move |(name, e)| {
                    let label = peer_label(name, &e.chain);
                    e.addresses
                        .keys()
                        .map(move |ip| ((*ep, *ip), label.clone()))
                })
            })
            .collect();
        if let Ok(mut p) = self.shared.stats.peers.write() {
            *p = peers;
        }
        let have: BTreeMap<FqdnKey, FqdnValue> = self.path.entries().into_iter().collect();
        for k in have.keys().filter(|k| !want.contains_key(k)) {
            self.path.remove(k);
        }
        for (k, v) in &want {
            if have.get(k) != Some(v) && self.path.put(k, v).is_err() {
                self.shared
                    .stats
                    .write_failures
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        self.shared
            .stats
            .addresses
            .store(want.len() as u64, Ordering::Relaxed);
    }

    fn handle(&mut self, r: DnsRecord) {
        self.shared.stats.answers.fetch_add(1, Ordering::Relaxed);
        let mut frame = r.frame;
        let h = frame::parse(&frame);
        if let Some(h) = &h {
            for msg in self.messages(r.ifindex, h, &frame) {
                self.learn(r.endpoint, r.at_ns, h.src, &msg);
            }
        } else {
            self.shared.stats.unparsed.fetch_add(1, Ordering::Relaxed);
        }
        if r.held {
            self.release(r.ifindex, &mut frame, h.as_ref());
            let now = palisade_datapath::clock_ns(libc::CLOCK_MONOTONIC);
            self.shared.stats.held(now.saturating_sub(r.seen_ns) / 1000);
        }
    }

    /// Sends a held answer on, cut to the MTU if the node's stack forwarded it as one large
    /// segment, with whole checksums.
    fn release(&self, ifindex: u32, frame: &mut [u8], h: Option<&frame::L4>) {
        let parts = match h {
            Some(h) => frame::segment(frame, h, RELEASE_MTU),
            None => vec![],
        };
        let mut sent = true;
        if parts.is_empty() {
            sent &= self.path.release(ifindex, frame).is_ok();
        }
        for (mut f, ph) in parts {
            frame::fix_checksums(&mut f, &ph);
            if let Err(e) = self.path.release(ifindex, &f) {
                debug!(ifindex, "releasing a DNS answer: {e}");
                sent = false;
            }
        }
        let counter = if sent {
            &self.shared.stats.released
        } else {
            &self.shared.stats.release_failures
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The whole DNS messages a frame completes: its UDP payload, or the TCP messages (each
    /// after its 2-byte length) its segment ends, joined with the segments before it.
    fn messages(&mut self, ifindex: u32, h: &frame::L4, frame: &[u8]) -> Vec<Vec<u8>> {
        let payload = &frame[h.payload..h.end];
        if h.proto == 17 {
            return vec![payload.to_vec()];
        }
        if payload.is_empty() {
            return Vec::new();
        }
        let key = (ifindex, h.src, h.sport, h.dport);
        let buf = self.streams.entry(key).or_default();
        buf.extend_from_slice(payload);
        let mut out = Vec::new();
        loop {
            if buf.len() < 2 {
                break;
            }
            let n = usize::from(u16::from_be_bytes([buf[0], buf[1]]));
            if buf.len() < 2 + n {
                break;
            }
            out.push(buf[2..2 + n].to_vec());
            buf.drain(..2 + n);
        }
        if buf.is_empty() || buf.len() > 70_000 {
            self.streams.remove(&key);
        }
        out
    }

    fn learn(&mut self, endpoint: u32, at_ns: u64, server: IpAddr, msg: &[u8]) {
        let answer = match fqdn::answer(msg) {
            Ok(a) => a,
            Err(e) => {
                debug!(endpoint, "DNS answer not learned: {e}");
                self.shared.stats.unparsed.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        let Some(table) = self.tables.domains.get(&endpoint) else {
            return;
        };
        let Some((class, audit_class)) = table.classes_of(&answer.name) else {
            return;
        };
        if answer.addresses.is_empty() {
            return;
        }
        let ttl_ns = |ttl: u32| {
            Duration::from_secs(u64::from(ttl))
                .clamp(self.cfg.min_ttl, self.cfg.max_ttl)
                .as_nanos() as u64
        };
        let pod = self.tables.pods.get(&endpoint).cloned().unwrap_or_default();
        let names = self.learned.endpoints.entry(endpoint).or_default();
        names.pod = pod;
        let entry = names.names.entry(answer.name.clone()).or_default();
        entry.chain = answer.chain.clone();
        entry.server = server.to_string();
        entry.answered_unix_ms = crate::files::unix_ms();
        let mut writes = Vec::new();
        for (ip, ttl) in &answer.addresses {
            let expires = at_ns + ttl_ns(*ttl);
            let e = entry.addresses.entry(*ip).or_insert(0);
            *e = (*e).max(expires);
            writes.push((*ip, *e));
        }
        let evicted = learned::bound(
            names,
            &answer.name,
            self.cfg.max_per_name,
            self.cfg.max_per_endpoint,
        );
        for ip in &evicted {
            self.path.remove(&key(endpoint, *ip));
        }
        self.shared
            .stats
            .evicted
            .fetch_add(evicted.len() as u64, Ordering::Relaxed);
        if let Ok(mut p) = self.shared.stats.peers.write() {
            let label = peer_label(&answer.name, &answer.chain);
            for (ip, _) in &writes {
                p.insert((endpoint, *ip), label.clone());
            }
            for ip in &evicted {
                p.remove(&(endpoint, *ip));
            }
        }
        for (ip, expires) in writes.into_iter().filter(|(ip, _)| !evicted.contains(ip)) {
            let v = FqdnValue {
                class,
                audit_class,
                expires_ns: expires,
            };
            if self.path.put(&key(endpoint, ip), &v).is_err() {
                self.shared
                    .stats
                    .write_failures
                    .fetch_add(1, Ordering::Relaxed);
            } else {
                self.shared.stats.learned.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.dirty = true;
    }

    /// Forgets expired addresses no tracked flow of their endpoint uses.
    fn expire(&mut self) {
        let now = now_coarse_ns();
        let in_use = self.path.peers_in_use();
        let mut gone = 0;
        for (ep, names) in &mut self.learned.endpoints {
            for entry in names.names.values_mut() {
                entry.addresses.retain(|ip, expires| {
                    let keep = *expires > now || in_use.contains(&(*ep, PeerAddr::from_ip(*ip)));
                    gone += u64::from(!keep);
                    keep
                });
            }
            names.names.retain(|_, e| !e.addresses.is_empty());
        }
        self.learned.endpoints.retain(|_, n| !n.names.is_empty());
        self.orphans.retain(|k, v| {
            let keep = v.expires_ns > now || in_use.contains(&(k.endpoint, k.peer()));
            gone += u64::from(!keep);
            keep
        });
        if gone > 0 {
            self.shared.stats.expired.fetch_add(gone, Ordering::Relaxed);
            self.sync_map();
            self.dirty = true;
            info!(addresses = gone, "expired DNS-learned addresses forgotten");
        }
    }
}

fn key(endpoint: u32, ip: IpAddr) -> FqdnKey {
    FqdnKey::new(endpoint, PeerAddr::from_ip(ip))
}
