"""The model being rewritten, held in onnx-ir, and the protobuf helpers at its edges.

Passes edit an `ir.Model` (the ONNX project's IR, as onnxruntime's own MatMulNBits quantizer and
Olive do): nodes and values know their producers and uses, so an edit needs no index to refresh.
It keeps packed INT4/INT2 tensors as they are and node `metadata_props` (where provenance lives),
and a tensor read from the file is written back byte for byte. `Graph.proto()` gives the ModelProto
that onnxruntime, the checker and the file get: without the value_info onnx-ir would add for
initializers (the file would grow) and with the default-domain opset entry spelled as it was read.

ORT sessions, calibration and the opset converter work on protobufs: `proto()` on the way out,
`Graph(proto)` on the way in.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnx import version_converter

from onnxtq.errors import PreconditionError

PROVENANCE_PASS = "onnxtq.pass"
PROVENANCE_ROLE = "onnxtq.role"

#: The folder the run's external-data references resolve against (the input model's); None: no run.
_DATA_FOLDER: ContextVar[Path | None] = ContextVar("onnxtq_data_folder", default=None)


@contextlib.contextmanager
def external_data_from(folder: str | os.PathLike) -> Iterator[None]:
    """Within the block, tensors a model keeps in external data are read from `folder`: how a run holds an
    input model's weights on disk (memory-mapped when read) instead of in memory."""
    token = _DATA_FOLDER.set(Path(folder))
    try:
        yield
    finally:
        _DATA_FOLDER.reset(token)


def steps_within(folder: str | os.PathLike | None, steps: Iterator) -> Iterator:
    """`steps`, each step run within `external_data_from(folder)` (None: the caller's folder): how two lazily
    read models whose external data lie in different folders run side by side."""
    if folder is None:
        yield from steps
        return
    while True:
        with external_data_from(folder):
            try:
                item = next(steps)
            except StopIteration:
                return
        yield item


def data_folder() -> Path | None:
    """The folder external-data references resolve against in this run (`external_data_from`), or None."""
    return _DATA_FOLDER.get()


#: New tensors at least this large go to the run's scratch file, when it has one (`scratch_space`).
SCRATCH_BYTES = 2**20


class Scratch:
    """A run's temporary file for the large tensors it makes (codes, refitted weights), for a model too large
    to hold them all in memory: each is appended once and the graph holds it as an external tensor, as it holds
    the input's weights still on disk. Its location is the temporary folder's own (random) name, so it is
    never one of the input's."""

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="onnxtq-run-")
        self.folder = Path(self._folder.name)
        self.location = f"{self.folder.name}.bin"
        self.path = self.folder / self.location
        self._file = open(self.path, "wb")

    def put(self, tensor: onnx.TensorProto) -> ir.ExternalTensor:
        """`tensor` (with raw data) appended to the file, as the external tensor that reads it back."""
        offset, raw = self._file.tell(), tensor.raw_data
        self._file.write(raw)
        self._file.flush()  # readers (onnx-ir, onnxruntime, the writer) open the file themselves
        shape = ir.Shape(list(tensor.dims))
        return ir.ExternalTensor(
            self.location,
            offset,
            len(raw),
            ir.DataType(tensor.data_type),
            shape=shape,
            name=tensor.name,
            base_dir=self.folder,
        )

    def close(self) -> None:
        self._file.close()
        self._folder.cleanup()


_SCRATCH: ContextVar[Scratch | None] = ContextVar("onnxtq_scratch", default=None)


@contextlib.contextmanager
def scratch_space(enabled: bool = True) -> Iterator[Scratch | None]:
    """Within the block (if `enabled`), the large tensors a run makes wait in a temporary file (`Scratch`),
    removed after the block."""
    space = Scratch() if enabled else None
    token = _SCRATCH.set(space)
    try:
        yield space
    finally:
        _SCRATCH.reset(token)
        if space is not None:
            space.close()


def scratch() -> Scratch | None:
    """This run's scratch file (`scratch_space`), or None."""
    return _SCRATCH.get()


def _place_external(graph: ir.Graph) -> None:
    """Point the external tensors of a graph made from a protobuf at their files: the run's scratch file, or
    the input's folder."""
    own = scratch()
    if data_folder() is not None:
        ir.external_data.set_base_dir(graph, data_folder())
    if own is not None:
        for value in graph.initializers.values():
            tensor = value.const_value
            if isinstance(tensor, ir.ExternalTensor) and tensor.location == own.location:
                tensor.base_dir = own.folder


class Graph:
    """A model in onnx-ir with what rewrites need: initializers by name, uses, fresh names, dead-code removal.

    Made from a ModelProto it takes the proto over: its tensors are read in place, not copied, and renames
    reach them (give it a copy, as `compress.prepare` does, to keep the original).
    """

    def __init__(self, model: onnx.ModelProto | ir.Model):
        if isinstance(model, onnx.ModelProto):
            defaults = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
            self._spell_default_domain = any(o.HasField("domain") for o in defaults) or not defaults
            self._value_info = {vi.name for vi in model.graph.value_info}
            model = ir.serde.deserialize_model(model)
            _place_external(model.graph)
        else:
            self._spell_default_domain, self._value_info = True, set()
        self.model = model
        # float weights replaced during this run, by the name of the DequantizeLinear output now standing for them
        self.originals: dict[str, tuple] = {}
        g = model.graph
        self._names = {n.name for n in g if n.name} | set(g.initializers) | {v.name for v in g.inputs}
        self._names |= {v.name for n in g for v in n.outputs}

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    @property
    def initializers(self) -> dict[str, ir.Value]:
        return self.graph.initializers

    def array(self, name: str) -> np.ndarray:
        """The initializer's values; one still in the input's external data is read from its file and the
        file unmapped at once, so a weight stays in memory only while a caller holds it."""
        tensor = self.initializers[name].const_value
        if isinstance(tensor, ir.ExternalTensor):
            values = np.array(tensor.numpy())
            with contextlib.suppress(BufferError):  # another caller's view keeps the map until it goes
                tensor.release()
            return values
        return tensor.numpy()

    def nbytes(self, name: str) -> int:
        """Bytes the initializer stores (sub-byte types packed)."""
        return int(self.initializers[name].const_value.nbytes)

    def set_initializer(self, tensor: onnx.TensorProto) -> ir.Value:
        """Add or replace (in place, keeping its position) an initializer by name; a large one goes to the run's
        scratch file when it has one."""
        own = scratch()
        if own is not None and tensor.HasField("raw_data") and tensor.ByteSize() >= SCRATCH_BYTES:
            stored = own.put(tensor)
        else:
            stored = ir.serde.deserialize_tensor(tensor)
        value = self.initializers.get(tensor.name)
        if value is None:
            value = ir.Value(name=tensor.name, const_value=stored)
            self.graph.register_initializer(value)
        else:
            value.const_value = stored
        value.shape, value.dtype = stored.shape, stored.dtype
        self._names.add(tensor.name)
        return value

    def unique(self, base: str) -> str:
        """A fresh tensor/node name derived from `base` (deterministic)."""
        name, k = base, 1
        while name in self._names:
            name = f"{base}_{k}"
            k += 1
        self._names.add(name)
        return name

    def node(self, op: str, inputs, outputs: list[str], name: str = "", **attrs) -> ir.Node:
        """A default-domain node (not yet in the graph) reading `inputs` (Values; None for an absent optional
        one) and writing new values named `outputs`; attributes in name order, as onnx.helper writes them."""
        attributes = [_attr(key, value) for key, value in sorted(attrs.items())]
        values = [ir.Value(name=out) for out in outputs]
        return ir.Node("", op, inputs, attributes, outputs=values, name=name)  # "": unnamed, as written

    def owner(self, node: ir.Node) -> ir.Node:
        """The main-graph node that is `node` or holds it in one of its If/Loop/Scan bodies."""
        if node.graph is self.graph:
            return node
        for top in self.graph:
            if any(node in body.all_nodes() for _, body in node_bodies(top)):
                return top
        raise ValueError(f"node '{node.name}' is not in this model")

    def first_reader(self, value: ir.Value) -> ir.Node:
        """The earliest main-graph node that reads `value`, itself or inside its bodies (new nodes go before it)."""
        return min((self.owner(use.node) for use in value.uses()), key=self.graph.index)

    def opset(self) -> int:
        return self.model.opset_imports.get("", self.model.opset_imports.get("ai.onnx", 1))

    def remove_dead(self) -> None:
        """Drop nodes whose outputs nobody reads and initializers nobody uses (and their graph inputs)."""
        g = self.graph
        while True:
            dead = [n for n in g if not any(v.uses() or v.is_graph_output() for v in n.outputs)]
            if not dead:
                break
            g.remove(dead, safe=True)
        unused = [v for v in g.initializers.values() if not v.uses() and not v.is_graph_output()]
        for v in unused:
            g.initializers.pop(v.name)
            if v in g.inputs:
                g.inputs.remove(v)

    def proto(self) -> onnx.ModelProto:
        """The model as the file, onnxruntime and the checker see it."""
        proto = ir.serde.serialize_model(self.model)
        kept = [vi for vi in proto.graph.value_info if vi.name in self._value_info]
        del proto.graph.value_info[:]
        proto.graph.value_info.extend(kept)
        if not self._spell_default_domain:
            for entry in proto.opset_import:
                if entry.domain == "":
                    entry.ClearField("domain")
        return proto


def _attr(name: str, value) -> ir.Attr:
    if isinstance(value, bool) or isinstance(value, (int, np.integer)):
        return ir.AttrInt64(name, int(value))
    if isinstance(value, float):
        return ir.AttrFloat32(name, value)
    if isinstance(value, str):
        return ir.AttrString(name, value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in value):
        return ir.AttrInt64s(name, [int(v) for v in value])
    raise TypeError(f"attribute {name}={value!r} is not one onnxtq writes")


def node_bodies(node: ir.Node) -> list[tuple[str, ir.Graph]]:
    """The If/Loop/Scan bodies a node holds, with the attribute that holds each (then_branch, body, ...)."""
    bodies = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            bodies.append((attr.name, attr.value))
        elif attr.type == ir.AttributeType.GRAPHS:
            bodies.extend((attr.name, g) for g in attr.value)
    return bodies


def prepend(graph: Graph, nodes: list[ir.Node]) -> None:
    """Put `nodes` first in the graph, in their order."""
    if len(graph.graph):
        graph.graph.insert_before(graph.graph.node(0), nodes)
    else:
        graph.graph.extend(nodes)


def tag(node: ir.Node, pass_name: str, role: str) -> ir.Node:
    """Stamp provenance on a node we create, so later passes and people can tell who made it."""
    node.metadata_props[PROVENANCE_PASS] = pass_name
    node.metadata_props[PROVENANCE_ROLE] = role
    return node


def provenance(node: onnx.NodeProto | ir.Node) -> dict[str, str]:
    props = node.metadata_props
    pairs = props.items() if isinstance(props, dict) else ((p.key, p.value) for p in props)
    return {k: v for k, v in pairs if k.startswith("onnxtq.")}


def node_attr(node: ir.Node, name: str, default):
    """An attribute's value (ints and floats as Python numbers, lists as lists), or `default`."""
    attr = node.attributes.get(name)
    if attr is None:
        return default
    value = attr.value
    return list(value) if isinstance(value, tuple) else value


#: The float element types (weights are tensors of these).
FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}


def proto_bodies(node: onnx.NodeProto):
    """The If/Loop/Scan bodies of a protobuf node."""
    for attr in node.attribute:
        yield from [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs


def _subgraph_inputs(g: onnx.GraphProto) -> set[str]:
    """Names read from the outer scope by If/Loop/Scan bodies (they count as uses)."""
    names: set[str] = set()
    for node in g.node:
        names |= outer_reads(node)
    return names


def outer_reads(node: onnx.NodeProto) -> set[str]:
    """Names the If/Loop/Scan bodies of `node` read from the scope around it (its inputs aside)."""
    names: set[str] = set()
    for sg in proto_bodies(node):
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
        return n + sum(count(sg, True) for node in g.node for sg in proto_bodies(node))

    return count(model.graph, False)


def copy_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """A deep copy (passes and runs that must leave the given model as it is)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


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


def _all_names(g: onnx.GraphProto) -> set[str]:
    names = {t.name for t in g.initializer} | {v.name for v in g.input} | {n.name for n in g.node}
    for node in g.node:
        names.update(node.output)
        for body in proto_bodies(node):
            names |= _all_names(body)
    return names


def _rename(g: onnx.GraphProto, old: str, new: str) -> None:
    """Every read of `old` in `g` and the bodies inside it now reads `new`."""
    for node in g.node:
        node.input[:] = [new if name == old else name for name in node.input]
        for body in proto_bodies(node):
            _rename(body, old, new)
    for out in g.output:
        if out.name == old:
            out.name = new


def _is_weight(t: onnx.TensorProto) -> bool:
    return t.data_type in FLOAT_TYPES and len(t.dims) >= 2


def hoist_body_weights(model: onnx.ModelProto) -> int:
    """Move the weights of If/Loop/Scan bodies (float tensors of rank ≥ 2, held as body initializers or
    Constant nodes) to the main graph's initializers, where the bodies read them from the outer scope as
    ONNX allows: every pass then finds them as it finds any weight, and their codes are decoded once, outside
    any loop. Returns how many moved."""
    top = model.graph
    taken = {t.name for t in top.initializer} | {v.name for v in top.input} | {o for n in top.node for o in n.output}
    every = _all_names(top)
    moved = 0

    def lift(t: onnx.TensorProto, body: onnx.GraphProto) -> None:
        nonlocal moved
        name = t.name
        if name in taken:
            base, k = name, 1
            while f"{base}_{k}" in every:
                k += 1
            name = f"{base}_{k}"
            every.add(name)
            _rename(body, t.name, name)
        lifted = onnx.TensorProto()
        lifted.CopyFrom(t)
        lifted.name = name
        top.initializer.append(lifted)
        taken.add(name)
        moved += 1

    def visit(g: onnx.GraphProto, inside: bool) -> None:
        for node in g.node:
            for body in proto_bodies(node):
                visit(body, True)
        if not inside:
            return
        keep = []
        for t in list(g.initializer):
            if _is_weight(t):
                lift(t, g)
            else:
                keep.append(t)
        del g.initializer[:]
        g.initializer.extend(keep)
        nodes = []
        for node in g.node:
            attrs = {a.name: a for a in node.attribute}
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and set(attrs) == {"value"}:
                if _is_weight(attrs["value"].t):
                    t = onnx.TensorProto()
                    t.CopyFrom(attrs["value"].t)
                    t.name = node.output[0]
                    lift(t, g)
                    continue
            nodes.append(node)
        del g.node[:]
        g.node.extend(nodes)

    visit(top, False)
    return moved


def proto_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset a ModelProto declares (1 when it declares none)."""
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)


#: Initializers above this many bytes travel as headers in a light copy (`light_copy`).
LIGHT_BYTES = 4096


def light_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """A copy of `model` whose large initializers keep only their name, type and shape, and their names:
    for tools that copy the whole model (the opset converter), whose answer then gets them back
    (`put_back`). Built field by field, so the weights are never copied (nor read: reading a bytes field of
    a protobuf copies it)."""
    light = onnx.ModelProto()
    copy_fields(light, model, skip={"graph"})
    copy_fields(light.graph, model.graph, skip={"initializer"})
    big = set()
    for t in model.graph.initializer:
        header = light.graph.initializer.add()
        if t.ByteSize() > LIGHT_BYTES:
            header.name, header.data_type = t.name, t.data_type
            header.dims.extend(t.dims)
            big.add(t.name)
        else:
            header.CopyFrom(t)
    return light, big


def copy_fields(target, source, skip: set[str] = frozenset(), only: set[str] | None = None) -> None:
    """Copy the fields `source` has set into `target` (a message of its type): those named in `only` (None:
    all), but those named in `skip`."""
    for f, value in source.ListFields():
        if f.name in skip or (only is not None and f.name not in only):
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(target, f.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # a message
            getattr(target, f.name).CopyFrom(value)
        else:
            setattr(target, f.name, value)


def put_back(target: onnx.ModelProto, source: onnx.ModelProto, names: set[str]) -> None:
    """The initializers `names` of `source` copied whole into `target`'s of the same names."""
    whole = {t.name: t for t in source.graph.initializer if t.name in names}
    for t in target.graph.initializer:
        if t.name in whole:
            t.CopyFrom(whole[t.name])


def upgrade_opset(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """Convert the default-domain opset up to `target` with real op conversion."""
    current = proto_opset(model)
    if current >= target:
        return model
    try:
        light, big = light_copy(model)  # the converter copies the model twice: without its weights
        converted = version_converter.convert_version(light, target)
        put_back(converted, model, big)
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
