//! Nodes, reduced to what `nodes` peers select: labels and addresses.
use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Node;

use crate::error::ConfigError;

/// The `status.addresses` types that are a node's addresses for `nodes` peers (as
/// kube-network-policies reads them; `Hostname` and `InternalDNS` are names).
pub const NODE_ADDRESS_TYPES: &[&str] = &["InternalIP", "ExternalIP"];

/// What a `nodes` peer needs of a node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// The `InternalIP` and `ExternalIP` addresses, in `status.addresses` order, without
    /// duplicates.
    pub addresses: Vec<IpAddr>,
    /// False where the node's `Ready` condition is `False` or `Unknown` (a node without
    /// conditions is taken as ready): egress gateways use ready nodes only.
    pub ready: bool,
}

impl NodeInfo {
    /// Converts a node. Lenient, as `PodInfo::from_k8s` is: an address that does not parse is
    /// reported (naming its field) and left out, as no packet can carry it; `Err` only for a
    /// node without a name.
    pub fn from_k8s(node: &Node) -> Result<(NodeInfo, Vec<ConfigError>), ConfigError> {
        let name = node.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(ConfigError::new(
                "Node <unnamed>",
                "metadata.name",
                "is required",
            ));
        }
        let object = format!("Node {name}");
        let mut errors = Vec::new();
        let mut addresses = Vec::new();
        let listed = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .into_iter()
            .flatten();
        for (i, a) in listed.enumerate() {
            if !NODE_ADDRESS_TYPES.contains(&a.type_.as_str()) {
                continue;
            }
            match a.address.parse::<IpAddr>() {
                Ok(ip) if !addresses.contains(&ip) => addresses.push(ip),
                Ok(_) => {}
                Err(_) => errors.push(ConfigError::new(
                    &object,
                    format!("status.addresses[{i}].address"),
                    format!("{:?} is not an IP address", a.address),
                )),
            }
        }
        let ready = !node
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .into_iter()
            .flatten()
            .any(|c| c.type_ == "Ready" && c.status != "True");
        let info = NodeInfo {
            name,
            labels: node.metadata.labels.clone().unwrap_or_default(),
            addresses,
            ready,
        };
        Ok((info, errors))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_and_external_addresses_only() {
        let node: Node = serde_saphyr::from_str(
            r#"
metadata: {name: n1, labels: {kubernetes.io/os: linux}}
status:
  addresses:
    - {type: Hostname, address: n1}
    - {type: InternalIP, address: 10.0.0.1}
    - {type: InternalIP, address: 'fd00::1'}
    - {type: ExternalIP, address: 203.0.113.7}
    - {type: InternalDNS, address: n1.example}
    - {type: ExternalIP, address: 10.0.0.1}
    - {type: ExternalIP, address: 300.1.1.1}
"#,
        )
        .unwrap();
        let (info, errors) = NodeInfo::from_k8s(&node).unwrap();
        assert_eq!(info.name, "n1");
        assert_eq!(info.labels["kubernetes.io/os"], "linux");
        let want: Vec<IpAddr> = ["10.0.0.1", "fd00::1", "203.0.113.7"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(info.addresses, want);
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            "Node n1: status.addresses[6].address: \"300.1.1.1\" is not an IP address"
        );

        let unnamed: Node = serde_saphyr::from_str("metadata: {}").unwrap();
        assert_eq!(
            NodeInfo::from_k8s(&unnamed).unwrap_err().to_string(),
            "Node <unnamed>: metadata.name: is required"
        );
        let bare: Node = serde_saphyr::from_str("metadata: {name: n2}").unwrap();
        assert!(NodeInfo::from_k8s(&bare).unwrap().0.addresses.is_empty());
    }
}
