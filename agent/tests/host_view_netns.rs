//! `HostView::read` (rtnetlink) against what iproute2's JSON says, inside a network namespace
//! of the test's own: a veth pair, a bridge, IPv4 and IPv6 addresses (one with a peer), host
//! routes /32 and /128, a prefix route, default routes, a route of another table, a blackhole
//! and an IPv6 `local` route in table main (which `ip` does not list).
mod support;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    process::Command,
};

use palisade::interfaces::HostView;
use palisade_datapath::netlink;
use serde::Deserialize;

/// A network namespace made with `ip netns add`, deleted on drop.
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!("pal-hv-{}-{nanos:x}", std::process::id());
        ip(&["netns", "add", &name]);
        Netns { name }
    }

    fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <netns> <args>`, which must succeed.
    fn ip(&self, args: &str) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend(args.split_whitespace());
        ip(&all);
    }

    /// `ip -n <netns> -j <args>`'s output.
    fn ip_json(&self, args: &str) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-j"])
            .args(args.split_whitespace())
            .output()
            .expect("running ip");
        assert!(
            out.status.success(),
            "ip -j {args}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("running ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Deserialize)]
struct JsonLink {
    ifindex: u32,
    ifname: String,
    #[serde(default)]
    addr_info: Vec<JsonAddr>,
    linkinfo: Option<JsonKind>,
}

#[derive(Deserialize)]
struct JsonKind {
    info_kind: Option<String>,
}

#[derive(Deserialize)]
struct JsonAddr {
    local: Option<IpAddr>,
}

#[derive(Deserialize)]
struct JsonRoute {
    dst: String,
    dev: Option<String>,
}

/// The view as iproute2 gives it: links and kinds of `ip -j -d addr show`, its `local`
/// addresses sorted and deduplicated, and as host routes those routes of `ip -j -4/-6 route
/// show table main` with a device whose dst is an address without a prefix.
fn ip_view(ns: &Netns) -> HostView {
    let mut view = HostView::default();
    let links: Vec<JsonLink> = serde_json::from_str(&ns.ip_json("-d addr show")).unwrap();
    for l in links {
        view.addresses
            .extend(l.addr_info.iter().filter_map(|a| a.local));
        if let Some(kind) = l.linkinfo.and_then(|k| k.info_kind) {
            view.kinds.insert(l.ifname.clone(), kind);
        }
        view.links.insert(l.ifname, l.ifindex);
    }
    view.addresses.sort();
    view.addresses.dedup();
    for family in ["-4", "-6"] {
        let routes: Vec<JsonRoute> =
            serde_json::from_str(&ns.ip_json(&format!("{family} route show table main"))).unwrap();
        for r in routes {
            if let (Some(dev), false, Ok(addr)) =
                (r.dev, r.dst.contains('/'), r.dst.parse::<IpAddr>())
            {
                view.host_routes.insert(addr, dev);
            }
        }
    }
    view
}

#[test]
fn host_view_is_what_iproute2_says() {
    if !support::root_or("skipping: needs root (network namespaces)") {
        return;
    }
    let ns = Netns::new();
    for cmd in [
        "link set lo up",
        "link add vh0 type veth peer name vp0",
        "link add br0 type bridge",
        "link set vp0 master br0",
        "link set vh0 up",
        "link set vp0 up",
        "link set br0 up",
        "addr add 10.250.0.1/24 dev br0",
        "addr add fd00:250::1/64 dev br0 nodad",
        "addr add 10.250.1.1/32 dev vh0",
        "addr add fd00:250:1::1/64 dev vh0 nodad",
        "addr add 10.250.2.1 peer 10.250.2.2 dev vh0",
        // Host routes, one per family.
        "route add 10.250.1.5/32 dev vh0",
        "-6 route add fd00:250:1::5/128 dev vh0",
        // Not host routes: a prefix, the defaults (no RTA_DST), another table, no device,
        // and an IPv6 `local` route in table main (which iproute2 does not list).
        "route add 10.250.3.0/24 dev vh0",
        "route add default dev br0",
        "-6 route add default dev br0",
        "route add 10.250.4.4/32 dev vh0 table 100",
        "-6 route add fd00:250:4::4/128 dev vh0 table 100",
        "route add blackhole 10.250.5.5/32",
        "-6 route add local fd00:250:6::6/128 dev vh0 table main",
    ] {
        ns.ip(cmd);
    }
    // The kernel settles (link-local addresses, their routes) while we read: read until
    // iproute2 says the same before and after.
    let mut tries = 0;
    let (before, got) = loop {
        let before = ip_view(&ns);
        let got = netlink::in_netns_thread(&ns.path(), HostView::read)
            .expect("entering the test netns")
            .expect("HostView::read in the test netns");
        if ip_view(&ns) == before || tries == 20 {
            break (before, got);
        }
        tries += 1;
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(got, before, "HostView::read against iproute2");

    // And the view is the one set up (so the comparison above is not between two empties).
    let addr = |s: &str| s.parse::<IpAddr>().unwrap();
    for name in ["lo", "vh0", "vp0", "br0"] {
        assert!(got.links.contains_key(name), "{name} in {:?}", got.links);
    }
    assert_eq!(got.kinds.get("vh0").map(String::as_str), Some("veth"));
    assert_eq!(got.kinds.get("vp0").map(String::as_str), Some("veth"));
    assert_eq!(got.kinds.get("br0").map(String::as_str), Some("bridge"));
    assert!(!got.kinds.contains_key("lo"));
    for a in [
        "127.0.0.1",
        "::1",
        "10.250.0.1",
        "fd00:250::1",
        "10.250.1.1",
        "fd00:250:1::1",
        "10.250.2.1",
    ] {
        assert!(
            got.addresses.contains(&addr(a)),
            "{a} in {:?}",
            got.addresses
        );
    }
    assert!(
        !got.addresses.contains(&addr("10.250.2.2")),
        "a peer is not ours"
    );
    let mut sorted = got.addresses.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted, got.addresses);
    let want: BTreeMap<IpAddr, String> = [
        (addr("10.250.1.5"), "vh0".to_string()),
        (addr("fd00:250:1::5"), "vh0".to_string()),
        // The kernel's route to the peer of `10.250.2.1 peer 10.250.2.2`: a /32.
        (addr("10.250.2.2"), "vh0".to_string()),
    ]
    .into();
    assert_eq!(got.host_routes, want);
}

#[test]
fn a_link_in_a_netns_and_its_peer() {
    if !support::root_or("skipping: needs root (network namespaces)") {
        return;
    }
    let ns = Netns::new();
    ns.ip("link add vh0 type veth peer name vp0");
    let vh0 = netlink::link_in_netns(&ns.path(), "vh0").expect("vh0 in the test netns");
    let vp0 = netlink::link_in_netns(&ns.path(), "vp0").expect("vp0 in the test netns");
    assert_eq!(vh0.kind.as_deref(), Some("veth"));
    assert_eq!(vh0.link, Some(vp0.index));
    assert_eq!(vp0.link, Some(vh0.index));
    let e = netlink::link_in_netns(&ns.path(), "nosuch0").unwrap_err();
    assert_eq!(e.errno(), Some(libc::ENODEV), "{e}");
    assert!(
        e.to_string()
            .starts_with(&format!("link nosuch0 in netns {}: ", ns.path().display())),
        "{e}"
    );
}

/// The agent dumps the host again only after a notification (`netlink::HostChanges`): a link,
/// an address or a route added in the namespace is one; nothing happening is none; many
/// changes at once are at least one.
#[test]
fn the_kernel_says_when_the_host_changed() {
    if !support::root_or("skipping: needs root (network namespaces)") {
        return;
    }
    let ns = Netns::new();
    ns.ip("link set lo up");
    let mut changes = netlink::in_netns_thread(&ns.path(), netlink::HostChanges::subscribe)
        .expect("entering the test netns")
        .expect("subscribing in the test netns");
    // Drained, and settled (the kernel may still be adding what `lo up` brings): nothing
    // since.
    changes.take();
    std::thread::sleep(std::time::Duration::from_millis(200));
    changes.take();
    assert!(!changes.take(), "a notification with nothing changed");
    for cmd in [
        "link add vh0 type veth peer name vp0",
        "link set vh0 up",
        "addr add 10.251.0.1/24 dev vh0",
        "route add 10.251.1.5/32 dev vh0",
        "-6 route add fd00:251::5/128 dev vh0",
        "link del vh0",
    ] {
        ns.ip(cmd);
        assert!(changes.take(), "no notification after `ip {cmd}`");
    }
    for i in 0..200 {
        ns.ip(&format!(
            "addr add 10.252.{}.{}/32 dev lo",
            i / 250,
            i % 250 + 1
        ));
    }
    assert!(changes.take(), "no notification after 200 addresses");
}
