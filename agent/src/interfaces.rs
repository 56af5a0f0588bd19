//! Finding each local pod's host-side interface, and this node's own addresses.
//!
//! A pod's interface is, in order: the one its `palisade.io/interface` annotation names, or the
//! device of this host's route to the pod's IP when that route is a host route (/32, /128), as
//! ptp, Calico and Cilium install one per pod. Reads the kernel's tables through iproute2's
//! JSON output.
use std::{collections::BTreeMap, net::IpAddr, process::Command};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::{compile::LocalEndpoint, model::Store};

/// Annotation that names a pod's host-side interface explicitly.
pub const INTERFACE_ANNOTATION: &str = "palisade.io/interface";

#[derive(Deserialize)]
struct Link {
    ifindex: u32,
    ifname: String,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
}

#[derive(Deserialize)]
struct AddrInfo {
    local: Option<IpAddr>,
}

#[derive(Deserialize)]
struct Route {
    dst: String,
    dev: Option<String>,
}

fn ip_json(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A snapshot of this host's interfaces, addresses and host routes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostView {
    /// Interface name -> ifindex.
    pub links: BTreeMap<String, u32>,
    /// Every address configured on this host.
    pub addresses: Vec<IpAddr>,
    /// Host routes: address -> interface name.
    pub host_routes: BTreeMap<IpAddr, String>,
}

impl HostView {
    pub fn read() -> Result<Self> {
        let links: Vec<Link> = serde_json::from_str(&ip_json(&["addr", "show"])?)
            .context("parsing `ip -j addr show`")?;
        let mut view = HostView::default();
        for l in links {
            view.addresses
                .extend(l.addr_info.iter().filter_map(|a| a.local));
            view.links.insert(l.ifname, l.ifindex);
        }
        view.addresses.sort();
        view.addresses.dedup();
        for family in ["-4", "-6"] {
            let routes: Vec<Route> =
                serde_json::from_str(&ip_json(&[family, "route", "show", "table", "main"])?)
                    .context("parsing `ip -j route show`")?;
            for r in routes {
                let Some(dev) = r.dev else { continue };
                let (addr, len) = match r.dst.split_once('/') {
                    Some((a, l)) => (a, l.parse::<u8>().unwrap_or(0)),
                    None => (r.dst.as_str(), 255),
                };
                let Ok(addr) = addr.parse::<IpAddr>() else {
                    continue;
                };
                let host_len = if addr.is_ipv4() { 32 } else { 128 };
                if len == 255 || len == host_len {
                    view.host_routes.insert(addr, dev);
                }
            }
        }
        Ok(view)
    }

    /// The local endpoints among the store's pods: pods that are not hostNetwork, that are
    /// scheduled here (when `node_name` is given) and whose interface is found on this host.
    pub fn local_endpoints(&self, store: &Store, node_name: Option<&str>) -> Vec<LocalEndpoint> {
        let mut out = Vec::new();
        for (pod_ref, pod) in &store.pods {
            if pod.host_network {
                continue;
            }
            if let (Some(node), Some(pod_node)) = (node_name, pod.node_name.as_deref())
                && node != pod_node
            {
                continue;
            }
            let ifname = pod
                .annotations
                .get(INTERFACE_ANNOTATION)
                .cloned()
                .or_else(|| {
                    pod.ips
                        .iter()
                        .find_map(|ip| self.host_routes.get(ip).cloned())
                });
            let Some(ifindex) = ifname.and_then(|n| self.links.get(&n).copied()) else {
                continue;
            };
            out.push(LocalEndpoint {
                pod: pod_ref.clone(),
                ifindex,
            });
        }
        out
    }
}
