//! `palisade`: the node agent and its CLI.
use std::{path::PathBuf, time::Duration};

use anyhow::Result;
use clap::{CommandFactory, Parser, Subcommand};
use palisade::{
    cli, kubectl,
    reconcile::RunConfig,
    source::{
        self,
        files::FileSource,
        kube::{ClusterConfig, InitialList, KubeSource},
    },
};
use palisade_datapath::Datapath;
use tracing_subscriber::EnvFilter;

#[cfg(palisade_ebpf_missing)]
compile_error!(
    "the eBPF object is missing: build with `cargo xtask build` (it builds the eBPF crate first)"
);

/// The datapath object, built by `cargo xtask build`.
#[cfg(not(palisade_ebpf_missing))]
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("PALISADE_EBPF_OBJ"));
#[cfg(palisade_ebpf_missing)]
static EBPF_OBJECT: &[u8] = &[];

#[derive(Parser)]
#[command(
    name = "palisade",
    version,
    about = "Kubernetes NetworkPolicy enforcement on eBPF",
    after_help = "Read commands (verdicts, policy show, explain, stats, version) take -o \
                  table|wide|json|yaml. Exit status: 0 success, 1 failure, 2 bad arguments; \
                  explain: 0 allowed, 1 dropped, 2 any error."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// The agent's CLI socket (`run` listens there; `verdicts`, `stats`, `policy`, `explain`
    /// use it and the state file beside it).
    #[arg(long, global = true, value_name = "PATH", env = "PALISADE_SOCKET", default_value = palisade::control::DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent. Cluster mode (in a pod, or with --kubeconfig): watches the API server.
    /// Standalone mode (--manifests): Namespace, Pod, NetworkPolicy, Service and EndpointSlice
    /// YAML from a directory.
    Run {
        /// Standalone mode: directory of manifests (multi-document YAML allowed), re-read on
        /// change.
        #[arg(long, value_name = "DIR")]
        manifests: Option<PathBuf>,
        /// Cluster mode with this kubeconfig (default in a pod: the service account).
        #[arg(long, value_name = "FILE", env = "KUBECONFIG")]
        kubeconfig: Option<PathBuf>,
        /// Cluster mode: how each watch is first filled. `stream` (the API server's WatchList
        /// feature: Kubernetes 1.32, 1.34 and later) never holds every object at once, as a
        /// LIST response does; a watch whose streaming list the API server refuses (1.33)
        /// lists with LIST from then on. `list`: always LIST.
        #[arg(long, value_enum, default_value_t = InitialList::Stream, env = "PALISADE_INITIAL_LIST")]
        initial_list: InitialList,
        /// Where the CNI plugin records the pods it provisions (`off`: no plugin). Default:
        /// /run/palisade/cni in cluster mode, off in standalone mode.
        #[arg(long, value_name = "DIR|off")]
        cni_state_dir: Option<String>,
        /// The admin HTTP server: Prometheus metrics (`/metrics`), liveness and readiness
        /// (`/healthz`, `/readyz`); `off` to disable.
        #[arg(long, value_name = "ADDR|off", default_value = palisade::admin::DEFAULT_ADDR, value_parser = cli::parse_admin_addr)]
        admin_addr: cli::AdminAddr,
        /// Pin directory for maps and links (on a bpffs; mounted if absent).
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/palisade")]
        pin_dir: PathBuf,
        /// Only pods with this spec.nodeName are endpoints.
        #[arg(long, env = "NODE_NAME")]
        node_name: Option<String>,
        /// Manifest poll interval in milliseconds.
        #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(10..=60_000))]
        poll_ms: u64,
        /// Write a JSON status here after every reconcile.
        #[arg(long, value_name = "FILE")]
        status_file: Option<PathBuf>,
        /// Audit mode node-wide: every policy's denials are recorded as "would drop" and pass.
        #[arg(long)]
        audit: bool,
        /// Verdicts kept for `palisade verdicts`.
        #[arg(long, value_name = "N", default_value_t = palisade::verdicts::DEFAULT_HISTORY)]
        history: usize,
        /// Tracked flows one pod may hold at once (of the node's 262144); new flows beyond it
        /// are dropped (`conntrack-quota`) until some end or expire.
        #[arg(long, value_name = "N", default_value_t = palisade_common::CT_QUOTA_DEFAULT,
              value_parser = clap::value_parser!(u32).range(1..=i64::from(palisade_common::capacity::CONNTRACK)))]
        conntrack_per_pod: u32,
        /// A DNS server whose answers teach `domainNames` peers (repeatable), besides the
        /// cluster's (the kube-system/kube-dns Service) in cluster mode: the address pods
        /// send their queries to.
        #[arg(long = "dns-server", value_name = "ADDR")]
        dns_servers: Vec<std::net::IpAddr>,
        /// Hold DNS answers to pods with `domainNames` peers until their addresses are
        /// learned (`off`: they pass at once and a connection made right after may be
        /// dropped; for measurements).
        #[arg(long, value_name = "on|off", default_value = "on", value_parser = parse_on_off,
              action = clap::ArgAction::Set)]
        fqdn_hold: bool,
        /// An answer's addresses admit new connections for at least this many seconds (a
        /// TTL of 0 still admits the connection that follows it).
        #[arg(long, value_name = "SECONDS", default_value_t = 5)]
        fqdn_min_ttl: u64,
        /// The port this agent answers its peers' egress gateway liveness probes on (TCP, any
        /// address), and probes theirs on (`0`: neither; this node is then never a live
        /// gateway).
        #[arg(long, value_name = "PORT", default_value_t = palisade::egress::DEFAULT_HEALTH_PORT)]
        egress_health_port: u16,
        /// How often gateway nodes are probed, in milliseconds.
        #[arg(long, value_name = "MS", default_value_t = 250, value_parser = clap::value_parser!(u64).range(50..=10_000))]
        egress_probe_ms: u64,
        /// Failed probes in a row after which a gateway node is dead (its flows break, new
        /// ones go to a live gateway, or are dropped if there is none).
        #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
        egress_probe_misses: u32,
        /// Write a JSON line for every flow that went out through an egress gateway, when it
        /// ends (`-`: standard output).
        #[arg(long, value_name = "PATH")]
        egress_log: Option<PathBuf>,
    },
    /// The names pods' DNS answers resolved for their `domainNames` peers, and the addresses
    /// learned.
    Fqdn(cli::FqdnArgs),
    /// Recent verdicts: which packets were dropped or allowed, by which policy.
    Verdicts(cli::VerdictsArgs),
    /// Inspect enforced policy (`policy show NS/POD`).
    Policy(cli::PolicyArgs),
    /// Explain the verdict on a flow: the deciding policy and rule, or why nothing allows it.
    #[command(after_help = cli::EXIT_CODES_HELP)]
    Explain(cli::ExplainArgs),
    /// Counters: per policy, drops by reason, map fill levels, conntrack, suppressed events.
    Stats(cli::StatsArgs),
    /// The whole cluster (`kubectl palisade`, which is this binary named `kubectl-palisade`):
    /// every node's verdicts, explain and policy show from the nodes that enforce them,
    /// every node's stats; each agent reached by exec into its pod.
    Cluster(kubectl::ClusterArgs),
    /// Version, git commit and build date of this binary, and what the running kernel offers
    /// (TCX, BTF).
    Version(cli::VersionArgs),
    /// Print a shell completion script (e.g. `palisade completion bash >
    /// /etc/bash_completion.d/palisade`).
    Completion {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write man pages and every shell's completions under OUT (`cargo xtask docs-cli`).
    #[command(hide = true)]
    GenerateDocs {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Load the datapath (without attaching) and print the verifier's instruction counts.
    Verify,
    /// The chained CNI plugin (what `/opt/cni/bin/palisade-cni`, this binary, runs).
    Cni,
    /// Install the CNI plugin: copy this binary to BIN_DIR/palisade-cni and add it to the
    /// node's CNI configuration list (the DaemonSet's init container).
    CniInstall {
        #[arg(long, value_name = "DIR", default_value = "/host/opt/cni/bin")]
        bin_dir: PathBuf,
        #[arg(long, value_name = "DIR", default_value = "/host/etc/cni/net.d")]
        conf_dir: PathBuf,
        /// The pin directory as the plugin sees it (on the host).
        #[arg(long, value_name = "DIR", default_value = palisade::cni::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        /// The record directory as the plugin sees it (on the host).
        #[arg(long, value_name = "DIR", default_value = palisade::cni::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// What a new pod gets until its policy is compiled: `deny` (drop everything) or
        /// `allow` (not isolated).
        #[arg(long, value_name = "deny|allow", default_value = "deny", value_parser = parse_initial_policy)]
        initial_policy: palisade::cni::InitialPolicy,
        /// Wait this long for the interface plugin's configuration to appear.
        #[arg(long, value_name = "SECONDS", default_value_t = 300)]
        wait: u64,
        /// Remove the entry and the binary instead.
        #[arg(long)]
        uninstall: bool,
    },
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: want on or off")),
    }
}

fn parse_initial_policy(s: &str) -> Result<palisade::cni::InitialPolicy, String> {
    match s {
        "deny" => Ok(palisade::cni::InitialPolicy::Deny),
        "allow" => Ok(palisade::cni::InitialPolicy::Allow),
        _ => Err(format!("{s:?}: want deny or allow")),
    }
}

/// Invoked as `palisade-cni` (the CNI runtime runs plugins by their `type`).
fn invoked_as_cni_plugin() -> bool {
    std::env::args_os()
        .next()
        .map(PathBuf::from)
        .and_then(|p| p.file_name().map(|n| n.to_owned()))
        .is_some_and(|n| n == palisade::cni::PLUGIN_TYPE)
}

fn main() -> std::process::ExitCode {
    if invoked_as_cni_plugin() {
        std::process::exit(palisade::cni::plugin_main());
    }
    if kubectl::invoked_as_plugin() {
        // `kubectl palisade ...`.
        let args = kubectl::PluginCli::parse().args;
        let failure = args.command.failure_status();
        return exit(kubectl::run(args), failure);
    }
    // Bad arguments: clap's message and usage, exit status 2 (cli::EXIT_USAGE).
    let cli = Cli::parse();
    let failure = match &cli.command {
        // explain's 1 means "dropped".
        Command::Explain(_) => cli::EXPLAIN_ERROR,
        Command::Cluster(a) => a.command.failure_status(),
        _ => cli::EXIT_FAILURE,
    };
    exit(run(cli), failure)
}

/// The exit status of a command's result; an error printed with its causes.
fn exit(result: Result<u8>, failure: u8) -> std::process::ExitCode {
    match result {
        Ok(status) => std::process::ExitCode::from(status),
        Err(e) => {
            // The message and its causes, without a backtrace (RUST_BACKTRACE or not).
            eprintln!("Error: {e}");
            let mut causes = e.chain().skip(1).peekable();
            if causes.peek().is_some() {
                eprintln!("\nCaused by:");
                for c in causes {
                    eprintln!("    {c}");
                }
            }
            std::process::ExitCode::from(failure)
        }
    }
}

/// Runs the command; returns its exit status.
fn run(cli: Cli) -> Result<u8> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Run {
            manifests,
            kubeconfig,
            initial_list,
            cni_state_dir,
            admin_addr,
            pin_dir,
            node_name,
            poll_ms,
            status_file,
            audit,
            history,
            conntrack_per_pod,
            dns_servers,
            fqdn_hold,
            fqdn_min_ttl,
            egress_health_port,
            egress_probe_ms,
            egress_probe_misses,
            egress_log,
        } => {
            let cni_state_dir = match cni_state_dir.as_deref() {
                Some("off") => None,
                Some(dir) => Some(PathBuf::from(dir)),
                None if manifests.is_none() => {
                    Some(PathBuf::from(palisade::cni::DEFAULT_STATE_DIR))
                }
                None => None,
            };
            let cluster = manifests.is_none().then(|| ClusterConfig {
                kubeconfig,
                initial_list,
                node_name: node_name.clone().unwrap_or_default(),
            });
            if cluster.as_ref().is_some_and(|c| c.node_name.is_empty()) {
                anyhow::bail!(
                    "cluster mode needs the node's name: --node-name or NODE_NAME (the \
                     DaemonSet sets it from spec.nodeName)"
                );
            }
            let cfg = RunConfig {
                pin_dir,
                node_name: node_name.clone(),
                host_poll: Duration::from_secs(1),
                status_file,
                audit,
                socket: Some(cli.socket),
                admin_addr: admin_addr.0,
                history,
                conntrack_per_pod,
                cni_state_dir,
                fqdn: palisade::fqdn::FqdnConfig {
                    trusted: dns_servers,
                    hold: fqdn_hold,
                    min_ttl: Duration::from_secs(fqdn_min_ttl),
                    ..Default::default()
                },
                egress: palisade::egress::EgressConfig {
                    node_name: node_name.clone(),
                    health_port: egress_health_port,
                    probe_interval: Duration::from_millis(egress_probe_ms),
                    misses: egress_probe_misses,
                    log: egress_log,
                },
            };
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                match (cluster, manifests) {
                    (Some(cluster), _) => {
                        let kube = KubeSource::connect(&cluster).await?;
                        source::run(cfg, kube, EBPF_OBJECT).await
                    }
                    (None, dir) => {
                        let files = FileSource::new(
                            dir.unwrap_or_default(),
                            Duration::from_millis(poll_ms),
                        );
                        source::run(cfg, files, EBPF_OBJECT).await
                    }
                }
            })?;
            Ok(0)
        }
        Command::Verdicts(a) => cli::verdicts(&cli.socket, &a).map(|()| 0),
        Command::Policy(a) => cli::policy(&cli.socket, &a).map(|()| 0),
        Command::Explain(a) => cli::explain(&cli.socket, &a).map(cli::exit_code),
        Command::Stats(a) => cli::stats(&cli.socket, &a).map(|()| 0),
        Command::Cluster(a) => kubectl::run(a),
        Command::Version(a) => cli::version(&a).map(|()| 0),
        Command::Completion { shell } => {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            out.write_all(&cli::completion(Cli::command(), shell))?;
            out.flush()?;
            Ok(0)
        }
        Command::GenerateDocs { out } => {
            // `palisade` and `kubectl-palisade` (the plugin's pages and completions).
            let mut files = cli::write_docs(Cli::command(), &out)?;
            files.extend(cli::write_docs(kubectl::PluginCli::command(), &out)?);
            files.sort();
            files.dedup();
            for f in files {
                println!("{}", f.display());
            }
            Ok(0)
        }
        Command::Fqdn(a) => cli::fqdn(&cli.socket, &a).map(|()| 0),
        Command::Cni => std::process::exit(palisade::cni::plugin_main()),
        Command::CniInstall {
            bin_dir,
            conf_dir,
            pin_dir,
            state_dir,
            initial_policy,
            wait,
            uninstall,
        } => {
            let opts = palisade::cni::InstallOptions {
                bin_dir,
                conf_dir,
                pin_dir,
                state_dir,
                initial_policy,
                uninstall,
            };
            // On a new node the interface plugin writes its configuration after we start.
            let deadline = std::time::Instant::now() + Duration::from_secs(wait);
            loop {
                match palisade::cni::active_conf(&opts.conf_dir) {
                    Ok(Some(_)) => break,
                    _ if std::time::Instant::now() < deadline && !uninstall => {
                        std::thread::sleep(Duration::from_secs(2))
                    }
                    Ok(None) => anyhow::bail!(
                        "no CNI configuration in {} (install the interface plugin first)",
                        opts.conf_dir.display()
                    ),
                    Err(e) => return Err(e),
                }
            }
            println!("{}", palisade::cni::install(&opts)?);
            Ok(0)
        }
        Command::Verify => {
            let dp = Datapath::load(EBPF_OBJECT, None)?;
            for p in dp.program_stats() {
                println!(
                    "{}: verified, {} instructions processed by the verifier, {} bytes translated",
                    p.name,
                    p.verified_instructions
                        .map_or_else(|| "?".to_string(), |n| n.to_string()),
                    p.translated_bytes
                        .map_or_else(|| "?".to_string(), |n| n.to_string()),
                );
            }
            Ok(0)
        }
    }
}
