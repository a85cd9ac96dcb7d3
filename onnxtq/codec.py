"""Layer codecs: the ways one weight can be coded, as operating points an allocator chooses among.

A codec takes one weight site with its statistics (a `Layer`) and returns its operating points as
`rd.Option`s: bands of bit depths, each with the bits it stores and the output distortion it is
predicted to cost, in one unit for every codec and layer (network-weighted: the layer's measured gain ×
E‖ΔW x‖² by calibration, `distortion`). `Option.materialize(picks)` turns the chosen point of each band
into a `Coded` layer: the weight onnxruntime will compute and the recipe that writes it. A pass picks a
codec's point for its own target (a bit depth, a rate, an entropy), then hands the Coded layer to the one
finishing tail (`onnxtq.finish`), which corrects the bias, writes it and records it.

Codecs whose layers share a codebook (kq's depthwise convs, ecsq's k-means) code a group of layers at
once and write the shared part before the layers (`Group`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import ClassVar

import numpy as np

from onnxtq.calibration.collect import StatsStore
from onnxtq.calibration.stats import LayerStats
from onnxtq.graph import Graph
from onnxtq.rd import Option
from onnxtq.weights import WeightSite


@dataclass
class Layer:
    """One weight site as a codec reads it: the weight as stored, its input statistics and its gain.

    Statistics a store has written to disk (a model run in pieces) are read each time they are asked for, so
    that a pass holding every layer (auto, tq) holds the statistics of the layers it is working on, not all;
    a pass that leaves its graph as it is until the end (auto) may have the weights read so too (`lazy`).
    """

    site: WeightSite
    weight: np.ndarray | None  # the stored weight (layout `site.shape`, its type), where held in memory
    held: LayerStats | None  # the statistics, where held in memory
    gain: float = 1.0  # network-output error per unit of layer-output error (onnxtq.gains)
    source: StatsStore | None = None  # the store that spilled this layer's statistics, read when asked for
    graph: Graph | None = None  # the graph the weight is read from when asked for

    @classmethod
    def of(
        cls, graph: Graph, site: WeightSite, stats: StatsStore | None, gain: float = 1.0, lazy: bool = False
    ) -> Layer:
        """The site's layer; with `lazy`, a layer of a model run in pieces reads its weight when asked for too (a
        table without statistics as well: the 1.3B GPT's embedding held 192 MiB through a whole auto run)."""
        if lazy and stats is not None and stats.spills:
            return cls(site, None, None, gain, source=stats if stats.spilled(site) else None, graph=graph)
        if stats is not None and stats.spilled(site):
            return cls(site, cls._read(graph, site), None, gain, source=stats)
        return cls(site, cls._read(graph, site), None if stats is None else stats.get(site), gain)

    @staticmethod
    def _read(graph: Graph, site: WeightSite) -> np.ndarray:
        return graph.array(site.name).reshape(site.shape)  # recurrent weights: their 2-D view

    @property
    def w(self) -> np.ndarray:
        return self.weight if self.graph is None else self._read(self.graph, self.site)

    @property
    def dtype(self) -> np.dtype:
        """The stored weight's type, without reading a weight left on disk."""
        if self.graph is None:
            return self.weight.dtype
        return np.dtype(self.graph.initializers[self.site.name].const_value.dtype.numpy())

    @property
    def stats(self) -> LayerStats | None:
        return self.held if self.source is None else self.source.get(self.site)

    @property
    def size(self) -> int:
        return int(np.prod(self.site.shape))

    def loaded(self) -> Layer:
        """This layer with its weight and statistics in memory: for work that reads them many times."""
        if self.source is None and self.graph is None:
            return self
        return replace(self, weight=self.w, held=self.stats, source=None, graph=None)


class LayerView:
    """Base of a codec's own view of a Layer (its weight reshaped, its codings): reads the site, the
    statistics and the gain through the `layer` it holds."""

    layer: Layer

    @property
    def site(self) -> WeightSite:
        return self.layer.site

    @property
    def stats(self) -> LayerStats | None:
        return self.layer.stats

    @property
    def gain(self) -> float:
        return self.layer.gain


@dataclass
class Coded:
    """A layer's chosen operating point, materialised."""

    w_hat: np.ndarray  # the weight onnxruntime will compute, stored layout (in the codec's own precision)
    write: Callable[[Graph, str], int] = field(repr=False)  # (graph, pass name) → bytes it stores
    nominal_bits: float | None = None  # code bits per weight at their depths (or the codes' entropy)
    detail: str = ""  # how it is coded, for the report
    inputs: LayerStats | None = None  # the inputs it was fitted to, when not the layer's own (sequential fitting)
    status: str = "quantized"
    output_error: float | None = None  # E‖(Ŵ − W)x‖² under those inputs, where the codec measured it already
    error: np.ndarray | None = field(default=None, repr=False)  # Ŵ − W as the codec computed it (see finish)


@dataclass
class Group:
    """Layers coded together: `prepare(graph, pass name)` writes what they share (a codebook) and returns its
    bytes, before each layer's own Coded is finished."""

    layers: list[Layer]
    coded: list[Coded]
    prepare: Callable[[Graph, str], int] | None = field(default=None, repr=False)


def distortion(layer: Layer, delta: np.ndarray, stats: LayerStats | None = None) -> float:
    """The network-weighted output distortion of a weight error Δ (stored layout): gain × E‖ΔW x‖²."""
    return layer.gain * output_error(layer.site, layer.stats if stats is None else stats, delta)


def output_error(site: WeightSite, stats: LayerStats | None, delta: np.ndarray, dtype=np.float64) -> float:
    """E‖ΔW x‖² by calibration, or ‖ΔW‖² for a weight without statistics (embeddings); Δ in the stored layout,
    the products in `dtype` (float32 for figures that only report)."""
    m = site.to_matrix(delta)
    if stats is None or m.shape[1] != stats.dim:
        return float((np.asarray(m, np.float64) ** 2).sum())
    return stats.quadratic(m, dtype)


class Codec(abc.ABC):
    """A way of coding weights: operating points per layer (see the module docstring)."""

    name: ClassVar[str]

    @abc.abstractmethod
    def options(self, layer: Layer) -> list[Option]:
        """The layer's operating points, each Option with its `materialize`."""
