"""crq: ternary and low-bit weights by layer-wise reconstruction on calibration statistics.

The codec (onnxtq.codecs.crq) fits each layer to its calibration Hessian: RTN, a cluster-regularized
pull onto the grid (ADMM), step refits and GPTQ error feedback, keeping per output channel the best;
the bias then absorbs the mean output error. With `sequential=true` each layer is fitted, in order, to
the inputs x̃ it gets from the network quantized before it (statistics from onnxruntime runs of both
networks, `collect_drift`), so errors stop accumulating.

`ternary=true` restricts 2-bit codes to {−1, 0, +1} (INT2 container, opset 25). The first and last
quantized layers and depthwise convs are sensitive and small: they get `first_last_bits` and
`depthwise_bits` (0: same as `bits`), and the report lists them with their bytes (`kept`).
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxtq import parallel
from onnxtq.bias import bias_note
from onnxtq.codec import Layer
from onnxtq.codecs.crq import CrqCodec, crq_task
from onnxtq.finish import finish
from onnxtq.opsets import Emission
from onnxtq.pass_infra import ORIGINALS, STATS, Context, Pass, PassConfig, option
from onnxtq.progress import bar
from onnxtq.report import Kept, PassReport
from onnxtq.sequential import MIN_PATCHES_PER_INPUT, enough, sequential_stages
from onnxtq.weights import WeightSite, discover, quantizable


@dataclass(frozen=True)
class CrqConfig(PassConfig):
    bits: int = option(2, "bits per weight, 2..8")
    ternary: bool = option(False, "2-bit codes limited to {-1, 0, +1}, one step per group")
    block: int = option(0, "weights per step along the reduction axis, a power of two (0: one step per channel)")
    method: str = option("crq", "crq (cluster pull + GPTQ) | gptq | rtn (the same grids and policy, no reconstruction)")
    first_last_bits: int = option(8, "bits of the first and last quantized layers (0: same as bits)")
    depthwise_bits: int = option(8, "bits of depthwise convs (0: same as bits)")
    min_elements: int = option(1024, "smaller weights stay in float")
    scale_bits: int = option(32, "16: float16 steps (DequantizeLinear-23 output_dtype)")
    bias_correct: bool = option(True, "cancel the mean output error with the calibration input mean")
    sequential: bool = option(False, "fit each layer to the inputs of the network quantized before it")

    def __post_init__(self):
        if self.bits not in range(2, 9):
            raise ValueError(f"bits must be 2..8, not {self.bits}")
        if self.ternary and self.bits != 2:
            raise ValueError("ternary needs bits=2")
        if self.method not in ("crq", "gptq", "rtn"):
            raise ValueError(f"method must be crq, gptq or rtn, not '{self.method}'")
        for name in ("first_last_bits", "depthwise_bits"):
            if getattr(self, name) not in (0, *range(2, 9)):
                raise ValueError(f"{name} must be 0 or 2..8")
        if self.block and (self.block < 2 or self.block & (self.block - 1)):
            raise ValueError(f"block must be 0 or a power of two >= 2, not {self.block}")
        if self.scale_bits not in (16, 32):
            raise ValueError(f"scale_bits must be 16 or 32, not {self.scale_bits}")


class CrqPass(Pass):
    name = "crq"
    Config = CrqConfig
    codes_weights = True
    needs = frozenset({STATS})
    preserves = frozenset({STATS, ORIGINALS})

    def emits(self) -> Emission:
        cfg = self.config
        depths = tuple(b or cfg.bits for b in (cfg.bits, cfg.first_last_bits, cfg.depthwise_bits))
        return Emission(code_bits=depths, blocked=bool(cfg.block), fp16_steps=cfg.scale_bits == 16)

    def run(self, ctx: Context) -> PassReport:
        cfg = self.config
        report = self.new_report()
        sites = quantizable(discover(ctx.graph), cfg.min_elements, report)
        ends = {sites[0].name, sites[-1].name} if sites else set()
        codecs: dict[int, CrqCodec] = {}

        def codec_for(site: WeightSite) -> CrqCodec:
            bits = self._bits_for(site, ends)
            return codecs.setdefault(bits, CrqCodec(bits, cfg.ternary, cfg.block, cfg.method, cfg.scale_bits))

        if cfg.sequential:  # each layer fitted to the network quantized before it: one after the other, here
            stages = sequential_stages(ctx, sites, True)
            steps = ((Layer.of(ctx.graph, site, ctx.stats), drift, None) for site, drift in stages)
        else:  # independent layers: a task each, on a cluster when there is one (onnxtq.parallel)
            layers = (Layer.of(ctx.graph, site, ctx.stats) for site in sites)
            answers = parallel.tasks_of(layers, lambda layer: codec_for(layer.site).task(layer), crq_task)
            steps = ((layer, None, group_code) for layer, group_code in answers)
        for layer, drift, group_code in bar(steps, total=len(sites), desc=self.name, unit="weight"):
            codec = codec_for(layer.site)
            coded = codec.code(layer, drift, group_code)
            record = finish(ctx.graph, layer, coded, self.name, cfg.bias_correct)
            report.records.append(record)
            if codec.bits != cfg.bits:
                report.kept.append(Kept(layer.site.name, layer.site.kind, codec.bits, record.bytes_after))
        if report.kept:
            kept = ", ".join(f"{k.name} ({k.kind}, {k.bits} bits, {k.bytes:,d} B)" for k in report.kept)
            report.notes.append(f"kept at higher precision: {kept}")
        if cfg.bias_correct:
            report.notes.append(bias_note(report.records, True))
        if cfg.sequential:
            report.notes.append("each layer fitted to the inputs of the network quantized before it")
        few = [s.name for s in sites if cfg.sequential and (st := ctx.stats.get(s)) and not enough(st)]
        if few:
            report.notes.append(
                f"fitted to the original inputs (fewer than {MIN_PATCHES_PER_INPUT} calibration patches per input "
                "dimension to fit the quantized network's): " + ", ".join(few)
            )
        return report

    def _bits_for(self, site: WeightSite, ends: set[str]) -> int:
        cfg = self.config
        if site.name in ends and cfg.first_last_bits:
            return cfg.first_last_bits
        if site.kind == "depthwise" and cfg.depthwise_bits:
            return cfg.depthwise_bits
        return cfg.bits
