"""Reconstruction math on layers with correlated inputs: GPTQ and the cluster pull beat rounding on
the layer objective tr(ΔW H ΔWᵀ), step refits are the exact minimiser, and problem splitting
(full, block-diagonal and diagonal H, groups) round-trips."""

import numpy as np
import pytest

from onnxtq.calibration.stats import MomentAccumulator
from onnxtq.reconstruct import (
    DAMP,
    GPTQ_BLOCK,
    Grid,
    Problems,
    _act_order,
    _columns,
    cluster_pull,
    damped,
    gptq,
    refit_steps,
)


def _layer(rng, n=24, d=48, samples=4000, mode="full", block=16, groups=1):
    """Weights [n, d] and statistics of correlated, non-centred inputs (as after a ReLU)."""
    mix = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    x = np.maximum(rng.standard_normal((samples, groups, d)) @ mix, 0)
    acc = MomentAccumulator(groups, d, mode, block)
    acc.update(x)
    w = rng.standard_normal((n, d))
    return w, acc.finalize()


def _grid(w0, bits=2):
    hi = 2 ** (bits - 1) - 1
    step = np.abs(w0).max(axis=2, keepdims=True) / max(hi, 1) * np.ones_like(w0)
    return Grid(step, np.zeros_like(w0), -hi, hi)


@pytest.mark.parametrize("mode", ["full", "blocked", "diag"])
def test_split_join_round_trip(rng, mode):
    w, stats = _layer(rng, n=12, d=40, mode=mode, block=16, groups=3)
    problems = Problems(stats, 12)
    parts = problems.split(w)
    assert parts.shape[1:] == (4, problems.width)  # 3 groups of 4 rows
    np.testing.assert_array_equal(problems.join(parts), w)
    delta = rng.standard_normal(parts.shape) * (problems.split(np.ones_like(w)) > 0)  # padding carries no error
    expected = stats.quadratic(problems.join(delta))
    assert problems.row_error(delta).sum() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_and_cluster_pull_beat_rounding(rng, bits):
    w, stats = _layer(rng)
    problems = Problems(stats, w.shape[0])
    w0 = problems.split(w)
    grid = _grid(w0, bits)

    def error(codes):
        return problems.row_error(grid.values(codes) - w0).sum()

    rtn = error(grid.codes(w0))
    by_gptq = gptq(w0, problems.hessian, grid)
    pulled = cluster_pull(w0, problems.hessian, grid)
    for codes in (by_gptq, pulled):
        assert codes.min() >= grid.lo and codes.max() <= grid.hi
        assert np.array_equal(codes, np.round(codes))
    assert error(by_gptq) < 0.8 * rtn
    assert error(pulled) < rtn


def test_refit_steps_is_the_least_squares_step(rng):
    w, stats = _layer(rng, mode="blocked", block=16)
    problems = Problems(stats, w.shape[0])
    w0 = problems.split(w)
    grid = _grid(w0, 3)
    codes = grid.codes(w0)
    steps = refit_steps(problems, w0, codes, grid)

    def error(step_per_row):
        g = Grid(problems.split(np.repeat(step_per_row[:, None], w.shape[1], axis=1), 1.0), grid.zero, -3, 3)
        return problems.row_error(g.values(codes) - w0)

    best = error(steps)
    for factor in (0.98, 1.02):
        assert np.all(best <= error(steps * factor) + 1e-12)
    assert best.sum() < error(problems.join(grid.step)[:, 0]).sum()


def test_dead_inputs_do_not_break_gptq(rng):
    w, stats = _layer(rng, d=16)
    stats.moment[:, 3, :] = stats.moment[:, :, 3] = 0  # an input that is always zero
    problems = Problems(stats, w.shape[0])
    w0 = problems.split(w)
    codes = gptq(w0, problems.hessian, _grid(w0))
    assert np.isfinite(codes).all()


def _numpy_gptq(w0, hessian, grid):
    """GPTQ's column loop as numpy operations on whole columns (what onnxtq.kernels compiles), after act order."""
    order, inverse, h = _act_order(hessian)
    fields = {f: _columns(getattr(grid, f), order) for f in ("step", "zero", "lo", "hi")}
    grid = Grid(**fields)
    u = np.swapaxes(np.linalg.cholesky(np.linalg.inv(damped(h, DAMP))), 1, 2)
    w = _columns(w0, order).astype(np.float64, copy=True)
    q = np.empty_like(w)
    for i1 in range(0, w.shape[2], GPTQ_BLOCK):
        i2 = min(i1 + GPTQ_BLOCK, w.shape[2])
        errors = np.empty(w.shape[:2] + (i2 - i1,))
        for j in range(i1, i2):
            q[:, :, j] = grid.codes(w[:, :, j], (slice(None), slice(None), j))
            err = (w[:, :, j] - grid.values(q[:, :, j], (slice(None), slice(None), j))) / u[:, j, j][:, None]
            w[:, :, j:i2] -= err[:, :, None] * u[:, None, j, j:i2]
            errors[:, :, j - i1] = err
        w[:, :, i2:] -= errors @ u[:, i1:i2, i2:]
    return _columns(q, inverse)


@pytest.mark.parametrize("width, mixed", [(7, False), (300, False), (300, True)])
def test_the_compiled_gptq_is_numpys(rng, width, mixed):
    problems, rows = 3, 17
    x = rng.standard_normal((problems, 4 * width, width))
    hessian = np.swapaxes(x, 1, 2) @ x / x.shape[1]
    w0 = rng.standard_normal((problems, rows, width))
    step = np.broadcast_to(rng.uniform(0.05, 0.3, (problems, rows, 1)), w0.shape).copy()
    zero = np.broadcast_to(rng.integers(0, 3, (problems, rows, 1)).astype(np.float64), w0.shape).copy()
    lo, hi = (rng.choice([-2, -8], w0.shape), rng.choice([1, 7], w0.shape)) if mixed else (-8, 7)
    grid = Grid(step, zero, lo, hi)
    np.testing.assert_array_equal(gptq(w0, hessian, grid), _numpy_gptq(w0, hessian, grid))
