#!/bin/sh
# Linker for the eBPF crate (see ARCHITECTURE.md, "Build").
#
# The crate is compiled for the host target as a cdylib with -C linker-plugin-lto, so its objects
# and the rlibs of its dependencies hold LLVM bitcode. When rustc links such a cdylib (it passes a
# version script listing the exported symbols), hand the bitcode to bpf-linker, which retargets it
# to BPF. Every other link (build scripts, proc-macros) goes to cc unchanged.
#
# Environment: BPF_LINKER (path to bpf-linker, set by cargo xtask build).
set -eu
out=""; version_script=""; inputs=""; bitcode=0; prev=""
for arg in "$@"; do
  [ "$prev" = "-o" ] && out="$arg"
  case "$arg" in
    -Wl,--version-script=*) version_script="${arg#-Wl,--version-script=}" ;;
    *compiler_builtins-*.rlib) ;;
    *.o)
      inputs="$inputs $arg"
      # LLVM bitcode starts with 'BC' 0xC0DE.
      [ "$(head -c 4 "$arg" | od -An -tx1 | tr -d ' \n')" = "4243c0de" ] && bitcode=1 ;;
    *.rlib) inputs="$inputs $arg" ;;
  esac
  prev="$arg"
done
if [ "$bitcode" != 1 ] || [ -z "$version_script" ]; then
  exec "${CC:-cc}" "$@"
fi
exports=$(sed -n '/global:/,/local:/p' "$version_script" \
  | sed -e '/global:/d' -e '/local:/d' -e 's/[ ;]//g' -e '/^$/d' | paste -sd, -)
# --disable-expand-memcpy-in-order: otherwise small memset/memcpy intrinsics become calls that
# return a stack pointer, which the verifier rejects.
# --cpu v3: atomic fetch-and-add (conntrack accounting) and 32-bit jumps; kernel 5.12+, below
# what TCX needs.
# shellcheck disable=SC2086
exec "${BPF_LINKER:?set BPF_LINKER to the bpf-linker binary (cargo xtask build does)}" \
  --target bpfel --cpu v3 --btf --disable-expand-memcpy-in-order --export "$exports" -o "$out" $inputs
