"""Which ONNX features each onnxruntime release's CPU InferenceSession loads and runs correctly.

onnxtq writes low-bit weights (INT4/UINT4/INT2/UINT2, blocked scales, fp16 scales) that only
newer runtimes accept, so this measures, per release, the oldest one a compressed model can target.
Tiny models are built here with onnx.helper (expected outputs from numpy); each release gets its
own throwaway venv (kept under --venvs for reuse) where a small runner loads and runs every model.

    .venv/bin/python benchmarks/ort_versions.py --json /work/ortver/ort_versions.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
from onnx import TensorProto as T
from onnx import checker, helper, save

VERSIONS = [
    "1.17.3",
    "1.18.1",
    "1.19.2",
    "1.20.1",
    "1.21.1",
    "1.22.1",
    "1.23.2",
    "1.24.4",
    "1.25.1",
    "1.26.0",
    "1.27.0",
    "1.28.0",
    "1.29.0",
    "1.30.0",
    "1.31.1",
    "1.32.0",
]
TOL = 1e-5  # |diff| / max(1, |y|): float32 MatMul of exact weights stays far below this
RNG = np.random.default_rng(0)
X = RNG.standard_normal((2, 8)).astype(np.float32)
SCALE = np.array([0.5, 0.25, 0.125, 0.0625], np.float32)  # exact in fp16 too


def min_ir(opset):
    """The smallest IR that may declare this opset (it also holds that opset's new types)."""
    return helper.find_min_ir_version_for([helper.make_opsetid("", opset)])


def stamp(nodes, inits, opset, ir=None):
    """x[2,8] -> nodes -> y, stamped with (opset, IR); IR defaults to the smallest legal one."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", T.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", T.FLOAT, [2, None])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir or min_ir(opset))


def matmul(nodes, inits, opset, w):
    """y = x @ W where `nodes` compute W[8,4] from initializers; returns (model, expected y)."""
    nodes = nodes + [helper.make_node("MatMul", ["x", "W"], ["y"])]
    return stamp(nodes, inits, opset), X.astype(np.float64) @ w


def tensor(name, dtype, a):
    """make_tensor packs the sub-byte types (INT4/INT2 ...) from plain ints."""
    return helper.make_tensor(name, dtype, a.shape, a.flatten().tolist())


def dequant(opset, dtype, lo, hi, zp=True, block=None, scale_dtype=T.FLOAT, **attrs):
    """W = DequantizeLinear(q, scale[, zp]) per axis 1, or blocked along axis 0."""
    q = RNG.integers(lo, hi + 1, (8, 4))
    scale = SCALE if block is None else np.stack([SCALE, SCALE[::-1]])  # [8/block, 4]
    z = RNG.integers(lo, hi + 1, scale.shape) if zp else np.zeros_like(scale, int)
    rep = 1 if block is None else block
    w = (q - np.repeat(z, rep, axis=0)) * np.repeat(scale, rep, axis=0).astype(np.float64)
    attrs = dict(attrs, axis=1) if block is None else dict(attrs, axis=0, block_size=block)
    inputs, inits = ["q", "s"], [tensor("q", dtype, q), tensor("s", scale_dtype, scale)]
    if zp:
        inputs.append("z")
        inits.append(tensor("z", dtype, z))
    node = helper.make_node("DequantizeLinear", inputs, ["W"], **attrs)
    return matmul([node], inits, opset, w)


def cast(opset, dtype, lo, hi):
    """W = Cast(low-bit initializer -> FLOAT): the unscaled way to store small ints."""
    q = RNG.integers(lo, hi + 1, (8, 4))
    node = helper.make_node("Cast", ["q"], ["W"], to=T.FLOAT)
    return matmul([node], [tensor("q", dtype, q)], opset, q.astype(np.float64))


def plain(opset, ir=None):
    """y = x + b: the smallest model, to see which (opset, IR) stamps a release accepts."""
    b = np.arange(8, dtype=np.float32)
    node = helper.make_node("Add", ["x", "b"], ["y"])
    return stamp([node], [tensor("b", T.FLOAT, b)], opset, ir), X + b


def variants():
    """name -> (model, expected y): the low-bit variants, then the plain stamp sweeps."""
    out = {
        "int8_axis": dequant(13, T.INT8, -128, 127),
        "int4_axis": dequant(21, T.INT4, -8, 7),
        "uint4_axis": dequant(21, T.UINT4, 0, 15),
        "int4_block": dequant(21, T.INT4, -8, 7, block=4),
        "int2_axis": dequant(25, T.INT2, -2, 1),
        "uint2_axis": dequant(25, T.UINT2, 0, 3),
        "fp16_scale": dequant(23, T.INT8, -128, 127, zp=False, scale_dtype=T.FLOAT16, output_dtype=T.FLOAT),
        "cast_int4": cast(21, T.INT4, -8, 7),
        "cast_uint2": cast(25, T.UINT2, 0, 3),
    }
    out.update({f"opset{o}": plain(o) for o in range(13, 26)})
    out.update({f"ir{i}": plain(13, i) for i in range(7, 14)})  # opset 13 is legal from IR 7
    return out


RUNNER = r"""
import json, re, sys, numpy as np, onnxruntime as ort
ort.set_default_logger_severity(3)
def first_line(e):  # drop the model path and the C++ source location / signature
    msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
    msg = re.sub(r"Load model from \S+ failed:", "Load failed: ", msg)
    return re.sub(r"/onnxruntime_src/\S+:\d+ .*?\)( \[with [^\]]*\])? ", "", msg)[:300]
print(json.dumps({"ort": ort.__version__}), flush=True)
def attempt(path, level, config):
    r = {"loads": False, "runs": False, "max_abs_diff": None, "rel_diff": None, "error": None}
    try:
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        for k, v in config.items():
            so.add_session_config_entry(k, v)
        s = ort.InferenceSession(path + ".onnx", so, providers=["CPUExecutionProvider"])
        r["loads"] = True
        d = np.load(path + ".npz")
        y = s.run(None, {"x": d["x"]})[0]
        r["runs"] = True
        diff = float(np.abs(y - d["y"]).max()) if y.shape == d["y"].shape else float("inf")
        r["max_abs_diff"], r["rel_diff"] = diff, diff / max(1.0, float(np.abs(d["y"]).max()))
    except Exception as e:
        r["error"] = first_line(e)
    return r
L = ort.GraphOptimizationLevel
for path in sys.argv[1:]:
    r = attempt(path, L.ORT_ENABLE_ALL, {})
    r["acc0"] = attempt(path, L.ORT_ENABLE_ALL, {"session.qdq_matmulnbits_accuracy_level": "0"})
    r["unopt"] = attempt(path, L.ORT_DISABLE_ALL, {})
    print(json.dumps(dict(r, model=path)), flush=True)
"""


def venv(root, ver):
    """A venv with onnxruntime==ver, reused when it already imports that version."""
    py = os.path.join(root, ver, "bin", "python")
    check = [py, "-c", "import onnxruntime as o; print(o.__version__)"]
    if os.path.exists(py) and subprocess.run(check, capture_output=True, text=True).stdout.strip() == ver:
        return py, 0.0
    t = time.time()
    subprocess.run([sys.executable, "-m", "venv", "--clear", os.path.join(root, ver)], check=True)
    # wheels before 1.19 were built against numpy 1.x and fail to import under numpy 2
    numpy = "numpy<2" if tuple(map(int, ver.split(".")[:2])) < (1, 19) else "numpy"
    subprocess.run([py, "-m", "pip", "install", "-q", f"onnxruntime=={ver}", numpy], check=True)
    return py, time.time() - t


def run_all(py, runner, paths):
    """Run the runner over every model; if a model crashes the process, note it and go on."""
    results, todo = {}, list(paths)
    while todo:
        p = subprocess.run([py, runner, *todo], capture_output=True, text=True, timeout=600)
        lines = [json.loads(s) for s in p.stdout.splitlines() if s.startswith("{")]
        for r in lines[1:]:
            results[r.pop("model")] = r
        todo = [t for t in todo if t not in results]
        if todo and p.returncode == 0:
            raise RuntimeError(f"runner skipped models: {p.stderr[-500:]}")
        if todo:  # the next model killed the runner
            err = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1][:300]
            results[todo.pop(0)] = {
                "loads": False,
                "runs": False,
                "max_abs_diff": None,
                "error": f"crash (exit {p.returncode}): {err}",
                "crash": True,
            }
    return results


def verdict(r):
    """ok / load error / run error / wrong (max abs diff), for one session's result."""
    if not r["loads"]:
        return "load error"
    if not r["runs"]:
        return "run error"
    return "ok" if r["rel_diff"] <= TOL else f"wrong ({r['max_abs_diff']:.2g})"


ALT = ("acc0", "unopt")  # the runner's other sessions, to tell a fusion's fault from a kernel's


def cell(r):
    """The default session's verdict, then each other session's where it differs: acc0 keeps
    the fusions but with accuracy_level 0 (float activations), unopt disables every fusion."""
    if r.get("crash"):
        return "crash"
    v = verdict(r)
    return "; ".join([v] + [f"{a} {verdict(r[a])}" for a in ALT if verdict(r[a]) != v])


def max_loaded(res, stamps, prefix):
    """Highest opset (prefix "opset") or IR (prefix "ir") among the plain models that loaded."""
    return max((stamps[n][prefix == "ir"] for n, r in res.items() if n.startswith(prefix) and r["loads"]), default=None)


def oldest(rows, names, key="cells"):
    """Oldest release with all `names` ok, plus any newer release that fails them again."""
    good = [v for v, row in rows.items() if all(row[key].get(n) == "ok" for n in names)]
    if not good:
        return "none"
    later_bad = [v for v in list(rows)[list(rows).index(good[0]) :] if v not in good]
    return good[0] + (f" (but not {', '.join(later_bad)})" if later_bad else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", required=True, help="write the results here")
    ap.add_argument("--venvs", default="/work/ortver/venvs")
    ap.add_argument("--versions", nargs="*", default=VERSIONS)
    args = ap.parse_args()
    t0 = time.time()
    tmp_dir = tempfile.TemporaryDirectory(prefix="ortver-")  # models + runner, removed at exit
    tmp = tmp_dir.name
    models = variants()
    paths, stamps = {}, {}
    for name, (m, y) in models.items():
        checker.check_model(m, full_check=True)
        paths[name] = os.path.join(tmp, name)
        stamps[name] = (m.opset_import[0].version, m.ir_version)
        save(m, paths[name] + ".onnx")
        np.savez(paths[name] + ".npz", x=X, y=y.astype(np.float32))
    runner = os.path.join(tmp, "runner.py")
    with open(runner, "w") as f:
        f.write(RUNNER)
    os.makedirs(args.venvs, exist_ok=True)

    rows = {}
    for ver in args.versions:
        try:
            py, install_s = venv(args.venvs, ver)
        except subprocess.CalledProcessError as e:
            rows[ver] = {"error": f"install failed: {e}", "cells": {}, "acc0_cells": {}, "unopt_cells": {}}
            print(ver, "install failed", file=sys.stderr)
            continue
        by_path = run_all(py, runner, list(paths.values()))
        res = {n: by_path[p] for n, p in paths.items()}
        rows[ver] = {
            "install_s": round(install_s, 1),
            "max_opset": max_loaded(res, stamps, "opset"),
            "max_ir": max_loaded(res, stamps, "ir"),
            "models": res,
            "cells": {n: cell(r) for n, r in res.items()},
            **{f"{a}_cells": {n: "crash" if r.get("crash") else verdict(r[a]) for n, r in res.items()} for a in ALT},
        }
        print(ver, "done", f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)

    quant = [n for n in models if not n.startswith(("opset", "ir"))]
    head = ["onnxruntime", "max opset loaded", "max IR loaded"] + [
        f"{n} ({stamps[n][0]}/{stamps[n][1]})" for n in quant
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ver, row in rows.items():
        cells = [row["cells"].get(n, "-") for n in quant]
        lines.append(f"| {ver} | {row.get('max_opset')} | {row.get('max_ir')} | " + " | ".join(cells) + " |")
    summary = {
        "every variant": oldest(rows, quant),
        "the opset<=21 INT4/UINT4 variants": oldest(rows, ["int4_axis", "uint4_axis", "int4_block", "cast_int4"]),
        "the plain opset 13 and IR 7 models": oldest(rows, ["opset13", "ir7"]),
        "every variant, accuracy_level 0": oldest(rows, quant, "acc0_cells"),
        "every variant, unoptimized session": oldest(rows, quant, "unopt_cells"),
    }
    total = time.time() - t0
    print("\n".join(lines))
    print("\n(opset/IR) under each variant is its stamp; plain models: opset 13..25, IR 7..13.")
    for k, v in summary.items():
        print(f"oldest release ok on {k}: {v}")
    print(f"total {total:.0f}s")
    with open(args.json, "w") as f:
        json.dump(
            {
                "command": " ".join(sys.argv),
                "total_s": round(total, 1),
                "tol": TOL,
                "stamps": stamps,
                "summary": summary,
                "versions": rows,
                "table": "\n".join(lines),
            },
            f,
            indent=1,
        )


if __name__ == "__main__":
    main()
