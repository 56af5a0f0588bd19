//! Finding each local pod's host-side interface, and this node's own addresses.
//!
//! A pod's interface is, in order:
//! 1. the one its `palisade.io/interface` annotation names;
//! 2. the one the CNI plugin recorded at pod creation (`cni::Records`): the peer of the pod's
//!    own interface, asked of the kernel inside the pod's network namespace, so exact whatever
//!    the routing (bridge layouts included);
//! 3. the device of this host's route to the pod's IP, when that route is a host route (/32,
//!    /128) through a **veth**, as ptp, Calico and kindnet install one per pod.
//!
//! Layouts: ptp, kindnet and Calico (routed veths, one host route per pod) work by 3 alone;
//! bridge, flannel and other bridged layouts (the pod's veth is a bridge port, the route goes
//! to the bridge) need the CNI plugin (2); a route through anything but a veth (a bridge, a
//! tunnel, Cilium's `cilium_host`) is never taken for a pod's interface. Reads the kernel's
//! tables through iproute2's JSON output.
use std::{
    collections::BTreeMap,
    net::IpAddr,
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use palisade_policy::{compile::LocalEndpoint, model::Store};

/// Annotation that names a pod's host-side interface explicitly.
pub const INTERFACE_ANNOTATION: &str = "palisade.io/interface";

#[derive(Deserialize)]
struct Link {
    ifindex: u32,
    ifname: String,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
    #[serde(default)]
    linkinfo: Option<LinkKind>,
}

#[derive(Deserialize)]
struct LinkKind {
    info_kind: Option<String>,
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

/// Runs `ip -j <args>` for each of `commands` at once (each is a process start: together they
/// take one start's time, not three) and returns their outputs in order.
fn ip_json(commands: &[&[&str]]) -> Result<Vec<String>> {
    let children = commands
        .iter()
        .map(|args| {
            Command::new("ip")
                .arg("-j")
                .args(*args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("running ip (iproute2)")
        })
        .collect::<Result<Vec<_>>>()?;
    children
        .into_iter()
        .zip(commands)
        .map(|(child, args)| {
            let out = child.wait_with_output().context("running ip (iproute2)")?;
            if !out.status.success() {
                bail!(
                    "ip {} failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            Ok(String::from_utf8(out.stdout)?)
        })
        .collect()
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
    /// Interface name -> kind (`veth`, `bridge`, ...), where it has one.
    pub kinds: BTreeMap<String, String>,
}

impl HostView {
    pub fn read() -> Result<Self> {
        let outputs = ip_json(&[
            &["-d", "addr", "show"],
            &["-4", "route", "show", "table", "main"],
            &["-6", "route", "show", "table", "main"],
        ])?;
        let links: Vec<Link> =
            serde_json::from_str(&outputs[0]).context("parsing `ip -j -d addr show`")?;
        let mut view = HostView::default();
        for l in links {
            view.addresses
                .extend(l.addr_info.iter().filter_map(|a| a.local));
            if let Some(kind) = l.linkinfo.and_then(|k| k.info_kind) {
                view.kinds.insert(l.ifname.clone(), kind);
            }
            view.links.insert(l.ifname, l.ifindex);
        }
        view.addresses.sort();
        view.addresses.dedup();
        for output in &outputs[1..] {
            let routes: Vec<Route> =
                serde_json::from_str(output).context("parsing `ip -j route show`")?;
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
                    pod.ips.iter().find_map(|ip| {
                        self.host_routes
                            .get(ip)
                            .filter(|dev| self.kinds.get(*dev).is_some_and(|k| k == "veth"))
                            .cloned()
                    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::model::Store;

    #[test]
    fn routes_count_only_through_veths() {
        let store = Store::from_objects(
            palisade_policy::manifest::parse_str(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: routed, namespace: x}\nspec: {containers: []}\nstatus: {podIP: 10.0.0.1}\n\
                 ---\napiVersion: v1\nkind: Pod\nmetadata: {name: bridged, namespace: x}\nspec: {containers: []}\nstatus: {podIP: 10.0.0.2}\n\
                 ---\napiVersion: v1\nkind: Pod\nmetadata: {name: named, namespace: x, annotations: {palisade.io/interface: tap0}}\nspec: {containers: []}\nstatus: {podIP: 10.0.0.3}\n\
                 ---\napiVersion: v1\nkind: Pod\nmetadata: {name: elsewhere, namespace: x}\nspec: {nodeName: n2, containers: []}\nstatus: {podIP: 10.0.0.4}\n\
                 ---\napiVersion: v1\nkind: Pod\nmetadata: {name: host, namespace: x}\nspec: {hostNetwork: true, containers: []}\nstatus: {podIP: 10.0.0.5}\n",
            )
            .unwrap(),
        );
        let mut v = HostView::default();
        for (name, idx, kind) in [
            ("veth1", 11, "veth"),
            ("cni0", 12, "bridge"),
            ("tap0", 13, "tun"),
            ("veth4", 14, "veth"),
            ("veth5", 15, "veth"),
        ] {
            v.links.insert(name.into(), idx);
            v.kinds.insert(name.into(), kind.into());
        }
        for (ip, dev) in [
            ("10.0.0.1", "veth1"),
            ("10.0.0.2", "cni0"),
            ("10.0.0.4", "veth4"),
            ("10.0.0.5", "veth5"),
        ] {
            v.host_routes.insert(ip.parse().unwrap(), dev.into());
        }
        let eps: Vec<(String, u32)> = v
            .local_endpoints(&store, Some("n1"))
            .into_iter()
            .map(|e| (e.pod.name, e.ifindex))
            .collect();
        assert_eq!(
            eps,
            vec![("named".to_string(), 13), ("routed".to_string(), 11)]
        );
    }
}
