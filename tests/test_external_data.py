"""Models whose weights live in external data: the run reads them from disk as it needs them (never into the
model proto), writes the same file as from the model in one piece, never touches the input's data, and
writes its own output's weights to OUTPUT.data on request (by itself past 2 GB)."""

import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from builders import bundled, external_copy
from onnx import external_data_helper

from onnxtq import compress, model_io
from onnxtq.cli import main
from onnxtq.compress import sweep, sweep_output
from onnxtq.graph import Graph, external_data_from

PIPELINES = ["fold-bn,calibrate,rtn{bits=4}", "fold-bn,calibrate,tq{rate=3}"]


@pytest.fixture(params=["mnist_cnn", "mnist_transformer"])
def model(request, tmp_path):
    path, calib = bundled(request.param)
    shutil.copy(calib, tmp_path / "calib.npz")
    inline = tmp_path / "inline" / path.name
    inline.parent.mkdir()
    shutil.copy(path, inline)
    return inline, external_copy(path, tmp_path / "split"), tmp_path / "calib.npz"


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_external_input_gives_the_same_file(model, tmp_path, pipeline):
    inline, split, calib = model
    data = (split.parent / "weights.bin").read_bytes()
    a = compress(inline, tmp_path / "a.onnx", pipeline, calib=calib)
    b = compress(split, tmp_path / "b.onnx", pipeline, calib=calib)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert a.verification == b.verification
    assert (split.parent / "weights.bin").read_bytes() == data  # the input's data is read, never written


def test_sweep_of_an_external_input(model, tmp_path):
    inline, split, calib = model
    pipelines = ["rtn{bits=4}", "tq{rate=3}"]
    for path, out in ((inline, tmp_path / "a"), (split, tmp_path / "b")):
        assert all(not run.error for run in sweep(path, out, pipelines, calib=calib))
    for index in range(len(pipelines)):
        a = sweep_output(inline, tmp_path / "a", index).read_bytes()
        assert a == sweep_output(split, tmp_path / "b", index).read_bytes()


def test_lazy_load_keeps_weights_on_disk(model):
    _, split, _ = model
    proto, files = model_io.load_with_files(split, lazy=True)
    assert files == [(split.parent / "weights.bin").resolve()]
    assert model_io.external_locations(proto) == {"weights.bin"}
    assert proto.ByteSize() < 4096 + os.path.getsize(split)  # headers, not weights
    with external_data_from(split.parent):
        graph = Graph(proto)
        name = next(n for n, v in graph.initializers.items() if v.const_value.nbytes > 1024)
        loaded = {t.name: t for t in onnx.load(str(split)).graph.initializer}
        np.testing.assert_array_equal(graph.array(name), onnx.numpy_helper.to_array(loaded[name]))
        feed = {
            i.name: np.zeros([d.dim_value or 1 for d in i.type.tensor_type.shape.dim], np.float32)
            for i in proto.graph.input
        }
        lazy = model_io.session(proto).run(None, feed)
        whole = ort.InferenceSession(str(split), providers=["CPUExecutionProvider"]).run(None, feed)
        for x, y in zip(lazy, whole):
            np.testing.assert_array_equal(x, y)
        read_in = onnx.ModelProto.FromString(model_io.serialize(proto))
        for x, y in zip(read_in.graph.initializer, onnx.load(str(split)).graph.initializer):
            assert x.name == y.name and x.raw_data == y.raw_data and not x.external_data
    assert all(external_data_helper.uses_external_data(t) for t in proto.graph.initializer if t.name == name)


def test_external_data_output(model, tmp_path):
    inline, split, calib = model
    one = tmp_path / "one.onnx"
    two = tmp_path / "two" / "two.onnx"
    pipeline = "fold-bn,calibrate,rtn{bits=4}"
    assert main(["-q", "compress", str(split), "-o", str(one), "--calib", str(calib), "--pipeline", pipeline]) == 0
    argv = ["-q", "compress", str(split), "-o", str(two), "--calib", str(calib), "--pipeline", pipeline]
    assert main([*argv, "--external-data"]) == 0
    data = model_io.data_file(two)
    assert data.is_file() and data.name == "two.onnx.data"
    written = onnx.load(str(two), load_external_data=False)
    moved = [t for t in written.graph.initializer if external_data_helper.uses_external_data(t)]
    assert moved and all({e.key: e.value for e in t.external_data}["location"] == data.name for t in moved)
    onnx.checker.check_model(str(two), full_check=True)
    # the same model as the one-file output, tensor for tensor
    a, b = onnx.load(str(one)), onnx.load(str(two))
    for x, y in zip(a.graph.initializer, b.graph.initializer):
        assert x.name == y.name
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(x), onnx.numpy_helper.to_array(y))
    feed = dict(np.load(calib))
    feed = {i.name: feed[i.name][:2] for i in written.graph.input}
    for path in (one, two):
        outputs = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
        if path == one:
            expected = outputs
    for x, y in zip(expected, outputs):
        np.testing.assert_array_equal(x, y)
    assert not [p for p in two.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_external_data_output_size_is_both_files(model, tmp_path):
    _, split, calib = model
    out = tmp_path / "out.onnx"
    run = compress(split, out, "fold-bn,calibrate,rtn{bits=4}", calib=calib, external_data=True)
    assert run.bytes_after == out.stat().st_size + model_io.data_file(out).stat().st_size
    assert run.bytes_before == split.stat().st_size + (split.parent / "weights.bin").stat().st_size


def test_output_data_may_not_be_the_inputs(model, capsys):
    _, split, calib = model
    # model.onnx's data would go to 'model.onnx.data': name the input's data file so, and aim the output there
    os.rename(split.parent / "weights.bin", split.parent / "w.onnx.data")
    proto = onnx.load(str(split), load_external_data=False)
    for t in proto.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "w.onnx.data"
    onnx.save(proto, str(split))
    before = (split.parent / "w.onnx.data").read_bytes()
    out = split.parent / "w.onnx"
    assert main(["-q", "compress", str(split), "-o", str(out), "--calib", str(calib), "--external-data"]) == 2
    assert "external data" in capsys.readouterr().err
    assert (split.parent / "w.onnx.data").read_bytes() == before and not out.exists()


def test_no_gain_leaves_no_files(model, tmp_path):
    inline, _, calib = model
    out = tmp_path / "out" / "out.onnx"
    argv = ["-q", "compress", str(inline), "-o", str(out), "--external-data"]
    code = main([*argv, "--pipeline", "rtn{bits=4,min_elements=100000000}"])  # every weight stays float
    assert code == 4
    assert not out.parent.exists() or not list(out.parent.iterdir())
