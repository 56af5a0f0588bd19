//! FQDN egress on the netns rig: pods `a` and `b` may reach the domains a ClusterNetworkPolicy
//! names (and the cluster's DNS server, the pod `dns`, which runs the test crate's DNS server),
//! nothing else outside. The "internet" is the namespace `ext`, not a pod of the cluster, which
//! owns the documentation ranges (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) and serves
//! TCP 80 and UDP 80 on every address of them.
mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant, SystemTime};

use palisade_common::capacity;
use palisade_tests::{
    agent::{AgentProcess, WorkDir, agent_binary},
    dns::{DnsServer, Record, Zone, resolve},
    netns,
    rig::{Node, Pod, require_root},
};
use support::{demo_node, wait_for};

const POLICY: &str = r#"
apiVersion: policy.networking.k8s.io/v1alpha2
kind: ClusterNetworkPolicy
metadata: {name: allow-domains}
spec:
  tier: Admin
  priority: 10
  subject:
    pods:
      namespaceSelector: {}
      podSelector: {matchExpressions: [{key: app, operator: In, values: [a, b]}]}
  egress:
    - name: dns
      action: Accept
      to: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: dns}}}}]
      protocols: [{udp: {destinationPort: {number: 53}}}, {tcp: {destinationPort: {number: 53}}}]
    - name: names
      action: Accept
      to: [{domainNames: [allowed.test, "*.race.test", "*.many.test", "www.alias.test"]}]
      protocols: [{tcp: {destinationPort: {number: 80}}}, {udp: {destinationPort: {number: 80}}}]
    - name: nothing-else
      action: Deny
      to: [{networks: [0.0.0.0/0, "::/0"]}]
"#;

/// The addresses `r<N>.race.test` resolve to: each name an address of its own.
fn race_address(n: u32) -> Option<IpAddr> {
    match n {
        0..250 => Some(Ipv4Addr::new(198, 51, 100, (n + 1) as u8).into()),
        250..500 => Some(Ipv4Addr::new(203, 0, 113, (n - 249) as u8).into()),
        _ => None,
    }
}

fn zone() -> Zone {
    let mut z = Zone::default();
    let a = |ip: [u8; 4], ttl| Record::Addr(Ipv4Addr::from(ip).into(), ttl);
    z.names
        .insert("allowed.test".into(), vec![a([192, 0, 2, 10], 30)]);
    z.names
        .insert("other.test".into(), vec![a([192, 0, 2, 20], 30)]);
    z.names.insert(
        "www.alias.test".into(),
        vec![Record::Cname("edge.cdn.test".into(), 30)],
    );
    z.names
        .insert("edge.cdn.test".into(), vec![a([192, 0, 2, 30], 30)]);
    z.names.insert(
        "direct.cdn.test".into(),
        vec![Record::Cname("edge.cdn.test".into(), 30)],
    );
    // More records than a UDP answer holds: truncated, then over TCP.
    z.names.insert(
        "big.many.test".into(),
        (1..=120).map(|i| a([192, 0, 2, i], 30)).collect(),
    );
    z.generate = Some(Box::new(|name: &str| {
        let n: u32 = name
            .strip_prefix('r')?
            .strip_suffix(".race.test")?
            .parse()
            .ok()?;
        Some(vec![Record::Addr(race_address(n)?, 30)])
    }));
    z
}

struct Rig {
    node: Node,
    agent: AgentProcess,
    _work: WorkDir,
    _dns: DnsServer,
}

impl Rig {
    fn pod(&self, name: &str) -> &Pod {
        support::demo_pod(&self.node, name)
    }

    fn dns_ip(&self) -> IpAddr {
        self.pod("dns").ip(false)
    }

    /// Resolves `name` from `pod`, then at once opens a TCP connection to the first address
    /// on port 80: (address, connected).
    fn resolve_and_connect(&self, pod: &str, name: &str) -> (IpAddr, bool) {
        let server = self.dns_ip();
        let name = name.to_string();
        self.pod(pod)
            .in_netns(move || {
                let ips = resolve(server, &name, false, Duration::from_secs(3))
                    .unwrap_or_else(|e| panic!("resolving {name}: {e:#}"));
                let ip = ips[0];
                let ok = TcpStream::connect_timeout(
                    &SocketAddr::new(ip, 80),
                    Duration::from_millis(500),
                )
                .is_ok();
                (ip, ok)
            })
            .expect("pod netns")
    }

    fn connects(&self, pod: &str, ip: IpAddr) -> bool {
        self.pod(pod)
            .in_netns(move || {
                TcpStream::connect_timeout(&SocketAddr::new(ip, 80), Duration::from_millis(500))
                    .is_ok()
            })
            .expect("pod netns")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.agent.log_path()).unwrap_or_default()
    }
}

/// The node (pods a, b, dns of the cluster; ext outside it), the DNS server in `dns`, and the
/// agent with `POLICY`, trusting `dns`, with `args`.
fn rig(tag: &str, args: &[&str]) -> Rig {
    rig_with(tag, false, args)
}

/// `rig`, dual-stack if `ipv6` (ext then owns 2001:db8::/32 too).
fn rig_with(tag: &str, ipv6: bool, args: &[&str]) -> Rig {
    let node = demo_node(&["a", "b", "dns", "ext"], ipv6);
    let ext = support::demo_pod(&node, "ext");
    // The internet: ext answers on the documentation ranges, the node routes them to it.
    let mut ranges = vec!["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24"];
    if ipv6 {
        ranges.push("2001:db8::/32");
    }
    netns::ip_batch(
        Some(&ext.netns_name),
        &ranges
            .iter()
            .map(|r| format!("route add local {r} dev lo"))
            .collect::<Vec<_>>(),
    )
    .expect("ext's addresses");
    netns::ip_batch(
        Some(&node.netns_name),
        &ranges
            .iter()
            .map(|r| match r.contains(':') {
                // IPv6 neighbour discovery answers only for assigned addresses: next hop ext.
                true => format!("route add {r} via {} dev {}", ext.ip(true), ext.host_ifname),
                false => format!("route add {r} dev {}", ext.host_ifname),
            })
            .collect::<Vec<_>>(),
    )
    .expect("routes to ext");
    let dns =
        DnsServer::start(&support::demo_pod(&node, "dns").netns_name, zone()).expect("DNS server");
    let work = WorkDir::new(tag);
    let manifests = work.manifests();
    let mut cluster = String::from(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo, labels: {kubernetes.io/metadata.name: demo}}\n",
    );
    for name in ["a", "b", "dns"] {
        let pod = support::demo_pod(&node, name);
        let ip = pod.ip(false);
        let ips = pod
            .ips()
            .iter()
            .map(|ip| format!("{{ip: '{ip}'}}"))
            .collect::<Vec<_>>()
            .join(", ");
        cluster.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{app: {name}}}}}\n\
             spec: {{containers: [{{name: c}}]}}\nstatus: {{podIP: '{ip}', podIPs: [{ips}]}}\n"
        ));
    }
    std::fs::write(manifests.join("cluster.yaml"), cluster).unwrap();
    std::fs::write(manifests.join("fqdn.yaml"), POLICY).unwrap();
    let dns_ips: Vec<String> = support::demo_pod(&node, "dns")
        .ips()
        .iter()
        .map(|ip| ip.to_string())
        .collect();
    let mut all_args = Vec::new();
    for ip in &dns_ips {
        all_args.extend(["--dns-server", ip.as_str()]);
    }
    all_args.extend_from_slice(args);
    let since = SystemTime::now();
    let mut agent =
        AgentProcess::start_with(&node, &agent_binary(), &manifests, work.path(), &all_args)
            .expect("agent");
    agent
        .wait_reconciled(since, 3, Duration::from_secs(60))
        .expect("agent reconciles");
    Rig {
        node,
        agent,
        _work: work,
        _dns: dns,
    }
}

/// `rounds` times: resolve a name never resolved before, connect at once to its address.
/// The rounds whose connection failed.
fn race(r: &Rig, pod: &str, rounds: u32, timeout: Duration) -> Vec<String> {
    let server = r.dns_ip();
    r.pod(pod)
        .in_netns(move || {
            let mut failed = Vec::new();
            for n in 0..rounds {
                let name = format!("r{n}.race.test");
                let ips = resolve(server, &name, false, Duration::from_secs(3))
                    .unwrap_or_else(|e| panic!("resolving {name}: {e:#}"));
                let ok = TcpStream::connect_timeout(&SocketAddr::new(ips[0], 80), timeout).is_ok();
                if !ok {
                    failed.push(format!("{name} ({})", ips[0]));
                }
            }
            failed
        })
        .expect("pod netns")
}

#[test]
fn a_connection_made_right_after_the_answer_is_never_dropped() {
    if !require_root() {
        return;
    }
    let r = rig("fqdn-race", &[]);
    let started = Instant::now();
    let failed = race(&r, "a", 500, Duration::from_millis(500));
    println!(
        "hold on: 500 resolve-then-connect rounds in {:?}, {} failed",
        started.elapsed(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "connections dropped right after their answer: {failed:?}\nagent log: {}",
        r.agent.log_path().display()
    );
    // Learned for `a` only: `b` never asked, and the addresses stay closed to it.
    let ip = race_address(7).unwrap();
    assert!(
        !r.connects("b", ip),
        "b reaches {ip}, which only a resolved"
    );
}

#[test]
fn without_holding_the_race_is_seen() {
    if !require_root() {
        return;
    }
    let r = rig("fqdn-nohold", &["--fqdn-hold", "off"]);
    // A dropped SYN is sent again only after a second: a connection that waits 100 ms sees
    // whether the first one passed.
    let failed = race(&r, "a", 200, Duration::from_millis(100));
    println!(
        "hold off: 200 resolve-then-connect rounds, {} failed",
        failed.len()
    );
    assert!(
        !failed.is_empty(),
        "no round failed without holding: the race test cannot see the race"
    );
    // The answers are still learned, only late: a moment after the answer, it connects.
    let (ip, _) = r.resolve_and_connect("a", "r300.race.test");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        r.connects("a", ip),
        "a cannot reach {ip} even after learning it"
    );
}

#[test]
fn only_the_names_of_the_policy_open_and_only_after_their_answer() {
    if !require_root() {
        return;
    }
    let r = rig("fqdn-allow", &[]);
    let allowed: IpAddr = "192.0.2.10".parse().unwrap();
    // Before any lookup: closed.
    assert!(
        !r.connects("a", allowed),
        "a reaches allowed.test before resolving it"
    );
    let got = r.resolve_and_connect("a", "allowed.test");
    assert_eq!(got, (allowed, true));
    assert_eq!(
        r.resolve_and_connect("a", "ALLOWED.test."),
        (allowed, true),
        "case and a trailing dot do not matter"
    );
    // A name no pattern matches opens nothing (DNS itself is not filtered).
    let other: IpAddr = "192.0.2.20".parse().unwrap();
    assert_eq!(r.resolve_and_connect("a", "other.test"), (other, false));
    // A CNAME chain in one answer: the rule names the alias, the address is the target's.
    let edge: IpAddr = "192.0.2.30".parse().unwrap();
    assert_eq!(r.resolve_and_connect("a", "www.alias.test"), (edge, true));
    // The same address asked by a name the policy does not name opens nothing for b.
    assert_eq!(r.resolve_and_connect("b", "direct.cdn.test"), (edge, false));
    // A truncated answer retried over TCP: all 120 addresses learned.
    let (first, ok) = r.resolve_and_connect("b", "big.many.test");
    assert!(
        ok,
        "b cannot reach {first} after resolving big.many.test over TCP"
    );
    let last: IpAddr = "192.0.2.120".parse().unwrap();
    assert!(
        r.connects("b", last),
        "the 120th address of the TCP answer was not learned"
    );
    assert!(!r.log().contains("panicked"));
}

/// `resolve` with up to `tries` attempts (a stub resolver retries a lost answer).
fn resolve_retrying(pod: &Pod, server: IpAddr, name: &str, tries: u32) -> Option<Vec<IpAddr>> {
    let name = name.to_string();
    pod.in_netns(move || {
        (0..tries).find_map(|_| resolve(server, &name, false, Duration::from_millis(700)).ok())
    })
    .expect("pod netns")
}

#[test]
fn dns_and_learned_addresses_outlive_the_agent_and_answers_meanwhile_are_learned_after() {
    if !require_root() {
        return;
    }
    let mut r = rig("fqdn-restart", &[]);
    let allowed: IpAddr = "192.0.2.10".parse().unwrap();
    assert_eq!(r.resolve_and_connect("a", "allowed.test"), (allowed, true));
    let mut conn = r
        .pod("a")
        .in_netns(move || {
            TcpStream::connect_timeout(&SocketAddr::new(allowed, 80), Duration::from_secs(2))
        })
        .unwrap()
        .expect("a long connection to allowed.test");
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();

    r.agent.kill();
    let killed = Instant::now();
    // An answer held when the agent died is lost; the resolver's retry gets through once the
    // heartbeat is stale (1 s).
    let server = r.dns_ip();
    let first = resolve_retrying(r.pod("a"), server, "r11.race.test", 5);
    println!(
        "first lookup after kill -9 answered after {:?}",
        killed.elapsed()
    );
    assert!(
        first.is_some(),
        "DNS does not come back while the agent is down"
    );
    // Without the agent: DNS answers, learned addresses stay open, the rest stays closed.
    let mut answered = 0;
    for n in 20..40 {
        if resolve_retrying(r.pod("a"), server, &format!("r{n}.race.test"), 1).is_some() {
            answered += 1;
        }
    }
    println!("while the agent is down: {answered} of 20 lookups answered at once");
    assert_eq!(answered, 20, "lookups failed while the agent was down");
    assert!(
        r.connects("a", allowed),
        "a learned address closed with the agent"
    );
    assert!(
        !r.connects("a", "192.0.2.20".parse().unwrap()),
        "enforcement lapsed"
    );
    let down_learned = race_address(25).unwrap();
    assert!(
        !r.connects("a", down_learned),
        "an address answered while no agent ran is open before any agent read it"
    );

    let since = SystemTime::now();
    let manifests = r._work.manifests();
    r.agent
        .spawn(&r.node, &agent_binary(), &manifests)
        .expect("restart");
    r.agent
        .wait_reconciled(since, 3, Duration::from_secs(30))
        .expect("restarted");
    // The answers given meanwhile were read from the pinned backlog: no new lookup needed.
    assert!(
        r.connects("a", down_learned),
        "an answer given while the agent was down was not learned when it came back"
    );
    use std::io::{Read, Write};
    let mut buf = [0u8; 1];
    conn.write_all(&[7]).unwrap();
    conn.read_exact(&mut buf)
        .expect("the connection to a learned address survives the restart");
    // And holding is back.
    let failed = race(&r, "a", 50, Duration::from_millis(500));
    assert!(failed.is_empty(), "after the restart: {failed:?}");
}

#[test]
fn untrusted_and_forged_answers_teach_nothing() {
    if !require_root() {
        return;
    }
    let r = rig("fqdn-spoof", &[]);
    let evil: IpAddr = "192.0.2.66".parse().unwrap();
    // An answer for a name the policy names, claiming to come from the trusted server (its
    // address forged, from the node), to a port a listens on, but to no query a sent.
    let a_ip = r.pod("a").ip(false);
    let dns_ip = r.dns_ip();
    // a listens where the forged answer goes, as a resolver waiting for its answer would.
    let listener = r
        .pod("a")
        .in_netns(move || std::net::UdpSocket::bind((a_ip, 5353)).unwrap())
        .unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let forged = forged_answer("allowed.test", evil);
    r.node
        .in_netns(move || {
            // The trusted server's address, which the node does not own.
            let s = socket2_free_bind(dns_ip, 53);
            s.send_to(&forged, SocketAddr::new(a_ip, 5353)).unwrap();
        })
        .unwrap();
    let mut buf = [0u8; 1500];
    let got = listener.recv(&mut buf);
    assert!(
        got.is_ok(),
        "the forged answer did not even arrive: the test proves nothing"
    );
    assert!(
        !r.connects("a", evil),
        "a forged answer (the trusted server's address, no query) opened {evil}"
    );
    // A resolver the agent does not trust (ext, which the policy lets a ask) answers a name
    // the policy names with an address of its choosing: a gets the answer, learns nothing.
    let ext = r.pod("ext").ip(false);
    let since = SystemTime::now();
    std::fs::write(
        r._work.manifests().join("ext-dns.yaml"),
        format!(
            "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n\
             metadata: {{name: ask-ext}}\nspec:\n  tier: Admin\n  priority: 5\n  subject: \
             {{pods: {{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: a}}}}}}}}\n  \
             egress:\n    - {{action: Accept, to: [{{networks: ['{ext}/32']}}], \
             protocols: [{{udp: {{destinationPort: {{number: 53}}}}}}]}}\n"
        ),
    )
    .unwrap();
    let agent_wait = || {
        r.agent.status().is_some_and(|s| {
            s.started_at_unix_ms > palisade_tests::agent::unix_ms(since) && s.errors.is_empty()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent_wait() {
        assert!(
            Instant::now() < deadline,
            "the agent did not take ext-dns.yaml"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut rogue = Zone::default();
    rogue
        .names
        .insert("allowed.test".into(), vec![Record::Addr(evil, 300)]);
    let _rogue = DnsServer::start(&r.pod("ext").netns_name, rogue).expect("rogue DNS server");
    let got = r
        .pod("a")
        .in_netns(move || resolve(ext, "allowed.test", false, Duration::from_secs(3)))
        .unwrap()
        .expect("the untrusted resolver answers");
    assert_eq!(got, [evil]);
    assert!(
        !r.connects("a", evil),
        "an untrusted resolver's answer opened {evil}"
    );
    let stats = r.agent.cli_json(&["stats"]).expect("palisade stats");
    assert!(
        stats["counters"]["dns_untrusted"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    // The real answer still teaches.
    assert_eq!(
        r.resolve_and_connect("a", "allowed.test"),
        ("192.0.2.10".parse().unwrap(), true)
    );
    assert!(!r.connects("a", evil));
}

/// A UDP socket bound to, and sending from, an address the namespace does not own
/// (IP_FREEBIND, IP_TRANSPARENT).
fn socket2_free_bind(ip: IpAddr, port: u16) -> std::net::UdpSocket {
    use std::os::fd::FromRawFd;
    let IpAddr::V4(v4) = ip else {
        panic!("IPv4 only")
    };
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        assert!(fd >= 0);
        let one: libc::c_int = 1;
        for opt in [libc::IP_FREEBIND, libc::IP_TRANSPARENT] {
            let rc = libc::setsockopt(
                fd,
                libc::SOL_IP,
                opt,
                (&one as *const libc::c_int).cast(),
                4,
            );
            assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as u16,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(v4).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        );
        assert_eq!(rc, 0, "bind: {}", std::io::Error::last_os_error());
        std::net::UdpSocket::from_raw_fd(fd)
    }
}

/// A DNS answer `name A ip`.
fn forged_answer(name: &str, ip: IpAddr) -> Vec<u8> {
    use simple_dns::{CLASS, Name, Packet, QCLASS, QTYPE, Question, ResourceRecord, TYPE, rdata};
    let IpAddr::V4(v4) = ip else { panic!() };
    let mut p = Packet::new_reply(1);
    p.questions.push(Question::new(
        Name::new_unchecked(name),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    p.answers.push(ResourceRecord::new(
        Name::new_unchecked(name),
        CLASS::IN,
        300,
        rdata::RData::A(rdata::A {
            address: u32::from(v4),
        }),
    ));
    p.build_bytes_vec().unwrap()
}

#[test]
fn ttls_bound_new_connections_not_open_ones() {
    if !require_root() {
        return;
    }
    let r = rig("fqdn-ttl", &["--fqdn-min-ttl", "1"]);
    r._dns.zone.lock().unwrap().names.insert(
        "short.race.test".into(),
        vec![Record::Addr("203.0.113.200".parse().unwrap(), 1)],
    );
    r._dns.zone.lock().unwrap().names.insert(
        "zero.race.test".into(),
        vec![Record::Addr("203.0.113.201".parse().unwrap(), 0)],
    );
    // TTL 0: the floor still admits the connection that follows the answer.
    let (_, ok) = r.resolve_and_connect("a", "zero.race.test");
    assert!(
        ok,
        "a TTL-0 answer did not admit the connection right after it"
    );
    let (short, ok) = r.resolve_and_connect("a", "short.race.test");
    assert!(ok);
    let mut conn = r
        .pod("a")
        .in_netns(move || {
            TcpStream::connect_timeout(&SocketAddr::new(short, 80), Duration::from_secs(2))
        })
        .unwrap()
        .expect("a connection within the TTL");
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    // Past the TTL (and past a GC round, 5 s): new connections are refused...
    std::thread::sleep(Duration::from_millis(6500));
    assert!(
        !r.connects("a", short),
        "a new connection after the TTL passed"
    );
    // ...the open one goes on.
    use std::io::{Read, Write};
    let mut buf = [0u8; 1];
    conn.write_all(&[7]).unwrap();
    conn.read_exact(&mut buf)
        .expect("an open connection died with its answer's TTL");
    // A new answer opens it again.
    assert_eq!(r.resolve_and_connect("a", "short.race.test"), (short, true));
}

#[test]
fn aaaa_answers_open_ipv6_and_an_a_answer_leaves_them_open() {
    if !require_root() {
        return;
    }
    let r = rig_with("fqdn-v6", true, &[]);
    {
        let mut z = r._dns.zone.lock().unwrap();
        z.names.insert(
            "allowed.test".into(),
            vec![
                Record::Addr("192.0.2.10".parse().unwrap(), 30),
                Record::Addr("2001:db8::10".parse().unwrap(), 30),
            ],
        );
    }
    let server6 = r.pod("dns").ip(true);
    let v6: IpAddr = "2001:db8::10".parse().unwrap();
    assert!(!r.connects("a", v6), "open before any lookup");
    // AAAA, asked over IPv6.
    let got = r
        .pod("a")
        .in_netns(move || resolve(server6, "allowed.test", true, Duration::from_secs(3)))
        .unwrap()
        .expect("AAAA lookup");
    assert_eq!(got, [v6]);
    assert!(r.connects("a", v6), "the AAAA answer did not open {v6}");
    // An A answer for the same name adds its address and leaves the AAAA one.
    assert_eq!(
        r.resolve_and_connect("a", "allowed.test"),
        ("192.0.2.10".parse().unwrap(), true)
    );
    assert!(
        r.connects("a", v6),
        "an A answer closed the AAAA-learned {v6}"
    );
    // A name the policy does not name stays closed over IPv6 too.
    let other6: IpAddr = "2001:db8::20".parse().unwrap();
    r._dns
        .zone
        .lock()
        .unwrap()
        .names
        .insert("other.test".into(), vec![Record::Addr(other6, 30)]);
    let got = r
        .pod("a")
        .in_netns(move || resolve(server6, "other.test", true, Duration::from_secs(3)))
        .unwrap()
        .expect("AAAA lookup");
    assert_eq!(got, [other6]);
    assert!(!r.connects("a", other6));
}

/// Whether the agent has DNS_ANSWERS mapped: a BPF map mapping of the ring's data twice over.
fn answers_mapped(pid: u32) -> bool {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("the agent's maps");
    maps.lines().any(|l| {
        let mut f = l.split_whitespace();
        let range = f.next().unwrap_or("");
        let path = f.nth(4).unwrap_or("");
        let (a, b) = range.split_once('-').unwrap_or(("0", "0"));
        let size =
            u64::from_str_radix(b, 16).unwrap_or(0) - u64::from_str_radix(a, 16).unwrap_or(0);
        path.starts_with("anon_inode:bpf") && size >= 2 * u64::from(capacity::DNS_ANSWERS_BYTES)
    })
}

#[test]
fn the_answers_ring_is_read_only_while_a_policy_names_domains() {
    if !require_root() {
        return;
    }
    let mut r = rig("fqdn-lazy", &[]);
    let pid = r.agent.pid().expect("running");
    wait_for(
        "DNS_ANSWERS mapped with a domain policy",
        Duration::from_secs(5),
        || answers_mapped(pid),
    );
    let manifests = r._work.manifests();
    let since = SystemTime::now();
    std::fs::remove_file(manifests.join("fqdn.yaml")).unwrap();
    r.agent
        .wait_reconciled(since, 3, Duration::from_secs(30))
        .expect("reconciled without the policy");
    // Its 8 MiB of mappings go once answers held under the last heartbeat are sent on.
    wait_for(
        "DNS_ANSWERS unmapped without domain policies",
        Duration::from_secs(10),
        || !answers_mapped(pid),
    );
    // Nothing holds answers now: DNS answers at the first try.
    let server = r.dns_ip();
    assert!(
        resolve_retrying(r.pod("a"), server, "r90.race.test", 1).is_some(),
        "a lookup without domain policies was not answered"
    );
    // The policy again: answers are read, held and learned as before.
    let since = SystemTime::now();
    let tmp = manifests.join(".fqdn.yaml.tmp");
    std::fs::write(&tmp, POLICY).unwrap();
    std::fs::rename(&tmp, manifests.join("fqdn.yaml")).unwrap();
    r.agent
        .wait_reconciled(since, 3, Duration::from_secs(30))
        .expect("reconciled with the policy");
    wait_for("DNS_ANSWERS mapped again", Duration::from_secs(5), || {
        answers_mapped(pid)
    });
    let failed = race(&r, "a", 30, Duration::from_millis(500));
    assert!(failed.is_empty(), "after the policy came back: {failed:?}");
    let other: IpAddr = "192.0.2.20".parse().unwrap();
    assert_eq!(r.resolve_and_connect("a", "other.test"), (other, false));
    assert!(!r.log().contains("panicked"));
}
