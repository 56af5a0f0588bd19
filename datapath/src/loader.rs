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

use aya::{
    Ebpf, EbpfLoader,
    maps::Map,
    programs::{
        LinkOrder, ProgramError, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, TcAttachOptions},
    },
    util::KernelVersion,
};
use palisade_common::map_names;
use tracing::{debug, info, warn};

use crate::{
    error::{DatapathError, Result},
    pins::{PinGuard, link_pin_path, pin_program, program_pin_path},
    sys::{self, ifname},
    upgrade::{COPYABLE_MAP_TYPES, LegacyConntrack, Replaced, same_kind, unpin_incompatible_maps},
};

pub use crate::pins::{FROM_POD, TO_POD};

pub const MAP_NAMES: [&str; 23] = [
    map_names::ENDPOINTS,
    map_names::ENDPOINT_SLOTS,
    map_names::IDENTITIES,
    map_names::CIDRS,
    map_names::POLICY,
    map_names::PREFIX_LENGTHS,
    map_names::CONNTRACK,
    map_names::FRAGMENTS,
    map_names::EVENTS,
    map_names::COUNTERS,
    map_names::EP_STATE,
    map_names::RULE_STATS,
    map_names::EP_ADDRS,
    map_names::NODE_PORTS,
    map_names::CT_RELEASED,
    map_names::FQDN_IPS,
    map_names::DNS_SERVERS,
    map_names::DNS_ANSWERS,
    map_names::FQDN_CTL,
    map_names::EGW_CTL,
    map_names::EGW_DESTS,
    map_names::EGW_GROUPS,
    map_names::EGW_FLOWS,
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
    /// The conntrack map of a datapath before `CT_FLOWS`, translated once more likewise.
    legacy_ct: Option<LegacyConntrack>,
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
            return Err(DatapathError::ZeroQuota);
        }
        loader.override_global("CT_QUOTA", &ct_quota, true);
        let map_paths: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => {
                let maps = dir.join("maps");
                fs::create_dir_all(&maps).map_err(DatapathError::io("creating", &maps))?;
                MAP_NAMES.iter().map(|n| (*n, maps.join(n))).collect()
            }
            None => Vec::new(),
        };
        // A pinned map whose layout differs from this object's (an upgrade that changed a key,
        // a value or a capacity) must not be adopted: the new programs would read it with the
        // wrong layout. Its pin is removed and a fresh map created; the old programs keep the
        // old map until their links are swapped (`attach`, after the new maps are written).
        let replaced = if pin_dir.is_some() {
            unpin_incompatible_maps(object, &map_paths, &opts.max_entries)?
        } else {
            Vec::new()
        };
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(object)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for name in [TO_POD, FROM_POD] {
            let prog = classifier(&mut ebpf, name)?;
            prog.load().map_err(|cause| DatapathError::Verifier {
                program: name,
                cause: Box::new(cause),
            })?;
        }
        if let Some(dir) = pin_dir {
            // The CNI plugin attaches these to new pods before the agent knows them.
            for name in [TO_POD, FROM_POD] {
                let prog = classifier(&mut ebpf, name)?;
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
                match sys::obj_get(&r.path).and_then(|new| {
                    sys::copy_entries(&r.old_fd, &new, &r.old, r.new.max_entries, false)
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
        // A datapath before CT_FLOWS tracked flows in CONNTRACK, a key per direction: its
        // flows are translated (replies of established flows keep passing across the swap).
        let mut legacy_ct = None;
        if let Some(dir) = pin_dir
            && let Some(legacy) = LegacyConntrack::unpin(&dir.join("maps"))?
        {
            let mut line = format!(
                "map {}: the conntrack map of an earlier datapath (a key per direction) \
                 is replaced by {}",
                map_names::LEGACY_CONNTRACK,
                map_names::CONNTRACK
            );
            if legacy.translatable() {
                match Self::translate_legacy(&legacy, dir, false) {
                    Ok(n) => {
                        line.push_str(&format!("; {n} flows translated"));
                        legacy_ct = Some(legacy);
                    }
                    Err(e) => line.push_str(&format!("; translating its flows failed: {e}")),
                }
            } else {
                line.push_str(&format!(
                    "; its layout ({}) is not one this datapath can read: its flows are dropped",
                    legacy.layout
                ));
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
            legacy_ct,
        })
    }

    /// Translates `legacy`'s flows into the `CT_FLOWS` pinned under `pin_dir`.
    fn translate_legacy(
        legacy: &LegacyConntrack,
        pin_dir: &Path,
        only_new: bool,
    ) -> io::Result<u32> {
        let new = sys::obj_get(&pin_dir.join("maps").join(map_names::CONNTRACK))?;
        let limit = sys::map_layout(&new)?.max_entries;
        legacy.translate_into(&new, limit, only_new)
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
        if let (Some(legacy), Some(dir)) = (self.legacy_ct.take(), self.pin_dir.as_deref()) {
            out.push(match Self::translate_legacy(&legacy, dir, true) {
                Ok(n) => format!(
                    "map {}: {n} more flows translated after the swap",
                    map_names::LEGACY_CONNTRACK
                ),
                Err(e) => format!(
                    "map {}: translating after the swap failed: {e}",
                    map_names::LEGACY_CONNTRACK
                ),
            });
        }
        for r in std::mem::take(&mut self.second_pass) {
            match sys::obj_get(&r.path)
                .and_then(|new| sys::copy_entries(&r.old_fd, &new, &r.old, r.new.max_entries, true))
            {
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
            .ok_or_else(|| DatapathError::MissingMap(name.to_string()))?;
        let data = match map {
            Map::HashMap(m) | Map::LruHashMap(m) | Map::Array(m) => m,
            _ => {
                return Err(DatapathError::MapKind {
                    map: name.to_string(),
                    why: "open_map supports hash maps and arrays",
                });
            }
        };
        let id = data
            .info()
            .map_err(DatapathError::map(name, "reading its info"))?
            .id();
        aya::maps::MapData::from_id(id).map_err(DatapathError::map(name, "opening it by id"))
    }

    /// Moves a map out of the object (the map writer and readers own them).
    pub fn take_map(&mut self, name: &str) -> Result<Map> {
        self.ebpf
            .take_map(name)
            .ok_or_else(|| DatapathError::MissingMap(name.to_string()))
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
        let tcx = KernelVersion::current()
            .map(|v| v >= KernelVersion::new(6, 6, 0))
            .map_err(|e| DatapathError::KernelVersion(e.to_string()))?;
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
            .map_err(|cause| DatapathError::Attach {
                program: prog_name,
                ifname: ifname.clone(),
                ifindex,
                cause: Box::new(cause),
            })?;
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
            let link = FdLink::from(old)
                .try_into()
                .map_err(|cause| DatapathError::Link {
                    path: pin.clone().unwrap_or_default(),
                    cause: Box::new(cause),
                })?;
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
            None => prog
                .attach_with_options(
                    ifname,
                    attach_type,
                    // First: a program of another owner before ours could end the chain (TCX_PASS)
                    // before the policy is applied.
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(|cause| program_error(prog_name, cause))?,
        };
        let link = prog
            .take_link(link_id)
            .map_err(|cause| program_error(prog_name, cause))?;
        if let Some(pin) = &pin {
            if let Some(dir) = pin.parent() {
                fs::create_dir_all(dir).map_err(DatapathError::io("creating", dir))?;
            }
            let fd_link: FdLink = link.try_into().map_err(|cause| DatapathError::Link {
                path: pin.clone(),
                cause: Box::new(cause),
            })?;
            match fs::remove_file(pin) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(DatapathError::io("removing the old link pin", pin)(e)),
            }
            fd_link.pin(pin).map_err(|e| DatapathError::Io {
                doing: "pinning link at",
                path: pin.clone(),
                cause: io::Error::other(e.to_string()),
            })?;
        } else {
            // Unpinned: keep the link alive for the life of the process.
            std::mem::forget(link);
        }
        let guard = match &pin {
            Some(p) => Some(PinGuard::open(p).map_err(DatapathError::io("opening", p))?),
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
        let id = prog
            .attach(ifname, attach_type)
            .map_err(|cause| program_error(prog_name, cause))?;
        let link = prog
            .take_link(id)
            .map_err(|cause| program_error(prog_name, cause))?;
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
                match sys::tcx_link_ifindex(&g.fd) {
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
                Err(e) => repaired.push(format!("ifindex {ifindex}: re-attaching: {e}")),
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

/// One of the object's two programs, as the classifier it is.
fn classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?
        .try_into()
        .map_err(|cause| program_error(name, cause))
}

fn program_error(program: &'static str, cause: ProgramError) -> DatapathError {
    DatapathError::Program {
        program,
        cause: Box::new(cause),
    }
}
