"""rtn: what onnxruntime computes from the emitted file is exactly the numpy reference,
codes are stored packed, and the report accounts for every weight."""

import numpy as np
import onnx
import pytest
from builders import conv_model, fold_dequantize, make_model, matmul_model, run
from onnx import helper

from onnxtq.calibration.data import NpzSource, model_inputs
from onnxtq.graph import Graph, provenance
from onnxtq.pass_infra import Context
from onnxtq.pipeline import parse


def _compress(model, pipeline, data=None):
    ctx = Context(Graph(model), data)
    reports = parse(pipeline).run(ctx)
    return ctx.graph.proto(), reports


def _data(tmp_path, model, x):
    np.savez(tmp_path / "c.npz", x=x)
    return NpzSource(tmp_path / "c.npz", model_inputs(model))


@pytest.mark.parametrize(
    "bits, block, scale_bits, opset",
    [
        (8, 0, 32, 13),
        (4, 0, 32, 21),
        (4, 4, 32, 21),
        (3, 0, 32, 21),
        (2, 0, 32, 25),
        (2, 2, 32, 25),
        (4, 4, 16, 23),
        (8, 0, 16, 23),
    ],
)
def test_emitted_model_matches_numpy_reference(tmp_path, rng, bits, block, scale_bits, opset):
    model = conv_model(c_in=8, c_out=8, pads=[1, 1, 1, 1])
    x = rng.standard_normal((4, 8, 10, 10)).astype(np.float32)
    out, reports = _compress(
        model,
        f"fold-bn,calibrate,rtn{{bits={bits},block={block},scale_bits={scale_bits},min_elements=0}}",
        _data(tmp_path, model, x),
    )
    onnx.checker.check_model(out, full_check=True)
    assert Graph(out).opset() == max(17, opset)  # upgraded only when the container needs it
    got = run(out, {"x": x})[0]
    ref = run(fold_dequantize(out), {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 2 and all(provenance(n) == {"onnxtq.pass": "rtn", "onnxtq.role": "dequant"} for n in dq)
    quantized = reports[-1].changed
    assert {r.name for r in quantized} == {"w", "fc_w"}
    for r in quantized:
        codes = next(t for t in out.graph.initializer if t.name == f"{r.name}/onnxtq.q")
        container = {2: 2, 3: 4, 4: 4, 8: 8}[bits]
        assert len(codes.raw_data) == -(-int(np.prod(r.shape)) * container // 8)
        assert r.bytes_after < r.bytes_before and r.weight_sqnr_db > 0 and r.output_sqnr_db is not None


def test_more_bits_less_error(tmp_path, rng):
    model = conv_model(c_in=8, c_out=16)
    x = rng.standard_normal((4, 8, 10, 10)).astype(np.float32)
    ref = run(model, {"x": x})[0]
    errors = []
    for bits in (2, 4, 8):
        out, _ = _compress(model, f"fold-bn,rtn{{bits={bits},min_elements=0}}")
        errors.append(np.abs(run(out, {"x": x})[0] - ref).mean())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.01 * np.abs(ref).mean()


def test_matmul_exact_session_keeps_fp32_numerics(rng):
    """Default ORT fuses DequantizeLinear→MatMul into MatMulNBits with int8 activations;
    onnxtq's sessions pin accuracy_level 0 so the output equals the numpy reference."""
    model = matmul_model()
    out, reports = _compress(model, "rtn{bits=4,block=32,min_elements=0}")
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    ref = run(fold_dequantize(out), {"x": x})[0]
    exact = run(out, {"x": x}, exact=True)[0]
    default = run(out, {"x": x}, exact=False)[0]
    np.testing.assert_allclose(exact, ref, rtol=1e-5, atol=1e-5)
    assert np.abs(default - ref).max() >= np.abs(exact - ref).max()
    assert reports[-1].changed[0].kind == "matmul"


def test_matmul_weights_keep_float32_steps_so_onnxruntime_loads_them(rng):
    """With float16 steps ORT's MatMulNBits fusion builds a node it then rejects at load."""
    model = matmul_model()
    out, reports = _compress(model, "rtn{bits=4,block=32,scale_bits=16,min_elements=0}")
    scales = [t for t in out.graph.initializer if t.name.endswith("onnxtq.scale")]
    assert [t.data_type for t in scales] == [onnx.TensorProto.FLOAT]
    assert any("float32 steps kept for 1 MatMul" in n for n in reports[-1].notes)
    x = rng.standard_normal((2, 5, 64)).astype(np.float32)
    ref = run(fold_dequantize(out), {"x": x})[0]
    np.testing.assert_allclose(run(out, {"x": x}, exact=False)[0], ref, rtol=0.05, atol=0.05 * np.abs(ref).max())


def test_a_shared_weight_is_coded_once_and_a_computed_one_left():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 8)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["a"], name="m1"),
        helper.make_node("MatMul", ["a", "w"], ["b"], name="m2"),
        helper.make_node("Transpose", ["w2"], ["w2t"], name="t"),
        helper.make_node("MatMul", ["b", "w2t"], ["y"], name="m3"),
    ]
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 8])
    model = make_model(nodes, [x], [y], {"w": w, "w2": w})
    out, reports = _compress(model, "rtn{bits=4,min_elements=0}")
    assert [r.name for r in reports[-1].changed] == ["w"]  # w2 reaches its MatMul through a Transpose
    dq = [n for n in out.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == 1 and [n.input[1] for n in out.graph.node if n.op_type == "MatMul"][:2] == [dq[0].output[0]] * 2
    x = rng.standard_normal((2, 8)).astype(np.float32)
    ref = run(model, {"x": x})[0]
    np.testing.assert_allclose(run(out, {"x": x})[0], ref, atol=0.1 * np.abs(ref).max())
    model.graph.node.append(helper.make_node("Add", ["w", "w"], ["w_twice"], name="a"))  # read as no weight too
    _, reports = _compress(model, "rtn{bits=4,min_elements=0}")
    assert "shared by 3 consumers (Add: not a weight input)" in {r.name: r.reason for r in reports[-1].skipped}["w"]


def test_output_is_deterministic():
    a, _ = _compress(conv_model(), "fold-bn,rtn{bits=4,block=2,min_elements=0}")
    b, _ = _compress(conv_model(), "fold-bn,rtn{bits=4,block=2,min_elements=0}")
    assert a.SerializeToString() == b.SerializeToString()


def test_small_weights_stay_in_float_by_default():
    out, reports = _compress(conv_model(c_in=4, c_out=6), "fold-bn,rtn{bits=4}")
    skipped = {r.name: r.reason for r in reports[-1].skipped}
    assert skipped == {
        "w": "kept in float: 216 elements < min_elements=1024",
        "fc_w": "kept in float: 30 elements < min_elements=1024",
    }
    assert all(n.op_type != "DequantizeLinear" for n in out.graph.node)
