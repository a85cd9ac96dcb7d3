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
    """Split every 2-bit DequantizeLinear read by a MatMul whose N breaks onnxruntime's fusion.

    The weight becomes two DequantizeLinear nodes (the first N − N mod 4 columns, then the rest) joined by
    Concat: nothing is fused, the MatMul computes in float, and the stored bytes stay the same (steps and
    zero points are per column, so they split with the codes). Returns the number of weights split.
    """
    split = 0
    for node in list(graph.graph.node):
        if node.op_type != "DequantizeLinear":
            continue
        q = graph.initializers.get(node.input[0])
        two_bit = q is not None and q.data_type in (onnx.TensorProto.INT2, onnx.TensorProto.UINT2)
        if not two_bit or len(q.dims) != 2 or q.dims[1] % NBITS_2BIT_COLUMNS == 0:
            continue
        if not any(r is not None and r.op_type == "MatMul" and i == 1 for r, i in graph.consumers[node.output[0]]):
            continue
        cut = q.dims[1] - q.dims[1] % NBITS_2BIT_COLUMNS
        arrays = [numpy_helper.to_array(graph.initializers[name]) for name in node.input]
        halves = []
        for part, columns in enumerate((slice(0, cut), slice(cut, None))):
            inputs = []
            for name, a in zip(node.input, arrays):
                per_column = a.ndim == 1 and int(node_attr(node, "axis", 1)) in (1, -1)
                piece = a[:, columns] if a.ndim == 2 else (a[columns] if per_column else a)
                new = graph.unique(f"{name}/part{part}")
                if a.dtype.itemsize == 1 and a.dtype.kind not in "f":  # codes or zero points: packed again
                    graph.set_initializer(int_tensor(new, piece, 2, a.dtype.kind == "i"))
                else:
                    graph.set_initializer(numpy_helper.from_array(piece, new))
                inputs.append(new)
            out = graph.unique(f"{node.output[0]}/part{part}")
            dq = onnx.helper.make_node("DequantizeLinear", inputs, [out], name=graph.unique(f"{node.name}/part{part}"))
            dq.attribute.extend(node.attribute)
            dq.metadata_props.extend(node.metadata_props)
            halves.append(dq)
        concat = onnx.helper.make_node(
            "Concat", [h.output[0] for h in halves], [node.output[0]], name=graph.unique(f"{node.name}/join"), axis=1
        )
        concat.metadata_props.extend(node.metadata_props)
        position = list(graph.graph.node).index(node)
        graph.graph.node.remove(node)
        for n in reversed([*halves, concat]):
            graph.graph.node.insert(position, n)
        for name in node.input:
            graph.graph.initializer.remove(graph.initializers[name])
        graph.refresh()
        split += 1
    return split
