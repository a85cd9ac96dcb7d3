"""The shipped real models through the whole pipeline: accuracy on held-out digits is kept,
files shrink as the bit depth says, and the emitted graph is exactly its numpy reference.

Budgets were measured when the test was written (see each comment) and set with margin, so a
change that makes compression worse fails here and has to justify a new number.
"""

import numpy as np
import onnx
import pytest
from builders import bundled, fold_dequantize, run

from onnxtq import compress

# (model, bits, block, accuracy drop allowed in points, min output SQNR dB); measured when written
# (held-out accuracy, SQNR on 8 calibration inputs, bias correction on): cnn FP32 98.0%, w8 98.0% / 47.8 dB,
# w4 97.9% / 21.7 dB, w4 block 16 97.9% / 22.0 dB, w2 block 16 96.9% / 10.9 dB (75.1% / 6.2 dB without bias
# correction); transformer FP32 97.2%, w8 97.2% / 47.0 dB, w4 block 32 97.1% / 21.7 dB.
CASES = [
    ("mnist_cnn", 8, 0, 0.3, 44.0),
    ("mnist_cnn", 4, 0, 1.0, 19.0),
    ("mnist_cnn", 4, 16, 1.0, 19.0),
    ("mnist_cnn", 2, 16, 3.0, 9.0),
    ("mnist_transformer", 8, 0, 0.3, 44.0),
    ("mnist_transformer", 4, 32, 1.0, 19.0),
    ("mnist_rnn", 8, 0, 0.3, 50.0),  # FP32 97.6%; w8 97.6% / 54.5 dB, w4 97.4% / 31.9 dB (LSTM, GRU, Gemm)
    ("mnist_rnn", 4, 0, 1.0, 28.0),
]


def _accuracy(model: onnx.ModelProto, data) -> float:
    logits = run(model, {"image": data["image"]})[0]
    return float((logits.argmax(1) == data["label"]).mean())


@pytest.mark.parametrize("name, bits, block, drop, min_sqnr", CASES)
def test_bundled_model_keeps_accuracy(tmp_path, name, bits, block, drop, min_sqnr):
    path, calib = bundled(name)
    out = tmp_path / "out.onnx"
    report = compress(path, out, f"fold-bn,calibrate,rtn{{bits={bits},block={block}}}", calib=calib)
    data = np.load(path.parent / "eval.npz")
    original, compressed = onnx.load(str(path)), onnx.load(str(out))
    base, now = _accuracy(original, data), _accuracy(compressed, data)
    assert now >= base - drop / 100, (base, now)
    assert min(v["sqnr_db"] for v in report.verification["outputs"].values()) >= min_sqnr
    # what ORT runs is the numpy reference of the stored codes
    ref = run(fold_dequantize(compressed), {"image": data["image"][:64]})[0]
    np.testing.assert_allclose(run(compressed, {"image": data["image"][:64]})[0], ref, rtol=1e-4, atol=1e-4)
    # every weight the report says it quantized is gone from the float initializers
    quantized = {r.name for r in report.passes[-1].changed}
    assert quantized and not quantized & {t.name for t in compressed.graph.initializer}
    weight_bytes = sum(r.bytes_before for r in report.passes[-1].changed)
    stored = sum(r.bytes_after for r in report.passes[-1].changed)
    side_bits = (32 + bits) / block + 0.5 if block else 2  # a float32 step (and zero point) per group
    assert stored < weight_bytes * (bits + side_bits) / 32  # packed codes plus side information
