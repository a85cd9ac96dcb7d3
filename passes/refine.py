"""refine: re-choose the codes of weights an earlier pass quantized, by layer-wise reconstruction.

After any pass that stores weights as DequantizeLinear codes (rtn, crq, ...), each weight keeps
its grid as stored (steps, zero points, and the range of codes it already uses, so a ternary
weight stays ternary) and its codes are re-chosen with the crq machinery (cluster pull, GPTQ,
and step refits where the grid is per channel) to reproduce the layer output rather than the
weight. The bias absorbs the change in mean output. Needs fresh calibration statistics and the
float weights the earlier pass replaced in the same run (the manager refuses a pipeline in which
a pass between them drops those, e.g. compact-names).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxtq.codec import Coded, Layer
from onnxtq.finish import db, finish
from onnxtq.packing import int_tensor
from onnxtq.pass_infra import ORIGINALS, STATS, Context, Pass, PassConfig, option
from onnxtq.progress import bar
from onnxtq.quantize import GroupCode, blocking_for
from onnxtq.reconstruct import reconstruct
from onnxtq.report import PassReport, WeightRecord

_CODE_TYPES = {
    onnx.TensorProto.INT2: (2, True),
    onnx.TensorProto.UINT2: (2, False),
    onnx.TensorProto.INT4: (4, True),
    onnx.TensorProto.UINT4: (4, False),
    onnx.TensorProto.INT8: (8, True),
    onnx.TensorProto.UINT8: (8, False),
}


@dataclass(frozen=True)
class RefineConfig(PassConfig):
    method: str = option("crq", "crq (cluster pull + GPTQ) | gptq")
    bias_correct: bool = option(True, "the bias absorbs the change in mean output")

    def __post_init__(self):
        if self.method not in ("crq", "gptq"):
            raise ValueError(f"method must be crq or gptq, not '{self.method}'")


class RefinePass(Pass):
    name = "refine"
    Config = RefineConfig
    needs = frozenset({STATS, ORIGINALS})
    preserves = frozenset({STATS, ORIGINALS})

    def run(self, ctx: Context) -> PassReport:
        report = self.new_report()
        g = ctx.graph
        nodes = [n for n in g.graph if n.op_type == "DequantizeLinear" and n.outputs[0].name in g.originals]
        for node in bar(nodes, desc=self.name, unit="weight"):
            site, original = g.originals[node.outputs[0].name]
            report.records.append(self._refine(ctx, node, site, original.numpy().reshape(site.shape)))
        if not nodes:
            report.notes.append("no weight quantized earlier in this run: nothing to refine")
        return report

    def _refine(self, ctx: Context, dq: ir.Node, site, w: np.ndarray) -> WeightRecord:
        g = ctx.graph
        layer = Layer(site, w, ctx.stats.get(site))
        codes_v = dq.inputs[0]
        bits, signed = _CODE_TYPES.get(int(codes_v.const_value.dtype), (0, False))
        attrs = {key: attr.value for key, attr in dq.attributes.items()}
        blocking = blocking_for(site, int(attrs.get("block_size", 0)))
        axis = blocking.block_axis if blocking.block else blocking.axis
        if layer.stats is None:
            return WeightRecord.of(site, "skipped", reason="no statistics for this kind of layer")
        if not bits or attrs.get("axis", 1) != axis or len(dq.inputs) < 2:
            return WeightRecord.of(site, "skipped", reason="its steps are not laid out per channel or block")
        scale_v = dq.inputs[1]
        zero_v = dq.inputs[2] if len(dq.inputs) > 2 else None
        q = g.array(codes_v.name).astype(np.int32)
        scale = g.array(scale_v.name)
        zero = None if zero_v is None else blocking.scales_from_shape(g.array(zero_v.name).astype(np.int32))
        old = GroupCode(blocking.to_groups(q), blocking.scales_from_shape(scale), zero, bits)
        qrange = (int(q.min()), int(q.max()))  # never widen what the earlier pass chose (ternary stays ternary)
        new = reconstruct(site, w, blocking, old, layer.stats, qrange, scale.dtype, self.config.method)
        w_old, w_new = (blocking.from_groups(c.dequantize()).astype(np.float64) for c in (old, new))

        def rewrite(graph, pass_name: str) -> int:  # the new codes and steps over the old, in place
            graph.set_initializer(int_tensor(codes_v.name, blocking.from_groups(new.q), bits, signed))
            steps = blocking.scales_to_shape(new.scale).astype(scale.dtype)
            graph.set_initializer(numpy_helper.from_array(steps, scale_v.name))
            return sum(graph.nbytes(v.name) for v in dq.inputs[:3] if v is not None)

        reader = next(iter(dq.outputs[0].uses())).node
        record = finish(
            g,
            layer,
            Coded(w_new, rewrite, status="refined"),
            self.name,
            self.config.bias_correct,
            node=reader,
            now=w_old,
        )
        signal = site.to_matrix(w.astype(np.float64))
        before = db(layer.stats.quadratic(signal), layer.stats.quadratic(signal - site.to_matrix(w_old)))
        record.reason = f"layer output SQNR {before:.1f} -> {record.output_sqnr_db:.1f} dB" + (
            f"; {record.reason}" if record.reason else ""
        )
        return record
