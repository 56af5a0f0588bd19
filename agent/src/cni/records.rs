//! The agent's side: the plugin's records, read at every reconcile, and the socket the plugin
//! wakes the agent through.
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use palisade_policy::compile::LocalEndpoint;
use palisade_policy::model::Store;
use palisade_policy::state::PodRef;

use super::{NOTIFY_SOCKET, Record};
use crate::interfaces::HostView;

/// The plugin's records, by pod (the newest record of a pod whose interface still exists).
#[derive(Clone, Debug, Default)]
pub struct Records {
    by_pod: BTreeMap<PodRef, Record>,
}

impl Records {
    /// Reads `dir`; records whose interface is gone (or is another interface now) are skipped.
    pub fn read(dir: &Path, host: &HostView) -> Records {
        let mut by_pod: BTreeMap<PodRef, Record> = BTreeMap::new();
        let Ok(entries) = fs::read_dir(dir) else {
            return Records::default();
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.ends_with(".json") || name.starts_with('.') {
                continue;
            }
            let Ok(text) = fs::read_to_string(e.path()) else {
                continue;
            };
            let Ok(rec) = serde_json::from_str::<Record>(&text) else {
                continue;
            };
            if host.links.get(&rec.host_ifname) != Some(&rec.host_ifindex) {
                continue;
            }
            let Some(pod) = rec.pod() else { continue };
            match by_pod.get(&pod) {
                Some(old) if old.added_at_unix_ms > rec.added_at_unix_ms => {}
                _ => {
                    by_pod.insert(pod, rec);
                }
            }
        }
        Records { by_pod }
    }

    pub fn is_empty(&self) -> bool {
        self.by_pod.is_empty()
    }

    pub fn get(&self, pod: &PodRef) -> Option<&Record> {
        self.by_pod.get(pod)
    }

    /// Host interfaces the plugin provisioned.
    pub fn ifindexes(&self) -> BTreeSet<u32> {
        self.by_pod.values().map(|r| r.host_ifindex).collect()
    }

    /// The store, with the addresses of pods the API does not report yet (the kubelet writes
    /// `status.podIPs` only after the CNI ADD returned) taken from their records.
    pub fn overlay<'s>(&self, store: &'s Store) -> Cow<'s, Store> {
        let missing: Vec<(&PodRef, &Record)> = self
            .by_pod
            .iter()
            .filter(|(pod, rec)| {
                !rec.ips.is_empty() && store.pods.get(*pod).is_some_and(|p| p.ips.is_empty())
            })
            .collect();
        if missing.is_empty() {
            return Cow::Borrowed(store);
        }
        // An address another pod holds is not taken from a record (a finished pod's record
        // whose DEL has not come yet, its address already given to a new pod).
        let taken: std::collections::BTreeSet<IpAddr> = store
            .pods
            .values()
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        let mut s = store.clone();
        for (pod, rec) in missing {
            if rec.ips.iter().any(|ip| taken.contains(ip)) {
                continue;
            }
            if let Some(info) = s.pods.make_mut(pod)
                && !info.host_network
            {
                info.ips = rec.ips.clone();
            }
        }
        Cow::Owned(s)
    }

    /// Adds (or corrects) the local endpoints the records know: the record, which names the
    /// peer of the pod's own interface, wins over a route (and covers bridge layouts, which
    /// have no per-pod route).
    pub fn endpoints(&self, store: &Store, node_name: Option<&str>, out: &mut Vec<LocalEndpoint>) {
        for (pod, rec) in &self.by_pod {
            let Some(info) = store.pods.get(pod) else {
                continue;
            };
            if info.host_network {
                continue;
            }
            if let (Some(node), Some(pod_node)) = (node_name, info.node_name.as_deref())
                && node != pod_node
            {
                continue;
            }
            match out.iter_mut().find(|e| e.pod == *pod) {
                Some(e) => e.ifindex = rec.host_ifindex,
                None => out.push(LocalEndpoint {
                    pod: pod.clone(),
                    ifindex: rec.host_ifindex,
                }),
            }
        }
        // One interface, one pod: a route and a record that disagree are settled by the record.
        let recorded: BTreeMap<u32, &PodRef> = self
            .by_pod
            .iter()
            .map(|(p, r)| (r.host_ifindex, p))
            .collect();
        out.retain(|e| recorded.get(&e.ifindex).is_none_or(|p| **p == e.pod));
    }
}

/// The agent's end of the wake-up socket: one datagram per ADD or DEL.
pub fn bind_notify(dir: &Path) -> Result<tokio::net::UnixDatagram> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(NOTIFY_SOCKET);
    let _ = fs::remove_file(&path);
    let sock = tokio::net::UnixDatagram::bind(&path)
        .with_context(|| format!("binding {}", path.display()))?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::InitialPolicy;

    #[test]
    fn records_give_interfaces_and_early_addresses() {
        let dir = std::env::temp_dir().join(format!("palisade-cni-rec-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let rec = |name: &str, ifname: &str, ifindex: u32, ip: &str| Record {
            container_id: format!("c-{name}"),
            ifname: "eth0".into(),
            netns: String::new(),
            namespace: Some("x".into()),
            name: Some(name.into()),
            host_ifindex: ifindex,
            host_ifname: ifname.into(),
            ips: vec![ip.parse().unwrap()],
            found_by: "netns-peer".into(),
            initial_policy: InitialPolicy::Deny,
            added_at_unix_ms: 1,
        };
        for r in [
            rec("new", "veth5", 5, "10.0.0.1"),
            rec("stale", "veth6", 6, "10.0.0.2"),
            rec("gone", "veth7", 7, "10.0.0.3"),
        ] {
            fs::write(
                dir.join(Record::file_name(&r.container_id, &r.ifname)),
                serde_json::to_vec(&r).unwrap(),
            )
            .unwrap();
        }
        let store = Store::from_objects(
            palisade_policy::manifest::parse_str(
                "apiVersion: v1\nkind: Pod\nmetadata: {name: new, namespace: x}\nspec: {nodeName: n1, containers: []}\n\
                 ---\napiVersion: v1\nkind: Pod\nmetadata: {name: stale, namespace: x}\nspec: {nodeName: n1, containers: []}\nstatus: {phase: Succeeded, podIP: 10.0.0.2}\n\
                 ---\napiVersion: v1\nkind: Pod\nmetadata: {name: reuser, namespace: x}\nspec: {nodeName: n2, containers: []}\nstatus: {podIP: 10.0.0.2}\n\
                 ---\napiVersion: v1\nkind: Pod\nmetadata: {name: gone, namespace: x}\nspec: {nodeName: n1, containers: []}\n",
            )
            .unwrap(),
        );
        let mut host = HostView::default();
        host.links.insert("veth5".into(), 5);
        host.links.insert("veth6".into(), 6);
        host.links.insert("veth7".into(), 70); // another interface has that name now
        let records = Records::read(&dir, &host);
        assert_eq!(records.ifindexes(), [5, 6].into());
        let pod = |n: &str| PodRef {
            namespace: "x".into(),
            name: n.into(),
        };
        let overlaid = records.overlay(&store);
        assert_eq!(
            overlaid.pods[&pod("new")].ips,
            vec!["10.0.0.1".parse::<IpAddr>().unwrap()],
            "the address before the API has it"
        );
        assert!(
            overlaid.pods[&pod("stale")].ips.is_empty(),
            "an address another pod holds now is not taken"
        );
        let mut eps = Vec::new();
        records.endpoints(&overlaid, Some("n1"), &mut eps);
        let mut got: Vec<(String, u32)> = eps
            .into_iter()
            .map(|e| (e.pod.name.into(), e.ifindex))
            .collect();
        got.sort();
        assert_eq!(got, vec![("new".into(), 5), ("stale".into(), 6)]);
        let _ = fs::remove_dir_all(&dir);
    }
}
