"""Check models: onnx.checker (full), an onnxruntime session, and an emitted model's outputs against
the original's on calibration inputs (SQNR and max error per output; any NaN or Inf is a failure)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np
import onnx
from onnx.external_data_helper import uses_external_data

from onnxtq import model_io, pieces, positions
from onnxtq.calibration.data import Source
from onnxtq.errors import ModelError, VerificationError
from onnxtq.finite import nonfinite
from onnxtq.graph import FLOAT_TYPES, steps_within
from onnxtq.progress import bar


def outputs(model: onnx.ModelProto, batches, threads: int = 0, fold: bool = False) -> Iterator[list[np.ndarray]]:
    """Each batch's outputs (in the graph's order): from one session, or a piece at a time for a model too
    large for one (onnxtq.pieces). With `fold` the session decodes the weights at load where, decoded, they
    fit a piece (`pieces.folds`): quicker for many runs; verification runs the file as it is."""
    if pieces.needed(model):
        yield from pieces.outputs(model, batches, threads)
        return
    sess = model_io.session(model, threads, fold_dequantize=fold and pieces.folds(model))
    for _, feed in batches:
        yield sess.run(None, feed)


def _first(source: Source, samples: int):
    """The source's first `samples` inputs, one at a time."""
    return itertools.islice(source.batches(1), samples)


def compare(
    reference: onnx.ModelProto,
    candidate: onnx.ModelProto,
    source: Source,
    samples: int = 8,
    threads: int = 0,
    folders: tuple = (None, None),
) -> dict:
    """Per output: SQNR in dB (10·log10 Σref² / Σ(ref − out)², over the positions that count: onnxtq.positions),
    max |err|, and how many of its values are NaN/Inf in the candidate and in the reference, over up to
    `samples` inputs. `folders`: where each model's external data is, if not in the run's folder
    (graph.external_data_from)."""
    names = [o.name for o in reference.graph.output]
    keys = ("signal", "noise", "max_abs_err", "values", "nonfinite", "reference_nonfinite")
    sums = {name: dict.fromkeys(keys, 0.0) for name in names}
    seen = 0
    feeds = [feed for _, feed in _first(source, samples)]  # a few single inputs: where their tokens are
    pairs = zip(
        *(
            steps_within(folder, outputs(model, ((1, feed) for feed in feeds), threads))
            for model, folder in zip((reference, candidate), folders)
        )
    )
    with bar(total=samples, desc="verify", unit="sample") as shown:
        for feed, (ours, theirs) in zip(feeds, pairs):
            for name, a, b in zip(names, ours, theirs):
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                finite = np.isfinite(a) & np.isfinite(b)
                error = np.abs(a - b)
                counted = positions.counted(feed, a)
                s = sums[name]
                s["signal"] += positions.squares(a, counted)
                s["noise"] += positions.squares(error, counted)
                s["max_abs_err"] = max(s["max_abs_err"], float(error[finite].max(initial=0.0)))
                s["values"] += b.size
                s["nonfinite"] += int((~np.isfinite(b)).sum())
                s["reference_nonfinite"] += int((~np.isfinite(a)).sum())
            seen += 1
            shown.update(1)
    results = {}
    for name, s in sums.items():
        finite = not (s["nonfinite"] or s["reference_nonfinite"])
        results[name] = {
            "sqnr_db": _db(s["signal"], s["noise"]) if finite else float("nan"),
            "max_abs_err": s["max_abs_err"],
            **{k: int(s[k]) for k in ("values", "nonfinite", "reference_nonfinite")},
        }
    return {"samples": seen, "outputs": results}


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return float("inf")
    return float(10 * np.log10(max(signal, 1e-300) / noise))


def check_fidelity(result: dict, min_sqnr_db: float | None, consequence: str = "") -> None:
    """VerificationError if an output holds NaN/Inf (NaN compares false, so a budget alone never trips on
    it) or, with a budget, if any output's SQNR is below `min_sqnr_db`."""
    for name, v in result["outputs"].items():
        if v["nonfinite"] or v["reference_nonfinite"]:
            ours, theirs = v["nonfinite"], v["reference_nonfinite"]
            raise VerificationError(
                f"output '{name}' holds {ours:,d} NaN/Inf of {v['values']:,d} values (the original model's "
                f"holds {theirs:,d}){consequence}",
                "check the model and the calibration data for NaN/Inf; a model that outputs NaN is broken",
            )
    worst = min(v["sqnr_db"] for v in result["outputs"].values())
    if min_sqnr_db is not None and worst < min_sqnr_db:
        raise VerificationError(
            f"output SQNR {worst:.1f} dB is below the budget of {min_sqnr_db:g} dB{consequence}",
            "use more bits, a smaller block, or lower --min-sqnr",
        )


def _problem(model: onnx.ModelProto, load: bool = True) -> str | None:
    """Why the model cannot be used: the full checker's words or onnxruntime's; None if both accept it.
    A large model, or one whose weights are still in the input's external data, is checked as a file in a
    folder (model_io.on_disk), as the checker needs past 2 GB and to find external data."""
    if model_io.needs_folder(model):
        with model_io.on_disk(model) as path:
            return _file_problem(model, path, load)
    return _file_problem(model, None, load)


def _file_problem(model: onnx.ModelProto, path: str | None, load: bool = True) -> str | None:
    try:
        onnx.checker.check_model(model if path is None else path, full_check=True)
    except Exception as exc:  # the checker raises ValidationError, shape inference errors and others
        return f"onnx.checker rejects it: {exc}"
    try:
        if not pieces.needed(model):
            model_io.session(model, on_disk_at=path)
        elif load:  # each piece's session in turn, as a run in pieces loads them
            pieces.check_loads(model)
    except ModelError as exc:
        return str(exc)
    return None


_INPUT_HINT = "onnxtq takes models that pass onnx.checker's full check and run in onnxruntime on their calibration data"


def check_input(model: onnx.ModelProto, runs_next: bool = False) -> None:
    """The model given to compress must be valid ONNX that onnxruntime loads: what onnxtq starts from. A model
    run in pieces that `check_runs` will run next is loaded there, once."""
    problem = _problem(model, load=not (runs_next and pieces.needed(model)))
    if problem:
        raise ModelError(f"the model is not one onnxtq can compress: {problem}", _INPUT_HINT)


def check_runs(model: onnx.ModelProto, source: Source) -> dict[str, tuple[int, ...]]:
    """...and that runs on the first calibration sample with finite outputs (a model that cannot, or that
    computes NaN, would fail every later step, at best with onnxruntime's words as if they were a bug).
    Returns the shape of each output on that sample."""
    first = list(_first(source, 1))
    if not first:
        return {}  # an empty source is refused by whoever reads it
    names = [o.name for o in model.graph.output]
    try:
        values = next(outputs(model, first))
    except ModelError:
        raise
    except Exception as exc:  # onnxruntime's Fail, InvalidArgument, RuntimeException...
        raise ModelError(
            f"onnxruntime cannot run the model on the first calibration sample: {exc}", _INPUT_HINT
        ) from exc
    for name, value in zip(names, values):
        found = nonfinite(np.asarray(value))
        if found:
            raise ModelError(
                f"on the first calibration sample the model's output '{name}' holds {found[0]} NaN/Inf value(s)",
                "the model or its weights are broken: onnxtq compresses models that compute finite outputs",
            )
    return {name: tuple(np.shape(value)) for name, value in zip(names, values)}


def drop_wrong_output_shapes(model: onnx.ModelProto, observed: dict[str, tuple[int, ...]]) -> list[str]:
    """Forget the declared sizes of every graph output that contradicts what onnxruntime computes (its rank or
    a fixed size): onnxruntime only warns, but shape inference at a newer opset sees through more ops and
    the full checker then rejects the file. Returns a sentence per output cleared."""
    notes = []
    for out in model.graph.output:
        tensor = out.type.tensor_type
        if out.name not in observed or not tensor.HasField("shape"):
            continue
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in tensor.shape.dim]
        real = observed[out.name]
        if len(dims) != len(real) or any(isinstance(d, int) and d != r for d, r in zip(dims, real)):
            del tensor.shape.dim[:]
            tensor.shape.dim.extend(onnx.TensorShapeProto.Dimension() for _ in real)
            notes.append(f"output '{out.name}' is declared {dims} but computes {list(real)}: now of unknown size")
    return notes


def check_constants(original: onnx.ModelProto, result: onnx.ModelProto) -> None:
    """VerificationError if the run wrote a constant holding NaN/Inf that the original did not hold: with no
    calibration data to run the model on, this is what stops a broken file (e.g. steps beyond float16).
    Tensors still in the input's external data are the input's own, and integer codes hold no NaN: neither is
    read."""
    constants = {t.name: t for t in original.graph.initializer}
    for n in original.graph.node:
        if n.op_type == "Constant":
            constants.update((n.output[0], a.t) for a in n.attribute if a.name == "value")
    made = [
        t.name
        for t in result.graph.initializer
        if t.data_type in FLOAT_TYPES
        and (model_io.made_by_run(t) or not uses_external_data(t))
        and nonfinite(model_io.initializer_array(t))
        and not (t.name in constants and nonfinite(model_io.initializer_array(constants[t.name])))
    ]
    if made:
        raise VerificationError(
            f"the compressed model's constant(s) {made[:3]} hold NaN/Inf; nothing written",
            "this is a bug in onnxtq (or the weights are too large for float16 steps: try scale_bits=32)",
        )


def validate(model: onnx.ModelProto) -> None:
    """Full checker plus an onnxruntime session: what we emit must load in stock ORT."""
    problem = _problem(model)
    if problem:
        raise VerificationError(f"the compressed model fails validation: {problem}")
