"""Emit quantized weights as `DequantizeLinear` nodes that stock onnxruntime runs.

    W ≈ DequantizeLinear(q, scale, zero_point; axis, block_size)  →  consumer

The float initializer is replaced by packed codes, a float scale tensor and (for
asymmetric codes) a zero point; the consumer reads the DequantizeLinear output.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxtq.bias import correct_bias, output_shift
from onnxtq.calibration.stats import LayerStats
from onnxtq.graph import Graph, tag
from onnxtq.model_io import tensor_nbytes
from onnxtq.packing import int_tensor
from onnxtq.quantize import Blocking, GroupCode
from onnxtq.report import WeightRecord
from onnxtq.weights import WeightSite


def emit_dequantize(graph: Graph, site: WeightSite, blocking: Blocking, code: GroupCode, pass_name: str) -> int:
    """Replace the weight of `site` by DequantizeLinear over `code`; returns the bytes now stored."""
    original = graph.initializers[site.name]
    float_type = onnx.helper.tensor_dtype_to_np_dtype(original.data_type)
    signed = code.zero_point is None
    q = int_tensor(graph.unique(f"{site.name}/onnxtq.q"), blocking.from_groups(code.q), code.bits, signed)
    narrow = code.scale.dtype.itemsize < np.dtype(float_type).itemsize  # fp16 steps for an fp32 weight
    scale_values = blocking.scales_to_shape(code.scale).astype(code.scale.dtype if narrow else float_type)
    scale = numpy_helper.from_array(scale_values, graph.unique(f"{site.name}/onnxtq.scale"))
    inputs = [q.name, scale.name]
    stored = [q, scale]
    if not signed:
        zp = int_tensor(
            graph.unique(f"{site.name}/onnxtq.zero_point"), blocking.scales_to_shape(code.zero_point), code.bits, False
        )
        inputs.append(zp.name)
        stored.append(zp)
    attrs = {"axis": blocking.block_axis, "block_size": blocking.block} if blocking.block else {"axis": blocking.axis}
    if narrow:
        attrs["output_dtype"] = original.data_type  # DequantizeLinear-23: decode straight to the weight's type
    out = graph.unique(f"{site.name}/onnxtq.dequant")
    node = onnx.helper.make_node(
        "DequantizeLinear", inputs, [out], name=graph.unique(f"{site.node}/onnxtq.dequant"), **attrs
    )
    tag(node, pass_name, "dequant")
    graph.originals[out] = (site, original)  # the float tensor, for passes that refine the codes later
    for t in stored:
        graph.set_initializer(t)
    for consumer, index in graph.consumers[site.name]:
        consumer.input[index] = out
    graph.graph.node.insert(0, node)
    graph.graph.initializer.remove(original)
    graph.refresh()
    return sum(tensor_nbytes(t) for t in stored)


def dequantized(blocking: Blocking, code: GroupCode) -> np.ndarray:
    """The float weight ORT will compute, in the stored layout (numpy reference)."""
    return blocking.from_groups(code.dequantize())


def replace_weight(
    graph: Graph,
    site: WeightSite,
    blocking: Blocking,
    code: GroupCode,
    layer: LayerStats | None,
    pass_name: str,
    bias_correct: bool,
    reference: LayerStats | None = None,
) -> WeightRecord:
    """The common tail of every quantizing pass: correct the bias, emit, and account the weight.

    `layer` describes the inputs the layer will see; when those come from an already quantized
    network, `reference` describes the original inputs, and the bias then absorbs E[Ŵx̃] − E[Wx].
    """
    stored_weight = graph.array(site.name)
    w = stored_weight.astype(np.float64)
    before = tensor_nbytes(graph.initializers[site.name])
    w_hat = dequantized(blocking, code)
    why_not = ""
    if bias_correct and layer is None:
        why_not = "no statistics"
    elif bias_correct:
        shift = output_shift(site, layer, w_hat - w)
        if reference is not None:
            shift += output_shift(site, layer, w) - output_shift(site, reference, w)
        why_not = correct_bias(graph, graph.consumers[site.name][0][0], site, shift, stored_weight.dtype)
    after = emit_dequantize(graph, site, blocking, code, pass_name)
    record = WeightRecord.of(site, "quantized", bytes_before=before, bytes_after=after, bits=8 * after / w.size)
    record.bias_corrected = bias_correct and not why_not
    record.reason = f"bias not corrected: {why_not}" if why_not else ""
    record.weight_sqnr_db = db((w**2).sum(), ((w - w_hat) ** 2).sum())
    if layer is not None:
        record.output_sqnr_db = db(layer.quadratic(site.to_matrix(w)), layer.quadratic(site.to_matrix(w - w_hat)))
    return record


def db(signal: float, noise: float) -> float:
    return float(10 * np.log10(signal / noise)) if noise > 0 else float("inf")
