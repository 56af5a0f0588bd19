//! The cluster-wide answers through the one renderer (`cli::output`): each row or step names
//! its node. JSON and YAML are the answers' own serialization (`view`).
use crate::api::Verdict;
use crate::cli::{Output, Render, Row, explanation_text, render_rows, stats_text, table_row};

use super::view::{
    AgentPod, ClusterExplanation, ClusterStats, ClusterVerdicts, NodePolicy, NodeVerdict,
};

impl Row for NodeVerdict {
    fn headers(wide: bool) -> Vec<&'static str> {
        let mut h = vec!["NODE"];
        h.extend(Verdict::headers(wide));
        h
    }

    fn cells(&self, wide: bool) -> Vec<String> {
        let mut c = vec![self.node.clone()];
        c.extend(self.verdict.cells(wide));
        c
    }

    fn stream_widths(wide: bool) -> Vec<usize> {
        let mut w = vec![10];
        w.extend(Verdict::stream_widths(wide));
        w
    }

    fn empty() -> &'static str {
        Verdict::empty()
    }
}

/// A table (or wide) rendering of rows; the table forms cannot fail.
fn rows_text<T: Row>(items: &[T], output: Output) -> String {
    render_rows(items, output).unwrap_or_default()
}

/// The nodes that did not answer are named on stderr (and in JSON and YAML, `failures`).
impl Render for ClusterVerdicts {
    fn table(&self) -> String {
        rows_text(&self.verdicts, Output::Table)
    }
    fn wide(&self) -> String {
        rows_text(&self.verdicts, Output::Wide)
    }
}

impl Render for ClusterExplanation {
    fn table(&self) -> String {
        let nodes: Vec<&str> = self.nodes.iter().map(|n| n.node.as_str()).collect();
        explanation_text(&self.explanation, false, &nodes)
    }
    fn wide(&self) -> String {
        let nodes: Vec<&str> = self.nodes.iter().map(|n| n.node.as_str()).collect();
        let mut s = explanation_text(&self.explanation, true, &nodes);
        for n in &self.nodes {
            s.push_str(&format!(
                "  {} of {} judged on {} (agent pod {})\n",
                n.direction, n.pod, n.node, n.agent
            ));
        }
        s
    }
}

impl Render for NodePolicy {
    fn table(&self) -> String {
        format!(
            "node {} (agent pod {})\n{}",
            self.node,
            self.agent,
            self.policy.table()
        )
    }
    fn wide(&self) -> String {
        format!(
            "node {} (agent pod {})\n{}",
            self.node,
            self.agent,
            self.policy.wide()
        )
    }
}

impl Row for AgentPod {
    fn headers(_wide: bool) -> Vec<&'static str> {
        vec!["NODE", "AGENT POD", "PHASE", "READY"]
    }
    fn cells(&self, _wide: bool) -> Vec<String> {
        vec![
            self.node.clone(),
            self.pod.clone(),
            self.phase.clone(),
            if self.ready { "yes" } else { "no" }.into(),
        ]
    }
    fn empty() -> &'static str {
        "(no agent pods)"
    }
}

/// One row of the per-node table: the counters that say what happened, and what is wrong.
fn stats_cells(node: &str, agent: &str, r: &crate::api::StatsReport, wide: bool) -> Vec<String> {
    let c = |k: &str| r.counters.get(k).copied().unwrap_or(0).to_string();
    let problems = r.problems.config_errors.len()
        + r.problems.errors.len()
        + r.problems.pending_endpoints.len();
    let mut cells = vec![
        node.to_string(),
        agent.to_string(),
        c("new_allowed"),
        c("ct_hit"),
        c("dropped"),
        c("would_drop"),
        r.conntrack.entries.to_string(),
        r.events.recorded.to_string(),
        if problems == 0 {
            "-".into()
        } else {
            problems.to_string()
        },
    ];
    if wide {
        let fullest = r
            .maps
            .iter()
            .max_by(|a, b| a.fill.total_cmp(&b.fill))
            .map(|m| format!("{} {:.2}%", m.map, m.fill * 100.0))
            .unwrap_or_else(|| "-".into());
        cells.extend([
            c("malformed"),
            r.events.suppressed.to_string(),
            r.events.lost.to_string(),
            r.reconcile
                .as_ref()
                .map_or("-".into(), |rec| rec.endpoints.to_string()),
            fullest,
        ]);
    }
    cells
}

fn stats_headers(wide: bool) -> Vec<String> {
    let mut h = vec![
        "NODE",
        "AGENT POD",
        "NEW ALLOWED",
        "CT HITS",
        "DROPPED",
        "WOULD-DROP",
        "CONNTRACK",
        "VERDICTS",
        "PROBLEMS",
    ];
    if wide {
        h.extend([
            "MALFORMED",
            "SUPPRESSED",
            "LOST",
            "ENDPOINTS",
            "FULLEST MAP",
        ]);
    }
    h.into_iter().map(String::from).collect()
}

/// The per-node table with a TOTAL row (a node that did not answer: `unreachable`, the reason
/// on stderr), then the sum's details (drops by reason, policies and rules, conntrack, events; maps are per node).
/// `wide`: more columns, and every node's own stats after the sum.
fn cluster_stats_text(s: &ClusterStats, wide: bool) -> String {
    let headers = stats_headers(wide);
    let mut rows: Vec<Vec<String>> = Vec::new();
    for n in &s.nodes {
        let agent = n.agent.as_deref().unwrap_or("-");
        match &n.stats {
            Some(r) => rows.push(stats_cells(&n.node, agent, r, wide)),
            None => {
                let mut cells = vec![n.node.clone(), agent.to_string(), "unreachable".into()];
                cells.resize(headers.len(), String::new());
                rows.push(cells);
            }
        }
    }
    let mut total = stats_cells("TOTAL", "", &s.total, wide);
    if wide {
        // Nothing sums to a map's fill, nor to a count of endpoints per node.
        let n = total.len();
        total[n - 1] = "-".into();
        total[n - 2] = s
            .nodes
            .iter()
            .filter_map(|n| n.stats.as_ref()?.reconcile.as_ref())
            .map(|r| r.endpoints)
            .sum::<usize>()
            .to_string();
    }
    rows.push(total);
    let mut widths: Vec<usize> = headers.iter().map(String::len).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = table_row(&headers, &widths) + "\n";
    for r in &rows {
        out.push_str(&table_row(r, &widths));
        out.push('\n');
    }
    let answered = s.nodes.iter().filter(|n| n.stats.is_some()).count();
    out.push_str(&format!(
        "\nSummed over {answered} of {} nodes:\n",
        s.nodes.len()
    ));
    out.push_str(&stats_text(&s.total));
    if wide {
        for n in &s.nodes {
            if let Some(r) = &n.stats {
                out.push_str(&format!(
                    "\n== node {} (agent pod {})\n",
                    n.node,
                    n.agent.as_deref().unwrap_or("-")
                ));
                out.push_str(&stats_text(r));
            }
        }
    }
    out
}

impl Render for ClusterStats {
    fn table(&self) -> String {
        cluster_stats_text(self, false)
    }
    fn wide(&self) -> String {
        cluster_stats_text(self, true)
    }
}
