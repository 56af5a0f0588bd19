//! `palisade verdicts`: the agent's verdict history and, with `--follow`, the live stream.
use std::{io::Write, path::Path, time::Duration};

use anyhow::{Result, bail};
use clap::Args;

use super::{Output, now_ms, parse_duration, row};
use crate::api::{Filter, Reply, Request, Verdict};
use crate::control::request;
use crate::inspect::VerdictKind;

fn parse_verdict(s: &str) -> Result<VerdictKind, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
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
