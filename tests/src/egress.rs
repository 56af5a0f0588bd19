//! The outside world of the multi-node rig, for egress gateways (`tests/tests/egress_gateway.rs`,
//! the demo): a namespace of its own on the fabric's bridge owning documentation ranges, whose
//! servers record the source address of every connection, and the nodes' routes to it.
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{multinode::Cluster, netns, rig::Pod};

/// The external namespace's addresses on the fabric (the nodes' next hop to it).
pub const EXT_V4: &str = "10.243.0.250";
pub const EXT_V6: &str = "fd00:243::fa";

/// One connection the external server accepted: (when, local address, local port, source).
pub type Seen = (Instant, IpAddr, u16, IpAddr);

/// The outside world: a namespace on the fabric's bridge owning `ranges` (as local routes),
/// accepting TCP on `ports` (echoing one byte), recording every connection's source.
pub struct External {
    pub name: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for External {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = netns::delete(&self.name);
    }
}

impl External {
    pub fn start(c: &Cluster, ranges: &[&str], ports: &[u16]) -> Result<External> {
        let name = format!("pal-{}-egw-ext", std::process::id());
        netns::create(
            &name,
            &[
                ("net/ipv6/conf/all/accept_dad", "0"),
                ("net/ipv6/conf/default/accept_dad", "0"),
            ],
        )
        .context("the external namespace")?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        // Dropped (and the namespace deleted) on any error from here on.
        let mut ext = External {
            name: name.clone(),
            seen: seen.clone(),
            stop: stop.clone(),
            threads: Vec::new(),
        };
        let fabric = c.fabric().to_string();
        let mut cmds = vec![
            "link set lo up".to_string(),
            format!("link add e0 type veth peer name xt netns {fabric}"),
            "link set e0 up".into(),
            format!("addr add {EXT_V4}/24 dev e0"),
            format!("addr add {EXT_V6}/64 dev e0 nodad"),
        ];
        cmds.extend(ranges.iter().map(|r| format!("route add local {r} dev lo")));
        netns::ip_batch(Some(&name), &cmds).context("the external namespace's link")?;
        netns::ip_batch(
            Some(&fabric),
            &["link set xt master br0".into(), "link set xt up".into()],
        )
        .context("the external namespace's fabric port")?;
        for &port in ports {
            let (seen, stop, ns) = (seen.clone(), stop.clone(), name.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            ext.threads.push(std::thread::spawn(move || {
                let l = netns::enter(&ns).and_then(|()| {
                    let l = TcpListener::bind(SocketAddr::from((
                        std::net::Ipv6Addr::UNSPECIFIED,
                        port,
                    )))?;
                    l.set_nonblocking(true)?;
                    Ok(l)
                });
                let l = match l {
                    Ok(l) => {
                        let _ = tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((mut s, peer)) => {
                            let local = s.local_addr().map(|a| a.ip().to_canonical());
                            seen.lock().expect("seen").push((
                                Instant::now(),
                                local.unwrap_or(IpAddr::from([0, 0, 0, 0])),
                                port,
                                peer.ip().to_canonical(),
                            ));
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
                            let mut b = [0u8; 1];
                            if s.read(&mut b).is_ok_and(|n| n == 1) {
                                let _ = s.write_all(&b);
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            }));
            rx.recv()
                .context("the server thread")?
                .with_context(|| format!("listening on port {port}"))?;
        }
        Ok(ext)
    }

    /// Connections accepted since `t`.
    pub fn seen_since(&self, t: Instant) -> Vec<Seen> {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.0 >= t)
            .copied()
            .collect()
    }
}

/// A short TCP exchange from `pod` to `dst:port` (one byte, echoed): whether it completed.
pub fn exchange(pod: &Pod, dst: IpAddr, port: u16, timeout: Duration) -> bool {
    let addr = SocketAddr::new(dst, port);
    pod.in_netns(move || -> bool {
        let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(timeout));
        let mut b = [7u8; 1];
        s.write_all(&b).is_ok() && s.read(&mut b).is_ok_and(|n| n == 1)
    })
    .unwrap_or(false)
}

/// Every node of `c` routes `ranges` to the external namespace, and masquerades its pods'
/// traffic there to its own address (as a cloud NAT would; priority srcnat, after an egress
/// gateway's table).
pub fn outside_routes(c: &Cluster, ranges: &[&str]) -> Result<()> {
    for node in c.nodes() {
        let cmds: Vec<String> = ranges
            .iter()
            .map(|r| {
                let via = if r.contains(':') { EXT_V6 } else { EXT_V4 };
                format!("route add {r} via {via} dev up0")
            })
            .collect();
        netns::ip_batch(Some(&node.netns_name), &cmds).context("routes to the outside")?;
        let rules: String = ranges
            .iter()
            .map(|r| {
                let fam = if r.contains(':') { "ip6" } else { "ip" };
                format!("  oifname \"up0\" {fam} daddr {r} masquerade\n")
            })
            .collect();
        let nat = format!(
            "table inet rig_nat {{\n chain post {{\n  type nat hook postrouting priority srcnat; policy accept;\n{rules} }}\n}}\n"
        );
        let mut child = node
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("nft")?;
        child
            .stdin
            .take()
            .context("nft's stdin")?
            .write_all(nat.as_bytes())?;
        if !child.wait()?.success() {
            bail!("the node's NAT (nft)");
        }
    }
    Ok(())
}

/// Whether node `k` of `c` holds `addr` on an interface.
pub fn holds(c: &Cluster, k: usize, addr: &str) -> bool {
    c.nodes()[k]
        .command("ip")
        .args(["-o", "addr", "show"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!(" {addr}/")))
}
