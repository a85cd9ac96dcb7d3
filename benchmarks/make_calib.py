"""Calibration .npz files for the benchmark zoo, with each model's deployment preprocessing.

usage: python make_calib.py ZOO_DIR OUT_DIR [--zoo-tools DIR] [--holdout] [--only MODEL ...]
       (zoo's venv: needs PIL, rapidocr, tokenizers)

Writes OUT_DIR/<model>_calib<N>.npz keyed by the model's input names (axis 0 = samples):
  mobilenet_v2, efficientnet_lite0/1/2: 256 random-resized crops of the zoo photos made by the zoo's
      eval_imagenet.crops() with seed 1 (the eval uses seed 0; its deterministic centre crops are dropped), at the
      model's own input resolution (read from the ONNX file: 224, 240, 260). Same 27 photos as the eval: no other
      photos exist offline. Normalised as the eval does. float32.
  ppocrv4_det: 100 x [3,736,992]: 80 pages rendered by zoo_text (seed 100; the eval uses 0/1) + 20 zoo photos
      centre-cropped to 4:3, all 640x480, fed through rapidocr_onnxruntime; the det session's feeds are recorded.
  ppocrv4_rec: 256 x [3,48,320]: rapidocr rec feeds for zoo_text.render_line lines (seed 100), padded with 0
      (rapidocr's pad value after normalisation) or cropped to width 320.
  ppocrv6_det_small, ppocrv6_rec_small: the same recipes through the same pipeline with the v6 models in it
      (the zoo's eval runs v6 that way).
  minilm_l6: 256 x [64] int64 input_ids / attention_mask / token_type_ids (zeros): paragraphs of Python
      standard-library docstrings (not the eval's numpy/scipy/sklearn/skimage text_pairs.json), tokenized with
      the zoo tokenizer as eval_minilm.py does (64-token truncation), every sample padded to exactly 64 tokens.
      Paragraphs are split by a hash of their text into a calibration pool (3/4) and a held-out pool (1/4).
--holdout writes <model>_holdout64.npz instead: 64 inputs from other seeds (imagenet 7, rec 107, minilm 7 on
its held-out pool), on which the
benchmark measures output SQNR away from the calibration data (reconstruction can fit the calibration set).
The zoo tools are imported from ../shared/zoo relative to the repository unless --zoo-tools is given.
"""

import argparse
import glob
import importlib
import inspect
import os
import re
import sys
import zlib

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def input_name(path):
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()[0].name


def input_res(path):
    """Square input resolution of an NCHW image model (224 when the ONNX file leaves it symbolic, as the eval)."""
    import onnxruntime as ort

    shape = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).get_inputs()[0].shape
    return shape[2] if isinstance(shape[2], int) else 224


def imagenet(zoo, model, n=256, seed=1):
    from eval_imagenet import crops

    res = input_res(os.path.join(zoo, model + ".onnx"))
    paths = sorted(
        glob.glob(os.path.join(zoo, "data", "images", "*.jpg"))
        + glob.glob(os.path.join(zoo, "data", "images", "*.png"))
    )
    per = -(-n // len(paths))  # random crops per photo
    x = np.stack([c for i, c in enumerate(crops(paths, res, per, seed=seed)) if i % (per + 1)])  # drop centre crops
    return imagenet_feed(x[np.sort(np.random.default_rng(seed).permutation(len(x))[:n])], model)


def imagenet_feed(photos, model):
    """Crops [n, H, W, 3] of 0-255 as the zoo's eval feeds them to `model`: NCHW float32, (x-127)/128 for
    EfficientNet-Lite ('lite' in the name), ImageNet mean/std for the others."""
    x = photos.astype(np.float32)
    x = (x - 127.0) / 128.0 if "lite" in model else (x / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    return x.transpose(0, 3, 1, 2).astype(np.float32)


def recorder(sess, store):
    """Wrap an onnxruntime session's run() to keep every input array it is fed."""
    run = sess.run

    def rec(names, feeds, *a, **k):
        store.append(np.array(next(iter(feeds.values()))))
        return run(names, feeds, *a, **k)

    sess.run = rec


OCR_PAIRS = {"v4": ("ppocrv4_det", "ppocrv4_rec"), "v6": ("ppocrv6_det_small", "ppocrv6_rec_small")}


def ocr_engine(zoo, version="v4"):
    from rapidocr_onnxruntime import RapidOCR

    det, rec = OCR_PAIRS[version]
    return RapidOCR(
        det_model_path=os.path.join(zoo, det + ".onnx"),
        rec_model_path=os.path.join(zoo, rec + ".onnx"),
        rec_keys_path=os.path.join(zoo, rec + ".keys.txt"),
        intra_op_num_threads=2,
        inter_op_num_threads=1,
    )


def ppocr_det(zoo, version="v4", n_pages=80, n_photos=20, seed=100):
    from PIL import Image
    from zoo_text import make_lines, render_page

    eng, feeds = ocr_engine(zoo, version), []
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


def ppocr_rec(zoo, version="v4", n=256, seed=100, width=320):
    from zoo_text import make_lines, render_line

    eng, feeds = ocr_engine(zoo, version), []
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


STDLIB_MODULES = """abc argparse ast asyncio.events asyncio.streams asyncio.tasks base64 bisect calendar codecs
    collections concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib doctest
    email.message email.parser email.utils enum fnmatch fractions ftplib functools gettext glob gzip hashlib heapq
    hmac html.parser http.client http.cookiejar http.cookies http.server imaplib inspect io ipaddress itertools json
    json.decoder json.encoder locale logging logging.handlers mailbox mimetypes multiprocessing.pool numbers
    operator optparse os os.path pathlib pickle pprint queue random re sched secrets selectors shlex shutil signal
    smtplib socket socketserver sqlite3 statistics string subprocess tarfile tempfile textwrap threading timeit
    tokenize traceback typing unittest.case unittest.mock urllib.parse urllib.request uuid warnings wave weakref
    xml.dom.minidom xml.etree.ElementTree zipfile""".split()


def stdlib_paragraphs(min_words=6):
    """Prose paragraphs of the docstrings of standard-library modules, their classes, functions and methods."""
    docs = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        docs.append(inspect.getdoc(mod))
        for _, obj in inspect.getmembers(mod, lambda o: inspect.isclass(o) or inspect.isroutine(o)):
            if getattr(obj, "__module__", None) != mod.__name__:
                continue  # re-exported from elsewhere: counted where it is defined
            docs.append(inspect.getdoc(obj))
            if inspect.isclass(obj):
                docs += [inspect.getdoc(m) for k, m in sorted(vars(obj).items()) if inspect.isroutine(m)]
    out = {}
    for doc in docs:
        for para in re.split(r"\n\s*\n", doc or ""):
            if ">>>" in para:
                continue  # doctest examples are code, not prose
            text = " ".join(para.split())
            if len(text.split()) >= min_words and sum(c.isalpha() for c in text) > 0.6 * len(text):
                out[text] = None  # dict: de-duplicated, first-seen order
    return list(out)


def minilm(zoo, n=256, seed=1, holdout=False, maxlen=64):
    from tokenizers import Tokenizer

    pool = [t for t in stdlib_paragraphs() if (zlib.crc32(t.encode()) % 4 == 0) == holdout]
    texts = [pool[i] for i in np.sort(np.random.default_rng(seed).permutation(len(pool))[:n])]
    tok = Tokenizer.from_file(os.path.join(zoo, "minilm_l6_tokenizer", "tokenizer.json"))
    tok.enable_truncation(maxlen)
    tok.enable_padding(pad_id=0, pad_token="[PAD]", length=maxlen)
    enc = tok.encode_batch(texts)
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    note = f" ({len(pool)} paragraphs in the pool, {int((mask.sum(1) == maxlen).sum())} of {n} truncated)"
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}, note


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("zoo")
    ap.add_argument("out")
    ap.add_argument("--zoo-tools", default=os.path.join(REPO, "..", "shared", "zoo"))
    ap.add_argument("--only", nargs="*", help="subset of the models (default: all; no det with --holdout)")
    ap.add_argument("--holdout", action="store_true", help="64 held-out inputs per model (other seeds; no det)")
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.zoo_tools))
    os.makedirs(a.out, exist_ok=True)
    imagenet_models = ["mobilenet_v2", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    models = a.only or imagenet_models + ["ppocrv4_rec", "minilm_l6"] + ([] if a.holdout else ["ppocrv4_det"])
    for model in models:
        note = ""
        version = "v6" if model.startswith("ppocrv6") else "v4"
        if model.startswith("ppocr") and "_det" in model:
            x = ppocr_det(a.zoo, version)
        elif model.startswith("ppocr") and "_rec" in model:
            x, cropped = ppocr_rec(a.zoo, version, **(dict(n=64, seed=107) if a.holdout else {}))
            note = f" ({cropped} of {len(x)} lines were wider than 320 and cropped)"
        elif model == "minilm_l6":
            x, note = minilm(a.zoo, **(dict(n=64, seed=7, holdout=True) if a.holdout else {}))
        else:
            x = imagenet(a.zoo, model, **(dict(n=64, seed=7) if a.holdout else {}))
        feeds = x if isinstance(x, dict) else {input_name(os.path.join(a.zoo, model + ".onnx")): x}
        n = len(next(iter(feeds.values())))
        path = os.path.join(a.out, f"{model}_{'holdout' if a.holdout else 'calib'}{n}.npz")
        np.savez(path, **feeds)
        for k, v in feeds.items():
            stats = f"mean {v.mean():.3f} std {v.std():.3f} range [{v.min():.2f}, {v.max():.2f}]"
            print(f"{path} {k}: {list(v.shape)} {v.dtype} {stats}{note}", flush=True)
            note = ""


if __name__ == "__main__":
    main()
