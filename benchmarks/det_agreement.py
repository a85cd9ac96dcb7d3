"""Task agreement of a compressed PP-OCR det model with its FP32 original.

The zoo's eval scores each model against the rendered ground truth; this scores the compressed
model against what FP32 detects on the same rendered pages (the zoo's page generator, one seed
per page): line boxes matched at IoU >= 0.5 (the zoo's `match_f1`), agreement = F1 of that match.

usage: ZOO/.venv/bin/python benchmarks/det_agreement.py COMPRESSED.onnx --ref ZOO/ppocrv4_det.onnx
"""

import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def line_boxes(engine, image):
    det, _ = engine(image, use_det=True, use_cls=False, use_rec=False)
    return [(min(p[0] for p in b), min(p[1] for p in b), max(p[0] for p in b), max(p[1] for p in b)) for b in det or []]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("det")
    ap.add_argument("--ref", required=True)
    ap.add_argument("--pages", type=int, default=100)
    ap.add_argument("--zoo-tools", default=os.path.join(REPO, "..", "shared", "zoo"))
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.zoo_tools))
    from rapidocr_onnxruntime import RapidOCR
    from zoo_text import make_lines, match_f1, render_page

    def engine(det):
        return RapidOCR(det_model_path=det, intra_op_num_threads=2, inter_op_num_threads=1)

    ref, test = engine(a.ref), engine(a.det)
    matched = n_test = n_ref = identical = 0
    for seed in range(a.pages):  # one page per seed, so any prefix of the run is reproducible
        rng = np.random.default_rng(seed + 1)
        image, _ = render_page(make_lines(12, rng, 2, 7), rng)
        want, got = line_boxes(ref, image), line_boxes(test, image)
        m, n_t, n_r = match_f1(got, want)
        matched, n_test, n_ref = matched + m, n_test + n_t, n_ref + n_r
        identical += m == n_t == n_r
    p, r = matched / max(n_test, 1), matched / max(n_ref, 1)
    result = dict(
        det=a.det,
        ref=a.ref,
        pages=a.pages,
        ref_boxes=n_ref,
        agreement_f1=2 * p * r / max(p + r, 1e-9),
        precision=p,
        recall=r,
        pages_identical=identical / a.pages,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
