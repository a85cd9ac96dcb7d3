"""NaN and Inf are bad input: find them, count them and say where the first one is.

One NaN pixel among 256 calibration images used to turn four biases NaN through bias correction,
and with them every output of the written model; a NaN weight poisons its layer's steps. The
calibration stream, the statistics, discovery and verification all ask here.
"""

from __future__ import annotations

import numpy as np


def nonfinite(a: np.ndarray) -> tuple[int, list[int]] | None:
    """How many NaN/Inf values a float array holds and the index of the first; None if it has none."""
    if not (a.dtype.kind in "fc" or a.dtype.name.startswith(("float", "bfloat"))):  # ml_dtypes' kind is 'V'
        return None
    bad = ~np.isfinite(a)
    if not bad.any():
        return None
    return int(bad.sum()), [int(i) for i in np.argwhere(bad)[0]]


def first_nonfinite(arrays: dict[str, np.ndarray]) -> tuple[str, int, list[int]] | None:
    """(name, count, index of the first) for the first of `arrays` that holds NaN/Inf, or None."""
    for name, a in arrays.items():
        found = nonfinite(a)
        if found:
            return name, *found
    return None


def nonfinite_reason(a: np.ndarray) -> str | None:
    """Why a tensor is left as it is when it holds NaN/Inf (no step or statistic is computed from one)."""
    found = nonfinite(a)
    if found is None:
        return None
    count, first = found
    return f"holds {count} NaN/Inf value(s), the first at {first}: left as it is"
