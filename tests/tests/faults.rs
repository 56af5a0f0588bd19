//! Faults on the netns rig: the agent SIGKILLed in the middle of bursts of policy changes and
//! restarted, twenty times, while probes of flows that no version allows run all along (none
//! may ever pass) and an established connection must survive; pins removed by hand and a link
//! detached behind the agent's back are repaired. Needs root; under CI=true no skip.
mod support;

use std::io::{Read, Write};
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};
use std::time::{Duration, SystemTime};

use palisade_tests::{
    agent::agent_binary,
    rig::{Pod, ProbeSpec, Proto, probe_many, require_root},
};
use support::{Setup, wait_for};

fn b_policy(ports: &[u16]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|p| format!("{{port: {p}, protocol: TCP}}"))
        .collect();
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: b-ingress, namespace: demo}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: b}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n\
         \x20   - from: [{{podSelector: {{matchLabels: {{app: a}}}}}}]\n      ports: [{}]\n",
        ports.join(", ")
    )
}

fn c_policy(ports: &[u16]) -> String {
    let ports: Vec<String> = ports
        .iter()
        .map(|p| format!("{{port: {p}, protocol: TCP}}"))
        .collect();
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: c-ingress, namespace: demo}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: c}}}}\n  policyTypes: [Ingress]\n  ingress:\n\
         \x20   - from: [{{podSelector: {{matchLabels: {{app: a}}}}}}]\n      ports: [{}]\n",
        ports.join(", ")
    )
}

/// Flows no version of the policies above allows: b is isolated both ways (no egress rule),
/// c only ever admits a, b only ever admits a.
const NEVER: &[(&str, &str, u16)] = &[
    ("c", "b", 80),
    ("c", "b", 81),
    ("b", "c", 80),
    ("b", "c", 81),
    ("b", "a", 80),
    ("b", "a", 81),
];

/// As a careful tool writes configuration: a new file renamed over the old one, so a reader
/// sees the old or the new content, never a file being written (the agent also waits for a
/// file to stay the same for a poll, but the kills here are meant to hit reconciles, not
/// half-written files).
fn write_atomically(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Lcg(u64);
impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Probes the `NEVER` flows over and over until stopped; counts rounds and any that passed.
fn watch_never(pods: &[Pod], stop: &AtomicBool, rounds: &AtomicU64, passed: &Mutex<Vec<String>>) {
    let pod = |n: &str| {
        pods.iter()
            .find(|p| p.name == format!("demo-{n}"))
            .expect("a pod of the rig")
    };
    let specs: Vec<ProbeSpec<'_>> = NEVER
        .iter()
        .map(|(from, to, port)| ProbeSpec {
            from: pod(from),
            to: pod(to).ip(false),
            port: *port,
            proto: Proto::Tcp,
            timeout: Duration::from_millis(300),
        })
        .collect();
    while !stop.load(Ordering::Relaxed) {
        for (spec, ok) in NEVER.iter().zip(probe_many(&specs)) {
            if ok {
                passed.lock().unwrap().push(format!(
                    "{} -> {}:{} passed at {:?}",
                    spec.0,
                    spec.1,
                    spec.2,
                    SystemTime::now()
                ));
            }
        }
        rounds.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn agent_killed_mid_burst_twenty_times() {
    if !require_root() {
        return;
    }
    let mut s = Setup::new(
        "faults-kill",
        &[("b.yaml", &b_policy(&[80])), ("c.yaml", &c_policy(&[80]))],
    );
    s.check(
        "start",
        &[
            ("a", "b", 80, true),
            ("a", "c", 80, true),
            ("c", "b", 80, false),
        ],
    );
    // An established connection a -> b:80. b is isolated for egress with no rule: its answers
    // pass only because conntrack knows the flow, so the flow must survive every restart.
    let mut conn = s
        .pod("a")
        .connect_tcp(s.pod("b").ip(false), 80)
        .expect("a -> b:80");
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let echo = |conn: &mut std::net::TcpStream, byte: u8| -> bool {
        let mut buf = [0u8; 1];
        conn.write_all(&[byte]).is_ok() && conn.read_exact(&mut buf).is_ok() && buf[0] == byte
    };
    assert!(echo(&mut conn, 1), "the connection works");

    let stop = AtomicBool::new(false);
    let rounds = AtomicU64::new(0);
    let passed = Arc::new(Mutex::new(Vec::new()));
    let mut rng = Lcg(0x5eed);
    let manifests = s.manifests();
    let versions_b: [&[u16]; 2] = [&[80], &[80, 81]];
    let versions_c: [&[u16]; 3] = [&[80], &[80, 81], &[81]];
    let mut restarts = 0;
    std::thread::scope(|scope| {
        let pods = s.node.pods().to_vec();
        let (stop, rounds, passed) = (&stop, &rounds, &passed);
        let watcher = scope.spawn(move || watch_never(&pods, stop, rounds, passed));
        for cycle in 0..20 {
            // A burst of changes, the agent killed somewhere in it (often mid-reconcile).
            let writes = 2 + rng.below(5);
            for _ in 0..writes {
                let (file, text) = if rng.below(2) == 0 {
                    ("b.yaml", b_policy(versions_b[rng.below(2) as usize]))
                } else {
                    ("c.yaml", c_policy(versions_c[rng.below(3) as usize]))
                };
                write_atomically(&manifests.join(file), &text);
                std::thread::sleep(Duration::from_millis(10 + rng.below(120)));
            }
            s.agent.kill();
            restarts += 1;
            // Down for a moment: the pinned programs and maps enforce alone.
            std::thread::sleep(Duration::from_millis(rng.below(300)));
            let since = SystemTime::now();
            s.agent
                .spawn(&s.node, &agent_binary(), &manifests)
                .expect("restart");
            if cycle % 4 == 3 {
                // Now and then let it finish starting before the next burst.
                s.agent
                    .wait_reconciled(since, 3, Duration::from_secs(30))
                    .expect("restarted agent reconciles");
            }
        }
        // The final state, written once the bursts are over.
        write_atomically(&manifests.join("b.yaml"), &b_policy(&[80, 81]));
        write_atomically(&manifests.join("c.yaml"), &c_policy(&[81]));
        let since = SystemTime::now();
        s.agent
            .wait_reconciled(since, 3, Duration::from_secs(30))
            .expect("final reconcile");
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, Ordering::Relaxed);
        watcher.join().unwrap();
    });
    let passed = passed.lock().unwrap();
    eprintln!(
        "{restarts} restarts, {} probe rounds of {} never-allowed flows, {} passed",
        rounds.load(Ordering::Relaxed),
        NEVER.len(),
        passed.len()
    );
    assert!(
        rounds.load(Ordering::Relaxed) >= 20,
        "the probes ran throughout"
    );
    assert!(passed.is_empty(), "denied flows passed: {passed:?}");
    assert!(
        echo(&mut conn, 2),
        "the established connection survived {restarts} restarts"
    );
    s.check(
        "final state",
        &[
            ("a", "b", 80, true),
            ("a", "b", 81, true),
            ("a", "c", 80, false),
            ("a", "c", 81, true),
            ("c", "b", 80, false),
            ("b", "c", 81, false),
            ("b", "a", 80, false),
            ("c", "a", 80, true),
        ],
    );
    let st = s.agent.status().expect("status");
    assert!(st.errors.is_empty(), "{:?}", st.errors);
}

/// BPF_LINK_DETACH on a pinned link, as `bpftool link detach` does.
fn detach_link(pin: &std::path::Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(pin.as_os_str().as_bytes()).unwrap();
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        pad: u32,
    }
    let mut get = ObjGet {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        pad: 0,
    };
    // SAFETY: valid bpf_attr prefixes for BPF_OBJ_GET (7) and BPF_LINK_DETACH (34).
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            7,
            &mut get as *mut ObjGet,
            std::mem::size_of::<ObjGet>(),
        )
    };
    assert!(fd >= 0, "BPF_OBJ_GET {}", pin.display());
    let mut detach = [fd as u32, 0u32];
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            34,
            detach.as_mut_ptr(),
            std::mem::size_of_val(&detach),
        )
    };
    unsafe { libc::close(fd as i32) };
    assert_eq!(r, 0, "BPF_LINK_DETACH: {}", std::io::Error::last_os_error());
}

#[test]
fn pins_removed_by_hand_are_repaired() {
    if !require_root() {
        return;
    }
    let mut s = Setup::new(
        "faults-pins",
        &[("b.yaml", &b_policy(&[80])), ("c.yaml", &c_policy(&[80]))],
    );
    let denied = [("c", "b", 80, false), ("b", "c", 80, false)];
    let allowed = [("a", "b", 80, true), ("a", "c", 80, true)];
    s.check("start", &[denied.as_slice(), allowed.as_slice()].concat());
    let mut conn = s
        .pod("a")
        .connect_tcp(s.pod("b").ip(false), 80)
        .expect("a -> b:80");
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();

    let pin_dir = s.agent.pin_dir().to_path_buf();
    let b_if = s.pod("b").host_ifindex;
    let link = pin_dir.join("links").join(format!("{b_if}-to_pod"));
    let map = pin_dir.join("maps").join("CT_FLOWS");
    assert!(link.exists() && map.exists());
    let before = s.agent.status().expect("status").repairs_total;

    // Removing the pins detaches nothing (the agent holds them) ...
    std::fs::remove_file(&link).unwrap();
    std::fs::remove_file(&map).unwrap();
    s.check("pins removed", &denied);
    // ... and they come back.
    wait_for("the pins to be restored", Duration::from_secs(10), || {
        link.exists() && map.exists()
    });
    wait_for("the repair to be reported", Duration::from_secs(10), || {
        s.agent
            .status()
            .is_some_and(|st| st.repairs_total >= before + 2)
    });
    assert!(s.log().contains("repaired"), "logged");

    // A link detached behind the agent's back is attached again. The agent's own report is
    // what is awaited: a probe that times out under load reads as "denied" and would end the
    // wait before the re-attach.
    detach_link(&link);
    let reattached = format!("ifindex {b_if}: detached link re-attached");
    wait_for(
        "the agent to re-attach b's link",
        Duration::from_secs(10),
        || s.log().contains(&reattached),
    );
    s.check(
        "after the re-attach",
        &[denied.as_slice(), allowed.as_slice()].concat(),
    );

    // The restored pins are the real ones: a restarted agent adopts the same conntrack table,
    // and the connection opened before lives on (b answers only through conntrack).
    s.agent.kill();
    let since = SystemTime::now();
    let manifests = s.manifests();
    s.agent
        .spawn(&s.node, &agent_binary(), &manifests)
        .expect("restart");
    s.agent
        .wait_reconciled(since, 3, Duration::from_secs(30))
        .expect("restarted");
    let mut buf = [0u8; 1];
    conn.write_all(&[7]).unwrap();
    conn.read_exact(&mut buf)
        .expect("the connection survives pin removal and a restart");
    s.check("end", &[denied.as_slice(), allowed.as_slice()].concat());
}
