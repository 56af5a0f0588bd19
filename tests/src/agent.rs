//! The standalone agent as a child process inside a rig's node namespace, with its own bpffs,
//! manifest directory, status file and log.
use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::rig::Node;
use anyhow::{Context, Result, bail};

/// What the agent writes to its status file after every reconcile.
pub use palisade::reconcile::Status;

/// A test's work directory (for the agent's bpffs, status file, log and socket) with an empty
/// `manifests/` in it; removed on drop.
pub struct WorkDir(PathBuf);

impl WorkDir {
    /// `palisade-<tag>-<pid>-<ns>` under the temporary directory.
    pub fn new(tag: &str) -> WorkDir {
        let p = std::env::temp_dir().join(format!(
            "palisade-{tag}-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(p.join("manifests")).unwrap();
        WorkDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn manifests(&self) -> PathBuf {
        self.0.join("manifests")
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A bpffs mounted (the directory created if need be), unmounted on drop (which drops the pins
/// in it).
pub struct Bpffs(PathBuf);

impl Bpffs {
    pub fn mount(path: PathBuf) -> Result<Bpffs> {
        std::fs::create_dir_all(&path)?;
        nix::mount::mount(
            Some("bpf"),
            &path,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .with_context(|| format!("mounting bpffs at {}", path.display()))?;
        Ok(Bpffs(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// SIGTERM, up to 5 s for the process to exit, then SIGKILL.
pub fn terminate(mut child: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

pub struct AgentProcess {
    child: Option<Child>,
    /// Unmounted on drop, after the agent has stopped.
    _bpffs: Bpffs,
    status: PathBuf,
    log: PathBuf,
    pin_dir: PathBuf,
    /// The CLI socket (`state.json` beside it).
    socket: PathBuf,
    /// The binary, for CLI commands.
    binary: PathBuf,
    /// Extra `run` arguments (`--audit`, `--metrics-addr ...`).
    extra_args: Vec<String>,
}

/// The agent binary: `PALISADE_AGENT_BIN` (set by `cargo xtask test`) or the build of the
/// same profile and target directory as the running test (`<target>/debug/deps/<test>` ->
/// `<target>/debug/palisade`), wherever `CARGO_TARGET_DIR` puts it.
/// Whether `palisade <args>` answered: exit status 0, or 1 from `explain` (the flow is
/// dropped; its errors exit with 2, `palisade::cli::EXPLAIN_ERROR`).
pub fn cli_answered(args: &[&str], status: std::process::ExitStatus) -> bool {
    let dropped = palisade::cli::exit_code(palisade::inspect::VerdictKind::Dropped);
    status.success() || (args.first() == Some(&"explain") && status.code() == Some(dropped.into()))
}

pub fn agent_binary() -> PathBuf {
    std::env::var_os("PALISADE_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("the test's own path");
            let profile_dir = exe
                .parent()
                .and_then(|deps| deps.parent())
                .expect("tests run from <target>/<profile>/deps");
            profile_dir.join("palisade")
        })
}

/// Milliseconds since the Unix epoch (the status file's timestamps).
pub fn unix_ms(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

impl AgentProcess {
    /// Mounts a bpffs under `work`, then starts `agent run` in the node's network namespace.
    pub fn start(node: &Node, agent: &Path, manifests: &Path, work: &Path) -> Result<Self> {
        Self::start_with(node, agent, manifests, work, &[])
    }

    /// As `start`, with extra `palisade run` arguments.
    pub fn start_with(
        node: &Node,
        agent: &Path,
        manifests: &Path,
        work: &Path,
        extra_args: &[&str],
    ) -> Result<Self> {
        let bpffs = Bpffs::mount(work.join("bpffs"))?;
        let mut agent_process = AgentProcess {
            child: None,
            pin_dir: bpffs.path().join("palisade"),
            _bpffs: bpffs,
            status: work.join("status.json"),
            log: work.join("agent.log"),
            socket: work.join("run").join("palisade.sock"),
            binary: agent.to_path_buf(),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
        };
        agent_process.spawn(node, agent, manifests)?;
        Ok(agent_process)
    }

    /// Starts (or restarts) the agent process, adopting whatever is pinned.
    pub fn spawn(&mut self, node: &Node, agent: &Path, manifests: &Path) -> Result<()> {
        let log = File::options().create(true).append(true).open(&self.log)?;
        let mut cmd = node.command(agent);
        cmd.arg("run")
            .arg("--manifests")
            .arg(manifests)
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--status-file")
            .arg(&self.status)
            .args(["--poll-ms", "100"])
            .arg("--socket")
            .arg(&self.socket)
            .args(&self.extra_args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("starting {}", agent.display()))?,
        );
        Ok(())
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A `palisade <args>` CLI command against this agent's socket. The CLI needs no network
    /// namespace: the socket and the pinned maps are paths in this mount namespace.
    pub fn cli(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.args(args).arg("--socket").arg(&self.socket);
        cmd
    }

    /// `cli`, run as uid and gid 65534 (nobody), from a copy of the binary that nobody can
    /// execute: the checkout may live where nobody cannot even traverse (a 0700 directory,
    /// `/root`), and then exec would fail before the CLI could be refused by the socket.
    pub fn cli_as_nobody(&self, args: &[&str]) -> Command {
        use std::os::unix::{fs::PermissionsExt, process::CommandExt};
        static COPY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
        let bin = COPY.get_or_init(|| {
            // One copy per build of the binary (by inode and mtime), shared by every test
            // process: a debug binary is hundreds of MiB, and a copy per process filled /tmp.
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(&self.binary).expect("the agent binary");
            let dir = std::env::temp_dir().join(format!(
                "palisade-cli-{}-{}",
                meta.ino(),
                meta.mtime_nsec() ^ meta.mtime()
            ));
            let bin = dir.join("palisade");
            if !bin.exists() {
                std::fs::create_dir_all(&dir).expect("a directory for the CLI copy");
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
                let tmp = dir.join(format!("palisade.{}", std::process::id()));
                std::fs::copy(&self.binary, &tmp).expect("copy the CLI");
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
                std::fs::rename(&tmp, &bin).expect("the CLI copy in place");
            }
            bin
        });
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .arg("--socket")
            .arg(&self.socket)
            .uid(65534)
            .gid(65534);
        cmd
    }

    /// Runs `palisade <args> -o json` and parses its output.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = self
            .cli(args)
            .args(["-o", "json"])
            .output()
            .with_context(|| format!("running {} {args:?}", self.binary.display()))?;
        if !cli_answered(args, out.status) {
            bail!(
                "palisade {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "palisade {args:?}: output is not JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    pub fn status(&self) -> Option<Status> {
        let text = std::fs::read_to_string(&self.status).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Waits until a reconcile that started after `since` has finished with `endpoints`
    /// endpoints. Fails if the agent exits or the time runs out.
    pub fn wait_reconciled(
        &mut self,
        since: SystemTime,
        endpoints: usize,
        timeout: Duration,
    ) -> Result<Status> {
        let deadline = Instant::now() + timeout;
        let since = unix_ms(since);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("agent exited ({status}); log: {}", self.log.display());
            }
            if let Some(s) = self.status()
                && s.started_at_unix_ms > since
                && s.endpoints == endpoints
            {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "agent did not reconcile {endpoints} endpoints within {timeout:?} (status: {:?}); log: {}",
                    self.status(),
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGKILL: the agent gets no chance to clean up (pins keep enforcing).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(c) = self.child.take() {
            terminate(c);
        }
    }
}

/// Where a failing test keeps its agent's evidence (`cargo xtask soak` sets it).
pub const KEEP_FAILURES_ENV: &str = "PALISADE_KEEP_FAILURES";

impl AgentProcess {
    /// Copies what explains a failure into `$PALISADE_KEEP_FAILURES/<work dir>-<n>/`: the
    /// agent's log, status and state files, `palisade stats` while the agent still runs, and
    /// the pinned maps (endpoints, identities, own addresses, policy and CIDR entries, the
    /// conntrack table) as text.
    fn keep_evidence(&self, root: &Path) {
        let work = self.log.parent().unwrap_or(Path::new("/"));
        let name = work
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_default();
        let dir = (0..)
            .map(|i| root.join(format!("{name}-{i}")))
            .find(|d| !d.exists())
            .expect("a free name");
        if std::fs::create_dir_all(&dir).is_err() {
            return;
        }
        for (from, to) in [
            (self.log.clone(), "agent.log"),
            (self.status.clone(), "status.json"),
            (self.socket.with_file_name("state.json"), "state.json"),
        ] {
            let _ = std::fs::copy(from, dir.join(to));
        }
        if let Ok(out) = self.cli(&["stats", "-o", "json"]).output() {
            let _ = std::fs::write(dir.join("stats.json"), out.stdout);
        }
        let _ = std::fs::write(dir.join("maps.txt"), dump_maps(&self.pin_dir.join("maps")));
        eprintln!("kept the agent's evidence in {}", dir.display());
    }
}

/// The pinned maps under `maps` as text, one entry per line.
pub fn dump_maps(maps: &Path) -> String {
    use aya::maps::{HashMap, Map, MapData};
    use palisade_common::{
        CidrKey, CtEntry, CtKey, EndpointInfo, PeerAddr, PolicyKey, PolicyValue, PrefixLengths,
        PrefixLengthsKey, map_names,
    };
    use std::fmt::Write;
    let mut out = String::new();
    let open = |name: &str| MapData::from_pin(maps.join(name));
    macro_rules! dump_hash {
        ($name:expr, $k:ty, $v:ty, $wrap:path) => {
            let _ = writeln!(out, "== {}", $name);
            match open($name) {
                Ok(d) => match HashMap::<MapData, $k, $v>::try_from($wrap(d)) {
                    Ok(m) => {
                        for item in m.iter() {
                            let _ = match item {
                                Ok((k, v)) => writeln!(out, "{k:?} => {v:?}"),
                                Err(e) => writeln!(out, "({e})"),
                            };
                        }
                    }
                    Err(e) => {
                        let _ = writeln!(out, "({e})");
                    }
                },
                Err(e) => {
                    let _ = writeln!(out, "({e})");
                }
            }
        };
    }
    dump_hash!(map_names::ENDPOINTS, u32, EndpointInfo, Map::HashMap);
    dump_hash!(map_names::IDENTITIES, PeerAddr, u32, Map::HashMap);
    dump_hash!(map_names::EP_ADDRS, PeerAddr, u32, Map::HashMap);
    dump_hash!(map_names::CONNTRACK, CtKey, CtEntry, Map::HashMap);
    dump_hash!(map_names::POLICY, PolicyKey, PolicyValue, Map::HashMap);
    dump_hash!(map_names::CIDRS, CidrKey, u32, Map::HashMap);
    dump_hash!(
        map_names::PREFIX_LENGTHS,
        PrefixLengthsKey,
        PrefixLengths,
        Map::HashMap
    );
    out
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if std::thread::panicking()
            && let Some(root) = std::env::var_os(KEEP_FAILURES_ENV)
        {
            self.keep_evidence(Path::new(&root));
        }
        self.stop();
        // Then `_bpffs` is unmounted, which drops the pins; links of deleted veths are already
        // gone.
    }
}
