"""The .onnxtq container on compressed zoo models: sizes against the deployable file and the entropy.

usage: python container_zoo.py MODEL.onnx ... [--jsonl OUT.jsonl] [--table]
       python container_zoo.py --table --jsonl OUT.jsonl        # re-print the table of an earlier run

For each deployable model and each coder (rans, huffman): deployable bytes, container bytes, the streams'
summed empirical entropy Σ n·H/8, coded bytes and their ratio to it, count-table and skeleton bytes,
whether unpack restored the file byte for byte, and pack/unpack seconds. Run with this repo's .venv.
"""

from __future__ import annotations

import argparse
import json
import os
import time

from onnxtq import container


def measure(path: str) -> list[dict]:
    """One row per coder for the deployable model at `path`."""
    data = open(path, "rb").read()
    rows = []
    for coder in container.CODERS:
        t0 = time.perf_counter()
        blob, report = container.pack(data, coder)  # pack also decodes once to check itself
        t1 = time.perf_counter()
        exact = container.unpack(blob) == data
        t2 = time.perf_counter()
        rows.append(
            {
                "model": os.path.basename(path).removesuffix(".onnx"),
                "coder": coder,
                "deployable_bytes": len(data),
                "container_bytes": len(blob),
                "stream_raw_bytes": report.stream_raw_bytes,
                "entropy_bytes": round(report.entropy_bytes, 1),
                "coded_bytes": report.coded_bytes,
                "coded_over_entropy": round(report.coded_over_entropy(), 5),
                "tables_bytes": report.tables_bytes,
                "skeleton_bytes": report.skeleton_bytes,
                "skeleton_raw_bytes": report.skeleton_raw_bytes,
                "header_bytes": report.header_bytes,
                "streams": len(report.streams),
                "kept": len(report.kept),
                "bit_exact": exact,
                "pack_s": round(t1 - t0, 2),
                "unpack_s": round(t2 - t1, 2),
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: one line per model, rans and huffman side by side."""
    by_model: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_model.setdefault(r["model"], {})[r["coder"]] = r
    lines = [
        "| model | deployable | rANS container | Huffman container | Σ entropy | rANS/H | Huff/H"
        " | tables | skeleton (raw → lzma) | exact | pack/unpack s (rANS; Huff) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, c in by_model.items():
        r, h = c["rans"], c["huffman"]
        lines.append(
            f"| {model} | {r['deployable_bytes']:,d} | {r['container_bytes']:,d}"
            f" ({r['container_bytes'] / r['deployable_bytes']:.3f}x) | {h['container_bytes']:,d}"
            f" | {r['entropy_bytes']:,.0f} | {r['coded_over_entropy']:.4f} | {h['coded_over_entropy']:.4f}"
            f" | {r['tables_bytes']:,d} | {r['skeleton_raw_bytes']:,d} → {r['skeleton_bytes']:,d}"
            f" | {'yes' if r['bit_exact'] and h['bit_exact'] else 'NO'}"
            f" | {r['pack_s']}/{r['unpack_s']}; {h['pack_s']}/{h['unpack_s']} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*")
    ap.add_argument("--jsonl", help="append one JSON line per model and coder (or read them with --table alone)")
    ap.add_argument("--table", action="store_true", help="print the markdown table")
    a = ap.parse_args()
    rows = []
    if not a.models and a.jsonl:
        rows = [json.loads(line) for line in open(a.jsonl)]
    for path in a.models:
        new = measure(path)
        rows += new
        for r in new:
            print(json.dumps(r), flush=True)
            if a.jsonl:
                with open(a.jsonl, "a") as f:
                    f.write(json.dumps(r) + "\n")
    if a.table:
        print(table(rows))


if __name__ == "__main__":
    main()
