//! The store: namespaces, pods, nodes, validated NetworkPolicies and ClusterNetworkPolicies,
//! reduced to what policy needs.
//!
//! Policies are validated and normalized on the way in (`Policy::from_k8s`). A policy that fails
//! validation never replaces a good one: the last good version of that policy stays in force and
//! the error is recorded (`Store::errors`) with the object and field it concerns.
use std::fmt;

use k8s_openapi::api::core::v1::{Namespace, Node, Pod};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Serialize;

pub use crate::error::{ConfigError, FieldError};
use crate::state::PodRef;

/// The label the API server sets on every namespace, with the namespace's name as value.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// Policy annotation: `"true"` puts the policy in audit mode.
pub const AUDIT_ANNOTATION: &str = "palisade.io/audit";
/// Pod annotations kept in `PodInfo::annotations` (the others are dropped).
pub const KEPT_POD_ANNOTATIONS: &[&str] = &["palisade.io/interface"];
/// Namespace of objects that name none (as `kubectl apply` does without a context namespace).
pub const DEFAULT_NAMESPACE: &str = "default";

pub mod cluster;
pub mod egress;
mod pod;
mod policy;
pub mod shared;
mod store;
pub mod tracked;

pub use pod::*;
pub use policy::*;
pub use store::*;

// ---------------------------------------------------------------------------------------------
// Objects
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub enum Kind {
    Namespace,
    Pod,
    NetworkPolicy,
    ClusterNetworkPolicy,
    Node,
    EgressGateway,
}

impl Kind {
    /// Cluster-scoped kinds have no namespace (`ObjectKey::namespace` is empty).
    pub fn cluster_scoped(self) -> bool {
        matches!(
            self,
            Kind::Namespace | Kind::ClusterNetworkPolicy | Kind::Node | Kind::EgressGateway
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Identifies an object: kind, namespace (empty for namespaces) and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct ObjectKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind.cluster_scoped() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// A Kubernetes object the agent understands, as read (not yet validated).
#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Namespace(Box<Namespace>),
    /// Converted where it is read: sources keep no full k8s Pods (several kilobytes each even
    /// when their optional fields are empty; a cluster has many).
    Pod(Box<PodObject>),
    NetworkPolicy(Box<NetworkPolicy>),
    ClusterNetworkPolicy(Box<cluster::raw::ClusterNetworkPolicy>),
    Node(Box<Node>),
    EgressGateway(Box<egress::RawEgressGateway>),
}

/// A pod as read, reduced to what policy needs (`PodInfo`) and the problems of its fields.
#[derive(Clone, Debug, PartialEq)]
pub struct PodObject {
    key: ObjectKey,
    /// Shared with the store that applies it (a source that keeps what it read, as the
    /// manifest directory does, holds no second copy).
    converted: Result<(PodRef, std::sync::Arc<PodInfo>, Vec<ConfigError>), ConfigError>,
}

impl PodObject {
    pub fn from_k8s(pod: &Pod) -> PodObject {
        PodObject {
            key: meta_key(Kind::Pod, &pod.metadata),
            converted: PodInfo::from_k8s(pod)
                .map(|(r, info, errs)| (r, std::sync::Arc::new(info), errs)),
        }
    }

    /// What policy sees of the pod (`None`: it has no name).
    pub fn info(&self) -> Option<&PodInfo> {
        self.converted.as_ref().ok().map(|(_, info, _)| &**info)
    }
}

impl From<Pod> for Object {
    fn from(pod: Pod) -> Object {
        Object::Pod(Box::new(PodObject::from_k8s(&pod)))
    }
}

pub(crate) fn meta_key(kind: Kind, meta: &ObjectMeta) -> ObjectKey {
    ObjectKey {
        kind,
        namespace: if kind.cluster_scoped() {
            String::new()
        } else {
            meta.namespace
                .clone()
                .filter(|n| !n.is_empty())
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
        },
        name: meta.name.clone().unwrap_or_default(),
    }
}

impl Object {
    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Namespace(o) => meta_key(Kind::Namespace, &o.metadata),
            Object::Pod(o) => o.key.clone(),
            Object::NetworkPolicy(o) => meta_key(Kind::NetworkPolicy, &o.metadata),
            Object::ClusterNetworkPolicy(o) => meta_key(Kind::ClusterNetworkPolicy, &o.metadata),
            Object::Node(o) => meta_key(Kind::Node, &o.metadata),
            Object::EgressGateway(o) => meta_key(Kind::EgressGateway, &o.metadata),
        }
    }
}

/// The key of an object that must be named; an error naming the field otherwise.
pub(crate) fn named_key(kind: Kind, meta: &ObjectMeta) -> Result<ObjectKey, ConfigError> {
    let key = meta_key(kind, meta);
    if key.name.is_empty() {
        let object = if kind.cluster_scoped() {
            format!("{kind} <unnamed>")
        } else {
            format!("{kind} {}/<unnamed>", key.namespace)
        };
        return Err(ConfigError::new(object, "metadata.name", "is required"));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    fn policy(yaml: &str) -> Result<Policy, ConfigError> {
        let np: NetworkPolicy = serde_saphyr::from_str(yaml).unwrap();
        Policy::from_k8s(&np)
    }

    fn err(yaml: &str) -> String {
        policy(yaml).unwrap_err().to_string()
    }

    const HEAD: &str = "metadata: {name: foo, namespace: x}\n";

    #[test]
    fn policy_types_defaults() {
        let p = policy(&format!("{HEAD}spec: {{podSelector: {{}}}}")).unwrap();
        assert_eq!(p.ingress, Some(vec![]), "no policyTypes: Ingress, deny all");
        assert_eq!(p.egress, None);
        let p = policy(&format!("{HEAD}spec: {{egress: [{{}}]}}")).unwrap();
        assert!(p.ingress.is_some() && p.egress.as_ref().unwrap().len() == 1);
        let p = policy(&format!("{HEAD}spec: {{egress: []}}")).unwrap();
        assert_eq!(
            p.egress, None,
            "an empty egress list does not make an egress policy"
        );
        let p = policy(&format!(
            "{HEAD}spec: {{policyTypes: [Egress], ingress: [{{}}]}}"
        ))
        .unwrap();
        assert_eq!((p.ingress, p.egress), (None, Some(vec![])));
        let p = policy(&format!(
            "{HEAD}spec: {{ingress: [{{from: [], ports: []}}]}}"
        ))
        .unwrap();
        assert_eq!(
            p.ingress,
            Some(vec![Rule {
                peers: None,
                ports: None
            }])
        );
    }

    #[test]
    fn validation_errors_name_object_and_field() {
        let cases = [
            (
                "spec: {ingress: [{from: [{podSelector: {}}, {ipBlock: {cidr: 192.168.0.0/16, except: [10.1.0.0/16]}}]}]}",
                "NetworkPolicy x/foo: spec.ingress[0].from[1].ipBlock.except[0]: 10.1.0.0/16 is not inside cidr 192.168.0.0/16",
            ),
            (
                "spec: {egress: [{to: [{ipBlock: {cidr: 10.0.0.0/33}}]}]}",
                "NetworkPolicy x/foo: spec.egress[0].to[0].ipBlock.cidr: invalid CIDR",
            ),
            (
                "spec: {egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.0.0.0/8]}}]}]}",
                "spec.egress[0].to[0].ipBlock.except[0]: 10.0.0.0/8 is not inside cidr 10.0.0.0/8",
            ),
            (
                "spec: {egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: ['fd00::/64']}}]}]}",
                "spec.egress[0].to[0].ipBlock.except[0]: fd00::/64 is not inside cidr 10.0.0.0/8",
            ),
            (
                "spec: {ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]}",
                "spec.ingress[0].from[0]: ipBlock cannot be combined",
            ),
            (
                "spec: {ingress: [{from: [{}]}]}",
                "spec.ingress[0].from[0]: must specify",
            ),
            (
                "spec: {ingress: [{ports: [{port: 70000}]}]}",
                "spec.ingress[0].ports[0].port: 70000 is out of range",
            ),
            (
                "spec: {ingress: [{ports: [{port: 0}]}]}",
                "spec.ingress[0].ports[0].port: 0 is out of range",
            ),
            (
                "spec: {ingress: [{}, {ports: [{port: 90, endPort: 80}]}]}",
                "spec.ingress[1].ports[0].endPort: 80 is less than port 90",
            ),
            (
                "spec: {ingress: [{ports: [{port: http, endPort: 80}]}]}",
                "spec.ingress[0].ports[0].endPort: cannot be used with named port \"http\"",
            ),
            (
                "spec: {ingress: [{ports: [{endPort: 80}]}]}",
                "spec.ingress[0].ports[0].endPort: requires a numeric port",
            ),
            (
                "spec: {ingress: [{ports: [{port: 80, protocol: ICMP}]}]}",
                "spec.ingress[0].ports[0].protocol: unsupported protocol \"ICMP\"",
            ),
            (
                "spec: {ingress: [{ports: [{port: Not_A_Name}]}]}",
                "spec.ingress[0].ports[0].port: \"Not_A_Name\" is neither",
            ),
            (
                "spec: {policyTypes: [Ingress, Sideways]}",
                "NetworkPolicy x/foo: spec.policyTypes[1]: unsupported value \"Sideways\"",
            ),
            (
                "spec: {podSelector: {matchExpressions: [{key: a, operator: Near}]}}",
                "spec.podSelector.matchExpressions[0].operator: unknown operator \"Near\"",
            ),
            (
                "spec: {egress: [{to: [{namespaceSelector: {matchExpressions: [{key: a, operator: In}]}}]}]}",
                "spec.egress[0].to[0].namespaceSelector.matchExpressions[0].values: must be non-empty",
            ),
            (
                "spec: {egress: [{to: [{podSelector: {matchExpressions: [{key: a, operator: Exists, values: [b]}]}}]}]}",
                "spec.egress[0].to[0].podSelector.matchExpressions[0].values: must be empty",
            ),
        ];
        for (spec, want) in cases {
            let got = err(&format!("{HEAD}{spec}"));
            assert!(
                got.contains(want),
                "got {got:?}, want it to contain {want:?}"
            );
            assert!(got.starts_with("NetworkPolicy x/foo: spec."), "{got}");
        }
        let got = err("metadata: {namespace: x}\nspec: {}");
        assert_eq!(got, "NetworkPolicy x/<unnamed>: metadata.name: is required");
    }

    #[test]
    fn cidrs_are_normalized_and_audit_parsed() {
        let p = policy(
            "metadata: {name: foo, namespace: x, annotations: {palisade.io/audit: 'true'}}\n\
             spec: {ingress: [{from: [{ipBlock: {cidr: 10.1.2.3/16, except: [10.1.200.7/24]}}]}]}",
        )
        .unwrap();
        assert!(p.audit);
        let rules = p.ingress.unwrap();
        assert_eq!(
            rules[0].peers.as_ref().unwrap()[0],
            Peer::IpBlock {
                cidr: "10.1.0.0/16".parse().unwrap(),
                except: vec!["10.1.200.0/24".parse().unwrap()],
            }
        );
    }

    fn np_obj(yaml: &str) -> Object {
        Object::NetworkPolicy(Box::new(serde_saphyr::from_str(yaml).unwrap()))
    }

    #[test]
    fn last_good_policy_stays_in_force() {
        let good =
            np_obj("metadata: {name: p, namespace: x}\nspec: {ingress: [{ports: [{port: 80}]}]}");
        let bad = np_obj(
            "metadata: {name: p, namespace: x}\nspec: {ingress: [{ports: [{port: 99999}]}]}",
        );
        let fixed =
            np_obj("metadata: {name: p, namespace: x}\nspec: {ingress: [{ports: [{port: 81}]}]}");
        let key = ("x".to_string(), "p".to_string());
        let port_of = |s: &Store| {
            s.policies[&key].ingress.as_ref().unwrap()[0]
                .ports
                .as_ref()
                .unwrap()[0]
                .port
                .clone()
        };

        // Incremental apply.
        let mut s = Store::default();
        s.apply(good.clone()).unwrap();
        let e = s.apply(bad.clone()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("NetworkPolicy x/p: spec.ingress[0].ports[0].port")
        );
        assert_eq!(port_of(&s), PortMatch::Number(80));
        assert_eq!(s.errors().len(), 1);
        s.apply(fixed.clone()).unwrap();
        assert_eq!(port_of(&s), PortMatch::Number(81));
        assert!(s.errors().is_empty());

        // Whole-set replacement (the standalone agent).
        let mut s = Store::from_objects([good.clone()]);
        let errs = s.replace_all([bad.clone()]);
        assert_eq!(errs.len(), 1);
        assert_eq!(port_of(&s), PortMatch::Number(80), "last good version kept");
        let errs = s.replace_all([bad]);
        assert_eq!(errs.len(), 1);
        assert_eq!(
            port_of(&s),
            PortMatch::Number(80),
            "still kept on the next load"
        );
        assert!(s.replace_all([]).is_empty());
        assert!(s.policies.is_empty(), "a policy gone from the input goes");
        // A new policy that has never been valid is simply absent.
        let s = Store::from_objects([np_obj(
            "metadata: {name: q, namespace: x}\nspec: {policyTypes: [Bogus]}",
        )]);
        assert!(s.policies.is_empty());
        assert_eq!(s.errors().len(), 1);
    }

    #[test]
    fn pods_and_namespaces() {
        let pod: Pod = serde_saphyr::from_str(
            r#"
metadata:
  name: p
  labels: {app: web}
  annotations: {palisade.io/interface: veth1, other: x}
spec:
  nodeName: n1
  containers:
    - name: c
      ports:
        - {name: http, containerPort: 8080}
        - {containerPort: 9090}
        - {name: dns, containerPort: 53, protocol: UDP}
        - {name: bad, containerPort: 70000}
  initContainers:
    - {name: side, restartPolicy: Always, ports: [{name: side, containerPort: 7000}]}
    - {name: once, ports: [{name: once, containerPort: 7001}]}
status:
  podIP: 10.0.0.1
  podIPs: [{ip: 10.0.0.1}, {ip: 'fd00::1'}, {ip: nonsense}]
"#,
        )
        .unwrap();
        let mut s = Store::default();
        let e = s.apply(Object::from(pod)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Pod default/p: spec.containers[0].ports[3].containerPort: 70000 is out of range (1-65535)"
        );
        assert_eq!(s.errors().len(), 2, "{:?}", s.errors());
        let info = &s.pods[&PodRef {
            namespace: "default".into(),
            name: "p".into(),
        }];
        assert_eq!(
            info.ips,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "fd00::1".parse().unwrap()
            ]
        );
        let names: Vec<_> = info
            .container_ports
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["dns", "http", "side"]);
        assert_eq!(info.node_name.as_deref(), Some("n1"));
        assert_eq!(info.annotations.len(), 1);

        let ns: Namespace = serde_saphyr::from_str("metadata: {name: a, labels: {t: x}}").unwrap();
        s.apply(Object::Namespace(Box::new(ns))).unwrap();
        assert_eq!(s.namespace_labels("a")[NAMESPACE_NAME_LABEL], "a");
        assert_eq!(s.namespace_labels("a")["t"], "x");
        assert_eq!(s.namespace_labels("zzz")[NAMESPACE_NAME_LABEL], "zzz");
    }
}
