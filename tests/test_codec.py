"""The layer-codec interface on a real layer (the bundled CNN's 48×32×3×3 conv): every codec's operating
points materialise to a Coded weight that is exactly what onnxruntime computes once the finishing tail has
written it, and a single-point codec's predicted distortion is the layer-output error it then records."""

from pathlib import Path

import numpy as np
import pytest
from builders import calibrated_context

from onnxtq import model_io
from onnxtq.calibration.collect import StatsStore, _with_outputs
from onnxtq.codec import Layer
from onnxtq.codecs.crq import CrqCodec
from onnxtq.codecs.ecsq import EcsqCodec
from onnxtq.codecs.fp16 import Fp16Codec
from onnxtq.codecs.kq import KqCodec
from onnxtq.codecs.rtn import RtnCodec
from onnxtq.codecs.tq import TqCodec
from onnxtq.finish import finish
from onnxtq.graph import Graph, upgrade_opset
from onnxtq.weights import discover

CODECS = {
    "rtn": lambda: RtnCodec(4),
    "crq": lambda: CrqCodec(2, method="gptq"),
    "tq": lambda: TqCodec(runtime="folded"),
    "ecsq": lambda: EcsqCodec(),
    "kq": lambda: KqCodec(iterations=3),
    "fp16": lambda: Fp16Codec(),
}
SINGLE_POINT = {"rtn", "crq", "kq", "fp16"}


@pytest.fixture(scope="module")
def calibrated():
    with calibrated_context("mnist_cnn") as ctx:
        yield ctx.graph.proto(), ctx.stats, ctx.data


@pytest.mark.parametrize("name", sorted(CODECS))
def test_materialised_weight_is_what_onnxruntime_computes(calibrated, name):
    proto, stats, source = calibrated
    graph = Graph(upgrade_opset(proto, 25))  # what every codec's containers need at most
    site = next(s for s in discover(graph).sites if s.shape == (48, 32, 3, 3))
    layer = Layer.of(graph, site, stats)
    option = CODECS[name]().options(layer)[0]
    picks = [np.array(len(band.depth) // 2) for band in option.bands]  # a middle point of every band
    coded = option.materialize(picks)
    assert coded.w_hat.shape == site.shape
    record = finish(graph, layer, coded, "test", bias_correct=False)
    assert record.status == "quantized" and record.bytes_after < record.bytes_before
    node = next(n for n in graph.graph if n.name == site.node)
    weight = node.inputs[1].name  # what the conv now reads in place of its float weight
    _, feed = next(iter(source.batches(1)))
    computed = model_io.session(_with_outputs(graph.proto(), [weight])).run([weight], feed)[0]
    np.testing.assert_allclose(computed, coded.w_hat, rtol=1e-6, atol=1e-7 * np.abs(coded.w_hat).max())
    if name in SINGLE_POINT:  # the point's distortion is the layer-output error it is written with
        predicted = option.bands[0].distortion[int(picks[0])]
        assert predicted == pytest.approx(layer.gain * record.output_error, rel=1e-6)


@pytest.mark.parametrize("name", ["tq", "ecsq", "rtn"])
def test_statistics_written_to_disk_are_read_when_asked_for(calibrated, name):
    """A store that spilled its statistics (a model run in pieces) gives layers that read them (and, lazy, their
    weights) when asked, not hold them: their points and materialised weights are those of layers that hold them."""
    proto, stats, _ = calibrated
    graph = Graph(upgrade_opset(proto, 25))
    spilled = StatsStore({}, stats.samples, stats.description, spill=True)
    compared = 0
    for site in discover(graph).sites:
        if stats.get(site) is None:
            continue
        spilled.by_site[site.name] = spilled.keep(stats.get(site))
        held, lazy = Layer.of(graph, site, stats), Layer.of(graph, site, spilled, lazy=True)
        assert lazy.held is None and lazy.source is spilled and spilled.spilled(site)
        assert lazy.weight is None and lazy.size == held.size  # read from the graph when asked for (auto)
        assert lazy.dtype == held.dtype == held.w.dtype
        np.testing.assert_array_equal(lazy.w, held.w)
        np.testing.assert_array_equal(lazy.stats.moment, held.stats.moment)
        loaded = lazy.loaded()
        assert loaded.held is not None and loaded.weight is not None and (loaded.source, loaded.graph) == (None, None)
        for a, b in zip(CODECS[name]().options(held), CODECS[name]().options(lazy), strict=True):
            for x, y in zip(a.bands, b.bands, strict=True):
                np.testing.assert_array_equal(y.bits, x.bits)
                np.testing.assert_array_equal(y.distortion, x.distortion)
            picks = [np.full(np.shape(band.bits)[:-1], len(band.depth) // 2) for band in a.bands]
            np.testing.assert_array_equal(b.materialize(picks).w_hat, a.materialize(picks).w_hat)
            compared += 1
    assert compared >= 3
    # a weight without statistics in a model run in pieces (an embedding table) is read when asked for too
    site = discover(graph).sites[0]
    without = Layer.of(graph, site, StatsStore({}, stats.samples, stats.description, spill=True), lazy=True)
    assert without.weight is None and without.source is None and without.stats is None
    np.testing.assert_array_equal(without.w, Layer.of(graph, site, stats).w)
    if name == "tq":  # the transforms' bases wait on disk beside the statistics
        assert any(Path(spilled._folder.name).glob("*.npy"))
