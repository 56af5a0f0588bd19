//! `kubectl palisade`: the CLI for the whole cluster. The `palisade` binary answers to it when
//! it is invoked as `kubectl-palisade` (a link to it on the PATH makes it a kubectl plugin),
//! and as `palisade cluster`.
//!
//! It finds the API server through the kubeconfig (`--kubeconfig`, `KUBECONFIG`,
//! `~/.kube/config`, `--context`), the Palisade agent pods by the DaemonSet's labels in
//! `palisade-system` (`--palisade-namespace`), the node of each pod a command names, and runs
//! the node's own `palisade <verb> -o json` in the agent's container through the pod's `exec`
//! subresource, as `kubectl exec` does (`reach`): no port is opened on the nodes and the
//! plugin needs `pods/exec` in the Palisade namespace and nothing more than reading pods
//! elsewhere. The nodes' answers (the types of `api` and `inspect`, which the node's CLI
//! prints) are put together by plain functions (`view`) and rendered by the one renderer of
//! every read command (`cli::output`) with the node named (`render`).
//!
//! - `verdicts`: every node's history merged by time; `--follow` then prints what every
//!   node records, as it comes.
//! - `explain --from NS/POD --to NS/POD`: the source's egress from the source's node, the
//!   destination's ingress from the destination's node, and the flow's verdict (exit status
//!   0 allowed, 1 dropped, 2 error, as `palisade explain`).
//! - `policy show NS/POD`: from the pod's node.
//! - `stats`: per node, and summed.
//! - `agents`: the agent pod of each node.
//!
//! A node whose agent does not answer is named with the reason, and the others still answer
//! (exit status 1).
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use futures::future::join_all;
use serde::de::DeserializeOwned;

mod reach;
mod render;
mod view;

pub use reach::{Cluster, ExecOutput, PluginError, connect};
pub use view::{
    AgentPod, ClusterExplanation, ClusterStats, ClusterVerdicts, JudgingNode, NodeAnswer,
    NodeFailure, NodePolicy, NodeStats, NodeVerdict, REMOTE_BINARY, SeenVerdicts, agents_by_node,
    combine_halves, combined_verdict, exit_code_of, merge_verdicts, remote_explain_args,
    remote_policy_show_args, remote_stats_args, remote_verdicts_args, sum_reports,
};

use crate::api::Verdict;
use crate::cli::{
    self, EXIT_CODES_HELP, EXIT_FAILURE, ExplainArgs, Output, PolicyArgs, PolicyCommand, StatsArgs,
    Stream, VerdictsArgs,
};
use crate::inspect::{Explanation, PodPolicy, Target};

/// The name the binary answers to as a kubectl plugin.
pub const PLUGIN_NAME: &str = "kubectl-palisade";
/// Where the DaemonSet runs (`manifests/`).
pub const PALISADE_NAMESPACE: &str = "palisade-system";
/// The DaemonSet's pod labels (`manifests/daemonset.yaml`).
pub const AGENT_SELECTOR: &str =
    "app.kubernetes.io/name=palisade,app.kubernetes.io/component=agent";
/// The agent's container in those pods.
pub const AGENT_CONTAINER: &str = "agent";
/// With `--follow`, the live streams repeat this much of the history before the moment the
/// history was read (what they repeat is recognised and not shown twice).
const FOLLOW_OVERLAP: Duration = Duration::from_secs(5);

/// `kubectl palisade ...` (argv[0] `kubectl-palisade`).
#[derive(Parser, Debug)]
#[command(
    name = "kubectl-palisade",
    bin_name = "kubectl palisade",
    version,
    about = "Palisade across the cluster: verdicts, explain, policy and stats from the agent of every node (reached by exec into its pod)",
    after_help = "Exit status: 0 success, 1 failure (a node that did not answer is named, the others \
                  answer), 2 bad arguments; explain: 0 allowed, 1 dropped, 2 any error."
)]
pub struct PluginCli {
    #[command(flatten)]
    pub args: ClusterArgs,
}

/// Where to find the cluster and the agents; the command.
#[derive(Args, Debug)]
pub struct ClusterArgs {
    /// The kubeconfig (default: KUBECONFIG, else ~/.kube/config, else the pod's service
    /// account).
    #[arg(long, global = true, value_name = "FILE")]
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The kubeconfig context (default: its current context).
    #[arg(long, global = true, value_name = "NAME")]
    pub context: Option<String>,
    /// The namespace of the Palisade DaemonSet.
    #[arg(long, global = true, value_name = "NS", default_value = PALISADE_NAMESPACE)]
    pub palisade_namespace: String,
    /// The label selector of the agent pods.
    #[arg(long, global = true, value_name = "SELECTOR", default_value = AGENT_SELECTOR)]
    pub agent_selector: String,
    /// The agent's container in those pods.
    #[arg(long, global = true, value_name = "NAME", default_value = AGENT_CONTAINER)]
    pub agent_container: String,
    /// How long to wait for each node's answer (not with --follow).
    #[arg(long, global = true, value_name = "DURATION", default_value = "30s", value_parser = cli::parse_duration)]
    pub timeout: Duration,
    #[command(subcommand)]
    pub command: ClusterCommand,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCommand {
    /// Recent verdicts of every node, merged by time, each with its NODE; --follow goes on
    /// with what every node records, as it comes.
    Verdicts(VerdictsArgs),
    /// Explain the verdict on a flow: the source's egress as its node judges it, the
    /// destination's ingress as its node does, and the flow's verdict.
    #[command(after_help = EXIT_CODES_HELP)]
    Explain(ExplainArgs),
    /// A pod's effective rules, from the BPF maps of its node (`policy show NS/POD`).
    Policy(PolicyArgs),
    /// Counters of every node and their sum.
    Stats(StatsArgs),
    /// The Palisade agent pod of each node.
    Agents {
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

impl ClusterCommand {
    /// The exit status of a failure: `explain`'s 1 means "dropped".
    pub fn failure_status(&self) -> u8 {
        match self {
            ClusterCommand::Explain(_) => cli::EXPLAIN_ERROR,
            _ => EXIT_FAILURE,
        }
    }
}

/// Invoked as `kubectl-palisade` (kubectl runs a plugin by that name).
pub fn invoked_as_plugin() -> bool {
    std::env::args_os()
        .next()
        .map(std::path::PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_owned()))
        .is_some_and(|n| n == PLUGIN_NAME)
}

/// Runs the command; returns its exit status.
pub fn run(args: ClusterArgs) -> Result<u8> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: ClusterArgs) -> Result<u8> {
    let client = connect(args.kubeconfig.as_deref(), args.context.as_deref()).await?;
    let cluster = Cluster::new(
        client,
        &args.palisade_namespace,
        &args.agent_selector,
        &args.agent_container,
    );
    let agents = cluster.agents().await?;
    let t = args.timeout;
    match &args.command {
        ClusterCommand::Verdicts(a) if a.follow => follow_verdicts(&cluster, &agents, a, t).await,
        ClusterCommand::Verdicts(a) => {
            let (merged, _) = verdicts(&cluster, &agents, a, t).await;
            cli::print(&merged, a.output)?;
            Ok(report(&merged.failures))
        }
        ClusterCommand::Explain(a) => explain(&cluster, &agents, a, t).await,
        ClusterCommand::Policy(PolicyArgs {
            command: PolicyCommand::Show { pod, output },
        }) => {
            let agent = cluster.agent_of(pod, &agents).await?;
            let out = cluster
                .exec(&agent, &remote_policy_show_args(pod), t)
                .await?;
            let policy: PodPolicy = answer(&agent, &out, &[0])?;
            let answer = NodePolicy {
                node: agent.node.clone(),
                agent: agent.pod.clone(),
                policy,
            };
            cli::print(&answer, *output)?;
            Ok(0)
        }
        ClusterCommand::Stats(a) => {
            let stats = stats(&cluster, &agents, t).await;
            cli::print(&stats, a.output)?;
            Ok(report(&stats.failures()))
        }
        ClusterCommand::Agents { output } => {
            cli::print_rows(&agents, *output)?;
            Ok(0)
        }
    }
}

/// Names every node that did not answer, on stderr; the exit status.
fn report(failures: &[NodeFailure]) -> u8 {
    for f in failures {
        eprintln!("Error: {f}");
    }
    if failures.is_empty() { 0 } else { EXIT_FAILURE }
}

/// The node's answer: its output as JSON, when it exited with one of `ok` (else what it said).
fn answer<T: DeserializeOwned>(
    agent: &AgentPod,
    out: &ExecOutput,
    ok: &[i32],
) -> Result<T, PluginError> {
    let err = |message: String| PluginError::Agent {
        node: agent.node.clone(),
        agent: agent.pod.clone(),
        message,
    };
    if !ok.contains(&out.exit_code) {
        return Err(err(out.error_text()));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| {
        err(format!(
            "its answer is not what this plugin reads ({e}): is the agent of another version?"
        ))
    })
}

fn failure(agent: &AgentPod, e: PluginError) -> NodeFailure {
    let error = match e {
        PluginError::Agent { message, .. } => message,
        other => other.to_string(),
    };
    NodeFailure {
        node: agent.node.clone(),
        pod: Some(agent.pod.clone()),
        error,
    }
}

/// Every node's history, merged; and the agents that answered.
async fn verdicts(
    cluster: &Cluster,
    agents: &[AgentPod],
    a: &VerdictsArgs,
    timeout: Duration,
) -> (ClusterVerdicts, Vec<AgentPod>) {
    let command = remote_verdicts_args(a, None);
    let command = &command;
    let answers = join_all(agents.iter().map(|agent| async move {
        let r = cluster.exec(agent, command, timeout).await;
        (
            agent,
            r.and_then(|out| answer::<Vec<Verdict>>(agent, &out, &[0])),
        )
    }))
    .await;
    let mut per_node = Vec::new();
    let mut failures = Vec::new();
    let mut answered = Vec::new();
    for (agent, r) in answers {
        match r {
            Ok(v) => {
                per_node.push((agent.node.clone(), v));
                answered.push(agent.clone());
            }
            Err(e) => failures.push(failure(agent, e)),
        }
    }
    let merged = ClusterVerdicts {
        verdicts: merge_verdicts(per_node, a.limit),
        failures,
    };
    (merged, answered)
}

/// What a node's follow stream sends the printing loop.
enum Followed {
    Line { node: String, line: String },
    Ended(NodeFailure),
}

/// The merged history, then every node's new verdicts as they come (JSON lines with -o json).
async fn follow_verdicts(
    cluster: &Cluster,
    agents: &[AgentPod],
    a: &VerdictsArgs,
    timeout: Duration,
) -> Result<u8> {
    let started = Instant::now();
    let (history, answered) = verdicts(cluster, agents, a, timeout).await;
    let mut out = Stream::new(std::io::stdout(), a.output);
    out.header::<NodeVerdict>()?;
    let mut seen = SeenVerdicts::default();
    for v in &history.verdicts {
        seen.admit(v);
        out.item(v)?;
    }
    report(&history.failures);
    if answered.is_empty() {
        bail!("no node's agent answered");
    }
    let command = remote_verdicts_args(a, Some(started.elapsed() + FOLLOW_OVERLAP));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Followed>();
    for agent in answered.iter().cloned() {
        let (cluster, command, tx) = (cluster.clone(), command.clone(), tx.clone());
        tokio::spawn(async move {
            let node = agent.node.clone();
            let lines = tx.clone();
            let ended = cluster
                .exec_lines(&agent, &command, |line| {
                    let _ = lines.send(Followed::Line {
                        node: node.clone(),
                        line: line.to_string(),
                    });
                })
                .await;
            let _ = tx.send(Followed::Ended(failure(&agent, ended)));
        });
    }
    drop(tx);
    let mut live = answered.len();
    while let Some(msg) = rx.recv().await {
        match msg {
            Followed::Line { node, line } => {
                let verdict: Verdict = match serde_json::from_str(&line) {
                    Ok(v) => v,
                    Err(e) => {
                        eprintln!("Error: node {node}: an unreadable verdict ({e}): {line}");
                        continue;
                    }
                };
                let v = NodeVerdict { node, verdict };
                if seen.admit(&v) {
                    out.item(&v)?;
                }
            }
            Followed::Ended(f) => {
                eprintln!("Error: {f}");
                live -= 1;
                if live == 0 {
                    bail!("no node's stream of verdicts is left");
                }
            }
        }
    }
    Ok(EXIT_FAILURE)
}

/// Each half from the node that enforces it; the exit status of the flow's verdict.
async fn explain(
    cluster: &Cluster,
    agents: &[AgentPod],
    a: &ExplainArgs,
    timeout: Duration,
) -> Result<u8> {
    let agent_of = |t: &Target| {
        let t = t.clone();
        async move {
            match t {
                Target::Pod(p) => cluster.agent_of(&p, agents).await.map(Some),
                Target::Ip(_) => Ok(None),
            }
        }
    };
    let (source_agent, destination_agent) = (agent_of(&a.from).await?, agent_of(&a.to).await?);
    if source_agent.is_none() && destination_agent.is_none() {
        bail!(
            "name a pod (NAMESPACE/POD) at one end at least: no node judges traffic between two addresses"
        );
    }
    let command = remote_explain_args(a);
    let ask = |agent: AgentPod| {
        let command = command.clone();
        async move {
            let out = cluster.exec(&agent, &command, timeout).await?;
            // explain's exit status is its verdict: 0 allowed, 1 dropped.
            let explanation: Explanation = answer(&agent, &out, &[0, 1])?;
            Ok::<_, PluginError>(NodeAnswer {
                node: agent.node.clone(),
                pod: agent.pod.clone(),
                explanation,
            })
        }
    };
    let same_node = match (&source_agent, &destination_agent) {
        (Some(s), Some(d)) => s.node == d.node,
        _ => false,
    };
    let (source, destination) = if same_node {
        let one = ask(source_agent.clone().expect("checked")).await?;
        (Some(one.clone()), Some(one))
    } else {
        let (s, d) = tokio::join!(
            async {
                match source_agent.clone() {
                    Some(agent) => ask(agent).await.map(Some),
                    None => Ok(None),
                }
            },
            async {
                match destination_agent.clone() {
                    Some(agent) => ask(agent).await.map(Some),
                    None => Ok(None),
                }
            }
        );
        (s?, d?)
    };
    let combined =
        combine_halves(source.as_ref(), destination.as_ref()).context("no node answered")?;
    cli::print(&combined, a.output)?;
    Ok(cli::exit_code(combined.explanation.verdict))
}

/// Every node's stats, or why it has none.
async fn stats(cluster: &Cluster, agents: &[AgentPod], timeout: Duration) -> ClusterStats {
    let command = remote_stats_args();
    let command = &command;
    let nodes = join_all(agents.iter().map(|agent| async move {
        let r = cluster.exec(agent, command, timeout).await;
        match r.and_then(|out| answer::<crate::api::StatsReport>(agent, &out, &[0])) {
            Ok(s) => NodeStats {
                node: agent.node.clone(),
                agent: Some(agent.pod.clone()),
                stats: Some(s),
                error: None,
            },
            Err(e) => {
                let f = failure(agent, e);
                NodeStats {
                    node: f.node,
                    agent: f.pod,
                    stats: None,
                    error: Some(f.error),
                }
            }
        }
    }))
    .await;
    ClusterStats::new(nodes)
}
