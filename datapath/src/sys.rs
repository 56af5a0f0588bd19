//! The few BPF syscalls aya does not expose on the objects we hold: pinning by fd, opening a
//! pin, copying a map's entries, and an object's info (a map's layout, a link's attachment
//! point); the datapath's clock; interface names.
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
    layout: &MapLayout,
    limit: u32,
    only_new: bool,
) -> io::Result<u32> {
    copy_entries_with(from, to, layout, limit, only_new, |_, _| {})
}

/// `copy_entries`, each entry passed through `translate` (key and value in place, at the
/// sizes of `layout`, which both maps share) on its way.
pub fn copy_entries_with(
    from: &OwnedFd,
    to: &OwnedFd,
    layout: &MapLayout,
    limit: u32,
    only_new: bool,
    mut translate: impl FnMut(&mut [u8], &mut [u8]),
) -> io::Result<u32> {
    let mut key = vec![0u8; layout.key_size as usize];
    let mut out_key = vec![0u8; layout.key_size as usize];
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
        out_key.copy_from_slice(&key);
        translate(&mut out_key, &mut value);
        let mut attr = ElemAttr {
            map_fd: to.as_raw_fd() as u32,
            _pad: 0,
            key: out_key.as_ptr() as u64,
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
pub fn map_layout(fd: &OwnedFd) -> io::Result<MapLayout> {
    let mut info = [0u32; 24];
    obj_info(fd, &mut info)?;
    Ok(MapLayout {
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
pub fn ifname(ifindex: u32) -> crate::Result<String> {
    let name = nix::net::if_::if_indextoname(ifindex)
        .map_err(|cause| crate::DatapathError::NoInterface { ifindex, cause })?;
    Ok(name.to_string_lossy().into_owned())
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
