"""guard-matmul-2bit: a finalising pass, after every pipeline: 2-bit MatMul weights onnxruntime would miscompute.

onnxruntime (1.32, CPU) fuses DequantizeLinear(INT2/UINT2) → MatMul into MatMulNBits and then computes
wrong outputs when the weight's column count N is not a multiple of 4 (measured: errors as large as the
outputs, at every accuracy level; N = 360 and 6624 are right, 361, 362 and 6625 wrong). Each such weight
becomes two DequantizeLinear nodes (the first N − N mod 4 columns, then the rest) joined by Concat:
nothing is fused, the MatMul computes in float, and the stored bytes stay the same (steps and zero points
are per column, so they split with the codes).
"""

from __future__ import annotations

import onnx
from onnx import numpy_helper

from onnxtq.graph import Graph
from onnxtq.lowering import dequantize_opset
from onnxtq.packing import int_tensor
from onnxtq.pass_infra import ORIGINALS, STATS, Context, Pass
from onnxtq.report import PassReport
from onnxtq.weights import node_attr


class GuardMatmul2bitPass(Pass):
    name = "guard-matmul-2bit"
    needs = frozenset()
    preserves = frozenset({STATS, ORIGINALS})

    def run(self, ctx: Context) -> PassReport:
        report = self.new_report()
        split = split_unsafe_2bit_matmul_weights(ctx.graph)
        if split:
            report.notes.append(
                f"{split} 2-bit MatMul weights split in two along N: onnxruntime's MatMulNBits fusion "
                f"miscomputes 2-bit weights whose N is not a multiple of {NBITS_2BIT_COLUMNS}"
            )
        return report


#: onnxruntime (1.32, CPU) fuses DequantizeLinear(INT2/UINT2) → MatMul into MatMulNBits and then computes
#: wrong outputs when the weight's column count N is not a multiple of this (measured: errors as large as
#: the outputs, at every accuracy level; N = 360 and 6624 are right, 361, 362 and 6625 wrong).
NBITS_2BIT_COLUMNS = 4


def split_unsafe_2bit_matmul_weights(graph: Graph) -> int:
    """Split every 2-bit DequantizeLinear read by a MatMul whose N breaks onnxruntime's fusion; returns how many."""
    split = 0
    for node in list(graph.graph):
        if node.op_type != "DequantizeLinear" or not node.inputs[0].is_initializer():
            continue
        q = node.inputs[0].const_value
        codes = int(q.dtype)
        if codes not in (onnx.TensorProto.INT2, onnx.TensorProto.UINT2) or len(q.shape) != 2:
            continue
        if dequantize_opset(node, codes) > graph.opset():
            continue  # lowered to arithmetic before it is written (the portable target): nothing fuses
        n = int(q.shape[1])
        if n % NBITS_2BIT_COLUMNS == 0:
            continue
        if not any(use.node.op_type == "MatMul" and use.idx == 1 for use in node.outputs[0].uses()):
            continue
        cut = n - n % NBITS_2BIT_COLUMNS
        arrays = [graph.array(v.name) for v in node.inputs]
        halves = []
        for part, columns in enumerate((slice(0, cut), slice(cut, None))):
            inputs = []
            for value, a in zip(node.inputs, arrays):
                per_column = a.ndim == 1 and int(node_attr(node, "axis", 1)) in (1, -1)
                piece = a[:, columns] if a.ndim == 2 else (a[columns] if per_column else a)
                new = graph.unique(f"{value.name}/part{part}")
                if int(value.const_value.dtype) in (onnx.TensorProto.INT2, onnx.TensorProto.UINT2):
                    signed = int(value.const_value.dtype) == onnx.TensorProto.INT2  # codes or zero points: packed again
                    inputs.append(graph.set_initializer(int_tensor(new, piece, 2, signed)))
                else:
                    inputs.append(graph.set_initializer(numpy_helper.from_array(piece, new)))
            out = graph.unique(f"{node.outputs[0].name}/part{part}")
            dq = graph.node("DequantizeLinear", inputs, [out], graph.unique(f"{node.name}/part{part}"))
            for key, attr in node.attributes.items():
                dq.attributes[key] = attr
            dq.metadata_props.update(node.metadata_props)
            halves.append(dq)
        old = node.outputs[0]
        concat = graph.node(
            "Concat", [h.outputs[0] for h in halves], [old.name], graph.unique(f"{node.name}/join"), axis=1
        )
        concat.metadata_props.update(node.metadata_props)
        graph.graph.insert_before(node, [*halves, concat])
        old.replace_all_uses_with(concat.outputs[0], replace_graph_outputs=True)
        stale = list(node.inputs)
        graph.graph.remove(node, safe=True)
        for value in stale:
            graph.initializers.pop(value.name)
        split += 1
    return split
