"""Test builders: small graphs made in code, the real models shipped in models/, an ORT runner."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from onnxtq import model_io
from onnxtq.calibration.data import open_source
from onnxtq.compress import prepare
from onnxtq.graph import Graph
from onnxtq.pass_infra import Context
from onnxtq.pipeline import parse
from onnxtq.weights import WeightSite

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def make_model(nodes, inputs, outputs, initializers, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "test", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in initializers.items()]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_model(c_in=4, c_out=6, k=3, group=1, seed=0, bn=True, **conv_attrs) -> onnx.ModelProto:
    """x → Conv(+bias) → BatchNormalization → Relu → Gemm(transB=1): a small but complete CNN."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((c_out, c_in // group, k, k)).astype(np.float32) * 0.3
    inits = {"w": w, "b": rng.standard_normal(c_out).astype(np.float32)}
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["conv"], name="conv", group=group, **conv_attrs)]
    act = "conv"
    if bn:
        inits.update(
            gamma=rng.uniform(0.5, 2, c_out).astype(np.float32),
            beta=rng.standard_normal(c_out).astype(np.float32),
            mean=rng.standard_normal(c_out).astype(np.float32),
            var=rng.uniform(0.5, 2, c_out).astype(np.float32),
        )
        nodes.append(
            helper.make_node("BatchNormalization", ["conv", "gamma", "beta", "mean", "var"], ["bn"], name="bn")
        )
        act = "bn"
    nodes += [
        helper.make_node("Relu", [act], ["relu"], name="relu"),
        helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["y"], name="fc", transB=1),
    ]
    inits["fc_w"] = rng.standard_normal((5, c_out)).astype(np.float32)
    inits["fc_b"] = np.zeros(5, np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, 10, 10])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])
    return make_model(nodes, [x], [y], inits)


def run(model: onnx.ModelProto, feeds: dict, exact: bool = True) -> list[np.ndarray]:
    return model_io.session(model, exact=exact).run(None, feeds)


def external_copy(model_path, folder: Path, location: str = "weights.bin") -> Path:
    """The model saved to `folder` with every tensor over 1 kB in one external file."""
    folder.mkdir(exist_ok=True)
    model = onnx.load(str(model_path))
    external_data_helper.convert_model_to_external_data(model, location=location, size_threshold=1024)
    path = folder / "model.onnx"
    onnx.save(model, str(path))
    return path


def bundled(name: str) -> tuple[Path, Path]:
    """Path of a shipped model and of its calibration data."""
    folder = MODELS / name
    return folder / f"{name}.onnx", folder / "calib.npz"


@contextlib.contextmanager
def calibrated_context(name: str, samples: int = 32) -> Iterator:
    """A shipped model folded and calibrated on its first `samples` inputs, as the Context a pass is given."""
    path, calib = bundled(name)
    model = model_io.load(path)
    source = open_source(calib, model, limit=samples)
    ctx = Context(Graph(prepare(model)[0]), source)
    parse("fold-bn,calibrate").run(ctx)
    try:
        yield ctx
    finally:
        source.close()


def matmul_model(d=64, n=48, seed=0) -> onnx.ModelProto:
    """x[N,T,d] → MatMul(W) → Add(b) → Gather-free transformer-ish projection."""
    rng = np.random.default_rng(seed)
    inits = {
        "w": (rng.standard_normal((d, n)) / np.sqrt(d)).astype(np.float32),
        "b": rng.standard_normal(n).astype(np.float32),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "b"], ["y"], name="add"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "T", d])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "T", n])
    return make_model(nodes, [x], [y], inits)


def matmul_site(inputs: int, outputs: int) -> WeightSite:
    """The site of a MatMul weight [inputs, outputs] named "w", for codec work on a layer without a graph."""
    return WeightSite("w", "mm", "MatMul", "matmul", (inputs, outputs), True, None, None, False)


def fold_dequantize(model: onnx.ModelProto) -> onnx.ModelProto:
    """Numpy reference: replace every DequantizeLinear by the float tensor it computes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    for node in [n for n in out.graph.node if n.op_type == "DequantizeLinear"]:
        q = inits[node.input[0]].astype(np.float64)
        scale = inits[node.input[1]].astype(np.float64)
        zp = inits[node.input[2]].astype(np.float64) if len(node.input) > 2 else np.zeros_like(scale)
        attrs = {a.name: a.i for a in node.attribute}
        axis, block = attrs.get("axis", 1), attrs.get("block_size", 0)
        if block:
            scale, zp = (np.repeat(a, block, axis=axis)[tuple(slice(0, s) for s in q.shape)] for a in (scale, zp))
        else:
            view = [1] * q.ndim
            view[axis] = -1
            scale, zp = scale.reshape(view), zp.reshape(view)
        out.graph.initializer.append(
            numpy_helper.from_array(((q - zp) * scale).astype(np.float32), node.output[0])
        )  # fp32 weights
        out.graph.node.remove(node)
    return out


def if_model(rows: int = 64) -> onnx.ModelProto:
    """y = If(sum(x) > 0, x·W1, x·W2): every weight sits inside a branch."""
    rng = np.random.default_rng(0)

    def branch(name):
        w = numpy_helper.from_array(rng.standard_normal((rows, 32)).astype(np.float32), f"{name}_w")
        out = helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, ["N", 32])
        return helper.make_graph([helper.make_node("MatMul", ["x", w.name], [out.name])], name, [], [out], [w])

    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch("then"), else_branch=branch("else")),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", rows])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32])
    return make_model(nodes, [x], [y], {"zero": np.zeros((), np.float32)})


def dequantize_model(codes, scale, zero_point=None, **attrs) -> onnx.ModelProto:
    """y = x + DequantizeLinear(codes, scale, zero_point): the weight itself, readable exactly."""
    inits = [codes, scale] + ([zero_point] if zero_point is not None else [])
    out_type = attrs.get("output_dtype") or scale.data_type
    nodes = [
        helper.make_node("DequantizeLinear", [t.name for t in inits], ["w"], name="dq", **attrs),
        helper.make_node("Add", ["x", "w"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "dq",
        [helper.make_tensor_value_info("x", out_type, list(codes.dims))],
        [helper.make_tensor_value_info("y", out_type, list(codes.dims))],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])  # INT2 codes
    model.ir_version = 12
    onnx.checker.check_model(model, full_check=True)
    return model


def dequantize_cases(rng) -> dict:
    """Code tensors of every type and layout DequantizeLinear reads: (codes, scale, zero point, attributes)."""

    def ints(name, dtype, shape, low, high):
        return helper.make_tensor(name, dtype, shape, rng.integers(low, high, size=shape).ravel().tolist())

    def floats(name, shape, dtype=TensorProto.FLOAT):
        return helper.make_tensor(name, dtype, shape, rng.uniform(0.01, 0.1, size=shape).ravel().tolist())

    return {
        "per tensor, zero point": (
            ints("q", TensorProto.UINT8, [6, 10], 0, 256),
            floats("s", []),
            ints("z", TensorProto.UINT8, [], 100, 140),
            {},
        ),
        "per axis 0": (ints("q", TensorProto.INT8, [6, 10, 3], -128, 128), floats("s", [6]), None, {"axis": 0}),
        "per axis 1, int4": (ints("q", TensorProto.INT4, [6, 10], -8, 8), floats("s", [10]), None, {"axis": 1}),
        "blocks cut at the end": (
            ints("q", TensorProto.UINT4, [10, 6], 0, 16),
            floats("s", [3, 6]),
            ints("z", TensorProto.UINT4, [3, 6], 0, 16),
            {"axis": 0, "block_size": 4},
        ),
        "blocks on the last axis": (
            ints("q", TensorProto.INT2, [5, 8], -2, 2),
            floats("s", [5, 2]),
            None,
            {"axis": 1, "block_size": 4},
        ),
        "float16 steps, float output": (
            ints("q", TensorProto.INT8, [6, 10], -128, 128),
            floats("s", [6], TensorProto.FLOAT16),
            None,
            {"axis": 0, "output_dtype": 1},
        ),
        "float16 steps and output": (
            ints("q", TensorProto.INT8, [6, 10], -128, 128),
            floats("s", [10], TensorProto.FLOAT16),
            None,
            {"axis": 1},
        ),
    }


def past_progress(err: str) -> str:
    """stderr without the CLI's progress lines ("onnxtq [time, peak] stage"): the error and its hint."""
    return "".join(line for line in err.splitlines(True) if not line.startswith("onnxtq ["))
