//! The store: everything policy is computed from.
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use super::cluster::{ClusterNetworkPolicy, NodeInfo};
use super::egress::EgressGateway;
use super::tracked::Tracked;
use super::{Kind, NamespaceInfo, Object, ObjectKey, PodInfo, Policy, meta_key, named_key};
use crate::error::ConfigError;
use crate::state::PodRef;

/// Everything policy is computed from.
#[derive(Clone, Debug, Default)]
pub struct Store {
    pub namespaces: Tracked<String, NamespaceInfo>,
    /// Shared with the sources' copies (`PodObject`).
    pub pods: Tracked<PodRef, Arc<PodInfo>>,
    /// Keyed by (namespace, name).
    pub policies: Tracked<(String, String), Policy>,
    /// Validated ClusterNetworkPolicies, by name.
    pub cluster_policies: BTreeMap<String, ClusterNetworkPolicy>,
    /// Nodes (for `nodes` peers), by name.
    pub nodes: Tracked<String, NodeInfo>,
    /// Validated EgressGateways, by name.
    pub egress_gateways: BTreeMap<String, EgressGateway>,
    /// Current errors, per object (objects without a usable name under an empty name).
    errors: BTreeMap<ObjectKey, Vec<ConfigError>>,
}

impl Store {
    /// A store holding `objects` (errors in `errors()`).
    pub fn from_objects(objects: impl IntoIterator<Item = Object>) -> Store {
        let mut s = Store::default();
        s.replace_all(objects);
        s
    }

    /// Makes the store hold exactly `objects`, except that a policy (NetworkPolicy or
    /// ClusterNetworkPolicy) that fails validation keeps its previous good version (if any).
    /// Returns the errors, which replace `errors()`.
    pub fn replace_all(&mut self, objects: impl IntoIterator<Item = Object>) -> Vec<ConfigError> {
        let mut next = Store::default();
        for obj in objects {
            // A policy's previous good version first: if this one fails validation, it stays.
            match &obj {
                Object::NetworkPolicy(np) => {
                    let key = meta_key(Kind::NetworkPolicy, &np.metadata);
                    let key = (key.namespace, key.name);
                    if let Some(old) = self.policies.get(&key) {
                        next.policies.insert(key, old.clone());
                    }
                }
                Object::ClusterNetworkPolicy(cnp) => {
                    let key = meta_key(Kind::ClusterNetworkPolicy, &cnp.metadata);
                    if let Some(old) = self.cluster_policies.get(&key.name) {
                        next.cluster_policies.insert(key.name, old.clone());
                    }
                }
                Object::EgressGateway(g) => {
                    let key = meta_key(Kind::EgressGateway, &g.metadata);
                    if let Some(old) = self.egress_gateways.get(&key.name) {
                        next.egress_gateways.insert(key.name, old.clone());
                    }
                }
                _ => {}
            }
            // Errors are recorded by `apply`.
            let _ = next.apply(obj);
        }
        // Only what differs is changed, so that the compiler's journals name just that.
        self.namespaces.sync(next.namespaces);
        self.pods.sync(next.pods);
        self.policies.sync(next.policies);
        self.nodes.sync(next.nodes);
        self.cluster_policies = next.cluster_policies;
        self.egress_gateways = next.egress_gateways;
        self.errors = next.errors;
        self.errors().into_iter().cloned().collect()
    }

    /// Adds or replaces one object. On error the object is not applied (a pod is applied
    /// without the parts in error) and the error is also kept in `errors()` until the object is
    /// applied successfully or removed.
    pub fn apply(&mut self, obj: Object) -> Result<(), ConfigError> {
        let key = obj.key();
        let result = match obj {
            Object::Namespace(ns) => named_key(Kind::Namespace, &ns.metadata).map(|k| {
                let labels = ns.metadata.labels.clone().unwrap_or_default();
                self.namespaces
                    .insert(k.name.clone(), NamespaceInfo::new(&k.name, labels));
                Vec::new()
            }),
            Object::Pod(pod) => pod.converted.map(|(r, info, errs)| {
                self.pods.insert(r, info);
                errs
            }),
            Object::NetworkPolicy(np) => Policy::from_k8s(&np).map(|p| {
                self.policies
                    .insert((p.namespace.clone(), p.name.clone()), p);
                Vec::new()
            }),
            Object::ClusterNetworkPolicy(cnp) => ClusterNetworkPolicy::from_raw(&cnp).map(|p| {
                self.cluster_policies.insert(p.name.clone(), p);
                Vec::new()
            }),
            Object::Node(node) => NodeInfo::from_k8s(&node).map(|(info, errs)| {
                self.nodes.insert(info.name.clone(), info);
                errs
            }),
            // As a policy: a version that fails validation keeps the last good one in force.
            Object::EgressGateway(g) => EgressGateway::from_raw(&g).map(|g| {
                self.egress_gateways.insert(g.name.clone(), g);
                Vec::new()
            }),
        };
        let errs = result.unwrap_or_else(|e| vec![e]);
        let first = errs.first().cloned();
        if errs.is_empty() {
            self.errors.remove(&key);
        } else {
            self.errors.insert(key, errs);
        }
        first.map_or(Ok(()), Err)
    }

    /// Removes an object (and its errors).
    pub fn remove(&mut self, key: &ObjectKey) {
        match key.kind {
            Kind::Namespace => {
                self.namespaces.remove(&key.name);
            }
            Kind::Pod => {
                self.pods
                    .remove(&PodRef::new(key.namespace.as_str(), key.name.as_str()));
            }
            Kind::NetworkPolicy => {
                self.policies
                    .remove(&(key.namespace.clone(), key.name.clone()));
            }
            Kind::ClusterNetworkPolicy => {
                self.cluster_policies.remove(&key.name);
            }
            Kind::Node => {
                self.nodes.remove(&key.name);
            }
            Kind::EgressGateway => {
                self.egress_gateways.remove(&key.name);
            }
        }
        self.errors.remove(key);
    }

    /// Current configuration errors, by object.
    pub fn errors(&self) -> Vec<&ConfigError> {
        self.errors.values().flatten().collect()
    }

    /// A namespace's labels; a namespace the store does not hold has only its name label.
    pub fn namespace_labels(&self, ns: &str) -> Cow<'_, BTreeMap<String, String>> {
        match self.namespaces.get(ns) {
            Some(info) => Cow::Borrowed(&info.labels),
            None => Cow::Owned(NamespaceInfo::new(ns, BTreeMap::new()).labels),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::parse_str;

    const GOOD: &str = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\n\
        metadata: {name: guard}\nspec: {tier: Admin, priority: 10, subject: {namespaces: {}}, \
        ingress: [{action: Deny, from: [{namespaces: {}}]}]}\n";

    /// A ClusterNetworkPolicy the API server would refuse is refused with an error naming the
    /// object and the field, and its last good version stays in force, as for NetworkPolicy.
    #[test]
    fn an_invalid_cluster_policy_keeps_the_last_good_one() {
        let mut store = Store::default();
        assert!(store.replace_all(parse_str(GOOD).unwrap()).is_empty());
        let bad = GOOD.replace("priority: 10", "priority: 1001");
        let errors = store.replace_all(parse_str(&bad).unwrap());
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = errors[0].to_string();
        assert!(
            e.contains("ClusterNetworkPolicy guard") && e.contains("spec.priority"),
            "{e}"
        );
        assert_eq!(store.cluster_policies["guard"].priority, 10);
        // One object at a time (cluster mode) as well.
        let bad = GOOD.replace("action: Deny", "action: Drop");
        let obj = parse_str(&bad).unwrap().remove(0);
        let e = store.apply(obj).unwrap_err().to_string();
        assert!(e.contains("spec.ingress[0].action"), "{e}");
        assert_eq!(store.cluster_policies["guard"].priority, 10);
        // Removed: gone, errors and all.
        store.remove(&ObjectKey {
            kind: Kind::ClusterNetworkPolicy,
            namespace: String::new(),
            name: "guard".into(),
        });
        assert!(store.cluster_policies.is_empty() && store.errors().is_empty());
    }

    /// An EgressGateway is read from YAML, refused with its object and field named, and its
    /// last good version stays in force.
    #[test]
    fn an_invalid_egress_gateway_keeps_the_last_good_one() {
        const GW: &str = "apiVersion: palisade.io/v1alpha1\nkind: EgressGateway\n\
            metadata: {name: out}\nspec: {podSelector: {}, destinationCIDRs: [192.0.2.0/24], \
            gatewayNodeSelector: {matchLabels: {egress: gw}}, egressIPs: [10.243.0.100]}\n";
        let mut store = Store::default();
        assert!(store.replace_all(parse_str(GW).unwrap()).is_empty());
        assert_eq!(store.egress_gateways["out"].destinations.len(), 1);
        let bad = GW.replace("192.0.2.0/24", "192.0.2.0/33");
        let errors = store.replace_all(parse_str(&bad).unwrap());
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = errors[0].to_string();
        assert!(
            e.starts_with("EgressGateway out: spec.destinationCIDRs[0]: invalid CIDR"),
            "{e}"
        );
        assert_eq!(store.egress_gateways["out"].destinations.len(), 1);
        store.remove(&ObjectKey {
            kind: Kind::EgressGateway,
            namespace: String::new(),
            name: "out".into(),
        });
        assert!(store.egress_gateways.is_empty() && store.errors().is_empty());
    }
}
