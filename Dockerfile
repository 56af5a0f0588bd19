# The agent image (agent, CLI and CNI plugin in one binary): `cargo xtask image`, which runs
# `docker build -t ghcr.io/palisade-dev/palisade:<version> .` here and passes the commit and
# its date for `palisade version`.
#
# The build stage runs the steps of `cargo xtask build --release`, one per layer
# (ARCHITECTURE.md, "Build"): bpf-linker built against this rustc's libLLVM, the eBPF crate
# as bitcode linked by bpf-linker, the agent embedding the object. A test (xtask
# `image::tests`) checks that these RUN lines are exactly those steps.
FROM rust:1.95-bookworm AS build
WORKDIR /src
ARG PALISADE_GIT_COMMIT
ARG SOURCE_DATE_EPOCH
COPY . .
RUN cargo xtask build --release --step bpf-linker
RUN cargo xtask build --release --step ebpf
RUN cargo xtask build --release --step agent

# Debian's slim image with the two tools the agent drives on egress gateway nodes (`ip` for
# the VXLAN device and the egress address, `nft` for the gateway's table); `kubectl exec` runs
# `palisade verdicts|explain|...` directly.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends iproute2 nftables ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/palisade /usr/local/bin/palisade
ENTRYPOINT ["/usr/local/bin/palisade"]
