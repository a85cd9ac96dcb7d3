"""Rate–distortion: one Lagrangian allocation over every band of every layer, and the Gaussian bound.

Each band has a few operating points (bit depth → bits stored, output distortion). For a slope λ
every band independently takes the point minimising D + λ·R (the equal-slope condition of TQ,
eq. 8); each layer also picks the cheaper of its options (with or without a transform, whose
basis costs fixed bits). λ is bisected until the total rate meets the target.

The bound: under a Gaussian model, rows of a layer W [n, d] are samples of a d-dimensional
source and the output distortion tr(ΔW H ΔWᵀ) is plain MSE in whitened coordinates, so the
least rate for distortion D is reverse water-filling on the eigenvalues μ of W H Wᵀ / n.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Band:
    """Operating points of one band: bits[i] stored and distortion[i] at bit depth depth[i].

    bits and distortion may also be [R, P]: R independent rows (output channels) that share the
    depths and each choose their own point.
    """

    depth: np.ndarray
    bits: np.ndarray
    distortion: np.ndarray

    def choose(self, lam: float) -> np.ndarray:
        """The point per row (or the one point) minimising D + λ·R."""
        return np.argmin(self.distortion + lam * self.bits, axis=-1)

    def totals(self, pick: np.ndarray) -> tuple[float, float]:
        if self.bits.ndim == 1:
            return float(self.bits[pick]), float(self.distortion[pick])
        rows = np.arange(len(pick))
        return float(self.bits[rows, pick].sum()), float(self.distortion[rows, pick].sum())


@dataclass
class Option:
    """One way to code a layer: its bands and the bits it costs whatever they get (a basis, an index).

    `materialize(picks, drift=None)` (onnxtq.codec) turns a point per band into the coded layer; `drift`
    = (statistics of the inputs the partly quantized network gives the layer, their cross moment with the
    original inputs), for codecs that fit the layer to them.
    """

    name: str
    bands: list[Band]
    fixed_bits: float = 0.0
    materialize: Callable | None = field(default=None, repr=False)

    def at(self, lam: float) -> tuple[list[np.ndarray], float, float]:
        """(point per band, bits, distortion) at slope λ."""
        picks = [b.choose(lam) for b in self.bands]
        totals = [b.totals(p) for b, p in zip(self.bands, picks)]
        return picks, self.fixed_bits + sum(t[0] for t in totals), sum(t[1] for t in totals)


@dataclass
class Allocation:
    lam: float
    choice: dict[str, tuple[int, list[np.ndarray]]] = field(default_factory=dict)  # layer → (option index, picks)
    bits: float = 0.0
    distortion: float = 0.0


def allocate_at(layers: dict[str, list[Option]], lam: float) -> Allocation:
    out = Allocation(lam)
    for name, options in layers.items():
        costs = []
        for opt in options:
            picks, bits, dist = opt.at(lam)
            costs.append((dist + lam * bits, bits, dist, picks))
        best = min(range(len(options)), key=lambda i: costs[i][0])
        _, bits, dist, picks = costs[best]
        out.choice[name] = (best, picks)
        out.bits += bits
        out.distortion += dist
    return out


def allocate(
    layers: dict[str, list[Option]], max_bits: float | None = None, max_distortion: float | None = None
) -> Allocation:
    """The allocation on the convex hull meeting a rate budget (bits) or a distortion budget.

    With a rate budget: the least distortion whose rate fits; with a distortion budget: the
    least rate whose distortion fits. Bisection on log λ (rate falls and distortion rises with λ).
    """
    if (max_bits is None) == (max_distortion is None):
        raise ValueError("give exactly one of max_bits and max_distortion")
    if max_bits is not None:  # rate falls as λ grows: the smallest λ that fits
        return fill(layers, _bisect(layers, lambda a: a.bits <= max_bits, smallest=True), max_bits)
    return _bisect(layers, lambda a: a.distortion <= max_distortion, smallest=False)  # the largest λ that fits


def _bisect(layers: dict[str, list[Option]], fits, smallest: bool) -> Allocation:
    """Bisection on log2 λ in [-80, 80] for the smallest (or largest) λ whose allocation fits."""
    lo, hi = -80.0, 80.0
    best = allocate_at(layers, 2.0 ** (hi if smallest else lo))
    for _ in range(60):
        mid = (lo + hi) / 2
        a = allocate_at(layers, 2.0**mid)
        if fits(a):
            best = a
        if fits(a) == smallest:
            hi = mid
        else:
            lo = mid
    return best


def fill(layers: dict[str, list[Option]], allocation: Allocation, max_bits: float) -> Allocation:
    """Spend what the λ search left of the budget: greedy upgrades by distortion saved per bit.

    Rate is not continuous in λ (a layer switching option moves many bits at once), so the best
    fitting λ can leave a good share of the budget unused.
    """
    heap: list = []

    def push(name: str, band: int, row: int) -> None:
        b = layers[name][allocation.choice[name][0]].bands[band]
        pick = allocation.choice[name][1][band]
        now = int(pick) if pick.ndim == 0 else int(pick[row])
        bits = b.bits if b.bits.ndim == 1 else b.bits[row]
        dist = b.distortion if b.distortion.ndim == 1 else b.distortion[row]
        more = np.flatnonzero(bits > bits[now])
        if len(more):
            slope = (dist[now] - dist[more]) / (bits[more] - bits[now])
            j = int(more[np.argmax(slope)])
            if slope.max() > 0:
                heapq.heappush(heap, (-float(slope.max()), name, band, row, now, j))

    for name, (index, picks) in allocation.choice.items():
        allocation.choice[name] = (index, [np.array(p, copy=True) for p in picks])
        for band, pick in enumerate(picks):
            for row in range(max(pick.size, 1) if pick.ndim else 1):
                push(name, band, row)
    left = max_bits - allocation.bits
    while heap and left > 0:
        _, name, band, row, now, j = heapq.heappop(heap)
        b = layers[name][allocation.choice[name][0]].bands[band]
        pick = allocation.choice[name][1][band]
        bits = b.bits if b.bits.ndim == 1 else b.bits[row]
        dist = b.distortion if b.distortion.ndim == 1 else b.distortion[row]
        cost = float(bits[j] - bits[now])
        if cost > left:
            continue
        if pick.ndim == 0:
            allocation.choice[name][1][band] = np.array(j)
        else:
            pick[row] = j
        left -= cost
        allocation.bits += cost
        allocation.distortion += float(dist[j] - dist[now])
        push(name, band, row)
    return allocation


def whitened_spectrum(w: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Eigenvalues μ [P, k] of the row covariance in whitened coordinates, per problem.

    w [P, r, d] (r rows of each problem are the samples), h [P, d, d]; equals eig(W H Wᵀ)/r.
    """
    r, d = w.shape[1], w.shape[2]
    if r <= d:
        m = w @ h @ np.swapaxes(w, 1, 2) / r
    else:
        h = h + 1e-12 * np.maximum(np.einsum("pdd->p", h) / d, 1e-30)[:, None, None] * np.eye(d)
        a = w @ np.linalg.cholesky(h)
        m = np.swapaxes(a, 1, 2) @ a / r
    return np.maximum(np.linalg.eigvalsh(m), 0.0)


def gaussian_bound_bits(mu: np.ndarray, rows: int, distortion: float) -> float:
    """Least total bits for a Gaussian source with spectrum μ [P, k] (each problem seen `rows` times)
    to reach total distortion D = rows·Σ min(μ, ϑ) (reverse water-filling)."""
    mu = mu.reshape(-1)
    if distortion <= 0:
        return float("inf")
    if distortion >= rows * mu.sum():
        return 0.0
    lo, hi = 0.0, float(mu.max())
    for _ in range(100):
        mid = (lo + hi) / 2
        if rows * np.minimum(mu, mid).sum() > distortion:
            hi = mid
        else:
            lo = mid
    theta = max(lo, 1e-300)
    return float(rows * np.maximum(0.0, 0.5 * np.log2(np.maximum(mu, 1e-300) / theta)).sum())
