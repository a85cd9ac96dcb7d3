"""lower-codes: the `portable` profile's finalising pass: every coded weight becomes plain arithmetic.

Passes write DequantizeLinear over INT4/INT2 codes, blocked or float16 steps whatever the profile; under
`portable` the manager keeps the model's opset and this pass rewrites every DequantizeLinear over constants
(onnxtq.lowering): sub-byte codes kept as ONNX packs them, in UINT8 blobs a lookup table decodes, steps
multiplied in. Every runtime that loads the model loads the file, and folds each weight into floats at load. None of
them then computes with quantized activations: onnxruntime's default session does for DequantizeLinear →
MatMul since 1.25 (int8, ~0.2% output error), OpenVINO's CPU plugin for weights it sees as compressed.
"""

from __future__ import annotations

from onnxtq import lowering
from onnxtq.pass_infra import STATS, Context, Pass
from onnxtq.report import PassReport


class LowerCodesPass(Pass):
    name = "lower-codes"
    needs = frozenset()
    preserves = frozenset({STATS})  # originals: the DequantizeLinear nodes they are keyed by are gone

    def run(self, ctx: Context) -> PassReport:
        report = self.new_report()
        before = ctx.graph.proto().ByteSize()
        lowered = lowering.lower(ctx.graph, self.name, every=True)
        if lowered:
            after = ctx.graph.proto().ByteSize()
            opset = ctx.graph.opset()
            report.notes.append(
                f"{lowered} coded weights lowered to opset-{opset} arithmetic: {before:,d} B -> {after:,d} B"
            )
        return report
