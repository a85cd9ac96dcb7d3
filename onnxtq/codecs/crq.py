"""Cluster-regularized quantization, post-training: ternary and low-bit weights by layer-wise reconstruction.

CRQ (Hu et al., 2019) pulls full-precision weights toward their cluster centres while retraining.
Without labels or a training loop we do the same per layer on the calibration Hessian H = E[x xᵀ]
(onnxtq.reconstruct):

1. a starting grid per channel (or block): RTN with the output-weighted MSE-optimal clip;
2. `method=crq`: ADMM pulls the weights onto that grid while keeping the layer output error
   tr(ΔW H ΔWᵀ) small, the steps are refitted in closed form, and GPTQ error-feedback rounding
   finishes on the refitted grid; `method=gptq`: GPTQ rounding and step refits only;
   `method=rtn`: step 1 alone, the baseline at the same bits and precision policy;
3. per output channel the candidate (RTN, ADMM, GPTQ) with the smallest output error is kept,
   so a layer never ends worse than RTN on its own objective.

Fitted to drifted inputs (sequential fitting) the target becomes the weight that maps the inputs x̃
the quantized network gives the layer to the original outputs W·x, so errors stop accumulating.
`ternary` restricts 2-bit codes to {−1, 0, +1} (INT2 container).
"""

from __future__ import annotations

import numpy as np

from onnxtq.calibration import importance
from onnxtq.codec import Codec, Coded, Layer, distortion
from onnxtq.emit import dequantized, emit_dequantize
from onnxtq.packing import container_bits
from onnxtq.quantize import GroupCode, blocking_for, int_range, quantize_groups, step_dtype
from onnxtq.rd import Band, Option
from onnxtq.reconstruct import reconstruct
from onnxtq.sequential import drift_target, enough


class CrqCodec(Codec):
    name = "crq"

    def __init__(self, bits: int, ternary: bool = False, block: int = 0, method: str = "crq", scale_bits: int = 32):
        self.bits, self.ternary, self.block, self.method, self.scale_bits = bits, ternary, block, method, scale_bits

    def options(self, layer: Layer) -> list[Option]:
        """One point: these bits, reconstructed on the layer's own statistics (refitted to drifted inputs
        when materialised with them)."""
        coded = self.code(layer)
        site = layer.site
        groups = blocking_for(site, self.block).to_groups(layer.w).shape[0]
        steps = groups * 8 * np.dtype(step_dtype(site, self.scale_bits)).itemsize
        zero_points = 0 if self.ternary or self.bits >= 3 else groups * container_bits(self.bits)
        point = Band(
            np.array([self.bits]),
            np.array([float(layer.size * container_bits(self.bits) + steps + zero_points)]),
            np.array([distortion(layer, coded.w_hat - layer.w.astype(np.float64))]),
        )

        def materialize(picks, drift=None) -> Coded:
            return coded if drift is None else self.code(layer, drift)

        return [Option(f"crq {self.bits}-bit", [point], materialize=materialize)]

    def code(self, layer: Layer, drift=None, group_code: GroupCode | None = None) -> Coded:
        """The layer coded at this codec's bits; with `drift` (own, cross statistics) fitted to those inputs;
        `group_code` is `crq_task(self.task(layer, drift))` where that ran elsewhere."""
        site = layer.site
        blocking = blocking_for(site, self.block)
        group_code = group_code or crq_task(self.task(layer, drift))
        return Coded(
            dequantized(blocking, group_code),
            lambda graph, pass_name: emit_dequantize(graph, site, blocking, group_code, pass_name),
            inputs=drift[0] if _fits_drift(drift) else None,
        )

    def task(self, layer: Layer, drift=None) -> tuple:
        """The arguments of `crq_task`: the costly part, a pure function of plain data that any worker can run
        (onnxtq.parallel)."""
        site, w = layer.site, layer.w
        stats, target = layer.stats, w
        if _fits_drift(drift):
            inputs, cross = drift
            stats = inputs
            target = site.from_matrix(drift_target(site, site.to_matrix(w), inputs, cross)).astype(w.dtype)
        ternary = self.ternary and self.bits == 2
        symmetric = ternary or self.bits >= 3
        qrange = (-1, 1) if ternary else int_range(self.bits, symmetric)
        method = self.method if stats is not None and site.to_matrix(w).shape[1] == stats.dim else "rtn"
        grid = (self.bits, symmetric, qrange, step_dtype(site, self.scale_bits), method)
        return site, target, blocking_for(site, self.block), stats, grid


def _fits_drift(drift) -> bool:
    return drift is not None and enough(drift[0])


def crq_task(task: tuple) -> GroupCode:
    """RTN on the output-weighted grid, then (but for method rtn) the reconstruction: one layer's codes."""
    site, target, blocking, stats, (bits, symmetric, qrange, scale_dtype, method) = task
    h = None if stats is None else blocking.to_groups(importance(site, stats))
    code = quantize_groups(blocking.to_groups(target), bits, symmetric, True, h, scale_dtype, qrange)
    if method != "rtn":
        code = reconstruct(site, target, blocking, code, stats, qrange, scale_dtype, method)
    return code
