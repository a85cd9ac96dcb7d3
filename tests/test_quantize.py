"""Uniform quantizer: grouping mirrors DequantizeLinear, codes stay in range, clipping helps."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxtq import kernels
from onnxtq.emit import dequantized
from onnxtq.quantize import CLIP_GRID, Blocking, _clip_search, _grid_for, int_range, quantize_groups


@settings(max_examples=50, deadline=None)
@given(
    shape=st.sampled_from([(6, 5), (4, 7, 3, 3), (3, 40), (8, 1, 3, 3)]),
    axis=st.sampled_from([0, 1]),
    block=st.sampled_from([0, 2, 4, 16]),
)
def test_grouping_round_trip(shape, axis, block):
    a = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    b = Blocking(shape, axis, block, 1 - axis)
    groups = b.to_groups(a)
    assert groups.shape[0] == int(np.prod(b.scale_shape))
    assert np.array_equal(b.from_groups(groups), a)
    # scale tensor: each group's value lands where DequantizeLinear reads it
    ids = np.arange(groups.shape[0], dtype=np.float32)
    scales = b.scales_to_shape(ids)
    per_elem = b.from_groups(np.repeat(ids[:, None], groups.shape[1], axis=1))
    if block:
        expected = np.repeat(scales, block, axis=1 - axis)[tuple(slice(0, s) for s in shape)]
    else:
        view = [1] * len(shape)
        view[axis] = -1
        expected = np.broadcast_to(scales.reshape(view), shape)
    assert np.array_equal(expected, per_elem)


@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), symmetric=st.booleans(), seed=st.integers(0, 1000))
def test_codes_in_range_and_error_bounded(bits, symmetric, seed):
    w = np.random.default_rng(seed).standard_normal((5, 64)).astype(np.float32)
    code = quantize_groups(w, bits, symmetric, clip=False)
    lo, hi = int_range(bits, symmetric)
    assert code.q.min() >= lo and code.q.max() <= hi
    err = np.abs(code.dequantize() - w)
    # without clipping every value lies inside the grid: error at most half a step (+1 step slack for the
    # asymmetric positive end of a symmetric grid)
    assert (err <= code.scale[:, None] * (1.0 if symmetric else 0.5) + 1e-6).all()


def test_mse_clipping_beats_full_range_on_heavy_tails(rng):
    w = rng.standard_t(2, size=(16, 256)).astype(np.float32)
    full = quantize_groups(w, 4, True, clip=False).dequantize()
    clipped = quantize_groups(w, 4, True, clip=True).dequantize()
    assert ((clipped - w) ** 2).sum() < 0.8 * ((full - w) ** 2).sum()


def test_weighted_error_prefers_important_columns(rng):
    w = rng.standard_normal((8, 64)).astype(np.float32)
    h = np.ones_like(w)
    h[:, :8] = 1000.0  # the first columns dominate the output error
    plain = quantize_groups(w, 3, True, True, None).dequantize()
    weighted = quantize_groups(w, 3, True, True, h).dequantize()
    cost = lambda x: (h * (x - w) ** 2).sum()  # noqa: E731
    assert cost(weighted) <= cost(plain)


def test_zero_rows_are_safe():
    code = quantize_groups(np.zeros((3, 8), np.float32), 4, True)
    assert np.all(code.dequantize() == 0) and np.all(code.scale > 0)


def _numpy_search(w, h, qrange, symmetric):
    """The clipping search written as numpy operations on whole rows (what onnxtq.kernels compiles)."""
    best_scale, best_zp = _grid_for(w, 1.0, qrange, symmetric)
    best_err = np.full(w.shape[0], np.inf)
    for alpha in CLIP_GRID:
        scale, zp = _grid_for(w, float(alpha), qrange, symmetric)
        z = 0 if zp is None else zp[:, None]
        q = np.clip(np.round(w / scale[:, None]) + z, *qrange) - z
        err = np.square(w - q * scale[:, None])
        err = (err if h is None else h * err).sum(axis=1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zp = best_zp if zp is None else np.where(better, zp, best_zp)
    return best_scale, best_zp


@settings(max_examples=200, deadline=None)
@given(
    cols=st.sampled_from([1, 5, 7, 8, 9, 16, 17, 100, 127, 128, 129, 136, 255, 256, 257, 1000, 2049]),
    rows=st.integers(1, 12),
    bits=st.sampled_from([2, 3, 4, 8]),
    symmetric=st.booleans(),
    weighted=st.booleans(),
    scale=st.sampled_from([1e-3, 0.05, 1.0, 3e18]),
    zeros=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_compiled_search_chooses_what_numpy_does(cols, rows, bits, symmetric, weighted, scale, zeros, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, (rows, cols)) * scale).astype(np.float32)  # 3e18: squares overflow float32
    if zeros:
        w[:, : cols // 2] = 0
        w[0] = 0
    h = (rng.random((rows, cols)) ** 3).astype(np.float32) if weighted else None
    qrange = int_range(bits, symmetric)
    step, zero = _clip_search(w, h, qrange, symmetric)
    want_step, want_zero = _numpy_search(w, h, qrange, symmetric)
    np.testing.assert_array_equal(step, want_step)
    if not symmetric:
        np.testing.assert_array_equal(zero, want_zero)


@settings(max_examples=100, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), symmetric=st.booleans(), fp16=st.booleans(), seed=st.integers(0, 2**16))
def test_the_compiled_codes_are_numpys(bits, symmetric, fp16, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, (7, 300)) * 0.1).astype(np.float32)
    code = quantize_groups(w, bits, symmetric, True, None, np.float16 if fp16 else np.float32)
    z = 0 if code.zero_point is None else code.zero_point[:, None].astype(np.float32)
    steps = code.scale.astype(np.float64)[:, None]
    want = np.clip(np.round(w.astype(np.float64) / steps) + z, *int_range(bits, symmetric))
    np.testing.assert_array_equal(code.q, want.astype(np.int32))


def test_codes_decode_straight_into_a_matmul_weights_own_layout():
    rng = np.random.default_rng(3)
    for block, shape in ((0, (300, 40)), (32, (256, 40)), (32, (300, 40))):  # per channel; blocks, padded or not
        blocking = Blocking(shape, axis=1, block=block, block_axis=0)  # a MatMul weight [in, out]
        w = rng.standard_normal(shape).astype(np.float32)
        code = quantize_groups(blocking.to_groups(w), 4)
        decoded = dequantized(blocking, code)
        assert decoded.flags.c_contiguous
        np.testing.assert_array_equal(decoded, blocking.from_groups(code.dequantize()))


def test_a_weights_energies_are_float64_sums():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((300, 40)).astype(np.float32)
    w_hat = np.asfortranarray(w + rng.standard_normal(w.shape).astype(np.float32) * 0.01)  # read in w's order
    w64, loss = w.astype(np.float64), w.astype(np.float64) - w_hat
    signal, noise = kernels.energies(w, w_hat)
    np.testing.assert_allclose([signal, noise], [np.vdot(w64, w64), np.vdot(loss, loss)], rtol=1e-12)
    with pytest.raises(ValueError, match="shape"):
        kernels.energies(w, w_hat.T)
