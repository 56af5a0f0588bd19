//! The build route for aya-ebpf on stable Rust without rust-src (ARCHITECTURE.md, "Build"):
//! the eBPF crate is compiled for the host target as LLVM bitcode and bpf-linker, built against
//! rustc's own libLLVM, retargets it to BPF.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Cargo's target directory for the workspace, as cargo itself answers it
/// (`CARGO_TARGET_DIR`, `build.target-dir` in a config, or `target/`).
pub fn target_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root())
            .args([
                "metadata",
                "--format-version",
                "1",
                "--no-deps",
                "--offline",
            ])
            .output();
        out.ok()
            .filter(|o| o.status.success())
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v["target_directory"].as_str().map(PathBuf::from))
            .unwrap_or_else(|| root().join("target"))
    })
    .clone()
}

/// Where the eBPF crate is built (its own target directory under cargo's).
pub fn ebpf_target_dir() -> PathBuf {
    target_dir().join("ebpf")
}

/// Where the eBPF object ends up.
pub fn ebpf_object() -> PathBuf {
    ebpf_target_dir().join("x86_64-unknown-linux-gnu/release/libpalisade_ebpf.so")
}

fn rustc_output(args: &[&str]) -> Result<String> {
    let out = Command::new("rustc")
        .args(args)
        .output()
        .context("running rustc")?;
    if !out.status.success() {
        bail!("rustc {args:?} failed");
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_string())
}

/// bpf-linker, installed once per rustc version into `.tools/` (it loads rustc's libLLVM, so a
/// new rustc needs a new build).
pub fn bpf_linker() -> Result<PathBuf> {
    let version = rustc_output(&["-vV"])?;
    let field = |name: &str| {
        version
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .map(str::to_string)
    };
    let commit = field("commit-hash:").context("rustc -vV has no commit-hash")?;
    let llvm_major = field("LLVM version:")
        .and_then(|v| v.split('.').next().map(str::to_string))
        .context("rustc -vV has no LLVM version")?;
    let tools = root()
        .join(".tools")
        .join(format!("bpf-linker-{}", &commit[..12]));
    let bin = tools.join("bin/bpf-linker");
    if bin.exists() {
        return Ok(bin);
    }
    let sysroot_lib = PathBuf::from(rustc_output(&["--print", "sysroot"])?).join("lib");
    let llvm_lib = std::fs::read_dir(&sysroot_lib)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .find(|n| n.starts_with("libLLVM-") && n.ends_with(".so"))
        .context("rustc's sysroot has no libLLVM-*.so")?;
    let llvm_link = llvm_lib.trim_start_matches("lib").trim_end_matches(".so");
    eprintln!("xtask: installing bpf-linker 0.13.0 against {llvm_lib} (once per rustc)");
    let rustflags = format!(
        "-L native={lib} -l dylib={llvm_link} -C link-arg=-Wl,-rpath,{lib}",
        lib = sysroot_lib.display()
    );
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker@0.13.0",
            "--locked",
            "--no-default-features",
        ])
        .args(["--features", &format!("llvm-{llvm_major},no-llvm-linking")])
        .arg("--root")
        .arg(&tools)
        .env("RUSTFLAGS", rustflags)
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .status()
        .context("cargo install bpf-linker")?;
    if !status.success() {
        bail!("installing bpf-linker failed");
    }
    Ok(bin)
}

/// Builds the eBPF object; returns its path.
pub fn build_ebpf() -> Result<PathBuf> {
    let linker = bpf_linker()?;
    let root = root();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root.join("ebpf"))
        .args(["build", "--release", "--target-dir"])
        .arg(ebpf_target_dir())
        .env("BPF_LINKER", &linker);
    // Whatever flags the outer cargo carries must not leak into the bitcode build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_BUILD_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().context("cargo build (ebpf)")?;
    if !status.success() {
        bail!("building the eBPF object failed");
    }
    let obj = ebpf_object();
    if !obj.exists() {
        bail!("eBPF build succeeded but {} is missing", obj.display());
    }
    Ok(obj)
}

/// The steps of `cargo xtask build`, in order. The image's Dockerfile runs them one per layer
/// (`cargo xtask build --release --step NAME`); `image::tests` checks that it runs exactly
/// these, so the two routes cannot drift apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Step {
    /// Install bpf-linker into `.tools/` (once per rustc).
    BpfLinker,
    /// Build the eBPF object (bitcode, linked by bpf-linker).
    Ebpf,
    /// Build the agent, embedding the object.
    Agent,
}

pub const STEPS: [Step; 3] = [Step::BpfLinker, Step::Ebpf, Step::Agent];

impl Step {
    /// The name `--step` takes.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .expect("no step is skipped")
            .get_name()
            .to_string()
    }
}

/// Runs one step; returns what it made (bpf-linker, the object, the agent binary).
pub fn run_step(step: Step, release: bool) -> Result<PathBuf> {
    match step {
        Step::BpfLinker => bpf_linker(),
        Step::Ebpf => build_ebpf(),
        Step::Agent => build_agent(release),
    }
}

/// Builds the eBPF object and the agent that embeds it ([`STEPS`]); returns the agent binary.
pub fn build_all(release: bool) -> Result<PathBuf> {
    let mut made = PathBuf::new();
    for step in STEPS {
        made = run_step(step, release)
            .with_context(|| format!("cargo xtask build: step {}", step.name()))?;
    }
    Ok(made)
}

/// Builds the agent around the object the `ebpf` step built; returns the binary.
fn build_agent(release: bool) -> Result<PathBuf> {
    let obj = ebpf_object();
    if !obj.exists() {
        bail!(
            "{} is missing: run the ebpf step first (`cargo xtask build`)",
            obj.display()
        );
    }
    let root = root();
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args(["build", "-p", "palisade-agent", "--bin", "palisade"])
        .env("PALISADE_EBPF_OBJ", &obj);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("cargo build (agent)")?;
    if !status.success() {
        bail!("building the agent failed");
    }
    let bin = target_dir()
        .join(if release { "release" } else { "debug" })
        .join("palisade");
    link_kubectl_plugin(&bin)?;
    Ok(bin)
}

/// `kubectl-palisade` beside the binary, a link to it: the binary answers to that name as
/// `kubectl palisade` (put the directory on the PATH, or copy both).
fn link_kubectl_plugin(bin: &Path) -> Result<()> {
    let link = bin.with_file_name("kubectl-palisade");
    match std::fs::read_link(&link) {
        Ok(target) if target == Path::new("palisade") => return Ok(()),
        Ok(_) => std::fs::remove_file(&link)?,
        Err(_) if link.exists() => std::fs::remove_file(&link)?,
        Err(_) => {}
    }
    std::os::unix::fs::symlink("palisade", &link)
        .with_context(|| format!("linking {}", link.display()))
}
