"""Calibration on a real model: splitting layers into memory-bounded groups changes nothing,
and the statistics of a Gemm input equal those computed from onnxruntime's own outputs."""

import numpy as np
import onnx
from builders import bundled

from onnxtq import model_io
from onnxtq.calibration import CalibrationConfig, collect, open_source
from onnxtq.compress import prepare
from onnxtq.graph import Graph
from onnxtq.weights import discover


def _setup(limit=24):
    path, calib = bundled("mnist_cnn")
    model, _ = prepare(model_io.load(path))
    return model, discover(Graph(model)).sites, open_source(calib, model, limit=limit)


def test_memory_bounded_groups_give_identical_statistics():
    model, sites, source = _setup()
    one_run = collect(model, sites, source, CalibrationConfig(batch=5))
    per_tensor = collect(model, sites, source, CalibrationConfig(batch=5, memory_mb=1))  # one tensor per run
    assert one_run.samples == per_tensor.samples == 24
    for site in sites:
        a, b = one_run.get(site), per_tensor.get(site)
        assert a.count == b.count and a.count > 0
        np.testing.assert_allclose(a.moment, b.moment, rtol=1e-12)
        np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12)


def test_gemm_statistics_match_the_runtime_activation():
    model, sites, source = _setup()
    store = collect(model, sites, source, CalibrationConfig(batch=8, samples=20))
    gemm = next(s for s in sites if s.op == "Gemm")
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    exposed.graph.output.append(onnx.helper.make_empty_tensor_value_info(gemm.activation))
    sess = model_io.session(exposed)
    rows = np.concatenate([sess.run([gemm.activation], feed)[0] for _, feed in source.batches(8)])[:20]
    stats = store.get(gemm)
    assert stats.count == 20 and stats.mode == "full"
    np.testing.assert_allclose(stats.moment[0], rows.T.astype(np.float64) @ rows / 20, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.mean[0], rows.mean(0), rtol=1e-5, atol=1e-7)
