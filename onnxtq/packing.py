"""Integer containers for codes: the smallest ONNX type that holds b bits, stored packed.

INT2/UINT2 (opset 25) hold four codes per byte, INT4/UINT4 (opset 21) two, low bits
first, as ONNX specifies. `onnx.helper.make_tensor` with a Python int list would store
INT4 as varints in `int32_data` (~6 bits per value), so we always write packed `raw_data`
through ml_dtypes and check the byte count.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

from onnxtq.model_io import tensor_nbytes

_CONTAINERS = {
    (2, True): ml_dtypes.int2,
    (2, False): ml_dtypes.uint2,
    (4, True): ml_dtypes.int4,
    (4, False): ml_dtypes.uint4,
    (8, True): np.int8,
    (8, False): np.uint8,
    (16, True): np.int16,
    (16, False): np.uint16,
}


def container_bits(bits: int) -> int:
    """Width of the ONNX integer type that holds `bits`-bit codes."""
    for width in (2, 4, 8, 16):
        if bits <= width:
            return width
    raise ValueError(f"{bits}-bit codes have no ONNX integer container")


def min_opset(bits: int) -> int:
    """Opset whose DequantizeLinear accepts the container of `bits`-bit codes."""
    return {2: 25, 4: 21, 8: 13, 16: 21}[container_bits(bits)]


def int_tensor(name: str, codes: np.ndarray, bits: int, signed: bool) -> onnx.TensorProto:
    """Packed TensorProto of integer codes in the container for `bits`."""
    dtype = _CONTAINERS[(container_bits(bits), signed)]
    t = numpy_helper.from_array(np.asarray(codes).astype(dtype), name)
    if len(t.raw_data) != tensor_nbytes(t):  # self-check: never ship unpacked sub-byte data
        raise AssertionError(f"{name}: {len(t.raw_data)} bytes stored, {tensor_nbytes(t)} expected")
    return t
