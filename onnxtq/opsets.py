"""Which opset an emission needs, computed in one place from what a pass declares it may write.

| what is written                                   | needs opset |
|---------------------------------------------------|-------------|
| DequantizeLinear over INT8/UINT8 codes, per axis   | 13          |
| INT4/UINT4 codes, INT16 codes, or blocked steps    | 21          |
| float16 steps decoded to float32 (`output_dtype`)  | 23          |
| INT2/UINT2 codes (lookup indices, 6/10-bit planes) | 25          |

A pass declares an `Emission`; the manager upgrades the model once, to the highest opset any pass of
the pipeline needs (onnx.version_converter, real op conversion), before the first pass runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from onnxtq.packing import min_opset, planes


@dataclass(frozen=True)
class Emission:
    """What a pass may write: the bit depths of its codes or indices, whether its steps are blocked or
    float16, and any other op's need (`ops`: the opset its other nodes need)."""

    code_bits: tuple[int, ...] = ()
    blocked: bool = False
    fp16_steps: bool = False
    ops: int = 0

    @property
    def opset(self) -> int:
        needs = [self.ops, 21 if self.blocked else 0, 23 if self.fp16_steps else 0]
        needs += [min_opset(width) for b in self.code_bits if b for width in planes(b)]
        if self.code_bits:
            needs.append(13)  # per-axis DequantizeLinear
        return max(needs)


def opset_for(emissions) -> int:
    """The opset a pipeline's emissions need together (0: any)."""
    return max((e.opset for e in emissions), default=0)
