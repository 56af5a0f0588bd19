//! Cluster mode: the API server as the source. kube-rs watchers (list, then watch; on a
//! dropped watch they resume from the last resource version, on `410 Gone` they list again,
//! and every error backs off exponentially) feed Namespaces, Pods (cluster-wide: peers are
//! selected across namespaces), NetworkPolicies, Services and EndpointSlices into the same
//! `model::Store` the standalone source fills (`ClusterState`), and the main loop (`source`)
//! reconciles it as it does the files: one loop, two sources.
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
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::reconcile::{RunConfig, View, unix_ms};
use palisade_policy::model::{ConfigError, Kind, Object, ObjectKey, Store};
use palisade_policy::services::{self, ServiceStore};

/// The five watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Watch {
    Namespaces,
    Pods,
    NetworkPolicies,
    Services,
    EndpointSlices,
}

impl Watch {
    pub const ALL: [Watch; 5] = [
        Watch::Namespaces,
        Watch::Pods,
        Watch::NetworkPolicies,
        Watch::Services,
        Watch::EndpointSlices,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Watch::Namespaces => "namespaces",
            Watch::Pods => "pods",
            Watch::NetworkPolicies => "networkpolicies",
            Watch::Services => "services",
            Watch::EndpointSlices => "endpointslices",
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
    Failed(Watch, String),
}

fn watch<K>(
    api: Api<K>,
    source: Watch,
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
    let pods = watch(Api::<Pod>::all(client.clone()), Watch::Pods, |e| {
        Update::Pod(Box::new(e))
    });
    futures::stream::select_all([
        watch(
            Api::<Namespace>::all(client.clone()),
            Watch::Namespaces,
            |e| Update::Namespace(Box::new(e)),
        )
        .boxed(),
        pods.boxed(),
        watch(
            Api::<NetworkPolicy>::all(client.clone()),
            Watch::NetworkPolicies,
            |e| Update::Policy(Box::new(e)),
        )
        .boxed(),
        watch(Api::<Service>::all(client.clone()), Watch::Services, |e| {
            Update::Service(Box::new(e))
        })
        .boxed(),
        watch(
            Api::<EndpointSlice>::all(client),
            Watch::EndpointSlices,
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
    synced: BTreeSet<Watch>,
    /// Watches in the middle of a (re)list: the keys listed so far.
    listing: BTreeMap<Watch, BTreeSet<Key>>,
    /// Every key each watch holds (valid or not), so a re-list can remove what it no longer
    /// lists, invalid objects included.
    known: BTreeMap<Watch, BTreeSet<Key>>,
    /// The last error of each watch, until it delivers again.
    failing: BTreeMap<Watch, String>,
    /// Events handled, and re-lists completed (for tests and the log).
    pub events: u64,
    pub relists: u64,
}

fn object_key(source: Watch, key: &Key) -> Option<ObjectKey> {
    let kind = match source {
        Watch::Namespaces => Kind::Namespace,
        Watch::Pods => Kind::Pod,
        Watch::NetworkPolicies => Kind::NetworkPolicy,
        _ => return None,
    };
    let namespace = if kind == Kind::Namespace {
        String::new()
    } else if key.0.is_empty() {
        palisade_policy::model::DEFAULT_NAMESPACE.to_string()
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
        self.synced.len() == Watch::ALL.len() && self.listing.is_empty()
    }

    pub fn synced(&self, source: Watch) -> bool {
        self.synced.contains(&source)
    }

    /// Watches that are failing now, with their last error.
    pub fn failing(&self) -> &BTreeMap<Watch, String> {
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
                self.model_event(Watch::Namespaces, *e, |o| Object::Namespace(Box::new(o)))
            }
            Update::Pod(e) => self.model_event(Watch::Pods, *e, Object::from),
            Update::Policy(e) => self.model_event(Watch::NetworkPolicies, *e, |o| {
                Object::NetworkPolicy(Box::new(o))
            }),
            Update::Service(e) => self.service_event(Watch::Services, *e, |s, o| {
                let _ = s.apply_service(o);
            }),
            Update::Slice(e) => self.service_event(Watch::EndpointSlices, *e, |s, o| {
                let _ = s.apply_slice(o);
            }),
        }
    }

    fn begin(&mut self, source: Watch) {
        self.listing.insert(source, BTreeSet::new());
    }

    fn touch(&mut self, source: Watch, key: Key, listed: bool) {
        self.failing.remove(&source);
        if listed && let Some(l) = self.listing.get_mut(&source) {
            l.insert(key.clone());
        }
        self.known.entry(source).or_default().insert(key);
    }

    /// Ends a list: what the watch held and did not list is gone.
    fn finish(&mut self, source: Watch) -> Vec<Key> {
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
        source: Watch,
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
        source: Watch,
        e: watcher::Event<K>,
        apply: fn(&mut ServiceStore, &K),
    ) -> bool {
        let kind = if source == Watch::Services {
            services::Kind::Service
        } else {
            services::Kind::EndpointSlice
        };
        let fix = |k: Key| {
            if k.0.is_empty() {
                (palisade_policy::model::DEFAULT_NAMESPACE.to_string(), k.1)
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
            .get(&Watch::NetworkPolicies)
            .into_iter()
            .flatten()
            .filter(|k| {
                let ns = object_key(Watch::NetworkPolicies, k)
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
        out.extend(super::unresolved_named_ports(&self.store));
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

/// How often the loop goes round without an event.
const TICK: Duration = Duration::from_millis(200);

/// The API server as a `Source`: the watches' events into a `ClusterState`.
pub struct KubeSource {
    node_name: String,
    updates: Pin<Box<dyn Stream<Item = Update> + Send>>,
    state: ClusterState,
    /// When the loop last said what it waits for.
    reported_waiting: Instant,
}

impl KubeSource {
    /// Every watch the agent needs (`watch_all`), on the API server `cluster` names.
    pub async fn connect(cluster: &ClusterConfig) -> Result<KubeSource> {
        let client = client(cluster.kubeconfig.as_deref()).await?;
        raise_memlock_limit();
        Ok(KubeSource::new(&cluster.node_name, watch_all(client)))
    }

    /// The source over any stream of watch events (tests replay recorded ones).
    pub fn new(
        node_name: &str,
        updates: impl Stream<Item = Update> + Send + 'static,
    ) -> KubeSource {
        KubeSource {
            node_name: node_name.to_string(),
            updates: Box::pin(updates),
            state: ClusterState::default(),
            reported_waiting: Instant::now(),
        }
    }
}

impl super::Source for KubeSource {
    fn tick(&self) -> Duration {
        TICK
    }

    fn started(&self, cfg: &RunConfig) {
        info!(
            node = self.node_name,
            pin_dir = %cfg.pin_dir.display(),
            "cluster agent running; waiting for every watch to list"
        );
    }

    async fn event(&mut self) -> Result<bool> {
        match self.updates.next().await {
            Some(u) => Ok(self.state.handle(u)),
            None => anyhow::bail!("the watches ended"),
        }
    }

    /// A burst of events is one reconcile.
    fn poll(&mut self) -> bool {
        let mut changed = false;
        while let Some(Some(u)) = self.updates.next().now_or_never() {
            changed |= self.state.handle(u);
        }
        changed
    }

    fn ready(&mut self) -> bool {
        if self.state.ready() {
            return true;
        }
        if self.reported_waiting.elapsed() > Duration::from_secs(10) {
            self.reported_waiting = Instant::now();
            let waiting: Vec<&str> = Watch::ALL
                .iter()
                .filter(|s| !self.state.synced(**s))
                .map(|s| s.as_str())
                .collect();
            warn!(
                ?waiting,
                failing = ?self.state.failing(),
                "not enforcing until every watch has listed (the pinned state stays in force)"
            );
        }
        false
    }

    fn view(&mut self) -> View<'_> {
        let started_at_unix_ms = unix_ms();
        let mut errors = self.state.errors();
        errors.extend(self.state.watch_errors());
        View {
            store: &self.state.store,
            services: &self.state.services,
            errors,
            incomplete: self.state.incomplete(),
            started_at_unix_ms,
        }
    }
}

/// Kernels before 5.11 charge BPF maps to the locked-memory limit, which container runtimes
/// set low (the DaemonSet grants SYS_RESOURCE for this). Later kernels charge the cgroup.
fn raise_memlock_limit() {
    use nix::sys::resource::{RLIM_INFINITY, Resource, setrlimit};
    if let Err(e) = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY) {
        tracing::debug!("RLIMIT_MEMLOCK stays as it is: {e}");
    }
}
