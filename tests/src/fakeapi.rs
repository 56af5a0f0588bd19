//! A fake Kubernetes API server for the agent's cluster mode: lists, watches with resource
//! versions, bookmarks, `410 Gone` after a compaction, custom resources whose CRD is not
//! installed. Any number of agents may watch at once (each watch has its own connection and
//! thread; every change is kept in one history that each watch reads from its own resource
//! version), and the server tells how far it has sent each watcher ([`FakeApi::wait_delivered`]),
//! so a test can wait for every agent's reconcile of a change. Also the agent in cluster mode
//! ([`ClusterAgent`]) and the objects tests write. `PALISADE_FAKEAPI_DEBUG=1` prints every
//! request and every event sent, with the client's address.
//!
//! For `kubectl palisade`: a namespace's pods (with a label selector), one pod by name (a
//! `NotFound` Status when there is none), and a pod's `exec` subresource, upgraded to a
//! WebSocket with the `v5.channel.k8s.io` (or `v4`) subprotocol as the API server does: the
//! command a test registered for the pod ([`FakeApi::serve_exec`]) runs with its stdout and
//! stderr sent on channels 1 and 2 as it writes them, and its exit status as a `Status` on
//! channel 3 (`NonZeroExitCode` with an `ExitCode` cause, as the kubelet reports it).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::agent::{Bpffs, Status, terminate, unix_ms};
use crate::rig::Node;

// ---------------------------------------------------------------------------------------------
// The fake API server
// ---------------------------------------------------------------------------------------------

/// The resources the agent watches: (plural, list path, kind, apiVersion).
const RESOURCES: &[(&str, &str, &str, &str)] = &[
    ("namespaces", "/api/v1/namespaces", "Namespace", "v1"),
    ("pods", "/api/v1/pods", "Pod", "v1"),
    ("nodes", "/api/v1/nodes", "Node", "v1"),
    (
        "networkpolicies",
        "/apis/networking.k8s.io/v1/networkpolicies",
        "NetworkPolicy",
        "networking.k8s.io/v1",
    ),
    (
        "clusternetworkpolicies",
        "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies",
        "ClusterNetworkPolicy",
        "policy.networking.k8s.io/v1alpha2",
    ),
    ("services", "/api/v1/services", "Service", "v1"),
    (
        "egressgateways",
        "/apis/palisade.io/v1alpha1/egressgateways",
        "EgressGateway",
        "palisade.io/v1alpha1",
    ),
    (
        "endpointslices",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "EndpointSlice",
        "discovery.k8s.io/v1",
    ),
];

#[derive(Default)]
struct ApiState {
    rv: u64,
    /// (resource, namespace, name) -> object.
    objects: BTreeMap<(String, String, String), Value>,
    /// (rv, resource, type, object).
    events: Vec<(u64, String, &'static str, Value)>,
    /// Watches from a version below this get `410 Gone`.
    compacted: u64,
    /// Requests served, by "list <resource>" / "watch <resource>" (404s included).
    requests: BTreeMap<String, u64>,
    /// Resources whose CRD is not installed: every request for them is a `404`.
    missing: BTreeSet<String>,
    /// Streaming lists are refused (`422 Invalid`), as Kubernetes 1.33 does by default.
    refuse_streams: bool,
    /// Open watches, by a number of their own.
    watchers: BTreeMap<u64, Watcher>,
    /// What `exec` into a pod runs, by (namespace, name).
    execs: BTreeMap<(String, String), ExecHandler>,
}

/// What `exec` into a pod runs: the command for the container's argv (`command=` parameters),
/// spawned with its stdout and stderr streamed back on channels 1 and 2 and its exit status
/// on channel 3.
pub type ExecHandler = Arc<dyn Fn(&[String]) -> std::process::Command + Send + Sync>;

impl ApiState {
    /// The objects of `resource`, as a list or a streaming list sends them.
    fn objects_of<'s>(&'s self, resource: &'s str) -> impl Iterator<Item = &'s Value> + 's {
        self.objects
            .iter()
            .filter(move |((r, _, _), _)| r == resource)
            .map(|(_, v)| v)
    }
}

/// An open watch: who asked, for what, and how far it has been sent the history.
#[derive(Clone, Debug)]
struct Watcher {
    peer: IpAddr,
    resource: &'static str,
    /// Every event of `resource` up to this resource version has been written (and flushed)
    /// to the watch.
    sent: u64,
    /// The last resource versions `sent` reached, each with the moment before the writes that
    /// got it there (a reconcile that acts on them starts later); where no event of the
    /// resource was written, the moment of the version before.
    reached: BTreeMap<u64, SystemTime>,
}

static WATCHERS: AtomicU64 = AtomicU64::new(0);

/// Custom resources: their list items keep `kind` and `apiVersion`, as the API server serves
/// them (it leaves them out of built-in lists).
fn custom(resource: &str) -> bool {
    resource == "clusternetworkpolicies" || resource == "egressgateways"
}

pub struct FakeApi {
    state: Arc<(Mutex<ApiState>, Condvar)>,
    stop: Arc<AtomicBool>,
    pub addr: SocketAddr,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn resource_of(kind: &str) -> &'static str {
    RESOURCES
        .iter()
        .find(|r| r.2 == kind)
        .map(|r| r.0)
        .unwrap_or_else(|| panic!("unknown kind {kind}"))
}

impl FakeApi {
    /// Listens on 127.0.0.1 inside `node`'s network namespace (where the agent runs).
    pub fn start(node: &Node) -> Result<FakeApi> {
        let listener = node.in_netns(|| TcpListener::bind("127.0.0.1:0"))??;
        FakeApi::serve_on(listener)
    }

    /// Listens on `addr` (port 0: any) inside the network namespace `netns` (a cluster's
    /// fabric, which every node reaches).
    pub fn start_in(netns: &str, addr: SocketAddr) -> Result<FakeApi> {
        let listener = crate::netns::in_netns(netns, move || TcpListener::bind(addr))??;
        FakeApi::serve_on(listener)
    }

    /// Listens on `addr` in the caller's network namespace.
    pub fn start_here(addr: SocketAddr) -> Result<FakeApi> {
        FakeApi::serve_on(TcpListener::bind(addr)?)
    }

    fn serve_on(listener: TcpListener) -> Result<FakeApi> {
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let state: Arc<(Mutex<ApiState>, Condvar)> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (st, sp) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !sp.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (st, sp) = (st.clone(), sp.clone());
                        std::thread::spawn(move || {
                            let _ = serve(conn, &st, &sp);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(FakeApi {
            state,
            stop,
            addr,
            thread: Some(thread),
        })
    }

    /// Creates or replaces an object (a YAML or JSON document with kind and metadata).
    pub fn apply(&self, doc: &str) {
        let mut v: Value = palisade_policy::manifest::yaml_documents(doc)
            .expect("YAML")
            .into_iter()
            .next()
            .expect("a YAML object");
        let kind = v["kind"].as_str().expect("kind").to_string();
        let resource = resource_of(&kind).to_string();
        let ns = v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("")
            .to_string();
        let name = v["metadata"]["name"].as_str().expect("name").to_string();
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap();
        s.rv += 1;
        let rv = s.rv;
        v["metadata"]["resourceVersion"] = json!(rv.to_string());
        v["metadata"]["uid"] = json!(format!("uid-{resource}-{ns}-{name}"));
        let key = (resource.clone(), ns, name);
        let ty = if s.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        s.objects.insert(key, v.clone());
        s.events.push((rv, resource, ty, v));
        cv.notify_all();
    }

    /// Applies every document of a multi-document YAML text.
    pub fn apply_all(&self, text: &str) {
        for doc in text.split("\n---") {
            if doc.trim().is_empty() {
                continue;
            }
            self.apply(doc);
        }
    }

    pub fn delete(&self, kind: &str, ns: &str, name: &str) {
        let resource = resource_of(kind).to_string();
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap();
        let Some(mut v) = s
            .objects
            .remove(&(resource.clone(), ns.to_string(), name.to_string()))
        else {
            return;
        };
        s.rv += 1;
        let rv = s.rv;
        v["metadata"]["resourceVersion"] = json!(rv.to_string());
        s.events.push((rv, resource, "DELETED", v));
        cv.notify_all();
    }

    /// Forgets the event history, as etcd compaction does: every open and future watch from an
    /// older version gets `410 Gone` and must list again.
    pub fn compact(&self) {
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap();
        s.rv += 1;
        s.compacted = s.rv;
        s.events.clear();
        cv.notify_all();
    }

    /// Removes (`false`) or restores the definition of a custom resource `kind`: while it is
    /// missing, its list and watch answer `404 page not found` as an API server without the
    /// CRD does (objects applied meanwhile are kept for when it is installed: a test applies
    /// them after installing).
    pub fn set_installed(&self, kind: &str, installed: bool) {
        let resource = resource_of(kind).to_string();
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap();
        if installed {
            s.missing.remove(&resource);
        } else {
            s.missing.insert(resource);
        }
        cv.notify_all();
    }

    /// Refuses every streaming list (`sendInitialEvents=true`) with `422 Invalid`, as
    /// Kubernetes 1.33 does with its default feature gates (WatchList off).
    pub fn refuse_streaming_lists(&self) {
        self.state.0.lock().unwrap().refuse_streams = true;
    }

    /// `exec` into pod `namespace/name` runs `handler(argv)` (the pod must also be in the API
    /// for lookups; the exec itself needs only this).
    pub fn serve_exec(&self, namespace: &str, name: &str, handler: ExecHandler) {
        let mut s = self.state.0.lock().unwrap();
        s.execs
            .insert((namespace.to_string(), name.to_string()), handler);
    }

    /// The current resource version (that of the last change).
    pub fn resource_version(&self) -> u64 {
        self.state.0.lock().unwrap().rv
    }

    /// The open watches of `peer` (by the address it connects from) and how far each has
    /// been sent: (resource, resource version).
    pub fn watches_of(&self, peer: IpAddr) -> Vec<(&'static str, u64)> {
        let s = self.state.0.lock().unwrap();
        s.watchers
            .values()
            .filter(|w| w.peer == peer)
            .map(|w| (w.resource, w.sent))
            .collect()
    }

    /// Waits until every client in `peers` (by the address it connects from) has an open
    /// watch of every resource that is served and every one of them has been sent the
    /// history up to `rv` (each change up to `rv` written to it); then, for each peer, the
    /// moment before the last of those writes began. A reconcile of that agent that starts
    /// later can act on the changes; one that starts earlier cannot have.
    pub fn wait_delivered(
        &self,
        peers: &[IpAddr],
        rv: u64,
        timeout: Duration,
    ) -> Result<Vec<SystemTime>> {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.state;
        let mut s = lock.lock().unwrap();
        loop {
            // Per peer: each served resource's newest watch (an agent killed and restarted
            // leaves older ones open until a write to them fails), and when it reached `rv`.
            let mut behind = Vec::new();
            let mut times = Vec::new();
            for peer in peers {
                let mut latest = None::<SystemTime>;
                for r in RESOURCES.iter().filter(|r| !s.missing.contains(r.0)) {
                    let newest = s
                        .watchers
                        .values()
                        .rev()
                        .find(|w| w.peer == *peer && w.resource == r.0);
                    // When this watch reached `rv` (or the oldest moment it remembers past
                    // it: later, so on the safe side).
                    match newest.and_then(|w| w.reached.range(rv..).next()) {
                        Some((_, t)) => latest = Some(latest.map_or(*t, |l| l.max(*t))),
                        None => behind.push(format!("{peer} {}", r.0)),
                    }
                }
                times.push(latest.unwrap_or_else(SystemTime::now));
            }
            if behind.is_empty() {
                return Ok(times);
            }
            if Instant::now() > deadline {
                bail!("watches not sent resource version {rv} within {timeout:?}: {behind:?}");
            }
            s = cv.wait_timeout(s, Duration::from_millis(20)).unwrap().0;
        }
    }

    /// How many times the watches of `resource` were filled: its LISTs and its streaming
    /// lists.
    pub fn fills(&self, resource: &str) -> u64 {
        self.requests(&format!("list {resource}")) + self.requests(&format!("stream {resource}"))
    }

    /// Requests served, by what they were: `list R`, `watch R` (streaming lists included),
    /// `stream R`, `exec NS/NAME`.
    pub fn requests(&self, what: &str) -> u64 {
        self.state
            .0
            .lock()
            .unwrap()
            .requests
            .get(what)
            .copied()
            .unwrap_or(0)
    }

    /// A kubeconfig for this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self, path: &Path) -> Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster: {{server: 'http://{}'}}\n\
                 users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context: {{cluster: fake, user: fake}}\n\
                 current-context: fake\n",
                self.addr
            ),
        )?;
        Ok(())
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.state.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(conn: &mut TcpStream, code: &str, body: &[u8]) -> std::io::Result<()> {
    respond_as(conn, code, "application/json", body)
}

fn respond_as(
    conn: &mut TcpStream,
    code: &str,
    content_type: &str,
    body: &[u8],
) -> std::io::Result<()> {
    write!(
        conn,
        "HTTP/1.1 {code}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )?;
    conn.write_all(body)
}

/// What kube-apiserver answers for a path it does not serve (an API group without its CRD).
fn page_not_found(conn: &mut TcpStream) -> Result<()> {
    respond_as(
        conn,
        "404 Not Found",
        "text/plain; charset=utf-8",
        b"404 page not found\n",
    )
    .map_err(Into::into)
}

fn serve(
    mut conn: TcpStream,
    state: &Arc<(Mutex<ApiState>, Condvar)>,
    stop: &AtomicBool,
) -> Result<()> {
    conn.set_nonblocking(false)?;
    let peer = conn.peer_addr()?.ip();
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    // Header names in lower case.
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let debug = std::env::var_os("PALISADE_FAKEAPI_DEBUG").is_some();
    if debug {
        eprintln!("fakeapi: {peer} {target}");
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let q: BTreeMap<&str, &str> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .collect();
    if let Some(rest) = path.strip_prefix("/api/v1/namespaces/")
        && let Some((ns, rest)) = rest.split_once('/')
    {
        return serve_namespaced_pods(conn, state, ns, rest, query, &headers);
    }
    let Some(&(resource, _, kind, api_version)) = RESOURCES.iter().find(|r| r.1 == path) else {
        return page_not_found(&mut conn);
    };
    let watch = q.get("watch") == Some(&"true");
    // A streaming list (`sendInitialEvents=true`, KEP-3157): every object as an ADDED event,
    // then a bookmark marking the end of them, then the watch as usual.
    let initial_events = watch && q.get("sendInitialEvents") == Some(&"true");
    let (lock, cv) = &**state;
    {
        let mut s = lock.lock().unwrap();
        if s.missing.contains(resource) {
            let what = format!("{} {resource}", if watch { "watch" } else { "list" });
            *s.requests.entry(what).or_default() += 1;
            if initial_events {
                *s.requests.entry(format!("stream {resource}")).or_default() += 1;
            }
            drop(s);
            return page_not_found(&mut conn);
        }
        if initial_events && s.refuse_streams {
            *s.requests.entry(format!("stream {resource}")).or_default() += 1;
            drop(s);
            return status_failure(
                &mut conn,
                422,
                "Invalid",
                "ListOptions.meta.k8s.io \"\" is invalid: sendInitialEvents: Forbidden: \
                 sendInitialEvents is forbidden for watch unless the WatchList feature gate is \
                 enabled",
            );
        }
    }
    if !watch {
        let mut s = lock.lock().unwrap();
        *s.requests.entry(format!("list {resource}")).or_default() += 1;
        let items: Vec<Value> = s
            .objects_of(resource)
            .map(|v| {
                // Items of built-in lists carry no kind or apiVersion, as the API server sends
                // them.
                let mut v = v.clone();
                if !custom(resource)
                    && let Some(o) = v.as_object_mut()
                {
                    o.remove("kind");
                    o.remove("apiVersion");
                }
                v
            })
            .collect();
        let body = json!({
            "kind": format!("{kind}List"),
            "apiVersion": api_version,
            "metadata": {"resourceVersion": s.rv.to_string()},
            "items": items,
        });
        drop(s);
        return respond(&mut conn, "200 OK", body.to_string().as_bytes()).map_err(Into::into);
    }
    let mut since: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .unwrap_or(290u64);
    let bookmarks = q.get("allowWatchBookmarks") == Some(&"true");
    write!(
        conn,
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n"
    )?;
    let started = Instant::now();
    let mut last_bookmark = Instant::now();
    let id = WATCHERS.fetch_add(1, Ordering::Relaxed);
    // Forgotten when the watch ends, however it ends.
    struct Forget<'a>(&'a (Mutex<ApiState>, Condvar), u64);
    impl Drop for Forget<'_> {
        fn drop(&mut self) {
            let mut s = self.0.0.lock().unwrap_or_else(|e| e.into_inner());
            s.watchers.remove(&self.1);
        }
    }
    let _forget = Forget(state, id);
    let mut s = lock.lock().unwrap();
    *s.requests.entry(format!("watch {resource}")).or_default() += 1;
    if initial_events {
        *s.requests.entry(format!("stream {resource}")).or_default() += 1;
        let events: Vec<String> = s
            .objects_of(resource)
            .map(|v| json!({"type": "ADDED", "object": v}).to_string())
            .collect();
        since = s.rv;
        let end = json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
            "metadata": {"resourceVersion": since.to_string(),
                "annotations": {"k8s.io/initial-events-end": "true"}}}});
        drop(s);
        for e in events {
            writeln!(conn, "{e}")?;
        }
        writeln!(conn, "{end}")?;
        conn.flush()?;
        s = lock.lock().unwrap();
    }
    s.watchers.insert(
        id,
        Watcher {
            peer,
            resource,
            sent: since,
            // What a watch starts from came with the list before it: as good as delivered
            // long ago.
            reached: BTreeMap::from([(since, SystemTime::UNIX_EPOCH)]),
        },
    );
    loop {
        if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(timeout) {
            return Ok(());
        }
        if since < s.compacted {
            let gone = json!({"type": "ERROR", "object": {
                "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("too old resource version: {since} ({})", s.compacted),
                "reason": "Expired", "code": 410}});
            drop(s);
            writeln!(conn, "{gone}")?;
            return Ok(());
        }
        let mut out = Vec::new();
        for (rv, r, ty, obj) in &s.events {
            if *rv > since && r == resource {
                out.push(json!({"type": ty, "object": obj}).to_string());
                since = *rv;
            }
        }
        let bookmark = bookmarks && last_bookmark.elapsed() > Duration::from_secs(1);
        let current = s.rv;
        drop(s);
        let writing = SystemTime::now();
        let wrote_events = !out.is_empty();
        for e in out {
            if debug {
                eprintln!("fakeapi: {peer} {resource} <- {e}");
            }
            writeln!(conn, "{e}")?;
        }
        if bookmark {
            last_bookmark = Instant::now();
            since = since.max(current);
            writeln!(
                conn,
                "{}",
                json!({"type": "BOOKMARK", "object": {"kind": kind, "apiVersion": api_version,
                    "metadata": {"resourceVersion": since.to_string()}}})
            )?;
        }
        conn.flush()?;
        s = lock.lock().unwrap();
        if let Some(w) = s.watchers.get_mut(&id)
            && current > w.sent
        {
            w.sent = current;
            // Without events, the watch was complete for `current` when it last was.
            let at = if wrote_events {
                writing
            } else {
                w.reached.values().next_back().copied().unwrap_or(writing)
            };
            w.reached.insert(current, at);
            while w.reached.len() > 64 {
                w.reached.pop_first();
            }
        }
        s = cv.wait_timeout(s, Duration::from_millis(250)).unwrap().0;
    }
}

/// `%2F` and `+` in a query value.
fn url_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(&s[i + 1..i + 3], 16) {
                Ok(b) => {
                    out.push(b);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A query's parameters in order, decoded (`command` comes once per argument).
fn query_params(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (url_decode(k), url_decode(v)))
        .collect()
}

/// A `Status` failure as the API server sends it.
fn status_failure(conn: &mut TcpStream, code: u16, reason: &str, message: &str) -> Result<()> {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code});
    let line = match code {
        404 => "404 Not Found",
        400 => "400 Bad Request",
        422 => "422 Unprocessable Entity",
        _ => "500 Internal Server Error",
    };
    respond(conn, line, body.to_string().as_bytes()).map_err(Into::into)
}

/// `labelSelector=k=v,k2=v2` (equality only) on an object's labels.
fn labels_match(obj: &Value, selector: &str) -> bool {
    selector
        .split(',')
        .filter(|t| !t.is_empty())
        .all(|term| match term.split_once('=') {
            Some((k, v)) => obj["metadata"]["labels"][k.trim_end_matches('=')] == json!(v),
            None => !obj["metadata"]["labels"][term].is_null(),
        })
}

/// `/api/v1/namespaces/NS/...`: the namespace's pods (`pods`), one pod (`pods/NAME`), and
/// `pods/NAME/exec`.
fn serve_namespaced_pods(
    mut conn: TcpStream,
    state: &Arc<(Mutex<ApiState>, Condvar)>,
    ns: &str,
    rest: &str,
    query: &str,
    headers: &BTreeMap<String, String>,
) -> Result<()> {
    let params = query_params(query);
    let parts: Vec<&str> = rest.split('/').collect();
    let mut s = state.0.lock().unwrap();
    match parts.as_slice() {
        ["pods"] => {
            *s.requests.entry(format!("list pods {ns}")).or_default() += 1;
            let selector = params
                .iter()
                .find(|(k, _)| k == "labelSelector")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            let items: Vec<Value> = s
                .objects
                .iter()
                .filter(|((r, n, _), v)| r == "pods" && n == ns && labels_match(v, &selector))
                .map(|(_, v)| {
                    let mut v = v.clone();
                    if let Some(o) = v.as_object_mut() {
                        o.remove("kind");
                        o.remove("apiVersion");
                    }
                    v
                })
                .collect();
            let body = json!({"kind": "PodList", "apiVersion": "v1",
                "metadata": {"resourceVersion": s.rv.to_string()}, "items": items});
            drop(s);
            respond(&mut conn, "200 OK", body.to_string().as_bytes()).map_err(Into::into)
        }
        ["pods", name] => {
            *s.requests
                .entry(format!("get pod {ns}/{name}"))
                .or_default() += 1;
            let key = ("pods".to_string(), ns.to_string(), name.to_string());
            match s.objects.get(&key).cloned() {
                Some(v) => {
                    drop(s);
                    respond(&mut conn, "200 OK", v.to_string().as_bytes()).map_err(Into::into)
                }
                None => {
                    drop(s);
                    status_failure(
                        &mut conn,
                        404,
                        "NotFound",
                        &format!("pods \"{name}\" not found"),
                    )
                }
            }
        }
        ["pods", name, "exec"] => {
            *s.requests.entry(format!("exec {ns}/{name}")).or_default() += 1;
            let handler = s.execs.get(&(ns.to_string(), name.to_string())).cloned();
            drop(s);
            let Some(handler) = handler else {
                return status_failure(
                    &mut conn,
                    404,
                    "NotFound",
                    &format!("pods \"{name}\" not found"),
                );
            };
            let argv: Vec<String> = params
                .iter()
                .filter(|(k, _)| k == "command")
                .map(|(_, v)| v.clone())
                .collect();
            serve_exec(conn, headers, &argv, &handler)
        }
        _ => {
            drop(s);
            page_not_found(&mut conn)
        }
    }
}

/// The exec stream's channels (k8s.io/apimachinery/pkg/util/remotecommand).
const STDOUT_CHANNEL: u8 = 1;
const STDERR_CHANNEL: u8 = 2;
const STATUS_CHANNEL: u8 = 3;

/// Upgrades the connection to a WebSocket (`v5.channel.k8s.io`, else `v4.channel.k8s.io`),
/// runs the command and streams it: each read of its stdout and stderr as a binary message
/// on channel 1 or 2, then its exit status on channel 3, then a close. A client that goes
/// away (a `--follow` interrupted) has the command killed.
fn serve_exec(
    mut conn: TcpStream,
    headers: &BTreeMap<String, String>,
    argv: &[String],
    handler: &ExecHandler,
) -> Result<()> {
    use std::io::Read;
    use tungstenite::{Message, protocol::Role};
    let upgrade = headers
        .get("upgrade")
        .is_some_and(|u| u.eq_ignore_ascii_case("websocket"));
    let Some(key) = headers.get("sec-websocket-key").filter(|_| upgrade) else {
        return status_failure(
            &mut conn,
            400,
            "BadRequest",
            "exec needs a WebSocket upgrade",
        );
    };
    let offered: Vec<&str> = headers
        .get("sec-websocket-protocol")
        .map(|p| p.split(',').map(str::trim).collect())
        .unwrap_or_default();
    let Some(protocol) = ["v5.channel.k8s.io", "v4.channel.k8s.io"]
        .into_iter()
        .find(|p| offered.contains(p))
    else {
        return status_failure(
            &mut conn,
            400,
            "BadRequest",
            &format!("no supported subprotocol in {offered:?}"),
        );
    };
    if argv.is_empty() {
        return status_failure(
            &mut conn,
            400,
            "BadRequest",
            "you must specify at least 1 command",
        );
    }
    write!(
        conn,
        "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-accept: {}\r\nsec-websocket-protocol: {protocol}\r\n\r\n",
        tungstenite::handshake::derive_accept_key(key.as_bytes())
    )?;
    conn.flush()?;
    conn.set_read_timeout(Some(Duration::from_millis(50)))?;
    let mut ws = tungstenite::WebSocket::from_raw_socket(conn, Role::Server, None);
    let mut cmd = handler(argv);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            // What the kubelet says of a command it cannot start.
            let status = json!({"metadata": {}, "status": "Failure", "reason": "InternalError",
                "message": format!("exec: {e}")});
            let mut msg = vec![STATUS_CHANNEL];
            msg.extend(status.to_string().as_bytes());
            ws.send(Message::binary(msg))?;
            let _ = ws.close(None);
            let _ = ws.flush();
            return Ok(());
        }
    };
    let (tx, rx) = std::sync::mpsc::channel::<(u8, Vec<u8>)>();
    let pipes: Vec<(u8, Box<dyn Read + Send>)> = vec![
        (
            STDOUT_CHANNEL,
            Box::new(child.stdout.take().expect("piped")),
        ),
        (
            STDERR_CHANNEL,
            Box::new(child.stderr.take().expect("piped")),
        ),
    ];
    for (channel, mut pipe) in pipes {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 16 * 1024];
            while let Ok(n) = pipe.read(&mut buf) {
                if n == 0 || tx.send((channel, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let gone = loop {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok((channel, data)) => {
                let mut msg = Vec::with_capacity(data.len() + 1);
                msg.push(channel);
                msg.extend(data);
                if ws.send(Message::binary(msg)).is_err() {
                    break true;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break false,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => match ws.read() {
                Ok(Message::Close(_)) => break true,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => break true,
            },
        }
    };
    if gone {
        let _ = child.kill();
        let _ = child.wait();
        return Ok(());
    }
    let exit = child.wait()?;
    let status = match exit.code() {
        Some(0) => json!({"metadata": {}, "status": "Success"}),
        code => {
            let code = code.unwrap_or(137);
            json!({"metadata": {}, "status": "Failure",
                "message": format!("command terminated with non-zero exit code: error executing command {argv:?}, exit code {code}"),
                "reason": "NonZeroExitCode",
                "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]}})
        }
    };
    let mut msg = vec![STATUS_CHANNEL];
    msg.extend(status.to_string().as_bytes());
    ws.send(Message::binary(msg))?;
    let _ = ws.close(None);
    // Until the client's close arrives (or it is gone).
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        match ws.read() {
            Ok(_) => {}
            Err(tungstenite::Error::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => break,
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------------

/// A node of the cluster with its InternalIP `ip` (any text: the API server does not check it).
pub fn node_yaml(name: &str, ip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{kubernetes.io/hostname: {name}, kubernetes.io/os: linux}}}}\n\
         status: {{addresses: [{{type: InternalIP, address: '{ip}'}}, {{type: Hostname, address: {name}}}]}}\n"
    )
}

/// A namespace with its `kubernetes.io/metadata.name` label, as the API server sets it.
pub fn namespace(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {{kubernetes.io/metadata.name: {name}}}}}\n"
    )
}

// ---------------------------------------------------------------------------------------------
// The agent in cluster mode
// ---------------------------------------------------------------------------------------------

/// `palisade run --kubeconfig` in a node's namespace, with its own bpffs, status file, log and
/// socket under a work directory; stopped on drop.
pub struct ClusterAgent {
    child: Option<Child>,
    /// Unmounted on drop, after the agent has stopped.
    _bpffs: Bpffs,
    pub pin_dir: PathBuf,
    pub status: PathBuf,
    pub log: PathBuf,
    pub cni_dir: PathBuf,
    socket: PathBuf,
    args: Vec<String>,
    /// The admin server (`/metrics`, `/healthz`, `/readyz`).
    pub admin: SocketAddr,
}

impl ClusterAgent {
    /// Mounts a bpffs under `work` and starts `palisade run --kubeconfig` in the node, as
    /// `node-1`.
    pub fn start(node: &Node, agent: &Path, kubeconfig: &Path, work: &Path) -> Result<Self> {
        ClusterAgent::start_as(node, "node-1", agent, kubeconfig, work)
    }

    /// As `start`, with `--node-name node_name` (the pods whose `spec.nodeName` it is are its
    /// endpoints, where their interfaces are found in `node`).
    pub fn start_as(
        node: &Node,
        node_name: &str,
        agent: &Path,
        kubeconfig: &Path,
        work: &Path,
    ) -> Result<Self> {
        ClusterAgent::start_with(node, node_name, agent, kubeconfig, work, &[])
    }

    /// As `start_as`, with `extra` arguments for `palisade run`.
    pub fn start_with(
        node: &Node,
        node_name: &str,
        agent: &Path,
        kubeconfig: &Path,
        work: &Path,
        extra: &[String],
    ) -> Result<Self> {
        let bpffs = Bpffs::mount(work.join("bpffs"))?;
        let pin_dir = bpffs.path().join("palisade");
        let cni_dir = work.join("cni");
        let status = work.join("status.json");
        let socket = work.join("run/palisade.sock");
        let admin = SocketAddr::from(([127, 0, 0, 1], palisade::admin::DEFAULT_PORT));
        let args: Vec<String> = vec![
            "run".into(),
            "--kubeconfig".into(),
            kubeconfig.display().to_string(),
            "--node-name".into(),
            node_name.into(),
            "--pin-dir".into(),
            pin_dir.display().to_string(),
            "--status-file".into(),
            status.display().to_string(),
            "--socket".into(),
            socket.display().to_string(),
            "--cni-state-dir".into(),
            cni_dir.display().to_string(),
            "--admin-addr".into(),
            admin.to_string(),
        ];
        let args = [args, extra.to_vec()].concat();
        let mut a = ClusterAgent {
            child: None,
            _bpffs: bpffs,
            pin_dir,
            status,
            log: work.join("agent.log"),
            cni_dir,
            socket,
            args,
            admin,
        };
        a.spawn(node, agent)?;
        Ok(a)
    }

    pub fn spawn(&mut self, node: &Node, agent: &Path) -> Result<()> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = node.command(agent);
        cmd.args(&self.args)
            .env("RUST_LOG", "info")
            .env_remove("KUBECONFIG")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(cmd.spawn().context("starting the agent")?);
        Ok(())
    }

    pub fn status(&self) -> Option<Status> {
        serde_json::from_str(&std::fs::read_to_string(&self.status).ok()?).ok()
    }

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The CLI socket (`state.json` beside it).
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for a reconcile that started after `since` and satisfies `ok`.
    pub fn wait(
        &mut self,
        since: SystemTime,
        timeout: Duration,
        ok: impl Fn(&Status) -> bool,
    ) -> Result<Status> {
        let deadline = Instant::now() + timeout;
        let since = unix_ms(since);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(st) = c.try_wait()?
            {
                bail!("agent exited ({st}); log:\n{}", self.log_text());
            }
            // Millisecond stamps: a reconcile the change triggered can start in the very
            // millisecond `since` was taken (`ok` says whether it saw the change).
            if let Some(s) = self.status()
                && s.started_at_unix_ms >= since
                && ok(&s)
            {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "no matching reconcile within {timeout:?} (status {:?}); log:\n{}",
                    self.status(),
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// `GET path` on the admin server, from inside the node: the status code.
    pub fn probe_health(&self, node: &Node, path: &str) -> Option<u16> {
        let addr = self.admin;
        let path = path.to_string();
        node.in_netns(move || -> Option<u16> {
            use std::io::Read;
            let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
            write!(c, "GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").ok()?;
            let mut s = String::new();
            let _ = c.read_to_string(&mut s);
            s.split_whitespace().nth(1)?.parse().ok()
        })
        .ok()
        .flatten()
    }
}

impl Drop for ClusterAgent {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            terminate(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A watch of `path` from `rv`: its lines, read on a thread until `n` arrived or the
    /// connection ended.
    fn watch(
        addr: SocketAddr,
        path: &str,
        rv: u64,
        n: usize,
    ) -> std::thread::JoinHandle<Vec<Value>> {
        let mut c = TcpStream::connect(addr).unwrap();
        write!(
            c,
            "GET {path}?watch=true&resourceVersion={rv} HTTP/1.1\r\nhost: x\r\n\r\n"
        )
        .unwrap();
        std::thread::spawn(move || {
            c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = BufReader::new(c);
            let mut line = String::new();
            // The status line and headers.
            while r.read_line(&mut line).unwrap_or(0) > 0 && line != "\r\n" {
                line.clear();
            }
            let mut out = Vec::new();
            while out.len() < n {
                line.clear();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    break;
                }
                out.push(serde_json::from_str(&line).unwrap());
            }
            out
        })
    }

    fn ns(name: &str) -> String {
        namespace(name)
    }

    /// The exec subprotocol as kube-rs's client speaks it (the plugin's own `Cluster`), with
    /// no node and no root: output on both channels, the exit status, output larger than the
    /// client's pipes, lines as they come, and lookups of pods that exist and do not.
    #[test]
    fn exec_streams_a_commands_output_and_exit_status_to_kube_rs() {
        use palisade::kubectl::{AGENT_CONTAINER, AGENT_SELECTOR, Cluster, PluginError, connect};
        let api = FakeApi::start_here("127.0.0.1:0".parse().unwrap()).unwrap();
        api.apply(
            &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "palisade-x7k2p", "namespace": "palisade-system",
                    "labels": {"app.kubernetes.io/name": "palisade",
                        "app.kubernetes.io/component": "agent"}},
                "spec": {"nodeName": "node-1", "containers": [{"name": "agent"}]},
                "status": {"phase": "Running", "containerStatuses": [{"name": "agent",
                    "ready": true, "restartCount": 0, "image": "x", "imageID": ""}]}})
            .to_string(),
        );
        // Another namespace's pod with the same labels is not an agent.
        api.apply(
            &json!({"apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": "impostor", "namespace": "default",
                    "labels": {"app.kubernetes.io/name": "palisade",
                        "app.kubernetes.io/component": "agent"}},
                "spec": {"nodeName": "node-2", "containers": [{"name": "agent"}]},
                "status": {"phase": "Running"}})
            .to_string(),
        );
        api.serve_exec(
            "palisade-system",
            "palisade-x7k2p",
            Arc::new(|argv: &[String]| {
                let mut c = std::process::Command::new("sh");
                c.arg("-c").arg(&argv[1]);
                c
            }),
        );
        let dir =
            std::env::temp_dir().join(format!("palisade-fakeapi-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        api.kubeconfig(&kubeconfig).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = connect(Some(&kubeconfig), None).await.unwrap();
            let c = Cluster::new(client, "palisade-system", AGENT_SELECTOR, AGENT_CONTAINER);
            let agents = c.agents().await.unwrap();
            assert_eq!(agents.len(), 1, "{agents:?}");
            assert_eq!(
                (agents[0].node.as_str(), agents[0].pod.as_str()),
                ("node-1", "palisade-x7k2p")
            );
            let sh = |script: &str| vec!["sh".to_string(), script.to_string()];
            let t = Duration::from_secs(20);
            let out = c
                .exec(&agents[0], &sh("echo out; echo err >&2; exit 3"), t)
                .await
                .unwrap();
            assert_eq!(
                (out.exit_code, out.stdout.as_slice(), out.stderr.as_str()),
                (3, &b"out\n"[..], "err\n")
            );
            assert_eq!(out.error_text(), "err");
            let big = c
                .exec(&agents[0], &sh("head -c 3000000 /dev/zero | tr '\\0' x"), t)
                .await
                .unwrap();
            assert_eq!((big.exit_code, big.stdout.len()), (0, 3_000_000));
            assert!(big.stdout.iter().all(|b| *b == b'x'));
            let mut lines = Vec::new();
            let ended = c
                .exec_lines(
                    &agents[0],
                    &sh("for i in 1 2 3; do echo line$i; sleep 0.1; done; echo gone >&2; exit 1"),
                    |l| lines.push(l.to_string()),
                )
                .await;
            assert_eq!(lines, ["line1", "line2", "line3"]);
            assert!(
                ended
                    .to_string()
                    .ends_with("the stream of verdicts ended: gone"),
                "{ended}"
            );
            assert!(c.pod("palisade-system/palisade-x7k2p").await.is_ok());
            match c.pod("shop/nope").await {
                Err(PluginError::PodNotFound { pod }) => assert_eq!(pod, "shop/nope"),
                other => panic!("{other:?}"),
            }
            let nobody = palisade::kubectl::AgentPod {
                node: "node-9".into(),
                pod: "palisade-gone".into(),
                phase: "Running".into(),
                ready: true,
            };
            let e = c
                .exec(&nobody, &sh("true"), t)
                .await
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("node node-9 (agent pod palisade-gone): exec:"),
                "{e}"
            );
        });
        assert_eq!(api.requests("exec palisade-system/palisade-x7k2p"), 3);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_watcher_gets_every_change_and_delivery_is_tracked() {
        let api = FakeApi::start_here("127.0.0.1:0".parse().unwrap()).unwrap();
        api.apply(&ns("first"));
        let rv = api.resource_version();
        let watchers: Vec<_> = (0..4)
            .map(|_| watch(api.addr, "/api/v1/namespaces", rv, 3))
            .collect();
        // Every watch is open (each peer has all seven; here only namespaces: wait for four).
        let deadline = Instant::now() + Duration::from_secs(10);
        while api.watches_of("127.0.0.1".parse().unwrap()).len() < 4 {
            assert!(Instant::now() < deadline, "watches did not open");
            std::thread::sleep(Duration::from_millis(10));
        }
        let before = SystemTime::now();
        api.apply(&ns("second"));
        api.apply(&node_yaml("n1", "10.0.0.1"));
        api.delete("Namespace", "", "first");
        api.apply(&ns("third"));
        let rv = api.resource_version();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let w = api.watches_of("127.0.0.1".parse().unwrap());
            if w.iter().all(|(r, sent)| *r == "namespaces" && *sent >= rv) {
                break;
            }
            assert!(Instant::now() < deadline, "not delivered: {w:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Each knows when it was sent the changes: not before they were made.
        {
            let s = api.state.0.lock().unwrap();
            assert_eq!(s.watchers.len(), 4);
            for w in s.watchers.values() {
                let (_, t) = w.reached.range(rv..).next().expect("reached rv");
                assert!(*t >= before);
            }
        }
        for w in watchers {
            let got: Vec<(String, String)> = w
                .join()
                .unwrap()
                .iter()
                .map(|e| {
                    (
                        e["type"].as_str().unwrap().to_string(),
                        e["object"]["metadata"]["name"]
                            .as_str()
                            .unwrap()
                            .to_string(),
                    )
                })
                .collect();
            assert_eq!(
                got,
                [
                    ("ADDED".to_string(), "second".to_string()),
                    ("DELETED".into(), "first".into()),
                    ("ADDED".into(), "third".into()),
                ]
            );
        }
    }
}
