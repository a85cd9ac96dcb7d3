"""fold-bn: fold inference BatchNormalization into the preceding Conv or Gemm.

    W'_o = W_o · γ_o/√(σ²_o + ε),   b'_o = (b_o − μ_o) · γ_o/√(σ²_o + ε) + β_o

Done before any statistics, because the folded weights are what the runtime really
multiplies; left alone, ORT would fold BN into already-quantized weights and rescale
the quantization error per channel. Exact up to float rounding, so it does not
invalidate statistics. BN after a non-linearity, or whose producer has other readers,
stays as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
from onnx import numpy_helper

from onnxtq.finite import nonfinite_reason
from onnxtq.graph import node_attr
from onnxtq.pass_infra import ORIGINALS, STATS, Context, Pass, PassConfig
from onnxtq.report import PassReport, WeightRecord


@dataclass(frozen=True)
class FoldBatchNormConfig(PassConfig):
    pass


class FoldBatchNormPass(Pass):
    name = "fold-bn"
    Config = FoldBatchNormConfig
    needs = frozenset()
    preserves = frozenset({STATS, ORIGINALS})  # exact: no layer input changes

    def run(self, ctx: Context) -> PassReport:
        report = self.new_report()
        for bn in [n for n in ctx.graph.graph if n.op_type == "BatchNormalization"]:
            producer = bn.inputs[0].producer() if bn.inputs and bn.inputs[0] is not None else None
            reason = self._why_not(bn, producer)
            if reason:
                report.records.append(
                    WeightRecord(
                        bn.inputs[1].name if len(bn.inputs) > 1 and bn.inputs[1] is not None else bn.name or "",
                        bn.name or "",
                        "BatchNormalization",
                        "skipped",
                        reason=reason,
                    )
                )
                continue
            report.records.append(self._fold(ctx, bn, producer))
        return report

    def _why_not(self, bn: ir.Node, producer: ir.Node | None) -> str:
        if len([o for o in bn.outputs if o.name]) > 1:
            return "training-mode BatchNormalization (running statistics are outputs)"
        if len(bn.inputs) < 5 or any(v is None or not v.is_initializer() for v in bn.inputs[1:5]):
            return "BatchNormalization parameters are not constant"
        if producer is None or producer.op_type not in ("Conv", "Gemm"):
            return f"input is not produced by Conv/Gemm ({producer.op_type if producer else 'graph input'})"
        out = producer.outputs[0]
        if len(out.uses()) != 1 or out.is_graph_output():
            return "the producer's output has other readers"
        weight = producer.inputs[1] if len(producer.inputs) > 1 else None
        if weight is None or not weight.is_initializer() or len(weight.uses()) != 1:
            return "the producer's weight is not a private constant"
        if producer.op_type == "Gemm" and (
            node_attr(producer, "alpha", 1.0) != 1.0
            or node_attr(producer, "beta", 1.0) != 1.0
            or node_attr(producer, "transA", 0)
        ):
            return "Gemm with alpha/beta != 1 or transA is not folded"
        bias = producer.inputs[2] if len(producer.inputs) > 2 else None
        if bias is not None and bias.is_initializer() and len(bias.const_value.shape) != 1:
            return "the producer's bias is broadcast from a non-vector shape"
        if bias is not None and (not bias.is_initializer() or len(bias.uses()) != 1):
            return "the producer's bias is not a private constant"
        return ""

    def _fold(self, ctx: Context, bn: ir.Node, layer: ir.Node) -> WeightRecord:
        g = ctx.graph
        eps = node_attr(bn, "epsilon", 1e-5)
        gamma, beta, mean, var = (g.array(v.name).astype(np.float64) for v in bn.inputs[1:5])
        weight = layer.inputs[1]
        w = g.array(weight.name)
        bias_value = layer.inputs[2] if len(layer.inputs) > 2 else None
        has_bias = bias_value is not None
        bias = g.array(bias_value.name).astype(np.float64) if has_bias else np.zeros_like(mean)
        before = g.nbytes(weight.name) + sum(g.nbytes(v.name) for v in bn.inputs[1:5])
        before += g.nbytes(bias_value.name) if has_bias else 0
        gemm_transposed = layer.op_type == "Gemm" and not node_attr(layer, "transB", 0)
        shape = (1, -1) if gemm_transposed else (-1,) + (1,) * (w.ndim - 1)  # scale the output-channel axis
        with np.errstate(all="ignore"):  # NaN/Inf parameters or a negative variance are caught below
            scale = gamma / np.sqrt(var + eps)
            new_w = (w.astype(np.float64) * scale.reshape(shape)).astype(w.dtype)
            new_b = ((bias - mean) * scale + beta).astype(w.dtype)
        why_not = nonfinite_reason(new_w) or nonfinite_reason(new_b)
        if why_not:
            return WeightRecord(
                weight.name, layer.name or "", layer.op_type, "skipped", reason=f"not folded: the result {why_not}"
            )
        g.set_initializer(numpy_helper.from_array(new_w, weight.name))
        bias_name = bias_value.name if has_bias else g.unique(f"{weight.name}/onnxtq.bias")
        new_bias = g.set_initializer(numpy_helper.from_array(new_b, bias_name))
        if not has_bias:
            layer.resize_inputs(3)
            layer.replace_input_with(2, new_bias)
        # downstream keeps reading the same name: the layer's output takes over the BN's
        bn_out, layer_out = bn.outputs[0], layer.outputs[0]
        name = bn_out.name
        bn_out.replace_all_uses_with(layer_out, replace_graph_outputs=True)
        g.graph.remove(bn, safe=True)
        layer_out.name = name
        after = g.nbytes(weight.name) + g.nbytes(bias_name)
        return WeightRecord(
            weight.name,
            layer.name or "",
            layer.op_type,
            "folded",
            shape=tuple(w.shape),
            bytes_before=before,
            bytes_after=after,
            reason=f"folded {bn.name or name}",
        )
