"""onnxtq on the zoo: compress with named configs, then score with the zoo's evals (default onnxruntime options).

usage: python run_zoo.py [--zoo /work/zoo] [--calib DIR] [--out DIR] [--configs w8 w4 ...] [--models ...]
                         [--results NAME.jsonl] [--sweep] [--table]
Needs the calibration files from make_calib.py (CALIB/<model>_calib<N>.npz). Appends one JSON line per run
to OUT/RESULTS; compressed models, reports and logs go to OUT/models. Only the standard library is
used here; the evals run under the zoo's venv (ZOO/.venv/bin/python), onnxtq from this repo's .venv.
With --sweep, each model's non-fp32 configs are compressed by one `onnxtq sweep` (calibrated once).
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
from collections import Counter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {  # what follows `fold-bn,calibrate,` in the pipeline
    "w8": "rtn{bits=8}",
    "w4": "rtn{bits=4}",
    "w3": "rtn{bits=3}",  # per-channel RTN at 3 and 2 bits
    "w2": "rtn{bits=2}",
    "w4b32": "rtn{bits=4,block=32}",
    "w8s16": "rtn{bits=8,scale_bits=16,min_elements=0}",  # fp16 steps, every weight quantized
    "w8small": "rtn{bits=8,scale_bits=16,min_elements=0},compact-names",  # the smallest 8-bit file
    # crq: first/last layers and depthwise convs at 8 bits; method=rtn is RTN with that same policy
    "t-rtn": "crq{bits=2,ternary=true,method=rtn}",
    "t-crq": "crq{bits=2,ternary=true,sequential=true}",
    "w2-rtn": "crq{bits=2,method=rtn}",
    "w2-crq": "crq{bits=2,sequential=true}",
    "w4-rtn": "crq{bits=4,method=rtn}",
    "w4-crq": "crq{bits=4,sequential=true}",
    # tq: transform quantization at a target rate in bits per weight
    "tq2": "tq{rate=2}",
    "tq3": "tq{rate=3}",
    "tq4": "tq{rate=4}",
    "tq4-id": "tq{rate=4,transform=identity}",  # ablation: the same allocation without transforms
    "tq4-nom": "tq{rate=4,depths=nominal}",  # 4 bits nominal (the paper's rate): 3, 5, 6, 7-bit codes in wider types
    # kq: k×k kernels as indices into codebooks (depthwise convs share one per kernel size); 1×1 convs and FC stay
    # float in kqN (the k×k convs' effect alone) and get 8-bit RTN in kqN-w8 (the whole deployable model)
    "kq6": "kq{bits=6}",
    "kq8": "kq{bits=8}",
    "kq10": "kq{bits=10}",
    "kq8-g6": "kq{bits=8,gain_bits=6}",
    "kq8-none": "kq{bits=8,metric=none,gptq=false}",  # ablation: plain k-means (per-channel scales kept)
    "kq8-w8": "kq{bits=8},rtn{bits=8}",
    # the same on 3×3 kernels only (EfficientNet-Lite and PP-OCR det also have 5×5 depthwise convs: kept float)
    "kq6-k3": "kq{bits=6,max_taps=9}",
    "kq8-k3": "kq{bits=8,max_taps=9}",
    "kq10-k3": "kq{bits=10,max_taps=9}",
    "kq8-k3-none": "kq{bits=8,max_taps=9,metric=none,gptq=false}",
    # ecsq: entropy-constrained scalar quantization at a target code entropy (bits per weight; `onnxtq pack` size)
    "e2": "ecsq{rate=2}",  # per-layer steps by one Lagrangian, equal-slope columns, GPTQ feedback (default)
    "e3": "ecsq{rate=3}",
    "e4": "ecsq{rate=4}",
    "e5": "ecsq{rate=5}",  # MobileNetV2 at 95.2% agreement (issue 15)
    "e2-uni": "ecsq{rate=2,method=uniform}",  # Choi et al.: one step for the network
    "e2-km": "ecsq{rate=2,method=kmeans}",  # one codebook for the network, plain k-means
    "e2-hkm": "ecsq{rate=2,method=hkmeans}",  # ... Hessian-weighted k-means
    "e4-uni": "ecsq{rate=4,method=uniform}",
    "e4-km": "ecsq{rate=4,method=kmeans}",
    "e4-hkm": "ecsq{rate=4,method=hkmeans}",
    # compress to a target (`onnxtq compress --agreement 0.95` etc.): every codec competes for every layer,
    # checked on the calibration inputs the run holds out (every fourth)
    "a95": "auto{agreement=0.95}",
    "a99": "auto{agreement=0.99}",
    "s30": "auto{sqnr=30}",
    "s35": "auto{sqnr=35}",
    "served12m": "auto{served_size=12000000}",
}
IMAGENET = ["mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
OCR = {  # each PP-OCR model is scored in its own pair's pipeline, the other model FP32
    "ppocrv4_det": ("ppocrv4_det", "ppocrv4_rec"),
    "ppocrv4_rec": ("ppocrv4_det", "ppocrv4_rec"),
    "ppocrv6_det_small": ("ppocrv6_det_small", "ppocrv6_rec_small"),
    "ppocrv6_rec_small": ("ppocrv6_det_small", "ppocrv6_rec_small"),
}
MODELS = IMAGENET + ["ppocrv4_det", "ppocrv4_rec", "minilm_l6", "ppocrv6_det_small", "ppocrv6_rec_small"]


def sh(cmd, log):
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True)
        f.write(r.stdout)
    return r


def evaluate(a, model, path):
    """The zoo eval for one model; path is the model to score (FP32 or compressed). A caller's `a.eval_extra`
    ({eval script name: [args]}) adds arguments to that eval."""
    z, py = a.zoo, os.path.join(a.zoo, ".venv", "bin", "python")
    if model in OCR:
        det_name, rec_name = OCR[model]
        det = path if model == det_name else os.path.join(z, det_name + ".onnx")
        rec = path if model == rec_name else os.path.join(z, rec_name + ".onnx")
        cmd = [
            py,
            os.path.join(a.zoo_tools, "eval_ppocr.py"),
            "--det",
            det,
            "--rec",
            rec,
            "--rec-keys",
            os.path.join(z, rec_name + ".keys.txt"),
        ]
    elif model == "minilm_l6":
        cmd = [py, os.path.join(a.zoo_tools, "eval_minilm.py"), path, "--ref", os.path.join(z, model + ".onnx")]
        cmd += ["--data", os.path.join(z, "data"), "--tokenizer", os.path.join(z, "minilm_l6_tokenizer")]
    else:
        cmd = [py, os.path.join(a.zoo_tools, "eval_imagenet.py"), path, "--ref", os.path.join(z, model + ".onnx")]
    cmd += getattr(a, "eval_extra", {}).get(os.path.basename(cmd[1]), [])  # e.g. fewer crops (peers.py --quick)
    r = sh(cmd, path[:-5] + ".eval.log")
    return json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else {"error": f"eval rc={r.returncode}"}


def metric(row):
    e = row.get("eval") or {}
    if "error" in e or not e:
        return e.get("error", "not run")
    if row["model"] in OCR and "_det" in row["model"]:
        pr = f"P {e['det_precision']:.3f} R {e['det_recall']:.3f}"
        return f"det F1 {e['det_f1']:.3f} ({pr}), e2e CER {100 * e['e2e_cer']:.2f}%"
    if row["model"] in OCR:
        return (
            f"rec CER {100 * e['rec_cer']:.2f}% (line acc {e['rec_line_acc']:.2f}), e2e CER {100 * e['e2e_cer']:.2f}%"
        )
    if row["model"] == "minilm_l6":
        return (
            f"R@1 {e['recall_at_1']:.3f}, MRR {e['mrr']:.3f}, top-1 retrieval agr {e['top1_agreement']:.3f}, "
            f"cos to FP32 {e['mean_cos_to_ref']:.4f}"
        )
    return (
        f"top-1 agr {e['top1_agreement']:.3f}, confident {e['top1_agreement_confident']:.3f} "
        f"({e['confident_crops']} crops), KL {e['mean_kl']:.4f}"
    )


def holdout_sqnr(a, model, src, out):
    """Output SQNR on the held-out inputs of make_calib.py --holdout, where they exist."""
    found = glob.glob(os.path.join(a.calib, model + "_holdout*.npz"))
    if not found:
        return {}
    r = sh([a.onnxtq, "verify", src, out, "--calib", found[0], "--samples", "64"], out[:-5] + ".holdout.log")
    lines = [ln.split() for ln in r.stdout.splitlines() if ln.startswith("output ")]
    return {parts[1].rstrip(":"): float(parts[3]) for parts in lines}


def passes(out_dir, model, config):
    """The pass reports of a run (from OUT/models/<model>_<config>.report.json), or []."""
    path = os.path.join(out_dir, "models", f"{model}_{config}.report.json")
    return json.load(open(path))["passes"] if os.path.exists(path) else []


def rate_note(out_dir, model, config):
    """'nominal X, container Y b/w' from a tq pass's rate (its report's typed field), or ''."""
    rate = next((p.get("rate") for p in passes(out_dir, model, config) if p["pass_name"] == "tq"), None)
    return f"tq nominal {rate['nominal']:.3f}, container {rate['stored']:.3f} b/w" if rate else ""


def kept(out_dir, model, config):
    """'N layers, B bytes' that a crq run kept at higher precision (from its report), or ''."""
    layers = [k for p in passes(out_dir, model, config) for k in p.get("kept", [])]
    if not layers:
        return ""
    kinds = Counter(k["kind"] for k in layers)
    total = sum(k["bytes"] for k in layers)
    return f"{', '.join(f'{n} {k}' for k, n in kinds.items())}: {total:,d} B"


def table(path):
    """Markdown table of a results .jsonl (the last row per model/config wins)."""
    rows = {}
    for line in open(path):
        r = json.loads(line)
        rows[r["model"], r["config"]] = r
    columns = "model|config|bytes|vs FP32|kept at 8 bits|SQNR dB calib|SQNR dB held-out|tool s|RSS MB|task metric|notes"
    out = [f"| {columns.replace('|', ' | ')} |", "|---" * (columns.count("|") + 1) + "|"]
    for (m, c), r in sorted(
        rows.items(),
        key=lambda kv: (MODELS.index(kv[0][0]), list(CONFIGS).index(kv[0][1]) + 1 if kv[0][1] in CONFIGS else 0),
    ):
        fp = rows.get((m, "fp32"), {}).get("bytes")
        ratio = f"{fp / r['bytes']:.2f}x" if fp and r.get("bytes") else ""
        sq = ", ".join(f"{v:.1f}" for v in r.get("sqnr_db", {}).values()) if c != "fp32" else "inf"
        held = ", ".join(f"{v:.1f}" for v in r.get("holdout_sqnr_db", {}).values())
        cells = [
            m,
            c,
            r.get("bytes", ""),
            ratio,
            kept(os.path.dirname(path), m, c),
            sq,
            held,
            r.get("tool_wall_s", ""),
            r.get("tool_max_rss_mb", ""),
            metric(r),
            rate_note(os.path.dirname(path), m, c),
        ]
        out.append("| " + " | ".join(str(x) for x in cells) + " |")
    return "\n".join(out)


def timed(a, cmd, log, tfile):
    """Run `onnxtq CMD...` (a.onnxtq) under /usr/bin/time: (result, wall seconds, max RSS MB)."""
    r = sh(["/usr/bin/time", "-f", "%e %M", "-o", tfile, a.onnxtq, *cmd], log)
    wall, rss = open(tfile).read().split()[-2:]
    return r, float(wall), round(int(rss) / 1024)


def scored(a, model, src, out, rep):
    """The result fields of a compressed model OUT with its run report REP: size, SQNRs, pass times, eval."""
    return dict(
        bytes=os.path.getsize(out),
        sqnr_db={k: v["sqnr_db"] for k, v in rep["verification"]["outputs"].items()},
        pass_seconds={p["spec"]: round(p["seconds"], 1) for p in rep["passes"]},
        holdout_sqnr_db=holdout_sqnr(a, model, src, out),
        eval=evaluate(a, model, out),
    )


def sweep(a, model, src, cfgs, mdir):
    """All CFGS of one model by one `onnxtq sweep` (calibrated once): {config: (row, report or None)}.

    Outputs are moved to OUT/models/<model>_<config>.onnx and each run report saved beside as .report.json
    (its "output" pointing at the moved file); the sweep's log, times and report list are OUT/models/<model>.sweep.*.
    """
    (calib,) = glob.glob(os.path.join(a.calib, model + "_calib*.npz"))
    base, tmp = os.path.join(mdir, model + ".sweep"), os.path.join(mdir, model + ".sweep.d")
    shutil.rmtree(tmp, ignore_errors=True)  # no stale outputs of an earlier sweep
    cmd = ["sweep", src, "-o", tmp, "--calib", calib, "--shared", "fold-bn,calibrate", "--report", base + ".json"]
    if os.path.exists(base + ".json"):
        os.remove(base + ".json")
    r, wall, rss = timed(a, cmd + ["--pipelines", *(CONFIGS[c] for c in cfgs)], base + ".log", base + ".time")
    # a failed pipeline is a report with its error, and the sweep goes on; no file at all: the sweep failed
    reports = json.load(open(base + ".json")) if os.path.exists(base + ".json") else [None] * len(cfgs)
    found = {}
    for n, (cfg, rep) in enumerate(zip(cfgs, reports)):
        row = dict(
            pipeline="fold-bn,calibrate," + CONFIGS[cfg],
            calib=os.path.basename(calib),
            rc=r.returncode,
            sweep_configs=list(cfgs),
            sweep_wall_s=wall,
            tool_max_rss_mb=rss,
        )
        if rep is not None and rep.get("error"):
            row["error"], rep = rep["error"], None
        if rep is not None:
            out = os.path.join(mdir, f"{model}_{cfg}.onnx")
            os.replace(os.path.join(tmp, f"{os.path.splitext(os.path.basename(src))[0]}.{n}.onnx"), out)
            rep["output"] = out
            with open(out[:-5] + ".report.json", "w") as f:
                json.dump(rep, f, indent=1)
            row.update(
                tool_wall_s=round(sum(p["seconds"] for p in rep["passes"]), 1),
                tool_s_note="sum of this run's pass seconds; calibration shared across configs, counted in each",
            )
        found[cfg] = row, rep
    shutil.rmtree(tmp, ignore_errors=True)
    return found


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--zoo", default="/work/zoo")
    ap.add_argument("--calib", default="/work/bench_out/calib")
    ap.add_argument("--out", default="/work/bench_out")
    ap.add_argument("--zoo-tools", default=os.path.join(REPO, "..", "shared", "zoo"))
    ap.add_argument("--onnxtq", default=os.path.join(REPO, ".venv", "bin", "onnxtq"))
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--configs", nargs="*", default=["fp32", "w8", "w4", "w4b32"])
    ap.add_argument("--results", default="rtn_results.jsonl", help="file under OUT that collects the rows")
    ap.add_argument("--table", action="store_true", help="only print the markdown table of OUT/RESULTS")
    ap.add_argument(
        "--sweep", action="store_true", help="per model, one `onnxtq sweep` (one calibration) for all non-fp32 configs"
    )
    a = ap.parse_args()
    if a.table:
        return print(table(os.path.join(a.out, a.results)))
    mdir = os.path.join(a.out, "models")
    os.makedirs(mdir, exist_ok=True)

    def emit(row):
        with open(os.path.join(a.out, a.results), "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    if a.sweep:  # model by model: each model's rows are written as soon as they are scored
        cfgs = list(dict.fromkeys(a.configs))
        for model in a.models:
            src, runs = os.path.join(a.zoo, model + ".onnx"), None
            for cfg in cfgs:
                row = dict(model=model, config=cfg)
                if cfg == "fp32":
                    row.update(bytes=os.path.getsize(src), eval=evaluate(a, model, src))
                else:
                    if runs is None:  # the first compressed config of this model runs the sweep for all of them
                        runs = sweep(a, model, src, [c for c in cfgs if c != "fp32"], mdir)
                    fields, rep = runs[cfg]
                    row.update(fields)
                    if rep is not None:
                        row.update(scored(a, model, src, os.path.join(mdir, f"{model}_{cfg}.onnx"), rep))
                emit(row)
        return
    for cfg in a.configs:
        for model in a.models:
            src = os.path.join(a.zoo, model + ".onnx")
            row = dict(model=model, config=cfg)
            if cfg == "fp32":
                row.update(bytes=os.path.getsize(src), eval=evaluate(a, model, src))
            else:
                out, pipe = os.path.join(mdir, f"{model}_{cfg}.onnx"), "fold-bn,calibrate," + CONFIGS[cfg]
                (calib,) = glob.glob(os.path.join(a.calib, model + "_calib*.npz"))
                cmd = ["compress", src, "-o", out, "--pipeline", pipe, "--calib", calib]
                cmd += ["--report", out[:-5] + ".report.json"]
                r, wall, rss = timed(a, cmd, out[:-5] + ".compress.log", out[:-5] + ".time")
                row.update(
                    pipeline=pipe,
                    calib=os.path.basename(calib),
                    rc=r.returncode,
                    tool_wall_s=wall,
                    tool_max_rss_mb=rss,
                )
                if r.returncode == 0:
                    row.update(scored(a, model, src, out, json.load(open(out[:-5] + ".report.json"))))
            emit(row)


if __name__ == "__main__":
    main()
