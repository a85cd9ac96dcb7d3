"""Progress on stderr when it is not a terminal, and what keeps a big model's run short and small: no sizes
as sent past the limit, an opset upgrade that leaves the weights as they were, sessions that hold one copy."""

import json
import shutil

import numpy as np
import onnx
import pytest
from builders import bundled

from onnxtq import cli, model_io, progress
from onnxtq.cli import main
from onnxtq.graph import upgrade_opset


@pytest.fixture
def cnn(tmp_path):
    path, calib = bundled("mnist_cnn")
    shutil.copy(path, tmp_path / path.name)
    shutil.copy(calib, tmp_path / "calib.npz")
    return tmp_path / path.name


@pytest.fixture(autouse=True)
def quiet_after():
    yield
    progress.enable(False)


def _lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("onnxtq [")]


def test_a_line_per_stage_and_per_loop_with_time_left(cnn, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "LINE_SECONDS", 0.0)  # every step of every loop writes its line
    out = tmp_path / "out.onnx"
    assert main(["compress", str(cnn), "-o", str(out), "--pipeline", "fold-bn,calibrate,rtn{bits=4}"]) == 0
    lines = _lines(capsys.readouterr().err)
    stages = [line.split("] ", 1)[1] for line in lines]
    for stage in ("load and check", "calibrate", "rtn{bits=4}", "verify against the original", f"write {out}"):
        assert f"{stage} ..." in stages
        assert any(s.startswith(f"{stage}: ") and s.endswith(" s") for s in stages), stage
    assert stages.index("calibrate ...") < stages.index("rtn{bits=4} ...")
    weights = [s for s in stages if s.startswith("rtn: ")]
    assert weights and all("left" in s for s in weights)
    assert weights[-1].startswith(f"rtn: {len(weights)}/{len(weights)} weight")
    assert all("GB]" in line for line in lines)  # the run's peak memory on every line


def test_quiet_writes_no_progress(cnn, tmp_path, capsys):
    assert main(["-q", "compress", str(cnn), "-o", str(tmp_path / "out.onnx")]) == 0
    assert _lines(capsys.readouterr().err) == []


def test_the_api_stays_quiet(cnn, tmp_path, capsys):
    from onnxtq import compress

    compress(cnn, tmp_path / "out.onnx", calib=cnn.parent / "calib.npz")
    assert _lines(capsys.readouterr().err) == []


def test_sizes_as_sent_are_skipped_past_the_limit(cnn, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "MEASURED_UP_TO", 1000)
    report = tmp_path / "r.json"
    assert main(["-q", "compress", str(cnn), "-o", str(tmp_path / "out.onnx"), "--report", str(report)]) == 0
    assert "sent: not measured" in capsys.readouterr().out
    assert json.loads(report.read_text())["transfer"] == {}


def test_opset_upgrade_keeps_weights_and_its_input():
    model = onnx.load(str(bundled("mnist_cnn")[0]))
    before = model.SerializeToString()
    upgraded = upgrade_opset(model, 21)
    assert model.SerializeToString() == before  # the weights taken aside are back in the input
    assert next(o.version for o in upgraded.opset_import if o.domain == "") == 21
    weights = {t.name: t.raw_data for t in model.graph.initializer}
    assert {t.name: t.raw_data for t in upgraded.graph.initializer} == weights
    assert max(len(w) for w in weights.values()) > 4096  # some were large enough to be taken aside
    feed = {"image": np.random.default_rng(0).standard_normal((2, 1, 28, 28)).astype(np.float32)}
    want, got = (model_io.session(m).run(None, feed)[0] for m in (model, upgraded))
    np.testing.assert_array_equal(want, got)


def test_a_session_keeps_no_copy_of_the_model():
    model = onnx.load(str(bundled("mnist_cnn")[0]))
    sess = model_io.session(model)
    assert getattr(sess, "_model_bytes", None) is None
    assert sess.run(None, {"image": np.zeros((1, 1, 28, 28), np.float32)})[0].shape == (1, 10)


@pytest.mark.parametrize("coded", [False, True])
def test_a_session_over_a_large_model_runs_it_from_a_folder(coded, tmp_path, monkeypatch):
    from onnxtq import compress

    path, calib = bundled("mnist_transformer")
    if coded:  # packed INT4 codes and float steps travel through the folder too
        compress(path, tmp_path / "rtn4.onnx", "calibrate,rtn{bits=4,min_elements=0}", calib=calib)
        path = tmp_path / "rtn4.onnx"
    model = onnx.load(str(path))
    feed = {"image": np.random.default_rng(1).standard_normal((2, 1, 28, 28)).astype(np.float32)}
    want = model_io.session(model).run(None, feed)
    monkeypatch.setattr(model_io, "SESSION_FROM_FILE_BYTES", 1000)  # every model is "large"
    before = model.SerializeToString()
    got = model_io.session(model).run(None, feed)
    assert model.SerializeToString() == before
    for a, b in zip(want, got):
        np.testing.assert_array_equal(a, b)


def test_a_large_model_compresses_through_folders_to_the_same_file(tmp_path, monkeypatch):
    """Checker, sessions and calibration cuts of a model past the limit go through files: same output."""
    from onnxtq import compress

    path, calib = bundled("mnist_transformer")
    pipeline = "calibrate,rtn{bits=4}"
    compress(path, tmp_path / "small.onnx", pipeline, calib=calib)
    monkeypatch.setattr(model_io, "SESSION_FROM_FILE_BYTES", 1000)
    compress(path, tmp_path / "large.onnx", pipeline, calib=calib)
    assert (tmp_path / "large.onnx").read_bytes() == (tmp_path / "small.onnx").read_bytes()
