"""Entropy-coded rates of ecsq (and any other) runs: deployable bytes, `onnxtq pack` bytes, code entropy, metric.

usage: python ecsq_summary.py OUT [--results NAME.jsonl] [--configs e2 e3 ...]
Reads OUT/<results> (run_zoo rows: bytes and task metric) and OUT/models/<model>_<config>.onnx, packs each
file with the rANS coder in memory, and prints one markdown row per run: deployable bytes, container bytes,
the coded streams against their summed empirical entropy, bits per quantized weight (entropy of the codes
as the pass reported it), and the metric.
"""

import argparse
import json
import os

from run_zoo import metric  # the zoo metric as run_zoo's tables print it

from onnxtq import container


def pass_entropy(report_path: str) -> str:
    """The entropy the run's quantizing pass (ecsq) reached, from its report's typed rate, if any."""
    if not os.path.exists(report_path):
        return ""
    for p in json.load(open(report_path))["passes"]:
        if (p.get("rate") or {}).get("entropy") is not None:
            return f"entropy {p['rate']['entropy']:.3f} b/w"
    return ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--results", default="ecsq.jsonl")
    ap.add_argument("--configs", nargs="*")
    a = ap.parse_args()
    rows = [json.loads(line) for line in open(os.path.join(a.out, a.results))]
    print("| model | config | deployable B | packed (rANS) B | coded / entropy | pass note | metric |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        model, config = row["model"], row["config"]
        if config == "fp32" or (a.configs and config not in a.configs):
            continue
        base = os.path.join(a.out, "models", f"{model}_{config}")
        if not os.path.exists(base + ".onnx"):
            continue
        packed, report = container.pack(open(base + ".onnx", "rb").read())
        print(
            f"| {model} | {config} | {row.get('bytes', 0):,d} | {len(packed):,d} | "
            f"{report.coded_over_entropy(tables=True):.4f} | {pass_entropy(base + '.report.json')} | {metric(row)} |"
        )


if __name__ == "__main__":
    main()
