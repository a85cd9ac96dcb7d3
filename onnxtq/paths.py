"""Which files a command may write: never one of its inputs, never one file twice, only where it can.

One rule for every path onnxtq writes (the model, report JSON, page, PNGs, packed file), checked
before any work starts: an output may not be an input (the model, its external data, the calibration
data, or anything inside an input folder) nor another output of the same command. Files are compared
as files, not as spellings: symlinks are resolved and hard links match by inode. The folder an output
goes to must be writable, which is tried by creating (and removing) a temporary file there.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from onnxtq.errors import UsageError

PathLike = str | os.PathLike


def _names(path: Path) -> set:
    """Every way to recognise a file: its resolved path and, if it exists, its inode."""
    names: set = {("path", str(path.resolve()))}
    try:
        st = path.stat()
        names.add(("inode", st.st_dev, st.st_ino))
    except OSError:
        pass
    return names


def _inside(path: Path, folder: Path) -> bool:
    return folder.is_dir() and folder.resolve() in path.resolve().parents


def _check_writable(label: str, path: Path) -> None:
    """The nearest existing folder above `path` accepts a new file (write_atomic makes the rest)."""
    if path.is_dir():
        raise UsageError(f"{label} '{path}' is a folder", "give a file name")
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{label} '{path}': '{folder}' is a file, not a folder", "choose another output path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".onnxtq-probe.", dir=folder)
    except OSError as exc:
        raise UsageError(f"cannot write {label} '{path}': {exc.strerror}", "choose a folder you can write to") from None
    os.close(fd)
    os.unlink(probe)


def check_outputs(inputs: dict[str, Iterable[PathLike]], outputs: dict[str, PathLike | None]) -> None:
    """Refuse, before any work, outputs that would overwrite an input or each other, or cannot be written.

    `inputs` maps what each input is ("the model", "the calibration data") to its paths (files or
    folders); `outputs` maps each output's name (the option that gave it) to its path, None if not asked for.
    """
    known: dict = {}
    folders: list[tuple[str, Path]] = []
    for what, paths in inputs.items():
        for p in paths:
            p = Path(p)
            if p.is_dir():
                folders.append((what, p))
            for name in _names(p):
                known.setdefault(name, f"is {what}")
    hint = "choose another path: onnxtq never overwrites its inputs"
    for label, out in outputs.items():
        if out is None:
            continue
        out = Path(out)
        clash = next((known[n] for n in _names(out) if n in known), None)
        if clash is not None:
            twice = clash.startswith("names the same file")
            raise UsageError(f"{label} '{out}' {clash}", "give each output its own path" if twice else hint)
        inside = next((what for what, folder in folders if _inside(out, folder)), None)
        if inside is not None:
            raise UsageError(f"{label} '{out}' lies inside the folder of {inside}", hint)
        _check_writable(label, out)
        for name in _names(out):
            known[name] = f"names the same file as {label}"
