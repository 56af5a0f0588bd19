//! Bad configuration through the standalone agent on the netns rig: every bad input gets an
//! error naming the object and the field (status file and log), every other policy keeps being
//! enforced, and a changed policy keeps its last good version, across restarts too. Needs root;
//! under CI=true that is a failure, not a skip.
mod support;

use std::time::{Duration, SystemTime};

use palisade_tests::rig::require_root;
use support::{B_POLICY, BASELINE, C_POLICY, Setup};

/// A bad version of c's policy (it would let b in, on any port) with the field it breaks.
fn bad_c(spec_ingress: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: c-ingress, namespace: demo}}\n\
         spec:\n  podSelector: {{matchLabels: {{app: c}}}}\n  policyTypes: [Ingress]\n  ingress:\n{spec_ingress}"
    )
}

struct Case {
    what: &'static str,
    file: &'static str,
    text: String,
    /// Every one of these appears in one error.
    expect: &'static [&'static str],
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            what: "malformed YAML",
            file: "bad.yaml",
            text: "apiVersion: [unclosed\nkind: NetworkPolicy\n".into(),
            expect: &["bad.yaml", "invalid YAML"],
        },
        Case {
            what: "unknown kind",
            file: "bad.yaml",
            text: "apiVersion: v1\nkind: Frobnicator\nmetadata: {name: f, namespace: demo}\n".into(),
            expect: &["bad.yaml", "Frobnicator", "kind"],
        },
        Case {
            what: "a field of the wrong type",
            file: "bad.yaml",
            text: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: t, namespace: demo}\nspec: {podSelector: {}, ingress: [{ports: [{port: {x: 1}}]}]}\n".into(),
            expect: &["bad.yaml", "NetworkPolicy demo/t", "spec.ingress[0].ports[0].port"],
        },
        Case {
            what: "invalid CIDR",
            file: "c.yaml",
            text: bad_c("    - from: [{ipBlock: {cidr: 10.244.0.300/32}}]\n"),
            expect: &[
                "NetworkPolicy demo/c-ingress",
                "spec.ingress[0].from[0].ipBlock.cidr",
                "10.244.0.300/32",
            ],
        },
        Case {
            what: "CIDR without a prefix length",
            file: "c.yaml",
            text: bad_c("    - from: [{ipBlock: {cidr: 10.244.0.11}}]\n"),
            expect: &[
                "NetworkPolicy demo/c-ingress",
                "spec.ingress[0].from[0].ipBlock.cidr",
                "prefix length",
            ],
        },
        Case {
            what: "except outside cidr",
            file: "c.yaml",
            text: bad_c(
                "    - from: [{ipBlock: {cidr: 10.244.0.0/24, except: [10.0.0.0/8]}}]\n",
            ),
            expect: &[
                "NetworkPolicy demo/c-ingress",
                "spec.ingress[0].from[0].ipBlock.except[0]",
                "not inside",
            ],
        },
        Case {
            what: "invalid selector operator",
            file: "c.yaml",
            text: bad_c(
                "    - from: [{podSelector: {matchExpressions: [{key: app, operator: Within, values: [b]}]}}]\n",
            ),
            expect: &[
                "NetworkPolicy demo/c-ingress",
                "spec.ingress[0].from[0].podSelector.matchExpressions[0].operator",
                "Within",
            ],
        },
        Case {
            what: "invalid port name",
            file: "c.yaml",
            text: bad_c("    - ports: [{port: HTTP_80}]\n"),
            expect: &[
                "NetworkPolicy demo/c-ingress",
                "spec.ingress[0].ports[0].port",
                "HTTP_80",
            ],
        },
        Case {
            what: "port out of range",
            file: "c.yaml",
            text: bad_c("    - ports: [{port: 70000}]\n"),
            expect: &[
                "NetworkPolicy demo/c-ingress",
                "spec.ingress[0].ports[0].port",
                "70000",
            ],
        },
        Case {
            what: "unsupported protocol",
            file: "c.yaml",
            text: bad_c("    - ports: [{port: 80, protocol: ICMP}]\n"),
            expect: &[
                "NetworkPolicy demo/c-ingress",
                "spec.ingress[0].ports[0].protocol",
                "ICMP",
            ],
        },
        Case {
            what: "duplicate name (a later file redefines b's policy to allow all)",
            file: "zz-duplicate.yaml",
            text: "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-ingress, namespace: demo}\nspec: {podSelector: {matchLabels: {app: b}}, ingress: [{}]}\n".into(),
            expect: &["NetworkPolicy demo/b-ingress", "defined in both", "policies.yaml"],
        },
    ]
}

/// The error of `case` in `errors`, if any names everything it should.
fn find<'e>(errors: &'e [String], expect: &[&str]) -> Option<&'e String> {
    errors.iter().find(|e| expect.iter().all(|x| e.contains(x)))
}

#[test]
fn bad_input_is_reported_and_changes_nothing() {
    if !require_root() {
        return;
    }
    let mut s = Setup::new(
        "badcfg",
        &[("policies.yaml", B_POLICY), ("c.yaml", C_POLICY)],
    );
    s.check("baseline", BASELINE);
    let st = s.agent.status().expect("status");
    assert!(
        st.errors.is_empty(),
        "no errors to begin with: {:?}",
        st.errors
    );

    for case in cases() {
        let st = s.write(case.file, Some(&case.text));
        let err = find(&st.errors, case.expect).unwrap_or_else(|| {
            panic!(
                "{}: no error naming {:?} in the status: {:?}",
                case.what, case.expect, st.errors
            )
        });
        assert!(st.config_errors >= 1, "{}: counted", case.what);
        assert!(
            s.log().contains(err.as_str()),
            "{}: the error is in the agent log: {err}",
            case.what
        );
        // The same error in `palisade stats`, with its object and field apart, and as a metric.
        let stats = s.json(&["stats"]);
        let listed = stats["problems"]["config_errors"]
            .as_array()
            .expect("stats: problems.config_errors")
            .iter()
            .find(|e| {
                let text = format!(
                    "{}: {}: {}",
                    e["object"].as_str().unwrap_or(""),
                    e["field"].as_str().unwrap_or(""),
                    e["message"].as_str().unwrap_or("")
                );
                case.expect.iter().all(|x| text.contains(x))
            })
            .unwrap_or_else(|| panic!("{}: not in palisade stats: {stats}", case.what))
            .clone();
        let metrics = s.metrics();
        let series = format!(
            "palisade_config_error{{object=\"{}\",field=\"{}\"}} 1",
            listed["object"].as_str().unwrap(),
            listed["field"].as_str().unwrap()
        );
        assert!(
            metrics.lines().any(|l| l == series),
            "{}: metric {series} in\n{metrics}",
            case.what
        );
        assert!(
            !metrics.lines().any(|l| l == "palisade_config_errors 0"),
            "{}: counted as a metric",
            case.what
        );
        s.check(case.what, BASELINE);
        // Undo: the original c policy back, the extra file gone.
        let st = if case.file == "c.yaml" {
            s.write("c.yaml", Some(C_POLICY))
        } else {
            s.write(case.file, None)
        };
        assert!(
            st.errors.is_empty(),
            "{}: errors clear once fixed: {:?}",
            case.what,
            st.errors
        );
        assert!(
            s.metrics().lines().any(|l| l == "palisade_config_errors 0"),
            "{}: the metric clears once fixed",
            case.what
        );
    }

    // A named port no pod declares is valid (the API server accepts it) but matches nothing:
    // the policy is enforced as written (c allows nothing from a now) and the agent says why.
    let st = s.write(
        "c.yaml",
        Some(&bad_c(
            "    - from: [{podSelector: {matchLabels: {app: a}}}]\n      ports: [{port: nosuch}]\n",
        )),
    );
    assert!(
        find(
            &st.errors,
            &[
                "NetworkPolicy demo/c-ingress",
                "spec.ingress[0].ports[0].port",
                "nosuch"
            ]
        )
        .is_some(),
        "unresolvable named port reported: {:?}",
        st.errors
    );
    s.check(
        "named port nobody declares",
        &[
            ("a", "c", 80, false),
            ("b", "c", 80, false),
            ("a", "b", 80, true),
        ],
    );
    s.write("c.yaml", Some(C_POLICY));
    s.check("back to the baseline", BASELINE);
}

#[test]
fn last_good_version_survives_a_restart() {
    if !require_root() {
        return;
    }
    let mut s = Setup::new(
        "badrestart",
        &[("policies.yaml", B_POLICY), ("c.yaml", C_POLICY)],
    );
    s.check("baseline", BASELINE);
    // c's policy becomes invalid: its last good version stays.
    let broken = bad_c("    - from: [{ipBlock: {cidr: 10.244.0.0/33}}]\n");
    let st = s.write("c.yaml", Some(&broken));
    assert!(
        find(
            &st.errors,
            &["NetworkPolicy demo/c-ingress", "ipBlock.cidr"]
        )
        .is_some()
    );
    s.check("invalid change", BASELINE);

    // A new agent never saw the good version. It must not drop c's isolation (b -> c would
    // open): it keeps the pinned enforcement until the configuration is whole again.
    s.agent.kill();
    let since = SystemTime::now();
    let manifests = s.manifests();
    s.agent
        .spawn(&s.node, &palisade_tests::agent::agent_binary(), &manifests)
        .expect("restart");
    let st = s
        .agent
        .wait_reconciled(since, 3, Duration::from_secs(30))
        .expect("restarted agent reports");
    assert!(
        find(
            &st.errors,
            &["holding", "NetworkPolicy demo/c-ingress is invalid"]
        )
        .is_some(),
        "the hold is reported: {:?}",
        st.errors
    );
    assert!(
        find(
            &st.errors,
            &["NetworkPolicy demo/c-ingress", "ipBlock.cidr"]
        )
        .is_some()
    );
    s.check("restarted with an invalid policy", BASELINE);

    // Broken YAML in a file after a restart: the same.
    s.write("c.yaml", Some(C_POLICY));
    let st = s.write("policies.yaml", Some("apiVersion: [unclosed"));
    assert!(find(&st.errors, &["policies.yaml", "invalid YAML"]).is_some());
    s.check("unparsable file", BASELINE);
    s.agent.kill();
    let since = SystemTime::now();
    s.agent
        .spawn(&s.node, &palisade_tests::agent::agent_binary(), &manifests)
        .expect("restart");
    let st = s
        .agent
        .wait_reconciled(since, 3, Duration::from_secs(30))
        .expect("restarted agent reports");
    assert!(
        find(&st.errors, &["holding", "policies.yaml does not parse"]).is_some(),
        "{:?}",
        st.errors
    );
    s.check("restarted with an unparsable file", BASELINE);

    // Fixed: the agent takes over normally, and later changes apply.
    let st = s.write("policies.yaml", Some(B_POLICY));
    assert!(st.errors.is_empty(), "{:?}", st.errors);
    s.check("fixed", BASELINE);
    s.write("c.yaml", None);
    s.check(
        "c's policy removed",
        &[("b", "c", 80, true), ("c", "b", 80, false)],
    );
}

/// One policy with 100 000 CIDRs selecting all three pods: 300 000 prefixes do not fit the
/// CIDRS trie (262 144). The agent keeps going, the endpoints that do not fit fail closed with
/// an error naming them and the map, the others are enforced, and removing the policy heals.
#[test]
fn a_policy_with_100k_cidrs() {
    if !require_root() {
        return;
    }
    let mut s = Setup::new(
        "bigcidr",
        &[("policies.yaml", B_POLICY), ("c.yaml", C_POLICY)],
    );
    let mut big = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: big, namespace: demo}\n\
         spec:\n  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from:\n",
    );
    for i in 0..100_000u32 {
        // 100 000 distinct /32s in 172.16.0.0/12, none of them a pod.
        let a = 0xac10_0000u32 + i;
        big.push_str(&format!(
            "    - ipBlock: {{cidr: {}.{}.{}.{}/32}}\n",
            a >> 24,
            (a >> 16) & 255,
            (a >> 8) & 255,
            a & 255
        ));
    }
    let started = std::time::Instant::now();
    let st = s.write("big.yaml", Some(&big));
    eprintln!(
        "100 000 CIDRs: reconciled in {:?}, {} pending, errors: {}",
        started.elapsed(),
        st.pending_endpoints.len(),
        st.errors.len()
    );
    assert!(
        !st.pending_endpoints.is_empty(),
        "300 000 prefixes cannot all fit: {st:?}"
    );
    assert!(
        st.pending_endpoints.len() < 3,
        "the first endpoints fit: {st:?}"
    );
    let pending: Vec<&str> = st
        .pending_endpoints
        .iter()
        .map(|p| {
            ["a", "b", "c"]
                .into_iter()
                .find(|n| p.starts_with(&format!("demo/{n} ")))
                .expect("a pod of the rig")
        })
        .collect();
    for p in &pending {
        assert!(
            find(
                &st.errors,
                &[&format!("demo/{p}"), "CIDRS", "failing closed"]
            )
            .is_some(),
            "error names the endpoint and the map: {:?}",
            st.errors
        );
    }
    assert!(st.map_write_failures_total > 0);
    assert!(s.log().contains("CIDRS"), "logged");
    // Pending pods drop everything; the others are enforced as their policies say (the big
    // policy isolates a too: only b and c's rules and the 172.16/12 blocks allow anything).
    let mut expect = Vec::new();
    for (from, to, port, _) in BASELINE {
        let want = if pending.contains(to) || pending.contains(from) || *to == "a" {
            false
        } else {
            BASELINE
                .iter()
                .find(|e| e.0 == *from && e.1 == *to && e.2 == *port)
                .unwrap()
                .3
        };
        expect.push((*from, *to, *port, want));
    }
    s.check("with 100 000 CIDRs", &expect);
    // The agent still takes changes, and removing the policy heals everything.
    let st = s.write("big.yaml", None);
    assert!(st.pending_endpoints.is_empty(), "{st:?}");
    assert!(st.errors.is_empty(), "{:?}", st.errors);
    s.check("big policy removed", BASELINE);
}
