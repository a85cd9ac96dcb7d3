"""Command line: `onnxtq compress | sweep | report | inspect | verify | pack | unpack | list-passes`.

`main(argv)` returns the exit code, so tests call it in process. Errors print as
`onnxtq: error: ...` and `onnxtq: hint: ...`, with a traceback only under -v.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from onnxtq import __version__, container, model_io, parallel, progress, report_page
from onnxtq.calibration.data import ImagePreprocessing, open_source
from onnxtq.compress import DEFAULT_PIPELINE, Guards, compress, model_bytes, prepare, sweep
from onnxtq.errors import DataError, OnnxtqError, UsageError
from onnxtq.graph import Graph, external_data_from, provenance
from onnxtq.model_io import data_file, write_atomic
from onnxtq.pipeline import registry
from onnxtq.profiles import PROFILES, min_onnxruntime
from onnxtq.report import output_line
from onnxtq.served import MEASURED_UP_TO, SENT, transfer_sizes
from onnxtq.target import DEFAULT_CODECS, KINDS, SERVED_CODECS, parse_bytes
from onnxtq.verify import check_fidelity, compare, validate
from onnxtq.weights import discover

EXIT_CODES = """exit codes:
  0  success
  1  a bug: an unexpected failure in a pass or onnxruntime (please report it with -v output)
  2  bad input or usage: unreadable/unsafe model, NaN/Inf in weights or calibration data, unknown pass or
     option, an output path that is an input or another output or cannot be written
  3  the compressed model failed verification (checker, onnxruntime, NaN/Inf outputs, --min-sqnr budget)
  4  no gain: no weight was quantized, or the output is not smaller than the input (nothing written;
     --allow-no-gain writes it and exits 0)"""


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _bytes(text: str) -> int:
    try:
        return parse_bytes(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _size(text: str) -> tuple[int, int]:
    values = _floats(text)
    if len(values) != 2:
        raise argparse.ArgumentTypeError("expected H,W")
    return int(values[0]), int(values[1])


def _add_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--calib",
        metavar="DATA",
        help="calibration inputs: .npz keyed by input names (axis 0 = samples) or a folder of images;"
        " default: calib.npz beside the model",
    )
    img = p.add_argument_group("image folder preprocessing (resize, x*scale, (x-mean)/std, NCHW)")
    img.add_argument("--image-size", type=_size, metavar="H,W", help="default: the model's static input size")
    img.add_argument("--image-scale", type=float, default=1 / 255)
    img.add_argument("--image-mean", type=_floats, default=(0.0, 0.0, 0.0), metavar="R,G,B")
    img.add_argument("--image-std", type=_floats, default=(1.0, 1.0, 1.0), metavar="R,G,B")
    img.add_argument("--bgr", action="store_true", help="feed channels in BGR order")


def _add_guard_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-no-gain",
        action="store_true",
        help="write the output (exit 0) even if no weight was quantized or it is not smaller than the input",
    )
    p.add_argument(
        "--keep-nonfinite",
        action="store_true",
        help="leave weights that hold NaN/Inf as they are (their layers stay in float) instead of refusing the model",
    )


def _add_target_option(p: argparse.ArgumentParser) -> None:
    rows = "; ".join(f"{name}: {row.purpose}" for name, row in PROFILES.items())
    p.add_argument("--target", choices=PROFILES, default="ort", help=f"the runtimes the file is for ({rows})")


def _add_worker_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=0, help="threads for per-layer work (0: one per core)")
    p.add_argument(
        "--cluster",
        metavar="ADDRESS",
        help="run per-layer work on this Dask scheduler's workers, e.g. tcp://10.0.0.5:8786 (same file as a local run)",
    )


def _add_external_data_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--external-data",
        action="store_true",
        default=None,
        help="write the weights to OUTPUT.data beside the model (by itself when one file would pass 2 GB)",
    )


def _workers(args) -> None:
    parallel.configure(args.jobs, args.cluster)


def _guards(args) -> Guards:
    return Guards(allow_no_gain=args.allow_no_gain, keep_nonfinite=args.keep_nonfinite)


def _command(sub, name: str, help: str) -> argparse.ArgumentParser:
    """A sub-command whose help ends with the exit codes (those that read or write models)."""
    return sub.add_parser(name, help=help, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxtq",
        description=__doc__.splitlines()[0],
        epilog=EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"onnxtq {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and show tracebacks")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")
    sub = parser.add_subparsers(dest="command", required=True)

    c = _command(sub, "compress", "compress a model into a smaller ONNX file")
    c.add_argument("model")
    c.add_argument("-o", "--output", help="default: ./<model name>.compressed.onnx")
    c.add_argument(
        "--pipeline",
        help=f"pass pipeline text (default: {DEFAULT_PIPELINE}, or the target run); see list-passes",
    )
    goal = c.add_argument_group(
        "a target (one): every codec competes for every layer, checked on held-out calibration inputs"
    )
    one = goal.add_mutually_exclusive_group()
    one.add_argument("--size", type=_bytes, metavar="BYTES", help="the deployable file's size, e.g. 2.8MB, 900kB")
    one.add_argument("--served-size", type=_bytes, metavar="BYTES", help="its size after brotli -q 11 (web servers)")
    one.add_argument("--bits", type=float, metavar="B", help="average stored bits per weight")
    one.add_argument("--sqnr", type=float, metavar="DB", help="the worst output's SQNR on the held-out inputs")
    one.add_argument(
        "--agreement", type=float, metavar="P", help="top-1 agreement with the original on the held-out inputs"
    )
    goal.add_argument(
        "--codecs",
        help=f"the codecs that compete, joined by + (default: {DEFAULT_CODECS}; {SERVED_CODECS} for --served-size)",
    )
    _add_data_options(c)
    c.add_argument("--report", metavar="JSON", help="write the full run report as JSON")
    c.add_argument("--report-html", metavar="HTML", help="write the report page (see the report command)")
    c.add_argument(
        "--verify-samples",
        type=int,
        default=8,
        help="inputs used to compare outputs with the original (held-out ones where the run has them; 0: skip)",
    )
    c.add_argument(
        "--min-sqnr", type=float, metavar="DB", help="refuse to write the output if any output's SQNR is below this"
    )
    c.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    c.add_argument(
        "--no-sent",
        action="store_true",
        help=f"skip the sizes as sent (brotli -q 11 takes about 3 s/MB; always skipped past {MEASURED_UP_TO >> 20} MB)",
    )
    _add_worker_options(c)
    _add_external_data_option(c)
    _add_target_option(c)
    _add_guard_options(c)

    sw = _command(
        sub, "sweep", "run several pipelines on one model, calibrating once, and tabulate size against fidelity"
    )
    sw.add_argument("model")
    sw.add_argument("-o", "--out-dir", required=True, help="folder for <model>.<n>.onnx, one per pipeline")
    sw.add_argument("--pipelines", nargs="+", required=True, help="what follows the shared head, e.g. 'tq{rate=3}'")
    sw.add_argument("--shared", default="fold-bn,calibrate", help="head run once (default: fold-bn,calibrate)")
    _add_data_options(sw)
    sw.add_argument("--report", metavar="JSON", help="write every run report as one JSON list")
    sw.add_argument("--report-html", metavar="HTML", help="write the report page with the rate-fidelity curve")
    sw.add_argument("--verify-samples", type=int, default=8)
    sw.add_argument("--threads", type=int, default=0)
    _add_worker_options(sw)
    _add_external_data_option(sw)
    _add_target_option(sw)
    _add_guard_options(sw)

    rp = _command(
        sub,
        "report",
        "an HTML page (plots embedded) of run reports: per-layer bits, bound, SQNR, bytes; rate-fidelity curve",
    )
    rp.add_argument("reports", nargs="+", metavar="REPORT.json", help="written by compress/sweep --report")
    rp.add_argument("-o", "--output", help="the HTML page (default: ./<first report name>.html)")
    rp.add_argument("--json", metavar="PATH", help="also write the plotted figures' data as JSON")
    rp.add_argument("--png-dir", metavar="DIR", help="also write each plot as DIR/<figure id>.png")

    i = sub.add_parser("inspect", help="opset, ops, weights and sizes of a model")
    i.add_argument("model")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")

    v = _command(sub, "verify", "compare a compressed model with its original (SQNR, max error)")
    v.add_argument("original")
    v.add_argument("compressed")
    _add_data_options(v)
    v.add_argument("--samples", type=int, default=32)
    v.add_argument("--min-sqnr", type=float, metavar="DB", help="exit 3 if any output's SQNR is below this")

    pk = _command(
        sub, "pack", "entropy-code a deployable model's integer weights into a .onnxtq container (transport/storage)"
    )
    pk.add_argument("model")
    pk.add_argument("-o", "--output", help="default: ./<model name>.onnxtq")
    pk.add_argument("--coder", choices=container.CODERS, default="rans", help="entropy coder (default: rans)")
    pk.add_argument(
        "--min-elements",
        type=int,
        default=container.DEFAULT_MIN_ELEMENTS,
        help="smaller integer initializers stay in the lzma-compressed skeleton",
    )
    pk.add_argument("--json", action="store_true", help="print the size report as JSON")

    up = _command(sub, "unpack", "restore the deployable .onnx file, byte for byte, from a .onnxtq container")
    up.add_argument("container")
    up.add_argument("-o", "--output", help="default: ./<container name>.onnx")

    lp = sub.add_parser("list-passes", help="the passes a pipeline can name, with their options")
    lp.add_argument("--options", action="store_true", help="also list each option's type and default")
    return parser


def _calib(args, model_path: str):
    if args.calib:
        return args.calib
    beside = Path(model_path).parent / "calib.npz"
    return str(beside) if beside.is_file() else None


def _prep(args) -> ImagePreprocessing:
    return ImagePreprocessing(args.image_size, args.image_scale, args.image_mean, args.image_std, args.bgr)


def _pipeline(args) -> str:
    """The pipeline a compress command runs: the one given, the target run, or the default."""
    targets = {kind: getattr(args, kind) for kind in KINDS if getattr(args, kind) is not None}
    if targets and args.pipeline:
        raise UsageError(
            "give a target or a pipeline, not both", "name the target in the pipeline instead: auto{agreement=0.95}"
        )
    if targets:
        ((kind, value),) = targets.items()
        codecs = "" if args.codecs is None else f",codecs={args.codecs}"
        return f"fold-bn,calibrate,auto{{{kind}={value!r}{codecs}}}"  # repr: floats exactly
    return args.pipeline or DEFAULT_PIPELINE


def _compress(args) -> int:
    output = args.output or f"{Path(args.model).stem}.compressed.onnx"
    _workers(args)
    run = compress(
        args.model,
        output,
        _pipeline(args),
        _calib(args, args.model),
        _prep(args),
        args.verify_samples,
        args.min_sqnr,
        args.threads,
        _guards(args),
        {"--report": args.report, "--report-html": args.report_html},
        args.target,
        args.external_data,
    )
    data = data_file(output) if run.bytes_after > Path(output).stat().st_size else None
    with progress.stage("sizes as sent"):
        measure = run.bytes_after <= MEASURED_UP_TO and not args.no_sent and data is None
        run.transfer = transfer_sizes(Path(output).read_bytes()) if measure else {}
    print(run.table())
    if not run.transfer:
        why = "--no-sent" if args.no_sent else f"over {MEASURED_UP_TO >> 20} MB; brotli -q 11 takes about 3 s/MB"
        why = "two files: the model and its external data" if data is not None else why
        print(f"sent: not measured ({why})")
    print(f"wrote {output}" + (f" and its weights in {data}" if data is not None else ""))
    if run.onnxruntime != "1.17":
        print(f"it needs onnxruntime >= {run.onnxruntime}; --target portable writes a file every runtime loads")
    if args.report:
        write_atomic(run.to_json().encode(), args.report)
    if args.report_html:
        report_page.write([run], args.report_html)
        print(f"wrote {args.report_html}")
    return 0


def _sweep(args) -> int:
    _workers(args)
    every = sweep(
        args.model,
        args.out_dir,
        args.pipelines,
        _calib(args, args.model),
        args.shared,
        _prep(args),
        args.verify_samples,
        args.threads,
        _guards(args),
        {"--report": args.report, "--report-html": args.report_html},
        args.target,
        args.external_data,
    )
    sent = "".join(f" {k:>10}" for k in SENT)
    print(f"{'pipeline':<48} {'bytes':>12}{sent} {'ratio':>7} {'SQNR dB':>8} {'seconds':>8}  file")
    failed = [run for run in every if run.error]
    for run in failed:
        print(f"{run.pipeline:<48} failed: {run.error}")
    runs = [run for run in every if not run.error]
    for run in runs:
        one_file = run.bytes_after == Path(run.output).stat().st_size
        measure = one_file and run.bytes_after <= MEASURED_UP_TO
        run.transfer = transfer_sizes(Path(run.output).read_bytes()) if measure else {}
        sqnr = min((v["sqnr_db"] for v in run.verification.get("outputs", {}).values()), default=float("nan"))
        seconds = sum(p.seconds for p in run.passes)
        ratio = run.bytes_before / run.bytes_after
        sent = "".join(f" {run.transfer[k]:>10,d}" if run.transfer else f" {'-':>10}" for k in SENT)
        numbers = f"{run.bytes_after:>12,d}{sent} {ratio:>6.2f}x {sqnr:>8.1f} {seconds:>8.1f}"
        print(f"{run.pipeline:<48} {numbers}  {run.output}")
    if args.report:  # every pipeline in order, failed ones with their error
        write_atomic(("[" + ",\n".join(run.to_json() for run in every) + "]").encode(), args.report)
    if args.report_html and runs:
        report_page.write(runs, args.report_html)
        print(f"wrote {args.report_html}")
    elif args.report_html:
        print(f"no page written to {args.report_html}: every pipeline failed")
    return min((run.exit_code for run in failed), default=0)  # the gravest failure: 1 (a bug) before 2, 3, 4


def _report(args) -> int:
    output = args.output or f"{Path(args.reports[0]).stem}.html"
    runs = report_page.load(args.reports)
    data = report_page.write(runs, output, args.json, args.png_dir, inputs={"a run report": args.reports})
    for head in data["runs"]:
        sqnr = head["worst_output_sqnr_db"]
        print(f"{head['pipeline']:<48} {head['bytes_after']:>12,d} B {'' if sqnr is None else f'{sqnr:6.1f} dB'}")
    written = [output] + [p for p in (args.json, args.png_dir) if p]
    print(f"wrote {', '.join(written)} ({len(data['figures'])} figures)")
    return 0


def _inspect(args) -> int:
    model = model_io.load(args.model)
    work, _ = prepare(model)
    graph = Graph(work)
    found = discover(graph)
    coders = {name: cls() for name, cls in sorted(registry().items()) if cls.codes_weights}
    ops = Counter(n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in model.graph.node)
    weights = [
        {
            "name": s.name,
            "op": s.op,
            "kind": s.kind,
            "shape": list(s.file_shape or s.shape),
            "bytes": graph.nbytes(s.name),
            "scope": s.scope,
            "readers": s.readers,
            "statistics": s.activation is not None,
            "passes": {name: p.takes(s) for name, p in coders.items()},
        }
        for s in found.sites
    ]
    info = {
        "file": args.model,
        "bytes": model_bytes(args.model),
        "ir_version": model.ir_version,
        "opset": graph.opset(),
        "min_onnxruntime": min_onnxruntime(model),
        "inputs": [
            {"name": vi.name, "shape": [d.dim_value or d.dim_param for d in vi.type.tensor_type.shape.dim]}
            for vi in model.graph.input
            if vi.name not in graph.initializers
        ],
        "ops": dict(ops.most_common()),
        "initializer_bytes": sum(model_io.tensor_nbytes(t) for t in work.graph.initializer),
        "weights": weights,
        "skipped": [{"name": n, "node": node, "reason": r} for n, node, r in found.skipped],
        "onnxtq": {p.key: p.value for p in model.metadata_props if p.key.startswith("onnxtq.")},
        "onnxtq_nodes": dict(Counter(provenance(n).get("onnxtq.role", "") for n in model.graph.node if provenance(n))),
    }
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(
        f"{info['file']}: {info['bytes']:,d} B, IR {info['ir_version']}, opset {info['opset']}"
        f" (onnxruntime >= {info['min_onnxruntime']})"
    )
    print("inputs: " + ", ".join(f"{i['name']} {i['shape']}" for i in info["inputs"]))
    print("ops: " + ", ".join(f"{k} {v}" for k, v in info["ops"].items()))
    weight_bytes = sum(w["bytes"] for w in weights)
    total = info["initializer_bytes"]
    print(f"quantizable weights: {len(weights)} ({weight_bytes:,d} B of {total:,d} B of initializers)")
    for w in weights:
        where = f"  in {w['scope'].rstrip('/')}" if w["scope"] else ""
        shared = f"  read by {w['readers']} ops" if w["readers"] > 1 else ""
        print(f"  {w['op']:<8} {w['kind']:<14} {str(w['shape']):<22} {w['bytes']:>10,d} B  {w['name']}{where}{shared}")
        declined = {name: why for name, why in w["passes"].items() if why}
        for name, why in declined.items():
            print(f"      not {name}: {why}")
    if weights:
        print(f"  ({', '.join(coders)} code every weight above unless it says 'not')")
    for s in info["skipped"]:
        print(f"  skipped {s['name']}: {s['reason']}")
    if info["onnxtq"]:
        print("made by onnxtq: " + ", ".join(f"{k}={v}" for k, v in info["onnxtq"].items()))
        print("onnxtq nodes: " + ", ".join(f"{k} {v}" for k, v in info["onnxtq_nodes"].items()))
    return 0


def _verify(args) -> int:
    """Both models' external data stay on disk, read a weight (or a piece) at a time from their own folders:
    a model run in pieces is verified within the memory it was compressed in."""
    original, _ = model_io.load_with_files(args.original, lazy=True)
    compressed, _ = model_io.load_with_files(args.compressed, lazy=True)
    folders = (Path(args.original).parent, Path(args.compressed).parent)
    with external_data_from(folders[1]):
        validate(compressed)
    calib = _calib(args, args.original)
    if calib is None:
        raise DataError("verify needs inputs", "pass --calib DATA")
    source = open_source(calib, original, prep=_prep(args))
    try:
        result = compare(original, compressed, source, args.samples, folders=folders)
    finally:
        source.close()
    print(
        f"{result['samples']} samples; sizes {model_bytes(args.original):,d} B -> {model_bytes(args.compressed):,d} B"
    )
    for name, v in result["outputs"].items():
        print(output_line(name, v))
    check_fidelity(result, args.min_sqnr)
    return 0


def _pack(args) -> int:
    output = args.output or f"{Path(args.model).stem}.onnxtq"
    report = container.pack_file(args.model, output, args.coder, args.min_elements)
    if args.json:
        print(json.dumps({"model": args.model, "output": output} | report.to_dict(), indent=1))
    else:
        print(report.table())
        print(f"wrote {output}")
    return 0


def _unpack(args) -> int:
    output = args.output or f"{Path(args.container).stem}.onnx"
    size = container.unpack_file(args.container, output)
    print(f"wrote {output} ({size:,d} B, checksum verified)")
    return 0


def _list_passes(args) -> int:
    for name, cls in sorted(registry().items()):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        print(doc if doc.startswith(name) else f"{name}: {doc}")
        if args.options:
            for f in dataclasses.fields(cls.Config):
                help = f.metadata.get("help", "")
                print(f"    {f.name} ({f.type}) = {f.default}" + (f"  {help}" if help else ""))
    return 0


COMMANDS = {
    "compress": _compress,
    "sweep": _sweep,
    "report": _report,
    "inspect": _inspect,
    "verify": _verify,
    "pack": _pack,
    "unpack": _unpack,
    "list-passes": _list_passes,
}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="onnxtq: %(message)s")
    progress.enable(not args.quiet)
    parallel.one_heap()
    try:
        return COMMANDS[args.command](args)
    except OnnxtqError as exc:
        if args.verbose:
            logging.exception("failed")
        print(f"onnxtq: error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"onnxtq: hint: {exc.hint}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`| head`): nothing left to say
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
