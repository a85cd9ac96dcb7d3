"""dequantize-at-load: the rewritten weights are DequantizeLinear's values exactly, onnxruntime folds
them into float initializers when it loads the session, and QDQ pairs it would run as int8 stay."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import bundled, dequantize_cases, dequantize_model, run
from onnx import TensorProto, helper
from onnxtq.passes import DequantizeAtLoadPass

from onnxtq import compress, model_io
from onnxtq.graph import Graph
from onnxtq.pass_infra import Context

CODES = {TensorProto.INT2, TensorProto.UINT2, TensorProto.INT4, TensorProto.UINT4, TensorProto.INT8, TensorProto.UINT8}
DEQUANTIZING = {"DequantizeLinear", "Cast", "Sub", "Expand", "MatMulNBits"}


def _optimized(model: onnx.ModelProto, path) -> onnx.ModelProto:
    """The graph onnxruntime runs, with its default session options."""
    options = model_io.session_options(exact=False)
    options.optimized_model_filepath = str(path)
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(path))


@pytest.mark.parametrize(
    ("name", "spec"),
    [
        ("mnist_cnn", "rtn{bits=4}"),
        ("mnist_cnn", "ecsq{rate=4}"),  # per-tensor steps, and escaped codes written over the weight
        ("mnist_transformer", "rtn{bits=4,block=32,symmetric=false,scale_bits=16}"),
    ],
)
def test_compressed_model_computes_the_same_and_runs_on_float_weights(tmp_path, name, spec):
    path, calib = bundled(name)
    plain, folded = tmp_path / "plain.onnx", tmp_path / "folded.onnx"
    compress(path, plain, f"fold-bn,calibrate,{spec}", calib=calib)
    report = compress(path, folded, f"fold-bn,calibrate,{spec},dequantize-at-load", calib=calib)
    a, b = onnx.load(str(plain)), onnx.load(str(folded))
    onnx.checker.check_model(b, full_check=True)
    rewritten = sum(n.op_type == "DequantizeLinear" for n in a.graph.node)
    assert rewritten > 0 and not any(n.op_type == "DequantizeLinear" for n in b.graph.node)
    assert report.passes[-1].notes[0].startswith(f"{rewritten} DequantizeLinear weights now fold at load")
    added = folded.stat().st_size - plain.stat().st_size
    assert 0 < added < 1000 * rewritten  # the codes stay what is stored: a few tagged nodes per weight are added
    image = np.load(path.parent / "eval.npz")["image"][:32]
    np.testing.assert_allclose(run(b, {"image": image})[0], run(a, {"image": image})[0], rtol=1e-5, atol=1e-5)
    # onnxruntime, default options: the codes became float weights at load, nothing dequantizes per run
    optimized = _optimized(b, tmp_path / "optimized.onnx")
    assert CODES.intersection(t.data_type for t in a.graph.initializer)
    assert not CODES.intersection(t.data_type for t in optimized.graph.initializer)
    assert not any(n.op_type in DEQUANTIZING for n in optimized.graph.node)


@pytest.mark.parametrize("case", list(dequantize_cases(np.random.default_rng(0))))
def test_rewrite_gives_dequantize_linear_values_exactly(case):
    codes, scale, zero_point, attrs = dequantize_cases(np.random.default_rng(0))[case]
    model = dequantize_model(codes, scale, zero_point, **attrs)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    ctx = Context(Graph(rewritten))
    notes = DequantizeAtLoadPass().run(ctx).notes
    assert notes[0].startswith("1 DequantizeLinear weights now fold at load")
    onnx.checker.check_model(ctx.graph.proto(), full_check=True)
    assert "DequantizeLinear" not in {n.op_type for n in ctx.graph.proto().graph.node}
    dtype = np.float16 if model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16 else np.float32
    x = np.zeros(list(codes.dims), dtype)
    np.testing.assert_array_equal(run(ctx.graph.proto(), {"x": x})[0], run(model, {"x": x})[0])


def test_dequantize_beside_a_quantized_activation_stays():
    """A QDQ pair (activation and weight dequantized into one MatMul) is what onnxruntime runs as int8."""
    rng = np.random.default_rng(1)
    inits = [
        helper.make_tensor("q", TensorProto.INT8, [4, 3], rng.integers(-128, 128, size=12).tolist()),
        helper.make_tensor("s", TensorProto.FLOAT, [], [0.02]),
        helper.make_tensor("xs", TensorProto.FLOAT, [], [0.05]),
        helper.make_tensor("xz", TensorProto.INT8, [], [0]),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
        helper.make_node("DequantizeLinear", ["q", "s"], ["w"]),
        helper.make_node("MatMul", ["xd", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    ctx = Context(Graph(model))
    notes = DequantizeAtLoadPass().run(ctx).notes
    assert notes[0].endswith("1 kept beside quantized activations")
    assert [n.op_type for n in ctx.graph.proto().graph.node].count("DequantizeLinear") == 2
