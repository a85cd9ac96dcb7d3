"""Compiled inner loops (numba) where numpy would pass over memory once per operation.

The clipping search of round-to-nearest (onnxtq.quantize) tries 51 clipping ratios on every weight: in numpy
each ratio is eight passes over the row (divide, round, clip, multiply, subtract, square, weight, sum), on a
1.3B-parameter model 46 s of 2 cores. Here each weight is read once for all ratios, ten times faster. The codes
themselves (`codes`) are the same float64 arithmetic numpy does, without its four temporaries, and a MatMul
weight, whose channels are its columns, is laid out row by row and back in tiles (`rows_of`), not by numpy's
element-by-element strided copy. GPTQ's column-by-column rounding (onnxtq.reconstruct) runs its inner loop here
too, in numpy's order of operations, between numpy's own BLAS block updates, and so do kq's k-means steps
(the nearest codeword of each kernel without its [N, K] cost matrix, the weighted sums np.add.at made slowly).

The arithmetic is numpy's, operation for operation, in float32: the same correctly rounded divide, round
half to even, clip, products, and the row sums in numpy's own pairwise order (blocks of 8 partial sums
under 128 values, halves above). So the error of every ratio, and the ratio chosen, are bit for bit what the
numpy formulation gives (tests/test_quantize.py compares them).
"""

from __future__ import annotations

import functools

import numba
import numpy as np

#: numpy's pairwise summation: below this many values, eight running sums.
_PAIRWISE_BLOCK = 128


@numba.njit(inline="always", error_model="numpy")
def _error(x, weight, step, zero, lo, hi, weighted):
    """One weight's squared error on the grid (step, zero point), times its importance when `weighted`."""
    q = min(max(np.rint(x / step) + zero, lo), hi) - zero
    e = x - q * step
    e = e * e
    return weight * e if weighted else e


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _leaf(w, h, weighted, steps, zeros, lo, hi, start, n, out):
    """out[a] = Σ_{j in [start, start+n)} h_j (w_j − ŵ_j)² on grid a, as numpy sums n ≤ 128 values: one running
    sum under 8 values, else 8 interleaved ones added in pairs, then the rest one by one."""
    grids = steps.shape[0]
    if n < 8:
        for a in range(grids):
            total = np.float32(0.0)
            for j in range(start, start + n):
                total += _error(w[j], h[j], steps[a], zeros[a], lo, hi, weighted)
            out[a] = total
        return
    r = np.empty((8, grids), np.float32)
    for k in range(8):
        for a in range(grids):
            r[k, a] = _error(w[start + k], h[start + k], steps[a], zeros[a], lo, hi, weighted)
    i = 8
    while i < n - n % 8:
        for k in range(8):
            x, weight = w[start + i + k], h[start + i + k]
            for a in range(grids):
                r[k, a] += _error(x, weight, steps[a], zeros[a], lo, hi, weighted)
        i += 8
    for a in range(grids):
        out[a] = ((r[0, a] + r[1, a]) + (r[2, a] + r[3, a])) + ((r[4, a] + r[5, a]) + (r[6, a] + r[7, a]))
    while i < n:
        x, weight = w[start + i], h[start + i]
        for a in range(grids):
            out[a] += _error(x, weight, steps[a], zeros[a], lo, hi, weighted)
        i += 1


@functools.lru_cache(maxsize=64)
def pairwise_program(n: int) -> np.ndarray:
    """numpy's pairwise summation of n values as a postfix program, rows (start, length) for a leaf sum and
    (-1, -1) to add the two sums on top of the stack: above 128 values numpy sums the halves (the first cut to a
    multiple of 8) and adds them."""
    steps: list[tuple[int, int]] = []

    def visit(start: int, length: int) -> None:
        if length <= _PAIRWISE_BLOCK:
            steps.append((start, length))
            return
        half = length // 2
        half -= half % 8
        visit(start, half)
        visit(start + half, length - half)
        steps.append((-1, -1))

    visit(0, n)
    return np.array(steps, np.int64)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _row_errors(w, h, weighted, steps, zeros, lo, hi, program, out):
    """out[a] = Σ_j h_j (w_j − ŵ_j)² over the row on grid a, summed in numpy's pairwise order (`program`)."""
    stack = np.empty((program.shape[0], steps.shape[0]), np.float32)
    top = 0
    for p in range(program.shape[0]):
        start, n = program[p, 0], program[p, 1]
        if start >= 0:
            _leaf(w, h, weighted, steps, zeros, lo, hi, start, n, stack[top])
            top += 1
        else:
            top -= 1
            stack[top - 1] += stack[top]
    out[:] = stack[0]


@numba.njit(inline="always", error_model="numpy")
def _grid(ratio, low, high, peak, lo, hi, symmetric):
    """numpy's grid of clipping ratio α: symmetric steps α·max|w|/qhi, asymmetric ones covering
    [α·min(w, 0), α·max(w, 0)] with a rounded zero point (a step of 0 becomes 1)."""
    ratio = np.float32(ratio)
    if symmetric:
        step = ratio * peak / max(hi, np.float32(1.0))
        return (step if step > 0 else np.float32(1.0)), np.float32(0.0)
    bottom = min(low, np.float32(0.0)) * ratio
    step = (max(high, np.float32(0.0)) * ratio - bottom) / (hi - lo)
    step = step if step > 0 else np.float32(1.0)
    return step, min(max(np.rint(-bottom / step), lo), hi)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _clip_search(w, h, weighted, ratios, qlo, qhi, symmetric, program):
    """Per row of w [G, S] (float32), the step and zero point of least (h-weighted) squared error over the
    clipping `ratios`: the first ratio that beats every one before it, the grid of ratio 1 if none has a
    finite error (weights so large their squares overflow)."""
    rows, cols = w.shape
    grids = ratios.shape[0]
    best_step, best_zero = np.empty(rows, np.float32), np.zeros(rows, np.float32)
    steps, zeros, errors = np.empty(grids, np.float32), np.zeros(grids, np.float32), np.empty(grids, np.float32)
    lo, hi = np.float32(qlo), np.float32(qhi)
    for g in range(rows):
        low, high, peak = np.float32(np.inf), np.float32(-np.inf), np.float32(0.0)
        for j in range(cols):
            v = w[g, j]
            low, high, peak = min(low, v), max(high, v), max(peak, abs(v))
        for a in range(grids):
            steps[a], zeros[a] = _grid(ratios[a], low, high, peak, lo, hi, symmetric)
        _row_errors(w[g], h[g if weighted else 0], weighted, steps, zeros, lo, hi, program, errors)
        best_step[g], best_zero[g] = _grid(1.0, low, high, peak, lo, hi, symmetric)
        least = np.inf
        for a in range(grids):
            if errors[a] < least:
                least, best_step[g], best_zero[g] = errors[a], steps[a], zeros[a]
    return best_step, best_zero


def clip_search(w: np.ndarray, h: np.ndarray | None, ratios: np.ndarray, qrange: tuple[int, int], symmetric: bool):
    """Per row of w [G, S] (float32), the step and zero point of least (h-weighted, h [G, S]) squared error over
    the clipping `ratios`, as `_clip_search` finds them."""
    program = pairwise_program(w.shape[1])
    return _clip_search(w, w if h is None else h, h is not None, ratios, *qrange, symmetric, program)


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _codes(w, steps, zeros, lo, hi, out):
    for g in range(w.shape[0]):
        step, zero = steps[g], zeros[g]
        for j in range(w.shape[1]):
            out[g, j] = np.int32(min(max(np.rint(np.float64(w[g, j]) / step) + zero, lo), hi))


def codes(
    w: np.ndarray, steps: np.ndarray, zeros: np.ndarray | None, qrange: tuple[int, int], out: np.ndarray | None = None
) -> np.ndarray:
    """clip(round(w / step) + zero point) per row of w [G, S], in float64 (as numpy computes it), as int32 (into
    `out` if given)."""
    out = np.empty(w.shape, np.int32) if out is None else out
    zeros = np.zeros(len(steps)) if zeros is None else zeros.astype(np.float64)
    _codes(w, steps.astype(np.float64), zeros, np.float64(qrange[0]), np.float64(qrange[1]), out)
    return out


#: Side of the square tiles a transposing copy moves at once: rows 4 kB apart share cache sets, so wider tiles
#: evict their own lines (a 1024x4096 float32 copy: 10.5 ms with 16, 27 ms with 32, numpy 16.8 ms).
_TILE = 16


@numba.njit(nogil=True, cache=True)
def _transpose(a, out):
    rows, cols = a.shape
    for i0 in range(0, rows, _TILE):
        i1 = min(i0 + _TILE, rows)
        for j0 in range(0, cols, _TILE):
            j1 = min(j0 + _TILE, cols)
            for i in range(i0, i1):
                for j in range(j0, j1):
                    out[j, i] = a[i, j]


def _columns(a: np.ndarray) -> bool:
    """Whether 2-D `a` is a transposed view: a row's values lie a row apart (a MatMul weight's groups)."""
    return a.ndim == 2 and not a.flags.c_contiguous and a.strides[0] == a.itemsize


def rows_of(a: np.ndarray, dtype=None, out: np.ndarray | None = None) -> np.ndarray:
    """`a` laid out C-contiguous (as `dtype`), into `out` if given: a 2-D transposed view (a MatMul weight's channels,
    or some of them) is copied tile by tile, anything else by numpy."""
    dtype = np.dtype(dtype or a.dtype)
    if _columns(a) and a.dtype == dtype and a.size:
        out = np.empty(a.shape, dtype) if out is None else out
        _transpose(a.T, out)
        return out
    if out is None:
        return np.ascontiguousarray(a, dtype)
    out[...] = a
    return out


@numba.njit(nogil=True, cache=True)
def _dequantize(q, steps, zeros, out):
    for g in range(q.shape[0]):
        step, zero = np.float64(steps[g]), zeros[g]
        for j in range(q.shape[1]):
            out[g, j] = np.float32((q[g, j] - zero) * step)


@numba.njit(nogil=True, cache=True)
def _dequantize_columns(q, steps, zeros, out):
    """_dequantize into out [S, G]: row g of q is column g of out, written tile by tile (as _transpose)."""
    rows, cols = q.shape
    for g0 in range(0, rows, _TILE):
        g1 = min(g0 + _TILE, rows)
        for j0 in range(0, cols, _TILE):
            j1 = min(j0 + _TILE, cols)
            for g in range(g0, g1):
                step, zero = np.float64(steps[g]), zeros[g]
                for j in range(j0, j1):
                    out[j, g] = np.float32((q[g, j] - zero) * step)


def dequantize(q: np.ndarray, steps: np.ndarray, zeros: np.ndarray | None, out: np.ndarray | None = None) -> np.ndarray:
    """(q − zero point) · step per row of q [G, S] (int32), in float64, as float32: numpy's arithmetic in one pass.
    Into `out` [G, S] if given: a transposed view (a MatMul weight's groups) is written tile by tile, so the weight
    comes out in its own layout without a second pass to lay it out."""
    out = np.empty(q.shape, np.float32) if out is None else out
    zeros = np.zeros(len(steps), np.int32) if zeros is None else zeros.astype(np.int32)
    q, steps = np.ascontiguousarray(q, np.int32), steps.astype(np.float64)
    if _columns(out):
        _dequantize_columns(q, steps, zeros, out.T)
    else:
        _dequantize(q, steps, zeros, out)
    return out


@numba.njit(nogil=True, cache=True)
def _energies(w, w_hat):
    signal, noise = 0.0, 0.0
    for i in range(w.size):
        x = np.float64(w[i])
        e = x - np.float64(w_hat[i])
        signal += x * x
        noise += e * e
    return signal, noise


def energies(w: np.ndarray, w_hat: np.ndarray) -> tuple[float, float]:
    """(Σ w², Σ (w − ŵ)²) in float64, one pass over both: a weight's SQNR without float64 copies of it and its
    error (a 123M-weight model's report figures took 1.2 s that way); both read in C order, copied only if laid
    out otherwise."""
    if w.shape != w_hat.shape:
        raise ValueError(f"a weight of shape {w.shape} against one of shape {w_hat.shape}")
    return _energies(np.ascontiguousarray(w).reshape(-1), np.ascontiguousarray(w_hat).reshape(-1))


@numba.njit(nogil=True, cache=True, error_model="numpy")
def gptq_block(w, q, errors, u, step, zero, lo, hi, i1):
    """Round a block of columns one after the other onto the grid, each column's error, scaled by 1/U_jj, pushed
    onto the block's columns after it through U (the upper Cholesky factor of H⁻¹, [P, d, d]). The block comes
    laid out column by column, w [P, B, r] from column i1 on (and so the grid, step, zero, lo, hi), so each step
    runs along every row at once in vector registers (row by row, the pushes were a few columns long and
    scalar: twice the time); the codes go to q, the scaled errors to errors, both [P, B, r]."""
    for p in range(w.shape[0]):
        for c in range(w.shape[1]):
            pivot = u[p, i1 + c, i1 + c]
            for r in range(w.shape[2]):
                x = w[p, c, r]
                code = min(max(np.rint(x / step[p, c, r]) + zero[p, c, r], lo[p, c, r]), hi[p, c, r])
                q[p, c, r] = code
                errors[p, c, r] = (x - step[p, c, r] * (code - zero[p, c, r])) / pivot
            for k in range(c, w.shape[1]):
                push = u[p, i1 + c, i1 + k]
                for r in range(w.shape[2]):
                    w[p, k, r] -= errors[p, c, r] * push


@numba.njit(nogil=True, cache=True, error_model="numpy")
def _cheapest(xmx, cross, shared, index, weight, idx, cost):
    for i in range(cross.shape[0]):
        best, least = 0, np.inf
        for k in range(cross.shape[1]):
            c = weight[i] * max((xmx[i] - cross[i, k]) + shared[index[i], k], 0.0)
            if c < least or k == 0:
                best, least = k, c
        idx[i], cost[i] = best, least


def cheapest(xmx: np.ndarray, cross: np.ndarray, shared: np.ndarray, metric) -> tuple[np.ndarray, np.ndarray]:
    """Per item i the codeword k of least w_i·max(x_iᵀM x_i − 2 (M x_i)·q_k + vec(M)·vec(q_k q_kᵀ), 0) (the first
    on ties, as argmin) and that cost: `cross` [N, K] the middle terms, `shared` [G, K] the last per metric."""
    idx, cost = np.empty(len(xmx), np.int64), np.empty(len(xmx))
    _cheapest(xmx, np.ascontiguousarray(cross), shared, metric.index, np.asarray(metric.weight, np.float64), idx, cost)
    return idx, cost


@numba.njit(nogil=True, cache=True)
def _add_weighted(total, labels, weight, rows, index):
    for i in range(labels.shape[0]):
        for e in range(rows.shape[1]):
            total[labels[i], e] += weight[i] * rows[index[i], e]


def add_weighted(total: np.ndarray, labels: np.ndarray, weight: np.ndarray, rows: np.ndarray, index: np.ndarray):
    """total[labels[i]] += weight[i] · rows[index[i]] for each item i in order: np.add.at's sums, without its
    [N, width] product array and its element-by-element dispatch."""
    weight, rows = np.asarray(weight, np.float64), np.ascontiguousarray(rows)
    _add_weighted(total, np.asarray(labels), weight, rows, np.asarray(index))
