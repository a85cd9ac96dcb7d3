"""Bias correction: cancel the mean output error that quantized weights add to a layer.

    E[(Ŵ − W) x] = (Ŵ − W) m,   b' = b − (Ŵ − W) m

with m the calibration mean of the layer's input patches (im2col columns for Conv, so
zero padding is accounted for exactly). Weight error that is small per weight but shares
a sign across a channel shifts every output of that channel; in MobileNetV2 the first
depthwise conv's 8-bit error alone costs 20 dB of logit SQNR that way. Quantizing passes
get it through the finishing tail (onnxtq.finish), which corrects the bias before the weight is written.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import numpy_helper

from onnxtq.calibration.stats import LayerStats
from onnxtq.graph import Graph, node_attr
from onnxtq.weights import WeightSite


def output_shift(site: WeightSite, stats: LayerStats, delta: np.ndarray) -> np.ndarray:
    """E[Δ x] per output channel for a weight error Δ = Ŵ − W in the stored layout."""
    rows = site.to_matrix(delta).astype(np.float64).reshape(stats.groups, -1, stats.dim)
    return np.einsum("gnd,gd->gn", rows, stats.mean).reshape(-1)


def correct_bias(graph: Graph, node: ir.Node, site: WeightSite, shift: np.ndarray, dtype) -> str:
    """Subtract `shift` from the bias of `node`, the layer that reads `site`; returns '' or why it could not.

    Conv and Gemm get a bias input (of `dtype`) when they have none; MatMul is corrected through
    the constant operand of an Add that alone reads its output.
    """
    if not np.isfinite(shift).all():
        return "the correction is not finite"
    if site.op in ("Conv", "Gemm"):
        beta = float(node_attr(node, "beta", 1.0)) if site.op == "Gemm" else 1.0
        if beta == 0:
            return "Gemm with beta=0 ignores its bias"
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            return _subtract(graph, node.inputs[2], shift / beta)
        name = graph.unique(f"{site.name}/onnxtq.bias")
        bias = graph.set_initializer(numpy_helper.from_array((-shift / beta).astype(dtype), name))
        node.resize_inputs(3)
        node.replace_input_with(2, bias)
        return ""
    if site.op == "MatMul":
        readers = list(node.outputs[0].uses())
        if len(readers) != 1 or readers[0].node.op_type != "Add" or readers[0].node.graph is not graph.graph:
            return "MatMul output is not read by a single Add that could hold the correction"
        add, index = readers[0].node, readers[0].idx
        return _subtract(graph, add.inputs[1 - index], shift)
    return f"no bias correction for {site.op}"


def _subtract(graph: Graph, bias: ir.Value, shift: np.ndarray) -> str:
    """b ← b − shift for a constant bias of shape [n] (or [1, n]) that only this layer reads."""
    if bias is None or not bias.is_initializer():
        return "the bias is not a constant"
    if len(bias.uses()) != 1:
        return "the bias is shared with other nodes"
    b = graph.array(bias.name)
    if not np.isfinite(b).all():
        return "the bias holds NaN/Inf"
    if b.size != shift.size or (b.ndim > 1 and max(b.shape) != b.size):
        return f"bias of shape {list(b.shape)} does not hold one value per output channel"
    corrected = (b.astype(np.float64) - shift.reshape(b.shape)).astype(b.dtype)
    graph.set_initializer(numpy_helper.from_array(corrected, bias.name))
    return ""


def bias_note(records, have_stats: bool) -> str:
    """One report line: how many quantized layers were bias-corrected, and why not the others."""
    if not have_stats:
        return "bias correction needs calibration statistics: not done"
    done = [r for r in records if r.status == "quantized" and r.bias_corrected]
    missed = [r for r in records if r.status == "quantized" and not r.bias_corrected]
    reasons = sorted({r.reason.removeprefix("bias not corrected: ") for r in missed})
    return f"bias corrected on {len(done)} of {len(done) + len(missed)} layers" + (
        f" (not: {'; '.join(reasons)})" if reasons else ""
    )
