//! Conformance runner: the upstream Kubernetes NetworkPolicy e2e cases (as data, schema in
//! tests/conformance/README.md) on the netns rig, with the standalone agent fed by files.
//!
//! For each case: a node of 9 pod namespaces (x/a … z/c) serving the case's ports, a fresh
//! bpffs and agent; each step's actions rewrite the manifest files; after the agent has
//! reconciled them, every probe's 72-pair matrix is compared with the expectation, retried for
//! a bounded convergence window. Ends with `N passed, M failed`; non-zero exit on any failure.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, Result, bail};
use clap::Parser;
use palisade_tests::{
    agent::AgentProcess,
    rig::{Node, NodeSpec, PodSpec, Proto},
};
use serde::Deserialize;
use serde_json::Value;

#[derive(Parser)]
#[command(about = "Run NetworkPolicy conformance cases on the netns rig")]
struct Args {
    /// The palisade agent binary.
    #[arg(long)]
    agent: PathBuf,
    /// Directory of case files.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/conformance/cases"))]
    cases: PathBuf,
    /// Only cases whose name contains this.
    #[arg(long)]
    filter: Option<String>,
    /// Give pods IPv6 addresses and probe over IPv6.
    #[arg(long)]
    ipv6: bool,
    /// Per-probe timeout in milliseconds.
    #[arg(long, default_value_t = 800)]
    probe_timeout_ms: u64,
    /// How long a mismatching matrix is retried before the probe fails, in milliseconds.
    #[arg(long, default_value_t = 6000)]
    converge_ms: u64,
    /// Also compute every probe's matrix with `palisade explain` (from the pinned maps) and
    /// fail the probe if it differs from the probed one.
    #[arg(long)]
    check_explain: bool,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    served: Served,
    namespaces: BTreeMap<String, NamespaceDef>,
    pods: Vec<PodDef>,
    #[serde(default)]
    policies: Vec<PolicyDef>,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Served {
    ports: Vec<u16>,
    protocols: Vec<String>,
}

#[derive(Deserialize, Clone)]
struct NamespaceDef {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize, Clone)]
struct PodDef {
    namespace: String,
    name: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    ports: Vec<PortDef>,
}

#[derive(Deserialize, Clone)]
struct PortDef {
    port: u16,
    protocol: String,
    name: String,
}

#[derive(Deserialize)]
struct PolicyDef {
    id: String,
    object: Value,
}

#[derive(Deserialize)]
struct Step {
    description: String,
    #[serde(default)]
    actions: Vec<Action>,
    probes: Vec<ProbeDef>,
}

#[derive(Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
enum Action {
    CreatePolicy {
        policy: String,
    },
    UpdatePolicy {
        policy: String,
    },
    DeleteAllPolicies {
        #[serde(default)]
        #[allow(dead_code)]
        deletes: Vec<String>,
    },
    AddNamespaceLabels {
        namespace: String,
        labels: BTreeMap<String, String>,
    },
    AddPodLabels {
        pod: String,
        labels: BTreeMap<String, String>,
    },
}

#[derive(Deserialize)]
struct ProbeDef {
    port: u16,
    protocol: String,
    expect: Expect,
}

#[derive(Deserialize)]
struct Expect {
    #[serde(default)]
    deny: Vec<(String, String)>,
}

fn proto(name: &str) -> Result<Proto> {
    Ok(match name.to_ascii_uppercase().as_str() {
        "TCP" => Proto::Tcp,
        "UDP" => Proto::Udp,
        "SCTP" => Proto::Sctp,
        other => bail!("unknown protocol {other}"),
    })
}

/// The cluster as the files describe it, rewritten after every action.
struct World {
    namespaces: BTreeMap<String, NamespaceDef>,
    pods: Vec<PodDef>,
    /// Current policies by namespace/name.
    policies: BTreeMap<String, Value>,
    ips: BTreeMap<String, IpAddr>,
}

impl World {
    fn pod_key(p: &PodDef) -> String {
        format!("{}/{}", p.namespace, p.name)
    }

    fn write(&self, dir: &Path) -> Result<()> {
        let mut docs = Vec::new();
        for (name, ns) in &self.namespaces {
            let mut labels = ns.labels.clone();
            labels.insert("kubernetes.io/metadata.name".into(), name.clone());
            docs.push(serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": name, "labels": labels},
            }));
        }
        for p in &self.pods {
            let ip = self.ips[&Self::pod_key(p)].to_string();
            let ports: Vec<_> = p
                .ports
                .iter()
                .map(|port| {
                    serde_json::json!({"name": port.name, "containerPort": port.port, "protocol": port.protocol})
                })
                .collect();
            docs.push(serde_json::json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": p.name, "namespace": p.namespace, "labels": p.labels},
                "spec": {"containers": [{"name": "cont-80-tcp", "image": "agnhost", "ports": ports}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
            }));
        }
        write_docs(&dir.join("cluster.yaml"), &docs)?;
        let policies: Vec<serde_json::Value> = self
            .policies
            .values()
            .map(|v| serde_json::to_value(v).expect("YAML value converts to JSON"))
            .collect();
        write_docs(&dir.join("policies.yaml"), &policies)
    }

    /// Expands `{{ip ns/pod}}` and `{{cidr ns/pod len}}` in every string of a policy. In IPv6
    /// mode, `{{ip ns/pod}}/32` becomes `<ip>/128`, as upstream does for IPv6 pods.
    fn expand(&self, v: &Value) -> Result<Value> {
        Ok(match v {
            Value::String(s) => Value::String(self.expand_str(s)?),
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .map(|i| self.expand(i))
                    .collect::<Result<_>>()?,
            ),
            Value::Object(m) => {
                let mut out = serde_json::Map::new();
                for (k, v) in m {
                    out.insert(k.clone(), self.expand(v)?);
                }
                Value::Object(out)
            }
            other => other.clone(),
        })
    }

    fn expand_str(&self, s: &str) -> Result<String> {
        let mut out = String::new();
        let mut rest = s;
        while let Some(start) = rest.find("{{") {
            out.push_str(&rest[..start]);
            let end = rest[start..]
                .find("}}")
                .with_context(|| format!("unclosed placeholder in {s:?}"))?
                + start;
            let inner: Vec<&str> = rest[start + 2..end].split_whitespace().collect();
            rest = &rest[end + 2..];
            match inner.as_slice() {
                ["ip", pod] => {
                    let ip = *self
                        .ips
                        .get(*pod)
                        .with_context(|| format!("no pod {pod}"))?;
                    out.push_str(&ip.to_string());
                    if ip.is_ipv6()
                        && let Some(r) = rest.strip_prefix("/32")
                    {
                        out.push_str("/128");
                        rest = r;
                    }
                }
                ["cidr", pod, len] => {
                    let ip = *self
                        .ips
                        .get(*pod)
                        .with_context(|| format!("no pod {pod}"))?;
                    let len: u8 = len.parse()?;
                    let net = ipnetwork::IpNetwork::new(ip, len)?;
                    out.push_str(&format!("{}/{}", net.network(), len));
                }
                _ => bail!("unknown placeholder in {s:?}"),
            }
        }
        out.push_str(rest);
        Ok(out)
    }
}

/// Replaces `path` atomically with `docs`; no documents: the file goes (an empty file keeps
/// its last good objects, by design).
/// A case file, read as the agent reads YAML (1.2: `y` and `n`, namespace names here, are
/// strings, not booleans).
fn read_case(text: &str) -> Result<Case> {
    let doc = palisade_policy::manifest::yaml_documents(text)?
        .into_iter()
        .next()
        .context("an empty case file")?;
    Ok(serde_json::from_value(doc)?)
}

fn write_docs(path: &Path, docs: &[serde_json::Value]) -> Result<()> {
    if docs.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        };
    }
    let mut text = String::new();
    for d in docs {
        text.push_str("---\n");
        text.push_str(&serde_saphyr::to_string(d)?);
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

struct CaseResult {
    name: String,
    probes: usize,
    failed_probes: usize,
    elapsed: Duration,
    error: Option<String>,
}

fn render(columns: &[String], blocked: &BTreeSet<(String, String)>) -> String {
    let mut s = format!("{:>6} {}\n", "", columns.join(" "));
    for from in columns {
        s.push_str(&format!("{from:>6} "));
        for to in columns {
            let c = if from == to {
                '-'
            } else if blocked.contains(&(from.clone(), to.clone())) {
                'X'
            } else {
                '.'
            };
            s.push_str(&format!("{c:^3} "));
        }
        s.push('\n');
    }
    s
}

fn run_case(args: &Args, case: &Case, work: &Path) -> Result<(usize, usize)> {
    let pod_names: Vec<String> = case.pods.iter().map(World::pod_key).collect();
    let spec = NodeSpec {
        pods: pod_names
            .iter()
            .map(|n| PodSpec {
                name: n.replace('/', "-"),
            })
            .collect(),
        ipv6: args.ipv6,
    };
    let node = Node::new(spec).context("creating the netns node")?;
    let mut served = Vec::new();
    for port in &case.served.ports {
        for p in &case.served.protocols {
            served.push((*port, proto(p)?));
        }
    }
    node.serve(&served).context("starting servers")?;
    let ips: BTreeMap<String, IpAddr> = pod_names
        .iter()
        .zip(node.pods())
        .map(|(name, pod)| (name.clone(), pod.ip(args.ipv6)))
        .collect();
    let mut world = World {
        namespaces: case.namespaces.clone(),
        pods: case.pods.clone(),
        policies: BTreeMap::new(),
        ips,
    };
    let manifests = work.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    world.write(&manifests)?;
    let since = SystemTime::now();
    let mut agent = AgentProcess::start(&node, &args.agent, &manifests, work)?;
    agent.wait_reconciled(since, pod_names.len(), Duration::from_secs(20))?;

    let timeout = Duration::from_millis(args.probe_timeout_ms);
    // Baseline: with no policy, every pair connects (servers up, agent attached).
    for (port, p) in &served {
        let blocked = probe_matrix(
            &node,
            &pod_names,
            &world,
            *port,
            *p,
            timeout,
            10,
            &BTreeSet::new(),
        )?;
        if !blocked.is_empty() {
            bail!(
                "baseline {port}/{p:?}: pairs blocked with no policy:\n{}",
                render(&pod_names, &blocked)
            );
        }
    }

    let policies: BTreeMap<&str, &Value> = case
        .policies
        .iter()
        .map(|p| (p.id.as_str(), &p.object))
        .collect();
    let (mut probes, mut failed) = (0, 0);
    for (i, step) in case.steps.iter().enumerate() {
        for action in &step.actions {
            match action {
                Action::CreatePolicy { policy } | Action::UpdatePolicy { policy } => {
                    let obj = policies
                        .get(policy.as_str())
                        .with_context(|| format!("no policy {policy}"))?;
                    let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
                    let name = obj["metadata"]["name"]
                        .as_str()
                        .context("policy without name")?;
                    world
                        .policies
                        .insert(format!("{ns}/{name}"), world.expand(obj)?);
                }
                Action::DeleteAllPolicies { .. } => world.policies.clear(),
                Action::AddNamespaceLabels { namespace, labels } => {
                    world
                        .namespaces
                        .get_mut(namespace)
                        .with_context(|| format!("no namespace {namespace}"))?
                        .labels
                        .extend(labels.clone());
                }
                Action::AddPodLabels { pod, labels } => {
                    world
                        .pods
                        .iter_mut()
                        .find(|p| &World::pod_key(p) == pod)
                        .with_context(|| format!("no pod {pod}"))?
                        .labels
                        .extend(labels.clone());
                }
            }
        }
        let written = SystemTime::now();
        world.write(&manifests)?;
        agent.wait_reconciled(written, pod_names.len(), Duration::from_secs(20))?;
        for probe in &step.probes {
            probes += 1;
            let p = proto(&probe.protocol)?;
            let expected: BTreeSet<(String, String)> = probe.expect.deny.iter().cloned().collect();
            let attempts = (args.converge_ms / args.probe_timeout_ms.max(1)).max(1) as usize;
            let observed = probe_matrix(
                &node, &pod_names, &world, probe.port, p, timeout, attempts, &expected,
            )?;
            let mut explain_mismatch = None;
            if args.check_explain {
                let explained = explain_matrix(&agent, &pod_names, probe.port, p, args.ipv6)?;
                if explained != observed {
                    explain_mismatch = Some(explained);
                }
            }
            if let Some(explained) = &explain_mismatch {
                println!(
                    "  step {} ({}), probe {}/{:?}: EXPLAIN DISAGREES WITH THE DATAPATH\n  probed:\n{}  explain:\n{}  agent log: {}",
                    i + 1,
                    step.description,
                    probe.port,
                    p,
                    render(&pod_names, &observed),
                    render(&pod_names, explained),
                    agent.log_path().display()
                );
            }
            if observed != expected || explain_mismatch.is_some() {
                failed += 1;
            }
            if observed != expected {
                println!(
                    "  step {} ({}), probe {}/{:?}: MISMATCH\n  expected:\n{}  observed:\n{}  agent log: {}",
                    i + 1,
                    step.description,
                    probe.port,
                    p,
                    render(&pod_names, &expected),
                    render(&pod_names, &observed),
                    agent.log_path().display()
                );
            }
        }
    }
    drop(agent);
    drop(node);
    Ok((probes, failed))
}

/// `palisade explain` for every ordered pair of distinct pods: the pairs it says are dropped.
fn explain_matrix(
    agent: &AgentProcess,
    pods: &[String],
    port: u16,
    proto: Proto,
    ipv6: bool,
) -> Result<BTreeSet<(String, String)>> {
    let port = port.to_string();
    let mut blocked = BTreeSet::new();
    for from in pods {
        for to in pods {
            if from == to {
                continue;
            }
            let mut args = vec![
                "explain",
                "--from",
                from,
                "--to",
                to,
                "--port",
                &port,
                "--protocol",
                proto.as_str(),
            ];
            if ipv6 {
                args.push("--ipv6");
            }
            let e = agent.cli_json(&args)?;
            match e["verdict"].as_str() {
                Some("dropped") => {
                    blocked.insert((from.clone(), to.clone()));
                }
                Some("allowed" | "would-drop") => {}
                other => bail!("explain {from} -> {to}: unexpected verdict {other:?}"),
            }
        }
    }
    Ok(blocked)
}

/// Probes every ordered pair of distinct pods; retries until the blocked set equals `want` or
/// `attempts` runs are done. Returns the blocked pairs of the last run.
#[allow(clippy::too_many_arguments)]
fn probe_matrix(
    node: &Node,
    pods: &[String],
    world: &World,
    port: u16,
    proto: Proto,
    timeout: Duration,
    attempts: usize,
    want: &BTreeSet<(String, String)>,
) -> Result<BTreeSet<(String, String)>> {
    let mut pairs = Vec::new();
    for (fi, from) in pods.iter().enumerate() {
        for (ti, to) in pods.iter().enumerate() {
            if fi != ti {
                pairs.push((fi, ti, from.clone(), to.clone()));
            }
        }
    }
    let mut blocked = BTreeSet::new();
    for _ in 0..attempts {
        let specs: Vec<_> = pairs
            .iter()
            .map(|(fi, _, _, to)| palisade_tests::rig::ProbeSpec {
                from: &node.pods()[*fi],
                to: world.ips[to],
                port,
                proto,
                timeout,
            })
            .collect();
        let results = node.probe_many(&specs);
        blocked = pairs
            .iter()
            .zip(results)
            .filter(|(_, ok)| !ok)
            .map(|((_, _, f, t), _)| (f.clone(), t.clone()))
            .collect();
        if &blocked == want {
            break;
        }
    }
    Ok(blocked)
}

fn main() -> ExitCode {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        eprintln!("conformance needs root (BPF, TCX, network namespaces)");
        return ExitCode::FAILURE;
    }
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&args.cases) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect(),
        Err(e) => {
            eprintln!("{}: {e}", args.cases.display());
            return ExitCode::FAILURE;
        }
    };
    files.sort();
    let family = if args.ipv6 { "IPv6" } else { "IPv4" };
    println!(
        "conformance ({family}), cases from {}",
        args.cases.display()
    );
    println!("{:<48} {:>6} {:>8}  result", "case", "probes", "seconds");
    let mut results = Vec::new();
    for file in files {
        let started = Instant::now();
        let case: Case = match std::fs::read_to_string(&file)
            .map_err(anyhow::Error::from)
            .and_then(|t| read_case(&t))
        {
            Ok(c) => c,
            Err(e) => {
                let name = file.display().to_string();
                println!(
                    "{name:<48} {:>6} {:>8}  ERROR cannot read case: {e:#}",
                    0, "-"
                );
                results.push(CaseResult {
                    name,
                    probes: 0,
                    failed_probes: 0,
                    elapsed: started.elapsed(),
                    error: Some(format!("cannot read case: {e:#}")),
                });
                continue;
            }
        };
        if let Some(f) = &args.filter
            && !case.name.contains(f.as_str())
        {
            continue;
        }
        let work = std::env::temp_dir().join(format!(
            "palisade-conformance-{}-{}",
            std::process::id(),
            case.name
        ));
        let _ = std::fs::remove_dir_all(&work);
        let outcome = std::fs::create_dir_all(&work)
            .map_err(anyhow::Error::from)
            .and_then(|_| run_case(&args, &case, &work));
        let r = match outcome {
            Ok((probes, failed)) => CaseResult {
                name: case.name.clone(),
                probes,
                failed_probes: failed,
                elapsed: started.elapsed(),
                error: None,
            },
            Err(e) => CaseResult {
                name: case.name.clone(),
                probes: 0,
                failed_probes: 0,
                elapsed: started.elapsed(),
                error: Some(format!("{e:#}")),
            },
        };
        let verdict = match (&r.error, r.failed_probes) {
            (Some(e), _) => format!("ERROR {e}"),
            (None, 0) => "pass".to_string(),
            (None, n) => format!("FAIL ({n} probes)"),
        };
        println!(
            "{:<48} {:>6} {:>8.1}  {verdict}",
            r.name,
            r.probes,
            r.elapsed.as_secs_f64()
        );
        if r.error.is_none() && r.failed_probes == 0 {
            let _ = std::fs::remove_dir_all(&work);
        }
        results.push(r);
    }
    let passed = results
        .iter()
        .filter(|r| r.error.is_none() && r.failed_probes == 0)
        .count();
    let failed = results.len() - passed;
    println!("{passed} passed, {failed} failed");
    if failed == 0 && passed > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
