//! rtnetlink, synchronously, on the rust-netlink crates (`netlink-sys` for the socket,
//! `netlink-packet-route` and `netlink-packet-core` for the messages): links, addresses,
//! routes of table main, and one link by index or by name, also inside another network
//! namespace.
//!
//! A [`Netlink`] is one socket, reused for each request it makes: every request carries its
//! own sequence number and its reply is read to its end (a dump to `NLMSG_DONE`, a single
//! request to its one answer); an `NLMSG_ERROR` is the kernel's errno, named with the request
//! in a [`NetlinkError`]. Nothing here depends on the rest of the agent.
use std::{
    fmt,
    fs::File,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use netlink_packet_core::{
    DecodeError, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage,
    NetlinkPayload,
};
use netlink_packet_route::{
    AddressFamily, RouteNetlinkMessage,
    address::{AddressAttribute, AddressMessage},
    link::{LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::{RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage},
};
use netlink_sys::{Socket, SocketAddr, protocols::NETLINK_ROUTE};

pub use netlink_packet_route::route::RouteType;

/// A network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    /// `IFLA_LINK`: for a veth, the peer's ifindex (in the peer's namespace).
    pub link: Option<u32>,
    /// `IFLA_INFO_KIND` (`veth`, `bridge`, ...).
    pub kind: Option<String>,
}

/// An address configured on a link.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// The link's ifindex.
    pub index: u32,
    /// `IFA_LOCAL`, or `IFA_ADDRESS` where there is no `IFA_LOCAL` (IPv6): the address of
    /// the interface itself, what iproute2 calls `local`.
    pub address: IpAddr,
    pub prefix_len: u8,
}

/// A route of table main.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// `RTA_DST`; `None` for the default route (prefix 0).
    pub destination: Option<IpAddr>,
    pub prefix_len: u8,
    /// `RTA_OIF`, the output interface; `None` for routes without one (multipath,
    /// blackhole, unreachable).
    pub oif: Option<u32>,
    /// `RTN_*`: unicast, local, broadcast, ...
    pub kind: RouteType,
    /// Whether this is an IPv6 route.
    pub ipv6: bool,
}

impl Route {
    /// A route to one address: a /32 (IPv4) or a /128 (IPv6) with a destination.
    pub fn host_destination(&self) -> Option<IpAddr> {
        let dst = self.destination?;
        let host_len = if dst.is_ipv4() { 32 } else { 128 };
        (self.prefix_len == host_len).then_some(dst)
    }
}

/// What was asked of the kernel, for errors.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub what: Asked,
    /// The network namespace the request was made in, when not the caller's own.
    pub netns: Option<PathBuf>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Asked {
    Links,
    Addresses,
    Routes { ipv6: bool },
    LinkByIndex(u32),
    LinkByName(String),
    SetLinkUp(u32),
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.what {
            Asked::Links => write!(f, "dumping links")?,
            Asked::Addresses => write!(f, "dumping addresses")?,
            Asked::Routes { ipv6: false } => write!(f, "dumping IPv4 routes")?,
            Asked::Routes { ipv6: true } => write!(f, "dumping IPv6 routes")?,
            Asked::LinkByIndex(index) => write!(f, "link by index {index}")?,
            Asked::LinkByName(name) => write!(f, "link {name}")?,
            Asked::SetLinkUp(index) => write!(f, "setting link {index} up")?,
        }
        if let Some(netns) = &self.netns {
            write!(f, " in netns {}", netns.display())?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket{}: {source}", in_netns(.netns))]
    Socket {
        netns: Option<PathBuf>,
        source: io::Error,
    },
    #[error("{request}: {source}")]
    Io { request: Request, source: io::Error },
    #[error("{request}: the kernel answered: {}", os_error(.errno))]
    Kernel { request: Request, errno: i32 },
    #[error("{request}: cannot decode the reply: {source}")]
    Decode {
        request: Request,
        source: DecodeError,
    },
    #[error("{request}: {problem}")]
    Protocol {
        request: Request,
        problem: &'static str,
    },
    #[error("opening netns {}: {source}", .netns.display())]
    OpenNetns { netns: PathBuf, source: io::Error },
    #[error("entering netns {}: {source}", .netns.display())]
    EnterNetns {
        netns: PathBuf,
        source: nix::errno::Errno,
    },
    #[error("the thread that entered netns {} panicked", .netns.display())]
    NetnsThread { netns: PathBuf },
}

fn os_error(errno: &i32) -> io::Error {
    io::Error::from_raw_os_error(*errno)
}

fn in_netns(netns: &Option<PathBuf>) -> String {
    netns
        .as_ref()
        .map(|p| format!(" in netns {}", p.display()))
        .unwrap_or_default()
}

impl NetlinkError {
    /// The kernel's errno, where the kernel refused the request (`ENODEV` for a link that
    /// does not exist).
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetlinkError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// One rtnetlink socket, for any number of requests made one after the other.
pub struct Netlink {
    socket: Socket,
    seq: u32,
    netns: Option<PathBuf>,
}

impl Netlink {
    /// A socket in this thread's network namespace.
    pub fn new() -> Result<Self, NetlinkError> {
        Self::open(None)
    }

    /// `netns` only labels errors: the socket belongs to the namespace of the thread that
    /// opens it.
    fn open(netns: Option<&Path>) -> Result<Self, NetlinkError> {
        let netns = netns.map(Path::to_path_buf);
        let socket = (|| {
            let mut socket = Socket::new(NETLINK_ROUTE)?;
            socket.bind_auto()?;
            socket.connect(&SocketAddr::new(0, 0))?;
            Ok(socket)
        })()
        .map_err(|source| NetlinkError::Socket {
            netns: netns.clone(),
            source,
        })?;
        Ok(Netlink {
            socket,
            seq: 0,
            netns,
        })
    }

    /// Every link.
    pub fn links(&mut self) -> Result<Vec<Link>, NetlinkError> {
        let replies = self.request(
            Asked::Links,
            RouteNetlinkMessage::GetLink(LinkMessage::default()),
            true,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
                _ => None,
            })
            .collect())
    }

    /// Every address of every link, IPv4 and IPv6.
    pub fn addresses(&mut self) -> Result<Vec<Address>, NetlinkError> {
        let replies = self.request(
            Asked::Addresses,
            RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            true,
        )?;
        Ok(replies
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewAddress(a) => address_from(a),
                _ => None,
            })
            .collect())
    }

    /// The routes of table main (`RT_TABLE_MAIN`), IPv4 then IPv6; cloned routes (the route
    /// cache, IPv6 exceptions) are not among them.
    pub fn routes(&mut self) -> Result<Vec<Route>, NetlinkError> {
        let mut out = Vec::new();
        for (ipv6, family) in [(false, AddressFamily::Inet), (true, AddressFamily::Inet6)] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            let replies = self.request(
                Asked::Routes { ipv6 },
                RouteNetlinkMessage::GetRoute(msg),
                true,
            )?;
            out.extend(replies.into_iter().filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => main_route_from(r),
                _ => None,
            }));
        }
        Ok(out)
    }

    pub fn link_by_index(&mut self, index: u32) -> Result<Link, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        self.one_link(Asked::LinkByIndex(index), msg)
    }

    pub fn link_by_name(&mut self, name: &str) -> Result<Link, NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        self.one_link(Asked::LinkByName(name.to_string()), msg)
    }

    /// Sets link `index` up (`ip link set dev <name> up`).
    pub fn set_link_up(&mut self, index: u32) -> Result<(), NetlinkError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.send(
            Asked::SetLinkUp(index),
            RouteNetlinkMessage::SetLink(msg),
            NLM_F_ACK,
            false,
        )
        .map(drop)
    }

    fn one_link(&mut self, what: Asked, msg: LinkMessage) -> Result<Link, NetlinkError> {
        let request = self.label(what.clone());
        self.request(what, RouteNetlinkMessage::GetLink(msg), false)?
            .into_iter()
            .find_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
                _ => None,
            })
            .ok_or(NetlinkError::Protocol {
                request,
                problem: "the reply is not a link",
            })
    }

    fn label(&self, what: Asked) -> Request {
        Request {
            what,
            netns: self.netns.clone(),
        }
    }

    /// Sends `msg` (a dump when `dump`) and reads its whole reply.
    fn request(
        &mut self,
        what: Asked,
        msg: RouteNetlinkMessage,
        dump: bool,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.send(what, msg, if dump { NLM_F_DUMP } else { 0 }, dump)
    }

    /// Sends `msg` with `flags` besides `NLM_F_REQUEST` and reads the reply: every message
    /// until NLMSG_DONE when `dump`, else the first message or the kernel's ACK.
    fn send(
        &mut self,
        what: Asked,
        msg: RouteNetlinkMessage,
        flags: u16,
        dump: bool,
    ) -> Result<Vec<RouteNetlinkMessage>, NetlinkError> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        let io_error = |me: &Self, source: io::Error| NetlinkError::Io {
            request: me.label(what.clone()),
            source,
        };
        self.socket
            .send(&buf, 0)
            .map_err(|source| io_error(self, source))?;
        let mut reply = Reply::new(self.seq, dump);
        loop {
            let (datagram, _) = self
                .socket
                .recv_from_full()
                .map_err(|source| io_error(self, source))?;
            let done = reply.feed(&datagram).map_err(|e| {
                let request = self.label(what.clone());
                match e {
                    ReplyError::Kernel(errno) => NetlinkError::Kernel { request, errno },
                    ReplyError::Decode(source) => NetlinkError::Decode { request, source },
                    ReplyError::Protocol(problem) => NetlinkError::Protocol { request, problem },
                }
            })?;
            if done {
                return Ok(reply.messages);
            }
        }
    }
}

/// One link, asked of a fresh socket.
pub fn link_by_index(index: u32) -> Result<Link, NetlinkError> {
    Netlink::new()?.link_by_index(index)
}

/// One link, asked of a fresh socket.
pub fn link_by_name(name: &str) -> Result<Link, NetlinkError> {
    Netlink::new()?.link_by_name(name)
}

/// `name` as seen inside the network namespace at `netns`.
pub fn link_in_netns(netns: &Path, name: &str) -> Result<Link, NetlinkError> {
    in_netns_thread(netns, || Netlink::open(Some(netns))?.link_by_name(name))?
}

/// Runs `f` on a thread that has entered the network namespace at `netns` (this thread and
/// the rest of the process stay where they are); sockets `f` opens belong to that namespace.
pub fn in_netns_thread<T, F>(netns: &Path, f: F) -> Result<T, NetlinkError>
where
    F: FnOnce() -> T + Send,
    T: Send,
{
    let ns = File::open(netns).map_err(|source| NetlinkError::OpenNetns {
        netns: netns.to_path_buf(),
        source,
    })?;
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|source| {
                NetlinkError::EnterNetns {
                    netns: netns.to_path_buf(),
                    source,
                }
            })?;
            Ok(f())
        })
        .join()
        .map_err(|_| NetlinkError::NetnsThread {
            netns: netns.to_path_buf(),
        })?
    })
}

#[derive(Debug)]
enum ReplyError {
    Kernel(i32),
    Decode(DecodeError),
    Protocol(&'static str),
}

/// The reply to one request, datagram by datagram.
struct Reply {
    seq: u32,
    dump: bool,
    messages: Vec<RouteNetlinkMessage>,
}

impl Reply {
    fn new(seq: u32, dump: bool) -> Self {
        Reply {
            seq,
            dump,
            messages: Vec::new(),
        }
    }

    /// Takes in one datagram; true once the reply is complete. Messages of other sequence
    /// numbers (what an earlier, abandoned request left behind) are skipped.
    fn feed(&mut self, mut datagram: &[u8]) -> Result<bool, ReplyError> {
        let mut done = false;
        while !datagram.is_empty() {
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(datagram)
                .map_err(ReplyError::Decode)?;
            let len = msg.header.length as usize;
            if len == 0 {
                return Err(ReplyError::Protocol("a message of length 0"));
            }
            datagram = &datagram[((len + 3) & !3).min(datagram.len())..];
            if msg.header.sequence_number != self.seq || done {
                continue;
            }
            match msg.payload {
                NetlinkPayload::InnerMessage(m) => {
                    self.messages.push(m);
                    done = !self.dump;
                }
                NetlinkPayload::Done(d) if d.code != 0 => {
                    return Err(ReplyError::Kernel(d.code.abs()));
                }
                NetlinkPayload::Done(_) => done = true,
                NetlinkPayload::Error(e) => match e.code {
                    Some(code) => return Err(ReplyError::Kernel(code.get().abs())),
                    None => done = true, // an ACK
                },
                NetlinkPayload::Overrun(_) => {
                    return Err(ReplyError::Protocol("the kernel's reply overran"));
                }
                _ => {}
            }
        }
        Ok(done)
    }
}

fn link_from(msg: LinkMessage) -> Link {
    let mut link = Link {
        index: msg.header.index,
        name: String::new(),
        link: None,
        kind: None,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name = name,
            LinkAttribute::Link(peer) => link.link = Some(peer),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    if let LinkInfo::Kind(kind) = info {
                        link.kind = Some(kind.to_string());
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn address_from(msg: AddressMessage) -> Option<Address> {
    let (mut local, mut address) = (None, None);
    for attr in msg.attributes {
        match attr {
            AddressAttribute::Local(a) => local = Some(a),
            AddressAttribute::Address(a) => address = Some(a),
            _ => {}
        }
    }
    Some(Address {
        index: msg.header.index,
        address: local.or(address)?,
        prefix_len: msg.header.prefix_len,
    })
}

/// The route, when it is of table main and not cloned. The table is `RTA_TABLE` where the
/// message has one (tables above 255), otherwise the header's.
fn main_route_from(msg: RouteMessage) -> Option<Route> {
    let mut table = u32::from(msg.header.table);
    let (mut destination, mut oif) = (None, None);
    for attr in msg.attributes {
        match attr {
            RouteAttribute::Table(t) => table = t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => destination = Some(a.into()),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => destination = Some(a.into()),
            RouteAttribute::Oif(index) => oif = Some(index),
            _ => {}
        }
    }
    if table != u32::from(RouteHeader::RT_TABLE_MAIN)
        || msg.header.flags.contains(RouteFlags::Cloned)
    {
        return None;
    }
    Some(Route {
        destination,
        prefix_len: msg.header.destination_prefix_length,
        oif,
        kind: msg.header.kind,
        ipv6: msg.header.address_family == AddressFamily::Inet6,
    })
}

/// A socket subscribed to the kernel's notifications of links, addresses and routes (IPv4 and
/// IPv6) in this thread's network namespace, so that the host is dumped again only when it
/// changed. A notification is only a reason to dump: its content is not read.
pub struct HostChanges {
    socket: Socket,
    buf: Vec<u8>,
}

/// `RTNLGRP_*`: the multicast groups of rtnetlink (`linux/rtnetlink.h`).
const RTNLGRP_LINK: u32 = 1;
const RTNLGRP_IPV4_IFADDR: u32 = 5;
const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_IFADDR: u32 = 9;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

impl HostChanges {
    pub fn subscribe() -> Result<Self, NetlinkError> {
        let socket = (|| {
            let mut socket = Socket::new(NETLINK_ROUTE)?;
            socket.bind_auto()?;
            for group in [
                RTNLGRP_LINK,
                RTNLGRP_IPV4_IFADDR,
                RTNLGRP_IPV4_ROUTE,
                RTNLGRP_IPV6_IFADDR,
                RTNLGRP_IPV6_ROUTE,
            ] {
                socket.add_membership(group)?;
            }
            // Room for a burst (a hundred veths created at once); an overflow is not lost
            // either: it reads as a change (ENOBUFS).
            socket.set_rx_buf_sz(1usize << 20)?;
            Ok(socket)
        })()
        .map_err(|source| NetlinkError::Socket {
            netns: None,
            source,
        })?;
        Ok(HostChanges {
            socket,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Reads every notification queued, without waiting: true if there was one, or if some
    /// were dropped for want of room (then the host must be dumped again all the same).
    pub fn take(&mut self) -> bool {
        let mut changed = false;
        loop {
            match self
                .socket
                .recv(&mut &mut self.buf[..], libc::MSG_DONTWAIT | libc::MSG_TRUNC)
            {
                Ok(_) => changed = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return changed,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // ENOBUFS (notifications lost) and anything else: assume a change.
                Err(_) => return true,
            }
        }
    }
}

impl std::os::fd::AsRawFd for HostChanges {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        std::os::fd::AsRawFd::as_raw_fd(&self.socket)
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use netlink_packet_core::{DoneMessage, ErrorMessage, NLM_F_MULTIPART};
    use netlink_packet_route::link::InfoKind;

    use super::*;

    /// One datagram holding `payloads`, each as a message of sequence number `seq`.
    fn datagram(seq: u32, payloads: Vec<NetlinkPayload<RouteNetlinkMessage>>) -> Vec<u8> {
        let mut out = Vec::new();
        for payload in payloads {
            let mut header = NetlinkHeader::default();
            header.sequence_number = seq;
            header.flags = NLM_F_MULTIPART;
            let mut msg = NetlinkMessage::new(header, payload);
            msg.finalize();
            let mut buf = vec![0; msg.buffer_len()];
            msg.serialize(&mut buf);
            buf.resize((buf.len() + 3) & !3, 0);
            out.extend_from_slice(&buf);
        }
        out
    }

    fn veth(index: u32, name: &str, peer: u32) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes = vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::Link(peer),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
        ];
        NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(msg))
    }

    fn done() -> NetlinkPayload<RouteNetlinkMessage> {
        NetlinkPayload::Done(DoneMessage::default())
    }

    fn error(errno: i32) -> NetlinkPayload<RouteNetlinkMessage> {
        let mut e = ErrorMessage::default();
        e.code = std::num::NonZeroI32::new(-errno);
        e.header = vec![0; 16];
        NetlinkPayload::Error(e)
    }

    fn links(reply: Reply) -> Vec<Link> {
        reply
            .messages
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_dump_runs_over_datagrams_to_done() {
        let mut reply = Reply::new(7, true);
        assert!(
            !reply
                .feed(&datagram(7, vec![veth(3, "veth0", 4), veth(4, "veth1", 3)]))
                .unwrap()
        );
        // Left over from an earlier request: skipped.
        assert!(
            !reply
                .feed(&datagram(6, vec![veth(9, "old", 1), done()]))
                .unwrap()
        );
        assert!(
            reply
                .feed(&datagram(7, vec![veth(5, "x", 1), done()]))
                .unwrap()
        );
        let got = links(reply);
        assert_eq!(got.len(), 3);
        assert_eq!(
            got[0],
            Link {
                index: 3,
                name: "veth0".into(),
                link: Some(4),
                kind: Some("veth".into()),
            }
        );
        assert_eq!(got[2].name, "x");
    }

    #[test]
    fn errors_are_the_kernels_errno() {
        let mut reply = Reply::new(1, false);
        match reply.feed(&datagram(1, vec![error(libc::ENODEV)])) {
            Err(ReplyError::Kernel(errno)) => assert_eq!(errno, libc::ENODEV),
            other => panic!("{other:?}"),
        }
        let mut reply = Reply::new(1, true);
        let mut d = DoneMessage::default();
        d.code = -libc::EINTR;
        match reply.feed(&datagram(1, vec![NetlinkPayload::Done(d)])) {
            Err(ReplyError::Kernel(errno)) => assert_eq!(errno, libc::EINTR),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            Reply::new(1, true).feed(&[1, 2, 3]),
            Err(ReplyError::Decode(_))
        ));
        let e = NetlinkError::Kernel {
            request: Request {
                what: Asked::LinkByName("eth0".into()),
                netns: Some("/run/netns/x".into()),
            },
            errno: libc::ENODEV,
        };
        assert!(
            e.to_string()
                .starts_with("link eth0 in netns /run/netns/x: the kernel answered: "),
            "{e}"
        );
        assert_eq!(e.errno(), Some(libc::ENODEV));
    }

    #[test]
    fn a_single_request_ends_with_its_answer() {
        let mut reply = Reply::new(2, false);
        assert!(reply.feed(&datagram(2, vec![veth(3, "veth0", 4)])).unwrap());
        assert_eq!(links(reply)[0].link, Some(4));
    }

    fn route(
        family: AddressFamily,
        table: u8,
        len: u8,
        attrs: Vec<RouteAttribute>,
    ) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header.address_family = family;
        msg.header.table = table;
        msg.header.destination_prefix_length = len;
        msg.header.kind = RouteType::Unicast;
        msg.attributes = attrs;
        msg
    }

    #[test]
    fn routes_of_table_main_from_the_header_or_rta_table() {
        let v4 = Ipv4Addr::new(10, 250, 0, 2);
        let dst = RouteAttribute::Destination(RouteAddress::Inet(v4));
        let main = RouteHeader::RT_TABLE_MAIN;
        let r = main_route_from(route(
            AddressFamily::Inet,
            main,
            32,
            vec![dst.clone(), RouteAttribute::Oif(5)],
        ))
        .unwrap();
        assert_eq!(r.host_destination(), Some(v4.into()));
        assert_eq!(r.oif, Some(5));
        assert!(!r.ipv6);
        // RTA_TABLE decides over the header's field.
        assert!(
            main_route_from(route(
                AddressFamily::Inet,
                main,
                32,
                vec![dst.clone(), RouteAttribute::Table(1000)],
            ))
            .is_none()
        );
        assert!(
            main_route_from(route(
                AddressFamily::Inet,
                252,
                32,
                vec![dst.clone(), RouteAttribute::Table(254)],
            ))
            .is_some()
        );
        assert!(main_route_from(route(AddressFamily::Inet, 255, 32, vec![dst])).is_none());
        // No RTA_DST: the default route, not a host route.
        let default = main_route_from(route(
            AddressFamily::Inet6,
            main,
            0,
            vec![RouteAttribute::Oif(2)],
        ))
        .unwrap();
        assert_eq!(default.destination, None);
        assert_eq!(default.host_destination(), None);
        assert!(default.ipv6);
        let v6: Ipv6Addr = "fd00:250::2".parse().unwrap();
        let net = main_route_from(route(
            AddressFamily::Inet6,
            main,
            64,
            vec![RouteAttribute::Destination(RouteAddress::Inet6(v6))],
        ))
        .unwrap();
        assert_eq!(net.host_destination(), None);
        let mut cloned = route(
            AddressFamily::Inet6,
            main,
            128,
            vec![RouteAttribute::Destination(RouteAddress::Inet6(v6))],
        );
        cloned.header.flags = RouteFlags::Cloned;
        assert!(main_route_from(cloned).is_none());
    }

    #[test]
    fn an_address_is_its_local_one_else_its_address() {
        let mut msg = AddressMessage::default();
        msg.header.index = 4;
        msg.header.prefix_len = 24;
        let (local, peer): (IpAddr, IpAddr) =
            ("10.250.0.1".parse().unwrap(), "10.250.0.9".parse().unwrap());
        msg.attributes = vec![
            AddressAttribute::Address(peer),
            AddressAttribute::Local(local),
        ];
        let a = address_from(msg.clone()).unwrap();
        assert_eq!((a.index, a.address, a.prefix_len), (4, local, 24));
        msg.attributes = vec![AddressAttribute::Address(peer)];
        assert_eq!(address_from(msg.clone()).unwrap().address, peer);
        msg.attributes.clear();
        assert_eq!(address_from(msg), None);
    }

    #[test]
    fn loopback_through_one_socket() {
        let mut nl = Netlink::new().expect("netlink socket");
        let lo = nl.link_by_name("lo").expect("lo");
        assert_eq!((lo.index, lo.name.as_str()), (1, "lo"));
        assert_eq!(nl.link_by_index(1).unwrap().name, "lo");
        let e = nl.link_by_name("no-such-link0").unwrap_err();
        assert_eq!(e.errno(), Some(libc::ENODEV), "{e}");
        assert!(nl.links().unwrap().iter().any(|l| l.name == "lo"));
        assert!(
            nl.addresses()
                .unwrap()
                .iter()
                .any(|a| a.index == 1 && a.address == IpAddr::from(Ipv4Addr::LOCALHOST))
        );
        nl.routes().unwrap();
        // The socket still answers after an error and three dumps.
        assert_eq!(nl.link_by_index(1).unwrap().name, "lo");
    }
}
