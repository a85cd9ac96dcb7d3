"""Round-to-nearest: uniform codes per output channel or per block, 2–8 bits, MSE-optimal clipping.

Each group (a channel, or `block` consecutive weights along the reduction axis) gets its own step; the
clipping ratio is chosen per group to minimise the squared error, weighted by diag(H) = E[x²] of the
layer input when calibration statistics exist (`weighted`), so the error that matters, the layer
output's, is what is minimised. Codes are stored packed in INT2/INT4/INT8 (UINT with zero points when
asymmetric) and decoded by DequantizeLinear.
"""

from __future__ import annotations

import numpy as np

from onnxtq.calibration import importance
from onnxtq.codec import Codec, Coded, Layer, output_error
from onnxtq.emit import dequantized, emit_dequantize
from onnxtq.packing import container_bits
from onnxtq.quantize import Blocking, GroupCode, blocking_for, quantize_groups, step_dtype
from onnxtq.rd import Band, Option


class RtnCodec(Codec):
    name = "rtn"

    def __init__(
        self,
        bits: int,
        block: int = 0,
        symmetric: bool = True,
        clip: bool = True,
        weighted: bool = True,
        scale_bits: int = 32,
    ):
        self.bits, self.block, self.symmetric = bits, block, symmetric
        self.clip, self.weighted, self.scale_bits = clip, weighted, scale_bits

    def options(self, layer: Layer) -> list[Option]:
        """One point: this codec's bits and grouping."""
        coded, blocking, code = self.code_groups(layer)
        bits = layer.size * container_bits(self.bits) + side_bits(code)
        point = Band(np.array([self.bits]), np.array([float(bits)]), np.array([layer.gain * coded.output_error]))
        return [Option(f"rtn {self.bits}-bit", [point], materialize=lambda picks, drift=None: coded)]

    def code(self, layer: Layer, group_code: GroupCode | None = None) -> Coded:
        """The coded layer; `group_code` is `quantize_task(self.task(layer))` where that ran elsewhere. Its output
        error is left to the report (`finish`): nothing chooses by it."""
        return self.code_groups(layer, group_code, measure=False)[0]

    def task(self, layer: Layer) -> tuple:
        """The arguments of `quantize_task` for `layer`: the costly part, a pure function of plain arrays
        that any worker can run (onnxtq.parallel)."""
        site = layer.site
        blocking = blocking_for(site, self.block)
        weights, stats = None, layer.stats if self.weighted else None  # spilled statistics: one read
        if stats is not None:
            weights = blocking.to_groups(importance(site, stats))
        groups = blocking.to_groups(layer.w)
        return groups, self.bits, self.symmetric, self.clip, weights, step_dtype(site, self.scale_bits)

    def code_groups(
        self, layer: Layer, group_code: GroupCode | None = None, measure: bool = True
    ) -> tuple[Coded, Blocking, GroupCode]:
        """The coded layer with its grouping and its codes (for rates other than the container's); with `measure`,
        its output error (what an allocation weighs it by)."""
        site = layer.site
        blocking = blocking_for(site, self.block)
        group_code = group_code or quantize_task(self.task(layer))
        w_hat = dequantized(blocking, group_code)
        error = None
        if measure and layer.stats is not None:
            error = output_error(site, layer.stats, layer.w.astype(np.float64) - w_hat)
        coded = Coded(
            w_hat,
            lambda graph, pass_name: emit_dequantize(graph, site, blocking, group_code, pass_name),
            output_error=error,
        )
        return coded, blocking, group_code


def side_bits(code: GroupCode) -> int:
    """Bits of the steps and zero points."""
    groups = len(code.scale)
    zero_points = groups * container_bits(code.bits) if code.zero_point is not None else 0
    return groups * 8 * code.scale.dtype.itemsize + zero_points


def quantize_task(task: tuple) -> GroupCode:
    """quantize_groups over one layer's `RtnCodec.task`: importable, so a worker process can run it."""
    return quantize_groups(*task)
