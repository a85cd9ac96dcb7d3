"""auto: compress to one target; every codec competes for every layer, checked on held-out inputs.

Each layer's operating points from every codec named in `codecs` (rtn at 2, 4 and 8 bits per channel and in
blocks of 32 and 128, 3/5/6 bits too for a served-size target; float16; tq's bands and transforms, at the
containers' depths and the two-plane ones between them (6, 10, 12 bits: onnxtq.packing.PLANES); ecsq's step
curve for a served size; the float weight itself) are put in one unit, the network-output error (the layer's
measured gain × E‖ΔW x‖²), and one Lagrangian allocation (onnxtq.rd) chooses a point per layer. Gains measured
with noise are only slopes: the first allocation is emitted and each layer's own effect at its chosen point
is measured through onnxruntime, correcting its predicted errors. Then the loop of onnxtq.target emits,
measures (bytes, brotli bytes, or fidelity on held-out inputs that no statistic was computed from) and
re-aims the bit budget until the best model measured to meet the target is bracketed. The report names per
layer the codec and bits chosen and its share of the predicted error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from onnxtq import lowering
from onnxtq.calibration.data import split_holdout
from onnxtq.codec import Coded, Layer, distortion, output_error
from onnxtq.codecs.ecsq import EcsqCodec
from onnxtq.codecs.fp16 import Fp16Codec
from onnxtq.codecs.rtn import RtnCodec, side_bits
from onnxtq.codecs.tq import DEPTHS, TqCodec
from onnxtq.entropy import entropy_bits
from onnxtq.errors import UsageError, VerificationError
from onnxtq.finish import Figures, finish, measure
from onnxtq.gains import Probe
from onnxtq.graph import Graph, copy_model
from onnxtq.model_io import serialize, whole_size
from onnxtq.opsets import Emission
from onnxtq.packing import container_bits
from onnxtq.parallel import layer_map
from onnxtq.pass_infra import ORIGINALS, STATS, Context, Pass, PassConfig, option
from onnxtq.pieces import PIECE_BYTES
from onnxtq.progress import bar
from onnxtq.quantize import blocking_for
from onnxtq.rd import Band, Option, allocate
from onnxtq.report import PassReport, Rate, WeightRecord
from onnxtq.target import (
    DEFAULT_CODECS,
    KINDS,
    SERVED_CODECS,
    SIZE_KINDS,
    SIZE_MARGIN,
    Emitted,
    HeldOut,
    Search,
    nearest_text,
    target_text,
)
from onnxtq.weights import discover, quantizable

CODECS = ("rtn", "fp16", "tq", "ecsq")
#: Codecs whose points are Options of their own (bands), beside the single band of the others' points.
BANDED = ("tq", "ecsq")
#: rtn's points: (bits, block); 0: one step per output channel.
RTN_POINTS = ((8, 0), (8, 128), (8, 32), (4, 0), (4, 128), (4, 32), (2, 0), (2, 128), (2, 32))
#: tq's depths: the containers' and the two-plane depths between them (6, 10, 12 bits cost what they say).
TQ_DEPTHS = "planes"
#: More points where the served size is the target: odd depths cost their entropy there, not a container.
SERVED_POINTS = ((6, 0), (5, 0), (3, 0), (3, 32))
#: Bytes of materialised tq layers (GPTQ's work) kept from one round for the next; past it they are made again.
#: A model run in pieces keeps a piece's worth (its memory is bounded by the work, not the model).
KEPT_BYTES = 1 << 30
#: Bytes a weight's points hold while they are made, about: 2.09 GiB for a 50M-weight table of the 1.3B GPT (a
#: peak of 2.88 GiB, 0.79 of it what stays resident).
POINTS_BYTES_PER_WEIGHT = 48
#: Bytes a coded layer holds until it is written, about: Ŵ and its error (up to float64 each) and its codes.
CODED_BYTES_PER_WEIGHT = 24
#: A layer's measured marginal error may correct its prediction by at most this factor either way.
MAX_CORRECTION = 16.0


@dataclass(frozen=True)
class AutoConfig(PassConfig):
    size: int = option(0, "target deployable file bytes")
    served_size: int = option(0, "target bytes after brotli -q 11 (what a web server sends)")
    bits: float = option(0.0, "target average stored bits per weight")
    sqnr: float = option(0.0, "target worst output SQNR in dB on the held-out inputs (30 if no target is given)")
    agreement: float = option(0.0, "target top-1 agreement with the original on the held-out inputs (class scores)")
    codecs: str = option(
        "", f"the codecs that compete, joined by + (default {DEFAULT_CODECS}; {SERVED_CODECS} for a served size)"
    )
    rounds: int = option(10, "most emit-and-measure rounds")
    gain_samples: int = option(
        16, "calibration inputs the gains and marginal errors are measured on (fewer for a model run in pieces)"
    )
    correct: bool = option(True, "correct each layer's predicted error by its measured marginal effect")
    scale_bits: int = option(16, "32: float32 steps")
    bias_correct: bool = option(True, "cancel the mean output error with the calibration input mean")
    half_bias: bool = option(True, "a coded layer's bias in float16 where its bytes are worth more than the error")

    def __post_init__(self):
        if sum(bool(getattr(self, kind)) for kind in KINDS) > 1:
            raise ValueError("give one target: size, served_size, bits, sqnr or agreement")
        if min(self.size, self.served_size, self.bits, self.sqnr) < 0:
            raise ValueError("a target must be positive")
        if not 0 <= self.agreement < 1:
            raise ValueError(f"agreement must be in (0, 1), not {self.agreement}")
        unknown = set(self.codec_names) - set(CODECS)
        if unknown or not self.codec_names:
            raise ValueError(f"codecs must be among {', '.join(CODECS)}, not '{self.codecs}'")
        if self.rounds < 1 or self.gain_samples < 1 or self.scale_bits not in (16, 32):
            raise ValueError("rounds and gain_samples must be positive, scale_bits 16 or 32")

    @property
    def codec_names(self) -> list[str]:
        codecs = self.codecs or (SERVED_CODECS if self.served_size else DEFAULT_CODECS)
        return [c.strip() for c in codecs.split("+") if c.strip()]

    @property
    def target(self) -> tuple[str, float]:
        for kind in KINDS:
            if getattr(self, kind):
                return kind, float(getattr(self, kind))
        return "sqnr", 30.0


@dataclass
class Point:
    """One candidate coding of a layer, as the allocation and the report see it."""

    codec: str
    detail: str
    bits: float  # what it costs under the target's rate (file bits, or entropy bits for a served size)
    distortion: float  # network-output error, gain × E‖ΔW x‖²
    make: Callable[[], Coded] | None  # codes it again when chosen (cheaply, the same bytes); None: the float weight


class AutoPass(Pass):
    name = "auto"
    Config = AutoConfig
    codes_weights = True
    needs = frozenset({STATS})
    preserves = frozenset({STATS, ORIGINALS})
    holdout = True  # compress() splits the calibration inputs; the held-out part is never calibrated on

    def emits(self) -> Emission:
        cfg = self.config
        bits = tuple(sorted({b for b, _ in RTN_POINTS + SERVED_POINTS}))
        if "tq" in cfg.codec_names:
            bits += DEPTHS["nominal"] if cfg.served_size else DEPTHS[TQ_DEPTHS] + (8,)
        if "ecsq" in cfg.codec_names:
            bits += (16,)  # its widest container
        return Emission(code_bits=bits, blocked=True, fp16_steps=cfg.scale_bits == 16)

    def run(self, ctx: Context) -> PassReport:
        cfg = self.config
        kind, value = cfg.target
        report = self.new_report()
        sites = quantizable(discover(ctx.graph), 0, report)
        if not sites:
            report.notes.append("no weight to quantize")
            return report
        fit, held_source = ctx.data, ctx.holdout
        if held_source is None:
            fit, held_source = split_holdout(ctx.data)
            report.notes.append("the run gave no held-out split: every fourth input was held out, but calibrated on")
        model = ctx.graph.proto()
        held = HeldOut(model, held_source, margins=fit)
        if kind == "agreement" and not held.classes:
            raise UsageError(
                "an agreement target needs an output of class scores ([samples, classes]); this model has none",
                "give --sqnr DB instead: the worst output's SQNR on the held-out inputs",
            )
        layers = [Layer.of(ctx.graph, s, ctx.stats, lazy=True) for s in sites]  # ctx.graph stays as it is
        probe = Probe(model, fit, cfg.gain_samples)
        gains = probe.gains(model, sites, lambda s, e: output_error(s, ctx.stats.get(s), e))
        for layer in layers:
            layer.gain = gains[layer.site.name]
        # a layer's points alternate parallel clipping searches with serial numpy: two layers at once keep both busy
        made = layer_map(partial(self._points, served=kind == "served_size"), layers, _points_working_set)
        shown = bar(zip(layers, made), total=len(layers), desc="auto candidates", unit="weight")
        points = {layer.site.name: mine for layer, mine in shown}
        banded = self._banded_options(layers, kind)
        energy = probe.energy
        search = Search(kind, value, held, energy, cfg.rounds)
        others = whole_size(model) - sum(ctx.graph.nbytes(s.name) for s in sites)
        first_aim = self._first_aim(kind, value, energy, others, sum(layer.size for layer in layers))
        pristine = copy_model(model)
        self._materialized: dict = {}
        self._lowers = ctx.profile.lowers  # sizes are the file's as written: lowered under the portable target

        def emit(aim: float, weights_kept: bool = False) -> Emitted:
            return self._emit(pristine, layers, points, banded, kind, aim, weights_kept)

        def bits_for_error(error: float) -> float:
            return allocate(self._options(layers, points, banded), max_distortion=error).bits

        if kind not in SIZE_KINDS:
            first_aim = bits_for_error(first_aim)
        if cfg.correct:
            first = emit(first_aim, True)
            checks = Probe(model, held_source, cfg.gain_samples) if ctx.holdout is not None else None
            search.result.corrected = self._correct(probe, checks, model, layers, points, banded, first)
            if kind not in SIZE_KINDS:
                first_aim = bits_for_error(self._first_aim(kind, value, energy, others, 0))
        chosen = search.run(first_aim, emit, bits_for_error)
        result = search.result
        report.target = result
        if chosen is None:
            best = max(result.attempts, key=lambda a: a.measured if kind not in SIZE_KINDS else -a.measured)
            tried = f"{len(result.attempts)} rounds: {nearest_text(kind, best)}"
            raise VerificationError(
                f"target {target_text(kind, value)} not met in {tried}",
                "loosen the target, or allow more rounds (--pipeline with auto{rounds=N})",
            )
        ctx.graph = Graph(chosen.model)
        report.records.extend(chosen.records)
        quantized = [r for r in chosen.records if r.status == "quantized"]
        stored = sum(r.bytes_after for r in quantized)
        rate = chosen.weight_bits / chosen.weights
        report.rate = Rate(chosen.weights, rate, target=value if kind == "bits" else None)
        report.notes.append(self._summary(result, chosen, len(quantized), stored))
        return report

    # ---- candidates ----

    def _points(self, layer: Layer, served: bool) -> list[Point]:
        cfg = self.config
        points = [Point("float32", "float32", 32.0 * layer.size, 0.0, None)]
        if "fp16" in cfg.codec_names:
            for option in Fp16Codec().options(layer):
                band = option.bands[0]
                points.append(
                    Point("fp16", "float16", band.bits[0], band.distortion[0], partial(option.materialize, [0]))
                )
        if "rtn" in cfg.codec_names:
            loaded = layer.loaded()  # read once for every point; each maker reads them again when chosen
            for bits, block in RTN_POINTS + (SERVED_POINTS if served else ()):
                if blocking_for(layer.site, block).block != block:
                    continue  # a layer too short for the block (or depthwise) is coded per channel already
                codec = RtnCodec(bits, block, bits >= 3, scale_bits=cfg.scale_bits)
                coded, _, code = codec.code_groups(loaded)
                rate = (entropy_bits(code.q) if served else layer.size * container_bits(bits)) + side_bits(code)
                if coded.output_error is not None:  # rtn measured it already
                    error = layer.gain * coded.output_error
                else:
                    error = distortion(loaded, loaded.w.astype(np.float64) - coded.w_hat)
                detail = f"rtn {bits}-bit " + (f"block {block}" if block else "per channel")
                points.append(Point("rtn", detail, float(rate), float(error), self._rtn_maker(codec, layer, detail)))
        return points

    @staticmethod
    def _rtn_maker(codec: RtnCodec, layer: Layer, detail: str) -> Callable[[], Coded]:
        """rtn's point coded again when chosen: its clipping search is quick, and every layer's points held at once
        would be nine copies of the model."""

        def make() -> Coded:
            coded = codec.code(layer)
            coded.detail, coded.nominal_bits = detail, float(codec.bits)
            return coded

        return make

    def _banded_options(self, layers: list[Layer], kind: str) -> dict[str, list[Option]]:
        """tq's codings, and ecsq's step curve where the target is the served size (its rate is the codes'
        entropy, which brotli approaches, not the bytes of their containers); each Option named by its codec."""
        cfg = self.config
        names = [n for n in cfg.codec_names if n in BANDED and (n != "ecsq" or kind == "served_size")]
        options: dict[str, list[Option]] = {}
        for name in names:
            if name == "tq" and kind == "served_size":  # every depth, each at its codes' entropy
                codec = TqCodec(depths="nominal", scale_bits=cfg.scale_bits, entropy=True)
            elif name == "tq":
                codec = TqCodec(depths=TQ_DEPTHS, scale_bits=cfg.scale_bits)
            else:
                codec = EcsqCodec(scale_bits=cfg.scale_bits, rotate=True)  # tables in the transform domain too
            eligible = [layer for layer in layers if layer.stats is not None or name != "tq"]  # ecsq codes a table
            working_set = codec.working_set if name == "tq" else None  # wide layers' transforms beside few others
            made = layer_map(codec.options, eligible, working_set)  # tq's makes the layer's transforms
            shown = bar(zip(eligible, made), total=len(eligible), desc=f"auto {name} curves", unit="weight")
            for layer, codings in shown:
                for coding in codings:
                    coding.name = name
                    options.setdefault(layer.site.name, []).append(coding)
        return options

    def _options(self, layers, points, banded) -> dict[str, list[Option]]:
        """Per layer: one Option whose single band holds every point, then the banded codecs' Options."""
        options = {}
        for layer in layers:
            name = layer.site.name
            mine = points[name]
            band = Band(
                np.arange(len(mine)),
                np.array([p.bits for p in mine]),
                np.array([p.distortion for p in mine]),
            )
            options[name] = [Option("points", [band]), *banded.get(name, [])]
        return options

    # ---- one allocation, emitted ----

    def _emit(self, pristine, layers, points, banded, kind: str, aim: float, weights_kept: bool = False) -> Emitted:
        """The model at bit budget `aim`; with `weights_kept`, each coded layer's weight as onnxruntime computes it
        (what the marginal errors are measured with)."""
        options = self._options(layers, points, banded)
        allocation = allocate(options, max_bits=aim)
        chosen = {self._key(name, *allocation.choice[name]) for name in allocation.choice}
        self._materialized = {k: v for k, v in self._materialized.items() if k in chosen}  # the rest goes now
        graph = Graph(copy_model(pristine))
        records, predicted, weight_bits = [], 0.0, 0.0
        weights, w_hat = 0, {}
        kept: dict = {}  # tq's materialised layers (GPTQ) for the next round: this round's, within the budget
        kept_bytes, budget = 0, PIECE_BYTES if any(layer.source is not None for layer in layers) else KEPT_BYTES

        def coded_as_allocated(layer: Layer) -> Coded | None:
            """The layer coded at its allocated point (kept from the last round, or made again); None: float32."""
            index, picks = allocation.choice[layer.site.name]
            if index == 0:
                point = points[layer.site.name][int(picks[0])]
                return None if point.make is None else point.make()
            key = self._key(layer.site.name, index, picks)
            return self._materialized.get(key) or options[layer.site.name][index].materialize(picks)

        def coded_and_measured(layer: Layer) -> tuple[Coded | None, Figures | None, np.ndarray | Path | None]:
            coded = coded_as_allocated(layer)
            if coded is None:
                return None, None, None
            figures = measure(layer, coded, self.config.bias_correct)
            return coded, figures, _replacement(layer, coded) if weights_kept else None

        # the layers are coded and measured on the cores, as far ahead as the budget allows (each answer a whole
        # layer), while this thread writes them
        made = layer_map(coded_and_measured, layers, TqCodec.working_set, _coded_bytes)
        for layer, (coded, figures, replacement) in zip(layers, made):
            name = layer.site.name
            index, picks = allocation.choice[name]
            weights += layer.size
            if index == 0:
                point = points[name][int(picks[0])]
                codec, distortion = point.codec, point.distortion
            else:
                option = options[name][index]
                key = self._key(name, index, picks)
                error_bytes = 0 if coded.error is None else coded.error.nbytes
                size = coded.w_hat.nbytes + error_bytes + 4 * coded.w_hat.size  # and the int32 codes its writer holds
                if kept_bytes + size <= budget:
                    kept[key], kept_bytes = coded, kept_bytes + size
                codec = option.name
                distortion = sum(b.totals(p)[1] for b, p in zip(option.bands, picks))
            predicted += distortion
            if coded is None:
                weight_bits += 32.0 * layer.size
                records.append(
                    WeightRecord.of(
                        layer.site,
                        "skipped",
                        reason="kept in float32: the allocation found no coding worth its error",
                        codec="float32",
                        share=distortion,
                    )
                )
                continue
            price = None  # the layer-output error one bit is worth at this allocation: a bias goes float16 if it pays
            if self.config.half_bias:
                price = allocation.lam / layer.gain if layer.gain > 0 else math.inf
            record = finish(graph, layer, coded, self.name, self.config.bias_correct, bias_price=price, figures=figures)
            record.codec, record.share = codec, distortion
            if weights_kept:
                w_hat[name] = replacement
            weight_bits += 8.0 * record.bytes_after
            records.append(record)
        self._materialized = kept
        for record in records:
            record.share = record.share / predicted if predicted > 0 else 0.0
        graph.remove_dead()
        proto = graph.proto()
        written = proto
        if self._lowers:
            lowered = Graph(copy_model(proto))
            lowering.lower(lowered, every=True)
            written = lowered.proto()
        data = serialize(written) if kind == "served_size" else None  # brotli reads the bytes; else the size will do
        size = len(data) if data is not None else whole_size(written)
        return Emitted(proto, size, data, records, predicted, weight_bits, weights, w_hat)

    @staticmethod
    def _key(name: str, index: int, picks) -> tuple:
        """A materialised coding's key: the layer, its option and the depth picked per band."""
        return (name, index, tuple(np.asarray(p).tobytes() for p in picks))

    def _first_aim(self, kind: str, value: float, energy: float, others: int, weights: int) -> float:
        if kind == "size":
            return max(8.0 * (value - others - SIZE_MARGIN), 1.0)
        if kind == "served_size":
            return max(8.0 * (value - 0.5 * others), 1.0)  # the graph's own bytes shrink about half by brotli
        if kind == "bits":
            return value * weights
        sqnr = value if kind == "sqnr" else 10 * math.log10(1 / (1 - value)) + 10
        return energy / 10 ** (sqnr / 10)

    def _correct(self, probe: Probe, checks: Probe | None, model, layers, points, banded, first: Emitted) -> int:
        """Rescale each layer's predicted errors by its measured marginal effect at the first allocation's
        point: the gain at the operating point, not the slope noise measured. Where the run holds inputs out
        (`checks`), the chosen codec's points are raised by what it fitted of its statistics' noise
        (`_overfit`). Returns the layers corrected."""
        by_name = {r.name: r for r in first.records}
        replacements, predicted = {}, {}
        for layer in layers:
            record = by_name[layer.site.name]
            share = record.share * first.predicted_error
            if record.status != "quantized" or share <= 0:
                continue
            replacements[layer.site.name] = first.w_hat[layer.site.name]
            predicted[layer.site.name] = share
        measured = probe.marginal(model, replacements)
        overfit = {}
        if checks is not None:
            overfit = self._overfit(checks, model, layers, points, by_name, replacements, predicted)
        for layer in layers:
            name = layer.site.name
            if name not in measured:
                continue
            factor = float(np.clip(measured[name] / predicted[name], 1 / MAX_CORRECTION, MAX_CORRECTION))
            raised, codec = overfit.get(name, 1.0), by_name[name].codec
            for point in points[name]:
                point.distortion *= factor * (raised if point.codec == codec else 1.0)
            for opt in banded.get(name, []):
                for band in opt.bands:
                    band.distortion = band.distortion * factor * (raised if opt.name == codec else 1.0)
            layer.gain *= factor
        return len(measured)

    @staticmethod
    def _overfit(checks: Probe, model, layers, points, by_name, replacements, predicted) -> dict[str, float]:
        """Per layer whose codec fits its statistics (GPTQ and tq's transforms fit H, whose off-diagonal a few
        dozen sequences of correlated tokens estimate poorly): how much more its error grows on held-out
        inputs, over its prediction, than plain rounding's does (the rtn point nearest in bits, which fits
        nothing). Both measured on the same inputs, what makes those inputs harder cancels. On a 27M GPT the
        attention's output projections came out about 10x worse held out than fitted; on CNNs near 1."""
        chosen, yardsticks, plain_predicted = {}, [], {}
        for layer in layers:
            name = layer.site.name
            rounding = [p for p in points[name] if p.codec == "rtn"]
            if name not in replacements or by_name[name].codec in ("rtn", "fp16") or not rounding:
                continue
            point = min(rounding, key=lambda p: abs(p.bits / layer.size - (by_name[name].bits or 0)))
            yardsticks.append((layer, point))
            chosen[name], plain_predicted[name] = replacements[name], point.distortion
        if not chosen:
            return {}
        # coded as the candidates were: two layers at a time
        made = layer_map(
            lambda pair: _replacement(pair[0], pair[1].make()), yardsticks, lambda pair: _points_working_set(pair[0])
        )
        plain = {layer.site.name: w_hat for (layer, _), w_hat in zip(yardsticks, made)}
        held, rounded = checks.marginal(model, chosen), checks.marginal(model, plain)
        ratios = {}
        for name in chosen:
            if min(held[name], rounded[name], plain_predicted[name], predicted[name]) > 0:
                ratio = (held[name] / predicted[name]) / (rounded[name] / plain_predicted[name])
                ratios[name] = float(np.clip(ratio, 1.0, MAX_CORRECTION))
        return ratios

    def _summary(self, result, chosen: Emitted, quantized: int, stored: int) -> str:
        last = [a for a in result.attempts if a.meets][-1] if result.attempts else None
        by_codec: dict[str, int] = {}
        for r in chosen.records:
            by_codec[r.codec] = by_codec.get(r.codec, 0) + 1
        codecs = ", ".join(f"{k} {v}" for k, v in sorted(by_codec.items()))
        text = (
            f"target {target_text(result.kind, result.value)} met after {len(result.attempts)} rounds "
            f"({result.holdout_samples} held-out inputs): {chosen.file_bytes:,d} B"
        )
        if result.sqnr_db is not None:
            text += f", held-out SQNR {result.sqnr_db:.2f} dB"
        if result.agreement is not None:
            text += f", expected agreement {result.agreement:.4f} (counted {result.agreement_observed:.4f})"
        if result.served_bytes is not None:
            text += f", served {result.served_bytes:,d} B"
        if last is not None and last.predicted is not None:
            text += f"; predicted {last.predicted:.4g}, measured {last.measured:.4g}"
        return text + f"; layers by codec: {codecs}; {quantized} quantized into {stored:,d} B"


def _points_working_set(layer: Layer) -> int:
    """Bytes making the layer's points holds, about (onnxtq.parallel.layer_map)."""
    return POINTS_BYTES_PER_WEIGHT * layer.size


def _coded_bytes(layer: Layer) -> int:
    """Bytes a coded layer holds until it is written (onnxtq.parallel.layer_map's answer_bytes). Far less than
    the working set that made it (the 1.3B LM head: 2.5 against 10 GB), which, held instead, would leave room
    beside it for no other layer."""
    return CODED_BYTES_PER_WEIGHT * layer.size


def _replacement(layer: Layer, coded: Coded) -> np.ndarray | Path:
    """A coded layer's weight as a marginal error replaces it: in the stored type, as onnxruntime will be given
    it (not a float64 copy); for a model run in pieces, waiting on disk for its piece."""
    w_hat = np.asarray(coded.w_hat, layer.dtype)
    return w_hat if layer.source is None else layer.source.keep_array(w_hat)
