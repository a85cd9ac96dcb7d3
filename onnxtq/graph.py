"""In-memory graph helpers over `onnx.ModelProto`: lookups, rewrites, provenance, opsets.

We edit the protobuf directly rather than through onnx-graphsurgeon: graphsurgeon drops
`NodeProto.metadata_props` (where provenance lives) and re-encodes packed INT4/INT2
initializers one byte per element, both of which we need to keep intact.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx
from onnx import numpy_helper, version_converter

from onnxtq.errors import PreconditionError

PROVENANCE_PASS = "onnxtq.pass"
PROVENANCE_ROLE = "onnxtq.role"


class Graph:
    """A model plus the indices rewrites need; call `refresh()` after structural edits."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self._used_names: set[str] = set()
        # float weight tensors replaced during this run, by the DequantizeLinear output that now stands for them
        self.originals: dict[str, tuple] = {}
        self.refresh()

    @property
    def graph(self) -> onnx.GraphProto:
        return self.model.graph

    def refresh(self) -> None:
        g = self.model.graph
        self.initializers = {t.name: t for t in g.initializer}
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
        for node in g.node:
            for out in node.output:
                self.producer[out] = node
            for i, name in enumerate(node.input):
                if name:
                    self.consumers[name].append((node, i))
        for sub in _subgraph_inputs(g):
            self.consumers[sub].append((None, -1))  # type: ignore[arg-type]
        self.graph_inputs = {v.name for v in g.input}
        self.graph_outputs = {v.name for v in g.output}
        self._used_names = {n.name for n in g.node} | set(self.initializers) | set(self.producer) | self.graph_inputs

    def unique(self, base: str) -> str:
        """A fresh tensor/node name derived from `base` (deterministic)."""
        name, k = base, 1
        while name in self._used_names:
            name = f"{base}_{k}"
            k += 1
        self._used_names.add(name)
        return name

    def array(self, name: str) -> np.ndarray:
        return numpy_helper.to_array(self.initializers[name])

    def set_initializer(self, tensor: onnx.TensorProto) -> None:
        """Add or replace an initializer by name."""
        old = self.initializers.get(tensor.name)
        if old is not None:
            old.CopyFrom(tensor)
        else:
            self.graph.initializer.append(tensor)
            self.initializers[tensor.name] = self.graph.initializer[-1]
        self._used_names.add(tensor.name)

    def opset(self) -> int:
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return imp.version
        return 1

    def remove_dead(self) -> None:
        """Drop nodes whose outputs nobody reads and initializers nobody uses."""
        g = self.graph
        while True:
            self.refresh()
            live = [n for n in g.node if any(o in self.consumers or o in self.graph_outputs for o in n.output)]
            if len(live) == len(g.node):
                break
            del g.node[:]
            g.node.extend(live)
        unused = [t for t in g.initializer if t.name not in self.consumers and t.name not in self.graph_outputs]
        for t in unused:
            g.initializer.remove(t)
        names = {t.name for t in unused}
        kept_inputs = [v for v in g.input if v.name not in names]
        if len(kept_inputs) != len(g.input):
            del g.input[:]
            g.input.extend(kept_inputs)
        self.refresh()


def _subgraph_inputs(g: onnx.GraphProto) -> set[str]:
    """Names read from the outer scope by If/Loop/Scan bodies (they count as uses)."""
    names: set[str] = set()
    for node in g.node:
        names |= outer_reads(node)
    return names


def outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names the If/Loop/Scan bodies of `node` read from the scope around it (its inputs aside)."""
    names: set[str] = set()
    for attr in node.attribute:
        subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for sg in subs:
            local = {i.name for i in sg.input} | {t.name for t in sg.initializer}
            for n in sg.node:
                local.update(n.output)
            for n in sg.node:
                names.update(i for i in n.input if i and i not in local)
            names |= _subgraph_inputs(sg)
    return names


def subgraph_tensors(model: onnx.ModelProto) -> int:
    """Initializers and Constant nodes inside If/Loop/Scan bodies, at any depth (weights discovery misses)."""

    def count(g: onnx.GraphProto, inside: bool) -> int:
        n = len(g.initializer) + sum(node.op_type == "Constant" for node in g.node) if inside else 0
        for node in g.node:
            for attr in node.attribute:
                n += sum(
                    count(sg, True) for sg in ([attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs)
                )
        return n

    return count(model.graph, False)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy (passes and runs that must leave the given model as it is)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def tag(node: onnx.NodeProto, pass_name: str, role: str) -> onnx.NodeProto:
    """Stamp provenance on a node we create, so later passes and people can tell who made it."""
    for key, value in ((PROVENANCE_PASS, pass_name), (PROVENANCE_ROLE, role)):
        entry = node.metadata_props.add()
        entry.key, entry.value = key, value
    return node


def provenance(node: onnx.NodeProto) -> dict[str, str]:
    return {p.key: p.value for p in node.metadata_props if p.key.startswith("onnxtq.")}


def constants_to_initializers(model: onnx.ModelProto) -> int:
    """Turn top-level `Constant` nodes holding tensors into initializers (PP-OCR stores weights so).

    Returns how many were converted. Constants of other forms (value_float, ...) stay.
    """
    g = model.graph
    keep, moved = [], 0
    for node in g.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and set(attrs) == {"value"}:
            t = onnx.TensorProto()
            t.CopyFrom(attrs["value"].t)
            t.name = node.output[0]
            g.initializer.append(t)
            moved += 1
        else:
            keep.append(node)
    if moved:
        del g.node[:]
        g.node.extend(keep)
    return moved


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert the default-domain opset up to `target` with real op conversion."""
    current = Graph(model).opset()
    if current >= target:
        return model
    try:
        converted = version_converter.convert_version(model, target)
    except Exception as exc:
        raise PreconditionError(
            f"cannot convert the model from opset {current} to {target}: {exc}",
            "the emission needs this opset (INT4: 21, INT2: 25); convert the model in its framework at a newer opset",
        ) from exc
    needed_ir = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", target)], ignore_unknown=True)
    converted.ir_version = max(converted.ir_version, needed_ir)
    # The converter annotates every tensor with a shape, which runtimes recompute anyway and
    # which costs a few percent of a small compressed file: keep only the annotations we had.
    had = {vi.name for vi in model.graph.value_info}
    kept = [vi for vi in converted.graph.value_info if vi.name in had]
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(kept)
    return converted


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that never fails the pipeline: on error we keep the model as is."""
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        return model


def tensor_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Known shapes (ints or symbolic strings) of every typed value in the model."""
    out: dict[str, list] = {}
    g = model.graph
    for vi in list(g.value_info) + list(g.input) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            out[vi.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    for t in g.initializer:
        out[t.name] = list(t.dims)
    return out
