"""Run a model too large for one onnxruntime session a piece at a time.

A piece is a run of consecutive nodes (ONNX keeps a graph's nodes in topological order) whose weights fit
`PIECE_BYTES`; each piece is its own onnxruntime session holding only its own weights. Pieces run one after
the other over the whole stream of batches: every batch through the first piece, then every batch through the
second, and so on. Between two pieces the values later pieces read (the residual stream of a transformer, the
graph inputs a later block reads again) wait on disk, batch by batch, in a temporary folder. Memory then holds
one piece's weights and one batch's activations, whatever the size of the model: what calibration, the input
checks and verification need to run a 5 GB model on a machine that could not hold it twice. Only the nodes
the asked-for values need are run (calibration does not compute a language model's logits).

A model whose weights fit one piece runs in one session, as it always did (`needed`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxtq.errors import ModelError
from onnxtq.graph import copy_fields, infer_shapes, light_copy, outer_reads

#: Weight bytes a piece may hold; a model with more runs in pieces.
PIECE_BYTES = 256 * 2**20

Batches = Iterable[tuple[int, dict[str, np.ndarray]]]


def _sizes(model: onnx.ModelProto) -> dict[str, int]:
    from onnxtq.model_io import tensor_nbytes  # model_io opens the sessions pieces run in

    return {t.name: tensor_nbytes(t) for t in model.graph.initializer}


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the model's initializers, as they are stored."""
    return sum(_sizes(model).values())


def needed(model: onnx.ModelProto) -> bool:
    """Whether `model` runs in pieces: its weights do not fit one."""
    return weight_bytes(model) > PIECE_BYTES


def folds(model: onnx.ModelProto) -> bool:
    """Whether a session may decode the model's weights to float32 at load (`fold_dequantize`): decoded, they
    fit a piece. Folded, every decoded weight stays resident (the 353M model's 178 MB of 4-bit codes became
    1.4 GB); unfolded, the session holds the codes and decodes a weight when a run reads it."""
    from onnxtq.model_io import tensor_elements, tensor_nbytes

    decoded = sum(max(tensor_nbytes(t), 4 * tensor_elements(t)) for t in model.graph.initializer)
    return decoded <= PIECE_BYTES


@dataclass(frozen=True)
class Piece:
    """Nodes of the main graph (indices, in order), the weights they read, the values they take from before the
    piece (graph inputs, earlier pieces' results) and the values they compute that later pieces read or the
    run keeps to its end."""

    nodes: tuple[int, ...]
    weights: tuple[str, ...]
    reads: tuple[str, ...]
    keeps: tuple[str, ...]
    computes: frozenset[str]


def _reads(node: onnx.NodeProto) -> set[str]:
    return {name for name in node.input if name} | outer_reads(node)


def _order(g: onnx.GraphProto, weights: set[str]) -> list[int]:
    """The graph's node indices, each node that reads only weights (a DequantizeLinear over codes, a Reshape of
    its output) moved to just before the first node reading what it computes: its weights then go into that
    reader's piece, rather than its float output across pieces."""
    constant, held, order = set(weights), {}, []

    def release(index: int) -> None:
        for out in g.node[index].output:
            held.pop(out, None)
        for name in _reads(g.node[index]):
            if name in held:
                release(held[name])
        order.append(index)

    for index, node in enumerate(g.node):
        reads = _reads(node)
        if reads <= constant:
            constant.update(node.output)
            held.update((out, index) for out in node.output if out)
            continue
        for name in reads:
            if name in held:
                release(held[name])
        order.append(index)
    for index in sorted(set(held.values())):  # read by no other node (a graph output, say): last
        if any(out in held for out in g.node[index].output):
            release(index)
    return order


def plan(model: onnx.ModelProto, roots: set[str], kept: set[str] = frozenset(), budget: int | None = None):
    """The pieces computing `roots` (only the nodes they need), each holding at most `budget` bytes of weights
    (default PIECE_BYTES; a node whose weights alone do not fit is a piece of its own); the values `kept` stay
    on hand to the end."""
    budget = budget or PIECE_BYTES
    g = model.graph
    sizes = _sizes(model)
    wanted, used_nodes = set(roots), []
    for index in reversed(_order(g, set(sizes))):
        if wanted.intersection(g.node[index].output):
            used_nodes.append(index)
            wanted |= _reads(g.node[index])
    groups: list[list[int]] = [[]]
    held, used = set(), 0
    for index in reversed(used_nodes):
        weights = _reads(g.node[index]) & sizes.keys()
        cost = sum(sizes[n] for n in weights - held)
        if groups[-1] and used + cost > budget:
            groups.append([])
            held, used, cost = set(), 0, sum(sizes[n] for n in weights)
        groups[-1].append(index)
        held |= weights
        used += cost
    made, last = {}, dict.fromkeys(kept, len(groups))  # value -> the piece computing it, the last one reading it
    for k, nodes in enumerate(groups):
        for index in nodes:
            for name in _reads(g.node[index]) - sizes.keys():
                last[name] = max(last.get(name, k), k)
            made.update((out, k) for out in g.node[index].output if out)
    pieces = []
    for k, nodes in enumerate(groups):
        reads = {n for i in nodes for n in _reads(g.node[i]) if n not in sizes and made.get(n, -1) < k}
        weights = {n for i in nodes for n in _reads(g.node[i]) if n in sizes}
        computes = frozenset(n for n, p in made.items() if p == k)
        keeps = sorted(n for n in computes if last.get(n, k) > k)
        pieces.append(Piece(tuple(nodes), tuple(sorted(weights)), tuple(sorted(reads)), tuple(keeps), computes))
    return [p for p in pieces if p.nodes]


def piece_model(model: onnx.ModelProto, piece: Piece, types: dict[str, np.dtype], outputs: list[str]):
    """The model of one piece: its nodes and weights (those kept in external data stay there), the values it
    reads as inputs of the given element `types`, and `outputs` as its outputs."""
    part = onnx.ModelProto()
    copy_fields(part, model, skip={"graph"})
    copy_fields(part.graph, model.graph, skip={"node", "initializer", "input", "output", "value_info"})
    part.graph.node.extend(model.graph.node[i] for i in piece.nodes)
    weights = set(piece.weights)
    part.graph.initializer.extend(t for t in model.graph.initializer if t.name in weights)
    for name in piece.reads:
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(types[name]))
        part.graph.input.append(onnx.helper.make_tensor_value_info(name, elem, None))
    part.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in outputs)
    return part


def _inferred_types(model: onnx.ModelProto) -> dict[str, np.dtype]:
    """Element types of the model's values that shape inference (on its headers) can tell."""
    typed = infer_shapes(light_copy(model)[0]).graph
    types = {}
    for vi in [*typed.input, *typed.value_info, *typed.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            types[vi.name] = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    return types


class Boundary:
    """The values waiting between pieces, one .npy file per batch and value, in a temporary folder."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.names: dict[str, int] = {}  # value -> its file stem (names may hold any character)

    def _path(self, batch: int, name: str) -> Path:
        stem = self.names.setdefault(name, len(self.names))
        return self.folder / f"{batch}.{stem}.npy"

    def put(self, batch: int, values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            if not isinstance(value, np.ndarray):
                raise ModelError(
                    f"the value '{name}' crosses between two pieces of the model and is not a tensor",
                    "onnxtq runs a model this large in pieces, which pass tensors only",
                )
            np.save(self._path(batch, name), value, allow_pickle=False)

    def holds(self, batch: int, name: str) -> bool:
        return name in self.names and self._path(batch, name).exists()

    def get(self, batch: int, names: Iterable[str]) -> dict[str, np.ndarray]:
        return {name: np.load(self._path(batch, name), allow_pickle=False) for name in names}

    def drop(self, batches: int, names: Iterable[str]) -> None:
        for name in names:
            for batch in range(batches):
                self._path(batch, name).unlink(missing_ok=True)


class PieceRunner:
    """The `wanted` values of a model (and with `finals` its outputs), computed a piece at a time over a stream
    of batches (the module's docstring)."""

    def __init__(self, model: onnx.ModelProto, wanted: Iterable[str] = (), finals: bool = False, threads: int = 0):
        self.model, self.threads = model, threads
        self.wanted, self.names = set(wanted), [o.name for o in model.graph.output]
        self.kept = set(self.names) if finals else set()
        self.pieces = plan(model, self.wanted | self.kept, self.kept)

    def run(self, batches: Batches) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """(piece, samples, {name: value}) for each piece, and within it each batch in order: the wanted values
        that piece computes (the first piece hands on the wanted graph inputs too); with `finals`, then
        (len(pieces), samples, the graph's outputs) for each batch. A piece's session is gone before the next
        one's is made."""
        from onnxtq.model_io import session

        if not self.pieces:  # nothing to compute: what is wanted is in the feeds
            for n, feed in batches:
                yield 0, n, {name: feed[name] for name in self.wanted & feed.keys()}
            return
        later = {name for p in self.pieces[1:] for name in p.reads} | self.kept  # read after the first piece
        with tempfile.TemporaryDirectory(prefix="onnxtq-pieces-") as folder:
            boundary, counts = Boundary(folder), []
            for k, piece in enumerate(self.pieces):
                outputs = sorted(set(piece.keeps) | (self.wanted & piece.computes))
                stream = batches if k == 0 else ((n, boundary.get(b, piece.reads)) for b, n in enumerate(counts))
                sess = None
                for b, (n, feed) in enumerate(stream):
                    if k == 0:
                        counts.append(n)
                        boundary.put(b, {name: feed[name] for name in later & feed.keys()})
                    inputs = {name: feed[name] for name in piece.reads}
                    if sess is None:
                        types = {name: value.dtype for name, value in inputs.items()}
                        sess = session(piece_model(self.model, piece, types, outputs), self.threads)
                    values = dict(zip(outputs, sess.run(outputs, inputs)))
                    boundary.put(b, {name: values[name] for name in piece.keeps})
                    given = {name: values[name] for name in self.wanted & values.keys()}
                    if k == 0:
                        given.update((name, feed[name]) for name in self.wanted & feed.keys())
                    yield k, n, given
                del sess
                read_later = {name for p in self.pieces[k + 1 :] for name in p.reads} | self.kept
                boundary.drop(len(counts), set(boundary.names) - read_later)
            if self.kept:
                for b, n in enumerate(counts):
                    yield len(self.pieces), n, boundary.get(b, self.names)


def outputs(model: onnx.ModelProto, batches: Batches, threads: int = 0) -> Iterator[list[np.ndarray]]:
    """The graph's outputs of each batch, in order, as one session's `run(None, feed)` gives them."""
    runner = PieceRunner(model, finals=True, threads=threads)
    for k, _, values in runner.run(batches):
        if k == len(runner.pieces):
            yield [values[name] for name in runner.names]


def check_loads(model: onnx.ModelProto) -> None:
    """Make each piece's session in turn, as a run will (a piece reading a value whose type shape inference
    cannot tell is left to the first run to load)."""
    from onnxtq.model_io import session

    types = _inferred_types(model)
    for piece in PieceRunner(model, finals=True).pieces:
        if all(name in types for name in piece.reads):
            session(piece_model(model, piece, types, list(piece.keeps)))
