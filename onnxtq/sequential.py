"""Sequential fitting: quantize layers in order, each fitted to the inputs the quantized network gives it.

The statistics of those inputs come from `collect_drift` (onnxruntime runs of the original and the
partly quantized network on the same batches); `drift_target` is the weight that maps them back to the
original outputs, and quantizing passes quantize that instead of W, so errors stop accumulating.
"""

from __future__ import annotations

import math

import numpy as np

from onnxtq.calibration import CalibrationConfig, collect_drift
from onnxtq.calibration.data import Source
from onnxtq.reconstruct import DAMP, Problems
from onnxtq.weights import WeightSite

#: Sequential fitting needs this many calibration patches per input dimension; below it (a classifier
#: on a few hundred images) a layer would memorise its calibration outputs, so it keeps the original target.
MIN_PATCHES_PER_INPUT = 16
#: Sequential statistics are gathered once per stage, running two networks each time. Per input the drift
#: run samples fewer conv positions than `calibrate` (512: 256 inputs still give 100+ patches per input
#: dimension), and it reads at most DRIFT_INPUT_VALUES input values (256 ImageNet crops); from larger inputs
#: (PP-OCR det's 736x992 pages) it takes fewer, with proportionally more positions from each.
DRIFT_POSITIONS = 512
DRIFT_INPUT_VALUES = 256 * 3 * 224 * 224


def drift_calibration(source: Source) -> CalibrationConfig:
    """The drift run's budget for `source`: its samples and conv positions per sample."""
    _, first = next(iter(source.batches(1)), (0, {}))  # an empty source fails in the drift run itself
    values = max(1, sum(v.size for v in first.values()))
    total = source.num_samples
    samples = max(1, min(total, DRIFT_INPUT_VALUES // values))
    return CalibrationConfig(samples=samples, max_positions=math.ceil(DRIFT_POSITIONS * total / samples))


def enough(stats) -> bool:
    return stats.count >= MIN_PATCHES_PER_INPUT * stats.dim


def stages(sites: list[WeightSite]) -> list[list[WeightSite]]:
    """Sites in order, those reading the same input together: one calibration run per stage."""
    by_input: dict = {}
    for site in sites:
        by_input.setdefault(site.activation or site.name, []).append(site)
    return list(by_input.values())


def sequential_stages(ctx, sites: list[WeightSite], sequential: bool):
    """(site, drift) in order: drift = (statistics of the inputs the network quantized so far gives the
    site, their cross moment with the original inputs), gathered once per stage as the caller emits the
    sites it got; None for every site when not `sequential`."""
    if not sequential:
        for site in sites:
            yield site, None
        return
    reference, budget = ctx.graph.proto(), drift_calibration(ctx.data)  # the network before any change
    for stage in stages(sites):
        drift = collect_drift(reference, ctx.graph.proto(), stage, ctx.data, budget)
        for site in stage:
            yield site, drift.get(site.name)


def drift_target(site: WeightSite, w: np.ndarray, own, cross) -> np.ndarray:
    """The weight that best maps the inputs x̃ a layer really gets to the outputs W·x it should give.

    Minimises E‖W·x − W*·x̃‖² + λ‖W* − W‖² (C = E[x̃ xᵀ], H̃ = E[x̃ x̃ᵀ]):
    W* = (W·Cᵀ + λW)(H̃ + λI)⁻¹, with λ = DAMP·mean(diag H̃) keeping W* at W in the input
    directions calibration never visits (rank-deficient H̃), where fitting would only memorise.
    """
    problems = Problems(own, site.rows)
    h = problems.hessian
    lam = DAMP * np.maximum(np.einsum("pdd->pd", h).mean(axis=1), 1e-30)[:, None, None]
    w0 = problems.split(w.astype(np.float64))
    c = Problems(cross, site.rows).hessian
    rhs = w0 @ np.swapaxes(c, 1, 2) + lam * w0
    eye = np.eye(h.shape[1])[None]
    return problems.join(np.linalg.solve(h + lam * eye, np.swapaxes(rhs, 1, 2)).swapaxes(1, 2))
