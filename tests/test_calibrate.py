"""Calibration on a real model: splitting layers into memory-bounded groups changes nothing,
and the statistics of a Gemm input equal those computed from onnxruntime's own outputs."""

import numpy as np
import onnx
from builders import bundled

from onnxtq import model_io, sequential
from onnxtq.calibration import CalibrationConfig, collect, collect_drift, open_source
from onnxtq.calibration.collect import _with_outputs
from onnxtq.compress import prepare
from onnxtq.graph import Graph
from onnxtq.sequential import drift_calibration
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
    store = collect(model, sites, source, CalibrationConfig(batch=8, samples=20, shrink=False))
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
    # by default: 20 rows of width 128, so the covariance is shrunk; the mean and each input's energy are kept
    shrunk = collect(model, sites, source, CalibrationConfig(batch=8, samples=20)).get(gemm)
    assert 0.05 < shrunk.shrinkage <= 1
    np.testing.assert_allclose(np.diagonal(shrunk.moment[0]), np.diagonal(stats.moment[0]), rtol=1e-12)
    np.testing.assert_array_equal(shrunk.mean, stats.mean)


def test_drift_statistics_of_an_unchanged_model_are_its_own_statistics():
    """With nothing quantized yet, x̃ = x: E[x̃ x̃ᵀ] and E[x̃ xᵀ] both equal the calibration H."""
    model, sites, source = _setup()
    config = CalibrationConfig(batch=6, samples=12, shrink=False)  # drift statistics are the sample moments
    store = collect(model, sites, source, config)
    drift = collect_drift(model, model, sites, source, config)
    for site in sites:
        own, cross = drift[site.name]
        expected = store.get(site)
        assert own.count == cross.count == expected.count > 0
        np.testing.assert_allclose(own.moment, expected.moment, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(cross.moment, expected.moment, rtol=1e-9, atol=1e-12)


def test_drift_cross_moment_sees_the_changed_model(rng):
    """After a weight changes upstream, the cross moment pairs the new inputs with the old ones."""
    model, sites, source = _setup()
    changed = onnx.ModelProto()
    changed.CopyFrom(model)
    first = next(t for t in changed.graph.initializer if t.name == sites[0].name)
    w = onnx.numpy_helper.to_array(first)
    first.CopyFrom(onnx.numpy_helper.from_array(w + rng.normal(0, 0.1, w.shape).astype(w.dtype), first.name))
    gemm = next(s for s in sites if s.op == "Gemm")
    own, cross = collect_drift(model, changed, [gemm], source, CalibrationConfig(batch=8, samples=16))[gemm.name]
    runs = []
    for m in (model, changed):
        exposed = onnx.ModelProto()
        exposed.CopyFrom(m)
        exposed.graph.output.append(onnx.helper.make_empty_tensor_value_info(gemm.activation))
        sess = model_io.session(exposed)
        runs.append(np.concatenate([sess.run([gemm.activation], f)[0] for _, f in source.batches(8)])[:16])
    x, x_new = (r.astype(np.float64) for r in runs)
    np.testing.assert_allclose(own.moment[0], x_new.T @ x_new / 16, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(cross.moment[0], x_new.T @ x / 16, rtol=1e-6, atol=1e-9)
    assert not np.allclose(cross.moment[0], x.T @ x / 16, rtol=1e-3)


def test_a_run_for_an_early_layer_holds_only_the_nodes_it_needs():
    """onnxruntime runs every node a session holds: exposing an early activation cuts the rest away."""
    model, sites, source = _setup()
    early = next(s for s in sites if s.activation not in {vi.name for vi in model.graph.input})
    cut = _with_outputs(model, [early.activation])
    assert [o.name for o in cut.graph.output] == [early.activation]
    assert 0 < len(cut.graph.node) < len(model.graph.node) and len(cut.graph.initializer) < len(model.graph.initializer)
    whole = onnx.ModelProto()
    whole.CopyFrom(model)
    whole.graph.output.append(onnx.helper.make_empty_tensor_value_info(early.activation))
    _, feed = next(iter(source.batches(4)))
    np.testing.assert_array_equal(
        model_io.session(cut.SerializeToString()).run(None, feed)[0],
        model_io.session(whole).run([early.activation], feed)[0],
    )


def test_the_drift_run_takes_fewer_large_inputs_with_more_positions_each(monkeypatch):
    _, _, source = _setup(limit=20)  # 20 digits of 28x28 values
    assert drift_calibration(source) == CalibrationConfig(samples=20, max_positions=sequential.DRIFT_POSITIONS)
    monkeypatch.setattr(sequential, "DRIFT_INPUT_VALUES", 5 * 28 * 28)  # as if each digit were a page
    assert drift_calibration(source) == CalibrationConfig(samples=5, max_positions=4 * sequential.DRIFT_POSITIONS)
