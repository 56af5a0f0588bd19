//! Locates the eBPF object that the `palisade` binary embeds. `cargo xtask build` builds it
//! (plain cargo cannot: see ARCHITECTURE.md, "Build") and passes its path in
//! PALISADE_EBPF_OBJ; otherwise the default output path of that build is used.
use std::path::PathBuf;

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
}
