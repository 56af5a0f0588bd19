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
//! tables over rtnetlink (`palisade_datapath::netlink`): links, addresses and the routes of table main.
use std::{collections::BTreeMap, net::IpAddr};

use anyhow::Result;

use palisade_datapath::netlink::{Address, Link, Netlink, Route, RouteType};
use palisade_policy::{
    compile::LocalEndpoint,
    model::{PodInfo, Store, tracked::Mark},
    state::PodRef,
};

/// Annotation that names a pod's host-side interface explicitly.
pub const INTERFACE_ANNOTATION: &str = "palisade.io/interface";

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
    /// This host's view, in three dumps over one rtnetlink socket.
    pub fn read() -> Result<Self> {
        let mut nl = Netlink::new()?;
        let links = nl.links()?;
        let addresses = nl.addresses()?;
        let routes = nl.routes()?;
        Ok(Self::from_dumps(&links, &addresses, &routes))
    }

    /// What `ip -j -d addr show` and `ip -j -4/-6 route show table main` give: the addresses
    /// of the links listed (`local`, sorted, deduplicated), and as host routes those with an
    /// output device and a destination of /32 or /128 (the default route has no destination,
    /// a prefix route a shorter prefix). Like iproute2, IPv6 routes of type `local` in table
    /// main are left out; a device the link dump does not list is named `if<index>`.
    fn from_dumps(links: &[Link], addresses: &[Address], routes: &[Route]) -> Self {
        let mut view = HostView::default();
        let mut names = BTreeMap::new();
        for l in links {
            names.insert(l.index, l.name.clone());
            if let Some(kind) = &l.kind {
                view.kinds.insert(l.name.clone(), kind.clone());
            }
            view.links.insert(l.name.clone(), l.index);
        }
        view.addresses = addresses
            .iter()
            .filter(|a| names.contains_key(&a.index))
            .map(|a| a.address)
            .collect();
        view.addresses.sort();
        view.addresses.dedup();
        for r in routes {
            if r.ipv6 && r.kind == RouteType::Local {
                continue;
            }
            let (Some(oif), Some(dst)) = (r.oif, r.host_destination()) else {
                continue;
            };
            let dev = names
                .get(&oif)
                .cloned()
                .unwrap_or_else(|| format!("if{oif}"));
            view.host_routes.insert(dst, dev);
        }
        view
    }

    /// The local endpoints among the store's pods: pods that are not hostNetwork, that are
    /// scheduled here (when `node_name` is given) and whose interface is found on this host.
    pub fn local_endpoints(&self, store: &Store, node_name: Option<&str>) -> Vec<LocalEndpoint> {
        store
            .pods
            .iter()
            .filter_map(|(pod_ref, pod)| {
                self.interface_of(pod, node_name)
                    .map(|ifindex| LocalEndpoint {
                        pod: pod_ref.clone(),
                        ifindex,
                    })
            })
            .collect()
    }

    /// The interface of `pod` if it is a local endpoint (1 and 3 above).
    fn interface_of(&self, pod: &PodInfo, node_name: Option<&str>) -> Option<u32> {
        if pod.host_network {
            return None;
        }
        if let (Some(node), Some(pod_node)) = (node_name, pod.node_name.as_deref())
            && node != pod_node
        {
            return None;
        }
        let ifname = pod.annotations.get(INTERFACE_ANNOTATION).or_else(|| {
            pod.ips.iter().find_map(|ip| {
                self.host_routes
                    .get(ip)
                    .filter(|dev| self.kinds.get(*dev).is_some_and(|k| k == "veth"))
            })
        })?;
        self.links.get(ifname).copied()
    }
}

/// `HostView::local_endpoints`, kept up to date: after the first search only the pods the
/// store's journal names are looked at again, until the host view changes.
#[derive(Debug, Default)]
pub struct EndpointFinder {
    /// Where the store's pods were read up to.
    seen: Mark,
    /// The host view they were found in.
    host: Option<HostView>,
    by_pod: BTreeMap<PodRef, u32>,
}

impl EndpointFinder {
    pub fn find(
        &mut self,
        host: &HostView,
        store: &Store,
        node_name: Option<&str>,
    ) -> Vec<LocalEndpoint> {
        let journal = store
            .pods
            .changes_since(self.seen)
            .filter(|_| self.host.as_ref() == Some(host));
        match journal {
            Some(changed) => {
                for pod_ref in changed {
                    match store
                        .pods
                        .get(pod_ref)
                        .and_then(|pod| host.interface_of(pod, node_name))
                    {
                        Some(ifindex) => self.by_pod.insert(pod_ref.clone(), ifindex),
                        None => self.by_pod.remove(pod_ref),
                    };
                }
            }
            None => {
                self.by_pod = host
                    .local_endpoints(store, node_name)
                    .into_iter()
                    .map(|ep| (ep.pod, ep.ifindex))
                    .collect();
                self.host = Some(host.clone());
            }
        }
        self.seen = store.pods.mark();
        self.by_pod
            .iter()
            .map(|(pod, ifindex)| LocalEndpoint {
                pod: pod.clone(),
                ifindex: *ifindex,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use palisade_policy::model::Store;

    #[test]
    fn host_routes_are_the_32s_and_128s_through_a_device() {
        let link = |index: u32, name: &str, kind: Option<&str>| Link {
            index,
            name: name.into(),
            link: None,
            kind: kind.map(String::from),
        };
        let addr = |index: u32, a: &str| Address {
            index,
            address: a.parse().unwrap(),
            prefix_len: 24,
        };
        let route = |dst: Option<&str>, len: u8, oif: Option<u32>, kind: RouteType| {
            let destination: Option<IpAddr> = dst.map(|d| d.parse().unwrap());
            Route {
                ipv6: destination.is_some_and(|d| d.is_ipv6()),
                destination,
                prefix_len: len,
                oif,
                kind,
            }
        };
        let uni = RouteType::Unicast;
        let v = HostView::from_dumps(
            &[link(1, "lo", None), link(4, "veth0", Some("veth"))],
            &[
                addr(4, "10.0.0.1"),
                addr(1, "127.0.0.1"),
                addr(4, "10.0.0.1"),
                addr(9, "10.9.9.9"), // a link the dump did not list
            ],
            &[
                route(Some("10.0.0.2"), 32, Some(4), uni),
                route(Some("fd00::2"), 128, Some(4), uni),
                route(Some("10.0.0.3"), 32, Some(7), uni),
                route(Some("10.0.1.0"), 24, Some(4), uni),
                route(None, 0, Some(4), uni), // the default route: no RTA_DST
                route(Some("10.0.0.4"), 32, None, RouteType::BlackHole),
                route(Some("10.0.0.5"), 32, Some(4), RouteType::Local),
                route(Some("fd00::5"), 128, Some(4), RouteType::Local),
            ],
        );
        assert_eq!(
            v.links,
            [("lo".to_string(), 1), ("veth0".to_string(), 4)].into()
        );
        assert_eq!(v.kinds, [("veth0".to_string(), "veth".to_string())].into());
        assert_eq!(
            v.addresses,
            vec![
                "10.0.0.1".parse::<IpAddr>().unwrap(),
                "127.0.0.1".parse().unwrap()
            ]
        );
        let routes: Vec<(String, String)> = v
            .host_routes
            .iter()
            .map(|(a, d)| (a.to_string(), d.clone()))
            .collect();
        let want = [
            ("10.0.0.2", "veth0"),
            ("10.0.0.3", "if7"),
            ("10.0.0.5", "veth0"),
            ("fd00::2", "veth0"),
        ];
        assert_eq!(
            routes,
            want.map(|(a, d)| (a.to_string(), d.to_string())).to_vec()
        );
    }

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
            .map(|e| (e.pod.name.into(), e.ifindex))
            .collect();
        assert_eq!(
            eps,
            vec![("named".to_string(), 13), ("routed".to_string(), 11)]
        );
    }
}

#[cfg(test)]
mod finder_tests {
    use super::*;
    use palisade_policy::model::PodInfo;

    /// Pods come, go, move nodes, change addresses and annotations; veths come and go: the
    /// finder always answers what a full search answers.
    #[test]
    fn the_finder_answers_what_a_search_answers() {
        let mut host = HostView::default();
        for i in 0..20u32 {
            host.links.insert(format!("veth{i}"), 100 + i);
            host.kinds.insert(format!("veth{i}"), "veth".into());
            host.host_routes
                .insert(format!("10.0.0.{i}").parse().unwrap(), format!("veth{i}"));
        }
        let mut store = Store::default();
        let mut finder = EndpointFinder::default();
        let mut rng: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        for step in 0..2000 {
            let pod = PodRef::new(format!("ns{}", next(3)), format!("p{}", next(30)));
            match next(10) {
                0..=3 => {
                    let mut info = PodInfo {
                        ips: vec![format!("10.0.0.{}", next(25)).parse().unwrap()],
                        node_name: Some(if next(4) == 0 { "other" } else { "here" }.into()),
                        host_network: next(10) == 0,
                        ..PodInfo::default()
                    };
                    if next(8) == 0 {
                        info.annotations
                            .insert(INTERFACE_ANNOTATION.into(), format!("veth{}", next(22)));
                    }
                    store.pods.insert(pod, info);
                }
                4..=5 => {
                    store.pods.remove(&pod);
                }
                6..=7 => {
                    if let Some(p) = store.pods.make_mut(&pod) {
                        p.ips = vec![format!("10.0.0.{}", next(25)).parse().unwrap()];
                    }
                }
                8 => {
                    let i = next(22);
                    let name = format!("veth{i}");
                    if host.links.remove(&name).is_none() {
                        host.links.insert(name, 100 + i as u32);
                    }
                }
                _ => {}
            }
            let found = finder.find(&host, &store, Some("here"));
            assert_eq!(
                found,
                host.local_endpoints(&store, Some("here")),
                "step {step}"
            );
        }
        // Another store (a clone: the CNI plugin's overlay) is searched whole.
        let clone = store.clone();
        assert_eq!(
            finder.find(&host, &clone, Some("here")),
            host.local_endpoints(&clone, Some("here"))
        );
    }
}
