"""A model too large for one session runs a piece at a time (onnxtq.pieces): the same values, the same
statistics and the same compressed file as in one session, with each piece's weights alone in a session,
the run's new tensors in its scratch file and the output written a tensor at a time."""

import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import bundled, external_copy, make_model, run

from onnxtq import compress, model_io, pieces
from onnxtq import gains as gains_module
from onnxtq import graph as graph_module
from onnxtq.calibration import CalibrationConfig, collect
from onnxtq.calibration.collect import StatsStore
from onnxtq.calibration.data import open_source
from onnxtq.cli import main
from onnxtq.compress import prepare, sweep, sweep_output
from onnxtq.errors import ModelError
from onnxtq.gains import Probe
from onnxtq.graph import Graph, external_data_from, scratch_space
from onnxtq.report import output_line
from onnxtq.target import HeldOut
from onnxtq.variants import Variants
from onnxtq.verify import check_runs
from onnxtq.weights import discover

#: A budget that cuts the bundled models (100-300 kB of weights) into several pieces.
SMALL = 40_000


@pytest.fixture
def small_pieces(monkeypatch):
    monkeypatch.setattr(pieces, "PIECE_BYTES", SMALL)


def _feeds(calib, count=6, batch=2):
    data = np.load(calib)
    return [(batch, {k: data[k][i : i + batch] for k in data.files}) for i in range(0, count, batch)]


@pytest.mark.parametrize("name", ["mnist_cnn", "mnist_transformer", "mnist_rnn"])
def test_outputs_in_pieces_equal_one_session(name, small_pieces):
    path, calib = bundled(name)
    model = onnx.load(path)
    runner = pieces.PieceRunner(model, finals=True)
    assert len(runner.pieces) > 2
    assert all(
        sum(model_io.tensor_nbytes(t) for t in model.graph.initializer if t.name in p.weights) <= SMALL
        or len(p.nodes) == 1
        for p in runner.pieces
    )
    feeds = _feeds(calib)
    got = list(pieces.outputs(model, feeds))
    for (_, feed), outputs in zip(feeds, got):
        for a, b in zip(outputs, run(model, feed)):  # fusions differ across cuts: within float rounding
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


def test_only_the_nodes_asked_for_run():
    path, _ = bundled("mnist_transformer")
    model = onnx.load(path)
    early = next(n.output[0] for n in model.graph.node if n.op_type == "MatMul")
    (piece,) = pieces.plan(model, {early})
    last = max(i for i, n in enumerate(model.graph.node) if early in n.output)
    assert max(piece.nodes) == last  # nothing after the value asked for
    assert len(piece.nodes) < len(model.graph.node)


@pytest.mark.parametrize("name", ["mnist_transformer", "mnist_rnn"])
def test_statistics_in_pieces_are_those_of_one_session(name, monkeypatch):
    path, calib = bundled(name)
    model = onnx.load(path)
    sites = discover(Graph(onnx.load(path))).sites
    exact = CalibrationConfig(products="float64")  # a model run in pieces would take float32 products by default
    whole = collect(model, sites, open_source(calib, model), exact)
    monkeypatch.setattr(pieces, "PIECE_BYTES", SMALL)
    cut = collect(model, sites, open_source(calib, model), exact)
    assert cut.by_site and all(isinstance(v, Path) for v in cut.by_site.values())  # each layer's on disk
    for site in sites:
        a, b = whole.get(site), cut.get(site)
        assert (a is None) == (b is None)
        if a is not None:
            assert (a.count, a.mode, a.block, a.shrinkage) == (b.count, b.mode, b.block, b.shrinkage)
            np.testing.assert_array_equal(a.mean, b.mean)
            np.testing.assert_array_equal(a.moment, b.moment)


def test_a_model_run_in_pieces_takes_float32_products(monkeypatch):
    """Its d×d products in float32 (twice BLAS's speed), each batch's added in float64: the moments are those of
    float64 products to float32's precision, and the mean exactly."""
    path, calib = bundled("mnist_transformer")
    model = onnx.load(path)
    sites = discover(Graph(onnx.load(path))).sites
    wide = collect(model, sites, open_source(calib, model), CalibrationConfig(products="float64"))
    monkeypatch.setattr(pieces, "PIECE_BYTES", SMALL)
    narrow = collect(model, sites, open_source(calib, model), CalibrationConfig())
    compared = 0
    for site in sites:
        a, b = wide.get(site), narrow.get(site)
        if a is not None:
            np.testing.assert_array_equal(a.mean, b.mean)
            scale = np.abs(a.moment).max()
            assert 0 < np.abs(a.moment - b.moment).max() <= 1e-6 * scale
            compared += 1
    assert compared >= 4


@pytest.mark.parametrize(
    "name, pipeline",
    [
        ("mnist_transformer", "calibrate{products=float64},rtn{bits=4,block=32}"),
        ("mnist_rnn", "calibrate{products=float64},tq{rate=3}"),
    ],
)
def test_a_run_in_pieces_writes_the_same_file(name, pipeline, tmp_path, monkeypatch):
    path, calib = bundled(name)
    whole = compress(path, tmp_path / "whole.onnx", pipeline, calib=calib)
    monkeypatch.setattr(pieces, "PIECE_BYTES", SMALL)
    monkeypatch.setattr(graph_module, "SCRATCH_BYTES", 1000)
    monkeypatch.setattr(gains_module, "_affordable", lambda model, samples: samples)  # tq's gains: whole's inputs
    made = []
    monkeypatch.setattr(model_io, "write_whole", _spy(model_io.write_whole, made))
    cut = compress(path, tmp_path / "cut.onnx", pipeline, calib=calib)
    assert (tmp_path / "cut.onnx").read_bytes() == (tmp_path / "whole.onnx").read_bytes()
    assert cut.verification == whole.verification
    assert any(made)  # codes waited on disk


def test_a_cnn_in_pieces_within_the_rounding_of_its_fused_convolutions(tmp_path, monkeypatch):
    """onnxruntime fuses a Conv with the Relu after it only where both are in one piece: the statistics, and so a
    few codes, move by float rounding."""
    path, calib = bundled("mnist_cnn")
    pipeline = "fold-bn,calibrate,rtn{bits=4}"
    whole = compress(path, tmp_path / "whole.onnx", pipeline, calib=calib)
    monkeypatch.setattr(pieces, "PIECE_BYTES", SMALL)
    cut = compress(path, tmp_path / "cut.onnx", pipeline, calib=calib)
    assert cut.bytes_after == whole.bytes_after
    (a,), (b,) = whole.verification["outputs"].values(), cut.verification["outputs"].values()
    assert abs(a["sqnr_db"] - b["sqnr_db"]) < 0.05


def _spy(write_whole, made):
    def spy(model, f):
        made.extend(model_io.made_by_run(t) for t in model.graph.initializer)
        return write_whole(model, f)

    return spy


def test_a_sweep_in_pieces_writes_the_same_files(tmp_path, monkeypatch):
    path, calib = bundled("mnist_transformer")
    pipelines = ["rtn{bits=4}", "rtn{bits=8},dequantize-at-load"]
    assert all(not r.error for r in sweep(path, tmp_path / "a", pipelines, calib=calib))
    monkeypatch.setattr(pieces, "PIECE_BYTES", SMALL)
    assert all(not r.error for r in sweep(path, tmp_path / "b", pipelines, calib=calib))
    for index in range(len(pipelines)):
        a, b = (sweep_output(path, tmp_path / d, index).read_bytes() for d in "ab")
        assert a == b


def test_dequantized_weights_stay_in_their_readers_piece(tmp_path, small_pieces):
    path, calib = bundled("mnist_transformer")
    compress(path, tmp_path / "q.onnx", "calibrate,rtn{bits=4}", calib=calib)
    model = onnx.load(tmp_path / "q.onnx")
    made_by = {o: n.op_type for n in model.graph.node for o in n.output}
    runner = pieces.PieceRunner(model, finals=True)
    assert len(runner.pieces) > 1
    crossing = {name for p in runner.pieces for name in p.reads}
    assert not {name for name in crossing if made_by.get(name) == "DequantizeLinear"}
    outputs = list(pieces.outputs(model, _feeds(calib)))
    for (_, feed), got in zip(_feeds(calib), outputs):
        np.testing.assert_allclose(got[0], run(model, feed)[0], rtol=1e-5, atol=1e-5)


def test_a_value_that_is_not_a_tensor_cannot_cross_pieces(small_pieces):
    rng = np.random.default_rng(0)
    weights = {k: rng.standard_normal((64, 64)).astype(np.float32) for k in ("w1", "w2")}  # 16 kB each
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w1"], ["h"]),
        onnx.helper.make_node("SequenceConstruct", ["h"], ["s"]),
        onnx.helper.make_node("MatMul", ["x", "w2"], ["h2"]),
        onnx.helper.make_node("SequenceAt", ["s", "zero"], ["t"]),
        onnx.helper.make_node("Add", ["h2", "t"], ["y"]),
    ]
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 64])
    model = make_model(nodes, [x], [y], {**weights, "zero": np.array(0, np.int64)})
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pieces, "PIECE_BYTES", 20_000)  # one weight a piece: the sequence crosses
        assert len(pieces.PieceRunner(model, finals=True).pieces) == 2
        with pytest.raises(ModelError, match="'s' crosses between two pieces of the model and is not a tensor"):
            list(pieces.outputs(model, [(1, {"x": np.ones((1, 64), np.float32)})]))


def test_check_runs_in_pieces_sees_the_outputs(small_pieces):
    path, calib = bundled("mnist_cnn")
    model = onnx.load(path)
    shapes = check_runs(model, open_source(calib, model))
    assert shapes == {model.graph.output[0].name: (1, 10)}


@pytest.mark.parametrize("name", ["mnist_cnn", "mnist_transformer"])
def test_one_file_written_a_tensor_at_a_time_is_the_serialized_model(name, tmp_path, monkeypatch):
    path, _ = bundled(name)
    model = onnx.load(path)
    out = io.BytesIO()
    assert model_io.write_whole(model, out) == len(out.getvalue())
    assert out.getvalue() == model.SerializeToString()
    assert model_io.whole_size(model) == len(out.getvalue())
    onnx.external_data_helper.convert_model_to_external_data(model, location="w.bin", size_threshold=1024)
    onnx.save(model, tmp_path / "split.onnx")
    split = onnx.load(tmp_path / "split.onnx", load_external_data=False)
    with external_data_from(tmp_path), scratch_space() as scratch:
        graph = Graph(split)
        big = max(graph.initializers, key=graph.nbytes)
        graph.set_initializer(onnx.numpy_helper.from_array(np.ones(300_000, np.float32), big))  # to scratch
        proto = graph.proto()
        assert model_io.made_by_run(next(t for t in proto.graph.initializer if t.name == big))
        out = io.BytesIO()
        model_io.write_whole(proto, out)
        assert out.getvalue() == model_io.serialize(proto)
        assert scratch.path.stat().st_size == 1_200_000
        monkeypatch.setattr(model_io, "_external_bytes", None)  # counted, never read
        assert model_io.whole_size(proto) == len(out.getvalue())


def test_one_file_holds_the_external_tensors_of_if_bodies(tmp_path):
    """An external tensor in an If body (a bias left there: hoisting lifts only weights) is read into the one
    file, as `serialize` reads it: not left pointing at the input's data."""
    h = onnx.helper
    bias = np.arange(400, dtype=np.float32)
    branches = [
        h.make_graph(
            [h.make_node("Add", ["x", f"b{k}"], [f"y{k}"])],
            f"branch{k}",
            [],
            [h.make_tensor_value_info(f"y{k}", onnx.TensorProto.FLOAT, [400])],
            [onnx.numpy_helper.from_array(bias * (k + 1), f"b{k}")],
        )
        for k in range(2)
    ]
    main = h.make_graph(
        [h.make_node("If", ["c"], ["y"], then_branch=branches[0], else_branch=branches[1])],
        "main",
        [
            h.make_tensor_value_info("c", onnx.TensorProto.BOOL, []),
            h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [400]),
        ],
        [h.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [400])],
        [onnx.numpy_helper.from_array(np.ones((400, 4), np.float32), "w")],
    )
    model = h.make_model(main, opset_imports=[h.make_opsetid("", 21)])
    whole = model.SerializeToString()
    onnx.external_data_helper.convert_model_to_external_data(model, location="w.bin", size_threshold=1024)
    onnx.save(model, tmp_path / "split.onnx")
    split = onnx.load(tmp_path / "split.onnx", load_external_data=False)
    assert sum(onnx.external_data_helper.uses_external_data(t) for t in model_io._nested_tensors(split.graph)) == 2
    with external_data_from(tmp_path):
        out = io.BytesIO()
        assert model_io.write_whole(split, out) == len(out.getvalue()) == model_io.whole_size(split)
        assert out.getvalue() == model_io.serialize(split)
    read = onnx.load_from_string(out.getvalue())
    assert not model_io.external_locations(read)
    assert len(out.getvalue()) == len(whole)


@pytest.mark.parametrize("name", ["mnist_transformer", "mnist_cnn"])
def test_gains_and_marginal_errors_in_pieces_are_those_of_one_session(name, monkeypatch, tmp_path):
    """A weight's variant runs from its own piece on (onnxtq.variants): the output errors are those of the
    whole model with the same weight replaced."""
    path, calib = bundled(name)
    model, _ = prepare(model_io.load(path))
    sites = discover(Graph(model)).sites
    source = open_source(calib, model, limit=8)
    whole = Probe(model, source, samples=8)
    monkeypatch.setattr(pieces, "PIECE_BYTES", SMALL)
    monkeypatch.setattr(gains_module, "_affordable", lambda model, samples: samples)  # the same inputs as whole's
    split = Probe(model, source, samples=8)
    assert split.variants is not None and len(split.variants.pieces) > 2 and split.samples == whole.samples == 8
    np.testing.assert_allclose(split.energy, whole.energy, rtol=1e-5)

    rng = np.random.default_rng(3)
    inits = {t.name: model_io.initializer_array(t) for t in model.graph.initializer}
    replaced = {s.name: inits[s.name] * (1 + 0.05 * rng.normal(size=inits[s.name].shape)) for s in sites}
    expected = whole.marginal(model, replaced)
    got = split.marginal(model, replaced)
    assert got.keys() == expected.keys()
    for weight in expected:
        np.testing.assert_allclose(got[weight], expected[weight], rtol=1e-3)
    waiting = {}  # replacements that wait on disk (auto's, for a model in pieces) are read as their piece runs
    for weight, value in replaced.items():
        waiting[weight] = tmp_path / f"{len(waiting)}.npy"
        np.save(waiting[weight], value)
    assert split.marginal(model, waiting) == got

    # noise seeded per weight in pieces; the same noise through one session gives the same gains
    gains = split.gains(model, sites, lambda s, e: float((e**2).sum()), seed=5)
    noisy = {s.name: gains_module._noisy(inits[s.name], np.random.default_rng([5, i])) for i, s in enumerate(sites)}
    errors = whole.marginal(model, noisy)
    for s in sites:
        made = float(((noisy[s.name].astype(np.float64) - inits[s.name]) ** 2).sum())
        np.testing.assert_allclose(gains[s.name], errors[s.name] / made, rtol=1e-3)

    coded = model_io.load(path)  # any other model: the probe's error of it, in pieces and whole
    for t in coded.graph.initializer:
        if t.name in replaced:
            t.CopyFrom(onnx.numpy_helper.from_array(replaced[t.name].astype(np.float32), t.name))
    coded, _ = prepare(coded)
    np.testing.assert_allclose(split.error(coded), whole.error(coded), rtol=1e-4)


def test_held_out_measure_in_pieces_is_that_of_one_session(monkeypatch):
    path, calib = bundled("mnist_cnn")
    model, _ = prepare(model_io.load(path))
    source = open_source(calib, model, limit=16)
    whole = HeldOut(model, source)
    other = model_io.load(path)
    for t in other.graph.initializer:
        if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) > 1:
            w = onnx.numpy_helper.to_array(t)
            t.CopyFrom(onnx.numpy_helper.from_array((w * 1.01).astype(np.float32), t.name))
    expected = whole.measure(other)
    monkeypatch.setattr(pieces, "PIECE_BYTES", SMALL)
    split = HeldOut(model, source)
    got = split.measure(other)
    np.testing.assert_allclose(got.sqnr_db, expected.sqnr_db, rtol=1e-4)
    np.testing.assert_allclose(got.agreement, expected.agreement, rtol=1e-4)


def test_a_weight_read_in_two_pieces_is_replaced_in_both(monkeypatch):
    """Tied weights (an embedding read again by the logits): a variant replaces the weight wherever it is read."""
    d = 4
    rng = np.random.default_rng(2)
    ws = {"w0": rng.normal(size=(d, d)).astype(np.float32), "w1": rng.normal(size=(d, d)).astype(np.float32)}
    nodes = [
        onnx.helper.make_node("MatMul", ["x", "w0"], ["a"]),
        onnx.helper.make_node("MatMul", ["a", "w1"], ["b"]),
        onnx.helper.make_node("MatMul", ["b", "w0"], ["y"]),
    ]
    value = onnx.helper.make_tensor_value_info
    model = make_model(
        nodes, [value("x", onnx.TensorProto.FLOAT, ["N", d])], [value("y", onnx.TensorProto.FLOAT, ["N", d])], ws
    )
    monkeypatch.setattr(pieces, "PIECE_BYTES", 4 * d * d)  # a piece per MatMul: w0 in the first and the last
    feeds = [{"x": rng.normal(size=(3, d)).astype(np.float32)}]
    runner = Variants(model, feeds)
    assert [p.weights for p in runner.pieces] == [("w0",), ("w1",), ("w0",)]
    other = (ws["w0"] * 1.5).astype(np.float32)
    ((_, outs),) = list(runner.run([("w0", lambda: other)]))
    x = feeds[0]["x"].astype(np.float64)
    np.testing.assert_allclose(outs[0], x @ other @ ws["w1"] @ other, rtol=1e-5)
    np.testing.assert_allclose(runner.reference[0], x @ ws["w0"] @ ws["w1"] @ ws["w0"], rtol=1e-5)


def test_auto_in_pieces_reads_what_it_set_aside_from_disk(tmp_path, monkeypatch):
    """auto on a model run in pieces sets aside what it reads later (tq's bases, the weights its marginal errors
    replace) in .npy files beside the spilled statistics, and its file meets the target."""
    path, calib = bundled("mnist_transformer")
    monkeypatch.setattr(pieces, "PIECE_BYTES", SMALL)
    kept, original = [], StatsStore.keep_array

    def keep_array(store, array):
        kept.append(original(store, array))
        return kept[-1]

    monkeypatch.setattr(StatsStore, "keep_array", keep_array)
    result = compress(path, tmp_path / "out.onnx", "calibrate,auto{bits=4}", calib=calib)
    assert kept and all(isinstance(p, Path) and p.suffix == ".npy" for p in kept)
    auto = next(r for r in result.passes if r.pass_name == "auto")
    assert auto.rate.stored <= 4.0


def test_a_model_run_in_pieces_is_probed_on_fewer_samples(monkeypatch):
    """A probe sample costs a run per layer: a model four pieces' worth of weights gets a quarter of the samples
    (the work they would cost a model of one piece), at least one; a model of one session gets them all."""
    path, calib = bundled("mnist_transformer")
    model, _ = prepare(model_io.load(path))
    source = open_source(calib, model, limit=16)
    assert Probe(model, source, samples=16).samples == 16
    weights = sum(model_io.tensor_nbytes(t) for t in model.graph.initializer)
    monkeypatch.setattr(pieces, "PIECE_BYTES", -(-weights // 4))
    assert Probe(model, source, samples=16).samples == 4
    assert Probe(model, source, samples=3).samples == 1
    monkeypatch.setattr(pieces, "PIECE_BYTES", weights // 100)
    assert Probe(model, source, samples=16).samples == 1


def test_codes_whose_floats_pass_a_piece_are_measured_without_decoding_them_at_load(tmp_path, monkeypatch):
    """A quantized model whose codes fit one session but whose decoded weights do not is run with its
    DequantizeLinear weights decoded at each run, not folded to float at load: the same measures, and
    memory that holds the codes alone (a 4-bit model folded holds eight times its codes)."""
    path, calib = bundled("mnist_transformer")
    model, _ = prepare(model_io.load(path))
    source = open_source(calib, model, limit=16)
    held_out, probe = HeldOut(model, source), Probe(model, source, samples=8)
    compress(path, tmp_path / "q.onnx", "rtn{bits=4}", calib=calib)
    coded = model_io.load(tmp_path / "q.onnx")
    assert pieces.folds(coded) and not pieces.needed(coded)
    expected, expected_error = held_out.measure(coded), probe.error(coded)

    codes = sum(model_io.tensor_nbytes(t) for t in coded.graph.initializer)
    monkeypatch.setattr(pieces, "PIECE_BYTES", 2 * codes)  # the codes fit one session, their floats do not
    assert not pieces.folds(coded) and not pieces.needed(coded)
    folded = []
    monkeypatch.setattr(model_io, "session", _spy_folds(model_io.session, folded))
    got, got_error = held_out.measure(coded), probe.error(coded)
    assert folded == [False, False]
    np.testing.assert_allclose(got.sqnr_db, expected.sqnr_db, rtol=1e-5)
    np.testing.assert_allclose(got_error, expected_error, rtol=1e-5)


def _spy_folds(session, folded):
    def spy(model, *args, **kwargs):
        folded.append(kwargs.get("fold_dequantize", False))
        return session(model, *args, **kwargs)

    return spy


def test_verify_reads_both_models_a_piece_at_a_time_from_their_own_folders(tmp_path, monkeypatch, capsys):
    """`onnxtq verify` on a model run in pieces: each model's weights stay in its own folder's external data
    (nothing read whole), and the figures are those the compress run measured."""
    path, calib = bundled("mnist_transformer")
    original = external_copy(path, tmp_path / "in")
    monkeypatch.setattr(pieces, "PIECE_BYTES", SMALL)
    out = tmp_path / "out" / "small.onnx"
    out.parent.mkdir()
    run = compress(original, out, "calibrate,rtn{bits=4}", calib=calib, external_data=True)
    assert model_io.data_file(out).is_file()

    def whole(*args, **kwargs):
        raise AssertionError("verify read a model's external data whole")

    monkeypatch.setattr(model_io.external_data_helper, "load_external_data_for_model", whole)
    capsys.readouterr()
    assert main(["verify", str(original), str(out), "--calib", str(calib), "--samples", "8"]) == 0
    printed = capsys.readouterr().out
    assert run.verification["samples"] == 8
    for name, v in run.verification["outputs"].items():
        assert output_line(name, v) in printed
