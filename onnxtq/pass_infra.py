"""The pass contract and the manager that runs a pipeline of passes.

A pass declares a name, a frozen config dataclass (the single definition behind the
pipeline text, the CLI and `list-passes`), whether it needs calibration statistics and
which opset its emission needs. `run(ctx)` rewrites `ctx.graph` in place and returns a
PassReport in which every candidate weight is either changed or skipped with a reason.
The manager upgrades the opset once, calibrates lazily, times passes and wraps failures.
"""

from __future__ import annotations

import abc
import dataclasses
import time
from dataclasses import dataclass
from typing import ClassVar

from onnxtq.calibration import StatsStore
from onnxtq.calibration.data import Source
from onnxtq.emit import NBITS_2BIT_COLUMNS, split_unsafe_2bit_matmul_weights
from onnxtq.errors import OnnxtqError, PassError, PreconditionError, UsageError
from onnxtq.graph import Graph, upgrade_opset
from onnxtq.report import PassReport


@dataclass(frozen=True)
class PassConfig:
    """Base for pass configs: frozen, typed fields with defaults."""


@dataclass
class Context:
    """What passes see: the graph, the calibration source and the current statistics."""

    graph: Graph
    data: Source | None = None
    stats: StatsStore | None = None
    stats_fresh: bool = False


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
    needs_stats: ClassVar[bool] = False  # must have fresh calibration statistics
    uses_stats: ClassVar[bool] = False  # uses statistics when present

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

    def min_opset(self) -> int:
        """Default-domain opset the emitted nodes need (0: any)."""
        return 0

    @abc.abstractmethod
    def run(self, ctx: Context) -> PassReport: ...

    def new_report(self) -> PassReport:
        return PassReport(self.name, self.spec)


def _text(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    return f"{v:g}" if isinstance(v, float) else str(v)


class PassManager:
    """Runs passes in order on a Graph; calibrates lazily; owns timing and error wrapping."""

    def __init__(self, passes: list[Pass]):
        if not passes:
            raise UsageError("the pipeline is empty", "e.g. --pipeline 'fold-bn,rtn{bits=8}'")
        self.passes = passes

    @property
    def pipeline(self) -> str:
        return ",".join(p.spec for p in self.passes)

    def run(self, ctx: Context) -> list[PassReport]:
        reports: list[PassReport] = []
        target = max(p.min_opset() for p in self.passes)
        if ctx.graph.opset() < target:
            before = ctx.graph.opset()
            ctx.graph = Graph(upgrade_opset(ctx.graph.model, target))
            upgrade = PassReport(
                "upgrade-opset", f"upgrade-opset{{to={target}}}", notes=[f"opset {before} -> {target}"]
            )
            reports.append(upgrade)
        for index, p in enumerate(self.passes):
            if p.needs_stats and not ctx.stats_fresh:
                raise PreconditionError(
                    f"pass #{index + 1} '{p.name}' needs calibration statistics of the current model",
                    "put 'calibrate' before it in the pipeline and give --calib DATA",
                )
            start = time.perf_counter()
            try:
                report = p.run(ctx)
            except OnnxtqError:
                raise
            except Exception as exc:
                done = [q.name for q in self.passes[:index]]
                raise PassError(
                    f"pass #{index + 1} '{p.name}' failed after {done}: {type(exc).__name__}: {exc}"
                ) from exc
            report.seconds = time.perf_counter() - start
            if report.invalidates_stats:
                ctx.stats_fresh = False
            reports.append(report)
        split = split_unsafe_2bit_matmul_weights(ctx.graph)
        if split:
            reports.append(
                PassReport(
                    "guard-matmul-2bit",
                    "guard-matmul-2bit",
                    notes=[
                        f"{split} 2-bit MatMul weights split in two along N: onnxruntime's MatMulNBits fusion "
                        f"miscomputes 2-bit weights whose N is not a multiple of {NBITS_2BIT_COLUMNS}"
                    ],
                )
            )
        ctx.graph.remove_dead()
        return reports
