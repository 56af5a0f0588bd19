//! The cluster-mode source (kube-rs watchers) against recorded API server responses
//! (`fixtures/kube/`), replayed by a mock `tower` service behind `kube::Client::new`: streaming
//! lists refused (1.33's default) and every watch falling back to LIST for good, lists, watch
//! events, bookmarks, a failed list that must back off and retry, `410 Gone` that must re-list
//! (removing what was deleted during the gap), deletions; Nodes and ClusterNetworkPolicies (an
//! invalid update keeping the last good version), and a cluster without the ClusterNetworkPolicy
//! CRD (`404`), which must say so once and enforce NetworkPolicy all the same. The store it
//! builds is compiled by the real compiler and, as root, written to the real maps by the real map
//! writer, and packets are judged by the real programs (BPF_PROG_TEST_RUN).
mod support;

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::BoxStream;
use http_body::Frame;
use http_body_util::StreamBody;
use palisade::source::kube::{
    CNP_INSTALLED, CNP_NOT_INSTALLED, ClusterState, InitialList, Watch, watch_all,
};
use palisade_common::{PROTO_TCP, PROTO_UDP};
use palisade_policy::cnp::{Action, Tier};
use palisade_policy::compile::{Compiler, LocalEndpoint};
use palisade_policy::datapath_model::evaluate;
use palisade_policy::state::{DesiredState, Direction, PodRef};

type Body = StreamBody<BoxStream<'static, Result<Frame<Bytes>, Infallible>>>;

fn fixture(name: &str) -> Vec<u8> {
    let path = format!("{}/tests/fixtures/kube/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// One scripted answer.
struct Step {
    status: u16,
    content_type: &'static str,
    /// Chunks (a watch sends one event per chunk).
    chunks: Vec<Vec<u8>>,
    /// Keep the response open after the chunks (a watch with nothing more to say).
    hang: bool,
    /// Answer only once the test has opened this phase.
    phase: u32,
}

const JSON: &str = "application/json";

fn list(name: &str, phase: u32) -> Step {
    Step {
        status: 200,
        content_type: JSON,
        chunks: vec![fixture(name)],
        hang: false,
        phase,
    }
}

fn watch(name: &str, phase: u32, hang: bool) -> Step {
    let text = fixture(name);
    Step {
        status: 200,
        content_type: JSON,
        chunks: text
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| [l, b"\n"].concat())
            .collect(),
        hang,
        phase,
    }
}

/// An error answer: `status` with the fixture as its body.
fn failure(status: u16, content_type: &'static str, name: &str, phase: u32) -> Step {
    Step {
        status,
        content_type,
        chunks: vec![fixture(name)],
        hang: false,
        phase,
    }
}

/// Scripted answers by (resource, watch?).
type Script = HashMap<(String, bool), VecDeque<Step>>;

/// The API server: scripted answers per (resource, list|watch); a watch with no script left
/// hangs (as an idle watch does), a list with none left is an error. Every streaming list is
/// refused, as 1.33 does (`watchlist-refused.json`); the log names those requests `stream`.
#[derive(Clone)]
struct Replay {
    script: Arc<Mutex<Script>>,
    requests: Arc<Mutex<Vec<String>>>,
    phase: tokio::sync::watch::Sender<u32>,
}

impl Replay {
    fn new() -> Replay {
        Replay {
            script: Arc::default(),
            requests: Arc::default(),
            phase: tokio::sync::watch::channel(1).0,
        }
    }

    fn add(&self, resource: &str, watch: bool, step: Step) {
        self.script
            .lock()
            .unwrap()
            .entry((resource.to_string(), watch))
            .or_default()
            .push_back(step);
    }

    fn count(&self, what: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.starts_with(what))
            .count()
    }

    async fn answer(&self, req: http::Request<kube::client::Body>) -> http::Response<Body> {
        let path = req.uri().path().to_string();
        let query = req.uri().query().unwrap_or("").to_string();
        let resource = path.rsplit('/').next().unwrap_or("").to_string();
        let is_watch = query.split('&').any(|kv| kv == "watch=true");
        let streaming = is_watch && query.split('&').any(|kv| kv == "sendInitialEvents=true");
        self.requests.lock().unwrap().push(format!(
            "{} {resource} {query}",
            match (is_watch, streaming) {
                (true, true) => "stream",
                (true, false) => "watch",
                _ => "list",
            }
        ));
        // Kubernetes 1.33, whose recordings these are, refuses every streaming list with its
        // default feature gates.
        let step = if streaming {
            Some(failure(422, JSON, "watchlist-refused.json", 0))
        } else {
            self.script
                .lock()
                .unwrap()
                .get_mut(&(resource.clone(), is_watch))
                .and_then(|q| q.pop_front())
        };
        let step = match step {
            Some(s) => s,
            None if is_watch => Step {
                status: 200,
                content_type: JSON,
                chunks: Vec::new(),
                hang: true,
                phase: 0,
            },
            None => panic!("unscripted list of {resource}"),
        };
        let mut phase = self.phase.subscribe();
        let _ = phase.wait_for(|p| *p >= step.phase).await;
        let chunks = futures::stream::iter(
            step.chunks
                .into_iter()
                .map(|c| Ok(Frame::data(Bytes::from(c)))),
        );
        let frames: BoxStream<'static, Result<Frame<Bytes>, Infallible>> = if step.hang {
            chunks.chain(futures::stream::pending()).boxed()
        } else {
            chunks.boxed()
        };
        http::Response::builder()
            .status(step.status)
            .header("content-type", step.content_type)
            .body(StreamBody::new(frames))
            .unwrap()
    }
}

/// Every resource but ClusterNetworkPolicies.
fn scripted_without_cnps() -> Replay {
    let r = Replay::new();
    r.add("namespaces", false, list("namespaces-list.json", 1));
    r.add("nodes", false, list("nodes-list.json", 1));
    r.add("nodes", true, watch("nodes-watch.jsonl", 2, true));
    r.add("pods", false, list("pods-list.json", 1));
    r.add("pods", true, watch("pods-watch.jsonl", 2, true));
    r.add(
        "networkpolicies",
        false,
        list("networkpolicies-list.json", 1),
    );
    // The MODIFIED event, then 410 Gone: the watcher lists again (from phase 2 on).
    r.add(
        "networkpolicies",
        true,
        watch("networkpolicies-watch.jsonl", 2, false),
    );
    r.add(
        "networkpolicies",
        false,
        list("networkpolicies-relist.json", 2),
    );
    r.add(
        "services",
        false,
        failure(500, JSON, "services-list-error.json", 1),
    );
    r.add("services", false, list("services-list.json", 1));
    r.add("endpointslices", false, list("endpointslices-list.json", 1));
    r.add("egressgateways", false, list("egressgateways-list.json", 1));
    r
}

fn scripted() -> Replay {
    let r = scripted_without_cnps();
    r.add(
        "clusternetworkpolicies",
        false,
        list("clusternetworkpolicies-list.json", 1),
    );
    // An added policy and an invalid update; the watch ends and resumes from the last
    // version (phase 3): the update fixed, a deletion.
    r.add(
        "clusternetworkpolicies",
        true,
        watch("clusternetworkpolicies-watch.jsonl", 2, false),
    );
    r.add(
        "clusternetworkpolicies",
        true,
        watch("clusternetworkpolicies-watch-2.jsonl", 3, true),
    );
    r
}

fn client(replay: &Replay) -> kube::Client {
    let r = replay.clone();
    let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let r = r.clone();
        async move { Ok::<_, Infallible>(r.answer(req).await) }
    });
    kube::Client::new(svc, "default")
}

/// Feeds the watches into the state until `done` holds (or fails after `timeout`).
async fn until(
    state: &mut ClusterState,
    updates: &mut (impl futures::Stream<Item = palisade::source::kube::Update> + Unpin),
    timeout: Duration,
    what: &str,
    done: impl Fn(&ClusterState) -> bool,
) {
    let deadline = Instant::now() + timeout;
    // Checked between events and every 50 ms (requests are made after the last event).
    while !done(state) {
        match tokio::time::timeout(Duration::from_millis(50), updates.next()).await {
            Ok(Some(u)) => {
                state.handle(u);
            }
            Ok(None) => panic!("the watches ended before {what}"),
            Err(_) => assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: relists {}, events {}, failing {:?}",
                state.relists,
                state.events,
                state.failing()
            ),
        }
    }
}

fn pod(ns: &str, name: &str) -> PodRef {
    PodRef {
        namespace: ns.into(),
        name: name.into(),
    }
}

const WEB: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 11);
const CLIENT2: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 21);
const SCANNER: Ipv4Addr = Ipv4Addr::new(10, 244, 2, 20);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 10, 10);
const NODE_2: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 3);
const NODE_3: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 4);
/// BPF_PROG_TEST_RUN runs packets on `lo`: web's endpoint is ifindex 1.
const WEB_IF: u32 = 1;
const CLIENT_IF: u32 = 2;

/// Compiles the state for this node's endpoints (web on `lo`, client beside it) with the
/// Services expanded, as `Agent::reconcile` does.
fn compile(
    state: &ClusterState,
    compiler: &mut Compiler,
    ids: &mut palisade_policy::services::ServiceIds,
) -> DesiredState {
    let eps = vec![
        LocalEndpoint {
            pod: pod("demo", "web"),
            ifindex: WEB_IF,
        },
        LocalEndpoint {
            pod: pod("demo", "client"),
            ifindex: CLIENT_IF,
        },
    ];
    let node: IpAddr = "172.18.0.2".parse().unwrap();
    let mut d = compiler.compile(&state.store, &eps, &[node]);
    let r = palisade_policy::services::expand(&mut d, &state.services, ids, Some("node-1"));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    d
}

fn web_from(d: &DesiredState, src: Ipv4Addr, port: u16) -> bool {
    evaluate(
        d,
        WEB_IF,
        Direction::Ingress,
        src.into(),
        WEB.into(),
        PROTO_TCP,
        port,
    )
    .allowed
}

fn web_to(d: &DesiredState, dst: Ipv4Addr, port: u16) -> bool {
    evaluate(
        d,
        WEB_IF,
        Direction::Egress,
        dst.into(),
        WEB.into(),
        PROTO_TCP,
        port,
    )
    .allowed
}

fn client_to(d: &DesiredState, dst: Ipv4Addr, proto: u8, port: u16) -> bool {
    evaluate(
        d,
        CLIENT_IF,
        Direction::Egress,
        dst.into(),
        CLIENT.into(),
        proto,
        port,
    )
    .allowed
}

mod datapath {
    //! The real programs on the maps the writer filled (root only).
    use super::*;
    use crate::support::{SYN, load, tcp4, test_run};
    use palisade_datapath::loader::{Datapath, TO_POD};
    use palisade_datapath::writer::MapWriter;

    pub fn require_root() -> bool {
        crate::support::root_or("not root: checking the store and the compiled state only")
    }

    pub struct Maps {
        dp: Datapath,
        pub writer: MapWriter,
        sport: u16,
    }

    impl Maps {
        pub fn new() -> Maps {
            let (dp, writer) = load();
            Maps {
                dp,
                writer,
                sport: 40000,
            }
        }

        /// A TCP SYN `src -> WEB:port` through `to_pod` (web's ingress): passed?
        pub fn web_from(&mut self, src: Ipv4Addr, port: u16) -> bool {
            self.sport += 1;
            test_run(&self.dp, TO_POD, &tcp4(src, WEB, self.sport, port, SYN)) == 0
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn replayed_api_drives_compiler_and_maps() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let root = datapath::require_root();
    let replay = scripted();
    // The agent's default, streaming lists: this API server (1.33) refuses each, and each
    // watch lists with LIST from then on.
    let mut updates = Box::pin(watch_all(client(&replay), InitialList::default()));
    let mut state = ClusterState::default();

    // Phase 1: the initial lists (services after a failed list and a backoff).
    until(
        &mut state,
        &mut updates,
        Duration::from_secs(30),
        "every watch to list",
        ClusterState::ready,
    )
    .await;
    assert_eq!(
        replay.count("list services"),
        2,
        "the failed list was retried"
    );
    assert_eq!(
        state.list_fallbacks().len(),
        Watch::ALL.len(),
        "every watch fell back to LIST"
    );
    for w in Watch::ALL {
        assert_eq!(
            replay.count(&format!("stream {} ", w.as_str())),
            1,
            "{}: one streaming list, refused, then LIST",
            w.as_str()
        );
    }
    assert!(
        state.watch_errors().is_empty(),
        "a refused streaming list is not a failing watch"
    );
    assert!(
        state.failing().is_empty(),
        "the failure clears once the list succeeds"
    );
    assert_eq!(state.store.namespaces.len(), 4);
    assert_eq!(
        state.store.egress_gateways["partners"].destinations,
        vec!["192.0.2.0/24".parse().unwrap()],
        "an EgressGateway as the API server serves a custom resource"
    );
    assert_eq!(state.store.pods.len(), 5);
    assert!(
        state.store.pods[&pod("demo", "done")].ips.is_empty(),
        "a finished pod's address is not its any more"
    );
    assert!(state.store.pods[&pod("kube-system", "kube-proxy-7x2kq")].host_network);
    assert_eq!(state.store.policies.len(), 3);
    assert!(state.errors().is_empty(), "{:?}", state.errors());
    assert_eq!(state.services.services.len(), 2);
    assert_eq!(
        state.store.nodes.keys().collect::<Vec<_>>(),
        ["node-1", "node-2"]
    );
    assert_eq!(
        state.store.nodes["node-1"].addresses,
        [IpAddr::from([172, 18, 0, 2])],
        "InternalIP, not the Hostname"
    );
    assert_eq!(
        state.store.nodes["node-1"].labels["kubernetes.io/os"],
        "linux"
    );
    assert!(!state.not_installed(Watch::ClusterNetworkPolicies));
    assert_eq!(
        state.store.cluster_policies.keys().collect::<Vec<_>>(),
        ["web-egress-baseline", "web-metrics"]
    );
    let metrics = &state.store.cluster_policies["web-metrics"];
    assert_eq!((metrics.tier, metrics.priority), (Tier::Admin, 10));
    assert_eq!(metrics.ingress.len(), 1);
    assert_eq!(metrics.ingress[0].action, Action::Accept);
    let baseline = &state.store.cluster_policies["web-egress-baseline"];
    assert_eq!((baseline.tier, baseline.priority), (Tier::Baseline, 50));
    assert_eq!(baseline.egress.len(), 2);

    let mut compiler = Compiler::default();
    let mut ids = palisade_policy::services::ServiceIds::default();
    let d1 = compile(&state, &mut compiler, &mut ids);
    assert!(web_from(&d1, CLIENT, 8080), "web-ingress: client on http");
    assert!(web_from(&d1, SCANNER, 8080), "allow-scanner");
    assert!(!web_from(&d1, SCANNER, 9090));
    assert!(!web_from(&d1, CLIENT2, 8080), "client-2 is not known yet");
    assert!(client_to(&d1, VIP, PROTO_TCP, 80), "web's Service port 80");
    assert!(!client_to(&d1, VIP, PROTO_TCP, 81));
    assert!(!client_to(&d1, WEB, PROTO_UDP, 53));
    // The ClusterNetworkPolicies: web-metrics (Admin) admits clients on 9100 where web-ingress
    // does not; web-egress-baseline (Baseline, web has no egress NetworkPolicy) lets web reach
    // the nodes and nothing else.
    assert!(web_from(&d1, CLIENT, 9100), "web-metrics");
    assert!(!web_from(&d1, SCANNER, 9100));
    assert!(web_to(&d1, NODE_2, 10250), "web-egress-baseline: nodes");
    assert!(!web_to(&d1, NODE_3, 10250), "node-3 is not known yet");
    assert!(
        !web_to(&d1, SCANNER, 80),
        "web-egress-baseline: nothing else"
    );

    let mut maps = root.then(datapath::Maps::new);
    if let Some(m) = maps.as_mut() {
        let stats = m.writer.apply(&d1);
        assert_eq!(stats.failed, 0);
        assert!(m.web_from(CLIENT, 8080));
        assert!(m.web_from(SCANNER, 8080));
        assert!(!m.web_from(SCANNER, 9090));
        assert!(!m.web_from(CLIENT2, 8080));
        assert!(m.web_from(CLIENT, 9100), "web-metrics, by the programs");
        assert!(!m.web_from(SCANNER, 9100));
    }

    // Phase 2: watch events (an added pod, a bookmark, a deleted pod, a modified policy, an
    // added and a modified node, an added ClusterNetworkPolicy and an invalid update of
    // another) and 410 Gone on the policy watch, whose re-list no longer holds allow-scanner.
    replay.phase.send_replace(2);
    until(
        &mut state,
        &mut updates,
        Duration::from_secs(30),
        "the watch events and the re-list",
        |s| {
            s.ready()
                && s.relists >= 1
                && s.store.pods.contains_key(&pod("demo", "client-2"))
                && !s.store.pods.contains_key(&pod("demo", "done"))
                && replay.count("watch networkpolicies") >= 2
                && s.store.nodes.contains_key("node-3")
                && s.store.nodes["node-2"]
                    .labels
                    .contains_key("palisade.io/zone")
                && s.store.cluster_policies.contains_key("allow-dns")
                && !s.errors().is_empty()
        },
    )
    .await;
    let errors: Vec<String> = state.errors().iter().map(|e| e.to_string()).collect();
    assert_eq!(
        errors,
        [
            "ClusterNetworkPolicy web-metrics: spec.ingress[0].action: unsupported value \"Drop\" \
             (want Accept, Deny or Pass)"
        ],
        "the invalid update is reported, naming the object and the field"
    );
    let metrics = &state.store.cluster_policies["web-metrics"];
    assert_eq!(
        (metrics.priority, metrics.ingress[0].action),
        (10, Action::Accept),
        "the last good version stays in force"
    );
    assert!(
        state.incomplete().is_empty(),
        "it has a last good version: {:?}",
        state.incomplete()
    );
    assert_eq!(
        state.store.nodes["node-3"].addresses,
        [
            IpAddr::from([172, 18, 0, 4]),
            "fc00:f853:ccd:e793::4".parse::<IpAddr>().unwrap()
        ]
    );
    assert_eq!(state.store.cluster_policies["allow-dns"].priority, 5);
    assert_eq!(
        replay.count("list networkpolicies"),
        2,
        "re-listed after 410"
    );
    assert!(replay.count("watch networkpolicies") >= 2);
    assert!(
        replay
            .requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.starts_with("watch networkpolicies") && r.contains("resourceVersion=1010")),
        "watching again from the re-list's version: {:?}",
        replay.requests.lock().unwrap()
    );
    assert!(state.synced(Watch::Pods));
    assert_eq!(
        state.store.policies.len(),
        2,
        "allow-scanner went in the gap"
    );
    assert!(
        !state
            .store
            .policies
            .contains_key(&("demo".into(), "allow-scanner".into()))
    );

    let d2 = compile(&state, &mut compiler, &mut ids);
    assert!(web_from(&d2, CLIENT2, 8080), "client-2 is a client");
    assert!(!web_from(&d2, SCANNER, 8080), "allow-scanner is gone");
    assert!(web_from(&d2, CLIENT, 9090), "web-ingress as re-listed");
    assert!(
        client_to(&d2, WEB, PROTO_UDP, 53),
        "client-egress as modified"
    );
    assert!(client_to(&d2, VIP, PROTO_TCP, 80));
    assert!(
        web_from(&d2, CLIENT, 9100),
        "web-metrics' last good version in force"
    );
    assert!(web_to(&d2, NODE_3, 10250), "node-3 is a node now");
    assert!(!web_to(&d2, SCANNER, 80));
    if let Some(m) = maps.as_mut() {
        let stats = m.writer.apply(&d2);
        assert_eq!(stats.failed, 0);
        assert!(stats.removed > 0, "the gap's deletions leave the maps");
        assert!(m.web_from(CLIENT2, 8080));
        assert!(!m.web_from(SCANNER, 8080));
        assert!(m.web_from(CLIENT, 9090));
        assert!(m.web_from(CLIENT, 9100));
        assert_eq!(m.writer.applied().identities, d2.identities);
        assert_eq!(m.writer.applied().policy, d2.policy);
    }

    // Phase 3: the ClusterNetworkPolicy watch resumed from its last version: the update fixed,
    // a policy deleted.
    replay.phase.send_replace(3);
    until(
        &mut state,
        &mut updates,
        Duration::from_secs(30),
        "the fixed ClusterNetworkPolicy",
        |s| s.store.cluster_policies["web-metrics"].priority == 20,
    )
    .await;
    until(
        &mut state,
        &mut updates,
        Duration::from_secs(10),
        "the deleted ClusterNetworkPolicy",
        |s| !s.store.cluster_policies.contains_key("web-egress-baseline"),
    )
    .await;
    assert!(state.errors().is_empty(), "{:?}", state.errors());
    assert!(state.ready());
    assert!(
        replay
            .requests
            .lock()
            .unwrap()
            .iter()
            .any(|r| r.starts_with("watch clusternetworkpolicies")
                && r.contains("resourceVersion=1007")),
        "the watch resumed from the last event's version: {:?}",
        replay.requests.lock().unwrap()
    );
    assert_eq!(replay.count("list clusternetworkpolicies"), 1, "no re-list");
    assert_eq!(
        replay.count("stream networkpolicies"),
        1,
        "the re-list after 410 Gone is a LIST: the API server refused streaming lists"
    );
    assert_eq!(
        state.store.cluster_policies.keys().collect::<Vec<_>>(),
        ["allow-dns", "web-metrics"]
    );
    let d3 = compile(&state, &mut compiler, &mut ids);
    assert!(web_from(&d3, CLIENT, 9100), "web-metrics, fixed");
    assert!(
        web_to(&d3, SCANNER, 80),
        "web-egress-baseline is gone: web's egress is open"
    );
    if let Some(m) = maps.as_mut() {
        assert_eq!(m.writer.apply(&d3).failed, 0);
        assert!(m.web_from(CLIENT, 9100));
    }
    eprintln!(
        "{} events, {} re-list(s), requests: {:?}",
        state.events,
        state.relists,
        replay.requests.lock().unwrap()
    );
}

/// What the tracing subscriber writes, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    /// Lines holding every one of `what`.
    fn count_all(&self, what: &[&str]) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| what.iter().all(|w| l.contains(w)))
            .count()
    }

    fn count(&self, what: &str) -> usize {
        self.count_all(&[what])
    }
}

#[tokio::test(flavor = "current_thread")]
async fn without_the_cnp_crd_network_policy_is_enforced_and_the_crd_noticed_once_installed() {
    use tracing_subscriber::util::SubscriberInitExt;
    let log = Captured::default();
    let writer = log.clone();
    // This thread's subscriber: the watches run on it (a current-thread runtime).
    let _log = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish()
        .set_default();
    let replay = scripted_without_cnps();
    // An API server without the group (plain text), then one that has the group but not this
    // version (a Status), then the CRD installed (phase 2).
    let not_found = [
        failure(
            404,
            "text/plain; charset=utf-8",
            "clusternetworkpolicies-404.txt",
            1,
        ),
        failure(404, JSON, "clusternetworkpolicies-404-status.json", 1),
        list("clusternetworkpolicies-installed-list.json", 2),
    ];
    for step in not_found {
        replay.add("clusternetworkpolicies", false, step);
    }
    let mut updates = Box::pin(watch_all(client(&replay), InitialList::List));
    let mut state = ClusterState::default();

    until(
        &mut state,
        &mut updates,
        Duration::from_secs(30),
        "every watch but the missing one to list",
        ClusterState::ready,
    )
    .await;
    assert!(state.not_installed(Watch::ClusterNetworkPolicies));
    assert!(state.failing().is_empty(), "{:?}", state.failing());
    assert!(state.watch_errors().is_empty(), "not a configuration error");
    assert!(state.errors().is_empty(), "{:?}", state.errors());
    assert!(state.store.cluster_policies.is_empty());
    assert_eq!(state.store.nodes.len(), 2, "nodes are watched all the same");
    // NetworkPolicy is enforced: the view is whole, and compiles as it does with the CRD.
    let mut compiler = Compiler::default();
    let mut ids = palisade_policy::services::ServiceIds::default();
    let d = compile(&state, &mut compiler, &mut ids);
    assert!(web_from(&d, CLIENT, 8080), "web-ingress: client on http");
    assert!(!web_from(&d, SCANNER, 9090), "web is isolated");
    assert!(client_to(&d, VIP, PROTO_TCP, 80));

    // The watch tries again with backoff; the second 404 (the other shape) and the request
    // after it (held until phase 2) change nothing and say nothing more.
    until(
        &mut state,
        &mut updates,
        Duration::from_secs(30),
        "two more tries",
        |s| {
            assert!(s.ready(), "a retry never holds back enforcement");
            replay.count("list clusternetworkpolicies") >= 3
        },
    )
    .await;
    assert!(state.ready());
    assert!(state.not_installed(Watch::ClusterNetworkPolicies));
    assert_eq!(
        log.count(CNP_NOT_INSTALLED),
        1,
        "one message for two 404s:\n{}",
        String::from_utf8_lossy(&log.0.lock().unwrap())
    );
    assert_eq!(
        log.count_all(&["watch failed", "clusternetworkpolicies"]),
        0,
        "a missing CRD is no failing watch:\n{}",
        String::from_utf8_lossy(&log.0.lock().unwrap())
    );
    assert_eq!(
        log.count_all(&["watch failed", "services"]),
        1,
        "(failures are logged: the failed list of services)"
    );

    // The CRD is installed: the retry lists its policies.
    replay.phase.send_replace(2);
    until(
        &mut state,
        &mut updates,
        Duration::from_secs(30),
        "the policies of the installed CRD",
        |s| s.ready() && s.store.cluster_policies.contains_key("web-metrics"),
    )
    .await;
    assert!(state.ready());
    assert!(!state.not_installed(Watch::ClusterNetworkPolicies));
    assert!(state.synced(Watch::ClusterNetworkPolicies));
    assert_eq!(log.count(CNP_INSTALLED), 1);
    assert_eq!(log.count(CNP_NOT_INSTALLED), 1);
    assert!(state.errors().is_empty(), "{:?}", state.errors());
    eprintln!(
        "requests: {:?}\nlog:\n{}",
        replay.requests.lock().unwrap(),
        String::from_utf8_lossy(&log.0.lock().unwrap())
    );
}
