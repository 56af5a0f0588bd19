//! Announcing an egress address the node has just taken over: a gratuitous ARP (IPv4) or an
//! unsolicited neighbour advertisement with the override flag (IPv6), so that the neighbour
//! caches of the outside world's routers send its replies to this node at once rather than
//! after their entries for the previous gateway go stale.
use std::net::IpAddr;

use anyhow::{Context, Result};

/// The Ethernet address of `dev` in this network namespace (not from /sys/class/net, which
/// shows the namespace sysfs was mounted in).
fn mac_of(dev: &str) -> Result<[u8; 6]> {
    let out = std::process::Command::new("ip")
        .args(["-o", "link", "show", "dev", dev])
        .output()
        .with_context(|| format!("ip link show dev {dev}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_mac(&text).with_context(|| format!("{dev} has no Ethernet address"))
}

/// The address after `link/ether` in `ip -o link` output.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut words = text.split_whitespace();
    words.find(|w| *w == "link/ether")?;
    let parts: Vec<&str> = words.next()?.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// A gratuitous ARP request for `ip` from `mac` (sender and target address both `ip`).
pub fn garp_frame(ip: [u8; 4], mac: [u8; 6]) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&ip);
    f[32..38].copy_from_slice(&[0; 6]);
    f[38..42].copy_from_slice(&ip);
    f
}

/// An unsolicited neighbour advertisement's ICMPv6 message for `ip` (override set; the kernel
/// fills in the checksum).
pub fn na_message(ip: [u8; 16], mac: [u8; 6]) -> [u8; 32] {
    let mut m = [0u8; 32];
    m[0] = 136;
    m[4] = 0x20; // override
    m[8..24].copy_from_slice(&ip);
    m[24] = 2; // target link-layer address
    m[25] = 1;
    m[26..32].copy_from_slice(&mac);
    m
}

fn last_os_error(what: &str) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", std::io::Error::last_os_error())
}

struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        unsafe { libc::close(self.0) };
    }
}

/// Announces `ip`, held on `dev`.
pub fn announce(ip: IpAddr, dev: &str) -> Result<()> {
    let mac = mac_of(dev)?;
    let ifindex = nix::net::if_::if_nametoindex(dev).with_context(|| format!("device {dev}"))?;
    match ip {
        IpAddr::V4(a) => {
            let frame = garp_frame(a.octets(), mac);
            // SAFETY: plain socket calls on a descriptor this function owns.
            unsafe {
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    i32::from((libc::ETH_P_ARP as u16).to_be()),
                );
                if fd < 0 {
                    return Err(last_os_error("AF_PACKET socket"));
                }
                let fd = Fd(fd);
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
                sll.sll_ifindex = ifindex as i32;
                sll.sll_halen = 6;
                sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
                let n = libc::sendto(
                    fd.0,
                    frame.as_ptr().cast(),
                    frame.len(),
                    0,
                    (&raw const sll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                if n < 0 {
                    return Err(last_os_error("sending a gratuitous ARP"));
                }
            }
        }
        IpAddr::V6(a) => {
            let msg = na_message(a.octets(), mac);
            // SAFETY: as above.
            unsafe {
                let fd = libc::socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_ICMPV6);
                if fd < 0 {
                    return Err(last_os_error("ICMPv6 socket"));
                }
                let fd = Fd(fd);
                let hops: i32 = 255;
                libc::setsockopt(
                    fd.0,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_MULTICAST_HOPS,
                    (&raw const hops).cast(),
                    4,
                );
                let idx = ifindex as i32;
                libc::setsockopt(
                    fd.0,
                    libc::IPPROTO_IPV6,
                    libc::IPV6_MULTICAST_IF,
                    (&raw const idx).cast(),
                    4,
                );
                let mut src: libc::sockaddr_in6 = std::mem::zeroed();
                src.sin6_family = libc::AF_INET6 as u16;
                src.sin6_addr.s6_addr = a.octets();
                if libc::bind(
                    fd.0,
                    (&raw const src).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as u32,
                ) < 0
                {
                    return Err(last_os_error("binding to the egress address"));
                }
                let mut dst: libc::sockaddr_in6 = std::mem::zeroed();
                dst.sin6_family = libc::AF_INET6 as u16;
                dst.sin6_addr.s6_addr = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
                dst.sin6_scope_id = ifindex;
                let n = libc::sendto(
                    fd.0,
                    msg.as_ptr().cast(),
                    msg.len(),
                    0,
                    (&raw const dst).cast(),
                    std::mem::size_of::<libc::sockaddr_in6>() as u32,
                );
                if n < 0 {
                    return Err(last_os_error("sending a neighbour advertisement"));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mac_is_read_from_ip_link() {
        let line = "3: up0@if4: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 qdisc noqueue state UP mode DEFAULT group default qlen 1000\\    link/ether 7e:12:55:5e:66:01 brd ff:ff:ff:ff:ff:ff link-netns x";
        assert_eq!(parse_mac(line), Some([0x7e, 0x12, 0x55, 0x5e, 0x66, 0x01]));
        assert_eq!(
            parse_mac("1: lo: <LOOPBACK> link/loopback 00:00:00:00:00:00"),
            None
        );
    }

    #[test]
    fn frames_say_what_they_should() {
        let f = garp_frame([10, 0, 0, 9], [2, 0, 0, 0, 0, 1]);
        assert_eq!(&f[12..14], &[8, 6]);
        assert_eq!(&f[28..32], &[10, 0, 0, 9], "sender");
        assert_eq!(&f[38..42], &[10, 0, 0, 9], "target: the same (gratuitous)");
        let m = na_message(
            [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9],
            [2, 0, 0, 0, 0, 1],
        );
        assert_eq!((m[0], m[4]), (136, 0x20));
        assert_eq!(&m[26..32], &[2, 0, 0, 0, 0, 1]);
    }
}
