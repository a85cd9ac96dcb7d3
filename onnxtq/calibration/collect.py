"""Run calibration inputs through onnxruntime and stream every target layer's input statistics.

The input tensor of each target layer is exposed as an extra graph output. To keep
memory bounded on large feature maps (PP-OCR det at 736×992), layers are split into
groups whose exposed activations fit `memory_mb` for one batch, and each group is one
pass over the data; each output is reduced to statistics and dropped at once.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from onnxtq import model_io, pieces, positions
from onnxtq.calibration.branches import BranchRunner, has_branches
from onnxtq.calibration.data import Source, check_finite
from onnxtq.calibration.stats import (
    LayerStats,
    MomentAccumulator,
    choose_mode,
    conv_patches,
    dense_rows,
    hidden_rows,
    initial_rows,
)
from onnxtq.errors import DataError
from onnxtq.graph import copy_model, infer_shapes, light_copy, outer_reads, proto_bodies, put_back, tensor_shapes
from onnxtq.progress import bar
from onnxtq.weights import RECURRENT_GATES, WeightSite, hidden_name

#: Tensors exposed at once when probing sizes that shape inference cannot give.
PROBE_TENSORS = 8

#: Input bytes per onnxruntime run; larger samples run in smaller batches (ORT's arena grows with the batch).
INPUT_BATCH_BYTES = 16 * 2**20


def _option(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class CalibrationConfig:
    samples: int = _option(0, "calibration inputs to read (0: every sample the source has)")
    batch: int = _option(8, "inputs per onnxruntime run (fewer for large inputs)")
    mode: str = _option("auto", "H per layer: auto | full | blocked | diag")
    max_full_dim: int = _option(4096, "auto: full H up to this many columns, blocked above")
    block: int = _option(512, "columns per diagonal block of a blocked H")
    memory_mb: int = _option(512, "exposed activations per run, in MB (more layers: more runs)")
    max_positions: int = _option(2048, "conv output positions sampled per input (0: all)")
    seed: int = _option(0, "seed of the position sampling")
    threads: int = _option(0, "onnxruntime intra-op threads (0: all cores)")
    shrink: bool = _option(True, "shrink each H's covariance toward its diagonal by its sampling noise")
    products: str = _option("auto", "x·xᵀ products in float64 | float32 | auto (float32 for a model run in pieces)")


class StatsStore:
    """Read-only statistics by weight name, what they were computed from, and the calibrate options that
    made them (`options`: what a recalibration repeats). With `spill` (a model run in pieces) each layer's
    statistics wait in a temporary folder and are read back whole when asked for, so memory holds the layers
    being worked on, not every layer's d×d moments."""

    def __init__(self, by_site: dict[str, LayerStats | Path], samples: int, description: str, spill: bool = False):
        self.by_site = by_site
        self.samples = samples
        self.description = description
        self.options: dict = {}
        self._folder = tempfile.TemporaryDirectory(prefix="onnxtq-stats-") if spill else None
        self._files = itertools.count()  # file names; next() is atomic, so layers on threads may write at once

    def keep(self, stats: LayerStats) -> LayerStats | Path:
        """What the store holds for `stats`: themselves, or the file they were written to."""
        if self._folder is None:
            return stats
        path = Path(self._folder.name) / f"{next(self._files)}.npz"
        stats.save(path)
        return path

    def keep_array(self, array: np.ndarray) -> np.ndarray | Path:
        """`array` itself, or where this store spills, the file it was written to (read back by `np.load`): what a
        pass derives from a layer's statistics for later (tq's bases) waits on disk beside them."""
        if self._folder is None:
            return array
        path = Path(self._folder.name) / f"{next(self._files)}.npy"
        np.save(path, array)
        return path

    @staticmethod
    def kept(value: np.ndarray | Path) -> np.ndarray:
        """What `keep_array` gave back, as the array."""
        return np.load(value) if isinstance(value, Path) else value

    @property
    def spills(self) -> bool:
        """Whether this store writes statistics to disk (a model run in pieces)."""
        return self._folder is not None

    def spilled(self, site: WeightSite) -> bool:
        """Whether `site`'s statistics wait on disk (read back whole by each `get`)."""
        return isinstance(self.by_site.get(site.name), Path)

    def get(self, site: WeightSite) -> LayerStats | None:
        stats = self.by_site.get(site.name)
        return LayerStats.load(stats) if isinstance(stats, Path) else stats

    def summary(self, site: WeightSite) -> LayerStats | None:
        """`get` for the statistics' mode, sizes and counts: spilled moments are mapped, not read."""
        stats = self.by_site.get(site.name)
        return LayerStats.load(stats, mapped=True) if isinstance(stats, Path) else stats

    def importance(self, site: WeightSite) -> np.ndarray | None:
        stats = self.get(site)
        return None if stats is None else importance(site, stats)


def importance(site: WeightSite, stats: LayerStats) -> np.ndarray:
    """diag(H) broadcast to the stored weight's layout: how much each weight's error costs. With one group of
    statistics every row reads the same values: a read-only view then, not a float64 copy per row (on the 1.3B
    model's output table, 0.4 GB)."""
    h = np.maximum(stats.diag(), 0.0)  # [g, d]
    if stats.groups == 1:
        return site.from_matrix(np.broadcast_to(h, (site.rows, h.shape[1])))
    rows = np.repeat(h, site.rows // stats.groups, axis=0)  # row o belongs to group o // (n/g)
    return site.from_matrix(rows)


def _key(site: WeightSite):
    return (site.activations, site.conv, site.trans_a, site.recurrence, site.scope)


def _accumulator(site: WeightSite, config: CalibrationConfig, big: bool = False) -> MomentAccumulator:
    groups = site.groups
    dim = site.cols
    mode = choose_mode(dim, config.max_full_dim, config.mode)
    products = config.products if config.products != "auto" else "float32" if big else "float64"
    return MomentAccumulator(groups, dim, mode, config.block, products)


def _chunks(
    site: WeightSite,
    name: str,
    x: np.ndarray,
    config: CalibrationConfig,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
):
    """The rows of `site`'s statistics in `x`, the tensor `name` it reads (of a MatMul over tokens, the real
    tokens' only, where the batch's attention `mask` is given: onnxtq.positions)."""
    if name in site.initial:
        return initial_rows(x, site.recurrence)
    if site.conv is not None:
        return conv_patches(x, site.conv, config.max_positions, rng)
    if site.recurrence is not None and site.recurrence.role == "R":
        return hidden_rows(x, site.recurrence)
    if mask is not None and not site.trans_a:
        x = positions.real_rows(x, mask)
    return dense_rows(x, site.trans_a)


def _reader(model: onnx.ModelProto, names: list[str], threads: int, **options):
    """run(feed) -> ({name: array} for `names`, what ran): in a model with If nodes, the tensors the branches
    it takes compute and the names their nodes read; else every name, and None (all of the model ran)."""
    if has_branches(model):
        return BranchRunner(model, names, threads, _with_outputs, **options).run
    sess = model_io.session(_with_outputs(model, names), threads, **options)
    return lambda feed: (dict(zip(names, sess.run(names, feed))) if names else {}, None)


def _read_here(site: WeightSite, ran: set[str] | None) -> bool:
    """Whether the op reading `site` ran on this batch (a weight in an If branch not taken did not)."""
    return ran is None or not site.scope or site.name in ran


def name_hidden_outputs(model: onnx.ModelProto, sites: list[WeightSite]) -> onnx.ModelProto:
    """A copy of `model` whose recurrent ops write the Y output (all hidden states) that R's statistics read,
    under the name discovery gave it, where the model leaves it unnamed."""
    wanted = {a for s in sites if s.recurrence is not None and s.recurrence.role == "R" for a in s.activations}
    if not wanted:
        return model
    model = copy_model(model)

    def visit(g: onnx.GraphProto) -> None:
        for node in g.node:
            for body in proto_bodies(node):
                visit(body)
            if node.op_type in RECURRENT_GATES and (not node.output or not node.output[0]):
                name = hidden_name(node.name, node.input[2])
                if name in wanted:
                    if node.output:
                        node.output[0] = name
                    else:
                        node.output.append(name)

    visit(model.graph)
    return model


def _activation_bytes(
    model: onnx.ModelProto, feed: dict[str, np.ndarray], names: list[str], threads: int
) -> dict[str, int]:
    """Bytes per sample of each named tensor: static shape inference on the concrete input shapes,
    then a one-sample probe run, a few tensors at a time, for those whose shapes stay unknown
    (e.g. behind a Pad whose pads are computed). In a model with If nodes, the branches the first sample
    takes are measured; tensors of the others count as empty."""
    if has_branches(model):
        model = BranchRunner(model, names, threads, _with_outputs).flat(feed)[1]
        defined = {o for n in model.graph.node for o in n.output} | {vi.name for vi in model.graph.input}
        absent = {n: 0 for n in names if n not in defined}
        names = [n for n in names if n in defined]
    else:
        absent = {}
    fixed = light_copy(model)[0]  # shapes need no weights
    for vi in fixed.graph.input:
        if vi.name in feed:
            dims = vi.type.tensor_type.shape.dim
            for d, n in zip(dims, feed[vi.name].shape):
                d.Clear()
                d.dim_value = n
    shapes = tensor_shapes(infer_shapes(fixed))
    sizes = {}
    for name in names:
        shape = shapes.get(name)
        if shape and all(isinstance(s, int) and s > 0 for s in shape):
            sizes[name] = int(np.prod(shape)) * 4
    unknown = [n for n in names if n not in sizes]
    for start in range(0, len(unknown), PROBE_TENSORS):
        probe = unknown[start : start + PROBE_TENSORS]
        values = model_io.session(_with_outputs(model, probe), threads).run(probe, feed)
        sizes.update({n: v.nbytes for n, v in zip(probe, values)})
    return sizes | absent


def _plan(names: list[str], sizes: dict[str, int], budget: int) -> list[list[str]]:
    """Greedy groups of tensors whose summed sizes stay within `budget` (one tensor at least)."""
    groups: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name in names:
        if current and used + sizes[name] > budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += sizes[name]
    if current:
        groups.append(current)
    return groups


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """`model` answering only `names`, cut to the nodes they need (onnxruntime runs every node it holds).
    Built from a light copy: of the weights, only those the kept nodes read are copied."""
    if not names:
        return model
    needed, nodes = set(names), []
    for node in reversed(model.graph.node):
        if needed.intersection(node.output):
            nodes.append(node)
            needed |= set(node.input) | outer_reads(node)
    inputs = {vi.name for vi in model.graph.input}
    cut, big = light_copy(model)
    kept = [t for t in cut.graph.initializer if t.name in needed or t.name in inputs]
    del cut.graph.node[:], cut.graph.output[:], cut.graph.initializer[:]
    cut.graph.node.extend(reversed(nodes))
    cut.graph.initializer.extend(kept)
    put_back(cut, model, big & {t.name for t in kept})
    cut.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    return cut


def _check_finite(activations: dict[str, np.ndarray], first_sample: int) -> None:
    """No statistic is computed from NaN/Inf: a layer input that holds one on finite inputs is an error."""
    hint = "the model overflows on these inputs, or some of its constants hold NaN/Inf"
    check_finite(activations, first_sample, "the model computes NaN/Inf: layer input", hint)


def _first_batch(source: Source, config: CalibrationConfig) -> tuple[tuple[int, dict], int]:
    """The first sample, and the batch size that keeps one run's input under INPUT_BATCH_BYTES."""
    first = next(iter(source.batches(1)), None)
    if first is None:
        raise DataError("the calibration source yielded no samples")
    sample_bytes = sum(v.nbytes for v in first[1].values())
    return first, min(config.batch, max(1, INPUT_BATCH_BYTES // max(sample_bytes, 1)))  # big inputs: small batches


def _limited(source: Source, batch: int, limit: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """The source's batches up to `limit` samples (the last one trimmed to it)."""
    seen = 0
    for n, feed in source.batches(batch):
        if seen >= limit:
            break
        if seen + n > limit:
            feed = {k: v[: limit - seen] for k, v in feed.items()}
            n = limit - seen
        yield n, feed
        seen += n


#: What a calibration stream yields: a batch's tensors and what ran of the model (None: all of it), or
#: (None, None, names) once every batch of those tensors has been seen.
Streamed = tuple[dict[str, np.ndarray] | None, set[str] | None, set[str] | None]


def _in_groups(model, tensors, inputs, source, first, batch, limit, config) -> Iterator[Streamed]:
    """Whole-model sessions, one pass over the data per group of tensors whose values fit `memory_mb`."""
    sizes = {k: v * batch for k, v in _activation_bytes(model, first[1], tensors, config.threads).items()}
    plan = _plan(tensors, sizes, config.memory_mb * 2**20) or [[]]
    for group_index, group in enumerate(plan):
        wanted = set(group) | (inputs if group_index == 0 else set())
        read = _reader(model, group, config.threads)
        seen = 0
        with bar(total=limit, desc=f"calibrate {group_index + 1}/{len(plan)}", unit="sample") as shown:
            for n, feed in _limited(source, batch, limit):
                outputs, ran = read(feed)
                _check_finite(outputs, seen)
                outputs.update({k: v for k, v in feed.items() if k in wanted or k == positions.MASK_INPUT})
                yield outputs, ran, None
                seen += n
                shown.update(n)
        del read  # this group's session goes before the next one's comes (each holds the model's weights)
        yield None, None, wanted


def _in_pieces(model, tensors, inputs, source, batch, limit, config) -> Iterator[Streamed]:
    """One pass over the data a piece of the model at a time (onnxtq.pieces), for a model too large for one
    session: every tensor of a piece is complete when the piece is."""
    runner = pieces.PieceRunner(model, set(tensors) | inputs, threads=config.threads)
    count = max(len(runner.pieces), 1)
    current, seen, batch_index = 0, 0, 0
    masks = []  # each batch's attention mask, a graph input the first piece hands on, for the later pieces

    def complete(k: int) -> set[str]:
        return set(runner.pieces[k].computes if runner.pieces else ()) | inputs

    with bar(total=limit * count, desc=f"calibrate in {count} pieces", unit="sample") as shown:
        for k, n, values in runner.run(_limited(source, batch, limit)):
            if k != current:
                yield None, None, complete(current)
                current, seen, batch_index = k, 0, 0
            if k == 0:
                masks.append(values.get(positions.MASK_INPUT))
            elif masks[batch_index] is not None:
                values[positions.MASK_INPUT] = masks[batch_index]
            _check_finite(values, seen)
            yield values, None, None
            seen += n
            batch_index += 1
            shown.update(n)
    yield None, None, complete(current)


def collect(model: onnx.ModelProto, sites: list[WeightSite], source: Source, config: CalibrationConfig) -> StatsStore:
    """Statistics for every site with an activation, from one or more streamed passes over `source`.

    A model too large for one session (onnxtq.pieces) is run a piece at a time, its statistics written to a
    temporary folder as each layer's are complete: memory holds the statistics being gathered, not all of them.
    """
    targets = [s for s in sites if s.activation is not None]
    if not targets:
        return StatsStore({}, 0, source.description)
    model = name_hidden_outputs(model, targets)
    inputs = {vi.name for vi in model.graph.input}
    big = pieces.needed(model)
    by_key: dict = {}
    for site in targets:
        by_key.setdefault(_key(site), (site, _accumulator(site, config, big)))
    tensors = sorted({a for key in by_key for a in key[0] if a not in inputs})
    first, batch = _first_batch(source, config)
    limit = config.samples or source.num_samples
    rngs = {key: np.random.default_rng([config.seed, i]) for i, key in enumerate(by_key)}
    store = StatsStore({}, min(limit, source.num_samples), source.description, spill=big)
    if big and not has_branches(model):
        stream = _in_pieces(model, tensors, inputs, source, batch, limit, config)
    else:
        stream = _in_groups(model, tensors, inputs, source, first, batch, limit, config)
    finalized: dict = {}
    done: set[str] = set()

    def finalize(keys) -> None:  # one layer's moments at a time: the accumulator goes as its statistics come
        for key in keys:
            _, acc = by_key.pop(key)
            if acc.count:  # 0: a branch never taken
                stats = acc.finalize()
                del acc
                finalized[key] = store.keep(stats.shrunk() if config.shrink else stats)

    for outputs, ran, complete in stream:
        if complete is not None:
            done |= complete
            finalize([key for key in by_key if done.issuperset(key[0])])
            continue
        mask = outputs.get(positions.MASK_INPUT)
        for site, acc in by_key.values():
            used = site.activations if _read_here(site, ran) else ()
            for name in (a for a in used if a in outputs):
                for chunk in _chunks(site, name, outputs[name], config, rngs[_key(site)], mask):
                    acc.update(chunk)
        del outputs
    finalize(list(by_key))
    for site in targets:
        if _key(site) in finalized:
            store.by_site[site.name] = finalized[_key(site)]
    return store


def collect_drift(
    reference: onnx.ModelProto,
    current: onnx.ModelProto,
    sites: list[WeightSite],
    source: Source,
    config: CalibrationConfig,
) -> dict[str, tuple[LayerStats, LayerStats]]:
    """What `sites` see in `current`, a partly quantized copy of `reference`, on the same inputs.

    Per site: the statistics (E[x̃], E[x̃ x̃ᵀ]) of its input x̃ in `current`, and the cross moment
    E[x̃ xᵀ] with its input x in `reference`, over identical patches. A layer fitted to these
    reproduces the reference output from the inputs it will really get (no error accumulation).
    Sites without statistics (no activation: ConvTranspose, Gather) get none here either.
    """
    sites = [s for s in sites if s.activation is not None]
    if not sites:
        return {}
    reference, current = (name_hidden_outputs(m, sites) for m in (reference, current))
    inputs = {vi.name for vi in reference.graph.input}
    exposed = sorted({a for s in sites for a in s.activations} - inputs)
    runs = [_reader(m, exposed, config.threads, fold_dequantize=True) for m in (reference, current)]
    _, batch = _first_batch(source, config)
    accs = {s.name: (_accumulator(s, config), _accumulator(s, config)) for s in sites}
    rng = np.random.default_rng(config.seed)
    limit, seen = config.samples or source.num_samples, 0
    for n, feed in source.batches(batch):
        if seen >= limit:
            break
        feed = {k: v[: limit - seen] for k, v in feed.items()}
        (ref, ran), (cur, _) = (read(feed) for read in runs)
        ref, cur = {**ref, **feed}, {**cur, **feed}
        _check_finite(ref, seen)
        _check_finite(cur, seen)
        for site in sites:
            own, cross = accs[site.name]
            used = site.activations if _read_here(site, ran) else ()
            for name in (a for a in used if a in ref and a in cur):
                seed = int(rng.integers(2**63))  # the same patch positions in both models
                mask = feed.get(positions.MASK_INPUT)
                x_ref = _chunks(site, name, ref[name], config, np.random.default_rng(seed), mask)
                x_cur = _chunks(site, name, cur[name], config, np.random.default_rng(seed), mask)
                for a, b in zip(x_cur, x_ref):
                    own.update(a)
                    cross.update(a, b)
        seen += min(n, limit - seen)
    return {name: (own.finalize(), cross.finalize()) for name, (own, cross) in accs.items() if own.count}
