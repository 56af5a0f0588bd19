//! The CLI commands of the `palisade` binary, one file per verb: `verdicts`, `policy show`,
//! `explain`, `stats`, `fqdn`, `version`. This module holds what they share: `-o` and the rendering
//! behind it (`output`: table, wide, json, yaml for any read command), exit statuses, the
//! agent's address flags, durations; and completions and man pages (`docs`).
//!
//! `verdicts` and `stats` ask the running agent over its unix socket (`control`); `policy
//! show` and `explain` read the pinned maps themselves, named through the agent's state file
//! (`inspect`), so they show what the datapath enforces, even while the agent is restarting.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

mod docs;
mod explain;
mod fqdn;
mod output;
mod policy;
mod stats;
mod verdicts;
mod version;

pub use docs::{DocsError, completion, write_docs};
pub use explain::{
    EXIT_CODES_HELP, EXPLAIN_ERROR, ExplainArgs, exit_code, explain, explain_text, explanation_text,
};
pub use fqdn::{FqdnArgs, FqdnRow, fqdn, fqdn_rows, fqdn_table};
pub use output::{
    Output, Render, RenderError, Row, Stream, print, print_rows, render, render_rows, table_row,
};
pub use policy::{PolicyArgs, PolicyCommand, policy, policy_text};
pub use stats::{StatsArgs, stats, stats_text};
pub use verdicts::{VerdictsArgs, verdicts};
pub use version::{KernelFeatures, VersionArgs, VersionInfo, version};

/// The exit status of a command that failed (no agent, an unknown pod, ...); `explain` exits
/// with [`EXPLAIN_ERROR`] instead, its 1 meaning "dropped" ([`EXIT_CODES_HELP`]).
pub const EXIT_FAILURE: u8 = 1;
/// Bad arguments (clap's own exit status, with its message and usage).
pub const EXIT_USAGE: u8 = 2;

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

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
