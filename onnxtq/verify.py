"""Check an emitted model: onnx.checker (full), an onnxruntime session, and its outputs
against the original's on calibration inputs (SQNR and max error per output)."""

from __future__ import annotations

import numpy as np
import onnx
from tqdm import tqdm

from onnxtq import model_io
from onnxtq.calibration.data import Source
from onnxtq.graph import check_model


def compare(
    reference: onnx.ModelProto, candidate: onnx.ModelProto, source: Source, samples: int = 8, threads: int = 0
) -> dict:
    """Per output: SQNR in dB (10·log10 Σref² / Σ(ref − out)²), max |err|, over up to `samples` inputs."""
    ref = model_io.session(reference, threads)
    out = model_io.session(candidate, threads)
    names = [o.name for o in ref.get_outputs()]
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    worst = dict.fromkeys(names, 0.0)
    seen = 0
    with tqdm(total=samples, desc="verify", unit="sample", disable=None, leave=False) as bar:
        for n, feed in source.batches(1):
            if seen >= samples:
                break
            for name, a, b in zip(names, ref.run(names, feed), out.run(names, feed)):
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                signal[name] += float((a**2).sum())
                noise[name] += float(((a - b) ** 2).sum())
                worst[name] = max(worst[name], float(np.abs(a - b).max(initial=0.0)))
            seen += n
            bar.update(n)
    return {
        "samples": seen,
        "outputs": {name: {"sqnr_db": _db(signal[name], noise[name]), "max_abs_err": worst[name]} for name in names},
    }


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(max(signal, 1e-300) / noise))


def validate(model: onnx.ModelProto) -> None:
    """Full checker plus an onnxruntime session: what we emit must load in stock ORT."""
    check_model(model)
    model_io.session(model)
