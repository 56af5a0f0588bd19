//! Cluster mode: the API server as the source. kube-rs watchers (list, then watch; on a
//! dropped watch they resume from the last resource version, on `410 Gone` they list again,
//! and every error backs off exponentially) feed Namespaces, Pods (cluster-wide: peers are
//! selected across namespaces), Nodes (for ClusterNetworkPolicy's `nodes` peers and egress
//! gateway candidates), NetworkPolicies, ClusterNetworkPolicies, Services, EndpointSlices and
//! EgressGateways (optional like ClusterNetworkPolicies: Palisade's own CRD) into the same
//! `model::Store` the standalone source fills (`ClusterState`), and the main loop (`source`)
//! reconciles it as it does the files: one loop, two sources.
//!
//! The store keeps only what policy needs (`PodInfo`: labels, addresses, named ports, node,
//! hostNetwork; namespace labels; node labels and addresses; validated policies; Service VIPs
//! and ports; EndpointSlice backends); watch events are converted as they arrive and the
//! objects dropped.
//!
//! Nothing is enforced before every watch has listed once: a partial view could lack a policy
//! (and lift isolation) or a namespace (and break its selectors). Likewise nothing is enforced
//! while a watch is re-listing after `410 Gone`: objects deleted during the gap are removed only
//! when the list is complete, and the store is enforced only when it is whole again. Meanwhile
//! the pinned maps keep enforcing the last good state.
//!
//! ClusterNetworkPolicy is a custom resource (kubernetes-sigs/network-policy-api), so its CRD
//! may not be installed: the API server then answers its list with `404 Not Found`. That is not
//! a failing watch but a cluster without ClusterNetworkPolicies: it is logged once, the watch
//! stops holding back enforcement (NetworkPolicy is enforced as before) and goes on retrying
//! with the watcher's backoff (at most 30 s apart), quietly; once the CRD is installed the
//! list succeeds and its policies are enforced from then on. A 404 after the watch had listed
//! removes nothing: only lists and watch events change the store. (Deleting the CRD deletes
//! its objects first, which the watch delivers; a 404 while an API server restarts, before its
//! CRDs are served again, must not lift the policies in force.)
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::reconcile::{RunConfig, View, unix_ms};
use palisade_policy::cnp::raw;
use palisade_policy::model::egress::RawEgressGateway;
use palisade_policy::model::{ConfigError, Kind, Object, ObjectKey, Store};
use palisade_policy::services::{self, ServiceStore};

/// The API group of ClusterNetworkPolicy.
pub const CNP_GROUP: &str = "policy.networking.k8s.io";
/// The version of ClusterNetworkPolicy the agent reads (`raw::API_VERSION`).
pub const CNP_VERSION: &str = "v1alpha2";
/// The resource (plural) of ClusterNetworkPolicy.
pub const CNP_PLURAL: &str = "clusternetworkpolicies";

/// The watches.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Watch {
    Namespaces,
    Pods,
    Nodes,
    NetworkPolicies,
    ClusterNetworkPolicies,
    Services,
    EndpointSlices,
    EgressGateways,
}

impl Watch {
    pub const ALL: [Watch; 8] = [
        Watch::Namespaces,
        Watch::Pods,
        Watch::Nodes,
        Watch::NetworkPolicies,
        Watch::ClusterNetworkPolicies,
        Watch::Services,
        Watch::EndpointSlices,
        Watch::EgressGateways,
    ];

    /// The resource (plural) watched.
    pub fn as_str(self) -> &'static str {
        match self {
            Watch::Namespaces => "namespaces",
            Watch::Pods => "pods",
            Watch::Nodes => "nodes",
            Watch::NetworkPolicies => "networkpolicies",
            Watch::ClusterNetworkPolicies => CNP_PLURAL,
            Watch::Services => "services",
            Watch::EndpointSlices => "endpointslices",
            Watch::EgressGateways => EGW_PLURAL,
        }
    }

    /// The API group of the resource (`""`: core), as RBAC names it.
    pub fn api_group(self) -> &'static str {
        match self {
            Watch::Namespaces | Watch::Pods | Watch::Nodes | Watch::Services => "",
            Watch::NetworkPolicies => "networking.k8s.io",
            Watch::ClusterNetworkPolicies => CNP_GROUP,
            Watch::EndpointSlices => "discovery.k8s.io",
            Watch::EgressGateways => EGW_GROUP,
        }
    }

    /// A custom resource whose definition a cluster may lack (`404 Not Found` on its list):
    /// then the watch does not hold back enforcement.
    pub fn optional(self) -> bool {
        matches!(self, Watch::ClusterNetworkPolicies | Watch::EgressGateways)
    }
}

/// A ClusterNetworkPolicy as the API server serves it: the raw object (`cnp::raw`, every field
/// optional so that validation names what is missing or wrong), typed for kube-rs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClusterNetworkPolicyResource(pub raw::ClusterNetworkPolicy);

impl Resource for ClusterNetworkPolicyResource {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        raw::KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        CNP_GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        CNP_VERSION.into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        CNP_PLURAL.into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.0.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

/// The API group of EgressGateway (Palisade's own CRD, `manifests/crd-egressgateway.yaml`).
pub const EGW_GROUP: &str = "palisade.io";
pub const EGW_VERSION: &str = "v1alpha1";
pub const EGW_PLURAL: &str = "egressgateways";

/// An EgressGateway as the API server serves it (`model::egress::RawEgressGateway`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EgressGatewayResource(pub RawEgressGateway);

impl Resource for EgressGatewayResource {
    type DynamicType = ();
    type Scope = kube::core::ClusterResourceScope;

    fn kind(_: &()) -> Cow<'_, str> {
        palisade_policy::model::egress::KIND.into()
    }

    fn group(_: &()) -> Cow<'_, str> {
        EGW_GROUP.into()
    }

    fn version(_: &()) -> Cow<'_, str> {
        EGW_VERSION.into()
    }

    fn plural(_: &()) -> Cow<'_, str> {
        EGW_PLURAL.into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.0.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.0.metadata
    }
}

/// Said once when the EgressGateway CRD is not installed.
pub const EGW_NOT_INSTALLED: &str = "EgressGateway CRD (palisade.io/v1alpha1) not installed: \
     no egress gateways (kubectl apply -f manifests/crd-egressgateway.yaml); the agent checks \
     again now and then";

/// The one message for a cluster without the ClusterNetworkPolicy CRD.
pub const CNP_NOT_INSTALLED: &str = "ClusterNetworkPolicy CRD (policy.networking.k8s.io/v1alpha2) \
     not installed: ClusterNetworkPolicies are not enforced, NetworkPolicies are. Install \
     kubernetes-sigs/network-policy-api v0.2.0 (kubectl apply -f \
     https://github.com/kubernetes-sigs/network-policy-api/releases/download/v0.2.0/standard-install.yaml, \
     or experimental-install.yaml for nodes and domainNames peers); the agent checks again \
     now and then and enforces them once it is";

/// Said when the CRD turns up after `CNP_NOT_INSTALLED`.
pub const CNP_INSTALLED: &str = "ClusterNetworkPolicy CRD (policy.networking.k8s.io/v1alpha2) \
     installed: ClusterNetworkPolicies are enforced from now on";

/// One event of one watch.
#[derive(Debug)]
pub enum Update {
    Namespace(Box<watcher::Event<Namespace>>),
    Pod(Box<watcher::Event<Pod>>),
    Node(Box<watcher::Event<Node>>),
    Policy(Box<watcher::Event<NetworkPolicy>>),
    ClusterPolicy(Box<watcher::Event<ClusterNetworkPolicyResource>>),
    Service(Box<watcher::Event<Service>>),
    Slice(Box<watcher::Event<EndpointSlice>>),
    EgressGateway(Box<watcher::Event<EgressGatewayResource>>),
    /// The watch failed (it backs off and resumes or re-lists by itself).
    Failed(Watch, String),
    /// The API server does not serve an optional watch's resource (`404 Not Found`: its CRD is
    /// not installed). The watch backs off and tries again by itself.
    NotInstalled(Watch, String),
    /// The API server refused the watch's streaming list (`stream_refused`): it lists with LIST
    /// from now on.
    StreamRefused(Watch, String),
}

/// `404 Not Found` from the API server: the resource is not served (a custom resource whose
/// CRD is not installed). The API server answers an unknown group with a plain-text body (which
/// kube-rs keeps as a `Status` with the code only) and an unknown resource of a known group
/// with a `Status` whose reason is `NotFound`.
pub fn not_found(e: &watcher::Error) -> bool {
    let status = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.as_ref(),
        watcher::Error::WatchError(s) => s.as_ref(),
        _ => return false,
    };
    status.code == 404 || status.reason == "NotFound"
}

/// How a watch is first filled (and filled again after a 410).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum InitialList {
    /// One LIST per resource, served from the API server's watch cache: the response holds
    /// every object at once (for 10 000 pods, some 30 MB of JSON and its objects).
    List,
    /// A watch that sends every object as an event, then a bookmark (streaming lists: the
    /// API server's WatchList feature, on by default in Kubernetes 1.32 and from 1.34): one
    /// object at a time, also from the cache. A watch whose streaming list the API server
    /// refuses (`stream_refused`: 1.33, where the feature is off by default, or an older
    /// server) lists with LIST from then on, as client-go's reflector falls back.
    #[default]
    Stream,
}

/// The API server refused a streaming list as a request: `422 Invalid` (a server without the
/// WatchList feature rejects `sendInitialEvents` and `resourceVersionMatch` on a watch) or
/// `400 Bad Request`. Anything else (unreachable, `5xx`, `403`, `410`) is no answer about the
/// feature, and the watch tries again as it does for any error.
pub fn stream_refused(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchStartFailed(kube::Error::Api(s)) if s.code == 422 || s.code == 400)
}

/// One of a watch's results as an update.
fn update<K>(
    source: Watch,
    wrap: fn(watcher::Event<K>) -> Update,
    r: Result<watcher::Event<K>, watcher::Error>,
) -> Update {
    match r {
        Ok(e) => wrap(e),
        Err(e) if source.optional() && not_found(&e) => Update::NotInstalled(source, e.to_string()),
        Err(e) => Update::Failed(source, e.to_string()),
    }
}

/// A watch of `api`, first filled as `initial` says, its events as updates.
fn watch<K>(
    api: Api<K>,
    source: Watch,
    initial: InitialList,
    wrap: fn(watcher::Event<K>) -> Update,
) -> impl Stream<Item = Update> + Send + 'static
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    // Lists are served from the API server's watch cache (resourceVersion=0): every node's
    // agent lists every pod, which must not go to etcd each time. (Unpaginated: the API server
    // ignores a limit with resourceVersion=0 anyway, and kube would drop the version to honour
    // the limit.)
    let listing = |api: Api<K>| {
        let mut cfg = watcher::Config::default().any_semantic();
        cfg.page_size = None;
        watcher(api, cfg).default_backoff().boxed()
    };
    /// Streaming lists until the API server refuses one, then lists.
    enum Phase<S, A> {
        Streaming(S, A),
        Listing(S),
    }
    let first = match initial {
        InitialList::List => Phase::Listing(listing(api)),
        InitialList::Stream => {
            let streaming = watcher(api.clone(), watcher::Config::default().streaming_lists())
                .default_backoff()
                .boxed();
            Phase::Streaming(streaming, api)
        }
    };
    futures::stream::unfold(first, move |phase| async move {
        match phase {
            Phase::Listing(mut s) => {
                let r = s.next().await?;
                Some((update(source, wrap, r), Phase::Listing(s)))
            }
            Phase::Streaming(mut s, api) => match s.next().await? {
                Err(e) if stream_refused(&e) => Some((
                    Update::StreamRefused(source, e.to_string()),
                    Phase::Listing(listing(api)),
                )),
                r => Some((update(source, wrap, r), Phase::Streaming(s, api))),
            },
        }
    })
}

/// Every watch the agent needs, merged.
pub fn watch_all(
    client: Client,
    initial: InitialList,
) -> impl Stream<Item = Update> + Send + 'static {
    let pods = watch(Api::<Pod>::all(client.clone()), Watch::Pods, initial, |e| {
        Update::Pod(Box::new(e))
    });
    futures::stream::select_all([
        watch(
            Api::<Namespace>::all(client.clone()),
            Watch::Namespaces,
            initial,
            |e| Update::Namespace(Box::new(e)),
        )
        .boxed(),
        pods.boxed(),
        watch(
            Api::<Node>::all(client.clone()),
            Watch::Nodes,
            initial,
            |e| Update::Node(Box::new(e)),
        )
        .boxed(),
        watch(
            Api::<NetworkPolicy>::all(client.clone()),
            Watch::NetworkPolicies,
            initial,
            |e| Update::Policy(Box::new(e)),
        )
        .boxed(),
        watch(
            Api::<ClusterNetworkPolicyResource>::all(client.clone()),
            Watch::ClusterNetworkPolicies,
            initial,
            |e| Update::ClusterPolicy(Box::new(e)),
        )
        .boxed(),
        watch(
            Api::<Service>::all(client.clone()),
            Watch::Services,
            initial,
            |e| Update::Service(Box::new(e)),
        )
        .boxed(),
        watch(
            Api::<EndpointSlice>::all(client.clone()),
            Watch::EndpointSlices,
            initial,
            |e| Update::Slice(Box::new(e)),
        )
        .boxed(),
        watch(
            Api::<EgressGatewayResource>::all(client),
            Watch::EgressGateways,
            initial,
            |e| Update::EgressGateway(Box::new(e)),
        )
        .boxed(),
    ])
}

/// `namespace`/`name` of an object (namespace empty for cluster-scoped objects).
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
    /// Optional watches whose resource the API server does not serve (`404`: the CRD is not
    /// installed), until a list succeeds.
    absent: BTreeSet<Watch>,
    /// Watches whose streaming list the API server refused: they list with LIST.
    list_fallbacks: BTreeSet<Watch>,
    /// Events handled, and re-lists completed (for tests and the log).
    pub events: u64,
    pub relists: u64,
}

fn object_key(source: Watch, key: &Key) -> Option<ObjectKey> {
    let kind = match source {
        Watch::Namespaces => Kind::Namespace,
        Watch::Pods => Kind::Pod,
        Watch::Nodes => Kind::Node,
        Watch::NetworkPolicies => Kind::NetworkPolicy,
        Watch::ClusterNetworkPolicies => Kind::ClusterNetworkPolicy,
        Watch::EgressGateways => Kind::EgressGateway,
        Watch::Services | Watch::EndpointSlices => return None,
    };
    let namespace = if kind.cluster_scoped() {
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
    /// Every watch has listed (or, optional, found its resource not installed), and none is
    /// re-listing: the store is a whole view. An absent watch trying again holds nothing back
    /// until its list delivers objects; then it is a list like any other, enforced once whole.
    pub fn ready(&self) -> bool {
        Watch::ALL
            .iter()
            .all(|w| self.synced.contains(w) || self.absent.contains(w))
            && self
                .listing
                .iter()
                .all(|(w, listed)| self.absent.contains(w) && listed.is_empty())
    }

    pub fn synced(&self, source: Watch) -> bool {
        self.synced.contains(&source)
    }

    /// Whether the API server does not serve an optional watch's resource (its CRD is not
    /// installed), as far as the last answer goes.
    pub fn not_installed(&self, source: Watch) -> bool {
        self.absent.contains(&source)
    }

    /// The watches readiness waits for: not listed yet, or in the middle of a list.
    pub fn waiting(&self) -> Vec<Watch> {
        Watch::ALL
            .into_iter()
            .filter(|w| {
                let absent = self.absent.contains(w);
                (!self.synced.contains(w) && !absent)
                    || self
                        .listing
                        .get(w)
                        .is_some_and(|l| !absent || !l.is_empty())
            })
            .collect()
    }

    /// Watches that list with LIST because the API server refused their streaming list.
    pub fn list_fallbacks(&self) -> &BTreeSet<Watch> {
        &self.list_fallbacks
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
            Update::NotInstalled(source, e) => self.not_installed_event(source, &e),
            Update::StreamRefused(source, e) => {
                warn!(
                    watch = source.as_str(),
                    "the API server refused a streaming list ({e}): listing with LIST from now on"
                );
                self.list_fallbacks.insert(source);
                false
            }
            Update::Namespace(e) => {
                self.model_event(Watch::Namespaces, *e, |o| Object::Namespace(Box::new(o)))
            }
            Update::Pod(e) => self.model_event(Watch::Pods, *e, Object::from),
            Update::Node(e) => self.model_event(Watch::Nodes, *e, |o| Object::Node(Box::new(o))),
            Update::Policy(e) => self.model_event(Watch::NetworkPolicies, *e, |o| {
                Object::NetworkPolicy(Box::new(o))
            }),
            Update::ClusterPolicy(e) => self.model_event(Watch::ClusterNetworkPolicies, *e, |o| {
                Object::ClusterNetworkPolicy(Box::new(o.0))
            }),
            Update::Service(e) => self.service_event(Watch::Services, *e, |s, o| {
                let _ = s.apply_service(o);
            }),
            Update::Slice(e) => self.service_event(Watch::EndpointSlices, *e, |s, o| {
                let _ = s.apply_slice(o);
            }),
            Update::EgressGateway(e) => self.model_event(Watch::EgressGateways, *e, |o| {
                Object::EgressGateway(Box::new(o.0))
            }),
        }
    }

    fn begin(&mut self, source: Watch) {
        self.listing.insert(source, BTreeSet::new());
    }

    /// An optional watch's resource is not served. The first time (and the first time again
    /// after it was served) says so; the retries are quiet. What the watch holds stays: a list
    /// that did not happen removes nothing (see the module's documentation).
    fn not_installed_event(&mut self, source: Watch, e: &str) -> bool {
        self.failing.remove(&source);
        self.listing.remove(&source);
        let first = self.absent.insert(source);
        if first && source == Watch::EgressGateways {
            warn!(watch = source.as_str(), "{EGW_NOT_INSTALLED}");
        } else if first {
            warn!(watch = source.as_str(), "{CNP_NOT_INSTALLED}");
        } else {
            debug!(watch = source.as_str(), "still not installed: {e}");
        }
        // Readiness may have changed.
        first
    }

    fn touch(&mut self, source: Watch, key: Key, listed: bool) {
        self.failing.remove(&source);
        // A watch event (not a list) means the resource is served again.
        if !listed {
            self.installed(source);
        }
        if listed && let Some(l) = self.listing.get_mut(&source) {
            l.insert(key.clone());
        }
        self.known.entry(source).or_default().insert(key);
    }

    /// Ends a list: what the watch held and did not list is gone.
    fn finish(&mut self, source: Watch) -> Vec<Key> {
        self.failing.remove(&source);
        self.installed(source);
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

    fn installed(&mut self, source: Watch) {
        if self.absent.remove(&source) {
            if source == Watch::EgressGateways {
                info!(watch = source.as_str(), "EgressGateway CRD installed");
            } else {
                info!(watch = source.as_str(), "{CNP_INSTALLED}");
            }
        }
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
                self.installed(source);
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

    /// Policies (NetworkPolicies and ClusterNetworkPolicies) the store holds no version of
    /// because they never validated: a restarted agent keeps the pinned enforcement rather
    /// than enforce without them.
    pub fn incomplete(&self) -> Vec<String> {
        [
            Watch::NetworkPolicies,
            Watch::ClusterNetworkPolicies,
            Watch::EgressGateways,
        ]
        .into_iter()
        .flat_map(|w| {
            self.known
                .get(&w)
                .into_iter()
                .flatten()
                .filter_map(move |k| object_key(w, k))
        })
        .filter(|k| match k.kind {
            Kind::ClusterNetworkPolicy => !self.store.cluster_policies.contains_key(&k.name),
            Kind::EgressGateway => !self.store.egress_gateways.contains_key(&k.name),
            _ => !self
                .store
                .policies
                .contains_key(&(k.namespace.clone(), k.name.clone())),
        })
        .map(|k| format!("{k} is invalid"))
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
    pub initial_list: InitialList,
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
        Ok(KubeSource::new(
            &cluster.node_name,
            watch_all(client, cluster.initial_list),
        ))
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
            let waiting: Vec<&str> = self
                .state
                .waiting()
                .into_iter()
                .map(Watch::as_str)
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

    fn store(&self) -> &Store {
        &self.state.store
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

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;
    use serde_json::json;
    use watcher::Event;

    /// `Event::Init` (or `InitDone`) of watch `w`.
    fn list_event(w: Watch, done: bool) -> Update {
        macro_rules! ev {
            ($v:ident) => {
                Update::$v(Box::new(if done { Event::InitDone } else { Event::Init }))
            };
        }
        match w {
            Watch::Namespaces => ev!(Namespace),
            Watch::Pods => ev!(Pod),
            Watch::Nodes => ev!(Node),
            Watch::NetworkPolicies => ev!(Policy),
            Watch::ClusterNetworkPolicies => ev!(ClusterPolicy),
            Watch::Services => ev!(Service),
            Watch::EndpointSlices => ev!(Slice),
            Watch::EgressGateways => ev!(EgressGateway),
        }
    }

    /// Every watch but ClusterNetworkPolicies has listed (nothing).
    fn listed_but_cnp() -> ClusterState {
        let mut s = ClusterState::default();
        for w in Watch::ALL
            .into_iter()
            .filter(|w| *w != Watch::ClusterNetworkPolicies)
        {
            s.handle(list_event(w, false));
            s.handle(list_event(w, true));
        }
        s
    }

    fn cnp(name: &str, priority: i64) -> ClusterNetworkPolicyResource {
        serde_json::from_value(json!({
            "apiVersion": raw::API_VERSION, "kind": raw::KIND,
            "metadata": {"name": name, "resourceVersion": "7"},
            "spec": {"tier": "Admin", "priority": priority, "subject": {"namespaces": {}},
                     "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]}
        }))
        .unwrap()
    }

    fn applied(o: ClusterNetworkPolicyResource, listed: bool) -> Update {
        Update::ClusterPolicy(Box::new(if listed {
            Event::InitApply(o)
        } else {
            Event::Apply(o)
        }))
    }

    fn page_not_found() -> watcher::Error {
        let status = Status::failure("404 page not found", "Failed to parse error data")
            .with_code(404)
            .boxed();
        watcher::Error::InitialListFailed(kube::Error::Api(status))
    }

    fn not_installed() -> Update {
        Update::NotInstalled(Watch::ClusterNetworkPolicies, page_not_found().to_string())
    }

    #[test]
    fn the_resource_is_the_one_the_crd_defines() {
        assert_eq!(format!("{CNP_GROUP}/{CNP_VERSION}"), raw::API_VERSION);
        assert_eq!(
            ClusterNetworkPolicyResource::api_version(&()),
            raw::API_VERSION
        );
        assert_eq!(
            ClusterNetworkPolicyResource::kind(&()),
            "ClusterNetworkPolicy"
        );
        assert_eq!(
            ClusterNetworkPolicyResource::url_path(&(), None),
            "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies"
        );
        // The object as the API serves it, unchanged (unknown peer fields included).
        let o = cnp("x", 3);
        assert_eq!(o.name_any(), "x");
        assert_eq!(o.0.spec.as_ref().unwrap().priority, Some(3));
    }

    #[test]
    fn not_found_is_either_shape_of_404_and_nothing_else() {
        assert!(not_found(&page_not_found()));
        let mut s = Status::failure(
            "the server could not find the requested resource",
            "NotFound",
        )
        .with_code(404);
        assert!(not_found(&watcher::Error::WatchStartFailed(
            kube::Error::Api(s.clone().boxed())
        )));
        s.code = 403;
        s.reason = "Forbidden".into();
        assert!(!not_found(&watcher::Error::InitialListFailed(
            kube::Error::Api(s.clone().boxed())
        )));
        s.code = 500;
        s.reason = "InternalError".into();
        assert!(!not_found(&watcher::Error::InitialListFailed(
            kube::Error::Api(s.boxed())
        )));
        assert!(!not_found(&watcher::Error::NoResourceVersion));
    }

    #[test]
    fn only_a_refusal_of_the_request_ends_streaming_lists() {
        let status = |code: u16, reason: &str| {
            kube::Error::Api(
                Status::failure("sendInitialEvents is forbidden for watch", reason)
                    .with_code(code)
                    .boxed(),
            )
        };
        assert!(stream_refused(&watcher::Error::WatchStartFailed(status(
            422, "Invalid"
        ))));
        assert!(stream_refused(&watcher::Error::WatchStartFailed(status(
            400,
            "BadRequest"
        ))));
        for (code, reason) in [
            (403, "Forbidden"),
            (404, "NotFound"),
            (410, "Expired"),
            (500, "InternalError"),
            (503, "ServiceUnavailable"),
        ] {
            assert!(
                !stream_refused(&watcher::Error::WatchStartFailed(status(code, reason))),
                "{code}"
            );
        }
        // A 422 that is not the answer to starting a watch says nothing about the feature.
        assert!(!stream_refused(&watcher::Error::InitialListFailed(status(
            422, "Invalid"
        ))));
        assert!(!stream_refused(&watcher::Error::WatchError(
            Status::failure("x", "Invalid").with_code(422).boxed()
        )));
    }

    #[test]
    fn a_refused_streaming_list_is_no_failing_watch() {
        let mut s = listed_but_cnp();
        assert!(!s.handle(Update::StreamRefused(
            Watch::ClusterNetworkPolicies,
            "422".into()
        )));
        assert!(s.failing().is_empty());
        assert!(s.watch_errors().is_empty());
        assert_eq!(
            s.list_fallbacks().iter().collect::<Vec<_>>(),
            [&Watch::ClusterNetworkPolicies]
        );
        // Its LIST then fills it as any list does.
        assert!(!s.ready());
        s.handle(list_event(Watch::ClusterNetworkPolicies, false));
        s.handle(list_event(Watch::ClusterNetworkPolicies, true));
        assert!(s.ready());
    }

    #[test]
    fn a_missing_crd_does_not_hold_back_enforcement_and_is_noticed_once_installed() {
        let mut s = listed_but_cnp();
        s.handle(list_event(Watch::ClusterNetworkPolicies, false));
        assert!(!s.ready(), "the first list of every watch is waited for");
        assert_eq!(s.waiting(), [Watch::ClusterNetworkPolicies]);
        assert!(s.handle(not_installed()), "readiness changed");
        assert!(s.ready());
        assert!(s.not_installed(Watch::ClusterNetworkPolicies));
        assert!(s.failing().is_empty(), "not a failing watch");
        assert!(s.watch_errors().is_empty());
        // Retries: the list in flight holds nothing back, another 404 changes nothing.
        s.handle(list_event(Watch::ClusterNetworkPolicies, false));
        assert!(s.ready());
        assert!(s.waiting().is_empty());
        assert!(!s.handle(not_installed()));
        assert!(s.ready());
        // Installed: the list that delivers objects is enforced once whole.
        s.handle(list_event(Watch::ClusterNetworkPolicies, false));
        assert!(s.handle(applied(cnp("deny-all", 10), true)));
        assert!(!s.ready(), "half a list is not enforced");
        s.handle(list_event(Watch::ClusterNetworkPolicies, true));
        assert!(s.ready());
        assert!(!s.not_installed(Watch::ClusterNetworkPolicies));
        assert_eq!(s.store.cluster_policies["deny-all"].priority, 10);
    }

    #[test]
    fn a_404_after_listing_lifts_no_policy() {
        let mut s = listed_but_cnp();
        s.handle(list_event(Watch::ClusterNetworkPolicies, false));
        s.handle(applied(cnp("a", 1), true));
        s.handle(list_event(Watch::ClusterNetworkPolicies, true));
        s.handle(applied(cnp("b", 2), false));
        assert_eq!(s.store.cluster_policies.len(), 2);
        // A re-list finds no such resource (an API server restarting, its CRDs not served yet):
        // the policies stay in force, and enforcement goes on.
        s.handle(list_event(Watch::ClusterNetworkPolicies, false));
        assert!(s.handle(not_installed()));
        assert!(s.ready());
        assert_eq!(s.store.cluster_policies.len(), 2);
        // Deleting the CRD deletes its objects, and the watch says so.
        s.handle(Update::ClusterPolicy(Box::new(Event::Delete(cnp("a", 1)))));
        assert!(
            !s.not_installed(Watch::ClusterNetworkPolicies),
            "served again"
        );
        s.handle(Update::ClusterPolicy(Box::new(Event::Delete(cnp("b", 2)))));
        assert!(s.store.cluster_policies.is_empty());
        // Served again, a re-list that no longer holds one removes it, as any re-list does.
        s.handle(list_event(Watch::ClusterNetworkPolicies, false));
        s.handle(applied(cnp("c", 3), true));
        s.handle(list_event(Watch::ClusterNetworkPolicies, true));
        s.handle(list_event(Watch::ClusterNetworkPolicies, false));
        s.handle(list_event(Watch::ClusterNetworkPolicies, true));
        assert!(s.store.cluster_policies.is_empty());
        assert!(s.ready());
    }

    #[test]
    fn any_other_error_of_the_cnp_watch_holds_back_enforcement() {
        // 403 (say, RBAC without clusternetworkpolicies): the policies may exist, and a view
        // without them could lift a Deny. The pinned state stays in force.
        let mut s = listed_but_cnp();
        s.handle(list_event(Watch::ClusterNetworkPolicies, false));
        s.handle(Update::Failed(
            Watch::ClusterNetworkPolicies,
            "forbidden".into(),
        ));
        assert!(!s.ready());
        assert!(!s.not_installed(Watch::ClusterNetworkPolicies));
        assert_eq!(s.watch_errors().len(), 1);
        assert_eq!(s.watch_errors()[0].object, "watch clusternetworkpolicies");
    }

    #[test]
    fn invalid_cnps_keep_their_last_good_version_and_never_valid_ones_are_incomplete() {
        let mut s = listed_but_cnp();
        s.handle(list_event(Watch::ClusterNetworkPolicies, false));
        s.handle(applied(cnp("good", 10), true));
        s.handle(applied(cnp("bad", 1001), true));
        s.handle(list_event(Watch::ClusterNetworkPolicies, true));
        assert!(s.ready());
        assert_eq!(s.incomplete(), ["ClusterNetworkPolicy bad is invalid"]);
        s.handle(applied(cnp("good", -1), false));
        assert_eq!(s.store.cluster_policies["good"].priority, 10, "last good");
        let errors: Vec<String> = s.errors().iter().map(|e| e.to_string()).collect();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("ClusterNetworkPolicy good: spec.priority:")),
            "{errors:?}"
        );
        // Deleted: its version and its error go.
        s.handle(Update::ClusterPolicy(Box::new(Event::Delete(cnp(
            "good", -1,
        )))));
        assert!(!s.store.cluster_policies.contains_key("good"));
        assert_eq!(s.errors().len(), 1);
    }
}
