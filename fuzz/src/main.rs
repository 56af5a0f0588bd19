//! `palisade-fuzz`: random and malformed packets through the real datapath programs
//! (BPF_PROG_TEST_RUN, one run per packet) under random policies, each verdict compared with
//! what the rules say it must be (`model`: an independent packet parser, conntrack and fragment
//! model, and NetworkPolicy semantics from `palisade_policy::reference`).
//!
//! A **bypass** is a packet the datapath lets through that the model drops, or that the
//! second oracle (`spec`: the plain spec reading, with no conntrack machinery of its own)
//! finds nothing to justify; a **false drop** the opposite of the first. Both are reported with the packet; the run ends with `N packets, B bypasses`
//! and exits non-zero on any mismatch. Runs in its own network namespace (veth pairs stand in
//! for pod interfaces) and needs root. `cargo xtask fuzz [--packets N] [--seed S]`.
mod cluster;
mod model;
mod packet;
mod rng;
mod spec;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use aya::maps::{HashMap, MapData};
use aya::programs::{TestRun, TestRunOptions};
use clap::Parser;
use palisade_common::{CtEntry, CtKey, DIR_INGRESS, FragKey, FragPorts, map_names};
use palisade_datapath::loader::{Datapath, FROM_POD, TO_POD};
use palisade_datapath::writer::MapWriter;
use palisade_policy::compile::Compiler;
use palisade_policy::state::DesiredState;

use crate::cluster::Cluster;
use crate::model::{Ep, Frame, Model, Policy, Why};
use crate::packet::{Generator, Sent, Target, World};
use crate::rng::Rng;

#[derive(Parser)]
#[command(
    name = "palisade-fuzz",
    about = "Fuzz the datapath against the packet model"
)]
struct Args {
    /// Packets to send.
    #[arg(long, default_value_t = 100_000)]
    packets: u64,
    /// Seed (a run is reproduced by its seed and packet count).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Packets per random cluster (conntrack and fragment state start afresh with each).
    #[arg(long, default_value_t = 2000)]
    round: u64,
    /// The eBPF object (default: the one `cargo xtask build` builds).
    #[arg(long, env = "PALISADE_EBPF_OBJ")]
    object: Option<PathBuf>,
    /// Mismatches to print in full.
    #[arg(long, default_value_t = 10)]
    show: usize,
}

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
/// Veth pairs created for the run: endpoints use the first interfaces, the last two have the
/// programs "attached" with no endpoint entry.
const PAIRS: usize = 4;
const MAX_ENDPOINTS: usize = 6;

fn default_object() -> PathBuf {
    option_env!("PALISADE_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/ebpf/x86_64-unknown-linux-gnu/release/libpalisade_ebpf.so")
        })
}

/// A private network namespace with `PAIRS` veth pairs; returns their ifindexes.
fn private_netns() -> Result<Vec<u32>> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("unshare(CLONE_NEWNET) (needs root)")?;
    let mut ifindexes = Vec::new();
    for i in 0..PAIRS {
        let status = Command::new("ip")
            .args([
                "link",
                "add",
                &format!("fz{i}"),
                "type",
                "veth",
                "peer",
                "name",
            ])
            .arg(format!("fzp{i}"))
            .status()
            .context("running ip link add")?;
        if !status.success() {
            bail!("ip link add fz{i} failed");
        }
        for name in [format!("fz{i}"), format!("fzp{i}")] {
            let idx = nix::net::if_::if_nametoindex(name.as_str())
                .with_context(|| format!("ifindex of {name}"))?;
            ifindexes.push(idx);
        }
    }
    Ok(ifindexes)
}

/// A `struct __sk_buff` prefix with `ifindex` (offset 40: the test run's skb gets that
/// device) and `ingress_ifindex` (offset 36: the interface it entered the node by) set.
fn skb_ctx(ifindex: u32, ingress_ifindex: u32) -> [u8; 44] {
    let mut ctx = [0u8; 44];
    ctx[36..40].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    ctx
}

struct Datapaths {
    dp: Datapath,
    writer: MapWriter,
    conntrack: HashMap<MapData, CtKey, CtEntry>,
    fragments: HashMap<MapData, FragKey, FragPorts>,
    /// Empties conntrack the way the agent's sweep does (releasing the endpoints' quotas).
    sweeper: palisade_datapath::ct_sweep::Sweeper,
}

impl Datapaths {
    fn run(&self, dir: u8, ifindex: u32, ingress_ifindex: u32, frame: &[u8]) -> Result<u32> {
        let prog = if dir == DIR_INGRESS { TO_POD } else { FROM_POD };
        let ctx = skb_ctx(ifindex, ingress_ifindex);
        let mut out = vec![0u8; frame.len() + 256];
        let r = self
            .dp
            .program(prog)
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..Default::default()
            })
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(r.return_value)
    }

    fn clear_state(&mut self) -> Result<()> {
        self.sweeper.clear()?;
        let keys: Vec<FragKey> = self.fragments.keys().collect::<Result<_, _>>()?;
        for k in keys {
            let _ = self.fragments.remove(&k);
        }
        Ok(())
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join("")
}

#[derive(Default)]
struct Tally {
    packets: u64,
    bypasses: u64,
    false_drops: u64,
    refused: u64,
    allowed: u64,
    by_what: BTreeMap<&'static str, u64>,
    by_why: BTreeMap<Why, u64>,
    changes: u64,
    clusters: u64,
    /// Passed packets the spec oracle finds unjustified.
    spec_bypasses: u64,
}

fn apply(writer: &mut MapWriter, desired: &DesiredState) -> Result<()> {
    let stats = writer.apply(desired);
    if stats.failed != 0 {
        bail!("map writes failed: {:?}", writer.failures());
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("palisade-fuzz: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode> {
    let args = Args::parse();
    if !nix::unistd::geteuid().is_root() {
        bail!("needs root (BPF_PROG_TEST_RUN, a private network namespace)");
    }
    let object_path = args.object.clone().unwrap_or_else(default_object);
    let object = std::fs::read(&object_path)
        .with_context(|| format!("{}: run `cargo xtask build`", object_path.display()))?;
    let ifindexes = private_netns()?;
    let (ep_ifindexes, spare) = ifindexes.split_at(MAX_ENDPOINTS);

    let mut dp = Datapath::load(&object, None).context("loading the datapath")?;
    let sweeper = palisade_datapath::ct_sweep::Sweeper::new(&dp)?;
    let writer = MapWriter::new(&mut dp)?;
    let conntrack = HashMap::try_from(dp.take_map(map_names::CONNTRACK)?)?;
    let fragments = HashMap::try_from(dp.take_map(map_names::FRAGMENTS)?)?;
    let mut d = Datapaths {
        dp,
        writer,
        conntrack,
        fragments,
        sweeper,
    };

    let mut rng = Rng::new(args.seed);
    let mut compiler = Compiler::default();
    let mut model = Model::new();
    let mut oracle = spec::Spec::default();
    let mut generator = Generator::new();
    let mut t = Tally::default();
    let started = Instant::now();
    let mut shown = 0usize;
    // FUZZ_TRACE=N: print every packet from the N-th on.
    let trace_from: Option<u64> = std::env::var("FUZZ_TRACE")
        .ok()
        .and_then(|v| v.parse().ok());

    eprintln!(
        "palisade-fuzz: {} packets, seed {}, {} per cluster, object {}",
        args.packets,
        args.seed,
        args.round,
        object_path.display()
    );
    while t.packets < args.packets {
        let mut cluster = Cluster::random(&mut rng, ep_ifindexes);
        if cluster.local.is_empty() {
            continue;
        }
        t.clusters += 1;
        let desired = compiler.compile(&cluster.store, &cluster.local, &cluster.hosts);
        apply(&mut d.writer, &desired)?;
        d.clear_state()?;
        model.clear();
        oracle.clear();
        generator.clear();
        let eps: Vec<Ep> = cluster
            .local
            .iter()
            .map(|l| Ep {
                pod: l.pod.clone(),
                own: cluster.store.pods[&l.pod]
                    .ips
                    .iter()
                    .copied()
                    .filter(|a| !cluster.hosts.contains(a))
                    .collect(),
            })
            .collect();
        let world = World {
            eps: eps
                .iter()
                .map(|e| {
                    let v4 = e.own.iter().copied().find(IpAddr::is_ipv4);
                    let v6 = e.own.iter().copied().find(IpAddr::is_ipv6);
                    (v4, v6)
                })
                .collect(),
            v4: cluster.v4.clone(),
            v6: cluster.v6.clone(),
        };
        let mut n = 0;
        let mut history: Vec<String> = Vec::new();
        while n < args.round && t.packets < args.packets {
            if n > 0 && n % 400 == 0 && rng.chance(0.6) {
                let change = cluster.mutate(&mut rng);
                let desired = compiler.compile(&cluster.store, &cluster.local, &cluster.hosts);
                apply(&mut d.writer, &desired)?;
                history.push(format!("after packet {}: {change}", t.packets));
                if trace_from.is_some_and(|f| t.packets >= f) {
                    eprintln!("-- {change}: {:?}", desired.endpoints);
                }
                t.changes += 1;
            }
            n += 1;
            let sent: Sent = generator.next(&mut rng, &world);
            let (ifindex, ep) = match sent.target {
                Target::Endpoint(i) => (cluster.local[i].ifindex, Some(i)),
                Target::NoEndpoint => (spare[rng.below(spare.len())], None),
            };
            // Half the packets entered the node through the endpoint's own veth (a hairpin),
            // the others elsewhere (an uplink, another pod's veth).
            let hairpin = rng.chance(0.5);
            let ingress_ifindex = if hairpin { ifindex } else { 0 };
            let dp_verdict = match d.run(sent.dir, ifindex, ingress_ifindex, &sent.frame) {
                Ok(v) => v,
                Err(e) => {
                    t.refused += 1;
                    if t.refused <= 3 {
                        eprintln!(
                            "test run refused ({e}): {} bytes {}",
                            sent.frame.len(),
                            hex(&sent.frame)
                        );
                    }
                    continue;
                }
            };
            let policy = Policy::new(&cluster.store, &cluster.hosts);
            let frame = model::parse(&sent.frame, &model.frags);
            let (want, why) = model.verdict(&policy, &eps, ep, sent.dir, hairpin, &frame);
            t.packets += 1;
            *t.by_what.entry(sent.what).or_default() += 1;
            *t.by_why.entry(why).or_default() += 1;
            let got = match dp_verdict {
                TC_ACT_OK => true,
                TC_ACT_SHOT => false,
                other => bail!("unexpected program return value {other}"),
            };
            if got {
                t.allowed += 1;
                if let Err(why_not) = oracle.justified(&policy, &eps, ep, sent.dir, hairpin, &frame)
                {
                    t.spec_bypasses += 1;
                    if want {
                        // The model passed it too (else it counts below).
                        t.bypasses += 1;
                    }
                    if shown < args.show {
                        shown += 1;
                        eprintln!(
                            "\nBYPASS (spec) #{}: {} ({} bytes) {}: passed, but {why_not}; model {want} ({why:?})\n  parsed: {frame:?}\n  frame: {}",
                            t.packets,
                            sent.what,
                            sent.frame.len(),
                            if sent.dir == DIR_INGRESS {
                                "ingress"
                            } else {
                                "egress"
                            },
                            hex(&sent.frame)
                        );
                    }
                }
            }
            if trace_from.is_some_and(|f| t.packets >= f) {
                let tuple = match &frame {
                    Frame::Ip(p) => format!(
                        "{:?} {}:{} -> {}:{} proto {} flags {:#x}",
                        p.kind,
                        model::show(p.family, &p.src),
                        p.sport,
                        model::show(p.family, &p.dst),
                        p.dport,
                        p.proto,
                        p.tcp_flags
                    ),
                    other => format!("{other:?}"),
                };
                eprintln!(
                    "#{} ep {ep:?} {} {}: {tuple}: model {want} ({why:?}), datapath {got}",
                    t.packets,
                    if sent.dir == DIR_INGRESS { "in" } else { "out" },
                    sent.what
                );
            }
            if got == want {
                continue;
            }
            if got {
                t.bypasses += 1;
            } else {
                t.false_drops += 1;
            }
            if shown < args.show {
                shown += 1;
                let who = ep.map_or_else(|| "no endpoint".to_string(), |i| eps[i].pod.to_string());
                eprintln!(
                    "\n{} #{}: {} ({}) at {who} (ifindex {ifindex}) {}: datapath {}, model {} ({why:?})",
                    if got { "BYPASS" } else { "FALSE DROP" },
                    t.packets,
                    sent.what,
                    sent.frame.len(),
                    if sent.dir == DIR_INGRESS {
                        "ingress"
                    } else {
                        "egress"
                    },
                    if got { "pass" } else { "drop" },
                    if want { "pass" } else { "drop" },
                );
                match &frame {
                    Frame::Ip(p) => eprintln!("  parsed: {p:?}"),
                    other => eprintln!("  parsed: {other:?}"),
                }
                eprintln!("  frame: {}", hex(&sent.frame));
                eprintln!("  changes in this cluster: {history:#?}");
                if let Some(i) = ep {
                    let info = d.writer.applied().endpoints.get(&ifindex).copied();
                    eprintln!("  endpoint {i}: {info:?}");
                    for item in d.conntrack.iter() {
                        let Ok((k, v)) = item else { continue };
                        if info.is_some_and(|e| e.id == k.endpoint) {
                            eprintln!("    ct {k:?} -> revision {} rule {}", v.revision, v.rule);
                        }
                    }
                }
                eprintln!(
                    "  policies: {:#?}",
                    cluster.store.policies.values().collect::<Vec<_>>()
                );
            }
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "\n{} clusters, {} policy changes, {:.0} packets/s, {} allowed, {} refused by the kernel",
        t.clusters,
        t.changes,
        t.packets as f64 / secs,
        t.allowed,
        t.refused
    );
    eprintln!("packets by kind:");
    for (k, v) in &t.by_what {
        eprintln!("  {k:<24} {v}");
    }
    eprintln!("verdicts by reason (model):");
    for (k, v) in &t.by_why {
        eprintln!("  {:<24} {v}", format!("{k:?}"));
    }
    eprintln!(
        "false drops (datapath drops what the model passes): {}",
        t.false_drops
    );
    eprintln!(
        "passed packets the spec oracle finds unjustified: {}",
        t.spec_bypasses
    );
    println!("{} packets, {} bypasses", t.packets, t.bypasses);
    Ok(if t.bypasses == 0 && t.false_drops == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
