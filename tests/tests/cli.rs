//! The CLI's conventions against a running agent on the netns rig, after real traffic: every
//! read command answers the same in JSON and YAML, tables and wide tables have their columns,
//! `verdicts --follow -o json` is JSON lines, Hubble's filter names select what they say, and
//! `explain` exits 0 (allowed), 1 (dropped) or 2 (error). Needs root; under CI=true that is a
//! failure, not a skip.
mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use palisade_tests::rig::{Proto, require_root};
use serde_json::Value;
use support::{B_POLICY, C_POLICY, Setup};

impl Setup {
    fn run(&self, args: &[&str]) -> Output {
        self.agent.cli(args).output().expect("run the CLI")
    }

    /// `palisade <args> -o FORMAT`'s stdout; fails on a status other than `status`.
    fn out(&self, args: &[&str], format: &str, status: i32) -> String {
        let o = self.run(&[args, &["-o", format]].concat());
        assert_eq!(
            o.status.code(),
            Some(status),
            "palisade {args:?} -o {format}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8(o.stdout).unwrap()
    }

    /// The answer parsed from `-o json` and from `-o yaml`.
    fn json_and_yaml(&self, args: &[&str], status: i32) -> (Value, Value) {
        let json = self.out(args, "json", status);
        let yaml = self.out(args, "yaml", status);
        let j: Value = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("palisade {args:?} -o json: {e}: {json}"));
        let y: Value = serde_saphyr::from_str(&yaml)
            .unwrap_or_else(|e| panic!("palisade {args:?} -o yaml: {e}: {yaml}"));
        (j, y)
    }
}

/// Splits a table into its rows' cells: columns start where the header's words start.
fn columns(table: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = table.lines();
    let header = lines.next().expect("a header");
    // A header word starts after two spaces (headers like "TIME (UTC)" have one inside).
    let mut starts = vec![0];
    let b = header.as_bytes();
    for i in 2..b.len() {
        if b[i - 2] == b' ' && b[i - 1] == b' ' && b[i] != b' ' {
            starts.push(i);
        }
    }
    let cut = |line: &str| -> Vec<String> {
        starts
            .iter()
            .enumerate()
            .map(|(k, &s)| {
                let end = starts.get(k + 1).copied().unwrap_or(line.len());
                line.get(s.min(line.len())..end.min(line.len()))
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .collect()
    };
    let head = cut(header);
    (head, lines.map(cut).collect())
}

#[test]
fn every_format_of_every_read_command_says_the_same() {
    if !require_root() {
        return;
    }
    let t = Setup::new("cli-formats", &[("b.yaml", B_POLICY), ("c.yaml", C_POLICY)]);
    assert!(t.can("a", "b", 80, Proto::Tcp), "a -> b:80 allowed");
    assert!(!t.can("c", "b", 80, Proto::Tcp), "c -> b:80 dropped");

    // Wait for both verdicts to be recorded.
    let deadline = Instant::now() + Duration::from_secs(10);
    let both = |v: &Value| {
        let list = v.as_array().unwrap();
        let has = |verdict: &str, from: &str| {
            list.iter().any(|x| {
                x["verdict"] == verdict
                    && x["source"]["pod"] == from
                    && x["destination"]["pod"] == "demo/b"
            })
        };
        has("allowed", "demo/a") && has("dropped", "demo/c")
    };
    while !both(&t.json(&["verdicts"])) {
        assert!(Instant::now() < deadline, "verdicts recorded");
        std::thread::sleep(Duration::from_millis(100));
    }

    // verdicts: YAML and JSON round-trip to the same answer; the table has a row per verdict.
    let (j, y) = t.json_and_yaml(&["verdicts"], 0);
    assert_eq!(j, y, "verdicts -o yaml and -o json");
    let n = j.as_array().unwrap().len();
    let (head, rows) = columns(&t.out(&["verdicts"], "table", 0));
    assert_eq!(
        head,
        [
            "TIME (UTC)",
            "SOURCE",
            "DESTINATION",
            "PORT",
            "DIR",
            "VERDICT",
            "POLICY",
            "REASON"
        ]
    );
    assert_eq!(rows.len(), n);
    let dropped = rows
        .iter()
        .find(|r| r[1] == "demo/c" && r[2] == "demo/b" && r[5] == "dropped")
        .expect("c -> b dropped in the table");
    assert_eq!(dropped[3], "80/TCP");
    assert_eq!(dropped[4], "ingress");
    assert_eq!(dropped[6], "demo/b-ingress");
    assert_eq!(dropped[7], "no-rule-matched");
    let (head, rows) = columns(&t.out(&["verdicts"], "wide", 0));
    assert_eq!(
        head,
        [
            "TIME (UTC)",
            "SOURCE",
            "SOURCE ADDRESS",
            "DESTINATION",
            "DESTINATION ADDRESS",
            "PORT",
            "DIR",
            "VERDICT",
            "POLICY",
            "REASON",
            "BYTES"
        ]
    );
    assert_eq!(rows.len(), n);
    let b_ip = t.pod("b").ip(false);
    let wide = rows
        .iter()
        .find(|r| r[1] == "demo/c" && r[7] == "dropped")
        .expect("c -> b dropped in the wide table");
    assert_eq!(wide[4], format!("{b_ip}:80"));
    assert!(
        wide[0].starts_with("20") && wide[0].ends_with('Z'),
        "{wide:?}"
    );
    assert!(wide[10].parse::<u32>().unwrap() >= 40, "{wide:?}");

    // Hubble's names select what they say.
    let (j, _) = t.json_and_yaml(
        &["verdicts", "--from-pod", "demo/c", "--verdict", "DROPPED"],
        0,
    );
    let list = j.as_array().unwrap();
    assert!(!list.is_empty());
    assert!(
        list.iter()
            .all(|v| v["source"]["pod"] == "demo/c" && v["verdict"] == "dropped"),
        "{j:#}"
    );
    let (j, _) = t.json_and_yaml(
        &["verdicts", "--to-pod", "demo/b", "--verdict", "forwarded"],
        0,
    );
    let list = j.as_array().unwrap();
    assert!(!list.is_empty());
    assert!(
        list.iter()
            .all(|v| v["destination"]["pod"] == "demo/b" && v["verdict"] == "allowed"),
        "{j:#}"
    );
    let (j, _) = t.json_and_yaml(&["verdicts", "--to-namespace", "elsewhere"], 0);
    assert_eq!(j, Value::Array(vec![]));
    let (j, _) = t.json_and_yaml(&["verdicts", "--last", "1"], 0);
    assert_eq!(j.as_array().unwrap().len(), 1);

    // policy show: YAML = JSON; wide adds the rule ids.
    let (j, y) = t.json_and_yaml(&["policy", "show", "demo/b"], 0);
    assert_eq!(j, y, "policy show -o yaml and -o json");
    let id = j["ingress"]["rules"][0]["rule"]["id"].as_u64().unwrap();
    let table = t.out(&["policy", "show", "demo/b"], "table", 0);
    let wide = t.out(&["policy", "show", "demo/b"], "wide", 0);
    let rule_line = |text: &str| -> String {
        text.lines()
            .find(|l| l.contains("demo/b-ingress") && l.contains("ingress[0]"))
            .unwrap_or_else(|| panic!("b-ingress's rule: {text}"))
            .to_string()
    };
    assert!(
        table.contains("  POLICY          RULE        FROM"),
        "{table}"
    );
    assert!(wide.contains("  POLICY          RULE        ID"), "{wide}");
    let cells: Vec<String> = rule_line(&wide)
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect();
    assert_eq!(
        cells,
        [
            "demo/b-ingress".to_string(),
            "ingress[0]".into(),
            id.to_string(),
            "pods demo/a".into(),
            "TCP/80".into()
        ]
    );

    // stats: YAML = JSON.
    let (j, y) = t.json_and_yaml(&["stats"], 0);
    assert_eq!(j, y, "stats -o yaml and -o json");
    assert!(j["counters"]["dropped"].as_u64().unwrap() >= 1);

    // explain: the exit status is the verdict; YAML = JSON either way.
    let allowed = [
        "explain", "--from", "demo/a", "--to", "demo/b", "--port", "80",
    ];
    let dropped = [
        "explain", "--from", "demo/c", "--to", "demo/b", "--port", "80",
    ];
    let (j, y) = t.json_and_yaml(&allowed, 0);
    assert_eq!(j, y);
    assert_eq!(j["verdict"], "allowed");
    let (j, y) = t.json_and_yaml(&dropped, 1);
    assert_eq!(j, y);
    assert_eq!(j["verdict"], "dropped");
    let text = t.out(&dropped, "table", 1);
    assert!(
        text.lines().next().unwrap().ends_with("TCP/80: DROPPED"),
        "{text}"
    );
    let wide = t.out(&allowed, "wide", 0);
    assert!(
        wide.contains(&format!(
            "deciding rule: demo/b-ingress ingress[0] (rule id {id})"
        )),
        "{wide}"
    );
    let o = t.run(&[
        "explain",
        "--from",
        "demo/nosuch",
        "--to",
        "demo/b",
        "--port",
        "80",
    ]);
    assert_eq!(o.status.code(), Some(2), "an unknown pod is an error");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("demo/nosuch"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn verdicts_follow_is_json_lines() {
    if !require_root() {
        return;
    }
    let t = Setup::new("cli-follow", &[("b.yaml", B_POLICY)]);
    let mut child = t
        .agent
        .cli(&["verdicts", "--follow", "-o", "json", "--from-pod", "demo/c"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("verdicts --follow");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap()).is_err() {
                break;
            }
        }
    });
    // Traffic after the stream started: c -> b:80 (dropped), a -> b:80 (not c's: filtered).
    std::thread::sleep(Duration::from_millis(300));
    assert!(t.can("a", "b", 80, Proto::Tcp));
    assert!(!t.can("c", "b", 80, Proto::Tcp));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while let Ok(line) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        let v: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("each line is one JSON object: {e}: {line:?}"));
        assert_eq!(v["source"]["pod"], "demo/c", "--from-pod filters: {v}");
        let done = v["verdict"] == "dropped" && v["destination"]["pod"] == "demo/b";
        seen.push(v);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        seen.iter()
            .any(|v| v["verdict"] == "dropped" && v["destination"]["pod"] == "demo/b"),
        "the drop streamed as a JSON line: {seen:#?}"
    );
}
