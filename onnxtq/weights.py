"""Find every quantizable weight and describe it as a matrix W ∈ R^{n×d}.

Rows are the quantization channels (output channels), columns the reduction
dimension that multiplies the layer input x ∈ R^d, so a layer computes y = W x and
its output error for a weight error ΔW is ‖ΔW x‖². The column order of a Conv
weight [n, C/g, kh, kw] is (c, i, j), matching the im2col patches of calibration.

| op                  | stored weight        | view W (n×d)        | activation rows x      |
|---------------------|----------------------|---------------------|------------------------|
| Conv (group g)      | [n, C/g, kh, kw]     | reshape(n, -1)      | im2col patches per group |
| Gemm transB=1       | [n, d]               | W                   | A (or Aᵀ if transA)    |
| Gemm transB=0/MatMul| [d, n]               | Wᵀ                  | last axis of A         |
| ConvTranspose       | [C, n/g, kh, kw]     | reshape(C, -1)      | none (no stats yet)    |
| Gather (embedding)  | [V, D]               | W                   | none (indices)         |
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from onnxtq.finite import nonfinite_reason
from onnxtq.graph import Graph, node_attr
from onnxtq.report import PassReport, WeightRecord

_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


@dataclass(frozen=True)
class ConvGeometry:
    """What im2col needs to reproduce a Conv's patches."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]  # begin..., end...
    dilations: tuple[int, ...]
    group: int
    auto_pad: str = "NOTSET"


@dataclass(frozen=True)
class WeightSite:
    """One quantizable weight initializer and how its consumer uses it."""

    name: str
    node: str
    op: str
    kind: str  # conv, depthwise, grouped-conv, conv-transpose, gemm, matmul, gather
    shape: tuple[int, ...]
    transposed: bool  # stored as [d, n] (MatMul / Gemm transB=0)
    activation: str | None  # tensor whose rows are x, or None when no stats apply
    conv: ConvGeometry | None = None
    trans_a: bool = False

    @property
    def groups(self) -> int:
        return self.conv.group if self.conv else 1

    @property
    def rows(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def cols(self) -> int:
        return int(np.prod(self.shape)) // self.rows

    def to_matrix(self, w: np.ndarray) -> np.ndarray:
        return w.T if self.transposed else w.reshape(self.rows, -1)

    def from_matrix(self, m: np.ndarray) -> np.ndarray:
        return m.T if self.transposed else m.reshape(self.shape)


@dataclass
class Discovery:
    sites: list[WeightSite] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (tensor, node, reason)


def conv_geometry(node: ir.Node, weight_shape: tuple[int, ...]) -> ConvGeometry:
    spatial = len(weight_shape) - 2
    kernel = tuple(node_attr(node, "kernel_shape", weight_shape[2:]))
    auto_pad = node_attr(node, "auto_pad", b"NOTSET")
    return ConvGeometry(
        kernel=kernel,
        strides=tuple(node_attr(node, "strides", [1] * spatial)),
        pads=tuple(node_attr(node, "pads", [0] * 2 * spatial)),
        dilations=tuple(node_attr(node, "dilations", [1] * spatial)),
        group=int(node_attr(node, "group", 1)),
        auto_pad=auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad),
    )


def _site(node: ir.Node, index: int, t: ir.Value) -> WeightSite | str:
    """A WeightSite for input `index` of `node`, or the reason it is not one."""
    shape = tuple(int(d) for d in t.const_value.shape)
    op = node.op_type
    data = node.inputs[0].name if node.inputs and node.inputs[0] is not None else None
    node_name = node.name or ""
    if op == "Conv" and index == 1:
        if len(shape) not in (3, 4):
            return f"{len(shape) - 2}-D convolution is not supported"
        geo = conv_geometry(node, shape)
        c_in = shape[1] * geo.group
        kind = (
            "conv"
            if geo.group == 1
            else ("depthwise" if shape[1] == 1 and geo.group == shape[0] == c_in else "grouped-conv")
        )
        return WeightSite(t.name, node_name, op, kind, shape, False, data, geo)
    if op == "ConvTranspose" and index == 1:
        return WeightSite(t.name, node_name, op, "conv-transpose", shape, False, None, conv_geometry(node, shape))
    if op == "Gemm" and index == 1:
        if len(shape) != 2:
            return "Gemm weight is not 2-D"
        trans_b = bool(node_attr(node, "transB", 0))
        return WeightSite(
            t.name, node_name, op, "gemm", shape, not trans_b, data, trans_a=bool(node_attr(node, "transA", 0))
        )
    if op == "MatMul" and index == 1:
        if len(shape) != 2:
            return f"MatMul weight has rank {len(shape)}; only 2-D weights are handled"
        return WeightSite(t.name, node_name, op, "matmul", shape, True, data)
    if op == "Gather" and index == 0:
        if len(shape) != 2 or int(node_attr(node, "axis", 0)) != 0:
            return "only 2-D embedding tables gathered on axis 0 are handled"
        return WeightSite(t.name, node_name, op, "gather", shape, False, None)
    if op in ("Gemm", "MatMul") and index == 0:
        return f"{op} has a constant first operand; only the right-hand weight is handled"
    return f"input {index} of {op} is not a weight onnxtq quantizes"


_WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Gather"}


def discover(graph: Graph) -> Discovery:
    """All weight sites in node order, plus every skipped candidate with its reason."""
    found = Discovery()
    seen: set[str] = set()
    for node in graph.graph:
        if node.op_type not in _WEIGHT_OPS or node.domain not in ("", "ai.onnx"):
            continue
        for index, value in enumerate(node.inputs):
            if value is None or not value.name or value.name in seen:
                continue
            name = value.name
            if not value.is_initializer():
                producer = value.producer()
                if producer is not None and producer.op_type == "DequantizeLinear":
                    seen.add(name)
                    found.skipped.append((name, node.name or "", "already quantized (fed by DequantizeLinear)"))
                continue
            if node.op_type in ("Conv", "ConvTranspose", "Gemm") and index == 2:
                continue  # biases stay in float: tiny, and they set the output offset
            if node.op_type == "Gather" and index == 1:
                continue
            seen.add(name)
            site = _why_not(graph, value) or _site(node, index, value)
            if isinstance(site, WeightSite):
                found.sites.append(site)
            else:
                found.skipped.append((name, node.name or "", site))
    return found


def quantizable(found: Discovery, min_elements: int, report: PassReport) -> list[WeightSite]:
    """The sites a quantizing pass rewrites; every other candidate is recorded as skipped, with why."""
    for name, node, reason in found.skipped:
        report.records.append(WeightRecord(name, node, "", "skipped", reason=reason))
    sites = []
    for site in found.sites:
        size = int(np.prod(site.shape))
        if size < min_elements:
            reason = f"kept in float: {size} elements < min_elements={min_elements}"
            report.records.append(WeightRecord.of(site, "skipped", reason=reason))
        else:
            sites.append(site)
    return sites


def _why_not(graph: Graph, value: ir.Value) -> str | None:
    users = len(value.uses())
    if users > 1:
        return f"shared by {users} consumers"
    if value.is_graph_input():
        return "also a graph input, so it can be overridden at run time"
    if value.is_graph_output():
        return "also a graph output"
    dtype = int(value.const_value.dtype)
    if dtype not in _FLOATS:
        return f"not a float tensor ({onnx.TensorProto.DataType.Name(dtype)})"
    return nonfinite_reason(graph.array(value.name))


#: Ops whose float constant inputs onnxtq computes with: weights, biases, BatchNormalization parameters.
_COMPUTED_FROM = _WEIGHT_OPS | {"BatchNormalization"}


def nonfinite_weights(graph: Graph) -> list[str]:
    """'name: reason' for every float constant onnxtq would compute with that holds NaN/Inf."""
    names = {
        value.name
        for node in graph.graph
        if node.op_type in _COMPUTED_FROM and node.domain in ("", "ai.onnx")
        for value in node.inputs
        if value is not None and value.is_initializer() and int(value.const_value.dtype) in _FLOATS
    }
    found = ((name, nonfinite_reason(graph.array(name))) for name in sorted(names))
    return [f"'{name}' {why.removesuffix(': left as it is')}" for name, why in found if why]
