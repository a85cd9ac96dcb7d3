"""Calibration sources stream exactly what np.load would give, and bad data fails clearly."""

import numpy as np
import pytest
from builders import conv_model
from PIL import Image

from onnxtq.calibration.data import (
    ImageFolderSource,
    ImagePreprocessing,
    NpzSource,
    ReaderSource,
    model_inputs,
    open_source,
)
from onnxtq.errors import DataError


def _collect(source, batch):
    parts = [(n, f["x"]) for n, f in source.batches(batch)]
    return sum(n for n, _ in parts), np.concatenate([a for _, a in parts])


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streams_in_batches(tmp_path, rng, compressed):
    x = rng.standard_normal((11, 4, 10, 10)).astype(np.float32)
    path = tmp_path / "c.npz"
    (np.savez_compressed if compressed else np.savez)(path, x=x, label=np.arange(11))
    source = NpzSource(path, model_inputs(conv_model()))
    assert source.num_samples == 11
    n, got = _collect(source, 4)
    assert n == 11 and np.array_equal(got, x)
    assert max(f["x"].shape[0] for _, f in source.batches(4)) == 4
    source.close()


def test_npz_limit(tmp_path, rng):
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((9, 4, 10, 10)).astype(np.float32))
    source = NpzSource(tmp_path / "c.npz", model_inputs(conv_model()), limit=5)
    assert _collect(source, 2)[0] == 5


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"y": np.zeros((2, 4, 10, 10), np.float32)}, "no array for model input"),
        ({"x": np.zeros((2, 4, 10, 10), np.float64)}, "float64"),
        ({"x": np.zeros((2, 3, 10, 10), np.float32)}, "sample shape"),
        ({"x": np.zeros((2, 10), np.float32)}, "shape"),
    ],
)
def test_npz_mismatch_is_a_clear_error(tmp_path, arrays, message):
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(DataError, match=message):
        NpzSource(tmp_path / "c.npz", model_inputs(conv_model()))


def test_missing_data_has_no_fallback(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        open_source(tmp_path / "nothing.npz", conv_model())


def test_image_folder_preprocessing(tmp_path):
    img = np.zeros((20, 30, 3), np.uint8)
    img[..., 0] = 255
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(img).save(tmp_path / "b.jpg")
    (tmp_path / "notes.txt").write_text("ignored")
    prep = ImagePreprocessing(size=(10, 10), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    specs = model_inputs(conv_model(c_in=3))
    source = ImageFolderSource(tmp_path, specs, prep)
    n, x = _collect(source, 8)
    assert n == 2 and x.shape == (2, 3, 10, 10)
    np.testing.assert_allclose(x[0, 0], 1.0, atol=0.02)  # red channel (255/255 - .5)/.5
    np.testing.assert_allclose(x[0, 1], -1.0, atol=0.02)
    with pytest.raises(DataError, match="4-D"):
        ImageFolderSource(tmp_path, [], prep)


class Reader:
    """onnxruntime's CalibrationDataReader protocol."""

    def __init__(self, items):
        self.items = iter(items)

    def get_next(self):
        return next(self.items, None)


def test_reader_source_is_reiterable(rng):
    feeds = [{"x": rng.standard_normal((1, 4, 10, 10)).astype(np.float32)} for _ in range(3)]
    source = ReaderSource(Reader(feeds), model_inputs(conv_model()))
    for _ in range(2):
        n, got = _collect(source, 8)
        assert n == 3 and np.array_equal(got, np.concatenate([f["x"] for f in feeds]))
    source.close()
    with pytest.raises(DataError, match="no samples"):
        ReaderSource(Reader([]), model_inputs(conv_model()))
