//! `palisade policy show`: a pod's effective rules, decoded from the pinned maps.
use std::path::Path;

use anyhow::Result;
use clap::{Args, Subcommand};
use palisade_policy::state::Direction;

use super::{Output, Render, print, table_row as row};
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
            print(&p, *output)?;
            Ok(())
        }
    }
}

fn direction_text(dir: Direction, d: &DirectionPolicy, wide: bool, out: &mut String) {
    let name = dir.to_string();
    if !d.isolated && !d.tiered {
        out.push_str(&format!(
            "{name}: not isolated (no policy selects the pod for {name}): everything allowed\n"
        ));
    } else {
        let mode = if d.audit {
            " [AUDIT: denials are recorded as would-drop and pass]"
        } else {
            ""
        };
        if d.isolated {
            out.push_str(&format!(
                "{name}: isolated by {}{mode}\n",
                d.policies.join(", ")
            ));
        } else {
            out.push_str(&format!(
                "{name}: no NetworkPolicy isolates the pod (after the Admin tier, the Baseline tier decides, else allowed)\n"
            ));
        }
        if d.tiered {
            out.push_str(&format!(
                "  ClusterNetworkPolicies: {}\n",
                d.cluster_policies.join(", ")
            ));
        }
        if d.rules.is_empty() {
            if d.isolated {
                out.push_str(
                    "  nothing allowed (replies of connections allowed in the other direction pass)\n",
                );
            }
        } else {
            rules_table(dir, d, wide, out);
        }
    }
    if !d.audit_ignored.is_empty() {
        out.push_str(&format!(
            "  audit policies not in force for {name} (enforcing policies isolate the pod): {}\n",
            d.audit_ignored.join(", ")
        ));
    }
}

/// The rule rows; with an ACTION column (Admin and Baseline rules: Accept, Deny, Pass;
/// NetworkPolicy rules: allow) where ClusterNetworkPolicies select the pod. `wide`: the rule
/// ids too, and every peer pod named.
fn rules_table(dir: Direction, d: &DirectionPolicy, wide: bool, out: &mut String) {
    let peer_word = if dir == Direction::Ingress {
        "FROM"
    } else {
        "TO"
    };
    let cells: Vec<Vec<String>> = d
        .rules
        .iter()
        .map(|r| {
            let (policy, rule, action) = match &r.rule.tier {
                Some(t) => (
                    format!("{} ({} {})", r.rule.policy, t.tier, t.priority),
                    match &t.name {
                        Some(n) => format!("{}[{}] '{n}'", r.rule.direction, r.rule.index),
                        None => format!("{}[{}]", r.rule.direction, r.rule.index),
                    },
                    if t.fails_closed {
                        format!("{} (fails closed)", t.action)
                    } else {
                        t.action.to_string()
                    },
                ),
                None => (
                    format!(
                        "{}{}",
                        r.rule.policy_id(),
                        if r.rule.audit { " (audit)" } else { "" }
                    ),
                    format!("{}[{}]", r.rule.direction, r.rule.index),
                    "allow".to_string(),
                ),
            };
            let mut c = vec![policy, rule];
            if wide {
                c.push(r.rule.id.to_string());
            }
            if d.tiered {
                c.push(action);
            }
            c.push(if wide {
                r.peer.text_all()
            } else {
                r.peer.text()
            });
            c.push(r.ports_text());
            c
        })
        .collect();
    let mut header = vec!["POLICY".to_string(), "RULE".to_string()];
    if wide {
        header.push("ID".to_string());
    }
    if d.tiered {
        header.push("ACTION".to_string());
    }
    header.push(peer_word.to_string());
    header.push("PORTS".to_string());
    let mut widths = vec![0usize; header.len()];
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

pub fn policy_text(p: &PodPolicy) -> String {
    pod_policy_text(p, false)
}

fn pod_policy_text(p: &PodPolicy, wide: bool) -> String {
    let mut s = format!(
        "{}  (endpoint {}, ifindex {}, revision {})\n",
        p.pod, p.endpoint, p.ifindex, p.revision
    );
    if p.pending {
        s.push_str(
            "PENDING: the endpoint's entries could not be written; all its traffic is dropped\n",
        );
    }
    direction_text(Direction::Ingress, &p.ingress, wide, &mut s);
    direction_text(Direction::Egress, &p.egress, wide, &mut s);
    s
}

impl Render for PodPolicy {
    fn table(&self) -> String {
        pod_policy_text(self, false)
    }
    fn wide(&self) -> String {
        pod_policy_text(self, true)
    }
}
