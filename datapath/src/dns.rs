//! The kernel side of FQDN egress (`common`, "FQDN egress"): the agent's heartbeat, the
//! trusted DNS servers, the learned addresses (FQDN_IPS), the held answers (DNS_ANSWERS) and
//! sending a held answer on to its pod.
use std::collections::{BTreeSet, HashSet};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use aya::maps::{Array, HashMap, Map, MapData, RingBuf};
use palisade_common::{
    CtEntry, CtKey, DNS_COPY_MAX, DNS_REINJECT_MARK, DnsAnswerRecord, FqdnKey, FqdnValue, PeerAddr,
    map_names,
};

use crate::{Datapath, DatapathError, Result, clock_ns};

/// A DNS answer `to_pod` copied.
#[derive(Clone, Debug)]
pub struct DnsRecord {
    pub ifindex: u32,
    pub endpoint: u32,
    /// It was held: it reaches the pod only when sent on (`DnsPath::release`).
    pub held: bool,
    /// When `to_pod` saw it (coarse monotonic ns), and precisely (monotonic ns).
    pub at_ns: u64,
    pub seen_ns: u64,
    /// The frame, from its Ethernet header (whole: larger ones are not copied).
    pub frame: Vec<u8>,
}

/// The datapath's clock for FQDN expiries and the heartbeat (`bpf_ktime_get_coarse_ns`).
pub fn now_coarse_ns() -> u64 {
    clock_ns(libc::CLOCK_MONOTONIC_COARSE)
}

pub struct DnsPath {
    ips: HashMap<MapData, FqdnKey, FqdnValue>,
    servers: HashMap<MapData, PeerAddr, u8>,
    ctl: Array<MapData, u64>,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    /// DNS_ANSWERS, mapped only while answers are read (`read_answers`): the kernel maps a
    /// ring's data pages twice, so a mapped 4 MiB ring is 8 MiB of the agent's resident set.
    answers: Option<RingBuf<MapData>>,
    /// DNS_ANSWERS' id, to map it again.
    answers_id: u32,
    /// AF_PACKET, send only, with `DNS_REINJECT_MARK`.
    socket: OwnedFd,
}

fn map_err(
    map: &'static str,
    doing: &'static str,
) -> impl FnOnce(aya::maps::MapError) -> DatapathError {
    DatapathError::map(map, doing)
}

impl DnsPath {
    /// Takes DNS_ANSWERS from the object and opens handles of its own on the other maps (call
    /// before the readers take the object's handles).
    pub fn new(dp: &mut Datapath) -> Result<DnsPath> {
        fn open(dp: &Datapath, name: &'static str) -> Result<Map> {
            Map::from_map_data(dp.open_map(name)?).map_err(map_err(name, "opening it"))
        }
        let ips = HashMap::try_from(open(dp, map_names::FQDN_IPS)?)
            .map_err(map_err(map_names::FQDN_IPS, "opening it"))?;
        let servers = HashMap::try_from(open(dp, map_names::DNS_SERVERS)?)
            .map_err(map_err(map_names::DNS_SERVERS, "opening it"))?;
        let ctl = Array::try_from(open(dp, map_names::FQDN_CTL)?)
            .map_err(map_err(map_names::FQDN_CTL, "opening it"))?;
        let conntrack = HashMap::try_from(open(dp, map_names::CONNTRACK)?)
            .map_err(map_err(map_names::CONNTRACK, "opening it"))?;
        let Map::RingBuf(data) = dp.take_map(map_names::DNS_ANSWERS)? else {
            return Err(DatapathError::MapKind {
                map: map_names::DNS_ANSWERS.to_string(),
                why: "it must be a ring buffer",
            });
        };
        let answers_id = data
            .info()
            .map_err(map_err(map_names::DNS_ANSWERS, "reading its info"))?
            .id();
        let answers = RingBuf::try_from(Map::RingBuf(data))
            .map_err(map_err(map_names::DNS_ANSWERS, "opening it"))?;
        Ok(DnsPath {
            ips,
            servers,
            ctl,
            conntrack,
            answers: Some(answers),
            answers_id,
            socket: packet_socket().map_err(DatapathError::Thread)?,
        })
    }

    /// The heartbeat: `to_pod` holds answers while it is fresh (`DNS_HOLD_FRESH_NS`). 0 stops
    /// holding at once.
    pub fn beat(&mut self, now_ns: u64) -> Result<()> {
        self.ctl
            .set(0, now_ns, 0)
            .map_err(map_err(map_names::FQDN_CTL, "writing the heartbeat"))
    }

    /// Makes DNS_SERVERS exactly `servers`.
    pub fn set_servers(&mut self, servers: &BTreeSet<PeerAddr>) -> Result<()> {
        let old: Vec<PeerAddr> = self.servers.keys().filter_map(|k| k.ok()).collect();
        for k in old.iter().filter(|k| !servers.contains(k)) {
            let _ = self.servers.remove(k);
        }
        for k in servers.iter().filter(|k| !old.contains(k)) {
            self.servers
                .insert(k, 1, 0)
                .map_err(map_err(map_names::DNS_SERVERS, "writing a server"))?;
        }
        Ok(())
    }

    pub fn put(&mut self, key: &FqdnKey, value: &FqdnValue) -> Result<()> {
        self.ips
            .insert(key, value, 0)
            .map_err(map_err(map_names::FQDN_IPS, "writing an address"))
    }

    pub fn remove(&mut self, key: &FqdnKey) {
        let _ = self.ips.remove(key);
    }

    /// Every FQDN_IPS entry.
    pub fn entries(&self) -> Vec<(FqdnKey, FqdnValue)> {
        self.ips.iter().filter_map(|e| e.ok()).collect()
    }

    /// (endpoint, peer) of every tracked flow: learned addresses in use.
    pub fn peers_in_use(&self) -> HashSet<(u32, PeerAddr)> {
        self.conntrack
            .keys()
            .filter_map(|k| k.ok())
            .map(|k| {
                (
                    k.endpoint,
                    PeerAddr {
                        family: k.family,
                        _pad: [0; 3],
                        addr: k.peer,
                    },
                )
            })
            .collect()
    }

    /// Maps DNS_ANSWERS (`true`), or unmaps it (`false`): its records stay in the ring until
    /// it is mapped and read again.
    pub fn read_answers(&mut self, read: bool) -> Result<()> {
        match (read, self.answers.is_some()) {
            (true, false) => {
                let data = MapData::from_id(self.answers_id)
                    .map_err(map_err(map_names::DNS_ANSWERS, "opening it by id"))?;
                self.answers = Some(
                    RingBuf::try_from(Map::RingBuf(data))
                        .map_err(map_err(map_names::DNS_ANSWERS, "opening it"))?,
                );
            }
            (false, true) => self.answers = None,
            _ => {}
        }
        Ok(())
    }

    /// Waits up to `timeout` for DNS_ANSWERS to have a record (for `timeout` when it is not
    /// mapped).
    pub fn wait(&self, timeout: Duration) -> bool {
        let Some(answers) = &self.answers else {
            std::thread::sleep(timeout);
            return false;
        };
        let mut fds = [libc::pollfd {
            fd: answers.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, timeout.as_millis() as i32) };
        n > 0
    }

    /// The next record, if any.
    pub fn next_record(&mut self) -> Option<DnsRecord> {
        loop {
            let item = self.answers.as_mut()?.next()?;
            if item.len() < std::mem::size_of::<DnsAnswerRecord>() {
                continue;
            }
            // SAFETY: the record holds a `DnsAnswerRecord` (plain data) written by `to_pod`.
            let rec: &DnsAnswerRecord = unsafe { &*(item.as_ptr().cast()) };
            let n = (rec.len as usize).min(DNS_COPY_MAX);
            return Some(DnsRecord {
                ifindex: rec.ifindex,
                endpoint: rec.endpoint,
                held: rec.held != 0,
                at_ns: rec.at_ns,
                seen_ns: rec.seen_ns,
                frame: rec.frame[..n].to_vec(),
            });
        }
    }

    /// Sends a held answer on to its pod: out of the host side of its veth, marked so that
    /// `to_pod` lets it through.
    pub fn release(&self, ifindex: u32, frame: &[u8]) -> std::io::Result<()> {
        if frame.len() < 14 {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        // SAFETY: zeroed sockaddr_ll is valid; the fields are set below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = u16::from_be_bytes([frame[12], frame[13]]).to_be();
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and the address are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// An AF_PACKET socket that only sends, its packets marked `DNS_REINJECT_MARK`.
fn packet_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket calls; the fd is owned at once.
    unsafe {
        let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mark = DNS_REINJECT_MARK;
        if libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const u32).cast(),
            4,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(fd)
    }
}
