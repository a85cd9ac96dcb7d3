"""Packed integer containers: layout matches onnx's own reader, sizes are truly packed."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper

from onnxtq.model_io import tensor_nbytes
from onnxtq.packing import PLANES, container_bits, int_tensor, min_opset, split_planes, stored_bits
from onnxtq.quantize import int_range


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), signed=st.booleans(), n=st.integers(1, 70), seed=st.integers(0, 2**16))
def test_round_trip_through_onnx_reader(bits, signed, n, seed):
    lo, hi = int_range(bits, signed)
    codes = np.random.default_rng(seed).integers(lo, hi + 1, size=n)
    t = int_tensor("q", codes, bits, signed)
    assert np.array_equal(numpy_helper.to_array(t).astype(np.int64), codes)
    assert len(t.raw_data) == -(-n * container_bits(bits) // 8)
    assert tensor_nbytes(t) == len(t.raw_data)


def test_int4_nibble_order_low_first():
    t = int_tensor("q", np.array([1, -2, 3]), 4, True)
    assert t.raw_data == bytes([0xE1, 0x03])  # element 0 in the low nibble, -2 = 0xE


def test_opsets_and_limits():
    assert (min_opset(2), min_opset(4), min_opset(8)) == (25, 21, 13)
    with pytest.raises(ValueError):
        container_bits(17)


@pytest.mark.parametrize("bits", sorted(PLANES))
def test_two_planes_hold_every_code(bits):
    """Every signed code of a two-plane depth is hi·2^low + lo, hi in its signed container, lo unsigned."""
    high, low = PLANES[bits]
    q = np.arange(*np.add(int_range(bits, True), (0, 1)))
    hi, lo = split_planes(q, bits)
    assert np.array_equal(hi * 2**low + lo, q)
    assert hi.min() >= int_range(high, True)[0] and hi.max() <= int_range(high, True)[1]
    assert lo.min() == 0 and lo.max() == 2**low - 1
    assert stored_bits(bits) == bits < container_bits(bits)
