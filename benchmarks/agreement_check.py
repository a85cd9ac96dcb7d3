"""Where a target run's expected top-1 agreement and the zoo's count part: its errors or its margins.

usage: python benchmarks/agreement_check.py COMPRESSED.onnx --ref ORIGINAL.onnx --calib CALIB.npz
           [--zoo-tools ../shared/zoo] [--crops 40]
       (the zoo's venv or onnxtq's: needs onnxtq, onnxruntime, PIL)

An agreement target is met on the expected agreement (onnxtq.target.agreement_chances): each held-out input's
error, relative to its top scores' spread, crossed with the original's margins on every calibration input.
This runs both models on the zoo's own crops (eval_imagenet.crops, its seed and count) and on the calibration
file, and prints: the zoo's count and what the same estimator makes of the zoo's own errors and margins (is
the estimator right where it has the zoo's inputs?); the relative errors on the calibration file's held-out
quarter (split_holdout's) and fitted inputs beside the zoo's (does the held-out split see the zoo's errors?);
and the share of near ties among each set's margins (does the calibration file hold the zoo's near ties?).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

import numpy as np
import onnxruntime as ort

from onnxtq.target import agreement_chances, relative_errors, top_scores

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_calib  # noqa: E402 - the calibration files' feeding of the zoo's photos

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIES = (0.01, 0.03, 0.1)


def outputs(path: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i : i + 32]})[0] for i in range(0, len(x), 32)]).astype(
        np.float64
    )


def zoo_inputs(ref: str, tools: str, count: int) -> np.ndarray:
    """The zoo eval's crops of its photos, fed as it feeds them (eval_imagenet.py; make_calib.py's recipe)."""
    sys.path.insert(0, tools)
    from eval_imagenet import crops  # noqa: PLC0415 - the zoo's own module, found at run time

    data = os.path.join(os.path.dirname(os.path.abspath(ref)), "data", "images")
    paths = sorted(glob.glob(os.path.join(data, "*.jpg")) + glob.glob(os.path.join(data, "*.png")))
    photos = np.stack(list(crops(paths, make_calib.input_res(ref), count)))
    return make_calib.imagenet_feed(photos, os.path.basename(ref))


def near_ties(tops: np.ndarray) -> list[float]:
    margins = (tops[:, 0] - tops[:, 1]) / tops.std(axis=1)
    return [round(float((margins < t).mean()), 4) for t in TIES]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--ref", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--zoo-tools", default=os.path.join(REPO, "..", "shared", "zoo"))
    ap.add_argument("--crops", type=int, default=40)
    a = ap.parse_args()

    x = zoo_inputs(a.ref, a.zoo_tools, a.crops)
    zr, zo = outputs(a.ref, x), outputs(a.model, x)
    z_errors, z_tops = relative_errors(zr, zo), top_scores(zr)
    print(f"zoo: {len(zr)} crops, counted {np.mean(zr.argmax(1) == zo.argmax(1)):.4f}")
    print(f"  expected from the zoo's own errors and margins: {agreement_chances(z_errors, z_tops).mean():.4f}")

    calib = np.load(a.calib)
    c = calib[list(calib.keys())[0]]
    cr, co = outputs(a.ref, c), outputs(a.model, c)
    c_errors, c_tops = relative_errors(cr, co), top_scores(cr)
    held = np.zeros(len(c), bool)
    held[3::4] = True  # onnxtq.calibration.data.split_holdout's quarter for up to 512 inputs
    print("relative errors, median / mean:")
    for name, e in (("held out", c_errors[held]), ("fitted", c_errors[~held]), ("zoo", z_errors)):
        print(f"  {name:9s} {np.median(e):.4f} / {e.mean():.4f}")
    for name, tops in (("calibration margins (the run's)", c_tops), ("the zoo's margins", z_tops)):
        print(f"  expected from held-out errors and {name}: {agreement_chances(c_errors[held], tops).mean():.4f}")
    print(
        f"near ties (margin / top scores' spread below {TIES}): calibration {near_ties(c_tops)}, "
        f"zoo {near_ties(z_tops)}"
    )


if __name__ == "__main__":
    main()
