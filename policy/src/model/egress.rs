//! EgressGateway (`palisade.io/v1alpha1`, cluster-scoped): which pods (namespace and pod
//! selectors) leave the cluster to which destinations (CIDRs, minus exclusions) through which
//! gateway nodes (a node selector), with which egress address (at most one per family).
//!
//! As for ClusterNetworkPolicy, the raw form keeps every field optional so that validation
//! names the object and field that is missing or wrong (`EgressGateway::from_raw`).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use serde::{Deserialize, Serialize};

use super::cluster::policy::parse_network;
use crate::error::{ConfigError, FieldError};
use crate::selector::Selector;

/// `apiVersion` of EgressGateway.
pub const API_VERSION: &str = "palisade.io/v1alpha1";
/// `kind` of EgressGateway.
pub const KIND: &str = "EgressGateway";
/// At most this many `destinationCIDRs` and as many `excludedCIDRs`.
pub const MAX_CIDRS: usize = 256;

/// An EgressGateway as read.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawEgressGateway {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<RawSpec>,
    /// Written by controllers; no effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// `spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_selector: Option<LabelSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
    #[serde(
        default,
        rename = "destinationCIDRs",
        skip_serializing_if = "Option::is_none"
    )]
    pub destination_cidrs: Option<Vec<String>>,
    #[serde(
        default,
        rename = "excludedCIDRs",
        skip_serializing_if = "Option::is_none"
    )]
    pub excluded_cidrs: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_node_selector: Option<LabelSelector>,
    #[serde(default, rename = "egressIPs", skip_serializing_if = "Option::is_none")]
    pub egress_ips: Option<Vec<String>>,
}

/// A validated EgressGateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressGateway {
    pub name: String,
    /// Pods, within the namespaces `namespace_selector` selects (absent: every namespace).
    pub pod_selector: Selector,
    pub namespace_selector: Selector,
    pub destinations: Vec<IpNetwork>,
    pub excluded: Vec<IpNetwork>,
    pub gateway_nodes: Selector,
    /// The address the outside world sees, per family. Without one of a family, each gateway
    /// masquerades that family's flows to its own node address.
    pub egress_v4: Option<Ipv4Addr>,
    pub egress_v6: Option<Ipv6Addr>,
}

impl EgressGateway {
    /// Validates `raw`: every problem names the object and the field.
    pub fn from_raw(raw: &RawEgressGateway) -> Result<EgressGateway, ConfigError> {
        let name = raw.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(ConfigError::new(
                "EgressGateway <unnamed>",
                "metadata.name",
                "is required",
            ));
        }
        let object = format!("{KIND} {name}");
        Self::validate(name, raw).map_err(|e| e.on(object))
    }

    fn validate(name: String, raw: &RawEgressGateway) -> Result<EgressGateway, FieldError> {
        if !raw.api_version.is_empty() && raw.api_version != API_VERSION {
            return Err(FieldError::new(
                "apiVersion",
                format!("unsupported {:?} (want {API_VERSION})", raw.api_version),
            ));
        }
        let spec = raw
            .spec
            .as_ref()
            .ok_or_else(|| FieldError::new("spec", "is required"))?;
        let pod_selector = match &spec.pod_selector {
            Some(s) => Selector::from_k8s(s, "spec.podSelector")?,
            None => return Err(FieldError::new("spec.podSelector", "is required")),
        };
        let namespace_selector = match &spec.namespace_selector {
            Some(s) => Selector::from_k8s(s, "spec.namespaceSelector")?,
            None => Selector::everything(),
        };
        let gateway_nodes = match &spec.gateway_node_selector {
            Some(s) => Selector::from_k8s(s, "spec.gatewayNodeSelector")?,
            None => return Err(FieldError::new("spec.gatewayNodeSelector", "is required")),
        };
        let cidrs =
            |field: &str, list: Option<&Vec<String>>| -> Result<Vec<IpNetwork>, FieldError> {
                let list = list.map(Vec::as_slice).unwrap_or_default();
                if list.len() > MAX_CIDRS {
                    return Err(FieldError::new(
                        field,
                        format!("has {} entries (at most {MAX_CIDRS})", list.len()),
                    ));
                }
                let mut out = Vec::new();
                for (i, s) in list.iter().enumerate() {
                    let net = parse_network(s)
                        .map_err(|e| FieldError::new(format!("{field}[{i}]"), e))?;
                    if !out.contains(&net) {
                        out.push(net);
                    }
                }
                Ok(out)
            };
        let destinations = cidrs("spec.destinationCIDRs", spec.destination_cidrs.as_ref())?;
        if destinations.is_empty() {
            return Err(FieldError::new(
                "spec.destinationCIDRs",
                "is required (at least one CIDR; 0.0.0.0/0 and ::/0 for everything outside the cluster)",
            ));
        }
        let excluded = cidrs("spec.excludedCIDRs", spec.excluded_cidrs.as_ref())?;
        let mut egress_v4 = None;
        let mut egress_v6 = None;
        for (i, s) in spec.egress_ips.iter().flatten().enumerate() {
            let field = format!("spec.egressIPs[{i}]");
            let ip: IpAddr = s
                .parse()
                .map_err(|_| FieldError::new(&field, format!("{s:?} is not an IP address")))?;
            if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
                return Err(FieldError::new(
                    &field,
                    format!("{ip} cannot be an egress address"),
                ));
            }
            let dup = match ip {
                IpAddr::V4(a) => egress_v4.replace(a).is_some(),
                IpAddr::V6(a) => egress_v6.replace(a).is_some(),
            };
            if dup {
                return Err(FieldError::new(
                    &field,
                    "a second address of the same family (at most one IPv4 and one IPv6)",
                ));
            }
        }
        Ok(EgressGateway {
            name,
            pod_selector,
            namespace_selector,
            destinations,
            excluded,
            gateway_nodes,
            egress_v4,
            egress_v6,
        })
    }

    /// The egress address of `ip`'s family, if the resource names one.
    pub fn egress_ip(&self, v6: bool) -> Option<IpAddr> {
        if v6 {
            self.egress_v6.map(IpAddr::V6)
        } else {
            self.egress_v4.map(IpAddr::V4)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<EgressGateway, ConfigError> {
        let raw: RawEgressGateway = serde_saphyr::from_str(yaml).unwrap();
        EgressGateway::from_raw(&raw)
    }

    fn err(spec: &str) -> String {
        parse(&format!("metadata: {{name: gw}}\nspec: {spec}"))
            .unwrap_err()
            .to_string()
    }

    const OK: &str = "{podSelector: {matchLabels: {app: a}}, destinationCIDRs: [192.0.2.0/24, \
                      '2001:db8::/32'], excludedCIDRs: [192.0.2.128/25], gatewayNodeSelector: \
                      {matchLabels: {egress: 'true'}}, egressIPs: [10.0.0.9, 'fd00::9']}";

    #[test]
    fn a_full_resource_validates() {
        let g = parse(&format!(
            "apiVersion: {API_VERSION}\nkind: {KIND}\nmetadata: {{name: gw}}\nspec: {OK}"
        ))
        .unwrap();
        assert_eq!(g.name, "gw");
        assert_eq!(g.destinations.len(), 2);
        assert_eq!(g.excluded, vec!["192.0.2.128/25".parse().unwrap()]);
        assert_eq!(g.egress_v4, Some(Ipv4Addr::new(10, 0, 0, 9)));
        assert_eq!(g.egress_v6, Some("fd00::9".parse().unwrap()));
        assert!(g.namespace_selector.matches(&Default::default()));
    }

    #[test]
    fn errors_name_the_object_and_the_field() {
        assert_eq!(
            err("{destinationCIDRs: [0.0.0.0/0], gatewayNodeSelector: {}}"),
            "EgressGateway gw: spec.podSelector: is required"
        );
        assert_eq!(
            err("{podSelector: {}, destinationCIDRs: [0.0.0.0/0]}"),
            "EgressGateway gw: spec.gatewayNodeSelector: is required"
        );
        assert!(
            err("{podSelector: {}, gatewayNodeSelector: {}}")
                .starts_with("EgressGateway gw: spec.destinationCIDRs: is required")
        );
        assert!(
            err("{podSelector: {}, gatewayNodeSelector: {}, destinationCIDRs: [0.0.0.0/0, 10.0.0.0]}")
                .starts_with("EgressGateway gw: spec.destinationCIDRs[1]: invalid CIDR")
        );
        assert!(
            err("{podSelector: {}, gatewayNodeSelector: {}, destinationCIDRs: [0.0.0.0/0], excludedCIDRs: [x/8]}")
                .starts_with("EgressGateway gw: spec.excludedCIDRs[0]:")
        );
        assert_eq!(
            err(
                "{podSelector: {}, gatewayNodeSelector: {}, destinationCIDRs: [0.0.0.0/0], egressIPs: [10.0.0.1, 10.0.0.2]}"
            ),
            "EgressGateway gw: spec.egressIPs[1]: a second address of the same family (at most one IPv4 and one IPv6)"
        );
        assert_eq!(
            err(
                "{podSelector: {}, gatewayNodeSelector: {}, destinationCIDRs: [0.0.0.0/0], egressIPs: [nope]}"
            ),
            "EgressGateway gw: spec.egressIPs[0]: \"nope\" is not an IP address"
        );
        assert!(
            err("{podSelector: {matchExpressions: [{key: a, operator: Bogus}]}, gatewayNodeSelector: {}, destinationCIDRs: [0.0.0.0/0]}")
                .starts_with("EgressGateway gw: spec.podSelector.matchExpressions[0]")
        );
        assert_eq!(
            parse("spec: {}").unwrap_err().to_string(),
            "EgressGateway <unnamed>: metadata.name: is required"
        );
        assert_eq!(
            parse("apiVersion: palisade.io/v2\nmetadata: {name: gw}\nspec: {}")
                .unwrap_err()
                .to_string(),
            "EgressGateway gw: apiVersion: unsupported \"palisade.io/v2\" (want palisade.io/v1alpha1)"
        );
    }
}
