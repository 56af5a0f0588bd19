//! Locates the eBPF object that the `palisade` binary embeds. `cargo xtask build` builds it
//! (plain cargo cannot: see ARCHITECTURE.md, "Build") and passes its path in
//! PALISADE_EBPF_OBJ; otherwise the default output path of that build is used.
//!
//! Also what `palisade version` reports of the build: the git commit (PALISADE_GIT_COMMIT if
//! set, as an image build without `.git` does, else `git rev-parse HEAD`) and the build date
//! (SOURCE_DATE_EPOCH if set, else when this script ran: on a new commit).
use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn main() {
    println!("cargo::rustc-check-cfg=cfg(palisade_ebpf_missing)");
    println!("cargo::rerun-if-env-changed=PALISADE_EBPF_OBJ");
    println!("cargo::rerun-if-env-changed=CARGO_TARGET_DIR");
    let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = std::env::var_os("PALISADE_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            // cargo's target directory (CARGO_TARGET_DIR, relative to the workspace if so).
            std::env::var_os("CARGO_TARGET_DIR")
                .map(|t| workspace.join(t))
                .unwrap_or_else(|| workspace.join("target"))
                .join("ebpf/x86_64-unknown-linux-gnu/release/libpalisade_ebpf.so")
        });
    println!("cargo::rerun-if-changed={}", path.display());
    if path.exists() {
        println!("cargo::rustc-env=PALISADE_EBPF_OBJ={}", path.display());
    } else {
        // The library (pure policy logic) builds without it; the binary stops with a message.
        println!("cargo::rustc-cfg=palisade_ebpf_missing");
        println!(
            "cargo::warning=eBPF object {} not found: run `cargo xtask build`",
            path.display()
        );
    }
    build_info(&workspace);
}

fn git(workspace: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .current_dir(workspace)
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
}

fn build_info(workspace: &Path) {
    println!("cargo::rerun-if-env-changed=PALISADE_GIT_COMMIT");
    println!("cargo::rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let commit = std::env::var("PALISADE_GIT_COMMIT")
        .ok()
        .filter(|c| !c.is_empty())
        .or_else(|| {
            // Run again when HEAD moves: HEAD itself (a branch switch) and the branch's ref.
            let git_dir = PathBuf::from(git(workspace, &["rev-parse", "--absolute-git-dir"])?);
            let common = git(workspace, &["rev-parse", "--git-common-dir"])
                .map(|d| workspace.join(d))
                .unwrap_or_else(|| git_dir.clone());
            let mut watch = vec![git_dir.join("HEAD"), common.join("packed-refs")];
            if let Some(branch) = git(workspace, &["symbolic-ref", "-q", "HEAD"]) {
                watch.push(common.join(branch));
            }
            for p in watch.iter().filter(|p| p.exists()) {
                println!("cargo::rerun-if-changed={}", p.display());
            }
            git(workspace, &["rev-parse", "HEAD"])
        })
        .unwrap_or_else(|| "unknown".into());
    let built = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    println!("cargo::rustc-env=PALISADE_GIT_COMMIT={commit}");
    println!("cargo::rustc-env=PALISADE_BUILD_UNIX={built}");
}
