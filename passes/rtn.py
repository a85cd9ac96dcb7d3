"""rtn: uniform round-to-nearest weights, per output channel or in blocks, 2–8 bits.

The codec (onnxtq.codecs.rtn) chooses per group the step whose clipping minimises the output-weighted
squared error when calibration statistics exist, else the plain weight MSE; the layer's bias absorbs
the mean output error the rounding adds (b ← b − (Ŵ − W)·E[x], from calibration). Depthwise convs are
always per channel: their reduction axis has one input channel. Weights under `min_elements` stay in
float: on MobileNetV2 the first conv and the first two depthwise convs (5.7 KB in all) cost 5 dB of
logit SQNR at 8 bits.

It reads only H's diagonal and the input mean, so `calibrate{mode=diag}` gives it all it uses, far quicker
on a big model; a full H serves only the report's per-layer output errors.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxtq import parallel
from onnxtq.bias import bias_note
from onnxtq.codec import Layer
from onnxtq.codecs.rtn import RtnCodec, quantize_task
from onnxtq.finish import finish
from onnxtq.opsets import Emission
from onnxtq.pass_infra import ORIGINALS, STATS, Context, Pass, PassConfig, option
from onnxtq.progress import bar
from onnxtq.report import PassReport
from onnxtq.weights import discover, quantizable


@dataclass(frozen=True)
class RtnConfig(PassConfig):
    bits: int = option(8, "bits per weight, 2..8")
    block: int = option(0, "weights per step along the reduction axis, a power of two (0: one step per channel)")
    symmetric: str = option("auto", "auto (symmetric from 3 bits up) | true | false (zero points)")
    clip: bool = option(True, "search the MSE-optimal clipping ratio per group")
    weighted: bool = option(True, "weight the error by the calibration diag(H) when statistics exist")
    min_elements: int = option(1024, "smaller weights stay in float: they cost little and are often sensitive")
    scale_bits: int = option(32, "16: float16 steps (DequantizeLinear-23 output_dtype), half the side information")
    bias_correct: bool = option(True, "cancel the mean output error with the calibration input mean")

    def __post_init__(self):
        if self.bits not in (2, 3, 4, 5, 6, 7, 8):
            raise ValueError(f"bits must be 2..8, not {self.bits}")
        if self.block and (self.block < 2 or self.block & (self.block - 1)):
            raise ValueError(f"block must be 0 or a power of two >= 2, not {self.block}")
        if self.scale_bits not in (16, 32):
            raise ValueError(f"scale_bits must be 16 or 32, not {self.scale_bits}")
        if self.symmetric not in ("auto", "true", "false"):
            raise ValueError(f"symmetric must be auto, true or false, not '{self.symmetric}'")

    @property
    def is_symmetric(self) -> bool:
        return self.bits >= 3 if self.symmetric == "auto" else self.symmetric == "true"


class RtnPass(Pass):
    name = "rtn"
    Config = RtnConfig
    codes_weights = True
    needs = frozenset()
    uses = frozenset({STATS})
    preserves = frozenset({STATS, ORIGINALS})

    def emits(self) -> Emission:
        cfg = self.config
        return Emission(code_bits=(cfg.bits,), blocked=bool(cfg.block), fp16_steps=cfg.scale_bits == 16)

    def run(self, ctx: Context) -> PassReport:
        cfg = self.config
        report = self.new_report()
        sites = quantizable(discover(ctx.graph), cfg.min_elements, report)
        stats = ctx.stats if ctx.stats_fresh else None
        codec = RtnCodec(cfg.bits, cfg.block, cfg.is_symmetric, cfg.clip, cfg.weighted, cfg.scale_bits)
        layers = (Layer.of(ctx.graph, site, stats) for site in sites)
        answers = parallel.tasks_of(layers, codec.task, quantize_task)
        for layer, group_code in bar(answers, total=len(sites), desc=self.name, unit="weight"):
            coded = codec.code(layer, group_code)
            report.records.append(finish(ctx.graph, layer, coded, self.name, cfg.bias_correct))
        weighted = stats is not None and cfg.weighted
        report.notes.append(
            "error weighted by calibration diag(H)" if weighted else "error = plain weight MSE (no statistics)"
        )
        if cfg.bias_correct:
            report.notes.append(bias_note(report.records, stats is not None))
        kept = [s for s in sites if s.op == "MatMul"]
        if cfg.scale_bits == 16 and kept:
            report.notes.append(
                f"float32 steps kept for {len(kept)} MatMul weights: onnxruntime fuses DequantizeLinear->MatMul "
                "into MatMulNBits and then refuses float16 steps with float32 activations"
            )
        return report
