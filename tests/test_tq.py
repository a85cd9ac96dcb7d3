"""tq on the shipped real models: the rate target is met, transforms pay where they are kept, what
ORT computes equals the numpy product T·B, and the report carries the three rates and the bound."""

import numpy as np
import onnx
import pytest
from builders import bundled, conv_model, make_model, matmul_site, run
from onnx import TensorProto, helper

from onnxtq import compress, transforms
from onnxtq.calibration.stats import LayerStats
from onnxtq.codec import Layer
from onnxtq.codecs.tq import TqCodec
from onnxtq.emit import Piece, emit_transformed
from onnxtq.errors import UsageError
from onnxtq.graph import Graph
from onnxtq.pipeline import parse
from onnxtq.weights import discover


def _accuracy(path, name):
    data = np.load(bundled(name)[0].parent / "eval.npz")
    logits = run(onnx.load(str(path)), {"image": data["image"]})[0]
    return float((logits.argmax(1) == data["label"]).mean())


def _tq(report):
    return next(p for p in report.passes if p.pass_name == "tq")


# measured when written (mnist_cnn, held-out accuracy, FP32 98.0%): rtn 2-bit 95.3% (small layers in float,
# 22.9 KB), tq rate=2 96.7-97.0% at 20.0 KB, rate=3 97.7%, rate=4 98.3%; identity transform at rate 2: 75.9%.
def test_tq_meets_the_rate_and_beats_rtn(tmp_path):
    path, calib = bundled("mnist_cnn")
    rtn = compress(path, tmp_path / "rtn.onnx", "fold-bn,calibrate,rtn{bits=2}", calib=calib)
    tq = compress(path, tmp_path / "tq.onnx", "fold-bn,calibrate,tq{rate=2}", calib=calib)
    assert tq.bytes_after < rtn.bytes_after
    assert _accuracy(tmp_path / "tq.onnx", "mnist_cnn") >= _accuracy(tmp_path / "rtn.onnx", "mnist_cnn")
    records = _tq(tq).changed
    weights = sum(int(np.prod(r.shape)) for r in records)
    assert sum(r.bytes_after for r in records) * 8 <= 2.0 * weights  # container rate within the target
    assert all(r.bound_bits is not None and 0 <= r.bound_bits < r.bits for r in records)
    assert all(r.nominal_bits <= r.bits for r in records)
    notes = " ".join(_tq(tq).notes)
    assert "Gaussian bound" in notes and "additivity" in notes and "measured" in notes
    transformed = [r for r in records if r.detail.startswith("elt")]
    assert transformed, "the 3x3 convs of mnist_cnn pay for their basis at 2 bits"


def test_more_rate_gives_more_fidelity(tmp_path):
    path, calib = bundled("mnist_cnn")
    sqnr = []
    for rate in (2, 3, 4):
        r = compress(path, tmp_path / f"r{rate}.onnx", f"fold-bn,calibrate,tq{{rate={rate}}}", calib=calib)
        sqnr.append(min(v["sqnr_db"] for v in r.verification["outputs"].values()))
    assert sqnr[0] < sqnr[1] < sqnr[2]


def test_factored_and_folded_runtimes_compute_the_same_model(tmp_path):
    """Two graph constructions of Ŵ = T̂·B̂ (two convs, or the product folded in the graph) agree."""
    path, calib = bundled("mnist_cnn")
    data = np.load(path.parent / "eval.npz")["image"][:32]
    outs = []
    for runtime in ("factored", "folded"):
        out = tmp_path / f"{runtime}.onnx"
        compress(path, out, f"fold-bn,calibrate,tq{{rate=2,runtime={runtime}}}", calib=calib)
        model = onnx.load(str(out))
        kinds = {p.value for n in model.graph.node for p in n.metadata_props if p.key == "onnxtq.role"}
        assert ("basis" in kinds) == (runtime == "factored") and ("product" in kinds) == (runtime == "folded")
        outs.append(run(model, {"image": data})[0])
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4 * np.abs(outs[0]).max())


def test_transformer_matmuls_through_tq(tmp_path):
    path, calib = bundled("mnist_transformer")
    tq = compress(path, tmp_path / "tq.onnx", "fold-bn,calibrate,tq{rate=4,transform=klt}", calib=calib)
    assert _accuracy(tmp_path / "tq.onnx", "mnist_transformer") > 0.95
    assert {r.op for r in _tq(tq).changed} >= {"MatMul"}


@pytest.mark.parametrize("op", ["Conv", "Gemm", "MatMul"])
@pytest.mark.parametrize("factored", [True, False])
def test_emitted_factorisation_is_the_numpy_product(rng, op, factored):
    """Integer T and B with unit steps: ORT must compute exactly y = x·(T·B)ᵀ (+ bias)."""
    n, c, k = 6, 5, 3
    t = rng.integers(-7, 8, (n, k, 3, 3) if op == "Conv" else (n, k))
    b = rng.integers(-7, 8, (k, c))
    if op == "Conv":
        model = conv_model(c_in=c, c_out=n, bn=False, pads=[1, 1, 1, 1], strides=[2, 2])
        feeds = {"x": rng.standard_normal((2, c, 10, 10)).astype(np.float32)}
    else:
        shape = (n, c) if op == "Gemm" else (c, n)
        node = (
            helper.make_node("Gemm", ["x", "w", "bias"], ["y"], name="fc", transB=1)
            if op == "Gemm"
            else helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")
        )
        inits = {"w": np.zeros(shape, np.float32)} | ({"bias": np.ones(n, np.float32)} if op == "Gemm" else {})
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])
        model = make_model([node], [x], [y], inits, opset=21)
        feeds = {"x": rng.standard_normal((4, c)).astype(np.float32)}
    model = onnx.version_converter.convert_version(model, 21)
    graph = Graph(model)
    site = discover(graph).sites[0]
    w = np.einsum("nk...,kc->nc...", t, b).astype(np.float32)
    stored_w = w.T if site.transposed else w
    reference = _with_weight(model, onnx.numpy_helper.from_array(stored_w, site.name))
    axis_in, axis_out = (0, 1) if site.transposed else (1, 0)
    stored_t = t.T if site.transposed else t
    pieces = [
        Piece(np.take(stored_t, range(0, 2), axis=axis_in), np.ones(n, np.float32), None, 4, axis_out),
        Piece(np.take(stored_t, range(2, k), axis=axis_in), np.ones(n, np.float32), None, 8, axis_out),
    ]
    b_stored = b.T if site.transposed else (b[:, :, None, None] if op == "Conv" else b)
    basis = Piece(b_stored, np.ones(k, np.float32), None, 4, 1 if site.transposed else 0)
    emit_transformed(graph, site, pieces, basis, factored, "tq")
    onnx.checker.check_model(graph.proto(), full_check=True)
    np.testing.assert_allclose(run(graph.proto(), feeds)[0], run(reference, feeds)[0], rtol=1e-5, atol=1e-4)


def _with_weight(model: onnx.ModelProto, tensor: onnx.TensorProto) -> onnx.ModelProto:
    """A copy of `model` with the initializer of the same name replaced by `tensor`."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    next(t for t in copy.graph.initializer if t.name == tensor.name).CopyFrom(tensor)
    return copy


@pytest.mark.parametrize(
    "spec", ["tq{rate=0}", "tq{transform=dct}", "tq{depths=odd}", "tq{runtime=gpu}", "tq{rate=3,size=1000}"]
)
def test_bad_options_are_usage_errors(spec):
    with pytest.raises(UsageError):
        parse(f"fold-bn,calibrate,{spec}")


def test_rows_at_their_own_depths_are_put_back_in_order(rng):
    """Rows grouped by depth (8-bit and 2-bit pieces joined on the output axis) and re-ordered by a Gather."""
    from onnxtq.emit import emit_pieces

    model = conv_model(c_in=4, c_out=6, bn=False)
    graph = Graph(onnx.version_converter.convert_version(model, 25))
    site = next(s for s in discover(graph).sites if s.op == "Conv")
    q = rng.integers(-100, 100, site.shape)
    steps = rng.uniform(0.01, 0.1, 6)
    low = np.array([1, 4])  # these rows get 2-bit codes (unsigned, zero point 1)
    q[low] = rng.integers(0, 4, (2, *site.shape[1:]))
    zp = np.array([1, 1])
    high = np.setdiff1d(np.arange(6), low)
    w = q * steps[:, None, None, None]
    w[low] = (q[low] - 1) * steps[low, None, None, None]
    pieces = [
        Piece(q[high], steps[high].astype(np.float32), None, 8, 0),
        Piece(q[low], steps[low].astype(np.float32), zp, 2, 0),
    ]
    reference = _with_weight(graph.proto(), onnx.numpy_helper.from_array(w.astype(np.float32), site.name))
    emit_pieces(graph, site, pieces, 0, "tq", order=np.concatenate([high, low]))
    onnx.checker.check_model(graph.proto(), full_check=True)
    feeds = {"x": rng.standard_normal((2, 4, 10, 10)).astype(np.float32)}
    np.testing.assert_allclose(run(graph.proto(), feeds)[0], run(reference, feeds)[0], rtol=1e-5, atol=1e-5)


def test_two_plane_depths_decode_to_their_codes(rng):
    """Rows at 6 and 12 bits (each two planes: DequantizeLinear of the high plane at 2^low × the step, of the
    low plane, and their Add) beside 4-bit rows, float16 steps: onnxruntime computes q·step exactly."""
    from onnxtq.emit import emit_pieces
    from onnxtq.packing import planes
    from onnxtq.quantize import int_range

    model = conv_model(c_in=4, c_out=6, bn=False)
    graph = Graph(onnx.version_converter.convert_version(model, 25))
    site = next(s for s in discover(graph).sites if s.op == "Conv")
    groups = {6: np.array([0, 3]), 12: np.array([5]), 4: np.array([1, 2, 4])}
    steps = rng.uniform(0.001, 0.1, 6).astype(np.float16)
    q = np.zeros(site.shape, np.int64)
    for bits, rows in groups.items():
        lo, hi = int_range(bits, True)
        q[rows] = rng.integers(lo, hi + 1, (len(rows), *site.shape[1:]))
        q[rows[0], 0, 0, 0], q[rows[-1], 0, 0, 1] = lo, hi  # the range's ends
    w = q * steps.astype(np.float32)[:, None, None, None]
    pieces = [Piece(q[rows], steps[rows], None, bits, 0) for bits, rows in groups.items()]
    reference = _with_weight(graph.proto(), onnx.numpy_helper.from_array(w.astype(np.float32), site.name))
    stored = emit_pieces(graph, site, pieces, 0, "tq", order=np.concatenate(list(groups.values())))
    proto = graph.proto()
    onnx.checker.check_model(proto, full_check=True)
    assert sum(n.op_type == "DequantizeLinear" for n in proto.graph.node) == 5
    codes = [t for t in proto.graph.initializer if t.name.endswith("onnxtq.q")]
    per_row = int(np.prod(site.shape[1:]))
    widths = [(len(rows), w) for bits, rows in groups.items() for w in planes(bits)]
    assert sorted(t.data_type for t in codes) == sorted(
        [TensorProto.INT4, TensorProto.UINT2, TensorProto.INT8, TensorProto.UINT4, TensorProto.INT4]
    )
    assert sum(len(t.raw_data) for t in codes) == sum(-(-n * per_row * w // 8) for n, w in widths)
    assert stored < q.size  # fewer bytes than 8-bit codes, steps included
    feeds = {"x": rng.standard_normal((2, 4, 10, 10)).astype(np.float32)}
    np.testing.assert_allclose(run(proto, feeds)[0], run(reference, feeds)[0], rtol=1e-5, atol=1e-5)


def test_size_and_fidelity_targets(tmp_path):
    """`size` bounds the file, `sqnr` the predicted output SQNR (the prediction is pessimistic: measured ≥)."""
    path, calib = bundled("mnist_cnn")
    sized = compress(path, tmp_path / "s.onnx", "fold-bn,calibrate,tq{size=24000}", calib=calib)
    assert 20000 < sized.bytes_after <= 24000
    target = compress(path, tmp_path / "q.onnx", "fold-bn,calibrate,tq{sqnr=25}", calib=calib)
    assert min(v["sqnr_db"] for v in target.verification["outputs"].values()) >= 25
    assert (
        target.bytes_after
        < compress(path, tmp_path / "r.onnx", "fold-bn,calibrate,tq{rate=6}", calib=calib).bytes_after
    )


@pytest.mark.parametrize("columns", [361, 362, 364])
def test_2bit_matmul_weights_survive_onnxruntime_fusion(rng, columns):
    """onnxruntime fuses DequantizeLinear(2-bit) → MatMul into MatMulNBits and miscomputes when N % 4 != 0;
    the guard the pass manager runs splits such weights so default sessions compute what numpy does."""
    import ml_dtypes
    from onnx import numpy_helper
    from onnxtq.passes.guard_matmul_2bit import split_unsafe_2bit_matmul_weights

    d = 120
    q = rng.integers(0, 4, (d, columns)).astype(ml_dtypes.uint2)
    steps = rng.uniform(0.01, 0.1, columns).astype(np.float32)
    zero = rng.integers(0, 4, columns).astype(ml_dtypes.uint2)
    inits = [numpy_helper.from_array(a, n) for a, n in ((q, "q"), (steps, "s"), (zero, "z"))]
    nodes = [
        helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=1),
        helper.make_node("MatMul", ["x", "w"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, d])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, columns])
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 25)]
    )
    model.ir_version = 11
    graph = Graph(model)
    assert split_unsafe_2bit_matmul_weights(graph) == (columns % 4 != 0)
    onnx.checker.check_model(graph.proto(), full_check=True)
    feed = {"x": rng.standard_normal((4, d)).astype(np.float32)}
    expect = feed["x"] @ ((q.astype(np.float64) - zero.astype(np.float64)) * steps)
    got = run(graph.proto(), feed)[0]  # fusion still on; accuracy level 0 keeps float activations
    np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4)


def test_transform_channels_no_row_reaches_hold_zero(rng):
    """A layer of fewer outputs than inputs spans at most n·kk input channels: an eigenbasis's channels past them
    hold zero coefficients, set exactly (rounding leaves about 1e-20, whose squares are subnormal floats that the
    step search computed 36 times slower); the channels before them are the transform's own."""
    n, d = 16, 64
    w = rng.standard_normal((d, n)).astype(np.float32)  # a MatMul weight, [inputs, outputs]
    x = rng.standard_normal((512, d)) @ rng.standard_normal((d, d))
    stats = LayerStats(len(x), x.mean(0)[None], "full", (x.T @ x / len(x))[None])
    layer = TqCodec().layer(Layer(matmul_site(d, n), w, stats))
    coding = next(c for c in layer.codings if c.transform is not None)
    computed = transforms.coefficients(layer.w, coding.transform.analysis)
    assert 0 < np.abs(computed[:, n:]).max() < 1e-9 * np.abs(computed).max()  # rounding, not signal
    assert not coding.coeffs[:, n:].any()
    np.testing.assert_array_equal(coding.coeffs[:, :n], computed[:, :n])
