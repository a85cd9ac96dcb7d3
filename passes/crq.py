"""crq: ternary and low-bit weights by layer-wise reconstruction on calibration statistics.

Cluster-regularized quantization (Hu et al., 2019) pulls full-precision weights toward their
cluster centres while retraining. Without labels or a training loop we do the same per layer
on the calibration Hessian H = E[x xᵀ] (onnxtq.reconstruct):

1. a starting grid per channel (or block): RTN with the output-weighted MSE-optimal clip;
2. `method=crq`: ADMM pulls the weights onto that grid while keeping the layer output error
   tr(ΔW H ΔWᵀ) small, the steps are refitted in closed form, and GPTQ error-feedback rounding
   finishes on the refitted grid; `method=gptq`: GPTQ rounding and step refits only;
   `method=rtn`: step 1 alone, the baseline at the same bits and precision policy;
3. per output channel, the candidate (RTN, ADMM, GPTQ) with the smallest output error is kept,
   so a layer never ends worse than RTN on its own objective; then the bias is corrected.

With `sequential=true` each layer is fitted, in order, to the inputs x̃ it gets from the network
quantized before it (statistics from onnxruntime runs of both networks, `collect_drift`): the
target becomes the weight that maps x̃ to the original outputs W·x, so errors stop accumulating.

`ternary=true` restricts 2-bit codes to {−1, 0, +1} (INT2 container, opset 25). The first and
last quantized layers and depthwise convs are sensitive and small: they get `first_last_bits`
and `depthwise_bits` (0: same as `bits`), and the report says what each kept layer costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from onnxtq.passes.rtn import blocking_for, fp32_steps_only, quantizable
from tqdm import tqdm

from onnxtq.bias import bias_note
from onnxtq.calibration import collect_drift, importance
from onnxtq.emit import replace_weight
from onnxtq.graph import copy_model
from onnxtq.packing import min_opset
from onnxtq.pass_infra import Context, Pass, PassConfig
from onnxtq.quantize import GroupCode, int_range, quantize_groups
from onnxtq.reconstruct import Grid, Problems, cluster_pull, gptq, refit_steps
from onnxtq.report import PassReport, WeightRecord
from onnxtq.sequential import MIN_PATCHES_PER_INPUT, drift_calibration, drift_target, enough, stages
from onnxtq.weights import WeightSite, discover

#: Above this depth the grid is fine enough that the cluster pull gains nothing GPTQ does not.
CLUSTER_PULL_MAX_BITS = 4


@dataclass(frozen=True)
class CrqConfig(PassConfig):
    bits: int = 2
    ternary: bool = False  # 2-bit codes limited to {-1, 0, +1}, one step per group
    block: int = 0  # 0 = per output channel
    method: str = "crq"  # crq (cluster pull + GPTQ) | gptq | rtn (the same grids and policy, no reconstruction)
    first_last_bits: int = 8  # bits of the first and last quantized layers (0: same as bits)
    depthwise_bits: int = 8  # bits of depthwise convs (0: same as bits)
    min_elements: int = 1024
    scale_bits: int = 32
    bias_correct: bool = True
    sequential: bool = False  # fit each layer to the inputs of the network quantized before it

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
    needs_stats = True

    def min_opset(self) -> int:
        cfg = self.config
        lowest = min(b or cfg.bits for b in (cfg.bits, cfg.first_last_bits, cfg.depthwise_bits))
        return max(min_opset(lowest), 21 if cfg.block else 13, 23 if cfg.scale_bits == 16 else 0)

    def run(self, ctx: Context) -> PassReport:
        report = self.new_report()
        sites = quantizable(discover(ctx.graph), self.config.min_elements, report)
        ends = {sites[0].name, sites[-1].name} if sites else set()
        if self.config.sequential:  # the network before any weight changes, to run beside the current one
            reference, budget = copy_model(ctx.graph.model), drift_calibration(ctx.data)
        kept = []
        with tqdm(total=len(sites), desc=self.name, unit="weight", disable=None, leave=False) as bar:
            for stage in stages(sites) if self.config.sequential else [sites]:
                drift = {}
                if self.config.sequential:
                    drift = collect_drift(reference, ctx.graph.model, stage, ctx.data, budget)
                for site in stage:
                    bits = self._bits_for(site, ends)
                    record = self._quantize(ctx, site, bits, drift.get(site.name))
                    report.records.append(record)
                    if bits != self.config.bits:
                        kept.append(f"{site.name} ({site.kind}, {bits} bits, {record.bytes_after:,d} B)")
                    bar.update()
        if kept:
            report.notes.append(f"kept at higher precision: {', '.join(kept)}")
        if self.config.bias_correct:
            report.notes.append(bias_note(report.records, True))
        if self.config.sequential:
            report.notes.append("each layer fitted to the inputs of the network quantized before it")
        few = [s.name for s in sites if self.config.sequential and (st := ctx.stats.get(s)) and not enough(st)]
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

    def _quantize(self, ctx: Context, site: WeightSite, bits: int, drift=None) -> WeightRecord:
        """Quantize one weight; `drift` = (stats of the inputs it really gets, cross moment with the originals)."""
        cfg = self.config
        w = ctx.graph.array(site.name)
        blocking = blocking_for(site, cfg.block)
        reference = ctx.stats.get(site)
        layer, target = reference, w
        if drift is not None and enough(drift[0]):
            layer, cross = drift
            target = site.from_matrix(drift_target(site, site.to_matrix(w), layer, cross)).astype(w.dtype)
        ternary = cfg.ternary and bits == 2
        symmetric = ternary or bits >= 3
        qrange = (-1, 1) if ternary else int_range(bits, symmetric)
        h = None if layer is None else blocking.to_groups(importance(site, layer))
        scale_dtype = np.float16 if cfg.scale_bits == 16 and not fp32_steps_only(site) else np.float32
        code = quantize_groups(blocking.to_groups(target), bits, symmetric, True, h, scale_dtype, qrange)
        if cfg.method != "rtn" and layer is not None and site.to_matrix(w).shape[1] == layer.dim:
            code = reconstruct(site, target, blocking, code, layer, qrange, scale_dtype, cfg.method)
        return replace_weight(
            ctx.graph,
            site,
            blocking,
            code,
            layer,
            self.name,
            cfg.bias_correct,
            reference if layer is not reference else None,
        )


def reconstruct(site, w, blocking, code: GroupCode, layer, qrange, scale_dtype, method: str = "crq") -> GroupCode:
    """Per output channel, the best of RTN, (ADMM →) refit → GPTQ on the layer objective."""
    per_channel = not blocking.block
    size = blocking.to_groups(w).shape[1]

    def layout(per_group: np.ndarray) -> np.ndarray:  # per-group values → matrix of the weight's shape
        full = np.repeat(per_group.astype(np.float64)[:, None], size, axis=1)
        return site.to_matrix(blocking.from_groups(full))

    problems = Problems(layer, site.rows)
    w0 = problems.split(site.to_matrix(w).astype(np.float64))
    zero = code.zero_point if code.zero_point is not None else np.zeros(len(code.scale))
    start = Grid(problems.split(layout(code.scale.astype(np.float64)), 1.0), problems.split(layout(zero)), *qrange)
    candidates = [(start.codes(w0), start)]  # RTN
    grid = start
    if method == "crq" and code.bits <= CLUSTER_PULL_MAX_BITS:
        pulled = cluster_pull(w0, problems.hessian, start)
        candidates.append((pulled, start))
        if per_channel:
            grid = Grid(problems.split(layout(refit_steps(problems, w0, pulled, start)), 1.0), start.zero, *qrange)
    for _ in range(2):
        codes = gptq(w0, problems.hessian, grid)
        candidates.append((codes, grid))
        if not per_channel:
            break
        grid = Grid(problems.split(layout(refit_steps(problems, w0, codes, grid)), 1.0), grid.zero, *qrange)
        candidates.append((codes, grid))
    errors = np.stack([problems.row_error(g.values(c) - w0) for c, g in candidates])  # [candidates, n]
    best = errors.argmin(axis=0)
    q_rows = np.stack([problems.join(c) for c, _ in candidates])[best, np.arange(site.rows)]
    q = blocking.to_groups(site.from_matrix(q_rows)).astype(np.int32)
    scale = code.scale
    if per_channel:
        steps = np.stack([problems.join(g.step)[:, 0] for _, g in candidates])[best, np.arange(site.rows)]
        scale = np.where(steps > 0, steps, code.scale).astype(scale_dtype)
        q = np.clip(q, *qrange)
    return GroupCode(q, scale, code.zero_point, code.bits)
