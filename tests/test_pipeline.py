"""Pipeline text parses to passes and prints back identically; mistakes name the valid choices."""

import pytest
from builders import conv_model
from hypothesis import given, settings
from hypothesis import strategies as st

from onnxtq.errors import PassError, PreconditionError, UsageError
from onnxtq.graph import Graph
from onnxtq.pass_infra import STATS, Context, Pass, PassManager
from onnxtq.pipeline import parse
from onnxtq.report import PassReport


@pytest.mark.parametrize(
    "text",
    [
        "fold-bn,calibrate,rtn{bits=4}",
        "rtn",
        "rtn{bits=2,block=32,symmetric=false,clip=false}",
        "calibrate{samples=16,mode=diag},rtn{bits=8}",
    ],
)
def test_round_trip(text):
    assert parse(text).pipeline == text
    assert parse(parse(text).pipeline).pipeline == text


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), block=st.sampled_from([0, 16, 32, 128]), clip=st.booleans())
def test_round_trip_property(bits, block, clip):
    text = f"fold-bn,rtn{{bits={bits},block={block},clip={str(clip).lower()}}}"
    manager = parse(text)
    assert manager.pipeline == text
    assert manager.passes[1].config.bits == bits and manager.passes[1].config.clip is clip


@pytest.mark.parametrize(
    "text, message",
    [
        ("rtm{bits=4}", "unknown pass 'rtm'"),
        ("rtn{bit=4}", "unknown option"),
        ("rtn{bits=four}", "expects int"),
        ("rtn{bits=9}", "bits must be"),
        ("rtn{bits=4", "unbalanced"),
        ("rtn{bits}", "not key=value"),
        ("", "cannot parse"),
    ],
)
def test_errors_are_usage_errors(text, message):
    with pytest.raises(UsageError, match=message):
        parse(text)


def test_unknown_pass_lists_known_ones():
    with pytest.raises(UsageError) as info:
        parse("nope")
    assert "rtn" in info.value.hint and "fold-bn" in info.value.hint


class Broken(Pass):
    name = "broken"
    needs = preserves = frozenset()

    def run(self, ctx):
        raise ZeroDivisionError("boom")


class NeedsStats(Pass):
    name = "needs-stats"
    needs = preserves = frozenset({STATS})

    def run(self, ctx):
        return PassReport(self.name, self.spec)


def test_manager_wraps_failures_with_position():
    manager = PassManager(parse("fold-bn").passes + [Broken()])
    with pytest.raises(PassError, match=r"pass #2 'broken' failed after \['fold-bn'\].*boom"):
        manager.run(Context(Graph(conv_model())))


def test_manager_refuses_missing_statistics():
    with pytest.raises(PreconditionError, match="needs calibration statistics") as info:
        PassManager([NeedsStats()]).run(Context(Graph(conv_model())))
    assert "calibrate" in info.value.hint


def test_calibrate_without_data_is_a_precondition_error():
    with pytest.raises(PreconditionError, match="no data"):
        parse("calibrate").run(Context(Graph(conv_model())))
