"""Pipelines as text: `fold-bn,calibrate,rtn{bits=4,block=32}` ⇄ a list of passes.

Grammar: items separated by commas; an item is a pass name optionally followed by
`{key=value,...}`. Printing a parsed pipeline gives the same text back (options in the
order written, values in canonical form: integers, `true`/`false`).
"""

from __future__ import annotations

import re

from onnxtq.errors import UsageError
from onnxtq.pass_infra import Pass, PassManager

_ITEM = re.compile(r"^([a-z][a-z0-9-]*)(?:\{(.*)\})?$")


def _split(text: str) -> list[str]:
    items, depth, current = [], 0, ""
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise UsageError(f"unbalanced '}}' in pipeline '{text}'")
        if ch == "," and depth == 0:
            items.append(current)
            current = ""
        else:
            current += ch
    if depth:
        raise UsageError(f"unbalanced '{{' in pipeline '{text}'")
    items.append(current)
    return [i.strip() for i in items]


def registry() -> dict[str, type[Pass]]:
    """The built-in passes by name (imported lazily: passes depend on the engine, not back)."""
    from onnxtq.passes import REGISTRY

    return REGISTRY


def parse(text: str, passes: dict[str, type[Pass]] | None = None) -> PassManager:
    """A PassManager for pipeline text; unknown names and options fail with the valid ones."""
    passes = passes if passes is not None else registry()
    result = []
    for item in _split(text.strip()):
        m = _ITEM.match(item)
        if not m:
            raise UsageError(f"cannot parse pipeline item '{item}'", "write name or name{key=value,...}")
        name, body = m.group(1), m.group(2)
        if name not in passes:
            raise UsageError(f"unknown pass '{name}'", f"known passes: {', '.join(sorted(passes))}")
        options = {}
        for pair in filter(None, (p.strip() for p in (body or "").split(","))):
            key, eq, value = pair.partition("=")
            if not eq or not key.strip():
                raise UsageError(f"option '{pair}' of '{name}' is not key=value")
            options[key.strip()] = value.strip()
        result.append(passes[name](**options))
    return PassManager(result)
