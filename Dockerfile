# The one fillfs image: CSI node plugin, controller, and the fill pod's `fillfs populate`;
# plus the `argo-artifact` target, the same image whose entrypoint is the Argo artifact
# driver (Argo runs a plugin image's ENTRYPOINT with the socket path appended).
# Multi-stage: build with the Rust toolchain, ship the binary on a slim Debian with only
# what it runs (fusermount3 for unprivileged mounts, mkfs.ext4 for --mkfs, CA roots).
#
#   docker build -t ghcr.io/fillfs/fillfs:0.1.0 .
#   docker build --target argo-artifact -t ghcr.io/fillfs/fillfs-argo-artifact:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so a source change does not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY bench/s3emu/Cargo.toml bench/s3emu/Cargo.toml
COPY csi csi
COPY proto proto
COPY bench/seqread.rs bench/ceiling.rs bench/
RUN mkdir -p src bench/s3emu/src \
 && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && echo 'fn main() {}' > bench/s3emu/src/main.rs && touch bench/s3emu/src/lib.rs \
 && cargo build --release --locked -p fillfs --bin fillfs || true
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked -p fillfs --bin fillfs

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      ca-certificates fuse3 e2fsprogs \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/fillfs /usr/local/bin/fillfs
# The default user. Fill pods and the controller set their own (see deploy/ and the
# controller's pod builder); the CSI node plugin's DaemonSet sets runAsUser: 0, because it
# binds a socket in kubelet's root-owned plugin directory and mounts FUSE (privileged).
USER 65532:65532

# Argo's artifact plugin containers (init, sidecar, GC pod as uid 8737, argo-server): the
# plugin needs no privilege, only its socket's emptyDir.
FROM runtime AS argo-artifact
ENTRYPOINT ["/usr/local/bin/fillfs", "argo-artifact"]

FROM runtime
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/fillfs"]
