"""calibrate: stream calibration inputs through onnxruntime into per-layer statistics.

For every weight site with an activation, records m = E[x] and H = E[x xᵀ] over the
layer's input patches (see onnxtq.calibration.stats), H's covariance shrunk toward its
diagonal where the patches are few for the layer's width (`shrink=false`: the sample H).
Later passes read them from the context; a pass that changes activations marks them stale.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxtq.calibration import CalibrationConfig, collect
from onnxtq.errors import PreconditionError
from onnxtq.pass_infra import ORIGINALS, STATS, Context, Pass
from onnxtq.report import PassReport, WeightRecord
from onnxtq.weights import discover


@dataclass(frozen=True)
class CalibrateConfig(CalibrationConfig):
    def __post_init__(self):
        if self.mode not in ("auto", "full", "blocked", "diag"):
            raise ValueError(f"mode must be auto, full, blocked or diag, not '{self.mode}'")
        if self.products not in ("auto", "float64", "float32"):
            raise ValueError(f"products must be auto, float64 or float32, not '{self.products}'")
        if self.batch < 1 or self.block < 1 or self.memory_mb < 1 or self.max_positions < 0:
            raise ValueError("batch, block and memory_mb must be positive, max_positions >= 0")


class CalibratePass(Pass):
    name = "calibrate"
    Config = CalibrateConfig
    needs = frozenset()
    preserves = frozenset({STATS, ORIGINALS})  # it makes the statistics

    def run(self, ctx: Context) -> PassReport:
        if ctx.data is None:
            raise PreconditionError(
                "'calibrate' has no data",
                "give --calib DATA (.npz keyed by input names, or an image folder) or put calib.npz beside the model",
            )
        found = discover(ctx.graph)
        ctx.stats = collect(ctx.graph.proto(), found.sites, ctx.data, self.config)
        ctx.stats.options = dict(self.options)  # what a recalibration repeats
        ctx.stats_fresh = True
        report = self.new_report()
        for site in found.sites:
            stats = ctx.stats.summary(site)
            if stats is None:
                why = "no activation statistics for this kind of layer"
                if site.activation is not None:
                    why = "its input was never computed on the calibration data (an If branch not taken)"
                report.records.append(WeightRecord.of(site, "skipped", reason=why))
            else:
                detail = f"{stats.mode} H, d={stats.dim}, groups={stats.groups}, {stats.count} patches"
                if stats.shrinkage >= 0.005:
                    detail += f", covariance shrunk {100 * stats.shrinkage:.0f}% toward its diagonal"
                report.records.append(WeightRecord.of(site, "observed", reason=detail))
        report.notes.append(f"{ctx.stats.samples} samples from {ctx.stats.description}")
        return report
