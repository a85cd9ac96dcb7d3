"""Hessian-weighted, entropy-constrained scalar quantization (Choi, El-Khamy, Lee 2017), post-training.

The rate is the entropy of the codes (what `onnxtq pack` stores), and the distortion the one that
matters: a weight error in column j of layer l costs g_l·h_j per unit², g_l the layer's measured
network gain (onnxtq.gains) and h_j the layer input's energy E[x_j²] from calibration — our
Gauss–Newton stand-in for the paper's diagonal loss Hessian. Methods:

* `scaled`: uniform codes; within a layer, equal-slope steps per input column, Δ_j ∝ 1/√h_j (where they
  pay for storing them, else one step); each layer's operating points are its (entropy + steps,
  g_l × output error) curve over global steps spanning STEP_OCTAVES, so one Lagrangian over every layer
  chooses their steps — the reverse water-filling of high-rate ECSQ theory without its high-rate
  assumption. With `gptq` the codes are rounded with error feedback and h_j is what an error in column j
  costs after the later columns have compensated (1/U_jj²); `rdo` adds the code length to each rounding
  decision (a wider zero bin).
* `uniform`: the paper's uniform quantizer, one step for the whole network, bin-centre reconstruction.
* `kmeans` / `hkmeans`: one codebook for all layers (as in the paper), by plain or Hessian-weighted
  k-means (weights g_l·h_j), its size chosen for the target entropy; emitted as Gather lookups (a `Group`).

Uniform codes are stored as INT4, INT8 or INT16, whichever stores the layer in the fewest bytes with the
few codes outside its range sent as escapes (`emit.emit_dequantize`), steps decoded by DequantizeLinear.

With `rotate`, an embedding table also offers a curve in the transform domain (`RotatedTable`): its columns'
principal axes decorrelate it (on MiniLM's word embedding a coding gain of 1.5 dB), and one step over all its
coefficients is then the reverse water-filling of ECSQ theory. That pays only where each coefficient column is
entropy-coded with its own statistics, so it is stored column by column: brotli -q 11 sent MiniLM's codes at
2.94 bits each so against 3.05 row by row (3.19 untransformed, the same 17.7 dB). Its rate is the sum of its
columns' entropies: for a served size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import numpy_helper

from onnxtq.calibration.stats import LayerStats
from onnxtq.codebook import Emitted, emit_lookup, index_bits
from onnxtq.codec import Codec, Coded, Group, Layer, LayerView, output_error
from onnxtq.emit import dequantized, emit_dequantize, emit_rotated_table, escapes, narrowest_container
from onnxtq.entropy import RateGrid, code_lengths, entropy_bits, weighted_kmeans_1d
from onnxtq.model_io import tensor_nbytes
from onnxtq.quantize import Blocking, GroupCode, step_dtype
from onnxtq.rd import Band, Option
from onnxtq.reconstruct import Problems, feedback_sensitivity, gptq

METHODS = ("scaled", "uniform", "kmeans", "hkmeans")
#: Largest code magnitude (INT16 container): equal slopes give the most sensitive columns steps far finer than
#: their range; the entropy coder does not care how wide the container is, only the deployable file does.
MAX_CODE = 2**15 - 1
#: Steps each layer may take, relative to the rms of its scaled weights: entropies from ~7 bits to ~0.05.
STEP_OCTAVES = 2.0 ** (np.arange(-18, 7) / 3)
#: Steps as stored: positive, and within float16's range.
STEP_RANGE = (1e-7, 6e4)
#: Bits of a rotated table's basis codes (a step per row): its error stays far below the coefficients'.
BASIS_BITS = 8


@dataclass
class Columns(LayerView):
    """One weight in its stored layout, with what a unit of error in each of its input columns costs."""

    layer: Layer
    w: np.ndarray  # stored layout, float64
    column_cost: np.ndarray  # [d] network-output error per unit² of weight error in each input column
    blocking: Blocking  # the steps' layout
    steps: str  # column (one step per input column) | tensor (one step)
    step_dtype: type
    columns: np.ndarray = field(init=False)  # [G, S] the weights by step group: read by every rate and curve point

    def __post_init__(self):
        self.columns = self.blocking.to_groups(self.w)

    @property
    def cost(self) -> np.ndarray:
        """[G] error cost per step group (the mean over the columns for one step per tensor)."""
        if self.steps == "column":
            return self.column_cost
        return np.full(self.columns.shape[0], self.column_cost.mean())

    def importance(self) -> np.ndarray:
        """Error cost of every weight, in the stored layout."""
        per_column = column_blocking(self.site)
        return per_column.from_groups(np.repeat(self.column_cost[:, None], self.w.size // len(self.column_cost), 1))


@dataclass
class RotatedTable(LayerView):
    """An embedding table W [V, D] as coefficients over its columns' principal axes: W = C·B̂, B̂ the KLT basis
    (eigenvectors of WᵀW as rows) stored at BASIS_BITS, C refitted to it, so that Ŵ − W = ΔC·B̂."""

    layer: Layer
    coeffs: np.ndarray  # C [V, D], float64
    basis: GroupCode  # B̂'s codes [D, D] and a step per row
    b_hat: np.ndarray  # B̂ as onnxruntime computes it, float64
    step_dtype: type

    @classmethod
    def of(cls, layer: Layer, step_dtype: type) -> RotatedTable:
        """The table over its principal axes: the basis quantized first, the coefficients fitted to it."""
        w = layer.w.astype(np.float64)
        _, vectors = np.linalg.eigh(w.T @ w)
        axes = vectors[:, ::-1].T  # principal axes as rows, largest variance first
        hi = 2 ** (BASIS_BITS - 1) - 1
        steps = np.maximum(np.abs(axes).max(axis=1) / hi, 1e-7).astype(step_dtype)
        codes = np.clip(np.round(axes / steps.astype(np.float64)[:, None]), -hi, hi).astype(np.int32)
        basis = GroupCode(codes, steps, None, BASIS_BITS)
        b_hat = basis.dequantize().astype(np.float64)
        coeffs = np.linalg.solve(b_hat.T, w.T).T  # C·B̂ = W
        return cls(layer, coeffs, basis, b_hat, step_dtype)

    @property
    def side_bits(self) -> float:
        """The basis (its codes' entropy, for a served size) and every step."""
        return entropy_bits(self.basis.q) + 8 * np.dtype(self.step_dtype).itemsize * (len(self.basis.scale) + 1)

    def step(self, delta: float) -> np.ndarray:
        """The coefficients' one step as stored."""
        return np.asarray(np.clip(delta, *STEP_RANGE), self.step_dtype)

    def codes(self, delta: float) -> np.ndarray:
        return _rounded(self.coeffs, np.full(len(self.coeffs), float(self.step(delta))))

    def error(self, q: np.ndarray, delta: float) -> np.ndarray:
        """Ŵ − W for codes `q` at step `delta`."""
        return (q * float(self.step(delta)) - self.coeffs) @ self.b_hat

    def curve(self) -> tuple[Band, np.ndarray]:
        """(column entropies + side bits, gain × ‖Ŵ − W‖²) at steps spanning STEP_OCTAVES around the rms of C."""
        deltas = float(np.sqrt((self.coeffs**2).mean()) or 1.0) * STEP_OCTAVES
        bits, distortion = [], []
        for delta in deltas:
            q = self.codes(delta)
            bits.append(column_entropy_bits(q) + self.side_bits)
            distortion.append(self.gain * output_error(self.site, None, self.error(q, delta)))
        return Band(np.arange(len(deltas)), np.array(bits), np.array(distortion)), deltas

    def coded(self, delta: float) -> Coded:
        q = self.codes(delta)
        bits = next(b for b in (4, 8, 16) if not escapes(q, b, True).size)
        nominal = column_entropy_bits(q) / q.size
        detail = (
            f"KLT over its {q.shape[1]} columns, entropy {nominal:.2f} b/w column by column, INT{bits} codes in "
            f"[{int(q.min())}, {int(q.max())}]; basis {BASIS_BITS}-bit"
        )
        site, step, basis = self.site, self.step(delta), self.basis
        codes = np.ascontiguousarray(q.T).astype(np.int32)  # column by column
        return Coded(
            (q * float(step)) @ self.b_hat,
            lambda graph, pass_name: emit_rotated_table(graph, site, codes, step, bits, basis, pass_name),
            nominal_bits=nominal,
            detail=detail,
        )


def column_entropy_bits(q: np.ndarray) -> float:
    """Σ over the columns of q of n·H(column): each column entropy-coded with its own statistics."""
    return sum(entropy_bits(column) for column in q.T)


def column_blocking(site) -> Blocking:
    """Groups = input columns: per-axis on the input axis of a matrix, blocked across all outputs of a conv."""
    if site.transposed:
        return Blocking(site.shape, 0)
    if len(site.shape) == 2:
        return Blocking(site.shape, 1)
    return Blocking(site.shape, 1, block=site.shape[0], block_axis=0)


def layer_error(layer: Columns, error_columns: np.ndarray, stats: LayerStats | None) -> float:
    """E‖ΔW x‖² for a weight error given by step groups (`stats`: the layer's, read once for many errors)."""
    return output_error(layer.site, stats, layer.blocking.from_groups(error_columns))


def steps_pay(column_cost: np.ndarray, weights: int, step_bits: int) -> bool:
    """Whether one step per column beats one per tensor: the high-rate saving of equal-slope steps,
    ½·log₂(arithmetic / geometric mean of the costs) bits per weight, against the extra steps stored."""
    spread = np.log2(column_cost.mean()) - np.log2(column_cost).mean()
    return 0.5 * spread * weights > step_bits * (len(column_cost) - 1)


class EcsqCodec(Codec):
    name = "ecsq"

    def __init__(
        self, method: str = "scaled", gptq: bool = True, rdo: float = 0.0, scale_bits: int = 16, rotate: bool = False
    ):
        self.method, self.gptq, self.rdo, self.scale_bits = method, gptq, rdo, scale_bits
        self.rotate = rotate  # embedding tables also offer their curve in the transform domain (RotatedTable)

    def columns(self, layer: Layer) -> Columns:
        """The layer as step groups, with the cost of an error in each of its input columns."""
        site, stats = layer.site, layer.stats
        per_column = column_blocking(site)
        if stats is None:
            energy = np.ones(int(np.prod(per_column.scale_shape)))
        elif self.gptq and stats.mode == "full" and self.method == "scaled":
            energy = feedback_sensitivity(stats.moment).mean(axis=0)
        else:
            energy = stats.diag().mean(axis=0)
        energy = np.maximum(energy, 1e-6 * max(float(energy.max()), 1e-30))  # dead inputs: coarse, not infinite
        steps_type = step_dtype(site, self.scale_bits)
        step_bits = 8 * np.dtype(steps_type).itemsize
        w = layer.w.astype(np.float64)
        if self.method == "scaled" and steps_pay(energy, w.size, step_bits):
            steps, blocking = "column", per_column
        else:
            steps, blocking = "tensor", Blocking(site.shape, None)
        return Columns(layer, w, layer.gain * energy, blocking, steps, steps_type)

    def options(self, layer: Layer) -> list[Option]:
        """`scaled`: the layer's curve, a point per global step of STEP_OCTAVES; with `rotate`, an embedding
        table's curve in the transform domain too."""
        columns = self.columns(layer)
        band, deltas = self.curve(columns)
        options = [
            Option("steps", [band], materialize=lambda picks, drift=None: self.coded(columns, deltas[int(picks[0])]))
        ]
        if self.rotate and self.method == "scaled" and layer.site.kind == "gather" and layer.stats is None:
            table = RotatedTable.of(layer, step_dtype(layer.site, self.scale_bits))
            rotated, steps = table.curve()
            options.append(
                Option("klt steps", [rotated], materialize=lambda picks, drift=None: table.coded(steps[int(picks[0])]))
            )
        return options

    # ---- uniform codes: scaled (per-column steps) or uniform (one step) ----

    def factor(self, layer: Columns) -> np.ndarray:
        """Each group's step per unit of the global step: 1/√cost (equal slopes), or 1 for `uniform`."""
        return 1.0 / np.sqrt(layer.cost) if self.method == "scaled" else np.ones(len(layer.cost))

    def steps(self, layer: Columns, delta: float) -> np.ndarray:
        """Steps as they will be stored (rounded to their type), [G]."""
        return np.clip(delta * self.factor(layer), *STEP_RANGE).astype(layer.step_dtype).astype(np.float64)

    def side_bits(self, layer: Columns) -> int:
        return len(layer.cost) * 8 * np.dtype(layer.step_dtype).itemsize

    def plain_rate(self, layers, delta: float, weights: int) -> float:
        bits = 0.0
        for layer in layers:
            q = _rounded(layer.columns, self.steps(layer, delta))
            bits += entropy_bits(q) + self.side_bits(layer)
        return bits / weights

    def curve(self, layer: Columns) -> tuple[Band, np.ndarray]:
        """The layer's (entropy + steps, gain × output error) points by plain rounding, at steps spanning
        STEP_OCTAVES around the rms of its scaled weights; with the steps (global-step units) they stand for."""
        if self.method != "scaled":
            return None, None
        scaled = layer.columns / self.factor(layer)[:, None]
        deltas = float(np.sqrt((scaled**2).mean()) or 1.0) * STEP_OCTAVES
        bits, distortion, stats = [], [], layer.stats
        for delta in deltas:
            steps = self.steps(layer, delta)
            q = _rounded(layer.columns, steps)
            bits.append(entropy_bits(q) + self.side_bits(layer))
            distortion.append(layer.gain * layer_error(layer, q * steps[:, None] - layer.columns, stats))
        return Band(np.arange(len(deltas)), np.array(bits), np.array(distortion)), deltas

    def codes(self, layer: Columns, delta: float) -> np.ndarray:
        """[G, S] codes at global step `delta`: rate-aware rounding, with error feedback where H allows."""
        steps = self.steps(layer, delta)
        plain = _rounded(layer.columns, steps)
        if self.method != "scaled":
            return plain
        lengths = code_lengths(plain, -MAX_CODE, MAX_CODE)
        step_groups = np.broadcast_to(steps[:, None], plain.shape)
        site, stats = layer.site, layer.stats
        if not (self.gptq and stats is not None and stats.mode == "full"):
            grid = RateGrid(step_groups, np.zeros_like(plain), -MAX_CODE, MAX_CODE, lengths, self.rdo)
            return grid.codes(layer.columns)
        problems = Problems(stats, site.rows)

        def split(groups):  # [G, S] columns → the layer's problems [P, r, d]
            return problems.split(site.to_matrix(layer.blocking.from_groups(groups)))

        grid = RateGrid(split(step_groups), np.zeros_like(split(plain)), -MAX_CODE, MAX_CODE, lengths, self.rdo)
        q = gptq(split(layer.columns), problems.hessian, grid)
        return layer.blocking.to_groups(site.from_matrix(problems.join(q)))

    def coded(self, layer: Columns, delta: float, q: np.ndarray | None = None) -> Coded:
        """The layer at global step `delta` (its codes `q` if already rounded): INT4/8/16 with escapes."""
        q = self.codes(layer, delta) if q is None else q
        steps = self.steps(layer, delta).astype(layer.step_dtype)
        bits = narrowest_container(q)
        escaped = escapes(q, bits, True).size
        code = GroupCode(q.astype(np.int32), steps, None, bits)
        nominal = entropy_bits(q) / q.size
        detail = f"entropy {nominal:.2f} b/w, INT{bits} codes in [{int(q.min())}, {int(q.max())}]" + (
            f", {escaped} escaped" if escaped else ""
        )
        site, blocking = layer.site, layer.blocking
        return Coded(
            dequantized(blocking, code),
            lambda graph, pass_name: emit_dequantize(graph, site, blocking, code, pass_name),
            nominal_bits=nominal,
            detail=detail,
        )

    # ---- one codebook for the network: kmeans / hkmeans ----

    def cluster(self, layers: list[Columns], rate: float) -> tuple[Group, np.ndarray, float]:
        """One codebook for all `layers`, its size the largest whose index entropy (codebook included)
        stays within `rate` bits per weight: (the group, the codebook, the rate reached)."""
        weights = sum(layer.w.size for layer in layers)
        values = np.concatenate([layer.w.ravel() for layer in layers])
        if self.method == "hkmeans":
            importance = np.concatenate([layer.importance().ravel() for layer in layers])
        else:
            importance = np.ones_like(values)
        sizes = np.cumsum([0] + [layer.w.size for layer in layers])

        def clustered(k):
            centres, a = weighted_kmeans_1d(values, importance, k)
            bits = sum(entropy_bits(a[sizes[i] : sizes[i + 1]]) for i in range(len(layers))) + 32 * len(centres)
            return centres, a, bits / weights

        k = bisect_count(lambda k: clustered(k)[2], rate, hi=256)
        centres, assignment, reached = clustered(k)
        book: dict = {}

        def prepare(graph, pass_name: str) -> int:
            stored = numpy_helper.from_array(centres.astype(np.float32), graph.unique("onnxtq.ecsq.codebook"))
            book["emitted"] = Emitted(graph.set_initializer(stored), tensor_nbytes(stored), len(centres))
            return tensor_nbytes(stored)

        coded = []
        for i, layer in enumerate(layers):
            index = assignment[sizes[i] : sizes[i + 1]].reshape(layer.w.shape)
            coded.append(self._lookup(layer, index, centres, book))
        return Group([c.layer for c in layers], coded, prepare), centres, reached

    def _lookup(self, layer: Columns, index: np.ndarray, centres: np.ndarray, book: dict) -> Coded:
        """Weight ← Gather(shared codebook, indices) through codebook.emit_lookup."""
        site = layer.site
        stored_index = site.to_matrix(index) if site.transposed else index

        def write(graph, pass_name: str) -> int:
            return emit_lookup(graph, site, stored_index, book["emitted"], None, None, pass_name)

        nominal = entropy_bits(index) / index.size
        detail = f"entropy {nominal:.2f} b/w, UINT{index_bits(len(centres))} index into the shared codebook"
        return Coded(centres[index], write, nominal_bits=nominal, detail=detail)


def _rounded(columns: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Codes by plain rounding at one step per group [G], clipped to the container."""
    return np.clip(np.round(columns / steps[:, None]), -MAX_CODE, MAX_CODE)


def bisect_step(rate_of, target: float, finest: float, iterations: int = 40) -> float:
    """The global step whose rate is `target`, no finer than `finest` (where the largest code reaches the
    container's limit: finer steps only clip). Rate falls as the step grows; searched in log space."""
    lo, hi = finest, finest * 2
    if rate_of(lo) <= target:
        return lo
    while rate_of(hi) > target:
        lo, hi = hi, hi * 16
    for _ in range(iterations):
        mid = np.sqrt(lo * hi)
        lo, hi = (mid, hi) if rate_of(mid) > target else (lo, mid)
        if hi / lo < 1.0005:
            break
    return float(np.sqrt(lo * hi))


def bisect_count(rate_of, target: float, hi: int) -> int:
    """The largest codebook size in 2..hi whose rate stays within the target (rate grows with k)."""
    lo = 2
    if rate_of(hi) <= target:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if rate_of(mid) <= target else (lo, mid)
    return lo
