//! Loading the datapath object, pinning its maps, attaching its programs to pod veths.
//!
//! Layout under the pin directory (`/sys/fs/bpf/palisade` by default):
//! `maps/<MAP NAME>` for every map, `links/<ifindex>-<to_pod|from_pod>` for every TCX link.
//! A restarted agent opens the pinned maps instead of creating new ones, and replaces the
//! program of each pinned link atomically, so enforcement never lapses.
use std::{
    collections::BTreeMap,
    ffi::CStr,
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::Map,
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, TcAttachOptions},
    },
    util::KernelVersion,
};
use palisade_common::map_names;
use tracing::{debug, info, warn};

/// The two programs, by the direction of the pod's traffic they judge.
pub const TO_POD: &str = "to_pod";
pub const FROM_POD: &str = "from_pod";

pub const MAP_NAMES: [&str; 9] = [
    map_names::ENDPOINTS,
    map_names::IDENTITIES,
    map_names::CIDRS,
    map_names::POLICY,
    map_names::CONNTRACK,
    map_names::FRAGMENTS,
    map_names::EVENTS,
    map_names::COUNTERS,
    map_names::EP_STATE,
];

/// The verifier's verdict on one program.
#[derive(Clone, Debug)]
pub struct ProgramStats {
    pub name: &'static str,
    pub verified_instructions: Option<u32>,
    pub translated_bytes: Option<u32>,
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
    attached: BTreeMap<u32, Vec<Attachment>>,
}

enum Attachment {
    /// A TCX link, pinned when the datapath has a pin directory.
    Tcx { pin: Option<PathBuf> },
    /// Legacy clsact filter (kernels without TCX).
    Netlink,
}

impl Datapath {
    /// Loads the object and both programs (running the verifier). With `pin_dir`, maps are
    /// pinned there (and adopted if already pinned); without it they are private to this
    /// process (BPF program test runs).
    pub fn load(object: &[u8], pin_dir: Option<&Path>) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        let map_paths: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => {
                let maps = dir.join("maps");
                fs::create_dir_all(&maps)
                    .with_context(|| format!("creating {}", maps.display()))?;
                MAP_NAMES.iter().map(|n| (*n, maps.join(n))).collect()
            }
            None => Vec::new(),
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(object)
            .context("loading the eBPF object (maps)")?;
        for name in [TO_POD, FROM_POD] {
            let prog: &mut SchedClassifier = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                .try_into()?;
            prog.load()
                .with_context(|| format!("verifier rejected program {name}"))?;
        }
        Ok(Datapath {
            ebpf,
            pin_dir: pin_dir.map(Path::to_path_buf),
            attached: BTreeMap::new(),
        })
    }

    pub fn program_stats(&self) -> Vec<ProgramStats> {
        [TO_POD, FROM_POD]
            .into_iter()
            .map(|name| {
                let info = self.program(name).info().ok();
                ProgramStats {
                    name,
                    verified_instructions: info
                        .as_ref()
                        .and_then(|i| i.verified_instruction_count()),
                    translated_bytes: info.as_ref().and_then(|i| i.size_translated()),
                }
            })
            .collect()
    }

    pub fn program(&self, name: &str) -> &SchedClassifier {
        self.ebpf
            .program(name)
            .and_then(|p| p.try_into().ok())
            .unwrap_or_else(|| panic!("program {name} is loaded"))
    }

    fn program_mut(&mut self, name: &str) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(name)
            .and_then(|p| p.try_into().ok())
            .unwrap_or_else(|| panic!("program {name} is loaded"))
    }

    /// Moves a map out of the object (the map writer and readers own them).
    pub fn take_map(&mut self, name: &str) -> Result<Map> {
        self.ebpf
            .take_map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object (or already taken)"))
    }

    pub fn is_attached(&self, ifindex: u32) -> bool {
        self.attached.contains_key(&ifindex)
    }

    pub fn attached_ifindexes(&self) -> Vec<u32> {
        self.attached.keys().copied().collect()
    }

    /// Attaches both programs to the host-side veth `ifindex`: `to_pod` on its egress,
    /// `from_pod` on its ingress. TCX links are pinned; a link already pinned for this
    /// interface (by an earlier agent) gets its program replaced atomically.
    pub fn attach(&mut self, ifindex: u32) -> Result<()> {
        if self.attached.contains_key(&ifindex) {
            return Ok(());
        }
        let ifname = ifname(ifindex)?;
        let tcx = KernelVersion::current().map(|v| v >= KernelVersion::new(6, 6, 0))?;
        let mut done = Vec::new();
        for (prog_name, attach_type) in [
            (TO_POD, TcAttachType::Egress),
            (FROM_POD, TcAttachType::Ingress),
        ] {
            let attachment = if tcx {
                self.attach_tcx(ifindex, &ifname, prog_name, attach_type)
            } else {
                self.attach_netlink(&ifname, prog_name, attach_type)
            }
            .with_context(|| format!("attaching {prog_name} to {ifname} (ifindex {ifindex})"))?;
            done.push(attachment);
        }
        info!(ifindex, ifname, tcx, "attached");
        self.attached.insert(ifindex, done);
        Ok(())
    }

    fn link_pin(&self, ifindex: u32, prog_name: &str) -> Option<PathBuf> {
        self.pin_dir
            .as_ref()
            .map(|d| d.join("links").join(format!("{ifindex}-{prog_name}")))
    }

    fn attach_tcx(
        &mut self,
        ifindex: u32,
        ifname: &str,
        prog_name: &'static str,
        attach_type: TcAttachType,
    ) -> Result<Attachment> {
        let pin = self.link_pin(ifindex, prog_name);
        let prog = self.program_mut(prog_name);
        let link_id = match pin.as_ref().map(PinnedLink::from_pin) {
            Some(Ok(old)) => {
                debug!(ifname, prog_name, "replacing the program of a pinned link");
                let link = FdLink::from(old).try_into()?;
                prog.attach_to_link(link)?
            }
            _ => prog.attach_with_options(
                ifname,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )?,
        };
        let link = prog.take_link(link_id)?;
        if let Some(pin) = &pin {
            if let Some(dir) = pin.parent() {
                fs::create_dir_all(dir)?;
            }
            let fd_link: FdLink = link.try_into()?;
            match fs::remove_file(pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).context("removing the old link pin"),
            }
            fd_link
                .pin(pin)
                .with_context(|| format!("pinning link at {}", pin.display()))?;
        } else {
            // Unpinned: keep the link alive for the life of the process.
            std::mem::forget(link);
        }
        Ok(Attachment::Tcx { pin })
    }

    fn attach_netlink(
        &mut self,
        ifname: &str,
        prog_name: &'static str,
        attach_type: TcAttachType,
    ) -> Result<Attachment> {
        if let Err(e) = tc::qdisc_add_clsact(ifname) {
            debug!(ifname, "clsact: {e} (may already exist)");
        }
        let prog = self.program_mut(prog_name);
        let id = prog.attach(ifname, attach_type)?;
        let link = prog.take_link(id)?;
        // The filter must outlive this handle: dropping it would detach.
        std::mem::forget(link);
        Ok(Attachment::Netlink)
    }

    /// Detaches both programs from `ifindex` (a pod went away). Links of an interface that no
    /// longer exists are already gone; only their pins remain to be removed.
    pub fn detach(&mut self, ifindex: u32) {
        let Some(attachments) = self.attached.remove(&ifindex) else {
            return;
        };
        for a in attachments {
            match a {
                Attachment::Tcx { pin: Some(pin) } => match PinnedLink::from_pin(&pin) {
                    Ok(link) => match link.unpin() {
                        // Dropping the last reference detaches the program.
                        Ok(fd_link) => drop(fd_link),
                        Err(e) => warn!(path = %pin.display(), "unpinning link: {e}"),
                    },
                    Err(_) => {
                        let _ = fs::remove_file(&pin);
                    }
                },
                Attachment::Tcx { pin: None } | Attachment::Netlink => {
                    // Unpinned links live as long as the process; the interface is usually gone.
                }
            }
        }
        info!(ifindex, "detached");
    }

    /// Pinned links left by an earlier agent, by ifindex.
    pub fn pinned_link_ifindexes(&self) -> Vec<u32> {
        let Some(dir) = self.pin_dir.as_ref().map(|d| d.join("links")) else {
            return Vec::new();
        };
        let Ok(entries) = fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut out: Vec<u32> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                name.split('-').next().and_then(|i| i.parse().ok())
            })
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Removes the pins of links on `ifindex` without having attached them in this process
    /// (interfaces that disappeared while no agent ran).
    pub fn remove_stale_pins(&self, ifindex: u32) {
        for prog in [TO_POD, FROM_POD] {
            if let Some(pin) = self.link_pin(ifindex, prog) {
                let _ = fs::remove_file(pin);
            }
        }
    }
}

/// The interface name of `ifindex` in the current network namespace.
pub fn ifname(ifindex: u32) -> Result<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        bail!(
            "no interface with ifindex {ifindex}: {}",
            io::Error::last_os_error()
        );
    }
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned())
}

/// Mounts a bpffs at `dir` unless one is there already (as Cilium does; these machines boot
/// without one at /sys/fs/bpf).
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let stat = nix::sys::statfs::statfs(dir)?;
    if stat.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC {
        return Ok(());
    }
    nix::mount::mount(
        Some("bpf"),
        dir,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mounting bpffs at {}", dir.display()))?;
    info!(path = %dir.display(), "mounted bpffs");
    Ok(())
}
