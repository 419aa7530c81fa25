#!/usr/bin/env python3
"""Side-by-side pull timings: imgpull against QEMU on the same chains, in one run.

For each format (qcow2, qed) it builds the reference chain with
../shared/bench/mkchain.sh (or a chain of your size/depth) on tmpfs and times,
interleaved round by round so that machine noise hits every contender alike:

  imgpull        imgpull pull TOP                (whole chain into the top)
  imgpull-base   imgpull pull --base BASE TOP    (intermediate layers only)
  rebase         qemu-img rebase -b '' TOP       (offline QEMU)
  rebase-base    qemu-img rebase -b BASE -F FMT TOP
  qsd            block-stream in qemu-storage-daemon (job start -> completion event)
  dd             one dd of just the bytes a pull copies, into a new tmpfs file
  dd-x2          two such dd's in parallel (each half the bytes)

Every pulled/rebased top is checked with `qemu-img compare` against the
pristine chain. It prints medians, minima and ratios to the medians of
qemu-img rebase and dd, plus peak RSS of imgpull (ru_maxrss of the child).

With the default 64 KiB clusters the chain is mkchain.sh's reference chain;
with another --cluster (the metadata-heavy case: --cluster 4k --layers 15
--size 512M, a 16-image chain of 4 KiB clusters, mostly unallocated, about
200 MiB to copy) the chain comes from this script's own generator (see
gen_chain). `--layers N` counts the overlays above the base, as mkchain.sh
does: the chain has N + 1 images.

The dd rows read a dense file of exactly the bytes a pull copies (made once
per chain), so they copy as much as the pull does.

usage: benches/side_by_side.py [--size 1G] [--layers 3] [--cluster 64k] [--runs 5]
                               [--dir /dev/shm/imgpull-bench] [--formats qcow2,qed]
                               [--only imgpull,rebase,...] [--imgpull PATH]
"""

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MKCHAIN = os.path.join(ROOT, "..", "shared", "bench", "mkchain.sh")


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def timed(cmd, log=False):
    """Wall time of a command, its own peak RSS in KiB (from wait4), and
    with `log` what it wrote to stderr with IMGPULL_LOG=1."""
    env = dict(os.environ, IMGPULL_LOG="1") if log else None
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err if log else None, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t0
        err.seek(0)
        text = err.read().decode(errors="replace")
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} exited with {p.returncode}: {text}")
    return dt, usage.ru_maxrss, text


def uring_share(log):
    """The share of data bytes the pull moved through io_uring, from the
    stream job's IMGPULL_LOG summary line ("... io_uring N% ...")."""
    for line in log.splitlines():
        if "stream:" in line and "io_uring" in line:
            for word in line.split():
                if word.endswith("%") and word[:-1].replace(".", "").isdigit():
                    return float(word[:-1]) / 100
    return None


def names(layers):
    return ["base"] + [f"mid{i}" for i in range(1, layers)] + ["top"]


def fresh_top(src_dir, work_dir, fmt, layers):
    """Copy the whole chain into work_dir (sparse) so runs never share state."""
    if os.path.exists(work_dir):
        shutil.rmtree(work_dir)
    os.makedirs(work_dir)
    for n in names(layers):
        run(["cp", "--sparse=always", os.path.join(src_dir, f"{n}.{fmt}"), work_dir])
    return os.path.join(work_dir, f"top.{fmt}")


def compare(fmt, pristine_top, top):
    run(["qemu-img", "compare", "-q", "-f", fmt, "-F", fmt, pristine_top, top])


class Qmp:
    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX)
        for _ in range(200):
            try:
                self.sock.connect(path)
                break
            except OSError:
                time.sleep(0.01)
        else:
            raise RuntimeError("qemu-storage-daemon did not open its QMP socket")
        # A job that never reports must not hang the benchmark.
        self.sock.settimeout(120)
        self.f = self.sock.makefile("rw")
        self.events = []  # events that arrived while waiting for a reply
        json.loads(self.f.readline())  # greeting
        self.cmd("qmp_capabilities")

    def recv(self):
        line = self.f.readline()
        if not line:
            raise RuntimeError("QMP connection closed")
        return json.loads(line)

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            r = self.recv()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise RuntimeError(f"{name}: {r['error']}")
            if "event" in r:
                self.events.append(r)

    def wait_event(self, name):
        # A short job can finish before the command that started it returns.
        for i, r in enumerate(self.events):
            if r.get("event") == name:
                return self.events.pop(i)
        while True:
            r = self.recv()
            if r.get("event") == name:
                return r


def qsd_stream(fmt, top, base=None):
    sock = top + ".qmp"
    args = ["qemu-storage-daemon",
            "--blockdev", json.dumps({"driver": "file", "node-name": "top-file", "filename": top}),
            "--blockdev", json.dumps({"driver": fmt, "node-name": "top", "file": "top-file"}),
            "--chardev", f"socket,path={sock},server=on,wait=off,id=m",
            "--monitor", "chardev=m"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        q = Qmp(sock)
        t0 = time.perf_counter()
        q.cmd("block-stream", **{"job-id": "pull0", "device": "top"})
        ev = q.wait_event("BLOCK_JOB_COMPLETED")
        dt = time.perf_counter() - t0
        if "error" in ev["data"]:
            raise RuntimeError(f"block-stream failed: {ev['data']['error']}")
        q.cmd("quit")
    finally:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if os.path.exists(sock):
            os.unlink(sock)
    return dt


def dd(src, dst, nbytes, parallel):
    per = nbytes // parallel
    procs = []
    t0 = time.perf_counter()
    for i in range(parallel):
        n = per if i < parallel - 1 else nbytes - per * (parallel - 1)
        procs.append(subprocess.Popen(
            ["dd", f"if={src}", f"of={dst}.{i}", "bs=1M", f"count={n}", f"skip={i * per}",
             "iflag=count_bytes,skip_bytes", "status=none"]))
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError("dd failed")
    dt = time.perf_counter() - t0
    for i in range(parallel):
        os.unlink(f"{dst}.{i}")
    return dt


class SplitMix64:
    """Tiny, version-independent PRNG (the same one mkchain.sh uses)."""

    def __init__(self, seed):
        self.s = seed & 0xFFFFFFFFFFFFFFFF

    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        return z ^ (z >> 31)

    def below(self, n):
        return self.next() % n


def gen_scripts(size, layers, cluster):
    """qemu-io scripts (one per image, base first) of a metadata-heavy,
    mostly unallocated chain: the base holds data runs of 1-32 clusters over
    about a quarter of the image, every overlay scatters writes of 1-8
    clusters over about 2% of it (a tenth of them zero writes, some 512-byte
    writes inside a cluster, which copy the rest of the cluster from below).
    Every write has its own byte pattern."""
    n = size // cluster
    scripts = []
    rng = SplitMix64(0x4D455441 + n)
    cmds = []
    c = 0
    while c < n:
        run_len = min(1 + rng.below(32), n - c)
        if rng.below(1000) < 250:
            cmds.append(f"write -q -P {1 + rng.below(250)} {c * cluster} {run_len * cluster}")
        c += run_len
    scripts.append(cmds)
    for layer in range(1, layers + 1):
        rng = SplitMix64(0x4D455441 + n + 1000 * layer)
        target = n * 2 // 100
        done = 0
        cmds = []
        zeroed = set()
        while done < target:
            c0 = rng.below(n)
            ln = min(1 + rng.below(8), n - c0)
            r = rng.below(100)
            if r < 10:
                cmds.append(f"write -q -z {c0 * cluster} {ln * cluster}")
                zeroed.update(range(c0, c0 + ln))
            elif r < 15:
                if c0 in zeroed:
                    continue  # QEMU's QED fills zero clusters from the backing here
                off = c0 * cluster + 512 * rng.below(cluster // 512)
                cmds.append(f"write -q -P {1 + rng.below(250)} {off} 512")
                ln = 1
            else:
                cmds.append(f"write -q -P {1 + rng.below(250)} {c0 * cluster} {ln * cluster}")
                zeroed.difference_update(range(c0, c0 + ln))
            done += ln
        scripts.append(cmds)
    return scripts


def gen_chain(d, size, layers, cluster, formats):
    """Build the generated chain in d (both formats), with the same
    chain-info.txt summary (and PULL_BYTES line) mkchain.sh writes."""
    os.makedirs(d, exist_ok=True)
    scripts = gen_scripts(size, layers, cluster)
    ns = names(layers)
    for fmt in formats:
        prev = None
        for name, cmds in zip(ns, scripts):
            img = f"{name}.{fmt}"  # relative backing names, as mkchain.sh
            if os.path.exists(os.path.join(d, img)):
                os.unlink(os.path.join(d, img))
            cmd = ["qemu-img", "create", "-q", "-f", fmt, "-o", f"cluster_size={cluster}"]
            if prev:
                cmd += ["-b", prev, "-F", fmt]
            run(cmd + [img, str(size)], cwd=d)
            out = subprocess.run(["qemu-io", "-f", fmt, img], input="\n".join(cmds) + "\n",
                                 capture_output=True, text=True, check=True, cwd=d).stdout
            if out.replace("qemu-io>", "").strip():
                sys.exit(f"qemu-io reported on {img}: {out[:500]}")
            prev = img
        run(["qemu-img", "check", "-q", "-f", fmt, os.path.join(d, f"top.{fmt}")])
    top = os.path.join(d, f"top.{formats[0]}")
    ents = json.loads(subprocess.check_output(
        ["qemu-img", "map", "--output=json", "-f", formats[0], top]))
    below = sum(e["length"] for e in ents if e["depth"] > 0 and e["data"])
    own = sum(e["length"] for e in ents if e["depth"] == 0 and e["present"])
    with open(os.path.join(d, "chain-info.txt"), "w") as f:
        f.write(f"virtual size {size} bytes ({size / 2**20:.0f} MiB), {layers} overlays "
                f"({layers + 1} images), cluster {cluster // 1024} KiB, generated by side_by_side.py\n"
                f"top view: allocated in top {own / 2**20:.0f} MiB, data only below top "
                f"(bytes a full pull must copy) {below / 2**20:.0f} MiB\n"
                f"PULL_BYTES={below}\n")


def dd_source(d, nbytes):
    """A dense file of exactly the bytes a pull copies, for the dd rows."""
    p = os.path.join(d, "dd-src.bin")
    if not os.path.exists(p) or os.path.getsize(p) != nbytes:
        with open("/dev/urandom", "rb") as src, open(p, "wb") as dst:
            left = nbytes
            while left:
                b = src.read(min(left, 1 << 20))
                dst.write(b)
                left -= len(b)
    return p


def parse_size(v):
    v = v.strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    if v and v[-1] in mult:
        return int(v[:-1]) * mult[v[-1]]
    return int(v)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--layers", type=int, default=3, help="overlays above the base")
    ap.add_argument("--cluster", default="64k",
                    help="cluster size; 64k uses mkchain.sh, others this script's generator")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm/imgpull-bench")
    ap.add_argument("--formats", default="qcow2,qed")
    ap.add_argument("--only", default="")
    ap.add_argument("--imgpull", default=os.path.join(ROOT, "target", "release", "imgpull"))
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()
    formats = a.formats.split(",")
    cluster = parse_size(a.cluster)

    if not a.no_build:
        run(["cargo", "build", "--release", "-q", "-p", "imgpull-cli"], cwd=ROOT)
    if cluster == 65536:
        if not os.path.exists(MKCHAIN):
            sys.exit(f"missing {MKCHAIN} (the reference chain builder in shared/bench)")
        src = os.path.join(a.dir, f"chain-{a.size}-{a.layers}")
        if not os.path.exists(os.path.join(src, "chain-info.txt")):
            run(["bash", MKCHAIN, src, a.size, str(a.layers)], stdout=subprocess.DEVNULL)
    else:
        src = os.path.join(a.dir, f"gen-{a.size}-{a.layers}-{a.cluster}")
        have = all(os.path.exists(os.path.join(src, f"top.{f}")) for f in formats)
        if not (have and os.path.exists(os.path.join(src, "chain-info.txt"))):
            gen_chain(src, parse_size(a.size), a.layers, cluster, formats)
    info = open(os.path.join(src, "chain-info.txt")).read()
    pull_bytes = int(info.split("PULL_BYTES=")[1].split()[0])
    dd_src = dd_source(src, pull_bytes)
    print(info.strip())
    print(f"machine: {os.cpu_count()} cores, kernel {os.uname().release}, "
          f"{time.strftime('%Y-%m-%d')}, imgpull {a.imgpull}")
    print(f"load average at start: {os.getloadavg()[0]:.2f}")

    tools = ["imgpull", "imgpull-base", "rebase", "rebase-base", "qsd", "dd", "dd-x2"]
    if a.only:
        tools = [t for t in tools if t in a.only.split(",")]
    results = {}
    rss = {}
    share = {}
    for fmt in formats:
        pristine = os.path.join(src, f"top.{fmt}")
        for r in range(a.runs):
            for t in tools:
                wd = os.path.join(a.dir, "work")
                top = fresh_top(src, wd, fmt, a.layers)
                wbase = os.path.join(wd, f"base.{fmt}")
                if t == "imgpull":
                    dt, kib, log = timed([a.imgpull, "pull", "--no-progress", top], log=True)
                    rss[fmt] = max(rss.get(fmt, 0), kib)
                    u = uring_share(log)
                    if u is not None:
                        share[fmt] = min(share.get(fmt, 1.0), u)
                elif t == "imgpull-base":
                    dt, _, _ = timed([a.imgpull, "pull", "--no-progress", "--base", wbase, top])
                elif t == "rebase":
                    dt, _, _ = timed(["qemu-img", "rebase", "-f", fmt, "-b", "", top])
                elif t == "rebase-base":
                    dt, _, _ = timed(["qemu-img", "rebase", "-f", fmt, "-b", wbase, "-F", fmt,
                                      top])
                elif t == "qsd":
                    dt = qsd_stream(fmt, top)
                elif t == "dd":
                    dt = dd(dd_src, os.path.join(wd, "dd.out"), pull_bytes, 1)
                else:
                    dt = dd(dd_src, os.path.join(wd, "dd.out"), pull_bytes, 2)
                if not t.startswith("dd"):
                    compare(fmt, pristine, top)
                results.setdefault((fmt, t), []).append(dt)
        shutil.rmtree(os.path.join(a.dir, "work"), ignore_errors=True)

    print(f"load average at end: {os.getloadavg()[0]:.2f}")
    print(f"\n{'format':6} {'contender':13} {'median s':>9} {'min s':>8} "
          f"{'/rebase':>8} {'/dd':>6} {'MiB/s':>7}")
    for fmt in formats:
        med = {t: statistics.median(results[(fmt, t)]) for t in tools}
        for t in tools:
            v = results[(fmt, t)]
            rel_rb = med[t] / med["rebase"] if "rebase" in med else float("nan")
            rel_dd = med[t] / med["dd"] if "dd" in med else float("nan")
            print(f"{fmt:6} {t:13} {med[t]:9.3f} {min(v):8.3f} {rel_rb:8.2f} {rel_dd:6.2f} "
                  f"{pull_bytes / med[t] / 2**20:7.0f}")
        if fmt in rss:
            print(f"{fmt:6} imgpull peak RSS: {rss[fmt] / 1024:.0f} MiB")
        if fmt in share:
            print(f"{fmt:6} imgpull data bytes through io_uring: {share[fmt] * 100:.1f}% "
                  f"(lowest of the runs)")
    print("\nall results verified with qemu-img compare (dd rows copy bytes only)")


if __name__ == "__main__":
    main()
