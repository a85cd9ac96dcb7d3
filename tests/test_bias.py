"""Bias correction: after quantization the layer's mean output error over the calibration
data is zero (it is not without correction), for Conv with and without a bias, depthwise
Conv with padding, Gemm and MatMul+Add; layers it cannot correct say why. A bias goes float16 only
where its bytes are worth more than its rounding error, and onnxruntime then adds the rounded bias."""

import numpy as np
import onnx
import pytest
from builders import make_model, matmul_model, run
from onnx import TensorProto, helper, numpy_helper

from onnxtq import bias as bias_module
from onnxtq.bias import half_bias
from onnxtq.calibration.data import NpzSource, model_inputs
from onnxtq.graph import Graph
from onnxtq.pass_infra import Context
from onnxtq.pipeline import parse
from onnxtq.weights import discover


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


def _gemm_with_bias(rng):
    model = _gemm_model(rng)
    model.graph.initializer.append(numpy_helper.from_array((rng.standard_normal(12) * 40).astype(np.float32), "b"))
    model.graph.node[0].input.append("b")
    return model


@pytest.mark.parametrize(
    "make, shape, bias",
    [
        (lambda rng: _conv_model(rng, group=1, bias=True), (4, 8, 10, 10), "b"),
        (_gemm_with_bias, (4, 16), "b"),
        (lambda rng: matmul_model(), (4, 5, 64), "b"),
    ],
)
def test_a_bias_goes_float16_only_where_its_bytes_are_worth_more_than_its_error(rng, monkeypatch, make, shape, bias):
    """half_bias: onnxruntime then adds the bias rounded to float16 (through a Cast it folds at load), and only
    where ‖b − b̂‖² (times Gemm's beta) is less than the price of a bit times the bits saved net of the Cast
    (these biases are too short to pay for a Cast, until it is free)."""
    model = make(rng)
    graph = Graph(onnx.load_from_string(model.SerializeToString()))
    site = discover(graph).sites[0]
    assert half_bias(graph, next(iter(graph.initializers[site.name].uses())).node, site, 1e30, "test") == 0
    monkeypatch.setattr(bias_module, "CAST_BYTES", 0)
    b = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == bias)).astype(np.float64)
    beta = 0.5 if model.graph.node[0].op_type == "Gemm" else 1.0
    price = float((((b.astype(np.float16) - b) * beta) ** 2).sum()) / (16 * b.size)  # the error per bit saved
    x = rng.standard_normal(shape).astype(np.float32)
    for paid, saved in ((0.99 * price, 0), (1.01 * price, 2 * b.size)):
        graph = Graph(onnx.load_from_string(model.SerializeToString()))
        site = discover(graph).sites[0]
        node = next(iter(graph.initializers[site.name].uses())).node
        assert half_bias(graph, node, site, paid, "test") == saved
        out = graph.proto()
        onnx.checker.check_model(out, full_check=True)
        stored = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
        assert [a.dtype for n, a in stored.items() if n.startswith(bias)] == [np.float16 if saved else np.float32]
        rounded = onnx.load_from_string(model.SerializeToString())
        for t in rounded.graph.initializer:
            if t.name == bias and saved:
                t.CopyFrom(numpy_helper.from_array(b.astype(np.float16).astype(np.float32), bias))
        np.testing.assert_array_equal(run(out, {"x": x})[0], run(rounded, {"x": x})[0])
