//! The pods' servers: per pod one thread polls every listening socket of that pod.
//!
//! - TCP: a dual-stack listener per port; each accepted connection gets a thread that echoes
//!   whatever it reads until the peer closes (a probe writes one byte and reads it back; a
//!   long-lived connection can exchange data for as long as it likes).
//! - UDP: a dual-stack socket per port that echoes every datagram to its sender.
//! - SCTP: raw IP sockets (protocol 132; IPv4, and IPv6 when the node has it) that answer an
//!   INIT to a served port with a valid INIT-ACK and ignore everything else.
//!
//! Sockets are created inside the pod's namespace before `serve` returns (so a probe right after
//! it finds them listening); the threads themselves never join a namespace. Everything stops
//! within [`POLL`] of [`Servers::stop`], and `stop` joins every thread.
use std::{
    collections::BTreeSet,
    io::{self, Read, Write},
    net::{IpAddr, Ipv6Addr, TcpListener, TcpStream, UdpSocket},
    os::fd::{AsRawFd, OwnedFd, RawFd},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result, bail};

use crate::{netns, probe::Proto, sctp};

/// How often stopped servers notice.
pub const POLL: Duration = Duration::from_millis(50);

/// Waits up to `timeout` for any of `fds` to become readable; returns which are.
pub fn wait_readable_any(fds: &[RawFd], timeout: Duration) -> io::Result<Vec<bool>> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = timeout.as_millis().clamp(0, i32::MAX as u128) as i32;
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds.
    let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(pfds.iter().map(|p| p.revents != 0).collect())
}

enum Listener {
    Tcp(TcpListener),
    Udp(UdpSocket),
    Sctp { fd: OwnedFd, ports: BTreeSet<u16> },
}

impl Listener {
    fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Udp(s) => s.as_raw_fd(),
            Listener::Sctp { fd, .. } => fd.as_raw_fd(),
        }
    }
}

/// Where a namespace's servers listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bind {
    /// Every address of the namespace: TCP and UDP dual-stack, SCTP over IPv4, and over IPv6
    /// too if `ipv6`.
    Any { ipv6: bool },
    /// These addresses only (one socket per address and port), as a host-networked server
    /// bound to its node's address: replies then leave from the address that was asked, even
    /// where routing would pick another source (a node's veths carry the pods' gateway).
    Addrs(Vec<IpAddr>),
}

/// The servers of one node: a stop flag and every thread serving or echoing.
#[derive(Default)]
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// (netns, port) of SCTP ports already answered (raw sockets cannot detect a clash).
    sctp_served: Mutex<BTreeSet<(String, u16)>>,
}

impl Servers {
    /// Starts serving `ports` in network namespace `netns` (`ipv6`: also answer SCTP over IPv6;
    /// TCP and UDP sockets are dual-stack anyway). Fails if a port is already served there.
    pub fn serve(&self, netns: &str, ports: &[(u16, Proto)], ipv6: bool) -> Result<()> {
        self.serve_at(netns, ports, &Bind::Any { ipv6 })
    }

    /// As [`Servers::serve`], with the sockets bound as `bind` says.
    pub fn serve_at(&self, netns: &str, ports: &[(u16, Proto)], bind: &Bind) -> Result<()> {
        let ports: BTreeSet<(u16, Proto)> = ports.iter().copied().collect();
        let sctp_ports: BTreeSet<u16> = ports
            .iter()
            .filter(|(_, p)| *p == Proto::Sctp)
            .map(|(port, _)| *port)
            .collect();
        {
            let served = self.sctp_served.lock().expect("lock");
            if let Some(p) = sctp_ports
                .iter()
                .find(|p| served.contains(&(netns.to_string(), **p)))
            {
                bail!("SCTP port {p} is already served in {netns}");
            }
        }
        // [::] with IPV6_V6ONLY off (the default in a new netns) takes IPv4 too.
        let any: [IpAddr; 1] = [Ipv6Addr::UNSPECIFIED.into()];
        let (stream_addrs, sctp_addrs): (&[IpAddr], Vec<Option<IpAddr>>) = match bind {
            Bind::Any { ipv6 } => (&any, {
                let mut v = vec![None];
                if *ipv6 {
                    v.push(Some(Ipv6Addr::UNSPECIFIED.into()));
                }
                v
            }),
            Bind::Addrs(addrs) => (addrs, addrs.iter().copied().map(Some).collect()),
        };
        let listeners = netns::in_netns(netns, || -> Result<Vec<Listener>> {
            let mut v = Vec::new();
            for (port, proto) in &ports {
                for addr in stream_addrs {
                    match proto {
                        Proto::Tcp => {
                            let l = TcpListener::bind((*addr, *port))
                                .with_context(|| format!("TCP port {port} on {addr}"))?;
                            l.set_nonblocking(true)?;
                            v.push(Listener::Tcp(l));
                        }
                        Proto::Udp => {
                            let s = UdpSocket::bind((*addr, *port))
                                .with_context(|| format!("UDP port {port} on {addr}"))?;
                            s.set_nonblocking(true)?;
                            v.push(Listener::Udp(s));
                        }
                        Proto::Sctp => {}
                    }
                }
            }
            if !sctp_ports.is_empty() {
                for addr in &sctp_addrs {
                    // `None`: an unbound IPv4 socket; an unspecified IPv6 address: unbound too.
                    let v6 = addr.is_some_and(|a| a.is_ipv6());
                    let fd = sctp::raw_socket(v6).context("raw SCTP socket")?;
                    if let Some(a) = addr.filter(|a| !a.is_unspecified()) {
                        sctp::bind(&fd, a).with_context(|| format!("raw SCTP socket on {a}"))?;
                    }
                    v.push(Listener::Sctp {
                        fd,
                        ports: sctp_ports.clone(),
                    });
                }
            }
            Ok(v)
        })?
        .with_context(|| format!("starting servers in {netns}"))?;
        {
            let mut served = self.sctp_served.lock().expect("lock");
            served.extend(sctp_ports.iter().map(|p| (netns.to_string(), *p)));
        }
        let stop = self.stop.clone();
        let connections = self.connections.clone();
        let handle = std::thread::Builder::new()
            .name(format!("serve {netns}"))
            .spawn(move || serve_loop(listeners, stop, connections))
            .context("spawning a server thread")?;
        self.threads.lock().expect("lock").push(handle);
        Ok(())
    }

    /// Stops every server and connection and waits for their threads (their sockets close).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        let conns =
            std::mem::take(&mut *self.connections.lock().unwrap_or_else(|e| e.into_inner()));
        for t in conns {
            let _ = t.join();
        }
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve_loop(
    listeners: Vec<Listener>,
    stop: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let fds: Vec<RawFd> = listeners.iter().map(Listener::raw_fd).collect();
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        let Ok(ready) = wait_readable_any(&fds, POLL) else {
            std::thread::sleep(POLL);
            continue;
        };
        for (listener, _) in listeners.iter().zip(ready).filter(|(_, r)| *r) {
            match listener {
                Listener::Tcp(l) => accept_all(l, &stop, &connections),
                Listener::Udp(s) => {
                    while let Ok((n, from)) = s.recv_from(&mut buf) {
                        let _ = s.send_to(&buf[..n], from);
                    }
                }
                Listener::Sctp { fd, ports } => answer_sctp(fd, ports, &mut buf),
            }
        }
    }
}

fn accept_all(
    l: &TcpListener,
    stop: &Arc<AtomicBool>,
    connections: &Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    while let Ok((stream, _)) = l.accept() {
        let stop = stop.clone();
        let spawned = std::thread::Builder::new()
            .name("echo".into())
            .stack_size(128 * 1024)
            .spawn(move || echo(stream, stop));
        if let Ok(h) = spawned {
            let mut conns = connections.lock().expect("lock");
            conns.retain(|h| !h.is_finished());
            conns.push(h);
        }
    }
}

fn echo(mut s: TcpStream, stop: Arc<AtomicBool>) {
    if s.set_nonblocking(false).is_err()
        || s.set_read_timeout(Some(POLL)).is_err()
        || s.set_write_timeout(Some(Duration::from_secs(2))).is_err()
    {
        return;
    }
    let _ = s.set_nodelay(true);
    let mut buf = [0u8; 16384];
    while !stop.load(Ordering::SeqCst) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => break,
        }
    }
}

fn answer_sctp(fd: &OwnedFd, ports: &BTreeSet<u16>, buf: &mut [u8]) {
    loop {
        let (src, reply) = match sctp::recv_from(fd, buf) {
            Ok(rx) => {
                let Some(p) = sctp::parse(rx.sctp) else {
                    continue;
                };
                if !p.is_init() || !ports.contains(&p.dport) {
                    continue;
                }
                (rx.src, sctp::init_ack(&p, sctp::random_u32().max(1)))
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => continue,
            Err(_) => return, // WouldBlock: drained
        };
        let _ = sctp::send_to(fd, &reply, src);
    }
}
