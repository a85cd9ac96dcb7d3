"""Kernel quantization: every k×k kernel becomes a low-bit index into a codebook of kernels.

After Kernel Quantization (KQ, 2020), post-training (algorithms.md §4.2):

1. Per output channel o a scale s_o (rms of its kernels; float16, or for depthwise convs, whose
   channels hold one kernel each, a `gain_bits` index into a log-spaced table), so one codebook
   serves channels of any magnitude after batch-norm folding.
2. Kernels ũ_{o,c} = v_{o,c}/s_o are clustered by k-means (onnxtq.codebook) under the metric
   s_o²·M_c, M_c = the kk×kk block of the calibration Hessian H = E[x xᵀ] for input channel c
   (`metric=full`; `diag`: its diagonal; `none`: plain squared error), so the error minimised is
   the block-diagonal part of the layer-output error tr(ΔW H ΔWᵀ).
3. The codebook (K = 2^bits kernels) is quantized to `codebook_bits` (6) and the kernels re-assigned
   to it; the scales are refitted in closed form and the kernels re-assigned once more.
4. `gptq=true`: input channels are coded in turn (act order), each channel's error pushed onto the
   channels not yet coded through the Cholesky factor of H⁻¹ (the vector form of GPTQ); per output
   channel the better of that and plain assignment is kept (needs full statistics).

Layers coded together share one codebook (a `Group`): the pass decides which (kq's depthwise convs of
one kernel size). A group with fewer than `min_kernels`·K kernels is coded by per-channel RTN at
`scalar_bits` instead. Product quantization of 1×1 convs and dense weights (`pq` > 0) is the same
machinery on row sub-vectors of `pq` weights.

Emission (onnxtq.codebook.emit_lookup): packed indices → Cast → Gather(Cast(INT8 codebook)·step)
→ [Reshape] → Mul(scale).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxtq.codebook import Codebook, Metric, assign, emit_codebook, emit_lookup, index_bits, kmeans, lookup_values
from onnxtq.codec import Codec, Coded, Group, Layer, LayerView, distortion
from onnxtq.codecs.rtn import RtnCodec
from onnxtq.packing import container_bits
from onnxtq.rd import Band, Option
from onnxtq.reconstruct import DAMP, damped, inverse_cholesky

SCALE_BITS = 16  # per-output-channel scales are stored as float16


@dataclass
class Kernels(LayerView):
    """One weight as kernels: w [n, C, kk] (C input channels per group), their metric blocks [g·C, kk, kk]."""

    layer: Layer
    w: np.ndarray
    mats: np.ndarray
    gain_bits: int  # 0: float16 scales
    pq: bool  # row sub-vectors of a 1×1 conv or dense weight, not k×k kernels
    scales: np.ndarray = field(default=None)  # [n] float64 (the stored value)
    gain_index: np.ndarray | None = None
    gain_table: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.w.shape[0]

    @property
    def channels(self) -> int:
        return self.w.shape[1]

    def metric_index(self) -> np.ndarray:
        """Metric block of every kernel (o, c), row-major: group(o)·C + c."""
        groups = len(self.mats) // self.channels
        group = np.arange(self.n) // (self.n // groups)
        return (group[:, None] * self.channels + np.arange(self.channels)[None]).reshape(-1)


class KqCodec(Codec):
    name = "kq"

    def __init__(
        self,
        bits: int = 8,
        codebook_bits: int = 6,
        metric: str = "full",
        gptq: bool = True,
        gain_bits: int = 4,
        min_kernels: int = 4,
        scalar_bits: int = 8,
        pq: int = 0,
        pq_bits: int = 8,
        iterations: int = 30,
        seed: int = 0,
    ):
        self.bits, self.codebook_bits, self.metric, self.gptq = bits, codebook_bits, metric, gptq
        self.gain_bits, self.min_kernels, self.scalar_bits = gain_bits, min_kernels, scalar_bits
        self.pq, self.pq_bits, self.iterations, self.seed = pq, pq_bits, iterations, seed

    def options(self, layer: Layer) -> list[Option]:
        """One point: the layer with a codebook of its own (indices, float16 scales, the codebook)."""
        (coded,) = self.code_group([layer]).coded
        item = self.kernels(layer)
        k = 2 ** (self.pq_bits if item.pq else self.bits)
        bits = item.n * item.channels * container_bits(index_bits(k)) + SCALE_BITS * item.n
        bits += k * item.w.shape[2] * 8 + 32
        point = Band(
            np.array([self.bits]), np.array([float(bits)]), np.array([distortion(layer, coded.w_hat - layer.w)])
        )
        return [Option(f"kq {self.bits}-bit", [point], materialize=lambda picks, drift=None: coded)]

    def kernels(self, layer: Layer) -> Kernels:
        """The weight as kernels (or pq sub-vectors) and the metric block of each input channel."""
        site = layer.site
        taps = int(np.prod(site.conv.kernel)) if site.conv is not None else 1
        kk = taps if taps > 1 else self.pq
        m = site.to_matrix(layer.w).astype(np.float64)
        w = m.reshape(m.shape[0], -1, kk)
        mats = _metric_blocks(layer.stats, site.groups, w.shape[1], kk, self.metric)
        gain_bits = self.gain_bits if w.shape[1] == 1 else 0
        return Kernels(layer, w, mats, gain_bits, taps == 1)

    def code_group(self, layers: list[Layer]) -> Group:
        """Layers that share one codebook: cluster all their kernels, then code each layer."""
        kernels = [self.kernels(layer) for layer in layers]
        first = kernels[0]
        kk = first.w.shape[2]
        bits = self.pq_bits if first.pq else self.bits
        k = 2**bits
        count = sum(item.n * item.channels for item in kernels)
        if count < self.min_kernels * k:
            why = (
                f"{count} kernels < min_kernels·K = {self.min_kernels * k}: per-channel RTN at {self.scalar_bits} bits"
            )
            return Group(layers, [self._rtn(layer, why) for layer in layers])
        for item in kernels:
            _initial_scales(item)
        x, metric = _items(kernels)
        clustering = kmeans(x, k, metric, self.iterations, self.seed)
        book = Codebook.quantize(clustering.codebook, self.codebook_bits)
        values = book.values().astype(np.float64)
        labels = []
        for item in kernels:  # re-assign to the quantized codebook, refit the scales, re-assign
            lab = _assign(item, values)
            _refit_scales(item, values, lab)
            labels.append(_assign(item, values))
        if self.gptq:
            labels = [self._feedback(item, values, lab) for item, lab in zip(kernels, labels)]
        tail = (kk,) if first.pq else tuple(first.site.conv.kernel)
        book = Codebook(book.codes.reshape(len(book.codes), *tail), book.step, book.bits)
        params = np.array([item.w.size for item in kernels], np.float64)
        share_bits = book.nominal_bits() * params / params.sum()
        shared: dict = {}  # the codebook the group's layers read, once the pass has written it

        def prepare(graph, pass_name: str) -> int:
            ftype = int(graph.initializers[first.site.name].const_value.dtype)
            name = f"kq/codebook_{'x'.join(map(str, tail))}"
            shared["book"] = emit_codebook(graph, name, book, ftype, pass_name)
            shared["bytes"] = _split(shared["book"].bytes, params)
            return shared["book"].bytes

        coded = []
        for i, (item, lab) in enumerate(zip(kernels, labels)):
            c = self._coded(item, book, lab, bits, share_bits[i], shared if len(kernels) > 1 else None, i)
            c.detail += f", {clustering.iterations} Lloyd iterations"
            c.detail += f", codebook shared by {len(kernels)} layers" if len(kernels) > 1 else ""
            coded.append(c)
        return Group(layers, coded, prepare if len(kernels) > 1 else None)

    def _feedback(self, item: Kernels, values: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """GPTQ-style error feedback over input channels; per row the better of it and `labels`."""
        st = item.stats
        if st is None or st.mode != "full" or item.channels < 2 or self.metric == "none":
            return labels
        n, c, kk = item.w.shape
        rows_per_group = n // st.groups
        out = labels.copy()
        for g in range(st.groups):
            rows = slice(g * rows_per_group, (g + 1) * rows_per_group)
            h = st.moment[g]
            fed = _feedback_group(item.w[rows], h, item.scales[rows], values, kk)
            w = item.w[rows].reshape(rows_per_group, -1)
            s = item.scales[rows, None]
            errs = []
            for lab in (labels[rows], fed):
                delta = s * values[lab].reshape(rows_per_group, -1) - w
                errs.append(((delta @ h) * delta).sum(axis=1))
            out[rows] = np.where((errs[1] < errs[0])[:, None], fed, labels[rows])
        return out

    def _coded(self, item: Kernels, book: Codebook, labels, bits, share_bits, shared, index: int) -> Coded:
        site = item.site
        values = book.values().reshape(book.size, -1)
        if item.gain_index is not None:
            scales_stored = None
            w_hat = lookup_values(labels, values.reshape(book.codes.shape), site, item.gain_table[item.gain_index])
        else:
            scales_stored = item.scales.astype(np.float16)
            w_hat = lookup_values(labels, values.reshape(book.codes.shape), site, scales_stored)
        gains = (item.gain_index, item.gain_table) if item.gain_index is not None else None

        def write(graph, pass_name: str) -> int:
            book_ref = shared["book"] if shared is not None else book
            after = emit_lookup(graph, site, labels, book_ref, scales_stored, gains, pass_name)
            return after + (shared["bytes"][index] if shared is not None else 0)

        scale_bits = item.n * (item.gain_bits if gains else SCALE_BITS)
        scale_bits += 16 * len(item.gain_table) if gains else 0
        scale_text = f"{item.gain_bits}-bit gains" if gains else "fp16 scales"
        kind = "sub-vectors" if item.pq else "kernels"
        metric = self.metric if item.stats is not None else "none"
        detail = (
            f"{kind} of {item.w.shape[2]}, K={book.size} ({bits}-bit indices in "
            f"{container_bits(index_bits(book.size))}-bit containers), {book.bits}-bit codebook, {scale_text}, "
            f"metric {metric}"
        )
        nominal = (labels.size * index_bits(book.size) + share_bits + scale_bits) / item.layer.size
        return Coded(w_hat.astype(np.float64), write, nominal_bits=nominal, detail=detail)

    def _rtn(self, layer: Layer, why: str) -> Coded:
        coded = RtnCodec(self.scalar_bits, scale_bits=16).code(layer)
        coded.nominal_bits = self.scalar_bits + SCALE_BITS * layer.site.rows / layer.size
        coded.detail = why
        return coded


def _metric_blocks(stats, groups: int, channels: int, kk: int, metric: str) -> np.ndarray:
    """M per (group, input channel): [g·C, kk, kk] — H blocks (full), their diagonals (diag) or identity."""
    eye = np.broadcast_to(np.eye(kk), (groups * channels, kk, kk))
    if stats is None or metric == "none":
        return np.array(eye)
    diag = stats.diag().reshape(groups * channels, kk)
    diag_mats = eye * np.maximum(diag, 0.0)[:, :, None]
    if metric == "diag" or stats.mode == "diag":
        return diag_mats
    if stats.mode == "full":
        h = stats.moment.reshape(groups, channels, kk, channels, kk)
        return np.einsum("gcicj->gcij", h).reshape(groups * channels, kk, kk).copy()
    out = diag_mats.copy()  # blocked: a channel whose taps lie in one diagonal block gets its block
    block = stats.block
    for g in range(groups):
        for c in range(channels):
            a, b = c * kk, (c + 1) * kk
            if a // block == (b - 1) // block:
                i = a // block
                out[g * channels + c] = stats.moment[g, i, a - i * block : b - i * block, a - i * block : b - i * block]
    return out


def _initial_scales(layer: Kernels) -> None:
    """s_o = rms of output channel o (float16), or the nearest entry of a log-spaced gain table."""
    rms = np.sqrt((layer.w**2).mean(axis=(1, 2)))
    rms = np.where(rms > 0, rms, max(float(rms.max()), 1e-8))
    if not layer.gain_bits:
        layer.scales = rms.astype(np.float16).astype(np.float64)
        return
    logs = np.log2(rms)
    table = np.exp2(np.linspace(logs.min(), logs.max(), 2**layer.gain_bits)).astype(np.float16)
    layer.gain_table = table
    layer.gain_index = np.abs(np.log2(table.astype(np.float64))[None] - logs[:, None]).argmin(axis=1)
    layer.scales = table.astype(np.float64)[layer.gain_index]


def _items(layers: list[Kernels]) -> tuple[np.ndarray, Metric]:
    """Normalised kernels of all layers [N, kk] and their metric s_o²·M_c."""
    xs, mats, index, weight, offset = [], [], [], [], 0
    for layer in layers:
        s = layer.scales[:, None, None]
        xs.append((layer.w / s).reshape(-1, layer.w.shape[2]))
        mats.append(layer.mats)
        index.append(layer.metric_index() + offset)
        weight.append(np.repeat(layer.scales**2, layer.channels))
        offset += len(layer.mats)
    return np.concatenate(xs), Metric(np.concatenate(mats), np.concatenate(index), np.concatenate(weight))


def _assign(layer: Kernels, values: np.ndarray) -> np.ndarray:
    x, metric = _items([layer])
    return assign(x, values, metric)[0].reshape(layer.n, layer.channels)


def _refit_scales(layer: Kernels, values: np.ndarray, labels: np.ndarray) -> None:
    """Per row, s = Σ_c qᵀM_c v / Σ_c qᵀM_c q (codes fixed); gains snap to the table entry of least error."""
    q = values[labels]  # [n, C, kk]
    kk = q.shape[2]
    mats = layer.mats[layer.metric_index()].reshape(layer.n, layer.channels, kk, kk)
    mq = np.einsum("ncij,ncj->nci", mats, q)
    a = (mq * q).sum(axis=(1, 2))
    b = (mq * layer.w).sum(axis=(1, 2))
    if layer.gain_index is not None:
        t = layer.gain_table.astype(np.float64)
        layer.gain_index = (a[:, None] * t[None] ** 2 - 2 * b[:, None] * t[None]).argmin(axis=1)
        layer.scales = t[layer.gain_index]
        return
    fit = np.where(a > 0, b / np.where(a > 0, a, 1.0), layer.scales)
    fit = np.where(fit > 0, fit, layer.scales)
    layer.scales = fit.astype(np.float16).astype(np.float64)


def _feedback_group(w: np.ndarray, h: np.ndarray, scales: np.ndarray, values: np.ndarray, kk: int) -> np.ndarray:
    """Vector GPTQ on one group: w [r, C, kk], H [C·kk, C·kk]; returns the codeword per kernel [r, C].

    Channels go in order of decreasing tr(M_c); each is assigned under the metric of the channels not yet
    coded, (U_cc ᵀU_cc)⁻¹ with U the upper Cholesky factor of H⁻¹, and its error E moves the rest by
    −E·U_cc⁻¹·U_{c,rest}.
    """
    r, c, _ = w.shape
    blocks = np.einsum("cici->c", h.reshape(c, kk, c, kk)) if c else np.zeros(0)
    order = np.argsort(-blocks, kind="stable")
    cols = (order[:, None] * kk + np.arange(kk)[None]).reshape(-1)
    hp = damped(h[np.ix_(cols, cols)][None], DAMP)[0]
    u = inverse_cholesky(hp)
    wp = w[:, order].reshape(r, -1).copy()
    out = np.empty((r, c), np.int64)
    s = scales[:, None]
    for p in range(c):
        b = slice(p * kk, (p + 1) * kk)
        ubb = u[b, b]
        local = np.linalg.inv(ubb.T @ ubb)
        metric = Metric(local[None], np.zeros(r, np.int64), scales**2)
        lab = assign(wp[:, b] / s, values, metric)[0]
        out[:, order[p]] = lab
        err = wp[:, b] - s * values[lab]
        wp[:, b.stop :] -= err @ np.linalg.solve(ubb, u[b, b.stop :])
    return out


def _split(total: int, weights: np.ndarray) -> list[int]:
    """`total` bytes split in proportion to `weights`, summing exactly to `total`."""
    edges = np.floor(np.cumsum(weights) / weights.sum() * total + 1e-9).astype(int)
    return list(np.diff(np.concatenate([[0], edges])))
