"""Calibration .npz files for the benchmark zoo, with each model's deployment preprocessing.

usage: python make_calib.py ZOO_DIR OUT_DIR [--zoo-tools DIR] [--holdout]   (zoo's venv: needs PIL, rapidocr)

Writes OUT_DIR/<model>_calib<N>.npz keyed by the model's input name (axis 0 = samples, float32):
  mobilenet_v2, efficientnet_lite0: 256 random-resized crops of the zoo photos made by the zoo's
      eval_imagenet.crops() with seed 1 (the eval uses seed 0; its deterministic centre crops are dropped).
      Same 27 photos as the eval: no other photos exist offline. Normalised as the eval does.
  ppocrv4_det: 100 x [3,736,992]: 80 pages rendered by zoo_text (seed 100; the eval uses 0/1) + 20 zoo photos
      centre-cropped to 4:3, all 640x480, fed through rapidocr_onnxruntime; the det session's feeds are recorded.
  ppocrv4_rec: 256 x [3,48,320]: rapidocr rec feeds for zoo_text.render_line lines (seed 100), padded with 0
      (rapidocr's pad value after normalisation) or cropped to width 320.
--holdout writes <model>_holdout64.npz instead: 64 inputs from other seeds (imagenet 7, rec 107), on which the
benchmark measures output SQNR away from the calibration data (reconstruction can fit the calibration set).
The zoo tools are imported from ../shared/zoo relative to the repository unless --zoo-tools is given.
"""

import argparse
import glob
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def input_name(path):
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()[0].name


def imagenet(zoo, model, n=256, seed=1):
    from eval_imagenet import crops

    paths = sorted(
        glob.glob(os.path.join(zoo, "data", "images", "*.jpg"))
        + glob.glob(os.path.join(zoo, "data", "images", "*.png"))
    )
    per = -(-n // len(paths))  # random crops per photo
    x = np.stack([c for i, c in enumerate(crops(paths, 224, per, seed=seed)) if i % (per + 1)])  # drop centre crops
    x = x[np.sort(np.random.default_rng(seed).permutation(len(x))[:n])].astype(np.float32)
    x = (x - 127.0) / 128.0 if "lite" in model else (x / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    return x.transpose(0, 3, 1, 2).astype(np.float32)


def recorder(sess, store):
    """Wrap an onnxruntime session's run() to keep every input array it is fed."""
    run = sess.run

    def rec(names, feeds, *a, **k):
        store.append(np.array(next(iter(feeds.values()))))
        return run(names, feeds, *a, **k)

    sess.run = rec


def ocr_engine(zoo):
    from rapidocr_onnxruntime import RapidOCR

    return RapidOCR(
        det_model_path=os.path.join(zoo, "ppocrv4_det.onnx"),
        rec_model_path=os.path.join(zoo, "ppocrv4_rec.onnx"),
        rec_keys_path=os.path.join(zoo, "ppocrv4_rec.keys.txt"),
        intra_op_num_threads=2,
        inter_op_num_threads=1,
    )


def ppocr_det(zoo, n_pages=80, n_photos=20, seed=100):
    from PIL import Image
    from zoo_text import make_lines, render_page

    eng, feeds = ocr_engine(zoo), []
    recorder(eng.text_det.infer.session, feeds)
    rng = np.random.default_rng(seed)
    imgs = [render_page(make_lines(12, rng, 2, 7), rng)[0] for _ in range(n_pages)]
    for p in sorted(glob.glob(os.path.join(zoo, "data", "images", "*.png")))[:n_photos]:
        im = Image.open(p).convert("RGB")
        W, H = im.size
        w, h = min(W, H * 4 // 3), min(H, W * 3 // 4)
        im = im.crop(((W - w) // 2, (H - h) // 2, (W - w) // 2 + w, (H - h) // 2 + h)).resize(
            (640, 480), Image.BILINEAR
        )
        imgs.append(im)  # a PIL image: rapidocr converts it to BGR itself
    for img in imgs:
        eng(img, use_det=True, use_cls=False, use_rec=False)
    shapes = {f.shape for f in feeds}
    assert shapes == {(1, 3, 736, 992)}, shapes
    return np.concatenate(feeds).astype(np.float32)


def ppocr_rec(zoo, n=256, seed=100, width=320):
    from zoo_text import make_lines, render_line

    eng, feeds = ocr_engine(zoo), []
    recorder(eng.text_rec.session.session, feeds)
    rng = np.random.default_rng(seed)
    for text in make_lines(n, rng):
        eng(render_line(text, rng), use_det=False, use_cls=False, use_rec=True)
    x = np.zeros((n, 3, 48, width), np.float32)  # rapidocr pads normalised images with 0
    samples = [s for b in feeds for s in b][:n]  # split captured batches into single samples
    for i, f in enumerate(samples):
        w = min(width, f.shape[-1])
        x[i, :, :, :w] = f[:, :, :w]
    return x, sum(f.shape[-1] > width for f in samples)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo")
    ap.add_argument("out")
    ap.add_argument("--zoo-tools", default=os.path.join(REPO, "..", "shared", "zoo"))
    ap.add_argument("--only", nargs="*", help="subset of the four models")
    ap.add_argument("--holdout", action="store_true", help="64 held-out inputs per model (other seeds; no det)")
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.zoo_tools))
    os.makedirs(a.out, exist_ok=True)
    models = a.only or ["mobilenet_v2", "efficientnet_lite0", "ppocrv4_rec"] + ([] if a.holdout else ["ppocrv4_det"])
    for model in models:
        note = ""
        if model == "ppocrv4_det":
            x = ppocr_det(a.zoo)
        elif model == "ppocrv4_rec":
            x, cropped = ppocr_rec(a.zoo, **(dict(n=64, seed=107) if a.holdout else {}))
            note = f" ({cropped} of {len(x)} lines were wider than 320 and cropped)"
        else:
            x = imagenet(a.zoo, model, **(dict(n=64, seed=7) if a.holdout else {}))
        path = os.path.join(a.out, f"{model}_{'holdout' if a.holdout else 'calib'}{len(x)}.npz")
        np.savez(path, **{input_name(os.path.join(a.zoo, model + ".onnx")): x})
        print(
            f"{path}: {list(x.shape)} mean {x.mean():.3f} std {x.std():.3f} range [{x.min():.2f}, {x.max():.2f}]{note}",
            flush=True,
        )


if __name__ == "__main__":
    main()
