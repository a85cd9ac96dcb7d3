"""Decorrelating transforms across a layer's input channels (transform quantization, TQ).

A layer W [n, C, kk] (kk taps per input channel) is written W[o,:,t] = T[o,:,t]·B with a
synthesis basis B [K, C] and coefficients T = W·U, U [C, K] the analysis matrix (B = U⁻¹
before any channel is dropped). The layer then runs as a 1×1 map by B followed by the
original layer with T as its weight, and T is what gets quantized, band by band.

* `klt`: U = eigenvectors of the weight covariance C_θθ = Σ_{o,t} W[o,:,t]ᵀW[o,:,t] / (n·kk).
* `elt`: the local end-to-end learned transform: with Ḡ = E[x xᵀ] tap-averaged (the sensitivity
  of the layer output to each input channel's weights), Ḡ + δI = L Lᵀ, Lᵀ C_θθ L = V Λ Vᵀ,
  U = L V and B = Vᵀ L⁻¹. Then Uᵀ C_θθ U = Λ (decorrelated coefficients) and B Ḡ Bᵀ = I
  (every coefficient channel costs the same output error per unit of weight error), the
  generalised eigenproblem the TQ paper solves with logit gradients in place of Ḡ.

Rows of B are scaled to unit norm (T rescaled to match) so the basis quantizes on one grid.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

#: Damping of Ḡ before its Cholesky factor, relative to its mean diagonal.
DAMP = 1e-3


@dataclass
class Transform:
    kind: str  # identity | klt | elt
    analysis: np.ndarray | None  # U [C, K]; None once the coefficients it gave are coded
    synthesis: np.ndarray | Path  # B [K, C]; for a model run in pieces, the file it waits in after the curves
    energy: np.ndarray  # [K] coefficient variance per channel (what bands are sorted by)


def tap_average(h: np.ndarray, channels: int) -> np.ndarray:
    """Ḡ [C, C]: the mean over taps of H's diagonal tap blocks (H over (c, tap) im2col columns)."""
    kk = h.shape[0] // channels
    return np.einsum("atbt->ab", h.reshape(channels, kk, channels, kk)) / kk


def _damped(gbar: np.ndarray) -> np.ndarray:
    """Ḡ + damp·mean(diag Ḡ)·I, added on the diagonal alone (an identity matrix would be d² more to add)."""
    g = np.array(gbar, np.float64)
    g.flat[:: len(g) + 1] += DAMP * max(float(np.trace(gbar)) / len(gbar), 1e-30)
    return g


def weight_covariance(w: np.ndarray) -> np.ndarray:
    """C_θθ [C, C] of a weight [n, C, kk]: its rows and taps are the samples."""
    rows = w.transpose(0, 2, 1).reshape(-1, w.shape[1]).astype(np.float64)
    return rows.T @ rows / rows.shape[0]


def identity(channels: int, w: np.ndarray) -> Transform:
    eye = np.eye(channels)
    return Transform("identity", eye, eye, np.diag(weight_covariance(w)))


def klt(w: np.ndarray) -> Transform:
    lam, vec = np.linalg.eigh(weight_covariance(w))
    order = np.argsort(-lam)
    u = vec[:, order]
    return _normalised("klt", u, u.T.copy(), lam[order])


def elt(w: np.ndarray, gbar: np.ndarray) -> Transform:
    c = weight_covariance(w)
    g = _damped(gbar)
    low = np.linalg.cholesky(g)
    lam, vec = np.linalg.eigh(low.T @ c @ low)
    order = np.argsort(-lam)
    vec, lam = vec[:, order], lam[order]
    u = low @ vec
    b = scipy.linalg.solve_triangular(low, vec, trans="T", lower=True).T  # Vᵀ L⁻¹, without forming L⁻¹
    return _normalised("elt", u, b, np.maximum(lam, 0.0))


def _normalised(kind: str, u: np.ndarray, b: np.ndarray, lam: np.ndarray) -> Transform:
    """Unit-norm basis rows; the coefficient channels (and their energy) absorb the scale."""
    norms = np.linalg.norm(b, axis=1)
    norms = np.where(norms > 0, norms, 1.0)
    return Transform(kind, u * norms[None, :], b / norms[:, None], lam * norms**2)


def coefficients(w: np.ndarray, analysis: np.ndarray) -> np.ndarray:
    """T [n, K, kk] = W ×_C U for W [n, C, kk]."""
    return over_channels(w, analysis)


def over_channels(a: np.ndarray, m: np.ndarray) -> np.ndarray:
    """a [n, C, kk] ×_C m [C, K] → [n, K, kk], as one BLAS product (numpy's einsum does not call BLAS here:
    4x slower on a 2,304 × 768 weight)."""
    return np.ascontiguousarray(np.tensordot(a, m, axes=(1, 0)).transpose(0, 2, 1))


def transformed_hessian(h: np.ndarray, synthesis: np.ndarray) -> np.ndarray:
    """H̃ over the coefficient columns (k, tap): (B ⊗ I) H (B ⊗ I)ᵀ, since ΔW = ΔT·(B ⊗ I)."""
    k, c = synthesis.shape
    kk = h.shape[0] // c
    h4 = h.reshape(c, kk, c, kk)
    left = np.tensordot(synthesis, h4, axes=(1, 0))  # [K, kk, C, kk]
    full = np.tensordot(left, synthesis, axes=(2, 1))  # [K, kk, kk, K']
    return full.transpose(0, 1, 3, 2).reshape(k * kk, k * kk)


def fit_coefficients(w: np.ndarray, basis: np.ndarray, gbar: np.ndarray) -> np.ndarray:
    """T [n, K, kk] minimising Σ_{o,t} ‖(W[o,:,t] − T[o,:,t]·B)‖²_Ḡ for a given (quantized, cut) basis B.

    The basis error and any dropped channels are then absorbed by the coefficients, in the
    metric of the layer output, before the coefficients themselves are quantized.
    """
    g = _damped(gbar)
    gram = basis @ g @ basis.T  # [K, K]
    # W Ḡ Bᵀ (Ḡ Bᵀ first, then one BLAS product: as one three-operand einsum an 8,210×1,024 Gemm took ~2 h)
    rhs = np.tensordot(w, g @ basis.T, axes=(1, 0))  # [n, kk, K]
    return np.tensordot(rhs, np.linalg.inv(gram), axes=(2, 0)).transpose(0, 2, 1)
