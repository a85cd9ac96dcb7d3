"""Latency and resident memory of compressed files against FP32, each in a fresh onnxruntime process.

    .venv/bin/python benchmarks/profile_memory.py INPUTS.npz FP32.onnx OTHER.onnx ... [--runs 30] [--threads 2]

Per file, a new process (this venv's onnxruntime, default session options: what a user gets) imports
onnxruntime, reads one input batch, then creates the session and runs it. `weights MB` is the resident memory
the session added at load (RSS after the session is made, less RSS before: mostly the weights as the runtime
keeps them), `peak MB` the process's peak RSS after the runs, latency the median of --runs runs after one
warm-up; the files are measured in turn, --rounds times, and the quickest round of each is kept (a shared
machine only ever adds time). Prints a Markdown table with each file's ratio to the first (FP32).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROBE = """
import json, resource, statistics, sys, time
import numpy as np, onnxruntime as ort

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20

path, data, runs, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with np.load(data) as z:
    inputs = {k: z[k][:1] for k in z.files}
before = rss_mb()
so = ort.SessionOptions()
so.intra_op_num_threads = threads
start = time.perf_counter()
session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
load_s = time.perf_counter() - start
loaded = rss_mb()
feed = {i.name: inputs[i.name] for i in session.get_inputs()}
session.run(None, feed)
times = []
for _ in range(runs):
    start = time.perf_counter()
    session.run(None, feed)
    times.append(time.perf_counter() - start)
print(json.dumps({"load_s": load_s, "weights_mb": loaded - before, "after_run_mb": rss_mb() - before,
                  "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "latency_ms": statistics.median(times) * 1e3}))
"""


def measure(path: Path, inputs: Path, runs: int, threads: int) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(path), str(inputs), str(runs), str(threads)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"{path}: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", type=Path)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="every file measured this many times, in turn")
    args = p.parse_args()
    rounds = [[measure(f, args.inputs, args.runs, args.threads) for f in args.files] for _ in range(args.rounds)]
    rows = []
    for k, f in enumerate(args.files):  # the quickest round's latency: other load on the machine only adds
        best = min((r[k] for r in rounds), key=lambda m: m["latency_ms"])
        rows.append((f, best))
    base = rows[0][1]
    columns = ["file", "bytes", "load s", "weights MB", "after a run MB", "peak MB", "latency ms", "latency / FP32"]
    print("| " + " | ".join(columns + ["weights / FP32"]) + " |")
    print("|---|---|---|---|---|---|---|---|---|")
    for f, m in rows:
        print(
            f"| {f.name} | {f.stat().st_size:,d} | {m['load_s']:.2f} | {m['weights_mb']:.1f} |"
            f" {m['after_run_mb']:.1f} | {m['peak_mb']:.0f} | {m['latency_ms']:.2f} |"
            f" {m['latency_ms'] / base['latency_ms']:.2f}x | {m['weights_mb'] / base['weights_mb']:.2f}x |"
        )


if __name__ == "__main__":
    main()
