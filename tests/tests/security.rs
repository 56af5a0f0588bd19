//! Security properties: the ClusterRole is least-privilege (read-only, on what the agent reads);
//! the control socket and the state beside it are root-only while the CLI's read commands need
//! nothing more than them; nothing secret reaches the log, the status or the state file.
//! The rig tests need root; under CI=true a missing privilege or ClusterRole is a failure.
mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

use palisade_tests::rig::require_root;
use serde_json::Value;
use support::{B_POLICY, C_POLICY, Setup};

fn ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Every document of every `manifests/*.yaml` (not the examples).
fn deployment_documents() -> Vec<(PathBuf, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return out;
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: serde_yaml::Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            let v: Value = serde_json::to_value(v).unwrap();
            if !v.is_null() {
                out.push((f.clone(), v));
            }
        }
    }
    out
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    v.get(key)
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// What the agent may do: read pods, namespaces, nodes, network policies, services and
/// endpoint slices (Service VIPs in egress policy), and record events. Nothing else: no
/// secrets, no writes to policy or workloads, no wildcards.
fn allowed(group: &str, resource: &str, verb: &str) -> bool {
    let read = matches!(verb, "get" | "list" | "watch");
    match (group, resource) {
        ("", "pods" | "namespaces" | "nodes" | "services") => read,
        ("networking.k8s.io", "networkpolicies") => read,
        ("discovery.k8s.io", "endpointslices") => read,
        ("" | "events.k8s.io", "events") => matches!(verb, "create" | "patch" | "update"),
        _ => false,
    }
}

#[test]
fn cluster_role_is_least_privilege() {
    let docs = deployment_documents();
    let roles: Vec<&(PathBuf, Value)> = docs
        .iter()
        .filter(|(_, d)| d.get("kind").and_then(Value::as_str) == Some("ClusterRole"))
        .collect();
    if roles.is_empty() {
        assert!(
            !ci(),
            "no ClusterRole in manifests/*.yaml (the deployment manifests must define one)"
        );
        eprintln!("skipping: no ClusterRole in manifests/*.yaml yet");
        return;
    }
    let mut granted = Vec::new();
    for (file, role) in &roles {
        let name = role["metadata"]["name"].as_str().unwrap_or("?");
        assert!(
            role.get("aggregationRule").is_none(),
            "{}: ClusterRole {name} aggregates other roles",
            file.display()
        );
        for (i, rule) in role["rules"].as_array().into_iter().flatten().enumerate() {
            let at = format!("{}: ClusterRole {name} rules[{i}]", file.display());
            assert!(
                rule.get("nonResourceURLs").is_none(),
                "{at}: nonResourceURLs"
            );
            let groups = strings(rule, "apiGroups");
            let resources = strings(rule, "resources");
            let verbs = strings(rule, "verbs");
            assert!(
                !groups.is_empty() && !resources.is_empty() && !verbs.is_empty(),
                "{at}"
            );
            for g in &groups {
                for r in &resources {
                    for v in &verbs {
                        assert!(
                            allowed(g, r, v),
                            "{at}: grants {v:?} on {r:?} in group {g:?}, which the agent does not need"
                        );
                        granted.push((g.clone(), r.clone(), v.clone()));
                    }
                }
            }
        }
    }
    // And what it needs is there (list + watch, as an informer does).
    for (g, r) in [
        ("", "pods"),
        ("", "namespaces"),
        ("networking.k8s.io", "networkpolicies"),
    ] {
        for v in ["list", "watch"] {
            assert!(
                granted.iter().any(|x| x.0 == g && x.1 == r && x.2 == v),
                "the ClusterRole does not grant {v} on {r} (group {g:?})"
            );
        }
    }
    // Bound to a service account, not to a group of users.
    for (file, b) in docs
        .iter()
        .filter(|(_, d)| d.get("kind").and_then(Value::as_str) == Some("ClusterRoleBinding"))
    {
        for s in b["subjects"].as_array().into_iter().flatten() {
            assert_eq!(
                s["kind"].as_str(),
                Some("ServiceAccount"),
                "{}: ClusterRoleBinding subject {s}",
                file.display()
            );
        }
    }
}

const SECRET: &str = "s3cr3t-t0k3n-6f1d2c9a8b7e";

#[test]
fn control_socket_is_root_only_and_nothing_secret_is_logged() {
    if !require_root() {
        return;
    }
    // Secrets and token-like values where the agent reads: a Secret (a kind it ignores), a pod
    // with the value in an env var, an annotation and a label-sized place, and a policy
    // annotation.
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: creds, namespace: demo}}\n\
         stringData: {{token: {SECRET}}}\ndata: {{password: czNjcjN0}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: leaky, namespace: demo,\n\
         \x20 annotations: {{api-token: {SECRET}}}}}\n\
         spec: {{containers: [{{name: c, env: [{{name: TOKEN, value: {SECRET}}}]}}]}}\n\
         ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: annotated, namespace: demo,\n\
         \x20 annotations: {{note: {SECRET}}}}}\nspec: {{podSelector: {{matchLabels: {{app: nothing}}}}}}\n"
    );
    let s = Setup::new(
        "security",
        &[
            ("policies.yaml", B_POLICY),
            ("c.yaml", C_POLICY),
            ("secret.yaml", &secret),
        ],
    );

    // The socket: a root-owned 0700 directory, a 0600 socket, a 0600 state file.
    let socket = s.agent.socket().to_path_buf();
    let dir = socket.parent().unwrap();
    let dmeta = std::fs::metadata(dir).expect("socket directory");
    assert_eq!(dmeta.uid(), 0);
    assert_eq!(
        dmeta.permissions().mode() & 0o077,
        0,
        "socket directory is private"
    );
    let smeta = std::fs::metadata(&socket).expect("socket");
    assert_eq!(smeta.uid(), 0);
    assert_eq!(smeta.permissions().mode() & 0o077, 0, "socket is private");
    let mut states = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = e.metadata().unwrap();
        if meta.is_file() {
            assert_eq!(
                meta.permissions().mode() & 0o077,
                0,
                "{} is private",
                e.path().display()
            );
            states.push(std::fs::read_to_string(e.path()).unwrap_or_default());
        }
    }

    // Read commands work with the socket and nothing else (root, no extra privilege needed)
    // and fail for anyone else.
    for cmd in [
        &["stats"][..],
        &["verdicts"],
        &["policy", "show", "demo/b"],
        &[
            "explain", "--from", "demo/c", "--to", "demo/b", "--port", "80",
        ],
    ] {
        let out = s.agent.cli(cmd).output().expect("run the CLI");
        assert!(
            out.status.success(),
            "palisade {cmd:?} as root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = s
            .agent
            .cli(cmd)
            .uid(65534)
            .gid(65534)
            .output()
            .expect("run the CLI");
        assert!(
            !out.status.success(),
            "palisade {cmd:?} as nobody must be refused: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }

    // Nothing secret anywhere the agent writes.
    let log = s.log();
    let status = std::fs::read_to_string(s.work.path().join("status.json")).unwrap();
    for (what, text) in [("log", &log), ("status", &status)]
        .into_iter()
        .chain(states.iter().map(|t| ("state file", t)))
    {
        assert!(!text.contains(SECRET), "the {what} contains the secret");
        assert!(
            !text.contains("czNjcjN0"),
            "the {what} contains secret data"
        );
    }
    assert!(
        log.contains("Secret demo/creds"),
        "the ignored Secret is named (not shown) in the log"
    );
}
