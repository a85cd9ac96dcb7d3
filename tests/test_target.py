"""Compress to a target (auto): on the bundled models every kind of target is met, measured here
independently of the run (file size on disk, brotli, SQNR on the held-out inputs, agreement on the
bundled eval set), held-out inputs are never calibrated on, and the CLI takes exactly one target."""

import json
import re
from types import SimpleNamespace

import brotli
import numpy as np
import onnx
import pytest
from builders import bundled, calibrated_context, make_model, matmul_model, run
from onnxtq.passes.auto import AutoPass

from onnxtq import model_io, report_page
from onnxtq.calibration.data import open_source, split_holdout
from onnxtq.cli import main
from onnxtq.codec import Layer, distortion
from onnxtq.codecs.tq import TqCodec
from onnxtq.gains import Probe
from onnxtq.graph import Graph
from onnxtq.report import Attempt
from onnxtq.target import agreement_chances, nearest_text, parse_bytes, relative_errors, target_text, top_scores
from onnxtq.weights import discover


def _npz(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _compress(tmp_path, name: str, *target: str) -> tuple:
    model, calib = bundled(name)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["compress", str(model), "-o", str(out), "--calib", str(calib), "--report", str(report), *target])
    assert code == 0
    auto = next(p for p in json.loads(report.read_text())["passes"] if p["pass_name"] == "auto")
    return model_io.load(model), model_io.load(out), out, auto


def _held_out(name: str) -> dict:
    """The inputs a target run holds out of the bundled calibration file: every fourth."""
    inputs = _npz(bundled(name)[1])
    return {k: v[3::4] for k, v in inputs.items()}


def _sqnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10((a.astype(np.float64) ** 2).sum() / ((a - b).astype(np.float64) ** 2).sum()))


def test_parse_bytes():
    assert parse_bytes("2.8MB") == 2_800_000
    assert parse_bytes("900kB") == 900_000
    assert parse_bytes("2MiB") == 2 * 2**20
    assert parse_bytes("123456") == 123_456
    with pytest.raises(ValueError):
        parse_bytes("two megabytes")


def test_held_out_inputs_are_every_fourth_and_never_calibrated_on():
    model_path, calib = bundled("mnist_cnn")
    source = open_source(calib, model_io.load(model_path))
    fit, held = split_holdout(source)
    x = _npz(calib)["image"]
    fitted = np.concatenate([feed["image"] for _, feed in fit.batches(7)])
    kept = np.concatenate([feed["image"] for _, feed in held.batches(5)])
    assert held.num_samples == len(kept) == len(x[3::4]) and fit.num_samples == len(fitted) == len(x) - len(kept)
    np.testing.assert_array_equal(kept, x[3::4])
    np.testing.assert_array_equal(fitted, np.delete(x, np.s_[3::4], axis=0))


def test_the_probe_takes_as_many_fitting_inputs_as_asked():
    """The fitting split yields three inputs of every four a batch: asked for 16, the probe took two batches of 12,
    24 inputs, and every sweep of gains and marginal errors ran half again as long as its count said."""
    model_path, calib = bundled("mnist_cnn")
    model = model_io.load(model_path)
    fit, _ = split_holdout(open_source(calib, model))
    probe = Probe(model, fit, samples=16)
    taken = np.concatenate([feed["image"] for feed in probe.feeds])
    fitted = np.concatenate([feed["image"] for _, feed in fit.batches(16)])
    assert probe.samples == len(taken) == 16
    np.testing.assert_array_equal(taken, fitted[:16])


@pytest.mark.parametrize("name", ["mnist_cnn", "mnist_transformer"])
def test_size_target_is_met_on_disk_and_spent(tmp_path, name):
    original, _, out, auto = _compress(tmp_path, name, "--size", "40kB" if name == "mnist_cnn" else "70kB")
    budget = 40_000 if name == "mnist_cnn" else 70_000
    # met, and most of the budget used: on these small models one layer's step between depths is up to 6% of
    # the file (mnist_cnn at 40 kB: 38,592 B at 42.6 dB held-out, where without 6-bit depths 39,611 B gave 41.0)
    assert budget * 0.95 <= out.stat().st_size <= budget
    assert auto["target"]["met"] and auto["target"]["kind"] == "size"
    halves = [t for t in model_io.load(out).graph.initializer if t.name.endswith("/onnxtq.half")]
    assert all(t.data_type == onnx.TensorProto.FLOAT16 for t in halves)  # coded layers' biases, where they pay
    assert len(halves) == sum("bias float16" in r["detail"] for r in auto["records"])
    assert bool(halves) == (name == "mnist_transformer")  # mnist_cnn's biases are too short to pay for a Cast
    feeds = _held_out(name)  # and the report says what fidelity the size left, on the held-out inputs
    measured = _sqnr(run(original, feeds)[0], run(model_io.load(out), feeds)[0])
    assert measured == pytest.approx(auto["target"]["sqnr_db"], abs=0.01)


def test_a_portable_size_target_counts_the_file_as_written(tmp_path):
    """Under --target portable the codes are lowered after the search: the size is the lowered file's."""
    _, compressed, out, auto = _compress(tmp_path, "mnist_cnn", "--size", "40kB", "--target", "portable")
    assert 40_000 * 0.95 <= out.stat().st_size <= 40_000 and auto["target"]["met"]
    assert "DequantizeLinear" not in {n.op_type for n in compressed.graph.node}


@pytest.mark.parametrize("codecs", [(), ("--codecs", "rtn+fp16+tq+ecsq")])
def test_served_size_target_is_what_brotli_sends(tmp_path, codecs):
    _, _, out, auto = _compress(tmp_path, "mnist_cnn", "--served-size", "20kB", *codecs)
    served = len(brotli.compress(out.read_bytes(), quality=11, lgwin=24))
    assert served <= 20_000 and auto["target"]["served_bytes"] >= 0.97 * 20_000


def test_sqnr_target_holds_on_the_held_out_inputs(tmp_path):
    original, compressed, _, auto = _compress(tmp_path, "mnist_transformer", "--sqnr", "30")
    feeds = _held_out("mnist_transformer")
    measured = _sqnr(run(original, feeds)[0], run(compressed, feeds)[0])
    assert measured >= 30 and measured == pytest.approx(auto["target"]["sqnr_db"], abs=0.01)
    predicted = [a for a in auto["target"]["attempts"] if a["meets"]][-1]["predicted"]
    assert predicted is not None  # the report puts the prediction beside the measurement
    shares = [r["share"] for r in auto["records"]]
    assert sum(shares) == pytest.approx(1.0) and all(r["codec"] for r in auto["records"])


def test_agreement_target_holds_on_the_eval_set(tmp_path):
    original, compressed, out, auto = _compress(tmp_path, "mnist_cnn", "--agreement", "0.98")
    x = _npz(bundled("mnist_cnn")[0].parent / "eval.npz")["image"]
    agree = np.mean(run(original, {"image": x})[0].argmax(1) == run(compressed, {"image": x})[0].argmax(1))
    assert agree >= 0.98
    fp32_bytes = bundled("mnist_cnn")[0].stat().st_size
    assert out.stat().st_size < fp32_bytes / 4  # and it is a real compression, not float16 everywhere


def test_bits_target(tmp_path):
    _, _, _, auto = _compress(tmp_path, "mnist_cnn", "--bits", "3")
    assert auto["rate"]["stored"] <= 3.0 and auto["target"]["met"]


def test_a_target_and_a_pipeline_are_refused(tmp_path, capsys):
    model, calib = bundled("mnist_cnn")
    code = main(["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--bits", "4", "--pipeline", "rtn"])
    assert code == 2 and "not both" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()


def test_two_targets_are_refused(tmp_path, capsys):
    model, _ = bundled("mnist_cnn")
    code = main(["compress", str(model), "-o", str(tmp_path / "o.onnx"), "--bits", "4", "--sqnr", "30"])
    assert code == 2 and "not allowed with" in capsys.readouterr().err


def test_an_unreachable_target_fails_verification_and_writes_nothing(tmp_path, capsys):
    model, calib = bundled("mnist_cnn")
    out = tmp_path / "o.onnx"
    code = main(["compress", str(model), "-o", str(out), "--calib", str(calib), "--size", "2kB"])
    err = capsys.readouterr().err
    assert code == 3 and "target size=2,000 B not met" in err
    smallest = int(re.search(r"the smallest file tried was ([0-9,]+) B", err).group(1).replace(",", ""))
    assert smallest > 2000
    assert not out.exists()


@pytest.mark.parametrize(
    "kind, value, measured, target, nearest",
    [
        ("size", 7e5, 750_851, "size=700,000 B", "the smallest file tried was 750,851 B"),
        ("served_size", 5e5, 512_345, "served_size=500,000 B", "the smallest tried is sent in 512,345 B"),
        ("bits", 3, 3.21, "bits=3 bits per weight", "the fewest tried was 3.210 bits per weight"),
        ("sqnr", 30, 28.456, "sqnr=30 dB", "the best model tried measured 28.46 dB"),
        ("agreement", 0.99, 0.98123, "agreement=0.99", "the best model tried agrees on 0.9812"),
    ],
)
def test_a_target_not_met_is_told_in_its_own_unit(kind, value, measured, target, nearest):
    """The error names the target and the nearest model tried in the target's unit, with the file's bytes."""
    size = measured if kind == "size" else 750_851
    said = nearest_text(kind, Attempt(aim=1.0, predicted=None, measured=measured, bytes=size, meets=False))
    assert target_text(kind, value) == target
    assert said.startswith(nearest) and "750,851 B" in said


def test_agreement_needs_class_scores(tmp_path, capsys):
    """A model whose output is not [samples, classes] (a projection [N, T, 48]) has no top-1 to agree on."""
    model_path, calib = tmp_path / "proj.onnx", tmp_path / "calib.npz"
    onnx.save(matmul_model(), model_path)
    np.savez(calib, x=np.random.default_rng(0).standard_normal((16, 4, 64)).astype(np.float32))
    out = tmp_path / "o.onnx"
    code = main(["compress", str(model_path), "-o", str(out), "--calib", str(calib), "--agreement", "0.9"])
    err = capsys.readouterr().err
    assert code == 2 and "class scores" in err and "--sqnr" in err
    assert not out.exists()


def test_a_sweep_puts_the_target_run_beside_single_methods(tmp_path):
    """In a sweep every pipeline calibrates on the fitting inputs; the page draws the auto run as its own curve."""
    model, calib = bundled("mnist_cnn")
    report, page = tmp_path / "runs.json", tmp_path / "page.html"
    pipelines = ["auto{size=40000}", "auto{size=30000}", "rtn{bits=4}"]
    args = ["sweep", str(model), "-o", str(tmp_path), "--calib", str(calib), "--report", str(report)]
    assert main([*args, "--report-html", str(page), "--pipelines", *pipelines]) == 0
    runs = json.loads(report.read_text())
    assert [r["exit_code"] for r in runs] == [0, 0, 0]
    for run_report in runs:  # calibrated once, on the 192 inputs the auto runs do not hold out
        assert "192 fitting samples" in run_report["calibration"]
    data = report_page.figures(runs)
    curves = {s["label"]: len(s["points"]) for s in data["figures"][0]["series"]}
    assert curves == {"auto": 2, "rtn": 1}


@pytest.mark.parametrize("relative", [0.02, 0.05, 0.2])
def test_expected_agreement_is_the_share_that_agrees(rng, relative):
    """Where errors are what the model assumes (Gaussian, of a size relative to each input's top scores'
    spread), the expectation over 4,000 inputs is the share of them whose top class stays on top (98-90%
    here; the sum over competitors is pessimistic far below: 63% expected where 74% agree)."""
    reference = rng.standard_normal((4000, 50)) * rng.uniform(0.5, 4, (4000, 1))
    spread = top_scores(reference).std(axis=1, keepdims=True)
    out = reference + relative * spread * rng.standard_normal(reference.shape)
    counted = np.mean(reference.argmax(axis=1) == out.argmax(axis=1))
    chances = agreement_chances(relative_errors(reference, out)[:200], top_scores(reference))
    assert chances.shape == (200, 4000)
    assert chances.mean() == pytest.approx(counted, abs=0.01)


def test_errors_all_classes_share_move_no_margin(rng):
    """A logit error shared by every class (a score shifted as a whole) flips nothing: the expectation reads
    the errors of the margins, so it stays the share that agrees (counting each class's error on its own, 27%
    of these inputs would be expected to flip)."""
    reference = rng.standard_normal((4000, 50)) * rng.uniform(0.5, 4, (4000, 1))
    spread = top_scores(reference).std(axis=1, keepdims=True)
    shared = 0.5 * spread * rng.standard_normal((4000, 1))
    out = reference + shared + 0.05 * spread * rng.standard_normal(reference.shape)
    counted = np.mean(reference.argmax(axis=1) == out.argmax(axis=1))
    chances = agreement_chances(relative_errors(reference, out)[:200], top_scores(reference))
    assert chances.mean() == pytest.approx(counted, abs=0.01)


def test_expected_agreement_ends():
    reference = np.array([[3.0, 1.0, 0.0], [0.5, 0.4, 0.0]])
    assert np.all(agreement_chances(relative_errors(reference, reference), top_scores(reference)) == 1)
    broken = reference.copy()
    broken[0, 1] = np.nan
    assert np.all(agreement_chances(relative_errors(reference, broken)[:1], top_scores(reference)) == 0)


def test_a_chosen_point_is_coded_again_as_it_was_measured():
    """auto keeps each candidate's figures, not its weight (nine rtn points would be nine copies of the model): a
    point coded again when chosen must be the weight whose error the allocation weighed."""
    auto, checked = AutoPass(), 0
    with calibrated_context("mnist_cnn") as ctx:
        for site in discover(ctx.graph).sites:
            layer = Layer.of(ctx.graph, site, ctx.stats)
            for point in auto._points(layer, served=False):
                if point.make is None:
                    continue
                coded = point.make()
                assert distortion(layer, layer.w.astype(np.float64) - coded.w_hat) == pytest.approx(point.distortion)
                assert coded.detail == point.detail
                checked += 1
    assert checked >= 4 * 10  # fp16 and rtn's points on every weight


def test_a_layer_worse_held_out_than_fitted_has_its_codec_points_raised():
    """The marginal effect on the fitting inputs rescales every point of a layer (the gain). On held-out inputs
    the chosen coding's error over its prediction, against the same for the rtn point nearest in bits (which
    fits nothing), raises the chosen codec's points only, and never lowers them."""
    auto = AutoPass()
    with calibrated_context("mnist_cnn") as ctx:
        layers = [Layer.of(ctx.graph, site, ctx.stats) for site in discover(ctx.graph).sites[:2]]
        points = {layer.site.name: auto._points(layer, served=False) for layer in layers}
        banded = auto._banded_options(layers, "bits")
    chosen, kind = (layer.site.name for layer in layers)
    records = [SimpleNamespace(name=n, status="quantized", share=0.5, codec="tq", bits=4.0) for n in (chosen, kind)]
    first = SimpleNamespace(records=records, predicted_error=2.0, w_hat={chosen: "tq", kind: "tq"})  # predicted 1
    rounding = {
        layer.site.name: min(
            (p for p in points[layer.site.name] if p.codec == "rtn"), key=lambda p: abs(p.bits / layer.size - 4)
        ).distortion
        for layer in layers
    }

    def held_out(model, replaced):  # these inputs are twice as hard as predicted for any coding
        tq = {chosen: 6.0, kind: 1.0}  # 3x worse than rounding for one, better for the other (noise)
        return {n: tq[n] if isinstance(w, str) else 2.0 * rounding[n] for n, w in replaced.items()}

    fitted = SimpleNamespace(marginal=lambda model, replaced: {chosen: 2.0, kind: 2.0})  # the gains were half

    def figures(name):
        return [p.distortion for p in points[name]], [b.distortion.copy() for o in banded[name] for b in o.bands]

    before = {name: figures(name) for name in (chosen, kind)}
    assert auto._correct(fitted, SimpleNamespace(marginal=held_out), None, layers, points, banded, first) == 2
    for name, tq_factor in ((chosen, 6.0), (kind, 2.0)):
        (rtn_before, tq_before), (rtn_after, tq_after) = before[name], figures(name)
        assert tq_before and all(p.codec != "tq" for p in points[name])  # rtn's, fp16's and float32's
        np.testing.assert_allclose(rtn_after, 2.0 * np.array(rtn_before))
        for a, b in zip(tq_after, tq_before):
            np.testing.assert_allclose(a, tq_factor * b)


def test_a_table_without_statistics_competes_with_ecsq_for_a_served_size():
    """An embedding table (Gather) has no input statistics; ecsq codes it in plain squared error, and for a
    served size its entropy-coded steps compete with rtn's points (MiniLM's word embedding is half the model)."""
    rng = np.random.default_rng(0)
    table = rng.normal(size=(512, 32)).astype(np.float32)
    nodes = [onnx.helper.make_node("Gather", ["table", "ids"], ["y"])]
    model = make_model(
        nodes,
        [onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["N", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4, 32])],
        {"table": table},
    )
    graph = Graph(model)
    (site,) = discover(graph).sites
    layer = Layer.of(graph, site, None)
    served = AutoPass(served_size=10_000)._banded_options([layer], "served_size")
    assert [o.name for o in served["table"]] == ["ecsq", "ecsq"]  # its steps, and its steps over its principal axes
    assert not AutoPass(size=10_000)._banded_options([layer], "size")  # ecsq competes for a served size only


def test_tq_points_cost_their_codes_entropy_for_a_served_size():
    """For a served size tq's points cost their codes' entropy, what brotli approaches, shared out by row: the
    same codes as at their nominal depth (the same distortion), never more bits than that depth."""
    checked = 0
    with calibrated_context("mnist_cnn") as ctx:
        for site in discover(ctx.graph).sites:
            layer = Layer.of(ctx.graph, site, ctx.stats)
            nominal = TqCodec(depths="nominal").options(layer)
            entropy = TqCodec(depths="nominal", entropy=True).options(layer)
            assert [o.name for o in entropy] == [o.name for o in nominal]
            for a, b in zip((b for o in nominal for b in o.bands), (b for o in entropy for b in o.bands)):
                np.testing.assert_array_equal(b.depth, a.depth)
                np.testing.assert_allclose(b.distortion, a.distortion)
                totals = [band.bits.reshape(-1, len(band.depth)).sum(axis=0) for band in (a, b)]
                assert np.all(totals[1] <= totals[0] + 1e-6) and np.any(totals[1] < totals[0])
                checked += 1
    assert checked >= 4


def test_a_served_size_lets_ecsq_compete_in_place_of_tq_unless_told():
    """For a served size tq's codings (at their entropy) measured no better than ecsq's steps: they compete when
    named."""
    assert AutoPass(served_size=10_000).config.codec_names == ["rtn", "fp16", "ecsq"]
    assert "tq" in AutoPass(size=10_000).config.codec_names
    assert AutoPass(served_size=10_000, codecs="rtn+tq+ecsq").config.codec_names == ["rtn", "tq", "ecsq"]
