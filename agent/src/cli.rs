//! The CLI commands of the `palisade` binary: `verdicts`, `policy show`, `explain`, `stats`.
//!
//! `verdicts` and `stats` ask the running agent over its unix socket (`control`); `policy
//! show` and `explain` read the pinned maps themselves, named through the agent's state file
//! (`inspect`), so they show what the datapath enforces, even while the agent is restarting.
use std::{
    io::Write,
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Result, bail};
use clap::{Args, Subcommand, ValueEnum};

use crate::{
    api::{Filter, Reply, Request, StatsReport, Verdict},
    control::{request, request_one},
    inspect::{
        DirectionPolicy, Explanation, PodPolicy, Query, Snapshot, Target, VerdictKind, parse_proto,
    },
};
use palisade_policy::state::Direction;

/// `--admin-addr`: an address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AdminAddr(pub Option<std::net::SocketAddr>);

pub fn parse_admin_addr(s: &str) -> Result<AdminAddr, String> {
    if s.eq_ignore_ascii_case("off") || s.is_empty() {
        return Ok(AdminAddr(None));
    }
    s.parse().map(|a| AdminAddr(Some(a))).map_err(|e| {
        format!(
            "{s:?}: {e} (an address like {}, or off)",
            crate::admin::DEFAULT_ADDR
        )
    })
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

fn parse_verdict(s: &str) -> Result<VerdictKind, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

fn parse_target(s: &str) -> Result<Target, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

/// `30s`, `5m`, `1h30m`, `500ms`, `2d`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    if rest.is_empty() {
        return Err("empty duration".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!("bad duration {s:?} (e.g. 30s, 5m, 1h30m)"));
        }
        let n: u64 = rest[..digits].parse().map_err(|e| format!("{s:?}: {e}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        total += match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            "d" => Duration::from_secs(n * 86_400),
            _ => return Err(format!("bad unit {unit:?} in {s:?} (ms, s, m, h, d)")),
        };
    }
    Ok(total)
}

#[derive(Args, Debug)]
pub struct VerdictsArgs {
    /// Keep printing new verdicts as they come.
    #[arg(short, long)]
    pub follow: bool,
    /// Only verdicts where this pod (NAMESPACE/NAME) is the source, destination or endpoint.
    #[arg(long, value_name = "NS/NAME")]
    pub pod: Option<String>,
    /// Only verdicts that concern a pod of this namespace.
    #[arg(short, long, value_name = "NS")]
    pub namespace: Option<String>,
    /// allowed, dropped or would-drop (audit).
    #[arg(long, value_name = "VERDICT", value_parser = parse_verdict)]
    pub verdict: Option<VerdictKind>,
    /// Only verdicts of the last DURATION (30s, 5m, 1h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// At most this many (the most recent) from the history.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct PolicyArgs {
    #[command(subcommand)]
    pub command: PolicyCommand,
}

#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// A pod's effective ingress and egress rules, decoded from the BPF maps.
    Show {
        /// NAMESPACE/NAME of a pod on this node.
        #[arg(value_name = "NS/POD")]
        pod: String,
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
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

#[derive(Args, Debug)]
pub struct StatsArgs {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// verdicts
// ---------------------------------------------------------------------------------------------

pub fn verdicts(socket: &Path, a: &VerdictsArgs) -> Result<()> {
    let filter = Filter {
        pod: a.pod.clone(),
        namespace: a.namespace.clone(),
        verdict: a.verdict,
        since_unix_ms: a
            .since
            .map(|d| now_ms().saturating_sub(d.as_millis() as u64)),
    };
    let req = Request::Verdicts {
        filter,
        follow: a.follow,
        limit: a.limit,
    };
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut past = Vec::new();
    let mut streaming = false;
    for reply in request(socket, &req)? {
        match reply? {
            Reply::Verdict(v) if streaming => {
                match a.output {
                    Output::Json => writeln!(out, "{}", serde_json::to_string(&v)?)?,
                    Output::Table => writeln!(out, "{}", verdict_row(&v, &FIXED_WIDTHS))?,
                }
                out.flush()?;
            }
            Reply::Verdict(v) => past.push(*v),
            Reply::End => {
                match (a.output, a.follow) {
                    (Output::Json, false) => {
                        writeln!(out, "{}", serde_json::to_string_pretty(&past)?)?
                    }
                    (Output::Json, true) => {
                        for v in &past {
                            writeln!(out, "{}", serde_json::to_string(v)?)?;
                        }
                    }
                    (Output::Table, follow) => {
                        write!(out, "{}", verdicts_table(&past, !follow))?;
                    }
                }
                out.flush()?;
                if !a.follow {
                    return Ok(());
                }
                streaming = true;
            }
            Reply::Lagged { missed } => eprintln!("(fell behind: {missed} verdicts not shown)"),
            Reply::Error { message } => bail!("agent: {message}"),
            Reply::Stats(_) => bail!("unexpected reply"),
        }
    }
    if !streaming {
        bail!("the agent closed the connection early");
    }
    Ok(())
}

const HEADERS: [&str; 8] = [
    "TIME (UTC)",
    "SOURCE",
    "DESTINATION",
    "PORT",
    "DIR",
    "VERDICT",
    "POLICY",
    "REASON",
];
const FIXED_WIDTHS: [usize; 8] = [12, 24, 24, 10, 7, 10, 40, 0];

/// One row: DIR says which end judged (egress: the source pod's program; ingress: the
/// destination's), so a flow between two local pods shows up once per end.
fn verdict_cells(v: &Verdict) -> [String; 8] {
    let port = match v.destination.port {
        Some(p) => format!("{p}/{}", v.protocol),
        None => v.protocol.clone(),
    };
    let time = v.time.get(11..23).unwrap_or(&v.time).to_string();
    [
        time,
        v.source.name(),
        v.destination.name(),
        port,
        v.direction.to_string(),
        v.verdict.to_string(),
        v.policy_text(),
        v.reason.clone(),
    ]
}

fn row(cells: &[String], widths: &[usize]) -> String {
    let mut s = String::new();
    for (i, (c, w)) in cells.iter().zip(widths).enumerate() {
        if i + 1 == cells.len() {
            s.push_str(c);
        } else {
            s.push_str(&format!("{c:<w$}  ", w = *w));
        }
    }
    s.trim_end().to_string()
}

fn verdict_row(v: &Verdict, widths: &[usize]) -> String {
    row(&verdict_cells(v), widths)
}

/// The verdicts as a table with a header (column widths fitted when `fit`).
pub fn verdicts_table(vs: &[Verdict], fit: bool) -> String {
    let cells: Vec<[String; 8]> = vs.iter().map(verdict_cells).collect();
    let mut widths = FIXED_WIDTHS;
    if fit {
        for (i, w) in widths.iter_mut().enumerate() {
            *w = cells
                .iter()
                .map(|c| c[i].len())
                .chain([HEADERS[i].len()])
                .max()
                .unwrap_or(0);
        }
    }
    let header: Vec<String> = HEADERS.iter().map(|h| h.to_string()).collect();
    let mut s = row(&header, &widths);
    s.push('\n');
    for c in &cells {
        s.push_str(&row(c, &widths));
        s.push('\n');
    }
    if vs.is_empty() && fit {
        s.push_str("(no verdicts recorded yet)\n");
    }
    s
}

// ---------------------------------------------------------------------------------------------
// policy show
// ---------------------------------------------------------------------------------------------

pub fn policy(socket: &Path, a: &PolicyArgs) -> Result<()> {
    match &a.command {
        PolicyCommand::Show { pod, output } => {
            let snap = Snapshot::load(socket)?;
            let p = snap.policy_of(pod)?;
            match output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&p)?),
                Output::Table => print!("{}", policy_text(&p)),
            }
            Ok(())
        }
    }
}

fn direction_text(dir: Direction, d: &DirectionPolicy, out: &mut String) {
    let name = dir.to_string();
    if !d.isolated {
        out.push_str(&format!(
            "{name}: not isolated (no policy selects the pod for {name}): everything allowed\n"
        ));
    } else {
        let mode = if d.audit {
            " [AUDIT: denials are recorded as would-drop and pass]"
        } else {
            ""
        };
        out.push_str(&format!(
            "{name}: isolated by {}{mode}\n",
            d.policies.join(", ")
        ));
        if d.rules.is_empty() {
            out.push_str(
                "  nothing allowed (replies of connections allowed in the other direction pass)\n",
            );
        } else {
            let peer_word = if dir == Direction::Ingress {
                "FROM"
            } else {
                "TO"
            };
            let cells: Vec<[String; 4]> = d
                .rules
                .iter()
                .map(|r| {
                    [
                        format!(
                            "{}{}",
                            r.rule.policy_id(),
                            if r.rule.audit { " (audit)" } else { "" }
                        ),
                        format!("{}[{}]", r.rule.direction, r.rule.index),
                        r.peer.text(),
                        r.ports_text(),
                    ]
                })
                .collect();
            let header = [
                "POLICY".to_string(),
                "RULE".to_string(),
                peer_word.to_string(),
                "PORTS".to_string(),
            ];
            let mut widths = [0usize; 4];
            for c in cells.iter().chain([&header]) {
                for (i, w) in widths.iter_mut().enumerate() {
                    *w = (*w).max(c[i].len());
                }
            }
            out.push_str("  ");
            out.push_str(&row(&header, &widths));
            out.push('\n');
            for c in &cells {
                out.push_str("  ");
                out.push_str(&row(c, &widths));
                out.push('\n');
            }
        }
    }
    if !d.audit_ignored.is_empty() {
        out.push_str(&format!(
            "  audit policies not in force for {name} (enforcing policies isolate the pod): {}\n",
            d.audit_ignored.join(", ")
        ));
    }
}

pub fn policy_text(p: &PodPolicy) -> String {
    let mut s = format!(
        "{}  (endpoint {}, ifindex {}, revision {})\n",
        p.pod, p.endpoint, p.ifindex, p.revision
    );
    if p.pending {
        s.push_str(
            "PENDING: the endpoint's entries could not be written; all its traffic is dropped\n",
        );
    }
    direction_text(Direction::Ingress, &p.ingress, &mut s);
    direction_text(Direction::Egress, &p.egress, &mut s);
    s
}

// ---------------------------------------------------------------------------------------------
// explain
// ---------------------------------------------------------------------------------------------

pub fn explain(socket: &Path, a: &ExplainArgs) -> Result<()> {
    let snap = Snapshot::load(socket)?;
    let q = Query {
        from: a.from.clone(),
        to: a.to.clone(),
        proto: parse_proto(&a.protocol)?,
        port: a.port,
        ipv6: a.ipv6,
    };
    let e = snap.explain(&q)?;
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&e)?),
        Output::Table => print!("{}", explain_text(&e)),
    }
    Ok(())
}

pub fn explain_text(e: &Explanation) -> String {
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
    for st in &e.steps {
        s.push_str(&format!(
            "  {} of {}: {}\n",
            st.direction, st.pod, st.summary
        ));
        for h in &st.hints {
            s.push_str(&format!("    - {h}\n"));
        }
    }
    for n in &e.notes {
        s.push_str(&format!("  note: {n}\n"));
    }
    s
}

// ---------------------------------------------------------------------------------------------
// stats
// ---------------------------------------------------------------------------------------------

pub fn stats(socket: &Path, a: &StatsArgs) -> Result<()> {
    let report = match request_one(socket, &Request::Stats)? {
        Reply::Stats(r) => *r,
        Reply::Error { message } => bail!("agent: {message}"),
        other => bail!("unexpected reply: {other:?}"),
    };
    match a.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Output::Table => print!("{}", stats_text(&report)),
    }
    Ok(())
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
        let name = format!("{}{}", p.policy, if p.audit { " (audit)" } else { "" });
        s.push_str(&format!("{name:<44} {:>10} {:>12}\n", p.packets, p.bytes));
        for rule in &p.rules {
            s.push_str(&format!(
                "  {:<42} {:>10} {:>12}\n",
                rule.rule, rule.packets, rule.bytes
            ));
        }
    }
    s.push_str("\nMAP            ENTRIES   CAPACITY    FILL\n");
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

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("5x").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("").is_err());
    }
}
