"""compress(): load → check → normalise → run the pipeline → validate → write atomically.

Before any work, every output path is checked against the inputs and the other outputs
(onnxtq.paths), the model must pass the checker and load in onnxruntime, and weights holding
NaN/Inf are refused unless the caller keeps them as they are. Nothing is written unless the
result passes the checker, loads in onnxruntime, computes no NaN/Inf, keeps every output's SQNR
above the budget when one is given, and gains something: at least one weight quantized and a
file smaller than the input (else NoGainError, exit 4, unless `allow_no_gain`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import onnx

from onnxtq import __version__, model_io, pieces
from onnxtq.calibration.data import ImagePreprocessing, open_source, split_holdout
from onnxtq.errors import ModelError, NoGainError, OnnxtqError
from onnxtq.graph import (
    Graph,
    constants_to_initializers,
    external_data_from,
    hoist_body_weights,
    scratch_space,
    subgraph_tensors,
)
from onnxtq.pass_infra import Context
from onnxtq.paths import check_outputs
from onnxtq.pipeline import parse
from onnxtq.profiles import Profile, min_onnxruntime, profile
from onnxtq.progress import stage
from onnxtq.report import PassReport, RunReport
from onnxtq.verify import (
    check_constants,
    check_fidelity,
    check_input,
    check_runs,
    compare,
    drop_wrong_output_shapes,
    validate,
)
from onnxtq.weights import nonfinite_weights

DEFAULT_PIPELINE = "fold-bn,calibrate,rtn{bits=8}"


def model_bytes(path: str | os.PathLike) -> int:
    """File size including external data files that the model references."""
    path = Path(path)
    total = path.stat().st_size
    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                locations.add(e.value)
    return total + sum((path.parent / loc).stat().st_size for loc in locations if (path.parent / loc).is_file())


def prepare(model: onnx.ModelProto) -> tuple[onnx.ModelProto, PassReport]:
    """Normalisation every pipeline starts from: weights held by Constant nodes become initializers, and
    those of If/Loop/Scan bodies move to the main graph (read from the outer scope)."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    moved = constants_to_initializers(work)
    report = PassReport("prepare", "prepare", notes=[f"{moved} Constant nodes turned into initializers"])
    hoisted = hoist_body_weights(work)
    if hoisted:
        report.notes.append(f"{hoisted} weights of If/Loop/Scan bodies moved to the main graph")
    return work, report


@dataclass(frozen=True)
class Guards:
    """What a run refuses unless told otherwise: no-gain outputs (exit 4) and NaN/Inf weights (exit 2)."""

    allow_no_gain: bool = False
    keep_nonfinite: bool = False


def _start(source_path, calib, outputs: dict, guards: Guards, image_prep):
    """Everything checked before any work: paths, the model itself, its weights; returns what the run needs.
    Weights in external data stay on disk (read within `external_data_from` the model's folder)."""
    original, external = model_io.load_with_files(source_path, lazy=True)
    inputs = {"the input model": [source_path], "its external data": external}
    if isinstance(calib, (str, os.PathLike)):
        inputs["the calibration data"] = [calib]
    check_outputs(inputs, outputs)
    check_input(original, runs_next=calib is not None)
    work, prep_report = prepare(original)
    _check_weights(work, guards)
    data = open_source(calib, original, prep=image_prep) if calib is not None else None
    try:
        if data is not None:
            prep_report.notes += drop_wrong_output_shapes(work, check_runs(original, data))
    except BaseException:
        if data is not None:
            data.close()
        raise
    size = sum(Path(p).stat().st_size for p in [source_path, *external])
    return original, work, prep_report, data, size


def _check_weights(work: onnx.ModelProto, guards: Guards) -> None:
    """Weights holding NaN/Inf are refused, unless the caller keeps them as they are."""
    poisoned = nonfinite_weights(Graph(work))
    if poisoned and not guards.keep_nonfinite:
        more = f" and {len(poisoned) - 3} more" if len(poisoned) > 3 else ""
        raise ModelError(
            f"{len(poisoned)} weight tensor(s) hold NaN/Inf: {'; '.join(poisoned[:3])}{more}",
            "repair the model, or keep those tensors as they are with --keep-nonfinite (their layers stay in float)",
        )


def compress(
    source_path: str | os.PathLike,
    output_path: str | os.PathLike,
    pipeline: str = DEFAULT_PIPELINE,
    calib=None,
    image_prep: ImagePreprocessing | None = None,
    verify_samples: int = 8,
    min_sqnr_db: float | None = None,
    threads: int = 0,
    guards: Guards = Guards(),
    also_writes: dict[str, str | os.PathLike | None] | None = None,
    target: str = "ort",
    external_data: bool | None = None,
) -> RunReport:
    """Compress the model at `source_path` into `output_path`; returns the run report.

    `also_writes` names the caller's other outputs (a report, a page), checked with `output_path`
    against the inputs and each other before any work; `target` is the runtime profile (onnxtq.profiles);
    `external_data` writes the weights to `output_path`.data (None: only when one file would pass 2 GB).
    """
    chosen = profile(target)
    manager = parse(pipeline)
    outputs = {"the output": output_path, "its external data": model_io.data_file(output_path)}
    with external_data_from(Path(source_path).parent):
        with stage("load and check"):
            original, work, prep_report, data, size = _start(
                source_path, calib, {**outputs, **(also_writes or {})}, guards, image_prep
            )
        try:
            with scratch_space(pieces.needed(original)):  # a big model's new tensors wait on disk
                ctx = _context(Graph(work), data, manager.wants_holdout, chosen)
                del work  # the graph holds what it needs; an opset upgrade then frees the copy read from the file
                reports = [prep_report] + manager.run(ctx)
                run = RunReport(manager.pipeline, str(source_path), str(output_path), passes=reports, bytes_before=size)
                return _finish(original, ctx, run, verify_samples, min_sqnr_db, threads, guards, external_data)
        finally:
            if data is not None:
                data.close()


def sweep(
    source_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    pipelines: list[str],
    calib=None,
    shared: str = "fold-bn,calibrate",
    image_prep: ImagePreprocessing | None = None,
    verify_samples: int = 8,
    threads: int = 0,
    guards: Guards = Guards(),
    also_writes: dict[str, str | os.PathLike | None] | None = None,
    target: str = "ort",
    external_data: bool | None = None,
) -> list[RunReport]:
    """Several pipelines on one model, the `shared` head (normalisation, calibration) run once.

    Writes OUT_DIR/<model>.<n>.onnx for the n-th pipeline; returns their run reports in order. A pipeline
    that fails gets a report with its `error` and `exit_code` (and no file): one failure does not cost the
    others' results.
    """
    chosen = profile(target)
    head = parse(shared)
    tails = [parse(p) for p in pipelines]
    outputs = {}
    for i in range(len(tails)):
        outputs[f"pipeline {i + 1}'s output"] = sweep_output(source_path, out_dir, i)
        outputs[f"pipeline {i + 1}'s external data"] = model_io.data_file(sweep_output(source_path, out_dir, i))
    with external_data_from(Path(source_path).parent):
        with stage("load and check"):
            original, work, prep_report, data, size = _start(
                source_path, calib, {**outputs, **(also_writes or {})}, guards, image_prep
            )
        runs = []
        try:
            with scratch_space(pieces.needed(original)):
                base = _context(Graph(work), data, any(tail.wants_holdout for tail in tails), chosen)
                head_reports = [prep_report] + head.run(base)
                for index, tail in enumerate(tails):
                    pipeline = f"{head.pipeline},{tail.pipeline}"
                    output = sweep_output(source_path, out_dir, index)
                    try:
                        graph = Graph(base.graph.proto())
                        ctx = Context(graph, base.data, base.stats, base.stats_fresh, base.holdout, base.profile)
                        reports = head_reports + tail.run(ctx)
                        run = RunReport(pipeline, str(source_path), str(output), passes=reports, bytes_before=size)
                        runs.append(_finish(original, ctx, run, verify_samples, None, threads, guards, external_data))
                    except OnnxtqError as exc:
                        error = f"{type(exc).__name__}: {exc}"
                        runs.append(RunReport(pipeline, str(source_path), error=error, exit_code=exc.exit_code))
                return runs
        finally:
            if data is not None:
                data.close()


def _context(graph: Graph, data, holdout: bool, chosen: Profile) -> Context:
    """The passes' context; where a pass measures its result, every fourth calibration input is held out."""
    if holdout and data is not None:
        fit, held = split_holdout(data)
        return Context(graph, fit, holdout=held, profile=chosen)
    return Context(graph, data, profile=chosen)


def sweep_output(source_path, out_dir, index: int) -> Path:
    """Where a sweep writes its `index`-th pipeline's model."""
    return Path(out_dir) / f"{Path(source_path).stem}.{index}.onnx"


def _finish(
    original,
    ctx: Context,
    run: RunReport,
    verify_samples: int,
    min_sqnr_db: float | None,
    threads: int,
    guards,
    external_data: bool | None,
) -> RunReport:
    """Stamp, validate, check the gain, verify against the original and write atomically: the tail every
    run shares. The file is written beside its place first (its size is the gain's measure) and moved in
    only when every check has passed."""
    result = ctx.graph.proto()
    run.onnxruntime = min_onnxruntime(result)
    onnx.helper.set_model_props(
        result,
        {
            **{p.key: p.value for p in original.metadata_props},
            "onnxtq.pipeline": run.pipeline,
            "onnxtq.version": __version__,
            "onnxtq.target": ctx.profile.name,
            "onnxtq.runtime": f"onnxruntime>={run.onnxruntime}",
        },
    )
    with stage("validate"):
        check_constants(original, result)
        validate(result)
    with stage(f"write {run.output}"):
        written = model_io.stage(result, run.output, refuse=run.source, external_data=external_data)
    try:
        why = None if guards.allow_no_gain else no_gain(run, written.size, original)
        if why:
            raise NoGainError(f"{why}; nothing written")
        run.session = "onnxruntime CPU, session.qdq_matmulnbits_accuracy_level=0 (fp32 compute)"
        if ctx.stats is not None:
            run.calibration = f"{ctx.stats.samples} samples from {ctx.stats.description}"
        inputs = ctx.data if ctx.holdout is None else ctx.holdout  # held-out inputs: no statistic came from them
        if inputs is not None and verify_samples:
            with stage("verify against the original"):
                run.verification = compare(original, result, inputs, verify_samples, threads)
            check_fidelity(run.verification, min_sqnr_db, "; nothing written")
    except BaseException:
        written.discard()
        raise
    written.commit()
    run.bytes_after = written.size
    return run


def no_gain(run: RunReport, size: int, original: onnx.ModelProto) -> str | None:
    """Why the output gains nothing (no weight quantized, or not smaller than the input), or None."""
    records = [r for p in run.passes for r in p.records]
    if not any(r.status == "quantized" for r in records):
        skipped = {r.name: r.reason for r in records if r.status == "skipped"}
        if skipped:
            examples = "; ".join(f"'{name}': {why}" for name, why in list(skipped.items())[:3])
            return f"no weight was quantized: {len(skipped)} candidate(s) skipped ({examples})"
        hidden = subgraph_tensors(original)
        where = f"; {hidden} tensor(s) sit inside If/Loop/Scan bodies, which onnxtq does not reach" if hidden else ""
        return f"no weight was quantized: the pipeline quantizes nothing, or the model has no weight it can{where}"
    if size >= run.bytes_before:
        return f"the output ({size:,d} B) is not smaller than the input ({run.bytes_before:,d} B)"
    return None
