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

import onnx_ir as ir

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
        g = ctx.graph.graph
        before = ctx.graph.proto().ByteSize()
        keep = {v.name for v in g.inputs} | {v.name for v in g.outputs}
        values: dict[int, str] = {}  # by id: a value renamed once is renamed everywhere it is read
        nodes: dict[str, str] = {}
        value_names, node_names = short_names(keep), short_names(set())

        def rename(value: ir.Value | None) -> None:
            if value is None or not value.name or value.name in keep or id(value) in values:
                return
            values[id(value)] = value.name = next(value_names)

        def node_name(node: ir.Node) -> None:
            if self.config.nodes and node.name:
                if node.name not in nodes:
                    nodes[node.name] = next(node_names)
                node.name = nodes[node.name]

        _rename_graph(g, rename, node_name, top=True)
        after = ctx.graph.proto().ByteSize()
        report.notes.append(f"renamed {len(values)} tensors and {len(nodes)} nodes: {before:,d} B -> {after:,d} B")
        return report


def _rename_graph(graph: ir.Graph, rename, node_name, top: bool) -> None:
    """Apply the renamings to one graph and, recursively, its subgraphs, in the order the file lists them:
    initializers, a body's own inputs and outputs, then each node's name, inputs and outputs."""
    for value in list(graph.initializers.values()):
        rename(value)
    if not top:  # a body's own inputs and outputs are internal names
        for value in [*graph.inputs, *graph.outputs]:
            rename(value)
    for node in graph:
        node_name(node)
        for value in [*node.inputs, *node.outputs]:
            rename(value)
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.GRAPH:
                _rename_graph(attr.value, rename, node_name, top=False)
            elif attr.type == ir.AttributeType.GRAPHS:
                for sub in attr.value:
                    _rename_graph(sub, rename, node_name, top=False)
