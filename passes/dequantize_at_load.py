"""dequantize-at-load: store codes as they are, but let onnxruntime turn them into float weights once, at load.

Stock onnxruntime never constant-folds a DequantizeLinear (it keeps them for its QDQ fusions), so a
weight stored as codes is dequantized again on every run: on CPU our files took 1.1–6.7x FP32's time
(benchmarks/results/load_latency.md). This pass rewrites each DequantizeLinear over constants into the
same arithmetic in plain ops (onnxtq.lowering), which onnxruntime's constant folding evaluates when it
loads the session. The file keeps its codes (a few tagged nodes more per weight: 0.01–2.4% of the zoo's
files); the run is as fast as FP32, and so is its memory: the float weights live in RAM. That is the
trade: without this pass RAM holds the codes (and MatMulNBits keeps blocked 4-bit MatMul weights 4-bit);
with it the latency is FP32's. Put it last: later passes see a Mul, not a weight. A DequantizeLinear
beside a quantized activation (a QDQ node that onnxruntime runs as an int8 kernel) is left alone.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxtq.lowering import to_arithmetic
from onnxtq.opsets import Emission
from onnxtq.pass_infra import STATS, Context, Pass
from onnxtq.report import PassReport


class DequantizeAtLoadPass(Pass):
    name = "dequantize-at-load"
    needs = frozenset()
    preserves = frozenset({STATS})  # originals: the DequantizeLinear nodes they are keyed by are gone

    def emits(self) -> Emission:
        return Emission(ops=13)  # Reshape, Expand, Slice and Cast with their inputs as tensors

    def run(self, ctx: Context) -> PassReport:
        report = self.new_report()
        graph = ctx.graph
        before = graph.proto().ByteSize()
        rewritten, kept, shapes = 0, 0, {}
        for node in list(graph.graph):
            if node.op_type != "DequantizeLinear" or not all(v.is_initializer() for v in node.inputs if v is not None):
                continue
            if _beside_quantized_activation(node):
                kept += 1
                continue
            to_arithmetic(graph, node, f"dq{rewritten}", shapes, self.name)
            rewritten += 1
        graph.remove_dead()
        report.notes.append(
            f"{rewritten} DequantizeLinear weights now fold at load: {before:,d} B -> {graph.proto().ByteSize():,d} B"
            + (f"; {kept} kept beside quantized activations" if kept else "")
        )
        return report


def _beside_quantized_activation(node: ir.Node) -> bool:
    """Whether a reader of `node` also reads a dequantized activation (ORT fuses that into an int8 kernel)."""
    for use in node.outputs[0].uses():
        for value in use.node.inputs:
            producer = value.producer() if value is not None else None
            if (
                producer is not None
                and producer.op_type == "DequantizeLinear"
                and not producer.inputs[0].is_initializer()
            ):
                return True
    return False
