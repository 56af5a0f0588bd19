//! `palisade stats`: the agent's counters and, first, what is wrong.
use std::path::Path;

use anyhow::{Result, bail};
use clap::Args;

use super::{Output, Render, print};
use crate::api::{Reply, Request, StatsReport};
use crate::control::request_one;

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

pub fn stats(socket: &Path, a: &StatsArgs) -> Result<()> {
    let report = match request_one(socket, &Request::Stats)? {
        Reply::Stats(r) => *r,
        Reply::Error { message } => bail!("agent: {message}"),
        other => bail!("unexpected reply: {other:?}"),
    };
    print(&report, a.output)?;
    Ok(())
}

impl Render for StatsReport {
    fn table(&self) -> String {
        stats_text(self)
    }
}

pub fn stats_text(r: &StatsReport) -> String {
    let c = |k: &str| r.counters.get(k).copied().unwrap_or(0);
    let mut s = String::new();
    let p = &r.problems;
    if !p.config_errors.is_empty() {
        s.push_str(&format!(
            "Configuration errors ({}; each object keeps its last good version):\n",
            p.config_errors.len()
        ));
        for e in &p.config_errors {
            s.push_str(&format!("  {e}\n"));
        }
    }
    for e in &p.errors {
        s.push_str(&format!("Error: {e}\n"));
    }
    if !p.pending_endpoints.is_empty() {
        s.push_str(&format!(
            "Failing closed (policy could not be written): {}\n",
            p.pending_endpoints.join(", ")
        ));
    }
    if !s.is_empty() {
        s.push('\n');
    }
    s.push_str(&format!(
        "Datapath: {} new allowed flows, {} conntrack hits, {} dropped, {} would-drop (audit), {} malformed, {} re-checked after a policy change\n",
        c("new_allowed"),
        c("ct_hit"),
        c("dropped"),
        c("would_drop"),
        c("malformed"),
        c("revalidated"),
    ));
    let f = &r.fqdn;
    if f.answers > 0 || c("dns_held") > 0 || c("dns_unheld") > 0 {
        s.push_str(&format!(
            "FQDN: {} DNS answers held{}, {} passed unheld, {} not copied, {} from untrusted servers; {} read, {} released, {} learned addresses ({} in force), {} evicted, {} expired\n",
            c("dns_held"),
            match (f.hold_p50_us, f.hold_p99_us) {
                (Some(a), Some(b)) => format!(" (held p50 {a} µs, p99 {b} µs)"),
                _ => String::new(),
            },
            c("dns_unheld"),
            c("dns_copy_failed"),
            c("dns_untrusted"),
            f.answers,
            f.released,
            f.learned,
            f.addresses,
            f.evicted,
            f.expired,
        ));
    }
    let reasons = |m: &std::collections::BTreeMap<String, u64>| {
        if m.is_empty() {
            "none".to_string()
        } else {
            m.iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    s.push_str(&format!(
        "Drops by reason: {}\n",
        reasons(&r.drops_by_reason)
    ));
    if !r.would_drop_by_reason.is_empty() {
        s.push_str(&format!(
            "Would-drop by reason: {}\n",
            reasons(&r.would_drop_by_reason)
        ));
    }
    s.push_str("\nPOLICY / RULE                                   PACKETS        BYTES\n");
    if r.policies.is_empty() {
        s.push_str("(no policy rules in force)\n");
    }
    for p in &r.policies {
        let name = match (&p.tier, p.priority) {
            (Some(t), Some(prio)) => format!("ClusterNetworkPolicy {} ({t} {prio})", p.policy),
            _ => format!("{}{}", p.policy, if p.audit { " (audit)" } else { "" }),
        };
        s.push_str(&format!("{name:<44} {:>10} {:>12}\n", p.packets, p.bytes));
        for rule in &p.rules {
            let mut label = rule.rule.clone();
            if let Some(n) = &rule.name {
                label.push_str(&format!(" '{n}'"));
            }
            if let Some(a) = &rule.action {
                label.push_str(&format!(" {a}"));
            }
            s.push_str(&format!(
                "  {:<42} {:>10} {:>12}\n",
                label, rule.packets, rule.bytes
            ));
        }
    }
    // (A sum over nodes has no maps: each node has its own.)
    if !r.maps.is_empty() {
        s.push_str("\nMAP            ENTRIES   CAPACITY    FILL\n");
    }
    for m in &r.maps {
        s.push_str(&format!(
            "{:<12} {:>9} {:>10} {:>6.2}%\n",
            m.map,
            m.entries,
            m.capacity,
            m.fill * 100.0
        ));
    }
    s.push_str(&format!(
        "\nConntrack: {} entries ({} audit-only, {} closing)\n",
        r.conntrack.entries, r.conntrack.audited, r.conntrack.closing
    ));
    for (pod, n) in &r.conntrack.top_holders {
        s.push_str(&format!("  held by {pod}: {n}\n"));
    }
    let e = &r.events;
    s.push_str(&format!(
        "Events: {} sent, {} suppressed by the rate limit, {} lost (ring buffer full); {} verdicts recorded, {} of {} kept\n",
        e.sent, e.suppressed, e.lost, e.recorded, e.history, e.history_capacity
    ));
    for (ep, n) in &e.suppressed_by_endpoint {
        s.push_str(&format!("  suppressed for {ep}: {n}\n"));
    }
    if let Some(rec) = &r.reconcile {
        s.push_str(&format!(
            "Last reconcile: {} endpoints, {} policy entries, {} CIDR entries, {} identities, {} rules; {} written, {} removed, {} failed, {} ms\n",
            rec.endpoints,
            rec.policy_entries,
            rec.cidr_entries,
            rec.identities,
            rec.rules,
            rec.written,
            rec.removed,
            rec.failed,
            rec.duration_ms
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_lead_with_what_is_wrong() {
        let mut r = StatsReport::default();
        assert!(
            stats_text(&r).starts_with("Datapath:"),
            "nothing wrong: no preamble"
        );
        r.problems
            .config_errors
            .push(palisade_policy::model::ConfigError::new(
                "NetworkPolicy demo/c-ingress",
                "spec.ingress[0].ports[0].port",
                "no pod declares a TCP port named \"nosuch\": it matches nothing",
            ));
        r.problems
            .pending_endpoints
            .push("demo/b (ifindex 7)".into());
        let text = stats_text(&r);
        assert!(
            text.starts_with("Configuration errors (1; each object keeps its last good version):\n  NetworkPolicy demo/c-ingress: spec.ingress[0].ports[0].port: no pod declares"),
            "{text}"
        );
        assert!(
            text.contains("Failing closed (policy could not be written): demo/b (ifindex 7)\n"),
            "{text}"
        );
    }
}
