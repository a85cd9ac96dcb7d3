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
| LSTM/GRU/RNN W      | [dirs, gates·h, d]   | reshape(dirs·gates·h, d) | X: x_t             |
| LSTM/GRU/RNN R      | [dirs, gates·h, h]   | reshape(dirs·gates·h, h), one group per direction | Y: h_{t−1} |

Recurrent weights are coded as the 2-D view (one step per gate, unit and direction) and reshaped back to
the op's layout in the graph (`WeightSite.file_shape`). A weight reaches its op either directly or, as
exported LSTM cells do, through ops that cut and stack it along its rows (Slice, Concat, Unsqueeze,
Squeeze, Identity): the initializer is the site and those ops stay. One initializer read by several weight
ops (tied weights, the same weights in two If branches) is one site, coded once; its statistics pool the
inputs of every reader. Weights inside If/Loop/Scan bodies are found once `graph.hoist_body_weights` has
moved them to the top level, where the body reads them from the outer scope.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_ir as ir

from onnxtq.finite import nonfinite_reason
from onnxtq.graph import FLOAT_TYPES, Graph, node_attr, node_bodies
from onnxtq.report import PassReport, WeightRecord

#: Recurrent ops and their gates, in the order ONNX stacks them in W and R.
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


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
class Recurrence:
    """Which product of a recurrent op a weight is, and how the op lays out its sequences."""

    role: str  # W: multiplies x_t (the op's X); R: multiplies h_{t-1} (the states the op writes as Y)
    directions: int
    layout: int  # 0: [seq, batch, ...]; 1: [batch, seq, ...]
    reverse: bool = False  # one direction, run from the last step to the first


@dataclass(frozen=True)
class WeightSite:
    """One quantizable weight initializer and how its consumer uses it."""

    name: str
    node: str
    op: str
    kind: str  # conv, depthwise, grouped-conv, conv-transpose, gemm, matmul, gather, lstm-W, lstm-R, gru-W, ...
    shape: tuple[int, ...]  # the layout codecs see (recurrent weights: the 2-D view)
    transposed: bool  # stored as [d, n] (MatMul / Gemm transB=0)
    activation: str | None  # tensor whose rows are x, or None when no stats apply
    conv: ConvGeometry | None = None
    trans_a: bool = False
    recurrence: Recurrence | None = None
    file_shape: tuple[int, ...] | None = None  # the initializer's shape, where it differs from `shape`
    also: tuple[str, ...] = ()  # more readers' inputs (tied weights): their rows join the statistics
    initial: tuple[str, ...] = ()  # R: the initial states h_0 its readers are given (rows of the statistics too)
    readers: int = 1  # weight ops that read it
    scope: str = ""  # the If/Loop/Scan body its first reader sits in ("" : the main graph)

    @property
    def groups(self) -> int:
        if self.conv:
            return self.conv.group
        return self.recurrence.directions if self.recurrence and self.recurrence.role == "R" else 1

    @property
    def rows(self) -> int:
        return self.shape[1] if self.transposed else self.shape[0]

    @property
    def cols(self) -> int:
        return int(np.prod(self.shape)) // self.rows

    @property
    def rewires_reader(self) -> bool:
        """Whether a codec may change the op that reads this weight (tq's factored form), not only the tensor."""
        return self.readers == 1 and self.op in ("Conv", "Gemm", "MatMul") and not self.scope

    @property
    def activations(self) -> tuple[str, ...]:
        return () if self.activation is None else (self.activation, *self.also, *self.initial)

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


def hidden_name(node_name: str, r_input: str) -> str:
    """The name calibration gives the Y output (every hidden state) of a recurrent op that leaves it unnamed."""
    return f"{node_name or r_input}/onnxtq.hidden"


def _site(node: ir.Node, index: int, t: ir.Value, shape: tuple[int, ...]) -> WeightSite | str:
    """A WeightSite for input `index` of `node` reading a weight of `shape`, or the reason it is not one."""
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
    if op in RECURRENT_GATES and index in (1, 2):
        return _recurrent_site(node, index, t, shape)
    if op in ("Gemm", "MatMul") and index == 0:
        return f"{op} has a constant first operand; only the right-hand weight is handled"
    return f"input {index} of {op} is not a weight onnxtq quantizes"


def _recurrent_site(node: ir.Node, index: int, t: ir.Value, shape: tuple[int, ...]) -> WeightSite | str:
    direction = node_attr(node, "direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else str(direction)
    directions = 2 if direction == "bidirectional" else 1
    if len(shape) < 2:
        return f"{node.op_type} weight of rank {len(shape)}"
    role = "W" if index == 1 else "R"
    recurrence = Recurrence(role, directions, int(node_attr(node, "layout", 0)), direction == "reverse")
    initial = ()
    if role == "W":
        activation = node.inputs[0].name if node.inputs[0] is not None else None
    else:
        y = node.outputs[0] if node.outputs else None
        activation = y.name if y is not None and y.name else hidden_name(node.name, node.inputs[2].name)
        h0 = node.inputs[5] if len(node.inputs) > 5 else None
        initial = (h0.name,) if h0 is not None and h0.name else ()
    view = (int(np.prod(shape[:-1])), shape[-1])
    kind = f"{node.op_type.lower()}-{role}"
    return WeightSite(
        t.name,
        node.name or "",
        node.op_type,
        kind,
        view,
        False,
        activation,
        recurrence=recurrence,
        initial=initial,
        file_shape=shape if view != shape else None,
    )


#: The weight input of each op onnxtq quantizes (biases, indices and states stay as they are).
_WEIGHT_INPUTS = {
    "Conv": (1,),
    "ConvTranspose": (1,),
    "Gemm": (0, 1),
    "MatMul": (0, 1),
    "Gather": (0,),
    "LSTM": (1, 2),
    "GRU": (1, 2),
    "RNN": (1, 2),
}
#: Ops that cut or stack a weight along its rows on its way to a recurrent op (exported LSTM cells).
_ROW_OPS = {"Identity", "Slice", "Concat", "Unsqueeze", "Squeeze"}


def _walk(graph: ir.Graph, scope: str = "", looped: bool = False):
    """(node, scope, inside a Loop/Scan body) for every node, the nodes of its bodies right after it."""
    for node in graph:
        yield node, scope, looped
        for attr, body in node_bodies(node):
            inner = looped or node.op_type in ("Loop", "Scan")
            yield from _walk(body, f"{scope}{node.name or node.op_type}/{attr}/", inner)


def _constant_axes(node: ir.Node, index: int, attr: str) -> list[int] | None:
    """The axes an op is given as a constant input (an initializer or a Constant node) or attribute."""
    value = node.inputs[index] if len(node.inputs) > index else None
    if value is None:
        return node_attr(node, attr, None)
    const = value.const_value
    producer = value.producer()
    if const is None and producer is not None and producer.op_type == "Constant":
        given = producer.attributes.get("value") or producer.attributes.get("value_ints")
        const = None if given is None else given.value
    if const is None:
        return None
    return [int(a) for a in np.asarray(const.numpy() if hasattr(const, "numpy") else const).reshape(-1)]


def _keeps_last_axis(node: ir.Node, rank: int) -> int | None:
    """The rank of `node`'s output if it cuts or stacks its input without touching the last axis, else None."""
    op = node.op_type
    if op == "Identity":
        return rank
    if op == "Concat":
        axis = int(node_attr(node, "axis", 0))
        return rank if axis % rank != rank - 1 else None
    if op == "Slice":
        axes = _constant_axes(node, 3, "axes")
        return rank if axes is not None and all(a % rank != rank - 1 for a in axes) else None
    axes = _constant_axes(node, 1, "axes")
    if axes is None:
        return None
    out = rank + len(axes) if op == "Unsqueeze" else rank - len(axes)
    normal = [a % (out if op == "Unsqueeze" else rank) for a in axes]
    last = out - 1 if op == "Unsqueeze" else rank - 1
    return out if all(a < last for a in normal) else None


def _readers(value: ir.Value, rank: int) -> tuple[dict[tuple[int, int], tuple[ir.Node, int]], bool, str]:
    """The ops the weight finally reaches, through row-cutting ops: ({(node, input)}, passed a row op, why not)."""
    found: dict = {}
    via = False
    for use in value.uses():
        node, index = use.node, use.idx
        if node.op_type in _ROW_OPS and node.domain in ("", "ai.onnx") and (index == 0 or node.op_type == "Concat"):
            out_rank = _keeps_last_axis(node, rank)
            if out_rank is None:
                return {}, True, f"read by {node.op_type} '{node.name}', which cuts along its last axis"
            more, _, why = _readers(node.outputs[0], out_rank)
            if why:
                return {}, True, why
            found.update(more)
            via = True
        else:
            found[(id(node), index)] = (node, index)
    return found, via, ""


def _is_weight_input(node: ir.Node, index: int) -> bool:
    return node.domain in ("", "ai.onnx") and index in _WEIGHT_INPUTS.get(node.op_type, ())


def discover(graph: Graph) -> Discovery:
    """All weight sites in node order, plus every skipped candidate with its reason."""
    found = Discovery()
    seen: set[str] = set()
    for node, scope, looped in _walk(graph.graph):
        row_op = node.op_type in _ROW_OPS
        if not (row_op or node.op_type in _WEIGHT_INPUTS) or node.domain not in ("", "ai.onnx"):
            continue
        for index, value in enumerate(node.inputs):
            if value is None or not value.name or value.name in seen:
                continue
            name = value.name
            if not value.is_initializer():
                producer = value.producer()
                if not row_op and producer is not None and producer.op_type == "DequantizeLinear":
                    seen.add(name)
                    found.skipped.append((name, node.name or "", "already quantized (fed by DequantizeLinear)"))
                continue
            if row_op:
                if (index and node.op_type != "Concat") or int(value.const_value.dtype) not in FLOAT_TYPES:
                    continue  # a Slice's starts, a shape: not weights
            elif index not in _WEIGHT_INPUTS[node.op_type]:
                continue  # biases stay in float: tiny, and they set the output offset; indices and states
            site = _why_not(graph, value) or _reached(value, scope)
            if site == "":
                continue  # a float constant on its way to something other than a weight input
            seen.add(name)
            if isinstance(site, str):
                found.skipped.append((name, node.name or "", site))
                continue
            if looped:  # its inputs are not exposed per iteration (yet)
                site = replace(site, activation=None, also=(), initial=())
            found.sites.append(site)
    return found


def _reached(value: ir.Value, scope: str) -> WeightSite | str:
    """The site of initializer `value` from every op it reaches, or why it is none ('': it is no weight at all)."""
    shape = tuple(int(d) for d in value.const_value.shape)
    readers, via, why = _readers(value, len(shape))
    if why:
        return why
    readers = list(readers.values())
    weights = [(n, i) for n, i in readers if _is_weight_input(n, i)]
    if not weights:
        return ""  # seen first at a weight input, it reaches one; so it went through row ops to none
    if len(weights) < len(readers):
        others = sorted({n.op_type for n, i in readers if not _is_weight_input(n, i)})
        nodes = len({id(n) for n, _ in readers})
        return f"shared by {nodes} consumers ({', '.join(others)}: not a weight input)"
    sites = []
    for node, index in readers:
        site = _site(node, index, value, shape)
        if isinstance(site, str):
            return site
        if via and site.recurrence is None:
            return f"reaches {site.op} through {', '.join(sorted(_ROW_OPS))}: only recurrent weights are followed"
        sites.append(site)
    first = next((s for s in sites if s.activation is not None), sites[0])
    if via and first.recurrence.role == "R" and first.recurrence.directions > 1:
        first = replace(first, activation=None)  # the rows' directions are not known after the cut
    if any((s.shape, s.transposed) != (first.shape, first.transposed) for s in sites):
        return f"shared by {len(sites)} consumers that read it in different layouts"
    pooled = [s for s in sites if s is not first and _same_rows(s, first)]
    also = tuple(dict.fromkeys(s.activation for s in pooled if s.activation != first.activation))
    initial = tuple(dict.fromkeys(h0 for s in [first, *pooled] for h0 in s.initial))
    return replace(first, also=also, initial=initial, readers=len(sites), scope=scope)


def _same_rows(a: WeightSite, b: WeightSite) -> bool:
    """Whether two readers' inputs are patches of one kind, so their statistics can be pooled."""
    return a.activation is not None and (a.conv, a.trans_a, a.recurrence) == (b.conv, b.trans_a, b.recurrence)


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
    if value.is_graph_input():
        return "also a graph input, so it can be overridden at run time"
    if value.is_graph_output():
        return "also a graph output"
    dtype = int(value.const_value.dtype)
    if dtype not in FLOAT_TYPES:
        return f"not a float tensor ({onnx.TensorProto.DataType.Name(dtype)})"
    return nonfinite_reason(graph.array(value.name))


#: Ops whose float constant inputs onnxtq computes with: weights, biases, BatchNormalization parameters.
_COMPUTED_FROM = set(_WEIGHT_INPUTS) | {"BatchNormalization"}


def nonfinite_weights(graph: Graph) -> list[str]:
    """'name: reason' for every float constant onnxtq would compute with that holds NaN/Inf."""
    names = {
        value.name
        for node, _, _ in _walk(graph.graph)
        if node.op_type in _COMPUTED_FROM and node.domain in ("", "ai.onnx")
        for value in node.inputs
        if value is not None and value.is_initializer() and int(value.const_value.dtype) in FLOAT_TYPES
    }
    found = ((name, nonfinite_reason(graph.array(name))) for name in sorted(names))
    return [f"'{name}' {why.removesuffix(': left as it is')}" for name, why in found if why]
