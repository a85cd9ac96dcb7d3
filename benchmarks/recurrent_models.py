"""Two recurrent / control-flow models from PyPI, their calibration and eval data, and a score against FP32.

usage: python recurrent_models.py prepare DIR
       python recurrent_models.py eval {ddddocr,silero_vad} COMPRESSED [--ref ORIGINAL] --data DIR
Needs numpy, scipy, onnxruntime and Pillow (`pip install pillow`), pip with a reachable package index, espeak-ng
on PATH and the DejaVu fonts (/usr/share/fonts/truetype/dejavu); the project venv plus Pillow has the Python parts.

prepare downloads the two wheels (`pip download --no-deps`) into DIR/wheels and writes:
  ddddocr_common.onnx: ddddocr 1.6.1 `common.onnx` (its "beta" model: CNN, bidirectional LSTM, Gemm to 8,210
      classes, class 0 the CTC blank). Input `input1` [1,1,64,W] grey/255 (batch fixed at 1); output `387`
      [T,1,8210] logits, T = W/8 (the file declares [1, seqlen]; onnxruntime warns, muted here).
      ddddocr_charset.json: its CHARSET_BETA, read with ast.literal_eval, only to check the renders are legible.
  ddddocr_calib.npz (128 x [1,64,160], seed 1) and ddddocr_eval.npz (200, seed 2, plus the rendered `text`):
      4-6 random alphanumerics (no 0/O/1/I/l) in a random DejaVu font, size, place and grey levels, 0-3 noise
      lines, gaussian noise; drawn at twice the size and shrunk with LANCZOS as ddddocr resizes. The package has
      no data set. W is fixed at 160 so the files stack.
  silero_vad.onnx: silero-vad 6.2.3 `silero_vad.onnx` (every weight inside If branches, 16 vs 8 kHz). Inputs
      `input` [B, 64+512]: the package's OnnxWrapper prepends the last 64 samples of the previous chunk (zeros at
      the start), and a bare 512-sample chunk scores ~0 on speech, so each sample is 576 wide; `state` [2,B,128]
      (batch on axis 1), `sr` int64 scalar. Outputs `output` [B,1] speech probability, `stateN`.
  silero_vad_calib.npz: 256 (input, incoming state) pairs recorded while the original model streams 8 calibration
      streams of 10 s (seed 1, a hash-chosen 3/4 of the sentences); keys `input` [256,576], `state` [256,2,1,128]
      (a batch of one per sample: onnxtq's .npz stacks samples on axis 0 and, for an input whose first axis is not
      the batch, takes each row as one whole feed), `sr` [256] int64 (one 0-d scalar per sample).
  silero_vad_eval.npz: `audio` [4, 15 s] float32 at 16 kHz (seed 2, the other sentences), streamed chunk by chunk.
Speech: espeak-ng (English voices and variants, random speed and pitch) on sentences of Python standard-library
docstrings (make_calib.stdlib_paragraphs), resampled to 16 kHz, at random levels between 0.5-3 s stretches of
silence, then white background noise at a random SNR (8-30 dB against the stream's speech).

eval prints one JSON line. ddddocr: CTC greedy decode (argmax per step, repeats collapsed, blank dropped) of both
models: exact-sequence agreement, CER (edit distances / length of the original's sequences) and per-step argmax
agreement; with the charset, how often the original reads the rendered text (a check of the data, not of the
compressed model). silero_vad: each model streams the eval audio with its own carried state and context: frame
decision agreement at 0.5, max and mean |dprob|, and the fraction of frames the original calls speech.
"""

import argparse
import ast
import glob
import hashlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import wave
import zipfile
import zlib

import numpy as np

WHEELS = ["ddddocr==1.6.1", "silero-vad==6.2.3"]
MEMBERS = {  # file in DIR: (wheel name prefix, member)
    "ddddocr_common.onnx": ("ddddocr-1.6.1-", "ddddocr/common.onnx"),
    "silero_vad.onnx": ("silero_vad-6.2.3-", "silero_vad/data/silero_vad.onnx"),
}
CHARS = "abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/l: unambiguous to a reader
FONT_DIR = "/usr/share/fonts/truetype/dejavu"
SR, CHUNK, CONTEXT = 16000, 512, 64  # silero at 16 kHz: 512 new samples per call, 64 carried over
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan", "en-gb-x-gbcwmd"]
VARIANTS = ["", "+f1", "+f2", "+f3", "+f4", "+f5", "+m1", "+m2", "+m3", "+m4", "+m5", "+klatt", "+klatt2"]


def session(path):
    """onnxruntime CPU session, default options except the log level (ddddocr's declared output shape is wrong)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def download(out):
    """The two wheels through pip's own client (the only network access); pip reuses files already there."""
    wheels = os.path.join(out, "wheels")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *WHEELS, "-d", wheels]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return wheels


def unpack(wheels, out):
    """The two .onnx files and ddddocr's beta charset out of the wheels."""
    for name, (prefix, member) in MEMBERS.items():
        (whl,) = glob.glob(os.path.join(wheels, prefix + "*.whl"))
        with zipfile.ZipFile(whl) as z:
            data = z.read(member)
            if name.startswith("ddddocr"):
                charset = charset_beta(z.read("ddddocr/charsets.py").decode("utf-8"))
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
        print(f"{name}: {len(data):,d} B sha256 {hashlib.sha256(data).hexdigest()[:16]} ({os.path.basename(whl)})")
    with open(os.path.join(out, "ddddocr_charset.json"), "w", encoding="utf-8") as f:
        json.dump(charset, f, ensure_ascii=False)


def charset_beta(source):
    """CHARSET_BETA (the charset ddddocr pairs with common.onnx) from charsets.py, parsed, never executed."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CHARSET_BETA":
            return ast.literal_eval(node.value)
    raise SystemExit("CHARSET_BETA not found in ddddocr/charsets.py")


# ---- ddddocr: rendered captcha-like lines


def fit_font(path, text, size, width):
    """The font at `size`, shrunk until the text fits `width` pixels (bold faces at 6 letters overflow)."""
    from PIL import ImageFont

    while True:
        font = ImageFont.truetype(path, size)
        box = font.getbbox(text)
        if box[2] - box[0] <= width or size <= 20:
            return font, box
        size -= 4


def render_text(text, rng, width=160, height=64):
    """One line as the model's input [1,64,W]: drawn at 2x, shrunk with LANCZOS (ddddocr's resize), /255."""
    from PIL import Image, ImageDraw

    fonts = sorted(f for f in glob.glob(os.path.join(FONT_DIR, "DejaVu*.ttf")) if "MathTeX" not in f)
    W, H = 2 * width, 2 * height
    img = Image.new("L", (W, H), int(rng.integers(170, 256)))
    draw = ImageDraw.Draw(img)
    font, box = fit_font(fonts[int(rng.integers(len(fonts)))], text, int(rng.integers(56, 88)), W - 12)
    x = int(rng.integers(0, max(1, W - (box[2] - box[0]) - 4))) - box[0]
    y = int(rng.integers(0, max(1, H - (box[3] - box[1]) - 2))) - box[1]
    draw.text((x, y), text, fill=int(rng.integers(0, 100)), font=font)
    for _ in range(int(rng.integers(0, 4))):
        ends = [tuple(int(v) for v in rng.integers(0, [W, H])) for _ in range(2)]
        draw.line(ends, fill=int(rng.integers(0, 170)), width=int(rng.integers(1, 4)))
    a = np.asarray(img.resize((width, height), Image.LANCZOS), np.float32) / 255.0
    a = a + rng.normal(0, rng.uniform(0.01, 0.05), a.shape)
    return np.clip(a, 0, 1).astype(np.float32)[None]


def render_set(n, seed):
    """n lines of 4-6 random characters: (inputs [n,1,64,160], texts)."""
    rng = np.random.default_rng(seed)
    texts = ["".join(rng.choice(list(CHARS), size=int(rng.integers(4, 7)))) for _ in range(n)]
    return np.stack([render_text(t, rng) for t in texts]), texts


def ctc_greedy(logits):
    """Class indices of a [T,1,C] output: argmax per step, repeats collapsed, blank 0 dropped (ddddocr's decode)."""
    idx = logits[:, 0].argmax(-1)
    keep = np.concatenate([[True], idx[1:] != idx[:-1]]) & (idx != 0)
    return idx, [int(i) for i in idx[keep]]


def edit_distance(a, b):
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def eval_ddddocr(test_path, ref_path, data):
    z = np.load(os.path.join(data, "ddddocr_eval.npz"))
    x, texts = z["input1"], [str(t) for t in z["text"]]
    chars = os.path.join(data, "ddddocr_charset.json")
    charset = json.load(open(chars, encoding="utf-8")) if os.path.exists(chars) else None
    ref, test = session(ref_path), session(test_path)
    same = edits = length = steps = step_same = read = 0
    for i in range(len(x)):
        feed = {"input1": x[i : i + 1]}
        (r_idx, r), (t_idx, t) = ctc_greedy(ref.run(None, feed)[0]), ctc_greedy(test.run(None, feed)[0])
        same += r == t
        edits, length = edits + edit_distance(r, t), length + len(r)
        steps, step_same = steps + len(r_idx), step_same + int((r_idx == t_idx).sum())
        read += charset is not None and "".join(charset[k] for k in r) == texts[i]
    out = dict(model="ddddocr", test=test_path, ref=ref_path, images=len(x), exact_agreement=same / len(x))
    out.update(cer=edits / max(length, 1), step_agreement=step_same / steps, ref_chars=length)
    if charset is not None:
        out["ref_reads_truth"] = read / len(x)
    return out


# ---- silero-vad: synthetic speech streams


def sentences(holdout):
    """Sentences of 5-16 words from standard-library docstrings, split by a hash: 3/4 calibration, 1/4 eval."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from make_calib import stdlib_paragraphs

    out = {}
    for para in stdlib_paragraphs():
        for s in para.replace("? ", ". ").replace("! ", ". ").split(". "):
            words = s.strip(" .").split()
            if 5 <= len(words) <= 16 and (zlib.crc32(s.encode()) % 4 == 0) == holdout:
                out[" ".join(words) + "."] = None
    return list(out)


def speak(text, rng, tmp):
    """espeak-ng of one sentence, random voice/variant/speed/pitch, as float32 at 16 kHz."""
    from scipy.signal import resample_poly

    voice = VOICES[int(rng.integers(len(VOICES)))] + VARIANTS[int(rng.integers(len(VARIANTS)))]
    path = os.path.join(tmp, "u.wav")
    speed, pitch = str(int(rng.integers(120, 200))), str(int(rng.integers(25, 75)))
    subprocess.run(["espeak-ng", "-v", voice, "-s", speed, "-p", pitch, "-w", path, "--", text], check=True)
    with wave.open(path) as w:
        rate, pcm = w.getframerate(), np.frombuffer(w.readframes(w.getnframes()), np.int16)
    x = pcm.astype(np.float32) / 32768.0
    g = math.gcd(SR, rate)
    return resample_poly(x, SR // g, rate // g).astype(np.float32) if rate != SR else x


def make_stream(pool, rng, seconds, tmp):
    """Utterances at random levels between 0.5-3 s of silence, cut to `seconds`, plus white noise at 8-30 dB
    SNR (against the speech's own power). The length is a whole number of chunks."""
    n = int(seconds * SR) // CHUNK * CHUNK
    parts, total, speech = [], 0, []
    while total < n:
        gap = np.zeros(int(rng.uniform(0.5, 3.0) * SR), np.float32)
        u = speak(pool[int(rng.integers(len(pool)))], rng, tmp)
        u = u * np.float32(rng.uniform(0.1, 0.9) / max(np.abs(u).max(), 1e-6))
        parts += [gap, u]
        speech.append(u)
        total += len(gap) + len(u)
    clean = np.concatenate(parts)[:n]
    power = np.mean(np.concatenate(speech) ** 2)
    noise = rng.normal(0, math.sqrt(power / 10 ** (rng.uniform(8, 30) / 10)), n)
    return np.clip(clean + noise, -1, 1).astype(np.float32)


def make_streams(count, seconds, seed, holdout):
    rng, pool = np.random.default_rng(seed), sentences(holdout)
    with tempfile.TemporaryDirectory(prefix="recurrent-") as tmp:
        return np.stack([make_stream(pool, rng, seconds, tmp) for _ in range(count)]), len(pool)


def stream(sess, audio, record=None):
    """Speech probabilities of one stream as the package's OnnxWrapper computes them: state carried from chunk to
    chunk, each call fed 64 samples of context + 512 new ones. `record` gets every (input, incoming state)."""
    state, context, probs = np.zeros((2, 1, 128), np.float32), np.zeros((1, CONTEXT), np.float32), []
    sr = np.array(SR, np.int64)
    for i in range(0, len(audio) - CHUNK + 1, CHUNK):
        x = np.concatenate([context, audio[None, i : i + CHUNK]], axis=1)
        if record is not None:
            record.append((x[0], state))
        p, state = sess.run(None, {"input": x, "state": state, "sr": sr})
        context = x[:, -CONTEXT:]
        probs.append(float(p[0, 0]))
    return np.array(probs)


def silero_calib(model, audio, n, seed):
    """n (input, incoming state) pairs picked at random from the original model's own run over `audio`."""
    sess, pairs = session(model), []
    for a in audio:
        stream(sess, a, pairs)
    pick = np.sort(np.random.default_rng(seed).permutation(len(pairs))[:n])
    x = np.stack([pairs[i][0] for i in pick]).astype(np.float32)
    state = np.stack([pairs[i][1] for i in pick]).astype(np.float32)  # [n, 2, 1, 128]: a batch of one each
    return {"input": x, "state": state, "sr": np.full(n, SR, np.int64)}, len(pairs)


def eval_silero(test_path, ref_path, data):
    audio = np.load(os.path.join(data, "silero_vad_eval.npz"))["audio"]
    ref, test = session(ref_path), session(test_path)
    r = np.concatenate([stream(ref, a) for a in audio])
    t = np.concatenate([stream(test, a) for a in audio])
    d = np.abs(r - t)
    out = dict(model="silero_vad", test=test_path, ref=ref_path, frames=len(r), seconds=audio.size / SR)
    out.update(frame_agreement=float(((r > 0.5) == (t > 0.5)).mean()), max_abs_dprob=float(d.max()))
    out.update(mean_abs_dprob=float(d.mean()), ref_speech_fraction=float((r > 0.5).mean()))
    return out


# ---- CLI


def describe(path, arrays, note=""):
    for k, v in arrays.items():
        stats = f" mean {v.mean():.3f} range [{v.min():.2f}, {v.max():.2f}]" if v.dtype.kind == "f" else ""
        print(f"{path} {k}: {list(v.shape)} {v.dtype}{stats}{note}", flush=True)
        note = ""


def prepare(out):
    os.makedirs(out, exist_ok=True)
    t0 = time.time()
    unpack(download(out), out)
    print(f"download + unpack: {time.time() - t0:.1f} s", flush=True)
    t0 = time.time()
    for name, n, seed in [("calib", 128, 1), ("eval", 200, 2)]:
        x, texts = render_set(n, seed)
        arrays = {"input1": x} | ({"text": np.array(texts)} if name == "eval" else {})
        path = os.path.join(out, f"ddddocr_{name}.npz")
        np.savez(path, **arrays)
        describe(path, arrays)
    print(f"ddddocr data: {time.time() - t0:.1f} s", flush=True)
    t0 = time.time()
    audio, pool = make_streams(8, 10, 1, holdout=False)
    feeds, chunks = silero_calib(os.path.join(out, "silero_vad.onnx"), audio, 256, 1)
    path = os.path.join(out, "silero_vad_calib.npz")
    np.savez(path, **feeds)
    describe(path, feeds, f" ({len(audio)} streams of 10 s, {chunks} chunks, {pool} sentences in the pool)")
    audio, pool = make_streams(4, 15, 2, holdout=True)
    path = os.path.join(out, "silero_vad_eval.npz")
    np.savez(path, audio=audio)
    describe(path, {"audio": audio}, f" ({pool} sentences in the pool)")
    print(f"silero data: {time.time() - t0:.1f} s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="download the models, write calibration and eval data")
    p.add_argument("dir")
    e = sub.add_parser("eval", help="score a compressed model against the original: one JSON line")
    e.add_argument("kind", choices=["ddddocr", "silero_vad"])
    e.add_argument("model")
    e.add_argument("--ref", help="the original (default: DIR/ddddocr_common.onnx or DIR/silero_vad.onnx)")
    e.add_argument("--data", required=True, help="the DIR that prepare wrote")
    a = ap.parse_args()
    if a.cmd == "prepare":
        return prepare(a.dir)
    ref = a.ref or os.path.join(a.data, "ddddocr_common.onnx" if a.kind == "ddddocr" else "silero_vad.onnx")
    t0 = time.time()
    out = (eval_ddddocr if a.kind == "ddddocr" else eval_silero)(a.model, ref, a.data)
    print(json.dumps(out | {"eval_s": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
