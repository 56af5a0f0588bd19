//! Security properties: the control socket and the state beside it are root-only while the
//! CLI's read commands need nothing more than them; nothing secret reaches the log, the status
//! or the state file. (That the ClusterRole is least-privilege is checked with the other
//! manifests, `agent/tests/manifests.rs`.) Needs root; under CI=true that is a failure, not a
//! skip.
mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use palisade_tests::{agent::cli_answered, rig::require_root};
use support::{B_POLICY, C_POLICY, Setup};

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
            cli_answered(cmd, out.status),
            "palisade {cmd:?} as root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = s.agent.cli_as_nobody(cmd).output().expect("run the CLI");
        let failed = if cmd[0] == "explain" {
            palisade::cli::EXPLAIN_ERROR
        } else {
            palisade::cli::EXIT_FAILURE
        };
        assert_eq!(
            out.status.code(),
            Some(failed.into()),
            "palisade {cmd:?} as nobody must be refused (an error, not an answer): {}",
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
