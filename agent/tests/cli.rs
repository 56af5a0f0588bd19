//! The `palisade` binary's conventions that need no agent: `version` in every format, exit
//! statuses and messages for bad arguments and a missing agent, `explain --help` documenting
//! its exit statuses, completions and man pages generated from the clap definitions. (With a
//! running agent: `tests/tests/cli.rs`.)
use std::{path::Path, process::Command};

use palisade::cli::{EXIT_FAILURE, EXIT_USAGE, EXPLAIN_ERROR};
use serde_json::Value;

fn palisade(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_palisade"))
        .args(args)
        // No agent here: a socket (and state file) that does not exist.
        .args(["--socket", "/nonexistent/palisade-test/palisade.sock"])
        .env_remove("PALISADE_SOCKET")
        .output()
        .expect("run palisade")
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn version_reports_the_build_and_the_running_kernel_in_every_format() {
    let json = palisade(&["version", "-o", "json"]);
    assert!(json.status.success(), "{}", stderr(&json));
    let v: Value = serde_json::from_slice(&json.stdout).expect("version -o json is JSON");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let commit = v["git_commit"].as_str().unwrap();
    assert!(
        commit == "unknown"
            || (commit.len() == 40 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "a full commit id: {commit}"
    );
    let date = v["build_date"].as_str().unwrap();
    assert!(
        date.len() == 20 && date.starts_with("20") && date.ends_with('Z'),
        "RFC 3339: {date}"
    );
    // The running kernel, detected now.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(v["kernel"]["release"], release.trim());
    let (major, minor) = {
        let mut it = release.split(|c: char| !c.is_ascii_digit());
        let n = |s: Option<&str>| s.and_then(|s| s.parse::<u32>().ok()).unwrap();
        (n(it.next()), n(it.next()))
    };
    assert_eq!(v["kernel"]["tcx"], (major, minor) >= (6, 6), "{v}");
    assert_eq!(
        v["kernel"]["btf"],
        Path::new("/sys/kernel/btf/vmlinux").exists()
    );

    let yaml = palisade(&["version", "-o", "yaml"]);
    assert!(yaml.status.success());
    let from_yaml: Value = serde_saphyr::from_str(&stdout(&yaml)).expect("version -o yaml is YAML");
    assert_eq!(from_yaml, v, "the same answer in YAML and JSON");

    let table = stdout(&palisade(&["version"]));
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines[0], format!("palisade {}", env!("CARGO_PKG_VERSION")));
    assert_eq!(lines[1], format!("git commit:  {commit}"));
    assert_eq!(lines[2], format!("built:       {date}"));
    assert_eq!(lines[3], format!("kernel:      {}", release.trim()));
    let yes = |b: &Value| if b.as_bool().unwrap() { "yes" } else { "no" };
    assert!(
        lines[4].starts_with(&format!("TCX:         {} ", yes(&v["kernel"]["tcx"]))),
        "{table}"
    );
    assert!(
        lines[5].starts_with(&format!("BTF:         {} ", yes(&v["kernel"]["btf"]))),
        "{table}"
    );
}

#[test]
fn bad_arguments_exit_2_with_what_was_wrong() {
    for (args, says) in [
        (
            &["verdicts", "-o", "xml"][..],
            "possible values: table, wide, json, yaml",
        ),
        (
            &["verdicts", "--verdict", "maybe"],
            "allowed, dropped or would-drop",
        ),
        (&["verdicts", "--since", "5x"], "bad unit"),
        (
            &["explain", "--from", "nopod", "--to", "a/b"],
            "neither NAMESPACE/POD nor an IP address",
        ),
        (&["explain", "--to", "a/b"], "--from"),
        (&["policy", "show"], "<NS/POD>"),
        (&["nosuchcommand"], "unrecognized subcommand"),
    ] {
        let o = palisade(args);
        assert_eq!(
            o.status.code(),
            Some(EXIT_USAGE.into()),
            "palisade {args:?}: {}",
            stderr(&o)
        );
        assert!(
            stderr(&o).contains(says),
            "palisade {args:?} should say {says:?}: {}",
            stderr(&o)
        );
        assert!(stdout(&o).is_empty(), "nothing on stdout for {args:?}");
    }
}

#[test]
fn without_an_agent_read_commands_fail_and_say_so() {
    for (args, status) in [
        // explain's 1 would mean "dropped": its errors exit with 2.
        (
            &["explain", "--from", "a/x", "--to", "b/y", "--port", "80"][..],
            EXPLAIN_ERROR,
        ),
        (&["policy", "show", "a/x"], EXIT_FAILURE),
        (&["verdicts"], EXIT_FAILURE),
        (&["stats", "-o", "yaml"], EXIT_FAILURE),
    ] {
        let o = palisade(args);
        assert_eq!(
            o.status.code(),
            Some(status.into()),
            "palisade {args:?}: {}",
            stderr(&o)
        );
        assert!(
            stderr(&o).contains("/nonexistent/palisade-test/"),
            "the error names the path it tried: {}",
            stderr(&o)
        );
    }
}

#[test]
fn explain_help_documents_its_exit_statuses() {
    let o = palisade(&["explain", "--help"]);
    assert!(o.status.success());
    let help = stdout(&o);
    assert!(help.contains("Exit status:"), "{help}");
    for line in ["  0  allowed", "  1  dropped", "  2  error"] {
        assert!(help.contains(line), "{line:?} in {help}");
    }
}

#[test]
fn completions_and_man_pages_come_from_the_clap_definitions() {
    let o = palisade(&["completion", "bash"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let bash = stdout(&o);
    for word in [
        "verdicts",
        "explain",
        "--from-pod",
        "--output",
        "wide",
        "yaml",
    ] {
        assert!(bash.contains(word), "bash completion knows {word}");
    }

    let dir = std::env::temp_dir().join(format!("palisade-docs-{}", std::process::id()));
    let o = palisade(&["generate-docs", "--out", dir.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let listed: Vec<String> = stdout(&o).lines().map(str::to_string).collect();
    for file in [
        "man/palisade.1",
        "man/palisade-verdicts.1",
        "man/palisade-explain.1",
        "man/palisade-policy-show.1",
        "man/palisade-version.1",
        "completions/palisade.bash",
        "completions/_palisade",
        "completions/palisade.fish",
        "man/kubectl-palisade.1",
        "man/kubectl-palisade-verdicts.1",
        "man/kubectl-palisade-explain.1",
        "completions/kubectl-palisade.bash",
    ] {
        let path = dir.join(file);
        assert!(
            listed.contains(&path.display().to_string()),
            "{file} listed: {listed:?}"
        );
        assert!(
            std::fs::metadata(&path).unwrap().len() > 0,
            "{file} written"
        );
    }
    let explain = std::fs::read_to_string(dir.join("man/palisade-explain.1")).unwrap();
    assert!(
        explain.starts_with(".ie \\n(.g .ds Aq") || explain.contains(".TH"),
        "roff"
    );
    assert!(
        explain.contains("Exit status"),
        "the man page has the exit statuses"
    );
    assert!(
        !dir.join("man/palisade-generate-docs.1").exists(),
        "no page for the hidden command"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The binary as `kubectl-palisade` (a link named so): `kubectl palisade`'s own usage, bad
/// arguments exit 2, and a kubeconfig that leads nowhere is a failure that says which (2 for
/// explain, 1 otherwise).
#[test]
fn named_kubectl_palisade_it_is_the_kubectl_plugin() {
    let dir = std::env::temp_dir().join(format!("palisade-plugin-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("kubectl-palisade");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_palisade"), &link).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    // An API server nobody listens on.
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: 'http://127.0.0.1:9'}\n\
         users:\n- name: u\n  user: {}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n",
    )
    .unwrap();
    let plugin = |args: &[&str]| {
        Command::new(&link)
            .args(args)
            .env_remove("KUBECONFIG")
            .output()
            .expect("run kubectl-palisade")
    };
    let o = plugin(&["--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let help = stdout(&o);
    assert!(help.contains("Usage: kubectl palisade"), "{help}");
    for verb in ["verdicts", "explain", "policy", "stats", "agents"] {
        assert!(help.contains(verb), "{verb} in {help}");
    }
    for flag in ["--kubeconfig", "--context", "--palisade-namespace"] {
        assert!(help.contains(flag), "{flag} in {help}");
    }
    let o = plugin(&["stats", "-o", "xml"]);
    assert_eq!(o.status.code(), Some(EXIT_USAGE.into()), "{}", stderr(&o));
    let kc = kubeconfig.to_str().unwrap();
    for (args, status) in [
        (&["stats", "--kubeconfig", kc][..], EXIT_FAILURE),
        (
            &[
                "--kubeconfig",
                kc,
                "explain",
                "--from",
                "a/x",
                "--to",
                "b/y",
                "--port",
                "80",
            ],
            EXPLAIN_ERROR,
        ),
    ] {
        let o = plugin(args);
        assert_eq!(
            o.status.code(),
            Some(status.into()),
            "{args:?}: {}",
            stderr(&o)
        );
        assert!(
            stderr(&o).contains("listing the Palisade pods in namespace palisade-system"),
            "says what it could not do: {}",
            stderr(&o)
        );
    }
    // `palisade cluster` is the same command.
    let o = palisade(&["cluster", "--help"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("--palisade-namespace"));
    let o = plugin(&["--context", "nosuch", "--kubeconfig", kc, "agents"]);
    assert_eq!(o.status.code(), Some(EXIT_FAILURE.into()));
    assert!(stderr(&o).contains("nosuch"), "{}", stderr(&o));
    let _ = std::fs::remove_dir_all(&dir);
}
