"""Real tokens only: where a model is fed an attention_mask, the held-out SQNR, the probe's network-output
error and verification leave the padded positions out, and count every other output (and every model without
a mask) as before; a MatMul's input statistics take the real tokens' rows only."""

import numpy as np
import onnx
import pytest
from builders import make_model, run
from onnx import TensorProto, helper

from onnxtq import pieces, positions
from onnxtq.calibration import CalibrationConfig, collect
from onnxtq.calibration.data import open_source
from onnxtq.gains import Probe
from onnxtq.graph import Graph
from onnxtq.target import HeldOut
from onnxtq.verify import compare
from onnxtq.weights import discover

B, T, D = 12, 6, 4


def _encoder(w: np.ndarray, pad: np.ndarray) -> onnx.ModelProto:
    """y = x·W + (1 − mask)·pad: `pad` reaches the padded positions only, W every position; `pooled` is
    laid out over the batch alone."""
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["xw"]),
        helper.make_node("Sub", ["one", "attention_mask"], ["padding"]),
        helper.make_node("Cast", ["padding"], ["padding_f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["padding_f", "last"], ["padding_u"]),
        helper.make_node("Mul", ["padding_u", "pad"], ["shift"]),
        helper.make_node("Add", ["xw", "shift"], ["y"]),
        helper.make_node("ReduceMean", ["xw"], ["pooled"], axes=[1], keepdims=0),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", T]),
    ]
    outputs = [
        helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", T, D]),
        helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", D]),
    ]
    inits = {
        "w": w.astype(np.float32),
        "pad": pad.astype(np.float32),
        "one": np.array(1, np.int64),
        "last": np.array([-1], np.int64),
    }
    return make_model(nodes, inputs, outputs, inits)


@pytest.fixture
def models(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(D, D))
    lengths = rng.integers(1, T, size=B)
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.int64)
    path = tmp_path / "calib.npz"
    np.savez(path, x=rng.normal(size=(B, T, D)).astype(np.float32), attention_mask=mask)
    original = _encoder(w, np.zeros(D))
    source = open_source(path, original)
    padding_only = _encoder(w, np.full(D, 3.0))  # differs from the original at padded positions only
    everywhere = _encoder(w + 0.01 * rng.normal(size=(D, D)), np.zeros(D))
    return original, padding_only, everywhere, source


def test_counted_positions_follow_the_mask():
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    assert positions.counted({"x": mask}, np.ones((2, 3, 5))) is None  # no mask fed
    weights = positions.counted({"attention_mask": mask}, np.ones((2, 3, 5)))
    assert weights.shape == (2, 3, 1) and weights.sum() == 3
    assert positions.counted({"attention_mask": mask}, np.ones((2, 5))) is None  # not laid out over tokens
    values = np.arange(30.0).reshape(2, 3, 5)
    assert positions.squares(values, weights) == pytest.approx(float((values[mask == 1] ** 2).sum()))
    assert positions.squares(values, None) == float((values**2).sum())


def test_held_out_sqnr_leaves_padding_out(models):
    original, padding_only, everywhere, source = models
    held = HeldOut(original, source)
    assert held.measure(padding_only).sqnr_db == float("inf")
    assert np.isfinite(held.measure(everywhere).sqnr_db)


def test_probe_error_leaves_padding_out(models):
    original, padding_only, everywhere, source = models
    probe = Probe(original, source, samples=B)
    assert probe.error(padding_only) == 0.0
    assert probe.error(everywhere) > 0.0
    # its energy is the real tokens' (y) and every pooled value's
    feed = next(iter(source.batches(B)))[1]
    y, pooled = (np.asarray(v, np.float64) for v in run(original, feed))
    real = (y**2)[feed["attention_mask"] == 1].sum() + (pooled**2).sum()
    assert probe.energy == pytest.approx(real / B)


def test_verification_leaves_padding_out(models):
    original, padding_only, everywhere, source = models
    result = compare(original, padding_only, source, samples=B)
    assert result["outputs"]["y"]["sqnr_db"] == float("inf")
    assert result["outputs"]["y"]["max_abs_err"] > 0  # the largest error is still reported, wherever it is
    assert np.isfinite(compare(original, everywhere, source, samples=B)["outputs"]["y"]["sqnr_db"])


@pytest.mark.parametrize("batch", [5, 12])
def test_statistics_take_real_tokens_only(models, batch):
    original, _, _, source = models
    (site,) = [s for s in discover(Graph(original)).sites if s.name == "w"]
    stats = collect(original, [site], source, CalibrationConfig(batch=batch, shrink=False)).get(site)
    feed = next(iter(source.batches(B)))[1]
    rows = feed["x"][feed["attention_mask"] == 1].astype(np.float64)
    assert stats.count == len(rows) < B * T
    np.testing.assert_allclose(stats.mean[0], rows.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(stats.moment[0], rows.T @ rows / len(rows), rtol=1e-6)


def test_statistics_of_a_model_run_in_pieces_take_real_tokens_only(models, monkeypatch):
    """The mask is a graph input only the first piece reads; later pieces' layers get it all the same."""
    _, _, _, source = models
    rng = np.random.default_rng(1)
    ws = {f"w{i}": rng.normal(size=(D, D)).astype(np.float32) for i in range(3)}
    nodes = [helper.make_node("MatMul", [a, w], [b]) for a, w, b in zip(["x", "a0", "a1"], ws, ["a0", "a1", "y"])]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, D]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", T]),
    ]
    chain = make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", T, D])], ws)
    monkeypatch.setattr(pieces, "PIECE_BYTES", 4 * D * D)  # a piece per MatMul
    assert len(pieces.plan(chain, {"y"})) == 3
    sites = {s.name: s for s in discover(Graph(chain)).sites}
    store = collect(chain, list(sites.values()), source, CalibrationConfig(batch=5, shrink=False))
    feed = next(iter(source.batches(B)))[1]
    a1 = feed["x"].astype(np.float64) @ ws["w0"] @ ws["w1"]  # what the last MatMul reads
    rows = a1[feed["attention_mask"] == 1]
    stats = store.get(sites["w2"])
    assert stats.count == len(rows)
    np.testing.assert_allclose(stats.moment[0], rows.T @ rows / len(rows), rtol=1e-5)
