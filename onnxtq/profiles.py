"""Runtime profiles (`--target`): what a file may hold, by the runtimes it must load on.

| profile    | for                     | what the file holds                                                    |
|------------|-------------------------|------------------------------------------------------------------------|
| `ort`      | onnxruntime (default)   | DequantizeLinear over INT2/INT4/INT8 codes, at the opset each needs    |
|            |                         | (INT4, blocked: 21; float16 steps: 23; INT2: 25); codes stay in RAM    |
| `portable` | every runtime           | the model's own opset (at least 13), no DequantizeLinear: 2/4-bit codes |
|            |                         | packed in UINT8 bytes, decoded by a lookup table, steps multiplied in |
|            |                         | (lower-codes, onnxtq.lowering); every runtime folds them at load       |
| `fast`     | latency                 | `ort`, then dequantize-at-load: float weights made at load, FP32 speed |
| `lowmem`   | memory                  | `ort`, codes kept in RAM (dequantize-at-load refused); embedding       |
|            |                         | tables gathered as codes, only the rows looked up decoded              |
|            |                         | (gather-codes); MatMul weights run as onnxruntime's MatMulNBits        |

Passes write the same codes under every profile; the manager sets the opset from the profile, and ends the
pipeline with the profile's own finalising passes. Which onnxruntime loads a file follows from its opset and
IR version and its codes (`min_onnxruntime`); the file says so in its metadata (`onnxtq.runtime`).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxtq.errors import UsageError
from onnxtq.graph import proto_opset
from onnxtq.opsets import Emission, opset_for


@dataclass(frozen=True)
class Profile:
    """One row of the table above."""

    name: str
    purpose: str
    lowers: bool = False  # codes its opset cannot hold are lowered to arithmetic (portable)
    keeps_codes: bool = False  # refuses dequantize-at-load (lowmem)

    def opset(self, emissions: list[Emission]) -> int:
        """The opset the pipeline's file declares (0: the model's own)."""
        if not self.lowers:
            return opset_for(emissions)
        return max([PORTABLE_OPSET] + [e.ops for e in emissions])


#: The least opset a portable file declares: per-axis DequantizeLinear over INT8 codes.
PORTABLE_OPSET = 13

PROFILES = {
    p.name: p
    for p in (
        Profile("ort", "onnxruntime: codes in the narrowest container, at the opset it needs"),
        Profile("portable", "every runtime: the model's opset, sub-byte codes packed in bytes", lowers=True),
        Profile("fast", "latency: weights folded to floats when the session loads"),
        Profile("lowmem", "memory: codes stay compressed in RAM", keeps_codes=True),
    )
}
DEFAULT = PROFILES["ort"]


def profile(name: str) -> Profile:
    """The profile named `name`, or a usage error listing them."""
    if name not in PROFILES:
        raise UsageError(f"unknown target '{name}'", f"choose one of: {', '.join(PROFILES)}")
    return PROFILES[name]


#: onnxruntime releases (CPU) by the highest opset and IR version they load, and the first that runs each kind
#: of code right; measured on every 1.x from 1.17 to 1.32 (newest patch) by benchmarks/ort_versions.py (tiny
#: models) and benchmarks/ort_floor.py (onnxtq's files). 1.23–1.30 load float16 steps decoded to float32
#: (DequantizeLinear `output_dtype`) and then fail to run them, or run them wrong (1.25, 1.26: 0.1 of the range);
#: 1.25 and 1.26 also compute a MatMul wrong whose 4-bit weight has one step for the whole tensor (ecsq).
LOADS = [("1.17", 20, 9), ("1.18", 21, 10), ("1.21", 22, 10), ("1.23", 23, 11), ("1.24", 25, 13)]
FIRST_RIGHT = {"int4": "1.19", "cast-int4": "1.23", "int4-one-step-matmul": "1.27", "output_dtype": "1.31"}
_INT4 = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split("."))


def min_onnxruntime(model: onnx.ModelProto) -> str:
    """The oldest onnxruntime that loads and runs the model right (by its opset, IR version and codes)."""
    opset = proto_opset(model)
    fits = [v for v, max_opset, max_ir in LOADS if opset <= max_opset and model.ir_version <= max_ir]
    needs = [fits[0] if fits else f"{LOADS[-1][0]}+"]
    types = {t.name: t.data_type for t in model.graph.initializer}
    scalars = {t.name for t in model.graph.initializer if not t.dims}
    matmul_inputs = {name for node in model.graph.node if node.op_type == "MatMul" for name in node.input}
    for node in model.graph.node:
        reads = {types.get(name) for name in node.input}
        if node.op_type == "DequantizeLinear" and reads & _INT4:
            needs.append(FIRST_RIGHT["int4"])
            if node.input[1] in scalars and node.output[0] in matmul_inputs:
                needs.append(FIRST_RIGHT["int4-one-step-matmul"])
        if node.op_type == "Cast" and reads & _INT4:
            needs.append(FIRST_RIGHT["cast-int4"])
        if node.op_type == "DequantizeLinear" and any(a.name == "output_dtype" for a in node.attribute):
            needs.append(FIRST_RIGHT["output_dtype"])
    return max(needs, key=lambda v: _version(v.rstrip("+")))
