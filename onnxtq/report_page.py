"""The report a user reads: one self-contained HTML page for a run or a sweep, plots embedded as PNG.

Input is what `compress --report` and `sweep --report` write (RunReport JSON: one run, or a list),
or RunReport objects. Everything plotted is first computed into plain figure data (`figures()`);
the plots draw only from it and `--json` writes it, so the machine-readable copy is exactly what
the page shows. Every string on the page is HTML-escaped: tensor and node names come from the model.
The page ends with DEFINITIONS, how each number is computed.

The JSON (`figures()`): {"version": 1, "runs": [header numbers per run], "layers": [per run, the table's
rows], "figures": [{"id", "kind", "title", ...the series drawn}]}; `--png-dir` names each plot <id>.png.
Values that are not known (no bound outside tq, no verification) are null.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from onnxtq.errors import DataError
from onnxtq.model_io import write_atomic
from onnxtq.paths import check_outputs
from onnxtq.progress import bar
from onnxtq.report import RunReport

FINAL = ("quantized", "refined")  # record states that describe what the file stores
#: options that move a run along its method's curve
RATE_OPTIONS = ("rate", "bits", "size", "sqnr", "ternary", "served_size", "agreement")
TOP_LAYERS = 15  # bars in the share-of-bytes chart before the rest is summed
DEFINITIONS = (
    ("bytes after", "the deployable ONNX file (what onnxruntime loads), external data included"),
    (
        "bits/weight",
        "of a run: 8 × the stored bytes of every quantized weight (codes, steps, zero points, bases) plus 32 bits "
        "for each weight kept in float, over all the weights the quantizing passes saw; of a layer: what its pass "
        "reported, containers and steps included",
    ),
    ("nominal", "code bits per weight at their bit depths, before containers and steps (tq)"),
    ("bound", "the Gaussian rate–distortion bound at the output error the layer reached, bits per weight (tq)"),
    ("gap", "bits − bound: how far the stored rate is above that bound"),
    ("out SQNR", "the layer's output SQNR, E‖Wx‖² / E‖(W − Ŵ)x‖² over the calibration inputs"),
    ("w SQNR", "the weight SQNR, ‖W‖² / ‖W − Ŵ‖²"),
    (
        "output SQNR",
        "of a run: each graph output against the original model's on the verification inputs; the "
        "curves use the worst output",
    ),
    (
        "share",
        "the layer's bytes over the whole file's bytes; the rest of the file is the graph, biases and other tensors",
    ),
    ("passes s", "seconds of every pass of the run; a sweep counts its shared head (calibration) in each run"),
)


def load(paths: Iterable[str | os.PathLike]) -> list[dict]:
    """Run reports from JSON files: each holds one run (compress) or a list of runs (sweep)."""
    runs = []
    for path in paths:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"cannot read report '{path}': {exc}", "pass a file written by --report") from None
        for run in data if isinstance(data, list) else [data]:
            if not isinstance(run, dict) or not isinstance(run.get("passes"), list) or "pipeline" not in run:
                raise DataError(f"'{path}' is not an onnxtq run report", "pass a file written by --report")
            if run.get("error"):  # a sweep's failed pipeline: no model to show
                continue
            try:
                summary(run, layers(run))
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                raise DataError(
                    f"'{path}' holds a malformed run report ({exc!r})", "pass a file written by --report"
                ) from None
            runs.append(run)
    if not runs:
        raise DataError("no runs in the reports given")
    return runs


def as_dict(run: RunReport | dict) -> dict:
    return dataclasses.asdict(run) if isinstance(run, RunReport) else run


def _num(value) -> float | None:
    """A finite float, else None (JSON has no NaN)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _elements(shape) -> int:
    return math.prod(int(d) for d in shape) if shape else 0


def layers(run: dict) -> list[dict]:
    """One row per weight, from the last record that says how it is stored, in the order the run first
    named the weight (fold-bn and calibrate list them in graph order).

    A weight only ever skipped (with a shape) is kept in float, its bytes taken as float32. Skips
    without a shape ("already quantized", shared or non-float tensors) add nothing and are left out.
    """
    rows: dict[str, dict] = {}
    order: dict[str, int] = {}
    for p in run["passes"]:
        for r in p.get("records", []):
            status, name, shape = r.get("status"), str(r.get("name", "")), [int(d) for d in r.get("shape") or []]
            order.setdefault(name, len(order))
            known = rows.get(name)
            if not (
                status in FINAL or (status == "skipped" and shape and (known is None or known["status"] == "skipped"))
            ):
                continue
            row = {
                "name": name,
                "node": str(r.get("node", "")),
                "op": str(r.get("op", "")),
                "kind": str(r.get("kind", "")),
                "shape": shape,
                "elements": _elements(shape),
                "status": status,
                "pass": str(p.get("spec", "")),
                "bits": _num(r.get("bits")),
                "nominal_bits": _num(r.get("nominal_bits")),
                "bound_bits": _num(r.get("bound_bits")),
                "output_sqnr_db": _num(r.get("output_sqnr_db")),
                "weight_sqnr_db": _num(r.get("weight_sqnr_db")),
                "bytes_after": int(r.get("bytes_after") or 0),
                "detail": f"{r['codec']}: {r.get('detail') or ''}" if r.get("codec") else str(r.get("detail") or ""),
            }
            if status == "skipped":
                reason = str(r.get("reason") or "")
                detail = reason if "float" in reason else f"kept in float: {reason}"
                row.update(bits=32.0, bytes_after=4 * row["elements"], detail=detail)
            elif status == "refined" and known is not None:  # same grid, new codes: how it is coded still holds
                row["detail"] = "refined; " + (row["detail"] or known["detail"])
            rows[name] = row
    out = sorted(rows.values(), key=lambda row: order[row["name"]])
    for index, row in enumerate(out):
        row["index"] = index
        bits, bound = row["bits"], row["bound_bits"]
        row["gap_bits"] = bits - bound if bits is not None and bound is not None else None
        row["share"] = row["bytes_after"] / run["bytes_after"] if run.get("bytes_after") else None
    return out


def method(run: dict) -> tuple[str, str, str]:
    """(method, setting, rate) from the passes that stored weights: `tq{rate=3,transform=klt}` gives
    ("tq{transform=klt}", "tq{rate=3,transform=klt}", "rate=3"). Runs of one method differ only in
    their rate options and make one curve. A run where no pass stored weights is its pipeline."""
    specs = [
        str(p.get("spec", "")) for p in run["passes"] if any(r.get("status") in FINAL for r in p.get("records", []))
    ]
    if not specs:
        return str(run["pipeline"]), str(run["pipeline"]), ""
    methods, rates = [], []
    for spec in specs:
        name, _, body = spec.partition("{")
        options = [o for o in body.rstrip("}").split(",") if o]
        rates += [o for o in options if o.partition("=")[0] in RATE_OPTIONS]
        rest = [o for o in options if o.partition("=")[0] not in RATE_OPTIONS]
        methods.append(name + ("{" + ",".join(rest) + "}" if rest else ""))
    return "+".join(methods), ",".join(specs), ",".join(rates)


def summary(run: dict, rows: list[dict]) -> dict:
    """The header numbers of one run."""
    outputs = {str(k): _num(v.get("sqnr_db")) for k, v in (run.get("verification") or {}).get("outputs", {}).items()}
    known = [v for v in outputs.values() if v is not None]
    weights = sum(r["elements"] for r in rows)
    stored = sum(8 * r["bytes_after"] for r in rows)
    before, after = int(run.get("bytes_before") or 0), int(run.get("bytes_after") or 0)
    name, setting, rate = method(run)
    return {
        "model": Path(str(run.get("source", ""))).stem,
        "pipeline": str(run["pipeline"]),
        "method": name,
        "setting": setting,
        "rate": rate,
        "output": str(run.get("output", "")),
        "bytes_before": before,
        "bytes_after": after,
        "transfer": {k: int(v) for k, v in (run.get("transfer") or {}).items()},
        "ratio": before / after if after else None,
        "weights": weights,
        "bits_per_weight": stored / weights if weights else None,
        "output_sqnr_db": outputs,
        "worst_output_sqnr_db": min(known) if known else None,
        "seconds": sum(_num(p.get("seconds")) or 0.0 for p in run["passes"]),
        "calibration": str(run.get("calibration", "")),
        "notes": [
            {"pass": str(p.get("spec", "")), "seconds": _num(p.get("seconds")), "notes": [str(n) for n in p["notes"]]}
            for p in run["passes"]
            if p.get("notes") and p.get("pass_name") not in ("prepare", "calibrate")
        ],
    }


def figures(runs: Sequence[RunReport | dict]) -> dict:
    """The page's numbers: a summary per run and every figure's data, in the order drawn."""
    runs = [as_dict(r) for r in runs]
    rows = [layers(r) for r in runs]
    heads = [summary(r, rw) for r, rw in zip(runs, rows)]
    figs = []
    if len(runs) > 1:
        figs.append(_rate_fidelity(heads))
        compared = _compared(heads, rows)
        if compared:
            figs.append(compared)
    for i, (head, rw) in enumerate(zip(heads, rows)):
        tag = f"run{i + 1}"
        title = f"run {i + 1}: {head['model']} {head['setting']}"
        figs.append(
            {
                "id": f"{tag}_bits",
                "kind": "layer_bits",
                "run": i,
                "title": f"{title}: bits per weight by layer",
                "layers": [r["index"] for r in rw],
                "stored": [r["bits"] for r in rw],
                "kept_float": [r["status"] == "skipped" for r in rw],
                "nominal": [r["nominal_bits"] for r in rw],
                "bound": [r["bound_bits"] for r in rw],
            }
        )
        figs.append(
            {
                "id": f"{tag}_sqnr",
                "kind": "layer_sqnr",
                "run": i,
                "title": f"{title}: layer output SQNR",
                "layers": [r["index"] for r in rw],
                "output_sqnr_db": [r["output_sqnr_db"] for r in rw],
                "weight_sqnr_db": [r["weight_sqnr_db"] for r in rw],
                "kept_float": [r["status"] == "skipped" for r in rw],
            }
        )
        figs.append(_bytes_share(head, rw, tag, title, i))
    return {"version": 1, "runs": heads, "layers": rows, "figures": figs}


def _rate_fidelity(heads: list[dict]) -> dict:
    series: dict[tuple, list] = {}
    for i, h in enumerate(heads):
        series.setdefault((h["model"], h["method"]), []).append(
            {
                "run": i,
                "label": h["rate"] or h["setting"],
                "bytes": h["bytes_after"],
                "bits_per_weight": h["bits_per_weight"],
                "sqnr_db": h["worst_output_sqnr_db"],
            }
        )
    several = len({h["model"] for h in heads}) > 1
    return {
        "id": "rate_fidelity",
        "kind": "rate_fidelity",
        "title": "rate and fidelity: deployable bytes and bits/weight against output SQNR",
        "series": [
            {"label": f"{model}: {name}" if several else name, "points": sorted(points, key=lambda p: p["bytes"])}
            for (model, name), points in series.items()
        ],
    }


def _compared(heads: list[dict], rows: list[list[dict]]) -> dict | None:
    """Stored bits and layer SQNR of every run on one axis, when all runs are of one model."""
    if len({h["model"] for h in heads}) > 1 or not any(rows):
        return None
    order = list(dict.fromkeys(r["name"] for rw in rows for r in rw))
    by_name = [{r["name"]: r for r in rw} for rw in rows]
    return {
        "id": "layers_compared",
        "kind": "layers_compared",
        "title": "per layer, every run: stored bits/weight and layer output SQNR",
        "layers": list(range(len(order))),
        "series": [
            {
                "label": f"{i + 1}: {h['setting']}",
                "stored": [m[n]["bits"] if n in m else None for n in order],
                "kept_float": [n in m and m[n]["status"] == "skipped" for n in order],
                "output_sqnr_db": [m[n]["output_sqnr_db"] if n in m else None for n in order],
            }
            for i, (h, m) in enumerate(zip(heads, by_name))
        ],
    }


def _bytes_share(head: dict, rows: list[dict], tag: str, title: str, run: int) -> dict:
    total = head["bytes_after"]
    ranked = sorted(rows, key=lambda r: -r["bytes_after"])
    top, rest = ranked[:TOP_LAYERS], ranked[TOP_LAYERS:]
    bars = [{"label": f"#{r['index']} {r['node'] or r['name']}", "bytes": r["bytes_after"]} for r in top]
    if rest:
        bars.append({"label": f"{len(rest)} other layers", "bytes": sum(r["bytes_after"] for r in rest)})
    other = total - sum(r["bytes_after"] for r in rows)
    bars.append({"label": "rest of file (graph, biases, ...)", "bytes": max(other, 0)})
    for b in bars:
        b["share"] = b["bytes"] / total if total else None
    return {
        "id": f"{tag}_bytes",
        "kind": "bytes_share",
        "run": run,
        "title": f"{title}: share of the file's bytes",
        "file_bytes": total,
        "bars": bars,
    }


# ---------------------------------------------------------------------------------------------- page


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _f(value, fmt: str = ".2f", none: str = "–") -> str:
    return none if value is None else format(value, fmt)


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1320px;color:#222;
padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin:28px 0 6px;border-bottom:1px solid #ccc}
.meta{color:#555;margin:2px 0} code{font-size:12.5px;background:#f3f3f3;padding:0 3px;border-radius:3px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:12.5px}
th,td{border-bottom:1px solid #e3e3e3;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f6f6f6;position:sticky;top:0} td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.d{color:#555;max-width:380px} .w{color:#777;font-size:11.5px;word-break:break-all} .k{color:#777;font-size:11.5px}
.figs{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0} img{max-width:100%;border:1px solid #eee}
.neg{color:#b00} .notes{color:#444;font-size:12.5px;flex:1;min-width:300px;max-height:520px;overflow:auto}
.notes ul{padding-left:18px;margin:4px 0} .row{display:flex;gap:16px;align-items:flex-start;margin:12px 0}
summary{cursor:pointer;font-weight:600}
.defs{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;font-size:12.5px} .defs dt{font-weight:600}
.defs dd{margin:0;color:#444}
"""


def render(data: dict, images: dict[str, bytes]) -> str:
    """The HTML page for `figures()` data; `images` maps a figure id to its PNG bytes."""
    heads = data["runs"]
    models = ", ".join(dict.fromkeys(h["model"] for h in heads))
    out = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>onnxtq report: {_e(models)}</title><style>{CSS}</style></head><body>",
        f"<h1>onnxtq report: {_e(models)}</h1>",
    ]
    for calib in dict.fromkeys(h["calibration"] for h in heads if h["calibration"]):
        out.append(f"<p class=meta>calibration: {_e(calib)}</p>")
    out.append(_summary_table(heads))
    by_run: dict = {}
    for fig in data["figures"]:
        by_run.setdefault(fig.get("run"), []).append(fig)
    out.append(_figs(by_run.get(None, []), images))
    for i, (head, rows) in enumerate(zip(heads, data["layers"])):
        out.append(f"<section id=run-{i + 1}><h2>Run {i + 1}: <code>{_e(head['pipeline'])}</code></h2>")
        out.append(
            f"<p class=meta>{head['bytes_before']:,d} B → {head['bytes_after']:,d} B "
            f"({_f(head['ratio'])}x smaller), {_f(head['bits_per_weight'])} bits/weight over "
            f"{head['weights']:,d} weights, output SQNR {_f(head['worst_output_sqnr_db'], '.1f')} dB"
            f"{' → ' + _e(head['output']) if head['output'] else ''}{_sent(head['transfer'])}</p>"
        )
        figs = by_run.get(i, [])
        out.append(_figs([f for f in figs if f["kind"] != "bytes_share"], images))
        out.append(f"<div class=row>{_figs([f for f in figs if f['kind'] == 'bytes_share'], images)}")
        out.append(f"<div class=notes><b>what the passes said</b><ul>{_notes(head['notes'])}</ul></div></div>")
        opened = " open" if len(heads) == 1 else ""
        out.append(f"<details{opened}><summary>per-layer table ({len(rows)} weights)</summary>")
        out.append(_layer_table(rows) + "</details>")
        out.append("</section>")
    terms = "".join(f"<dt>{_e(term)}</dt><dd>{_e(text)}</dd>" for term, text in DEFINITIONS)
    out.append(f"<h2>How to read this</h2><dl class=defs>{terms}</dl>")
    out.append("</body></html>\n")
    return "\n".join(out)


def _notes(notes: list[dict]) -> str:
    return "".join(
        f"<li><code>{_e(n['pass'])}</code> ({_f(n['seconds'], '.1f')} s)<ul>"
        + "".join(f"<li>{_e(line)}</li>" for line in n["notes"])
        + "</ul></li>"
        for n in notes
    )


def _sent(transfer: dict) -> str:
    """The bytes a web server sends, beside onnxtq's container (runs from the CLI measure them)."""
    if not transfer:
        return ""
    return (
        f"; sent: brotli -q 11 {transfer['brotli']:,d} B, gzip -9 {transfer['gzip']:,d} B,"
        f" onnxtq pack {transfer['packed']:,d} B"
    )


def _summary_table(heads: list[dict]) -> str:
    head = (
        "<table><tr><th>#</th><th>model</th><th>pipeline</th><th>bytes before</th><th>bytes after</th>"
        "<th>brotli -q 11</th><th>gzip -9</th><th>onnxtq pack</th>"
        "<th>ratio</th><th>bits/weight</th><th>output SQNR dB</th><th>passes s</th></tr>"
    )
    rows = []
    for i, h in enumerate(heads):
        sqnr = "<br>".join(f"{_e(k)}: {_f(v, '.1f')}" for k, v in h["output_sqnr_db"].items()) or "–"
        rows.append(
            f"<tr><td><a href='#run-{i + 1}'>{i + 1}</a></td><td>{_e(h['model'])}</td>"
            f"<td><code>{_e(h['pipeline'])}</code></td><td class=n>{h['bytes_before']:,d}</td>"
            f"<td class=n>{h['bytes_after']:,d}</td>"
            + "".join(f"<td class=n>{_f(h['transfer'].get(k), ',d')}</td>" for k in ("brotli", "gzip", "packed"))
            + f"<td class=n>{_f(h['ratio'])}x</td>"
            f"<td class=n>{_f(h['bits_per_weight'])}</td><td class=n>{sqnr}</td>"
            f"<td class=n>{h['seconds']:.1f}</td></tr>"
        )
    return head + "".join(rows) + "</table>"


def _figs(figs: list[dict], images: dict[str, bytes]) -> str:
    parts = []
    for fig in figs:
        png = base64.b64encode(images[fig["id"]]).decode("ascii")
        parts.append(
            f"<figure id='{_e(fig['id'])}'><img alt='{_e(fig['title'])}' src='data:image/png;base64,{png}'></figure>"
        )
    return f"<div class=figs>{''.join(parts)}</div>" if parts else ""


def _layer_table(rows: list[dict]) -> str:
    cols = [
        "#",
        "layer / weight",
        "op",
        "shape",
        "bits",
        "nominal",
        "bound",
        "gap",
        "out SQNR dB",
        "w SQNR dB",
        "bytes",
        "share",
        "coding",
    ]
    out = ["<table><tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"]
    for r in rows:
        gap = r["gap_bits"]
        share = _f(None if r["share"] is None else 100 * r["share"], ".1f") + ("%" if r["share"] is not None else "")
        out.append(
            f"<tr><td class=n>{r['index']}</td><td>{_e(r['node'])}<div class=w>{_e(r['name'])}</div></td>"
            f"<td>{_e(r['op'])}<div class=k>{_e(r['kind'])}</div></td><td>{_e('×'.join(map(str, r['shape'])))}</td>"
            f"<td class=n>{_f(r['bits'])}</td><td class=n>{_f(r['nominal_bits'])}</td>"
            f"<td class=n>{_f(r['bound_bits'])}</td><td class='n{' neg' if gap is not None and gap < 0 else ''}'>"
            f"{_f(gap, '+.2f')}</td><td class=n>{_f(r['output_sqnr_db'], '.1f')}</td>"
            f"<td class=n>{_f(r['weight_sqnr_db'], '.1f')}</td><td class=n>{r['bytes_after']:,d}</td>"
            f"<td class=n>{share}</td><td class=d>{_e(r['detail'])}</td></tr>"
        )
    out.append("</table>")
    return "".join(out)


# --------------------------------------------------------------------------------------------- write


def write(
    runs: Sequence[RunReport | dict],
    html_path: str | os.PathLike,
    json_path: str | os.PathLike | None = None,
    png_dir: str | os.PathLike | None = None,
    inputs: dict[str, Iterable[str | os.PathLike]] | None = None,
) -> dict:
    """Draw the figures and write the page (and the figures' JSON, and PNG files); returns the data.

    Every file is checked before anything is drawn (onnxtq.paths: none may be one of the `inputs`,
    nor two the same file) and written atomically.
    """
    from onnxtq import plots  # matplotlib loads only when a page is drawn

    data = figures(runs)
    targets = {"the page": Path(html_path)}
    if json_path is not None:
        targets["--json"] = Path(json_path)
    if png_dir is not None:
        targets.update({f"figure '{fig['id']}'": Path(png_dir) / f"{fig['id']}.png" for fig in data["figures"]})
    check_outputs(inputs or {}, targets)
    drawing = bar(data["figures"], desc="report plots", unit="figure")
    images = {fig["id"]: plots.draw(fig) for fig in drawing}
    payloads = {Path(html_path): render(data, images).encode("utf-8")}
    if json_path is not None:
        payloads[Path(json_path)] = (json.dumps(data, indent=1, allow_nan=False) + "\n").encode("utf-8")
    if png_dir is not None:
        payloads.update({Path(png_dir) / f"{fid}.png": png for fid, png in images.items()})
    for path, payload in payloads.items():
        write_atomic(payload, path)
    return data
