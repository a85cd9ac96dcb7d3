"""NNC (MPEG NNR, Fraunhofer's `nncodec`) against the .onnxtq container at equal fidelity on zoo models.

usage: python nnc_compare.py --nnc-python /work/nncvenv/bin/python [--zoo /work/zoo] [--zoo-tools DIR]
           [--out /work/nnc] [--models mobilenet_v2 efficientnet_lite0] [--qps -20 -24 -28] [--jsonl OUT.jsonl]
       python nnc_compare.py --table --jsonl OUT.jsonl --ours /work/bench_container/container.jsonl --bench /work/bench3

NNC codes the FP32 model's float initializers (every one: tensors of rank > 1 at `qp`, the rest at NNC's default
nonweight_qp -75; dependent quantization and DeepCABAC as NNC defaults them); its decoded weights are put back into
the FP32 graph and scored with the zoo eval against the original. The NNC side's full size is its bitstream plus the
graph without its float data, LZMA-compressed (what it takes to ship a runnable model). Our side: the .onnxtq
container of onnxtq's compressed models (container_zoo.py JSON lines) with their zoo metrics (BENCH/models/*.eval.log).

nncodec needs torch, so it runs in its own venv (`--nnc-python`): this script calls itself there with `--worker`,
which imports only numpy and nncodec. Neither is a dependency of onnxtq.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(src: str, dst: str, bitstream: str, qp: int) -> None:
    """(Runs in the nncodec venv.) Encode the arrays in `src`, decode them into `dst`, print sizes and times."""
    import numpy as np
    from nncodec import nnc

    params = {k: v.astype(np.float32) for k, v in np.load(src).items()}
    t0 = time.perf_counter()
    bs = nnc.compress(params, bitstream_path=bitstream, qp=qp, return_bitstream=True, verbose=False)
    t1 = time.perf_counter()
    rec = nnc.decompress(bs)
    t2 = time.perf_counter()
    np.savez(dst, **{k: np.asarray(rec[k], dtype=np.float32).reshape(params[k].shape) for k in params})
    print(json.dumps({"nnc_bytes": len(bs), "encode_s": round(t1 - t0, 2), "decode_s": round(t2 - t1, 2)}))


def worker_lossless(src: str, bitstream: str) -> None:
    """(Runs in the nncodec venv.) Code int32 arrays losslessly (NNC skips quantization for integer
    parameters: DeepCABAC codes the values as given), decode, check equality, print the size."""
    import numpy as np
    from nncodec import nnc

    params = {k: v.astype(np.int32) for k, v in np.load(src).items()}
    t0 = time.perf_counter()
    bs = nnc.compress(params, bitstream_path=bitstream, return_bitstream=True, verbose=False)
    t1 = time.perf_counter()
    rec = nnc.decompress(bs)
    t2 = time.perf_counter()
    exact = all(np.array_equal(np.asarray(rec[k]).reshape(v.shape), v) for k, v in params.items())
    print(
        json.dumps({"nnc_bytes": len(bs), "exact": exact, "encode_s": round(t1 - t0, 2), "decode_s": round(t2 - t1, 2)})
    )


def lossless(a) -> None:
    """NNC and the container on the same integer tensors of onnxtq's deployable models (identical fidelity)."""
    import numpy as np
    import onnx

    from onnxtq import container

    os.makedirs(a.out, exist_ok=True)
    for path in a.lossless:
        data = open(path, "rb").read()
        blob, report = container.pack(data, "rans")
        coded = {s.name for s in report.streams}
        arrays = {}
        for t in onnx.load_from_string(data).graph.initializer:
            if t.name in coded:
                values, _ = container._stream_symbols(t, container.DEFAULT_MIN_ELEMENTS)
                arrays[t.name] = values.reshape(tuple(t.dims)).astype(np.int32)
        stem = os.path.join(a.out, os.path.basename(path)[:-5] + "_int")
        np.savez(stem + ".npz", **arrays)
        r = subprocess.run(
            [a.nnc_python, os.path.abspath(__file__), "--worker-int", stem + ".npz", stem + ".nnc"],
            capture_output=True,
            text=True,
        )
        if r.returncode:
            print(f"{path}: nncodec failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        nnc_row = json.loads(r.stdout.strip().splitlines()[-1])
        row = {
            "model": os.path.basename(path)[:-5],
            "streams": len(arrays),
            "symbols": sum(s.symbols for s in report.streams),
            "entropy_bytes": round(report.entropy_bytes),
            "rans_bytes": report.coded_bytes + report.tables_bytes,
            "nnc_int_bytes": nnc_row["nnc_bytes"],
            "nnc_exact": nnc_row["exact"],
            "container_bytes": len(blob),
            "nnc_container_bytes": len(blob) - report.coded_bytes - report.tables_bytes + nnc_row["nnc_bytes"],
            "nnc_encode_s": nnc_row["encode_s"],
            "nnc_decode_s": nnc_row["decode_s"],
        }
        print(json.dumps(row), flush=True)
        if a.jsonl:
            with open(a.jsonl, "a") as f:
                f.write(json.dumps(row) + "\n")


MIN_CODED = 16  # float tensors with fewer values are graph settings (Resize scales, Clip bounds, scalars), not weights


def nnc_codes(t) -> bool:
    """Whether NNC codes initializer T: float weights. Coding a Resize's scales changes the graph's shapes (PP-OCRv4
    det failed shape inference that way), and NNC cannot code 0-d tensors (its coder indexes shape[0])."""
    import math

    return t.data_type == 1 and math.prod(t.dims) >= MIN_CODED


def graph_bytes(model) -> int:
    """LZMA size of the model with the data of the tensors NNC codes removed (the part NNC does not code)."""
    import lzma

    import onnx

    skeleton = onnx.ModelProto()
    skeleton.CopyFrom(model)
    for t in skeleton.graph.initializer:
        if nnc_codes(t):
            t.ClearField("raw_data")
            t.ClearField("float_data")
    return len(lzma.compress(skeleton.SerializeToString(), preset=9 | lzma.PRESET_EXTREME))


def evaluate(a, model: str, path: str) -> dict:
    py = os.path.join(a.zoo, ".venv", "bin", "python")
    cmd = [py, os.path.join(a.zoo_tools, "eval_imagenet.py"), path, "--ref", os.path.join(a.zoo, model + ".onnx")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        return {"error": r.stderr[-500:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def code_floats(nnc_python: str, model, stem: str, qp: int) -> dict:
    """NNC-code the float initializers of `model` (a ModelProto) at `qp` in the nncodec venv and write the FP32 graph
    with the decoded weights to STEM.onnx. Returns the worker's sizes and times with `graph_bytes` (the LZMA graph
    without its float data: what NNC's bitstream needs beside it); raises RuntimeError if nncodec fails."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    floats = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if nnc_codes(t)}
    np.savez(stem + "_src.npz", **floats)
    cmd = [nnc_python, os.path.abspath(__file__), "--worker", stem + "_src.npz", stem + ".npz", stem + ".nnc", str(qp)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"nncodec failed:\n{r.stderr[-2000:]}")
    row = {**json.loads(r.stdout.strip().splitlines()[-1]), "graph_bytes": graph_bytes(model)}
    decoded = np.load(stem + ".npz")
    rebuilt = onnx.ModelProto()
    rebuilt.CopyFrom(model)
    for t in rebuilt.graph.initializer:
        if t.name in floats:
            t.CopyFrom(numpy_helper.from_array(decoded[t.name], t.name))
    onnx.save(rebuilt, stem + ".onnx")
    row["rel_weight_mse"] = float(
        np.mean([np.mean((decoded[k] - v) ** 2) / np.mean(v**2) for k, v in floats.items() if v.ndim > 1])
    )
    return row


def run(a) -> None:
    import onnx

    os.makedirs(a.out, exist_ok=True)
    for model in a.models:
        fp32 = onnx.load(os.path.join(a.zoo, model + ".onnx"))
        for qp in a.qps:
            stem = os.path.join(a.out, f"{model}_nnc_qp{-qp}")
            try:
                row = {"model": model, "qp": qp, **code_floats(a.nnc_python, fp32, stem, qp)}
            except RuntimeError as e:
                print(f"{model} qp {qp}: {e}", file=sys.stderr)
                continue
            ev = evaluate(a, model, stem + ".onnx")
            row.update({k: ev.get(k) for k in ("top1_agreement", "top1_agreement_confident", "mean_kl", "error")})
            print(json.dumps(row), flush=True)
            if a.jsonl:
                with open(a.jsonl, "a") as f:
                    f.write(json.dumps(row) + "\n")


def table(a) -> None:
    """Markdown: per model, our containers and NNC's bitstreams sorted by size, with the metric."""
    rows = [json.loads(line) for line in open(a.jsonl)]
    ours = [json.loads(line) for line in open(a.ours)] if a.ours else []
    print("| model | coder | bytes (full) | bytes (weights only) | top-1 agreement | confident | KL |")
    print("|---|---|---|---|---|---|---|")
    for model in dict.fromkeys(r["model"] for r in rows):
        lines = []
        for r in rows:
            if r["model"] == model:
                full = r["nnc_bytes"] + r["graph_bytes"]
                lines.append((full, f"NNC qp {r['qp']}", r["nnc_bytes"], r))
        for o in ours:
            name = o["model"]
            if o["coder"] != "rans" or not name.startswith(model + "_"):
                continue
            log = os.path.join(a.bench, "models", name + ".eval.log")
            if not os.path.exists(log):
                continue
            ev = json.loads(open(log).read().strip().splitlines()[-1])
            weights = o["coded_bytes"] + o["tables_bytes"]
            lines.append((o["container_bytes"], f".onnxtq rANS of {name[len(model) + 1 :]}", weights, ev))
        for full, label, weights, ev in sorted(lines, key=lambda x: x[0]):
            print(
                f"| {model} | {label} | {full:,d} | {weights:,d} | {ev['top1_agreement']:.3f}"
                f" | {ev['top1_agreement_confident']:.3f} | {ev['mean_kl']:.4f} |"
            )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--worker-int":
        worker_lossless(sys.argv[2], sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nnc-python", default="/work/nncvenv/bin/python")
    ap.add_argument("--zoo", default="/work/zoo")
    ap.add_argument("--zoo-tools", default=os.path.join(REPO, "..", "shared", "zoo"))
    ap.add_argument("--out", default="/work/nnc")
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "efficientnet_lite0"])
    ap.add_argument("--qps", nargs="+", type=int, default=[-20, -24, -28])
    ap.add_argument("--lossless", nargs="+", metavar="MODEL.onnx", help="deployable models: NNC on their integer codes")
    ap.add_argument("--jsonl")
    ap.add_argument("--table", action="store_true", help="print the comparison table from --jsonl and --ours")
    ap.add_argument("--ours", help="container_zoo.py JSON lines")
    ap.add_argument("--bench", default="/work/bench3", help="folder whose models/ holds our eval logs")
    a = ap.parse_args()
    if a.table:
        table(a)
    elif a.lossless:
        lossless(a)
    else:
        run(a)


if __name__ == "__main__":
    main()
