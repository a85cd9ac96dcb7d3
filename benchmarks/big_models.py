"""onnxtq against onnxruntime's MatMulNBits quantizer on synthetic GPT models of growing size (issue 17).

Builds the models of `gpt_models.py` (if absent), then for each: `onnxtq compress` with each pipeline (default
'calibrate,rtn{bits=4}', and 'rtn{bits=4}', which like MatMulNBits reads no data) and onnxruntime's
`MatMulNBitsQuantizer` (4 bits, blocks of 32, symmetric), each in its own process, timed, with its peak
resident memory and CPU use (os.wait4's rusage of that process), and the SQNR of the files' logits against the
float model's on the last calibration sequences. Prints a Markdown table and the fitted growth exponents (time
and memory ∝ parameters^k). `--cluster-check` also runs the first pipeline on the smallest size on a local Dask
cluster of two worker processes and says whether its file is the local one, byte for byte.

    python benchmarks/big_models.py DIR [--sizes 27M 123M 353M 1.3B] [--pipelines P ...] [--jobs N]
        [--cluster-check] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import gpt_models  # noqa: E402

NBITS = """
import sys
from pathlib import Path
import onnx
from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
source, out = sys.argv[1], sys.argv[2]
q = MatMulNBitsQuantizer(onnx.load(source), block_size=32, is_symmetric=True)
q.process()
big = q.model.model.ByteSize() > 2**31 - 2**20
onnx.save_model(q.model.model, out, save_as_external_data=big, location=Path(out).name + ".data")
"""

SQNR = """
import sys
import numpy as np
import onnxruntime as ort
ref_path, path, calib = sys.argv[1:4]
ids = np.load(calib)["input_ids"][-4:]
def logits(p):
    return ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"input_ids": ids})[0]
ref = logits(ref_path)
err = logits(path) - ref
print(10 * np.log10(float((ref.astype(np.float64) ** 2).sum()) / float((err.astype(np.float64) ** 2).sum())))
"""


def warm(model: Path) -> None:
    """Read the model and its weights once, so every tool finds them in the page cache (a cold 5 GB read cost
    MatMulNBits a minute it would not have on a second run)."""
    for path in (model, model.with_name(model.name + ".data")):
        with path.open("rb") as f:
            while f.read(64 * 2**20):
                pass


def measured(argv: list[str], log: Path, model: Path) -> dict:
    """Run `argv` as a child, `model` warm in the page cache; its wall time, peak RSS and CPU use (cores busy on
    average), and exit code."""
    warm(model)
    start = time.perf_counter()
    with log.open("w") as out:
        child = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)  # not this repository's
        _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    return {
        "seconds": round(wall, 1),
        "peak_gb": round(usage.ru_maxrss / 2**20, 2),
        "cpu": round((usage.ru_utime + usage.ru_stime) / wall, 2),
        "exit": os.waitstatus_to_exitcode(status),
    }


def sqnr(reference: Path, path: Path, calib: Path) -> float | None:
    done = subprocess.run([sys.executable, "-c", SQNR, str(reference), str(path), str(calib)], capture_output=True)
    return round(float(done.stdout.decode().split()[-1]), 2) if done.returncode == 0 else None


def file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def run_size(size: str, folder: Path, pipelines: list[str], jobs: int) -> dict:
    spec = gpt_models.SIZES[size]
    model, calib = folder / f"{spec.name}.onnx", folder / f"{spec.name}_calib.npz"
    if not model.exists():
        gpt_models.build(spec, folder)
        gpt_models.calibration(spec, calib, 32, 128)
    row = {"size": size, "params": spec.params, "fp32_bytes": file_bytes(model), "onnxtq": {}}
    theirs = folder / f"{spec.name}.nbits.onnx"
    argv = [sys.executable, "-c", NBITS, str(model), str(theirs)]
    row["nbits"] = measured(argv, folder / f"{spec.name}.nbits.log", model)
    if row["nbits"]["exit"] == 0:
        row["nbits"] |= {"bytes": file_bytes(theirs), "sqnr_db": sqnr(model, theirs, calib)}
    for index, pipeline in enumerate(pipelines):
        ours = folder / f"{spec.name}.onnxtq{index}.onnx"
        log = folder / f"{spec.name}.onnxtq{index}.log"
        result = measured(onnxtq_argv(model, ours, calib, pipeline, jobs), log, model)
        if result["exit"] == 0:
            result |= {"bytes": file_bytes(ours), "sqnr_db": sqnr(model, ours, calib)}
        row["onnxtq"][pipeline] = result
    return row


def onnxtq_argv(model: Path, out: Path, calib: Path, pipeline: str, jobs: int, *extra: str) -> list[str]:
    argv = [sys.executable, "-m", "onnxtq.cli", "compress", str(model), "-o", str(out), "--calib", str(calib)]
    return argv + ["--pipeline", pipeline, "--jobs", str(jobs), "--no-sent", *extra]


def cluster_check(size: str, folder: Path, pipeline: str) -> str:
    """The pipeline's file on a local Dask cluster of two worker processes, against the local run's."""
    from distributed import LocalCluster

    spec = gpt_models.SIZES[size]
    model, calib = folder / f"{spec.name}.onnx", folder / f"{spec.name}_calib.npz"
    local, remote = folder / f"{spec.name}.local.onnx", folder / f"{spec.name}.cluster.onnx"
    quiet = {"check": True, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "cwd": folder}
    subprocess.run(onnxtq_argv(model, local, calib, pipeline, 0), **quiet)
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster:
        subprocess.run(onnxtq_argv(model, remote, calib, pipeline, 0, "--cluster", cluster.scheduler_address), **quiet)
    same = "byte-identical" if local.read_bytes() == remote.read_bytes() else "DIFFERS"
    return f"{size} `{pipeline}` on a local Dask cluster of 2 worker processes: {same} to the local run's file"


def _cell(r: dict) -> str:
    if r["exit"] != 0:
        return f"failed (exit {r['exit']}) after {r['seconds']:.0f} s at {r['peak_gb']:.2f} GB | – | –"
    cost = f"{r['seconds']:.1f} s, {r['peak_gb']:.2f} GB, {r['cpu']:.2f} cores"
    return f"{cost} | {r['bytes'] / 1e6:.1f} MB | {r['sqnr_db']} dB"


def table(rows: list[dict], pipelines: list[str]) -> str:
    lines = [
        "| model | fp32 file | tool | time, peak RSS, CPU | bytes | logits SQNR |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        name = f"{row['size']} ({row['params'] / 1e6:.0f}M) | {row['fp32_bytes'] / 1e6:.0f} MB"
        for pipeline in pipelines:
            lines.append(f"| {name} | onnxtq `{pipeline}` | {_cell(row['onnxtq'][pipeline])} |")
        lines.append(f"| {name} | MatMulNBits 4-bit, blocks of 32 | {_cell(row['nbits'])} |")
    return "\n".join(lines)


def exponents(rows: list[dict], tool: str, pick=lambda row, tool: row[tool]) -> str:
    """Slopes of log(time) and log(peak RSS) against log(parameters), over the sizes that finished."""
    done = [r for r in rows if pick(r, tool)["exit"] == 0]
    if len(done) < 2:
        return f"{tool}: fewer than two sizes finished"
    x = np.log([r["params"] for r in done])
    k_time = np.polyfit(x, np.log([pick(r, tool)["seconds"] for r in done]), 1)[0]
    k_mem = np.polyfit(x, np.log([pick(r, tool)["peak_gb"] for r in done]), 1)[0]
    return f"{tool}: time ∝ params^{k_time:.2f}, peak RSS ∝ params^{k_mem:.2f} ({len(done)} sizes)"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--sizes", nargs="+", default=list(gpt_models.SIZES), choices=list(gpt_models.SIZES))
    parser.add_argument("--pipelines", nargs="+", default=["calibrate,rtn{bits=4}", "rtn{bits=4}"])
    parser.add_argument("--jobs", type=int, default=0)
    parser.add_argument("--cluster-check", action="store_true")
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        rows.append(run_size(size, args.folder, args.pipelines, args.jobs))
        print(json.dumps(rows[-1]), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    print(f"\n--jobs {args.jobs}\n")
    print(table(rows, args.pipelines))
    print()
    for pipeline in args.pipelines:
        print(exponents(rows, pipeline, lambda row, p: row["onnxtq"][p]))
    print(exponents(rows, "nbits"))
    if args.cluster_check:
        print(cluster_check(args.sizes[0], args.folder, args.pipelines[0]))


if __name__ == "__main__":
    main()
