//! Named network namespaces (`/run/netns/<name>`, compatible with `ip netns`), created and
//! deleted in-process, and ways to run code or programs inside one.
//!
//! `setns(2)` on a network namespace is per thread: [`in_netns`] runs a closure on a fresh thread
//! that joined the namespace, and [`command_in`] makes a child join it between fork and exec.
//! Unlike `ip netns exec`, neither touches the mount namespace (which would remount /sys and
//! hide bpffs paths).
use std::{
    ffi::{CString, OsStr},
    fs::File,
    io::{self, Write},
    os::unix::{ffi::OsStrExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use anyhow::{Context, Result, anyhow, bail};
use nix::{
    errno::Errno,
    fcntl::{OFlag, open},
    mount::{MntFlags, MsFlags, mount, umount2},
    sched::{CloneFlags, setns, unshare},
    sys::stat::Mode,
};

pub const NETNS_DIR: &str = "/run/netns";

pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Joins the calling thread to network namespace `name`.
pub fn enter(name: &str) -> io::Result<()> {
    let file = File::open(netns_path(name))?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Runs `f` on a fresh thread inside network namespace `name` and returns its result. Sockets
/// created by `f` belong to that namespace for their whole life. A panic in `f` is propagated.
pub fn in_netns<T: Send, F: FnOnce() -> T + Send>(name: &str, f: F) -> Result<T> {
    let file = File::open(netns_path(name)).with_context(|| format!("opening netns {name}"))?;
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name(format!("netns {name}"))
            .spawn_scoped(s, move || -> Result<T> {
                setns(&file, CloneFlags::CLONE_NEWNET).context("setns")?;
                drop(file);
                Ok(f())
            })
            .context("spawning a thread")?;
        match handle.join() {
            Ok(r) => r.with_context(|| format!("entering netns {name}")),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A `Command` whose child runs in network namespace `name` (it `setns`es between fork and
/// exec; spawning fails if the namespace does not exist).
pub fn command_in(name: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new(program);
    let path =
        CString::new(netns_path(name).as_os_str().as_bytes()).expect("netns names have no NUL");
    // SAFETY: between fork and exec only async-signal-safe syscalls run (open, setns, close),
    // and nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let rc = libc::setns(fd, libc::CLONE_NEWNET);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if rc != 0 {
                return Err(err);
            }
            Ok(())
        });
    }
    cmd
}

/// Makes /run/netns a shared mount point the way `ip netns add` does, so that namespaces
/// mounted there are visible in mount namespaces created later (by `ip netns exec` say).
fn prepare_dir() -> Result<()> {
    static PREPARED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    PREPARED
        .get_or_init(|| {
            let run = || -> Result<()> {
                std::fs::create_dir_all(NETNS_DIR).context("creating /run/netns")?;
                // Serialise with other rig processes doing the same.
                let lock = File::options()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open("/run/palisade-netns.lock")
                    .context("opening /run/palisade-netns.lock")?;
                let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
                    .map_err(|(_, e)| e)
                    .context("locking /run/palisade-netns.lock")?;
                let shared = MsFlags::MS_SHARED | MsFlags::MS_REC;
                match mount(None::<&str>, NETNS_DIR, None::<&str>, shared, None::<&str>) {
                    Ok(()) => Ok(()),
                    Err(Errno::EINVAL) => {
                        // Not a mount point yet: bind it onto itself first.
                        mount(
                            Some(NETNS_DIR),
                            NETNS_DIR,
                            Some("none"),
                            MsFlags::MS_BIND | MsFlags::MS_REC,
                            None::<&str>,
                        )
                        .context("bind-mounting /run/netns")?;
                        mount(None::<&str>, NETNS_DIR, None::<&str>, shared, None::<&str>)
                            .context("making /run/netns shared")
                    }
                    Err(e) => Err(e).context("making /run/netns shared"),
                }
            };
            run().map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// Creates network namespace `name` (like `ip netns add`) and writes `sysctls` (paths under
/// /proc/sys, values) inside it before anyone else can see it.
pub fn create(name: &str, sysctls: &[(&str, &str)]) -> Result<()> {
    prepare_dir()?;
    let path = netns_path(name);
    let fd = open(
        &path,
        OFlag::O_RDONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("creating {}", path.display()))?;
    drop(fd);
    let result = std::thread::scope(|s| {
        s.spawn(|| -> Result<()> {
            unshare(CloneFlags::CLONE_NEWNET).context("unshare(CLONE_NEWNET)")?;
            // /proc/sys/net resolves against the calling thread's network namespace.
            for (key, value) in sysctls {
                std::fs::write(format!("/proc/sys/{key}"), value)
                    .with_context(|| format!("sysctl {key}={value}"))?;
            }
            mount(
                Some("/proc/thread-self/ns/net"),
                &path,
                Some("none"),
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .with_context(|| format!("bind-mounting the new netns on {}", path.display()))
        })
        .join()
        .unwrap_or_else(|_| Err(anyhow!("netns thread panicked")))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    result.with_context(|| format!("creating netns {name}"))
}

/// Deletes network namespace `name` (like `ip netns delete`): its interfaces go with it once
/// nothing else holds it (no process or thread inside, no open file or socket).
pub fn delete(name: &str) -> Result<()> {
    let path = netns_path(name);
    match umount2(&path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(e).with_context(|| format!("unmounting {}", path.display())),
    }
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// The names in /run/netns.
pub fn list() -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

pub fn exists(name: &str) -> bool {
    netns_path(name).exists()
}

/// Runs `ip -batch -` (one process for many commands), inside network namespace `netns` if
/// given. Fails with ip's error output and the commands if any command fails.
pub fn ip_batch(netns: Option<&str>, commands: &[String]) -> Result<()> {
    let mut cmd = match netns {
        Some(ns) => command_in(ns, "ip"),
        None => Command::new("ip"),
    };
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip -batch (is iproute2 installed?)")?;
    let mut input = commands.join("\n");
    input.push('\n');
    let write = child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes());
    let out = child.wait_with_output().context("waiting for ip -batch")?;
    if !out.status.success() || write.is_err() {
        bail!(
            "ip -batch in netns {}: {}\ncommands:\n{}",
            netns.unwrap_or("(current)"),
            String::from_utf8_lossy(&out.stderr).trim(),
            input
        );
    }
    Ok(())
}
