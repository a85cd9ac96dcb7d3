"""Bias correction: after quantization the layer's mean output error over the calibration
data is zero (it is not without correction), for Conv with and without a bias, depthwise
Conv with padding, Gemm and MatMul+Add; layers it cannot correct say why."""

import numpy as np
import pytest
from builders import make_model, matmul_model, run
from onnx import TensorProto, helper

from onnxtq.calibration.data import NpzSource, model_inputs
from onnxtq.graph import Graph
from onnxtq.pass_infra import Context
from onnxtq.pipeline import parse


def _conv_model(rng, group: int, bias: bool):
    c = 8
    w = (rng.standard_normal((c, c // group, 3, 3)) * 0.3).astype(np.float32)
    inits = {"w": w}
    inputs = ["x", "w"]
    if bias:
        inits["b"] = rng.standard_normal(c).astype(np.float32)
        inputs.append("b")
    node = helper.make_node("Conv", inputs, ["y"], name="conv", group=group, pads=[1, 1, 1, 1])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 10, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 10, 10])
    return make_model([node], [x], [y], inits)


def _gemm_model(rng):
    inits = {"w": (rng.standard_normal((12, 16)) * 0.3).astype(np.float32)}
    node = helper.make_node("Gemm", ["x", "w"], ["y"], name="gemm", transB=1, beta=0.5)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])
    return make_model([node], [x], [y], inits)


def _mean_error(tmp_path, model, x, bias_correct: bool):
    """Mean over samples (and positions) of the output error, per output channel."""
    np.savez(tmp_path / "c.npz", x=x)
    ctx = Context(Graph(model), NpzSource(tmp_path / "c.npz", model_inputs(model)))
    reports = parse(f"calibrate,rtn{{bits=3,min_elements=0,bias_correct={str(bias_correct).lower()}}}").run(ctx)
    err = run(ctx.graph.proto(), {"x": x})[0] - run(model, {"x": x})[0]
    channel_axis = 1 if err.ndim == 4 else err.ndim - 1
    mean = np.moveaxis(err, channel_axis, 0).reshape(err.shape[channel_axis], -1).mean(axis=1)
    return mean, reports[-1]


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda rng: _conv_model(rng, group=1, bias=True), (16, 8, 10, 10)),
        (lambda rng: _conv_model(rng, group=1, bias=False), (16, 8, 10, 10)),
        (lambda rng: _conv_model(rng, group=8, bias=True), (16, 8, 10, 10)),
        (_gemm_model, (64, 16)),
        (lambda rng: matmul_model(), (8, 5, 64)),
    ],
)
def test_mean_output_error_is_cancelled(tmp_path, rng, make, shape):
    model = make(rng)
    x = (rng.standard_normal(shape) + 1.5).astype(np.float32)  # a large input mean, as after ReLU
    plain, _ = _mean_error(tmp_path, model, x, bias_correct=False)
    corrected, report = _mean_error(tmp_path, model, x, bias_correct=True)
    assert all(r.bias_corrected for r in report.changed)
    assert "bias corrected on 1 of 1 layers" in report.notes
    assert np.abs(plain).max() > 1e-3
    assert np.abs(corrected).max() < 1e-4 + 1e-3 * np.abs(plain).max()


def test_uncorrectable_layer_says_why(tmp_path, rng):
    w = (rng.standard_normal((16, 8)) * 0.3).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    model = make_model(nodes, [x_info], [y_info], {"w": w})
    _, report = _mean_error(tmp_path, model, rng.standard_normal((32, 16)).astype(np.float32), True)
    (record,) = report.changed
    assert not record.bias_corrected and "not read by a single Add" in record.reason
    assert "bias corrected on 0 of 1 layers (not: MatMul output" in report.notes[-1]
