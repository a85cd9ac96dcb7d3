"""Emit quantized weights as `DequantizeLinear` nodes that stock onnxruntime runs.

    W ≈ DequantizeLinear(q, scale, zero_point; axis, block_size)  →  consumer

The float initializer is replaced by packed codes, a float scale tensor and (for
asymmetric codes) a zero point; the consumer reads the DequantizeLinear output.
Codes outside their container's range (a handful of outliers that would otherwise
double the container) are stored as *escapes*: their positions and exact values,
written over the dequantized weight by one ScatterElements.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxtq import kernels
from onnxtq.graph import Graph, node_attr, prepend, tag
from onnxtq.model_io import tensor_nbytes
from onnxtq.packing import PLANES, int_tensor, split_planes
from onnxtq.quantize import Blocking, GroupCode, int_range
from onnxtq.weights import WeightSite


def _dequantize_node(
    graph: Graph,
    base: str,
    node_base: str,
    codes,
    scale,
    zero_point,
    bits: int,
    attrs: dict,
    float_type: int,
    pass_name: str,
    signed: bool | None = None,
) -> tuple[ir.Node, list[onnx.TensorProto]]:
    """A DequantizeLinear node over new initializers (codes packed, `scale` as stored); not yet in the graph.
    Codes are signed unless they have a zero point or `signed` says otherwise (a low plane: unsigned, none)."""
    signed = zero_point is None if signed is None else signed
    q = int_tensor(graph.unique(f"{base}/onnxtq.q"), codes, bits, signed)
    scale_t = numpy_helper.from_array(scale, graph.unique(f"{base}/onnxtq.scale"))
    stored = [q, scale_t]
    if zero_point is not None:
        stored.append(int_tensor(graph.unique(f"{base}/onnxtq.zero_point"), zero_point, bits, False))
    attrs = dict(attrs)
    if scale.dtype != onnx.helper.tensor_dtype_to_np_dtype(float_type):
        attrs["output_dtype"] = float_type  # DequantizeLinear-23: fp16 steps decode straight to the weight's type
    out = graph.unique(f"{base}/onnxtq.dequant")
    name = graph.unique(f"{node_base}/onnxtq.dequant")
    inputs = [graph.set_initializer(t) for t in stored]
    node = tag(graph.node("DequantizeLinear", inputs, [out], name, **attrs), pass_name, "dequant")
    return node, stored


def _scale_values(scale: np.ndarray, float_type: int) -> np.ndarray:
    """Steps as stored: float16 where the pass chose them (half the side information), else the weight's type."""
    weight_dtype = onnx.helper.tensor_dtype_to_np_dtype(float_type)
    return scale if scale.dtype.itemsize < np.dtype(weight_dtype).itemsize else scale.astype(weight_dtype)


def float_type(graph: Graph, site: WeightSite) -> int:
    """The TensorProto element type of the site's float weight."""
    return int(graph.initializers[site.name].const_value.dtype)


def replace_initializer(graph: Graph, site: WeightSite, new: ir.Value, pass_name: str) -> list[ir.Node]:
    """Point every reader of the site's weight at `new` (of `site.shape`) and drop the float tensor.

    Returns the nodes to add after those computing `new`: a Reshape to the initializer's own shape where
    the codes were laid out in another (recurrent weights: coded as 2-D, read as [dirs, gates·h, d])."""
    nodes = []
    if site.file_shape is not None:
        shape = numpy_helper.from_array(np.array(site.file_shape, np.int64), graph.unique(f"{site.name}/onnxtq.shape"))
        out = graph.unique(f"{site.name}/onnxtq.reshaped")
        name = graph.unique(f"{site.node}/onnxtq.reshape")
        nodes.append(tag(graph.node("Reshape", [new, graph.set_initializer(shape)], [out], name), pass_name, "reshape"))
        new = nodes[0].outputs[0]
    graph.initializers[site.name].replace_all_uses_with(new)
    graph.initializers.pop(site.name)
    return nodes


#: Bytes one escaped code costs (its int32 position and float32 value), and the nodes and shapes escapes add.
ESCAPE_BYTES, ESCAPE_OVERHEAD = 8, 200
#: What a narrower container is charged per escape: four times its bytes, because in the packed file an escape
#: costs about 6 B more than the code it replaces. PP-OCRv4 rec at 4 b/w: 7,853 escapes (22,676 at 8 B each),
#: codes 2.22 MB (2.07 MB; 3.96 MB without escapes).
ESCAPE_PRICE = 4 * ESCAPE_BYTES


def escapes(q: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Flat positions of the codes in `q` that the `bits`-bit container cannot hold."""
    lo, hi = int_range(bits, signed)
    if not q.size or lo <= q.min() and q.max() <= hi:  # two reductions, no mask: most codes never escape
        return np.empty(0, np.intp)
    return np.flatnonzero((q < lo) | (q > hi))


def narrowest_container(q: np.ndarray, widths: tuple[int, ...] = (4, 8, 16)) -> int:
    """The container width storing signed codes `q` in the fewest bytes, codes outside it sent as escapes
    (charged ESCAPE_PRICE each)."""

    def stored(bits: int) -> float:
        escaped = escapes(q, bits, True).size
        return q.size * bits / 8 + (ESCAPE_PRICE * escaped + ESCAPE_OVERHEAD if escaped else 0)

    return min(widths, key=stored)


def emit_dequantize(graph: Graph, site: WeightSite, blocking: Blocking, code: GroupCode, pass_name: str) -> int:
    """Replace the weight of `site` by DequantizeLinear over `code`; returns the bytes now stored."""
    ftype = float_type(graph, site)
    scale = _scale_values(blocking.scales_to_shape(code.scale), ftype)
    zp = None if code.zero_point is None else blocking.scales_to_shape(code.zero_point)
    q = kernels.rows_of(blocking.from_groups(code.q))  # a MatMul weight's groups are a transposed view
    escaped = escapes(q, code.bits, code.zero_point is None)
    if escaped.size and zp is None:
        q = q.copy()
        q.flat[escaped] = 0  # the likeliest code; the escapes write over it
    elif escaped.size:
        q = np.clip(q, *int_range(code.bits, False))
    original = graph.initializers[site.name].const_value  # the float weight as stored (read when refined)
    node, stored = _dequantize_node(
        graph, site.name, site.node, q, scale, zp, code.bits, blocking.dequantize_attrs, ftype, pass_name
    )
    out = node.outputs[0]
    nodes = [node]
    if escaped.size:
        out, patch, patch_stored = _escapes(graph, site, out, blocking, code, escaped, ftype, pass_name)
        nodes += patch
        stored += patch_stored
    else:
        graph.originals[out.name] = (site, original)  # the float weight, for passes that refine the codes later
    nodes += replace_initializer(graph, site, out, pass_name)
    prepend(graph, nodes)
    return sum(tensor_nbytes(t) for t in stored)


def _escapes(graph: Graph, site, dequantized_value, blocking, code, escaped, float_type, pass_name):
    """Reshape → ScatterElements(positions, exact values) → Reshape over the dequantized weight.

    The values are what DequantizeLinear computes for the full codes (one float32 multiply), so the
    weight is the one a wider container would give.
    """
    zp = 0 if code.zero_point is None else code.zero_point[:, None].astype(np.float32)
    exact = blocking.from_groups((code.q.astype(np.float32) - zp) * code.scale.astype(np.float32)[:, None])
    dtype = onnx.helper.tensor_dtype_to_np_dtype(float_type)
    base = site.name
    stored = [
        numpy_helper.from_array(np.array([-1], np.int64), graph.unique(f"{base}/onnxtq.flat")),
        numpy_helper.from_array(escaped.astype(np.int32), graph.unique(f"{base}/onnxtq.escape_at")),
        numpy_helper.from_array(exact.reshape(-1)[escaped].astype(dtype), graph.unique(f"{base}/onnxtq.escape_value")),
        numpy_helper.from_array(np.array(exact.shape, np.int64), graph.unique(f"{base}/onnxtq.shape")),
    ]
    flat_shape, at, values, shape = (graph.set_initializer(t) for t in stored)
    flat, patched, weight = (graph.unique(f"{base}/onnxtq.{n}") for n in ("flat_weight", "patched", "escaped"))
    names = [graph.unique(f"{site.node}/onnxtq.escape") for _ in range(3)]
    reshaped = graph.node("Reshape", [dequantized_value, flat_shape], [flat], names[0])
    scatter = graph.node("ScatterElements", [reshaped.outputs[0], at, values], [patched], names[1], axis=0)
    back = graph.node("Reshape", [scatter.outputs[0], shape], [weight], names[2])
    nodes = [tag(n, pass_name, "escape") for n in (reshaped, scatter, back)]
    return back.outputs[0], nodes, stored


@dataclass
class Piece:
    """Codes of one slice of a weight (stored layout), with one step per channel along `axis`."""

    q: np.ndarray
    scale: np.ndarray  # [q.shape[axis]]
    zero_point: np.ndarray | None
    bits: int
    axis: int
    planes: bool = True  # a depth of PLANES is stored as its two planes (False: in the one container that holds it)


def _piece_node(graph: Graph, base: str, node_base: str, piece: Piece, float_type: int, pass_name: str):
    """DequantizeLinear over one piece (one step per channel along its axis): (float output, nodes, tensors
    stored). A depth between the containers is two DequantizeLinear, of its high plane (steps × 2^low) and of
    its low plane, and their Add."""
    scale = _scale_values(piece.scale, float_type)
    attrs = {"axis": piece.axis}
    if not (piece.planes and piece.bits in PLANES):
        node, stored = _dequantize_node(
            graph, base, node_base, piece.q, scale, piece.zero_point, piece.bits, attrs, float_type, pass_name
        )
        return node.outputs[0], [node], stored
    high, low = PLANES[piece.bits]
    hi, lo = split_planes(piece.q, piece.bits)
    with np.errstate(over="ignore"):
        hi_scale = scale * scale.dtype.type(2**low)  # exact: a power of two
    if not np.all(np.isfinite(hi_scale)):
        hi_scale = scale.astype(np.float32) * np.float32(2**low)
    hi_node, hi_stored = _dequantize_node(
        graph, f"{base}/hi", node_base, hi, hi_scale, None, high, attrs, float_type, pass_name
    )
    lo_node, lo_stored = _dequantize_node(
        graph, f"{base}/lo", node_base, lo, scale, None, low, attrs, float_type, pass_name, signed=False
    )
    out = graph.unique(f"{base}/onnxtq.planes")
    name = graph.unique(f"{node_base}/onnxtq.planes")
    add = tag(graph.node("Add", [hi_node.outputs[0], lo_node.outputs[0]], [out], name), pass_name, "planes")
    return add.outputs[0], [hi_node, lo_node, add], hi_stored + lo_stored


def _pieces_node(
    graph: Graph, base: str, node_base: str, pieces: list[Piece], concat_axis: int, float_type: int, pass_name: str
) -> tuple[ir.Value, list[ir.Node], int]:
    """DequantizeLinear per piece, joined by Concat along `concat_axis`: (float output, nodes, bytes stored)."""
    outs, nodes, stored = [], [], 0
    for i, p in enumerate(pieces):
        out, piece_nodes, tensors = _piece_node(graph, f"{base}/band{i}", node_base, p, float_type, pass_name)
        outs.append(out)
        nodes += piece_nodes
        stored += sum(tensor_nbytes(t) for t in tensors)
    if len(outs) == 1:
        return outs[0], nodes, stored
    out = graph.unique(f"{base}/onnxtq.concat")
    name = graph.unique(f"{node_base}/onnxtq.concat")
    concat = graph.node("Concat", outs, [out], name, axis=concat_axis)
    nodes.append(tag(concat, pass_name, "concat"))
    return concat.outputs[0], nodes, stored


def emit_pieces(
    graph: Graph, site: WeightSite, pieces: list[Piece], axis: int, pass_name: str, order: np.ndarray | None = None
) -> int:
    """Replace the weight of `site` by the concatenation of dequantized pieces along `axis`; returns bytes stored.

    With `order` (the original index of each concatenated slice), a Gather puts the slices back in place.
    """
    out, nodes, stored = _pieces_node(graph, site.name, site.node, pieces, axis, float_type(graph, site), pass_name)
    if order is not None:
        indices = numpy_helper.from_array(np.argsort(order).astype(np.int32), graph.unique(f"{site.name}/onnxtq.order"))
        index_value = graph.set_initializer(indices)
        stored += tensor_nbytes(indices)
        placed = graph.unique(f"{site.name}/onnxtq.placed")
        name = graph.unique(f"{site.node}/onnxtq.order")
        gather = graph.node("Gather", [out, index_value], [placed], name, axis=axis)
        nodes.append(tag(gather, pass_name, "order"))
        out = gather.outputs[0]
    nodes += replace_initializer(graph, site, out, pass_name)
    prepend(graph, nodes)
    return stored


def emit_transformed(
    graph: Graph, site: WeightSite, pieces: list[Piece], basis: Piece, factored: bool, pass_name: str
) -> int:
    """Replace W by coefficients T (pieces along the input axis) and a basis B with W = T·B.

    factored: the layer reads a new bias-free 1×1 map by B of its input (Conv 1×1 / Gemm / MatMul),
    so both nodes run on K ≤ C channels; folded: W = T·B is computed in the graph from the stored
    codes (onnxruntime folds it at load with `session.disable_quant_qdq=1`) and feeds the layer.
    `basis.q` is [K, C, 1, 1] (a 1×1 conv weight) for Conv, [K, C] for Gemm(transB=1), [C, K] for weights
    stored transposed (MatMul, Gemm(transB=0)).
    """
    ftype = float_type(graph, site)
    node = graph.first_reader(graph.initializers[site.name])
    in_axis = 0 if site.transposed else 1
    t_out, t_nodes, stored = _pieces_node(graph, site.name, site.node, pieces, in_axis, ftype, pass_name)
    b_out, b_nodes, b_tensors = _piece_node(graph, f"{site.name}/basis", site.node, basis, ftype, pass_name)
    stored += sum(tensor_nbytes(t) for t in b_tensors)
    new_nodes = [*t_nodes, *b_nodes]
    if factored:
        z = graph.unique(f"{site.node}/onnxtq.basis_out")
        name = graph.unique(f"{site.node}/onnxtq.basis")
        operands = [node.inputs[0], b_out]
        if site.op == "Conv":
            basis_node = graph.node("Conv", operands, [z], name, kernel_shape=[1] * (len(site.shape) - 2))
        elif site.op == "Gemm":
            trans_a = int(node_attr(node, "transA", 0))
            basis_node = graph.node("Gemm", operands, [z], name, transA=trans_a, transB=1)
            node.attributes["transA"] = ir.AttrInt64("transA", 0)
        else:
            basis_node = graph.node("MatMul", operands, [z], name)
        new_nodes.append(tag(basis_node, pass_name, "basis"))
        node.replace_input_with(0, basis_node.outputs[0])
        weight_out = t_out
    else:
        product_name = graph.unique(f"{site.name}/onnxtq.product")
        # one Einsum: onnxruntime's QDQ propagation would move DequantizeLinear past a Transpose or Reshape
        # and lose its output_dtype (float16 steps), so the product reads the dequantized tensors directly
        taps, ones = "hwd"[: len(site.shape) - 2], "xyz"[: len(site.shape) - 2]
        if site.op == "Conv":  # W[n,C,taps] = T[n,K,taps] ×_K B[K,C,1,1]
            equation = f"nk{taps},kc{ones}->nc{taps}"
        else:  # stored [C, n] = Bᵀ[C, K]·T[K, n], or [n, C] = T[n, K]·B[K, C]
            equation = "ck,kn->cn" if site.transposed else "nk,kc->nc"
        operands = [b_out, t_out] if site.transposed else [t_out, b_out]
        name = graph.unique(f"{site.node}/onnxtq.product")
        product = graph.node("Einsum", operands, [product_name], name, equation=equation)
        new_nodes.append(tag(product, pass_name, "product"))
        weight_out = product.outputs[0]
    new_nodes += replace_initializer(graph, site, weight_out, pass_name)
    graph.graph.insert_before(node, new_nodes)
    return stored


def dequantized(blocking: Blocking, code: GroupCode) -> np.ndarray:
    """The float weight ORT will compute, in the stored layout (numpy reference), laid out as that layout (a
    MatMul weight's groups are its transposed view: every later pass over it would stride)."""
    weight = np.empty(blocking.shape, np.float32)
    groups = blocking.to_groups(weight)
    if not np.may_share_memory(groups, weight):  # blocks padded to their size: the groups are a copy
        return kernels.rows_of(blocking.from_groups(code.dequantize()))
    code.dequantize(groups)  # decoded straight into the weight's layout
    return weight


def emit_rotated_table(
    graph: Graph, site: WeightSite, codes: np.ndarray, step: np.ndarray, bits: int, basis: GroupCode, pass_name: str
) -> int:
    """Replace an embedding table W [V, D] by coefficients C over a basis B [D, D], W = C·B, both decoded by
    DequantizeLinear: C stored column by column (Cᵀ [D, V], `codes`, one `step`: brotli then codes each column
    with its own statistics), B with a step per row. The one Gather that reads the table gathers coefficient
    columns (axis 1) and an Einsum turns them into rows: D² multiply-adds per token, where W = C·B in the graph
    would be V·D² on every run. A table read otherwise too (or inside a body) is W = C·B in the graph. Returns
    the bytes now stored."""
    ftype = float_type(graph, site)
    c_node, stored = _dequantize_node(
        graph, site.name, site.node, codes, _scale_values(step, ftype), None, bits, {}, ftype, pass_name
    )
    scale = _scale_values(basis.scale, ftype)
    b_node, b_stored = _dequantize_node(
        graph, f"{site.name}/basis", site.node, basis.q, scale, None, basis.bits, {"axis": 0}, ftype, pass_name
    )
    prepend(graph, [c_node, b_node])
    table = graph.initializers[site.name]
    uses = list(table.uses())
    gather = uses[0].node if len(uses) == 1 and uses[0].idx == 0 else None
    if gather is None or gather.op_type != "Gather" or gather.graph is not graph.graph or node_attr(gather, "axis", 0):
        product = graph.node(
            "Einsum",
            [c_node.outputs[0], b_node.outputs[0]],
            [graph.unique(f"{site.name}/onnxtq.product")],
            graph.unique(f"{site.node}/onnxtq.product"),
            equation="kv,kc->vc",
        )
        nodes = [tag(product, pass_name, "product")]
        nodes += replace_initializer(graph, site, product.outputs[0], pass_name)
        graph.graph.insert_after(b_node, nodes)
    else:
        columns = graph.node(
            "Gather",
            [c_node.outputs[0], gather.inputs[1]],
            [graph.unique(f"{site.node}/onnxtq.columns")],
            graph.unique(f"{site.node}/onnxtq.columns"),
            axis=1,
        )
        rows = graph.node(
            "Einsum",
            [columns.outputs[0], b_node.outputs[0]],
            [graph.unique(f"{site.node}/onnxtq.rows")],
            graph.unique(f"{site.node}/onnxtq.rows"),
            equation=_rows_equation(gather.inputs[1]),
        )
        graph.graph.insert_before(gather, [tag(columns, pass_name, "gather"), tag(rows, pass_name, "basis")])
        old, new = gather.outputs[0], rows.outputs[0]
        new.type, new.shape = old.type, old.shape
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        graph.graph.remove(gather, safe=True)
        new.name = old.name  # the value keeps its name: it may be a graph output
        graph.initializers.pop(site.name)
    return sum(tensor_nbytes(t) for t in stored + b_stored)


def _rows_equation(indices: ir.Value) -> str:
    """Gathered columns [D, *indices] times the basis [D, D] → rows [*indices, D]: letters where the indices' rank
    is known (not every runtime reads an ellipsis), else one."""
    rank = None if indices.shape is None else len(indices.shape)
    if rank is None or rank > 8:
        return "k...,kc->...c"
    axes = "abcdefgh"[:rank]
    return f"k{axes},kc->{axes}c"
