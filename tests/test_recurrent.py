"""Weights the graph hides: recurrent ops (LSTM/GRU W and R), weights inside If branches, LSTM cells that
cut their weights with Slice/Concat, and one weight read by several ops. Each is found, calibrated on
the inputs it really multiplies, coded once and checked against onnxruntime."""

import json

import numpy as np
import onnx
import pytest
from builders import bundled, if_model, make_model, run
from onnx import TensorProto, helper, numpy_helper

from onnxtq import compress
from onnxtq.calibration.collect import CalibrationConfig, collect
from onnxtq.calibration.data import open_source
from onnxtq.cli import main
from onnxtq.compress import prepare
from onnxtq.graph import Graph
from onnxtq.weights import discover


def _sites(model):
    return {s.kind: s for s in discover(Graph(prepare(model)[0])).sites}


def _exposed(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return out


def test_recurrent_weights_are_found_with_their_view():
    path, _ = bundled("mnist_rnn")
    sites = _sites(onnx.load(str(path)))
    assert set(sites) == {"lstm-W", "lstm-R", "gru-W", "gru-R", "gemm"}
    lstm_r, gru_w = sites["lstm-R"], sites["gru-W"]
    assert lstm_r.file_shape == (2, 192, 48) and lstm_r.shape == (384, 48)  # a step per direction, gate, unit
    assert lstm_r.groups == 2 and sites["lstm-W"].groups == 1  # each direction multiplies its own states
    assert gru_w.file_shape == (1, 192, 96) and sites["gru-R"].groups == 1
    assert gru_w.activation == next(n for n in onnx.load(str(path)).graph.node if n.op_type == "GRU").input[0]


def test_r_statistics_are_the_states_it_multiplies():
    """H of R = E[h_{t-1} h_{t-1}ᵀ] per direction, from the op's own Y: checked against the states
    onnxruntime writes, with the zero initial state the model gives as h_0."""
    path, calib = bundled("mnist_rnn")
    model = onnx.load(str(path))
    sites = _sites(model)
    source = open_source(calib, model, limit=32)
    stats = collect(prepare(model)[0], list(sites.values()), source, CalibrationConfig(samples=32, shrink=False))
    nodes = {n.op_type: n for n in model.graph.node}
    x = np.load(calib)["image"][:32]
    y_lstm, y_gru = run(_exposed(model, [nodes["LSTM"].output[0], nodes["GRU"].output[0]]), {"image": x})[-2:]
    for site, y, backward in ((sites["lstm-R"], y_lstm, [False, True]), (sites["gru-R"], y_gru, [False])):
        got = stats.get(site)
        for d, back in enumerate(backward):
            states = (y[1:, d] if back else y[:-1, d]).reshape(-1, y.shape[-1]).astype(np.float64)
            rows = np.concatenate([np.zeros((x.shape[0], y.shape[-1])), states])  # h_0 = 0, given as initial_h
            assert got.count == rows.shape[0]
            np.testing.assert_allclose(got.mean[d], rows.mean(0), atol=1e-6)
            np.testing.assert_allclose(got.moment[d], rows.T @ rows / rows.shape[0], atol=1e-6)
    w = stats.get(sites["lstm-W"])
    rows = x.reshape(-1, 28).astype(np.float64)  # x_t: the image rows
    np.testing.assert_allclose(w.moment[0], rows.T @ rows / rows.shape[0], atol=1e-5)


def _accuracy(path, data) -> float:
    return float((run(onnx.load(str(path)), {"image": data["image"]})[0].argmax(1) == data["label"]).mean())


# measured when written: FP32 97.6%; tq 97.4%, ecsq 97.6%, kq{pq=4} 97.3%, crq 97.4%, auto{bits=3} 97.2%
@pytest.mark.parametrize("method", ["tq{rate=3}", "ecsq{rate=4}", "kq{pq=4}", "crq", "auto{bits=3}"])
def test_every_method_codes_the_recurrent_weights(tmp_path, method):
    path, calib = bundled("mnist_rnn")
    out = tmp_path / "o.onnx"
    report = compress(path, out, f"fold-bn,calibrate,{method}", calib=calib)
    model = onnx.load(str(out))
    floats = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT and len(t.dims) >= 2}
    recurrent = {s.name for s in _sites(onnx.load(str(path))).values() if s.recurrence}
    assert recurrent and not recurrent & floats
    assert {r.name for r in report.passes[-1].changed} >= recurrent
    data = np.load(path.parent / "eval.npz")
    assert _accuracy(out, data) >= _accuracy(path, data) - 0.02


def test_branch_weights_are_calibrated_on_the_inputs_that_take_their_branch(tmp_path):
    rng = np.random.default_rng(1)
    x = np.abs(rng.standard_normal((16, 64))).astype(np.float32)
    x[8:] *= -1  # the first batch of 8 takes then_branch, the second else_branch
    np.savez(tmp_path / "calib.npz", x=x)
    model = if_model()
    work = prepare(model)[0]
    sites = sorted(discover(Graph(work)).sites, key=lambda s: s.name, reverse=True)
    assert [(s.name, s.scope) for s in sites] == [("then_w", "If/then_branch/"), ("else_w", "If/else_branch/")]
    stats = collect(work, sites, open_source(tmp_path / "calib.npz", model), CalibrationConfig(shrink=False))
    for site, part in zip(sites, (x[:8], x[8:])):
        got = stats.get(site)
        assert got.count == 8
        np.testing.assert_allclose(got.moment[0], part.T.astype(np.float64) @ part / 8, rtol=1e-6)
    out = tmp_path / "o.onnx"
    onnx.save(model, str(tmp_path / "if.onnx"))
    assert (
        main(["compress", str(tmp_path / "if.onnx"), "-o", str(out), "--pipeline", "fold-bn,calibrate,rtn{bits=8}"])
        == 0
    )
    compressed = onnx.load(str(out))
    assert not [t for t in compressed.graph.initializer if t.name in ("then_w", "else_w")]
    for part in (x[:8], x[8:]):
        ref = run(model, {"x": part})[0]
        np.testing.assert_allclose(run(compressed, {"x": part})[0], ref, atol=0.02 * np.abs(ref).max())


def lstm_cell_model(cut_axis: int = 0) -> onnx.ModelProto:
    """An LSTM step as exporters write an LSTMCell inside an If: W [4h, d] cut in two by Slice, put back by
    Concat and given a direction axis by Unsqueeze."""
    rng = np.random.default_rng(2)
    h, d = 16, 24
    w = (rng.standard_normal((4 * h, d)) / np.sqrt(d)).astype(np.float32)
    r = (rng.standard_normal((4 * h, h)) / np.sqrt(h)).astype(np.float32)
    body, inits = [], [numpy_helper.from_array(w, "w_ih"), numpy_helper.from_array(r, "w_hh")]
    inits += [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in {"ax": [cut_axis], "u": [0]}.items()]
    for name, t in (("w_ih", w), ("w_hh", r)):
        cut = t.shape[cut_axis] // 2
        inits += [numpy_helper.from_array(np.array([v], np.int64), f"{name}_{v}") for v in {0, cut, t.shape[cut_axis]}]
        body += [
            helper.make_node("Slice", [name, f"{name}_0", f"{name}_{cut}", "ax"], [f"{name}_lo"]),
            helper.make_node("Slice", [name, f"{name}_{cut}", f"{name}_{t.shape[cut_axis]}", "ax"], [f"{name}_hi"]),
            helper.make_node("Concat", [f"{name}_hi", f"{name}_lo"], [f"{name}_cat"], axis=cut_axis),
            helper.make_node("Unsqueeze", [f"{name}_cat", "u"], [f"{name}_3d"]),
        ]
    body.append(helper.make_node("LSTM", ["x", "w_ih_3d", "w_hh_3d", "", "", "h0"], ["", "h1"], hidden_size=h))
    out = helper.make_tensor_value_info("h1", TensorProto.FLOAT, None)
    then = helper.make_graph(body, "then", [], [out], inits)
    other = helper.make_graph(
        [helper.make_node("Identity", ["h0"], ["same"])],
        "else",
        [],
        [helper.make_tensor_value_info("same", TensorProto.FLOAT, None)],
    )
    nodes = [helper.make_node("If", ["go"], ["y"], then_branch=then, else_branch=other)]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "B", d]),
        helper.make_tensor_value_info("h0", TensorProto.FLOAT, [1, "B", h]),
        helper.make_tensor_value_info("go", TensorProto.BOOL, []),
    ]
    return make_model(nodes, inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "B", h])], {})


def test_lstm_cell_weights_cut_by_slices_are_coded_in_place(tmp_path):
    model = lstm_cell_model()
    sites = _sites(model)
    assert sites["lstm-W"].name == "w_ih" and sites["lstm-W"].shape == (64, 24)
    assert sites["lstm-R"].initial == ("h0",)  # one step at a time: R multiplies the given state
    rng = np.random.default_rng(3)
    feeds = {
        "x": rng.standard_normal((64, 1, 1, 24)).astype(np.float32),
        "h0": rng.standard_normal((64, 1, 1, 16)).astype(np.float32),
        "go": np.ones(64, bool),
    }
    np.savez(tmp_path / "calib.npz", **feeds)
    onnx.save(model, str(tmp_path / "cell.onnx"))
    out = tmp_path / "o.onnx"
    argv = ["compress", str(tmp_path / "cell.onnx"), "-o", str(out), "--report", str(tmp_path / "r.json")]
    assert main([*argv, "--pipeline", "fold-bn,calibrate,rtn{bits=8,min_elements=0}"]) == 0
    records = {r["name"]: r for p in json.load(open(tmp_path / "r.json"))["passes"] for r in p["records"]}
    assert records["w_hh"]["status"] == "quantized" and records["w_hh"]["output_sqnr_db"] > 40
    feed = {"x": feeds["x"][0], "h0": feeds["h0"][0], "go": np.array(True)}
    ref = run(model, feed)[0]
    np.testing.assert_allclose(run(onnx.load(str(out)), feed)[0], ref, atol=0.01)
    cut_last = discover(Graph(prepare(lstm_cell_model(cut_axis=1))[0]))
    assert not cut_last.sites and "cuts along its last axis" in cut_last.skipped[0][2]


def test_inspect_lists_every_site_with_kind_scope_and_passes(tmp_path, capsys):
    path, _ = bundled("mnist_rnn")
    assert main(["inspect", str(path), "--json"]) == 0
    weights = json.loads(capsys.readouterr().out)["weights"]
    assert [w["kind"] for w in weights] == ["lstm-W", "lstm-R", "gru-W", "gru-R", "gemm"]
    assert weights[1]["shape"] == [2, 192, 48] and weights[1]["statistics"]
    assert weights[0]["passes"]["rtn"] == "" and "pq=0" in weights[0]["passes"]["kq"]
    onnx.save(if_model(), str(tmp_path / "if.onnx"))
    assert main(["inspect", str(tmp_path / "if.onnx")]) == 0
    text = capsys.readouterr().out
    assert "then_w  in If/then_branch" in text and "else_w  in If/else_branch" in text


def test_a_target_run_holds_out_inputs_whose_batch_is_not_on_axis_0(tmp_path):
    """A streaming model (silero VAD) takes a state [2, batch, h] and a scalar: each calibration row is one
    whole feed, and the held-out split takes whole rows (it masked axis 0 of each input: IndexError, exit 1)."""
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((64, 16)) / 8).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("ReduceSum", ["state", "axes"], ["s"], keepdims=0),
        helper.make_node("Add", ["m", "s"], ["y0"]),
        helper.make_node("Mul", ["y0", "gain"], ["y"]),
    ]
    inputs = [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 64]),
        helper.make_tensor_value_info("state", TensorProto.FLOAT, [2, "B", 16]),
        helper.make_tensor_value_info("gain", TensorProto.FLOAT, []),
    ]
    model = make_model(
        nodes,
        inputs,
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 16])],
        {"w": w, "axes": np.array([0], np.int64)},
    )
    onnx.save(model, str(tmp_path / "stream.onnx"))
    n = 32
    np.savez(
        tmp_path / "calib.npz",
        x=rng.standard_normal((n, 1, 64)).astype(np.float32),
        state=rng.standard_normal((n, 2, 1, 16)).astype(np.float32),
        gain=np.ones(n, np.float32),
    )
    argv = [
        "compress",
        str(tmp_path / "stream.onnx"),
        "-o",
        str(tmp_path / "o.onnx"),
        "--calib",
        str(tmp_path / "calib.npz"),
    ]
    assert main([*argv, "--sqnr", "25"]) == 0
    feed = {
        "x": rng.standard_normal((1, 64)).astype(np.float32),
        "state": np.zeros((2, 1, 16), np.float32),
        "gain": np.array(1, np.float32),
    }
    ref = run(model, feed)[0]
    assert 10 * np.log10((ref**2).sum() / ((run(onnx.load(str(tmp_path / "o.onnx")), feed)[0] - ref) ** 2).sum()) > 20
