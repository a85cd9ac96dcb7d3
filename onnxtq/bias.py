"""Bias correction: cancel the mean output error that quantized weights add to a layer.

    E[(Ŵ − W) x] = (Ŵ − W) m,   b' = b − (Ŵ − W) m

with m the calibration mean of the layer's input patches (im2col columns for Conv, so
zero padding is accounted for exactly). Weight error that is small per weight but shares
a sign across a channel shifts every output of that channel; in MobileNetV2 the first
depthwise conv's 8-bit error alone costs 20 dB of logit SQNR that way. Quantizing passes
get it through the finishing tail (onnxtq.finish), which corrects the bias before the weight is written.

A bias is a few hundred float32 values per layer, yet 3% of a 2.6 MB MobileNetV2 (brotli cannot shrink
them). Rounding a bias to float16 adds an error, as coding a weight does: `half_bias` takes it where the
allocation's own price of a bit says the bytes are worth more (layers coded coarsely; not finely coded ones).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, numpy_helper

from onnxtq.calibration.stats import LayerStats
from onnxtq.graph import Graph, node_attr, tag
from onnxtq.weights import WeightSite

#: File bytes of the Cast that reads a float16 bias back, with its names and tags (about 170 B in MobileNetV2):
#: a bias of fewer values than half this saves nothing.
CAST_BYTES = 192


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
    bias, beta = _bias_of(graph, node, site)
    if site.op in ("Conv", "Gemm"):
        if beta == 0:
            return "Gemm with beta=0 ignores its bias"
        if bias is not None:
            return _subtract(graph, bias, shift / beta)
        name = graph.unique(f"{site.name}/onnxtq.bias")
        bias = graph.set_initializer(numpy_helper.from_array((-shift / beta).astype(dtype), name))
        node.resize_inputs(3)
        node.replace_input_with(2, bias)
        return ""
    if site.op == "MatMul":
        if bias is None:
            return "MatMul output is not read by a single Add that could hold the correction"
        return _subtract(graph, bias, shift)
    return f"no bias correction for {site.op}"


def _bias_of(graph: Graph, node: ir.Node, site: WeightSite) -> tuple[ir.Value | None, float]:
    """Where the layer's bias is (None: it has none) and the factor it is added with: Conv's and Gemm's input C
    (times Gemm's beta), or the other operand of the one Add (in the same graph) that reads a MatMul's output."""
    if site.op in ("Conv", "Gemm"):
        beta = float(node_attr(node, "beta", 1.0)) if site.op == "Gemm" else 1.0
        return (node.inputs[2] if len(node.inputs) > 2 else None), beta
    if site.op == "MatMul":
        readers = list(node.outputs[0].uses())
        if len(readers) == 1 and readers[0].node.op_type == "Add" and readers[0].node.graph is graph.graph:
            return readers[0].node.inputs[1 - readers[0].idx], 1.0
    return None, 1.0


def half_bias(graph: Graph, node: ir.Node, site: WeightSite, price: float, pass_name: str) -> int:
    """Store the float32 bias that only this layer adds as float16 and a Cast, where the error that adds is worth
    less than the bytes it saves: ‖b − b̂‖² (on every output position, as E‖ΔW x‖²) against `price`, the layer-output
    error a bit is worth in the allocation (its λ over the layer's gain), times the bits saved net of the Cast.
    Returns the float bytes saved (0 where it stays). onnxruntime folds the Cast when the session loads."""
    bias, beta = _bias_of(graph, node, site)
    if bias is None or not bias.is_initializer() or bias.is_graph_input() or len(bias.uses()) != 1:
        return 0  # absent, computed, overridable by the caller, or shared
    if bias.dtype != ir.DataType.FLOAT or graph.opset() < 6:  # (before opset 6 Cast's `to` was a string)
        return 0
    b = graph.array(bias.name)
    saved_bits = 8 * (2 * b.size - CAST_BYTES)
    if saved_bits <= 0 or not np.isfinite(b).all() or np.abs(b).max(initial=0) >= np.finfo(np.float16).max:
        return 0
    half = b.astype(np.float16)
    if not float((((half.astype(np.float64) - b) * beta) ** 2).sum()) < price * saved_bits:
        return 0
    stored = graph.set_initializer(numpy_helper.from_array(half, graph.unique(f"{bias.name}/onnxtq.half")))
    out, name = graph.unique(f"{bias.name}/onnxtq.float"), graph.unique(f"{bias.name}/onnxtq.cast")
    cast = tag(graph.node("Cast", [stored], [out], name, to=TensorProto.FLOAT), pass_name, "bias")
    graph.graph.insert_before(graph.first_reader(bias), [cast])
    bias.replace_all_uses_with(cast.outputs[0])  # its one use
    graph.graph.initializers.pop(bias.name)
    return 2 * b.size


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
