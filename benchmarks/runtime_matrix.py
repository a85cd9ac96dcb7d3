"""The runtime matrix: every profile × method × model, run on every runtime users deploy to.

    .venv/bin/python benchmarks/runtime_matrix.py --out /work/bench_out/matrix [--models mnist_cnn ...]
        [--profiles ort portable ...] [--methods rtn8 rtn4 ...] [--runtimes ort117 tract ...] [--root /work/rt]

Needs the runtimes of benchmarks/runtimes/setup.sh (ROOT, default /work/rt). For each model, method and
profile it compresses the model (onnxtq's API, the bundled model's calib.npz or the zoo's calibration file),
then loads and runs the file on each runtime (benchmarks/runtimes/harness.py, each in its own process, with
the runtime's default options: what a deployment gets) on 8 held-out inputs. A cell is green when the file
loads, runs, and its outputs are within 1e-4 of the output range of what its weights compute (onnxruntime,
this venv, fp32 MatMulNBits accuracy). Writes OUT/matrix.json (every cell, with sizes: deployable, brotli -q
11, gzip -9, onnxtq pack) and prints Markdown tables; `--table OUT/matrix.json ...` prints them again.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import onnx

from onnxtq import model_io
from onnxtq.compress import compress
from onnxtq.served import transfer_sizes

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "runtimes"))
import harness  # noqa: E402

REPO = HERE.parent
ZOO = Path("/work/zoo")
CALIB = Path("/work/bench_out/calib")
#: method → pipeline after fold-bn,calibrate (kq's dense layers take 4-vectors: `pq`)
METHODS = {
    "rtn8": "rtn{bits=8}",
    "rtn4": "rtn{bits=4}",
    "rtn2": "rtn{bits=2}",
    "rtn4b32": "rtn{bits=4,block=32,scale_bits=16}",
    "tq": "tq{rate=3}",
    "ecsq": "ecsq{rate=3}",
    "kq": "kq{pq=4}",
    "crq": "crq",
}
BUNDLED = ("mnist_cnn", "mnist_transformer", "mnist_rnn")
TOLERANCE = 1e-4  # of the output range


def model_files(name: str) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """(model, calibration data, 8 inputs not calibrated on) for a bundled or zoo model."""
    if name in BUNDLED:
        folder = REPO / "models" / name
        held = np.load(folder / "eval.npz")
        return folder / f"{name}.onnx", folder / "calib.npz", {k: held[k][:8] for k in held.files}
    calib = next(CALIB.glob(f"{name}_calib*.npz"))
    data = np.load(calib)
    return ZOO / f"{name}.onnx", calib, {k: data[k][-8:] for k in data.files}


def sizes(path: Path) -> dict[str, int]:
    """The file's bytes, and what brotli -q 11, gzip -9 and `onnxtq pack` make of it."""
    return {"bytes": path.stat().st_size, **transfer_sizes(path.read_bytes())}


def expected(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """What the file's weights compute: onnxruntime here, MatMulNBits at fp32 accuracy, one sample at a time
    when the model takes one."""
    session = model_io.session(onnx.load(str(path)))
    names = [i.name for i in session.get_inputs()]
    one = all(i.shape and i.shape[0] == 1 for i in session.get_inputs())
    batches = [{n: inputs[n][k : k + 1] for n in names} for k in range(8)] if one else [{n: inputs[n] for n in names}]
    runs = [session.run(None, b) for b in batches]
    return [np.concatenate([r[j] for r in runs]) if one else runs[0][j] for j in range(len(runs[0]))]


def cell(result: harness.Result, reference: list[np.ndarray]) -> dict:
    """One runtime's verdict on one file."""
    out = {"loads": result.loads, "runs": result.runs, "error": result.error, "version": result.version}
    out.update(latency_ms=result.latency_ms, peak_rss_mb=result.peak_rss_mb)
    if result.runs:
        diffs = [
            float(np.abs(np.asarray(a, np.float64).reshape(b.shape) - b).max()) / max(float(np.ptp(b)), 1e-12)
            for a, b in zip(result.outputs, reference)
        ]
        out["relative_diff"] = max(diffs)
        out["green"] = out["relative_diff"] <= TOLERANCE
    else:
        out["green"] = False
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for the files and matrix.json")
    p.add_argument("--models", nargs="+", default=list(BUNDLED))
    p.add_argument("--profiles", nargs="+", default=["ort", "portable"])
    p.add_argument("--methods", nargs="+", default=list(METHODS))
    p.add_argument("--runtimes", nargs="+", default=list(harness.RUNTIMES))
    p.add_argument("--root", default="/work/rt")
    p.add_argument("--calib-samples", type=int, help="calibrate on this many inputs (default: all)")
    p.add_argument(
        "--table", nargs="+", type=Path, metavar="JSON", help="print the tables of earlier runs, run nothing"
    )
    args = p.parse_args()
    if args.table:
        rows = [row for path in args.table for row in json.loads(path.read_text())]
        print(table(rows, args.runtimes))
        print(costs(rows))
        return
    if args.out is None:
        p.error("--out is required to run the matrix")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.models:
        model, calib, inputs = model_files(name)
        for method in args.methods:
            for profile in args.profiles:
                path = args.out / f"{name}.{method}.{profile}.onnx"
                row = {"model": name, "method": method, "profile": profile}
                try:
                    calibrate = f"calibrate{{samples={args.calib_samples}}}" if args.calib_samples else "calibrate"
                    pipeline = f"fold-bn,{calibrate},{METHODS[method]}"
                    compress(model, path, pipeline, calib=calib, target=profile)
                except Exception as exc:  # a method that codes nothing here (kq on a model without kernels)
                    row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
                header = onnx.load(str(path), load_external_data=False)
                row.update(sizes(path), opset=header.opset_import[0].version, ir=header.ir_version)
                reference = expected(path, inputs)
                row["runtimes"] = {
                    rt: cell(harness.run(rt, path, inputs, root=args.root), reference) for rt in args.runtimes
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    (args.out / "matrix.json").write_text(json.dumps(rows, indent=1))
    print(table(rows, args.runtimes))
    print(costs(rows))


def table(rows: list[dict], runtimes: list[str]) -> str:
    """Markdown: a row per file, a column per runtime (✓ diff, or ✗ and why)."""
    head = "| model | method | profile | opset/IR | bytes | brotli | gzip | pack | " + " | ".join(runtimes) + " |"
    lines = [head, "|" + "---|" * (8 + len(runtimes))]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | {r['profile']} | {r['error'][:80]} |")
            continue
        cells = []
        for rt in runtimes:
            c = r["runtimes"][rt]
            if c["green"]:
                cells.append(f"✓ {c['relative_diff']:.0e}")
            elif c["runs"]:
                cells.append(f"✗ off {c['relative_diff']:.1e}")
            else:
                cells.append(f"✗ {'run' if c['loads'] else 'load'}: {_reason(c['error'])}")
        lines.append(
            f"| {r['model']} | {r['method']} | {r['profile']} | {r['opset']}/{r['ir']} | {r['bytes']:,d} | "
            f"{r['brotli']:,d} | {r['gzip']:,d} | {_packed(r)} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def costs(rows: list[dict]) -> str:
    """Markdown: what each profile's file costs over the ort profile's, deployable and as sent."""
    files = {(r["model"], r["method"], r["profile"]): r for r in rows if "error" not in r}
    lines = [
        "| model | method | profile | bytes vs ort | brotli -q 11 vs ort | pack vs brotli |",
        "|---|---|---|---|---|---|",
    ]
    for (model, method, profile), r in files.items():
        base = files.get((model, method, "ort"))
        if profile == "ort" or base is None:
            continue
        packed = f"{r['packed'] / r['brotli'] - 1:+.1%}" if "packed" in r else "–"
        lines.append(
            f"| {model} | {method} | {profile} | {r['bytes'] / base['bytes'] - 1:+.2%} |"
            f" {r['brotli'] / base['brotli'] - 1:+.2%} | {packed} |"
        )
    return "\n".join(lines)


def _reason(error: str | None) -> str:
    """A runtime's refusal, short: onnxruntime's status and file path dropped."""
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : (Load model from \S+ failed:)?", "", error or "")
    return text.strip()[:70].replace("|", "/")


def _packed(row: dict) -> str:
    return f"{row['packed']:,d}" if "packed" in row else "–"  # rows written before the matrix measured it


if __name__ == "__main__":
    main()
