//! Enforcement from a pod's first packet: the chained CNI plugin `palisade-cni`, and what the
//! agent reads of it.
//!
//! The DaemonSet installs the `palisade` binary as `/opt/cni/bin/palisade-cni` and appends
//! `{"type": "palisade-cni"}` to the node's CNI configuration list (`palisade cni-install`), so
//! the runtime calls it after the interface plugin (ptp, bridge, Calico, ...) has created the
//! pod's veth. On ADD it
//!
//! 1. finds the pod's host-side veth: the peer of the pod's interface, asked of the kernel
//!    inside the pod's network namespace (`IFLA_LINK` of `CNI_IFNAME`) and checked from the
//!    host side; else the one host-side veth in `prevResult.interfaces`;
//! 2. writes a **provisional** `ENDPOINTS` entry for it (only if there is none: never over the
//!    agent's), `EP_PENDING` (drop everything) by default, or not isolated with
//!    `"initialPolicy": "allow"`;
//! 3. attaches the agent's pinned programs to the veth (TCX, pinned links the agent adopts);
//! 4. records what it did in `<stateDir>/<container>-<ifname>.json` and wakes the agent through
//!    `<stateDir>/notify.sock` (best effort);
//! 5. passes `prevResult` on unchanged.
//!
//! All of this happens before the runtime starts the pod's containers, so the pod's first
//! packet meets the programs. The agent reads the records (the pod's interface and addresses
//! before the API server has them), compiles the pod's policy and replaces the provisional
//! entry with the real one in one map update. If the datapath is not there (no agent ever ran
//! on the node), ADD fails under `initialPolicy: deny` (the runtime retries; the pod never runs
//! unenforced) and passes with a warning under `allow`.
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use aya::maps::{HashMap, Map, MapData};
use palisade_common::{EP_PENDING, EndpointInfo, PeerAddr, map_names};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::interfaces::HostView;
use palisade_datapath::{
    loader::{FROM_POD, TO_POD},
    netlink, pins,
};
use palisade_policy::compile::LocalEndpoint;
use palisade_policy::model::Store;
use palisade_policy::state::PodRef;

/// The plugin's binary name (the `type` in the CNI configuration).
pub const PLUGIN_TYPE: &str = "palisade-cni";
pub const DEFAULT_STATE_DIR: &str = "/run/palisade/cni";
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/palisade";
/// The agent's wake-up socket, in the state directory.
pub const NOTIFY_SOCKET: &str = "notify.sock";
/// Provisional endpoint ids (written by the plugin, replaced by the agent) live above this;
/// the compiler hands out ids from 1 upwards and never gets near it.
pub const PROVISIONAL_ID_BASE: u32 = 0xf000_0000;
const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

pub fn provisional_id(ifindex: u32) -> u32 {
    PROVISIONAL_ID_BASE | (ifindex & !PROVISIONAL_ID_BASE)
}

pub fn is_provisional(id: u32) -> bool {
    id >= PROVISIONAL_ID_BASE
}

/// What a new pod's endpoint does until the agent has compiled its policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitialPolicy {
    /// `EP_PENDING`: every packet is dropped (fail closed).
    #[default]
    Deny,
    /// Not isolated: everything passes until the real policy is in (fail open).
    Allow,
}

/// What the plugin did for one pod interface (`<stateDir>/<container>-<ifname>.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    /// From `CNI_ARGS` (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`).
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub host_ifindex: u32,
    pub host_ifname: String,
    /// The pod's addresses, from `prevResult.ips`.
    pub ips: Vec<IpAddr>,
    /// How the host-side interface was found: `netns-peer` or `prev-result`.
    pub found_by: String,
    pub initial_policy: InitialPolicy,
    pub added_at_unix_ms: u128,
}

impl Record {
    pub fn pod(&self) -> Option<PodRef> {
        Some(PodRef {
            namespace: self.namespace.clone()?,
            name: self.name.clone()?,
        })
    }

    fn file_name(container_id: &str, ifname: &str) -> String {
        let safe = |s: &str| {
            s.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect::<String>()
        };
        format!("{}-{}.json", safe(container_id), safe(ifname))
    }
}

// ---------------------------------------------------------------------------------------------
// The agent's side
// ---------------------------------------------------------------------------------------------

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
            if let Some(info) = s.pods.get_mut(pod)
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

// ---------------------------------------------------------------------------------------------
// The plugin
// ---------------------------------------------------------------------------------------------

/// The plugin's own configuration keys (beside `prevResult` and the CNI standard ones).
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PluginConf {
    #[serde(default)]
    cni_version: String,
    #[serde(default)]
    pin_dir: Option<PathBuf>,
    #[serde(default)]
    state_dir: Option<PathBuf>,
    #[serde(default)]
    initial_policy: InitialPolicy,
    #[serde(default)]
    prev_result: Option<Value>,
}

#[derive(Debug)]
struct CniError {
    code: u32,
    msg: String,
    details: String,
}

/// The agent has not loaded the datapath yet (a node starting up): under `initialPolicy: deny`
/// the pod cannot be enforced from its first packet, so ADD fails with the CNI
/// specification's code 11, "try again later", and the runtime retries.
#[derive(Debug, thiserror::Error)]
#[error("{0} is missing: the agent has not loaded the datapath")]
struct DatapathNotLoaded(String);

/// CNI error code 11: a transient condition, retry later.
const CNI_TRY_AGAIN_LATER: u32 = 11;

impl From<anyhow::Error> for CniError {
    fn from(e: anyhow::Error) -> Self {
        let code = if e.chain().any(|c| c.is::<DatapathNotLoaded>()) {
            CNI_TRY_AGAIN_LATER
        } else {
            999
        };
        CniError {
            code,
            msg: e.to_string(),
            details: format!("{e:#}"),
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

/// `K8S_POD_NAMESPACE=..;K8S_POD_NAME=..` from `CNI_ARGS`.
fn cni_arg(args: &str, key: &str) -> Option<String> {
    args.split(';').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key && !v.is_empty()).then(|| v.to_string())
    })
}

/// Runs the plugin (`CNI_COMMAND` and the configuration on stdin); returns the exit code.
pub fn plugin_main() -> i32 {
    let command = env("CNI_COMMAND").unwrap_or_default();
    let mut stdin = String::new();
    if command != "VERSION" {
        let _ = std::io::stdin().read_to_string(&mut stdin);
    }
    let version = serde_json::from_str::<Value>(&stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| "1.0.0".to_string());
    match run_plugin(&command, &stdin) {
        Ok(Some(out)) => {
            println!("{out}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            let out = json!({
                "cniVersion": version,
                "code": e.code,
                "msg": e.msg,
                "details": e.details,
            });
            println!("{out}");
            eprintln!("palisade-cni {command}: {}", e.details);
            1
        }
    }
}

fn run_plugin(command: &str, stdin: &str) -> Result<Option<String>, CniError> {
    if command == "VERSION" {
        return Ok(Some(
            json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        ));
    }
    let conf: PluginConf = serde_json::from_str(stdin).map_err(|e| CniError {
        code: 6, // decoding failure
        msg: "cannot decode the network configuration".into(),
        details: e.to_string(),
    })?;
    if !conf.cni_version.is_empty() && !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError {
            code: 1, // incompatible CNI version
            msg: format!("unsupported cniVersion {}", conf.cni_version),
            details: format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        });
    }
    let pin_dir = conf
        .pin_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR));
    let state_dir = conf
        .state_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let container = env("CNI_CONTAINERID").unwrap_or_default();
    let ifname = env("CNI_IFNAME").unwrap_or_else(|| "eth0".into());
    match command {
        "ADD" => {
            let prev = conf.prev_result.clone().ok_or_else(|| CniError {
                code: 7, // invalid network config
                msg: "palisade-cni is a chained plugin: it needs a prevResult".into(),
                details: "list it after the plugin that creates the pod's interface".into(),
            })?;
            let netns = env("CNI_NETNS").unwrap_or_default();
            let args = env("CNI_ARGS").unwrap_or_default();
            let rec = add(
                &conf, &pin_dir, &state_dir, &container, &ifname, &netns, &args, &prev,
            )?;
            log(
                &state_dir,
                &format!(
                    "ADD {container} {}/{}: {} (ifindex {}, found by {}), {:?}, initial {:?}",
                    rec.namespace.as_deref().unwrap_or("?"),
                    rec.name.as_deref().unwrap_or("?"),
                    rec.host_ifname,
                    rec.host_ifindex,
                    rec.found_by,
                    rec.ips,
                    rec.initial_policy
                ),
            );
            let mut out = prev;
            if let Some(o) = out.as_object_mut() {
                o.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
            }
            Ok(Some(out.to_string()))
        }
        "DEL" => {
            del(&pin_dir, &state_dir, &container, &ifname);
            Ok(None)
        }
        "CHECK" => {
            let path = state_dir.join(Record::file_name(&container, &ifname));
            let rec: Record = fs::read_to_string(&path)
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok())
                .ok_or_else(|| anyhow!("no record {}", path.display()))?;
            if !pins::links_attached(&pin_dir, rec.host_ifindex) {
                return Err(anyhow!(
                    "the programs are not attached to {} (ifindex {})",
                    rec.host_ifname,
                    rec.host_ifindex
                )
                .into());
            }
            Ok(None)
        }
        "STATUS" => {
            for p in [TO_POD, FROM_POD] {
                let path = pins::program_pin_path(&pin_dir, p);
                if !path.exists() {
                    return Err(CniError {
                        code: 50, // plugin not available
                        msg: "the Palisade datapath is not loaded on this node".into(),
                        details: format!("{} is missing", path.display()),
                    });
                }
            }
            Ok(None)
        }
        "GC" => {
            gc(&pin_dir, &state_dir, stdin);
            Ok(None)
        }
        other => Err(CniError {
            code: 4, // invalid environment variables
            msg: format!("unknown CNI_COMMAND {other:?}"),
            details: String::new(),
        }),
    }
}

/// The addresses of the pod's interface in `prevResult`.
fn prev_ips(prev: &Value, ifname: &str) -> Vec<IpAddr> {
    let ifaces = prev
        .get("interfaces")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let pod_iface = ifaces.iter().position(|i| {
        i.get("name").and_then(Value::as_str) == Some(ifname)
            && i.get("sandbox")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
    });
    let mut out = Vec::new();
    for ip in prev
        .get("ips")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let (Some(want), Some(idx)) = (pod_iface, ip.get("interface").and_then(Value::as_u64))
            && idx as usize != want
        {
            continue;
        }
        let Some(addr) = ip.get("address").and_then(Value::as_str) else {
            continue;
        };
        let addr = addr.split('/').next().unwrap_or(addr);
        if let Ok(a) = addr.parse::<IpAddr>()
            && !out.contains(&a)
        {
            out.push(a);
        }
    }
    out
}

/// Host-side interfaces named in `prevResult` (no sandbox).
fn prev_host_ifaces(prev: &Value) -> Vec<String> {
    prev.get("interfaces")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter(|i| {
            i.get("sandbox")
                .and_then(Value::as_str)
                .is_none_or(str::is_empty)
        })
        .filter_map(|i| i.get("name").and_then(Value::as_str).map(String::from))
        .collect()
}

/// The host-side veth of the pod's interface, and how it was found.
fn host_veth(netns: &str, ifname: &str, prev: &Value) -> Result<(u32, String, &'static str)> {
    let mut host = netlink::Netlink::new()?;
    let mut why = Vec::new();
    if !netns.is_empty() {
        match netlink::link_in_netns(Path::new(netns), ifname) {
            Ok(pod_side) => match pod_side.link {
                Some(peer) => match host.link_by_index(peer) {
                    // The host side's own peer must be the pod's interface: a veth pair.
                    Ok(link) if link.link == Some(pod_side.index) => {
                        return Ok((link.index, link.name, "netns-peer"));
                    }
                    Ok(link) => why.push(format!(
                        "ifindex {peer} ({}) is not the peer of {ifname} in the pod",
                        link.name
                    )),
                    Err(e) => why.push(format!("host side: {e}")),
                },
                None => why.push(format!("{ifname} in the pod has no peer (not a veth)")),
            },
            Err(e) => why.push(e.to_string()),
        }
    }
    let veths: Vec<netlink::Link> = prev_host_ifaces(prev)
        .iter()
        .filter_map(|n| host.link_by_name(n).ok())
        .filter(|l| l.kind.as_deref() == Some("veth"))
        .collect();
    if let [only] = veths.as_slice() {
        return Ok((only.index, only.name.clone(), "prev-result"));
    }
    why.push(format!("prevResult names {} host-side veths", veths.len()));
    bail!("cannot find the pod's host-side veth: {}", why.join("; "))
}

#[allow(clippy::too_many_arguments)]
fn add(
    conf: &PluginConf,
    pin_dir: &Path,
    state_dir: &Path,
    container: &str,
    ifname: &str,
    netns: &str,
    args: &str,
    prev: &Value,
) -> Result<Record> {
    let started = unix_ms();
    let (host_ifindex, host_ifname, found_by) = host_veth(netns, ifname, prev)?;
    let ips = prev_ips(prev, ifname);
    let rec = Record {
        container_id: container.to_string(),
        ifname: ifname.to_string(),
        netns: netns.to_string(),
        namespace: cni_arg(args, "K8S_POD_NAMESPACE"),
        name: cni_arg(args, "K8S_POD_NAME"),
        host_ifindex,
        host_ifname,
        ips,
        found_by: found_by.to_string(),
        initial_policy: conf.initial_policy,
        added_at_unix_ms: started,
    };
    match provision(pin_dir, state_dir, &rec) {
        Ok(()) => {}
        Err(e) if conf.initial_policy == InitialPolicy::Allow => {
            log(
                state_dir,
                &format!("ADD {container}: datapath unavailable, passing unenforced: {e:#}"),
            );
            eprintln!("palisade-cni: datapath unavailable ({e:#}); initialPolicy allow: passing");
            return Ok(rec);
        }
        Err(e) => return Err(e.context("enforcing from the first packet (initialPolicy deny)")),
    }
    fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    let path = state_dir.join(Record::file_name(container, ifname));
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(&rec)?)?;
    fs::rename(&tmp, &path)?;
    notify(state_dir, "ADD");
    Ok(rec)
}

fn open_hash<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    name: &str,
) -> Result<HashMap<MapData, K, V>> {
    let path = pins::map_pin_path(pin_dir, name);
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening {} (is the agent running?)", path.display()))?;
    // Checks key and value sizes against the pinned map: a plugin of another version than
    // the datapath refuses rather than writes a wrong layout.
    HashMap::try_from(Map::HashMap(data)).with_context(|| format!("map {name}"))
}

/// Whether a record of this very pod interface (same container, same host interface) exists.
fn same_pod_recorded(state_dir: &Path, rec: &Record) -> bool {
    fs::read_to_string(state_dir.join(Record::file_name(&rec.container_id, &rec.ifname)))
        .ok()
        .and_then(|t| serde_json::from_str::<Record>(&t).ok())
        .is_some_and(|old| old.host_ifindex == rec.host_ifindex)
}

/// The provisional entry, then the programs.
fn provision(pin_dir: &Path, state_dir: &Path, rec: &Record) -> Result<()> {
    for p in [TO_POD, FROM_POD] {
        let path = pins::program_pin_path(pin_dir, p);
        if !path.exists() {
            return Err(DatapathNotLoaded(path.display().to_string()).into());
        }
    }
    let id = provisional_id(rec.host_ifindex);
    let mut endpoints: HashMap<MapData, u32, EndpointInfo> =
        open_hash(pin_dir, map_names::ENDPOINTS)?;
    let info = EndpointInfo {
        id,
        flags: match rec.initial_policy {
            InitialPolicy::Deny => EP_PENDING,
            InitialPolicy::Allow => 0,
        },
        revision: 0,
        _pad: 0,
    };
    const BPF_NOEXIST: u64 = 1;
    let mut wrote_entry = false;
    match endpoints.insert(rec.host_ifindex, info, BPF_NOEXIST) {
        Ok(()) => wrote_entry = true,
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
        {
            // A repeated ADD for this pod keeps what is there (its provisional entry, or the
            // agent's real one). Anything else is a leftover of an interface that had this
            // ifindex before: it must not police the new pod; the pod starts pending like any
            // other (the agent rewrites its entry when it sees the new record).
            if !same_pod_recorded(state_dir, rec) {
                endpoints
                    .insert(rec.host_ifindex, info, 0)
                    .map_err(|e| anyhow!("replacing a leftover ENDPOINTS entry: {e}"))?;
                wrote_entry = true;
            }
        }
        Err(e) => bail!("writing the provisional ENDPOINTS entry: {e}"),
    }
    if rec.initial_policy == InitialPolicy::Allow && wrote_entry {
        // Source address verification needs the pod's addresses.
        let mut addrs: HashMap<MapData, PeerAddr, u32> = open_hash(pin_dir, map_names::EP_ADDRS)?;
        for ip in &rec.ips {
            let _ = addrs.insert(PeerAddr::from_ip(*ip), id, BPF_NOEXIST);
        }
    }
    if let Err(e) = pins::attach_from_pins(pin_dir, rec.host_ifindex) {
        if wrote_entry {
            let _ = endpoints.remove(&rec.host_ifindex);
        }
        return Err(e.into());
    }
    Ok(())
}

fn del(pin_dir: &Path, state_dir: &Path, container: &str, ifname: &str) {
    let path = state_dir.join(Record::file_name(container, ifname));
    let Some(rec) = fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str::<Record>(&t).ok())
    else {
        return; // DEL must succeed when there is nothing to undo.
    };
    unprovision(pin_dir, &rec);
    let _ = fs::remove_file(&path);
    log(
        state_dir,
        &format!(
            "DEL {container}: {} (ifindex {})",
            rec.host_ifname, rec.host_ifindex
        ),
    );
    notify(state_dir, "DEL");
}

/// Removes what the plugin wrote and the agent has not taken over: provisional entries. The
/// links go with the veth (and their pins here); the agent removes its own entries when the
/// pod leaves its view.
fn unprovision(pin_dir: &Path, rec: &Record) {
    if let Ok(mut endpoints) = open_hash::<u32, EndpointInfo>(pin_dir, map_names::ENDPOINTS)
        && let Ok(info) = endpoints.get(&rec.host_ifindex, 0)
        && is_provisional(info.id)
    {
        let _ = endpoints.remove(&rec.host_ifindex);
        if let Ok(mut addrs) = open_hash::<PeerAddr, u32>(pin_dir, map_names::EP_ADDRS) {
            for ip in &rec.ips {
                if addrs.get(&PeerAddr::from_ip(*ip), 0).ok() == Some(info.id) {
                    let _ = addrs.remove(&PeerAddr::from_ip(*ip));
                }
            }
        }
    }
    if netlink::link_by_index(rec.host_ifindex).is_ok_and(|l| l.name == rec.host_ifname) {
        pins::remove_link_pins(pin_dir, rec.host_ifindex);
    }
}

/// CNI 1.1 GC: records of attachments the runtime no longer knows are undone.
fn gc(pin_dir: &Path, state_dir: &Path, stdin: &str) {
    let valid: BTreeSet<(String, String)> = serde_json::from_str::<Value>(stdin)
        .ok()
        .and_then(|v| v.get("cni.dev/valid-attachments").cloned())
        .and_then(|v| v.as_array().cloned())
        .into_iter()
        .flatten()
        .filter_map(|a| {
            Some((
                a.get("containerID")?.as_str()?.to_string(),
                a.get("ifname")?.as_str()?.to_string(),
            ))
        })
        .collect();
    let Ok(entries) = fs::read_dir(state_dir) else {
        return;
    };
    for e in entries.flatten() {
        let Some(rec) = fs::read_to_string(e.path())
            .ok()
            .and_then(|t| serde_json::from_str::<Record>(&t).ok())
        else {
            continue;
        };
        if !valid.contains(&(rec.container_id.clone(), rec.ifname.clone())) {
            unprovision(pin_dir, &rec);
            let _ = fs::remove_file(e.path());
        }
    }
}

fn notify(state_dir: &Path, what: &str) {
    if let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() {
        let _ = sock.send_to(what.as_bytes(), state_dir.join(NOTIFY_SOCKET));
    }
}

/// Appends to `<stateDir>/plugin.log` (kept under 1 MiB): the runtime's logs of plugin
/// output are often hard to find.
fn log(state_dir: &Path, line: &str) {
    let path = state_dir.join("plugin.log");
    if fs::metadata(&path).is_ok_and(|m| m.len() > 1 << 20) {
        let _ = fs::rename(&path, state_dir.join("plugin.log.1"));
    }
    if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(&path) {
        let _ = writeln!(f, "{} {line}", unix_ms());
    }
}

fn unix_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// Installation (the DaemonSet's init container)
// ---------------------------------------------------------------------------------------------

/// What `palisade cni-install` writes into the plugin's configuration entry.
#[derive(Clone, Debug)]
pub struct InstallOptions {
    /// Where the runtime finds plugins (`/opt/cni/bin`, mounted).
    pub bin_dir: PathBuf,
    /// The runtime's configuration directory (`/etc/cni/net.d`, mounted).
    pub conf_dir: PathBuf,
    pub pin_dir: PathBuf,
    pub state_dir: PathBuf,
    pub initial_policy: InitialPolicy,
    /// Remove the entry (and the binary) instead.
    pub uninstall: bool,
}

/// The configuration file the runtime uses: the first (by name) `.conflist`, `.conf` or
/// `.json` of the directory, as libcni picks it.
pub fn active_conf(conf_dir: &Path) -> Result<Option<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(conf_dir)
        .with_context(|| format!("reading {}", conf_dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|x| x == "conflist" || x == "conf" || x == "json")
        })
        .collect();
    files.sort();
    Ok(files.into_iter().next())
}

/// Appends (or updates) the `palisade-cni` entry of the active configuration list, converting
/// a single-plugin `.conf` to a list; copies this binary to `<bin_dir>/palisade-cni`.
/// Idempotent; every file is replaced by a rename, so the runtime never reads half a file.
pub fn install(opts: &InstallOptions) -> Result<String> {
    let plugin_bin = opts.bin_dir.join(PLUGIN_TYPE);
    let conf = active_conf(&opts.conf_dir)?
        .ok_or_else(|| anyhow!("no CNI configuration in {} yet", opts.conf_dir.display()))?;
    let text = fs::read_to_string(&conf).with_context(|| format!("reading {}", conf.display()))?;
    let mut v: Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", conf.display()))?;
    let is_list = v.get("plugins").is_some();
    if !is_list {
        let version = v.get("cniVersion").cloned().unwrap_or(json!("0.4.0"));
        let name = v.get("name").cloned().unwrap_or(json!("k8s-pod-network"));
        v = json!({"cniVersion": version, "name": name, "plugins": [v]});
    }
    let plugins = v
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| anyhow!("{}: plugins is not a list", conf.display()))?;
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    if !opts.uninstall {
        plugins.push(json!({
            "type": PLUGIN_TYPE,
            "pinDir": opts.pin_dir,
            "stateDir": opts.state_dir,
            "initialPolicy": opts.initial_policy,
        }));
    }
    let out_path = if is_list {
        conf.clone()
    } else {
        conf.with_extension("conflist")
    };
    if !opts.uninstall {
        fs::create_dir_all(&opts.bin_dir)?;
        let exe = std::env::current_exe().context("locating this binary")?;
        let tmp = opts.bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
        fs::copy(&exe, &tmp).with_context(|| format!("copying to {}", tmp.display()))?;
        fs::rename(&tmp, &plugin_bin)?;
    }
    let tmp = opts.conf_dir.join(".palisade-conflist.tmp");
    fs::write(&tmp, serde_json::to_vec_pretty(&v)?)?;
    fs::rename(&tmp, &out_path)?;
    if out_path != conf {
        // The .conflist sorts after the .conf it replaces; remove the .conf only now.
        fs::remove_file(&conf)?;
    }
    if opts.uninstall {
        let _ = fs::remove_file(&plugin_bin);
    }
    Ok(format!(
        "{} {} in {}",
        if opts.uninstall {
            "removed"
        } else {
            "installed"
        },
        PLUGIN_TYPE,
        out_path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTP_RESULT: &str = r#"{
      "cniVersion": "1.0.0",
      "interfaces": [
        {"name": "veth1a2b3c4d", "mac": "aa:bb:cc:00:00:01"},
        {"name": "eth0", "mac": "aa:bb:cc:00:00:02", "sandbox": "/var/run/netns/cni-1234"}
      ],
      "ips": [
        {"address": "10.244.1.7/24", "gateway": "10.244.1.1", "interface": 1},
        {"address": "fd00:244:1::7/64", "interface": 1},
        {"address": "192.0.2.1/32", "interface": 0}
      ],
      "routes": [{"dst": "0.0.0.0/0"}],
      "dns": {}
    }"#;

    #[test]
    fn prev_result_parsing() {
        let v: Value = serde_json::from_str(PTP_RESULT).unwrap();
        assert_eq!(
            prev_ips(&v, "eth0"),
            vec![
                "10.244.1.7".parse::<IpAddr>().unwrap(),
                "fd00:244:1::7".parse().unwrap()
            ]
        );
        assert_eq!(prev_host_ifaces(&v), vec!["veth1a2b3c4d".to_string()]);
        assert_eq!(
            cni_arg(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_UID=x",
                "K8S_POD_NAME"
            )
            .as_deref(),
            Some("web-0")
        );
        assert_eq!(cni_arg("K8S_POD_NAME=", "K8S_POD_NAME"), None);
    }

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
        let mut got: Vec<(String, u32)> =
            eps.into_iter().map(|e| (e.pod.name, e.ifindex)).collect();
        got.sort();
        assert_eq!(got, vec![("new".into(), 5), ("stale".into(), 6)]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn provisional_ids_never_meet_compiled_ones() {
        assert!(is_provisional(provisional_id(1)));
        assert!(is_provisional(provisional_id(u32::MAX)));
        assert!(!is_provisional(1_000_000));
        assert_eq!(provisional_id(7) & !PROVISIONAL_ID_BASE, 7);
    }

    #[test]
    fn version_and_errors() {
        assert!(
            run_plugin("VERSION", "")
                .unwrap()
                .unwrap()
                .contains("1.0.0")
        );
        let e = run_plugin("ADD", r#"{"cniVersion":"9.9.9","type":"palisade-cni"}"#)
            .err()
            .unwrap();
        assert_eq!(e.code, 1);
        let e = run_plugin("ADD", r#"{"cniVersion":"1.0.0","type":"palisade-cni"}"#)
            .err()
            .unwrap();
        assert!(e.msg.contains("chained"), "{}", e.msg);
        let e = run_plugin("ADD", "not json").err().unwrap();
        assert_eq!(e.code, 6);
    }

    #[test]
    fn install_appends_once_and_converts_a_conf() {
        let dir = std::env::temp_dir().join(format!("palisade-cni-install-{}", std::process::id()));
        let (conf, bin) = (dir.join("net.d"), dir.join("bin"));
        fs::create_dir_all(&conf).unwrap();
        fs::write(
            conf.join("10-ptp.conf"),
            r#"{"cniVersion":"1.0.0","name":"kind","type":"ptp","ipam":{"type":"host-local"}}"#,
        )
        .unwrap();
        fs::write(conf.join("99-other.conflist"), r#"{"plugins":[]}"#).unwrap();
        let opts = InstallOptions {
            bin_dir: bin.clone(),
            conf_dir: conf.clone(),
            pin_dir: "/sys/fs/bpf/palisade".into(),
            state_dir: "/run/palisade/cni".into(),
            initial_policy: InitialPolicy::Deny,
            uninstall: false,
        };
        install(&opts).unwrap();
        install(&opts).unwrap();
        assert!(!conf.join("10-ptp.conf").exists());
        let v: Value =
            serde_json::from_str(&fs::read_to_string(conf.join("10-ptp.conflist")).unwrap())
                .unwrap();
        let plugins = v["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 2, "{v}");
        assert_eq!(plugins[0]["type"], "ptp");
        assert_eq!(plugins[1]["type"], PLUGIN_TYPE);
        assert_eq!(plugins[1]["initialPolicy"], "deny");
        assert_eq!(v["name"], "kind");
        assert!(bin.join(PLUGIN_TYPE).exists());
        install(&InstallOptions {
            uninstall: true,
            ..opts
        })
        .unwrap();
        let v: Value =
            serde_json::from_str(&fs::read_to_string(conf.join("10-ptp.conflist")).unwrap())
                .unwrap();
        assert_eq!(v["plugins"].as_array().unwrap().len(), 1);
        assert!(!bin.join(PLUGIN_TYPE).exists());
        let _ = fs::remove_dir_all(&dir);
    }
}
