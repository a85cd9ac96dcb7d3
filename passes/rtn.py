"""rtn: uniform round-to-nearest weights, per output channel or in blocks, 2/4/8 bits.

Each group (a channel, or `block` consecutive weights along the reduction axis) gets
its own step; the clipping ratio is chosen per group to minimise the squared error,
weighted by diag(H) = E[x²] of the layer input when calibration statistics exist (so
the error that matters, the layer output's, is what is minimised). Codes are stored
packed in INT2/INT4/INT8 (UINT with zero points when asymmetric) and decoded by
DequantizeLinear. Depthwise convs are always per channel: their reduction axis has
one input channel. Weights under `min_elements` stay in float: on MobileNetV2 the first
conv and the first two depthwise convs (5.7 KB in all) cost 5 dB of logit SQNR at 8 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from onnxtq.bias import bias_note
from onnxtq.emit import replace_weight
from onnxtq.packing import min_opset
from onnxtq.pass_infra import Context, Pass, PassConfig
from onnxtq.quantize import Blocking, quantize_groups
from onnxtq.report import PassReport, WeightRecord
from onnxtq.weights import WeightSite, discover


@dataclass(frozen=True)
class RtnConfig(PassConfig):
    bits: int = 8
    block: int = 0  # 0 = per output channel
    symmetric: str = "auto"  # auto (symmetric from 3 bits up) | true | false
    clip: bool = True  # search the MSE-optimal clipping ratio
    weighted: bool = True  # weight the error by diag(H) when statistics exist
    min_elements: int = 1024  # smaller weights stay in float: they cost little and are often sensitive
    scale_bits: int = 32  # 16: float16 steps (DequantizeLinear-23 output_dtype), half the side information
    bias_correct: bool = True  # cancel the mean output error with the calibration input mean (needs statistics)

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


def blocking_for(site: WeightSite, block: int) -> Blocking:
    """Group layout of a site: channels on the output axis, blocks along the reduction axis."""
    out_axis = 1 if site.transposed else 0
    red_axis = 0 if site.transposed else 1
    if site.kind == "depthwise" or site.shape[red_axis] <= block:
        block = 0
    return Blocking(site.shape, out_axis, block, red_axis)


def fp32_steps_only(site: WeightSite) -> bool:
    """MatMul weights take float32 steps: with float16 ones, onnxruntime's (1.32) load-time fusion
    of DequantizeLinear->MatMul into MatMulNBits builds a node it then rejects as mistyped."""
    return site.op == "MatMul"


def quantizable(found, min_elements: int, report: PassReport) -> list[WeightSite]:
    """The sites a quantizing pass rewrites; every other candidate is recorded as skipped, with why."""
    for name, node, reason in found.skipped:
        report.records.append(WeightRecord(name, node, "", "skipped", reason=reason))
    sites = []
    for site in found.sites:
        size = int(np.prod(site.shape))
        if size < min_elements:
            reason = f"kept in float: {size} elements < min_elements={min_elements}"
            report.records.append(WeightRecord.of(site, "skipped", reason=reason))
        else:
            sites.append(site)
    return sites


class RtnPass(Pass):
    name = "rtn"
    Config = RtnConfig
    uses_stats = True

    def min_opset(self) -> int:
        needs = [min_opset(self.config.bits), 21 if self.config.block else 13]
        return max(needs + ([23] if self.config.scale_bits == 16 else []))

    def run(self, ctx: Context) -> PassReport:
        report = self.new_report()
        sites = quantizable(discover(ctx.graph), self.config.min_elements, report)
        fresh = ctx.stats if ctx.stats_fresh else None
        if self.config.weighted and ctx.stats is not None and not ctx.stats_fresh:
            report.notes.append("statistics are stale after an earlier pass: plain weight MSE used")
        for site in tqdm(sites, desc=self.name, unit="weight", disable=None, leave=False):
            report.records.append(self._quantize(ctx, site, fresh))
        weighted = fresh is not None and self.config.weighted
        report.notes.append(
            "error weighted by calibration diag(H)" if weighted else "error = plain weight MSE (no statistics)"
        )
        if self.config.bias_correct:
            report.notes.append(bias_note(report.records, fresh is not None))
        kept = [s for s in sites if fp32_steps_only(s)]
        if self.config.scale_bits == 16 and kept:
            report.notes.append(
                f"float32 steps kept for {len(kept)} MatMul weights: onnxruntime fuses DequantizeLinear->MatMul "
                "into MatMulNBits and then refuses float16 steps with float32 activations"
            )
        return report

    def _quantize(self, ctx: Context, site: WeightSite, stats) -> WeightRecord:
        cfg = self.config
        blocking = blocking_for(site, cfg.block)
        importance = stats.importance(site) if stats is not None and cfg.weighted else None
        h = None if importance is None else blocking.to_groups(importance)
        scale_dtype = np.float16 if cfg.scale_bits == 16 and not fp32_steps_only(site) else np.float32
        w = ctx.graph.array(site.name)
        code = quantize_groups(blocking.to_groups(w), cfg.bits, cfg.is_symmetric, cfg.clip, h, scale_dtype)
        layer = stats.get(site) if stats is not None else None
        return replace_weight(ctx.graph, site, blocking, code, layer, self.name, cfg.bias_correct)
