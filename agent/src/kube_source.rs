//! Cluster mode: the API server as the source. kube-rs watchers (list, then watch; on a
//! dropped watch they resume from the last resource version, on `410 Gone` they list again,
//! and every error backs off exponentially) feed Namespaces, Pods (cluster-wide: peers are
//! selected across namespaces), NetworkPolicies, Services and EndpointSlices into the same
//! `model::Store` the standalone source fills, and the same `Agent::enforce` compiles and writes
//! it: one pipeline, two sources.
//!
//! The store keeps only what policy needs (`PodInfo`: labels, addresses, named ports, node,
//! hostNetwork; namespace labels; validated policies; Service VIPs and ports; EndpointSlice
//! backends); watch events are converted as they arrive and the objects dropped.
//!
//! Nothing is enforced before every watch has listed once: a partial view could lack a policy
//! (and lift isolation) or a namespace (and break its selectors). Likewise nothing is enforced
//! while a watch is re-listing after `410 Gone`: objects deleted during the gap are removed only
//! when the list is complete, and the store is enforced only when it is whole again. Meanwhile
//! the pinned maps keep enforcing the last good state.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::health::Health;
use crate::model::{ConfigError, Kind, Object, ObjectKey, Store};
use crate::run::{Agent, RunConfig};
use crate::services::{self, ServiceStore};

/// The five watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Source {
    Namespaces,
    Pods,
    NetworkPolicies,
    Services,
    EndpointSlices,
}

impl Source {
    pub const ALL: [Source; 5] = [
        Source::Namespaces,
        Source::Pods,
        Source::NetworkPolicies,
        Source::Services,
        Source::EndpointSlices,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Source::Namespaces => "namespaces",
            Source::Pods => "pods",
            Source::NetworkPolicies => "networkpolicies",
            Source::Services => "services",
            Source::EndpointSlices => "endpointslices",
        }
    }
}

/// One event of one watch.
#[derive(Debug)]
pub enum Update {
    Namespace(Box<watcher::Event<Namespace>>),
    Pod(Box<watcher::Event<Pod>>),
    Policy(Box<watcher::Event<NetworkPolicy>>),
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    /// The watch failed (it backs off and resumes or re-lists by itself).
    Failed(Source, String),
}

fn watch<K>(
    api: Api<K>,
    source: Source,
    wrap: fn(watcher::Event<K>) -> Update,
) -> impl Stream<Item = Update> + Send + 'static
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    // Lists are served from the API server's watch cache (resourceVersion=0): every node's
    // agent lists every pod, which must not go to etcd each time.
    // (Unpaginated: the API server ignores a limit with resourceVersion=0 anyway, and kube
    // would drop the version to honour the limit.)
    let mut cfg = watcher::Config::default().any_semantic();
    cfg.page_size = None;
    watcher(api, cfg).default_backoff().map(move |r| match r {
        Ok(e) => wrap(e),
        Err(e) => Update::Failed(source, e.to_string()),
    })
}

/// Every watch the agent needs, merged.
pub fn watch_all(client: Client) -> impl Stream<Item = Update> + Send + 'static {
    let pods = watch(Api::<Pod>::all(client.clone()), Source::Pods, |e| {
        Update::Pod(Box::new(e))
    });
    futures::stream::select_all([
        watch(
            Api::<Namespace>::all(client.clone()),
            Source::Namespaces,
            |e| Update::Namespace(Box::new(e)),
        )
        .boxed(),
        pods.boxed(),
        watch(
            Api::<NetworkPolicy>::all(client.clone()),
            Source::NetworkPolicies,
            |e| Update::Policy(Box::new(e)),
        )
        .boxed(),
        watch(Api::<Service>::all(client.clone()), Source::Services, |e| {
            Update::Service(Box::new(e))
        })
        .boxed(),
        watch(
            Api::<EndpointSlice>::all(client),
            Source::EndpointSlices,
            |e| Update::Slice(Box::new(e)),
        )
        .boxed(),
    ])
}

/// `namespace`/`name` of an object (namespace empty for namespaces).
type Key = (String, String);

fn key_of<K: Resource>(o: &K) -> Key {
    (o.namespace().unwrap_or_default(), o.name_any())
}

/// The cluster as the watches have shown it: the store the compiler reads, and the Services.
#[derive(Debug, Default)]
pub struct ClusterState {
    pub store: Store,
    pub services: ServiceStore,
    /// Watches that have completed a list at least once.
    synced: BTreeSet<Source>,
    /// Watches in the middle of a (re)list: the keys listed so far.
    listing: BTreeMap<Source, BTreeSet<Key>>,
    /// Every key each watch holds (valid or not), so a re-list can remove what it no longer
    /// lists, invalid objects included.
    known: BTreeMap<Source, BTreeSet<Key>>,
    /// The last error of each watch, until it delivers again.
    failing: BTreeMap<Source, String>,
    /// Bumped when the Services change (the agent copies them only then).
    pub services_generation: u64,
    /// Events handled, and re-lists completed (for tests and the log).
    pub events: u64,
    pub relists: u64,
}

fn object_key(source: Source, key: &Key) -> Option<ObjectKey> {
    let kind = match source {
        Source::Namespaces => Kind::Namespace,
        Source::Pods => Kind::Pod,
        Source::NetworkPolicies => Kind::NetworkPolicy,
        _ => return None,
    };
    let namespace = if kind == Kind::Namespace {
        String::new()
    } else if key.0.is_empty() {
        crate::model::DEFAULT_NAMESPACE.to_string()
    } else {
        key.0.clone()
    };
    Some(ObjectKey {
        kind,
        namespace,
        name: key.1.clone(),
    })
}

enum Change<K> {
    Init,
    Apply(K, bool),
    Delete(K),
    Done,
}

fn change<K>(e: watcher::Event<K>) -> Change<K> {
    match e {
        watcher::Event::Init => Change::Init,
        watcher::Event::InitApply(o) => Change::Apply(o, true),
        watcher::Event::Apply(o) => Change::Apply(o, false),
        watcher::Event::Delete(o) => Change::Delete(o),
        watcher::Event::InitDone => Change::Done,
    }
}

impl ClusterState {
    /// Every watch has listed, and none is re-listing: the store is a whole view.
    pub fn ready(&self) -> bool {
        self.synced.len() == Source::ALL.len() && self.listing.is_empty()
    }

    pub fn synced(&self, source: Source) -> bool {
        self.synced.contains(&source)
    }

    /// Watches that are failing now, with their last error.
    pub fn failing(&self) -> &BTreeMap<Source, String> {
        &self.failing
    }

    /// Applies one event; true if the store or the Services changed.
    pub fn handle(&mut self, update: Update) -> bool {
        self.events += 1;
        match update {
            Update::Failed(source, e) => {
                warn!(watch = source.as_str(), "watch failed (backing off): {e}");
                self.failing.insert(source, e);
                false
            }
            Update::Namespace(e) => {
                self.model_event(Source::Namespaces, *e, |o| Object::Namespace(Box::new(o)))
            }
            Update::Pod(e) => self.model_event(Source::Pods, *e, Object::from),
            Update::Policy(e) => self.model_event(Source::NetworkPolicies, *e, |o| {
                Object::NetworkPolicy(Box::new(o))
            }),
            Update::Service(e) => {
                let changed = self.service_event(Source::Services, *e, |s, o| {
                    let _ = s.apply_service(o);
                });
                if changed {
                    self.services_generation += 1;
                }
                changed
            }
            Update::Slice(e) => {
                let changed = self.service_event(Source::EndpointSlices, *e, |s, o| {
                    let _ = s.apply_slice(o);
                });
                if changed {
                    self.services_generation += 1;
                }
                changed
            }
        }
    }

    fn begin(&mut self, source: Source) {
        self.listing.insert(source, BTreeSet::new());
    }

    fn touch(&mut self, source: Source, key: Key, listed: bool) {
        self.failing.remove(&source);
        if listed && let Some(l) = self.listing.get_mut(&source) {
            l.insert(key.clone());
        }
        self.known.entry(source).or_default().insert(key);
    }

    /// Ends a list: what the watch held and did not list is gone.
    fn finish(&mut self, source: Source) -> Vec<Key> {
        self.failing.remove(&source);
        let listed = self.listing.remove(&source).unwrap_or_default();
        let known = self.known.entry(source).or_default();
        let gone: Vec<Key> = known.difference(&listed).cloned().collect();
        *known = listed;
        if !self.synced.insert(source) {
            self.relists += 1;
            info!(watch = source.as_str(), removed = gone.len(), "re-listed");
        } else {
            info!(watch = source.as_str(), objects = known.len(), "listed");
        }
        gone
    }

    fn model_event<K: Resource>(
        &mut self,
        source: Source,
        e: watcher::Event<K>,
        wrap: fn(K) -> Object,
    ) -> bool {
        match change(e) {
            Change::Init => {
                self.begin(source);
                false
            }
            Change::Apply(o, listed) => {
                let key = key_of(&o);
                self.touch(source, key, listed);
                // Errors stay in the store (`Store::errors`) until the object is fixed.
                let _ = self.store.apply(wrap(o));
                true
            }
            Change::Delete(o) => {
                let key = key_of(&o);
                if let Some(k) = self.known.get_mut(&source) {
                    k.remove(&key);
                }
                if let Some(ok) = object_key(source, &key) {
                    self.store.remove(&ok);
                }
                true
            }
            Change::Done => {
                let gone = self.finish(source);
                for key in &gone {
                    if let Some(ok) = object_key(source, key) {
                        self.store.remove(&ok);
                    }
                }
                true
            }
        }
    }

    fn service_event<K: Resource>(
        &mut self,
        source: Source,
        e: watcher::Event<K>,
        apply: fn(&mut ServiceStore, &K),
    ) -> bool {
        let kind = if source == Source::Services {
            services::Kind::Service
        } else {
            services::Kind::EndpointSlice
        };
        let fix = |k: Key| {
            if k.0.is_empty() {
                (crate::model::DEFAULT_NAMESPACE.to_string(), k.1)
            } else {
                k
            }
        };
        match change(e) {
            Change::Init => {
                self.begin(source);
                false
            }
            Change::Apply(o, listed) => {
                self.touch(source, key_of(&o), listed);
                apply(&mut self.services, &o);
                true
            }
            Change::Delete(o) => {
                let key = key_of(&o);
                if let Some(k) = self.known.get_mut(&source) {
                    k.remove(&key);
                }
                self.services.remove(kind, &fix(key));
                true
            }
            Change::Done => {
                for key in self.finish(source) {
                    self.services.remove(kind, &fix(key));
                }
                true
            }
        }
    }

    /// Policies the store holds no version of because they never validated: a restarted
    /// agent keeps the pinned enforcement rather than enforce without them.
    pub fn incomplete(&self) -> Vec<String> {
        self.known
            .get(&Source::NetworkPolicies)
            .into_iter()
            .flatten()
            .filter(|k| {
                let ns = object_key(Source::NetworkPolicies, k)
                    .map(|o| o.namespace)
                    .unwrap_or_default();
                !self.store.policies.contains_key(&(ns, k.1.clone()))
            })
            .map(|k| format!("NetworkPolicy {}/{} is invalid", k.0, k.1))
            .collect()
    }

    /// Configuration errors and failing watches, for the status and the log.
    pub fn errors(&self) -> Vec<ConfigError> {
        let mut out: Vec<ConfigError> = self.store.errors().into_iter().cloned().collect();
        out.extend(self.services.errors().into_iter().cloned());
        out.extend(crate::run::unresolved_named_ports(&self.store));
        out
    }

    /// Failing watches, as configuration errors of the watched resource.
    pub fn watch_errors(&self) -> Vec<ConfigError> {
        self.failing
            .iter()
            .map(|(s, e)| {
                ConfigError::new(
                    format!("watch {}", s.as_str()),
                    "",
                    format!("{e} (retrying with backoff)"),
                )
            })
            .collect()
    }
}

/// How cluster mode reaches the API server and this node.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// A kubeconfig file; `None`: the pod's service account (in-cluster).
    pub kubeconfig: Option<PathBuf>,
    /// `spec.nodeName` of this node's pods (`NODE_NAME`, from the downward API).
    pub node_name: String,
    /// Where the CNI plugin records the interfaces it provisions (`None`: no plugin).
    pub cni_state_dir: Option<PathBuf>,
    /// `/healthz` and `/readyz` (`None`: off).
    pub health_addr: Option<std::net::SocketAddr>,
}

/// A client from a kubeconfig file, or the in-cluster service account.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::incluster().context(
            "not running in a pod (KUBERNETES_SERVICE_HOST unset): give --kubeconfig, or \
             --manifests DIR for standalone mode",
        )?,
    };
    Client::try_from(config).context("creating the API client")
}

/// Runs the agent against the API server until SIGTERM or SIGINT.
pub async fn run_cluster(cfg: RunConfig, cluster: ClusterConfig, object: &[u8]) -> Result<()> {
    let health = Health::default();
    health.beat();
    if let Some(addr) = cluster.health_addr {
        health.serve(addr);
    }
    let client = client(cluster.kubeconfig.as_deref()).await?;
    raise_memlock_limit();
    let mut agent = Agent::start(cfg.clone(), object)?;
    agent.set_cni_state_dir(cluster.cni_state_dir.clone());
    info!(
        node = cluster.node_name,
        pin_dir = %cfg.pin_dir.display(),
        "cluster agent running; waiting for every watch to list"
    );
    drive(&mut agent, &cfg, &cluster, watch_all(client), &health).await
}

/// The cluster loop: events into the state, a reconcile whenever the state is whole and
/// something changed (a burst of events is one reconcile), host changes and repairs as in
/// standalone mode, CNI wake-ups.
pub async fn drive(
    agent: &mut Agent,
    cfg: &RunConfig,
    cluster: &ClusterConfig,
    updates: impl Stream<Item = Update> + Send + 'static,
    health: &Health,
) -> Result<()> {
    let mut updates = Box::pin(updates);
    let mut state = ClusterState::default();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let notify = match &cluster.cni_state_dir {
        Some(dir) => match crate::cni::bind_notify(dir) {
            Ok(s) => Some(s),
            Err(e) => {
                error!("CNI wake-ups are off (the records are still read): {e:#}");
                None
            }
        },
        None => None,
    };
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut last_host_read = Instant::now();
    let mut dirty = false;
    let mut services_generation = u64::MAX;
    let mut reported_waiting = Instant::now();
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            u = updates.next() => match u {
                Some(u) => dirty |= state.handle(u),
                None => anyhow::bail!("the watches ended"),
            },
            r = async {
                match &notify {
                    Some(s) => s.recv(&mut buf).await,
                    None => std::future::pending().await,
                }
            } => {
                if r.is_ok() {
                    dirty = true;
                }
            }
            _ = tick.tick() => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
        // A burst of events is one reconcile.
        while let Some(Some(u)) = updates.next().now_or_never() {
            dirty |= state.handle(u);
        }
        health.beat();
        if last_host_read.elapsed() >= cfg.host_poll {
            last_host_read = Instant::now();
            dirty |= agent.poll_host();
            // Records of pods that came and went without a wake-up.
            dirty |= agent.cni_records_changed();
        }
        if !state.ready() {
            if reported_waiting.elapsed() > Duration::from_secs(10) {
                reported_waiting = Instant::now();
                let waiting: Vec<&str> = Source::ALL
                    .iter()
                    .filter(|s| !state.synced(**s))
                    .map(|s| s.as_str())
                    .collect();
                warn!(
                    ?waiting,
                    failing = ?state.failing(),
                    "not enforcing until every watch has listed (the pinned state stays in force)"
                );
            }
            continue;
        }
        if !dirty {
            continue;
        }
        dirty = false;
        if services_generation != state.services_generation {
            services_generation = state.services_generation;
            agent.set_services(state.services.clone());
        }
        let started = unix_ms();
        let mut errors = state.errors();
        errors.extend(state.watch_errors());
        agent.hold_if_incomplete(state.incomplete());
        match agent.enforce(&state.store, errors, started) {
            Ok(()) => health.set_ready(true),
            Err(e) => {
                error!("reconcile failed: {e:#}");
                health.set_ready(false);
            }
        }
        crate::run::release_freed_memory();
    }
    info!("stopping; pinned maps and links keep enforcing");
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to the locked-memory limit, which container runtimes
/// set low (the DaemonSet grants SYS_RESOURCE for this). Later kernels charge the cgroup.
fn raise_memlock_limit() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!("RLIMIT_MEMLOCK stays as it is: {e}");
    }
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}
