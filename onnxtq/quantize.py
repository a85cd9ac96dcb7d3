"""Uniform quantization of weight groups with MSE-optimal clipping.

A group (one output channel, or one block of it) of values w shares a step s and,
when asymmetric, a zero point z:  q = clip(round(w/s) + z, qmin, qmax),  ŵ = s·(q − z).
The clipping ratio α ∈ (0, 1] scales the range the grid covers; for each group we pick
the α on a fixed grid that minimises Σ h_j (w_j − ŵ_j)², with h the diagonal of the
layer Hessian E[x xᵀ] when calibration statistics exist (output-weighted error), else 1.

Groups follow ONNX DequantizeLinear semantics exactly (per-axis, or blocked along one
axis), so what we measure here is what onnxruntime computes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxtq import kernels, parallel

#: Candidate clipping ratios: dense near 1 (8-bit) and down to 0.2 (2-bit optimum sits low).
CLIP_GRID = np.concatenate([np.linspace(0.2, 0.7, 21)[:-1], np.linspace(0.7, 1.0, 31)])


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of the container: INTb for symmetric codes, UINTb for asymmetric."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)


@dataclass(frozen=True)
class Blocking:
    """How a stored weight is cut into groups: per-axis (block=0), blocked along `block_axis`, or one
    group for the whole tensor (axis None: a scalar step)."""

    shape: tuple[int, ...]
    axis: int | None  # the per-channel axis (output channels); None: per tensor
    block: int = 0
    block_axis: int = 1

    @property
    def scale_shape(self) -> tuple[int, ...]:
        if self.axis is None:
            return ()
        if not self.block:
            return (self.shape[self.axis],)
        s = list(self.shape)
        s[self.block_axis] = -(-s[self.block_axis] // self.block)
        return tuple(s)

    @property
    def dequantize_attrs(self) -> dict:
        """DequantizeLinear's attributes for this layout (none for a scalar step)."""
        if self.axis is None:
            return {}
        return {"axis": self.block_axis, "block_size": self.block} if self.block else {"axis": self.axis}

    def to_groups(self, a: np.ndarray) -> np.ndarray:
        """[G, S] view: one row per scale."""
        if self.axis is None:
            return a.reshape(1, -1)
        if not self.block:
            return np.moveaxis(a, self.axis, 0).reshape(self.shape[self.axis], -1)
        moved = np.moveaxis(a, self.block_axis, -1)
        n = moved.shape[-1]
        pad = -n % self.block
        if pad:
            moved = np.concatenate([moved, np.zeros(moved.shape[:-1] + (pad,), a.dtype)], axis=-1)
        return moved.reshape(-1, self.block)

    def from_groups(self, g: np.ndarray) -> np.ndarray:
        if self.axis is None:
            return g.reshape(self.shape)
        if not self.block:
            moved = list(self.shape)
            moved.insert(0, moved.pop(self.axis))
            return np.moveaxis(g.reshape(moved), 0, self.axis)
        moved_shape = list(self.shape)
        n = moved_shape.pop(self.block_axis)
        padded = g.reshape(*moved_shape, -1)[..., :n]
        return np.moveaxis(padded, -1, self.block_axis)

    def scales_to_shape(self, s: np.ndarray) -> np.ndarray:
        """Per-group values laid out as DequantizeLinear's scale tensor."""
        if self.axis is None or not self.block:
            return s.reshape(self.scale_shape)
        moved = list(self.scale_shape)
        nb = moved.pop(self.block_axis)
        return np.moveaxis(s.reshape(*moved, nb), -1, self.block_axis)

    def scales_from_shape(self, t: np.ndarray) -> np.ndarray:
        """DequantizeLinear's scale (or zero point) tensor back to one value per group, [G]."""
        if not self.block:
            return t.reshape(-1)
        return np.moveaxis(t, self.block_axis, -1).reshape(-1)


def blocking_for(site, block: int) -> Blocking:
    """Group layout of a weight site: channels on the output axis, blocks along the reduction axis
    (depthwise convs, whose reduction axis holds one input channel, and short rows stay per channel)."""
    out_axis = 1 if site.transposed else 0
    red_axis = 0 if site.transposed else 1
    if site.kind == "depthwise" or site.shape[red_axis] <= block:
        block = 0
    return Blocking(site.shape, out_axis, block, red_axis)


def step_dtype(site, scale_bits: int) -> type:
    """The type a weight's steps are stored in: float16 where asked (half the side information), except
    for MatMul weights: with float16 steps onnxruntime's (1.32) load-time fusion of DequantizeLinear→MatMul
    into MatMulNBits builds a node it then rejects as mistyped."""
    return np.float16 if scale_bits == 16 and site.op != "MatMul" else np.float32


@dataclass
class GroupCode:
    """Integer codes, steps and zero points of a grouped tensor."""

    q: np.ndarray  # [G, S] int
    scale: np.ndarray  # [G] float32 or float16
    zero_point: np.ndarray | None  # [G] int, None when symmetric
    bits: int

    def dequantize(self, out: np.ndarray | None = None) -> np.ndarray:
        """(q − z)·s in float64, as float32 (onnxtq.kernels), into `out` [G, S] if given."""
        return kernels.dequantize(self.q, self.scale, self.zero_point, out)


def _grid_for(w: np.ndarray, alpha: float, qrange: tuple[int, int], symmetric: bool):
    lo_q, hi_q = qrange
    if symmetric:
        amax = np.abs(w).max(axis=1)
        scale = alpha * amax / max(hi_q, 1)
        return np.where(scale > 0, scale, 1.0), None
    lo = np.minimum(w.min(axis=1), 0.0) * alpha
    hi = np.maximum(w.max(axis=1), 0.0) * alpha
    scale = (hi - lo) / (hi_q - lo_q)
    scale = np.where(scale > 0, scale, 1.0)
    zp = np.clip(np.round(-lo / scale), lo_q, hi_q)
    return scale, zp


#: Weights whose clipping search runs together: its temporaries stay in cache across the whole grid.
SEARCH_ELEMENTS = 2**18


def _clip_search(w: np.ndarray, h: np.ndarray | None, qrange: tuple[int, int], symmetric: bool):
    """Each row's step (and zero point, None when symmetric) of least h-weighted squared error over CLIP_GRID
    (h None: plain squared error), by onnxtq.kernels; rows are independent, so any cut of the rows gives the
    same answer."""
    step, zero = kernels.clip_search(w, h, CLIP_GRID, qrange, symmetric)
    return step, None if symmetric else zero


def _parts(rows: int, cols: int) -> list[slice]:
    """Cuts of the rows of about SEARCH_ELEMENTS weights each."""
    size = max(1, SEARCH_ELEMENTS // max(cols, 1))
    return [slice(start, start + size) for start in range(0, rows, size)] or [slice(0, 0)]


def _buffer(a: np.ndarray) -> np.ndarray:
    """Where `a`'s rows are laid out as float32 rows: `a` itself if they already are."""
    return a if a.flags.c_contiguous and a.dtype == np.float32 else np.empty(a.shape, np.float32)


def _fill(buffer: np.ndarray, a: np.ndarray, part: slice) -> np.ndarray:
    """Rows `part` of `a`, laid out in `buffer` (onnxtq.kernels.rows_of)."""
    return buffer[part] if buffer is a else kernels.rows_of(a[part], np.float32, buffer[part])


def quantize_groups(
    w: np.ndarray,
    bits: int,
    symmetric: bool = True,
    clip: bool = True,
    h: np.ndarray | None = None,
    scale_dtype=np.float32,
    qrange: tuple[int, int] | None = None,
) -> GroupCode:
    """Quantize each row of `w` [G, S]; `h` [G, S] weights the squared error (None = plain MSE).

    Steps are stored as `scale_dtype` (float32 or float16); codes are computed against the
    rounded step so the stored pair reproduces exactly what we measured. `qrange` narrows the
    codes below the container's range (ternary: (-1, 1) in INT2).
    """
    qrange = qrange or int_range(bits, symmetric)
    # the search only ranks candidates: float32 is precise enough and twice as fast. Rows are laid out as rows (a
    # MatMul weight's groups are its transposed view) a part at a time, on the thread that searches that part
    rows, parts = _buffer(w), _parts(*w.shape)

    def search(part: slice):  # h is read by the search alone: laid out a part at a time, never whole
        weights = None if h is None else kernels.rows_of(h[part], np.float32)
        return _clip_search(_fill(rows, w, part), weights, qrange, symmetric)

    if clip:
        found = parallel.thread_map(search, parts)
        best_scale = np.concatenate([scale for scale, _ in found])
        best_zp = None if symmetric else np.concatenate([zp for _, zp in found])
    else:
        best_scale, best_zp = _grid_for(_fill(rows, w, slice(None)), 1.0, qrange, symmetric)
    if best_scale.max(initial=0.0) > np.finfo(scale_dtype).max:  # float16 cannot hold such steps
        scale_dtype = np.float32
    tiny = float(np.finfo(scale_dtype).smallest_subnormal)
    stored = np.maximum(best_scale, tiny).astype(scale_dtype)  # the step ORT will use
    q = np.empty(w.shape, np.int32)  # against the stored step, in float64

    def code(part: slice) -> None:
        kernels.codes(rows[part], stored[part], None if best_zp is None else best_zp[part], qrange, q[part])

    parallel.thread_map(code, parts)
    return GroupCode(q, stored, None if best_zp is None else best_zp.astype(np.int32), bits)
