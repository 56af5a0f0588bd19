//! Loading the datapath object, pinning its maps, attaching its programs to pod veths.
//!
//! Layout under the pin directory (`/sys/fs/bpf/palisade` by default):
//! `maps/<MAP NAME>` for every map, `links/<ifindex>-<to_pod|from_pod>` for every TCX link.
//! A restarted agent opens the pinned maps instead of creating new ones, and replaces the
//! program of each pinned link atomically, so enforcement never lapses.
use std::{
    collections::BTreeMap,
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

pub const MAP_NAMES: [&str; 13] = [
    map_names::ENDPOINTS,
    map_names::IDENTITIES,
    map_names::CIDRS,
    map_names::POLICY,
    map_names::CONNTRACK,
    map_names::FRAGMENTS,
    map_names::EVENTS,
    map_names::COUNTERS,
    map_names::EP_STATE,
    map_names::RULE_STATS,
    map_names::EP_ADDRS,
    map_names::NODE_PORTS,
    map_names::CT_RELEASED,
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
    /// Our own references to the pinned maps: a pin removed by hand is put back from them
    /// (`repair_pins`).
    map_pins: Vec<PinGuard>,
    /// Pinned maps that were not adopted because their layout changed (see `load_with`).
    upgrade_report: Vec<String>,
    /// Replaced maps whose entries are copied once more when the links are swapped.
    second_pass: Vec<Replaced>,
}

/// Capacity overrides for `Datapath::load_with` (exhaustion tests load the datapath with tiny
/// maps; production always uses the object's capacities).
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// (map name, max_entries); for the ring buffer, its size in bytes.
    pub max_entries: Vec<(&'static str, u32)>,
    /// Live conntrack entries per endpoint (`CT_QUOTA`); `None`: `CT_QUOTA_DEFAULT`.
    pub ct_quota: Option<u32>,
}

/// A pinned object (map or link) and a file descriptor of ours that keeps it alive: if the pin
/// is removed by hand, the object survives (a TCX link would otherwise detach at once) and is
/// pinned again by `repair`.
struct PinGuard {
    path: PathBuf,
    fd: std::os::fd::OwnedFd,
}

impl PinGuard {
    fn open(path: &Path) -> io::Result<PinGuard> {
        Ok(PinGuard {
            path: path.to_path_buf(),
            fd: bpf_sys::obj_get(path)?,
        })
    }

    /// Pins the object again if its pin is gone; true if it did.
    fn repair(&self) -> io::Result<bool> {
        match fs::symlink_metadata(&self.path) {
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if let Some(dir) = self.path.parent() {
                    fs::create_dir_all(dir)?;
                }
                bpf_sys::obj_pin(&self.fd, &self.path)?;
                Ok(true)
            }
            Err(e) => Err(e),
        }
    }
}

/// The few BPF syscalls aya does not expose on the objects we hold: pinning by fd, opening a
/// pin, and a link's attachment point.
mod bpf_sys {
    use std::{
        ffi::CString,
        io,
        os::{
            fd::{AsRawFd, FromRawFd, OwnedFd},
            unix::ffi::OsStrExt,
        },
        path::Path,
    };

    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

    #[repr(C)]
    #[derive(Default)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }

    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }

    fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: attr is a valid, initialised bpf_attr prefix of the size passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T as *mut libc::c_void,
                std::mem::size_of::<T>(),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(r)
        }
    }

    fn c_path(path: &Path) -> io::Result<CString> {
        CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
        let c = c_path(path)?;
        let mut attr = ObjAttr {
            pathname: c.as_ptr() as u64,
            ..Default::default()
        };
        let fd = sys_bpf(BPF_OBJ_GET, &mut attr)?;
        // SAFETY: the kernel returned a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    pub fn obj_pin(fd: &OwnedFd, path: &Path) -> io::Result<()> {
        let c = c_path(path)?;
        let mut attr = ObjAttr {
            pathname: c.as_ptr() as u64,
            bpf_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        sys_bpf(BPF_OBJ_PIN, &mut attr).map(|_| ())
    }

    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

    /// Copies every entry of `from` (layout `layout`) into `to`, at most `limit` of them;
    /// returns how many were copied. Entries that vanish meanwhile are skipped.
    pub fn copy_entries(
        from: &OwnedFd,
        to: &OwnedFd,
        layout: &super::MapLayout,
        limit: u32,
        only_new: bool,
    ) -> io::Result<u32> {
        let mut key = vec![0u8; layout.key_size as usize];
        let mut next = vec![0u8; layout.key_size as usize];
        let mut value = vec![0u8; layout.value_size as usize];
        let mut first = true;
        let mut copied = 0;
        while copied < limit {
            let mut attr = ElemAttr {
                map_fd: from.as_raw_fd() as u32,
                _pad: 0,
                key: if first { 0 } else { key.as_ptr() as u64 },
                value: next.as_mut_ptr() as u64,
                flags: 0,
            };
            match sys_bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
                Err(e) => return Err(e),
            }
            first = false;
            key.copy_from_slice(&next);
            let mut attr = ElemAttr {
                map_fd: from.as_raw_fd() as u32,
                _pad: 0,
                key: key.as_ptr() as u64,
                value: value.as_mut_ptr() as u64,
                flags: 0,
            };
            if sys_bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).is_err() {
                continue;
            }
            let mut attr = ElemAttr {
                map_fd: to.as_raw_fd() as u32,
                _pad: 0,
                key: key.as_ptr() as u64,
                value: value.as_ptr() as u64,
                // BPF_NOEXIST: never over what the new programs wrote themselves.
                flags: u64::from(only_new),
            };
            match sys_bpf(BPF_MAP_UPDATE_ELEM, &mut attr) {
                Ok(_) => copied += 1,
                Err(e) if only_new && e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(copied)
    }

    /// `BPF_OBJ_GET_INFO_BY_FD`: the kernel fills as much of the object's info struct as
    /// `info` holds.
    fn obj_info<T: Copy>(fd: &OwnedFd, info: &mut [T]) -> io::Result<()> {
        let mut attr = InfoAttr {
            bpf_fd: fd.as_raw_fd() as u32,
            info_len: std::mem::size_of_val(info) as u32,
            info: info.as_mut_ptr() as u64,
        };
        sys_bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr).map(drop)
    }

    /// A map's type, key and value sizes, capacity and flags (`struct bpf_map_info`).
    pub fn map_layout(fd: &OwnedFd) -> io::Result<super::MapLayout> {
        let mut info = [0u32; 24];
        obj_info(fd, &mut info)?;
        Ok(super::MapLayout {
            map_type: info[0],
            key_size: info[2],
            value_size: info[3],
            max_entries: info[4],
            map_flags: info[5],
        })
    }

    /// The ifindex a TCX link is attached to; 0 once it was detached (by `bpftool link detach`
    /// or because its interface went away).
    pub fn tcx_link_ifindex(fd: &OwnedFd) -> io::Result<u32> {
        // struct bpf_link_info: type, id, prog_id, then an 8-aligned union whose tcx member
        // starts with the ifindex.
        let mut info = [0u64; 16];
        obj_info(fd, &mut info)?;
        Ok((info[2] & 0xffff_ffff) as u32)
    }
}

enum Attachment {
    /// A TCX link, pinned (with our guard on it) when the datapath has a pin directory.
    Tcx {
        pin: Option<PathBuf>,
        guard: Option<PinGuard>,
    },
    /// Legacy clsact filter (kernels without TCX).
    Netlink,
}

impl Datapath {
    /// Loads the object and both programs (running the verifier). With `pin_dir`, maps are
    /// pinned there (and adopted if already pinned); without it they are private to this
    /// process (BPF program test runs).
    pub fn load(object: &[u8], pin_dir: Option<&Path>) -> Result<Self> {
        Self::load_with(object, pin_dir, &LoadOptions::default())
    }

    /// `load`, with capacity overrides (see `LoadOptions`).
    pub fn load_with(object: &[u8], pin_dir: Option<&Path>, opts: &LoadOptions) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        for (name, max) in &opts.max_entries {
            loader.map_max_entries(name, *max);
        }
        let ct_quota = opts.ct_quota.unwrap_or(palisade_common::CT_QUOTA_DEFAULT);
        if ct_quota == 0 {
            bail!("the conntrack quota per endpoint must be at least 1");
        }
        loader.override_global("CT_QUOTA", &ct_quota, true);
        let map_paths: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => {
                let maps = dir.join("maps");
                fs::create_dir_all(&maps)
                    .with_context(|| format!("creating {}", maps.display()))?;
                MAP_NAMES.iter().map(|n| (*n, maps.join(n))).collect()
            }
            None => Vec::new(),
        };
        // A pinned map whose layout differs from this object's (an upgrade that changed a key,
        // a value or a capacity) must not be adopted: the new programs would read it with the
        // wrong layout. Its pin is removed and a fresh map created; the old programs keep the
        // old map until their links are swapped (`attach`, after the new maps are written).
        let replaced = if pin_dir.is_some() {
            unpin_incompatible_maps(object, &map_paths, opts)?
        } else {
            Vec::new()
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
        if let Some(dir) = pin_dir {
            // The CNI plugin attaches these to new pods before the agent knows them.
            for name in [TO_POD, FROM_POD] {
                let prog: &mut SchedClassifier = ebpf
                    .program_mut(name)
                    .ok_or_else(|| anyhow!("program {name} missing from the object"))?
                    .try_into()?;
                pin_program(prog, &program_pin_path(dir, name))?;
            }
        }
        // Only the capacity or flags changed: the entries keep their meaning and are copied
        // (conntrack above all: established flows whose replies only conntrack allows). A map
        // whose key or value changed starts empty: the agent rewrites the policy maps from its
        // store; datapath state (conntrack, fragments, rate limits, counters) starts afresh.
        let mut upgrade_report = Vec::new();
        let mut second_pass = Vec::new();
        for r in replaced {
            let mut line = format!(
                "map {}: the pinned map's layout ({}) differs from this datapath's ({}): a new \
                 map replaces it (the old one serves the old programs until they are swapped)",
                r.name, r.old, r.new
            );
            if same_kind(r.old.map_type, r.new.map_type)
                && r.old.key_size == r.new.key_size
                && r.old.value_size == r.new.value_size
                && COPYABLE_MAP_TYPES.contains(&r.new.map_type)
            {
                match bpf_sys::obj_get(&r.path).and_then(|new| {
                    bpf_sys::copy_entries(&r.old_fd, &new, &r.old, r.new.max_entries, false)
                }) {
                    Ok(n) => {
                        line.push_str(&format!("; {n} entries copied"));
                        // Entries the old programs add until they are swapped out are copied
                        // again by `finish_upgrade`.
                        second_pass.push(r);
                    }
                    Err(e) => line.push_str(&format!("; copying its entries failed: {e}")),
                }
            } else {
                line.push_str("; it starts empty");
            }
            warn!("{line}");
            upgrade_report.push(line);
        }
        let mut map_pins = Vec::new();
        for (name, path) in &map_paths {
            match PinGuard::open(path) {
                Ok(g) => map_pins.push(g),
                Err(e) => warn!(map = name, "cannot hold pinned map {}: {e}", path.display()),
            }
        }
        Ok(Datapath {
            ebpf,
            pin_dir: pin_dir.map(Path::to_path_buf),
            attached: BTreeMap::new(),
            map_pins,
            upgrade_report,
            second_pass,
        })
    }

    /// Pinned maps of an earlier datapath that were replaced because their layout changed,
    /// and what became of their entries.
    pub fn replaced_maps(&self) -> &[String] {
        &self.upgrade_report
    }

    /// Once every link runs the new programs: copies what the old programs added to replaced
    /// maps since `load_with` copied them (flows opened in between keep their entries), and
    /// lets the old maps go. Returns what it did.
    pub fn finish_upgrade(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for r in std::mem::take(&mut self.second_pass) {
            match bpf_sys::obj_get(&r.path).and_then(|new| {
                bpf_sys::copy_entries(&r.old_fd, &new, &r.old, r.new.max_entries, true)
            }) {
                Ok(n) => out.push(format!(
                    "map {}: {n} more entries copied after the swap",
                    r.name
                )),
                Err(e) => out.push(format!(
                    "map {}: copying after the swap failed: {e}",
                    r.name
                )),
            }
        }
        out
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

    /// A map still in the object (not taken), to read.
    pub fn map(&self, name: &str) -> Option<&Map> {
        self.ebpf.map(name)
    }

    /// A handle of its own on one of the object's maps (for a thread that works on it beside
    /// the writer and readers, which own the object's handles).
    pub fn open_map(&self, name: &str) -> Result<aya::maps::MapData> {
        let map = self
            .ebpf
            .map(name)
            .ok_or_else(|| anyhow!("map {name} missing from the object (or already taken)"))?;
        let data = match map {
            Map::HashMap(m) | Map::LruHashMap(m) | Map::Array(m) => m,
            _ => bail!("map {name}: open_map supports hash maps and arrays"),
        };
        let id = data
            .info()
            .with_context(|| format!("map {name}: reading its info"))?
            .id();
        aya::maps::MapData::from_id(id).with_context(|| format!("map {name}: opening it by id"))
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
            .map(|d| link_pin_path(d, ifindex, prog_name))
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
        // A link pinned by an earlier agent gets its program replaced atomically. A link that
        // was detached meanwhile (`bpftool link detach`) cannot be updated: its pin is removed
        // and the program attached afresh.
        let mut replaced = None;
        if let Some(Ok(old)) = pin.as_ref().map(PinnedLink::from_pin) {
            debug!(ifname, prog_name, "replacing the program of a pinned link");
            let link = FdLink::from(old).try_into()?;
            match prog.attach_to_link(link) {
                Ok(id) => replaced = Some(id),
                Err(e) => {
                    warn!(
                        ifname,
                        prog_name, "pinned link is stale ({e}): attaching afresh"
                    );
                    if let Some(pin) = &pin {
                        let _ = fs::remove_file(pin);
                    }
                }
            }
        }
        let link_id = match replaced {
            Some(id) => id,
            None => prog.attach_with_options(
                ifname,
                attach_type,
                // First: a program of another owner before ours could end the chain (TCX_PASS)
                // before the policy is applied.
                TcAttachOptions::TcxOrder(LinkOrder::first()),
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
        let guard = match &pin {
            Some(p) => Some(PinGuard::open(p).with_context(|| format!("opening {}", p.display()))?),
            None => None,
        };
        Ok(Attachment::Tcx { pin, guard })
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
                Attachment::Tcx {
                    pin: Some(pin),
                    guard,
                } => {
                    // Our own reference must go too, or the link would stay attached.
                    drop(guard);
                    match PinnedLink::from_pin(&pin) {
                        Ok(link) => match link.unpin() {
                            // Dropping the last reference detaches the program.
                            Ok(fd_link) => drop(fd_link),
                            Err(e) => warn!(path = %pin.display(), "unpinning link: {e}"),
                        },
                        Err(_) => {
                            let _ = fs::remove_file(&pin);
                        }
                    }
                }
                Attachment::Tcx { pin: None, .. } | Attachment::Netlink => {
                    // Unpinned links live as long as the process; the interface is usually gone.
                }
            }
        }
        info!(ifindex, "detached");
    }

    /// Puts back pins removed by hand (maps and links: our own file descriptors kept them
    /// alive) and re-attaches endpoints whose link was detached behind our back. Returns what
    /// it repaired, for the log and the status.
    pub fn repair(&mut self) -> Vec<String> {
        let mut repaired = Vec::new();
        for g in &self.map_pins {
            match g.repair() {
                Ok(true) => repaired.push(format!("map pin {} restored", g.path.display())),
                Ok(false) => {}
                Err(e) => {
                    repaired.push(format!("map pin {}: cannot restore: {e}", g.path.display()))
                }
            }
        }
        let mut reattach = Vec::new();
        for (ifindex, attachments) in &self.attached {
            for a in attachments {
                let Attachment::Tcx {
                    guard: Some(g),
                    pin: Some(_),
                } = a
                else {
                    continue;
                };
                match bpf_sys::tcx_link_ifindex(&g.fd) {
                    Ok(i) if i == *ifindex => {}
                    // Detached (or the interface is gone: re-attaching then fails harmlessly
                    // and the next reconcile forgets the endpoint).
                    Ok(_) | Err(_) => {
                        reattach.push(*ifindex);
                        continue;
                    }
                }
                match g.repair() {
                    Ok(true) => repaired.push(format!("link pin {} restored", g.path.display())),
                    Ok(false) => {}
                    Err(e) => repaired.push(format!(
                        "link pin {}: cannot restore: {e}",
                        g.path.display()
                    )),
                }
            }
        }
        reattach.sort_unstable();
        reattach.dedup();
        for ifindex in reattach {
            if ifname(ifindex).is_err() {
                continue;
            }
            self.detach(ifindex);
            match self.attach(ifindex) {
                Ok(()) => repaired.push(format!("ifindex {ifindex}: detached link re-attached")),
                Err(e) => repaired.push(format!("ifindex {ifindex}: re-attaching: {e:#}")),
            }
        }
        repaired
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
        if let Ok(fd) = bpf_sys::obj_get(&pin) {
            if bpf_sys::tcx_link_ifindex(&fd).ok() == Some(ifindex) {
                continue;
            }
            // A link of an interface that is gone (same ifindex, reused).
            let _ = fs::remove_file(&pin);
        }
        let prog_pin = program_pin_path(pin_dir, prog_name);
        let mut prog = SchedClassifier::from_pin(&prog_pin)
            .with_context(|| format!("opening the pinned program {}", prog_pin.display()))?;
        let id = prog
            .attach_with_options(
                &ifname,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::first()),
            )
            .with_context(|| format!("attaching {prog_name} to {ifname} (ifindex {ifindex})"))?;
        let link: FdLink = prog.take_link(id)?.try_into()?;
        if let Some(dir) = pin.parent() {
            fs::create_dir_all(dir)?;
        }
        link.pin(&pin)
            .with_context(|| format!("pinning link at {}", pin.display()))?;
    }
    Ok(())
}

/// Whether both links of `ifindex` are pinned and attached to it.
pub fn links_attached(pin_dir: &Path, ifindex: u32) -> bool {
    [TO_POD, FROM_POD].iter().all(|p| {
        bpf_sys::obj_get(&link_pin_path(pin_dir, ifindex, p))
            .and_then(|fd| bpf_sys::tcx_link_ifindex(&fd))
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
fn pin_program(prog: &mut SchedClassifier, path: &Path) -> Result<()> {
    let dir = path.parent().context("program pin path has no parent")?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    // (bpffs refuses names with a dot.)
    let tmp = dir.join(format!(
        "{}_new_{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    prog.pin(&tmp)
        .with_context(|| format!("pinning program at {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming program pin to {}", path.display()))
}

/// The kernel's view of a map: what must match for a pinned map to be adopted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapLayout {
    pub map_type: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub map_flags: u32,
}

impl std::fmt::Display for MapLayout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "type {}, key {} B, value {} B, {} entries, flags {:#x}",
            self.map_type, self.key_size, self.value_size, self.max_entries, self.map_flags
        )
    }
}

/// The layout of the map pinned at `path`, if there is one.
pub fn pinned_map_layout(path: &Path) -> Option<MapLayout> {
    let fd = bpf_sys::obj_get(path).ok()?;
    bpf_sys::map_layout(&fd).ok()
}

/// The layouts the object defines (with `opts`' capacity overrides).
pub fn object_map_layouts(
    object: &[u8],
    opts: &LoadOptions,
) -> Result<BTreeMap<String, MapLayout>> {
    let obj = aya_obj::Object::parse(object).context("parsing the eBPF object")?;
    Ok(obj
        .maps
        .iter()
        .map(|(name, m)| {
            let max_entries = opts
                .max_entries
                .iter()
                .find(|(n, _)| n == name)
                .map_or(m.max_entries(), |(_, v)| *v);
            (
                name.clone(),
                MapLayout {
                    map_type: m.map_type(),
                    key_size: m.key_size(),
                    value_size: m.value_size(),
                    max_entries,
                    map_flags: m.map_flags(),
                },
            )
        })
        .collect())
}

/// Map types whose entries `load_with` copies into a replacement of another capacity (plain
/// and LRU hashes, LPM tries, arrays; not per-CPU maps or ring buffers).
const COPYABLE_MAP_TYPES: &[u32] = &[1, 2, 9, 11];

/// Whether entries of a map of type `old` keep their meaning in one of type `new`: the same
/// type, or a plain hash and an LRU hash (CONNTRACK was an LRU hash before it had quotas).
fn same_kind(old: u32, new: u32) -> bool {
    const HASH: u32 = 1;
    const LRU_HASH: u32 = 9;
    old == new || matches!((old, new), (HASH, LRU_HASH) | (LRU_HASH, HASH))
}

/// A pinned map set aside because its layout differs from the object's.
struct Replaced {
    name: String,
    path: PathBuf,
    /// Held until its entries are copied (the old programs hold it too, until swapped).
    old_fd: std::os::fd::OwnedFd,
    old: MapLayout,
    new: MapLayout,
}

/// Removes the pins of maps whose layout differs from the object's (keeping a descriptor on
/// each, to copy from).
fn unpin_incompatible_maps(
    object: &[u8],
    map_paths: &[(&str, PathBuf)],
    opts: &LoadOptions,
) -> Result<Vec<Replaced>> {
    let want = object_map_layouts(object, opts)?;
    let mut out = Vec::new();
    for (name, path) in map_paths {
        let Some(want) = want.get(*name) else {
            continue;
        };
        let Ok(fd) = bpf_sys::obj_get(path) else {
            continue;
        };
        let Ok(have) = bpf_sys::map_layout(&fd) else {
            continue;
        };
        if layouts_compatible(&have, want) {
            continue;
        }
        fs::remove_file(path)
            .with_context(|| format!("removing incompatible map pin {}", path.display()))?;
        out.push(Replaced {
            name: name.to_string(),
            path: path.clone(),
            old_fd: fd,
            old: have,
            new: *want,
        });
    }
    Ok(out)
}

/// The kernel may report flags it added itself (e.g. for a ring buffer's or an LRU's
/// defaults); key, value, type and capacity must match, and every flag the object asks for.
fn layouts_compatible(have: &MapLayout, want: &MapLayout) -> bool {
    have.map_type == want.map_type
        && have.key_size == want.key_size
        && have.value_size == want.value_size
        && have.max_entries == want.max_entries
        && have.map_flags & want.map_flags == want.map_flags
}

/// `clock` now, in nanoseconds (the datapath's timestamps are CLOCK_MONOTONIC).
pub fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The interface name of `ifindex` in the current network namespace.
pub fn ifname(ifindex: u32) -> Result<String> {
    let name = nix::net::if_::if_indextoname(ifindex)
        .with_context(|| format!("no interface with ifindex {ifindex}"))?;
    Ok(name.to_string_lossy().into_owned())
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
