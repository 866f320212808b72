#!/usr/bin/env python3
"""Upload and OpenStream benchmark: fillfs vs s5cmd and rclone, side by side, in one run.

The emulator has the fill benchmark's settings: 20 ms first byte and 50 MiB/s per
connection, applied to request bodies as to responses. Datasets: one 6 GiB file and 2,000
small files (256 KiB). Each runner uploads to its own prefix with the same parallelism
(16 parts of 16 MiB in flight for the big file, 64 files for the small ones); each result is
checked (object count and bytes) and deleted before the next runner. Then one Argo
OpenStream of the 6 GiB object through `fillfs argo-artifact`, against a direct parallel
ranged download of the same object (bench/ceiling.rs). Writes bench/results/upload.{md,json,png}.

Run: bench/run.sh sets up the peers; then `python3 bench/upload.py [--scale 0.25]`.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILLFS = ROOT / "target/release/fillfs"
S3EMU = ROOT / "target/release/s3emu"
CEILING = ROOT / "target/release/examples/ceiling"
OPENSTREAM = ROOT / "target/release/examples/openstream"
AK, SK, BUCKET, PORT = "bench", "bench-secret", "bench", 9101
EP = f"http://127.0.0.1:{PORT}"
MIB, GIB = 1 << 20, 1 << 30
PARTS, PART_MIB, FILES_JOBS = 16, 16, 64
REPEAT = 3


def env():
    e = dict(os.environ)
    e.pop("AWS_CA_BUNDLE", None)  # rclone's s3 backend fails on http endpoints with it
    e.update(AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK, AWS_REGION="us-east-1", RUST_LOG="warn")
    return e


def log(*a):
    print("bench:", *a, file=sys.stderr, flush=True)


def rclone_conf(work):
    p = work / "rclone.conf"
    p.write_text(f"[emu]\ntype = s3\nprovider = Other\naccess_key_id = {AK}\nsecret_access_key = {SK}\n"
                 f"endpoint = {EP}\nregion = us-east-1\nforce_path_style = true\n")
    return p


def timed(cmd):
    out = Path(tempfile.mktemp())
    t0 = time.monotonic()
    p = subprocess.run(["/usr/bin/time", "-f", "%e %U %S %M", "-o", str(out)] + [str(c) for c in cmd],
                       env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.monotonic() - t0
    fields = out.read_text().strip().splitlines()[-1].split() if out.exists() else ["0", "0", "0", "0"]
    out.unlink(missing_ok=True)
    if p.returncode:
        log("failed:", " ".join(map(str, cmd)), p.stderr[:1500])
    return dict(ok=p.returncode == 0, seconds=wall, cpu=float(fields[1]) + float(fields[2]),
                rss_mib=int(fields[3]) / 1024, stdout=p.stdout)




def listing(prefix):
    p = subprocess.run(["s5cmd", "--endpoint-url", EP, "ls", f"s3://{BUCKET}/{prefix}*"], env=env(),
                       capture_output=True, text=True)
    n = b = 0
    for line in p.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[-2].isdigit():
            n += 1
            b += int(parts[-2])
    return n, b


def remove(prefix):
    subprocess.run(["s5cmd", "--endpoint-url", EP, "rm", f"s3://{BUCKET}/{prefix}*"], env=env(),
                   capture_output=True)


def make_data(work, scale):
    big = work / "big" / "big.bin"
    big.parent.mkdir(parents=True, exist_ok=True)
    size = int(6 * GIB * scale)
    if not big.exists() or big.stat().st_size != size:
        log(f"writing a {size / GIB:.2f} GiB file")
        with open(big, "wb") as f:
            left = size
            while left:
                n = min(left, 64 * MIB)
                f.write(os.urandom(n))
                left -= n
    small = work / "small"
    count = max(1, int(2000 * scale))
    if not small.exists() or len(list(small.rglob("*.bin"))) != count:
        shutil.rmtree(small, ignore_errors=True)
        for i in range(count):
            p = small / f"d{i // 100:02d}" / f"s{i:04d}.bin"
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(os.urandom(256 * 1024))
    return big, small, size, count


def runners(kind, src, prefix, conf):
    if kind == "big":
        return {
            "fillfs": [FILLFS, "upload", src, f"s3://{BUCKET}/{prefix}/big.bin", "--endpoint", EP,
                       "--jobs", PARTS, "--part-size", f"{PART_MIB}MiB", "--progress", "none",
                       "--state-dir", Path(tempfile.gettempdir()) / "fillfs-bench-state"],
            "s5cmd": ["s5cmd", "--endpoint-url", EP, "cp", "--concurrency", PARTS, "--part-size", PART_MIB,
                      src, f"s3://{BUCKET}/{prefix}/big.bin"],
            "rclone": ["rclone", "--config", conf, "copyto", src, f"emu:{BUCKET}/{prefix}/big.bin",
                       "--s3-upload-concurrency", PARTS, "--s3-chunk-size", f"{PART_MIB}M",
                       "--s3-upload-cutoff", f"{PART_MIB}M"],
        }
    return {
        "fillfs": [FILLFS, "upload", src, f"s3://{BUCKET}/{prefix}/", "--endpoint", EP, "--jobs", FILES_JOBS,
                   "--progress", "none"],
        "s5cmd": ["s5cmd", "--endpoint-url", EP, "--numworkers", FILES_JOBS, "cp", f"{src}/*",
                  f"s3://{BUCKET}/{prefix}/"],
        "rclone": ["rclone", "--config", conf, "copy", src, f"emu:{BUCKET}/{prefix}", "--transfers", FILES_JOBS,
                   "--checkers", FILES_JOBS],
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--work", default="/var/tmp/fillfs-bench-upload")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    big, small, big_size, count = make_data(work, a.scale)
    conf = rclone_conf(work)
    emu = subprocess.Popen([S3EMU, "--listen", f"127.0.0.1:{PORT}", "--access-key", AK, "--secret-key", SK,
                            "--latency", "20ms", "--bandwidth-mib", "50", "--bucket", BUCKET],
                           stdout=subprocess.PIPE, text=True)
    assert "listening" in emu.stdout.readline()
    results = {"settings": dict(latency_ms=20, per_connection_mib_s=50, big_bytes=big_size, small_files=count,
                                small_bytes=count * 256 * 1024, parts_in_flight=PARTS, part_mib=PART_MIB,
                                files_in_flight=FILES_JOBS), "upload": {}, "openstream": {}}
    try:
        # Warm-up (not measured): the emulator's first big upload pays its page faults.
        subprocess.run(["s5cmd", "--endpoint-url", EP, "cp", big, f"s3://{BUCKET}/warm/big.bin"], env=env(),
                       capture_output=True)
        remove("warm/")
        for kind, src, want_n, want_b in [("big", big, 1, big_size), ("small", small, count, count * 256 * 1024)]:
            # Three rounds, the runners interleaved; each runner's median round is reported.
            rounds = {}
            for rnd in range(REPEAT):
                for name, cmd in runners(kind, src, f"{kind}-run", conf).items():
                    remove(f"{kind}-run/")
                    log(f"{kind}: {name} (round {rnd + 1})")
                    r = timed(cmd)
                    n, b = listing(f"{kind}-run/")
                    r["complete"] = r["ok"] and (n, b) == (want_n, want_b)
                    r["mib_s"] = want_b / MIB / r["seconds"]
                    r.pop("stdout")
                    rounds.setdefault(name, []).append(r)
                    log(f"  {r['seconds']:.1f} s, {r['mib_s']:.0f} MiB/s, {r['rss_mib']:.0f} MiB RSS, complete={r['complete']}")
            for name, rs in rounds.items():
                med = sorted(rs, key=lambda r: r["seconds"])[len(rs) // 2]
                med["rounds_s"] = [round(r["seconds"], 2) for r in rs]
                med["complete"] = all(r["complete"] for r in rs)
                results["upload"].setdefault(kind, {})[name] = med
        # OpenStream of the big object the last run left, vs a direct ranged download with
        # the same ranges in flight (12 of 4 MiB).
        sock = Path(tempfile.mkdtemp()) / "socket"
        plugin = subprocess.Popen([FILLFS, "argo-artifact", sock], env=env(), stderr=subprocess.DEVNULL)
        while not sock.exists():
            time.sleep(0.05)
        cfg = f"bucket: {BUCKET}\nprotocol: s3\nendpoint: {EP}\nregion: us-east-1\n"
        r = timed([OPENSTREAM, sock, "big-run/big.bin", "--config", cfg])
        stream = json.loads(r["stdout"].strip().splitlines()[-1])
        from_status = [l for l in Path(f"/proc/{plugin.pid}/status").read_text().splitlines() if l.startswith("VmHWM")]
        plugin_rss = int(from_status[0].split()[1]) / 1024 if from_status else 0
        plugin.terminate()
        plugin.wait()
        c = timed([CEILING, f"s3://{BUCKET}/big-run/", "--endpoint", EP, "--jobs", 12, "--part-mib", 4])
        ceiling = json.loads(c["stdout"].strip().splitlines()[-1])
        results["openstream"] = dict(openstream_mib_s=stream["mib_s"], plugin_peak_rss_mib=plugin_rss,
                                     direct_ranged=ceiling)
        log(f"openstream {stream['mib_s']:.0f} MiB/s (plugin RSS {plugin_rss:.0f} MiB), direct {ceiling}")
    finally:
        emu.terminate()
        emu.wait()
    report(results, Path(a.out))


def report(res, out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "upload.json").write_text(json.dumps(res, indent=2))
    s = res["settings"]
    lines = ["# Upload and OpenStream benchmark", "",
             f"Emulator: {s['latency_ms']} ms first byte, {s['per_connection_mib_s']} MiB/s per connection "
             f"(request bodies too). Big: one {s['big_bytes'] / GIB:.2f} GiB file, {s['parts_in_flight']} parts of "
             f"{s['part_mib']} MiB in flight for every runner. Small: {s['small_files']} files of 256 KiB, "
             f"{s['files_in_flight']} in flight. One run, three interleaved rounds, medians; ratios against the best peer.", "",
             "| dataset | runner | seconds (median) | rounds s | MiB/s | CPU s | peak RSS MiB | complete | vs best peer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for kind, rs in res["upload"].items():
        peers = [r["mib_s"] for n, r in rs.items() if n != "fillfs" and r["complete"]]
        best = max(peers) if peers else None
        for name, r in rs.items():
            ratio = f"{r['mib_s'] / best:.2f}x" if best else "-"
            lines.append(f"| {kind} | {name} | {r['seconds']:.1f} | {r.get('rounds_s')} | {r['mib_s']:.0f} | {r['cpu']:.1f} | "
                         f"{r['rss_mib']:.0f} | {r['complete']} | {ratio} |")
    o = res["openstream"]
    if o:
        d = o["direct_ranged"]
        direct = d.get("mib_s") or d.get("MiB/s") or 0
        lines += ["", "| OpenStream | MiB/s | plugin peak RSS MiB |", "|---|---|---|",
                  f"| Argo OpenStream (fillfs argo-artifact) | {o['openstream_mib_s']:.0f} | {o['plugin_peak_rss_mib']:.0f} |",
                  f"| direct parallel ranged GETs (ceiling) | {direct:.0f} | - |",
                  "", f"OpenStream / direct: {o['openstream_mib_s'] / direct:.2f}" if direct else ""]
    (out / "upload.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
        for ax, (kind, rs) in zip(axes, res["upload"].items()):
            names = list(rs)
            ax.bar(names, [rs[n]["mib_s"] for n in names], color=["#2a7" if n == "fillfs" else "#888" for n in names])
            ax.set_title(f"upload: {kind}")
            ax.set_ylabel("MiB/s")
        fig.tight_layout()
        fig.savefig(out / "upload.png", dpi=110)
    except ImportError:
        log("matplotlib missing: no chart")
    print((out / "upload.md").read_text())


if __name__ == "__main__":
    main()
