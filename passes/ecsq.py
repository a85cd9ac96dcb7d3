"""ecsq: Hessian-weighted, entropy-constrained scalar quantization (Choi, El-Khamy, Lee 2017), post-training.

The rate is the entropy of the codes (what `onnxtq pack` stores), and the distortion the one that
matters: a weight error in column j of layer l costs g_l·h_j per unit², g_l the layer's measured
network gain (onnxtq.gains) and h_j the layer input's energy E[x_j²] from calibration — our
Gauss–Newton stand-in for the paper's diagonal loss Hessian. Methods, all at one target entropy:

* `scaled` (default): uniform codes; within a layer, equal-slope steps per input column, Δ_j ∝ 1/√h_j
  (where they pay for storing them, else one step), and each layer's step chosen by one Lagrangian over
  every layer's (entropy, g_l × output error) curve — the reverse water-filling of high-rate ECSQ theory
  without its high-rate assumption. With `gptq` the codes are rounded with error feedback and h_j is what
  an error in column j costs after the later columns have compensated (1/U_jj²); `rdo` adds the code
  length to each rounding decision (a wider zero bin).
* `uniform`: the paper's uniform quantizer, one step for the whole network, bin-centre reconstruction.
* `kmeans` / `hkmeans`: one codebook for all layers (as in the paper), by plain or Hessian-weighted
  k-means (weights g_l·h_j), its size chosen for the target entropy; emitted as Gather lookups.

Uniform codes are stored as INT4, INT8 or INT16, whichever stores the layer in the fewest bytes with the few
codes outside its range sent as escapes (`emit.emit_dequantize`), steps decoded by
DequantizeLinear; the entropy-coded size is `onnxtq pack`'s. The rounding is re-run at most ATTEMPTS times,
the aim re-set by a secant step through the last two tries (the closest kept); `uniform`'s step and the codebook
size are bisected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from onnx import numpy_helper
from onnxtq.passes.rtn import fp32_steps_only, quantizable
from tqdm import tqdm

from onnxtq.bias import bias_note, correct_bias, output_shift
from onnxtq.codebook import Emitted, emit_lookup, index_bits
from onnxtq.emit import db, escapes, narrowest_container, replace_weight
from onnxtq.entropy import RateGrid, code_lengths, entropy_bits, weighted_kmeans_1d
from onnxtq.gains import Probe, layer_output_error
from onnxtq.graph import Graph
from onnxtq.model_io import tensor_nbytes
from onnxtq.pass_infra import Context, Pass, PassConfig
from onnxtq.quantize import Blocking, GroupCode
from onnxtq.rd import Band, Option, allocate
from onnxtq.reconstruct import Problems, feedback_sensitivity, gptq
from onnxtq.report import PassReport, WeightRecord
from onnxtq.weights import WeightSite, discover

METHODS = ("scaled", "uniform", "kmeans", "hkmeans")
#: Largest code magnitude (INT16 container): equal slopes give the most sensitive columns steps far finer than
#: their range; the entropy coder does not care how wide the container is, only the deployable file does.
MAX_CODE = 2**15 - 1
#: Runs of the final rounding at most, each re-aimed by what the previous ones missed (the closest is kept).
ATTEMPTS = 4
#: Steps each layer may take, relative to the rms of its scaled weights: entropies from ~7 bits to ~0.05.
STEP_OCTAVES = 2.0 ** (np.arange(-18, 7) / 3)
#: Entropy miss accepted, in bits per weight.
TOLERANCE = 0.01


@dataclass(frozen=True)
class EcsqConfig(PassConfig):
    rate: float = 3.0  # target entropy, bits per quantized weight (codes; steps or codebook counted too)
    method: str = "scaled"  # scaled | uniform | kmeans | hkmeans
    gptq: bool = True  # scaled: error-feedback rounding on the full calibration Hessian
    rdo: float = 0.0  # κ: code length's weight in each rounding decision, in squared steps (0 = plain rounding)
    gains: bool = True  # weigh layers by their measured network gain
    gain_samples: int = 16
    min_elements: int = 1024
    scale_bits: int = 16
    bias_correct: bool = True

    def __post_init__(self):
        if not 0 < self.rate <= 8:
            raise ValueError(f"rate must be in (0, 8] bits per weight, not {self.rate}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not '{self.method}'")
        if self.rdo < 0 or self.gain_samples < 1:
            raise ValueError("rdo must be >= 0 and gain_samples positive")
        if self.scale_bits not in (16, 32):
            raise ValueError(f"scale_bits must be 16 or 32, not {self.scale_bits}")


@dataclass
class Layer:
    """One weight in its stored layout, with what a unit of error in each of its input columns costs."""

    site: WeightSite
    w: np.ndarray  # stored layout, float64
    stats: object
    column_cost: np.ndarray  # [d] network-output error per unit² of weight error in each input column
    gain: float  # network-output error per unit of layer-output error
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


def column_blocking(site: WeightSite) -> Blocking:
    """Groups = input columns: per-axis on the input axis of a matrix, blocked across all outputs of a conv."""
    if site.transposed:
        return Blocking(site.shape, 0)
    if len(site.shape) == 2:
        return Blocking(site.shape, 1)
    return Blocking(site.shape, 1, block=site.shape[0], block_axis=0)


def layer_error(layer: Layer, error_columns: np.ndarray) -> float:
    """E‖ΔW x‖² for a weight error given by step groups."""
    return layer_output_error(layer.site, layer.stats, layer.blocking.from_groups(error_columns))


def steps_pay(column_cost: np.ndarray, weights: int, step_bits: int) -> bool:
    """Whether one step per column beats one per tensor: the high-rate saving of equal-slope steps,
    ½·log₂(arithmetic / geometric mean of the costs) bits per weight, against the extra steps stored."""
    spread = np.log2(column_cost.mean()) - np.log2(column_cost).mean()
    return 0.5 * spread * weights > step_bits * (len(column_cost) - 1)


class EcsqPass(Pass):
    name = "ecsq"
    Config = EcsqConfig
    needs_stats = True

    def min_opset(self) -> int:
        if self.config.method in ("kmeans", "hkmeans"):
            return 25  # codebooks of 4 or fewer values take UINT2 indices
        return 23 if self.config.scale_bits == 16 else 21  # INT4 codes; float16 steps need output_dtype

    def run(self, ctx: Context) -> PassReport:
        cfg = self.config
        report = self.new_report()
        sites = quantizable(discover(ctx.graph), cfg.min_elements, report)
        if not sites:
            return report
        gains = self._gains(ctx, sites)
        layers = [self._layer(ctx, s, gains.get(s.name, 1.0)) for s in sites]
        weights = sum(layer.w.size for layer in layers)
        if cfg.method in ("kmeans", "hkmeans"):
            report.records += self._cluster(ctx, layers, weights, report)
        else:
            report.records += self._uniform(ctx, layers, weights, report)
        if cfg.bias_correct:
            report.notes.append(bias_note(report.records, True))
        report.notes.append(
            "distortion weights: " + ("network gain x " if gains else "") + "calibration input energy per column"
        )
        return report

    def _gains(self, ctx: Context, sites) -> dict[str, float]:
        if not self.config.gains or self.config.method in ("kmeans", "uniform"):
            return {}
        probe = Probe(ctx.graph.model, ctx.data, self.config.gain_samples)
        return probe.gains(ctx.graph.model, sites, lambda s, e: layer_output_error(s, ctx.stats.get(s), e))

    def _layer(self, ctx: Context, site: WeightSite, gain: float) -> Layer:
        cfg = self.config
        stats = ctx.stats.get(site)
        per_column = column_blocking(site)
        if stats is None:
            energy = np.ones(int(np.prod(per_column.scale_shape)))
        elif cfg.gptq and stats.mode == "full" and cfg.method == "scaled":
            energy = feedback_sensitivity(stats.moment).mean(axis=0)
        else:
            energy = stats.diag().mean(axis=0)
        energy = np.maximum(energy, 1e-6 * max(float(energy.max()), 1e-30))  # dead inputs: coarse, not infinite
        step_dtype = np.float16 if cfg.scale_bits == 16 and not fp32_steps_only(site) else np.float32
        step_bits = 8 * np.dtype(step_dtype).itemsize
        w = ctx.graph.array(site.name).astype(np.float64)
        if cfg.method == "scaled" and steps_pay(energy, w.size, step_bits):
            steps, blocking = "column", per_column
        else:
            steps, blocking = "tensor", Blocking(site.shape, None)
        return Layer(site, w, stats, gain * energy, gain, blocking, steps, step_dtype)

    # ---- uniform codes: scaled (per-column steps) or uniform (one step) ----

    def _factor(self, layer: Layer) -> np.ndarray:
        """Each group's step per unit of the global step: 1/√cost (equal slopes), or 1 for `uniform`."""
        return 1.0 / np.sqrt(layer.cost) if self.config.method == "scaled" else np.ones(len(layer.cost))

    def _steps(self, layer: Layer, delta: float) -> np.ndarray:
        """Steps as they will be stored (rounded to their type), [G]."""
        return np.clip(delta * self._factor(layer), 1e-7, 6e4).astype(layer.step_dtype).astype(np.float64)

    def _side_bits(self, layer: Layer) -> int:
        return len(layer.cost) * 8 * np.dtype(layer.step_dtype).itemsize

    def _plain_rate(self, layers, delta: float, weights: int) -> float:
        bits = 0.0
        for layer in layers:
            q = _rounded(layer.columns, self._steps(layer, delta))
            bits += entropy_bits(q) + self._side_bits(layer)
        return bits / weights

    def _uniform(self, ctx: Context, layers, weights: int, report: PassReport) -> list[WeightRecord]:
        cfg = self.config
        curves = [self._curve(layer) for layer in tqdm(layers, desc="ecsq curves", disable=None, leave=False)]
        tries, best = [], None  # tries: (plain-rounding rate aimed at, rate given); best: (rate, deltas, codes)
        aim = cfg.rate
        for _attempt in range(ATTEMPTS):
            deltas = self._deltas(layers, curves, aim * weights)
            codes = [self._codes(*a) for a in tqdm(list(zip(layers, deltas)), desc="ecsq", disable=None, leave=False)]
            rate = (sum(entropy_bits(q) + self._side_bits(layer) for q, layer in zip(codes, layers))) / weights
            tries.append((aim, rate))
            if best is None or abs(rate - cfg.rate) < abs(best[0] - cfg.rate):
                best = rate, deltas, codes
            if abs(rate - cfg.rate) <= TOLERANCE:
                break
            aim = _reaim(tries, cfg.rate)
        rate, deltas, codes = best
        code_bits = sum(entropy_bits(q) for q in codes) / weights
        how = "per-layer steps by one Lagrangian" if cfg.method == "scaled" else f"one step {deltas[0]:.4g}"
        report.notes.append(
            f"entropy {rate:.3f} b/w (codes {code_bits:.3f} + steps {rate - code_bits:.3f}) for target {cfg.rate:g}; "
            f"{how}; method {cfg.method}" + (f", gptq, rdo {cfg.rdo:g}" if cfg.method == "scaled" and cfg.gptq else "")
        )
        records = []
        for layer, q, delta in zip(layers, codes, deltas):
            steps = self._steps(layer, delta).astype(layer.step_dtype)
            bits = narrowest_container(q)
            escaped = escapes(q, bits, True).size
            code = GroupCode(q.astype(np.int32), steps, None, bits)
            record = replace_weight(
                ctx.graph, layer.site, layer.blocking, code, layer.stats, self.name, cfg.bias_correct
            )
            record.nominal_bits = entropy_bits(q) / q.size
            record.detail = (
                f"entropy {record.nominal_bits:.2f} b/w, INT{bits} codes in [{int(q.min())}, {int(q.max())}]"
                + (f", {escaped} escaped" if escaped else "")
            )
            records.append(record)
        return records

    def _curve(self, layer: Layer) -> tuple[Band, np.ndarray]:
        """The layer's (entropy + steps, gain × output error) points by plain rounding, at steps spanning
        STEP_OCTAVES around the rms of its scaled weights; with the steps (global-step units) they stand for."""
        if self.config.method != "scaled":
            return None, None
        scaled = layer.columns / self._factor(layer)[:, None]
        deltas = float(np.sqrt((scaled**2).mean()) or 1.0) * STEP_OCTAVES
        bits, distortion = [], []
        for delta in deltas:
            steps = self._steps(layer, delta)
            q = _rounded(layer.columns, steps)
            bits.append(entropy_bits(q) + self._side_bits(layer))
            distortion.append(layer.gain * layer_error(layer, q * steps[:, None] - layer.columns))
        return Band(np.arange(len(deltas)), np.array(bits), np.array(distortion)), deltas

    def _deltas(self, layers, curves, max_bits: float) -> list[float]:
        """Global step per layer: `scaled` by one Lagrangian over the layers' curves, else one bisected step."""
        if self.config.method == "scaled":
            options = {layer.site.name: [Option("steps", [band])] for layer, (band, _) in zip(layers, curves)}
            chosen = allocate(options, max_bits=max_bits).choice
            return [float(d[int(chosen[layer.site.name][1][0])]) for layer, (_, d) in zip(layers, curves)]
        weights = sum(layer.w.size for layer in layers)
        reach = max(float((np.abs(layer.columns).max(axis=1) / self._factor(layer)).max()) for layer in layers)
        delta = _bisect(lambda d: self._plain_rate(layers, d, weights), max_bits / weights, reach / MAX_CODE)
        return [delta] * len(layers)

    def _codes(self, layer: Layer, delta: float) -> np.ndarray:
        """[G, S] codes at global step `delta`: rate-aware rounding, with error feedback where H allows."""
        cfg = self.config
        steps = self._steps(layer, delta)
        plain = _rounded(layer.columns, steps)
        if cfg.method != "scaled":
            return plain
        lengths = code_lengths(plain, -MAX_CODE, MAX_CODE)
        step_groups = np.broadcast_to(steps[:, None], plain.shape)
        site, stats = layer.site, layer.stats
        if not (cfg.gptq and stats is not None and stats.mode == "full"):
            grid = RateGrid(step_groups, np.zeros_like(plain), -MAX_CODE, MAX_CODE, lengths, cfg.rdo)
            return grid.codes(layer.columns)
        problems = Problems(stats, site.rows)

        def split(groups):  # [G, S] columns → the layer's problems [P, r, d]
            return problems.split(site.to_matrix(layer.blocking.from_groups(groups)))

        grid = RateGrid(split(step_groups), np.zeros_like(split(plain)), -MAX_CODE, MAX_CODE, lengths, cfg.rdo)
        q = gptq(split(layer.columns), problems.hessian, grid)
        return layer.blocking.to_groups(site.from_matrix(problems.join(q)))

    # ---- one codebook for the network: kmeans / hkmeans ----

    def _cluster(self, ctx: Context, layers, weights: int, report: PassReport) -> list[WeightRecord]:
        cfg = self.config
        values = np.concatenate([layer.w.ravel() for layer in layers])
        if cfg.method == "hkmeans":
            importance = np.concatenate([layer.importance().ravel() for layer in layers])
        else:
            importance = np.ones_like(values)
        sizes = np.cumsum([0] + [layer.w.size for layer in layers])

        def clustered(k):
            centres, a = weighted_kmeans_1d(values, importance, k)
            bits = sum(entropy_bits(a[sizes[i] : sizes[i + 1]]) for i in range(len(layers))) + 32 * len(centres)
            return centres, a, bits / weights

        k = _bisect_count(lambda k: clustered(k)[2], cfg.rate, hi=256)
        centres, assignment, rate = clustered(k)
        report.notes.append(
            f"one codebook of {len(centres)} values for all layers ({cfg.method}); index entropy {rate:.3f} b/w "
            f"(codebook included) for target {cfg.rate:g}"
        )
        stored = numpy_helper.from_array(centres.astype(np.float32), ctx.graph.unique("onnxtq.ecsq.codebook"))
        ctx.graph.set_initializer(stored)
        codebook = Emitted(stored.name, tensor_nbytes(stored), len(centres))
        records = []
        for i, layer in enumerate(layers):
            index = assignment[sizes[i] : sizes[i + 1]].reshape(layer.w.shape)
            records.append(self._emit_lookup(ctx.graph, layer, index, centres, codebook))
        return records

    def _emit_lookup(self, graph: Graph, layer: Layer, index: np.ndarray, centres, codebook: Emitted) -> WeightRecord:
        """Weight ← Gather(shared codebook, indices) through codebook.emit_lookup, bias corrected first."""
        site = layer.site
        before = tensor_nbytes(graph.initializers[site.name])
        w_hat = centres[index]
        why_not = "no statistics" if layer.stats is None else ""
        if self.config.bias_correct and layer.stats is not None:
            shift = output_shift(site, layer.stats, w_hat - layer.w)
            why_not = correct_bias(graph, graph.consumers[site.name][0][0], site, shift, np.float32)
        after = emit_lookup(
            graph, site, site.to_matrix(index) if site.transposed else index, codebook, None, None, self.name
        )
        record = WeightRecord.of(site, "quantized", bytes_before=before, bytes_after=after, bits=8 * after / index.size)
        record.bias_corrected = self.config.bias_correct and not why_not
        record.reason = f"bias not corrected: {why_not}" if self.config.bias_correct and why_not else ""
        record.weight_sqnr_db = db((layer.w**2).sum(), ((layer.w - w_hat) ** 2).sum())
        record.nominal_bits = entropy_bits(index) / index.size
        record.detail = (
            f"entropy {record.nominal_bits:.2f} b/w, UINT{index_bits(codebook.size)} index into the shared codebook"
        )
        if layer.stats is not None:
            m, e = site.to_matrix(layer.w), site.to_matrix(layer.w - w_hat)
            record.output_sqnr_db = db(layer.stats.quadratic(m), layer.stats.quadratic(e))
        return record


def _rounded(columns: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Codes by plain rounding at one step per group [G], clipped to the container."""
    return np.clip(np.round(columns / steps[:, None]), -MAX_CODE, MAX_CODE)


def _reaim(tries, target: float) -> float:
    """The next plain-rounding rate to aim at: a secant step through the last two tries (feedback moves the
    rate by a roughly constant factor), or a shift by the miss after the first."""
    aim, rate = tries[-1]
    slope = 1.0
    if len(tries) > 1 and tries[-2][0] != aim:
        slope = (rate - tries[-2][1]) / (aim - tries[-2][0])
    return max(aim + (target - rate) / (slope if slope > 0.2 else 1.0), 0.01)


def _bisect(rate_of, target: float, finest: float, iterations: int = 40) -> float:
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


def _bisect_count(rate_of, target: float, hi: int) -> int:
    """The largest codebook size in 2..hi whose rate stays within the target (rate grows with k)."""
    lo = 2
    if rate_of(hi) <= target:
        return hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if rate_of(mid) <= target else (lo, mid)
    return lo
