"""Property: whatever malformed model or calibration file onnxtq is given, it answers with exit code
0, 2, 3 or 4 (never 1, a bug), and a failed run leaves no file behind."""

import tempfile
from pathlib import Path

import numpy as np
import onnx
from builders import conv_model
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from onnxtq.cli import main

BASE = conv_model(c_in=8, c_out=16)  # its conv weight (1,152 values) is above rtn's min_elements
PIPELINES = ["fold-bn,calibrate{samples=8},rtn{bits=4}", "rtn{bits=8}", "fold-bn,calibrate{samples=8},tq{rate=3}"]


def _tensor(model: onnx.ModelProto, draw) -> onnx.TensorProto:
    return model.graph.initializer[draw(st.integers(0, len(model.graph.initializer) - 1))]


def _dims(model, draw, folder):
    t = _tensor(model, draw)
    if t.dims:
        t.dims[draw(st.integers(0, len(t.dims) - 1))] = draw(st.sampled_from([-3, 0, 1, 7, 2**20, 2**40]))


def _dtype(model, draw, folder):
    _tensor(model, draw).data_type = draw(st.integers(0, 30))


def _raw_length(model, draw, folder):
    t = _tensor(model, draw)
    cut = draw(st.integers(0, len(t.raw_data) + 8))
    t.raw_data = (t.raw_data + b"\0" * 8)[:cut]


def _typed(model, draw, folder):
    t = _tensor(model, draw)
    n = int(np.prod(t.dims)) if t.dims else 1
    t.ClearField("raw_data")
    t.float_data.extend([0.5] * draw(st.sampled_from([0, 1, n - 1, n, n + 1])))


def _external(model, draw, folder):
    t = _tensor(model, draw)
    size = len(t.raw_data)
    (folder / "w.bin").write_bytes(t.raw_data)
    t.ClearField("raw_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    fields = {
        "location": draw(st.sampled_from(["w.bin", "", "../w.bin", "/etc/passwd", "missing.bin", "sub/../w.bin"])),
        "offset": draw(st.sampled_from([None, "0", "-100", "abc", "4", str(2**62)])),
        "length": draw(st.sampled_from([None, str(size), str(size + 1), "abc", "-1"])),
    }
    for key, value in fields.items():
        if value is not None:
            entry = t.external_data.add()
            entry.key, entry.value = key, value


def _readable(t: onnx.TensorProto) -> bool:
    """An earlier edit may have left the tensor unreadable: then there is nothing to edit further."""
    return t.data_type == onnx.TensorProto.FLOAT and len(t.raw_data) == 4 * int(np.prod(t.dims)) > 0


def _nonfinite(model, draw, folder):
    t = _tensor(model, draw)
    a = numpy_helper.to_array(t).copy() if _readable(t) else np.zeros(0)
    if a.size:
        a.flat[draw(st.integers(0, a.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
    t.CopyFrom(numpy_helper.from_array(a, t.name))


def _opset(model, draw, folder):
    model.opset_import[0].version = draw(st.integers(0, 40))


def _ir(model, draw, folder):
    model.ir_version = draw(st.integers(0, 15))


def _drop_node(model, draw, folder):
    del model.graph.node[draw(st.integers(0, len(model.graph.node) - 1))]


def _op_type(model, draw, folder):
    node = model.graph.node[draw(st.integers(0, len(model.graph.node) - 1))]
    node.op_type = draw(st.sampled_from(["Foo", "Conv", "Gemm", "MatMul", "Relu", "If"]))


def _rewire(model, draw, folder):
    node = model.graph.node[draw(st.integers(0, len(model.graph.node) - 1))]
    names = [t.name for t in model.graph.initializer] + ["x", "nowhere", ""]
    node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names))


def _attribute(model, draw, folder):
    conv = model.graph.node[0]
    del conv.attribute[:]
    conv.attribute.append(
        onnx.helper.make_attribute(
            draw(st.sampled_from(["group", "kernel_shape", "strides", "pads", "dilations"])),
            draw(st.sampled_from([0, 3, 16, [2, 2], [0, 0, 0, 0], [-1, 1], [1]])),
        )
    )


def _negative_variance(model, draw, folder):
    t = next(t for t in model.graph.initializer if t.name == "var")
    if _readable(t):
        t.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(t), "var"))


def _input_shape(model, draw, folder):
    dim = model.graph.input[0].type.tensor_type.shape.dim[draw(st.integers(1, 3))]
    dim.Clear()
    dim.dim_value = draw(st.sampled_from([1, 3, 9]))


MODEL_EDITS = [
    _dims,
    _dtype,
    _raw_length,
    _typed,
    _external,
    _nonfinite,
    _opset,
    _ir,
    _drop_node,
    _op_type,
    _rewire,
    _attribute,
    _negative_variance,
    _input_shape,
]


def _calibration(draw, path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((8, 8, 10, 10)).astype(np.float32)
    bad = ["nan", "inf", "key", "float64", "shape", "empty", "scalar", "object", "not zip", "truncated"]
    kind = draw(st.sampled_from(["good"] * len(bad) + bad))
    if kind == "nan" or kind == "inf":
        x[draw(st.integers(0, 7)), 0, 0, 0] = np.nan if kind == "nan" else np.inf
    arrays = {
        "key": {"y": x},
        "float64": {"x": x.astype(np.float64)},
        "shape": {"x": x[:, :3]},
        "empty": {"x": x[:0]},
        "scalar": {"x": np.float32(1.0)},
        "object": {"x": np.array([None, 1], dtype=object)},
    }.get(kind, {"x": x})
    if kind == "not zip":
        path.write_bytes(b"not a zip file at all")
        return
    np.savez(path, **arrays)
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: draw(st.integers(0, len(data) - 1))])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_malformed_input_is_never_a_bug_and_leaves_nothing(data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model = onnx.ModelProto()
        model.CopyFrom(BASE)
        edits = st.lists(st.sampled_from(MODEL_EDITS), min_size=1, max_size=2) | st.just([])
        for edit in data.draw(edits, label="edits"):
            edit(model, data.draw, folder)
        blob = model.SerializeToString()
        if data.draw(st.integers(0, 4), label="damage the bytes") == 0:
            cut = data.draw(st.integers(0, len(blob)))
            blob = blob[:cut] + bytes(b ^ 0x5A for b in blob[cut : cut + 4]) + blob[cut + 4 :]
        (folder / "m.onnx").write_bytes(blob)
        _calibration(data.draw, folder / "calib.npz")
        before = sorted(p.name for p in folder.iterdir())
        pipeline = data.draw(st.sampled_from(PIPELINES), label="pipeline")
        argv = ["compress", str(folder / "m.onnx"), "-o", str(folder / "out.onnx"), "--pipeline", pipeline]
        code = main([*argv, "--report", str(folder / "r.json")])
        event(f"exit {code}")
        assert code in (0, 2, 3, 4)
        after = sorted(p.name for p in folder.iterdir())
        assert after == (sorted([*before, "out.onnx", "r.json"]) if code == 0 else before)
