"""compact-names: give every internal tensor and node a short name, so small files get smaller.

A file spells a tensor's name at its producer, at every reader and on its initializer, and
exporters' names ("p2o.helper.constant.17", "conv2d_450.tmp_0/onnxtq.scale") add up to tens of
kilobytes in a one-megabyte model. Graph inputs and outputs keep their names, since callers
feed and fetch by them; every other value becomes `a`, `b`, ..., `Z`, `a0`, ... and every node
likewise. Lossless, and provenance tags (node metadata) stay; opt-in, because a graph with
short names is harder to read. Subgraph bodies (If/Loop/Scan) are renamed with the same map,
which is safe because ONNX forbids a subgraph from shadowing an outer name.
"""

from __future__ import annotations

import string
from collections.abc import Iterator
from dataclasses import dataclass

import onnx

from onnxtq.pass_infra import Context, Pass, PassConfig, option
from onnxtq.report import PassReport

_FIRST = string.ascii_letters
_REST = string.ascii_letters + string.digits


def short_names(taken: set[str]) -> Iterator[str]:
    """Identifiers in order of length (a, ..., Z, a0, ...), skipping those in `taken`."""
    k = 0
    while True:
        name, rest = _FIRST[k % len(_FIRST)], k // len(_FIRST)
        while rest:
            rest -= 1
            name += _REST[rest % len(_REST)]
            rest //= len(_REST)
        k += 1
        if name not in taken:
            yield name


@dataclass(frozen=True)
class CompactNamesConfig(PassConfig):
    nodes: bool = option(True, "shorten node names too (not only tensor names)")


class CompactNamesPass(Pass):
    name = "compact-names"
    Config = CompactNamesConfig
    needs = frozenset()
    preserves = frozenset()  # statistics and originals are keyed by the names it changes

    def run(self, ctx: Context) -> PassReport:
        report = self.new_report()
        model = ctx.graph.model
        before = model.ByteSize()
        keep = {v.name for v in model.graph.input} | {v.name for v in model.graph.output}
        values: dict[str, str] = {}
        nodes: dict[str, str] = {}
        value_names, node_names = short_names(keep), short_names(set())

        def value(name: str) -> str:
            if not name or name in keep:
                return name
            if name not in values:
                values[name] = next(value_names)
            return values[name]

        def node_name(name: str) -> str:
            if not self.config.nodes:
                return name
            if name not in nodes:
                nodes[name] = next(node_names)
            return nodes[name]

        _rename_graph(model.graph, value, node_name, top=True)
        ctx.graph.refresh()
        report.notes.append(
            f"renamed {len(values)} tensors and {len(nodes)} nodes: {before:,d} B -> {model.ByteSize():,d} B"
        )
        return report


def _rename_graph(graph: onnx.GraphProto, value, node_name, top: bool) -> None:
    """Apply the value and node renamings to one graph and, recursively, its subgraphs."""
    for t in graph.initializer:
        t.name = value(t.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = value(sparse.values.name)
        sparse.indices.name = value(sparse.indices.name)
    for vi in graph.value_info:
        vi.name = value(vi.name)
    if not top:  # a body's own inputs and outputs are internal names
        for vi in list(graph.input) + list(graph.output):
            vi.name = value(vi.name)
    for annotation in graph.quantization_annotation:
        annotation.tensor_name = value(annotation.tensor_name)
    for node in graph.node:
        if node.name:
            node.name = node_name(node.name)
        node.input[:] = [value(n) for n in node.input]
        node.output[:] = [value(n) for n in node.output]
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                _rename_graph(sub, value, node_name, top=False)
