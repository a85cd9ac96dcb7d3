"""Latency of onnxtq's files as written and after `dequantize-at-load`, against FP32.

usage: python benchmarks/load_latency.py --out RUN_DIR [--results peers.jsonl] --onnxtq ONNXTQ --calib CALIB_DIR
       [--models ...] [--configs w8 tq4 e4] [--runs 30] --md RESULT.md

Takes the FP32 file and the onnxtq files of a `peers.py` run, rewrites each with
`onnxtq compress FILE --pipeline dequantize-at-load` (verified against the file it came from), and times
all of them with default onnxruntime session options, batch 1, at 1 and 2 threads (benchmarks/latency.py).
"""

import argparse
import json
import os
import subprocess

import latency as latency_mod
from peers import MODELS, feeds, inputs_file


def rewrite(onnxtq, path, calib):
    """`path` after dequantize-at-load, written beside it."""
    out = path[: -len(".onnx")] + ".load.onnx"
    cmd = [onnxtq, "compress", path, "-o", out, "--pipeline", "dequantize-at-load", "--calib", calib]
    r = subprocess.run([*cmd, "--verify-samples", "4"], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: rc={r.returncode}: {r.stderr[-300:]}")
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--results", default="peers.jsonl")
    ap.add_argument("--onnxtq", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--configs", nargs="*", default=["w8", "tq4", "e4"])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--md", required=True)
    a = ap.parse_args()
    rows = {}
    for line in open(os.path.join(a.out, a.results)):
        r = json.loads(line)
        if r.get("path") and "error" not in r and os.path.exists(r["path"]):
            rows[r["model"], r["method"]] = r
    lines = [
        "| model | file | bytes as written → with the pass | ms 1T: as written / with the pass | "
        "ms 2T: as written / with the pass |",
        "|---|---|---|---|---|",
    ]
    for model in a.models:
        if (model, "fp32") not in rows:
            continue
        feed = feeds(a, model, 1)[0][0]
        fp32 = rows[model, "fp32"]["path"]
        ms = [latency_mod.latency(fp32, feed, threads, False, a.runs) for threads in (1, 2)]
        lines.append(f"| {model} | FP32 | {os.path.getsize(fp32):,d} | {ms[0]:.1f} | {ms[1]:.1f} |")
        for config in a.configs:
            row = rows.get((model, f"onnxtq {config}"))
            if row is None:
                continue
            paths = (row["path"], rewrite(a.onnxtq, row["path"], inputs_file(a.calib, model)[0]))
            sizes = " → ".join(f"{os.path.getsize(p):,d}" for p in paths)
            timed = [[latency_mod.latency(p, feed, threads, False, a.runs) for p in paths] for threads in (1, 2)]
            cells = " | ".join(f"{as_written:.1f} / **{loaded:.1f}**" for as_written, loaded in timed)
            lines.append(f"| {model} | onnxtq {config} | {sizes} | {cells} |")
        print("\n".join(lines[-4:]), flush=True)
    with open(a.md, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
