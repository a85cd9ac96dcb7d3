"""A model's outputs with one weight replaced at a time, for a model run in pieces (onnxtq.pieces).

Measuring each layer's own effect on the network output (onnxtq.gains: noise for a gain, a layer's codes for
its marginal error) runs the model once per layer. A model too large for one session runs a piece at a time,
and replacing a weight changes nothing before its own piece. So the reference run keeps on disk what every
piece reads (a transformer's residual stream: a few MB a batch), and a variant runs only from its weight's
piece on. One sweep over the pieces serves every variant: a piece's session is made once, with the weights
its variants replace declared as inputs; it runs the variants that start there and the ones that reached it
from earlier pieces, and is gone before the next piece's. A weight read in several pieces (tied embeddings)
is replaced in each. Memory holds one piece's weights, one replaced weight (and any a later piece reads
again) and a batch's values; a variant's outputs are handed over as its last piece computes them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx

from onnxtq.pieces import Boundary, Piece, piece_model, plan
from onnxtq.progress import bar

#: A variant: the weight it replaces, and what makes the replacement when the weight's piece runs.
Variant = tuple[str, Callable[[], np.ndarray]]


class Variants:
    """The model's outputs on `feeds` (`reference`, batch-major: every output of the first batch, then of the
    next), and `run(variants)`: the same outputs with each variant's weight replaced."""

    def __init__(self, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]], threads: int = 0):
        self.model, self.feeds, self.threads = model, feeds, threads
        self.names = [o.name for o in model.graph.output]
        self.pieces = plan(model, set(self.names), set(self.names))
        self.first_piece: dict[str, int] = {}  # a weight read in several pieces (tied embeddings): the first
        for k, piece in enumerate(self.pieces):
            for name in piece.weights:
                self.first_piece.setdefault(name, k)
        self._folder = tempfile.TemporaryDirectory(prefix="onnxtq-variants-")
        self._stored = Boundary(str(Path(self._folder.name) / "reference"))
        self._stored.folder.mkdir()
        self.reference = list(self._sweep_reference())

    def _sweep_reference(self) -> Iterator[np.ndarray]:
        from onnxtq.model_io import session

        read = {name for piece in self.pieces for name in piece.reads}
        for b, feed in enumerate(self.feeds):
            self._stored.put(b, {name: feed[name] for name in read & feed.keys()})
        for piece in self.pieces:
            sess = None
            for b in range(len(self.feeds)):
                inputs = self._stored.get(b, piece.reads)
                if sess is None:
                    sess = session(self._piece_model(piece, inputs, []), self.threads, fold_dequantize=True)
                self._stored.put(b, dict(zip(piece.keeps, sess.run(list(piece.keeps), inputs))))
            del sess
        for b in range(len(self.feeds)):
            yield from self._stored.get(b, self.names).values()

    def _piece_model(self, piece: Piece, inputs: dict[str, np.ndarray], fed: list[str]) -> onnx.ModelProto:
        """The piece's model, computing its `keeps`, with the weights `fed` declared as inputs (fed at run time
        in place of their stored values)."""
        types = {name: value.dtype for name, value in inputs.items()}
        part = piece_model(self.model, piece, types, list(piece.keeps))
        stored = {t.name: t for t in part.graph.initializer}
        for name in fed:
            t = stored[name]
            part.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
        return part

    def run(self, variants: list[Variant], desc: str = "variants") -> Iterator[tuple[int, list[np.ndarray]]]:
        """(index, outputs as `reference` lays them out) for each variant, as its last piece computes them;
        progress counts a variant's run through one piece (every variant ends in the last piece, so counting
        variants done would show nothing until then)."""
        from onnxtq.model_io import session

        starting: dict[int, list[int]] = {}
        for index, (name, _) in enumerate(variants):
            if name in self.first_piece:
                starting.setdefault(self.first_piece[name], []).append(index)
            else:  # a weight no output needs
                yield index, list(self.reference)
        last = len(self.pieces) - 1
        active: list[int] = []
        runs = sum((last + 1 - k) * len(indices) for k, indices in starting.items())
        with (
            tempfile.TemporaryDirectory(prefix="onnxtq-variants-", dir=self._folder.name) as folder,
            bar(total=runs, desc=desc, unit="piece run") as shown,
        ):
            own: dict[int, Boundary] = {}
            made: dict[int, np.ndarray] = {}  # replacements a later piece reads again (tied weights)
            for k, piece in enumerate(self.pieces):
                new = starting.get(k, [])
                fed = sorted({variants[i][0] for i in active + new} & set(piece.weights))
                sess = None
                for index in active + new:
                    values = own.setdefault(index, Boundary(tempfile.mkdtemp(dir=folder)))
                    name = variants[index][0]
                    replaced = {}
                    if name in piece.weights:
                        replaced[name] = made.pop(index) if index in made else variants[index][1]()
                        if any(name in p.weights for p in self.pieces[k + 1 :]):
                            made[index] = replaced[name]
                    finals: list[np.ndarray] = []
                    for b in range(len(self.feeds)):
                        inputs = {n: self._value(values, b, n) for n in piece.reads}
                        if sess is None:
                            sess = session(self._piece_model(piece, inputs, fed), self.threads, fold_dequantize=True)
                        computed = dict(zip(piece.keeps, sess.run(list(piece.keeps), {**inputs, **replaced})))
                        if k < last:
                            values.put(b, computed)
                        else:
                            finals += [computed[n] if n in computed else self._value(values, b, n) for n in self.names]
                    del replaced
                    shown.update(1)
                    if k == last:
                        values.drop(len(self.feeds), list(values.names))
                        yield index, finals
                active += new
                del sess
                later = {name for p in self.pieces[k + 1 :] for name in p.reads} | set(self.names)
                for values in own.values():
                    values.drop(len(self.feeds), set(values.names) - later)

    def _value(self, values: Boundary, batch: int, name: str) -> np.ndarray:
        """A variant's own value where it computed one (from its weight's piece on), else the reference's."""
        if values.holds(batch, name):
            return values.get(batch, [name])[name]
        return self._stored.get(batch, [name])[name]
