"""Output bytes of every README and scoreboard pipeline, to show that a refactor changes none (or which).

usage: python benchmarks/identity.py --onnxtq EXE --out DIR [--zoo /work/zoo --calib /work/bench_out/calib]
           [--models NAME ...] [--pipelines TEXT ...] [--samples 32]
       python benchmarks/identity.py --compare BEFORE/hashes.json AFTER/hashes.json

One `onnxtq sweep` per model (the shared `fold-bn,calibrate` head, then PIPELINES) with the given executable,
on the bundled models (their own calib.npz) and on the zoo models with the first `--samples` inputs of
make_calib.py's files (PP-OCRv4 det: 8; the pipelines and code paths are those of the full runs, the data
smaller, and the same on both sides). Writes DIR/<model>/ (models, the sweep's report and log) and
DIR/hashes.json: per model and pipeline, sha256 and bytes of the file, its verification SQNR and the seconds
its passes took. `--compare` prints every pipeline whose bytes differ, with both sizes and SQNRs.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys
import time
import zipfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUNDLED = ["mnist_cnn", "mnist_transformer"]
ZOO = ["mobilenet_v2", "efficientnet_lite0", "ppocrv4_det", "ppocrv4_rec", "minilm_l6"]
SAMPLES_CAP = {"ppocrv4_det": 8}  # 1x3x736x992 inputs
PIPELINES = [  # after the shared `fold-bn,calibrate`: the README's examples and benchmarks/peers.py's methods
    "rtn{bits=8}",
    "rtn{bits=4}",
    "rtn{bits=4,block=32}",
    "rtn{bits=2}",
    "rtn{bits=8,scale_bits=16,min_elements=0},compact-names",
    "rtn{bits=4},refine",
    "rtn{bits=8},dequantize-at-load",
    "tq{rate=4}",
    "tq{rate=3}",
    "tq{rate=2}",
    "tq{rate=4},dequantize-at-load",
    "ecsq{rate=4}",
    "ecsq{rate=3}",
    "ecsq{rate=2,method=hkmeans}",
    "crq{bits=2,ternary=true,method=rtn}",
    "crq{bits=2,sequential=true}",
    "kq{bits=8},rtn{bits=8}",
]


def _subset(src: str, dst: str, n: int) -> None:
    """The first n samples of every array of an .npz (streamed from the archive, never loaded whole)."""
    with zipfile.ZipFile(src) as zf:
        arrays = {}
        for name in zf.namelist():
            with zf.open(name) as f:
                fmt = np.lib.format
                header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
                shape, _, dtype = header(f)
                row = int(np.prod(shape[1:])) * dtype.itemsize
                k = min(n, shape[0])
                arrays[name[:-4]] = np.frombuffer(f.read(k * row), dtype).reshape(k, *shape[1:])
    np.savez(dst, **arrays)


def _inputs(args, model: str) -> tuple[str, str]:
    if model in BUNDLED:
        folder = os.path.join(REPO, "models", model)
        return os.path.join(folder, f"{model}.onnx"), os.path.join(folder, "calib.npz")
    calib = os.path.join(args.out, "calib", f"{model}.npz")
    if not os.path.exists(calib):
        os.makedirs(os.path.dirname(calib), exist_ok=True)
        (src,) = glob.glob(os.path.join(args.calib, f"{model}_calib*.npz"))
        _subset(src, calib, SAMPLES_CAP.get(model, args.samples))
    return os.path.join(args.zoo, f"{model}.onnx"), calib


def run(args) -> None:
    hashes = {}
    path = os.path.join(args.out, "hashes.json")
    if os.path.exists(path):
        with open(path) as f:
            hashes = json.load(f)
    for model in args.models:
        onnx_path, calib = _inputs(args, model)
        folder = os.path.join(args.out, model)
        os.makedirs(folder, exist_ok=True)
        report = os.path.join(folder, "sweep.json")
        cmd = [args.onnxtq, "sweep", onnx_path, "-o", folder, "--calib", calib, "--verify-samples", "4"]
        start = time.time()
        with open(os.path.join(folder, "sweep.log"), "w") as log:
            done = subprocess.run([*cmd, "--report", report, "--pipelines", *args.pipelines], stdout=log, stderr=log)
        print(f"{model}: rc={done.returncode}, {time.time() - start:.0f} s", flush=True)
        with open(report) as f:
            runs = json.load(f)
        stem = os.path.splitext(os.path.basename(onnx_path))[0]
        hashes.setdefault(model, {})
        for index, (pipeline, r) in enumerate(zip(args.pipelines, runs)):
            out = os.path.join(folder, f"{stem}.{index}.onnx")
            if r.get("error") or not os.path.exists(out):
                hashes[model][pipeline] = {"error": r.get("error", "no file")}
                continue
            with open(out, "rb") as f:
                data = f.read()
            sqnr = min(v["sqnr_db"] for v in r["verification"]["outputs"].values())
            seconds = sum(p["seconds"] for p in r["passes"] if p["pass_name"] not in ("fold-bn", "calibrate"))
            hashes[model][pipeline] = dict(
                sha256=hashlib.sha256(data).hexdigest(),
                bytes=len(data),
                sqnr_db=sqnr,
                seconds=round(seconds, 1),
                file=out,
            )
        with open(path, "w") as f:
            json.dump(hashes, f, indent=1)


def compare(before_path: str, after_path: str) -> int:
    with open(before_path) as f:
        before = json.load(f)
    with open(after_path) as f:
        after = json.load(f)
    same = differ = 0
    for model, runs in before.items():
        for pipeline, a in runs.items():
            b = after.get(model, {}).get(pipeline)
            if b is None:
                print(f"{model:<20} {pipeline:<56} not run after")
            elif a.get("sha256") and a.get("sha256") == b.get("sha256"):
                same += 1
            else:
                differ += 1
                sizes = f"{a.get('bytes', '-')} -> {b.get('bytes', '-')} B"
                sqnr = f"{a.get('sqnr_db', float('nan')):.2f} -> {b.get('sqnr_db', float('nan')):.2f} dB"
                print(f"{model:<20} {pipeline:<56} {sizes}, SQNR {sqnr} {b.get('error', '')}")
    print(f"{same} identical, {differ} different")
    return 1 if differ else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnxtq", help="the onnxtq executable to run")
    ap.add_argument("--out", help="output folder")
    ap.add_argument("--zoo", default="/work/zoo")
    ap.add_argument("--calib", default="/work/bench_out/calib", help="make_calib.py's folder")
    ap.add_argument("--models", nargs="+", default=BUNDLED + ZOO)
    ap.add_argument("--pipelines", nargs="+", default=PIPELINES, help="a subset of PIPELINES, say")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--compare", nargs=2, metavar="HASHES.json")
    args = ap.parse_args()
    if args.compare:
        return compare(*args.compare)
    if not (args.onnxtq and args.out):
        ap.error("--onnxtq and --out are needed to run")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
