"""Entropy-constrained scalar quantization (Choi, El-Khamy, Lee 2017): the rate is the entropy of the codes.

When the integer codes are entropy-coded (the `onnxtq pack` container), a uniform quantizer followed by
entropy coding is within 0.255 bit of the rate–distortion bound at any rate, so the levels no longer
need to be few: what matters is the step, and how the rounding trades error against code length.

* `entropy_bits`, `histogram_bits`: n·H of a code stream (or its histogram), the size an ideal per-tensor
  entropy coder reaches (`onnxtq pack` comes within 1% of it); `row_entropy_bits`, each row's share of it.
* `code_lengths`: −log₂ p per code from a histogram, what the rate term of a rounding decision charges.
* `RateGrid`: a uniform grid whose rounding minimises (t − q)² + κ·ℓ(q) in step units (rate–distortion
  optimised rounding; κ = 0 is plain rounding). Used inside GPTQ, the error feedback stays exact.
* `weighted_kmeans_1d`: Lloyd's k-means on scalars with per-value weights (Hessian-weighted k-means),
  exact assignments on sorted values, so millions of weights cluster in milliseconds per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxtq.reconstruct import Grid

#: Pseudo-count that gives codes not (yet) seen a finite length.
PSEUDO_COUNT = 0.5


def entropy_bits(codes: np.ndarray) -> float:
    """n·H(codes) in bits: the empirical entropy of one stream (one tensor, one histogram)."""
    codes = np.asarray(codes).ravel()
    if codes.size == 0:
        return 0.0
    low = codes.min()
    return histogram_bits(np.bincount((codes - low).astype(np.int64)))


def histogram_bits(counts: np.ndarray) -> float:
    """n·H of a histogram, in bits: n·log₂ n − Σ c·log₂ c."""
    c = counts[counts > 0].astype(np.float64)
    n = c.sum()
    return float(n * np.log2(n) - (c * np.log2(c)).sum()) if n else 0.0


def row_entropy_bits(codes: np.ndarray) -> np.ndarray:
    """Each row's share of n·H(codes) [rows]: its codes' lengths −log₂ p under the whole stream's histogram
    (the rows add up to `entropy_bits`)."""
    shifted = codes - codes.min()
    counts = np.bincount(shifted.ravel())
    lengths = np.log2(codes.size) - np.log2(np.maximum(counts, 1))
    return lengths[shifted].sum(axis=1)


def code_lengths(codes: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """−log₂ p(q) for q in lo..hi (index q − lo), from the histogram of `codes` smoothed by PSEUDO_COUNT."""
    counts = np.bincount((np.asarray(codes).ravel() - lo).astype(np.int64), minlength=hi - lo + 1)
    p = (counts + PSEUDO_COUNT) / (counts.sum() + PSEUDO_COUNT * len(counts))
    return -np.log2(p)


@dataclass
class RateGrid(Grid):
    """A symmetric uniform grid (zero = 0) whose codes minimise (w/step − q)² + κ·ℓ(q).

    Candidates are the two neighbours of w/step and 0: the rate term moves values onto cheaper
    neighbours and widens the zero bin (the dead zone entropy-constrained quantizers grow at low rate).
    """

    lengths: np.ndarray | None = None  # ℓ(q) for q in lo..hi
    kappa: float = 0.0

    def codes(self, w: np.ndarray, sl=...) -> np.ndarray:
        t = w / self.step[sl]
        lo, hi = int(self.lo), int(self.hi)
        if self.lengths is None or self.kappa == 0:
            return np.clip(np.round(t), lo, hi)
        f = np.clip(np.floor(t), lo, hi)
        candidates = np.stack([f, np.clip(f + 1, lo, hi), np.zeros_like(f)])
        cost = (t - candidates) ** 2 + self.kappa * self.lengths[(candidates - lo).astype(np.int64)]
        return np.take_along_axis(candidates, cost.argmin(axis=0)[None], axis=0)[0]


def weighted_kmeans_1d(
    values: np.ndarray, weights: np.ndarray, k: int, iterations: int = 60
) -> tuple[np.ndarray, np.ndarray]:
    """Centres c (sorted, [k]) and assignments minimising Σ h_i (w_i − c_a(i))².

    On sorted values every cluster is an interval bounded by midpoints of neighbouring centres, so an
    assignment is a searchsorted and a centre update two differences of cumulative sums. Initialised
    at weighted quantiles (so a heavy weight attracts centres, as Hessian-weighted k-means should).
    """
    order = np.argsort(values, kind="stable")
    v = values[order].astype(np.float64)
    h = np.maximum(weights[order].astype(np.float64), 0.0) + 1e-30
    ch = np.concatenate([[0.0], np.cumsum(h)])
    chv = np.concatenate([[0.0], np.cumsum(h * v)])
    quantiles = (np.arange(k) + 0.5) / k * ch[-1]
    centres = np.unique(v[np.minimum(np.searchsorted(ch[1:], quantiles), len(v) - 1)])
    for _ in range(iterations):
        edges = np.searchsorted(v, (centres[1:] + centres[:-1]) / 2)
        bounds = np.concatenate([[0], edges, [len(v)]])
        mass = ch[bounds[1:]] - ch[bounds[:-1]]
        keep = mass > 0
        updated = (chv[bounds[1:]] - chv[bounds[:-1]])[keep] / mass[keep]
        if len(updated) == len(centres) and np.allclose(updated, centres, rtol=0, atol=1e-12 * np.abs(v).max()):
            centres = updated
            break
        centres = np.unique(updated)
    assignment = np.searchsorted((centres[1:] + centres[:-1]) / 2, values.astype(np.float64), side="right")
    return centres, assignment
