"""compress(): load → normalise → run the pipeline → validate → write atomically.

Nothing is written unless the result passes the checker, loads in onnxruntime and,
when a budget is given, keeps every output's SQNR above it. The input is never touched.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

from onnxtq import __version__, model_io
from onnxtq.calibration.data import ImagePreprocessing, open_source
from onnxtq.errors import OnnxtqError, VerificationError
from onnxtq.graph import Graph, constants_to_initializers, copy_model
from onnxtq.pass_infra import Context
from onnxtq.pipeline import parse
from onnxtq.report import PassReport, RunReport
from onnxtq.verify import compare, validate

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
    """Normalisation every pipeline starts from: weights held by Constant nodes become initializers."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    moved = constants_to_initializers(work)
    report = PassReport("prepare", "prepare", notes=[f"{moved} Constant nodes turned into initializers"])
    return work, report


def compress(
    source_path: str | os.PathLike,
    output_path: str | os.PathLike,
    pipeline: str = DEFAULT_PIPELINE,
    calib=None,
    image_prep: ImagePreprocessing | None = None,
    verify_samples: int = 8,
    min_sqnr_db: float | None = None,
    threads: int = 0,
) -> RunReport:
    """Compress the model at `source_path` into `output_path`; returns the run report."""
    manager = parse(pipeline)
    original = model_io.load(source_path)
    work, prep_report = prepare(original)
    data = open_source(calib, original, prep=image_prep) if calib is not None else None
    try:
        ctx = Context(Graph(work), data)
        reports = [prep_report] + manager.run(ctx)
        return _finish(
            original, ctx, manager.pipeline, reports, source_path, output_path, verify_samples, min_sqnr_db, threads
        )
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
) -> list[RunReport]:
    """Several pipelines on one model, the `shared` head (normalisation, calibration) run once.

    Writes OUT_DIR/<model>.<n>.onnx for the n-th pipeline; returns their run reports in order. A pipeline
    that fails gets a report with its `error` (and no file): one failure does not cost the others' results.
    """
    head = parse(shared)
    tails = [parse(p) for p in pipelines]
    original = model_io.load(source_path)
    work, prep_report = prepare(original)
    data = open_source(calib, original, prep=image_prep) if calib is not None else None
    runs = []
    try:
        base = Context(Graph(work), data)
        head_reports = [prep_report] + head.run(base)
        for index, tail in enumerate(tails):
            pipeline = f"{head.pipeline},{tail.pipeline}"
            output = Path(out_dir) / f"{Path(source_path).stem}.{index}.onnx"
            try:
                ctx = Context(Graph(copy_model(base.graph.model)), data, base.stats, base.stats_fresh)
                reports = head_reports + tail.run(ctx)
                runs.append(
                    _finish(original, ctx, pipeline, reports, source_path, output, verify_samples, None, threads)
                )
            except OnnxtqError as exc:
                runs.append(RunReport(pipeline, str(source_path), error=f"{type(exc).__name__}: {exc}"))
        return runs
    finally:
        if data is not None:
            data.close()


def _finish(
    original,
    ctx: Context,
    pipeline: str,
    reports,
    source_path,
    output_path,
    verify_samples: int,
    min_sqnr_db: float | None,
    threads: int,
) -> RunReport:
    """Stamp, validate, verify against the original and write atomically: the tail every run shares."""
    result = ctx.graph.model
    onnx.helper.set_model_props(
        result,
        {
            **{p.key: p.value for p in original.metadata_props},
            "onnxtq.pipeline": pipeline,
            "onnxtq.version": __version__,
        },
    )
    validate(result)
    run = RunReport(pipeline, str(source_path), str(output_path), passes=reports)
    run.session = "onnxruntime CPU, session.qdq_matmulnbits_accuracy_level=0 (fp32 compute)"
    if ctx.stats is not None:
        run.calibration = f"{ctx.stats.samples} samples from {ctx.stats.description}"
    if ctx.data is not None and verify_samples:
        run.verification = compare(original, result, ctx.data, verify_samples, threads)
        worst = min(v["sqnr_db"] for v in run.verification["outputs"].values())
        if min_sqnr_db is not None and worst < min_sqnr_db:
            raise VerificationError(
                f"output SQNR {worst:.1f} dB is below the budget of {min_sqnr_db:g} dB; nothing written",
                "use more bits, a smaller block, or lower --min-sqnr",
            )
    run.bytes_before = model_bytes(source_path)
    run.bytes_after = model_io.save_atomic(result, output_path, refuse=Path(source_path))
    return run
