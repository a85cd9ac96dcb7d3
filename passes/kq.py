"""kq: kernel quantization — every k×k kernel becomes a low-bit index into a codebook of kernels.

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
5. The bias absorbs the mean output error.

Depthwise convs have one kernel per channel and few channels per layer: a codebook of their own
would cost more than their indices, so by default (`share=depthwise`) all depthwise convs of one
kernel size share one codebook, learned on all their kernels together. Layers with fewer than
`min_kernels`·K kernels (e.g. an RGB stem) are quantized by per-channel RTN at `scalar_bits`.
1×1 convs, Gemm and MatMul weights are product-quantized when `pq` > 0 (row sub-vectors of `pq`
weights, the same machinery with kk = pq); otherwise they are left (skipped) for a later pass,
e.g. `kq{bits=8},rtn{bits=8}`.

Emission (onnxtq.codebook.emit_lookup): packed indices → Cast → Gather(Cast(INT8 codebook)·step)
→ [Reshape] → Mul(scale). The report gives per layer the nominal and stored bits per weight (indices,
its share of the codebook, scales), K, the layer-output SQNR, and in a note the bits per parameter
of the k×k convs, as KQ reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnxtq.passes.rtn import blocking_for, quantizable
from tqdm import tqdm

from onnxtq.bias import bias_note, correct_bias, output_shift
from onnxtq.calibration import importance
from onnxtq.codebook import Codebook, Metric, assign, emit_codebook, emit_lookup, index_bits, kmeans, lookup_values
from onnxtq.emit import db, replace_weight
from onnxtq.graph import Graph
from onnxtq.model_io import tensor_nbytes
from onnxtq.packing import container_bits, min_opset
from onnxtq.pass_infra import Context, Pass, PassConfig
from onnxtq.quantize import quantize_groups
from onnxtq.reconstruct import DAMP, damped
from onnxtq.report import PassReport, WeightRecord
from onnxtq.weights import WeightSite, discover

SCALE_BITS = 16  # per-output-channel scales are stored as float16


@dataclass(frozen=True)
class KqConfig(PassConfig):
    bits: int = 8  # index bits per kernel: K = 2^bits codewords
    codebook_bits: int = 6  # bits of each codebook value (one float32 step per codebook)
    metric: str = "full"  # full: kk×kk Hessian block per input channel | diag | none (plain squared error)
    gptq: bool = True  # error feedback across input channels (layers with full statistics)
    share: str = "depthwise"  # one codebook per kernel size for: depthwise convs | all layers | none (per layer)
    gain_bits: int = 4  # depthwise scales: log-spaced table of 2^gain_bits float16 gains (0: float16 per channel)
    min_kernels: int = 4  # a codebook needs min_kernels·K kernels, else per-channel RTN at scalar_bits
    scalar_bits: int = 8
    max_taps: int = 0  # convs with more than max_taps kernel taps are left for a later pass (0: no limit)
    pq: int = 0  # 1×1 convs, Gemm, MatMul: sub-vector length of product quantization (0: left for a later pass)
    pq_bits: int = 8
    iterations: int = 30  # Lloyd iterations at most
    min_elements: int = 0
    bias_correct: bool = True
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.bits <= 16 or not 1 <= self.pq_bits <= 16:
            raise ValueError(f"bits and pq_bits must be 1..16, not {self.bits} and {self.pq_bits}")
        if not 2 <= self.codebook_bits <= 8:
            raise ValueError(f"codebook_bits must be 2..8, not {self.codebook_bits}")
        if self.metric not in ("full", "diag", "none"):
            raise ValueError(f"metric must be full, diag or none, not '{self.metric}'")
        if self.share not in ("depthwise", "all", "none"):
            raise ValueError(f"share must be depthwise, all or none, not '{self.share}'")
        if self.gain_bits not in (0, *range(2, 9)):
            raise ValueError(f"gain_bits must be 0 or 2..8, not {self.gain_bits}")
        if self.scalar_bits not in range(2, 9):
            raise ValueError(f"scalar_bits must be 2..8, not {self.scalar_bits}")
        if self.pq and not 2 <= self.pq <= 16:
            raise ValueError(f"pq must be 0 or a sub-vector length 2..16, not {self.pq}")
        if self.min_kernels < 1 or self.iterations < 1 or self.max_taps < 0:
            raise ValueError("min_kernels and iterations must be positive, max_taps >= 0")


@dataclass
class Layer:
    """One weight as kernels: w [n, C, kk] (C input channels per group), their metric blocks [g·C, kk, kk]."""

    site: WeightSite
    w: np.ndarray
    mats: np.ndarray
    stats: object
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


class KqPass(Pass):
    name = "kq"
    Config = KqConfig
    uses_stats = True

    def min_opset(self) -> int:
        cfg = self.config
        bits = [cfg.bits, cfg.scalar_bits, cfg.gain_bits] + ([cfg.pq_bits] if cfg.pq else [])
        return max([23] + [min_opset(b) for b in bits if b])  # 23: float16 steps of the RTN fallback

    def run(self, ctx: Context) -> PassReport:
        cfg = self.config
        report = self.new_report()
        stats = ctx.stats if ctx.stats_fresh else None
        if ctx.stats is not None and not ctx.stats_fresh:
            report.notes.append("statistics are stale after an earlier pass: plain squared error used")
        if stats is None and cfg.metric != "none":
            report.notes.append("no calibration statistics: plain squared error, no error feedback, no bias correction")
        jobs: dict[tuple, list[Layer]] = {}
        for site in quantizable(discover(ctx.graph), cfg.min_elements, report):
            kk = int(np.prod(site.conv.kernel)) if site.conv is not None else 1
            why = self._why_not(site, kk)
            if why:
                report.records.append(WeightRecord.of(site, "skipped", reason=why))
                continue
            layer = self._layer(ctx.graph, site, stats)
            shared = cfg.share == "all" or (cfg.share == "depthwise" and site.kind == "depthwise" and kk > 1)
            key = (cfg.share, layer.w.shape[2], layer.pq) if shared else (site.name,)
            jobs.setdefault(key, []).append(layer)
        records = []
        for layers in tqdm(list(jobs.values()), desc=self.name, unit="codebook", disable=None, leave=False):
            records.extend(self._job(ctx.graph, layers))
        report.records.extend(records)
        self._notes(report, records, stats is not None)
        return report

    def _why_not(self, site: WeightSite, kk: int) -> str:
        cfg = self.config
        if site.kind in ("conv-transpose", "gather"):
            return f"{site.kind} weights are not handled by kq"
        if kk > 1:
            if cfg.max_taps and kk > cfg.max_taps:
                return f"{kk}-tap kernels above max_taps={cfg.max_taps}: left for a later pass"
            return ""
        if not cfg.pq:
            return "1×1 / dense weight: left for a later pass (pq=0)"
        if site.cols % cfg.pq:
            return f"reduction length {site.cols} is not a multiple of pq={cfg.pq}"
        return ""

    def _layer(self, graph: Graph, site: WeightSite, stats) -> Layer:
        """The weight as kernels (or pq sub-vectors) and the metric block of each input channel."""
        cfg = self.config
        taps = int(np.prod(site.conv.kernel)) if site.conv is not None else 1
        kk = taps if taps > 1 else cfg.pq
        m = site.to_matrix(graph.array(site.name)).astype(np.float64)
        w = m.reshape(m.shape[0], -1, kk)
        layer_stats = stats.get(site) if stats is not None else None
        mats = _metric_blocks(layer_stats, site.groups, w.shape[1], kk, cfg.metric)
        gain_bits = cfg.gain_bits if w.shape[1] == 1 else 0
        return Layer(site, w, mats, layer_stats, gain_bits, taps == 1)

    def _job(self, graph: Graph, layers: list[Layer]) -> list[WeightRecord]:
        """Layers that share one codebook: cluster all their kernels, then emit each layer."""
        cfg = self.config
        first = layers[0]
        kk = first.w.shape[2]
        bits = cfg.pq_bits if first.pq else cfg.bits
        k = 2**bits
        kernels = sum(layer.n * layer.channels for layer in layers)
        if kernels < cfg.min_kernels * k:
            why = (
                f"{kernels} kernels < min_kernels·K = {cfg.min_kernels * k}: per-channel RTN at {cfg.scalar_bits} bits"
            )
            return [self._rtn(graph, layer, why) for layer in layers]
        for layer in layers:
            _initial_scales(layer)
        x, metric = _items(layers)
        clustering = kmeans(x, k, metric, cfg.iterations, cfg.seed)
        book = Codebook.quantize(clustering.codebook, cfg.codebook_bits)
        values = book.values().astype(np.float64)
        labels = []
        for layer in layers:  # re-assign to the quantized codebook, refit the scales, re-assign
            lab = _assign(layer, values)
            _refit_scales(layer, values, lab)
            labels.append(_assign(layer, values))
        if cfg.gptq:
            labels = [self._feedback(layer, values, lab) for layer, lab in zip(layers, labels)]
        tail = (kk,) if first.pq else tuple(first.site.conv.kernel)
        book = Codebook(book.codes.reshape(len(book.codes), *tail), book.step, book.bits)
        shared = None
        if len(layers) > 1:
            ftype = graph.initializers[first.site.name].data_type
            shared = emit_codebook(graph, f"kq/codebook_{'x'.join(map(str, tail))}", book, ftype, self.name)
        params = np.array([layer.w.size for layer in layers], np.float64)
        share_bits = book.nominal_bits() * params / params.sum()
        share_bytes = _split(shared.bytes, params) if shared is not None else [0] * len(layers)
        records = []
        for i, (layer, lab) in enumerate(zip(layers, labels)):
            record = self._emit(graph, layer, book, shared, lab, bits, share_bits[i], share_bytes[i])
            record.detail += f", {clustering.iterations} Lloyd iterations"
            record.detail += f", codebook shared by {len(layers)} layers" if shared else ""
            records.append(record)
        return records

    def _feedback(self, layer: Layer, values: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """GPTQ-style error feedback over input channels; per row the better of it and `labels`."""
        st = layer.stats
        if st is None or st.mode != "full" or layer.channels < 2 or self.config.metric == "none":
            return labels
        n, c, kk = layer.w.shape
        rows_per_group = n // st.groups
        out = labels.copy()
        for g in range(st.groups):
            rows = slice(g * rows_per_group, (g + 1) * rows_per_group)
            h = st.moment[g]
            fed = _feedback_group(layer.w[rows], h, layer.scales[rows], values, kk)
            w = layer.w[rows].reshape(rows_per_group, -1)
            s = layer.scales[rows, None]
            errs = []
            for lab in (labels[rows], fed):
                delta = s * values[lab].reshape(rows_per_group, -1) - w
                errs.append(((delta @ h) * delta).sum(axis=1))
            out[rows] = np.where((errs[1] < errs[0])[:, None], fed, labels[rows])
        return out

    def _emit(self, graph, layer: Layer, book: Codebook, shared, labels, bits, share_bits, share_bytes):
        cfg, site = self.config, layer.site
        values = book.values().reshape(book.size, -1)
        before = tensor_nbytes(graph.initializers[site.name])
        original = graph.array(site.name)
        if layer.gain_index is not None:
            scales_stored = None
            w_hat = lookup_values(labels, values.reshape(book.codes.shape), site, layer.gain_table[layer.gain_index])
        else:
            scales_stored = layer.scales.astype(np.float16)
            w_hat = lookup_values(labels, values.reshape(book.codes.shape), site, scales_stored)
        delta = w_hat.astype(np.float64) - original.astype(np.float64)
        why_not = "off" if not cfg.bias_correct else ("no statistics" if layer.stats is None else "")
        if cfg.bias_correct and layer.stats is not None:
            node = graph.consumers[site.name][0][0]
            why_not = correct_bias(graph, node, site, output_shift(site, layer.stats, delta), original.dtype)
        gains = (layer.gain_index, layer.gain_table) if layer.gain_index is not None else None
        after = emit_lookup(graph, site, labels, shared or book, scales_stored, gains, self.name)
        after += share_bytes
        size = original.size
        scale_bits = layer.n * (layer.gain_bits if gains else SCALE_BITS)
        scale_bits += 16 * len(layer.gain_table) if gains else 0
        record = WeightRecord.of(site, "quantized", bytes_before=before, bytes_after=after, bits=8 * after / size)
        record.nominal_bits = (labels.size * index_bits(book.size) + share_bits + scale_bits) / size
        record.bias_corrected = cfg.bias_correct and not why_not
        record.reason = f"bias not corrected: {why_not}" if why_not else ""
        record.weight_sqnr_db = db(float((original.astype(np.float64) ** 2).sum()), float((delta**2).sum()))
        if layer.stats is not None:
            m = site.to_matrix
            record.output_sqnr_db = db(layer.stats.quadratic(m(original)), layer.stats.quadratic(m(delta)))
        scale_text = f"{layer.gain_bits}-bit gains" if gains else "fp16 scales"
        kind = "sub-vectors" if layer.pq else "kernels"
        metric = cfg.metric if layer.stats is not None else "none"
        record.detail = (
            f"{kind} of {layer.w.shape[2]}, K={book.size} ({bits}-bit indices in "
            f"{container_bits(index_bits(book.size))}-bit containers), {book.bits}-bit codebook, {scale_text}, "
            f"metric {metric}"
        )
        return record

    def _rtn(self, graph: Graph, layer: Layer, why: str) -> WeightRecord:
        site = layer.site
        blocking = blocking_for(site, 0)
        w = graph.array(site.name)
        h = None if layer.stats is None else blocking.to_groups(importance(site, layer.stats))
        code = quantize_groups(blocking.to_groups(w), self.config.scalar_bits, True, True, h, np.float16)
        record = replace_weight(graph, site, blocking, code, layer.stats, self.name, self.config.bias_correct)
        record.nominal_bits = self.config.scalar_bits + SCALE_BITS * site.rows / w.size
        record.detail = why
        return record

    def _notes(self, report: PassReport, records: list[WeightRecord], have_stats: bool) -> None:
        done = [r for r in records if r.status == "quantized"]
        by_taps: dict[str, list[WeightRecord]] = {}
        for r in done:
            taps = "×".join(str(d) for d in r.shape[2:]) if len(r.shape) > 2 else "dense"
            by_taps.setdefault(taps, []).append(r)
        for taps, rs in sorted(by_taps.items()):
            size = sum(int(np.prod(r.shape)) for r in rs)
            nominal = sum(r.nominal_bits * int(np.prod(r.shape)) for r in rs) / size
            stored = 8 * sum(r.bytes_after for r in rs) / size
            report.notes.append(
                f"{taps} weights: {len(rs)} layers, {size:,d} parameters, nominal {nominal:.3f} b/param, "
                f"container {stored:.3f} b/param (indices, codebooks and scales counted)"
            )
        if self.config.bias_correct:
            report.notes.append(bias_note(records, have_stats))


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


def _initial_scales(layer: Layer) -> None:
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


def _items(layers: list[Layer]) -> tuple[np.ndarray, Metric]:
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


def _assign(layer: Layer, values: np.ndarray) -> np.ndarray:
    x, metric = _items([layer])
    return assign(x, values, metric)[0].reshape(layer.n, layer.channels)


def _refit_scales(layer: Layer, values: np.ndarray, labels: np.ndarray) -> None:
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
    u = np.linalg.cholesky(np.linalg.inv(hp)).T
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
