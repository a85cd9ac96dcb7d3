"""dequantize-at-load: store codes as they are, but let onnxruntime turn them into float weights once, at load.

Stock onnxruntime never constant-folds a DequantizeLinear (it keeps them for its QDQ fusions), so a
weight stored as codes is dequantized again on every run: on CPU our files took 1.1–6.7x FP32's time
(benchmarks/results/load_latency.md). This pass rewrites each DequantizeLinear over constants into
the same arithmetic in plain ops,

    W = (Cast(q) − Cast(zero_point)) · scale        (scale broadcast per axis, or per block)

which onnxruntime's constant folding evaluates when it loads the session. The file keeps its codes
(a few tagged nodes more per weight: 0.01–2.4% of the zoo's files); the run is as fast as FP32, and so is its
memory: the float weights live in RAM. That is the trade: without this pass RAM holds the codes (and
MatMulNBits keeps blocked 4-bit MatMul weights 4-bit); with it the latency is FP32's. Put it last:
later passes see a Mul, not a weight. A DequantizeLinear beside a quantized activation (a QDQ node that onnxruntime runs
as an int8 kernel) is left alone.
"""

from __future__ import annotations

import math

import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxtq.graph import Graph, node_attr, tag
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
            _rewrite(graph, node, f"dq{rewritten}", shapes)
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


def _rewrite(graph: Graph, node: ir.Node, prefix: str, shapes: dict[tuple, ir.Value]) -> None:
    """Replace `node` by Cast/Sub/Mul (and the scale's broadcast) computing the same tensor.

    Only the last node keeps the name and provenance of `node`; the others are tagged as this pass's
    (role `decode`), the values between are named `prefix`.k, a per-axis scale or zero point that only
    `node` reads is stored already shaped to broadcast (no Reshape), and the shape constants are shared
    (`shapes`, by value): in a 1 MB model every node and name spelled costs.
    """
    q, scale = node.inputs[:2]
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    out_type = int(node_attr(node, "output_dtype", 0)) or int(scale.const_value.dtype)
    shape = [int(d) for d in q.const_value.shape]
    rank = len(shape)
    axis = int(node_attr(node, "axis", 1)) % max(rank, 1)
    block = int(node_attr(node, "block_size", 0))
    nodes: list[ir.Node] = []

    def add(op: str, inputs: list[ir.Value], **attrs) -> ir.Value:
        out = graph.unique(f"{prefix}.{len(nodes)}")
        nodes.append(tag(graph.node(op, inputs, [out], **attrs), DequantizeAtLoadPass.name, "decode"))
        return nodes[-1].outputs[0]

    def const(values: list[int]) -> ir.Value:
        if tuple(values) not in shapes:
            name = graph.unique(f"onnxtq.shape.{'_'.join(map(str, values))}")
            shapes[tuple(values)] = graph.set_initializer(
                helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
            )
        return shapes[tuple(values)]

    def as_float(value: ir.Value) -> ir.Value:
        is_float = value.is_initializer() and int(value.const_value.dtype) == TensorProto.FLOAT
        return value if is_float else add("Cast", [value], to=TensorProto.FLOAT)

    def broadcast(value: ir.Value) -> ir.Value:
        """`value` (a scale or zero point) as float, shaped to broadcast against the codes."""
        dims = [int(d) for d in value.const_value.shape]
        if math.prod(dims) == 1:
            return as_float(value)
        if not block:  # one value per index along `axis`
            trailing = [1] * (rank - axis - 1)
            if len(value.uses()) > 1:  # shared with another node: shaped in the graph
                return add("Reshape", [as_float(value), const([-1] + trailing)])
            if dims != [dims[0]] + trailing:  # only this node reads it: stored already shaped (same values)
                shaped = graph.array(value.name).reshape([dims[0]] + trailing)
                value = graph.set_initializer(numpy_helper.from_array(shaped, value.name))
            return as_float(value)
        value = as_float(value)
        blocks = dims[axis]  # each value repeated `block` times along `axis`, the last run cut to the shape
        value = add("Reshape", [value, const(dims[:axis] + [blocks, 1] + dims[axis + 1 :])])
        value = add("Expand", [value, const(shape[:axis] + [blocks, block] + shape[axis + 1 :])])
        value = add("Reshape", [value, const(shape[:axis] + [blocks * block] + shape[axis + 1 :])])
        if blocks * block != shape[axis]:
            value = add("Slice", [value, const([0]), const([shape[axis]]), const([axis])])
        return value

    value = as_float(q)
    if zero_point is not None:
        value = add("Sub", [value, broadcast(zero_point)])
    value = add("Mul", [value, broadcast(scale)])
    if out_type != TensorProto.FLOAT:
        value = add("Cast", [value], to=out_type)
    last, old = nodes[-1], node.outputs[0]
    last.name = node.name
    last.metadata_props.clear()
    last.metadata_props.update(node.metadata_props)
    graph.graph.insert_before(node, nodes)
    name = old.name
    old.replace_all_uses_with(value, replace_graph_outputs=True)
    graph.graph.remove(node, safe=True)
    value.name = name  # readers see the tensor they read before
