//! What the datapath's building blocks cost on this machine, each alone in a program of a few
//! instructions run by BPF_PROG_TEST_RUN on the same CPU and packet as the per-packet figures:
//! the measured basis of "what limits" a per-packet goal. Each figure is the program's mean
//! minus the empty program's (the test-run machinery), so it is what the block adds.
//!
//! The programs are assembled here (a handful of instructions each) and loaded through the raw
//! bpf(2) syscall with maps created the same way, so that nothing but the block is measured.
use anyhow::{Result, bail};

use crate::stats::Figure;

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const MAP_HASH: u32 = 1;
const MAP_PERCPU_ARRAY: u32 = 6;
const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_JIFFIES64: i32 = 118;
const HELPER_KTIME_COARSE: i32 = 160;

/// An fd we own.
struct Fd(i32);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: closing an fd this value owns.
        unsafe { libc::close(self.0) };
    }
}

fn bpf(cmd: libc::c_long, attr: &mut [u8]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a live, zero-padded bpf_attr for `cmd` whose pointers point at live
    // buffers of the sizes it states.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// A map of `map_type` holding one entry: an all-zero key and value.
fn map_with_zero_entry(map_type: u32, key: u32, value: u32, max: u32) -> Result<Fd> {
    let mut attr = [0u8; 72];
    attr[0..4].copy_from_slice(&map_type.to_ne_bytes());
    attr[4..8].copy_from_slice(&key.to_ne_bytes());
    attr[8..12].copy_from_slice(&value.to_ne_bytes());
    attr[12..16].copy_from_slice(&max.to_ne_bytes());
    let fd = Fd(bpf(BPF_MAP_CREATE, &mut attr)? as i32);
    let k = vec![0u8; key as usize];
    // Per-CPU values: one per possible CPU, 8-byte aligned.
    let v = vec![0u8; (value as usize).next_multiple_of(8) * 512];
    let mut attr = [0u8; 32];
    attr[0..4].copy_from_slice(&(fd.0 as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(k.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(v.as_ptr() as u64).to_ne_bytes());
    bpf(BPF_MAP_UPDATE_ELEM, &mut attr)?;
    Ok(fd)
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> u64 {
    u64::from(code)
        | u64::from(dst & 0xf) << 8
        | u64::from(src & 0xf) << 12
        | u64::from(off as u16) << 16
        | u64::from(imm as u32) << 32
}

/// `r0 = 0; exit`.
fn ret_ok() -> [u64; 2] {
    [insn(0xb7, 0, 0, 0, 0), insn(0x95, 0, 0, 0, 0)]
}

/// A lookup of the all-zero `key_size`-byte key in the map `map_fd`.
fn lookup_program(map_fd: i32, key_size: u32) -> Vec<u64> {
    let mut p = Vec::new();
    // The key on the stack, zeroed four bytes at a time.
    for i in 0..key_size.div_ceil(4) {
        p.push(insn(0x62, 10, 0, -4 * (i as i16 + 1), 0)); // *(u32 *)(r10 - 4(i+1)) = 0
    }
    let off = -4 * key_size.div_ceil(4) as i32;
    p.push(insn(0xbf, 2, 10, 0, 0)); // r2 = r10
    p.push(insn(0x07, 2, 0, 0, off)); // r2 += off
    p.push(insn(0x18, 1, 1, 0, map_fd)); // r1 = map (ld_imm64, BPF_PSEUDO_MAP_FD)
    p.push(0);
    p.push(insn(0x85, 0, 0, 0, HELPER_MAP_LOOKUP));
    p.extend(ret_ok());
    p
}

/// A call of the helper `id` that takes no arguments.
fn helper_program(id: i32) -> Vec<u64> {
    let mut p = vec![insn(0x85, 0, 0, 0, id)];
    p.extend(ret_ok());
    p
}

/// The mean ns per run of `insns` (a TC program) over `repeat` runs on `pkt`.
pub fn run_program(insns: &[u64], pkt: &[u8], repeat: u32) -> Result<f64> {
    let license = b"GPL\0";
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&3u32.to_ne_bytes()); // BPF_PROG_TYPE_SCHED_CLS
    attr[4..8].copy_from_slice(&(insns.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    let prog = match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Fd(fd as i32),
        Err(e) => bail!("loading a {}-instruction program: {e}", insns.len()),
    };
    let mut attr = [0u8; 80];
    attr[0..4].copy_from_slice(&(prog.0 as u32).to_ne_bytes());
    attr[8..12].copy_from_slice(&(pkt.len() as u32).to_ne_bytes());
    attr[16..24].copy_from_slice(&(pkt.as_ptr() as u64).to_ne_bytes());
    attr[32..36].copy_from_slice(&repeat.to_ne_bytes());
    if let Err(e) = bpf(BPF_PROG_TEST_RUN, &mut attr) {
        bail!("test run: {e}");
    }
    Ok(f64::from(u32::from_ne_bytes(
        attr[36..40].try_into().expect("4 bytes"),
    )))
}

/// The test-run machinery alone: `r0 = 0; exit`.
pub fn empty_program_ns(pkt: &[u8], repeat: u32) -> Result<f64> {
    run_program(&ret_ok(), pkt, repeat)
}

/// One building block: its name in the report and what it stands for in the datapath.
pub struct Primitive {
    pub name: &'static str,
    pub what: &'static str,
}

pub const PRIMITIVES: [Primitive; 7] = [
    Primitive {
        name: "hash_u32_key",
        what: "a hash lookup with a 4-byte key (ENDPOINTS by ifindex, EP_STATE)",
    },
    Primitive {
        name: "hash_20_byte_key",
        what: "a hash lookup with a 20-byte key (IDENTITIES, EP_ADDRS)",
    },
    Primitive {
        name: "hash_44_byte_key",
        what: "a hash lookup with CT_FLOWS' 44-byte key, in a table of its size",
    },
    Primitive {
        name: "hash_16_byte_key",
        what: "a hash lookup with a 16-byte key (an IPv4-only conntrack key), same table size",
    },
    Primitive {
        name: "percpu_array",
        what: "a per-CPU array lookup (COUNTERS, RULE_STATS, the scratch slots)",
    },
    Primitive {
        name: "clock_coarse",
        what: "bpf_ktime_get_coarse_ns (the datapath's clock)",
    },
    Primitive {
        name: "jiffies64",
        what: "bpf_jiffies64 (a cheaper clock, in ticks)",
    },
];

/// Each primitive's cost above the empty program, `repeats` times (ns per packet).
pub fn measure(pkt: &[u8], runs: u32, repeats: usize) -> Result<Vec<(&'static str, Figure)>> {
    let cap = palisade_common::capacity::CONNTRACK;
    let maps = [
        map_with_zero_entry(MAP_HASH, 4, 52, palisade_common::capacity::ENDPOINTS)?,
        map_with_zero_entry(MAP_HASH, 20, 4, palisade_common::capacity::IDENTITIES)?,
        map_with_zero_entry(MAP_HASH, 44, 48, cap)?,
        map_with_zero_entry(MAP_HASH, 16, 48, cap)?,
        map_with_zero_entry(MAP_PERCPU_ARRAY, 4, 16, 1)?,
    ];
    let programs = [
        lookup_program(maps[0].0, 4),
        lookup_program(maps[1].0, 20),
        lookup_program(maps[2].0, 44),
        lookup_program(maps[3].0, 16),
        lookup_program(maps[4].0, 4),
        helper_program(HELPER_KTIME_COARSE),
        helper_program(HELPER_JIFFIES64),
    ];
    let mut out: Vec<(&'static str, Figure)> = PRIMITIVES
        .iter()
        .map(|p| (p.name, Figure::default()))
        .collect();
    for _ in 0..repeats {
        // Side by side within a repeat: a change of load hits every figure alike.
        let floor = empty_program_ns(pkt, runs)?;
        for (i, prog) in programs.iter().enumerate() {
            let ns = run_program(prog, pkt, runs)?;
            out[i].1.push((ns - floor).max(0.0));
        }
    }
    Ok(out)
}
