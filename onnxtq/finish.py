"""The one finishing tail of every coded weight: correct the bias, write the codes, record the weight.

    b ← b − E[(Ŵ − W_now) x]              (onnxtq.bias; W_now: what the layer computes before this step)

then the codec's own recipe writes Ŵ (DequantizeLinear pieces, a transform, a codebook lookup, codes
rewritten in place), and the record gives bytes before and after, bits per weight, weight and
layer-output SQNR (and the layer-output error itself, E‖(Ŵ − W)x‖²), the nominal bits and how it is
coded. A layer fitted to the inputs the partly quantized network gives it (sequential fitting) has its
bias absorb E[Ŵx̃] − E[Wx]: the mean error measured against the original inputs.

What needs no graph (the shift, the figures) is `measure`, which a pass may run on a worker beside the
thread that writes (auto's emit); `finish` writes, measuring first unless given the figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxtq import kernels
from onnxtq.bias import correct_bias, half_bias, output_shift
from onnxtq.codec import Coded, Layer, output_error
from onnxtq.graph import Graph
from onnxtq.report import WeightRecord


@dataclass
class Figures:
    """A coded layer's bias shift and record figures: products of its weight, codes and statistics alone."""

    shift: np.ndarray | None  # E[(Ŵ − W_now) x] per output channel; None: the bias is not corrected
    why_not: str  # why it is not ('' where it is, or where correction was not asked for)
    weight_energies: tuple[float, float]  # (Σ w², Σ (w − ŵ)²)
    output_error: float | None  # E‖(Ŵ − W)x‖² (None: no statistics)
    output_signal: float | None  # E‖W x‖²


def measure(layer: Layer, coded: Coded, bias_correct: bool, now: np.ndarray | None = None) -> Figures:
    """What `finish` computes of one coded layer before touching the graph (`now`: as finish's)."""
    site = layer.site
    own = layer.stats  # read once: statistics written to disk are read back whole on each ask
    stats = coded.inputs or own
    weight = layer.w  # read once, before the codes replace it (a lazy layer reads it from the graph)
    w = None if stats is None else weight.astype(np.float64)  # what the bias and the output figures read
    reference = own if coded.inputs is not None else None
    shift, why_not = None, ""
    if bias_correct and stats is None:
        why_not = "no statistics"
    elif bias_correct and site.recurrence is None and not _alone(layer):
        why_not = f"read by {site.readers} ops" if site.readers > 1 else "its reader sits inside a body"
    elif bias_correct:
        # numpy's sums run in memory order, so a codec that computed Ŵ − W itself (in its matrix view) has
        # the shift computed on that array, and on the weight laid out like it: the bias bits do not move
        error = coded.error if coded.error is not None else coded.w_hat - (w if now is None else now)
        shift = output_shift(site, stats, error)
        if reference is not None:
            w_like = w
            if coded.error is not None:
                w_like = np.empty_like(error)
                w_like[...] = w
            shift += output_shift(site, stats, w_like) - output_shift(site, reference, w_like)
    measured, signal = None, None
    if stats is not None:  # figures for the report: float32 products, half the time of float64's
        measured = coded.output_error
        if measured is None:
            measured = output_error(site, stats, w - coded.w_hat, np.float32)
        signal = output_error(site, stats, w, np.float32)
    return Figures(shift, why_not, kernels.energies(weight, coded.w_hat), measured, signal)


def finish(
    graph: Graph,
    layer: Layer,
    coded: Coded,
    pass_name: str,
    bias_correct: bool,
    node: ir.Node | None = None,
    now: np.ndarray | None = None,
    bias_price: float | None = None,
    figures: Figures | None = None,
) -> WeightRecord:
    """Bias-correct, write and record one coded layer.

    `node` is the layer whose bias absorbs the error (default: the reader of the site's weight); `now` the
    weight it computes before this step (default: the float weight; `refine` passes its earlier codes). With
    `bias_price` (the layer-output error a bit is worth), its bias is then stored in float16 where that pays
    (onnxtq.bias.half_bias). `figures`: `measure`'s, where the caller measured already.
    """
    site = layer.site
    figures = figures or measure(layer, coded, bias_correct, now)
    before = graph.nbytes(site.name) if site.name in graph.initializers else None
    if node is None and site.name in graph.initializers:
        node = next(iter(graph.initializers[site.name].uses())).node
    why_not = figures.why_not
    if figures.shift is not None:
        why_not = correct_bias(graph, node, site, figures.shift, layer.dtype)
    after = coded.write(graph, pass_name)
    record = WeightRecord.of(
        site,
        coded.status,
        bytes_before=after if before is None else before,
        bytes_after=after,
        bits=8 * after / coded.w_hat.size,
    )
    record.bias_corrected = bias_correct and not why_not
    record.reason = f"bias not corrected: {why_not}" if why_not else ""
    record.nominal_bits = coded.nominal_bits
    record.detail = coded.detail
    record.weight_sqnr_db = db(*figures.weight_energies)
    if figures.output_error is not None:
        record.output_error = figures.output_error
        record.output_sqnr_db = db(figures.output_signal, figures.output_error)
    alone = _alone(layer)
    if bias_price is not None and alone and node is not None and half_bias(graph, node, site, bias_price, pass_name):
        record.detail += "; bias float16"
    return record


def _alone(layer: Layer) -> bool:
    """The one layer reading the weight (whose bias is its own to correct)."""
    site = layer.site
    return site.recurrence is None and site.readers == 1 and not site.scope


def db(signal: float, noise: float) -> float:
    return float(10 * np.log10(signal / noise)) if noise > 0 else float("inf")
