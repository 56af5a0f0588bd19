//! `palisade version`: what was built (version, commit, date) and what the running kernel
//! offers the datapath (TCX, BTF).
use std::path::Path;

use anyhow::Result;
use aya::util::KernelVersion;
use clap::Args;
use serde::{Deserialize, Serialize};

use super::{Output, Render, print};

#[derive(Args, Debug)]
pub struct VersionArgs {
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

/// Where the kernel's own BTF is (CO-RE relocations and `--btf` programs need it).
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    pub version: String,
    /// The commit the binary was built from (`unknown` outside a git checkout, unless the
    /// build was given PALISADE_GIT_COMMIT).
    pub git_commit: String,
    /// RFC 3339, UTC (SOURCE_DATE_EPOCH when the build set it).
    pub build_date: String,
    pub kernel: KernelFeatures,
}

/// What the running kernel offers, found now (not at build time).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFeatures {
    /// `uname -r`.
    pub release: String,
    /// TCX links (kernel >= 6.6): the agent attaches with them, else with clsact filters.
    pub tcx: bool,
    /// The kernel's BTF at /sys/kernel/btf/vmlinux.
    pub btf: bool,
}

impl KernelFeatures {
    pub fn detect() -> KernelFeatures {
        KernelFeatures {
            release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "unknown".into()),
            // The datapath's own rule (`palisade_datapath` attaches by TCX from 6.6 on).
            tcx: KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)),
            btf: Path::new(VMLINUX_BTF).exists(),
        }
    }
}

impl VersionInfo {
    /// This binary's build, and the running kernel.
    pub fn current() -> VersionInfo {
        let built: u64 = env!("PALISADE_BUILD_UNIX").parse().unwrap_or(0);
        VersionInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: env!("PALISADE_GIT_COMMIT").to_string(),
            build_date: crate::verdicts::rfc3339_ms(built * 1000).replace(".000Z", "Z"),
            kernel: KernelFeatures::detect(),
        }
    }
}

impl Render for VersionInfo {
    fn table(&self) -> String {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let k = &self.kernel;
        format!(
            "palisade {}\n\
             git commit:  {}\n\
             built:       {}\n\
             kernel:      {}\n\
             TCX:         {} (kernel >= 6.6; {})\n\
             BTF:         {} ({VMLINUX_BTF})\n",
            self.version,
            self.git_commit,
            self.build_date,
            k.release,
            yes(k.tcx),
            if k.tcx {
                "programs attach by TCX links"
            } else {
                "programs attach by clsact filters"
            },
            yes(k.btf),
        )
    }
}

pub fn version(a: &VersionArgs) -> Result<()> {
    print(&VersionInfo::current(), a.output)?;
    Ok(())
}
