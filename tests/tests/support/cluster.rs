//! For the cluster-mode netns tests: the fake API server and the agent in cluster mode (from
//! `palisade_tests::fakeapi`, shared with the conformance runner and the multi-node rig), the
//! demo pods as the API reports them, and the CNI plugin invoked the way a runtime invokes it.

use std::io::Write;
use std::path::Path;
use std::process::Stdio;

use anyhow::{Result, bail};
#[allow(unused_imports)] // not every test uses all of them
pub use palisade_tests::fakeapi::{ClusterAgent, FakeApi, namespace, node_yaml};
use palisade_tests::rig::{Node, Pod};
use serde_json::{Value, json};

/// A pod of the rig as the API server reports it: on `node`, with its address unless
/// `with_ip` is false (the API before the CNI ADD has returned).
pub fn pod_yaml(pod: &Pod, node: &str, with_ip: bool) -> String {
    let name = pod.name.trim_start_matches("demo-");
    let status = if with_ip {
        let ip = pod.ip(false);
        format!("status: {{phase: Running, podIP: '{ip}', podIPs: [{{ip: '{ip}'}}]}}\n")
    } else {
        "status: {phase: Pending}\n".to_string()
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: demo, labels: {{app: {name}}}}}\n\
         spec: {{nodeName: {node}, containers: [{{name: c, ports: [{{name: web, containerPort: 80}}]}}]}}\n{status}"
    )
}

// ---------------------------------------------------------------------------------------------
// The CNI plugin, as a runtime runs it
// ---------------------------------------------------------------------------------------------

/// `prevResult` as the ptp plugin reports it for `pod`.
pub fn ptp_result(pod: &Pod) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [
            {"name": pod.host_ifname, "mac": "02:00:00:00:00:01"},
            {"name": "eth0", "mac": "02:00:00:00:00:02", "sandbox": pod.netns_path()},
        ],
        "ips": [{"address": format!("{}/32", pod.ip(false)), "gateway": "10.244.0.1", "interface": 1}],
        "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}],
        "dns": {}
    })
}

/// Runs `palisade-cni` (this binary under the plugin's name) with `command` for `pod` in the
/// node; the plugin's stdout.
pub fn run_cni(
    node: &Node,
    agent_bin: &Path,
    command: &str,
    pod: &Pod,
    pin_dir: &Path,
    state_dir: &Path,
    initial: &str,
) -> Result<String> {
    use std::os::unix::process::CommandExt;
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "rig",
        "type": "palisade-cni",
        "pinDir": pin_dir,
        "stateDir": state_dir,
        "initialPolicy": initial,
        "prevResult": ptp_result(pod),
    });
    let name = pod.name.trim_start_matches("demo-");
    let mut cmd = node.command(agent_bin);
    cmd.arg0("palisade-cni")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("ctr-{name}"))
        .env("CNI_NETNS", pod.netns_path())
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=demo;K8S_POD_NAME={name}"),
        )
        .env("CNI_PATH", "/opt/cni/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if !out.status.success() {
        bail!(
            "palisade-cni {command} failed ({}): {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(stdout)
}

/// The ENDPOINTS entry of `ifindex` in the pinned map: (id, flags).
pub fn endpoint_entry(pin_dir: &Path, ifindex: u32) -> Option<(u32, u32)> {
    use aya::maps::{HashMap, Map, MapData};
    let data = MapData::from_pin(pin_dir.join("maps/ENDPOINTS")).ok()?;
    let m: HashMap<MapData, u32, palisade_common::EndpointInfo> =
        HashMap::try_from(Map::HashMap(data)).ok()?;
    m.get(&ifindex, 0).ok().map(|e| (e.id, e.flags))
}
