"""tq: transform quantization — decorrelate, allocate bits by rate–distortion, run in the transform domain.

After Young et al. (TQ, TPAMI 2022), post-training. The codec (onnxtq.codecs.tq) gives each layer its
codings — identity, per-row identity, banded identity, and a transform (`elt`, `klt`) where one applies —
each an Option of bands with (bits stored, gain-weighted output distortion) per bit depth. One
Lagrangian over all bands of all layers meets the target (`rate` bits per weight, `size` bytes or
predicted output `sqnr`); each layer also picks its cheapest coding. The chosen points are materialised
(GPTQ-finished codes, a quantized basis, the coefficients refitted to it) and finished by the shared
tail (the bias absorbs the mean error). A `size` target re-allocates with the graph overhead measured
on the previous try.

The report gives per layer the stored and nominal bits and the Gaussian rate–distortion bound at
the distortion reached, and for the network the predicted (Σ g·D) and measured output error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from onnxtq.bias import bias_note
from onnxtq.codec import Layer, output_error
from onnxtq.codecs.tq import DEPTHS, TqCodec
from onnxtq.finish import db, finish
from onnxtq.gains import Probe
from onnxtq.graph import Graph
from onnxtq.opsets import Emission
from onnxtq.parallel import layer_map
from onnxtq.pass_infra import ORIGINALS, STATS, Context, Pass, PassConfig, option
from onnxtq.progress import bar
from onnxtq.rd import allocate
from onnxtq.report import Additivity, PassReport, Rate
from onnxtq.sequential import sequential_stages
from onnxtq.weights import discover, quantizable

#: Bytes a size target keeps free for what the run adds after the pass (model properties, provenance).
SIZE_MARGIN = 512
#: Allocations tried for a size target, each with the graph overhead measured on the previous one.
SIZE_ATTEMPTS = 3


@dataclass(frozen=True)
class TqConfig(PassConfig):
    rate: float = option(4.0, "bits per weight over the quantized weights (codes, steps, zero points, bases)")
    size: int = option(0, "target file bytes instead of a rate (0: off)")
    sqnr: float = option(0.0, "target predicted output SQNR in dB instead of a rate (0: off)")
    transform: str = option("elt", "elt | klt | identity")
    bands: int = option(16, "most bands per layer")
    band_columns: int = option(64, "fewest coefficient columns per band (a band stores one step per row)")
    depths: str = option(
        "container",
        "container: 0/2/4/8-bit bands | planes: also 6, 10, 12 (two planes each) | "
        "nominal: 0, 2..8 (3,5,6,7 in wider types)",
    )
    basis_bits: int = option(8, "bits of the transform's basis, 4 or 8")
    runtime: str = option("auto", "auto (factored where it saves multiply-adds) | factored | folded")
    gptq: bool = option(True, "finish the chosen codes by error feedback")
    gains: bool = option(True, "weigh layers by their measured network gain (else layer-output error alone)")
    gain_samples: int = option(16, "calibration inputs the gains are measured on (fewer for a model run in pieces)")
    min_elements: int = option(0, "smaller weights stay in float")
    scale_bits: int = option(16, "32: float32 steps")
    bias_correct: bool = option(True, "cancel the mean output error with the calibration input mean")
    sequential: bool = option(False, "fit each layer to the inputs of the network quantized before it")

    def __post_init__(self):
        targets = sum(bool(x) for x in (self.size, self.sqnr)) + (self.rate != 4.0)
        if targets > 1:
            raise ValueError("give one target: rate, size or sqnr")
        if not 0 < self.rate <= 16:
            raise ValueError(f"rate must be in (0, 16], not {self.rate}")
        if self.transform not in ("elt", "klt", "identity"):
            raise ValueError(f"transform must be elt, klt or identity, not '{self.transform}'")
        if self.depths not in DEPTHS:
            raise ValueError(f"depths must be container, planes or nominal, not '{self.depths}'")
        if self.runtime not in ("auto", "factored", "folded"):
            raise ValueError(f"runtime must be auto, factored or folded, not '{self.runtime}'")
        if self.basis_bits not in (4, 8) or self.scale_bits not in (16, 32):
            raise ValueError("basis_bits must be 4 or 8, scale_bits 16 or 32")
        if self.bands < 1 or self.band_columns < 1 or self.gain_samples < 1:
            raise ValueError("bands, band_columns and gain_samples must be positive")
        if self.sqnr and not self.gains:
            raise ValueError("an sqnr target needs gains=true (network-output distortions)")


class TqPass(Pass):
    name = "tq"
    Config = TqConfig
    codes_weights = True
    needs = frozenset({STATS})
    preserves = frozenset({STATS, ORIGINALS})

    def emits(self) -> Emission:
        cfg = self.config
        return Emission(code_bits=(*DEPTHS[cfg.depths], cfg.basis_bits), fp16_steps=cfg.scale_bits == 16)

    def run(self, ctx: Context) -> PassReport:
        cfg = self.config
        report = self.new_report()
        sites = quantizable(discover(ctx.graph), cfg.min_elements, report)
        if not sites:  # nothing to allocate over (and no rate to report per weight)
            report.notes.append("no weight to quantize")
            return report
        codec = TqCodec(
            cfg.transform,
            cfg.bands,
            cfg.band_columns,
            cfg.depths,
            cfg.basis_bits,
            cfg.runtime,
            cfg.gptq,
            cfg.scale_bits,
        )
        clock = [time.perf_counter()]
        plain = [Layer.of(ctx.graph, s, ctx.stats) for s in sites]
        model = ctx.graph.proto()
        probe = Probe(model, ctx.data, cfg.gain_samples) if cfg.gains else None
        if probe is not None:
            gains = probe.gains(model, sites, lambda s, e: output_error(s, ctx.stats.get(s), e))
            for layer in plain:
                layer.gain = gains[layer.site.name]

        def curves(layer: Layer) -> tuple:  # what only the curves need goes once they are made
            tq_layer = codec.layer(layer)
            return tq_layer, codec.options(tq_layer)

        layers, options = [], {}
        made = layer_map(curves, plain, codec.working_set)  # wide layers' transforms beside few others
        for tq_layer, mine in bar(made, total=len(plain), desc="tq transforms and curves"):
            layers.append(tq_layer)
            options[tq_layer.site.name] = mine
        weights = sum(int(np.prod(s.shape)) for s in sites)
        target = self._target(ctx, sites, weights, probe)
        chosen = allocate(options, **target)
        clock.append(time.perf_counter())
        pristine = model if cfg.size else None
        for attempt in range(SIZE_ATTEMPTS):
            records, predicted, bound_bits = self._emit_all(ctx, codec, sites, layers, options, chosen)
            excess = _live_bytes(ctx.graph) + SIZE_MARGIN - cfg.size if cfg.size else 0
            if excess <= 0:
                break
            if attempt == SIZE_ATTEMPTS - 1:
                report.notes.append(f"size target {cfg.size:,d} B missed by {excess:,d} B")
                break
            # graph structure (nodes, names, tensor headers) was not in the budget: take it off what the
            # allocation used (it may have left part of its budget unspent) and redo
            target["max_bits"] = min(target["max_bits"], chosen.bits) - 8.0 * excess * 1.1
            chosen = allocate(options, **target)
            ctx.graph = Graph(pristine)
        report.records.extend(records)
        clock.append(time.perf_counter())
        report.notes.append(
            f"time: transforms, gains, curves and allocation {clock[1] - clock[0]:.0f} s; "
            f"quantization and emission {clock[2] - clock[1]:.0f} s"
        )
        nominal_bits = sum(r.nominal_bits * int(np.prod(r.shape)) for r in records)
        stored = sum(r.bytes_after for r in records)
        report.rate = Rate(
            weights,
            8 * stored / weights,
            nominal=nominal_bits / weights,
            bound=bound_bits / weights,
            predicted=chosen.bits / weights,
            target=cfg.rate if not (cfg.size or cfg.sqnr) else None,
        )
        report.notes.append(
            f"rate over {weights:,d} weights: nominal {report.rate.nominal:.3f} b/w, container "
            f"{report.rate.stored:.3f} b/w ({stored:,d} B), Gaussian bound {report.rate.bound:.3f} b/w at the "
            f"distortion reached; allocation predicted {report.rate.predicted:.3f} b/w"
        )
        report.transformed = sum(r.detail.startswith(("elt", "klt")) for r in records)
        report.notes.append(f"transform kept on {report.transformed} of {len(records)} layers ({cfg.transform})")
        if probe is not None:
            measured = probe.error(ctx.graph.proto())
            additivity = Additivity(probe.samples, db(probe.energy, predicted), db(probe.energy, measured))
            report.additivity = additivity
            report.notes.append(
                f"additivity on {probe.samples} inputs: predicted output SQNR {additivity.predicted_sqnr_db:.2f} dB "
                f"(Σ g·D), measured {additivity.measured_sqnr_db:.2f} dB"
            )
        if cfg.bias_correct:
            report.notes.append(bias_note(records, True))
        return report

    def _emit_all(self, ctx: Context, codec: TqCodec, sites, layers, options, chosen):
        """Every layer materialised as allocated and finished: (records, Σ g·D, bound bits)."""
        records, predicted, bound_bits = [], 0.0, 0.0
        by_name = {layer.site.name: layer for layer in layers}
        with bar(total=len(layers), desc="tq emit") as shown:
            for site, drift in sequential_stages(ctx, sites, self.config.sequential):
                layer = by_name[site.name]
                index, picks = chosen.choice[site.name]
                coded = options[site.name][index].materialize(picks, drift)
                record = finish(ctx.graph, layer.layer, coded, self.name, self.config.bias_correct)
                record.bound_bits = codec.bound_bits(layer, coded.output_error)
                records.append(record)
                predicted += layer.gain * coded.output_error
                bound_bits += (record.bound_bits or 0.0) * int(np.prod(site.shape))
                shown.update()
        return records, predicted, bound_bits

    def _target(self, ctx: Context, sites, weights: int, probe) -> dict:
        cfg = self.config
        if cfg.sqnr:
            return {"max_distortion": probe.energy / 10 ** (cfg.sqnr / 10)}
        if cfg.size:
            others = _live_bytes(ctx.graph) - sum(ctx.graph.nbytes(s.name) for s in sites)
            return {"max_bits": 8.0 * max(cfg.size - others, 0)}
        return {"max_bits": cfg.rate * weights}


def _live_bytes(graph: Graph) -> int:
    """Serialized size without what earlier passes left unused (dropped when the run ends)."""
    live = Graph(graph.proto())
    live.remove_dead()
    return live.proto().ByteSize()
