//! Probes: can this pod reach that address and port over TCP, UDP or SCTP? Every probe is
//! bounded by its timeout, and [`probe_many`] runs all of its probes at once;
//! [`probe_outcomes`] also tells a timeout from a refusal ([`Outcome`]).
//!
//! - TCP: connect, write one byte, read it back (the rig's servers echo). A refused connection
//!   fails at once.
//! - UDP: send a random token, wait for it to come back from that address and port (an ICMP port
//!   unreachable fails at once, if it is not rate-limited).
//! - SCTP: from a raw socket, an INIT with a random initiate tag and source port; success is an
//!   INIT-ACK from that address and port, ports swapped, whose verification tag is our tag.
//!   Concurrent SCTP probes in one namespace each see every SCTP packet, and match only theirs.
use std::{
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use crate::{netns, rig::Pod, sctp};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub const ALL: [Proto; 3] = [Proto::Tcp, Proto::Udp, Proto::Sctp];

    /// The Kubernetes spelling: TCP, UDP, SCTP.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "TCP",
            Proto::Udp => "UDP",
            Proto::Sctp => "SCTP",
        }
    }
}

impl std::fmt::Display for Proto {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One probe of a [`probe_many`] batch.
#[derive(Clone, Copy, Debug)]
pub struct ProbeSpec<'a> {
    pub from: &'a Pod,
    pub to: IpAddr,
    pub port: u16,
    pub proto: Proto,
    pub timeout: Duration,
}

/// Probes from pod `from`.
pub fn probe(from: &Pod, to: IpAddr, port: u16, proto: Proto, timeout: Duration) -> bool {
    probe_from_netns(&from.netns_name, to, port, proto, timeout)
}

/// Probes from network namespace `netns` (a pod's, or the node's).
pub fn probe_from_netns(
    netns: &str,
    to: IpAddr,
    port: u16,
    proto: Proto,
    timeout: Duration,
) -> bool {
    netns::in_netns(netns, || probe_here(to, port, proto, timeout)).unwrap_or(false)
}

/// Runs every probe concurrently (one thread each); results in the order of `specs`. A batch
/// takes about as long as its longest timeout.
pub fn probe_many(specs: &[ProbeSpec<'_>]) -> Vec<bool> {
    probe_outcomes(specs)
        .into_iter()
        .map(Outcome::connected)
        .collect()
}

/// Every probe at once ([`probe_many`]), then the ones expected to pass (`expect[i]`) that did
/// not asked again, twice at most, with 3 s each: a loaded machine misses deadlines. A probe
/// expected to fail that passes is never retried: that is a hole.
pub fn probe_expecting(specs: &[ProbeSpec<'_>], expect: &[bool]) -> Vec<bool> {
    assert_eq!(specs.len(), expect.len());
    let mut got = probe_many(specs);
    for _ in 0..2 {
        let retry: Vec<usize> = (0..specs.len())
            .filter(|i| expect[*i] && !got[*i])
            .collect();
        if retry.is_empty() {
            break;
        }
        let slow: Vec<ProbeSpec<'_>> = retry
            .iter()
            .map(|i| ProbeSpec {
                timeout: Duration::from_secs(3),
                ..specs[*i]
            })
            .collect();
        for (i, ok) in retry.iter().zip(probe_many(&slow)) {
            got[*i] = ok;
        }
    }
    got
}

/// Where every probe is counted (one line per probe or stream, with how many packets it
/// stood for), if set: `cargo xtask soak` sums them across the processes it runs.
pub const PROBE_COUNT_ENV: &str = "PALISADE_PROBE_COUNT";

/// Counts `n` probes in `$PALISADE_PROBE_COUNT` (appended: safe across threads and
/// processes).
pub fn count_probes(n: u64) {
    use std::sync::OnceLock;
    static FILE: OnceLock<Option<std::sync::Mutex<std::fs::File>>> = OnceLock::new();
    let file = FILE.get_or_init(|| {
        let path = std::env::var_os(PROBE_COUNT_ENV)?;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .ok()
            .map(std::sync::Mutex::new)
    });
    if let Some(f) = file
        && let Ok(mut f) = f.lock()
    {
        let _ = writeln!(f, "{n}");
    }
}

/// What one probe saw: a deny that NetworkPolicy-style conformance accepts is a
/// [`Outcome::TimedOut`] (the traffic silently dropped), never a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// TCP connected and echoed, UDP echoed, SCTP answered the INIT with an INIT-ACK.
    Connected,
    /// No answer before the timeout (nor an error from the network).
    TimedOut,
    /// The network said no: a TCP RST, an ICMP error (port or host unreachable, prohibited),
    /// an SCTP ABORT.
    Refused,
    /// The probe could not be made here (entering the namespace, a socket, a send failed).
    Error,
}

impl Outcome {
    pub fn connected(self) -> bool {
        self == Outcome::Connected
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Connected => "connected",
            Outcome::TimedOut => "timed out",
            Outcome::Refused => "refused",
            Outcome::Error => "probe error",
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Runs every probe concurrently, as [`probe_many`], and says what each saw.
pub fn probe_outcomes(specs: &[ProbeSpec<'_>]) -> Vec<Outcome> {
    std::thread::scope(|s| {
        let handles: Vec<_> = specs
            .iter()
            .map(|spec| {
                std::thread::Builder::new()
                    .name("probe".into())
                    .stack_size(256 * 1024)
                    .spawn_scoped(s, move || {
                        if netns::enter(&spec.from.netns_name).is_err() {
                            return Outcome::Error;
                        }
                        probe_outcome_here(spec.to, spec.port, spec.proto, spec.timeout)
                    })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or(Outcome::Error),
                Err(_) => Outcome::Error,
            })
            .collect()
    })
}

/// Probes from the calling thread's network namespace.
pub fn probe_here(to: IpAddr, port: u16, proto: Proto, timeout: Duration) -> bool {
    probe_outcome_here(to, port, proto, timeout).connected()
}

/// Probes from the calling thread's network namespace, and says what it saw.
pub fn probe_outcome_here(to: IpAddr, port: u16, proto: Proto, timeout: Duration) -> Outcome {
    count_probes(1);
    let deadline = Instant::now() + timeout;
    match proto {
        Proto::Tcp => tcp(to, port, timeout, deadline),
        Proto::Udp => udp(to, port, deadline),
        Proto::Sctp => match sctp::handshake_answer(to, port, deadline) {
            Ok(sctp::Answer::InitAck) => Outcome::Connected,
            Ok(sctp::Answer::Abort) => Outcome::Refused,
            Ok(sctp::Answer::Silence) => Outcome::TimedOut,
            Err(_) => Outcome::Error,
        },
    }
}

fn left(deadline: Instant) -> Option<Duration> {
    let d = deadline.saturating_duration_since(Instant::now());
    (!d.is_zero()).then_some(d)
}

/// A socket error as an outcome: a timeout is silence, an answer from the network (RST, ICMP)
/// a refusal, anything else a local error.
fn io_outcome(e: &std::io::Error) -> Outcome {
    use std::io::ErrorKind::*;
    match e.kind() {
        TimedOut | WouldBlock => Outcome::TimedOut,
        ConnectionRefused | ConnectionReset | ConnectionAborted | HostUnreachable
        | NetworkUnreachable => Outcome::Refused,
        _ => match e.raw_os_error() {
            // ICMP "administratively prohibited" and friends.
            Some(libc::EACCES | libc::EPERM | libc::EPROTO | libc::ENOPROTOOPT) => Outcome::Refused,
            _ => Outcome::Error,
        },
    }
}

/// A TCP connect within `timeout`. Unlike `TcpStream::connect_timeout`, a connect that times
/// out reports the ICMP error it got meanwhile, if any: an ICMP error that arrives while the
/// connecting thread holds the socket (on a local path it can, within the connect call) is
/// kept only as the socket's soft error, and the SYN is retried after a second, past the
/// timeout.
fn tcp_connect(to: SocketAddr, timeout: Duration) -> Result<TcpStream, Outcome> {
    use nix::{
        errno::Errno,
        sys::socket::{
            AddressFamily, SockFlag, SockType, SockaddrStorage, connect, getsockopt, socket,
            sockopt::SocketError,
        },
    };
    use std::os::fd::AsRawFd;
    let family = match to {
        SocketAddr::V4(_) => AddressFamily::Inet,
        SocketAddr::V6(_) => AddressFamily::Inet6,
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|_| Outcome::Error)?;
    let errno_outcome = |e: i32| io_outcome(&std::io::Error::from_raw_os_error(e));
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(to)) {
        Ok(()) | Err(Errno::EINPROGRESS) => {}
        Err(e) => return Err(errno_outcome(e as i32)),
    }
    let deadline = Instant::now() + timeout;
    let socket_error = || getsockopt(&fd, SocketError).map_err(|_| Outcome::Error);
    loop {
        let Some(rest) = left(deadline) else {
            return Err(match socket_error()? {
                0 => Outcome::TimedOut,
                e => errno_outcome(e),
            });
        };
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = rest.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        match unsafe { libc::poll(&mut pfd, 1, ms) } {
            0 => continue,
            n if n < 0 => {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Outcome::Error);
            }
            _ => {
                return match socket_error()? {
                    0 => {
                        let s = TcpStream::from(fd);
                        s.set_nonblocking(false).map_err(|_| Outcome::Error)?;
                        Ok(s)
                    }
                    e => Err(errno_outcome(e)),
                };
            }
        }
    }
}

fn tcp(to: IpAddr, port: u16, timeout: Duration, deadline: Instant) -> Outcome {
    let mut s = match tcp_connect(SocketAddr::new(to, port), timeout) {
        Ok(s) => s,
        Err(outcome) => return outcome,
    };
    let Some(rest) = left(deadline) else {
        return Outcome::TimedOut;
    };
    if s.set_write_timeout(Some(rest)).is_err() || s.set_read_timeout(Some(rest)).is_err() {
        return Outcome::Error;
    }
    let _ = s.set_nodelay(true);
    if let Err(e) = s.write_all(b"?") {
        return io_outcome(&e);
    }
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(1) => Outcome::Connected,
        // Closed without the echo.
        Ok(_) => Outcome::Refused,
        Err(e) => io_outcome(&e),
    }
}

fn udp(to: IpAddr, port: u16, deadline: Instant) -> Outcome {
    let bind: SocketAddr = match to {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let Ok(sock) = UdpSocket::bind(bind) else {
        return Outcome::Error;
    };
    // Connected: only that address and port can answer, and ICMP errors surface.
    if sock.connect((to, port)).is_err() {
        return Outcome::Error;
    }
    let token = format!("palisade-probe {:016x}", sctp::random_u64());
    if let Err(e) = sock.send(token.as_bytes()) {
        return match io_outcome(&e) {
            Outcome::TimedOut => Outcome::Error,
            o => o,
        };
    }
    let mut buf = [0u8; 256];
    while let Some(rest) = left(deadline) {
        if sock.set_read_timeout(Some(rest)).is_err() {
            return Outcome::Error;
        }
        match sock.recv(&mut buf) {
            Ok(n) if &buf[..n] == token.as_bytes() => return Outcome::Connected,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return io_outcome(&e),
        }
    }
    Outcome::TimedOut
}

/// A steady stream of UDP datagrams from one pod to `to:port` (a rig echo server), one every
/// `every`, counting the echoes that come back: how many got through while, say, a manifest is
/// rewritten. A datagram the policy drops never comes back; one it lets through always does
/// (the echo is a reply of the sender's own flow). For tests where a denial must hold through
/// an event, not only before and after it.
pub struct UdpStream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<std::io::Result<(u64, u64)>>,
}

impl UdpStream {
    pub fn start(from: &Pod, to: IpAddr, port: u16, every: Duration) -> UdpStream {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let netns = from.netns_name.clone();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            netns::enter(&netns)?;
            let bind: SocketAddr = match to {
                IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
                IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
            };
            let sock = UdpSocket::bind(bind)?;
            sock.connect((to, port))?;
            sock.set_read_timeout(Some(every))?;
            let tag = sctp::random_u64();
            let prefix = format!("palisade-stream {tag:016x} ");
            let (mut sent, mut echoed) = (0u64, 0u64);
            let mut buf = [0u8; 64];
            let mut next = Instant::now();
            // After the stop, a last second for echoes still on their way.
            let mut draining: Option<Instant> = None;
            loop {
                if draining.is_none() && flag.load(Ordering::Relaxed) {
                    draining = Some(Instant::now() + Duration::from_secs(1));
                }
                if draining.is_some_and(|d| Instant::now() >= d) {
                    return Ok((sent, echoed));
                }
                if draining.is_none() && Instant::now() >= next {
                    let msg = format!("palisade-stream {tag:016x} {sent}");
                    // Refusals (an ICMP error on the connected socket) are not deliveries.
                    let _ = sock.send(msg.as_bytes());
                    sent += 1;
                    next += every;
                }
                match sock.recv(&mut buf) {
                    Ok(n) if buf[..n].starts_with(prefix.as_bytes()) => echoed += 1,
                    Ok(_) => {}
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    // An ICMP error surfaced on the socket: wait for the next send.
                    Err(_) => std::thread::sleep(every.min(Duration::from_millis(5))),
                }
            }
        });
        UdpStream { stop, handle }
    }

    /// Stops sending; (datagrams sent, echoes received).
    pub fn finish(self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let r = self
            .handle
            .join()
            .expect("stream thread")
            .expect("stream socket in the pod's namespace");
        count_probes(r.0);
        r
    }
}
