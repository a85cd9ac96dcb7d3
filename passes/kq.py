"""kq: kernel quantization — every k×k kernel becomes a low-bit index into a codebook of kernels.

After Kernel Quantization (KQ, 2020), post-training: the codec (onnxtq.codecs.kq) clusters each
layer's kernels, scaled per output channel, under the calibration Hessian's kk×kk blocks, quantizes
the codebook to `codebook_bits` and finishes by vector error feedback; the bias absorbs the mean
output error.

Depthwise convs have one kernel per channel and few channels per layer: a codebook of their own
would cost more than their indices, so by default (`share=depthwise`) all depthwise convs of one
kernel size share one codebook, learned on all their kernels together. Layers with fewer than
`min_kernels`·K kernels (e.g. an RGB stem) are quantized by per-channel RTN at `scalar_bits`.
1×1 convs, Gemm and MatMul weights are product-quantized when `pq` > 0 (row sub-vectors of `pq`
weights); otherwise they are left (skipped) for a later pass, e.g. `kq{bits=8},rtn{bits=8}`.

The report gives per layer the nominal and stored bits per weight (indices, its share of the
codebook, scales), K, the layer-output SQNR, and in a note the bits per parameter of the k×k convs,
as KQ reports them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from onnxtq.bias import bias_note
from onnxtq.codec import Layer
from onnxtq.codecs.kq import KqCodec
from onnxtq.finish import finish
from onnxtq.opsets import Emission
from onnxtq.pass_infra import ORIGINALS, STATS, Context, Pass, PassConfig, option
from onnxtq.progress import bar
from onnxtq.report import PassReport, WeightRecord
from onnxtq.weights import WeightSite, discover, quantizable


@dataclass(frozen=True)
class KqConfig(PassConfig):
    bits: int = option(8, "index bits per kernel: K = 2^bits codewords")
    codebook_bits: int = option(6, "bits of each codebook value (one float32 step per codebook)")
    metric: str = option("full", "full: kk×kk Hessian block per input channel | diag | none (plain squared error)")
    gptq: bool = option(True, "error feedback across input channels (layers with full statistics)")
    share: str = option("depthwise", "one codebook per kernel size for: depthwise convs | all layers | none")
    gain_bits: int = option(4, "depthwise scales: log-spaced table of 2^gain_bits float16 gains (0: float16 each)")
    min_kernels: int = option(4, "a codebook needs min_kernels·K kernels, else per-channel RTN at scalar_bits")
    scalar_bits: int = option(8, "bits of that RTN fallback")
    max_taps: int = option(0, "convs with more kernel taps are left for a later pass (0: no limit)")
    pq: int = option(0, "1×1 convs, Gemm, MatMul: sub-vector length of product quantization (0: left alone)")
    pq_bits: int = option(8, "index bits of product quantization")
    iterations: int = option(30, "Lloyd iterations at most")
    min_elements: int = option(0, "smaller weights stay in float")
    bias_correct: bool = option(True, "cancel the mean output error with the calibration input mean")
    seed: int = option(0, "k-means seed")

    def __post_init__(self):
        if not 1 <= self.bits <= 16 or not 1 <= self.pq_bits <= 16:
            raise ValueError(f"bits and pq_bits must be 1..16, not {self.bits} and {self.pq_bits}")
        if not 2 <= self.codebook_bits <= 8:
            raise ValueError(f"codebook_bits must be 2..8, not {self.codebook_bits}")
        if self.metric not in ("full", "diag", "none"):
            raise ValueError(f"metric must be full, diag or none, not '{self.metric}'")
        if self.share not in ("depthwise", "all", "none"):
            raise ValueError(f"share must be depthwise, all or none, not '{self.share}'")
        if self.gain_bits not in (0, *range(2, 9)):
            raise ValueError(f"gain_bits must be 0 or 2..8, not {self.gain_bits}")
        if self.scalar_bits not in range(2, 9):
            raise ValueError(f"scalar_bits must be 2..8, not {self.scalar_bits}")
        if self.pq and not 2 <= self.pq <= 16:
            raise ValueError(f"pq must be 0 or a sub-vector length 2..16, not {self.pq}")
        if self.min_kernels < 1 or self.iterations < 1 or self.max_taps < 0:
            raise ValueError("min_kernels and iterations must be positive, max_taps >= 0")


class KqPass(Pass):
    name = "kq"
    Config = KqConfig
    codes_weights = True
    needs = frozenset()
    uses = frozenset({STATS})
    preserves = frozenset({STATS, ORIGINALS})

    def emits(self) -> Emission:
        cfg = self.config
        bits = (cfg.bits, cfg.scalar_bits, cfg.gain_bits) + ((cfg.pq_bits,) if cfg.pq else ())
        return Emission(code_bits=bits, fp16_steps=True)  # float16 steps of the RTN fallback

    def run(self, ctx: Context) -> PassReport:
        cfg = self.config
        report = self.new_report()
        stats = ctx.stats if ctx.stats_fresh else None
        if stats is None and cfg.metric != "none":
            report.notes.append("no calibration statistics: plain squared error, no error feedback, no bias correction")
        codec = KqCodec(
            cfg.bits,
            cfg.codebook_bits,
            cfg.metric,
            cfg.gptq,
            cfg.gain_bits,
            cfg.min_kernels,
            cfg.scalar_bits,
            cfg.pq,
            cfg.pq_bits,
            cfg.iterations,
            cfg.seed,
        )
        jobs: dict[tuple, list[WeightSite]] = {}  # sites by codebook; a group's weights are read when it is coded
        for site in quantizable(discover(ctx.graph), cfg.min_elements, report):
            kk = int(np.prod(site.conv.kernel)) if site.conv is not None else 1
            why = self._why_not(site, kk)
            if why:
                report.records.append(WeightRecord.of(site, "skipped", reason=why))
                continue
            shared = cfg.share == "all" or (cfg.share == "depthwise" and site.kind == "depthwise" and kk > 1)
            key = (cfg.share, kk if kk > 1 else cfg.pq, kk == 1) if shared else (site.name,)
            jobs.setdefault(key, []).append(site)
        records = []
        for sites in bar(list(jobs.values()), desc=self.name, unit="codebook"):
            group = codec.code_group([Layer.of(ctx.graph, site, stats) for site in sites])
            if group.prepare is not None:
                group.prepare(ctx.graph, self.name)
            for layer, coded in zip(group.layers, group.coded):
                records.append(finish(ctx.graph, layer, coded, self.name, cfg.bias_correct))
        report.records.extend(records)
        self._notes(report, records, stats is not None)
        return report

    def takes(self, site: WeightSite) -> str:
        return self._why_not(site, int(np.prod(site.conv.kernel)) if site.conv is not None else 1)

    def _why_not(self, site: WeightSite, kk: int) -> str:
        cfg = self.config
        if site.kind in ("conv-transpose", "gather"):
            return f"{site.kind} weights are not handled by kq"
        if kk > 1:
            if cfg.max_taps and kk > cfg.max_taps:
                return f"{kk}-tap kernels above max_taps={cfg.max_taps}: left for a later pass"
            return ""
        if not cfg.pq:
            return "1×1 / dense weight: left for a later pass (pq=0)"
        if site.cols % cfg.pq:
            return f"reduction length {site.cols} is not a multiple of pq={cfg.pq}"
        return ""

    def _notes(self, report: PassReport, records: list[WeightRecord], have_stats: bool) -> None:
        done = [r for r in records if r.status == "quantized"]
        by_taps: dict[str, list[WeightRecord]] = {}
        for r in done:
            taps = "×".join(str(d) for d in r.shape[2:]) if len(r.shape) > 2 else "dense"
            by_taps.setdefault(taps, []).append(r)
        for taps, rs in sorted(by_taps.items()):
            size = sum(int(np.prod(r.shape)) for r in rs)
            nominal = sum(r.nominal_bits * int(np.prod(r.shape)) for r in rs) / size
            stored = 8 * sum(r.bytes_after for r in rs) / size
            report.notes.append(
                f"{taps} weights: {len(rs)} layers, {size:,d} parameters, nominal {nominal:.3f} b/param, "
                f"container {stored:.3f} b/param (indices, codebooks and scales counted)"
            )
        if self.config.bias_correct:
            report.notes.append(bias_note(report.records, have_stats))
