//! Enforcement holds *through* events, not only before and after them: a manifest rewritten in
//! place, a pod's host routes gone for a moment. A stream of denied datagrams runs across each
//! event and not one of them may arrive. Needs root; under CI=true that is a failure, not a skip.
mod support;

use std::io::Write;
use std::time::{Duration, SystemTime};

use palisade_tests::{probe::UdpStream, rig::require_root};
use support::{B_POLICY, BASELINE, C_POLICY, Setup, cluster_yaml};

/// One datagram every 20 ms.
const EVERY: Duration = Duration::from_millis(20);

/// Rewrites `name` in place as `fs::write` does, but with the pause a slow writer (an editor,
/// a config tool, a full disk) leaves between the truncation and the data.
fn rewrite_in_place(s: &Setup, name: &str, text: &str, pause: Duration) {
    let mut f = std::fs::File::create(s.manifests().join(name)).expect("truncate");
    std::thread::sleep(pause);
    f.write_all(text.as_bytes()).expect("write");
}

/// A change of the host (an address on `node0`) so that the host poll asks for a reconcile
/// too: the other path by which the agent re-reads the manifests.
fn poke_host(s: &Setup, add: bool) {
    let ok = s
        .node
        .command("ip")
        .args([
            "addr",
            if add { "add" } else { "del" },
            "10.243.0.99/32",
            "dev",
            "node0",
        ])
        .status()
        .expect("ip addr")
        .success();
    assert!(ok, "ip addr {add} on node0");
}

fn status_errors(s: &Setup) -> Vec<String> {
    s.agent.status().map(|st| st.errors).unwrap_or_default()
}

/// A1. `c.yaml` and `cluster.yaml` truncated in place for 0.7 s and then rewritten, with a host
/// change in the middle; then a torn write whose second half is an invalid policy. b -> c stays
/// denied throughout (b -> c is what `bad_config` once saw pass, under load).
#[test]
fn a_torn_manifest_write_never_lifts_isolation() {
    if !require_root() {
        return;
    }
    let mut s = Setup::new("torn", &[("policies.yaml", B_POLICY), ("c.yaml", C_POLICY)]);
    s.check("baseline", BASELINE);
    let cluster = cluster_yaml(&s.node, false);
    let c_ip = s.pod("c").ip(false);
    let b_ip = s.pod("b").ip(false);
    for (file, text) in [("c.yaml", C_POLICY), ("cluster.yaml", cluster.as_str())] {
        let to_c = UdpStream::start(s.pod("b"), c_ip, 80, EVERY);
        let to_b = UdpStream::start(s.pod("c"), b_ip, 80, EVERY);
        let mut f = std::fs::File::create(s.manifests().join(file)).expect("truncate");
        std::thread::sleep(Duration::from_millis(350));
        poke_host(&s, true);
        std::thread::sleep(Duration::from_millis(1200));
        let seen = status_errors(&s);
        f.write_all(text.as_bytes()).expect("write");
        drop(f);
        std::thread::sleep(Duration::from_millis(700));
        poke_host(&s, false);
        let (sent_c, got_c) = to_c.finish();
        let (sent_b, got_b) = to_b.finish();
        assert_eq!(
            (got_c, got_b),
            (0, 0),
            "{file} truncated in place: denied datagrams delivered (b -> c {got_c} of \
             {sent_c}, c -> b {got_b} of {sent_b}); agent log: {}",
            s.agent.log_path().display()
        );
        assert!(
            seen.iter()
                .any(|e| e.contains(file) && e.contains("holds no document")),
            "{file}: the empty file was read and reported: {seen:?}"
        );
        s.check(&format!("{file} rewritten"), BASELINE);
        assert!(
            status_errors(&s).is_empty(),
            "{file}: errors clear once rewritten"
        );
    }

    // A torn write whose new version is invalid (an impossible port name): the last good
    // version stays in force through both.
    let invalid = C_POLICY.replace("port: 80", "port: HTTP_80");
    let to_c = UdpStream::start(s.pod("b"), c_ip, 80, EVERY);
    rewrite_in_place(&s, "c.yaml", &invalid, Duration::from_millis(700));
    let since = SystemTime::now();
    let st = s
        .agent
        .wait_reconciled(since, 3, Duration::from_secs(30))
        .expect("reconciled");
    std::thread::sleep(Duration::from_secs(2));
    let (sent, got) = to_c.finish();
    assert!(
        st.errors.iter().any(|e| e.contains("HTTP_80")),
        "the invalid version is reported: {:?}",
        st.errors
    );
    assert_eq!(
        got, 0,
        "torn write, then an invalid version: {got} of {sent} denied datagrams b -> c delivered"
    );
    s.check("invalid version after a torn write", BASELINE);
    s.write("c.yaml", Some(C_POLICY));
    s.check("fixed", BASELINE);
}

/// A5. b's host route removed for a second, three times: the agent no longer places pod b on
/// lxc1 for that long, and must fence the interface rather than detach its programs. Neither
/// c -> b (b isolated) nor b -> c (c isolated) gets a datagram through, and once the route is
/// back b is enforced as before.
#[test]
fn a_pod_that_drops_out_of_view_is_fenced_not_detached() {
    if !require_root() {
        return;
    }
    let s = Setup::new(
        "fence",
        &[("policies.yaml", B_POLICY), ("c.yaml", C_POLICY)],
    );
    s.check("baseline", BASELINE);
    let b = s.pod("b").clone();
    let route = format!("{}/32", b.ipv4);
    let to_b = UdpStream::start(s.pod("c"), b.ipv4.into(), 80, EVERY);
    let to_c = UdpStream::start(&b, s.pod("c").ip(false), 80, EVERY);
    let mut fenced_seen = false;
    for _ in 0..3 {
        let ok = s
            .node
            .command("ip")
            .args(["route", "del", &route, "dev", &b.host_ifname])
            .status()
            .expect("ip route del")
            .success();
        assert!(ok, "route removed");
        // The host poll (1 s) sees it, and the reconcile that follows.
        std::thread::sleep(Duration::from_millis(2000));
        fenced_seen |= status_errors(&s)
            .iter()
            .any(|e| e.contains("demo/b") && e.contains("fenced"));
        let ok = s
            .node
            .command("ip")
            .args(["route", "add", &route, "dev", &b.host_ifname])
            .status()
            .expect("ip route add")
            .success();
        assert!(ok, "route back");
        std::thread::sleep(Duration::from_millis(2000));
    }
    let (sent_b, got_b) = to_b.finish();
    let (sent_c, got_c) = to_c.finish();
    assert_eq!(
        (got_b, got_c),
        (0, 0),
        "denied datagrams delivered while b's routes came and went: c -> b {got_b} of \
         {sent_b}, b -> c {got_c} of {sent_c}; agent log: {}",
        s.agent.log_path().display()
    );
    assert!(fenced_seen, "the status names the fenced pod");
    s.check("routes back", BASELINE);
    let st = s.agent.status().expect("status");
    assert!(
        st.errors.is_empty() && st.pending_endpoints.is_empty(),
        "no longer fenced: {st:?}"
    );
}
