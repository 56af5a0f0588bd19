//! `palisade explain`: what the datapath would do with one packet, and which rule decides.
use std::path::Path;

use anyhow::Result;
use clap::Args;

use super::Output;
use crate::inspect::{Explanation, Query, Snapshot, Target, parse_proto};

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
        if let Some(d) = &st.domain {
            s.push_str(&format!("    - the peer is {d}\n"));
        }
        for h in &st.hints {
            s.push_str(&format!("    - {h}\n"));
        }
    }
    for n in &e.notes {
        s.push_str(&format!("  note: {n}\n"));
    }
    s
}
