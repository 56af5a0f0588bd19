//! The plugin's side: `CNI_COMMAND` and the configuration on stdin in, a result or a CNI error
//! object out. Every failure is a [`CniError`] carrying the specification's code.
use std::collections::BTreeSet;
use std::fs;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aya::maps::{Array, HashMap, Map, MapData, MapError};
use palisade_common::{
    EP_MORE_ADDRS, EP_PENDING, EndpointInfo, EndpointSlot, PeerAddr, endpoint_slot, map_names,
};
use palisade_datapath::{FROM_POD, TO_POD, netlink, pins};
use serde::Deserialize;
use serde_json::{Value, json};

use super::error::chain;
use super::{
    CniError, DEFAULT_PIN_DIR, DEFAULT_STATE_DIR, InitialPolicy, NOTIFY_SOCKET, ProvisionError,
    Record, is_provisional, provisional_id,
};

pub(super) const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

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
    let read = if command == "VERSION" {
        Ok(0)
    } else {
        io::stdin().read_to_string(&mut stdin)
    };
    let version = serde_json::from_str::<Value>(&stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(Value::as_str)
                .map(String::from)
        })
        .unwrap_or_else(|| "1.0.0".to_string());
    let result = match read {
        Ok(_) => run_plugin(&command, &stdin),
        Err(e) => Err(CniError::Stdin(e)),
    };
    match result {
        Ok(Some(out)) => {
            println!("{out}");
            0
        }
        Ok(None) => 0,
        Err(e) => {
            println!("{}", error_object(&version, &e));
            eprintln!("palisade-cni {command}: {}", chain(&e));
            1
        }
    }
}

/// The CNI error object (`code`, `msg`, `details`).
fn error_object(version: &str, e: &CniError) -> Value {
    json!({
        "cniVersion": version,
        "code": e.code(),
        "msg": e.to_string(),
        "details": e.details(),
    })
}

fn run_plugin(command: &str, stdin: &str) -> Result<Option<String>, CniError> {
    if command == "VERSION" {
        return Ok(Some(
            json!({"cniVersion": "1.1.0", "supportedVersions": SUPPORTED_VERSIONS}).to_string(),
        ));
    }
    let conf: PluginConf = serde_json::from_str(stdin).map_err(CniError::Decode)?;
    if !conf.cni_version.is_empty() && !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::IncompatibleVersion {
            version: conf.cni_version,
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
            let prev = conf.prev_result.clone().ok_or(CniError::NoPrevResult)?;
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
            let rec = read_record(&state_dir.join(Record::file_name(&container, &ifname)))?;
            if !pins::links_attached(&pin_dir, rec.host_ifindex) {
                return Err(CniError::NotAttached {
                    host_ifname: rec.host_ifname,
                    host_ifindex: rec.host_ifindex,
                });
            }
            Ok(None)
        }
        "STATUS" => {
            for p in [TO_POD, FROM_POD] {
                let path = pins::program_pin_path(&pin_dir, p);
                if !path.exists() {
                    return Err(CniError::NotAvailable { path });
                }
            }
            Ok(None)
        }
        "GC" => {
            gc(&pin_dir, &state_dir, stdin);
            Ok(None)
        }
        other => Err(CniError::UnknownCommand(other.to_string())),
    }
}

/// The record of one pod interface, for CHECK: missing is "container unknown" (3).
fn read_record(path: &Path) -> Result<Record, CniError> {
    let text = fs::read_to_string(path).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound => CniError::NoRecord {
            path: path.to_path_buf(),
        },
        _ => CniError::ReadRecord {
            path: path.to_path_buf(),
            source,
        },
    })?;
    serde_json::from_str(&text).map_err(|source| CniError::BadRecord {
        path: path.to_path_buf(),
        source,
    })
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
fn host_veth(
    netns: &str,
    ifname: &str,
    prev: &Value,
) -> Result<(u32, String, &'static str), CniError> {
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
    Err(CniError::NoHostVeth {
        why: why.join("; "),
    })
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
) -> Result<Record, CniError> {
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
            let e = chain(&e);
            log(
                state_dir,
                &format!("ADD {container}: datapath unavailable, passing unenforced: {e}"),
            );
            eprintln!("palisade-cni: datapath unavailable ({e}); initialPolicy allow: passing");
            return Ok(rec);
        }
        Err(e) => return Err(CniError::NotEnforced(e)),
    }
    write_record(state_dir, &rec)?;
    notify(state_dir, "ADD");
    Ok(rec)
}

/// `<stateDir>/<container>-<ifname>.json`, written whole (a temporary file, then a rename).
fn write_record(state_dir: &Path, rec: &Record) -> Result<(), CniError> {
    let io = |doing: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| CniError::StateDir {
            doing,
            path,
            source,
        }
    };
    fs::create_dir_all(state_dir).map_err(io("creating", state_dir))?;
    let path = state_dir.join(Record::file_name(&rec.container_id, &rec.ifname));
    let tmp = path.with_extension("tmp");
    // A Record is strings, numbers and addresses: serialising it cannot fail.
    let body = serde_json::to_vec_pretty(rec).expect("a Record serialises");
    fs::write(&tmp, body).map_err(io("writing", &tmp))?;
    fs::rename(&tmp, &path).map_err(io("renaming into", &path))?;
    Ok(())
}

/// Clears the ENDPOINT_SLOTS slot tagged with `ifindex`, if there is one: the agent's copy of
/// the entry of an interface that had this ifindex before, which the programs would read
/// instead of the provisional entry in ENDPOINTS.
fn clear_endpoint_slot(pin_dir: &Path, ifindex: u32) -> Result<(), ProvisionError> {
    let map = map_names::ENDPOINT_SLOTS;
    let Ok(data) = MapData::from_pin(pins::map_pin_path(pin_dir, map)) else {
        // A datapath from before ENDPOINT_SLOTS: nothing to clear.
        return Ok(());
    };
    let mut slots: Array<MapData, EndpointSlot> = Array::try_from(Map::Array(data))
        .map_err(|source| ProvisionError::MapLayout { map, source })?;
    let index = endpoint_slot(ifindex);
    if slots.get(&index, 0).is_ok_and(|s| s.ifindex == ifindex) {
        slots
            .set(index, EndpointSlot::default(), 0)
            .map_err(|source| ProvisionError::WriteEntry {
                doing: "clearing a leftover ENDPOINT_SLOTS entry",
                source,
            })?;
    }
    Ok(())
}

fn open_hash<K: aya::Pod, V: aya::Pod>(
    pin_dir: &Path,
    map: &'static str,
) -> Result<HashMap<MapData, K, V>, ProvisionError> {
    let path = pins::map_pin_path(pin_dir, map);
    let data =
        MapData::from_pin(&path).map_err(|source| ProvisionError::OpenMap { path, source })?;
    // Checks key and value sizes against the pinned map: a plugin of another version than
    // the datapath refuses rather than writes a wrong layout.
    HashMap::try_from(Map::HashMap(data))
        .map_err(|source| ProvisionError::MapLayout { map, source })
}

/// Whether a record of this very pod interface (same container, same host interface) exists.
fn same_pod_recorded(state_dir: &Path, rec: &Record) -> bool {
    fs::read_to_string(state_dir.join(Record::file_name(&rec.container_id, &rec.ifname)))
        .ok()
        .and_then(|t| serde_json::from_str::<Record>(&t).ok())
        .is_some_and(|old| old.host_ifindex == rec.host_ifindex)
}

fn is_eexist(e: &MapError) -> bool {
    matches!(e, MapError::SyscallError(s) if s.io_error.raw_os_error() == Some(libc::EEXIST))
}

/// The provisional entry, then the programs.
fn provision(pin_dir: &Path, state_dir: &Path, rec: &Record) -> Result<(), ProvisionError> {
    for p in [TO_POD, FROM_POD] {
        let path = pins::program_pin_path(pin_dir, p);
        if !path.exists() {
            return Err(ProvisionError::NotLoaded { path });
        }
    }
    let id = provisional_id(rec.host_ifindex);
    let mut endpoints: HashMap<MapData, u32, EndpointInfo> =
        open_hash(pin_dir, map_names::ENDPOINTS)?;
    let info = EndpointInfo {
        id,
        // Under allow, the pod's addresses are those of EP_ADDRS that the plugin could claim
        // for it (never one another endpoint holds), so its source check looks there.
        flags: match rec.initial_policy {
            InitialPolicy::Deny => EP_PENDING,
            InitialPolicy::Allow => EP_MORE_ADDRS,
        },
        ..EndpointInfo::default()
    };
    const BPF_NOEXIST: u64 = 1;
    let mut wrote_entry = false;
    match endpoints.insert(rec.host_ifindex, info, BPF_NOEXIST) {
        Ok(()) => wrote_entry = true,
        Err(e) if is_eexist(&e) => {
            // A repeated ADD for this pod keeps what is there (its provisional entry, or the
            // agent's real one). Anything else is a leftover of an interface that had this
            // ifindex before: it must not police the new pod; the pod starts pending like any
            // other (the agent rewrites its entry when it sees the new record).
            if !same_pod_recorded(state_dir, rec) {
                endpoints
                    .insert(rec.host_ifindex, info, 0)
                    .map_err(|source| ProvisionError::WriteEntry {
                        doing: "replacing a leftover ENDPOINTS entry",
                        source,
                    })?;
                wrote_entry = true;
            }
        }
        Err(source) => {
            return Err(ProvisionError::WriteEntry {
                doing: "writing the provisional ENDPOINTS entry",
                source,
            });
        }
    }
    if wrote_entry && let Err(e) = clear_endpoint_slot(pin_dir, rec.host_ifindex) {
        let _ = endpoints.remove(&rec.host_ifindex);
        return Err(e);
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
    let Ok(rec) = read_record(&path) else {
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
        let Ok(rec) = read_record(&e.path()) else {
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
        assert_eq!(e.code(), 1);
        let e = run_plugin("ADD", r#"{"cniVersion":"1.0.0","type":"palisade-cni"}"#)
            .err()
            .unwrap();
        assert_eq!(e.code(), 7);
        assert!(e.to_string().contains("chained"), "{e}");
        let e = run_plugin("ADD", "not json").err().unwrap();
        assert_eq!(e.code(), 6);
        let e = run_plugin("FROB", r#"{"cniVersion":"1.0.0"}"#)
            .err()
            .unwrap();
        assert_eq!(e.code(), 4);
    }

    #[test]
    fn check_and_status_answer_with_their_codes() {
        let dir = std::env::temp_dir().join(format!("palisade-cni-check-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let conf = json!({
            "cniVersion": "1.1.0",
            "type": "palisade-cni",
            "pinDir": dir.join("pins"),
            "stateDir": dir.join("state"),
        })
        .to_string();
        // No record of the container: "unknown container" (3).
        let e = run_plugin("CHECK", &conf).err().unwrap();
        assert_eq!(e.code(), 3, "{e}");
        // A record that is not a record: "cannot decode" (6), naming the file.
        fs::create_dir_all(dir.join("state")).unwrap();
        let path = dir.join("state").join(Record::file_name("", "eth0"));
        fs::write(&path, "{").unwrap();
        let e = run_plugin("CHECK", &conf).err().unwrap();
        assert_eq!(e.code(), 6, "{e}");
        assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        // No pinned programs: STATUS says the plugin is not available (50).
        let e = run_plugin("STATUS", &conf).err().unwrap();
        assert_eq!(e.code(), 50, "{e}");
        let obj = error_object("1.1.0", &e);
        assert_eq!(obj["code"], 50);
        assert!(obj["details"].as_str().unwrap().contains("to_pod"), "{obj}");
        let _ = fs::remove_dir_all(&dir);
    }
}
