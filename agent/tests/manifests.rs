//! Every deployment manifest (`manifests/`) parses into its k8s-openapi type with no field
//! lost (a misspelt field would be silently ignored by the API server's older versions and by
//! kubectl's client-side apply, so a round trip must give back exactly what was written), the
//! DaemonSet has what the agent needs, RBAC grants only reads, the commands parse with the
//! real binary, and the example policies validate in the real model. The roles of
//! `kubectl palisade`'s users (`kubectl-plugin-role.yaml`) grant exec in palisade-system and
//! reading one pod elsewhere, nothing more, and the plugin looks for the DaemonSet's pods as
//! the DaemonSet labels them.
use std::path::{Path, PathBuf};

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use serde::de::DeserializeOwned;
use serde_json::Value;

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// (file, document) of every YAML file in `dir` and its subdirectories.
fn documents(dir: &Path) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for path in files {
        if path.is_dir() {
            out.extend(documents(&path));
            continue;
        }
        if path.extension().is_none_or(|x| x != "yaml" && x != "yml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let docs = palisade_policy::manifest::yaml_documents(&text)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        for v in docs {
            if !v.is_null() {
                out.push((path.display().to_string(), v));
            }
        }
    }
    out
}

/// Deserializes into `T` and back: what comes back must be what was written.
fn typed<T: DeserializeOwned + serde::Serialize>(file: &str, v: &Value) -> T {
    let t: T =
        serde_path_to_error::deserialize(v).unwrap_or_else(|e| panic!("{file}: {}: {e}", e.path()));
    let back = strip_empty(serde_json::to_value(&t).unwrap());
    if let Some(path) = first_difference(&strip_empty(v.clone()), &back, String::new()) {
        panic!(
            "{file}: {path} did not survive the round trip through {} (a misspelt or misplaced \
             field?)",
            std::any::type_name::<T>()
        );
    }
    t
}

/// Where `written` and `parsed` first differ.
fn first_difference(written: &Value, parsed: &Value, at: String) -> Option<String> {
    match (written, parsed) {
        (Value::Object(a), Value::Object(b)) => a
            .iter()
            .find_map(|(k, v)| match b.get(k) {
                None => Some(format!("{at}.{k}")),
                Some(w) => first_difference(v, w, format!("{at}.{k}")),
            })
            .or_else(|| {
                b.keys()
                    .find(|k| !a.contains_key(*k))
                    .map(|k| format!("{at}.{k} (added)"))
            }),
        (Value::Array(a), Value::Array(b)) if a.len() == b.len() => a
            .iter()
            .zip(b)
            .enumerate()
            .find_map(|(i, (x, y))| first_difference(x, y, format!("{at}[{i}]"))),
        (a, b) if a == b => None,
        _ => Some(at),
    }
}

/// `{}` and `[]` that serialization may drop or keep.
fn strip_empty(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (k, strip_empty(v)))
                .filter(|(_, v)| !v.is_null())
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(strip_empty).collect()),
        other => other,
    }
}

#[test]
fn every_manifest_parses_into_its_type() {
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    let mut policies = Vec::new();
    for (file, v) in documents(&manifests_dir()) {
        let kind = v["kind"].as_str().unwrap_or_default().to_string();
        match kind.as_str() {
            "Namespace" => drop(typed::<Namespace>(&file, &v)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(&file, &v)),
            "ClusterRole" => drop(typed::<ClusterRole>(&file, &v)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(&file, &v)),
            "Role" => drop(typed::<Role>(&file, &v)),
            "RoleBinding" => drop(typed::<RoleBinding>(&file, &v)),
            "DaemonSet" => drop(typed::<DaemonSet>(&file, &v)),
            "NetworkPolicy" => policies.push(typed::<NetworkPolicy>(&file, &v)),
            "ClusterNetworkPolicy" => {
                let raw = typed::<palisade_policy::cnp::raw::ClusterNetworkPolicy>(&file, &v);
                palisade_policy::cnp::ClusterNetworkPolicy::from_raw(&raw)
                    .unwrap_or_else(|e| panic!("{file}: {e}"));
            }
            "Pod" => drop(typed::<k8s_openapi::api::core::v1::Pod>(&file, &v)),
            "CustomResourceDefinition" => {
                use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
                let crd = typed::<CustomResourceDefinition>(&file, &v);
                // The resource the cluster-mode watch reads.
                use palisade::source::kube::{EGW_GROUP, EGW_PLURAL, EGW_VERSION};
                assert_eq!(crd.spec.group, EGW_GROUP, "{file}");
                assert_eq!(crd.spec.names.plural, EGW_PLURAL, "{file}");
                assert_eq!(crd.spec.names.kind, "EgressGateway", "{file}");
                assert_eq!(crd.spec.scope, "Cluster", "{file}");
                assert!(
                    crd.spec
                        .versions
                        .iter()
                        .any(|v| v.name == EGW_VERSION && v.served),
                    "{file}"
                );
            }
            "EgressGateway" => {
                let raw = typed::<palisade_policy::model::egress::RawEgressGateway>(&file, &v);
                palisade_policy::model::egress::EgressGateway::from_raw(&raw)
                    .unwrap_or_else(|e| panic!("{file}: {e}"));
            }
            "Kustomization" => {
                for r in v["resources"].as_array().unwrap() {
                    let p = manifests_dir().join(r.as_str().unwrap());
                    assert!(p.exists(), "{file}: resource {} is missing", p.display());
                }
            }
            other => panic!("{file}: unexpected kind {other:?}"),
        }
        *kinds.entry(kind).or_default() += 1;
    }
    for k in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
        "Kustomization",
        "NetworkPolicy",
        "ClusterNetworkPolicy",
        "CustomResourceDefinition",
        "EgressGateway",
    ] {
        assert!(
            kinds.contains_key(k),
            "no {k} among the manifests: {kinds:?}"
        );
    }
    let mut store = palisade_policy::model::Store::default();
    for p in &policies {
        store
            .apply(palisade_policy::model::Object::NetworkPolicy(Box::new(
                p.clone(),
            )))
            .unwrap_or_else(|e| panic!("example policy: {e}"));
    }
}

fn load<T: DeserializeOwned + serde::Serialize>(name: &str, kind: &str) -> T {
    let (file, v) = documents(&manifests_dir())
        .into_iter()
        .find(|(f, v)| f.ends_with(name) && v["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} in {name}"));
    typed(&file, &v)
}

#[test]
fn rbac_only_reads_what_policy_needs() {
    // One ClusterRole in all of manifests/ besides the plugin users' (no other file grants
    // more), aggregating nothing.
    let roles: Vec<String> = documents(&manifests_dir())
        .into_iter()
        .filter(|(f, v)| v["kind"] == "ClusterRole" && !f.ends_with(PLUGIN_ROLES))
        .map(|(f, _)| f)
        .collect();
    assert_eq!(roles.len(), 1, "ClusterRoles in manifests/: {roles:?}");
    let role: ClusterRole = load("rbac.yaml", "ClusterRole");
    assert!(role.aggregation_rule.is_none(), "aggregates other roles");
    let mut granted = std::collections::BTreeSet::new();
    for rule in role.rules.unwrap() {
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        assert_eq!(verbs, ["get", "list", "watch"], "read-only");
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for g in rule.api_groups.unwrap() {
            for r in rule.resources.clone().unwrap() {
                granted.insert(format!("{g}/{r}"));
            }
        }
    }
    // Exactly what the cluster-mode source watches.
    let want: std::collections::BTreeSet<String> = palisade::source::kube::Watch::ALL
        .iter()
        .map(|w| format!("{}/{}", w.api_group(), w.as_str()))
        .collect();
    assert!(
        want.contains("/nodes") && want.contains("policy.networking.k8s.io/clusternetworkpolicies")
    );
    assert_eq!(granted, want);
    let binding: ClusterRoleBinding = load("rbac.yaml", "ClusterRoleBinding");
    let sa: ServiceAccount = load("serviceaccount.yaml", "ServiceAccount");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    // Bound to the agent's service account only, not to a group of users.
    let subjects = binding.subjects.unwrap();
    assert_eq!(subjects.len(), 1, "{subjects:?}");
    let subject = &subjects[0];
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    assert_eq!(subject.namespace, sa.metadata.namespace);
}

/// The roles of `kubectl palisade`'s users.
const PLUGIN_ROLES: &str = "kubectl-plugin-role.yaml";

/// (api group/resource, verbs sorted) of every rule.
fn grants(rules: Vec<k8s_openapi::api::rbac::v1::PolicyRule>) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    for rule in rules {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        let mut verbs = rule.verbs.clone();
        verbs.sort();
        for g in rule.api_groups.unwrap() {
            for r in rule.resources.clone().unwrap() {
                out.push((format!("{g}/{r}"), verbs.clone()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn the_plugins_users_may_exec_into_the_agents_and_read_pods_nothing_more() {
    let role: Role = load(PLUGIN_ROLES, "Role");
    assert_eq!(
        role.metadata.namespace.as_deref(),
        Some(palisade::kubectl::PALISADE_NAMESPACE),
        "exec in the Palisade namespace only"
    );
    assert_eq!(
        grants(role.rules.unwrap()),
        [
            ("/pods".to_string(), vec!["get".to_string(), "list".into()]),
            (
                "/pods/exec".to_string(),
                vec!["create".to_string(), "get".into()]
            ),
        ]
    );
    let lookup: ClusterRole = load(PLUGIN_ROLES, "ClusterRole");
    assert!(lookup.aggregation_rule.is_none());
    assert_eq!(
        grants(lookup.rules.unwrap()),
        [("/pods".to_string(), vec!["get".to_string()])],
        "reading one pod (its node), not listing"
    );
    let binding: RoleBinding = load(PLUGIN_ROLES, "RoleBinding");
    assert_eq!(binding.role_ref.name, role.metadata.name.unwrap());
    assert_eq!(binding.metadata.namespace, role.metadata.namespace);
    let binding: ClusterRoleBinding = load(PLUGIN_ROLES, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, lookup.metadata.name.unwrap());
    // Not deployed with the agent: bound on purpose, to people.
    let kustomization = documents(&manifests_dir())
        .into_iter()
        .find(|(_, v)| v["kind"] == "Kustomization")
        .unwrap()
        .1;
    assert!(
        !kustomization["resources"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == PLUGIN_ROLES)
    );
}

#[test]
fn the_plugin_finds_the_daemonsets_pods_and_their_agent_container() {
    let ds: DaemonSet = load("daemonset.yaml", "DaemonSet");
    assert_eq!(
        ds.metadata.namespace.as_deref(),
        Some(palisade::kubectl::PALISADE_NAMESPACE)
    );
    let labels = ds.spec.template.metadata.unwrap().labels.unwrap();
    for term in palisade::kubectl::AGENT_SELECTOR.split(',') {
        let (k, v) = term.split_once('=').unwrap();
        assert_eq!(labels.get(k).map(String::as_str), Some(v), "{term}");
    }
    let pod = ds.spec.template.spec.unwrap();
    assert_eq!(pod.containers[0].name, palisade::kubectl::AGENT_CONTAINER);
    assert_eq!(
        pod.containers[0].command.as_deref(),
        Some(&[palisade::kubectl::REMOTE_BINARY.to_string()][..]),
        "the binary the plugin runs in the container"
    );
}

#[test]
fn daemonset_has_what_the_agent_needs() {
    let ds: DaemonSet = load("daemonset.yaml", "DaemonSet");
    let spec = ds.spec;
    let update = spec.update_strategy.unwrap();
    assert_eq!(update.type_.as_deref(), Some("RollingUpdate"));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("palisade"));
    assert!(
        pod.tolerations
            .unwrap()
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "tolerates every taint"
    );
    let agent = &pod.containers[0];
    let sc = agent.security_context.clone().unwrap();
    assert_ne!(sc.privileged, Some(true), "capabilities, not privileged");
    let caps = sc.capabilities.unwrap();
    let mut added = caps.add.unwrap();
    added.sort();
    assert_eq!(added, ["BPF", "NET_ADMIN", "PERFMON", "SYS_RESOURCE"]);
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    let env = agent.env.clone().unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").unwrap();
    assert_eq!(
        node.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "spec.nodeName"
    );
    let args = agent.args.clone().unwrap();
    let admin = args
        .iter()
        .find_map(|a| a.strip_prefix("--admin-addr="))
        .unwrap();
    let port: i32 = admin.rsplit(':').next().unwrap().parse().unwrap();
    for (probe, path) in [
        (agent.liveness_probe.clone().unwrap(), "/healthz"),
        (agent.readiness_probe.clone().unwrap(), "/readyz"),
    ] {
        let get = probe.http_get.unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port)
        );
    }
    // The same port serves the metrics: declared, and where the scrape annotations point.
    let ports = agent.ports.clone().unwrap();
    assert!(ports.iter().any(|p| p.container_port == port), "{ports:?}");
    let annotations = spec.template.metadata.unwrap().annotations.unwrap();
    assert_eq!(annotations["prometheus.io/port"], port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let requests = agent.resources.clone().unwrap().requests.unwrap();
    assert!(requests.contains_key("cpu") && requests.contains_key("memory"));
    let mounts: Vec<String> = agent
        .volume_mounts
        .clone()
        .unwrap()
        .iter()
        .map(|m| m.mount_path.clone())
        .collect();
    assert!(mounts.contains(&"/sys/fs/bpf".to_string()));
    assert!(
        args.iter().any(|a| a == "--pin-dir=/sys/fs/bpf/palisade"),
        "pins on the host's bpffs"
    );
    let host_paths: Vec<String> = pod
        .volumes
        .unwrap()
        .iter()
        .filter_map(|v| v.host_path.as_ref().map(|h| h.path.clone()))
        .collect();
    for p in [
        "/sys/fs/bpf",
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/run/palisade",
    ] {
        assert!(host_paths.contains(&p.to_string()), "hostPath {p}");
    }
    let init = &pod.init_containers.unwrap()[0];
    assert_eq!(init.command.as_ref().unwrap()[1], "cni-install");
}

/// The DaemonSet's commands, run by the real binary: the init container's for real (against
/// temporary directories), the agent's up to where it needs the API server.
#[test]
fn daemonset_commands_parse() {
    let ds: DaemonSet = load("daemonset.yaml", "DaemonSet");
    let pod = ds.spec.template.spec.unwrap();
    let bin = env!("CARGO_BIN_EXE_palisade");
    let tmp = std::env::temp_dir().join(format!("palisade-manifests-{}", std::process::id()));
    let (bin_dir, conf_dir) = (tmp.join("bin"), tmp.join("net.d"));
    std::fs::create_dir_all(&conf_dir).unwrap();
    std::fs::write(
        conf_dir.join("10-kindnet.conflist"),
        r#"{"cniVersion": "0.3.1", "name": "kindnet", "plugins": [{"type": "ptp", "ipam": {"type": "host-local"}}, {"type": "portmap", "capabilities": {"portMappings": true}}]}"#,
    )
    .unwrap();
    let init = &pod.init_containers.unwrap()[0];
    let args: Vec<String> = init.command.as_ref().unwrap()[1..]
        .iter()
        .map(|a| {
            a.replace("/host/opt/cni/bin", bin_dir.to_str().unwrap())
                .replace("/host/etc/cni/net.d", conf_dir.to_str().unwrap())
        })
        .collect();
    let out = std::process::Command::new(bin)
        .args(&args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conf: Value = serde_json::from_str(
        &std::fs::read_to_string(conf_dir.join("10-kindnet.conflist")).unwrap(),
    )
    .unwrap();
    let plugins = conf["plugins"].as_array().unwrap();
    assert_eq!(plugins.len(), 3);
    assert_eq!(plugins[2]["type"], "palisade-cni");
    assert_eq!(plugins[2]["pinDir"], "/sys/fs/bpf/palisade");
    assert!(bin_dir.join("palisade-cni").exists());

    let agent = &pod.containers[0];
    let mut argv = agent.args.clone().unwrap();
    // Everything the DaemonSet passes must parse; the run stops at the missing kubeconfig.
    argv.push(format!("--kubeconfig={}", tmp.join("none").display()));
    argv.retain(|a| !a.starts_with("--admin-addr"));
    argv.push("--admin-addr=off".into());
    let out = std::process::Command::new(bin)
        .args(&argv)
        .env("NODE_NAME", "node-1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(2), "usage error: {stderr}");
    assert!(stderr.contains("kubeconfig"), "{stderr}");
    let _ = std::fs::remove_dir_all(&tmp);
}
