"""Transform quantization: decorrelate, allocate bits by rate–distortion, run in the transform domain.

After Young et al. (TQ, TPAMI 2022), post-training:

1. Per layer, a transform across input channels (onnxtq.transforms): `elt` (the local end-to-end
   learned transform from the weight covariance and the calibration input autocorrelation), `klt`
   or `identity`; grouped/depthwise convs and layers without full statistics stay in identity.
2. Coefficient channels are cut into bands. Per band and bit depth (0, 2, 4, 8 — the depths an
   ONNX container holds without waste —, those and 6, 10, 12 stored as two planes with `depths=planes`,
   or every depth 2..8 at its nominal rate with `depths=nominal`), per-row steps
   minimise the layer-output error, and the band's point is (bits stored, output distortion ×
   the layer's network gain); with `entropy` (a served-size target), the bits are the codes' entropy,
   what brotli sends. A band's share of the basis is part of its bits; 0 bits drops it.
   Untransformed layers may also let each output channel (row) choose its own depth: rows are
   independent in the layer-output error, and a Gather (int32 row order, paid for) restores their order.
   Each coding of a layer (identity, per-row identity, banded identity, transformed) is one Option.
3. Materialised, the chosen codes are finished by GPTQ error feedback (best per row of it and RTN),
   the basis is quantized first (8 bits) and the coefficients refitted to it.
4. Emission: `basis 1×1 → layer(T)` when that saves multiply-adds, else T·B folded in the graph;
   coefficient bands as DequantizeLinear pieces joined by Concat.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from onnxtq import transforms
from onnxtq.calibration import StatsStore, importance
from onnxtq.codec import Codec, Coded, Layer, LayerView, output_error
from onnxtq.emit import Piece, emit_pieces, emit_transformed
from onnxtq.entropy import row_entropy_bits
from onnxtq.packing import PLANE_BYTES, PLANES, container_bits, stored_bits
from onnxtq.quantize import int_range, quantize_groups, step_dtype
from onnxtq.rd import Band, Option, gaussian_bound_bits, whitened_spectrum
from onnxtq.reconstruct import Grid, Problems, gptq, gptq_factor
from onnxtq.sequential import drift_target, enough
from onnxtq.weights import WeightSite

#: Bit depths a band may take: those a container holds without waste; those plus the two-plane depths
#: (onnxtq.packing.PLANES: 6 = 4 + 2, 10 = 8 + 2, 12 = 8 + 4 bits stored); or every depth, at its nominal rate.
DEPTHS = {"container": (2, 4, 8), "planes": (2, 4, 6, 8, 10, 12), "nominal": (2, 3, 4, 5, 6, 7, 8)}
#: Values of a block of rows whose output errors are compared at once when a layer is materialised.
ERROR_BLOCK = 1 << 22
#: A two-plane depth is offered where its codes take this many times a plane's own bytes (PLANE_BYTES).
PLANE_SHARE = 16


@dataclass
class Coding:
    """One way to code a layer: coefficients [n, K, kk], the metric H̃ over their columns, bands."""

    transform: transforms.Transform | None  # None: identity, weight coded as it is
    coeffs: np.ndarray | None  # None once its curves are made: materialising refits what it codes
    hessian: np.ndarray | None  # [K·kk, K·kk] (one problem) for the curves; None: the layer's own statistics
    bands: list[tuple[int, int]]  # channel ranges [j0, j1)
    per_row: bool = False  # one band whose output channels choose their depths apart (rows are independent)
    weights: np.ndarray | None = None  # [n, K·kk] error weights of the step search when there is no full H
    factors: dict = field(default_factory=dict)  # band (j0, j1) -> its GPTQ factor, for every depth of the band


@dataclass
class TqLayer(LayerView):
    """A layer as tq codes it: its weight's shape [n, C, kk] and the ways to code it."""

    layer: Layer
    shape: tuple[int, int, int]  # [n, C, kk]
    codings: list[Coding] = field(default_factory=list)
    rows: tuple | None = None  # per-row points of the identity coding, shared by its uniform and per-row options

    @property
    def w(self) -> np.ndarray:
        """The weight as [n, C, kk] float64, made when read: a layer waiting for its allocation holds only the
        stored weight, so every layer's curves can wait at once."""
        return self.site.to_matrix(self.layer.w).astype(np.float64).reshape(self.shape)


class TqCodec(Codec):
    name = "tq"

    def __init__(
        self,
        transform: str = "elt",
        bands: int = 16,
        band_columns: int = 64,
        depths: str = "container",
        basis_bits: int = 8,
        runtime: str = "auto",
        gptq: bool = True,
        scale_bits: int = 16,
        entropy: bool = False,
    ):
        self.transform, self.bands, self.band_columns, self.depths = transform, bands, band_columns, depths
        self.basis_bits, self.runtime, self.gptq, self.scale_bits = basis_bits, runtime, gptq, scale_bits
        self.entropy = entropy  # codes cost their entropy (what brotli approaches), not their containers

    def options(self, layer: Layer | TqLayer) -> list[Option]:
        """One Option per coding of the layer; materialising one takes a depth per band from its picks (and
        rebuilds H̃ for the quantized basis)."""
        plain = layer.layer if isinstance(layer, TqLayer) else layer
        tq_layer = layer if isinstance(layer, TqLayer) else self.layer(plain.loaded())  # the curves read H often
        options = []
        for coding in tq_layer.codings:
            option = self._option(tq_layer, coding)
            option.materialize = self._materializer(tq_layer, coding, option)
            options.append(option)
        for coding in tq_layer.codings:  # what the curves needed and materialising does not
            coding.factors.clear()
            coding.coeffs = None
            coding.hessian = None  # materialising reads the layer's statistics again
            if coding.transform is not None:
                coding.transform.analysis = None
                if plain.source is not None:  # a model run in pieces: the basis waits on disk until materialised
                    coding.transform.synthesis = plain.source.keep_array(coding.transform.synthesis)
        tq_layer.layer = plain  # statistics written to disk are read again when materialised, not held
        return options

    @staticmethod
    def working_set(layer: Layer) -> int:
        """Bytes making the layer's curves holds (onnxtq.parallel.layer_map runs layers beside one another within
        the largest one's and a margin): about 6 d×d and 12 n×d float64 arrays (H, the transform and its inverse,
        GPTQ's factors; codes and errors per depth), measured at 1.24 GB for d = 4,096, n = 1,024 and 0.46 GB for
        1,024 × 4,096."""
        d = layer.size // layer.site.rows
        return 8 * (6 * d * d + 12 * layer.size)

    def _materializer(self, layer: TqLayer, coding: Coding, option: Option):
        def materialize(picks, drift=None) -> Coded:
            depths = [option.bands[i].depth[p] for i, p in enumerate(picks)]
            return self.materialize(layer, coding, depths, drift)

        return materialize

    def bound_bits(self, layer: TqLayer, distortion: float) -> float | None:
        """Gaussian reverse-water-filling rate (bits per weight) for this layer at `distortion`."""
        if layer.stats is None:
            return None
        site = layer.site
        problems = Problems(layer.stats, site.rows)
        w = problems.split(layer.w.reshape(site.rows, -1))
        mu = whitened_spectrum(w, problems.hessian)
        bits = gaussian_bound_bits(mu, problems.rows, distortion)
        return bits / layer.layer.size

    def layer(self, plain: Layer) -> TqLayer:
        """The site's weight as [n, C, kk] and its codings: identity, and a transform where one applies."""
        site, stats = plain.site, plain.stats
        m = site.to_matrix(plain.w).astype(np.float64)
        kk = int(np.prod(site.conv.kernel)) if site.conv else 1
        channels = m.shape[1] // kk
        w = m.reshape(m.shape[0], channels, kk)
        layer = TqLayer(plain, w.shape)
        full = stats is not None and stats.mode == "full" and stats.groups == 1
        h = stats.moment[0] if full else None
        diag = site.to_matrix(importance(site, stats)) if stats is not None and not full else None
        factors: dict = {}  # the codings of the weight as it is share one H, so their bands' GPTQ factors
        layer.codings.append(Coding(None, w, h, [(0, channels)], weights=diag, factors=factors))
        # per-row depths need a Gather of the rows after the pieces: their int32 order is fixed bits
        layer.codings.append(Coding(None, w, h, [(0, channels)], per_row=True, weights=diag, factors=factors))
        if full and len(self._bands(channels, kk)) > 1:  # bands buy mixed depths for a step per row each
            layer.codings.append(Coding(None, w, h, self._bands(channels, kk), factors=factors))
        if full and self.transform != "identity" and channels > 1:
            t = transforms.klt(w) if self.transform == "klt" else transforms.elt(w, transforms.tap_average(h, channels))
            coeffs = transforms.coefficients(w, t.analysis)
            # the weight's covariance sums n·kk outer products: channels past them (the eigenvalues' order) span what
            # no row reaches, so their coefficients are zero but for rounding (1e-20), whose squares are subnormal
            # floats: a 512 × 2,048 layer's step search ran 36 times slower on them
            coeffs[:, w.shape[0] * kk :] = 0.0
            layer.codings.append(
                Coding(t, coeffs, transforms.transformed_hessian(h, t.synthesis), self._bands(channels, kk))
            )
        return layer

    def _bands(self, channels: int, kk: int) -> list[tuple[int, int]]:
        count = int(np.clip(channels * kk // self.band_columns, 1, min(self.bands, channels)))
        edges = np.linspace(0, channels, count + 1).round().astype(int)
        return list(zip(edges[:-1], edges[1:]))

    def _scale_bits(self, site: WeightSite) -> int:
        return 8 * np.dtype(self._step_dtype(site)).itemsize

    def _step_dtype(self, site: WeightSite) -> type:
        return step_dtype(site, self.scale_bits)

    def _option(self, layer: TqLayer, coding: Coding) -> Option:
        """Rate–distortion points of each band of one coding of a layer."""
        n, _, kk = coding.coeffs.shape
        site = layer.site
        if coding.transform is None and len(coding.bands) == 1:
            if layer.rows is None:
                layer.rows = self._row_points(layer, coding)
            depth, bits, dist = layer.rows
            if coding.per_row:  # a plane's bytes are fixed: a row pays a share as if its group were 1/PLANE_SHARE
                planes = np.isin(depth, list(PLANES)) * (PLANE_SHARE - 1) * 8.0 * PLANE_BYTES / n
                planes = 0.0 if self.entropy else planes  # an entropy coder sends the codes, whatever holds them
                return Option("identity per row", [Band(depth, bits + planes, dist)], fixed_bits=32.0 * n)
            return Option("identity", [Band(depth, bits.sum(axis=0), dist.sum(axis=0))])
        basis_row = self.basis_bits * layer.shape[1] + self._scale_bits(site)
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
            for b in self._depths(band.size):
                deq, stored, terms = self._quantize(site, coding, j0, j1, band, b, self.gptq)
                depth.append(b)
                extra = (j1 - j0) * basis_row if coding.transform is not None else 0
                bits.append(float(np.sum(stored) + extra))
                if terms is None:
                    terms = self._distortion(layer, coding, j0, j1, deq - band)
                dist.append(float(np.sum(terms)))
            bands.append(Band(np.array(depth), np.array(bits), layer.gain * np.array(dist)))
        return Option(coding.transform.kind if coding.transform else "identity", bands)

    @property
    def _file_rate(self) -> bool:
        """Whether codes cost what the file stores (containers, planes), not their nominal depth."""
        return self.depths != "nominal"

    def _depths(self, codes: int) -> tuple[int, ...]:
        """The depths offered to `codes` codes: two-plane depths only where the codes outweigh a plane's own
        bytes PLANE_SHARE times (rows that choose depths apart, or a band, would not pay a plane's nodes)."""
        depths = DEPTHS[self.depths]
        if self.depths != "planes":
            return depths
        return tuple(b for b in depths if b not in PLANES or codes * b >= 8 * PLANE_BYTES * PLANE_SHARE)

    def _row_points(self, layer: TqLayer, coding: Coding):
        """Depths [P] and, per output channel, bits and gain-weighted distortion [n, P] of the whole weight."""
        n = coding.coeffs.shape[0]
        m = coding.coeffs.reshape(n, -1)
        channels = coding.coeffs.shape[1]
        depths = self._depths(m.size)
        bits, dist = np.empty((n, len(depths))), np.empty((n, len(depths)))
        for i, b in enumerate(depths):
            deq, stored, terms = self._quantize(layer.site, coding, 0, channels, m, b, self.gptq)
            bits[:, i] = stored if np.ndim(stored) else stored / n
            rows = terms.sum(axis=1) if terms is not None else self._row_errors(layer, coding, deq - m)
            dist[:, i] = layer.gain * rows
        return np.array(depths), bits, dist

    def _row_errors(self, layer: TqLayer, coding: Coding, delta: np.ndarray) -> np.ndarray:
        """Layer-output error per output channel of a weight error `delta` [n, d]."""
        if coding.hessian is not None:
            return ((delta @ coding.hessian) * delta).sum(axis=1)
        if layer.stats is not None and delta.shape[1] == layer.stats.dim:
            problems = Problems(layer.stats, delta.shape[0])
            return problems.row_error(problems.split(delta))
        return (delta**2).sum(axis=1)

    def _quantize(self, site, coding: Coding, j0: int, j1: int, band: np.ndarray, bits: int, feedback: bool):
        """Per-row steps of one band at `bits` (RTN, or GPTQ within the band): (dequantized band, bits stored, and
        from GPTQ the terms of its output error, (Δ H) ∘ Δ, or None). With `entropy`, the bits are each row's:
        its codes' lengths under the band's histogram, and its step."""
        code = self._code(site, coding, j0, j1, band, bits)
        n, cols = band.shape
        side = n * self._scale_bits(site) + (n * container_bits(bits) if code.zero_point is not None else 0)
        per_code = stored_bits(bits) if self._file_rate else bits
        if self._file_rate and bits in PLANES:  # a second plane: its steps and its nodes
            side += n * self._scale_bits(site) + 8 * PLANE_BYTES
        step = code.scale.astype(np.float64)[:, None]  # a step and a zero point per row: GPTQ takes them as columns
        zero = np.zeros_like(step) if code.zero_point is None else code.zero_point[:, None]
        q, terms = code.q.astype(np.float64), None
        if feedback and coding.hessian is not None:
            kk = coding.coeffs.shape[2]
            h = coding.hessian[j0 * kk : j1 * kk, j0 * kk : j1 * kk]
            if (j0, j1) not in coding.factors:
                coding.factors[j0, j1] = gptq_factor(h[None])
            factor = coding.factors[j0, j1]
            q, terms = self._feedback(band, h, q, step, zero, *int_range(bits, code.zero_point is None), factor)
        if self.entropy:
            return step * (q - zero), row_entropy_bits(q.astype(np.int64)) + side / n, terms
        return step * (q - zero), n * cols * per_code + side, terms

    def _code(self, site, coding: Coding, j0: int, j1: int, band: np.ndarray, bits: int, rows=slice(None)):
        """Per-row steps and codes of `band` (the given rows of coefficient channels j0..j1) at `bits`."""
        h = self._column_weights(coding, j0, j1)
        h = None if h is None else np.broadcast_to(h, (coding.coeffs.shape[0], h.shape[-1]))[rows]
        scale_dtype = self._step_dtype(site)
        return quantize_groups(band, bits, bits >= 3, True, h, scale_dtype)

    def _column_weights(self, coding: Coding, j0: int, j1: int) -> np.ndarray | None:
        kk = coding.coeffs.shape[2]
        if coding.hessian is not None:
            return np.diagonal(coding.hessian)[j0 * kk : j1 * kk]
        return None if coding.weights is None else coding.weights[:, j0 * kk : j1 * kk]

    def _distortion(self, layer: TqLayer, coding: Coding, j0: int, j1: int, delta: np.ndarray) -> float:
        """Layer-output error of a band error `delta` [n, cols] (cross-band terms left out)."""
        if coding.hessian is not None:
            kk = coding.coeffs.shape[2]
            h = coding.hessian[j0 * kk : j1 * kk, j0 * kk : j1 * kk]
            return float(((delta @ h) * delta).sum())
        return output_error(layer.site, layer.stats, layer.site.from_matrix(delta))

    def materialize(self, layer: TqLayer, coding: Coding, depths: list, drift=None) -> Coded:
        """Quantize one layer as allocated (a depth per band of `coding`).

        With `drift` (statistics of the inputs the quantized network gives this layer, and their cross
        moment with the original inputs) the codes are fitted to the weight that restores the original
        outputs from those inputs.
        """
        site, w = layer.site, layer.w
        n, channels, kk = w.shape
        kept = [(j0, j1, b) for (j0, j1), b in zip(coding.bands, depths) if np.all(b > 0)]
        stats, target, inputs = layer.stats, w, None
        full = stats is not None and stats.mode == "full" and stats.groups == 1  # GPTQ on the whole H
        if drift is not None and enough(drift[0]) and drift[0].mode == getattr(layer.stats, "mode", None):
            stats, cross = drift
            target = drift_target(site, w.reshape(n, -1), stats, cross).reshape(w.shape)
            inputs = stats
        basis_piece = None
        coeffs, hessian = target, (stats.moment[0] if full else None)
        if coding.transform is not None:
            rows = np.concatenate([np.arange(j0, j1) for j0, j1, _ in kept])
            basis = StatsStore.kept(coding.transform.synthesis)[rows]
            code = quantize_groups(basis, self.basis_bits, True, True, None, self._step_dtype(site))
            basis_hat = code.dequantize().astype(np.float64)
            gbar = transforms.tap_average(stats.moment[0], channels)
            coeffs = transforms.fit_coefficients(target, basis_hat, gbar)
            hessian = transforms.transformed_hessian(stats.moment[0], basis_hat)
            edges = np.cumsum([0] + [j1 - j0 for j0, j1, _ in kept])
            kept = [(int(a), int(b), d) for a, b, (_, _, d) in zip(edges[:-1], edges[1:], kept)]
            basis_q = code.q.T if site.transposed else code.q
            if site.conv is not None:
                basis_q = basis_q.reshape(*basis_q.shape, *[1] * len(site.conv.kernel))
            basis_piece = Piece(basis_q, code.scale, None, self.basis_bits, 1 if site.transposed else 0)
        refit = Coding(coding.transform, coeffs, hessian, [(a, b) for a, b, _ in kept], weights=coding.weights)
        q, step, zero, lo, hi = self._codes(site, refit, kept)
        if self.gptq and hessian is not None:
            q = self._feedback(coeffs.reshape(n, -1), hessian, q, step, zero, lo, hi, terms=False)[0]
        hat = (step * (q - zero)).reshape(coeffs.shape)
        w_hat = hat if coding.transform is None else transforms.over_channels(hat, basis_hat)
        delta = site.from_matrix((w_hat - w).reshape(n, -1))
        pieces, axis, order = self._pieces(site, q, step, zero, kept, coeffs.shape)
        used = sum(b - a for a, b, _ in kept)
        if basis_piece is None:

            def write(graph, pass_name: str) -> int:
                return emit_pieces(graph, site, pieces, axis, pass_name, order)

            runtime = ""
        else:
            factored = self._factored(site, channels, used)

            def write(graph, pass_name: str) -> int:
                return emit_transformed(graph, site, pieces, basis_piece, factored, pass_name)

            runtime = ", factored" if factored else ", folded"
        nominal = sum((b - a) * kk * np.broadcast_to(d, (n,)).sum() for a, b, d in kept) + (
            0 if basis_piece is None else basis_piece.q.size * self.basis_bits
        )
        kind = coding.transform.kind if coding.transform else "identity"
        if coding.per_row:
            values, counts = np.unique(kept[0][2], return_counts=True)
            depth_text = "rows at " + ", ".join(f"{v} bits: {c}" for v, c in zip(values[::-1], counts[::-1]))
        else:
            depth_text = f"band bits {[int(d) for _, _, d in kept]}"
        return Coded(
            site.from_matrix(w_hat.reshape(n, -1)),
            write,
            nominal_bits=nominal / layer.layer.size,
            detail=f"{kind} {used}/{channels} channels, {depth_text}{runtime}",
            inputs=inputs,
            output_error=output_error(site, stats, delta),
            error=delta,
        )

    def _codes(self, site, coding: Coding, kept):
        """RTN codes and their grid for the kept bands: q [n, K·kk], and step, zero, lo, hi per element, or per row
        ([n, 1]) where one band is kept (an output layer's grid would be four more float64 copies of it)."""
        n, _, kk = coding.coeffs.shape
        cols = [(a * kk, b * kk) for a, b, _ in kept]
        parts = []
        for (a, b, bits), (c0, c1) in zip(kept, cols):
            band = coding.coeffs[:, a:b].reshape(n, -1)
            per_row = np.broadcast_to(bits, (n,))
            grid_cols = 1 if len(kept) == 1 else c1 - c0
            part = [np.zeros((n, c1 - c0))] + [np.zeros((n, grid_cols)) for _ in range(4)]  # q; step, zero, lo, hi
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
        return tuple(parts[0]) if len(parts) == 1 else tuple(np.concatenate(p, axis=1) for p in zip(*parts))

    @staticmethod
    def _feedback(w0, hessian, q, step, zero, lo, hi, factor=None, terms=True) -> tuple[np.ndarray, np.ndarray]:
        """GPTQ on the chosen grid; per row, whichever of it and RTN has the smaller output error: (codes, the
        terms (Δ H) ∘ Δ of that error, which the caller sums rather than computing them a third time; None
        without `terms`)."""
        lo, hi = (np.broadcast_to(v, step.shape) for v in (lo, hi))
        grid = Grid(step[None], zero[None], lo[None], hi[None])
        fed = gptq(w0[None], hessian[None], grid, factor=factor)[0]
        if not terms:  # the codes alone: rows compared a block at a time (an output layer: 4 [n, d] float64 less)
            better, block = np.empty(len(q), bool), max(1, ERROR_BLOCK // w0.shape[1])
            for r in range(0, len(q), block):
                rows = slice(r, r + block)
                errors = [
                    _error_terms(step[rows], c[rows], zero[rows], w0[rows], hessian).sum(axis=1) for c in (q, fed)
                ]
                better[rows] = errors[1] < errors[0]
            return np.where(better[:, None], fed, q), None
        products = [_error_terms(step, c, zero, w0, hessian) for c in (q, fed)]
        fed_better = products[1].sum(axis=1) < products[0].sum(axis=1)
        products[0][fed_better] = products[1][fed_better]
        return np.where(fed_better[:, None], fed, q), products[0]

    def _pieces(self, site, q, step, zero, kept, shape):
        """DequantizeLinear pieces in the stored layout: (pieces, axis they join on, row order or None).

        Column bands join along the input axis; rows with their own depths are grouped by depth, joined
        along the output axis, and put back in order by a Gather.
        """
        n, _, kk = shape
        out_axis, in_axis = (1, 0) if site.transposed else (0, 1)
        dtype = self._step_dtype(site)

        def stored(codes):  # [r, channels, kk] -> the weight's layout
            if site.conv is not None:
                return codes.reshape(codes.shape[0], codes.shape[1], *site.shape[2:])
            return codes[:, :, 0].T if site.transposed else codes[:, :, 0]

        def piece(rows, a, b, bits):
            cols = slice(a * kk, b * kk)
            codes = q[rows, cols].reshape(-1, b - a, kk)
            zp = None if bits >= 3 else zero[rows, a * kk].astype(np.int32)
            scale = step[rows, a * kk].astype(dtype)
            return Piece(stored(codes).astype(np.int32), scale, zp, bits, out_axis, self._file_rate)

        per_row = np.ndim(kept[0][2]) > 0 and len(np.unique(kept[0][2])) > 1
        if not per_row:
            every = np.arange(n)
            return [piece(every, a, b, int(np.max(d))) for a, b, d in kept], in_axis, None
        a, b, depths = kept[0]
        groups = [np.flatnonzero(depths == d) for d in np.unique(depths)[::-1]]
        return [piece(rows, a, b, int(depths[rows[0]])) for rows in groups], out_axis, np.concatenate(groups)

    def _factored(self, site: WeightSite, channels: int, kept: int) -> bool:
        if not site.rewires_reader:
            return False  # a shared, recurrent or in-body weight: W = T·B is computed and read as it was
        if self.runtime != "auto":
            return self.runtime == "factored"
        n = site.rows
        kk = int(np.prod(site.conv.kernel)) if site.conv else 1
        stride = int(np.prod(site.conv.strides)) if site.conv else 1
        return channels * kept * stride + kept * kk * n < channels * kk * n


def _error_terms(step, codes, zero, w0, hessian) -> np.ndarray:
    """(Δ H) ∘ Δ for Δ = step·(codes − zero) − w0 [n, d], computed in place of numpy's temporaries."""
    delta = codes - zero
    delta *= step
    delta -= w0
    product = delta @ hessian
    product *= delta
    return product
