//! Locates the eBPF object that the `palisade` binary embeds. `cargo xtask build` builds it
//! (plain cargo cannot: see ARCHITECTURE.md, "Build") and passes its path in
//! PALISADE_EBPF_OBJ; otherwise the default output path of that build is used.
use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(palisade_ebpf_missing)");
    println!("cargo::rerun-if-env-changed=PALISADE_EBPF_OBJ");
    let path = std::env::var_os("PALISADE_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../target/ebpf/x86_64-unknown-linux-gnu/release/libpalisade_ebpf.so")
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
