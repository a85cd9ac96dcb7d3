"""The pass contract and the manager that runs a pipeline of passes.

A pass declares a name, a frozen config dataclass (the single definition behind the pipeline
text, the CLI and `list-passes`: each field's help is in its metadata), what it may write
(`emits`, from which the manager computes the opset once) and its contract with the passes
around it, in terms of two analyses:

* `STATS`: calibration statistics of the current graph (keyed by its weight names);
* `ORIGINALS`: the float weights that passes of this run replaced by codes (what `refine` re-codes).

`needs`: it cannot run without them; `uses`: it reads them when they exist; `preserves`: they are
still valid after it. Before a pass that needs or uses statistics an earlier pass invalidated, the
manager recalibrates (with the config the statistics were made with); an analysis it cannot remake
(originals) is refused with a hint, before any pass runs. `run(ctx)` rewrites `ctx.graph` in place and
returns a PassReport in which every candidate weight is either changed or skipped with a reason.
After the pipeline the finalising passes run (`finalizers`), e.g. the guard against onnxruntime's
2-bit MatMul fusion.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from dataclasses import dataclass
from typing import Any, ClassVar

from onnxtq.calibration import StatsStore
from onnxtq.calibration.data import Source
from onnxtq.errors import OnnxtqError, PassError, PreconditionError, UsageError
from onnxtq.graph import Graph, upgrade_opset
from onnxtq.opsets import Emission
from onnxtq.profiles import DEFAULT, Profile
from onnxtq.progress import stage
from onnxtq.report import PassReport

STATS = "stats"
ORIGINALS = "originals"
ANALYSES = frozenset({STATS, ORIGINALS})


def option(default: Any, help: str) -> Any:
    """A config field with its help text (shown by `list-passes --options`)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class PassConfig:
    """Base for pass configs: frozen, typed fields with defaults (declared with `option`)."""


@dataclass
class Context:
    """What passes see: the graph, the calibration source, the current statistics and, for a pass that
    measures its result (`Pass.holdout`), inputs held out of `data` that no statistic was computed from."""

    graph: Graph
    data: Source | None = None
    stats: StatsStore | None = None
    stats_fresh: bool = False
    holdout: Source | None = None
    profile: Profile = DEFAULT  # the runtimes the file is for (onnxtq.profiles)


def _coerce(field: dataclasses.Field, value):
    """Typed option value from pipeline text (or pass through a Python value)."""
    if not isinstance(value, str):
        return value
    kind = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    try:
        if kind.startswith("bool"):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
    except ValueError:
        raise UsageError(f"option '{field.name}' expects {kind}, got '{value}'") from None
    return value


class Pass(abc.ABC):
    """Base class of every rewrite pass (see the module docstring for the contract)."""

    name: ClassVar[str]
    Config: ClassVar[type[PassConfig]] = PassConfig
    needs: ClassVar[frozenset[str]]
    uses: ClassVar[frozenset[str]] = frozenset()
    preserves: ClassVar[frozenset[str]]
    holdout: ClassVar[bool] = False  # it measures its result on held-out inputs (the run splits the data)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if getattr(cls, "__abstractmethods__", None):
            return
        for attr in ("needs", "preserves"):
            if not hasattr(cls, attr) or not set(getattr(cls, attr)) <= ANALYSES:
                raise TypeError(f"pass {cls.__name__} must declare `{attr}` as a subset of {sorted(ANALYSES)}")

    def __init__(self, **options):
        fields = {f.name: f for f in dataclasses.fields(self.Config)}
        unknown = [k for k in options if k not in fields]
        if unknown:
            raise UsageError(f"{self.name}: unknown option(s) {unknown}", f"options: {', '.join(fields) or 'none'}")
        self.options = {k: _coerce(fields[k], v) for k, v in options.items()}
        try:
            self.config = self.Config(**self.options)
        except ValueError as exc:
            raise UsageError(f"{self.name}: {exc}") from exc

    @property
    def spec(self) -> str:
        """The pass as pipeline text, options as the user gave them: `rtn{bits=4,block=32}`."""
        if not self.options:
            return self.name
        return f"{self.name}{{{','.join(f'{k}={_text(v)}' for k, v in self.options.items())}}}"

    def emits(self) -> Emission:
        """What the pass may write (the opset it needs follows from it)."""
        return Emission()

    @abc.abstractmethod
    def run(self, ctx: Context) -> PassReport: ...

    #: Whether the pass codes weights (those `inspect` asks `takes` of).
    codes_weights: ClassVar[bool] = False

    def takes(self, site) -> str:
        """Why this pass, as configured, leaves the weight `site` as it is ('' : it codes it)."""
        return ""

    def new_report(self) -> PassReport:
        return PassReport(self.name, self.spec)


def _text(v) -> str:
    """An option value as pipeline text that parses back to the same value (floats exactly)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        text = repr(v)
        return text[:-2] if text.endswith(".0") else text
    return str(v)


def finalizers(profile: Profile, pipeline: list[Pass]) -> list[Pass]:
    """Passes every pipeline ends with, then the profile's own unless the pipeline has them already
    (imported lazily: passes depend on the engine, not back)."""
    from onnxtq.passes import FINALIZERS, PROFILE_FINALIZERS

    named = {p.name for p in pipeline}
    own = [cls for cls in PROFILE_FINALIZERS.get(profile.name, ()) if cls.name not in named]
    return [cls() for cls in (*FINALIZERS, *own)]


class PassManager:
    """Runs passes in order on a Graph: upgrades the opset once, keeps the contract (recalibrating or
    refusing), times passes, wraps failures, and ends with the finalising passes."""

    def __init__(self, passes: list[Pass]):
        if not passes:
            raise UsageError("the pipeline is empty", "e.g. --pipeline 'fold-bn,rtn{bits=8}'")
        self.passes = passes
        self._refuse_lost_originals()

    @property
    def pipeline(self) -> str:
        return ",".join(p.spec for p in self.passes)

    @property
    def wants_holdout(self) -> bool:
        return any(p.holdout for p in self.passes)

    def _refuse_lost_originals(self) -> None:
        """Originals cannot be remade: a pass that needs them after one that drops them is refused now."""
        for index, p in enumerate(self.passes):
            if ORIGINALS not in p.needs:
                continue
            lost = [q.name for q in self.passes[:index] if ORIGINALS not in q.preserves]
            if lost:
                raise PreconditionError(
                    f"pass #{index + 1} '{p.name}' needs the float weights earlier passes replaced, "
                    f"and '{lost[-1]}' before it does not keep track of them",
                    f"put '{lost[-1]}' after '{p.name}' in the pipeline",
                )

    def run(self, ctx: Context) -> list[PassReport]:
        reports: list[PassReport] = []
        profile = ctx.profile
        if profile.keeps_codes and any(p.name == "dequantize-at-load" for p in self.passes):
            raise UsageError(
                f"the {profile.name} target keeps codes in RAM, and dequantize-at-load makes float weights at load",
                "drop dequantize-at-load from the pipeline, or choose --target fast",
            )
        closing = finalizers(profile, self.passes)
        passes = [*self.passes, *closing]
        target = profile.opset([p.emits() for p in passes])
        if ctx.graph.opset() < target:
            before = ctx.graph.opset()
            ctx.graph = Graph(upgrade_opset(ctx.graph.proto(), target))
            upgrade = PassReport(
                "upgrade-opset", f"upgrade-opset{{to={target}}}", notes=[f"opset {before} -> {target}"]
            )
            reports.append(upgrade)
        for index, p in enumerate(passes):
            seen = self._statistics(ctx, p, index, reports)
            start = time.perf_counter()
            try:
                with stage(p.spec):
                    report = p.run(ctx)
            except OnnxtqError:
                raise
            except Exception as exc:
                done = [q.name for q in passes[:index]]
                raise PassError(
                    f"pass #{index + 1} '{p.name}' failed after {done}: {type(exc).__name__}: {exc}"
                ) from exc
            report.seconds = time.perf_counter() - start
            report.stats = seen
            if STATS not in p.preserves:
                ctx.stats_fresh = False
            if report.records or report.notes or p not in closing:
                reports.append(report)  # a finalising pass that did nothing says nothing
        ctx.graph.remove_dead()
        return reports

    def _statistics(self, ctx: Context, p: Pass, index: int, reports: list[PassReport]) -> str:
        """Make sure `p` sees fresh statistics if it needs (or uses) them; returns how it sees them."""
        if STATS not in p.needs | p.uses:
            return ""
        if ctx.stats_fresh:
            return "fresh"
        if ctx.stats is not None and ctx.data is not None:  # an earlier pass invalidated them: make them again
            from onnxtq.passes import CalibratePass

            again = CalibratePass(**ctx.stats.options)
            start = time.perf_counter()
            with stage(f"recalibrate before {p.name}"):
                report = again.run(ctx)
            report.pass_name, report.spec = "recalibrate", f"recalibrate{again.spec.removeprefix('calibrate')}"
            report.seconds = time.perf_counter() - start
            reports.append(report)
            return "recalibrated"
        if STATS in p.needs:
            raise PreconditionError(
                f"pass #{index + 1} '{p.name}' needs calibration statistics of the current model",
                "put 'calibrate' before it in the pipeline and give --calib DATA",
            )
        return "none"
