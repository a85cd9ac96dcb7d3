"""The file boundary: load untrusted ONNX safely, save atomically, open sessions.

A model file is untrusted input. Before any tensor is materialised we check that
external-data paths stay inside the model's folder, that every referenced byte
range exists, and that each tensor's stored size matches its declared shape.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import external_data_helper, numpy_helper

from onnxtq.errors import ModelError

#: Largest tensor we agree to materialise (elements); guards against forged dims.
MAX_TENSOR_ELEMENTS = 2**33
_TWO_GB = 2**31 - 1


def _dtype_size(data_type: int) -> float:
    """Bytes per element, fractional for packed sub-byte types."""
    np_type = onnx.helper.tensor_dtype_to_np_dtype(data_type)
    name = onnx.TensorProto.DataType.Name(data_type)
    if name.endswith("INT4") or name.startswith("FLOAT4"):
        return 0.5
    if name.endswith("INT2"):
        return 0.25
    return float(np.dtype(np_type).itemsize)


def tensor_nbytes(t: onnx.TensorProto) -> int:
    """Bytes the tensor occupies when stored packed (what the file costs)."""
    n = int(np.prod(t.dims, dtype=np.int64)) if len(t.dims) else 1
    return int(np.ceil(n * _dtype_size(t.data_type)))


def _check_dims(t: onnx.TensorProto, where: str) -> None:
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
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _iter_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _iter_tensors(g)


def _check_external(t: onnx.TensorProto, folder: Path) -> None:
    info = {e.key: e.value for e in t.external_data}
    location = info.get("location", "")
    target = (folder / location).resolve()
    if not location or os.path.isabs(location) or folder.resolve() not in target.parents:
        raise ModelError(
            f"tensor '{t.name}' points at external data '{location}' outside the model's folder",
            "external data must live beside the model; refusing to read it",
        )
    if not target.is_file():
        raise ModelError(f"external data file '{location}' of tensor '{t.name}' is missing")
    offset, length = int(info.get("offset", 0)), info.get("length")
    expected = tensor_nbytes(t)
    if length is not None and int(length) != expected:
        raise ModelError(f"tensor '{t.name}': external length {length} != {expected} bytes for its shape")
    if offset + expected > target.stat().st_size:
        raise ModelError(f"tensor '{t.name}': external data runs past the end of '{location}'")


def _check_inline(t: onnx.TensorProto) -> None:
    if t.HasField("raw_data") and len(t.raw_data) != tensor_nbytes(t) and t.data_type != onnx.TensorProto.STRING:
        raise ModelError(
            f"tensor '{t.name}' holds {len(t.raw_data)} bytes but its shape {list(t.dims)} needs {tensor_nbytes(t)}"
        )


def load(path: str | os.PathLike) -> onnx.ModelProto:
    """Load a model with its external data after validating every tensor reference."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file '{path}' does not exist", "check the path")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelError(f"'{path}' is not a readable ONNX model: {exc}", "is it an .onnx file?") from exc
    if not model.graph.node:
        raise ModelError(f"'{path}' has an empty graph")
    for t in _iter_tensors(model.graph):
        _check_dims(t, str(path))
        if external_data_helper.uses_external_data(t):
            _check_external(t, path.parent)
        else:
            _check_inline(t)
    external_data_helper.load_external_data_for_model(model, str(path.parent))
    return model


def save_atomic(model: onnx.ModelProto, path: str | os.PathLike, *, refuse: Path | None = None) -> int:
    """Write `model` to `path` via a temporary file and rename; returns bytes written.

    `refuse` is the input model's path: writing over it is never allowed.
    """
    data = model.SerializeToString() if model.ByteSize() < _TWO_GB else None
    if data is None:
        raise ModelError("the compressed model exceeds 2 GB", "external-data output is not supported yet")
    write_atomic(data, path, refuse=refuse)
    return len(data)


def write_atomic(data: bytes, path: str | os.PathLike, *, refuse: str | os.PathLike | None = None) -> None:
    """Write bytes via a temporary file in the same folder and rename, so a reader never sees half a
    file; never over `refuse` (the input the output was made from)."""
    path = Path(path)
    if refuse is not None and (
        path.resolve() == Path(refuse).resolve() or (path.exists() and os.path.samefile(path, refuse))
    ):
        raise ModelError(
            f"output '{path}' is the input model", "choose another output path; onnxtq never overwrites its input"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


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
    model: onnx.ModelProto | bytes, threads: int = 0, exact: bool = True, fold_dequantize: bool = False
) -> ort.InferenceSession:
    """An onnxruntime CPU session over an in-memory model (nothing written to disk)."""
    data = model if isinstance(model, bytes) else model.SerializeToString()
    options = session_options(threads, exact, fold_dequantize)
    try:
        return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelError(f"onnxruntime cannot load the model: {exc}") from exc


def initializer_array(t: onnx.TensorProto) -> np.ndarray:
    """numpy view of an initializer (float tensors as float32 or float64)."""
    return numpy_helper.to_array(t)
