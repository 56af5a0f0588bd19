//! A DNS server and a stub resolver for the FQDN tests: the server answers from a zone the
//! test sets (A, AAAA and CNAME records with their TTLs; names generated on demand, each with
//! an address of its own; answers too big for UDP truncated, whole over TCP), the resolver asks
//! over UDP and retries over TCP when told to. Names are under `.test` (RFC 6761).
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use simple_dns::{
    CLASS, Name, Packet, PacketFlag, QCLASS, QTYPE, RCODE, ResourceRecord, TYPE, rdata::RData,
};

use crate::netns;

/// One record of the zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Addr(IpAddr, u32),
    Cname(String, u32),
}

/// Generates the records of names the zone does not list (`None`: NXDOMAIN).
pub type Generator = dyn Fn(&str) -> Option<Vec<Record>> + Send + Sync;

/// What the server answers.
#[derive(Default)]
pub struct Zone {
    pub names: BTreeMap<String, Vec<Record>>,
    pub generate: Option<Box<Generator>>,
}

impl Zone {
    fn lookup(&self, name: &str) -> Option<Vec<Record>> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        match self.names.get(&name) {
            Some(r) => Some(r.clone()),
            None => self.generate.as_ref().and_then(|g| g(&name)),
        }
    }
}

/// UDP answers above this many bytes are truncated (TC, no records): the client asks over TCP.
pub const UDP_MAX: usize = 512;

/// The server, in a network namespace; stops when dropped.
pub struct DnsServer {
    pub zone: Arc<Mutex<Zone>>,
    /// Queries answered (UDP and TCP).
    pub queries: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl DnsServer {
    /// Serves `zone` on port 53 (UDP and TCP, every address) in `netns`.
    pub fn start(netns: &str, zone: Zone) -> Result<DnsServer> {
        let (udp, tcp) = netns::in_netns(netns, || -> Result<(UdpSocket, TcpListener)> {
            let any: SocketAddr = "[::]:53".parse().unwrap();
            Ok((UdpSocket::bind(any)?, TcpListener::bind(any)?))
        })?
        .context("binding port 53")?;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        tcp.set_nonblocking(true)?;
        let zone = Arc::new(Mutex::new(zone));
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();
        {
            let (zone, stop, queries) = (zone.clone(), stop.clone(), queries.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = udp.recv_from(&mut buf) else {
                        continue;
                    };
                    if let Some(out) = respond(&zone, &buf[..n], true) {
                        queries.fetch_add(1, Ordering::Relaxed);
                        let _ = udp.send_to(&out, from);
                    }
                }
            }));
        }
        {
            let (zone, stop, queries) = (zone.clone(), stop.clone(), queries.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((s, _)) => {
                            let (zone, queries) = (zone.clone(), queries.clone());
                            std::thread::spawn(move || serve_tcp(s, &zone, &queries));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }));
        }
        Ok(DnsServer {
            zone,
            queries,
            stop,
            threads,
        })
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve_tcp(mut s: TcpStream, zone: &Mutex<Zone>, queries: &AtomicU64) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    loop {
        let mut len = [0u8; 2];
        if s.read_exact(&mut len).is_err() {
            return;
        }
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        if s.read_exact(&mut msg).is_err() {
            return;
        }
        let Some(out) = respond(zone, &msg, false) else {
            return;
        };
        queries.fetch_add(1, Ordering::Relaxed);
        let mut framed = (out.len() as u16).to_be_bytes().to_vec();
        framed.extend(out);
        if s.write_all(&framed).is_err() {
            return;
        }
    }
}

/// The answer to a query (`None`: not a query).
fn respond(zone: &Mutex<Zone>, query: &[u8], udp: bool) -> Option<Vec<u8>> {
    let q = Packet::parse(query).ok()?;
    let question = q.questions.first()?.clone();
    let qname = question.qname.to_string();
    let mut reply = Packet::new_reply(q.id());
    reply.questions.push(question.clone());
    let wanted = match question.qtype {
        QTYPE::TYPE(TYPE::AAAA) => TYPE::AAAA,
        _ => TYPE::A,
    };
    let records = zone.lock().unwrap().lookup(&qname);
    let Some(records) = records else {
        *reply.rcode_mut() = RCODE::NameError;
        return reply.build_bytes_vec().ok();
    };
    // Owned names for the records (simple-dns borrows them).
    let mut owned: Vec<(String, Record)> = Vec::new();
    let mut current = qname.clone();
    let mut list = records;
    for _ in 0..8 {
        let mut next = None;
        for r in &list {
            match r {
                Record::Cname(t, _) => next = Some(t.clone()),
                Record::Addr(ip, _) if ip.is_ipv4() == (wanted == TYPE::A) => {}
                Record::Addr(..) => continue,
            }
            owned.push((current.clone(), r.clone()));
        }
        match next {
            Some(t) => {
                list = zone.lock().unwrap().lookup(&t).unwrap_or_default();
                current = t;
            }
            None => break,
        }
    }
    for (owner, r) in &owned {
        let rdata = match r {
            Record::Addr(IpAddr::V4(a), _) => RData::A(simple_dns::rdata::A {
                address: u32::from(*a),
            }),
            Record::Addr(IpAddr::V6(a), _) => RData::AAAA(simple_dns::rdata::AAAA {
                address: u128::from(*a),
            }),
            Record::Cname(t, _) => RData::CNAME(simple_dns::rdata::CNAME(Name::new_unchecked(t))),
        };
        let ttl = match r {
            Record::Addr(_, t) | Record::Cname(_, t) => *t,
        };
        reply.answers.push(ResourceRecord::new(
            Name::new_unchecked(owner),
            CLASS::IN,
            ttl,
            rdata,
        ));
    }
    let out = reply.build_bytes_vec_compressed().ok()?;
    if udp && out.len() > UDP_MAX {
        let mut tc = Packet::new_reply(q.id());
        tc.questions.push(question);
        tc.set_flags(PacketFlag::TRUNCATION);
        return tc.build_bytes_vec().ok();
    }
    Some(out)
}

/// Resolves `name` (A, or AAAA if `v6`) at `server`:53 from the calling thread's network
/// namespace: over UDP, then over TCP if the answer is truncated. The addresses, in order.
pub fn resolve(server: IpAddr, name: &str, v6: bool, timeout: Duration) -> Result<Vec<IpAddr>> {
    let qtype = if v6 { TYPE::AAAA } else { TYPE::A };
    let id = (std::process::id() as u16) ^ (name.len() as u16).wrapping_mul(7919);
    let mut q = Packet::new_query(id);
    q.set_flags(PacketFlag::RECURSION_DESIRED);
    q.questions.push(simple_dns::Question::new(
        Name::new_unchecked(name),
        QTYPE::TYPE(qtype),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    let query = q.build_bytes_vec()?;
    let bind: SocketAddr = if server.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let sock = UdpSocket::bind(bind)?;
    sock.set_read_timeout(Some(timeout))?;
    sock.connect((server, 53))?;
    sock.send(&query)?;
    let mut buf = [0u8; 1500];
    let n = sock.recv(&mut buf).context("no answer over UDP")?;
    let answer = buf[..n].to_vec();
    let truncated = Packet::parse(&answer)?.has_flags(PacketFlag::TRUNCATION);
    let answer = if truncated {
        let mut s = TcpStream::connect_timeout(&SocketAddr::new(server, 53), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut framed = (query.len() as u16).to_be_bytes().to_vec();
        framed.extend(&query);
        s.write_all(&framed)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len).context("no answer over TCP")?;
        let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut msg)?;
        msg
    } else {
        answer
    };
    let p = Packet::parse(&answer)?;
    if p.rcode() != RCODE::NoError {
        bail!("{name}: rcode {:?}", p.rcode());
    }
    Ok(p.answers
        .iter()
        .filter_map(|rr| match &rr.rdata {
            RData::A(a) => Some(IpAddr::from(std::net::Ipv4Addr::from(a.address))),
            RData::AAAA(a) => Some(IpAddr::from(std::net::Ipv6Addr::from(a.address))),
            _ => None,
        })
        .collect())
}
