"""Rate–fidelity of onnxtq against its peers on the zoo: one table and one figure of bytes against task metric.

usage: ZOO/.venv/bin/python benchmarks/peers.py [--quick] [--models ...] [--methods ...] [--onnxtq-configs ...]
           [--onnxtq-from RESULTS.jsonl ...] [--out /work/bench_peers] [--results peers.jsonl]
       ZOO/.venv/bin/python benchmarks/peers.py --table [--md results/peers.md] [--png results/peers.png]

Runs in the zoo's venv (onnxruntime, onnx, matplotlib; onnxconverter-common and onnx-ir where installed there). On the
zoo models, the calibration data of make_calib.py and the zoo evals (run_zoo.evaluate), it makes and scores:

* `fp32`: the FP32 file; its transport size is `zstd -19` of it (fidelity = FP32 by definition);
* `fp16`: onnxconverter-common's `convert_float_to_float16(keep_io_types=True)` (onnx has no converter of its own;
  the row says why if the package is missing); transport: `zstd -19`;
* `ort-qdq8`: `onnxruntime.quantization.quantize_static`, QDQ, per-channel weights, ORT's default int8 types
  (QInt8 weights and activations), MinMax calibration fed from the calibration .npz by a CalibrationDataReader, after
  `quant_pre_process` (and onnx.version_converter to opset 13 where the model is older: per-axis DequantizeLinear);
* `ort-mnb4-rtn`, `ort-mnb4-hqq`: `matmul_nbits_quantizer` 4-bit weight-only MatMulNBits (block 32; RTN symmetric,
  HQQ asymmetric) on MatMul weights: rows "not applicable" on models without MatMul weights (Conv/Gemm only);
* `nnc-qpN`: Fraunhofer nncodec through nnc_compare.code_floats (its own venv); deployable = the FP32 graph with the
  decoded weights; transport = NNC bitstream + LZMA graph without float data;
* onnxtq configs (run_zoo.CONFIGS names): fresh by run_zoo.sweep/scored (one calibration per model), or taken from
  earlier run_zoo results (`--onnxtq-from`, the source file named in every such row); transport = `onnxtq pack`.

Every row also gets: bits per FP32 parameter (deployable and transport), the output SQNR against FP32 on held-out
inputs (make_calib.py --holdout; PP-OCRv4 det has none: its last calibration inputs, marked), and the onnxruntime
latency (benchmarks/latency.py, default session options, 1 and 2 threads). SQNR and evals use default session options.
--quick: MobileNetV2 and PP-OCRv4 rec, onnxtq w8/w4/tq3 calibrated on 64 inputs, ORT on 32, one NNC qp, evals cut
(10 crops a photo instead of 40; 100 text lines and 5 pages instead of 300 and 40), SQNR on 16 inputs, 10 latency
runs. Rows go to OUT/RESULTS as JSON lines as soon as each is scored; models to OUT/models.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import onnx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import latency as latency_mod  # noqa: E402
import nnc_compare  # noqa: E402
import run_zoo  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["mobilenet_v2", "efficientnet_lite0", "ppocrv4_det", "ppocrv4_rec", "minilm_l6"]
PEERS = ["fp32", "fp16", "ort-qdq8", "ort-mnb4-rtn", "ort-mnb4-hqq", "nnc-qp28", "nnc-qp34"]
ONNXTQ = ["w8", "w4", "tq4", "tq3", "tq2", "e4", "e3", "w2-crq", "kq8-w8"]
QUICK = dict(
    models=["mobilenet_v2", "ppocrv4_rec"],
    methods=["fp32", "fp16", "ort-qdq8", "ort-mnb4-rtn", "nnc-qp34"],
    onnxtq=["w8", "w4", "tq3"],
    eval_extra={"eval_imagenet.py": ["--crops", "10"], "eval_ppocr.py": ["--lines", "100", "--pages", "5"]},
    calib=64,
    ort_calib=32,
    sqnr=16,
    runs=10,
)
SQNR_CAP = {"ppocrv4_det": 8}  # its SQNR inputs are 1x3x736x992 calibration inputs (no held-out file)
ORT_CALIB_CAP = {"ppocrv4_det": 12}  # 1x3x736x992 inputs: MinMax holds all their intermediate tensors
FULL = dict(eval_extra={}, calib=None, ort_calib=128, sqnr=64, runs=30)


def floats_count(path):
    """FP32 parameters of a model: elements of its float initializers and float Constant nodes."""
    m = onnx.load(path)
    tensors = list(m.graph.initializer)
    tensors += [at.t for n in m.graph.node if n.op_type == "Constant" for at in n.attribute if at.name == "value"]
    return sum(math.prod(t.dims) for t in tensors if t.data_type == onnx.TensorProto.FLOAT)


def zstd_bytes(path):
    r = subprocess.run(["zstd", "-19", "-q", "-c", path], capture_output=True, check=True)
    return len(r.stdout)


def pack_bytes(a, path):
    """Size of `onnxtq pack PATH` (rANS container), run from /tmp so the installed package is the one used."""
    dst = path[:-5] + ".onnxtq"
    r = subprocess.run([a.onnxtq, "pack", path, "-o", dst], capture_output=True, text=True, cwd="/tmp")
    if r.returncode:
        raise RuntimeError(f"onnxtq pack rc={r.returncode}: {r.stderr[-300:]}")
    return os.path.getsize(dst)


def inputs_file(calib_dir, model):
    """(file, which) `feeds` reads for `model`: its held-out inputs, else (PP-OCRv4 det) its calibration inputs."""
    found = glob.glob(os.path.join(calib_dir, model + "_holdout*.npz"))
    return (found[0], "holdout") if found else (glob.glob(os.path.join(calib_dir, model + "_calib*.npz"))[0], "calib")


def feeds(a, model, n):
    """n single-sample feeds for SQNR: the held-out file, or (PP-OCRv4 det) the last calibration inputs."""
    src, on = inputs_file(a.calib, model)
    data = np.load(src)
    arrays = {k: data[k] for k in data.files}  # each data[k] reads the whole array again: once only
    total = arrays[data.files[0]].shape[0]
    n = min(n, SQNR_CAP.get(model, n), total)
    idx = range(total - n, total) if on == "calib" else range(n)
    return [{k: v[i : i + 1].copy() for k, v in arrays.items()} for i in idx], f"{on} x{len(idx)}"


def session(path, threads=2):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def sqnr_db(ref_path, path, samples):
    """Output SQNR over all float outputs and samples: 10 log10(Σ ref² / Σ (out − ref)²)."""
    ref, test = session(ref_path), session(path)
    sig = err = 0.0
    for feed in samples:
        for r, t in zip(ref.run(None, feed), test.run(None, feed)):
            r, t = np.asarray(r, np.float64), np.asarray(t, np.float64)
            sig, err = sig + float(np.sum(r * r)), err + float(np.sum((t - r) ** 2))
    return round(10 * math.log10(sig / err), 2) if err > 0 else math.inf


class NpzReader:
    """onnxruntime CalibrationDataReader over the first n samples of a calibration .npz, one at a time."""

    def __init__(self, path, n):
        data, self.i = np.load(path), 0
        self.n = min(n, data[data.files[0]].shape[0])
        self.data = {k: data[k][: self.n].copy() for k in data.files}

    def get_next(self):
        if self.i >= self.n:
            return None
        self.i += 1
        return {k: v[self.i - 1 : self.i] for k, v in self.data.items()}

    def rewind(self):
        self.i = 0


def preprocessed(a, model, src):
    """ORT's quant_pre_process output (shape inference, basic optimisations; PP-OCR's Constant weights become
    initializers), cached; upgraded to opset 13 where older (per-axis DequantizeLinear needs it)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = os.path.join(a.mdir, model + "_pre.onnx")
    if not os.path.exists(dst):
        try:
            quant_pre_process(src, dst)
        except Exception:  # symbolic shape inference fails on some graphs: ORT's own fallback is to skip it
            quant_pre_process(src, dst, skip_symbolic_shape=True)
        m = onnx.load(dst)
        opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
        if opset < 13:
            from onnx import version_converter

            onnx.save(version_converter.convert_version(m, 13), dst)
    return dst


def matmul_weights(path):
    """Elements of MatMul weights that are initializers (what MatMulNBits can quantize)."""
    m = onnx.load(path)
    inits = {t.name: math.prod(t.dims) for t in m.graph.initializer}
    return sum(inits.get(n.input[1], 0) for n in m.graph.node if n.op_type == "MatMul")


def make_peer(a, model, method, src):
    """Write the peer's model; returns (path or None, fields). Raises on tool failure."""
    dst = os.path.join(a.mdir, f"{model}_{method}.onnx")
    t0 = time.perf_counter()
    if method == "fp32":
        return src, dict(tool_s=0.0, transport_kind="zstd -19", note="reference; transport = zstd -19 of the file")
    if method == "fp16":
        try:
            from onnxconverter_common import float16
        except ImportError:
            return None, dict(skipped="onnxconverter-common not installed in the zoo venv (onnx has no converter)")
        onnx.save(float16.convert_float_to_float16(onnx.load(src), keep_io_types=True), dst)
        note = "onnxconverter-common float16, keep_io_types"
        return dst, dict(tool_s=time.perf_counter() - t0, transport_kind="zstd -19", note=note)
    if method == "ort-qdq8":
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

        pre = preprocessed(a, model, src)
        (calib,) = glob.glob(os.path.join(a.calib_full, model + "_calib*.npz"))
        # MinMax keeps every intermediate tensor of every input in RAM (its CalibMaxIntermediateOutputs option, in
        # onnxruntime 1.32, drops each full batch without taking its ranges), so det gets few inputs
        reader = NpzReader(calib, min(a.ort_calib, ORT_CALIB_CAP.get(model, a.ort_calib)))
        quantize_static(
            pre, dst, reader, quant_format=QuantFormat.QDQ, per_channel=True, calibrate_method=CalibrationMethod.MinMax
        )
        note = f"quantize_static QDQ per-channel, QInt8 W/A (ORT defaults), MinMax on {reader.n} inputs"
        return dst, dict(tool_s=time.perf_counter() - t0, transport_kind="onnxtq pack", note=note)
    if method.startswith("ort-mnb4"):
        from onnxruntime.quantization import matmul_nbits_quantizer as mnb

        pre = preprocessed(a, model, src)
        covered = matmul_weights(pre)
        if covered == 0:
            return None, dict(
                skipped="not applicable: no MatMul weights (MatMulNBits covers MatMul/Gather, not Conv/Gemm)"
            )
        if method.endswith("hqq"):
            q = mnb.MatMulNBitsQuantizer(
                onnx.load(pre), algo_config=mnb.HQQWeightOnlyQuantConfig(block_size=32, bits=4)
            )
            note = "MatMulNBits 4-bit HQQ, block 32, asymmetric"
        else:
            # ORT's default weight-only quantizer is blockwise round-to-nearest (its algo=rtn goes through a bundled
            # neural-compressor copy whose topological_sort asserts on the preprocessed PP-OCR graph)
            q = mnb.MatMulNBitsQuantizer(onnx.load(pre), bits=4, block_size=32, is_symmetric=True)
            note = "MatMulNBits 4-bit RTN (ORT's default quantizer), block 32, symmetric"
        q.process()
        q.model.save_model_to_file(dst, use_external_data_format=False)
        share = covered / floats_count(src)
        note += f"; MatMul weights only ({100 * share:.0f}% of parameters), the rest FP32"
        return dst, dict(tool_s=time.perf_counter() - t0, transport_kind="onnxtq pack", note=note)
    if method.startswith("nnc-qp"):
        if not os.path.exists(a.nnc_python):
            return None, dict(skipped=f"nncodec venv missing ({a.nnc_python})")
        qp = -int(method[len("nnc-qp") :])
        base = src if onnx.load(src).graph.initializer else preprocessed(a, model, src)
        row = nnc_compare.code_floats(a.nnc_python, onnx.load(base), dst[:-5], qp)
        note = f"nncodec qp {qp} (NNC defaults otherwise), decoded into the FP32 graph"
        if base != src:
            note += " (ORT-preprocessed: Constant weights as initializers)"
        return dst, dict(
            tool_s=row["encode_s"],
            transport=row["nnc_bytes"] + row["graph_bytes"],
            transport_kind="NNC bitstream + LZMA graph",
            note=note,
        )
    raise ValueError(method)


def metric(model, ev):
    """(name, value, higher is better) of the zoo eval's headline number."""
    if not ev or "error" in ev:
        return None, None, True
    if model == "ppocrv4_det":
        return "det F1", ev["det_f1"], True
    if model == "ppocrv4_rec":
        return "rec CER", ev["rec_cer"], False
    return "top-1 agreement", ev["top1_agreement"], True


def finish(a, model, src, method, path, row, feeds_, on):
    """Fill the measured columns of a row whose model file is PATH."""
    row["path"], row["deploy_bytes"] = path, os.path.getsize(path)
    if "transport" not in row:
        row["transport"] = zstd_bytes(path) if row["transport_kind"] == "zstd -19" else pack_bytes(a, path)
    row["bpw_deploy"] = round(8 * row["deploy_bytes"] / a.params[model], 3)
    row["bpw_transport"] = round(8 * row["transport"] / a.params[model], 3)
    row["sqnr_db"] = math.inf if path == src else sqnr_db(src, path, feeds_)
    row["sqnr_on"] = on
    for threads in (1, 2):
        ms = latency_mod.latency(path, feeds_[0], threads, False, a.runs)
        row[f"lat{threads}_ms"] = round(ms, 2)
    if "eval" not in row:
        row["eval"] = a.fp32_eval[model] if path == src else run_zoo.evaluate(a, model, path)
    row["metric_name"], row["metric"], _ = metric(model, row["eval"])


def emit(a, row):
    row = {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in row.items()}
    with open(os.path.join(a.out, a.results), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k not in ("eval", "note")}), flush=True)


def onnxtq_rows(a, model, src):
    """onnxtq rows: fresh (run_zoo.sweep + scored) or from earlier run_zoo results (--onnxtq-from)."""
    found = {}
    for path in a.onnxtq_from:
        for line in open(path):
            r = json.loads(line)
            out = os.path.join(os.path.dirname(path), "models", f"{r['model']}_{r['config']}.onnx")
            if r["model"] == model and r["config"] in a.configs and r.get("eval") and os.path.exists(out):
                found[r["config"]] = (r, out, path)
    fresh = [c for c in a.configs if c not in found and (a.onnxtq_fresh is None or c in a.onnxtq_fresh)]
    if fresh:
        runs = run_zoo.sweep(a, model, src, fresh, a.mdir)
        for cfg in fresh:
            fields, rep = runs[cfg]
            out = os.path.join(a.mdir, f"{model}_{cfg}.onnx")
            if rep is not None:
                fields.update(run_zoo.scored(a, model, src, out, rep))
            found[cfg] = (fields, out if rep is not None else None, "fresh (run_zoo.sweep)")
    for cfg in a.configs:
        row = dict(model=model, method="onnxtq " + cfg, family="onnxtq", note=run_zoo.CONFIGS[cfg])
        if cfg not in found:
            yield row | dict(skipped="not run: no earlier result given and not in --onnxtq-fresh"), None
            continue
        r, out, source = found[cfg]
        row["source"] = source
        if out is None:
            yield row | dict(error=r.get("error") or f"onnxtq sweep rc={r.get('rc')}"), None
            continue
        row.update(eval=r["eval"], tool_s=r.get("tool_wall_s"), transport_kind="onnxtq pack")
        row["onnxtq_sqnr_db"] = r.get("holdout_sqnr_db") or r.get("sqnr_db")
        yield row, out


def quick_calib(a):
    """--quick: calibration and held-out subsets (first QUICK['calib'] / QUICK['sqnr'] samples) under OUT/calib."""
    dst = os.path.join(a.out, "calib")
    os.makedirs(dst, exist_ok=True)
    for model in a.models:
        for kind, n in (("calib", QUICK["calib"]), ("holdout", QUICK["sqnr"])):
            found = glob.glob(os.path.join(a.calib_full, f"{model}_{kind}*.npz"))
            if not found:
                continue
            out = os.path.join(dst, f"{model}_{kind}{n}.npz")
            if not os.path.exists(out):
                data = np.load(found[0])
                np.savez(out, **{k: data[k][:n] for k in data.files})
    return dst


def run(a):
    a.mdir = os.path.join(a.out, "models")
    os.makedirs(a.mdir, exist_ok=True)
    a.calib_full = a.calib
    if a.quick:
        a.calib = quick_calib(a)
    a.params, a.fp32_eval = {}, {}
    for model in a.models:
        src = os.path.join(a.zoo, model + ".onnx")
        a.params[model] = floats_count(src)
        feeds_, on = feeds(a, model, a.sqnr)
        a.fp32_eval[model] = run_zoo.evaluate(a, model, src)
        for method in a.methods:
            row = dict(model=model, method=method, family=method.split("-")[0], source="fresh")
            try:
                path, fields = make_peer(a, model, method, src)
                row.update(fields)
                if path is not None:
                    finish(a, model, src, method, path, row, feeds_, on)
            except Exception as e:  # a peer that fails is a row with its error, not the end of the run
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            emit(a, row)
        for row, out in onnxtq_rows(a, model, src):
            try:
                if out is not None:
                    finish(a, model, src, row["method"], out, row, feeds_, on)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            emit(a, row)


def relatency(a):
    """Re-time every scored row of OUT/RESULTS (e.g. once the machine is quiet); appends the updated rows."""
    rows = {}
    for line in open(os.path.join(a.out, a.results)):
        r = json.loads(line)
        rows[r["model"], r["method"]] = r
    first = {}
    for (model, _), r in rows.items():
        if r.get("path") and "error" not in r and os.path.exists(r["path"]):
            if model not in first:
                first[model] = feeds(a, model, 1)[0][0]
            for threads in (1, 2):
                r[f"lat{threads}_ms"] = round(latency_mod.latency(r["path"], first[model], threads, False, a.runs), 2)
            r["lat_note"] = "re-timed by --relatency at " + time.strftime("%H:%M UTC", time.gmtime())
            emit(a, r)


def fmt_metric(name, v):
    if v is None:
        return "–"
    return f"CER {100 * v:.2f}%" if name == "rec CER" else f"{v:.3f}"


def table(rows):
    """Markdown: per model, rows sorted by transport bytes."""
    out = []
    for model in ordered(rows):
        rs = [r for r in rows if r["model"] == model]
        fp = next((r for r in rs if r["method"] == "fp32"), {})
        name = next((r["metric_name"] for r in rs if r.get("metric_name")), "metric")
        out += [f"\n### {model} ({name}; FP32 {fp.get('deploy_bytes', 0):,d} B)\n"]
        out += ["| method | deployable B | transport B | b/param dep. / transp. | SQNR dB | " + name + " | tool s | "
                "ms 1T / 2T | source, notes |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        done = [r for r in rs if r.get("transport") and "error" not in r]
        for r in sorted(done, key=lambda r: r["transport"]):
            sq = "∞" if r.get("sqnr_db") is None else f"{r['sqnr_db']:.1f}"
            src = "" if r.get("source") == "fresh" else f"{r['source']}; "
            cells = [
                r["method"],
                f"{r['deploy_bytes']:,d}",
                f"{r['transport']:,d} ({r['transport_kind']})",
                f"{r['bpw_deploy']:.2f} / {r['bpw_transport']:.2f}",
                sq,
                fmt_metric(r.get("metric_name"), r.get("metric")),
                "–" if r.get("tool_s") is None else f"{r['tool_s']:.1f}",
                f"{r['lat1_ms']:.1f} / {r['lat2_ms']:.1f}",
                src + r.get("note", ""),
            ]
            out.append("| " + " | ".join(cells) + " |")
        for r in rs:
            if r not in done:
                out.append(f"| {r['method']} | {r.get('skipped') or r.get('error', 'not run')} ||||||||")
    return "\n".join(out) + "\n"


HEADER = """# onnxtq against its peers: rate and fidelity on the zoo ({mode} mode)

Written by `benchmarks/peers.py` (module docstring: what each method is). Columns: **deployable** = the file stock
onnxruntime loads; **transport** = `onnxtq pack` (.onnxtq, rANS) of onnxtq's and ORT's outputs, `zstd -19` of the FP32
and fp16 files, NNC's bitstream + the LZMA graph without float data; **b/param** = 8 × bytes / FP32 parameters (float
initializers and Constants of the FP32 model); **SQNR** = output SQNR against FP32 over all float outputs (default
session options; held-out inputs, {sqnr} at most); metric = the zoo eval (ImageNet: top-1 agreement with FP32 over the
eval's crops; MiniLM: top-1 retrieval agreement; PP-OCRv4 det: box F1;
rec: character error rate); **tool s** = the tool's wall time (onnxtq: its passes,
calibration included); **ms 1T / 2T** = median latency of {runs} runs, batch 1, default session options
(benchmarks/latency.py), 1 and 2 intra-op threads.

"""

COMPACT = [  # (column, method): the scoreboard's columns
    ("FP32 (zstd)", "fp32"),
    ("fp16", "fp16"),
    ("ORT QDQ int8", "ort-qdq8"),
    ("ORT MatMulNBits 4-bit", "ort-mnb4-rtn"),
    ("NNC qp -34", "nnc-qp34"),
    ("NNC qp -28", "nnc-qp28"),
    ("onnxtq rtn 8", "onnxtq w8"),
    ("onnxtq rtn 4", "onnxtq w4"),
    ("onnxtq tq 4 b/w", "onnxtq tq4"),
    ("onnxtq tq 3 b/w", "onnxtq tq3"),
    ("onnxtq ecsq 3 b/w", "onnxtq e3"),
    ("onnxtq ecsq 4 b/w", "onnxtq e4"),
    ("onnxtq crq 2-bit", "onnxtq w2-crq"),
    ("onnxtq kq (3×3: 8-bit index), rtn 8", "onnxtq kq8-w8"),
]


DISPLAY = {
    "mobilenet_v2": "MobileNetV2",
    "efficientnet_lite0": "EfficientNet-Lite0",
    "ppocrv4_det": "PP-OCRv4 det",
    "ppocrv4_rec": "PP-OCRv4 rec",
    "minilm_l6": "MiniLM-L6",
}


def ordered(rows):
    """The models of ROWS in MODELS order (others last)."""
    found = dict.fromkeys(r["model"] for r in rows)
    return sorted(found, key=lambda m: MODELS.index(m) if m in MODELS else len(MODELS))


def compact(rows):
    """Markdown: one line per method (COMPACT), one column per model: transport MB and the task metric."""
    by = {(r["model"], r["method"]): r for r in rows if r.get("transport") and "error" not in r}
    models = ordered(rows)
    names = {m: next((r["metric_name"] for r in rows if r["model"] == m and r.get("metric_name")), "") for m in models}
    out = [
        "| method | " + " | ".join(f"{DISPLAY.get(m, m)} ({names[m]})" for m in models) + " |",
        "|---" * (len(models) + 1) + "|",
    ]
    for label, method in COMPACT:
        if not any(k[1] == method for k in by):
            continue
        cells = []
        for m in models:
            r = by.get((m, method))
            ok = r and r.get("metric") is not None
            cells.append(f"{r['transport'] / 1e6:.2f} MB, {fmt_metric(names[m], r['metric'])}" if ok else "–")
        out.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot(rows, png, against="transport"):
    """One panel per model: task metric against transport MB (log; onnxtq's frontier drawn) or, with
    against="sqnr", against output SQNR (what fidelity a metric needs, whoever made the file; FP32 left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    models = ordered(rows)
    cols = min(3, len(models))
    fig, axes = plt.subplots(-(-len(models) // cols), cols, figsize=(4.2 * cols, 3.4 * -(-len(models) // cols)))
    axes = np.atleast_1d(axes).ravel()
    style = {
        "onnxtq": ("o", "C0"),
        "ort": ("s", "C1"),
        "nnc": ("^", "C2"),
        "fp16": ("D", "C3"),
        "fp32": ("*", "k"),
    }  # fp32: zstd of the file
    x_of = (lambda r: r["sqnr_db"]) if against == "sqnr" else (lambda r: r["transport"] / 1e6)
    for ax, model in zip(axes, models):
        rs = [r for r in rows if r["model"] == model and r.get("metric") is not None]
        if against == "sqnr":
            rs = [r for r in rs if r.get("sqnr_db") is not None]
        for fam, (marker, color) in style.items():
            pts = sorted((x_of(r), r["metric"], r["method"]) for r in rs if r["family"] == fam)
            if not pts:
                continue
            x, y, names = zip(*pts)
            ax.plot(x, y, marker=marker, color=color, ls="", label=fam, ms=5)
            if fam == "onnxtq" and against == "transport":  # its frontier: each point better than every smaller one
                sign = -1 if rs[0]["metric_name"] == "rec CER" else 1
                front = [p for i, p in enumerate(pts) if all(sign * p[1] > sign * q[1] for q in pts[:i])]
                ax.plot([p[0] for p in front], [p[1] for p in front], color=color, lw=1)
            for xi, yi, n in zip(x, y, names):
                ax.annotate(n.replace("onnxtq ", ""), (xi, yi), fontsize=6, xytext=(2, 2), textcoords="offset points")
        name = next((r["metric_name"] for r in rs), "metric")
        if against == "sqnr":
            ax.set_xlabel("output SQNR dB (held-out inputs)", fontsize=8)
        else:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}" if str(v)[0] in "25" else ""))
            ax.set_xlabel("transport MB (log)", fontsize=8)
        ax.set_title(DISPLAY.get(model, model), fontsize=9)
        ax.set_ylabel(name + (" (lower is better)" if name == "rec CER" else ""), fontsize=8)
        if name == "rec CER":
            ax.set_yscale("symlog", linthresh=0.01)
            ax.set_ylim(0, 1.1)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(models) :]:
        ax.axis("off")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=72)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--zoo", default="/work/zoo")
    ap.add_argument("--calib", default="/work/bench_out/calib")
    ap.add_argument("--out", default="/work/bench_peers")
    ap.add_argument("--zoo-tools", default=os.path.join(REPO, "..", "shared", "zoo"))
    ap.add_argument("--onnxtq", default=os.path.join(REPO, ".venv", "bin", "onnxtq"))
    ap.add_argument("--nnc-python", default="/work/nncvenv/bin/python")
    ap.add_argument("--quick", action="store_true", help="2 models, fewer configs, eval images and samples")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--methods", nargs="*", help=f"peers (default: {' '.join(PEERS)})")
    ap.add_argument("--onnxtq-configs", nargs="*", dest="configs", help=f"run_zoo configs ({' '.join(ONNXTQ)})")
    ap.add_argument("--onnxtq-from", nargs="*", default=[], help="earlier run_zoo results .jsonl to take rows from")
    ap.add_argument(
        "--onnxtq-fresh", nargs="*", help="configs to compress now when no earlier row has them (default: all)"
    )
    ap.add_argument("--relatency", action="store_true", help="only re-time the models of OUT/RESULTS' rows")
    ap.add_argument("--results", default="peers.jsonl", help="file under OUT that collects the rows")
    ap.add_argument("--table", action="store_true", help="only write the table and figure from OUT/RESULTS")
    ap.add_argument("--md", help="table to write (default benchmarks/results/peers.md, peers_quick.md with --quick)")
    ap.add_argument("--png", help="figure to write (default beside --md, .png)")
    a = ap.parse_args()
    mode = QUICK if a.quick else FULL
    a.models = a.models or (QUICK["models"] if a.quick else MODELS)
    if a.methods is None:
        a.methods = QUICK["methods"] if a.quick else PEERS
    if a.configs is None:
        a.configs = QUICK["onnxtq"] if a.quick else ONNXTQ
    suffix = "_quick" if a.quick else ""
    a.md = a.md or os.path.join(REPO, "benchmarks", "results", f"peers{suffix}.md")
    a.png = a.png or a.md[:-3] + ".png"
    a.eval_extra, a.ort_calib, a.sqnr, a.runs = mode["eval_extra"], mode["ort_calib"], mode["sqnr"], mode["runs"]
    os.makedirs(a.out, exist_ok=True)
    if a.relatency:
        relatency(a)
    elif not a.table:
        t0 = time.time()
        run(a)
        print(f"peers: {time.time() - t0:.0f} s", file=sys.stderr)
    rows = {}
    for line in open(os.path.join(a.out, a.results)):
        r = json.loads(line)
        rows[r["model"], r["method"]] = r  # the last row per model/method wins
    with open(a.md, "w") as f:
        f.write(HEADER.format(mode="--quick" if a.quick else "full", runs=a.runs, sqnr=a.sqnr))
        f.write("## Scoreboard: transport size and task metric\n\n" + compact(list(rows.values())))
        f.write("\n## Every row, by transport size\n" + table(list(rows.values())))
    plot(list(rows.values()), a.png)
    plot(list(rows.values()), a.png[:-4] + "_sqnr.png", against="sqnr")
    with open(a.md[:-3] + ".jsonl", "w") as f:  # the rows of the table, compact
        f.writelines(json.dumps(r) + "\n" for r in rows.values())


if __name__ == "__main__":
    main()
