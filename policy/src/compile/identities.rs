//! The cluster's pods grouped into identities, kept between compiles: a compile hashes each
//! pod (and its namespace's labels) and regroups only the pods whose hash changed, patching
//! IDENTITIES (`DesiredState::identities`) and `identity_pods` for their addresses alone.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::Arc;

use palisade_common::{IDENTITY_HOST, PeerAddr};

use super::{IdentityKey, Interner};
use crate::model::tracked::Mark;
use crate::model::{PodInfo, Store};
use crate::state::{DesiredState, PodRef};

/// A digest of anything hashable (deterministic: the same value hashes the same in every
/// process).
pub(super) fn digest<T: Hash + ?Sized>(value: &T) -> u64 {
    foldhash::fast::FixedState::with_seed(0x5041_4c49).hash_one(value)
}

/// Pods that look the same to every selector and named-port lookup.
#[derive(Clone, Debug)]
pub(super) struct Ident {
    pub(super) id: u32,
    pub(super) key: Arc<IdentityKey>,
    /// Sorted (most identities have a pod or a few: a vector, not a tree node each).
    pub(super) pods: Vec<PodRef>,
}

#[derive(Clone, Debug)]
struct PodState {
    /// The pod's fields and its namespace's labels, hashed.
    digest: u64,
    /// Its identity's slot; `None` for pods that are not identities (host-networked, or
    /// without addresses).
    slot: Option<usize>,
    ips: Vec<IpAddr>,
}

/// A namespace's labels and the identities of its pods.
#[derive(Clone, Debug, Default)]
pub(super) struct NsGroup {
    pub(super) labels: Arc<BTreeMap<String, String>>,
    pub(super) slots: BTreeSet<usize>,
}

/// What an update changed.
#[derive(Debug, Default)]
pub(super) struct IdentityChanges {
    /// Identities that are gone, with what they were (their slot may be reused by the next
    /// update, never by this one).
    pub(super) removed: Vec<(usize, Ident)>,
    /// Slots of new identities.
    pub(super) added: Vec<usize>,
    /// Addresses whose owner changed (or that came or went).
    pub(super) addresses: BTreeSet<IpAddr>,
    /// Pods whose fields (or namespace labels) changed, came or went.
    pub(super) pods: BTreeSet<PodRef>,
}

impl IdentityChanges {
    pub(super) fn identities_changed(&self) -> bool {
        !self.removed.is_empty() || !self.added.is_empty()
    }
}

/// Identities by slot. A slot is stable while its identity lives, so selections can hold
/// slots across compiles.
#[derive(Clone, Debug, Default)]
pub(super) struct IdentityTable {
    idents: Vec<Option<Ident>>,
    free: Vec<usize>,
    /// Identity id -> its slot (the interner maps keys to ids: one copy of each key fewer).
    by_id: HashMap<u32, usize>,
    /// Namespace -> its labels and identities.
    pub(super) by_ns: BTreeMap<String, NsGroup>,
    pods: BTreeMap<PodRef, PodState>,
    /// Address -> the pods claiming it, sorted: the first (by namespace/name) owns it.
    claims: BTreeMap<IpAddr, Vec<PodRef>>,
    /// Pod address -> its owner's slot, for addresses that are pod identities in IDENTITIES
    /// (never this node's own addresses).
    pub(super) ip_owner: BTreeMap<IpAddr, usize>,
    /// This node's addresses (`IDENTITY_HOST` in IDENTITIES, whatever else claims them).
    pub(super) host: Vec<IpAddr>,
    /// Where the last update read the store's pods and namespaces up to: the next one looks
    /// at the pods changed since, when the store can name them.
    seen: (Mark, Mark),
}

fn is_identity(pod: &PodInfo) -> bool {
    !pod.host_network && !pod.ips.is_empty()
}

impl IdentityTable {
    /// A fresh table for a node whose own addresses are `host`.
    pub(super) fn new(host: &[IpAddr]) -> IdentityTable {
        IdentityTable {
            host: host.to_vec(),
            ..IdentityTable::default()
        }
    }

    /// The identity in `slot`, which must be live.
    pub(super) fn ident(&self, slot: usize) -> &Ident {
        self.idents[slot].as_ref().expect("a live identity slot")
    }

    /// Every live identity, by slot.
    pub(super) fn live(&self) -> impl Iterator<Item = (usize, &Ident)> {
        self.idents
            .iter()
            .enumerate()
            .filter_map(|(slot, i)| i.as_ref().map(|i| (slot, i)))
    }

    /// The digest of a pod as the last update saw it (`None`: not in the store then).
    pub(super) fn pod_digest(&self, pod: &PodRef) -> Option<u64> {
        self.pods.get(pod).map(|p| p.digest)
    }

    /// The pods that may have changed since the last update, as the store's journals name
    /// them: pods changed, and every pod of a namespace changed. `None`: they cannot all be
    /// named (another store, too many changes), and every pod is looked at.
    fn candidates(&self, store: &Store) -> Option<BTreeSet<PodRef>> {
        let pods = store.pods.changes_since(self.seen.0)?;
        let namespaces = store.namespaces.changes_since(self.seen.1)?;
        let mut out: BTreeSet<PodRef> = pods.cloned().collect();
        for ns in namespaces {
            let first = PodRef::new(ns.as_str(), "");
            out.extend(
                store
                    .pods
                    .range(first..)
                    .take_while(|(p, _)| p.namespace == *ns)
                    .map(|(p, _)| p.clone()),
            );
        }
        Some(out)
    }

    /// Which of `candidates` changed, in pod order: gone (`None`), or new or different (with
    /// its digest).
    fn changed_among<'s>(
        &self,
        store: &'s Store,
        candidates: BTreeSet<PodRef>,
    ) -> Vec<(PodRef, Option<(&'s PodInfo, u64)>)> {
        let mut changed = Vec::new();
        for pod_ref in candidates {
            match store.pods.get(&pod_ref) {
                Some(pod) => {
                    let nsd = digest(store.namespace_labels(&pod_ref.namespace).as_ref());
                    let d = digest(&(nsd, pod));
                    if self.pods.get(&pod_ref).is_none_or(|st| st.digest != d) {
                        changed.push((pod_ref, Some((&**pod, d))));
                    }
                }
                None if self.pods.contains_key(&pod_ref) => changed.push((pod_ref, None)),
                None => {}
            }
        }
        changed
    }

    /// Which pods changed, looking at every one: both maps are sorted by pod, so one merge
    /// finds them.
    fn changed_all<'s>(&self, store: &'s Store) -> Vec<(PodRef, Option<(&'s PodInfo, u64)>)> {
        let mut changed = Vec::new();
        let mut ns_digest: Option<(&str, u64)> = None;
        let mut old = self.pods.iter().peekable();
        for (pod_ref, pod) in &store.pods {
            while let Some((gone, _)) = old.next_if(|(o, _)| *o < pod_ref) {
                changed.push((gone.clone(), None));
            }
            let ns = pod_ref.namespace.as_str();
            let nsd = match ns_digest {
                Some((n, d)) if n == ns => d,
                _ => {
                    let d = digest(store.namespace_labels(ns).as_ref());
                    ns_digest = Some((ns, d));
                    d
                }
            };
            let d = digest(&(nsd, pod));
            match old.next_if(|(o, _)| *o == pod_ref) {
                Some((_, st)) if st.digest == d => {}
                _ => changed.push((pod_ref.clone(), Some((&**pod, d)))),
            }
        }
        changed.extend(old.map(|(gone, _)| (gone.clone(), None)));
        changed
    }

    /// Brings the table up to date with `store`, interning new identities' ids, and patches
    /// `out.identities` and `out.identity_pods` where they changed.
    pub(super) fn update(
        &mut self,
        store: &Store,
        ids: &mut Interner<Arc<IdentityKey>>,
        out: &mut DesiredState,
    ) -> IdentityChanges {
        let mut changes = IdentityChanges::default();
        let changed = match self.candidates(store) {
            Some(candidates) => self.changed_among(store, candidates),
            None => self.changed_all(store),
        };
        self.seen = (store.pods.mark(), store.namespaces.mark());
        if changed.is_empty() {
            return changes;
        }

        // Out with the old: slots that lose their last pod are released below, after the new
        // pods are placed (a pod that changes only in ways its identity ignores keeps it).
        let mut touched: BTreeSet<usize> = BTreeSet::new();
        for (pod_ref, _) in &changed {
            let Some(st) = self.pods.remove(pod_ref) else {
                continue;
            };
            if let Some(slot) = st.slot {
                if let Some(i) = self.idents[slot].as_mut()
                    && let Ok(at) = i.pods.binary_search(pod_ref)
                {
                    i.pods.remove(at);
                }
                touched.insert(slot);
            }
            for ip in st.ips {
                if let Some(c) = self.claims.get_mut(&ip) {
                    c.retain(|p| p != pod_ref);
                    if c.is_empty() {
                        self.claims.remove(&ip);
                    }
                }
                changes.addresses.insert(ip);
            }
        }
        // In with the new.
        let mut ns_labels: Option<(&str, std::borrow::Cow<'_, BTreeMap<String, String>>)> = None;
        for (pod_ref, now) in &changed {
            changes.pods.insert(pod_ref.clone());
            let Some((pod, d)) = now else {
                continue;
            };
            let slot = if is_identity(pod) {
                let ns = pod_ref.namespace.as_str();
                if ns_labels.as_ref().is_none_or(|(n, _)| *n != ns) {
                    ns_labels = Some((ns, store.namespace_labels(ns)));
                }
                let labels = &ns_labels.as_ref().expect("set above").1;
                // The namespace's labels and name as its identities already hold them.
                let shared = self
                    .by_ns
                    .get(ns)
                    .and_then(|g| g.slots.first())
                    .map(|slot| self.ident(*slot).key.clone())
                    .filter(|k| *k.namespace_labels == *labels.as_ref());
                let key = Arc::new(IdentityKey {
                    namespace: shared
                        .as_ref()
                        .map_or_else(|| Arc::from(ns), |k| k.namespace.clone()),
                    labels: pod.labels.clone(),
                    namespace_labels: shared.map_or_else(
                        || Arc::new(labels.as_ref().clone()),
                        |k| k.namespace_labels.clone(),
                    ),
                    ports: pod.container_ports.clone(),
                });
                let id = ids.intern(&key);
                let slot = match self.by_id.get(&id) {
                    Some(slot) => *slot,
                    None => {
                        let slot = self.free.pop().unwrap_or(self.idents.len());
                        if slot == self.idents.len() {
                            self.idents.push(None);
                        }
                        let group = self.by_ns.entry(ns.to_string()).or_default();
                        group.labels = key.namespace_labels.clone();
                        group.slots.insert(slot);
                        self.by_id.insert(id, slot);
                        self.idents[slot] = Some(Ident {
                            id,
                            key,
                            pods: Vec::new(),
                        });
                        changes.added.push(slot);
                        slot
                    }
                };
                let pods = &mut self.idents[slot].as_mut().expect("placed above").pods;
                if let Err(at) = pods.binary_search(pod_ref) {
                    pods.insert(at, pod_ref.clone());
                }
                touched.insert(slot);
                for ip in &pod.ips {
                    let c = self.claims.entry(*ip).or_default();
                    if let Err(at) = c.binary_search(pod_ref) {
                        c.insert(at, pod_ref.clone());
                    }
                    changes.addresses.insert(*ip);
                }
                Some(slot)
            } else {
                None
            };
            self.pods.insert(
                pod_ref.clone(),
                PodState {
                    digest: *d,
                    slot,
                    ips: if slot.is_some() {
                        pod.ips.clone()
                    } else {
                        Vec::new()
                    },
                },
            );
        }
        // Identities left without pods are gone; their slots are free for the next update.
        let mut freed = Vec::new();
        for &slot in &touched {
            let ident = self.idents[slot].as_ref().expect("touched slots are live");
            if !ident.pods.is_empty() {
                out.identity_pods.insert(ident.id, ident.pods.clone());
                continue;
            }
            let ident = self.idents[slot].take().expect("live");
            self.by_id.remove(&ident.id);
            if let Some(g) = self.by_ns.get_mut(&*ident.key.namespace) {
                g.slots.remove(&slot);
                if g.slots.is_empty() {
                    self.by_ns.remove(&*ident.key.namespace);
                }
            }
            out.identity_pods.remove(&ident.id);
            changes.added.retain(|s| *s != slot);
            changes.removed.push((slot, ident));
            freed.push(slot);
        }
        self.free.extend(freed);
        // The addresses whose owner may have changed.
        for ip in &changes.addresses {
            let owner = self
                .claims
                .get(ip)
                .and_then(|c| c.first())
                .and_then(|p| self.pods.get(p))
                .and_then(|st| st.slot);
            if self.host.contains(ip) {
                continue;
            }
            let addr = PeerAddr::from_ip(*ip);
            match owner {
                Some(slot) => {
                    self.ip_owner.insert(*ip, slot);
                    out.identities.insert(addr, self.ident(slot).id);
                }
                None => {
                    self.ip_owner.remove(ip);
                    out.identities.remove(&addr);
                }
            }
        }
        changes
    }

    /// Writes this node's own addresses into IDENTITIES (once, on a fresh table).
    pub(super) fn write_host(&self, out: &mut DesiredState) {
        for ip in &self.host {
            out.identities.insert(PeerAddr::from_ip(*ip), IDENTITY_HOST);
        }
    }
}
