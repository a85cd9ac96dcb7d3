"""tq: transform quantization — decorrelate, allocate bits by rate–distortion, run in the transform domain.

After Young et al. (TQ, TPAMI 2022), post-training:

1. Per layer, a transform across input channels (onnxtq.transforms): `elt` (the local end-to-end
   learned transform from the weight covariance and the calibration input autocorrelation), `klt`
   or `identity`; grouped/depthwise convs and layers without full statistics stay in identity.
2. Coefficient channels are cut into bands. Per band and bit depth (0, 2, 4, 8 — the depths an
   ONNX container holds without waste — or every depth 2..8 with `depths=nominal`), per-row steps
   minimise the layer-output error, and the band's point is (bits stored, output distortion ×
   the layer's network gain). A band's share of the basis is part of its bits; 0 bits drops it.
   Untransformed layers may also let each output channel (row) choose its own depth: rows are
   independent in the layer-output error, and a Gather (int32 row order, paid for) restores their order.
3. One Lagrangian over all bands of all layers meets the target (`rate` bits per weight, `size`
   bytes or predicted output `sqnr`); each layer also picks identity or transform, whichever is cheaper.
4. The chosen codes are finished by GPTQ error feedback (best per row of it and RTN), the basis is
   quantized first (8 bits) and the coefficients refitted to it, the bias absorbs the mean error.
5. Emission: `basis 1×1 → layer(T)` when that saves multiply-adds, else T·B folded in the graph;
   coefficient bands as DequantizeLinear pieces joined by Concat.

The report gives per layer the stored and nominal bits and the Gaussian rate–distortion bound at
the distortion reached, and for the network the predicted (Σ g·D) and measured output error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnxtq.passes.rtn import fp32_steps_only, quantizable
from tqdm import tqdm

from onnxtq import transforms
from onnxtq.bias import bias_note, correct_bias, output_shift
from onnxtq.calibration import collect_drift, importance
from onnxtq.emit import Piece, db, emit_pieces, emit_transformed
from onnxtq.gains import Probe, layer_output_error
from onnxtq.graph import Graph, copy_model
from onnxtq.model_io import tensor_nbytes
from onnxtq.packing import container_bits
from onnxtq.pass_infra import Context, Pass, PassConfig
from onnxtq.quantize import int_range, quantize_groups
from onnxtq.rd import Band, Option, allocate, gaussian_bound_bits, whitened_spectrum
from onnxtq.reconstruct import Grid, Problems, gptq
from onnxtq.report import PassReport, WeightRecord
from onnxtq.sequential import drift_calibration, drift_target, enough, stages
from onnxtq.weights import WeightSite, discover

DEPTHS = {"container": (2, 4, 8), "nominal": (2, 3, 4, 5, 6, 7, 8)}
#: Bytes a size target keeps free for what the run adds after the pass (model properties, provenance).
SIZE_MARGIN = 512
#: Allocations tried for a size target, each with the graph overhead measured on the previous one.
SIZE_ATTEMPTS = 3


@dataclass(frozen=True)
class TqConfig(PassConfig):
    rate: float = 4.0  # bits per weight over the quantized weights (codes, steps, zero points, bases)
    size: int = 0  # target file bytes instead of a rate (0: off)
    sqnr: float = 0.0  # target predicted output SQNR in dB instead of a rate (0: off)
    transform: str = "elt"  # elt | klt | identity
    bands: int = 16  # most bands per layer
    band_columns: int = 64  # fewest coefficient columns per band (a band stores one step per row)
    depths: str = "container"  # container: 0/2/4/8-bit bands | nominal: 0, 2..8 (3,5,6,7 stored in wider types)
    basis_bits: int = 8
    runtime: str = "auto"  # auto (factored where it saves multiply-adds) | factored | folded
    gptq: bool = True  # finish the chosen codes by error feedback
    gains: bool = True  # weigh layers by their measured network gain (else layer-output error alone)
    gain_samples: int = 16
    min_elements: int = 0
    scale_bits: int = 16
    bias_correct: bool = True
    sequential: bool = False  # fit each layer to the inputs of the network quantized before it

    def __post_init__(self):
        targets = sum(bool(x) for x in (self.size, self.sqnr)) + (self.rate != 4.0)
        if targets > 1:
            raise ValueError("give one target: rate, size or sqnr")
        if not 0 < self.rate <= 16:
            raise ValueError(f"rate must be in (0, 16], not {self.rate}")
        if self.transform not in ("elt", "klt", "identity"):
            raise ValueError(f"transform must be elt, klt or identity, not '{self.transform}'")
        if self.depths not in DEPTHS:
            raise ValueError(f"depths must be container or nominal, not '{self.depths}'")
        if self.runtime not in ("auto", "factored", "folded"):
            raise ValueError(f"runtime must be auto, factored or folded, not '{self.runtime}'")
        if self.basis_bits not in (4, 8) or self.scale_bits not in (16, 32):
            raise ValueError("basis_bits must be 4 or 8, scale_bits 16 or 32")
        if self.bands < 1 or self.band_columns < 1 or self.gain_samples < 1:
            raise ValueError("bands, band_columns and gain_samples must be positive")
        if self.sqnr and not self.gains:
            raise ValueError("an sqnr target needs gains=true (network-output distortions)")


@dataclass
class Coding:
    """One way to code a layer: coefficients [n, K, kk], the metric H̃ over their columns, bands."""

    transform: transforms.Transform | None  # None: identity, weight coded as it is
    coeffs: np.ndarray
    hessian: np.ndarray | None  # [K·kk, K·kk] for a single problem; None: the layer's own statistics
    bands: list[tuple[int, int]]  # channel ranges [j0, j1)
    per_row: bool = False  # one band whose output channels choose their depths apart (rows are independent)
    weights: np.ndarray | None = None  # [n, K·kk] error weights of the step search when there is no full H


@dataclass
class Layer:
    site: WeightSite
    w: np.ndarray  # [n, C, kk] float64
    stats: object
    gain: float = 1.0
    codings: list[Coding] = field(default_factory=list)
    rows: tuple | None = None  # per-row points of the identity coding, shared by its uniform and per-row options


class TqPass(Pass):
    name = "tq"
    Config = TqConfig
    needs_stats = True

    def min_opset(self) -> int:
        return 25 if 2 in DEPTHS[self.config.depths] else 21

    def run(self, ctx: Context) -> PassReport:
        cfg = self.config
        report = self.new_report()
        sites = quantizable(discover(ctx.graph), cfg.min_elements, report)
        if not sites:  # nothing to allocate over (and no rate to report per weight)
            report.notes.append("no weight to quantize")
            return report
        clock = [time.perf_counter()]
        layers = [self._layer(ctx, s) for s in tqdm(sites, desc="tq transforms", disable=None, leave=False)]
        probe = Probe(ctx.graph.model, ctx.data, cfg.gain_samples) if cfg.gains else None
        if probe is not None:
            gains = probe.gains(ctx.graph.model, sites, lambda s, e: layer_output_error(s, ctx.stats.get(s), e))
            for layer in layers:
                layer.gain = gains[layer.site.name]
        options = {}
        for layer in tqdm(layers, desc="tq curves", disable=None, leave=False):
            options[layer.site.name] = [self._option(layer, c) for c in layer.codings]
            for coding in layer.codings:  # emission rebuilds H̃ for the quantized basis
                if coding.transform is not None:
                    coding.hessian = None
        weights = sum(int(np.prod(s.shape)) for s in sites)
        target = self._target(ctx, sites, weights, probe)
        chosen = allocate(options, **target)
        clock.append(time.perf_counter())
        pristine = copy_model(ctx.graph.model) if cfg.size else None
        for attempt in range(SIZE_ATTEMPTS):
            records, predicted, bound_bits, nominal_bits = self._emit_all(ctx, sites, layers, options, chosen)
            excess = _live_bytes(ctx.graph.model) + SIZE_MARGIN - cfg.size if cfg.size else 0
            if excess <= 0:
                break
            if attempt == SIZE_ATTEMPTS - 1:
                report.notes.append(f"size target {cfg.size:,d} B missed by {excess:,d} B")
                break
            # graph structure (nodes, names, tensor headers) was not in the budget: take it off what the
            # allocation used (it may have left part of its budget unspent) and redo
            target["max_bits"] = min(target["max_bits"], chosen.bits) - 8.0 * excess * 1.1
            chosen = allocate(options, **target)
            ctx.graph = Graph(copy_model(pristine))
        report.records.extend(records)
        clock.append(time.perf_counter())
        report.notes.append(
            f"time: transforms, gains, curves and allocation {clock[1] - clock[0]:.0f} s; "
            f"quantization and emission {clock[2] - clock[1]:.0f} s"
        )
        stored = sum(r.bytes_after for r in records)
        report.notes.append(
            f"rate over {weights:,d} weights: nominal {nominal_bits / weights:.3f} b/w, container "
            f"{8 * stored / weights:.3f} b/w ({stored:,d} B), Gaussian bound {bound_bits / weights:.3f} b/w at the "
            f"distortion reached; allocation predicted {chosen.bits / weights:.3f} b/w"
        )
        transformed = [r for r in records if r.detail.startswith(("elt", "klt"))]
        report.notes.append(f"transform kept on {len(transformed)} of {len(records)} layers ({cfg.transform})")
        if probe is not None:
            measured = probe.error(ctx.graph.model)
            report.notes.append(
                f"additivity on {probe.samples} inputs: predicted output SQNR {db(probe.energy, predicted):.2f} dB "
                f"(Σ g·D), measured {db(probe.energy, measured):.2f} dB"
            )
        if cfg.bias_correct:
            report.notes.append(bias_note(records, True))
        return report

    def _emit_all(self, ctx: Context, sites, layers, options, chosen):
        """Every layer quantized and emitted as allocated: (records, Σ g·D, bound bits, nominal bits)."""
        records, predicted, bound_bits, nominal_bits = [], 0.0, 0.0, 0.0
        if self.config.sequential:  # the network before any weight changes, to run beside the current one
            reference, budget = copy_model(ctx.graph.model), drift_calibration(ctx.data)
        by_name = {layer.site.name: layer for layer in layers}
        with tqdm(total=len(layers), desc="tq emit", disable=None, leave=False) as bar:
            for stage in stages(sites) if self.config.sequential else [sites]:
                drift = {}
                if self.config.sequential:
                    drift = collect_drift(reference, ctx.graph.model, stage, ctx.data, budget)
                for site in stage:
                    layer = by_name[site.name]
                    index, picks = chosen.choice[site.name]
                    depths = [options[site.name][index].bands[i].depth[p] for i, p in enumerate(picks)]
                    record, dist, nominal = self._emit(ctx, layer, layer.codings[index], depths, drift.get(site.name))
                    records.append(record)
                    predicted += layer.gain * dist
                    nominal_bits += nominal
                    bound_bits += (record.bound_bits or 0.0) * int(np.prod(site.shape))
                    bar.update()
        return records, predicted, bound_bits, nominal_bits

    def _target(self, ctx: Context, sites, weights: int, probe) -> dict:
        cfg = self.config
        if cfg.sqnr:
            return {"max_distortion": probe.energy / 10 ** (cfg.sqnr / 10)}
        if cfg.size:
            others = _live_bytes(ctx.graph.model) - sum(tensor_nbytes(ctx.graph.initializers[s.name]) for s in sites)
            return {"max_bits": 8.0 * max(cfg.size - others, 0)}
        return {"max_bits": cfg.rate * weights}

    def _layer(self, ctx: Context, site: WeightSite) -> Layer:
        """The site's weight as [n, C, kk] and its codings: identity, and a transform where one applies."""
        cfg = self.config
        m = site.to_matrix(ctx.graph.array(site.name)).astype(np.float64)
        kk = int(np.prod(site.conv.kernel)) if site.conv else 1
        channels = m.shape[1] // kk
        w = m.reshape(m.shape[0], channels, kk)
        stats = ctx.stats.get(site)
        layer = Layer(site, w, stats)
        full = stats is not None and stats.mode == "full" and stats.groups == 1
        h = stats.moment[0] if full else None
        diag = site.to_matrix(importance(site, stats)) if stats is not None and not full else None
        layer.codings.append(Coding(None, w, h, [(0, channels)], weights=diag))
        # per-row depths need a Gather of the rows after the pieces: their int32 order is fixed bits
        layer.codings.append(Coding(None, w, h, [(0, channels)], per_row=True, weights=diag))
        if full and len(self._bands(channels, kk)) > 1:  # bands buy mixed depths for a step per row each
            layer.codings.append(Coding(None, w, h, self._bands(channels, kk)))
        if full and cfg.transform != "identity" and channels > 1:
            t = transforms.klt(w) if cfg.transform == "klt" else transforms.elt(w, transforms.tap_average(h, channels))
            coeffs = transforms.coefficients(w, t.analysis)
            layer.codings.append(
                Coding(t, coeffs, transforms.transformed_hessian(h, t.synthesis), self._bands(channels, kk))
            )
        return layer

    def _bands(self, channels: int, kk: int) -> list[tuple[int, int]]:
        count = int(np.clip(channels * kk // self.config.band_columns, 1, min(self.config.bands, channels)))
        edges = np.linspace(0, channels, count + 1).round().astype(int)
        return list(zip(edges[:-1], edges[1:]))

    def _scale_bits(self, site: WeightSite) -> int:
        return 32 if fp32_steps_only(site) else self.config.scale_bits

    def _option(self, layer: Layer, coding: Coding) -> Option:
        """Rate–distortion points of each band of one coding of a layer."""
        cfg = self.config
        n, _, kk = coding.coeffs.shape
        site = layer.site
        if coding.transform is None and len(coding.bands) == 1:
            if layer.rows is None:
                layer.rows = self._row_points(layer, coding)
            depth, bits, dist = layer.rows
            if coding.per_row:
                return Option("identity per row", [Band(depth, bits, dist)], fixed_bits=32.0 * n)
            return Option("identity", [Band(depth, bits.sum(axis=0), dist.sum(axis=0))])
        basis_row = cfg.basis_bits * layer.w.shape[1] + self._scale_bits(site)
        bands = []
        for j0, j1 in coding.bands:
            band = coding.coeffs[:, j0:j1].reshape(n, -1)
            depth, bits, dist = [], [], []
            # a dropped band: no codes and no basis rows; never the strongest, or a whole layer could vanish on the
            # strength of a gain measured with small noise (dropping is far from the linear regime)
            if coding.transform is not None and j0 > 0:
                depth.append(0)
                bits.append(0.0)
                dist.append(self._distortion(layer, coding, j0, j1, -band))
            for b in DEPTHS[cfg.depths]:
                deq, stored = self._quantize(site, coding, j0, j1, band, b, cfg.gptq)
                depth.append(b)
                extra = (j1 - j0) * basis_row if coding.transform is not None else 0
                bits.append(float(stored + extra))
                dist.append(self._distortion(layer, coding, j0, j1, deq - band))
            bands.append(Band(np.array(depth), np.array(bits), layer.gain * np.array(dist)))
        return Option(coding.transform.kind if coding.transform else "identity", bands)

    def _row_points(self, layer: Layer, coding: Coding):
        """Depths [P] and, per output channel, bits and gain-weighted distortion [n, P] of the whole weight."""
        n = coding.coeffs.shape[0]
        m = coding.coeffs.reshape(n, -1)
        channels = coding.coeffs.shape[1]
        depths = DEPTHS[self.config.depths]
        bits, dist = np.empty((n, len(depths))), np.empty((n, len(depths)))
        for i, b in enumerate(depths):
            deq, stored = self._quantize(layer.site, coding, 0, channels, m, b, self.config.gptq)
            bits[:, i] = stored / n
            dist[:, i] = layer.gain * self._row_errors(layer, coding, deq - m)
        return np.array(depths), bits, dist

    def _row_errors(self, layer: Layer, coding: Coding, delta: np.ndarray) -> np.ndarray:
        """Layer-output error per output channel of a weight error `delta` [n, d]."""
        if coding.hessian is not None:
            return ((delta @ coding.hessian) * delta).sum(axis=1)
        if layer.stats is not None and delta.shape[1] == layer.stats.dim:
            problems = Problems(layer.stats, delta.shape[0])
            return problems.row_error(problems.split(delta))
        return (delta**2).sum(axis=1)

    def _quantize(self, site, coding: Coding, j0: int, j1: int, band: np.ndarray, bits: int, feedback: bool):
        """Per-row steps of one band at `bits` (RTN, or GPTQ within the band): (dequantized band, bits stored)."""
        code = self._code(site, coding, j0, j1, band, bits)
        n, cols = band.shape
        stored_bits = container_bits(bits) if self.config.depths == "container" else bits
        side = n * self._scale_bits(site) + (n * container_bits(bits) if code.zero_point is not None else 0)
        step = np.repeat(code.scale.astype(np.float64)[:, None], cols, 1)
        zero = np.zeros_like(step) if code.zero_point is None else np.repeat(code.zero_point[:, None], cols, 1)
        q = code.q.astype(np.float64)
        if feedback and coding.hessian is not None:
            kk = coding.coeffs.shape[2]
            h = coding.hessian[j0 * kk : j1 * kk, j0 * kk : j1 * kk]
            q = self._feedback(band, h, q, step, zero, *int_range(bits, code.zero_point is None))
        return step * (q - zero), n * cols * stored_bits + side

    def _code(self, site, coding: Coding, j0: int, j1: int, band: np.ndarray, bits: int, rows=slice(None)):
        """Per-row steps and codes of `band` (the given rows of coefficient channels j0..j1) at `bits`."""
        h = self._column_weights(coding, j0, j1)
        h = None if h is None else np.broadcast_to(h, (coding.coeffs.shape[0], h.shape[-1]))[rows]
        scale_dtype = np.float32 if self._scale_bits(site) == 32 else np.float16
        return quantize_groups(band, bits, bits >= 3, True, h, scale_dtype)

    def _column_weights(self, coding: Coding, j0: int, j1: int) -> np.ndarray | None:
        kk = coding.coeffs.shape[2]
        if coding.hessian is not None:
            return np.diagonal(coding.hessian)[j0 * kk : j1 * kk]
        return None if coding.weights is None else coding.weights[:, j0 * kk : j1 * kk]

    def _distortion(self, layer: Layer, coding: Coding, j0: int, j1: int, delta: np.ndarray) -> float:
        """Layer-output error of a band error `delta` [n, cols] (cross-band terms left out)."""
        if coding.hessian is not None:
            kk = coding.coeffs.shape[2]
            h = coding.hessian[j0 * kk : j1 * kk, j0 * kk : j1 * kk]
            return float(((delta @ h) * delta).sum())
        return layer_output_error(layer.site, layer.stats, layer.site.from_matrix(delta))

    def _emit(self, ctx: Context, layer: Layer, coding: Coding, depths: list[int], drift=None):
        """Quantize, bias-correct and emit one layer as allocated: (record, output distortion, nominal bits).

        With `drift` (statistics of the inputs the quantized network gives this layer, and their cross
        moment with the original inputs) the codes are fitted to the weight that restores the original
        outputs from those inputs.
        """
        cfg, site = self.config, layer.site
        n, channels, kk = layer.w.shape
        kept = [(j0, j1, b) for (j0, j1), b in zip(coding.bands, depths) if np.all(b > 0)]
        before = tensor_nbytes(ctx.graph.initializers[site.name])
        stats, target, reference = layer.stats, layer.w, None
        if drift is not None and enough(drift[0]) and drift[0].mode == getattr(layer.stats, "mode", None):
            stats, cross = drift
            target = drift_target(site, layer.w.reshape(n, -1), stats, cross).reshape(layer.w.shape)
            reference = layer.stats
        basis_piece = None
        coeffs, hessian = target, (stats.moment[0] if coding.hessian is not None else None)
        if coding.transform is not None:
            rows = np.concatenate([np.arange(j0, j1) for j0, j1, _ in kept])
            basis = coding.transform.synthesis[rows]
            scale_dtype = np.float32 if self._scale_bits(site) == 32 else np.float16  # MatMul: fp32 steps
            code = quantize_groups(basis, cfg.basis_bits, True, True, None, scale_dtype)
            basis_hat = code.dequantize().astype(np.float64)
            gbar = transforms.tap_average(stats.moment[0], channels)
            coeffs = transforms.fit_coefficients(target, basis_hat, gbar)
            hessian = transforms.transformed_hessian(stats.moment[0], basis_hat)
            edges = np.cumsum([0] + [j1 - j0 for j0, j1, _ in kept])
            kept = [(int(a), int(b), d) for a, b, (_, _, d) in zip(edges[:-1], edges[1:], kept)]
            basis_q = code.q.T if site.transposed else code.q
            if site.conv is not None:
                basis_q = basis_q.reshape(*basis_q.shape, *[1] * len(site.conv.kernel))
            basis_piece = Piece(basis_q, code.scale, None, cfg.basis_bits, 1 if site.transposed else 0)
        refit = Coding(coding.transform, coeffs, hessian, [(a, b) for a, b, _ in kept], weights=coding.weights)
        q, step, zero, lo, hi = self._codes(site, refit, kept)
        if cfg.gptq and hessian is not None:
            q = self._feedback(coeffs.reshape(n, -1), hessian, q, step, zero, lo, hi)
        hat = (step * (q - zero)).reshape(coeffs.shape)
        w_hat = hat if coding.transform is None else np.einsum("nkt,kc->nct", hat, basis_hat)
        delta = site.from_matrix((w_hat - layer.w).reshape(n, -1))
        original = site.from_matrix(layer.w.reshape(n, -1))
        dtype = ctx.graph.array(site.name).dtype
        why_not = "" if cfg.bias_correct else "off"
        node = ctx.graph.consumers[site.name][0][0]
        if cfg.bias_correct and stats is not None:
            shift = output_shift(site, stats, delta)
            if reference is not None:  # the bias absorbs E[Ŵx̃] − E[Wx]
                shift += output_shift(site, stats, original) - output_shift(site, reference, original)
            why_not = correct_bias(ctx.graph, node, site, shift, dtype)
        elif cfg.bias_correct:
            why_not = "no statistics"
        pieces, axis, order = self._pieces(site, q, step, zero, kept, coeffs.shape)
        used = sum(b - a for a, b, _ in kept)
        if basis_piece is None:
            after = emit_pieces(ctx.graph, site, pieces, axis, self.name, order)
            runtime = ""
        else:
            factored = self._factored(site, channels, used)
            after = emit_transformed(ctx.graph, site, pieces, basis_piece, factored, self.name)
            runtime = ", factored" if factored else ", folded"
        size = int(np.prod(site.shape))
        dist = layer_output_error(site, stats, delta)
        nominal = sum((b - a) * kk * np.broadcast_to(d, (n,)).sum() for a, b, d in kept) + (
            0 if basis_piece is None else basis_piece.q.size * cfg.basis_bits
        )
        record = WeightRecord.of(site, "quantized", bytes_before=before, bytes_after=after, bits=8 * after / size)
        record.nominal_bits = nominal / size
        record.bias_corrected = cfg.bias_correct and not why_not
        record.reason = f"bias not corrected: {why_not}" if why_not else ""
        record.weight_sqnr_db = db((layer.w**2).sum(), ((w_hat - layer.w) ** 2).sum())
        if stats is not None:
            record.output_sqnr_db = db(layer_output_error(site, stats, original), dist)
        record.bound_bits = _bound_bits(site, layer, dist)
        kind = coding.transform.kind if coding.transform else "identity"
        if coding.per_row:
            values, counts = np.unique(kept[0][2], return_counts=True)
            depth_text = "rows at " + ", ".join(f"{v} bits: {c}" for v, c in zip(values[::-1], counts[::-1]))
        else:
            depth_text = f"band bits {[int(d) for _, _, d in kept]}"
        record.detail = f"{kind} {used}/{channels} channels, {depth_text}{runtime}"
        return record, dist, nominal

    def _codes(self, site, coding: Coding, kept):
        """RTN codes and their grid, per element, for the kept bands: q, step, zero, lo, hi [n, K·kk]."""
        n, _, kk = coding.coeffs.shape
        cols = [(a * kk, b * kk) for a, b, _ in kept]
        parts = []
        for (a, b, bits), (c0, c1) in zip(kept, cols):
            band = coding.coeffs[:, a:b].reshape(n, -1)
            per_row = np.broadcast_to(bits, (n,))
            part = [np.zeros((n, c1 - c0)) for _ in range(5)]  # q, step, zero, lo, hi
            for depth in np.unique(per_row):
                rows = per_row == depth
                code = self._code(site, coding, a, b, band[rows], int(depth), rows)
                lo, hi = int_range(int(depth), code.zero_point is None)
                zero = 0.0 if code.zero_point is None else code.zero_point.astype(np.float64)[:, None]
                part[0][rows] = code.q
                part[1][rows] = code.scale.astype(np.float64)[:, None]
                part[2][rows] = zero
                part[3][rows], part[4][rows] = lo, hi
            parts.append(part)
        return tuple(np.concatenate(p, axis=1) for p in zip(*parts))

    @staticmethod
    def _feedback(w0, hessian, q, step, zero, lo, hi) -> np.ndarray:
        """GPTQ on the chosen grid; per row, whichever of it and RTN has the smaller output error."""
        lo, hi = (np.broadcast_to(v, step.shape) for v in (lo, hi))
        grid = Grid(step[None], zero[None], lo[None], hi[None])
        fed = gptq(w0[None], hessian[None], grid)[0]
        err = [(((step * (c - zero) - w0) @ hessian) * (step * (c - zero) - w0)).sum(axis=1) for c in (q, fed)]
        return np.where((err[1] < err[0])[:, None], fed, q)

    def _pieces(self, site, q, step, zero, kept, shape):
        """DequantizeLinear pieces in the stored layout: (pieces, axis they join on, row order or None).

        Column bands join along the input axis; rows with their own depths are grouped by depth, joined
        along the output axis, and put back in order by a Gather.
        """
        n, _, kk = shape
        out_axis, in_axis = (1, 0) if site.transposed else (0, 1)
        dtype = np.float32 if self._scale_bits(site) == 32 else np.float16

        def stored(codes):  # [r, channels, kk] -> the weight's layout
            if site.conv is not None:
                return codes.reshape(codes.shape[0], codes.shape[1], *site.shape[2:])
            return codes[:, :, 0].T if site.transposed else codes[:, :, 0]

        def piece(rows, a, b, bits):
            cols = slice(a * kk, b * kk)
            codes = q[rows, cols].reshape(-1, b - a, kk)
            zp = None if bits >= 3 else zero[rows, a * kk].astype(np.int32)
            return Piece(stored(codes).astype(np.int32), step[rows, a * kk].astype(dtype), zp, bits, out_axis)

        per_row = np.ndim(kept[0][2]) > 0 and len(np.unique(kept[0][2])) > 1
        if not per_row:
            every = np.arange(n)
            return [piece(every, a, b, int(np.max(d))) for a, b, d in kept], in_axis, None
        a, b, depths = kept[0]
        groups = [np.flatnonzero(depths == d) for d in np.unique(depths)[::-1]]
        return [piece(rows, a, b, int(depths[rows[0]])) for rows in groups], out_axis, np.concatenate(groups)

    def _factored(self, site: WeightSite, channels: int, kept: int) -> bool:
        if self.config.runtime != "auto":
            return self.config.runtime == "factored"
        n = site.rows
        kk = int(np.prod(site.conv.kernel)) if site.conv else 1
        stride = int(np.prod(site.conv.strides)) if site.conv else 1
        return channels * kept * stride + kept * kk * n < channels * kk * n


def _live_bytes(model: onnx.ModelProto) -> int:
    """Serialized size without what earlier passes left unused (dropped when the run ends)."""
    graph = Graph(copy_model(model))
    graph.remove_dead()
    return len(graph.model.SerializeToString())


def _bound_bits(site: WeightSite, layer: Layer, distortion: float) -> float | None:
    """Gaussian reverse-water-filling rate (bits per weight) for this layer at `distortion`."""
    if layer.stats is None:
        return None
    problems = Problems(layer.stats, site.rows)
    w = problems.split(layer.w.reshape(site.rows, -1))
    mu = whitened_spectrum(w, problems.hessian)
    bits = gaussian_bound_bits(mu, problems.rows, distortion)
    return bits / layer.w.size
