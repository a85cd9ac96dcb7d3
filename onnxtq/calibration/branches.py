"""Reading tensors inside the If branch that runs.

onnxruntime answers only main-graph tensors. For a model with If nodes, each batch first computes the
conditions of the main graph's Ifs (a model cut to them), then each If is replaced by the nodes of the
branch it takes; the Ifs that this brings into the main graph are resolved the same way, until none is
left. The flat model that remains computes what the original does on that batch, and the tensors of the
taken branches are its own. Flat models and their sessions are kept per path of choices, so a stream of
inputs that all take one path builds each once.
"""

from __future__ import annotations

import numpy as np
import onnx

from onnxtq import model_io
from onnxtq.graph import copy_model


def has_branches(model: onnx.ModelProto) -> bool:
    return any(node.op_type == "If" for node in model.graph.node)


def inline(model: onnx.ModelProto, choices: dict[int, bool]) -> onnx.ModelProto:
    """`model` with its main-graph If nodes at the given positions replaced by the branch each takes."""
    flat = copy_model(model)
    nodes = []
    for position, node in enumerate(model.graph.node):
        if position not in choices:
            nodes.append(node)
            continue
        wanted = "then_branch" if choices[position] else "else_branch"
        branch = next(a.g for a in node.attribute if a.name == wanted)
        nodes.extend(branch.node)
        flat.graph.initializer.extend(branch.initializer)
        for inner, outer in zip(branch.output, node.output):
            if outer:
                nodes.append(onnx.helper.make_node("Identity", [inner.name], [outer]))
    del flat.graph.node[:]
    flat.graph.node.extend(nodes)
    return flat


class BranchRunner:
    """`run(feed)`: the `names` that the branches taken on `feed` compute (names in branches not taken
    are absent), and every name a node of those branches reads (a weight read there was used)."""

    def __init__(self, model: onnx.ModelProto, names: list[str], threads: int, cut, **session_options):
        self.model, self.names, self.threads, self._cut = model, names, threads, cut
        self.options = session_options
        self._flat: dict[tuple, onnx.ModelProto] = {(): model}
        self._sessions: dict = {}

    def _session(self, key, model: onnx.ModelProto, names: list[str]):
        if key not in self._sessions:
            self._sessions[key] = model_io.session(self._cut(model, names), self.threads, **self.options)
        return self._sessions[key]

    def flat(self, feed: dict[str, np.ndarray]) -> tuple[tuple, onnx.ModelProto]:
        """The path of choices `feed` takes and the flat model of that path."""
        key: tuple = ()
        model = self.model
        while True:
            ifs = {i: n.input[0] for i, n in enumerate(model.graph.node) if n.op_type == "If"}
            if not ifs:
                return key, model
            conds = list(ifs.values())
            values = self._session(("cond", key), model, conds).run(conds, feed)
            choice = tuple(bool(np.asarray(v).reshape(-1)[0]) for v in values)
            key = (*key, choice)
            if key not in self._flat:
                self._flat[key] = inline(model, dict(zip(ifs, choice)))
            model = self._flat[key]

    def run(self, feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], set[str]]:
        key, model = self.flat(feed)
        defined = {o for n in model.graph.node for o in n.output}
        reads = {i for n in model.graph.node for i in n.input}
        present = [n for n in self.names if n in defined]
        if not present:
            return {}, reads
        return dict(zip(present, self._session(("run", key), model, present).run(present, feed))), reads
