#!/usr/bin/env python3
"""fillfs benchmark harness: fill speed of fillfs and its peers, side by side, in one run.

For each dataset (generated deterministically, uploaded by PUT to the s3emu emulator with
20 ms first-byte latency and a 50 MiB/s per-connection cap, like a real OSS endpoint), every
runner fills a fresh ext4 file system on a loop device; wall time, CPU seconds and peak RSS
are recorded, the result is checked (file count and bytes), and speeds are reported as
ratios: against the best peer, and against the ceiling min(read ceiling, write ceiling).
fio jobs then read through each FUSE mount. Run it through bench/run.sh.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILLFS = ROOT / "target/release/fillfs"
S3EMU = ROOT / "target/release/s3emu"
CEILING = ROOT / "target/release/examples/ceiling"
AK, SK, BUCKET, PORT = "bench", "bench-secret", "bench", 9100
EP = f"http://127.0.0.1:{PORT}"
MIB, GIB = 1 << 20, 1 << 30


def datasets(scale):
    n = lambda x: max(1, int(x * scale))
    return {
        "L": [(f"big-{i}.bin", n(GIB)) for i in range(4)],
        "S": [(f"d{i // 100:02d}/f{i:05d}.bin", 64 * 1024) for i in range(n(10000))],
        "M": [("huge.bin", n(2 * GIB))]
        + [(f"mid/m{i:03d}.bin", 8 * MIB) for i in range(n(200))]
        + [(f"small/d{i // 100:02d}/s{i:04d}.bin", 256 * 1024) for i in range(n(2000))],
    }


def env(**extra):
    e = dict(os.environ)
    e.pop("AWS_CA_BUNDLE", None)  # rclone's s3 backend fails on http endpoints with it
    e.update(AWS_ACCESS_KEY_ID=AK, AWS_SECRET_ACCESS_KEY=SK, AWS_REGION="us-east-1", RUST_LOG="warn")
    e.update(extra)
    return e


def sh(*cmd, check=True, **kw):
    return subprocess.run([str(c) for c in cmd], check=check, **kw)


def log(*a):
    print("bench:", *a, file=sys.stderr, flush=True)


class Emulator:
    def __init__(self):
        self.p = subprocess.Popen(
            [S3EMU, "--listen", f"127.0.0.1:{PORT}", "--access-key", AK, "--secret-key", SK,
             "--latency", "20ms", "--bandwidth-mib", "50", "--bucket", BUCKET],
            stdout=subprocess.PIPE, text=True)
        line = self.p.stdout.readline()
        assert "listening" in line, line

    def close(self):
        self.p.terminate()
        self.p.wait()


class Target:
    """A fresh ext4 file system on a loop device."""

    def __init__(self, work, size):
        self.img = work / "target.img"
        self.mnt = work / "target"
        self.mnt.mkdir(exist_ok=True)
        with open(self.img, "wb") as f:
            f.truncate(size)
        # Direct I/O from the loop device to its backing file: writes reach the disk as they
        # would on a real block device (a cloud disk PV), not through a second page cache.
        self.dev = sh("losetup", "--find", "--show", "--direct-io=on", self.img, capture_output=True,
                      text=True).stdout.strip()
        sh("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", self.dev)
        sh("mount", self.dev, self.mnt)

    def close(self):
        if sh("umount", self.mnt, check=False, stderr=subprocess.DEVNULL).returncode:
            sh("umount", "-l", self.mnt, check=False)
        sh("losetup", "-d", self.dev, check=False)
        self.img.unlink(missing_ok=True)


def generate_and_upload(name, files, work):
    stage = work / "stage" / name
    log(f"dataset {name}: {len(files)} files, {sum(s for _, s in files) / GIB:.2f} GiB")
    for i, (rel, size) in enumerate(files):
        p = stage / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        rng = random.Random(hash((name, rel, i)) & 0xFFFFFFFF)
        with open(p, "wb") as f:
            left = size
            while left:
                chunk = min(left, 8 * MIB)
                f.write(rng.randbytes(chunk))
                left -= chunk
    sh("s5cmd", "--endpoint-url", EP, "cp", f"{stage}/*", f"s3://{BUCKET}/{name}/", env=env(), stdout=subprocess.DEVNULL)
    shutil.rmtree(stage)


def proc_usage(pid):
    """CPU seconds and peak RSS (KiB) of a live process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
        rss = next(int(l.split()[1]) for l in Path(f"/proc/{pid}/status").read_text().splitlines() if l.startswith("VmHWM"))
        return cpu, rss
    except (OSError, StopIteration):
        return 0.0, 0


def timed(cmd, timeout, environ=None):
    """Runs cmd under /usr/bin/time in its own process group; on timeout the whole group
    (time, the runner and its children) is killed so nothing keeps the target busy."""
    out = Path("/tmp/fillfs-bench-time")
    out.unlink(missing_ok=True)
    t0 = time.monotonic()
    p = subprocess.Popen(["/usr/bin/time", "-f", "%e %U %S %M", "-o", str(out)] + [str(c) for c in cmd],
                         env=environ or env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return dict(wall=time.monotonic() - t0, cpu=0.0, rss_kib=0, ok=False, error=[f"timeout after {timeout}s"])
    wall, user, sys_, rss = out.read_text().split()[-4:]
    res = dict(wall=float(wall), cpu=float(user) + float(sys_), rss_kib=int(rss), ok=p.returncode == 0)
    if p.returncode:
        res["error"] = err.strip().splitlines()[-1:] if err else ["exit %d" % p.returncode]
    return res


def wait_mounted(mnt, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.ismount(mnt):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"mount exited: {proc.args}")
        time.sleep(0.05)
    raise RuntimeError(f"mount did not appear: {proc.args}")


class Mount:
    """A FUSE mount daemon in the foreground, measured and stopped on close."""

    def __init__(self, kind, name, mnt, work):
        self.mnt = mnt
        mnt.mkdir(exist_ok=True)
        s3 = ["--s3-provider", "Other", "--s3-endpoint", EP, "--s3-access-key-id", AK,
              "--s3-secret-access-key", SK, "--s3-region", "us-east-1"]
        if kind == "fillfs":
            cmd = [FILLFS, "mount", f"s3://{BUCKET}/{name}", mnt, "--endpoint", EP]
        elif kind == "rclone":
            cmd = ["rclone", "mount", f":s3:{BUCKET}/{name}", mnt, "--read-only", "--vfs-cache-mode", "off"] + s3
        else:
            pw = work / "s3fs.passwd"
            pw.write_text(f"{AK}:{SK}\n")
            pw.chmod(0o600)
            cmd = ["s3fs", f"{BUCKET}:/{name}", mnt, "-f", "-o",
                   f"url={EP},use_path_request_style,passwd_file={pw},ro,parallel_count=8,multireq_max=32"]
        self.proc = subprocess.Popen([str(c) for c in cmd], env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_mounted(mnt, self.proc)

    def close(self):
        usage = proc_usage(self.proc.pid)
        sh("umount", self.mnt, check=False, stderr=subprocess.DEVNULL)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            sh("umount", "-l", self.mnt, check=False)
        return usage


def check_target(target, files):
    count, total = 0, 0
    for dirpath, _, names in os.walk(target):
        for n in names:
            if n == "lost+found":
                continue
            count += 1
            total += os.path.getsize(os.path.join(dirpath, n))
    return count == len(files) and total == sum(s for _, s in files)


RUNNERS = [
    ("fillfs populate", "direct"),
    ("fillfs mount + fillfs populate", "fillfs"),
    ("s5cmd cp", "direct"),
    ("rclone copy", "direct"),
    ("rclone mount + cp -r", "rclone"),
    ("s3fs + cp -r", "s3fs"),
]


def run_runner(label, mount_kind, name, files, work, target, timeout):
    t = target.mnt
    if mount_kind == "direct":
        cmd = {
            "fillfs populate": [FILLFS, "populate", f"s3://{BUCKET}/{name}", t, "--endpoint", EP, "--progress", "none"],
            "s5cmd cp": ["s5cmd", "--endpoint-url", EP, "cp", f"s3://{BUCKET}/{name}/*", f"{t}/"],
            "rclone copy": ["rclone", "copy", f":s3:{BUCKET}/{name}", t, "--s3-provider", "Other", "--s3-endpoint", EP,
                            "--s3-access-key-id", AK, "--s3-secret-access-key", SK, "--s3-region", "us-east-1",
                            "--transfers", "16", "--checkers", "16", "--multi-thread-streams", "4"],
        }[label]
        res = timed(cmd, timeout)
    else:
        m = Mount(mount_kind, name, work / "src", work)
        copier = ([FILLFS, "populate", m.mnt, t, "--progress", "none"] if mount_kind == "fillfs"
                  else ["cp", "-r", f"{m.mnt}/.", t])
        res = timed(copier, timeout)
        cpu, rss = m.close()
        res["cpu"] += cpu
        res["rss_kib"] += rss
    # The fill is done when its data is on the volume: every runner's time includes the
    # flush that follows it (in Kubernetes, the unmount of the filled volume does this).
    t0 = time.monotonic()
    sh("sync", "-f", t, check=False)
    res["flush"] = time.monotonic() - t0
    res["fill"] = res["wall"]
    res["wall"] = res["fill"] + res["flush"]
    res["complete"] = res["ok"] and check_target(t, files)
    return res


def fio_json(args, timeout=300):
    # Every job stops after 60 s: a slow peer is measured over what it read by then.
    r = subprocess.run(["fio", "--output-format=json", "--runtime=60"] + args, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode:
        return None
    j = json.loads(r.stdout[r.stdout.index("{"):])
    return sum(job["read"]["bw_bytes"] + job["write"]["bw_bytes"] for job in j["jobs"]) / MIB


def fio_suite(name, files, work):
    """fio through each mount: fresh mount per job so no cache carries over."""
    results = {}
    bigs = [f for f, s in files if s >= 256 * MIB][:4]
    jobs = []
    if bigs:
        jobs.append(("seq read 1M, 1 job", lambda m: ["--name=seq1", f"--filename={m}/{bigs[0]}", "--rw=read", "--bs=1M", "--readonly"]))
        if len(bigs) >= 4:
            jobs.append(("seq read 1M, 4 jobs", lambda m: sum(([f"--name=seq4-{i}", f"--filename={m}/{b}", "--rw=read", "--bs=1M", "--readonly"] for i, b in enumerate(bigs)), [])))
        jobs.append(("rand read 256K", lambda m: ["--name=rand", f"--filename={m}/{bigs[-1]}", "--rw=randread", "--bs=256k", "--readonly", "--time_based", "--runtime=20"]))
    else:
        jobs.append(("many small files", lambda m: ["--name=small", f"--opendir={m}", "--rw=read", "--bs=64k", "--readonly", "--openfiles=16"]))
    for kind in ["fillfs", "rclone", "s3fs"]:
        for label, args in jobs:
            m = Mount(kind, name, work / "src", work)
            try:
                bw = fio_json(args(m.mnt))
            except subprocess.TimeoutExpired:
                bw = None
            m.close()
            results.setdefault(label, {})[kind] = bw
            log(f"fio {name} {label} {kind}: {bw}")
    return results


def write_ceiling(target, size):
    per_job = max(64 * MIB, min(size, 2 * GIB) // 4)
    bw = fio_json(["--name=w", f"--directory={target.mnt}", "--rw=write", "--bs=1M", f"--size={per_job}",
                   "--numjobs=4", "--end_fsync=1", "--group_reporting"])
    for p in target.mnt.glob("w.*"):
        p.unlink()
    return bw


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="dataset size factor (1.0 = the specified datasets)")
    ap.add_argument("--datasets", default="L,S,M")
    ap.add_argument("--timeout", type=int, default=300, help="seconds per runner before it counts as too slow")
    ap.add_argument("--work", default="/var/tmp/fillfs-bench")
    ap.add_argument("--out", default=str(ROOT / "bench/results"))
    ap.add_argument("--no-fio", action="store_true")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    all_ds = datasets(a.scale)
    results = dict(scale=a.scale, started=time.strftime("%Y-%m-%d %H:%M:%S"), datasets={})
    emu = Emulator()
    try:
        for name in a.datasets.split(","):
            files = all_ds[name]
            size = sum(s for _, s in files)
            generate_and_upload(name, files, work)
            ceil = json.loads(subprocess.run([CEILING, f"s3://{BUCKET}/{name}", "--endpoint", EP], env=env(),
                                             capture_output=True, text=True, check=True).stdout)["mib_s"]
            tsize = int(size * 1.3) + 512 * MIB
            t = Target(work, tsize)
            wceil = write_ceiling(t, size)
            t.close()
            ds = dict(files=len(files), bytes=size, read_ceiling=ceil, write_ceiling=wceil, runners={})
            log(f"{name}: read ceiling {ceil:.0f} MiB/s, write ceiling {wceil:.0f} MiB/s")
            for label, kind in RUNNERS:
                t = Target(work, tsize)
                try:
                    res = run_runner(label, kind, name, files, work, t, a.timeout)
                finally:
                    t.close()
                res["mib_s"] = size / MIB / res["wall"] if res["complete"] else None
                ds["runners"][label] = res
                log(f"{name} {label}: {res}")
            if not a.no_fio:
                ds["fio"] = fio_suite(name, files, work)
            results["datasets"][name] = ds
            sh("s5cmd", "--endpoint-url", EP, "rm", f"s3://{BUCKET}/{name}/*", env=env(), stdout=subprocess.DEVNULL, check=False)
    finally:
        emu.close()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=1))
    report(results, out)


def report(results, out):
    lines = [f"# fillfs fill benchmark ({results['started']}, scale {results['scale']})", "",
             "Emulator: s3emu on loopback, 20 ms first-byte latency, 50 MiB/s per connection. "
             "Target: fresh ext4 on a loop device per run. Machine: 2 cores (shared by emulator, runner and target). "
             "MiB/s is the dataset over fill + flush (`sync -f` of the target after the runner exits): "
             "a fill is done when its data is on the volume, as the write ceiling (fio with end_fsync) measures.",
             ""]
    for name, ds in results["datasets"].items():
        ceiling = min(ds["read_ceiling"], ds["write_ceiling"] or ds["read_ceiling"])
        peers = [r["mib_s"] for l, r in ds["runners"].items() if not l.startswith("fillfs") and r["mib_s"]]
        best_peer = max(peers) if peers else None
        lines += [f"## Dataset {name}: {ds['files']} files, {ds['bytes'] / GIB:.2f} GiB", "",
                  f"Read ceiling (concurrent ranged GETs to /dev/null): {ds['read_ceiling']:.0f} MiB/s; "
                  f"write ceiling (fio on the ext4 target): {ds['write_ceiling'] or 0:.0f} MiB/s.", "",
                  "| runner | fill s | + flush s | MiB/s | × best peer | % of ceiling | CPU s | peak RSS MiB | result |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, r in ds["runners"].items():
            mib = r["mib_s"]
            lines.append("| {} | {:.1f} | {:.1f} | {} | {} | {} | {:.1f} | {:.0f} | {} |".format(
                label, r.get("fill", r["wall"]), r.get("flush", 0.0), f"{mib:.0f}" if mib else "–",
                f"{mib / best_peer:.2f}" if mib and best_peer else "–",
                f"{100 * mib / ceiling:.0f}%" if mib else "–",
                r["cpu"], r["rss_kib"] / 1024, "ok" if r["complete"] else "FAILED: " + " ".join(r.get("error", ["incomplete"]))))
        if "fio" in ds:
            lines += ["", "fio through the mounts (MiB/s):", "", "| job | fillfs | rclone | s3fs |", "|---|---|---|---|"]
            for job, by in ds["fio"].items():
                lines.append(f"| {job} | " + " | ".join(f"{by.get(k):.0f}" if by.get(k) else "–" for k in ["fillfs", "rclone", "s3fs"]) + " |")
        lines.append("")
    (out / "latest.md").write_text("\n".join(lines))
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        names = list(results["datasets"])
        labels = [l for l, _ in RUNNERS]
        fig, ax = plt.subplots(figsize=(11, 5))
        w = 0.8 / len(labels)
        for i, l in enumerate(labels):
            vals = [results["datasets"][n]["runners"][l]["mib_s"] or 0 for n in names]
            ax.bar([x + i * w for x in range(len(names))], vals, w, label=l)
        for x, n in enumerate(names):
            ds = results["datasets"][n]
            c = min(ds["read_ceiling"], ds["write_ceiling"] or ds["read_ceiling"])
            ax.hlines(c, x - w / 2, x + 0.8 - w / 2, colors="black", linestyles="dashed")
        ax.set_xticks([x + 0.4 - w / 2 for x in range(len(names))], [f"dataset {n}" for n in names])
        ax.set_ylabel("fill speed, MiB/s (dashed: ceiling)")
        ax.set_title("Filling a fresh ext4 volume from a 20 ms / 50 MiB/s-per-connection S3 endpoint")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "latest.png", dpi=110)
    except ImportError:
        log("matplotlib missing: no chart")


if __name__ == "__main__":
    main()
