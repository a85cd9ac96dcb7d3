"""ecsq: Hessian-weighted, entropy-constrained scalar quantization (Choi, El-Khamy, Lee 2017), post-training.

`rate` is the target *entropy* of the codes in bits per weight (steps or codebook counted too): the size
`onnxtq pack` stores. The codec (onnxtq.codecs.ecsq) gives every layer its curve of (entropy, network-
weighted output error) over global steps; one Lagrangian over all layers meets the target (`scaled`), or
one step (`uniform`) or one codebook size (`kmeans`, `hkmeans`) is bisected for it. Error-feedback and
rate-aware rounding move the entropy from what plain rounding predicted, so the rounding is re-run at
most ATTEMPTS times, the aim re-set by a secant step through the last two tries (the closest is kept).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxtq.bias import bias_note
from onnxtq.codec import Layer, output_error
from onnxtq.codecs.ecsq import MAX_CODE, METHODS, EcsqCodec, bisect_step
from onnxtq.entropy import entropy_bits
from onnxtq.finish import finish
from onnxtq.gains import Probe
from onnxtq.opsets import Emission
from onnxtq.parallel import layer_map
from onnxtq.pass_infra import ORIGINALS, STATS, Context, Pass, PassConfig, option
from onnxtq.progress import bar
from onnxtq.rd import Option, allocate
from onnxtq.report import PassReport, Rate, WeightRecord
from onnxtq.weights import discover, quantizable

#: Runs of the final rounding at most, each re-aimed by what the previous ones missed (the closest is kept).
ATTEMPTS = 4
#: Entropy miss accepted, in bits per weight.
TOLERANCE = 0.01


@dataclass(frozen=True)
class EcsqConfig(PassConfig):
    rate: float = option(3.0, "target entropy, bits per quantized weight (codes; steps or codebook counted too)")
    method: str = option("scaled", "scaled | uniform | kmeans | hkmeans")
    gptq: bool = option(True, "scaled: error-feedback rounding on the full calibration Hessian")
    rdo: float = option(0.0, "κ: code length's weight in each rounding decision, in squared steps (0: plain)")
    gains: bool = option(True, "weigh layers by their measured network gain")
    gain_samples: int = option(16, "calibration inputs the gains are measured on (fewer for a model run in pieces)")
    min_elements: int = option(1024, "smaller weights stay in float")
    scale_bits: int = option(16, "32: float32 steps")
    bias_correct: bool = option(True, "cancel the mean output error with the calibration input mean")

    def __post_init__(self):
        if not 0 < self.rate <= 8:
            raise ValueError(f"rate must be in (0, 8] bits per weight, not {self.rate}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, not '{self.method}'")
        if self.rdo < 0 or self.gain_samples < 1:
            raise ValueError("rdo must be >= 0 and gain_samples positive")
        if self.scale_bits not in (16, 32):
            raise ValueError(f"scale_bits must be 16 or 32, not {self.scale_bits}")


class EcsqPass(Pass):
    name = "ecsq"
    Config = EcsqConfig
    codes_weights = True
    needs = frozenset({STATS})
    preserves = frozenset({STATS, ORIGINALS})

    def emits(self) -> Emission:
        if self.config.method in ("kmeans", "hkmeans"):
            return Emission(code_bits=(2, 4, 8))  # codebook indices: 4 or fewer values take UINT2
        return Emission(code_bits=(4, 8, 16), fp16_steps=self.config.scale_bits == 16)

    def run(self, ctx: Context) -> PassReport:
        cfg = self.config
        report = self.new_report()
        sites = quantizable(discover(ctx.graph), cfg.min_elements, report)
        if not sites:
            return report
        codec = EcsqCodec(cfg.method, cfg.gptq, cfg.rdo, cfg.scale_bits)
        gains = self._gains(ctx, sites)
        layers = [codec.columns(Layer.of(ctx.graph, s, ctx.stats, gains.get(s.name, 1.0))) for s in sites]
        weights = sum(layer.w.size for layer in layers)
        if cfg.method in ("kmeans", "hkmeans"):
            report.records += self._cluster(ctx, codec, layers, weights, report)
        else:
            report.records += self._uniform(ctx, codec, layers, weights, report)
        if cfg.bias_correct:
            report.notes.append(bias_note(report.records, True))
        report.notes.append(
            "distortion weights: " + ("network gain x " if gains else "") + "calibration input energy per column"
        )
        return report

    def _gains(self, ctx: Context, sites) -> dict[str, float]:
        if not self.config.gains or self.config.method in ("kmeans", "uniform"):
            return {}
        model = ctx.graph.proto()
        probe = Probe(model, ctx.data, self.config.gain_samples)
        return probe.gains(model, sites, lambda s, e: output_error(s, ctx.stats.get(s), e))

    def _uniform(self, ctx: Context, codec: EcsqCodec, layers, weights: int, report: PassReport) -> list[WeightRecord]:
        cfg = self.config
        curves = list(bar(layer_map(codec.curve, layers), total=len(layers), desc="ecsq curves"))
        tries, best = [], None  # tries: (plain-rounding rate aimed at, rate given); best: (rate, deltas, codes)
        aim = cfg.rate
        for _attempt in range(ATTEMPTS):
            deltas = self._deltas(codec, layers, curves, aim * weights)
            # every layer's codes wait for the rate: as int16 (they are within ±MAX_CODE), a quarter of float64
            codes = [codec.codes(*a).astype(np.int16) for a in bar(list(zip(layers, deltas)), desc="ecsq")]
            rate = (sum(entropy_bits(q) + codec.side_bits(layer) for q, layer in zip(codes, layers))) / weights
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
        records = [
            finish(ctx.graph, layer.layer, codec.coded(layer, delta, q), self.name, cfg.bias_correct)
            for layer, q, delta in zip(layers, codes, deltas)
        ]
        report.rate = _rate(records, rate, cfg.rate)
        return records

    def _deltas(self, codec: EcsqCodec, layers, curves, max_bits: float) -> list[float]:
        """Global step per layer: `scaled` by one Lagrangian over the layers' curves, else one bisected step."""
        if self.config.method == "scaled":
            options = {layer.site.name: [Option("steps", [band])] for layer, (band, _) in zip(layers, curves)}
            chosen = allocate(options, max_bits=max_bits).choice
            return [float(d[int(chosen[layer.site.name][1][0])]) for layer, (_, d) in zip(layers, curves)]
        weights = sum(layer.w.size for layer in layers)
        reach = max(float((np.abs(layer.columns).max(axis=1) / codec.factor(layer)).max()) for layer in layers)
        delta = bisect_step(lambda d: codec.plain_rate(layers, d, weights), max_bits / weights, reach / MAX_CODE)
        return [delta] * len(layers)

    def _cluster(self, ctx: Context, codec: EcsqCodec, layers, weights: int, report: PassReport) -> list[WeightRecord]:
        cfg = self.config
        group, centres, rate = codec.cluster(layers, cfg.rate)
        report.notes.append(
            f"one codebook of {len(centres)} values for all layers ({cfg.method}); index entropy {rate:.3f} b/w "
            f"(codebook included) for target {cfg.rate:g}"
        )
        group.prepare(ctx.graph, self.name)
        records = [finish(ctx.graph, lay, c, self.name, cfg.bias_correct) for lay, c in zip(group.layers, group.coded)]
        report.rate = _rate(records, rate, cfg.rate)
        return records


def _rate(records: list[WeightRecord], entropy: float, target: float) -> Rate:
    weights = sum(int(np.prod(r.shape)) for r in records)
    stored = 8 * sum(r.bytes_after for r in records) / weights
    nominal = sum(r.nominal_bits * int(np.prod(r.shape)) for r in records) / weights
    return Rate(weights, stored, nominal=nominal, entropy=entropy, target=target)


def _reaim(tries, target: float) -> float:
    """The next plain-rounding rate to aim at: a secant step through the last two tries (feedback moves the
    rate by a roughly constant factor), or a shift by the miss after the first."""
    aim, rate = tries[-1]
    slope = 1.0
    if len(tries) > 1 and tries[-2][0] != aim:
        slope = (rate - tries[-2][1]) / (aim - tries[-2][0])
    return max(aim + (target - rate) / (slope if slope > 0.2 else 1.0), 0.01)
