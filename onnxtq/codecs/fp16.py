"""Half precision: the weight stored as float16 and cast back to its own type by one Cast node.

Half the bytes at about 70 dB of weight SQNR: the point between 8-bit codes and keeping the float,
for the layers an allocation finds too sensitive for codes (onnxruntime folds the Cast at load).
"""

from __future__ import annotations

import numpy as np
from onnx import numpy_helper

from onnxtq.codec import Codec, Coded, Layer, distortion
from onnxtq.emit import float_type, replace_initializer
from onnxtq.graph import Graph, prepend, tag
from onnxtq.model_io import tensor_nbytes
from onnxtq.rd import Band, Option

FP16_MAX = float(np.finfo(np.float16).max)


class Fp16Codec(Codec):
    name = "fp16"

    def options(self, layer: Layer) -> list[Option]:
        """One point, for float32 weights whose values float16 holds (none for others)."""
        if layer.w.dtype != np.float32 or not np.all(np.abs(layer.w) <= FP16_MAX):
            return []
        coded = self.code(layer)
        delta = coded.w_hat - layer.w.astype(np.float64)
        point = Band(np.array([16]), np.array([16.0 * layer.size]), np.array([distortion(layer, delta)]))
        return [Option("fp16", [point], materialize=lambda picks, drift=None: self.code(layer))]  # made again: cheap

    def code(self, layer: Layer) -> Coded:
        site = layer.site
        half = layer.w.astype(np.float16)

        def write(graph: Graph, pass_name: str) -> int:
            stored = numpy_helper.from_array(half, graph.unique(f"{site.name}/onnxtq.fp16"))
            out = graph.unique(f"{site.name}/onnxtq.cast")
            node = graph.node(
                "Cast",
                [graph.set_initializer(stored)],
                [out],
                graph.unique(f"{site.node}/onnxtq.cast"),
                to=float_type(graph, site),
            )
            tag(node, pass_name, "cast")
            prepend(graph, [node, *replace_initializer(graph, site, node.outputs[0], pass_name)])
            return tensor_nbytes(stored)

        return Coded(half.astype(np.float64), write, nominal_bits=16.0, detail="float16")
