//! Throughput and latency between two pods of the netns rig, under five regimes:
//!
//! * `baseline`: nothing enforces;
//! * `palisade`: the agent (release build), the server pod isolated for ingress and the client
//!   pod for egress, each by one policy of N ipBlock rules (N - 1 random /24s, the peer's /32
//!   last), ports TCP 5201 and 7000, UDP 5201;
//! * `ipset`: what kube-router does: in the node's FORWARD chain, conntrack
//!   `RELATED,ESTABLISHED -j ACCEPT` first, then per pod a chain that checks the ports and
//!   matches the peer against a `hash:net` ipset of the same N CIDRs;
//! * `iptables`: the same chains with the ipset replaced by N `-s/-d CIDR -j RETURN` rules, the
//!   matching one last (a linear chain);
//! * `nftables`: the ipset scheme written natively in nftables (a table of its own, see
//!   [`nft_rules`]): `ct state established,related accept` in a forward-hook chain, then per
//!   pod a chain whose one allow rule checks the ports and the peer against an interval set
//!   (`flags interval`) of the same N CIDRs, then `drop`.
//!
//! For each number of rules the five variants get a node each (so no conntrack or nftables
//! state leaks from one to another), checked to enforce before anything is measured: a
//! connection to a port no rule allows must time out (with no enforcement it is refused at
//! once). The agent is stopped once it has enforced (its pinned programs and maps go on
//! enforcing). Then every cycle measures each variant once, in a rotating order, so that the
//! machine's changing load hits the variants alike; ratios to the baseline are per cycle.
//!
//! Figures: iperf3 TCP (one stream, Gbit/s received), iperf3 UDP with 64-byte payloads
//! (datagrams per second received), TCP request/response of one byte on one connection (mean
//! round trip, µs) and with one connection per request (`crr_us`, every request a new flow);
//! both ends spin on their sockets (a virtual CPU waking from idle takes tens of µs).
//! The receiving side runs on CPU 0, the sending side (and with it the veth's softirq work:
//! routing, BPF programs, iptables or nftables) on CPU 1.
use std::{
    fmt::Write as _,
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd, RawFd},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use palisade_tests::{
    agent::AgentProcess,
    netns,
    rig::{Node, NodeSpec, PodSpec},
    server::wait_readable_any,
};
use serde_json::{Value, json};

use crate::{
    packet::{num_cpus, pin_to_cpu, random_v4_blocks},
    stats::{Figure, set},
};

pub const VARIANTS: [&str; 5] = ["baseline", "palisade", "ipset", "iptables", "nftables"];
pub const METRICS: [&str; 4] = ["tcp_gbps", "udp_pps", "rr_us", "crr_us"];
const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 7000;
/// Allowed by no rule: the enforcement check.
const CLOSED_PORT: u16 = 7001;

pub struct Config {
    pub repeats: usize,
    pub rules: Vec<usize>,
    pub tcp_secs: u32,
    pub udp_secs: u32,
    pub rr_secs: f64,
}

fn rx_cpu() -> usize {
    0
}

fn tx_cpu() -> usize {
    1.min(num_cpus() - 1)
}

/// The CIDRs of one side's rules: `n - 1` random /24s, then the peer's /32.
fn cidrs(n: usize, peer: Ipv4Addr, seed: u64) -> Vec<String> {
    let mut v: Vec<String> = random_v4_blocks(n.saturating_sub(1), seed)
        .into_iter()
        .map(|b| b.to_string())
        .collect();
    v.push(format!("{peer}/32"));
    v
}

fn manifests(dir: &Path, n: usize, client: Ipv4Addr, server: Ipv4Addr) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut y = String::new();
    y.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n");
    for (name, ip) in [("client", client), ("server", server)] {
        writeln!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench, labels: {{app: {name}}}}}\n\
             spec: {{containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}"
        )?;
    }
    let ports = "ports: [{port: 5201}, {port: 5201, protocol: UDP}, {port: 7000}]";
    for (name, app, kind, list, peer, seed) in [
        ("server-ingress", "server", "Ingress", "from", client, 11),
        ("client-egress", "client", "Egress", "to", server, 12),
    ] {
        writeln!(
            y,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {{name: {name}, namespace: bench}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: {app}}}}}\n  policyTypes: [{kind}]\n  {}:",
            kind.to_lowercase()
        )?;
        for c in cidrs(n, peer, seed) {
            writeln!(y, "  - {list}: [{{ipBlock: {{cidr: {c}}}}}]\n    {ports}")?;
        }
    }
    std::fs::write(dir.join("bench.yaml"), y)?;
    Ok(())
}

/// `iptables-restore` input (and `ipset restore` input for the ipset variant).
fn iptables_rules(n: usize, client: Ipv4Addr, server: Ipv4Addr, ipset: bool) -> (String, String) {
    let mut sets = String::new();
    let mut t = String::from("*filter\n");
    let sides = [
        ("PAL-EG-CLIENT", "-s", client, "-d", server, "dst", 12),
        ("PAL-IN-SERVER", "-d", server, "-s", client, "src", 11),
    ];
    for (chain, _, _, _, _, _, _) in &sides {
        t.push_str(&format!(":{chain} - [0:0]\n:{chain}-PEERS - [0:0]\n"));
    }
    t.push_str("-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    for (chain, own_flag, own, peer_flag, peer, set_dir, seed) in sides {
        t.push_str(&format!("-A FORWARD {own_flag} {own}/32 -j {chain}\n"));
        t.push_str(&format!(
            "-A {chain} -p tcp -m multiport --dports {IPERF_PORT},{RR_PORT} -g {chain}-PEERS\n\
             -A {chain} -p udp --dport {IPERF_PORT} -g {chain}-PEERS\n-A {chain} -j DROP\n"
        ));
        let list = cidrs(n, peer, seed);
        if ipset {
            sets.push_str(&format!(
                "create {chain} hash:net family inet hashsize 4096 maxelem 262144\n"
            ));
            for c in &list {
                sets.push_str(&format!("add {chain} {c}\n"));
            }
            t.push_str(&format!(
                "-A {chain}-PEERS -m set --match-set {chain} {set_dir} -j RETURN\n"
            ));
        } else {
            for c in &list {
                t.push_str(&format!("-A {chain}-PEERS {peer_flag} {c} -j RETURN\n"));
            }
        }
        t.push_str(&format!("-A {chain}-PEERS -j DROP\n"));
    }
    t.push_str("COMMIT\n");
    (t, sets)
}

/// The table of the `nftables` variant, in the node's namespace.
const NFT_TABLE: &str = "inet palisade_bench";

/// `nft -f` input of the `nftables` variant: the `ipset` variant's semantics in native
/// nftables, in one script (sets and their elements included, so that 100 000 CIDRs load in
/// about a second). A base chain in the forward hook accepts established and related packets,
/// then sends the client's packets to its egress chain and the server's to its ingress chain;
/// each has one allow rule (ports TCP 5201 and 7000, UDP 5201, and the peer in an interval set
/// of [`cidrs`], the same N CIDRs as the ipset, the peer's /32 last) and then drops.
fn nft_rules(n: usize, client: Ipv4Addr, server: Ipv4Addr) -> String {
    let mut t = format!("table {NFT_TABLE} {{\n");
    for (chain, peer_field, peer, seed) in [
        ("client_egress", "daddr", server, 12),
        ("server_ingress", "saddr", client, 11),
    ] {
        let _ = write!(
            t,
            "\tset {chain}_peers {{\n\t\ttype ipv4_addr; flags interval;\n\t\telements = {{ {} }}\n\t}}\n\
             \tchain {chain} {{\n\
             \t\tmeta l4proto . th dport {{ tcp . {IPERF_PORT}, tcp . {RR_PORT}, udp . {IPERF_PORT} }} \
             ip {peer_field} @{chain}_peers return\n\t\tdrop\n\t}}\n",
            cidrs(n, peer, seed).join(", ")
        );
    }
    let _ = write!(
        t,
        "\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tct state established,related accept\n\
         \t\tip saddr {client} jump client_egress\n\t\tip daddr {server} jump server_ingress\n\t}}\n}}\n"
    );
    t
}

fn run_with_stdin(mut cmd: Command, input: &str, what: &str) -> Result<()> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A one-byte echo server on a pinned thread in a pod's namespace. A request byte `c` is
/// answered and the connection closed by the server (connection-per-request); any other byte
/// is echoed, until the client closes.
struct RrServer {
    stop: Arc<AtomicBool>,
    netns: String,
    addr: SocketAddr,
    handle: Option<JoinHandle<()>>,
}

impl RrServer {
    fn start(netns_name: &str, addr: SocketAddr) -> Result<RrServer> {
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel();
        let ns = netns_name.to_string();
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("rr-server".into())
            .spawn(move || {
                let listener = netns::enter(&ns)
                    .map_err(anyhow::Error::from)
                    .and_then(|_| Ok(TcpListener::bind(("0.0.0.0", addr.port()))?));
                pin_to_cpu(rx_cpu());
                let listener = match listener {
                    Ok(l) => {
                        let _ = tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                if listener.set_nonblocking(true).is_err() {
                    return;
                }
                while !flag.load(Ordering::SeqCst) {
                    let mut s = match listener.accept() {
                        Ok((s, _)) => s,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            let _ = hot_wait(listener.as_raw_fd(), &flag);
                            continue;
                        }
                        Err(_) => continue,
                    };
                    let _ = s.set_nodelay(true);
                    let _ = s.set_nonblocking(true);
                    let mut b = [0u8; 1];
                    loop {
                        match s.read(&mut b) {
                            Ok(1) => {
                                if write_byte(&mut s, b[0], &flag).is_err() || b[0] == b'c' {
                                    break;
                                }
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                                if !hot_wait(s.as_raw_fd(), &flag) {
                                    break;
                                }
                            }
                            _ => break,
                        }
                    }
                }
            })?;
        rx.recv().context("rr server thread")??;
        Ok(RrServer {
            stop,
            netns: netns_name.to_string(),
            addr,
            handle: Some(handle),
        })
    }
}

impl Drop for RrServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let addr = SocketAddr::new([127, 0, 0, 1].into(), self.addr.port());
        let _ = netns::in_netns(&self.netns, || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1))
        });
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Waits for `fd` to become readable: spinning for the first 200 µs, then in poll(2). Both
/// ends of a request/response test spin, so that what is timed is the network path and not a
/// virtual CPU waking from idle (tens of µs on this kind of machine); an idle server sleeps.
/// False once `stop` is set.
fn hot_wait(fd: RawFd, stop: &AtomicBool) -> bool {
    let spin_until = Instant::now() + Duration::from_micros(200);
    while Instant::now() < spin_until {
        if wait_readable_any(&[fd], Duration::ZERO).is_ok_and(|r| r[0]) {
            return true;
        }
        std::hint::spin_loop();
    }
    while !stop.load(Ordering::Relaxed) {
        if wait_readable_any(&[fd], Duration::from_millis(20)).is_ok_and(|r| r[0]) {
            return true;
        }
    }
    false
}

/// Writes one byte on a non-blocking socket.
fn write_byte(s: &mut TcpStream, b: u8, stop: &AtomicBool) -> std::io::Result<()> {
    loop {
        match s.write(&[b]) {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(ErrorKind::WriteZero.into()),
            Err(e) if e.kind() == ErrorKind::WouldBlock && !stop.load(Ordering::Relaxed) => {
                std::hint::spin_loop()
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads exactly one byte (`Ok(false)` at end of stream) from a non-blocking socket, spinning.
fn read_byte(s: &mut TcpStream, deadline: Instant) -> Result<bool> {
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    bail!("request/response: no answer");
                }
                std::hint::spin_loop();
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Mean µs per transaction for `secs` of one-byte request/response, on one connection or
/// (`per_connection`) with a new connection per request. The client spins on its reads.
fn request_response(
    client_ns: &str,
    to: SocketAddr,
    secs: f64,
    per_connection: bool,
) -> Result<f64> {
    netns::in_netns(client_ns, || -> Result<f64> {
        pin_to_cpu(tx_cpu());
        let timeout = Duration::from_secs(3);
        let connect = || -> Result<TcpStream> {
            let s = TcpStream::connect_timeout(&to, timeout)?;
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            Ok(s)
        };
        let never = AtomicBool::new(false);
        let mut count = 0u64;
        let started = Instant::now();
        if per_connection {
            while started.elapsed().as_secs_f64() < secs {
                let mut s = connect()?;
                write_byte(&mut s, b'c', &never)?;
                let deadline = Instant::now() + timeout;
                if !read_byte(&mut s, deadline)? {
                    bail!("request/response: connection closed early");
                }
                // The server closes first (its side keeps the TIME_WAIT).
                let _ = read_byte(&mut s, deadline);
                count += 1;
            }
        } else {
            let mut s = connect()?;
            while started.elapsed().as_secs_f64() < secs {
                write_byte(&mut s, b'r', &never)?;
                if !read_byte(&mut s, Instant::now() + timeout)? {
                    bail!("request/response: connection closed early");
                }
                count += 1;
            }
        }
        Ok(started.elapsed().as_secs_f64() * 1e6 / count.max(1) as f64)
    })?
}

fn iperf(client: &palisade_tests::Pod, server: Ipv4Addr, args: &[String]) -> Result<Value> {
    let out = client
        .command("taskset")
        .args(["-c", &tx_cpu().to_string(), "iperf3", "-c"])
        .arg(server.to_string())
        .args([
            "-p",
            &IPERF_PORT.to_string(),
            "-J",
            "--connect-timeout",
            "3000",
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running iperf3 (install it: apt-get install iperf3)")?;
    let v: Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 output: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(e) = v.get("error") {
        bail!("iperf3: {e}");
    }
    Ok(v)
}

/// Waits until a TCP port listens in the namespace (its /proc/net/tcp lists it).
fn wait_listening(netns_name: &str, port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let needle = format!(":{port:04X}");
    loop {
        // iperf3 listens dual-stack (tcp6), the RR server on IPv4.
        let found = netns::in_netns(netns_name, || {
            ["tcp", "tcp6"].iter().any(|f| {
                std::fs::read_to_string(format!("/proc/thread-self/net/{f}")).is_ok_and(|t| {
                    t.lines().any(|l| {
                        let f: Vec<&str> = l.split_whitespace().collect();
                        f.len() > 3 && f[1].ends_with(&needle) && f[3] == "0A"
                    })
                })
            })
        })?;
        if found {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} in {netns_name}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Is the closed port refused (no enforcement) or silently dropped (enforcement)?
fn closed_port_dropped(client_ns: &str, server: Ipv4Addr) -> Result<bool> {
    let to = SocketAddr::new(server.into(), CLOSED_PORT);
    netns::in_netns(client_ns, || {
        match TcpStream::connect_timeout(&to, Duration::from_millis(700)) {
            Ok(_) => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(false),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Ok(true),
            Err(e) => bail!("connecting to the closed port: {e}"),
        }
    })?
}

/// One variant, set up on its own node and checked: it stays up while the cycles run.
struct Setup {
    rr: Option<RrServer>,
    /// Stopped once it has enforced: the pinned programs and maps go on enforcing, so the
    /// figures are the datapath's (as the iptables variants' are the kernel's), not the agent's
    /// background work. Kept for its bpffs mount (the pins).
    agent: Option<AgentProcess>,
    _iperf: palisade_tests::ChildGuard,
    client: palisade_tests::Pod,
    server: Ipv4Addr,
    /// The `nftables` variant: its table is deleted on drop.
    nft_table: bool,
    node: Node,
}

impl Drop for Setup {
    fn drop(&mut self) {
        // The server thread lives in the node's namespaces: stop it before they go.
        self.rr.take();
        self.agent.take();
        // The ipset and iptables state goes with the node's namespace; the nftables table is
        // deleted explicitly (it would go the same way).
        if self.nft_table {
            let _ = self
                .node
                .command("nft")
                .args(["delete", "table"])
                .args(NFT_TABLE.split(' '))
                .output();
        }
    }
}

fn setup(variant: &str, rules: usize, agent_bin: &Path, work: &Path) -> Result<Setup> {
    let node = Node::new(NodeSpec {
        pods: vec![
            PodSpec {
                name: "client".into(),
            },
            PodSpec {
                name: "server".into(),
            },
        ],
        ipv6: false,
    })?;
    let client = node.pods()[0].clone();
    let server = node.pods()[1].clone();
    let mut iperf_server = server.command("taskset");
    iperf_server
        .args(["-c", &rx_cpu().to_string(), "iperf3", "-s", "-p"])
        .arg(IPERF_PORT.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let iperf = node.spawn(iperf_server)?;
    let rr = RrServer::start(
        &server.netns_name,
        SocketAddr::new(server.ipv4.into(), RR_PORT),
    )?;
    wait_listening(&server.netns_name, IPERF_PORT)?;

    let mut agent = None;
    match variant {
        "baseline" => {}
        "palisade" => {
            let dir = work.join(format!("palisade-{rules}"));
            let _ = std::fs::remove_dir_all(&dir);
            manifests(&dir.join("manifests"), rules, client.ipv4, server.ipv4)?;
            let since = SystemTime::now();
            let mut a = AgentProcess::start(&node, agent_bin, &dir.join("manifests"), &dir)?;
            a.wait_reconciled(since, 2, Duration::from_secs(180))?;
            a.stop();
            agent = Some(a);
        }
        "ipset" | "iptables" => {
            let (rules_text, sets) =
                iptables_rules(rules, client.ipv4, server.ipv4, variant == "ipset");
            if !sets.is_empty() {
                let mut c = node.command("ipset");
                c.arg("restore");
                run_with_stdin(c, &sets, "ipset restore")?;
            }
            let mut c = node.command("iptables-restore");
            c.arg("--noflush");
            run_with_stdin(c, &rules_text, "iptables-restore")?;
        }
        "nftables" => {
            let mut c = node.command("nft");
            c.args(["-f", "-"]);
            run_with_stdin(
                c,
                &nft_rules(rules, client.ipv4, server.ipv4),
                "nft -f (install it: apt-get install nftables)",
            )?;
        }
        other => bail!("unknown variant {other}"),
    }
    let enforced = closed_port_dropped(&client.netns_name, server.ipv4)?;
    if enforced != (variant != "baseline") {
        bail!(
            "{variant} with {rules} rules: enforcement check failed (closed port dropped: {enforced})"
        );
    }
    Ok(Setup {
        rr: Some(rr),
        agent,
        _iperf: iperf,
        client,
        server: server.ipv4,
        nft_table: variant == "nftables",
        node,
    })
}

/// Every metric once on a set-up variant.
fn measure(cfg: &Config, s: &Setup) -> Result<[f64; 4]> {
    let _ = &s.node;
    let tcp = iperf(
        &s.client,
        s.server,
        &["-t".into(), cfg.tcp_secs.to_string()],
    )?;
    let tcp_gbps = tcp
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("iperf3 TCP: no end.sum_received.bits_per_second")?
        / 1e9;
    let udp = iperf(
        &s.client,
        s.server,
        &[
            "-u".into(),
            "-b".into(),
            "0".into(),
            "-l".into(),
            "64".into(),
            "-t".into(),
            cfg.udp_secs.to_string(),
        ],
    )?;
    let udp_pps = udp_received_pps(&udp)?;
    let to = SocketAddr::new(s.server.into(), RR_PORT);
    let rr_us = request_response(&s.client.netns_name, to, cfg.rr_secs, false)?;
    let crr_us = request_response(&s.client.netns_name, to, cfg.rr_secs, true)?;
    Ok([tcp_gbps, udp_pps, rr_us, crr_us])
}

/// Datagrams per second that reached the server (sent minus lost, over the test's time).
fn udp_received_pps(v: &Value) -> Result<f64> {
    let pick = |path: &str| v.pointer(path).and_then(Value::as_f64);
    for sum in ["/end/sum_received", "/end/sum"] {
        if let (Some(packets), Some(lost), Some(secs)) = (
            pick(&format!("{sum}/packets")),
            pick(&format!("{sum}/lost_packets")),
            pick(&format!("{sum}/seconds")),
        ) && secs > 0.0
            && packets > 0.0
        {
            return Ok((packets - lost) / secs);
        }
    }
    bail!("iperf3 UDP: no packet counts in its output")
}

pub fn loadavg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

pub fn run(cfg: &Config, agent_bin: &Path, work: &Path, report: &mut Value) -> Result<()> {
    let started = Instant::now();
    let work: PathBuf = work.join("throughput");
    std::fs::create_dir_all(&work)?;
    // figures[metric][variant][rules index], and per-cycle ratios to that cycle's baseline.
    let nr = cfg.rules.len();
    let mut figs = vec![vec![vec![Figure::default(); nr]; VARIANTS.len()]; METRICS.len()];
    let mut ratios = vec![vec![vec![Figure::default(); nr]; VARIANTS.len()]; METRICS.len()];
    let mut log = Vec::new();
    for (ri, &rules) in cfg.rules.iter().enumerate() {
        // All the variants stay up side by side; each cycle measures each of them once, so
        // a change of the machine's load hits them alike.
        let t = Instant::now();
        let setups: Vec<Setup> = VARIANTS
            .iter()
            .map(|v| {
                setup(v, rules, agent_bin, &work)
                    .with_context(|| format!("throughput: setting up {v} with {rules} rules"))
            })
            .collect::<Result<_>>()?;
        eprintln!(
            "bench: throughput with {rules} rules: {} nodes set up and checked in {:.0} s",
            VARIANTS.len(),
            t.elapsed().as_secs_f64()
        );
        for cycle in 0..cfg.repeats {
            let mut this_cycle = [[f64::NAN; METRICS.len()]; VARIANTS.len()];
            // Rotate the order every cycle.
            for k in 0..VARIANTS.len() {
                let vi = (k + cycle + ri) % VARIANTS.len();
                let variant = VARIANTS[vi];
                let load = loadavg();
                let m = measure(cfg, &setups[vi])
                    .with_context(|| format!("throughput: {variant}, {rules} rules"))?;
                eprintln!(
                    "bench: cycle {cycle} {variant:>8} {rules:>5} rules: TCP {:.2} Gbit/s, UDP {:.0} pps, RR {:.1} µs, CRR {:.1} µs (load {load:.2})",
                    m[0], m[1], m[2], m[3]
                );
                log.push(json!({"cycle": cycle, "variant": variant, "rules": rules,
                    "tcp_gbps": m[0], "udp_pps": m[1], "rr_us": m[2], "crr_us": m[3], "loadavg_1m": load}));
                this_cycle[vi] = m;
                for (mi, v) in m.iter().enumerate() {
                    figs[mi][vi][ri].push(*v);
                }
            }
            for mi in 0..METRICS.len() {
                let base = this_cycle[0][mi];
                for vi in 0..VARIANTS.len() {
                    ratios[mi][vi][ri].push(this_cycle[vi][mi] / base);
                }
            }
        }
        drop(setups);
    }
    for (mi, metric) in METRICS.iter().enumerate() {
        for (vi, variant) in VARIANTS.iter().enumerate() {
            for (ri, rules) in cfg.rules.iter().enumerate() {
                set(
                    report,
                    &format!("throughput.{metric}.{variant}.{rules}"),
                    figs[mi][vi][ri].json(),
                );
                set(
                    report,
                    &format!("throughput_ratio.{metric}.{variant}.{rules}"),
                    ratios[mi][vi][ri].json(),
                );
            }
        }
    }
    set(report, "throughput_log", Value::Array(log));
    set(
        report,
        "sections.throughput_s",
        json!(crate::stats::round(started.elapsed().as_secs_f64())),
    );
    Ok(())
}
