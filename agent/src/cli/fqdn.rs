//! `palisade fqdn`: the names each pod's DNS answers resolved for its `domainNames` peers, the
//! addresses learned, until when they admit new connections, and the server that answered
//! (from `fqdn.json` beside the socket, which the agent writes within a second of learning).
use std::path::Path;

use anyhow::Result;
use clap::Args;
use serde::Serialize;

use super::Output;
use crate::fqdn::{FQDN_FILE, Learned};

#[derive(Args, Debug)]
pub struct FqdnArgs {
    /// Only this pod's names (NAMESPACE/NAME).
    #[arg(long, value_name = "NS/POD")]
    pub pod: Option<String>,
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// One learned address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FqdnRow {
    pub pod: String,
    pub name: String,
    pub address: String,
    /// Seconds it still admits new connections (negative: expired, kept while a flow uses it).
    pub expires_in_s: i64,
    pub server: String,
    /// The CNAME chain from the name to the address.
    pub chain: Vec<String>,
    pub answered: String,
}

/// The rows of `learned` at monotonic time `now_ns`, for `pod` if given.
pub fn fqdn_rows(learned: &Learned, now_ns: u64, pod: Option<&str>) -> Vec<FqdnRow> {
    let mut rows = Vec::new();
    for names in learned.endpoints.values() {
        if pod.is_some_and(|p| p != names.pod) {
            continue;
        }
        for (name, e) in &names.names {
            for (ip, expires) in &e.addresses {
                rows.push(FqdnRow {
                    pod: names.pod.clone(),
                    name: name.clone(),
                    address: ip.to_string(),
                    expires_in_s: (*expires as i128 - now_ns as i128).div_euclid(1_000_000_000)
                        as i64,
                    server: e.server.clone(),
                    chain: e.chain.clone(),
                    answered: crate::verdicts::rfc3339_ms(e.answered_unix_ms),
                });
            }
        }
    }
    rows
}

impl super::Row for FqdnRow {
    fn headers(wide: bool) -> Vec<&'static str> {
        let mut h = vec!["POD", "NAME", "ADDRESS", "EXPIRES", "SERVER", "VIA"];
        if wide {
            h.push("ANSWERED");
        }
        h
    }

    fn cells(&self, wide: bool) -> Vec<String> {
        let mut c = vec![
            self.pod.clone(),
            self.name.clone(),
            self.address.clone(),
            if self.expires_in_s >= 0 {
                format!("in {}s", self.expires_in_s)
            } else {
                "expired (in use)".to_string()
            },
            self.server.clone(),
            if self.chain.is_empty() {
                "-".to_string()
            } else {
                self.chain.join(" > ")
            },
        ];
        if wide {
            c.push(self.answered.clone());
        }
        c
    }

    fn empty() -> &'static str {
        "(no names learned)"
    }
}

/// The table of `rows`.
pub fn fqdn_table(rows: &[FqdnRow]) -> String {
    super::render_rows(rows, Output::Table).unwrap_or_default()
}

pub fn fqdn(socket: &Path, a: &FqdnArgs) -> Result<()> {
    if let Some(p) = &a.pod
        && p.split_once('/')
            .is_none_or(|(ns, n)| ns.is_empty() || n.is_empty())
    {
        anyhow::bail!("--pod {p:?}: want NAMESPACE/NAME");
    }
    let learned = Learned::load(&socket.with_file_name(FQDN_FILE));
    let rows = fqdn_rows(
        &learned,
        palisade_datapath::dns::now_coarse_ns(),
        a.pod.as_deref(),
    );
    super::print_rows(&rows, a.output)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fqdn::learned::{EndpointNames, NameEntry};

    #[test]
    fn rows_name_the_pod_the_name_the_chain_and_the_time_left() {
        let mut l = Learned::default();
        let mut n = EndpointNames {
            pod: "demo/a".into(),
            ..Default::default()
        };
        n.names.insert(
            "www.alias.test".into(),
            NameEntry {
                chain: vec!["edge.cdn.test".into()],
                server: "10.0.0.3".into(),
                answered_unix_ms: 0,
                addresses: [("192.0.2.30".parse().unwrap(), 40_000_000_000)].into(),
            },
        );
        l.endpoints.insert(1, n);
        let rows = fqdn_rows(&l, 10_000_000_000, None);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].expires_in_s, 30);
        let t = fqdn_table(&rows);
        assert!(
            t.contains("demo/a  www.alias.test  192.0.2.30  in 30s"),
            "{t}"
        );
        assert!(t.contains("edge.cdn.test"), "{t}");
        assert!(fqdn_rows(&l, 10_000_000_000, Some("demo/b")).is_empty());
        assert_eq!(fqdn_rows(&l, 50_000_000_000, None)[0].expires_in_s, -10);
    }
}
