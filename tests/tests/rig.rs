//! The rig itself, with no enforcer attached: every ordered pair connects over TCP, UDP and
//! SCTP, IPv4 and IPv6; unserved ports do not; probes run concurrently and tell a timeout from
//! a refusal; the node serves on its own addresses; commands and threads
//! run in the right namespace; namespaces disappear on drop, panics included; rigs created in
//! parallel never collide. Needs root (under CI=true, a missing root is a failure).
use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{IpAddr, TcpListener},
    process::Stdio,
    time::{Duration, Instant},
};

use palisade_tests::{
    rig::{Node, NodeSpec, Outcome, Pod, PodSpec, ProbeSpec, Proto, require_root},
    sctp,
};

/// How long a probe expected to fail waits for an answer.
const TIMEOUT: Duration = Duration::from_millis(500);
/// How long a probe expected to connect may take. One that is answered returns at once, so
/// this bound only matters on a loaded machine, where a first SYN or INIT can miss 500 ms.
const CONNECT: Duration = Duration::from_secs(5);
/// A bound on a batch of concurrent probes, each of which waits out [`TIMEOUT`]: every batch
/// held to it would take at least six timeouts probed one after another, and a loaded
/// machine still finishes it well inside.
const CONCURRENT: Duration = Duration::from_millis(2000);
const SERVED: u16 = 80;
const UNSERVED: u16 = 81;

fn node(names: &[&str], ipv6: bool) -> Node {
    Node::new(NodeSpec {
        pods: names
            .iter()
            .map(|n| PodSpec {
                name: n.to_string(),
            })
            .collect(),
        ipv6,
    })
    .expect("creating the rig")
}

fn served_node(names: &[&str], ipv6: bool) -> Node {
    let n = node(names, ipv6);
    n.serve(&[
        (SERVED, Proto::Tcp),
        (SERVED, Proto::Udp),
        (SERVED, Proto::Sctp),
    ])
    .expect("servers");
    n
}

/// `ip netns list`, names only.
fn ip_netns_list() -> BTreeSet<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

fn families(ipv6: bool) -> &'static [bool] {
    if ipv6 { &[false, true] } else { &[false] }
}

/// Every ordered pair, every protocol, every family: the served port answers (one probe at a
/// time), the unserved one does not (all at once), and a refused TCP connect is quick.
fn all_pairs(ipv6: bool) {
    let n = served_node(&["x-a", "x-b", "y-c"], ipv6);
    let mut unserved = Vec::new();
    for &v6 in families(ipv6) {
        for from in n.pods() {
            for to in n.pods().iter().filter(|t| t.name != from.name) {
                for proto in Proto::ALL {
                    let t = Instant::now();
                    assert!(
                        n.probe(from, to.ip(v6), SERVED, proto, CONNECT),
                        "{} -> {} {proto} {SERVED} (ipv6: {v6}) should connect",
                        from.name,
                        to.name
                    );
                    assert!(
                        t.elapsed() < CONNECT,
                        "a successful probe returns before its timeout: {:?}",
                        t.elapsed()
                    );
                    unserved.push(ProbeSpec {
                        from,
                        to: to.ip(v6),
                        port: UNSERVED,
                        proto,
                        timeout: TIMEOUT,
                    });
                }
                let refused = n.probe_outcomes(&[ProbeSpec {
                    from,
                    to: to.ip(v6),
                    port: UNSERVED,
                    proto: Proto::Tcp,
                    timeout: CONNECT,
                }]);
                assert_eq!(
                    refused,
                    [Outcome::Refused],
                    "TCP to an unserved port is refused, not left to time out"
                );
            }
        }
    }
    let t = Instant::now();
    let results = n.probe_many(&unserved);
    for (spec, ok) in unserved.iter().zip(&results) {
        assert!(
            !ok,
            "{} -> {} {} {UNSERVED} must fail",
            spec.from.name, spec.to, spec.proto
        );
    }
    let took = t.elapsed();
    assert!(
        took >= TIMEOUT,
        "SCTP to an unserved port waits for the timeout ({took:?})"
    );
    assert!(
        took < CONCURRENT,
        "unserved probes ran concurrently ({took:?})"
    );
}

#[test]
fn all_pairs_connect_ipv4() {
    if require_root() {
        all_pairs(false);
    }
}

#[test]
fn all_pairs_connect_ipv4_and_ipv6() {
    if require_root() {
        all_pairs(true);
    }
}

/// A 3x3 matrix (self included) of every protocol on a served and an unserved port takes about
/// one timeout, not one per probe.
#[test]
fn probe_matrix_runs_concurrently() {
    if !require_root() {
        return;
    }
    let n = served_node(&["a", "b", "c"], true);
    let mut specs = Vec::new();
    for &v6 in &[false, true] {
        for from in n.pods() {
            for to in n.pods() {
                for proto in Proto::ALL {
                    for port in [SERVED, UNSERVED] {
                        specs.push(ProbeSpec {
                            from,
                            to: to.ip(v6),
                            port,
                            proto,
                            timeout: if port == SERVED { CONNECT } else { TIMEOUT },
                        });
                    }
                }
            }
        }
    }
    let t = Instant::now();
    let results = n.probe_many(&specs);
    let took = t.elapsed();
    eprintln!(
        "{} probes (3x3 x 3 protocols x 2 ports x 2 families) in {took:?}",
        specs.len()
    );
    for (s, ok) in specs.iter().zip(&results) {
        assert_eq!(
            *ok,
            s.port == SERVED,
            "{} -> {} {} {}",
            s.from.name,
            s.to,
            s.proto,
            s.port
        );
    }
    assert!(took < CONCURRENT, "took {took:?}");
}

/// A node of 9 pods (the conformance layout): every pair connects over every protocol, and a
/// 72-pair matrix of unserved probes runs concurrently. How long the node takes to come up is
/// printed (the bench measures speed; a timed assertion here would fail on a loaded machine).
#[test]
fn nine_pod_node_probes_concurrently() {
    if !require_root() {
        return;
    }
    let names = [
        "x-a", "x-b", "x-c", "y-a", "y-b", "y-c", "z-a", "z-b", "z-c",
    ];
    let t = Instant::now();
    let n = node(&names, true);
    let created = t.elapsed();
    n.serve(&[
        (80, Proto::Tcp),
        (80, Proto::Udp),
        (80, Proto::Sctp),
        (81, Proto::Tcp),
    ])
    .unwrap();
    let served = t.elapsed() - created;
    eprintln!("9-pod dual-stack node created in {created:?}, servers started in {served:?}");
    for proto in Proto::ALL {
        let mut specs = Vec::new();
        for from in n.pods() {
            for to in n.pods().iter().filter(|t| t.name != from.name) {
                specs.push(ProbeSpec {
                    from,
                    to: to.ip(false),
                    port: 80,
                    proto,
                    timeout: CONNECT,
                });
            }
        }
        let t = Instant::now();
        let ok = n.probe_many(&specs);
        eprintln!("72-pair {proto} matrix (all allowed) in {:?}", t.elapsed());
        assert!(ok.iter().all(|o| *o), "{proto}: {ok:?}");
        for s in &mut specs {
            s.port = 82;
            s.timeout = TIMEOUT;
        }
        let t = Instant::now();
        let ok = n.probe_many(&specs);
        let took = t.elapsed();
        eprintln!("72-pair {proto} matrix (all unserved) in {took:?}");
        assert!(ok.iter().all(|o| !*o), "{proto}: {ok:?}");
        assert!(took < CONCURRENT, "{proto}: {took:?}");
    }
    let t = Instant::now();
    drop(n);
    eprintln!("9-pod node torn down in {:?}", t.elapsed());
}

/// Addresses, routes and interface names are as documented, and `command` runs programs in the
/// pod's / node's network namespace without leaving our mount namespace.
#[test]
fn wiring_and_commands() {
    if !require_root() {
        return;
    }
    let n = node(&["x-a", "x-b"], true);
    let run = |cmd: &mut std::process::Command| -> String {
        let out = cmd.stderr(Stdio::inherit()).output().expect("spawn");
        assert!(out.status.success(), "{cmd:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let a: &Pod = &n.pods()[0];
    assert_eq!(a.ipv4.to_string(), "10.244.0.10");
    assert_eq!(a.ipv6.unwrap().to_string(), "fd00:244::a");
    assert_eq!(n.pods()[1].ip(false).to_string(), "10.244.0.11");
    assert_eq!(n.pods()[1].ip(true).to_string(), "fd00:244::b");
    assert_eq!(n.node_ips().len(), 2);
    assert!(n.netns_path().exists());
    assert!(
        a.netns_name
            .starts_with(&format!("pal-{}-", std::process::id()))
    );

    let addrs = run(a.command("ip").args(["-o", "addr", "show", "dev", "eth0"]));
    assert!(
        addrs.contains("10.244.0.10/32") && addrs.contains("fd00:244::a/128"),
        "{addrs}"
    );
    let routes = run(a.command("ip").args(["route", "show"]));
    assert!(
        routes.contains("default via 10.244.0.1 dev eth0"),
        "{routes}"
    );
    let routes6 = run(a.command("ip").args(["-6", "route", "show"]));
    assert!(
        routes6.contains("default via fe80::1 dev eth0"),
        "{routes6}"
    );

    let links = run(n.command("ip").args(["-o", "link", "show"]));
    for p in n.pods() {
        assert!(
            links.contains(&format!("{}: {}@", p.host_ifindex, p.host_ifname)),
            "{links}"
        );
    }
    assert!(links.contains(" node0: "), "{links}");
    let node_routes = run(n.command("ip").args(["route", "show"]));
    assert!(
        node_routes.contains("10.244.0.11 dev lxc1"),
        "{node_routes}"
    );
    let node_addrs = run(n.command("ip").args(["-o", "addr", "show", "dev", "node0"]));
    assert!(
        node_addrs.contains("10.243.0.1/32") && node_addrs.contains("fd00:243::1/128"),
        "{node_addrs}"
    );

    // Same mount namespace as ours (unlike `ip netns exec`), the pod's network namespace.
    let mnt = std::fs::read_link("/proc/self/ns/mnt").unwrap();
    let child_mnt = run(a.command("readlink").arg("/proc/self/ns/mnt"));
    assert_eq!(child_mnt.trim(), mnt.to_string_lossy());
    let child_net = run(a.command("readlink").arg("/proc/self/ns/net"));
    let thread_net = a
        .in_netns(|| std::fs::read_link("/proc/thread-self/ns/net").unwrap())
        .unwrap();
    assert_eq!(child_net.trim(), thread_net.to_string_lossy());
    assert_ne!(
        thread_net,
        std::fs::read_link("/proc/thread-self/ns/net").unwrap()
    );
}

/// The node's address answers pods, and the node reaches pods (host-network traffic).
#[test]
fn node_and_pods_reach_each_other() {
    if !require_root() {
        return;
    }
    for ipv6 in [false, true] {
        let n = served_node(&["a"], ipv6);
        let listener = n
            .in_netns(|| TcpListener::bind(("::", 9000)).unwrap())
            .unwrap();
        let pod = &n.pods()[0];
        for node_ip in n.node_ips() {
            let mut s = pod.connect_tcp(node_ip, 9000).expect("pod -> node");
            let (mut accepted, peer) = listener.accept().unwrap();
            assert_eq!(peer.ip().to_canonical(), pod.ip(node_ip.is_ipv6()));
            s.write_all(b"hi").unwrap();
            let mut b = [0u8; 2];
            accepted.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"hi");
        }
        for &v6 in families(ipv6) {
            for proto in Proto::ALL {
                assert!(
                    n.probe_from_node(pod.ip(v6), SERVED, proto, CONNECT),
                    "node -> pod {proto} ipv6={v6}"
                );
            }
        }
    }
}

/// A long-lived TCP connection keeps exchanging data.
#[test]
fn long_lived_tcp_connection() {
    if !require_root() {
        return;
    }
    let n = served_node(&["a", "b"], false);
    let (a, b) = (&n.pods()[0], &n.pods()[1]);
    let mut s = a.connect_tcp(b.ip(false), SERVED).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    for i in 0..10u8 {
        let msg = [b'm', i, i.wrapping_mul(7)];
        s.write_all(&msg).unwrap();
        let mut back = [0u8; 3];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, msg);
        std::thread::sleep(Duration::from_millis(30));
    }
}

/// Children spawned through the node die with it; a guard kills on its own drop too.
#[test]
fn spawned_children_are_killed() {
    if !require_root() {
        return;
    }
    let alive = |pid: u32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let n = node(&["a"], false);
    let mut sleep = n.pods()[0].command("sleep");
    sleep.arg("600");
    let early = n.spawn(sleep).unwrap();
    let mut sleep = n.command("sleep");
    sleep.arg("600");
    let late = n.spawn(sleep).unwrap();
    let (early_pid, late_pid) = (early.id(), late.id());
    assert!(alive(early_pid) && alive(late_pid));
    assert!(early.try_wait().unwrap().is_none());
    drop(early);
    assert!(!alive(early_pid), "killed and reaped on guard drop");
    drop(n);
    assert!(!alive(late_pid), "killed and reaped on node drop");
    assert!(late.try_wait().unwrap().is_none());
}

/// Namespaces are gone from `ip netns list` after a drop, and after a panic unwinds past the
/// node.
#[test]
fn namespaces_are_removed_on_drop_and_on_panic() {
    if !require_root() {
        return;
    }
    let n = served_node(&["a", "b"], true);
    let names = n.netns_names();
    assert_eq!(names.len(), 3);
    let listed = ip_netns_list();
    assert!(
        names.iter().all(|x| listed.contains(x)),
        "{names:?} in {listed:?}"
    );
    // Some traffic first, so that servers have connections and probe threads have run.
    for proto in Proto::ALL {
        assert!(n.probe(&n.pods()[0], n.pods()[1].ip(true), SERVED, proto, CONNECT));
    }
    let inodes: Vec<String> = names
        .iter()
        .map(|x| {
            use std::os::unix::fs::MetadataExt;
            format!(
                "net:[{}]",
                std::fs::metadata(format!("/run/netns/{x}")).unwrap().ino()
            )
        })
        .collect();
    let t = Instant::now();
    drop(n);
    eprintln!("dropped a served 2-pod node in {:?}", t.elapsed());
    let listed = ip_netns_list();
    assert!(names.iter().all(|x| !listed.contains(x)), "removed on drop");
    // No thread of ours is left inside them. (Inode numbers of freed namespaces get reused by
    // other tests' new ones: only a match that persists and has no name counts.)
    let leaked = || -> Vec<String> {
        use std::os::unix::fs::MetadataExt;
        let named: BTreeSet<String> = ip_netns_list()
            .iter()
            .filter_map(|x| std::fs::metadata(format!("/run/netns/{x}")).ok())
            .map(|m| format!("net:[{}]", m.ino()))
            .collect();
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .flatten()
            .filter_map(|t| std::fs::read_link(t.path().join("ns/net")).ok())
            .map(|ns| ns.to_string_lossy().into_owned())
            .filter(|ns| inodes.contains(ns) && !named.contains(ns))
            .collect()
    };
    let mut left = leaked();
    for _ in 0..10 {
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        left = leaked();
    }
    assert!(
        left.is_empty(),
        "threads still in the deleted namespaces: {left:?}"
    );
    let mut names = Vec::new();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let n = served_node(&["a"], false);
        names = n.netns_names();
        let mut sleep = n.command("sleep");
        sleep.arg("600");
        let _child = n.spawn(sleep).unwrap();
        panic!("boom (expected by this test)");
    }));
    assert!(caught.is_err());
    assert_eq!(names.len(), 2);
    let listed = ip_netns_list();
    assert!(
        names.iter().all(|x| !listed.contains(x)),
        "removed after a panic: {names:?} in {listed:?}"
    );
}

/// Several rigs at once (threads of one process, like `cargo test`) get distinct namespaces and
/// each works.
#[test]
fn parallel_rigs_do_not_collide() {
    if !require_root() {
        return;
    }
    let all: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                s.spawn(move || {
                    let n = served_node(&["a", "b"], i % 2 == 1);
                    let (a, b) = (&n.pods()[0], &n.pods()[1]);
                    for proto in Proto::ALL {
                        assert!(
                            n.probe(a, b.ip(false), SERVED, proto, CONNECT),
                            "rig {i} {proto}"
                        );
                    }
                    n.netns_names()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let flat: BTreeSet<&String> = all.iter().flatten().collect();
    assert_eq!(flat.len(), 12, "unique names: {all:?}");
    let listed = ip_netns_list();
    assert!(flat.iter().all(|x| !listed.contains(*x)));
}

/// Probing a family or address the node does not have fails within the timeout instead of
/// hanging or panicking.
#[test]
fn probes_to_nowhere_fail_within_the_timeout() {
    if !require_root() {
        return;
    }
    let n = served_node(&["a"], false);
    let a = &n.pods()[0];
    // 10.244.0.99 routes to the gateway, which has no route for it (no such pod).
    let nowhere: IpAddr = "10.244.0.99".parse().unwrap();
    let no_v6: IpAddr = "fd00:244::99".parse().unwrap();
    let specs: Vec<ProbeSpec> = [nowhere, no_v6]
        .iter()
        .flat_map(|&to| {
            Proto::ALL.map(|proto| ProbeSpec {
                from: a,
                to,
                port: SERVED,
                proto,
                timeout: TIMEOUT,
            })
        })
        .collect();
    let t = Instant::now();
    assert!(n.probe_many(&specs).iter().all(|ok| !ok));
    assert!(t.elapsed() < CONCURRENT, "took {:?}", t.elapsed());
}

/// The kernel's own SCTP conntrack (which verifies the CRC32c at prerouting and tracks INIT /
/// INIT-ACK verification tags) accepts our handshake on both ends: no INVALID packet, an INIT
/// seen as NEW on the server, an INIT-ACK seen as an ESTABLISHED reply on the client. Skipped
/// when `nft` is not installed.
#[test]
fn sctp_handshake_is_valid_for_kernel_conntrack() {
    if !require_root() {
        return;
    }
    if std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: nft (nftables) is not installed");
        return;
    }
    let n = served_node(&["client", "server"], true);
    let (client, server) = (&n.pods()[0], &n.pods()[1]);
    let ruleset = "table inet rigcheck {\n chain pre {\n type filter hook prerouting priority -150;\n \
                   meta l4proto sctp ct state invalid counter\n meta l4proto sctp ct state new counter\n \
                   meta l4proto sctp ct state established counter\n }\n}\n";
    for p in [client, server] {
        let mut c = p.command("nft");
        let mut child = c.args(["-f", "-"]).stdin(Stdio::piped()).spawn().unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(ruleset.as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "loading nft rules");
    }
    for v6 in [false, true] {
        assert!(
            n.probe(client, server.ip(v6), SERVED, Proto::Sctp, CONNECT),
            "ipv6={v6}"
        );
    }
    // Counters in rule order: invalid, new, established.
    let counters = |p: &Pod| -> Vec<u64> {
        let out = p
            .command("nft")
            .args(["list", "chain", "inet", "rigcheck", "pre"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .filter_map(|l| l.split("counter packets ").nth(1))
            .map(|rest| rest.split_whitespace().next().unwrap().parse().unwrap())
            .collect()
    };
    assert_eq!(
        counters(server),
        vec![0, 2, 0],
        "server: INITs are NEW, none INVALID"
    );
    assert_eq!(
        counters(client),
        vec![0, 0, 2],
        "client: INIT-ACKs are ESTABLISHED replies, none INVALID"
    );
}

/// Namespaces named after a process that no longer exists are removed by the next rig.
#[test]
fn stale_namespaces_of_dead_processes_are_removed() {
    if !require_root() {
        return;
    }
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let dead = child.id();
    child.wait().unwrap();
    let stale = format!("pal-{dead}-0-node");
    // Rigs of other processes (a parallel soak, the conformance runner) remove stale
    // namespaces too, and may do so while `ip netns add` is still creating this one: then
    // the add fails, and is tried again. Only the end state is this test's to assert.
    let added = (0..5).any(|_| {
        std::process::Command::new("ip")
            .args(["netns", "add", &stale])
            .status()
            .unwrap()
            .success()
    });
    assert!(added, "ip netns add {stale}");
    let _n = node(&["a"], false);
    assert!(!ip_netns_list().contains(&stale), "stale {stale} removed");
}

/// What a probe saw: connected; refused by an RST, an ICMP error or an SCTP ABORT; timed out
/// where packets vanish (a blackhole route).
fn outcomes(ipv6: bool) {
    let n = served_node(&["x-a", "x-b"], ipv6);
    let (a, b) = (&n.pods()[0], &n.pods()[1]);
    // Packets to these vanish on the node, or get an ICMP "administratively prohibited".
    let (hole, prohibited): (IpAddr, IpAddr) = if ipv6 {
        ("fd00:99::1".parse().unwrap(), "fd00:99::2".parse().unwrap())
    } else {
        ("10.99.0.1".parse().unwrap(), "10.99.0.2".parse().unwrap())
    };
    for (kind, addr) in [("blackhole", hole), ("prohibit", prohibited)] {
        let out = n
            .command("ip")
            .args(["route", "add", kind, &addr.to_string()])
            .output()
            .expect("ip route");
        assert!(out.status.success(), "{kind} {addr}: {out:?}");
    }
    // An SCTP endpoint in b that aborts every INIT to ABORTED.
    const ABORTED: u16 = 82;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let fd = b.in_netns(|| sctp::raw_socket(ipv6)).unwrap().unwrap();
    let aborter = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 65536];
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if !sctp::wait_readable(&fd, Duration::from_millis(50)).unwrap_or(false) {
                    continue;
                }
                while let Ok(rx) = sctp::recv_from(&fd, &mut buf) {
                    let Some(p) = sctp::parse(rx.sctp) else {
                        continue;
                    };
                    if p.is_init() && p.dport == ABORTED {
                        let tag = p.init_fields().unwrap().initiate_tag;
                        let abort = sctp::abort_packet(p.dport, p.sport, tag);
                        let _ = sctp::send_to(&fd, &abort, rx.src);
                    }
                }
            }
        })
    };
    let to = b.ip(ipv6);
    let cases = [
        (to, SERVED, Proto::Tcp, Outcome::Connected),
        (to, SERVED, Proto::Udp, Outcome::Connected),
        (to, SERVED, Proto::Sctp, Outcome::Connected),
        (to, UNSERVED, Proto::Tcp, Outcome::Refused),
        (to, UNSERVED, Proto::Udp, Outcome::Refused),
        // The rig's SCTP servers ignore INITs to ports they do not serve.
        (to, UNSERVED, Proto::Sctp, Outcome::TimedOut),
        (to, ABORTED, Proto::Sctp, Outcome::Refused),
        (hole, SERVED, Proto::Tcp, Outcome::TimedOut),
        (hole, SERVED, Proto::Udp, Outcome::TimedOut),
        (hole, SERVED, Proto::Sctp, Outcome::TimedOut),
        (prohibited, SERVED, Proto::Tcp, Outcome::Refused),
        (prohibited, SERVED, Proto::Udp, Outcome::Refused),
    ];
    let specs: Vec<ProbeSpec<'_>> = cases
        .iter()
        .map(|&(to, port, proto, want)| ProbeSpec {
            from: a,
            to,
            port,
            proto,
            timeout: if want == Outcome::TimedOut {
                TIMEOUT
            } else {
                CONNECT
            },
        })
        .collect();
    let got = n.probe_outcomes(&specs);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    aborter.join().unwrap();
    let wrong: Vec<String> = cases
        .iter()
        .zip(got)
        .filter(|((.., want), got)| got != want)
        .map(|((to, port, proto, want), got)| format!("{to} {proto}/{port}: {got}, want {want}"))
        .collect();
    assert!(wrong.is_empty(), "from {}: {wrong:#?}", a.name);
}

#[test]
fn outcomes_tell_timeouts_from_refusals_ipv4() {
    if require_root() {
        outcomes(false);
    }
}

#[test]
fn outcomes_tell_timeouts_from_refusals_ipv6() {
    if require_root() {
        outcomes(true);
    }
}

/// Servers in the node's own namespace, bound to its addresses (a host-networked pod): pods
/// reach them on the node's address over TCP, UDP and SCTP, the answers coming from that
/// address although the route back to a pod leaves by a veth that carries the gateway.
#[test]
fn host_servers_answer_from_the_node_address() {
    if !require_root() {
        return;
    }
    const HOST_PORT: u16 = 34345;
    let n = node(&["x-a"], true);
    n.serve_host(&[
        (HOST_PORT, Proto::Tcp),
        (HOST_PORT, Proto::Udp),
        (HOST_PORT, Proto::Sctp),
    ])
    .expect("host servers");
    let a = &n.pods()[0];
    for v6 in [false, true] {
        for proto in Proto::ALL {
            let to = n.node_ip(v6);
            assert_eq!(
                n.probe_outcomes(&[ProbeSpec {
                    from: a,
                    to,
                    port: HOST_PORT,
                    proto,
                    timeout: CONNECT,
                }]),
                [Outcome::Connected],
                "{} -> {to} {proto}/{HOST_PORT}",
                a.name
            );
        }
    }
}
