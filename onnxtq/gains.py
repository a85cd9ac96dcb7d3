"""Network gains: how much network-output error one unit of a layer's output error makes.

Allocating bits across layers needs their distortions in one currency. Without gradients we
measure it (finite-difference Gauss–Newton through onnxruntime): add Gaussian noise E to one
weight, run a few calibration inputs, and divide the network-output squared error by the
layer-output error tr(E H Eᵀ) the noise makes by calibration. Then D_net ≈ Σ_l g_l·D_l, an
additivity assumption the `Probe` also checks afterwards on the finished model.

A model too large for one session (onnxtq.pieces) is measured a piece at a time, each weight's variant run
from its own piece on (onnxtq.variants), with noise seeded per weight.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import numpy as np
import onnx

from onnxtq import model_io, pieces, positions, verify
from onnxtq.calibration.collect import INPUT_BATCH_BYTES, StatsStore
from onnxtq.calibration.data import Source
from onnxtq.graph import copy_model
from onnxtq.progress import bar
from onnxtq.variants import Variants
from onnxtq.weights import WeightSite

#: Noise rms relative to the weight's rms: small enough to stay near-linear, large enough to beat float noise.
NOISE = 0.05


class Probe:
    """A few calibration inputs and the reference model's outputs on them."""

    def __init__(self, model: onnx.ModelProto, source: Source, samples: int, threads: int = 0):
        first = next(iter(source.batches(1)), None)
        sample_bytes = sum(v.nbytes for v in first[1].values()) if first else 1
        # big inputs (PP-OCR det pages) get fewer probe samples: each costs one run per layer
        samples = max(1, min(samples, INPUT_BATCH_BYTES // max(sample_bytes, 1), _affordable(model, samples)))
        self.feeds, self.samples = [], 0
        for n, feed in source.batches(samples):
            if self.samples + n > samples:  # a split source's batches come short, so a last one can overshoot
                n = samples - self.samples
                feed = {name: value[:n] for name, value in feed.items()}  # more than one: batched on axis 0
            self.feeds.append(feed)
            self.samples += n
            if self.samples >= samples:
                break
        self.threads = threads
        self.variants = Variants(model, self.feeds, threads) if pieces.needed(model) else None
        if self.variants is not None:
            self.reference = self.variants.reference
        else:
            self.reference = self._run(model_io.session(model, threads, fold_dequantize=True))
        count = len(self.reference) // max(len(self.feeds), 1)  # outputs per run
        self.counted = [positions.counted(self.feeds[i // count], r) for i, r in enumerate(self.reference)]
        self.energy = sum(positions.squares(r, w) for r, w in zip(self.reference, self.counted)) / max(self.samples, 1)

    def _run(self, sess, overrides: dict | None = None) -> list[np.ndarray]:
        names = [o.name for o in sess.get_outputs()]
        outs = []
        for feed in self.feeds:
            outs.extend(sess.run(names, {**feed, **(overrides or {})}))
        return outs

    def _error(self, outs: list[np.ndarray]) -> float:
        """Squared output error per sample, summed over every output (at the positions that count)."""
        total = sum(positions.squares(o, w, minus=r) for o, r, w in zip(outs, self.reference, self.counted))
        return total / max(self.samples, 1)

    def error(self, model: onnx.ModelProto) -> float:
        runs = verify.outputs(model, ((1, feed) for feed in self.feeds), self.threads, fold=True)
        return self._error([out for outs in runs for out in outs])

    def _exposed(self, model: onnx.ModelProto, names) -> tuple:
        """A session in which the initializers `names` can be fed (overridden) at run time, and the model's
        initializers by name."""
        exposed = copy_model(model)
        inits = {t.name: t for t in exposed.graph.initializer}
        declared = {v.name for v in exposed.graph.input}
        for name in names:  # initializers listed as graph inputs can be fed (overridden) at run time
            if name not in declared:
                t = inits[name]
                exposed.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        return model_io.session(exposed, self.threads), inits

    def gains(self, model: onnx.ModelProto, sites: list[WeightSite], layer_error, seed: int = 0) -> dict[str, float]:
        """g per site: output error per unit of `layer_error(site, E)` for a random weight error E."""
        if self.variants is not None:
            return self._gains_in_pieces(model, sites, layer_error, seed)
        sess, inits = self._exposed(model, [s.name for s in sites])
        rng = np.random.default_rng(seed)
        gains = {}
        for site in bar(sites, desc="network gains", unit="weight"):
            w = model_io.initializer_array(inits[site.name])
            noisy = _noisy(w, rng)
            made = layer_error(site, noisy.astype(np.float64) - w)
            out = self._error(self._run(sess, {site.name: noisy}))
            gains[site.name] = out / made if made > 0 else 0.0
        return gains

    def _gains_in_pieces(self, model, sites: list[WeightSite], layer_error, seed: int) -> dict[str, float]:
        inits = {t.name: t for t in model.graph.initializer}
        made: dict[str, float] = {}

        def noisy(index: int, site: WeightSite) -> np.ndarray:
            w = model_io.initializer_array(inits[site.name])
            noisy = _noisy(w, np.random.default_rng([seed, index]))
            made[site.name] = layer_error(site, noisy.astype(np.float64) - w)
            return noisy

        variants = [(site.name, partial(noisy, index, site)) for index, site in enumerate(sites)]
        gains = {}
        for index, outs in self.variants.run(variants, "network gains"):
            name = sites[index].name
            gains[name] = self._error(outs) / made[name] if made[name] > 0 else 0.0
        return gains

    def marginal(self, model: onnx.ModelProto, replacements: dict[str, np.ndarray | Path]) -> dict[str, float]:
        """Network-output error per sample with one weight at a time replaced (the rest as in `model`; a
        replacement may wait in a .npy file): each layer's own effect at a chosen operating point, where the
        noise-measured gain is only a slope."""
        if self.variants is not None:
            return self._marginal_in_pieces(model, replacements)
        sess, inits = self._exposed(model, list(replacements))
        errors = {}
        for name, w_hat in bar(replacements.items(), desc="marginal errors", unit="weight"):
            errors[name] = self._error(self._run(sess, {name: _as_stored(inits[name], w_hat)}))
        return errors

    def _marginal_in_pieces(self, model: onnx.ModelProto, replacements: dict) -> dict[str, float]:
        inits = {t.name: t for t in model.graph.initializer}
        names = list(replacements)
        variants = [(name, partial(_as_stored, inits[name], replacements[name])) for name in names]
        runs = self.variants.run(variants, "marginal errors")
        return {names[index]: self._error(outs) for index, outs in runs}


def _affordable(model: onnx.ModelProto, samples: int) -> int:
    """Probe samples for a model run in pieces: the work of `samples` through a model of one piece's weights.
    A sample costs a run of the model (from a layer's piece on) per layer, so a model four times past a piece
    gets a quarter of them, at least one; a model of one session gets all."""
    return max(1, min(samples, samples * pieces.PIECE_BYTES // max(pieces.weight_bytes(model), 1)))


def _as_stored(init: onnx.TensorProto, value: np.ndarray | Path) -> np.ndarray:
    """A replacement (or the file it waits in) in the initializer's type and layout (recurrent: the op's)."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
    return np.asarray(StatsStore.kept(value), dtype).reshape(tuple(init.dims))


def _noisy(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`w` plus Gaussian noise of NOISE times its rms, in its dtype."""
    rms = float(np.sqrt((w.astype(np.float64) ** 2).mean())) or 1.0
    return (w + rng.normal(0.0, NOISE * rms, w.shape)).astype(w.dtype)
