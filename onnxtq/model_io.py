"""The file boundary: load untrusted ONNX safely, save atomically, open sessions.

A model file is untrusted input. Before any tensor is materialised we check that
external-data paths stay inside the model's folder, that every referenced byte
range exists, and that each tensor's stored size matches its declared shape.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, numpy_helper
from onnx.external_data_helper import uses_external_data

from onnxtq import lowering
from onnxtq.errors import ModelError, UsageError
from onnxtq.graph import Graph, copy_fields, data_folder, light_copy, scratch

#: Largest tensor we agree to materialise (elements); guards against forged dims.
MAX_TENSOR_ELEMENTS = 2**33
_TWO_GB = 2**31 - 1

#: Models larger than this reach onnxruntime through a temporary folder instead of as bytes (`session`).
SESSION_FROM_FILE_BYTES = 2**29


def _dtype_size(data_type: int) -> float:
    """Bytes per element, fractional for packed sub-byte types."""
    if data_type not in onnx.TensorProto.DataType.values() or data_type == onnx.TensorProto.UNDEFINED:
        raise ModelError(f"unknown tensor element type {data_type}", "the file is corrupt or from a newer ONNX")
    np_type = onnx.helper.tensor_dtype_to_np_dtype(data_type)
    name = onnx.TensorProto.DataType.Name(data_type)
    if name.endswith("INT4") or name.startswith("FLOAT4"):
        return 0.5
    if name.endswith("INT2"):
        return 0.25
    return float(np.dtype(np_type).itemsize)


def tensor_elements(t: onnx.TensorProto) -> int:
    """How many values the tensor's shape holds (one for a scalar), counted in int64: dims come from the file."""
    return int(np.prod(t.dims, dtype=np.int64))


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes the tensor occupies when stored packed (what the file costs)."""
    return int(np.ceil(tensor_elements(t) * _dtype_size(t.data_type)))


def _check_header(t: onnx.TensorProto, where: str) -> None:
    """A known element type and a shape that is neither negative nor forged huge."""
    _dtype_size(t.data_type)
    if any(d < 0 for d in t.dims):
        raise ModelError(f"tensor '{t.name}' in {where} has a negative dimension {list(t.dims)}")
    n = 1
    for d in t.dims:
        n *= d
    if n > MAX_TENSOR_ELEMENTS:
        raise ModelError(f"tensor '{t.name}' in {where} declares {n} elements", "the file is corrupt or forged")


def _iter_tensors(graph: onnx.GraphProto):
    """Every TensorProto in the graph and its subgraphs (initializers and attributes)."""
    yield from graph.initializer
    yield from _nested_tensors(graph)


def _nested_tensors(graph: onnx.GraphProto):
    """The TensorProtos of the graph's node attributes and subgraphs: all but its own initializers."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_tensors(g)


def _count(info: dict[str, str], key: str, t: onnx.TensorProto) -> int | None:
    """A non-negative integer field of a tensor's external-data entry (offset, length), or None if absent."""
    if key not in info:
        return None
    text = info[key]
    if not text.isdigit():
        raise ModelError(f"tensor '{t.name}': external-data {key} '{text}' is not a non-negative integer")
    return int(text)


def _check_external(t: onnx.TensorProto, folder: Path) -> None:
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    if not location:
        raise ModelError(f"tensor '{t.name}' is marked external but names no location", "the file is corrupt")
    target = (folder / location).resolve()
    if os.path.isabs(location) or folder.resolve() not in target.parents:
        raise ModelError(
            f"tensor '{t.name}' points at external data '{location}' outside the model's folder",
            "external data must live beside the model; refusing to read it",
        )
    if not (folder / location).is_file():  # as the OS opens it: 'sub/../w' needs 'sub', which resolve() does not
        raise ModelError(f"external data file '{location}' of tensor '{t.name}' is missing")
    offset, length = _count(info, "offset", t) or 0, _count(info, "length", t)
    expected = tensor_nbytes(t)
    if length is not None and length != expected:
        raise ModelError(f"tensor '{t.name}': external length {length} != {expected} bytes for its shape")
    if offset + expected > target.stat().st_size:
        raise ModelError(f"tensor '{t.name}': external data runs past the end of '{location}'")


#: Values per entry of a typed data field where it is not one: packed sub-byte codes, complex pairs.
_PER_ENTRY = {
    onnx.TensorProto.INT4: 2,
    onnx.TensorProto.UINT4: 2,
    onnx.TensorProto.FLOAT4E2M1: 2,
    onnx.TensorProto.INT2: 4,
    onnx.TensorProto.UINT2: 4,
    onnx.TensorProto.COMPLEX64: 0.5,
    onnx.TensorProto.COMPLEX128: 0.5,
}


def _check_inline(t: onnx.TensorProto) -> None:
    """The data a tensor holds in the file is exactly what its type and shape need."""
    if t.HasField("segment"):
        raise ModelError(f"tensor '{t.name}' is segmented", "segmented tensors are not supported")
    n = tensor_elements(t)
    if t.data_type == onnx.TensorProto.STRING:
        held, need, unit = len(t.string_data), n, "strings"
    elif t.HasField("raw_data"):
        held, need, unit = len(t.raw_data), tensor_nbytes(t), "bytes"
    else:
        field = onnx.helper.tensor_dtype_to_field(t.data_type)
        held, need, unit = len(getattr(t, field)), int(np.ceil(n / _PER_ENTRY.get(t.data_type, 1))), f"{field} values"
    if held != need:
        raise ModelError(f"tensor '{t.name}' holds {held} {unit} but its shape {list(t.dims)} needs {need}")


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model with its external data after validating every tensor reference."""
    return load_with_files(path)[0]


def load_with_files(path: str | os.PathLike, lazy: bool = False) -> tuple[onnx.ModelProto, list[Path]]:
    """`load`, and the external data files the model was read from besides its own.

    `lazy` leaves external data on disk (checked, not read): the run then reads it from the model's folder
    (`graph.external_data_from`), a tensor at a time, memory-mapped."""
    path = Path(path)
    if path.is_dir():
        raise ModelError(f"'{path}' is a folder, not a model file", "give the path of the .onnx file")
    if not path.is_file():
        raise ModelError(f"model file '{path}' does not exist", "check the path")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelError(f"'{path}' is not a readable ONNX model: {exc}", "is it an .onnx file?") from exc
    if not model.graph.node:
        raise ModelError(f"'{path}' has an empty graph")
    files = set()
    for t in _iter_tensors(model.graph):
        _check_header(t, str(path))
        if uses_external_data(t):
            _check_external(t, path.parent)
            files.add((path.parent / next(e.value for e in t.external_data if e.key == "location")).resolve())
        else:
            _check_inline(t)
    if lazy:
        return model, sorted(files)
    try:
        external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:  # what the checks above cannot foresee (e.g. a file that vanished)
        raise ModelError(f"cannot read the external data of '{path}': {exc}") from exc
    return model, sorted(files)


def external_locations(model: onnx.ModelProto) -> set[str]:
    """The external-data files (locations) the model's tensors still point at."""
    return {
        e.value
        for t in _iter_tensors(model.graph)
        if uses_external_data(t)
        for e in t.external_data
        if e.key == "location"
    }


def _input_folder() -> Path:
    """The folder this run's external data is in (`graph.external_data_from`)."""
    folder = data_folder()
    if folder is None:
        raise ModelError("a tensor points at external data but no model folder is known")
    return folder


def _external_file(location: str) -> Path:
    """Where this run's external data `location` is: its scratch file (graph.Scratch) or the input's folder."""
    own = scratch()
    if own is not None and location == own.location:
        return own.path
    return _input_folder() / location


def made_by_run(t: onnx.TensorProto) -> bool:
    """Whether `t` is held in external data this run wrote (its scratch file), not the input's."""
    own = scratch()
    location = next((e.value for e in t.external_data if e.key == "location"), None)
    return own is not None and uses_external_data(t) and location == own.location


def _external_bytes(t: onnx.TensorProto) -> bytes:
    """The bytes an external tensor keeps on disk (its range was checked when the model was loaded)."""
    info = {e.key: e.value for e in t.external_data}
    with open(_external_file(info["location"]), "rb") as f:
        f.seek(int(info.get("offset", 0)))
        return f.read(int(info["length"]) if "length" in info else tensor_nbytes(t))


def inline_size(model: onnx.ModelProto) -> int:
    """Bytes of the model as one file, its external tensors read in (about: a few bytes of framing each)."""
    external = [t for t in _iter_tensors(model.graph) if uses_external_data(t)]
    return model.ByteSize() + sum(tensor_nbytes(t) + 16 for t in external)


def serialize(model: onnx.ModelProto) -> bytes:
    """The model as one file's bytes, tensors kept in external data read in (protobuf caps a file at 2 GB)."""
    if inline_size(model) >= _TWO_GB:
        raise ModelError("the compressed model exceeds 2 GB as one file", "write it with --external-data")
    return _read_in(model).SerializeToString() if external_locations(model) else model.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(number: int, length: int) -> bytes:
    """The key and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(length)


def _around(message, number: int) -> tuple[bytes, bytes]:
    """A message's bytes before and after its field `number` (protobuf writes fields in number order)."""
    head, tail = type(message)(), type(message)()
    for f, _ in message.ListFields():
        if f.number != number:
            copy_fields(head if f.number < number else tail, message, only={f.name})
    return head.SerializeToString(), tail.SerializeToString()


_GRAPH = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


def _initializer_sizes(model: onnx.ModelProto) -> list[int]:
    """Each top-level initializer's serialized bytes with its external data read in, counted without reading it."""
    sizes = []
    for t in model.graph.initializer:
        if uses_external_data(t):
            n = tensor_nbytes(t)
            sizes.append(_inline(t, b"").ByteSize() - len(_tag(_RAW, 0)) + len(_tag(_RAW, n)) + n)
        else:
            sizes.append(t.ByteSize())
    return sizes


def _whole_frame(model: onnx.ModelProto, sizes: list[int]) -> tuple[bytes, bytes]:
    """The one-file form's bytes before the initializers and after them."""
    graph_head, graph_tail = _around(model.graph, _INITIALIZER)
    graph_bytes = len(graph_head) + len(graph_tail) + sum(len(_tag(_INITIALIZER, n)) + n for n in sizes)
    model_head, model_tail = _around(model, _GRAPH)
    return model_head + _tag(_GRAPH, graph_bytes) + graph_head, graph_tail + model_tail


def whole_size(model: onnx.ModelProto) -> int:
    """`len(serialize(model))` without reading the external data in: a big model's size, counted."""
    if not external_locations(model):
        return model.ByteSize()
    model = _bodies_read_in(model)
    sizes = _initializer_sizes(model)
    return _whole_length(*_whole_frame(model, sizes), sizes)


def _bodies_read_in(model: onnx.ModelProto) -> onnx.ModelProto:
    """`model` with the external tensors outside its main graph's initializers read in (in If/Loop bodies or
    Constant attributes; small ones, as `graph.hoist_body_weights` lifts the weights): the one-file form is
    framed around the main graph's initializers only, and would leave those pointing at the input's data."""
    if not any(uses_external_data(t) for t in _nested_tensors(model.graph)):
        return model
    return _read_in(model, tensors=_nested_tensors)


def _whole_length(head: bytes, tail: bytes, sizes: list[int]) -> int:
    return len(head) + sum(len(_tag(_INITIALIZER, n)) + n for n in sizes) + len(tail)


def write_whole(model: onnx.ModelProto, f) -> int:
    """Write `model` as one file to `f`, its external tensors read in one at a time: the bytes `serialize`
    gives, without the whole model (nor its bytes) in memory at once. Returns the bytes written."""
    if inline_size(model) >= _TWO_GB:
        raise ModelError("the compressed model exceeds 2 GB as one file", "write it with --external-data")
    model = _bodies_read_in(model)
    sizes = _initializer_sizes(model)
    head, tail = _whole_frame(model, sizes)
    f.write(head)
    for t, n in zip(model.graph.initializer, sizes):
        data = (_inline(t, _external_bytes(t)) if uses_external_data(t) else t).SerializeToString()
        if len(data) != n:
            raise AssertionError(f"tensor '{t.name}': {len(data)} bytes written, {n} counted")
        f.write(_tag(_INITIALIZER, n) + data)
        del data
    f.write(tail)
    return _whole_length(head, tail, sizes)


def _read_in(model: onnx.ModelProto, keep: str | None = None, tensors=_iter_tensors) -> onnx.ModelProto:
    """A copy of `model` holding the data of its external tensors (those `tensors(graph)` yields), but those in
    the file `keep`."""
    whole = onnx.ModelProto()
    whole.CopyFrom(model)  # cheap: the weights still on disk are headers here
    for t in tensors(whole.graph):
        location = next((e.value for e in t.external_data if e.key == "location"), None)
        if uses_external_data(t) and location != keep:
            t.CopyFrom(_inline(t, _external_bytes(t)))
    return whole


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike, *, refuse: Path | None = None) -> int:
    """Write `model` to `path` via a temporary file and rename; returns bytes written.

    `refuse` is the input model's path: writing over it is never allowed.
    """
    staged = stage(model, path, refuse=refuse, external_data=False)
    staged.commit()
    return staged.size


def write_atomic(data: bytes, path: str | os.PathLike, *, refuse: str | os.PathLike | None = None) -> None:
    """Write bytes via a temporary file in the same folder and rename, so a reader never sees half a
    file; never over `refuse` (the input the output was made from)."""
    path = Path(path)
    _refuse_input(path, refuse)
    _Staged([(_written(path, lambda f: f.write(data)), path)], len(data)).commit()


def _refuse_input(path: Path, refuse: str | os.PathLike | None) -> None:
    if refuse is not None and (
        path.resolve() == Path(refuse).resolve() or (path.exists() and os.path.samefile(path, refuse))
    ):
        raise ModelError(
            f"output '{path}' is the input model", "choose another output path; onnxtq never overwrites its input"
        )


def _written(path: Path, write) -> str:
    """A temporary file beside `path` holding what `write(file)` writes; its name."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise UsageError(f"cannot write '{path}': {exc.strerror or exc}", "choose a folder you can write to") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
    except OSError as exc:  # disk full, or the target is a folder: nothing is left behind
        os.unlink(tmp)
        raise UsageError(f"cannot write '{path}': {exc.strerror or exc}", "check the path and the free space") from exc
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


class _Staged:
    """An output written to temporary files beside its final paths, not yet in place: its `size` is known
    before the caller keeps it (`commit`: renamed, the model's own file last) or drops it (`discard`)."""

    def __init__(self, moves: list[tuple[str, Path]], size: int):
        self.moves, self.size = moves, size

    def commit(self) -> None:
        try:
            for tmp, path in self.moves:
                os.replace(tmp, path)
        except OSError as exc:
            self.discard()
            raise UsageError(f"cannot write '{path}': {exc.strerror or exc}", "check the path") from exc

    def discard(self) -> None:
        for tmp, _ in self.moves:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


#: Tensors of an external-data output at least this large start at a multiple of `_ALIGN` in its data
#: file, so a runtime can memory-map them.
_ALIGNED_FROM, _ALIGN = 2**20, 4096


def data_file(path: str | os.PathLike) -> Path:
    """The external-data file an output at `path` gets: beside it, its name and `.data`."""
    path = Path(path)
    return path.with_name(path.name + ".data")


def stage(
    model: onnx.ModelProto, path: str | os.PathLike, *, refuse=None, external_data: bool | None = None
) -> _Staged:
    """`model` written beside `path`, not yet in place: one file, or with `external_data` (by itself when one
    file would pass protobuf's 2 GB) the graph in `path` and every tensor over 4 kB in `data_file(path)`."""
    path = Path(path)
    _refuse_input(path, refuse)
    if external_data is None:
        external_data = inline_size(model) >= _TWO_GB
    if not external_data:
        size = []
        tmp = _written(path, lambda f: size.append(write_whole(model, f)))
        return _Staged([(tmp, path)], size[0])
    light, big = light_copy(model)
    whole = {t.name: t for t in model.graph.initializer if t.name in big}
    location = data_file(path).name

    def write_tensors(f) -> None:
        for header in light.graph.initializer:
            t = whole.get(header.name, header)  # a header of the light copy, or still in the input's data
            moved = t is not header or uses_external_data(header)
            if not moved or t.data_type == onnx.TensorProto.STRING:
                if t is not header:
                    header.CopyFrom(t)
                continue
            raw = _stored_bytes(t)
            del header.external_data[:]
            if len(raw) >= _ALIGNED_FROM and f.tell() % _ALIGN:
                f.write(bytes(_ALIGN - f.tell() % _ALIGN))
            header.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", f.tell()), ("length", len(raw))):
                header.external_data.add(key=key, value=str(value))
            f.write(raw)

    tensors = _written(data_file(path), write_tensors)
    try:
        graph = _read_in(light, keep=location).SerializeToString()  # small tensors and attributes stay here
    except BaseException:
        os.unlink(tensors)
        raise
    size = len(graph) + os.path.getsize(tensors)
    return _Staged([(tensors, data_file(path)), (_written(path, lambda f: f.write(graph)), path)], size)


def _stored_bytes(t: onnx.TensorProto) -> bytes:
    """A tensor's data as its raw bytes (little-endian, sub-byte types packed), wherever it is kept."""
    if uses_external_data(t):
        return _external_bytes(t)
    if t.HasField("raw_data"):
        return t.raw_data
    return numpy_helper.from_array(numpy_helper.to_array(t)).raw_data


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def session_options(threads: int = 0, exact: bool = True, fold_dequantize: bool = False) -> ort.SessionOptions:
    """Session options for evaluating compressed models.

    With default options ORT fuses DequantizeLinear→MatMul into MatMulNBits with
    accuracy_level 4, which quantises *activations* to int8 (~0.5% output error).
    `exact=True` pins accuracy_level 0 so the fused kernel computes in fp32 and the
    numbers we report are those of the weights alone. `fold_dequantize` has ORT turn constant
    DequantizeLinear weights into float tensors at load (same values, fp32 weights in RAM):
    without it CPU ORT dequantizes every weight on every run, 2.3x slower on MobileNetV2.
    """
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if exact:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if fold_dequantize:
        so.add_session_config_entry("session.disable_quant_qdq", "1")
    return so


def session(
    model: onnx.ModelProto | bytes | str | Path,
    threads: int = 0,
    exact: bool = True,
    fold_dequantize: bool = False,
    on_disk_at: str | None = None,
) -> ort.InferenceSession:
    """An onnxruntime CPU session over an in-memory model (a large one through a temporary folder), or a file.

    Weights the model still keeps in the input's external data onnxruntime reads from the input's folder
    itself, as from the file (one copy in memory, none of ours); `on_disk_at` is where `on_disk` has
    already written the model, if it has. A model holding codes its opset cannot (the portable target's,
    before they are lowered) runs as it will be written: lowered (onnxtq.lowering)."""
    if isinstance(model, onnx.ModelProto) and lowering.needs_lowering(model):
        graph = Graph(onnx.ModelProto.FromString(model.SerializeToString()))
        lowering.lower(graph)
        model = graph.proto()
    locations = external_locations(model) if isinstance(model, onnx.ModelProto) else set()
    options = session_options(threads, exact, fold_dequantize)
    given = []  # buffers onnxruntime was handed, kept as long as the session
    try:
        if isinstance(model, (str, Path)):
            sess = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
        elif _as_bytes(model, locations):
            own = scratch()
            if own is not None and own.location in locations:  # onnxruntime then wants every file in memory
                given = _map_files(options, {loc: _external_file(loc) for loc in locations})
            elif locations:  # as bytes, its external data read from the input's folder
                folder = str(_input_folder().resolve())
                options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
            data = model if isinstance(model, bytes) else model.SerializeToString()
            sess = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        else:  # through a folder; the input's data, in another one, then goes as mapped files
            with contextlib.ExitStack() as stack:
                path = on_disk_at or stack.enter_context(on_disk(model))
                if locations:
                    own = Path(path).parent / _weights_name(locations)
                    files = {loc: _external_file(loc) for loc in locations} | ({own.name: own} if own.is_file() else {})
                    given = _map_files(options, files)
                sess = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {exc}") from exc
    # onnxruntime's Python class keeps the serialized model to rebuild the session with fallback providers;
    # with the CPU provider only it never does, and that copy is one more model in memory per session.
    if getattr(sess, "_model_bytes", None) is not None:
        sess._model_bytes = None
    sess._onnxtq_mapped = given  # the mapped files live as long as the session that may read them
    return sess


def _map_files(options: ort.SessionOptions, files: dict[str, Path]) -> list[np.ndarray]:
    """Hand onnxruntime the external-data `files` (by location) as read-only memory maps; returns the maps,
    which must live as long as the session."""
    given = [_mapped(f) for f in files.values()]
    options.add_external_initializers_from_files_in_memory(list(files), given, [b.size for b in given])
    return given


def _mapped(path: Path) -> np.ndarray:
    """A read-only memory map of a whole file, as bytes."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return np.zeros(0, np.uint8)
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)


@contextlib.contextmanager
def on_disk(model: onnx.ModelProto) -> Iterator[str]:
    """The path of `model` written to a temporary folder (gone after the block), its large weights one by one
    into an external-data file: how a model too large to pass as bytes reaches onnxruntime and the checker
    (protobuf stops at 2 GB, and the bytes would be one more copy in memory). Weights still in the input's
    external data stay there: the folder holds an empty file of the same size in its place, which the checker
    (it only checks the file is there) accepts; `session` gives onnxruntime the real one."""
    light, big = light_copy(model)
    locations = external_locations(model)
    with tempfile.TemporaryDirectory(prefix="onnxtq-model-") as folder:
        for location in locations:
            stand_in = Path(folder, location)
            stand_in.parent.mkdir(parents=True, exist_ok=True)
            with open(stand_in, "wb") as f:
                f.truncate(_external_file(location).stat().st_size)  # sparse: no byte written
        weights = _weights_name(locations)
        with open(os.path.join(folder, weights), "wb") as data:
            whole = {t.name: t for t in model.graph.initializer if t.name in big}
            for header in light.graph.initializer:
                if header.name in whole and not whole[header.name].HasField("raw_data"):  # typed fields: inline
                    header.CopyFrom(whole[header.name])
                elif header.name in whole:
                    raw = whole[header.name].raw_data  # a copy of one weight at a time
                    header.data_location = onnx.TensorProto.EXTERNAL
                    for key, value in (("location", weights), ("offset", data.tell()), ("length", len(raw))):
                        header.external_data.add(key=key, value=str(value))
                    data.write(raw)
                    del raw
        path = os.path.join(folder, "model.onnx")
        with open(path, "wb") as f:
            f.write(light.SerializeToString())
        yield path


def _as_bytes(model: onnx.ModelProto | bytes, locations: set[str]) -> bool:
    """Whether onnxruntime gets the model as bytes: a small one, or one whose weights are mostly still in the
    input's external data (bytes up to 2 GB); else through a folder (`on_disk`)."""
    if isinstance(model, bytes):
        return True
    return model.ByteSize() < _TWO_GB if locations else not is_large(model)


def _weights_name(locations: set[str]) -> str:
    """The name of `on_disk`'s own weights file: one that none of the input's external-data files has."""
    name = "weights.bin"
    while name in locations:
        name = "_" + name
    return name


def is_large(model: onnx.ModelProto) -> bool:
    """Whether `model` goes to onnxruntime and the checker through a folder (`on_disk`) rather than as bytes."""
    return model.ByteSize() > SESSION_FROM_FILE_BYTES


def needs_folder(model: onnx.ModelProto) -> bool:
    """Whether the checker must see `model` as a file in a folder: a large one, or one whose weights are
    still in the input's external data (which it looks for beside the file)."""
    return is_large(model) or bool(external_locations(model))


def initializer_array(t: onnx.TensorProto) -> np.ndarray:
    """numpy view of an initializer (float tensors as float32 or float64), read from the input's external
    data if it is still there."""
    if uses_external_data(t):
        return numpy_helper.to_array(_inline(t, _external_bytes(t)))
    return numpy_helper.to_array(t)


def _inline(t: onnx.TensorProto, raw: bytes) -> onnx.TensorProto:
    """A copy of the external tensor `t` holding its data `raw` itself."""
    whole = onnx.TensorProto()
    whole.CopyFrom(t)
    del whole.external_data[:]
    whole.ClearField("data_location")  # unset, as in a tensor the file holds inline
    whole.raw_data = raw
    return whole
