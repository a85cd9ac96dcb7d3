"""Rates, bound gap and additivity of tq runs, read from their reports (OUT/models/<model>_<config>.report.json).

usage: python tq_summary.py OUT [--layers MODEL_CONFIG]
Prints a markdown table: per run the three rates (nominal, container, Gaussian rate-distortion bound at the
distortion reached; bits per quantized weight), the gap container - bound, the predicted (sum of gain-weighted
layer distortions) and measured output SQNR on the probe inputs, how many layers kept a transform, and the
pass time. With --layers, the per-layer table of one run instead.
"""

import argparse
import glob
import json
import os


def tq_pass(path):
    return next(p for p in json.load(open(path))["passes"] if p["pass_name"] == "tq")


def summary(out):
    rows = [
        "| run | nominal b/w | container b/w | bound b/w | gap b/w | SQNR predicted / measured dB | "
        "transformed layers | tq s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in sorted(glob.glob(os.path.join(out, "models", "*_tq*.report.json"))):
        p = tq_pass(path)
        rate, additivity = p.get("rate"), p.get("additivity")
        if not rate:
            continue
        nominal, container, bound = rate["nominal"], rate["stored"], rate["bound"]
        sqnr = f"{additivity['predicted_sqnr_db']:.2f} / {additivity['measured_sqnr_db']:.2f}" if additivity else ""
        kept = f"{p['transformed']} of {len(p['records'])}" if p.get("transformed") is not None else ""
        run = os.path.basename(path).removesuffix(".report.json")
        rows.append(
            f"| {run} | {nominal:.2f} | {container:.2f} | {bound:.2f} | {container - bound:.2f} | "
            f"{sqnr} | {kept} | {p['seconds']:.0f} |"
        )
    return "\n".join(rows)


def layers(out, run):
    p = tq_pass(os.path.join(out, "models", run + ".report.json"))
    rows = [
        "| weight | shape | bytes | container b/w | bound b/w | layer SQNR dB | coding |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in p["records"]:
        if r["status"] != "quantized":
            continue
        rows.append(
            f"| {r['name']} | {r['shape']} | {r['bytes_after']:,d} | {r['bits']:.2f} | {r['bound_bits'] or 0:.2f} | "
            f"{r['output_sqnr_db'] or 0:.1f} | {r['detail']} |"
        )
    return "\n".join(rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--layers", metavar="MODEL_CONFIG")
    a = ap.parse_args()
    print(layers(a.out, a.layers) if a.layers else summary(a.out))


if __name__ == "__main__":
    main()
