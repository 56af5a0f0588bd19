//! The pin directory's layout, shared by the agent and the CNI plugin, and what the CNI plugin
//! does with it without an agent process.
//!
//! Layout under the pin directory (`/sys/fs/bpf/palisade` by default): `maps/<MAP NAME>` for
//! every map, `progs/<to_pod|from_pod>` for the loaded programs, `links/<ifindex>-<to_pod|
//! from_pod>` for every TCX link.
use std::{
    fs, io,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, links::FdLink, tc::TcAttachOptions};
use tracing::info;

use crate::{
    error::{DatapathError, Result},
    sys::{self, ifname},
};

/// The two programs, by the direction of the pod's traffic they judge (and their names under
/// `progs/` and in `links/`).
pub const TO_POD: &str = "to_pod";
pub const FROM_POD: &str = "from_pod";

/// A pinned object (map or link) and a file descriptor of ours that keeps it alive: if the pin
/// is removed by hand, the object survives (a TCX link would otherwise detach at once) and is
/// pinned again by `repair`.
pub(crate) struct PinGuard {
    pub(crate) path: PathBuf,
    pub(crate) fd: OwnedFd,
}

impl PinGuard {
    pub(crate) fn open(path: &Path) -> io::Result<PinGuard> {
        Ok(PinGuard {
            path: path.to_path_buf(),
            fd: sys::obj_get(path)?,
        })
    }

    /// Pins the object again if its pin is gone; true if it did.
    pub(crate) fn repair(&self) -> io::Result<bool> {
        match fs::symlink_metadata(&self.path) {
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(dir) = self.path.parent() {
                    fs::create_dir_all(dir)?;
                }
                sys::obj_pin(&self.fd, &self.path)?;
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }
}

/// Attaches the **pinned** programs to `ifindex` and pins the links where the agent adopts
/// them: what the CNI plugin does at pod creation, with no agent process involved (the agent
/// pins its programs at start). Links already pinned and attached to this interface are kept
/// (a repeated ADD). Needs TCX (kernel >= 6.6).
pub fn attach_from_pins(pin_dir: &Path, ifindex: u32) -> Result<()> {
    let ifname = ifname(ifindex)?;
    for (prog_name, attach_type) in [
        (TO_POD, TcAttachType::Egress),
        (FROM_POD, TcAttachType::Ingress),
    ] {
        let pin = link_pin_path(pin_dir, ifindex, prog_name);
        if let Ok(fd) = sys::obj_get(&pin) {
            if sys::tcx_link_ifindex(&fd).ok() == Some(ifindex) {
                continue;
            }
            // A link of an interface that is gone (same ifindex, reused).
            let _ = fs::remove_file(&pin);
        }
        let prog_pin = program_pin_path(pin_dir, prog_name);
        let mut prog = SchedClassifier::from_pin(&prog_pin).map_err(|e| DatapathError::Io {
            doing: "opening the pinned program",
            path: prog_pin.clone(),
            cause: io::Error::other(e.to_string()),
        })?;
        let id = prog
            .attach_with_options(
                &ifname,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .map_err(|cause| DatapathError::Attach {
                program: prog_name,
                ifname: ifname.clone(),
                ifindex,
                cause: Box::new(DatapathError::Program {
                    program: prog_name,
                    cause: Box::new(cause),
                }),
            })?;
        let link = prog.take_link(id).map_err(|cause| DatapathError::Program {
            program: prog_name,
            cause: Box::new(cause),
        })?;
        let link: FdLink = link.try_into().map_err(|cause| DatapathError::Link {
            path: pin.clone(),
            cause: Box::new(cause),
        })?;
        if let Some(dir) = pin.parent() {
            fs::create_dir_all(dir).map_err(DatapathError::io("creating", dir))?;
        }
        link.pin(&pin).map_err(|e| DatapathError::Io {
            doing: "pinning link at",
            path: pin.clone(),
            cause: io::Error::other(e.to_string()),
        })?;
    }
    Ok(())
}

/// Whether both links of `ifindex` are pinned and attached to it.
pub fn links_attached(pin_dir: &Path, ifindex: u32) -> bool {
    [TO_POD, FROM_POD].iter().all(|p| {
        sys::obj_get(&link_pin_path(pin_dir, ifindex, p))
            .and_then(|fd| sys::tcx_link_ifindex(&fd))
            .is_ok_and(|i| i == ifindex)
    })
}

/// Removes the link pins of `ifindex` (a link without pin or holder detaches).
pub fn remove_link_pins(pin_dir: &Path, ifindex: u32) {
    for prog in [TO_POD, FROM_POD] {
        let _ = fs::remove_file(link_pin_path(pin_dir, ifindex, prog));
    }
}

/// Where the link of `prog_name` on `ifindex` is pinned (the agent and the CNI plugin agree).
pub fn link_pin_path(pin_dir: &Path, ifindex: u32, prog_name: &str) -> PathBuf {
    pin_dir.join("links").join(format!("{ifindex}-{prog_name}"))
}

/// Where the loaded program `prog_name` is pinned, for the CNI plugin to attach to new pods.
pub fn program_pin_path(pin_dir: &Path, prog_name: &str) -> PathBuf {
    pin_dir.join("progs").join(prog_name)
}

/// Where map `name` is pinned.
pub fn map_pin_path(pin_dir: &Path, name: &str) -> PathBuf {
    pin_dir.join("maps").join(name)
}

/// Pins a loaded program at `path`, replacing what is pinned there in one step (pinned beside
/// it, then renamed over it), so a reader always finds a whole program.
pub(crate) fn pin_program(prog: &mut SchedClassifier, path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    fs::create_dir_all(dir).map_err(DatapathError::io("creating", dir))?;
    // (bpffs refuses names with a dot.)
    let tmp = dir.join(format!(
        "{}_new_{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    prog.pin(&tmp).map_err(|e| DatapathError::Io {
        doing: "pinning program at",
        path: tmp.clone(),
        cause: io::Error::other(e.to_string()),
    })?;
    fs::rename(&tmp, path).map_err(DatapathError::io("renaming program pin to", path))
}

/// Mounts a bpffs at `dir` unless one is there already (as Cilium does; these machines boot
/// without one at /sys/fs/bpf).
pub fn ensure_bpffs(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(DatapathError::io("creating", dir))?;
    let stat = nix::sys::statfs::statfs(dir)
        .map_err(|e| DatapathError::io("statfs", dir)(io::Error::from(e)))?;
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
    .map_err(|e| DatapathError::io("mounting bpffs at", dir)(io::Error::from(e)))?;
    info!(path = %dir.display(), "mounted bpffs");
    Ok(())
}
