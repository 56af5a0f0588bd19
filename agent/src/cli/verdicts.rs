//! `palisade verdicts`: the agent's verdict history and, with `--follow`, the live stream.
use std::{path::Path, time::Duration};

use anyhow::{Result, bail};
use clap::Args;

use super::{Output, Row, Stream, now_ms, parse_duration, print_rows};
use crate::api::{Filter, FlowEnd, Reply, Request, Verdict};
use crate::control::request;
use crate::inspect::VerdictKind;

fn parse_verdict(s: &str) -> Result<VerdictKind, String> {
    s.parse().map_err(|e: anyhow::Error| e.to_string())
}

/// `[NAMESPACE/]NAME`, as Hubble takes it: a bare name is in namespace `default`.
fn parse_pod(s: &str) -> Result<String, String> {
    match s.split_once('/') {
        None if !s.is_empty() => Ok(format!("default/{s}")),
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(s.to_string())
        }
        _ => Err(format!("{s:?} is not [NAMESPACE/]NAME")),
    }
}

/// The filters are Hubble's (`hubble observe`) where Palisade has the same filter: `--pod`,
/// `--from-pod`, `--to-pod`, `--namespace`, `--from-namespace`, `--to-namespace`, `--verdict`
/// (FORWARDED, DROPPED, AUDIT too), `--since`, `--last`, `--follow`.
#[derive(Args, Debug)]
pub struct VerdictsArgs {
    /// Keep printing new verdicts as they come (-o json: one object per line; -o yaml: one
    /// document per verdict).
    #[arg(short, long)]
    pub follow: bool,
    /// Only verdicts where this pod is the source, destination or endpoint. A bare NAME is in
    /// namespace `default`.
    #[arg(long, value_name = "[NS/]NAME", value_parser = parse_pod)]
    pub pod: Option<String>,
    /// Only verdicts whose source is this pod.
    #[arg(long, value_name = "[NS/]NAME", value_parser = parse_pod)]
    pub from_pod: Option<String>,
    /// Only verdicts whose destination is this pod.
    #[arg(long, value_name = "[NS/]NAME", value_parser = parse_pod)]
    pub to_pod: Option<String>,
    /// Only verdicts that concern a pod of this namespace.
    #[arg(short, long, value_name = "NS")]
    pub namespace: Option<String>,
    /// Only verdicts whose source is a pod of this namespace.
    #[arg(long, value_name = "NS")]
    pub from_namespace: Option<String>,
    /// Only verdicts whose destination is a pod of this namespace.
    #[arg(long, value_name = "NS")]
    pub to_namespace: Option<String>,
    /// allowed, dropped or would-drop (audit); any case, and Hubble's FORWARDED (allowed) and
    /// AUDIT (would-drop).
    #[arg(long, value_name = "VERDICT", value_parser = parse_verdict)]
    pub verdict: Option<VerdictKind>,
    /// Only verdicts of the last DURATION (30s, 5m, 1h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub since: Option<Duration>,
    /// At most this many (the most recent) from the history.
    #[arg(long, visible_alias = "last", value_name = "N")]
    pub limit: Option<usize>,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

impl VerdictsArgs {
    pub fn filter(&self) -> Filter {
        Filter {
            pod: self.pod.clone(),
            namespace: self.namespace.clone(),
            verdict: self.verdict,
            since_unix_ms: self
                .since
                .map(|d| now_ms().saturating_sub(d.as_millis() as u64)),
            from_pod: self.from_pod.clone(),
            to_pod: self.to_pod.clone(),
            from_namespace: self.from_namespace.clone(),
            to_namespace: self.to_namespace.clone(),
        }
    }
}

pub fn verdicts(socket: &Path, a: &VerdictsArgs) -> Result<()> {
    let req = Request::Verdicts {
        filter: a.filter(),
        follow: a.follow,
        limit: a.limit,
    };
    let mut past = Vec::new();
    let mut stream = a.follow.then(|| Stream::new(std::io::stdout(), a.output));
    let mut streaming = false;
    for reply in request(socket, &req)? {
        match reply? {
            Reply::Verdict(v) => match &mut stream {
                Some(s) if streaming => s.item(&*v)?,
                _ => past.push(*v),
            },
            Reply::End => {
                let Some(s) = &mut stream else {
                    print_rows(&past, a.output)?;
                    return Ok(());
                };
                s.header::<Verdict>()?;
                for v in &past {
                    s.item(v)?;
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

/// `ip:port`, `[ip6]:port`, or the address alone.
fn address(e: &FlowEnd) -> String {
    match e.port {
        Some(p) => std::net::SocketAddr::new(e.ip, p).to_string(),
        None => e.ip.to_string(),
    }
}

/// One row per verdict: DIR says which end judged (egress: the source pod's program; ingress:
/// the destination's), so a flow between two local pods shows up once per end.
trait DestinationName {
    fn destination_name(&self) -> String;
}

impl DestinationName for Verdict {
    /// The destination, with the name the pod's DNS answer gave it.
    fn destination_name(&self) -> String {
        match &self.domain {
            Some(d) => format!("{} ({d})", self.destination.name()),
            None => self.destination.name(),
        }
    }
}

impl Row for Verdict {
    fn headers(wide: bool) -> Vec<&'static str> {
        if wide {
            vec![
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
                "BYTES",
            ]
        } else {
            vec![
                "TIME (UTC)",
                "SOURCE",
                "DESTINATION",
                "PORT",
                "DIR",
                "VERDICT",
                "POLICY",
                "REASON",
            ]
        }
    }

    fn cells(&self, wide: bool) -> Vec<String> {
        let port = match self.destination.port {
            Some(p) => format!("{p}/{}", self.protocol),
            None => self.protocol.clone(),
        };
        if wide {
            return vec![
                self.time.clone(),
                self.source.name(),
                address(&self.source),
                self.destination_name(),
                address(&self.destination),
                port,
                self.direction.to_string(),
                self.verdict.to_string(),
                self.policy_text(),
                self.reason.clone(),
                self.bytes.to_string(),
            ];
        }
        vec![
            self.time.get(11..23).unwrap_or(&self.time).to_string(),
            self.source.name(),
            self.destination_name(),
            port,
            self.direction.to_string(),
            self.verdict.to_string(),
            self.policy_text(),
            self.reason.clone(),
        ]
    }

    fn stream_widths(wide: bool) -> Vec<usize> {
        if wide {
            vec![24, 24, 22, 24, 22, 10, 7, 10, 40, 16, 0]
        } else {
            vec![12, 24, 24, 10, 7, 10, 40, 0]
        }
    }

    fn empty() -> &'static str {
        "(no verdicts recorded yet)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: VerdictsArgs,
    }

    fn parse(args: &[&str]) -> Result<VerdictsArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("verdicts").chain(args.iter().copied())).map(|c| c.a)
    }

    #[test]
    fn hubble_names_are_accepted() {
        let a = parse(&[
            "--from-pod",
            "shop/frontend",
            "--to-pod",
            "db",
            "--verdict",
            "DROPPED",
            "--last",
            "5",
            "--from-namespace",
            "shop",
            "--to-namespace",
            "default",
        ])
        .unwrap();
        let f = a.filter();
        assert_eq!(f.from_pod.as_deref(), Some("shop/frontend"));
        assert_eq!(
            f.to_pod.as_deref(),
            Some("default/db"),
            "a bare name: default/"
        );
        assert_eq!(f.verdict, Some(VerdictKind::Dropped));
        assert_eq!(f.from_namespace.as_deref(), Some("shop"));
        assert_eq!(f.to_namespace.as_deref(), Some("default"));
        assert_eq!(a.limit, Some(5));
        for (word, kind) in [
            ("FORWARDED", VerdictKind::Allowed),
            ("forwarded", VerdictKind::Allowed),
            ("Allowed", VerdictKind::Allowed),
            ("dropped", VerdictKind::Dropped),
            ("AUDIT", VerdictKind::WouldDrop),
            ("would-drop", VerdictKind::WouldDrop),
        ] {
            assert_eq!(parse(&["--verdict", word]).unwrap().verdict, Some(kind));
        }
    }

    #[test]
    fn bad_filters_are_refused_with_what_is_wanted() {
        let e = parse(&["--verdict", "REDIRECTED"]).unwrap_err().to_string();
        assert!(e.contains("allowed, dropped or would-drop"), "{e}");
        let e = parse(&["--from-pod", "a/b/c"]).unwrap_err().to_string();
        assert!(e.contains("not [NAMESPACE/]NAME"), "{e}");
        let e = parse(&["-o", "xml"]).unwrap_err().to_string();
        assert!(e.contains("table, wide, json, yaml"), "{e}");
    }
}
