"""What a careless user gives onnxtq, each case with its exit code and message (issue 13's table).

Every case here wrote a broken model with exit code 0, overwrote an input, or died with a
traceback (exit 1) at e590571.
"""

import os
import re
import shutil
import tempfile

import numpy as np
import onnx
import pytest
from builders import bundled, if_model, make_model, past_progress, run
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from onnxtq.cli import main
from onnxtq.pass_infra import PassManager


@pytest.fixture
def cnn(tmp_path):
    """The bundled CNN and its calibration data in a folder of their own: (model, calib)."""
    path, calib = bundled("mnist_cnn")
    shutil.copy(path, tmp_path / "m.onnx")
    shutil.copy(calib, tmp_path / "calib.npz")
    return tmp_path / "m.onnx", tmp_path / "calib.npz"


def _fails(argv, code, message, capsys):
    assert main([str(a) for a in argv]) == code
    err = past_progress(capsys.readouterr().err)
    assert message in err, err
    assert "Traceback" not in err and err.startswith("onnxtq: error:") and "\nonnxtq: hint: " in err
    return err


def _set_weight(model_path, name, edit):
    model = onnx.load(str(model_path))
    t = next(t for t in model.graph.initializer if t.name == name)
    a = numpy_helper.to_array(t).copy()
    edit(a)
    t.CopyFrom(numpy_helper.from_array(a, name))
    onnx.save(model, str(model_path))


# --- NaN and Inf ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_one_nonfinite_pixel_in_calibration_is_bad_data(cnn, tmp_path, capsys, value):
    model, calib = cnn
    images = np.load(calib)["image"].copy()
    images[3, 0, 5, 5] = value
    np.savez(calib, image=images)
    out = tmp_path / "o.onnx"
    err = _fails(["compress", model, "-o", out], 2, "input 'image' holds 1 NaN/Inf value(s)", capsys)
    assert "sample 3 at index [0, 5, 5]" in err
    assert not out.exists()


def test_nonfinite_weight_is_refused_or_kept_as_it_is(cnn, tmp_path, capsys):
    model, calib = cnn
    _set_weight(model, "head.0.weight", lambda a: a.__setitem__((3, 4), np.nan))
    out = tmp_path / "o.onnx"
    _fails(["compress", model, "-o", out], 2, "'head.0.weight' holds 1 NaN/Inf value(s), the first at [3, 4]", capsys)
    # kept, the NaN reaches every output: no statistic is computed from such a model
    _fails(["compress", model, "-o", out, "--keep-nonfinite"], 2, "output 'logits' holds 10 NaN/Inf", capsys)
    assert not out.exists()
    # without calibration the weight is left in float, the others quantized
    calib.unlink()
    report = tmp_path / "r.json"
    args = ["compress", model, "-o", out, "--keep-nonfinite", "--pipeline", "rtn{bits=8}", "--report", report]
    assert main([str(a) for a in args]) == 0
    kept = onnx.load(str(out))
    assert np.isnan(numpy_helper.to_array(next(t for t in kept.graph.initializer if t.name == "head.0.weight"))).sum()
    assert "head.0.weight': holds 1 NaN/Inf" not in capsys.readouterr().err
    assert '"reason": "holds 1 NaN/Inf value(s), the first at [3, 4]: left as it is"' in report.read_text()


def test_verify_fails_nan_outputs_under_any_budget(cnn, tmp_path, capsys):
    model, calib = cnn
    broken = tmp_path / "broken.onnx"
    shutil.copy(model, broken)
    _set_weight(broken, "head.2.weight", lambda a: a.__setitem__((0, 0), np.nan))  # logit 0 is NaN
    assert main(["verify", str(model), str(broken), "--min-sqnr", "20"]) == 3
    captured = capsys.readouterr()
    assert "output logits: 32 of 320 values are NaN/Inf" in captured.out and "max |err| 0" not in captured.out
    assert "holds 32 NaN/Inf of 320 values" in captured.err
    assert main(["verify", str(model), str(broken)]) == 3  # no budget: NaN still fails


def _poison_rtn(monkeypatch, edit):
    """rtn as it is, then `edit(graph)`: a stand-in for a bug in a pass."""
    from onnxtq.passes import RtnPass

    real_run = RtnPass.run

    def poisoned(self, ctx):
        report = real_run(self, ctx)
        edit(ctx.graph)
        return report

    monkeypatch.setattr(RtnPass, "run", poisoned)


def _divide_logits_by_zero(graph):
    logits = graph.graph.outputs[0]
    zero = graph.set_initializer(numpy_helper.from_array(np.zeros((), np.float32), "zero"))
    div = graph.node("Div", [logits, zero], ["divided"])
    graph.graph.append(div)
    div.outputs[0].type, div.outputs[0].shape = logits.type, logits.shape  # a graph output is typed
    graph.graph.outputs[0] = div.outputs[0]
    logits.name, div.outputs[0].name = "logits_before", "logits"


@pytest.mark.parametrize("budget", [[], ["--min-sqnr", "20"]])
def test_compress_never_writes_a_model_that_outputs_nan(cnn, tmp_path, capsys, monkeypatch, budget):
    """Verification stops a model whose outputs are NaN/Inf, with or without a budget."""
    _poison_rtn(monkeypatch, _divide_logits_by_zero)
    model, _ = cnn
    out = tmp_path / "o.onnx"
    _fails(["compress", model, "-o", out, *budget], 3, "output 'logits' holds 80 NaN/Inf of 80 values", capsys)
    assert not out.exists()


def test_compress_never_writes_nonfinite_constants(cnn, tmp_path, capsys, monkeypatch):
    """Without calibration data nothing runs the output: its new constants are checked instead."""

    def nan_bias(graph):
        graph.set_initializer(numpy_helper.from_array(np.full(10, np.nan, np.float32), "head.2.bias"))

    _poison_rtn(monkeypatch, nan_bias)
    model, calib = cnn
    calib.unlink()
    out = tmp_path / "o.onnx"
    _fails(["compress", model, "-o", out, "--pipeline", "rtn{bits=8}"], 3, "['head.2.bias'] hold NaN/Inf", capsys)
    assert not out.exists()


# --- paths ----------------------------------------------------------------------------------------------


def _same_file_as(target, tmp_path, how):
    if how == "same path":
        return target
    alias = tmp_path / f"alias.{how}"
    (os.symlink if how == "symlink" else os.link)(target, alias)
    return alias


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
@pytest.mark.parametrize("victim", ["model", "calib"])
@pytest.mark.parametrize("command", ["compress", "sweep"])
def test_report_is_never_written_over_an_input(cnn, tmp_path, capsys, monkeypatch, how, victim, command):
    model, calib = cnn
    target = model if victim == "model" else calib
    before = target.read_bytes()
    report = _same_file_as(target, tmp_path, how)
    monkeypatch.setattr(PassManager, "run", lambda *a: pytest.fail("refused only after work"))
    if command == "compress":
        argv = ["compress", model, "-o", tmp_path / "o.onnx", "--report", report]
    else:
        argv = ["sweep", model, "-o", tmp_path / "out", "--pipelines", "rtn{bits=4}", "--report", report]
    what = "the input model" if victim == "model" else "the calibration data"
    _fails(argv, 2, f"--report '{report}' is {what}", capsys)
    assert target.read_bytes() == before


def test_outputs_may_not_collide(cnn, tmp_path, capsys, monkeypatch):
    model, _ = cnn
    monkeypatch.setattr(PassManager, "run", lambda *a: pytest.fail("refused only after work"))
    out = tmp_path / "o.onnx"
    _fails(["compress", model, "-o", out, "--report", out], 2, "names the same file as the output", capsys)
    sweep_model = tmp_path / "out" / "m.0.onnx"  # what sweep names its first pipeline's model
    argv = ["sweep", model, "-o", tmp_path / "out", "--pipelines", "rtn{bits=4}", "--report-html", sweep_model]
    _fails(argv, 2, "names the same file as pipeline 1's output", capsys)
    _fails(["compress", model, "-o", model], 2, "the output '", capsys)
    assert not out.exists() and not (tmp_path / "out").exists()


def test_output_inside_an_image_folder_is_refused(cnn, tmp_path, capsys):
    model, _ = cnn
    images = tmp_path / "images"
    images.mkdir()
    argv = ["compress", model, "-o", images / "o.onnx", "--calib", images]
    _fails(argv, 2, "inside the folder of the calibration", capsys)


def test_unwritable_output_folder_is_bad_usage(cnn, tmp_path, capsys, monkeypatch):
    model, _ = cnn
    monkeypatch.setattr(PassManager, "run", lambda *a: pytest.fail("refused only after work"))
    if os.geteuid() == 0:  # root writes anywhere: make the folder refuse as a read-only one would

        def read_only(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    _fails(["compress", model, "-o", folder / "o.onnx"], 2, "Permission denied", capsys)
    _fails(["compress", model, "-o", model / "o.onnx"], 2, "is a file, not a folder", capsys)


def test_failed_write_leaves_nothing_behind(cnn, tmp_path, capsys, monkeypatch):
    """A write that fails half way (disk full) is exit 2 and removes its temporary file."""
    model, _ = cnn
    real_replace = os.replace

    def disk_full(src, dst):
        if str(dst).endswith("o.onnx"):
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", disk_full)
    _fails(["compress", model, "-o", tmp_path / "o.onnx"], 2, "No space left on device", capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "m.onnx"]


# --- bad model files --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "message"), [("-100", "offset '-100'"), ("abc", "offset 'abc'")])
def test_bad_external_data_offset(cnn, tmp_path, capsys, offset, message):
    model, _ = cnn
    proto = onnx.load(str(model))
    external_data_helper.convert_model_to_external_data(proto, location="w.bin", size_threshold=0)
    onnx.save(proto, str(model))
    proto = onnx.load(str(model), load_external_data=False)
    entries = proto.graph.initializer[0].external_data
    entry = next((e for e in entries if e.key == "offset"), None) or entries.add()
    entry.key, entry.value = "offset", offset
    onnx.save(proto, str(model))
    _fails(["compress", model, "-o", tmp_path / "o.onnx"], 2, message, capsys)


def test_typed_data_must_match_the_shape(cnn, tmp_path, capsys):
    model, _ = cnn
    proto = onnx.load(str(model))
    t = proto.graph.initializer[0]
    values = numpy_helper.to_array(t).ravel()[:10].tolist()
    t.ClearField("raw_data")
    t.float_data.extend(values)
    onnx.save(proto, str(model))
    _fails(["compress", model, "-o", tmp_path / "o.onnx"], 2, "holds 10 float_data values but its shape", capsys)


def test_a_folder_is_not_a_model(tmp_path, capsys):
    _fails(["compress", tmp_path, "-o", tmp_path / "o.onnx"], 2, "is a folder, not a model file", capsys)
    _fails(["inspect", tmp_path], 2, "is a folder", capsys)


# --- nothing to gain --------------------------------------------------------------------------------------


def test_weights_only_inside_branches_are_reached(tmp_path, capsys):
    """(Before 18 this model gave "0 quantizable weights" and exit 4: its weights all sit in If branches.)"""
    path = tmp_path / "if.onnx"
    onnx.save(if_model(), str(path))
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).standard_normal((16, 64)).astype(np.float32))
    out = tmp_path / "o.onnx"
    for pipeline in ("fold-bn,calibrate,tq{rate=3}", "fold-bn,calibrate,rtn{bits=8}"):
        assert main(["compress", str(path), "-o", str(out), "--pipeline", pipeline]) == 0
        assert re.search(r"(rtn|tq)\{.*changed=\s+2 ", capsys.readouterr().out)  # both branches' weights
    x = np.load(tmp_path / "calib.npz")["x"][:8]
    ref = run(if_model(), {"x": x})[0]
    np.testing.assert_allclose(run(onnx.load(str(out)), {"x": x})[0], ref, atol=0.02 * np.abs(ref).max())


@pytest.mark.parametrize("method", ["rtn", "tq", "ecsq", "kq", "crq"])
def test_every_weight_too_small_means_no_gain(cnn, tmp_path, capsys, method):
    model, _ = cnn
    pipeline = f"fold-bn,calibrate,{method}{{min_elements=100000}}"
    err = _fails(["compress", model, "-o", tmp_path / "o.onnx", "--pipeline", pipeline], 4, "no weight", capsys)
    assert "8 candidate(s) skipped" in err and "min_elements=100000" in err


def test_output_not_smaller_means_no_gain(cnn, tmp_path, capsys):
    model, _ = cnn
    out = tmp_path / "o.onnx"
    _fails(["compress", model, "-o", out, "--pipeline", "compact-names"], 4, "no weight was quantized", capsys)
    # six weights quantized: the DequantizeLinear node and its steps cost more than the 18 bytes saved
    tiny = make_model(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
    )
    (tmp_path / "tiny").mkdir()
    path = tmp_path / "tiny" / "tiny.onnx"  # no calib.npz beside it
    onnx.save(tiny, str(path))
    argv = ["compress", path, "-o", out, "--pipeline", "rtn{bits=8,min_elements=1}"]
    _fails(argv, 4, f"is not smaller than the input ({path.stat().st_size:,d} B)", capsys)
    assert not out.exists()
    assert main([str(a) for a in argv] + ["--allow-no-gain"]) == 0 and out.stat().st_size > path.stat().st_size
