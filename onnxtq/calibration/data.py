"""Calibration inputs, streamed: an `.npz`, a folder of images, or a `get_next()` reader.

Every source yields feeds `{input_name: array}` whose first axis is the batch, a few
samples at a time, so memory stays bounded whatever the data set size. There is no
random-data fallback: no data is an error. Every batch is checked as it streams: a NaN or Inf
in a float input is bad data (one such pixel turns bias corrections, and so the whole model, NaN).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from onnxtq.errors import DataError
from onnxtq.finite import first_nonfinite

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass(frozen=True)
class InputSpec:
    name: str
    shape: tuple  # ints, or None/str for dynamic dims
    dtype: np.dtype

    @property
    def batched(self) -> bool:
        return bool(self.shape) and not (isinstance(self.shape[0], int) and self.shape[0] > 0)


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a feed must provide (initializers listed as inputs excluded)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dims, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    return specs


def check_finite(
    arrays: dict[str, np.ndarray],
    first_sample: int,
    subject: str,
    hint: str = "remove or repair those samples; onnxtq computes no statistic from NaN or Inf",
) -> None:
    """DataError naming the array (after `subject`), the count and the first place of any NaN/Inf in a batch
    whose first sample is number `first_sample` (axis 0 of each array indexes samples)."""
    found = first_nonfinite(arrays)
    if found:
        name, count, first = found
        raise DataError(
            f"{subject} '{name}' holds {count} NaN/Inf value(s) in one batch, the first in sample "
            f"{first_sample + first[0]} at index {first[1:]}",
            hint,
        )


class Source:
    """Base: `batches(n)` yields (samples, feed) with at most n samples per feed; re-iterable.

    Subclasses implement `_batches`; `batches` checks every float value as it streams."""

    description = ""
    num_samples = 0

    def batches(self, batch: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        seen = 0
        for n, feed in self._batches(batch):
            check_finite(feed, seen, f"calibration data ({self.description}): input")
            yield n, feed
            seen += n

    def _batches(self, batch: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        raise NotImplementedError

    def close(self) -> None:
        """Release temporary storage, if any."""


class _NpyMember:
    """Sequential reader of one array inside an .npz, row block by row block."""

    def __init__(self, zf: zipfile.ZipFile, key: str):
        self.zf, self.member = zf, f"{key}.npy"
        info = zf.getinfo(self.member)
        with _unreadable(self.member), zf.open(self.member) as f:
            self.shape, self.dtype, self.offset = self._header(f)
        need = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
        if need + self.offset > info.file_size:
            raise DataError(f"array '{key}' declares {self.shape} but the file holds {info.file_size} bytes")

    @staticmethod
    def _header(f):
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
        if dtype.hasobject:
            raise DataError("calibration arrays must be numeric (object arrays are never unpickled)")
        if fortran and len(shape) > 1:
            raise DataError("Fortran-ordered arrays cannot be streamed", "save them with np.ascontiguousarray")
        return tuple(shape), dtype, f.tell()

    def rows(self, count: int) -> Iterator[np.ndarray]:
        row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with _unreadable(self.member), self.zf.open(self.member) as f:
            f.read(self.offset)
            for start in range(0, self.shape[0], count):
                k = min(count, self.shape[0] - start)
                yield np.frombuffer(f.read(k * row_bytes), self.dtype).reshape(k, *self.shape[1:])


@contextlib.contextmanager
def _unreadable(member: str):
    """A damaged archive member (bad header, CRC, compression or length) is bad data, not a bug."""
    try:
        yield
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"cannot read '{member}' from the calibration file: {exc}", "write it again with numpy.savez"
        ) from exc


class NpzSource(Source):
    """An .npz keyed by input names; axis 0 indexes samples (the model's batch axis)."""

    def __init__(self, path: str | Path, specs: list[InputSpec], limit: int | None = None):
        self.path = Path(path)
        try:
            self.zf = zipfile.ZipFile(self.path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataError(
                f"cannot read calibration file '{path}': {exc}", "expected an .npz made by numpy.savez"
            ) from exc
        keys = {n[:-4] for n in self.zf.namelist() if n.endswith(".npy")}
        missing = [s.name for s in specs if s.name not in keys]
        if missing:
            raise DataError(
                f"'{path}' has no array for model input(s) {missing}",
                f"the .npz must be keyed by input names: {[s.name for s in specs]} (it has {sorted(keys)})",
            )
        self.members = {s.name: _NpyMember(self.zf, s.name) for s in specs}
        counts = {m.shape[0] if m.shape else 0 for m in self.members.values()}
        if len(counts) != 1:
            raise DataError(f"arrays in '{path}' disagree on the number of samples: {sorted(counts)}")
        self.specs = specs
        for s in specs:
            _check_layout(s, self.members[s.name].shape, self.members[s.name].dtype, str(path))
        total = counts.pop()
        self.num_samples = min(total, limit) if limit else total
        self.description = f"{self.path.name}: {self.num_samples} samples"

    def _batches(self, batch: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        stacked = all(s.batched and len(self.members[s.name].shape) == len(s.shape) for s in self.specs)
        step = batch if stacked else 1
        streams = {n: m.rows(step) for n, m in self.members.items()}
        done = 0
        while done < self.num_samples:
            feed = {n: next(it) for n, it in streams.items()}
            k = min(step, self.num_samples - done)
            feed = {n: _batch_axis(self._spec(n), a[:k]) for n, a in feed.items()}
            done += k
            yield k, feed

    def _spec(self, name: str) -> InputSpec:
        return next(s for s in self.specs if s.name == name)

    def close(self) -> None:
        self.zf.close()


def _batch_axis(spec: InputSpec, rows: np.ndarray) -> np.ndarray:
    """npz rows already carry the batch axis when ranks agree; else each row is one sample."""
    if rows.ndim == len(spec.shape):
        return np.ascontiguousarray(rows)
    return np.ascontiguousarray(rows[0])


def _check_layout(spec: InputSpec, shape: tuple, dtype: np.dtype, where: str) -> None:
    if dtype != spec.dtype:
        raise DataError(
            f"input '{spec.name}' in {where} is {dtype}, the model wants {spec.dtype}", "convert it before saving"
        )
    rank = len(spec.shape)
    if len(shape) == rank:
        sample = shape[1:]
        model = spec.shape[1:]
    elif len(shape) == rank + 1:
        sample, model = shape[1:], spec.shape
    else:
        raise DataError(f"input '{spec.name}' in {where} has shape {shape}; the model input is {list(spec.shape)}")
    for got, want in zip(sample, model):
        if isinstance(want, int) and want > 0 and got != want:
            raise DataError(f"input '{spec.name}' in {where} has sample shape {sample}; the model needs {list(model)}")


@dataclass(frozen=True)
class ImagePreprocessing:
    """How images become a float NCHW input: resize, scale, then (x − mean)/std."""

    size: tuple[int, int] | None = None  # (H, W); None = the model's static size
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    bgr: bool = False

    def describe(self) -> str:
        order = "BGR" if self.bgr else "RGB"
        return f"resize to {self.size}, {order}, x*{self.scale:g}, mean {list(self.mean)}, std {list(self.std)}"


class ImageFolderSource(Source):
    """Images from a folder (sorted by name) for a model with one NCHW image input."""

    def __init__(self, folder: str | Path, specs: list[InputSpec], prep: ImagePreprocessing, limit: int | None = None):
        if len(specs) != 1 or len(specs[0].shape) != 4:
            raise DataError("an image folder can only feed a model with one 4-D (NCHW) input", "use an .npz instead")
        self.spec = specs[0]
        self.files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
        if not self.files:
            raise DataError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in '{folder}'")
        size = prep.size or tuple(self.spec.shape[2:])
        if not all(isinstance(s, int) and s > 0 for s in size):
            raise DataError("the model's input size is dynamic", "give --image-size H,W")
        self.prep = ImagePreprocessing(tuple(size), prep.scale, prep.mean, prep.std, prep.bgr)
        self.num_samples = len(self.files)
        self.description = f"{folder}: {self.num_samples} images, {self.prep.describe()}"

    def _load(self, path: Path) -> np.ndarray:
        from PIL import Image

        h, w = self.prep.size
        try:
            img = Image.open(path).convert("RGB").resize((w, h), Image.BILINEAR)
        except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
            raise DataError(f"cannot read image '{path}': {exc}", "remove it from the folder") from exc
        x = np.asarray(img, dtype=np.float32) * self.prep.scale
        if self.prep.bgr:
            x = x[..., ::-1]
        x = (x - np.float32(self.prep.mean)) / np.float32(self.prep.std)
        return x.transpose(2, 0, 1).astype(self.spec.dtype)

    def _batches(self, batch: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        step = batch if self.spec.batched else 1
        for i in range(0, len(self.files), step):
            chunk = self.files[i : i + step]
            yield len(chunk), {self.spec.name: np.stack([self._load(p) for p in chunk])}


class ReaderSource(Source):
    """Any object with onnxruntime's `CalibrationDataReader.get_next()`; spooled to disk once."""

    def __init__(self, reader, specs: list[InputSpec], limit: int | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="onnxtq-calib-"))
        names = [s.name for s in specs]
        count = 0
        while limit is None or count < limit:
            feed = reader.get_next()
            if feed is None:
                break
            missing = [n for n in names if n not in feed]
            if missing:
                self.close()
                raise DataError(f"reader sample {count} lacks input(s) {missing}", f"the model's inputs are {names}")
            np.savez(self.dir / f"{count:08d}.npz", **{n: np.asarray(feed[n]) for n in names})
            count += 1
        if not count:
            self.close()
            raise DataError("the calibration reader returned no samples")
        self.num_samples = count
        self.description = f"{type(reader).__name__}: {count} samples"

    def _batches(self, batch: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        for i in range(self.num_samples):
            with np.load(self.dir / f"{i:08d}.npz") as z:
                yield 1, {k: z[k] for k in z.files}

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class Subset(Source):
    """Every `stride`-th sample of another source (from `offset`), or all the others: the split a target run
    makes into fitting and held-out inputs. Interleaved, because files are often ordered (crops photo by
    photo): the last quarter would hold out a few photos, not a sample of them."""

    def __init__(self, source: Source, stride: int, offset: int, keep: bool, role: str):
        self.source, self.stride, self.offset, self.keep = source, stride, offset, keep
        chosen = len(range(offset, source.num_samples, stride))
        self.num_samples = chosen if keep else source.num_samples - chosen
        self.description = f"{source.description}, {self.num_samples} {role} samples"

    def _chosen(self, index: np.ndarray) -> np.ndarray:
        hit = (index % self.stride) == self.offset
        return hit if self.keep else ~hit

    def _batches(self, batch: int) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        seen = 0
        for n, feed in self.source._batches(batch):
            mask = self._chosen(np.arange(seen, seen + n))
            seen += n
            if n == 1 and mask[0]:
                yield 1, feed  # one sample as the model takes it: its inputs need not have the batch on axis 0
            elif mask.any():
                yield int(mask.sum()), {k: v[mask] for k, v in feed.items()}


#: A target run holds out one calibration input in HOLDOUT_STRIDE (at most HOLDOUT_MAX of them).
HOLDOUT_STRIDE, HOLDOUT_MAX, HOLDOUT_MIN_SAMPLES = 4, 128, 8


def split_holdout(source: Source) -> tuple[Source, Source]:
    """(fitting, held-out) inputs: every fourth input (at most 128) is held out, never calibrated on."""
    n = source.num_samples
    if n < HOLDOUT_MIN_SAMPLES:
        raise DataError(
            f"a target run needs at least {HOLDOUT_MIN_SAMPLES} calibration inputs, {source.description} has {n}",
            "give more calibration inputs: a quarter of them is held out to measure the result on",
        )
    stride = max(HOLDOUT_STRIDE, -(-n // HOLDOUT_MAX))
    offset = stride - 1
    return Subset(source, stride, offset, False, "fitting"), Subset(source, stride, offset, True, "held-out")


def open_source(
    data, model: onnx.ModelProto, limit: int | None = None, prep: ImagePreprocessing | None = None
) -> Source:
    """Pick the source for `data`: a Source, a reader object, an .npz path or an image folder."""
    if isinstance(data, Source):
        return data
    specs = model_inputs(model)
    if hasattr(data, "get_next"):
        return ReaderSource(data, specs, limit)
    path = Path(data)
    if path.is_dir():
        return ImageFolderSource(path, specs, prep or ImagePreprocessing(), limit)
    if path.is_file():
        return NpzSource(path, specs, limit)
    raise DataError(
        f"calibration data '{data}' does not exist", "give an .npz keyed by input names or a folder of images"
    )
