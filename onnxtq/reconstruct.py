"""Layer-wise reconstruction: codes on a fixed grid that minimise the layer-output error.

    D(Ŵ) = tr((Ŵ − W) H (Ŵ − W)ᵀ) = E‖(Ŵ − W) x‖²,   H = E[x xᵀ] from calibration

Rows (output channels) are independent under D, so every tool here is exact per row:
* `gptq`: error-feedback rounding (OBQ/GPTQ): round one column, push its error onto the
  columns not yet rounded through the Cholesky factor of H⁻¹, so later roundings compensate.
* `cluster_pull`: cluster-regularized quantization (CRQ) carried into post-training, as ADMM on
  D + ρ‖W − Z‖² with Z on the grid: the float weights are pulled toward the grid points nearest
  them while D stays small, ρ annealed upward until W sits on the grid.
* `refit_steps`: with codes fixed, each row's step that minimises D, in closed form.

A layer is cut into independent `Problems` [P, rows, d] that share H within a problem: one per
conv group (a depthwise conv has one per channel), times one per diagonal block when H is kept
block-diagonal (or per column when only diag(H) is known, where everything reduces to rounding).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import scipy.linalg.lapack

from onnxtq import kernels
from onnxtq.calibration.stats import LayerStats
from onnxtq.quantize import GroupCode

#: Relative damping of H (fraction of its mean diagonal) that keeps H⁻¹ well conditioned.
DAMP = 0.01
#: Columns rounded between two lazy (matrix-matrix) updates in GPTQ.
GPTQ_BLOCK = 128
#: Above this depth the grid is fine enough that the cluster pull gains nothing GPTQ does not.
CLUSTER_PULL_MAX_BITS = 4


@dataclass
class Grid:
    """Per-weight uniform grid: value = step·(q − zero), q integer in [lo, hi].

    lo and hi are one range for all weights, or arrays of the weights' shape (mixed bit depths).
    """

    step: np.ndarray  # same shape as the weights, or one column (a step per row)
    zero: np.ndarray  # the same shape as step, integer-valued
    lo: int | np.ndarray
    hi: int | np.ndarray

    def codes(self, w: np.ndarray, sl=...) -> np.ndarray:
        return np.clip(np.round(w / self.step[sl]) + self.zero[sl], _at(self.lo, sl), _at(self.hi, sl))

    def values(self, q: np.ndarray, sl=...) -> np.ndarray:
        return self.step[sl] * (q - self.zero[sl])

    def project(self, w: np.ndarray) -> np.ndarray:
        return self.values(self.codes(w))


class Problems:
    """A layer's weight matrix [n, D] cut into problems [P, r, d] with their Hessians [P, d, d]."""

    def __init__(self, stats: LayerStats, n: int):
        self.groups, self.dim, self.rows = stats.groups, stats.dim, n // stats.groups
        if stats.mode == "full":
            self.width, self.blocks = self.dim, 1
            self.hessian = stats.moment
        elif stats.mode == "blocked":
            self.width, self.blocks = stats.block, stats.moment.shape[1]
            self.hessian = stats.moment.reshape(-1, self.width, self.width)
        else:  # diag: every column is its own problem
            self.width, self.blocks = 1, self.dim
            self.hessian = stats.moment.reshape(-1, 1, 1)

    def split(self, m: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """[n, d] (rows of each group together) → [P, r, width]."""
        g, r = self.groups, self.rows
        pad = self.blocks * self.width - self.dim
        m = m.reshape(g, r, self.dim)
        if pad:
            m = np.concatenate([m, np.full((g, r, pad), fill, m.dtype)], axis=2)
        return m.reshape(g, r, self.blocks, self.width).transpose(0, 2, 1, 3).reshape(-1, r, self.width)

    def join(self, p: np.ndarray) -> np.ndarray:
        g, r = self.groups, self.rows
        m = p.reshape(g, self.blocks, r, self.width).transpose(0, 2, 1, 3).reshape(g, r, -1)
        return m[:, :, : self.dim].reshape(g * r, self.dim)

    def row_error(self, delta: np.ndarray) -> np.ndarray:
        """D per row of the layer, [n], for a difference given as problems [P, r, width]."""
        per = _quadratic(delta, self.hessian)
        return per.reshape(self.groups, self.blocks, self.rows).sum(axis=1).reshape(-1)


def _quadratic(delta: np.ndarray, h: np.ndarray) -> np.ndarray:
    """δᵀ H δ for every row of every problem, [P, r] (a BLAS product, not a 3-operand einsum)."""
    return ((delta @ h) * delta).sum(axis=2)


def damped(h: np.ndarray, damp: float, copy: bool = True) -> np.ndarray:
    """H + damp·mean(diag)·I, with dead inputs (zero diagonal) made harmless; without `copy`, in `h` itself where
    it is float64 (a caller's own permuted copy)."""
    h = h.astype(np.float64, copy=copy)
    diag = np.einsum("pdd->pd", h)
    dead = diag <= 0
    idx = np.arange(h.shape[1])
    h[:, idx, idx] += np.where(dead, 1.0, 0.0)
    mean = np.maximum(np.einsum("pdd->pd", h).mean(axis=1), 1e-30)
    h[:, idx, idx] += damp * mean[:, None]
    return h


@dataclass(frozen=True)
class GptqFactor:
    """What GPTQ derives from H alone, made once for the many gridings of one H: the act order (and its
    inverse) and the upper Cholesky factor U of the damped, reordered H⁻¹ (H⁻¹ = Uᵀ U), whose rows give the
    optimal error propagation."""

    order: np.ndarray
    inverse: np.ndarray
    u: np.ndarray  # C-contiguous: the kernel walks its rows, once per griding


def gptq_factor(hessian: np.ndarray, damp: float = DAMP) -> GptqFactor:
    order, inverse, h = _act_order(hessian)
    u = [inverse_cholesky(a) for a in damped(h, damp, copy=False)]
    return GptqFactor(order, inverse, u[0][None] if len(u) == 1 else np.stack(u))  # one problem: not copied


def inverse_cholesky(a: np.ndarray) -> np.ndarray:
    """U, upper triangular, with a⁻¹ = Uᵀ U, without forming a⁻¹: with J the order reversal, J a J = L Lᵀ gives
    a⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J). A Cholesky and a triangular inverse, against an inverse and a Cholesky: 3x
    quicker on the 3,072-wide H of a 123M model's MLP."""
    lower, info = scipy.linalg.lapack.dpotrf(np.asfortranarray(a[::-1, ::-1]), lower=1, clean=1, overwrite_a=1)
    if info == 0:
        lower, info = scipy.linalg.lapack.dtrtri(lower, lower=1, overwrite_c=1)
    if info:
        raise np.linalg.LinAlgError(f"H is not positive definite (LAPACK info {info})")
    return np.ascontiguousarray(lower[::-1, ::-1])


def gptq(
    w0: np.ndarray, hessian: np.ndarray, grid: Grid, damp: float = DAMP, factor: GptqFactor | None = None
) -> np.ndarray:
    """Error-feedback rounding of w0 [P, r, d] onto `grid`; returns the integer codes.

    Columns go in order of decreasing H_jj ("act order"): the inputs that matter most are
    rounded first, while the most columns remain to absorb their error. `factor` is `gptq_factor(hessian,
    damp)` where the caller rounds onto several grids with one H.
    """
    factor = factor or gptq_factor(hessian, damp)
    order = factor.order
    permuted = dataclasses.replace(grid, **{f: _columns(getattr(grid, f), order) for f in ("step", "zero", "lo", "hi")})
    return _columns(_gptq_in_order(_columns(w0, order), factor.u, permuted), factor.inverse)


def feedback_sensitivity(hessian: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """1/U_jj² per column [P, d]: the layer-output error one unit of rounding error in column j costs
    once `gptq` has let the columns after it compensate (its order and damping). Equal-slope steps
    for error-feedback rounding scale as U_jj, as plain rounding's scale as 1/√H_jj."""
    factor = gptq_factor(hessian, damp)
    u_diag = np.diagonal(factor.u, axis1=1, axis2=2)
    return np.take_along_axis(1.0 / u_diag**2, factor.inverse, axis=1)


def _act_order(hessian: np.ndarray):
    """Column order by decreasing H_jj, its inverse, and H permuted to it."""
    order = np.argsort(-np.einsum("pdd->pd", hessian), axis=1, kind="stable")  # [P, d]
    take = np.arange(len(order))[:, None]
    inverse = np.argsort(order, axis=1)
    return order, inverse, hessian[take[:, :, None], order[:, :, None], order[:, None, :]]


def _columns(a, order: np.ndarray):
    """a [P, r, d] with each problem's columns taken in `order` [P, d] (a scalar, or one column that rows
    broadcast, stays as it is)."""
    if np.isscalar(a) or a.shape[-1] == 1:
        return a
    if len(order) == 1:  # one order for all (a whole layer): np.take, contiguous as the kernel wants, 3x faster
        return np.take(a, order[0], axis=2)
    return np.take_along_axis(a, order[:, None, :], axis=2)


def _at(bound, sl):
    return bound if np.isscalar(bound) else bound[sl]


def _gptq_in_order(w0: np.ndarray, u: np.ndarray, grid: Grid) -> np.ndarray:
    w = np.array(w0, np.float64, order="C")
    q = np.empty_like(w)
    d = w.shape[2]
    fields = (grid.step, grid.zero, grid.lo, grid.hi)
    grid_arrays = [np.broadcast_to(np.asarray(a, np.float64), w.shape) for a in fields]
    u = np.ascontiguousarray(u)  # the kernel walks U's rows (a factor's U is laid out so already)
    for i1 in range(0, d, GPTQ_BLOCK):
        i2 = min(i1 + GPTQ_BLOCK, d)
        block = [_by_column(a[:, :, i1:i2]) for a in (w, *grid_arrays)]
        codes, errors = np.empty_like(block[0]), np.empty_like(block[0])
        kernels.gptq_block(block[0], codes, errors, u, *block[1:], i1)  # the block's columns one by one
        q[:, :, i1:i2] = codes.transpose(0, 2, 1)
        w[:, :, i2:] -= _by_column(errors) @ u[:, i1:i2, i2:]
    return q


def _by_column(a: np.ndarray) -> np.ndarray:
    """[P, x, y] laid out as [P, y, x], C-contiguous."""
    return np.ascontiguousarray(a.transpose(0, 2, 1))


def cluster_pull(
    w0: np.ndarray, hessian: np.ndarray, grid: Grid, iterations: int = 40, growth: float = 1.25
) -> np.ndarray:
    """ADMM on D(W) + indicator(Z on grid), W = Z: returns the codes of the best Z it visited.

    W ← (2·W0·H + ρ(Z − U))(2H + ρI)⁻¹ via one eigendecomposition of H; Z ← grid(W + U);
    U ← U + W − Z; ρ grows geometrically from a twentieth of H's mean diagonal.
    """
    h = damped(hessian, 1e-6)
    lam, vec = np.linalg.eigh(h)
    target = 2 * w0 @ h  # [P, r, d]
    rho = 0.05 * lam.mean(axis=1)[:, None, None]
    z = grid.project(w0)
    u = np.zeros_like(z)
    best = grid.codes(w0)
    best_err = _quadratic(z - w0, h)
    for _ in range(iterations):
        rhs = (target + rho * (z - u)) @ vec
        w = (rhs / (2 * lam[:, None, :] + rho)) @ np.swapaxes(vec, 1, 2)
        codes = grid.codes(w + u)
        z = grid.values(codes)
        u += w - z
        rho *= growth
        err = _quadratic(z - w0, h)
        better = err < best_err
        best = np.where(better[:, :, None], codes, best)
        best_err = np.where(better, err, best_err)
    return best


def refit_steps(problems: Problems, w0: np.ndarray, codes: np.ndarray, grid: Grid) -> np.ndarray:
    """Per-row step minimising D for fixed codes: Σ c·H·w0 / Σ c·H·c over the row's problems.

    Only for grids with one step per row (per-channel); returns the new steps [n].
    """
    c = codes - grid.zero
    h = problems.hessian
    ch = c @ h
    num = (ch * w0).sum(axis=2)
    den = (ch * c).sum(axis=2)
    g, nb, r = problems.groups, problems.blocks, problems.rows
    num = num.reshape(g, nb, r).sum(axis=1).reshape(-1)
    den = den.reshape(g, nb, r).sum(axis=1).reshape(-1)
    old = problems.join(grid.step)[:, 0]
    new = num / np.where(den > 0, den, 1.0)
    return np.where((den > 0) & (new > 0), new, old)


def reconstruct(site, w, blocking, code: GroupCode, layer, qrange, scale_dtype, method: str = "crq") -> GroupCode:
    """Per output channel, the best of RTN, (ADMM →) refit → GPTQ on the layer objective.

    `code` is the starting grid (RTN on it is the first candidate); `method=crq` adds the cluster pull
    (at CLUSTER_PULL_MAX_BITS bits or fewer), `gptq` only error feedback and step refits. Per-channel grids
    also get their steps refitted; a blocked grid keeps its steps.
    """
    per_channel = not blocking.block
    size = blocking.to_groups(w).shape[1]

    def layout(per_group: np.ndarray) -> np.ndarray:  # per-group values → matrix of the weight's shape
        full = np.repeat(per_group.astype(np.float64)[:, None], size, axis=1)
        return site.to_matrix(blocking.from_groups(full))

    problems = Problems(layer, site.rows)
    w0 = problems.split(site.to_matrix(w).astype(np.float64))
    zero = code.zero_point if code.zero_point is not None else np.zeros(len(code.scale))
    start = Grid(problems.split(layout(code.scale.astype(np.float64)), 1.0), problems.split(layout(zero)), *qrange)
    candidates = [(start.codes(w0), start)]  # RTN
    grid = start
    if method == "crq" and code.bits <= CLUSTER_PULL_MAX_BITS:
        pulled = cluster_pull(w0, problems.hessian, start)
        candidates.append((pulled, start))
        if per_channel:
            grid = Grid(problems.split(layout(refit_steps(problems, w0, pulled, start)), 1.0), start.zero, *qrange)
    factor = gptq_factor(problems.hessian)
    for _ in range(2):
        codes = gptq(w0, problems.hessian, grid, factor=factor)
        candidates.append((codes, grid))
        if not per_channel:
            break
        grid = Grid(problems.split(layout(refit_steps(problems, w0, codes, grid)), 1.0), grid.zero, *qrange)
        candidates.append((codes, grid))
    errors = np.stack([problems.row_error(g.values(c) - w0) for c, g in candidates])  # [candidates, n]
    best = errors.argmin(axis=0)
    q_rows = np.stack([problems.join(c) for c, _ in candidates])[best, np.arange(site.rows)]
    q = blocking.to_groups(site.from_matrix(q_rows)).astype(np.int32)
    scale = code.scale
    if per_channel:
        steps = np.stack([problems.join(g.step)[:, 0] for _, g in candidates])[best, np.arange(site.rows)]
        scale = np.where(steps > 0, steps, code.scale).astype(scale_dtype)
        q = np.clip(q, *qrange)
    return GroupCode(q, scale, code.zero_point, code.bits)
