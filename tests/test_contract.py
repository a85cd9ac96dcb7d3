"""The pass contract, over the whole registry, on the bundled CNN: every candidate weight is recorded as
changed or skipped with a reason, every node a pass adds is tagged, the output passes the full checker and
loads in onnxruntime, spec text round-trips (floats exactly), and any two passes in either order either
work, with the statistics and originals they read really there, or are refused with a hint."""

import itertools
from collections import Counter

import numpy as np
import onnx
import pytest
from builders import bundled

from onnxtq import model_io
from onnxtq.calibration.data import open_source
from onnxtq.compress import prepare
from onnxtq.errors import PreconditionError
from onnxtq.graph import Graph, provenance
from onnxtq.pass_infra import ORIGINALS, STATS, Context
from onnxtq.pipeline import parse, registry
from onnxtq.verify import validate
from onnxtq.weights import discover

#: Each registered pass as the contract tests run it: its defaults, or defaults made quick for 16 inputs.
QUICK = {
    "fold-bn": "fold-bn",
    "calibrate": "calibrate{samples=16}",
    "rtn": "rtn{bits=4}",
    "crq": "crq{method=gptq}",
    "tq": "tq{rate=3,gains=false}",
    "ecsq": "ecsq{rate=3,gains=false}",
    "kq": "kq{iterations=3}",
    "auto": "auto{bits=4,gain_samples=4,rounds=2}",
    "refine": "refine{method=gptq}",
    "dequantize-at-load": "dequantize-at-load",
    "compact-names": "compact-names",
}
HEAD = "fold-bn,calibrate{samples=16}"
#: Passes that rewrite weights an earlier pass quantized run after this one.
AFTER_RTN = {"refine", "dequantize-at-load"}


@pytest.fixture(scope="module")
def cnn():
    path, calib = bundled("mnist_cnn")
    model = model_io.load(path)
    source = open_source(calib, model, limit=16)
    yield model, source
    source.close()


def _run(cnn, pipeline: str):
    model, source = cnn
    work, _ = prepare(model)
    ctx = Context(Graph(work), source)
    return ctx, parse(pipeline).run(ctx)


def test_every_pass_is_in_the_contract_tests():
    assert set(QUICK) == set(registry())


def _untagged(model: onnx.ModelProto) -> Counter:
    """Nodes without provenance, by op type (a rename keeps the count; a new untagged node adds one)."""
    return Counter(n.op_type for n in model.graph.node if not provenance(n).get("onnxtq.role"))


@pytest.mark.parametrize("name", sorted(QUICK))
def test_pass_contract(cnn, name):
    spec = QUICK[name]
    head = f"{HEAD},rtn{{bits=8}}" if name in AFTER_RTN else HEAD
    before_ctx, _ = _run(cnn, head)
    found = discover(before_ctx.graph)
    candidates = {s.name for s in found.sites} | {name for name, _, _ in found.skipped}
    before = _untagged(before_ctx.graph.proto())
    ctx, reports = _run(cnn, f"{head},{spec}")
    report = [r for r in reports if r.pass_name == name][-1]
    for r in report.records:
        assert r.status in ("quantized", "folded", "refined", "observed", "skipped")
        assert r.status != "skipped" or r.reason, f"{name}: {r.name} skipped without a reason"
    if registry()[name]().emits().code_bits:  # a quantizing pass accounts for every candidate weight
        assert {r.name for r in report.records} == candidates
    assert not _untagged(ctx.graph.proto()) - before, f"{name} added untagged nodes"
    for node in ctx.graph.proto().graph.node:
        assert not provenance(node) or provenance(node).get("onnxtq.pass"), f"{name}: a role without its pass"
    validate(ctx.graph.proto())


@pytest.mark.parametrize(
    "text",
    [
        "tq{rate=3.14159265}",
        "ecsq{rate=2.718281828459045,rdo=1e-07}",
        "tq{sqnr=33.3333333333}",
        "rtn{bits=4,block=32,symmetric=false}",
        "calibrate{samples=16,shrink=false},crq{ternary=true}",
        "auto{agreement=0.987654321,codecs=rtn+tq}",
    ],
)
def test_spec_text_round_trips_exactly(text):
    manager = parse(text)
    assert manager.pipeline == text
    again = parse(manager.pipeline)
    for a, b in zip(manager.passes, again.passes):
        assert a.config == b.config  # floats equal to the last bit


@pytest.mark.parametrize(("first", "second"), list(itertools.product(sorted(QUICK), repeat=2)))
def test_any_two_passes_work_or_refuse(cnn, first, second):
    pipeline = f"{HEAD},{QUICK[first]},{QUICK[second]}"
    try:
        ctx, reports = _run(cnn, pipeline)
    except PreconditionError as exc:  # refused: before any pass ran, with a hint
        assert exc.hint and exc.exit_code == 2
        assert ORIGINALS in registry()[second].needs
        return
    validate(ctx.graph.proto())
    report = [r for r in reports if r.pass_name == second][-1]
    reads = registry()[second].needs | registry()[second].uses
    if STATS in reads:  # the statistics it read were those of the graph it ran on
        assert report.stats in ("fresh", "recalibrated")
        assert not [r for r in report.records if "no statistics" in r.reason]


def test_compact_names_then_rtn_recalibrates_and_corrects_every_bias(cnn):
    """e590571 silently lost bias correction here: the statistics were keyed by the old names."""
    ctx, reports = _run(cnn, f"{HEAD},compact-names,rtn{{bits=4}}")
    assert [r.pass_name for r in reports][-2:] == ["recalibrate", "rtn"]
    rtn = reports[-1]
    assert rtn.stats == "recalibrated"
    corrected, quantized = rtn.bias_corrected
    assert quantized > 0 and corrected == quantized
    _, plain = _run(cnn, f"{HEAD},rtn{{bits=4}}")
    assert plain[-1].bias_corrected == (corrected, quantized)


def test_refine_after_compact_names_is_refused_before_any_work():
    """e590571 silently refined nothing here: the originals were keyed by the old names."""
    with pytest.raises(PreconditionError, match="'refine' needs the float weights") as info:
        parse("fold-bn,calibrate,rtn{bits=4},compact-names,refine")
    assert "put 'compact-names' after 'refine'" in info.value.hint
    with pytest.raises(PreconditionError, match="'dequantize-at-load' before it"):
        parse("rtn{bits=4},dequantize-at-load,refine")


def test_refine_after_rtn_refines_every_weight(cnn):
    _, reports = _run(cnn, f"{HEAD},rtn{{bits=4}},refine")
    quantized = [r.name for r in reports[-2].records if r.status == "quantized"]
    assert quantized and sorted(r.name for r in reports[-1].records if r.status == "refined") == sorted(quantized)
    assert np.all([r.output_sqnr_db is not None for r in reports[-1].records])
