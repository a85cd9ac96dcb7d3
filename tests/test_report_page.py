"""The report page: a sweep of the bundled CNN rendered to one HTML file, its figures' JSON and PNGs."""

import base64
import io
import json
import math
import re
import shutil

import pytest
from builders import bundled
from PIL import Image

from onnxtq import report_page
from onnxtq.cli import main

PNG = re.compile(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'")


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    """rtn{bits=4} and tq{rate=3} on the bundled CNN, one calibration; report JSON and page from the sweep."""
    tmp = tmp_path_factory.mktemp("sweep")
    path, calib = bundled("mnist_cnn")
    argv = ["sweep", str(path), "-o", str(tmp), "--calib", str(calib), "--pipelines", "rtn{bits=4}", "tq{rate=3}"]
    argv += ["--shared", "fold-bn,calibrate{samples=64}", "--verify-samples", "4"]
    assert main(argv + ["--report", str(tmp / "r.json"), "--report-html", str(tmp / "sweep.html")]) == 0
    return tmp


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in PNG.findall(page)]


def _final(run: dict) -> list[dict]:
    """What the run stored per weight: quantized, or skipped (kept in float), in graph order."""
    order = [r["name"] for r in run["passes"][2]["records"]]  # calibrate observes every layer
    last = {r["name"]: r for p in run["passes"] for r in p["records"] if r["status"] in ("quantized", "skipped")}
    return [last[name] for name in order]


def test_page_has_every_layer_and_valid_plots(swept, capsys):
    out = swept / "page"
    argv = ["report", str(swept / "r.json"), "-o", str(out / "r.html"), "--json", str(out / "f.json")]
    assert main(argv + ["--png-dir", str(out / "png")]) == 0
    page = (out / "r.html").read_text()
    runs = json.loads((swept / "r.json").read_text())
    data = json.loads((out / "f.json").read_text())
    # a row per quantized weight of each run, under that run's section
    for i, run in enumerate(runs):
        section = page.split(f"<section id=run-{i + 1}>")[1].split("</section>")[0]
        records = _final(run)
        assert len(records) == 8 and sum(r["status"] == "quantized" for r in records) == (4, 8)[i]
        assert section.count("<tr><td class=n>") == len(records)
        for r in records:
            assert f"<div class=w>{r['name']}</div>" in section
    # rate-fidelity and per-layer comparison, then bits, SQNR and bytes for each run
    ids = [f["id"] for f in data["figures"]]
    assert ids == ["rate_fidelity", "layers_compared"] + [
        f"run{i}_{k}" for i in (1, 2) for k in ("bits", "sqnr", "bytes")
    ]
    images = _pngs(page)
    assert len(images) == len(ids) == 8
    for fid, png in zip(ids, images):
        assert png.startswith(b"\x89PNG\r\n\x1a\n")
        width, height = Image.open(io.BytesIO(png)).size
        assert width > 500 and height > 200
        assert (out / "png" / f"{fid}.png").read_bytes() == png
    # the page written by sweep --report-html is the same page
    assert (swept / "sweep.html").read_text() == page


def test_figures_are_the_reports_numbers(swept):
    runs = json.loads((swept / "r.json").read_text())
    data = report_page.figures(runs)
    figs = {f["id"]: f for f in data["figures"]}
    points = {p["run"]: p for s in figs["rate_fidelity"]["series"] for p in s["points"]}
    assert [s["label"] for s in figs["rate_fidelity"]["series"]] == ["rtn", "tq"]
    for i, run in enumerate(runs):
        worst = min(v["sqnr_db"] for v in run["verification"]["outputs"].values())
        assert points[i]["bytes"] == run["bytes_after"] == data["runs"][i]["bytes_after"]
        assert points[i]["sqnr_db"] == worst
        records = _final(run)
        kept = [r["status"] == "skipped" for r in records]
        elements = [math.prod(r["shape"]) for r in records]
        bits = figs[f"run{i + 1}_bits"]
        assert bits["kept_float"] == kept
        assert bits["stored"] == [32.0 if k else r["bits"] for r, k in zip(records, kept)]
        assert bits["bound"] == [r["bound_bits"] for r in records]
        assert figs[f"run{i + 1}_sqnr"]["output_sqnr_db"] == [r["output_sqnr_db"] for r in records]
        stored = sum(4 * n if k else r["bytes_after"] for r, n, k in zip(records, elements, kept))
        assert data["runs"][i]["bits_per_weight"] == pytest.approx(8 * stored / sum(elements))
        share = figs[f"run{i + 1}_bytes"]["bars"]
        assert sum(b["bytes"] for b in share) == run["bytes_after"]
        assert share[-1]["bytes"] == run["bytes_after"] - stored  # the rest of the file: graph, biases
    assert figs["run1_bits"]["bound"] == [None] * 8 and all(b > 0 for b in figs["run2_bits"]["bound"])
    assert figs["layers_compared"]["series"][0]["stored"] == figs["run1_bits"]["stored"]
    # the JSON is strict (no NaN) and what the CLI writes
    json.dumps(data, allow_nan=False)


def _run(spec: str, bytes_after: int, sqnr: float | None, name: str = "w", source: str = "m.onnx") -> dict:
    """A minimal run report: one pass that quantized one 8x4x3x3 conv weight."""
    record = {"name": name, "node": name, "op": "Conv", "status": "quantized", "kind": "conv", "shape": [8, 4, 3, 3]}
    record.update(bytes_after=200, bits=4.4, detail=name)
    outputs = {} if sqnr is None else {name: {"sqnr_db": sqnr, "max_abs_err": 0.1}}
    return {
        "pipeline": f"fold-bn,calibrate,{spec}",
        "source": source,
        "bytes_before": 10_000,
        "bytes_after": bytes_after,
        "calibration": name,
        "passes": [{"pass_name": spec.partition("{")[0], "spec": spec, "records": [record], "notes": [name]}],
        "verification": {"outputs": outputs},
    }


def test_runs_of_one_method_make_one_curve():
    runs = [_run("tq{rate=3,transform=klt}", 900, 20.0), _run("tq{rate=2,transform=klt}", 700, 15.0)]
    runs += [_run("tq{rate=3}", 900, 22.0), _run("rtn{bits=4}", 1000, None)]
    runs[-1]["passes"].append(dict(runs[-1]["passes"][0], pass_name="refine", spec="refine"))
    curve = report_page.figures(runs)["figures"][0]
    assert [s["label"] for s in curve["series"]] == ["tq{transform=klt}", "tq", "rtn+refine"]
    assert [p["label"] for p in curve["series"][0]["points"]] == ["rate=2", "rate=3"]  # by size
    assert curve["series"][2]["points"][0]["sqnr_db"] is None  # not verified: listed, not drawn


def test_names_from_the_model_are_escaped(tmp_path):
    evil = "<script>alert(1)</script>$x$"
    run = _run("rtn{bits=4}", 1_000, 20.0, name=evil + "'\"", source=str(tmp_path / f"{evil}.onnx"))
    older = dict(run, pipeline="rtn{bits=8}", bytes_after=2_000, verification={})  # a report without fields
    report_page.write([run, older], tmp_path / "p.html")
    page = (tmp_path / "p.html").read_text()
    assert "<script" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "'\"" not in page  # quotes escaped too: nothing can leave an attribute
    assert len(_pngs(page)) == 2 + 3 * 2


def test_report_refuses_to_overwrite_its_input(swept, tmp_path, capsys):
    report = tmp_path / "r.json"
    shutil.copy(swept / "r.json", report)
    before = report.read_bytes()
    assert main(["report", str(report), "-o", str(report)]) == 2
    assert main(["report", str(report), "-o", str(tmp_path / "p.html"), "--json", str(report)]) == 2
    assert main(["report", str(report), "-o", str(tmp_path / "p.html"), "--png-dir", str(tmp_path)]) == 0
    assert report.read_bytes() == before
    assert "never overwrites its input" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    (tmp_path / "bad.json").write_text(json.dumps(dict(_run("rtn{bits=4}", 1, None), bytes_after="many")))
    assert main(["report", str(tmp_path / "bad.json")]) == 2
    model, _ = bundled("mnist_cnn")
    assert main(["compress", str(model), "-o", str(tmp_path / "c.onnx"), "--report-html", str(model)]) == 2
    assert not (tmp_path / "c.onnx").exists()
