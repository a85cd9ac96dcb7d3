"""Integer containers for codes: the smallest ONNX type that holds b bits, stored packed.

INT2/UINT2 (opset 25) hold four codes per byte, INT4/UINT4 (opset 21) two, low bits first, as ONNX
specifies. Depths between the containers (6, 10, 12 bits) are stored as two planes, a signed high one and
an unsigned low one, each in its own container (PLANES): 6-bit codes cost 6 bits, not 8.
`onnx.helper.make_tensor` with a Python int list would store INT4 as varints in `int32_data` (~6 bits per
value), so we always write packed `raw_data` through ml_dtypes and check the byte count.
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


#: Depths stored as two planes (high, low container widths): q = hi·2^low + lo, hi signed, 0 ≤ lo < 2^low.
PLANES = {6: (4, 2), 10: (8, 2), 12: (8, 4)}
#: File bytes a second plane adds besides its codes and steps: its tensors' headers and names, a DequantizeLinear
#: and an Add (about 585 B each on mnist_cnn, less after compact-names).
PLANE_BYTES = 512


def planes(bits: int) -> tuple[int, ...]:
    """The containers `bits`-bit codes are stored in: their one container, or a depth's two planes."""
    return PLANES.get(bits, (container_bits(bits),))


def stored_bits(bits: int) -> int:
    """Bits one `bits`-bit code takes in the file."""
    return sum(planes(bits))


def split_planes(q: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Signed codes of a two-plane depth as (hi, lo) with q = hi·2^low + lo: an arithmetic shift and a mask."""
    low = PLANES[bits][1]
    q = np.asarray(q, np.int32)
    return q >> low, q & (2**low - 1)


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
