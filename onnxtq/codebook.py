"""Vector codebooks: metric-weighted k-means, codebook quantization, and the lookup that stock ORT runs.

Items x_i ∈ R^d (kernels, row sub-vectors or scalars) are clustered under a per-item metric

    cost_i(q) = w_i · (x_i − q)ᵀ M_{m(i)} (x_i − q)

with M_g a few shared d×d PSD matrices (e.g. the kk×kk block of the layer Hessian of input channel
g) and w_i ≥ 0 an item weight (e.g. s_o² of the item's output-channel scale). Lloyd's iterations
assign each item to its cheapest codeword and move each codeword to the closed-form minimiser
q_j = (Σ_{i∈j} w_i M_i)⁻¹ Σ_{i∈j} w_i M_i x_i. The cost of every item against every codeword is
two matrix products, w_i·(x_iᵀM_i x_i − 2 (M_i x_i)·q + vec(M_i)·vec(q qᵀ)), done in chunks of
items so memory stays bounded whatever N and K.

The deployable form (`emit_lookup`), all standard ONNX that onnxruntime folds at load:

    indices (UINT2/4/8/16, packed) → Cast(INT32) → Gather(codebook, axis=0) → [Reshape] → [Transpose] → Mul(scale)
    codebook = Cast(INT8 codes → float) · step                      (6-bit values in an INT8 tensor)
    scale    = Cast(float16 per-channel scales → float)  or  Gather(gain table, gain indices)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
from onnx import numpy_helper

from onnxtq import kernels
from onnxtq.emit import replace_initializer
from onnxtq.graph import Graph, prepend, tag
from onnxtq.model_io import tensor_nbytes
from onnxtq.packing import container_bits, int_tensor
from onnxtq.weights import WeightSite

#: Floats of the largest [items, K] cost matrix built at once.
CHUNK_FLOATS = 2**22
#: k-means++ seeds from at most this many items (a uniform sample of the rest).
SEED_ITEMS = 40000


@dataclass
class Metric:
    """Per-item metric w_i·M_{index[i]}: mats [G, d, d] symmetric PSD, index [N], weight [N]."""

    mats: np.ndarray
    index: np.ndarray
    weight: np.ndarray

    @classmethod
    def euclidean(cls, n: int, d: int, weight: np.ndarray | None = None) -> Metric:
        w = np.ones(n) if weight is None else np.asarray(weight, np.float64)
        return cls(np.eye(d)[None], np.zeros(n, np.int64), w)

    def take(self, items) -> Metric:
        return Metric(self.mats, self.index[items], self.weight[items])


def _terms(x: np.ndarray, metric: Metric):
    """Per item: M x [N, d] and xᵀ M x [N]."""
    mx = np.einsum("nde,ne->nd", metric.mats[metric.index], x)
    return mx, (mx * x).sum(axis=1)


def _codeword_terms(codebook: np.ndarray, metric: Metric) -> np.ndarray:
    """vec(M_g)·vec(q qᵀ) for every metric and codeword, [G, K]: shared by all the items of a metric."""
    d = codebook.shape[1]
    outer = np.einsum("kd,ke->kde", codebook, codebook).reshape(len(codebook), d * d)
    return metric.mats.reshape(len(metric.mats), d * d) @ outer.T


def assign(x: np.ndarray, codebook: np.ndarray, metric: Metric) -> tuple[np.ndarray, np.ndarray]:
    """Cheapest codeword per item and its cost: (indices [N], costs [N]), the [N, K] costs never built whole
    (onnxtq.kernels.cheapest)."""
    n = len(x)
    step = max(1, CHUNK_FLOATS // max(len(codebook), 1))
    idx, cost = np.empty(n, np.int64), np.empty(n)
    shared = _codeword_terms(codebook, metric)
    for a in range(0, n, step):
        part = metric.take(slice(a, a + step))
        mx, xmx = _terms(x[a : a + step], part)
        idx[a : a + step], cost[a : a + step] = kernels.cheapest(xmx, 2 * mx @ codebook.T, shared, part)
    return idx, cost


def update(x: np.ndarray, labels: np.ndarray, metric: Metric, codebook: np.ndarray) -> np.ndarray:
    """Closed-form codewords for fixed assignments; codewords without items keep their value."""
    k, d = codebook.shape
    a = np.zeros((k, d * d))
    b = np.zeros((k, d))
    step = max(1, CHUNK_FLOATS // (d * d))
    for s in range(0, len(x), step):
        m = metric.take(slice(s, s + step))
        mx, _ = _terms(x[s : s + step], m)
        kernels.add_weighted(a, labels[s : s + step], m.weight, m.mats.reshape(len(m.mats), d * d), m.index)
        kernels.add_weighted(b, labels[s : s + step], m.weight, mx, np.arange(len(mx)))
    a = a.reshape(k, d, d)
    used = np.einsum("kdd->k", a) > 0
    out = codebook.copy()
    if used.any():
        au = a[used]
        # a whisper of damping: a codeword whose items all miss one direction (dead inputs) stays finite there
        au = au + 1e-9 * np.einsum("kdd->k", au)[:, None, None] / d * np.eye(d)
        out[used] = np.linalg.solve(au, b[used][:, :, None])[:, :, 0]
    return out


def seed(x: np.ndarray, k: int, metric: Metric, rng: np.random.Generator) -> np.ndarray:
    """k-means++ under the item metric: each new codeword drawn with probability ∝ the cost to the nearest."""
    n = len(x)
    pool = np.arange(n) if n <= SEED_ITEMS else np.sort(rng.choice(n, SEED_ITEMS, replace=False))
    xs, ms = x[pool], metric.take(pool)
    d = x.shape[1]
    mx, xmx = _terms(xs, ms)
    vec = ms.mats.reshape(len(ms.mats), d * d)[ms.index]
    size = ms.weight * np.einsum("nd,nd->n", xs, mx)  # cost to the zero vector: a start that favours big items
    first = rng.choice(len(xs), p=_probabilities(size))
    centers = [xs[first]]
    best = np.full(len(xs), np.inf)
    for _ in range(1, min(k, len(xs))):
        c = centers[-1]
        cost = ms.weight * np.maximum(xmx - 2 * mx @ c + vec @ np.outer(c, c).reshape(-1), 0.0)
        best = np.minimum(best, cost)
        centers.append(xs[rng.choice(len(xs), p=_probabilities(best))])
    out = np.array(centers)
    if len(out) < k:  # fewer items than codewords: the rest repeat items (never used, harmless)
        out = np.concatenate([out, xs[rng.choice(len(xs), k - len(out))]])
    return out


def _probabilities(w: np.ndarray) -> np.ndarray:
    total = w.sum()
    return w / total if total > 0 and np.isfinite(total) else np.full(len(w), 1.0 / len(w))


@dataclass
class Clustering:
    codebook: np.ndarray  # [K, d]
    labels: np.ndarray  # [N]
    cost: float  # Σ_i cost_i at the end
    iterations: int


def kmeans(
    x: np.ndarray,
    k: int,
    metric: Metric | None = None,
    iterations: int = 30,
    seed_value: int = 0,
    tol: float = 1e-5,
    init: np.ndarray | None = None,
) -> Clustering:
    """Weighted Lloyd from k-means++ (or `init`), empty codewords re-seeded from the costliest items."""
    x = np.asarray(x, np.float64)
    metric = metric or Metric.euclidean(len(x), x.shape[1])
    rng = np.random.default_rng(seed_value)
    codebook = seed(x, k, metric, rng) if init is None else np.array(init, np.float64)
    labels, cost = assign(x, codebook, metric)
    total, done = float(cost.sum()), 0
    for done in range(1, iterations + 1):  # noqa: B007 (the count is reported)
        codebook = update(x, labels, metric, codebook)
        empty = np.setdiff1d(np.arange(k), labels)
        if len(empty):  # re-seed at the items the codebook serves worst
            worst = np.argsort(-cost, kind="stable")[: len(empty)]
            codebook[empty[: len(worst)]] = x[worst]
        labels, cost = assign(x, codebook, metric)
        new = float(cost.sum())
        if total - new <= tol * max(total, 1e-300) and not len(empty):
            total = new
            break
        total = new
    return Clustering(codebook, labels, total, done)


@dataclass
class Codebook:
    """A codebook as stored: integer codes [K, *tail] (|code| ≤ 2^(bits−1) − 1, in INT8) times one step."""

    codes: np.ndarray
    step: float  # stored as float32
    bits: int

    @classmethod
    def quantize(cls, values: np.ndarray, bits: int = 6) -> Codebook:
        """Symmetric uniform grid, step = max|q| / (2^(bits−1) − 1)."""
        if not 2 <= bits <= 8:
            raise ValueError(f"codebook bits must be 2..8, not {bits}")
        top = 2 ** (bits - 1) - 1
        peak = float(np.abs(values).max())
        step = np.float32(peak / top if peak > 0 else 1.0)
        codes = np.clip(np.round(values / step), -top, top).astype(np.int8)
        return cls(codes, float(step), bits)

    def values(self) -> np.ndarray:
        """What onnxruntime decodes, Cast(codes)·step in float32."""
        return self.codes.astype(np.float32) * np.float32(self.step)

    @property
    def size(self) -> int:
        return len(self.codes)

    def nominal_bits(self) -> int:
        return self.codes.size * self.bits + 32


@dataclass
class Emitted:
    """A float tensor the graph now computes and the bytes its new initializers take; for a codebook,
    its size K and codeword shape."""

    value: ir.Value
    bytes: int
    size: int = 0
    tail: tuple[int, ...] = ()


def emit_codebook(
    graph: Graph, base: str, book: Codebook, float_type: int, pass_name: str, before: ir.Node | None = None
) -> Emitted:
    """Cast(INT8 codes)·step as nodes before `before` (first in the graph when None); a codebook several
    lookups may read."""
    codes = numpy_helper.from_array(book.codes.astype(np.int8), graph.unique(f"{base}/onnxtq.codebook"))
    np_type = onnx.helper.tensor_dtype_to_np_dtype(float_type)
    step = numpy_helper.from_array(np.array(book.step, np_type), graph.unique(f"{base}/onnxtq.codebook_step"))
    codes_value, step_value = graph.set_initializer(codes), graph.set_initializer(step)
    cast_out, out = graph.unique(f"{base}/onnxtq.codebook_float"), graph.unique(f"{base}/onnxtq.codebook_values")
    cast = graph.node("Cast", [codes_value], [cast_out], graph.unique(f"{base}/onnxtq.cast"), to=float_type)
    mul = graph.node("Mul", [cast.outputs[0], step_value], [out], graph.unique(f"{base}/onnxtq.decode"))
    nodes = [tag(n, pass_name, "codebook") for n in (cast, mul)]
    if before is None:
        prepend(graph, nodes)
    else:
        graph.graph.insert_before(before, nodes)
    return Emitted(mul.outputs[0], tensor_nbytes(codes) + tensor_nbytes(step), book.size, tuple(book.codes.shape[1:]))


def index_bits(k: int) -> int:
    """⌈log₂ K⌉ (at least 1)."""
    return max(1, int(np.ceil(np.log2(max(k, 2)))))


def lookup_values(indices: np.ndarray, codebook: np.ndarray, site: WeightSite, scales: np.ndarray | None):
    """Numpy reference of `emit_lookup` in float32: the weight as stored."""
    gathered = codebook.astype(np.float32)[np.asarray(indices)]
    rows = site.rows
    if site.transposed:
        w = gathered.reshape(rows, -1).T
    else:
        w = gathered.reshape(site.shape)
    if scales is not None:
        w = w * np.asarray(scales, np.float32).reshape(_scale_shape(site))
    return w


def _scale_shape(site: WeightSite) -> list[int]:
    shape = [1] * len(site.shape)
    shape[1 if site.transposed else 0] = site.rows
    return shape


def emit_lookup(
    graph: Graph,
    site: WeightSite,
    indices: np.ndarray,
    codebook: Codebook | Emitted,
    scales: np.ndarray | None = None,
    gains: tuple[np.ndarray, np.ndarray] | None = None,
    pass_name: str = "",
) -> int:
    """Replace the weight of `site` by codebook[indices] (· per-output-channel scale); returns the bytes stored.

    indices [*S] (rows first: [n, ...] whatever the stored layout) pick codewords [K, *tail]; the gathered
    S + tail is reshaped to the weight's matrix view and transposed back for weights stored as [d, n].
    Scales: `scales` [n] as given (float16 or float32), or `gains` = (gain indices [n], table [G]): a
    second lookup. A `Codebook` is emitted here; an `Emitted` one (shared by several weights) is read.
    """
    weight = graph.initializers[site.name]
    ftype = int(weight.const_value.dtype)
    base, node_base = site.name, site.node
    first = graph.first_reader(weight)  # the lookup goes before it
    stored = 0
    if isinstance(codebook, Codebook):
        book = emit_codebook(graph, base, codebook, ftype, pass_name, before=first)
        stored += book.bytes
    else:
        book = codebook
    indices = np.asarray(indices)
    if indices.size and (indices.min() < 0 or indices.max() >= book.size):
        raise ValueError(f"{site.name}: indices outside the codebook of {book.size}")
    nodes: list[ir.Node] = []
    gathered = _gather(graph, base, node_base, indices, book.value, book.size, nodes, pass_name)
    stored += gathered.bytes
    out = gathered.value
    matrix = [site.rows, site.cols] if site.transposed else list(site.shape)
    if list(indices.shape) + list(book.tail) != matrix:
        shape = numpy_helper.from_array(np.array(matrix, np.int64), graph.unique(f"{base}/onnxtq.shape"))
        out = _node(graph, nodes, "Reshape", [out, graph.set_initializer(shape)], base, node_base, pass_name, "reshape")
    if site.transposed:
        out = _node(graph, nodes, "Transpose", [out], base, node_base, pass_name, "transpose", perm=[1, 0])
    if gains is not None:
        g_idx, table = gains
        table_t = numpy_helper.from_array(np.asarray(table), graph.unique(f"{base}/onnxtq.gain_table"))
        table_out = graph.set_initializer(table_t)
        stored += tensor_nbytes(table_t)
        if table_t.data_type != ftype:
            table_out = _node(graph, nodes, "Cast", [table_out], base, node_base, pass_name, "gain_table", to=ftype)
        g_idx = np.asarray(g_idx).reshape(_scale_shape(site))
        g = _gather(graph, f"{base}/gain", node_base, g_idx, table_out, len(table), nodes, pass_name)
        stored += g.bytes
        out = _node(graph, nodes, "Mul", [out, g.value], base, node_base, pass_name, "scale")
    elif scales is not None:
        s = numpy_helper.from_array(
            np.asarray(scales).reshape(_scale_shape(site)), graph.unique(f"{base}/onnxtq.scale")
        )
        s_out = graph.set_initializer(s)
        stored += tensor_nbytes(s)
        if s.data_type != ftype:
            s_out = _node(graph, nodes, "Cast", [s_out], base, node_base, pass_name, "scale_cast", to=ftype)
        out = _node(graph, nodes, "Mul", [out, s_out], base, node_base, pass_name, "scale")
    nodes += replace_initializer(graph, site, out, pass_name)
    graph.graph.insert_before(first, nodes)
    return stored


def _node(
    graph: Graph, nodes: list, op: str, inputs: list, base: str, node_base: str, pass_name: str, role: str, **attrs
) -> ir.Value:
    """Append one tagged node reading `inputs` to `nodes`; returns its output."""
    out = graph.unique(f"{base}/onnxtq.{role}")
    node = graph.node(op, inputs, [out], graph.unique(f"{node_base}/onnxtq.{role}"), **attrs)
    nodes.append(tag(node, pass_name, role))
    return node.outputs[0]


def _gather(
    graph: Graph, base: str, node_base: str, indices: np.ndarray, table: ir.Value, k: int, nodes: list, pass_name: str
) -> Emitted:
    """Packed unsigned indices → Cast(INT32) → Gather(table, axis 0): the gathered tensor and the index bytes."""
    bits = container_bits(index_bits(k))
    idx = int_tensor(graph.unique(f"{base}/onnxtq.indices"), indices, bits, signed=False)
    idx_value = graph.set_initializer(idx)
    cast = _node(graph, nodes, "Cast", [idx_value], base, node_base, pass_name, "index", to=onnx.TensorProto.INT32)
    out = _node(graph, nodes, "Gather", [table, cast], base, node_base, pass_name, "lookup", axis=0)
    return Emitted(out, tensor_nbytes(idx))
