"""Codes as plain arithmetic: DequantizeLinear over constants written as Cast/Sub/Mul, and sub-byte codes
packed in bytes that a few float ops unpack.

    W = (Cast(q) − Cast(zero_point)) · scale        (scale broadcast per axis, or per block)

Two users. dequantize-at-load (the `fast` profile) writes this so that onnxruntime folds every weight into a
float tensor when it loads the session (it never folds a DequantizeLinear). The `portable` profile
(onnxtq.profiles) writes every coded weight so, at the model's own opset: older runtimes lack INT4/INT2
tensors (opset 21/25), blocked and float16-output DequantizeLinear (21/23). There the b-bit codes (b = 2 or 4)
of all tensors of one width and signedness are stored as one UINT8 blob: each tensor's bytes as ONNX packs INT4
and INT2 (8/b codes a byte, the first at the low bits), one after another. A lookup table decodes every byte,
no bit operators (BitwiseAnd needs opset 18; OpenVINO rounds BitShift and does not fold Mod, and an LSTM there
needs constant weights), and a Split gives each tensor back:

    digits = Gather(Cast(table), Cast(blob, INT32))    # table [256, 8/b]: the codes byte value v holds
    Split(digits, bytes per tensor) → Reshape to each tensor's shape

Passes keep writing DequantizeLinear nodes (refine and the guards read them); a graph holding codes its
opset cannot hold yet is lowered whenever it runs (`model_io.session`), and once before it is written.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxtq.graph import Graph, node_attr, prepend, proto_opset, tag

#: Sub-byte code types, by the opset that first holds them, and their width.
SUB_BYTE = {
    TensorProto.INT4: (21, 4),
    TensorProto.UINT4: (21, 4),
    TensorProto.INT2: (25, 2),
    TensorProto.UINT2: (25, 2),
}
SIGNED = {TensorProto.INT4, TensorProto.INT2}
_WIDE = {TensorProto.INT8: 13, TensorProto.UINT8: 13, TensorProto.INT16: 21, TensorProto.UINT16: 21}


def dequantize_opset(node: ir.Node | onnx.NodeProto, code_type: int) -> int:
    """The opset whose DequantizeLinear accepts `node` over codes of `code_type`."""
    if isinstance(node, onnx.NodeProto):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    else:
        attrs = {key: node_attr(node, key, 0) for key in ("block_size", "output_dtype")}
    need = SUB_BYTE[code_type][0] if code_type in SUB_BYTE else _WIDE.get(code_type, 13)
    if attrs.get("block_size"):
        need = max(need, 21)
    if attrs.get("output_dtype"):
        need = max(need, 23)
    return need


def needs_lowering(model: onnx.ModelProto) -> bool:
    """Whether the model holds codes its opset cannot (written by passes under a lower-opset profile)."""
    opset = proto_opset(model)
    types = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in types:
            if dequantize_opset(node, types[node.input[0]]) > opset:
                return True
        elif node.op_type == "Cast" and SUB_BYTE.get(types.get(node.input[0]), (0,))[0] > opset:
            return True
    return False


class Writer:
    """Adds tagged nodes for one rewrite, names their values `prefix`.k, and shares small constants by value
    (in a 1 MB model every node and name spelled costs)."""

    def __init__(self, graph: Graph, prefix: str, pass_name: str, shared: dict):
        self.graph, self.prefix, self.pass_name, self.shared = graph, prefix, pass_name, shared
        self.nodes: list[ir.Node] = []

    def add(self, op: str, inputs: list[ir.Value], **attrs) -> ir.Value:
        out = self.graph.unique(f"{self.prefix}.{len(self.nodes)}")
        self.nodes.append(tag(self.graph.node(op, inputs, [out], **attrs), self.pass_name, "decode"))
        return self.nodes[-1].outputs[0]

    def ints(self, values: list[int]) -> ir.Value:
        return self._const(("i", *values), helper.make_tensor("", TensorProto.INT64, [len(values)], values))

    def scalar(self, value: float) -> ir.Value:
        return self._const(("f", value), numpy_helper.from_array(np.array(value, np.float32)))

    def array(self, values: np.ndarray) -> ir.Value:
        return self._const(("a", *values.shape, *values.reshape(-1)), numpy_helper.from_array(values))

    def _const(self, key: tuple, tensor: onnx.TensorProto) -> ir.Value:
        if key not in self.shared:
            kind = {"i": "shape", "f": "k", "a": "table"}[key[0]]
            tensor.name = self.graph.unique(f"onnxtq.{kind}.{'_'.join(map(str, key[1:]))}"[:40])
            self.shared[key] = self.graph.set_initializer(tensor)
        return self.shared[key]

    def as_float(self, value: ir.Value) -> ir.Value:
        is_float = value.is_initializer() and int(value.const_value.dtype) == TensorProto.FLOAT
        return value if is_float else self.add("Cast", [value], to=TensorProto.FLOAT)


def to_arithmetic(
    graph: Graph, node: ir.Node, prefix: str, shared: dict, pass_name: str, codes: Callable | None = None
) -> None:
    """Replace the DequantizeLinear `node` (over constants) by Cast/Sub/Mul and the scale's broadcast.

    `codes(writer, q)` gives the codes as float (default: Cast). Only the last node keeps the name and
    provenance of `node`; the others are tagged as `pass_name`'s (role `decode`); a per-axis scale or zero
    point that only `node` reads is stored already shaped to broadcast (no Reshape)."""
    q, scale = node.inputs[:2]
    zero_point = node.inputs[2] if len(node.inputs) > 2 else None
    out_type = int(node_attr(node, "output_dtype", 0)) or int(scale.const_value.dtype)
    shape = [int(d) for d in q.const_value.shape]
    rank = len(shape)
    axis = int(node_attr(node, "axis", 1)) % max(rank, 1)
    block = int(node_attr(node, "block_size", 0))
    w = Writer(graph, prefix, pass_name, shared)

    def broadcast(value: ir.Value) -> ir.Value:
        """`value` (a scale or zero point) as float, shaped to broadcast against the codes."""
        dims = [int(d) for d in value.const_value.shape]
        if math.prod(dims) == 1:
            return w.as_float(value)
        if not block:  # one value per index along `axis`
            trailing = [1] * (rank - axis - 1)
            if len(value.uses()) > 1:  # shared with another node: shaped in the graph
                return w.add("Reshape", [w.as_float(value), w.ints([-1] + trailing)])
            if dims != [dims[0]] + trailing:  # only this node reads it: stored already shaped (same values)
                shaped = graph.array(value.name).reshape([dims[0]] + trailing)
                value = graph.set_initializer(numpy_helper.from_array(shaped, value.name))
            return w.as_float(value)
        value = w.as_float(value)
        blocks = dims[axis]  # each value repeated `block` times along `axis`, the last run cut to the shape
        value = w.add("Reshape", [value, w.ints(dims[:axis] + [blocks, 1] + dims[axis + 1 :])])
        value = w.add("Expand", [value, w.ints(shape[:axis] + [blocks, block] + shape[axis + 1 :])])
        value = w.add("Reshape", [value, w.ints(shape[:axis] + [blocks * block] + shape[axis + 1 :])])
        if blocks * block != shape[axis]:
            value = w.add("Slice", [value, w.ints([0]), w.ints([shape[axis]]), w.ints([axis])])
        return value

    value = (codes or (lambda writer, v: writer.as_float(v)))(w, q)
    if zero_point is not None:
        value = w.add("Sub", [value, broadcast(zero_point)])
    value = w.add("Mul", [value, broadcast(scale)])
    if out_type != TensorProto.FLOAT:
        value = w.add("Cast", [value], to=out_type)
    replace_node(graph, node, w.nodes, value)


def replace_node(graph: Graph, node: ir.Node, nodes: list[ir.Node], value: ir.Value) -> None:
    """Put `nodes` where `node` was; their last takes its name and provenance, `value` its output's name."""
    last, old = nodes[-1], node.outputs[0]
    last.name = node.name
    last.metadata_props.clear()
    last.metadata_props.update(node.metadata_props)
    graph.graph.insert_before(node, nodes)
    name = old.name
    old.replace_all_uses_with(value, replace_graph_outputs=True)
    graph.graph.remove(node, safe=True)
    value.name = name  # readers see the tensor they read before


def unpack_all(w: Writer, values: list[ir.Value]) -> dict[str, ir.Value]:
    """Sub-byte code tensors stored as one UINT8 blob per width and signedness (each tensor's bytes as ONNX
    packs them, one after another), decoded once by a lookup table and split back: each tensor's float codes by
    name. Sharing the decoding costs one or three nodes per tensor instead of ten (MobileNetV2 at 4 bits: +0.2%
    over the ort target's file instead of +2.1%); the table keeps what folding holds at load to two floats a code
    (Floor/Mul arithmetic held eight: 1 GB for MiniLM)."""
    graph = w.graph
    out: dict[str, ir.Value] = {}
    for bits, signed in ((2, False), (2, True), (4, False), (4, True)):
        group = [v for v in values if SUB_BYTE[int(v.const_value.dtype)][1] == bits and _is_signed(v) == signed]
        if not group:
            continue
        per = 8 // bits
        packed = [pack(graph.array(v.name), bits) for v in group]
        blob = numpy_helper.from_array(np.concatenate(packed), graph.unique(f"onnxtq.codes{bits}"))
        table = w.add("Cast", [w.array(digit_table(bits, signed))], to=TensorProto.FLOAT)
        index = w.add("Cast", [graph.set_initializer(blob)], to=TensorProto.INT32)
        digits = w.add("Gather", [table, index], axis=0)  # [bytes, 8/bits]: byte i's codes, first at low bits
        for value, nbytes, piece in zip(group, [p.size for p in packed], _split(w, digits, [p.size for p in packed])):
            shape = [int(d) for d in value.const_value.shape]
            size = int(np.prod(shape))
            if size != per * nbytes:  # the last byte half used
                piece = w.add("Reshape", [piece, w.ints([-1])])
                piece = w.add("Slice", [piece, w.ints([0]), w.ints([size]), w.ints([0])])
            out[value.name] = w.add("Reshape", [piece, w.ints(shape)])
    return out


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes as ONNX packs INT4/INT2 (and UINT4/UINT2): 8/bits per byte, the first at the low bits, two's
    complement for signed ones, the last byte padded with zeros."""
    per, mask = 8 // bits, (1 << bits) - 1
    flat = codes.reshape(-1).astype(np.int64) & mask
    padded = np.zeros(-(-flat.size // per) * per, np.int64)
    padded[: flat.size] = flat
    rows = padded.reshape(-1, per)
    return sum(rows[:, k] << (bits * k) for k in range(per)).astype(np.uint8)


def digit_table(bits: int, signed: bool) -> np.ndarray:
    """[256, 8/bits] INT8: the codes every byte holds (two's complement where `signed`)."""
    per, mask = 8 // bits, (1 << bits) - 1
    digits = (np.arange(256)[:, None] >> (bits * np.arange(per))[None, :]) & mask
    if signed:
        digits = np.where(digits >= 1 << (bits - 1), digits - (1 << bits), digits)
    return digits.astype(np.int8)


def _split(w: Writer, value: ir.Value, sizes: list[int]) -> list[ir.Value]:
    """`value` cut into pieces of `sizes` along its first axis."""
    if len(sizes) == 1:
        return [value]
    names = [w.graph.unique(f"{w.prefix}.{len(w.nodes)}.{k}") for k in range(len(sizes))]
    split = w.graph.node("Split", [value, w.ints(sizes)], names, axis=0)
    w.nodes.append(tag(split, w.pass_name, "decode"))
    return list(split.outputs)


def integers(w: Writer, q: ir.Value) -> ir.Value:
    """INT8/INT16 codes as float, through a Floor that changes nothing: OpenVINO's CPU plugin takes Cast → Mul
    over integer constants for a compressed weight, and then quantizes the activations it meets (1e-3 of
    the output range off on mnist_cnn)."""
    return w.add("Floor", [w.as_float(q)])


def lower(graph: Graph, pass_name: str = "lower-codes", every: bool = False) -> int:
    """Rewrite every code the graph's opset cannot hold (module docstring), or with `every` each
    DequantizeLinear over constants; returns how many nodes changed."""
    opset = 0 if every else graph.opset()  # every: as if no opset held any code
    todo = [node for node in graph.graph if _beyond(node, opset)]
    codes = {v.name: v for node in todo for v in node.inputs[:1] if int(v.const_value.dtype) in SUB_BYTE}
    shared: dict = {}
    w = Writer(graph, graph.unique("lw"), pass_name, shared)
    unpacked = unpack_all(w, list(codes.values()))
    prepend(graph, w.nodes)
    for index, node in enumerate(todo):
        if node.op_type == "Cast" and node.inputs[0].name in unpacked:
            node.replace_input_with(0, unpacked[node.inputs[0].name])
            continue
        if node.op_type == "Cast":  # integer constants made float (kq's codebook): through `integers`' Floor
            _floor_after(graph, node, pass_name)
            continue
        if len(node.inputs) > 2 and int(node.inputs[2].const_value.dtype) in SUB_BYTE:
            _widen(graph, node.inputs[2])  # a per-channel zero point: one byte each

        def as_float(writer: Writer, q: ir.Value) -> ir.Value:
            return unpacked[q.name] if q.name in unpacked else integers(writer, q)

        to_arithmetic(graph, node, graph.unique(f"lw{index}"), shared, pass_name, as_float)
    graph.remove_dead()
    left = [v.name for v in graph.initializers.values() if int(v.const_value.dtype) in SUB_BYTE]
    if left:
        raise ValueError(f"sub-byte tensors read by ops that cannot be lowered: {left[:3]}")
    return len(todo)


def _beyond(node: ir.Node, opset: int) -> bool:
    """A DequantizeLinear over constants, or a Cast of sub-byte constants, that `opset` cannot hold."""
    inputs = node.inputs
    if node.op_type == "DequantizeLinear" and all(v is not None and v.is_initializer() for v in inputs):
        return dequantize_opset(node, int(inputs[0].const_value.dtype)) > opset
    if node.op_type == "Cast" and inputs[0].is_initializer():
        code_type = int(inputs[0].const_value.dtype)
        if code_type in SUB_BYTE:
            return SUB_BYTE[code_type][0] > opset
        return not opset and code_type in _WIDE and int(node_attr(node, "to", 0)) == TensorProto.FLOAT
    return False


def _floor_after(graph: Graph, node: ir.Node, pass_name: str) -> None:
    """A Floor (changing nothing) after a Cast of integer constants to float, for the reason `integers` gives."""
    out = node.outputs[0]
    floor = tag(graph.node("Floor", [out], [graph.unique(f"{out.name}/onnxtq.floor")]), pass_name, "decode")
    out.replace_all_uses_with(floor.outputs[0], replace_graph_outputs=True)
    floor.replace_input_with(0, out)
    graph.graph.insert_after(node, floor)


def _is_signed(value: ir.Value) -> bool:
    return int(value.const_value.dtype) in SIGNED


def _widen(graph: Graph, value: ir.Value) -> None:
    """Store a sub-byte tensor in INT8/UINT8, values unchanged."""
    graph.set_initializer(numpy_helper.from_array(widened(graph, value), value.name))


def widened(graph: Graph, value: ir.Value) -> np.ndarray:
    """A sub-byte tensor's values as INT8/UINT8 (Gather and old runtimes take no INT4/INT2)."""
    return graph.array(value.name).astype(np.int8 if _is_signed(value) else np.uint8)
