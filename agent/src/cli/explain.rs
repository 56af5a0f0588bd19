//! `palisade explain`: what the datapath would do with one packet, and which rule decides.
use std::path::Path;

use anyhow::Result;
use clap::Args;

use super::{EXIT_USAGE, Output, Render, print};
use crate::inspect::{Explanation, Query, Snapshot, Target, VerdictKind, parse_proto};

/// The exit status of `explain` for scripts: the verdict, or an error.
pub const EXIT_CODES_HELP: &str = "Exit status:
  0  allowed (also would-drop: audit mode records the denial and lets the packet pass)
  1  dropped
  2  error (bad arguments, no agent state or maps, unknown pod or address)";

/// `explain`'s exit status when it fails, whatever the failure: bad arguments exit with clap's
/// status, so every error is this one.
pub const EXPLAIN_ERROR: u8 = EXIT_USAGE;
// EXIT_CODES_HELP says 2.
const _: () = assert!(EXPLAIN_ERROR == 2);

/// `explain`'s exit status for a verdict (see [`EXIT_CODES_HELP`]; errors exit with
/// [`EXPLAIN_ERROR`]).
pub fn exit_code(verdict: VerdictKind) -> u8 {
    match verdict {
        VerdictKind::Allowed | VerdictKind::WouldDrop => 0,
        VerdictKind::Dropped => 1,
    }
}

fn parse_target(s: &str) -> Result<Target, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

#[derive(Args, Debug)]
pub struct ExplainArgs {
    /// Source: NAMESPACE/POD or an IP address.
    #[arg(long, value_name = "NS/POD|IP", value_parser = parse_target)]
    pub from: Target,
    /// Destination: NAMESPACE/POD or an IP address.
    #[arg(long, value_name = "NS/POD|IP", value_parser = parse_target)]
    pub to: Target,
    /// Destination port (TCP, UDP, SCTP).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    /// TCP, UDP, SCTP, ICMP, ICMPv6 or a number.
    #[arg(long, default_value = "TCP")]
    pub protocol: String,
    /// Use IPv6 addresses where both ends have both families.
    #[arg(long)]
    pub ipv6: bool,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Prints the explanation; returns its verdict (for the exit status).
pub fn explain(socket: &Path, a: &ExplainArgs) -> Result<VerdictKind> {
    let snap = Snapshot::load(socket)?;
    let q = Query {
        from: a.from.clone(),
        to: a.to.clone(),
        proto: parse_proto(&a.protocol)?,
        port: a.port,
        ipv6: a.ipv6,
    };
    let e = snap.explain(&q)?;
    print(&e, a.output)?;
    Ok(e.verdict)
}

impl Render for Explanation {
    fn table(&self) -> String {
        explanation_text(self, false, &[])
    }
    fn wide(&self) -> String {
        explanation_text(self, true, &[])
    }
}

pub fn explain_text(e: &Explanation) -> String {
    explanation_text(e, false, &[])
}

/// `wide`: each step's deciding rules (with their ids) and the policies in force too.
/// `step_nodes`: the node that judged each step (`kubectl palisade explain`), named after its
/// pod; none on one node.
pub fn explanation_text(e: &Explanation, wide: bool, step_nodes: &[&str]) -> String {
    let end = |pod: &Option<String>, ip: &std::net::IpAddr| match pod {
        Some(p) => format!("{p} ({ip})"),
        None => ip.to_string(),
    };
    let what = match e.port {
        Some(p) => format!("{}/{p}", e.protocol),
        None => e.protocol.clone(),
    };
    let mut s = format!(
        "{} -> {} {what}: {}\n",
        end(&e.from.pod, &e.from.ip),
        end(&e.to.pod, &e.to.ip),
        e.verdict.as_str().to_uppercase()
    );
    for (i, st) in e.steps.iter().enumerate() {
        let on = match step_nodes.get(i) {
            Some(node) => format!(" (on {node})"),
            None => String::new(),
        };
        s.push_str(&format!(
            "  {} of {}{on}: {}\n",
            st.direction, st.pod, st.summary
        ));
        if let Some(d) = &st.domain {
            s.push_str(&format!("    - the peer is {d}\n"));
        }
        for h in &st.hints {
            s.push_str(&format!("    - {h}\n"));
        }
        if wide {
            for (what, rule) in [
                ("deciding rule", &st.rule),
                ("Admin tier's first match", &st.admin),
                ("Baseline tier's first match", &st.baseline),
            ] {
                if let Some(r) = rule {
                    s.push_str(&format!("    {what}: {r} (rule id {})\n", r.id));
                }
            }
            let list = |v: &[String]| {
                if v.is_empty() {
                    "none".to_string()
                } else {
                    v.join(", ")
                }
            };
            s.push_str(&format!("    policies in force: {}\n", list(&st.policies)));
            if !st.cluster_policies.is_empty() {
                s.push_str(&format!(
                    "    ClusterNetworkPolicies: {}\n",
                    list(&st.cluster_policies)
                ));
            }
        }
    }
    for n in &e.notes {
        s.push_str(&format!("  note: {n}\n"));
    }
    s
}
