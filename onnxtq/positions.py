"""Which output positions an output error counts: a transformer's padded tokens carry nothing the task reads.

A model fed an `attention_mask` (the name Hugging Face exports give it: [batch, tokens], 1 for a real token,
0 for padding) still computes outputs at the padded positions, and nothing after it reads them: a sentence
encoder mean-pools the real tokens, a token classifier labels them. Counted, they weigh each layer's error by
how it spoils padding (on MiniLM's calibration inputs 56% of the positions are padding, every one of them the
same [PAD] embedding). So the network-output errors that gains, marginal errors and held-out checks measure
count an output's values at real tokens only, where the output is laid out [batch, tokens, ...] as the mask,
and a layer's input statistics (E[x xᵀ], which its codes are fitted to) take the real tokens' rows only.
"""

from __future__ import annotations

import numpy as np

#: The graph input that marks real tokens.
MASK_INPUT = "attention_mask"
#: Values per chunk of a sum of squares.
CHUNK = 1 << 22


def counted(feed: dict[str, np.ndarray], output: np.ndarray) -> np.ndarray | None:
    """0/1 weights broadcasting over `output` (a run of `feed`) for the positions that count, or None where
    all of them do (no mask fed, or an output not laid out over its tokens)."""
    mask = feed.get(MASK_INPUT)
    if mask is None or mask.ndim != 2 or output.ndim < 2 or tuple(output.shape[:2]) != mask.shape:
        return None
    return (np.asarray(mask) != 0).reshape(mask.shape + (1,) * (output.ndim - 2))


def real_rows(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The real tokens' rows [R, ...] of an activation laid out [batch, tokens, ...] as `mask`; any other `x`
    as it is."""
    if x.ndim < 3 or tuple(x.shape[:2]) != mask.shape:
        return x
    return x[np.asarray(mask) != 0]


def squares(values: np.ndarray, weights: np.ndarray | None = None, minus: np.ndarray | None = None) -> float:
    """Σ (values − minus)² in float64 over the positions that count, a chunk of CHUNK values at a time (along the
    first axis): a language model's logits over a few sequences are a gigabyte in float64, and its
    differences and squares would be three."""
    values = np.asarray(values)
    if values.ndim == 0:
        values, minus = values.reshape(1), None if minus is None else np.reshape(minus, 1)
    rows = max(1, CHUNK // max(1, int(np.prod(values.shape[1:], dtype=np.int64))))
    buffer = np.empty((min(rows, len(values)), *values.shape[1:]))  # one chunk's float64 values, reused
    total = 0.0
    for r in range(0, len(values), rows):
        part = buffer[: min(rows, len(values) - r)]
        if minus is None:
            part[...] = values[r : r + rows]
        else:
            np.subtract(values[r : r + rows], minus[r : r + rows], out=part, dtype=np.float64)
        np.square(part, out=part)
        if weights is not None:
            part *= weights[r : r + rows]
        total += float(part.sum())
    return total
