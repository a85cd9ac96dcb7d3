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
import onnx
from onnx import numpy_helper

from onnxtq.finite import nonfinite_reason
from onnxtq.model_io import tensor_nbytes
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
        g = ctx.graph
        for bn in [n for n in g.graph.node if n.op_type == "BatchNormalization"]:
            producer = g.producer.get(bn.input[0])
            reason = self._why_not(ctx, bn, producer)
            if reason:
                report.records.append(
                    WeightRecord(
                        bn.input[1] if len(bn.input) > 1 else bn.name,
                        bn.name,
                        "BatchNormalization",
                        "skipped",
                        reason=reason,
                    )
                )
                continue
            report.records.append(self._fold(ctx, bn, producer))
        return report

    def _why_not(self, ctx: Context, bn: onnx.NodeProto, producer: onnx.NodeProto | None) -> str:
        g = ctx.graph
        if len([o for o in bn.output if o]) > 1:
            return "training-mode BatchNormalization (running statistics are outputs)"
        if any(name not in g.initializers for name in bn.input[1:5]):
            return "BatchNormalization parameters are not constant"
        if producer is None or producer.op_type not in ("Conv", "Gemm"):
            return f"input is not produced by Conv/Gemm ({producer.op_type if producer else 'graph input'})"
        if len(g.consumers[producer.output[0]]) != 1 or producer.output[0] in g.graph_outputs:
            return "the producer's output has other readers"
        weight = producer.input[1]
        if weight not in g.initializers or len(g.consumers[weight]) != 1:
            return "the producer's weight is not a private constant"
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in producer.attribute}
        if producer.op_type == "Gemm" and (
            attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0 or attrs.get("transA", 0)
        ):
            return "Gemm with alpha/beta != 1 or transA is not folded"
        if len(producer.input) > 2 and producer.input[2] and g.initializers.get(producer.input[2]) is not None:
            if len(g.initializers[producer.input[2]].dims) != 1:
                return "the producer's bias is broadcast from a non-vector shape"
        if (
            len(producer.input) > 2
            and producer.input[2]
            and (producer.input[2] not in g.initializers or len(g.consumers[producer.input[2]]) != 1)
        ):
            return "the producer's bias is not a private constant"
        return ""

    def _fold(self, ctx: Context, bn: onnx.NodeProto, layer: onnx.NodeProto) -> WeightRecord:
        g = ctx.graph
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        gamma, beta, mean, var = (g.array(n).astype(np.float64) for n in bn.input[1:5])
        w_t = g.initializers[layer.input[1]]
        w = numpy_helper.to_array(w_t)
        has_bias = len(layer.input) > 2 and bool(layer.input[2])
        bias = g.array(layer.input[2]).astype(np.float64) if has_bias else np.zeros_like(mean)
        before = tensor_nbytes(w_t) + sum(tensor_nbytes(g.initializers[n]) for n in bn.input[1:5])
        before += tensor_nbytes(g.initializers[layer.input[2]]) if has_bias else 0
        gemm_transposed = layer.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in layer.attribute)
        shape = (1, -1) if gemm_transposed else (-1,) + (1,) * (w.ndim - 1)  # scale the output-channel axis
        with np.errstate(all="ignore"):  # NaN/Inf parameters or a negative variance are caught below
            scale = gamma / np.sqrt(var + eps)
            new_w = (w.astype(np.float64) * scale.reshape(shape)).astype(w.dtype)
            new_b = ((bias - mean) * scale + beta).astype(w.dtype)
        why_not = nonfinite_reason(new_w) or nonfinite_reason(new_b)
        if why_not:
            return WeightRecord(
                w_t.name, layer.name, layer.op_type, "skipped", reason=f"not folded: the result {why_not}"
            )
        g.set_initializer(numpy_helper.from_array(new_w, w_t.name))
        bias_name = layer.input[2] if has_bias else g.unique(f"{w_t.name}/onnxtq.bias")
        g.set_initializer(numpy_helper.from_array(new_b, bias_name))
        if has_bias:
            layer.input[2] = bias_name
        else:
            while len(layer.input) < 2:
                layer.input.append("")
            layer.input.append(bias_name)
        layer.output[0] = bn.output[0]  # downstream keeps reading the same name
        g.graph.node.remove(bn)
        g.refresh()
        after = tensor_nbytes(g.initializers[w_t.name]) + tensor_nbytes(g.initializers[bias_name])
        return WeightRecord(
            w_t.name,
            layer.name,
            layer.op_type,
            "folded",
            shape=tuple(w.shape),
            bytes_before=before,
            bytes_after=after,
            reason=f"folded {bn.name or bn.output[0]}",
        )
