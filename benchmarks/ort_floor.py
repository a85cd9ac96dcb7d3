"""The oldest onnxruntime that runs each of onnxtq's files: every file given, on every release's venv.

    .venv/bin/python benchmarks/ort_floor.py FILE.onnx ... [--venvs /work/ortver/venvs]

Complements benchmarks/ort_versions.py (tiny synthetic models, which also makes the venvs): these are real
compressed files. Each runs in each release's venv with fp32 MatMulNBits accuracy (what onnxtq verifies with)
on 4 inputs made from its declared input shapes; a cell is ok when it loads, runs, and is within 1e-4 of the
output range of this venv's onnxruntime. Prints a Markdown table and, per file, the oldest release that runs it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

from onnxtq import model_io

RUNNER = """
import json, sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions()
so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
feeds = dict(np.load(sys.argv[2]))
try:
    out = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.save(sys.argv[3], out)
    print(json.dumps({"ok": True}))
except Exception as exc:
    print(json.dumps({"ok": False, "error": str(exc).splitlines()[0][:160]}))
"""


def feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """4 random samples for every graph input (symbolic dims: 4 for the first, else 8)."""
    rng = np.random.default_rng(0)
    inits = {t.name for t in model.graph.initializer}
    out = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = [d.dim_value or (4 if k == 0 else 8) for k, d in enumerate(t.shape.dim)]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        out[vi.name] = rng.integers(0, 10, dims).astype(dtype) if dtype.kind in "iu" else rng.random(dims, np.float32)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--venvs", type=Path, default=Path("/work/ortver/venvs"))
    args = p.parse_args()
    versions = sorted((d.name for d in args.venvs.iterdir()), key=lambda v: tuple(map(int, v.split("."))))
    print("| file | " + " | ".join(versions) + " | oldest |")
    print("|---|" + "---|" * (len(versions) + 1))
    with tempfile.TemporaryDirectory() as tmp:
        runner = Path(tmp, "runner.py")
        runner.write_text(RUNNER)
        for path in args.files:
            model = onnx.load(str(path))
            inputs = feeds(model)
            np.savez(Path(tmp, "in.npz"), **inputs)
            expected = model_io.session(model).run(None, inputs)[0]
            cells = []
            for version in versions:
                python = args.venvs / version / "bin" / "python"
                out = Path(tmp, "out.npy")
                done = subprocess.run(
                    [str(python), str(runner), str(path), str(Path(tmp, "in.npz")), str(out)],
                    capture_output=True,
                    text=True,
                )
                report = json.loads(done.stdout.strip().splitlines()[-1]) if done.stdout.strip() else {"ok": False}
                if report["ok"]:
                    off = float(np.abs(np.load(out) - expected).max()) / max(float(np.ptp(expected)), 1e-12)
                    report["ok"] = off <= 1e-4
                    report.setdefault("error", f"off {off:.1e}")
                cells.append("ok" if report["ok"] else f"✗ {report.get('error', done.stderr[-80:])[:50]}")
            runs = [v for v, c in zip(versions, cells) if c == "ok"]
            oldest = runs[0] if runs and all(c == "ok" for c in cells[versions.index(runs[0]) :]) else "–"
            print(f"| {path.name} | " + " | ".join(cells) + f" | {oldest} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
