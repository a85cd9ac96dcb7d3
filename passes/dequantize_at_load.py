"""dequantize-at-load: store codes as they are, but let onnxruntime turn them into float weights once, at load.

Stock onnxruntime never constant-folds a DequantizeLinear (it keeps them for its QDQ fusions), so a
weight stored as codes is dequantized again on every run: on CPU our files took 1.1–6.7x FP32's time
(benchmarks/results/load_latency.md). This pass rewrites each DequantizeLinear over constants into
the same arithmetic in plain ops,

    W = (Cast(q) − Cast(zero_point)) · scale        (scale broadcast per axis, or per block)

which onnxruntime's constant folding evaluates when it loads the session. The file keeps its codes
(a few nodes more per weight: 0.004–1.2% of the zoo's files); the run is as fast as FP32, and so is its
memory: the float weights live in RAM. That is the trade: without this pass RAM holds the codes (and
MatMulNBits keeps blocked 4-bit MatMul weights 4-bit); with it the latency is FP32's. Put it last:
later passes see a Mul, not a weight. A DequantizeLinear beside a quantized activation (a QDQ node that onnxruntime runs
as an int8 kernel) is left alone.
"""

from __future__ import annotations

import math

import onnx
from onnx import TensorProto, helper

from onnxtq.graph import Graph, tag
from onnxtq.opsets import Emission
from onnxtq.pass_infra import STATS, Context, Pass
from onnxtq.report import PassReport
from onnxtq.weights import node_attr


class DequantizeAtLoadPass(Pass):
    name = "dequantize-at-load"
    needs = frozenset()
    preserves = frozenset({STATS})  # originals: the DequantizeLinear nodes they are keyed by are gone

    def emits(self) -> Emission:
        return Emission(ops=13)  # Reshape, Expand, Slice and Cast with their inputs as tensors

    def run(self, ctx: Context) -> PassReport:
        report = self.new_report()
        graph = ctx.graph
        before = graph.model.ByteSize()
        rewritten, kept, shapes = 0, 0, {}
        for node in list(graph.graph.node):
            if node.op_type != "DequantizeLinear" or not all(n in graph.initializers for n in node.input if n):
                continue
            if _beside_quantized_activation(graph, node):
                kept += 1
                continue
            _rewrite(graph, node, f"dq{rewritten}", shapes)
            rewritten += 1
        graph.remove_dead()
        report.notes.append(
            f"{rewritten} DequantizeLinear weights now fold at load: {before:,d} B -> {graph.model.ByteSize():,d} B"
            + (f"; {kept} kept beside quantized activations" if kept else "")
        )
        return report


def _beside_quantized_activation(graph: Graph, node: onnx.NodeProto) -> bool:
    """Whether a reader of `node` also reads a dequantized activation (ORT fuses that into an int8 kernel)."""
    for reader, _ in graph.consumers[node.output[0]]:
        for name in reader.input if reader is not None else ():
            producer = graph.producer.get(name)
            if (
                producer is not None
                and producer.op_type == "DequantizeLinear"
                and producer.input[0] not in graph.initializers
            ):
                return True
    return False


def _rewrite(graph: Graph, node: onnx.NodeProto, prefix: str, shapes: dict[tuple, str]) -> None:
    """Replace `node` by Cast/Sub/Mul (and the scale's broadcast) computing the same tensor.

    Only the last node keeps the name and provenance of `node`; the others are tagged as this pass's
    (role `decode`), the values between are named `prefix`.k and the shape constants are shared
    (`shapes`, by value): in a 1 MB model every name spelled costs.
    """
    q, scale = (graph.initializers[n] for n in node.input[:2])
    zero_point = node.input[2] if len(node.input) > 2 and node.input[2] else None
    out_type = int(node_attr(node, "output_dtype", 0)) or scale.data_type
    shape, rank = list(q.dims), len(q.dims)
    axis = int(node_attr(node, "axis", 1)) % max(rank, 1)
    block = int(node_attr(node, "block_size", 0))
    nodes: list[onnx.NodeProto] = []

    def add(op: str, inputs: list[str], **attrs) -> str:
        out = graph.unique(f"{prefix}.{len(nodes)}")
        nodes.append(tag(helper.make_node(op, inputs, [out], **attrs), DequantizeAtLoadPass.name, "decode"))
        return out

    def const(values: list[int]) -> str:
        if tuple(values) not in shapes:
            shapes[tuple(values)] = name = graph.unique(f"onnxtq.shape.{'_'.join(map(str, values))}")
            graph.set_initializer(helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
        return shapes[tuple(values)]

    def as_float(name: str) -> str:
        is_float = name in graph.initializers and graph.initializers[name].data_type == TensorProto.FLOAT
        return name if is_float else add("Cast", [name], to=TensorProto.FLOAT)

    def broadcast(name: str) -> str:
        """`name` (a scale or zero point) as float, shaped to broadcast against the codes."""
        dims = list(graph.initializers[name].dims)
        value = as_float(name)
        if math.prod(dims) == 1:
            return value
        if not block:  # one value per index along `axis`
            return add("Reshape", [value, const([-1] + [1] * (rank - axis - 1))])
        blocks = dims[axis]  # each value repeated `block` times along `axis`, the last run cut to the shape
        value = add("Reshape", [value, const(dims[:axis] + [blocks, 1] + dims[axis + 1 :])])
        value = add("Expand", [value, const(shape[:axis] + [blocks, block] + shape[axis + 1 :])])
        value = add("Reshape", [value, const(shape[:axis] + [blocks * block] + shape[axis + 1 :])])
        if blocks * block != shape[axis]:
            value = add("Slice", [value, const([0]), const([shape[axis]]), const([axis])])
        return value

    value = as_float(q.name)
    if zero_point is not None:
        value = add("Sub", [value, broadcast(zero_point)])
    value = add("Mul", [value, broadcast(scale.name)])
    if out_type != TensorProto.FLOAT:
        value = add("Cast", [value], to=out_type)
    nodes[-1].output[0] = node.output[0]
    nodes[-1].name = node.name
    del nodes[-1].metadata_props[:]
    nodes[-1].metadata_props.extend(node.metadata_props)
    position = list(graph.graph.node).index(node)
    graph.graph.node.remove(node)
    for n in reversed(nodes):
        graph.graph.node.insert(position, n)
    graph.refresh()
