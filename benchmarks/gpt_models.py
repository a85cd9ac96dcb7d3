"""Synthetic GPT-shaped ONNX models for the big-model benchmark (random init, int64 token inputs).

Each model is written tensor by tensor: its weights go to one external-data file as they are drawn, so
building the 1.3B model holds one tensor in memory, not 5 GB. Shapes follow GPT-2 (pre-norm blocks,
fused QKV, GELU MLP of 4d, untied LM head); the weights are N(0, 0.02), projections into the residual
scaled by 1/sqrt(2L), as GPT-2 initialises them.

    python benchmarks/gpt_models.py OUT_DIR [--sizes 27M 123M] [--calib 32] [--seq 128]
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


@dataclass(frozen=True)
class GPT:
    name: str
    d: int
    layers: int
    heads: int
    vocab: int
    positions: int = 512

    @property
    def params(self) -> int:
        return 12 * self.layers * self.d**2 + 2 * self.vocab * self.d + self.positions * self.d


SIZES = {
    "27M": GPT("gpt27m", 512, 6, 8, 8192),
    "123M": GPT("gpt123m", 768, 12, 12, 24576),
    "353M": GPT("gpt353m", 1024, 24, 16, 24576),
    "1.3B": GPT("gpt1p3b", 2048, 24, 16, 24576),
}


class _Writer:
    """Initializers appended to one external-data file as they are made (nothing kept but the header)."""

    def __init__(self, folder: Path, location: str, rng: np.random.Generator):
        self.file = (folder / location).open("wb")
        self.location = location
        self.rng = rng
        self.initializers: list[TensorProto] = []

    def tensor(self, name: str, array: np.ndarray) -> str:
        array = np.ascontiguousarray(array, dtype=np.float32)
        offset = self.file.tell()
        self.file.write(array.tobytes())
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape)
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.location), ("offset", offset), ("length", array.nbytes)):
            t.external_data.add(key=key, value=str(value))
        self.initializers.append(t)
        return name

    def normal(self, name: str, shape, std: float = 0.02) -> str:
        return self.tensor(name, self.rng.standard_normal(shape, dtype=np.float32) * std)

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(onnx.numpy_helper.from_array(value, name))
        return name


def build(spec: GPT, folder: Path, seed: int = 0) -> Path:
    """Write `folder/<name>.onnx` and its weights `<name>.onnx.data`; returns the model's path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{spec.name}.onnx"
    w = _Writer(folder, f"{spec.name}.onnx.data", np.random.default_rng(seed))
    d, h, dh = spec.d, spec.heads, spec.d // spec.heads
    nodes = []

    def node(op, inputs, name, **attrs):
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    ones, zeros = np.ones(d, np.float32), np.zeros(d, np.float32)
    w.const("heads_shape", np.array([0, 0, h, dh], np.int64))
    w.const("model_shape", np.array([0, 0, d], np.int64))
    w.const("scale", np.array(1 / math.sqrt(dh), np.float32))
    w.const("half", np.array(0.5, np.float32))
    w.const("one", np.array(1.0, np.float32))
    w.const("sqrt2", np.array(math.sqrt(2), np.float32))
    w.const("neg", np.array(-1e4, np.float32))
    w.const("axis1", np.array([1], np.int64))

    tokens = node("Gather", [w.normal("wte", (spec.vocab, d)), "input_ids"], "tok_emb")
    seq = node("Shape", ["input_ids"], "shape_ids", start=1, end=2)
    steps = node(
        "Range",
        [
            node("Constant", [], "zero", value_int=0),
            node("Squeeze", [seq], "seq_len"),
            node("Constant", [], "step", value_int=1),
        ],
        "positions",
    )
    pos = node("Gather", [w.normal("wpe", (spec.positions, d), 0.01), steps], "pos_emb")
    x = node("Add", [tokens, pos], "embed")
    # causal mask: -1e4 above the diagonal, built from the positions (no table of T×T in the file)
    rows = node("Unsqueeze", [steps, "axis1"], "mask_rows")
    future = node("Greater", [steps, rows], "mask_future")
    mask = node("Where", [future, "neg", node("Constant", [], "mask_zero", value_float=0.0)], "mask")
    resid_std = 0.02 / math.sqrt(2 * spec.layers)

    def layer_norm(x, prefix):
        g, b = w.tensor(f"{prefix}.g", ones), w.tensor(f"{prefix}.b", zeros)
        return node("LayerNormalization", [x, g, b], f"{prefix}.out", axis=-1, epsilon=1e-5)

    def linear(x, prefix, n_in, n_out, std=0.02):
        y = node("MatMul", [x, w.normal(f"{prefix}.w", (n_in, n_out), std)], f"{prefix}.mm")
        return node("Add", [y, w.tensor(f"{prefix}.bias", np.zeros(n_out, np.float32))], f"{prefix}.out")

    def heads(x, name):
        return node("Transpose", [node("Reshape", [x, "heads_shape"], f"{name}.r")], f"{name}.t", perm=[0, 2, 1, 3])

    for i in range(spec.layers):
        p = f"h{i}"
        qkv = linear(layer_norm(x, f"{p}.ln1"), f"{p}.qkv", d, 3 * d)
        nodes.append(
            helper.make_node("Split", [qkv], [f"{p}.q", f"{p}.k", f"{p}.v"], name=f"{p}.split", axis=-1, num_outputs=3)
        )
        q, k, v = (heads(f"{p}.{n}", f"{p}.{n}h") for n in "qkv")
        kt = node("Transpose", [k], f"{p}.kt", perm=[0, 1, 3, 2])
        scores = node(
            "Add", [node("Mul", [node("MatMul", [q, kt], f"{p}.qk"), "scale"], f"{p}.qks"), mask], f"{p}.masked"
        )
        attn = node("MatMul", [node("Softmax", [scores], f"{p}.p", axis=-1), v], f"{p}.av")
        merged = node(
            "Reshape", [node("Transpose", [attn], f"{p}.avt", perm=[0, 2, 1, 3]), "model_shape"], f"{p}.merge"
        )
        x = node("Add", [x, linear(merged, f"{p}.proj", d, d, resid_std)], f"{p}.res1")
        hidden = linear(layer_norm(x, f"{p}.ln2"), f"{p}.fc", d, 4 * d)
        erf = node("Erf", [node("Div", [hidden, "sqrt2"], f"{p}.gs")], f"{p}.erf")
        gelu = node(
            "Mul", [node("Mul", [hidden, "half"], f"{p}.gh"), node("Add", [erf, "one"], f"{p}.g1")], f"{p}.gelu"
        )
        x = node("Add", [x, linear(gelu, f"{p}.fc2", 4 * d, d, resid_std)], f"{p}.res2")
    logits = node("MatMul", [layer_norm(x, "lnf"), w.normal("lm_head", (d, spec.vocab))], "logits")
    w.file.close()

    graph = helper.make_graph(
        nodes,
        spec.name,
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", "seq", spec.vocab])],
        w.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="gpt_models.py")
    model.ir_version = 9
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path), full_check=True)
    return path


def calibration(spec: GPT, path: Path, samples: int, seq: int, seed: int = 1) -> Path:
    """`samples` random token sequences of length `seq` (the model's only input), as onnxtq reads them."""
    ids = np.random.default_rng(seed).integers(0, spec.vocab, size=(samples, seq), dtype=np.int64)
    np.savez(path, input_ids=ids)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--calib", type=int, default=32, help="calibration sequences")
    parser.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    args = parser.parse_args(argv)
    for size in args.sizes:
        spec = SIZES[size]
        path = build(spec, args.out)
        calibration(spec, args.out / f"{spec.name}_calib.npz", args.calib, args.seq)
        print(f"{path}: {spec.params / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
