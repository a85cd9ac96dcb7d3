"""Layer statistics: im2col honours pads/strides/dilations/groups, checked against onnxruntime's Conv.

For any weight W, E‖W x‖² computed from the accumulated H must equal the mean squared
output of the real Conv over every position, and W·E[x] its mean output.
"""

import numpy as np
import pytest
from builders import make_model, run
from onnx import TensorProto, helper

from onnxtq.calibration.stats import LayerStats, MomentAccumulator, conv_patches, dense_rows
from onnxtq.weights import ConvGeometry

CASES = [
    dict(c=4, n=6, k=(3, 3), strides=(1, 1), pads=(1, 1, 1, 1), dil=(1, 1), group=1, auto_pad="NOTSET"),
    dict(c=4, n=8, k=(3, 3), strides=(2, 2), pads=(0, 1, 2, 1), dil=(1, 1), group=2, auto_pad="NOTSET"),
    dict(c=6, n=6, k=(3, 3), strides=(1, 2), pads=(2, 2, 2, 2), dil=(2, 2), group=6, auto_pad="NOTSET"),
    dict(c=3, n=5, k=(2, 3), strides=(2, 2), pads=(0, 0, 0, 0), dil=(1, 1), group=1, auto_pad="SAME_UPPER"),
    dict(c=3, n=5, k=(3, 2), strides=(2, 1), pads=(0, 0, 0, 0), dil=(1, 1), group=1, auto_pad="SAME_LOWER"),
    dict(c=3, n=4, k=(1, 1), strides=(1, 1), pads=(0, 0, 0, 0), dil=(1, 1), group=1, auto_pad="VALID"),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("mode", ["full", "blocked", "diag"])
def test_conv_moments_match_onnxruntime(case, mode, rng):
    c, n, k, g = case["c"], case["n"], case["k"], case["group"]
    w = rng.standard_normal((n, c // g, *k)).astype(np.float32)
    attrs = dict(kernel_shape=list(k), strides=list(case["strides"]), dilations=list(case["dil"]), group=g)
    attrs.update(auto_pad=case["auto_pad"]) if case["auto_pad"] != "NOTSET" else attrs.update(pads=list(case["pads"]))
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attrs)
    x_info = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, c, 9, 11])
    y_info = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n, None, None])
    model = make_model([node], [x_info], [y_info], {"w": w})
    x = rng.standard_normal((3, c, 9, 11)).astype(np.float32) + 0.5
    y = run(model, {"x": x})[0].astype(np.float64)

    geo = ConvGeometry(k, case["strides"], case["pads"], case["dil"], g, case["auto_pad"])
    dg = c // g * k[0] * k[1]
    acc = MomentAccumulator(g, dg, mode, block=5)
    for chunk in conv_patches(x[:2], geo):  # two streams merged must equal one pass over all
        acc.update(chunk)
    rest = MomentAccumulator(g, dg, mode, block=5)
    for chunk in conv_patches(x[2:], geo):
        rest.update(chunk)
    acc.merge(rest)
    stats = acc.finalize()

    assert stats.count == y.shape[0] * y.shape[2] * y.shape[3]
    mean_out = np.einsum("nd,nd->n", w.reshape(n, -1), np.repeat(stats.mean, n // g, axis=0))
    np.testing.assert_allclose(mean_out, y.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    if mode == "full":
        energy = (y**2).sum(axis=1).mean()
        np.testing.assert_allclose(stats.quadratic(w.reshape(n, -1)), energy, rtol=1e-4)
    # every mode agrees on the diagonal, which is E[x_j²]
    w_diag = np.zeros_like(w.reshape(n, -1))
    w_diag[np.arange(n), np.arange(n) % dg] = 1.0
    per_row = np.array([stats.diag()[o // (n // g), o % dg] for o in range(n)])
    np.testing.assert_allclose(stats.quadratic(w_diag), per_row.sum(), rtol=1e-6)


def test_dense_rows_and_transposed_input(rng):
    x = rng.standard_normal((4, 7, 5))
    acc = MomentAccumulator(1, 5, "full")
    for chunk in dense_rows(x):
        acc.update(chunk)
    flat = x.reshape(-1, 5)
    np.testing.assert_allclose(acc.finalize().moment[0], flat.T @ flat / len(flat))
    a = rng.standard_normal((5, 9))  # Gemm transA: rows of Aᵀ
    acc = MomentAccumulator(1, 5, "full")
    for chunk in dense_rows(a, trans_a=True):
        acc.update(chunk)
    np.testing.assert_allclose(acc.finalize().moment[0], a @ a.T / 9)


def test_sampled_positions_estimate_the_moments(rng):
    geo = ConvGeometry((3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
    x = rng.standard_normal((4, 3, 40, 40)) * np.arange(1, 4)[None, :, None, None]
    exact, sampled = MomentAccumulator(1, 27, "full"), MomentAccumulator(1, 27, "full")
    for chunk in conv_patches(x, geo):
        exact.update(chunk)
    for chunk in conv_patches(x, geo, max_positions=600, rng=np.random.default_rng(0)):
        sampled.update(chunk)
    assert sampled.count == 4 * 600 and exact.count == 4 * 1600
    np.testing.assert_allclose(sampled.finalize().diag(), exact.finalize().diag(), rtol=0.15)


def _gaussian_inputs(rng, samples, d=96, rho=0.6):
    """Correlated, non-centred inputs x = m + L z with cov ρ^|i−j|; returns (x [samples, 1, d], true H)."""
    cov = rho ** np.abs(np.subtract.outer(np.arange(d), np.arange(d)))
    mean = rng.uniform(0, 1, d)
    x = mean + rng.standard_normal((samples, d)) @ np.linalg.cholesky(cov).T
    return x[:, None, :], cov + np.outer(mean, mean)


def test_shrunk_moments_generalise_where_samples_are_few(rng):
    """Fewer samples than columns (a classifier after global pooling): GPTQ fitted to the sample H hides its
    error where the samples never went; on the true H, the shrunk estimate's fit is the better one. The mean
    and the diagonal are kept, and many samples leave the covariance nearly as it is."""
    from onnxtq.reconstruct import Grid, Problems, gptq

    x, true_h = _gaussian_inputs(rng, 48)
    acc = MomentAccumulator(1, 96, "full")
    acc.update(x)
    sample = acc.finalize()
    shrunk = sample.shrunk()
    assert shrunk.shrinkage > 0.3
    np.testing.assert_allclose(np.diagonal(shrunk.moment[0]), np.diagonal(sample.moment[0]), rtol=1e-12)
    np.testing.assert_array_equal(shrunk.mean, sample.mean)

    w = rng.standard_normal((1, 32, 96))  # one problem of 32 rows
    step = np.abs(w).max(axis=2, keepdims=True) * np.ones_like(w)
    grid = Grid(step, np.zeros_like(w), -1, 1)  # ternary: where the fit matters most

    def true_error(stats):
        delta = grid.values(gptq(w, Problems(stats, 32).hessian, grid))[0] - w[0]
        return float(np.einsum("nd,de,ne->", delta, true_h, delta))

    assert true_error(shrunk) < 0.8 * true_error(sample)

    many = MomentAccumulator(1, 96, "full")
    many.update(_gaussian_inputs(rng, 20000)[0])
    assert many.finalize().shrunk().shrinkage < 0.02


@pytest.mark.parametrize("mode", ["full", "blocked", "diag"])
def test_spilled_statistics_read_back_whole_or_mapped(mode, rng, tmp_path):
    acc = MomentAccumulator(2, 10, mode, block=4)
    acc.update(rng.standard_normal((50, 2, 10)))  # patches [P, g, d]
    stats = acc.finalize().shrunk()
    stats.save(tmp_path / "0.npz")
    for mapped in (False, True):
        back = LayerStats.load(tmp_path / "0.npz", mapped=mapped)
        assert (back.count, back.mode, back.block, back.shrinkage) == (stats.count, mode, stats.block, stats.shrinkage)
        np.testing.assert_array_equal(back.mean, stats.mean)
        np.testing.assert_array_equal(back.moment, stats.moment)
        assert isinstance(back.moment, np.memmap) == mapped  # a summary reads no moments


@pytest.mark.parametrize("rows", [5, 40])  # fewer rows than columns (r·H), more (the symmetric rᵀr)
def test_float32_report_products_agree_with_float64(rows, rng):
    acc = MomentAccumulator(1, 12, "full")
    acc.update(rng.standard_normal((200, 1, 12)) + 0.5)
    stats = acc.finalize()
    m = rng.standard_normal((rows, 12))
    np.testing.assert_allclose(stats.quadratic(m, np.float32), stats.quadratic(m), rtol=1e-5)
