#!/usr/bin/env bash
# Installs what fillfs's build, quick start and tests need on a Debian machine. Idempotent:
# installs only what is missing. Run as root (or with sudo available).
set -euo pipefail

need_pkgs=()
command -v fusermount3 >/dev/null 2>&1 || need_pkgs+=(fuse3)
command -v fio >/dev/null 2>&1 || need_pkgs+=(fio)
command -v mkfs.ext4 >/dev/null 2>&1 || need_pkgs+=(e2fsprogs)
command -v losetup >/dev/null 2>&1 || need_pkgs+=(mount)

if ((${#need_pkgs[@]})); then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "setup: installing ${need_pkgs[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install Rust (https://rustup.rs), stable >= 1.95" >&2
  exit 1
fi

# moto: a faithful third-party S3 server for the fidelity tests (tests/moto.rs).
if ! command -v moto_server >/dev/null 2>&1; then
  echo "setup: installing moto[server] from PyPI"
  python3 -m pip install -q --disable-pip-version-check "moto[server]==5.*"
fi

# grpcio: a gRPC C-core client (it sends the unix socket's path as :authority) generated
# from Argo's artifact.proto, as argo-server's and other non-Go clients would be (tests/argo.rs).
if ! python3 -c "import grpc, grpc_tools" >/dev/null 2>&1; then
  echo "setup: installing grpcio and grpcio-tools from PyPI"
  python3 -m pip install -q --disable-pip-version-check "grpcio==1.*" "grpcio-tools==1.*"
fi

if [ ! -e /dev/fuse ]; then
  echo "setup: warning: /dev/fuse is missing; FUSE tests will be skipped (in CI they fail)" >&2
fi
