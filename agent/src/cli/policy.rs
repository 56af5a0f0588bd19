//! `palisade policy show`: a pod's effective rules, decoded from the pinned maps.
use std::path::Path;

use anyhow::Result;
use clap::{Args, Subcommand};
use palisade_policy::state::Direction;

use super::{Output, row};
use crate::inspect::{DirectionPolicy, PodPolicy, Snapshot};

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
