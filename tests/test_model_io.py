"""Untrusted model files: unsafe external data and forged sizes are refused before allocation;
outputs are written atomically and never over the input."""

import numpy as np
import onnx
import pytest
from builders import conv_model, run
from onnx import external_data_helper, numpy_helper

from onnxtq import model_io
from onnxtq.errors import ModelError
from onnxtq.graph import constants_to_initializers


def _save_external(model, folder, location):
    external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location=location, size_threshold=0
    )
    path = folder / "m.onnx"
    onnx.save(model, str(path))
    return path


def test_external_data_loads(tmp_path):
    model = conv_model()
    path = _save_external(onnx.ModelProto.FromString(model.SerializeToString()), tmp_path, "weights.bin")
    loaded = model_io.load(path)
    x = np.ones((1, 4, 10, 10), np.float32)
    np.testing.assert_array_equal(run(loaded, {"x": x})[0], run(model, {"x": x})[0])


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd"])
def test_external_data_cannot_escape_folder(tmp_path, location):
    model = conv_model()
    t = model.graph.initializer[0]
    t.data_location = onnx.TensorProto.EXTERNAL
    t.ClearField("raw_data")
    t.ClearField("float_data")
    entry = t.external_data.add()
    entry.key, entry.value = "location", location
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "m.onnx"
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="outside the model's folder"):
        model_io.load(path)


def test_external_data_through_a_missing_folder_is_missing(tmp_path):
    """'sub/../w.bin' names w.bin only where 'sub' exists: the OS will not open it otherwise, so it is refused
    as missing rather than failing later (path resolution alone would have called it w.bin)."""
    path = _save_external(onnx.ModelProto.FromString(conv_model().SerializeToString()), tmp_path, "w.bin")
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        next(e for e in t.external_data if e.key == "location").value = "sub/../w.bin"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="is missing"):
        model_io.load(path)
    (tmp_path / "sub").mkdir()
    assert len(model_io.load(path).graph.initializer) == len(model.graph.initializer)


def test_truncated_external_data_refused(tmp_path):
    model = onnx.ModelProto.FromString(conv_model().SerializeToString())
    path = _save_external(model, tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 10)
    with pytest.raises(ModelError, match="runs past the end"):
        model_io.load(path)


def test_raw_data_size_mismatch_refused(tmp_path):
    model = conv_model()
    model.graph.initializer[0].dims[0] = 1000  # claims far more than it stores
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    with pytest.raises(ModelError, match="needs"):
        model_io.load(path)


def test_not_onnx_and_missing(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a model")
    with pytest.raises(ModelError):
        model_io.load(bad)
    with pytest.raises(ModelError, match="does not exist"):
        model_io.load(tmp_path / "nope.onnx")


def test_save_atomic_refuses_input_and_leaves_no_temp(tmp_path):
    model = conv_model()
    src = tmp_path / "in.onnx"
    onnx.save(model, str(src))
    before = src.read_bytes()
    with pytest.raises(ModelError, match="is the input model"):
        model_io.save_atomic(model, src, refuse=src)
    assert src.read_bytes() == before
    out = tmp_path / "out" / "o.onnx"
    n = model_io.save_atomic(model, out, refuse=src)
    assert n == out.stat().st_size and [p.name for p in out.parent.iterdir()] == ["o.onnx"]


def test_constant_nodes_become_initializers():
    model = conv_model(bn=False)
    w = model.graph.initializer[0]
    const = onnx.helper.make_node(
        "Constant", [], [w.name], value=numpy_helper.from_array(numpy_helper.to_array(w), "v")
    )
    model.graph.node.insert(0, const)
    del model.graph.initializer[0]
    assert constants_to_initializers(model) == 1
    assert w.name in {t.name for t in model.graph.initializer}
    assert all(n.op_type != "Constant" for n in model.graph.node)
    onnx.checker.check_model(model, full_check=True)
