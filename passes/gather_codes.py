"""gather-codes: the `lowmem` profile's finalising pass: an embedding table stays coded in RAM, and only the
rows a run looks up are decoded.

onnxruntime runs `Gather(DequantizeLinear(codes), ids)` as written: it decodes the whole table on every run
(MiniLM-L6's 30,522 × 384 words: 47 MB of floats, 1.6x FP32's latency at 4 bits). This pass gathers the codes
and their steps instead and decodes the few rows gathered:

    W[ids] = (Cast(Gather(codes, ids)) − Gather(zero_point, ids)) · Gather(step, ids)

Gather takes no INT4/INT2 tensor, so each row of sub-byte codes is stored as UINT8 bytes, packed as ONNX packs
INT4/INT2, and decoded by a lookup table after the Gather (onnxtq.lowering). Tables with one step per
row (axis 0) or per tensor are rewritten; blocked ones stay as they are, and say so.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, numpy_helper

from onnxtq.graph import Graph, node_attr, tag
from onnxtq.lowering import SIGNED, SUB_BYTE, Writer, digit_table, pack, replace_node, widened
from onnxtq.pass_infra import STATS, Context, Pass
from onnxtq.report import PassReport


class GatherCodesPass(Pass):
    name = "gather-codes"
    needs = frozenset()
    preserves = frozenset({STATS})  # originals: the DequantizeLinear nodes they are keyed by are gone

    def run(self, ctx: Context) -> PassReport:
        report = self.new_report()
        graph, shared, done, kept = ctx.graph, {}, 0, []
        for node in list(graph.graph):
            if not _table(node):
                continue
            why = _why_not(node)
            if why:
                kept.append(f"{node.inputs[0].name}: {why}")
                continue
            _rewrite(graph, node, f"gc{done}", shared)
            done += 1
        graph.remove_dead()
        if done:
            report.notes.append(f"{done} embedding tables stay coded in RAM: only the rows gathered are decoded")
        if kept:
            report.notes.append(f"{len(kept)} decoded whole on every run ({'; '.join(kept[:3])})")
        return report


def _table(node: ir.Node) -> bool:
    """A DequantizeLinear over constants whose every reader is a Gather (axis 0) looking rows up in it."""
    if node.op_type != "DequantizeLinear" or not all(v is not None and v.is_initializer() for v in node.inputs):
        return False
    uses = node.outputs[0].uses()
    return (
        bool(uses)
        and not node.outputs[0].is_graph_output()
        and all(u.node.op_type == "Gather" and u.idx == 0 and int(node_attr(u.node, "axis", 0)) == 0 for u in uses)
    )


def _why_not(node: ir.Node) -> str:
    if len(node.inputs[0].const_value.shape) != 2:
        return "not a 2-D table"
    if node_attr(node, "block_size", 0) or node_attr(node, "output_dtype", 0):
        return "blocked or float16 steps"
    if len(node.inputs[1].const_value.shape) == 1 and int(node_attr(node, "axis", 1)) % 2 != 0:
        return "one step per column"
    if any(u.node.inputs[1].shape is None for u in node.outputs[0].uses()):
        return "lookups of unknown rank"
    return ""


def _rewrite(graph: Graph, node: ir.Node, prefix: str, shared: dict) -> None:
    q, scale = node.inputs[:2]
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    code_type = int(q.const_value.dtype)
    codes = graph.array(q.name)
    rows, cols = codes.shape
    bits = SUB_BYTE.get(code_type, (0, 8))[1]
    signed = code_type in SIGNED
    if bits < 8:
        stored = np.stack([pack(row, bits) for row in codes])  # [rows, bytes]: each row packed on its own
        table = numpy_helper.from_array(stored, graph.unique(f"{q.name}/onnxtq.rows"))
    else:
        table = numpy_helper.from_array(codes, graph.unique(f"{q.name}/onnxtq.rows"))
    table_v = graph.set_initializer(table)
    steps = _per_row(graph, scale, rows)
    zeros = _per_row(graph, zero_point, rows) if zero_point is not None else None
    for use in list(node.outputs[0].uses()):
        gather = use.node
        ids = gather.inputs[1]
        w = Writer(graph, graph.unique(prefix), GatherCodesPass.name, shared)
        keep = [0] * len(ids.shape)  # Reshape's 0: the lookup's own dimensions, whatever they are
        if bits < 8:  # the bytes of the rows looked up, each decoded to its 8/bits codes
            index = w.add("Cast", [w.add("Gather", [table_v, ids], axis=0)], to=TensorProto.INT32)
            decode = w.add("Cast", [w.array(digit_table(bits, signed))], to=TensorProto.FLOAT)
            value = w.add("Reshape", [w.add("Gather", [decode, index], axis=0), w.ints(keep + [-1])])
            if (8 // bits) * stored.shape[1] != cols:
                value = w.add("Slice", [value, w.ints([0]), w.ints([cols]), w.ints([-1])])
        else:
            value = w.add("Cast", [w.add("Gather", [table_v, ids], axis=0)], to=TensorProto.FLOAT)
        if zeros is not None:
            value = w.add("Sub", [value, w.as_float(w.add("Gather", [zeros, ids], axis=0))])
        step = steps if steps.const_value.shape == () else w.add("Gather", [steps, ids], axis=0)
        value = w.add("Mul", [value, w.as_float(step)])
        out_type = int(scale.const_value.dtype)
        if out_type != TensorProto.FLOAT:
            value = w.add("Cast", [value], to=out_type)
        replace_node(graph, gather, w.nodes, value)
        tag(w.nodes[-1], GatherCodesPass.name, "lookup")
    graph.graph.remove(node, safe=True)


def _per_row(graph: Graph, value: ir.Value, rows: int) -> ir.Value:
    """A step or zero point as a [rows, 1] table Gather reads (a single value as it is)."""
    array = widened(graph, value) if int(value.const_value.dtype) in SUB_BYTE else graph.array(value.name)
    if array.size == 1:
        return value
    shaped = numpy_helper.from_array(array.reshape(rows, 1), graph.unique(f"{value.name}/onnxtq.rows"))
    return graph.set_initializer(shaped)
