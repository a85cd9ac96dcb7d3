"""Progress on stderr, terminal or not: a line per stage (its time, the run's elapsed time and peak memory)
and, inside long loops, a bar on a terminal or a line every `LINE_SECONDS` with an estimate of the time left.

The library is quiet by default; the CLI turns the lines on (`enable`), so a run in a log or under CI
shows where it is. On a terminal tqdm draws the bars, as before.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time

from tqdm import tqdm

#: Seconds between two progress lines of one loop when stderr is not a terminal.
LINE_SECONDS = 10.0

_state = {"on": False, "start": time.perf_counter()}


def enable(on: bool = True) -> None:
    """Write stage and loop lines to stderr from now on (the CLI does; the API stays quiet)."""
    _state.update(on=on, start=time.perf_counter())


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, in MB (Linux reports it in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _say(text: str) -> None:
    elapsed = time.perf_counter() - _state["start"]
    print(f"onnxtq [{elapsed:7.1f} s, peak {peak_rss_mb() / 1024:5.2f} GB] {text}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stage(name: str):
    """A line when the stage ends, with its time (and when it starts, so a long one shows what runs)."""
    if not _state["on"]:
        yield
        return
    _say(f"{name} ...")
    start = time.perf_counter()
    yield
    _say(f"{name}: {time.perf_counter() - start:.1f} s")


def _interactive() -> bool:
    return sys.stderr.isatty()


class _Lines:
    """tqdm's interface as far as onnxtq uses it (iterate, update, context), written as plain lines."""

    def __init__(self, iterable=None, total=None, desc: str = "", unit: str = "it"):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.n, self.start, self.last = 0, time.perf_counter(), time.perf_counter()

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if now - self.last >= LINE_SECONDS:
            self.last = now
            _say(self._line(now))

    def _line(self, now: float) -> str:
        spent = now - self.start
        if not self.total:
            return f"{self.desc}: {self.n} {self.unit}, {spent:.0f} s"
        left = spent / max(self.n, 1) * (self.total - self.n)
        return f"{self.desc}: {self.n}/{self.total} {self.unit}, {spent:.0f} s, about {left:.0f} s left"

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


def bar(iterable=None, total: int | None = None, desc: str = "", unit: str = "it"):
    """A progress bar on a terminal, lines in a log when enabled, nothing otherwise."""
    if _interactive() or not _state["on"]:
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=None, leave=False)
    return _Lines(iterable, total, desc, unit)
