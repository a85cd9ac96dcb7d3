"""The command line, in process through main(argv) and once through the installed script."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import bundled, conv_model, past_progress

from onnxtq.cli import main
from onnxtq.pipeline import registry


@pytest.fixture
def cnn(tmp_path):
    """A copy of the bundled CNN with its calib.npz beside it (so no --calib is needed)."""
    path, calib = bundled("mnist_cnn")
    shutil.copy(path, tmp_path / path.name)
    shutil.copy(calib, tmp_path / "calib.npz")
    return tmp_path / path.name


def test_compress_needs_nothing_but_the_model(cnn, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = cnn.read_bytes()
    assert main(["compress", str(cnn), "--report", "r.json"]) == 0
    out = tmp_path / "mnist_cnn.compressed.onnx"
    assert out.is_file() and cnn.read_bytes() == before
    assert "wrote" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["pipeline"] == "fold-bn,calibrate,rtn{bits=8}"
    assert report["bytes_after"] < report["bytes_before"] / 3
    model = onnx.load(str(out))
    assert {p.key: p.value for p in model.metadata_props}["onnxtq.pipeline"] == report["pipeline"]


def test_inspect_and_verify(cnn, tmp_path, capsys):
    out = tmp_path / "c.onnx"
    assert main(["compress", str(cnn), "-o", str(out), "--pipeline", "fold-bn,calibrate,rtn{bits=4}"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["opset"] == 21 and info["onnxtq_nodes"]["dequant"] == info["ops"]["DequantizeLinear"]
    assert all(np.prod(w["shape"]) < 1024 for w in info["weights"])  # only small float weights are left
    assert [s["reason"] for s in info["skipped"]].count("already quantized (fed by DequantizeLinear)") == 4
    assert main(["verify", str(cnn), str(out), "--calib", str(cnn.parent / "calib.npz"), "--samples", "16"]) == 0
    assert "SQNR" in capsys.readouterr().out
    assert main(["verify", str(cnn), str(out), "--samples", "4", "--min-sqnr", "200"]) == 3


def test_fidelity_budget_refuses_to_write(cnn, tmp_path, capsys):
    out = tmp_path / "c.onnx"
    assert main(["compress", str(cnn), "-o", str(out), "--pipeline", "rtn{bits=2}", "--min-sqnr", "40"]) == 3
    assert not out.exists()
    assert "below the budget" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["compress", "missing.onnx"], "does not exist"),
        (["compress", "MODEL", "--pipeline", "rtn{bits=5x}"], "expects int"),
        (["compress", "MODEL", "--pipeline", "nope"], "known passes"),
        (["compress", "MODEL", "--calib", "nothere.npz"], "does not exist"),
        (["compress", "MODEL", "-o", "MODEL"], "is the input model"),
    ],
)
def test_bad_input_exits_2_with_a_hint_and_no_traceback(cnn, argv, message, capsys):
    argv = [str(cnn) if a == "MODEL" else a for a in argv]
    assert main(argv) == 2
    err = past_progress(capsys.readouterr().err)
    assert message in err and "Traceback" not in err and err.startswith("onnxtq: error:")


def test_calibration_data_must_match(tmp_path, capsys):
    model_path = tmp_path / "m.onnx"
    onnx.save(conv_model(), str(model_path))
    np.savez(tmp_path / "calib.npz", wrong=np.zeros((2, 4, 10, 10), np.float32))
    assert main(["compress", str(model_path), "-o", str(tmp_path / "o.onnx")]) == 2
    assert "no array for model input(s) ['x']" in capsys.readouterr().err


def test_list_passes_matches_registry(capsys):
    assert main(["list-passes", "--options"]) == 0
    out = capsys.readouterr().out
    for name in registry():
        assert f"\n{name}" in "\n" + out
    assert "bits (int) = 8" in out


def test_console_script(cnn, tmp_path):
    exe = shutil.which("onnxtq") or str(Path(sys.executable).parent / "onnxtq")
    done = subprocess.run([exe, "compress", str(cnn), "-o", str(tmp_path / "o.onnx")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    bad = subprocess.run([exe, "inspect", str(tmp_path / "none.onnx")], capture_output=True, text=True)
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_sweep_calibrates_once_and_writes_one_model_per_pipeline(tmp_path, capsys):
    path, calib = bundled("mnist_cnn")
    report = tmp_path / "runs.json"
    pipelines = ["rtn{bits=4}", "tq{rate=3}"]
    args = ["sweep", str(path), "-o", str(tmp_path), "--calib", str(calib), "--pipelines", *pipelines]
    assert main([*args, "--report", str(report)]) == 0
    assert "fold-bn,calibrate,tq{rate=3}" in capsys.readouterr().out
    runs = json.loads(report.read_text())
    assert [r["pipeline"] for r in runs] == [f"fold-bn,calibrate,{p}" for p in pipelines]
    calibrations = [p for r in runs for p in r["passes"] if p["pass_name"] == "calibrate"]
    assert len({p["seconds"] for p in calibrations}) == 1  # the shared head ran once
    for i, r in enumerate(runs):
        assert (tmp_path / f"mnist_cnn.{i}.onnx").stat().st_size == r["bytes_after"]
        assert min(v["sqnr_db"] for v in r["verification"]["outputs"].values()) > 15


def test_sweep_goes_on_past_a_failed_pipeline(tmp_path, capsys, monkeypatch):
    """A pipeline that fails is reported with its error, in its place; the others still run (exit 1)."""
    from onnxtq.passes import RtnPass

    real_run = RtnPass.run

    def failing_at_2_bits(self, ctx):
        if self.config.bits == 2:
            raise RuntimeError("broken on purpose")
        return real_run(self, ctx)

    monkeypatch.setattr(RtnPass, "run", failing_at_2_bits)
    path, calib = bundled("mnist_cnn")
    report = tmp_path / "runs.json"
    pipelines = ["rtn{bits=4}", "rtn{bits=2}", "rtn{bits=8}"]
    args = ["sweep", str(path), "-o", str(tmp_path), "--calib", str(calib), "--pipelines", *pipelines]
    assert main([*args, "--report", str(report)]) == 1
    assert "broken on purpose" in capsys.readouterr().out
    runs = json.loads(report.read_text())
    assert [bool(r["error"]) for r in runs] == [False, True, False]
    assert not (tmp_path / "mnist_cnn.1.onnx").exists()
    assert (tmp_path / "mnist_cnn.2.onnx").stat().st_size == runs[2]["bytes_after"]
    # every pipeline failed: no page, and a line saying why
    page = tmp_path / "page.html"
    assert main([*args[:-3], "rtn{bits=2}", "--report-html", str(page)]) == 1
    assert "no page written" in capsys.readouterr().out and not page.exists()
