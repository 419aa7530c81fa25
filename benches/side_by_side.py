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

usage: benches/side_by_side.py [--size 1G] [--layers 3] [--runs 5]
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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MKCHAIN = os.path.join(ROOT, "..", "shared", "bench", "mkchain.sh")


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


def timed(cmd):
    """Wall time of a command, and its own peak RSS in KiB (from wait4)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} exited with {p.returncode}")
    return dt, usage.ru_maxrss


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
        self.f = self.sock.makefile("rw")
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

    def wait_event(self, name):
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
    mib = max(1, nbytes // (1 << 20))
    per = mib // parallel
    procs = []
    t0 = time.perf_counter()
    for i in range(parallel):
        procs.append(subprocess.Popen(
            ["dd", f"if={src}", f"of={dst}.{i}", "bs=1M", f"count={per}", f"skip={i * per}",
             "status=none"]))
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError("dd failed")
    dt = time.perf_counter() - t0
    for i in range(parallel):
        os.unlink(f"{dst}.{i}")
    return dt


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="1G")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm/imgpull-bench")
    ap.add_argument("--formats", default="qcow2,qed")
    ap.add_argument("--only", default="")
    ap.add_argument("--imgpull", default=os.path.join(ROOT, "target", "release", "imgpull"))
    ap.add_argument("--no-build", action="store_true")
    a = ap.parse_args()

    if not a.no_build:
        run(["cargo", "build", "--release", "-q", "-p", "imgpull-cli"], cwd=ROOT)
    if not os.path.exists(MKCHAIN):
        sys.exit(f"missing {MKCHAIN} (the reference chain builder in shared/bench)")
    src = os.path.join(a.dir, f"chain-{a.size}-{a.layers}")
    if not os.path.exists(os.path.join(src, "chain-info.txt")):
        run(["bash", MKCHAIN, src, a.size, str(a.layers)], stdout=subprocess.DEVNULL)
    info = open(os.path.join(src, "chain-info.txt")).read()
    pull_bytes = int(info.split("PULL_BYTES=")[1].split()[0])
    print(info.strip())
    print(f"machine: {os.cpu_count()} cores, {time.strftime('%Y-%m-%d')}, imgpull {a.imgpull}")

    tools = ["imgpull", "imgpull-base", "rebase", "rebase-base", "qsd", "dd", "dd-x2"]
    if a.only:
        tools = [t for t in tools if t in a.only.split(",")]
    results = {}
    rss = {}
    for fmt in a.formats.split(","):
        pristine = os.path.join(src, f"top.{fmt}")
        base = os.path.join(src, f"base.{fmt}")
        for r in range(a.runs):
            for t in tools:
                wd = os.path.join(a.dir, "work")
                top = fresh_top(src, wd, fmt, a.layers)
                wbase = os.path.join(wd, f"base.{fmt}")
                if t == "imgpull":
                    dt, kib = timed([a.imgpull, "pull", "--no-progress", top])
                    rss[fmt] = max(rss.get(fmt, 0), kib)
                elif t == "imgpull-base":
                    dt, _ = timed([a.imgpull, "pull", "--no-progress", "--base", wbase, top])
                elif t == "rebase":
                    dt, _ = timed(["qemu-img", "rebase", "-f", fmt, "-b", "", top])
                elif t == "rebase-base":
                    dt, _ = timed(["qemu-img", "rebase", "-f", fmt, "-b", wbase, "-F", fmt, top])
                elif t == "qsd":
                    dt = qsd_stream(fmt, top)
                elif t == "dd":
                    dt = dd(base, os.path.join(wd, "dd.out"), pull_bytes, 1)
                else:
                    dt = dd(base, os.path.join(wd, "dd.out"), pull_bytes, 2)
                if not t.startswith("dd"):
                    compare(fmt, pristine, top)
                results.setdefault((fmt, t), []).append(dt)
        shutil.rmtree(os.path.join(a.dir, "work"), ignore_errors=True)

    print(f"\n{'format':6} {'contender':13} {'median s':>9} {'min s':>8} "
          f"{'/rebase':>8} {'/dd':>6} {'MiB/s':>7}")
    for fmt in a.formats.split(","):
        med = {t: statistics.median(results[(fmt, t)]) for t in tools}
        for t in tools:
            v = results[(fmt, t)]
            rel_rb = med[t] / med["rebase"] if "rebase" in med else float("nan")
            rel_dd = med[t] / med["dd"] if "dd" in med else float("nan")
            print(f"{fmt:6} {t:13} {med[t]:9.3f} {min(v):8.3f} {rel_rb:8.2f} {rel_dd:6.2f} "
                  f"{pull_bytes / med[t] / 2**20:7.0f}")
        if fmt in rss:
            print(f"{fmt:6} imgpull peak RSS: {rss[fmt] / 1024:.0f} MiB")
    print("\nall results verified with qemu-img compare (dd rows copy bytes only)")


if __name__ == "__main__":
    main()
