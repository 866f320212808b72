#!/usr/bin/env bash
# The main job on the embedded default (file://, no cloud account): builds fillfs, makes
# sample data, fills a directory from it (fillfs populate), checks it, then mounts the same
# data through the object-store layer and reads it back.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
cargo build --release --bin fillfs
bin=target/release/fillfs

work=$(mktemp -d /tmp/fillfs-quickstart.XXXXXX)
src="$work/bucket" mnt="$work/mnt"
mkdir -p "$src/images" "$src/logs/2026" "$mnt"
head -c $((256 * 1024 * 1024)) /dev/urandom > "$src/images/disk.img"
for i in $(seq 1 100); do echo "log line $i" > "$src/logs/2026/day-$i.log"; done

trap 'umount "$mnt" 2>/dev/null || true; rm -rf "$work"' EXIT
echo "== fillfs populate file://$src $work/volume"
$bin populate "file://$src" "$work/volume" --verify
diff -r "$src" "$work/volume" && echo "== the filled volume is identical to the source"

$bin mount "file://$src" "$mnt" --daemon
echo "== mounted file://$src at $mnt"
ls -l "$mnt" "$mnt/images"
start=$(date +%s.%N)
cmp "$src/images/disk.img" "$mnt/images/disk.img"
end=$(date +%s.%N)
echo "== read 256 MiB through the mount, byte-identical, $(awk "BEGIN{printf \"%.0f\", 256 / ($end - $start)}") MiB/s"
echo "== $(ls "$mnt/logs/2026" | wc -l) small files listed"
