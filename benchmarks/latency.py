"""onnxruntime CPU latency of models on one calibration input: median of repeated runs.

usage: python latency.py MODEL.onnx [MODEL.onnx ...] --calib DATA.npz [--threads 1 2] [--runs 30]
Each model is timed with default session options and with `session.disable_quant_qdq=1` (constant
DequantizeLinear weights folded to float at load: the speed of FP32, the weight memory of FP32).
Prints one JSON line per model, threads and mode.
"""

import argparse
import json
import time

import numpy as np
import onnxruntime as ort


def latency(path, feed, threads, fold, runs):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if fold:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        sess.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("models", nargs="+")
    ap.add_argument("--calib", required=True)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--runs", type=int, default=30)
    a = ap.parse_args()
    data = np.load(a.calib)
    feed = {k: data[k][:1] for k in data.files}
    for path in a.models:
        for threads in a.threads:
            for fold in (False, True):
                ms = latency(path, feed, threads, fold, a.runs)
                mode = "folded DQ" if fold else "default"
                print(json.dumps({"model": path, "threads": threads, "mode": mode, "ms": round(ms, 2)}), flush=True)


if __name__ == "__main__":
    main()
