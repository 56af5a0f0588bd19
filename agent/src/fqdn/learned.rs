//! What the learner knows, as `fqdn.json` holds it: per endpoint, each name its DNS answers
//! resolved, and each address with its expiry.
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use palisade_policy::state::DomainTable;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Learned {
    /// Expiries are monotonic time, which a reboot restarts: a file of another boot is
    /// ignored.
    pub boot_id: String,
    /// Endpoint id -> its names.
    pub endpoints: BTreeMap<u32, EndpointNames>,
    /// The domain classes in force (endpoint id -> table): the next agent keeps their ids.
    #[serde(default)]
    pub classes: BTreeMap<u32, DomainTable>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointNames {
    /// "namespace/name".
    pub pod: String,
    pub names: BTreeMap<String, NameEntry>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NameEntry {
    /// The CNAME chain of the last answer.
    pub chain: Vec<String>,
    /// The server that gave the last answer.
    pub server: String,
    pub answered_unix_ms: u64,
    /// Address -> until when it admits new connections (coarse monotonic ns).
    pub addresses: BTreeMap<IpAddr, u64>,
}

/// This boot's id.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Learned {
    /// What `path` holds, if it is of this boot (nothing otherwise).
    pub fn load(path: &Path) -> Learned {
        let read = || -> Result<Learned> {
            let bytes = std::fs::read(path)?;
            Ok(serde_json::from_slice(&bytes)?)
        };
        match read() {
            Ok(l) if l.boot_id == boot_id() => l,
            _ => Learned::default(),
        }
    }

    pub fn save(&mut self, path: &Path) -> Result<()> {
        self.boot_id = boot_id();
        let bytes = serde_json::to_vec(self)?;
        crate::files::write_private(path, &bytes)
            .with_context(|| format!("writing {}", path.display()))
    }
}

/// Keeps an endpoint within its bounds after `name` learned addresses: at most `per_name`
/// addresses for the name, `per_endpoint` in all, the earliest to expire going first. Returns
/// the addresses no name of the endpoint holds any more.
pub fn bound(
    names: &mut EndpointNames,
    name: &str,
    per_name: usize,
    per_endpoint: usize,
) -> Vec<IpAddr> {
    let mut dropped = Vec::new();
    if let Some(e) = names.names.get_mut(name) {
        while e.addresses.len() > per_name {
            let (ip, _) = e
                .addresses
                .iter()
                .min_by_key(|(ip, exp)| (**exp, **ip))
                .map(|(ip, exp)| (*ip, *exp))
                .expect("not empty");
            e.addresses.remove(&ip);
            dropped.push(ip);
        }
    }
    let total = |n: &EndpointNames| n.names.values().map(|e| e.addresses.len()).sum::<usize>();
    while total(names) > per_endpoint {
        let Some((n, ip)) = names
            .names
            .iter()
            .flat_map(|(n, e)| {
                e.addresses
                    .iter()
                    .map(move |(ip, exp)| (*exp, n.clone(), *ip))
            })
            .min()
            .map(|(_, n, ip)| (n, ip))
        else {
            break;
        };
        if let Some(e) = names.names.get_mut(&n) {
            e.addresses.remove(&ip);
        }
        dropped.push(ip);
    }
    names.names.retain(|_, e| !e.addresses.is_empty());
    // An address another name still holds stays in FQDN_IPS.
    dropped.retain(|ip| !names.names.values().any(|e| e.addresses.contains_key(ip)));
    dropped.sort();
    dropped.dedup();
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(addrs: &[(&str, u64)]) -> NameEntry {
        NameEntry {
            addresses: addrs
                .iter()
                .map(|(a, e)| (a.parse().unwrap(), *e))
                .collect(),
            ..NameEntry::default()
        }
    }

    #[test]
    fn bounds_drop_the_earliest_to_expire() {
        let mut n = EndpointNames::default();
        n.names.insert(
            "a.test".into(),
            entry(&[("192.0.2.1", 30), ("192.0.2.2", 10), ("192.0.2.3", 20)]),
        );
        n.names.insert(
            "b.test".into(),
            entry(&[("192.0.2.2", 50), ("192.0.2.9", 5)]),
        );
        let dropped = bound(&mut n, "a.test", 2, 10);
        // 192.0.2.2 left a.test but b.test still holds it.
        assert!(dropped.is_empty(), "{dropped:?}");
        assert_eq!(n.names["a.test"].addresses.len(), 2);
        let dropped = bound(&mut n, "a.test", 2, 3);
        assert_eq!(dropped, ["192.0.2.9".parse::<IpAddr>().unwrap()]);
        assert!(!n.names.contains_key("b.test") || n.names["b.test"].addresses.len() == 1);
    }
}
