//! A Kubernetes node in network namespaces, wired like the ptp CNI plugin.
//!
//! One node namespace, and one namespace per pod joined to it by a veth pair: `lxc<i>` on the
//! node, `eth0` in the pod. Pod i has 10.244.0.(10+i)/32 (and, with IPv6, fd00:244::(10+i)/128,
//! the last group in hex: fd00:244::a for pod 0); every host-side veth carries the gateway
//! 10.244.0.1/32 (and fe80::1/64), and the node routes each pod address to its veth. The node's
//! own ("InternalIP") addresses 10.243.0.1 and fd00:243::1 sit on `node0`. Nothing leaves
//! these namespaces.
//!
//! In a cluster of several such nodes ([`crate::multinode`]), node k owns the pod range
//! 10.244.k.0/24 (fd00:244:0:k::/64): its pods get 10.244.k.(10+i), its host-side veths the
//! gateway 10.244.k.1, and instead of `node0` it has an uplink to the other nodes that carries
//! its own addresses. Node 0 of a cluster has exactly the addresses of a lone node.
//!
//! Namespaces are named `pal-<pid>-<counter>-...`: unique across the tests of a process and
//! across processes. Creating a node removes `pal-<pid>-*` namespaces of processes that no
//! longer exist. Dropping the node (panics included) stops its servers, kills the children it
//! spawned and deletes its namespaces, which deletes the veths.
use std::{
    ffi::OsStr,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, ExitStatus},
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{
    netns,
    server::{Bind, Servers},
};
pub use crate::{
    netns::{command_in, in_netns},
    probe::{
        Outcome, ProbeSpec, Proto, probe, probe_expecting, probe_from_netns, probe_many,
        probe_outcomes,
    },
};

/// The gateway every pod routes through (on every host-side veth, as ptp does).
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
/// The IPv6 gateway: link-local on every host-side veth.
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// The node's own addresses, on `node0`.
pub const NODE_IP_V4: Ipv4Addr = Ipv4Addr::new(10, 243, 0, 1);
pub const NODE_IP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x243, 0, 0, 0, 0, 0, 1);
/// At most this many pods per node (10.244.0.10 ... 10.244.0.254).
pub const MAX_PODS: usize = 245;

pub fn pod_ipv4(index: usize) -> Ipv4Addr {
    pod_ipv4_on(0, index)
}

pub fn pod_ipv6(index: usize) -> Ipv6Addr {
    pod_ipv6_on(0, index)
}

/// Pod `index` of node `node` of a cluster (node 0: [`pod_ipv4`]).
pub fn pod_ipv4_on(node: u8, index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, (10 + index) as u8)
}

pub fn pod_ipv6_on(node: u8, index: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, 0, node as u16, 0, 0, 0, (10 + index) as u16)
}

/// The gateway on node `node`'s host-side veths (node 0: [`GATEWAY_V4`]).
pub fn gateway_v4_on(node: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node, 1)
}

/// Where a node sits: alone (with `node0`), or node `index` of a cluster, whose addresses the
/// cluster puts on its uplink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    Alone,
    Member {
        index: u8,
        ips: (Ipv4Addr, Ipv6Addr),
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// A label for the pod, e.g. "x-a"; it also appears in the namespace's name.
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSpec {
    pub pods: Vec<PodSpec>,
    /// Give pods (and the gateway routes) IPv6 too.
    pub ipv6: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub name: String,
    /// Position in the node's pods; decides the addresses and the host veth's name.
    pub index: usize,
    pub netns_name: String,
    pub ipv4: Ipv4Addr,
    pub ipv6: Option<Ipv6Addr>,
    /// The host-side veth in the node namespace (`lxc<index>`).
    pub host_ifname: String,
    /// Its ifindex in the node namespace.
    pub host_ifindex: u32,
}

impl Pod {
    /// The pod's IPv4 or IPv6 address. Panics if IPv6 is asked of a node without it.
    pub fn ip(&self, ipv6: bool) -> IpAddr {
        if ipv6 {
            IpAddr::V6(self.ipv6.expect("this node was created without IPv6"))
        } else {
            IpAddr::V4(self.ipv4)
        }
    }

    /// All the pod's addresses (IPv4 first).
    pub fn ips(&self) -> Vec<IpAddr> {
        std::iter::once(IpAddr::V4(self.ipv4))
            .chain(self.ipv6.map(IpAddr::V6))
            .collect()
    }

    pub fn netns_path(&self) -> PathBuf {
        netns::netns_path(&self.netns_name)
    }

    /// A command whose process runs in this pod's network namespace.
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(&self.netns_name, program)
    }

    /// Runs `f` on a thread inside this pod's network namespace.
    pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        in_netns(&self.netns_name, f)
    }

    /// A TCP connection from this pod (5 s connect timeout), e.g. for a long-lived flow. The
    /// rig's servers echo what they read.
    pub fn connect_tcp(&self, to: IpAddr, port: u16) -> Result<TcpStream> {
        self.connect_tcp_timeout(to, port, Duration::from_secs(5))
    }

    pub fn connect_tcp_timeout(
        &self,
        to: IpAddr,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream> {
        let addr = SocketAddr::new(to, port);
        self.in_netns(|| TcpStream::connect_timeout(&addr, timeout))?
            .with_context(|| format!("connecting from {} to {addr}", self.name))
    }

    /// One probe from this pod (see [`probe`]).
    pub fn probe(&self, to: IpAddr, port: u16, proto: Proto, timeout: Duration) -> bool {
        probe(self, to, port, proto, timeout)
    }
}

/// A child process that is killed (with its process group) when this guard or the node that
/// spawned it is dropped, whichever comes first.
pub struct ChildGuard {
    child: Arc<Mutex<Option<Child>>>,
    pid: u32,
}

fn kill_child(slot: &Mutex<Option<Child>>) {
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(mut c) = slot.take() {
        // The child leads its own process group: take its descendants too. The group id cannot
        // be reused while the (possibly zombie) leader is not reaped.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl ChildGuard {
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// `Some(status)` once the child has exited (then it is reaped); `None` while it runs or
    /// after it was killed.
    pub fn try_wait(&self) -> std::io::Result<Option<ExitStatus>> {
        match self
            .child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            Some(c) => c.try_wait(),
            None => Ok(None),
        }
    }

    /// Runs `f` on the child (to take its pipes, say) unless it was already killed.
    pub fn with_child<R>(&self, f: impl FnOnce(&mut Child) -> R) -> Option<R> {
        self.child
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(f)
    }

    /// SIGKILL to the child's process group, and reap it.
    pub fn kill(&self) {
        kill_child(&self.child);
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

pub struct Node {
    /// The node's network namespace (where the host-side veths are).
    pub netns_name: String,
    ipv6: bool,
    placement: Placement,
    pods: Vec<Pod>,
    /// Every namespace created so far (deleted on drop).
    created: Vec<String>,
    servers: Servers,
    children: Mutex<Vec<Arc<Mutex<Option<Child>>>>>,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// True when running as root. Otherwise, under `CI=true` this panics (a privileged test must
/// fail loudly there), else it prints a skip notice and returns false.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this test needs root (network namespaces, BPF) and CI=true: refusing to skip it");
    }
    eprintln!("SKIPPED: this test needs root (network namespaces, BPF)");
    false
}

/// Deletes `pal-<pid>-*` namespaces whose process no longer exists (rigs of killed tests).
pub fn remove_stale_namespaces() {
    let me = std::process::id();
    for name in netns::list() {
        let Some(pid) = name
            .strip_prefix("pal-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != me && !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = netns::delete(&name);
        }
    }
}

fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(32)
        .collect();
    s.trim_matches('-').to_string()
}

const COMMON_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/conf/all/rp_filter", "0"),
    ("net/ipv4/conf/default/rp_filter", "0"),
    ("net/ipv6/conf/all/accept_dad", "0"),
    ("net/ipv6/conf/default/accept_dad", "0"),
    ("net/ipv6/conf/default/dad_transmits", "0"),
    ("net/ipv6/conf/all/router_solicitations", "0"),
    ("net/ipv6/conf/default/router_solicitations", "0"),
    ("net/ipv6/conf/all/accept_ra", "0"),
    ("net/ipv6/conf/default/accept_ra", "0"),
];

const NODE_SYSCTLS: &[(&str, &str)] = &[
    ("net/ipv4/ip_forward", "1"),
    ("net/ipv6/conf/all/forwarding", "1"),
    ("net/ipv4/conf/all/send_redirects", "0"),
    ("net/ipv4/conf/default/send_redirects", "0"),
];

/// The link type of `node0`: `dummy` where the kernel has it, else `ifb` (also a local-only
/// device that is up with a carrier; this test kernel has no CONFIG_DUMMY).
static NODE0_KIND: OnceLock<&'static str> = OnceLock::new();

impl Node {
    pub fn new(spec: NodeSpec) -> Result<Node> {
        Node::build(spec, Placement::Alone)
    }

    /// Node `index` of a cluster ([`crate::multinode`]): pods in 10.244.`index`.0/24 and
    /// fd00:244:0:`index`::/64, and no `node0`: its own addresses `ips` are the caller's to put
    /// on the uplink it adds.
    pub fn new_member(spec: NodeSpec, index: u8, ips: (Ipv4Addr, Ipv6Addr)) -> Result<Node> {
        Node::build(spec, Placement::Member { index, ips })
    }

    fn build(spec: NodeSpec, placement: Placement) -> Result<Node> {
        let k = match placement {
            Placement::Alone => 0,
            Placement::Member { index, .. } => index,
        };
        if spec.pods.len() > MAX_PODS {
            bail!("at most {MAX_PODS} pods per node");
        }
        remove_stale_namespaces();
        let prefix = format!(
            "pal-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let node_ns = format!("{prefix}-node");
        let pods: Vec<Pod> = spec
            .pods
            .iter()
            .enumerate()
            .map(|(i, p)| Pod {
                name: p.name.clone(),
                index: i,
                netns_name: format!("{prefix}-{i}-{}", sanitize(&p.name))
                    .trim_end_matches('-')
                    .to_string(),
                ipv4: pod_ipv4_on(k, i),
                ipv6: spec.ipv6.then(|| pod_ipv6_on(k, i)),
                host_ifname: format!("lxc{i}"),
                host_ifindex: 0,
            })
            .collect();
        let mut node = Node {
            netns_name: node_ns.clone(),
            ipv6: spec.ipv6,
            placement,
            pods,
            created: Vec::new(),
            servers: Servers::default(),
            children: Mutex::new(Vec::new()),
        };
        // From here on, dropping `node` (on any error) deletes what was created.
        let node_sysctls: Vec<(&str, &str)> =
            COMMON_SYSCTLS.iter().chain(NODE_SYSCTLS).copied().collect();
        let mut wanted: Vec<(String, &[(&str, &str)])> = vec![(node_ns.clone(), &node_sysctls)];
        wanted.extend(
            node.pods
                .iter()
                .map(|p| (p.netns_name.clone(), COMMON_SYSCTLS)),
        );
        let results: Vec<(String, Result<()>)> = std::thread::scope(|s| {
            let handles: Vec<_> = wanted
                .iter()
                .map(|(name, sysctls)| (name, s.spawn(move || netns::create(name, sysctls))))
                .collect();
            handles
                .into_iter()
                .map(|(name, h)| {
                    (
                        name.clone(),
                        h.join()
                            .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked"))),
                    )
                })
                .collect()
        });
        let mut first_error = None;
        for (name, r) in results {
            match r {
                Ok(()) => node.created.push(name),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        node.wire()?;
        Ok(node)
    }

    fn wire(&mut self) -> Result<()> {
        let node_ns = self.netns_name.clone();
        let mut cmds = vec!["link set lo up".to_string()];
        if self.placement == Placement::Alone {
            cmds.extend(self.node0()?);
        }
        let gateway = gateway_v4_on(self.index());
        for p in &self.pods {
            let host = &p.host_ifname;
            cmds.extend([
                format!(
                    "link add {host} type veth peer name eth0 netns {}",
                    p.netns_name
                ),
                format!("link set {host} up"),
                format!("addr add {gateway}/32 dev {host}"),
                format!("route add {}/32 dev {host}", p.ipv4),
            ]);
            if let Some(v6) = p.ipv6 {
                cmds.extend([
                    format!("addr add {GATEWAY_V6}/64 dev {host} nodad"),
                    format!("route add {v6}/128 dev {host}"),
                ]);
            }
        }
        netns::ip_batch(Some(&node_ns), &cmds).context("wiring the node namespace")?;

        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = self
                .pods
                .iter()
                .map(|p| {
                    let mut cmds = vec![
                        "link set lo up".to_string(),
                        "link set eth0 up".into(),
                        format!("addr add {}/32 dev eth0", p.ipv4),
                        format!("route add {gateway}/32 dev eth0 scope link"),
                        format!("route add 0.0.0.0/0 via {gateway} dev eth0"),
                    ];
                    if let Some(v6) = p.ipv6 {
                        cmds.extend([
                            format!("addr add {v6}/128 dev eth0 nodad"),
                            format!("route add ::/0 via {GATEWAY_V6} dev eth0"),
                        ]);
                    }
                    s.spawn(move || netns::ip_batch(Some(&p.netns_name), &cmds))
                })
                .collect();
            for h in handles {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("panicked")))?;
            }
            Ok(())
        })
        .context("wiring the pod namespaces")?;

        let names: Vec<String> = self.pods.iter().map(|p| p.host_ifname.clone()).collect();
        let indexes = in_netns(&node_ns, || -> Result<Vec<u32>> {
            names
                .iter()
                .map(|n| {
                    nix::net::if_::if_nametoindex(n.as_str())
                        .with_context(|| format!("ifindex of {n}"))
                })
                .collect()
        })??;
        for (p, idx) in self.pods.iter_mut().zip(indexes) {
            p.host_ifindex = idx;
        }
        Ok(())
    }

    /// The `ip` commands that give a lone node `node0` with its addresses.
    fn node0(&self) -> Result<Vec<String>> {
        let node_ns = self.netns_name.clone();
        let (kind, node0_exists) = match NODE0_KIND.get() {
            Some(k) => (*k, false),
            None => {
                let kind = if netns::ip_batch(Some(&node_ns), &["link add node0 type dummy".into()])
                    .is_ok()
                {
                    "dummy"
                } else {
                    netns::ip_batch(Some(&node_ns), &["link add node0 type ifb".into()])
                        .context("creating node0 (neither dummy nor ifb links are available)")?;
                    "ifb"
                };
                (*NODE0_KIND.get_or_init(|| kind), true)
            }
        };
        let mut cmds = Vec::new();
        if !node0_exists {
            cmds.push(format!("link add node0 type {kind}"));
        }
        cmds.extend([
            "link set node0 up".to_string(),
            format!("addr add {NODE_IP_V4}/32 dev node0"),
            format!("addr add {NODE_IP_V6}/128 dev node0 nodad"),
        ]);
        Ok(cmds)
    }

    /// This node's index in its cluster (0 for a lone node).
    pub fn index(&self) -> u8 {
        match self.placement {
            Placement::Alone => 0,
            Placement::Member { index, .. } => index,
        }
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    pub fn ipv6(&self) -> bool {
        self.ipv6
    }

    pub fn netns_path(&self) -> PathBuf {
        netns::netns_path(&self.netns_name)
    }

    /// The node namespace and every pod namespace.
    pub fn netns_names(&self) -> Vec<String> {
        std::iter::once(self.netns_name.clone())
            .chain(self.pods.iter().map(|p| p.netns_name.clone()))
            .collect()
    }

    /// The node's own addresses (on `node0`): IPv4, and IPv6 if the node has IPv6. (`node0`
    /// carries fd00:243::1 either way.)
    pub fn node_ips(&self) -> Vec<IpAddr> {
        let mut v = vec![self.node_ip(false)];
        if self.ipv6 {
            v.push(self.node_ip(true));
        }
        v
    }

    /// The node's own IPv4 or IPv6 address (a cluster member's: on its uplink).
    pub fn node_ip(&self, ipv6: bool) -> IpAddr {
        let (v4, v6) = match self.placement {
            Placement::Alone => (NODE_IP_V4, NODE_IP_V6),
            Placement::Member { ips, .. } => ips,
        };
        if ipv6 { IpAddr::V6(v6) } else { IpAddr::V4(v4) }
    }

    /// A command whose process runs in the node's network namespace (same mount namespace as
    /// the caller, so bpffs paths stay valid).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        command_in(&self.netns_name, program)
    }

    /// Runs `f` on a thread inside the node's network namespace.
    pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(&self, f: F) -> Result<T> {
        in_netns(&self.netns_name, f)
    }

    /// Spawns `cmd` (from [`Node::command`] or [`Pod::command`], say) in a process group of its
    /// own. The child and its group are killed when the guard or this node is dropped.
    pub fn spawn(&self, mut cmd: Command) -> Result<ChildGuard> {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
        let pid = child.id();
        let child = Arc::new(Mutex::new(Some(child)));
        let mut children = self.children.lock().expect("lock");
        children.retain(|c| c.lock().map(|c| c.is_some()).unwrap_or(false));
        children.push(child.clone());
        Ok(ChildGuard { child, pid })
    }

    /// Starts servers for every (port, protocol) in every pod (see [`crate::server`]): TCP and
    /// UDP echo, SCTP answers INIT with INIT-ACK. They listen when this returns and stop when
    /// the node is dropped. May be called again with other ports.
    pub fn serve(&self, ports: &[(u16, Proto)]) -> Result<()> {
        for p in &self.pods {
            self.servers
                .serve(&p.netns_name, ports, self.ipv6)
                .with_context(|| format!("servers of pod {}", p.name))?;
        }
        Ok(())
    }

    /// Starts servers for every (port, protocol) in one pod only (see [`Node::serve`]).
    pub fn serve_pod(&self, pod: &Pod, ports: &[(u16, Proto)]) -> Result<()> {
        self.servers
            .serve(&pod.netns_name, ports, self.ipv6)
            .with_context(|| format!("servers of pod {}", pod.name))
    }

    /// Starts servers for every (port, protocol) in the node's own namespace, bound to the
    /// node's addresses ([`Node::node_ips`]), as a host-networked pod serves: probes to a node
    /// address get their answers from that address. They stop when the node is dropped.
    pub fn serve_host(&self, ports: &[(u16, Proto)]) -> Result<()> {
        self.servers
            .serve_at(&self.netns_name, ports, &Bind::Addrs(self.node_ips()))
            .context("host-network servers of the node")
    }

    /// One probe from `from` (see [`probe`]).
    pub fn probe(
        &self,
        from: &Pod,
        to: IpAddr,
        port: u16,
        proto: Proto,
        timeout: Duration,
    ) -> bool {
        probe(from, to, port, proto, timeout)
    }

    /// One probe from the node's namespace (host-network traffic).
    pub fn probe_from_node(&self, to: IpAddr, port: u16, proto: Proto, timeout: Duration) -> bool {
        probe_from_netns(&self.netns_name, to, port, proto, timeout)
    }

    /// Every probe at once (see [`probe_many`]).
    pub fn probe_many(&self, specs: &[ProbeSpec<'_>]) -> Vec<bool> {
        probe_many(specs)
    }

    /// Every probe at once, with what each saw (see [`probe_outcomes`]).
    pub fn probe_outcomes(&self, specs: &[ProbeSpec<'_>]) -> Vec<Outcome> {
        probe_outcomes(specs)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.servers.stop();
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(|e| e.into_inner()));
        for c in children {
            kill_child(&c);
        }
        for name in self.created.iter().rev() {
            if let Err(e) = netns::delete(name) {
                eprintln!("rig: deleting netns {name}: {e:#}");
            }
        }
    }
}
