"""Entropy-coded container (`.onnxtq`): the transport form of a deployable ONNX file.

Stock onnxruntime cannot decode entropy-coded weights, so the deployable file stores
codes in fixed-width INT2/INT4/INT8 containers. For storage and transport the
container codes every quantized initializer's symbols against their empirical
histogram and restores the deployable file **byte for byte**:

    file = MAGIC(8) | u32 header length | lzma(JSON header) | lzma(skeleton) | lzma(count tables) | codes

* A *stream* is one integer initializer (INT2…INT64) of at least `min_elements` values
  stored as canonical packed `raw_data`. Its symbols are the unpacked values; its
  count table is zigzag-varint(min) | varint(span) | varint(count) × span (the tables of
  all streams are LZMA2-compressed together: about half their size), and the coder (rANS
  by default, Huffman as in Choi et al.) rebuilds its model from those integer counts
  only, so encoder and decoder use the identical model.
* The *skeleton* is the input file with those `raw_data` payloads cut out (offsets in
  the header), so nothing is re-serialized: restoring is splicing the decoded bytes
  back, exact for any protobuf writer. Every size we report counts tables and headers.

The container is untrusted input: sizes are checked against the file and a bound
before anything is allocated, decoding runs in bounded chunks, and the restored
bytes must match the SHA-256 recorded at pack time. `pack` decodes its own output
before returning it and refuses if the input does not come back exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import lzma
import math
import os
import struct
from pathlib import Path

import constriction
import numpy as np
import onnx
from onnx import external_data_helper, helper, numpy_helper

from onnxtq.entropy import histogram_bits
from onnxtq.errors import ModelError, UsageError, VerificationError
from onnxtq.model_io import MAX_TENSOR_ELEMENTS, tensor_elements, tensor_nbytes, write_atomic
from onnxtq.paths import check_outputs

MAGIC = b"ONNXTQC\x01"  # last byte: format version
CODERS = ("rans", "huffman")
MAX_MODEL_BYTES = 2**31 - 1  # a single-file ONNX model cannot be larger (protobuf limit)
MAX_HEADER_BYTES = 64 * 2**20
MAX_SPAN = 2**16 + 1  # widest symbol range given a count table (int16 fits)
DEFAULT_MIN_ELEMENTS = 1024  # below this a count table costs about what coding saves
_CHUNK = 2**20  # symbols decoded per step; a multiple of 4 keeps packed 2/4-bit chunks byte-aligned
_STREAM_TYPES = {
    getattr(onnx.TensorProto, n)
    for n in ("INT2", "UINT2", "INT4", "UINT4", "INT8", "UINT8", "INT16", "UINT16", "INT32", "INT64")
}


class ContainerError(ModelError):
    """The container file is truncated, corrupt, forged, or of an unknown version."""

    default_hint = "the container is damaged or forged: pack the model again"


@dataclasses.dataclass
class StreamReport:
    """One entropy-coded initializer: what it costs and what its entropy allows."""

    name: str
    data_type: str
    symbols: int
    distinct: int
    entropy_bits: float  # n·H of the empirical histogram
    coded_bytes: int
    table_bytes: int  # before the tables are compressed together
    raw_bytes: int  # its size in the deployable file


@dataclasses.dataclass
class PackReport:
    """Sizes of a container against the deployable file and the streams' entropy."""

    coder: str
    model_bytes: int
    container_bytes: int
    header_bytes: int
    skeleton_bytes: int
    skeleton_raw_bytes: int
    tables_bytes: int  # all count tables, compressed together
    streams: list[StreamReport]
    kept: list[tuple[str, str]]  # integer initializers left in the skeleton, with the reason

    @property
    def entropy_bytes(self) -> float:
        return sum(s.entropy_bits for s in self.streams) / 8

    @property
    def coded_bytes(self) -> int:
        return sum(s.coded_bytes for s in self.streams)

    @property
    def stream_raw_bytes(self) -> int:
        return sum(s.raw_bytes for s in self.streams)

    def coded_over_entropy(self, tables: bool = False) -> float:
        """Coded bytes (optionally with their tables) over Σ n·H / 8; nan without streams."""
        coded = self.coded_bytes + (self.tables_bytes if tables else 0)
        return coded / self.entropy_bytes if self.entropy_bytes else float("nan")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["kept"] = [{"name": n, "reason": r} for n, r in self.kept]
        d.update(
            entropy_bytes=self.entropy_bytes,
            coded_bytes=self.coded_bytes,
            stream_raw_bytes=self.stream_raw_bytes,
            coded_over_entropy=self.coded_over_entropy(),
            coded_and_tables_over_entropy=self.coded_over_entropy(tables=True),
        )
        return d

    def table(self, rows: int = 12) -> str:
        """Short text summary: totals, then the largest streams."""
        lines = [
            f"coder {self.coder}: deployable {self.model_bytes:,d} B -> container {self.container_bytes:,d} B"
            f" ({self.container_bytes / self.model_bytes:.3f}x)",
            f"streams {len(self.streams)}: {self.stream_raw_bytes:,d} B packed, entropy {self.entropy_bytes:,.0f} B,"
            f" coded {self.coded_bytes:,d} B (x{self.coded_over_entropy():.4f} of entropy),"
            f" tables {sum(s.table_bytes for s in self.streams):,d} B -> lzma {self.tables_bytes:,d} B",
            f"skeleton {self.skeleton_raw_bytes:,d} B -> lzma {self.skeleton_bytes:,d} B;"
            f" header {self.header_bytes:,d} B",
            f"{'stream':<40} {'type':<6} {'symbols':>10} {'distinct':>8} {'entropy B':>10}"
            f" {'coded B':>9} {'table B':>7}",
        ]
        for s in sorted(self.streams, key=lambda s: -s.coded_bytes)[:rows]:
            lines.append(
                f"{s.name[-40:]:<40} {s.data_type:<6} {s.symbols:>10,d} {s.distinct:>8,d}"
                f" {s.entropy_bits / 8:>10,.0f} {s.coded_bytes:>9,d} {s.table_bytes:>7,d}"
            )
        if len(self.streams) > rows:
            lines.append(f"... and {len(self.streams) - rows} smaller streams")
        reasons: dict[str, int] = {}
        for _, reason in self.kept:
            reasons[reason] = reasons.get(reason, 0) + 1
        for reason, count in sorted(reasons.items()):
            lines.append(f"kept in skeleton: {count} integer initializer(s), {reason}")
        return "\n".join(lines)


# --- protobuf wire format: where each initializer's raw_data payload sits in the file --------


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("bad varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: bytes, start: int, end: int):
    """(field number, value start, value end) of each field of one message, in file order."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos, end)
        wire = key & 7
        if wire == 0:
            _, stop = _varint(buf, pos, end)
        elif wire == 1:
            stop = pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos, end)
            stop = pos + length
        elif wire == 5:
            stop = pos + 4
        else:
            raise ValueError(f"wire type {wire}")
        if stop > end:
            raise ValueError("field runs past its message")
        yield key >> 3, pos, stop
        pos = stop


def raw_data_spans(data: bytes) -> list[tuple[int, int] | None]:
    """Byte range of `raw_data` of each top-level graph initializer, in graph order.

    Cutting these ranges out (and splicing them back) never re-serializes the model, so
    the restored file is identical whatever wrote it. An entry is None where the tensor
    has no single raw_data field; the list is empty if the file's layout is unusual.
    """
    try:
        graphs = [(a, b) for f, a, b in _fields(data, 0, len(data)) if f == 7]  # ModelProto.graph
        if len(graphs) != 1:
            return []
        spans: list[tuple[int, int] | None] = []
        for f, a, b in _fields(data, *graphs[0]):
            if f == 5:  # GraphProto.initializer
                raw = [(x, y) for g, x, y in _fields(data, a, b) if g == 9]  # TensorProto.raw_data
                spans.append(raw[0] if len(raw) == 1 else None)
        return spans
    except ValueError:
        return []


# --- count tables and coders ------------------------------------------------------------------


def _put_varint(out: bytearray, value: int) -> None:
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)


def encode_table(minimum: int, counts: np.ndarray) -> bytes:
    """zigzag-varint(min) | varint(span) | varint(count) per symbol of the span."""
    out = bytearray()
    _put_varint(out, minimum * 2 if minimum >= 0 else -minimum * 2 - 1)
    _put_varint(out, len(counts))
    for c in counts.tolist():
        _put_varint(out, c)
    return bytes(out)


def decode_table(table: bytes, symbols: int) -> tuple[int, np.ndarray]:
    """Inverse of encode_table, checking the span bound and that the counts sum to `symbols`."""
    try:
        zz, pos = _varint(table, 0, len(table))
        span, pos = _varint(table, pos, len(table))
        if not 1 <= span <= MAX_SPAN:
            raise ValueError(f"symbol span {span}")
        counts = []
        for _ in range(span):
            c, pos = _varint(table, pos, len(table))
            counts.append(c)
    except ValueError as exc:
        raise ContainerError(f"corrupt count table ({exc})") from None
    if pos != len(table) or sum(counts) != symbols:
        raise ContainerError("corrupt count table (its counts do not add up to the tensor's size)")
    return (zz >> 1) if zz % 2 == 0 else -((zz + 1) >> 1), np.array(counts, dtype=np.int64)


def _rans_model(counts: np.ndarray):
    # Built from the integer counts alone (exact as float64), so the decoder's model is identical.
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def _encode(indices: np.ndarray, counts: np.ndarray, coder: str) -> bytes:
    """Entropy-code symbol indices 0..span-1 against their own histogram."""
    if len(counts) == 1:
        return b""  # one distinct value: the table says everything
    if coder == "rans":
        ans = constriction.stream.stack.AnsCoder()
        ans.encode_reverse(indices.astype(np.int32), _rans_model(counts))
        return ans.get_compressed().astype("<u4").tobytes()
    tree = constriction.symbol.huffman.EncoderHuffmanTree(counts.astype(np.float64))
    queue = constriction.symbol.QueueEncoder()
    for s in indices.tolist():
        queue.encode_symbol(s, tree)
    words, bits = queue.get_compressed_and_bitrate()
    return words.astype("<u4").tobytes()[: (bits + 7) // 8]  # bits fill words from the low end


def _decode_chunks(code: bytes, counts: np.ndarray, symbols: int, coder: str):
    """Yield the decoded symbol indices in chunks of at most _CHUNK (bounded memory)."""
    if len(counts) == 1:
        for start in range(0, symbols, _CHUNK):
            yield np.zeros(min(_CHUNK, symbols - start), dtype=np.int32)
        return
    words = np.frombuffer(code + b"\0" * (-len(code) % 4), dtype="<u4").astype(np.uint32)
    if coder == "rans":
        ans = constriction.stream.stack.AnsCoder(words)
        model = _rans_model(counts)
        for start in range(0, symbols, _CHUNK):
            yield ans.decode(model, min(_CHUNK, symbols - start))
        if not ans.is_empty():
            raise ContainerError("a coded stream holds more data than its symbols")
        return
    tree = constriction.symbol.huffman.DecoderHuffmanTree(counts.astype(np.float64))
    queue = constriction.symbol.QueueDecoder(words)
    for start in range(0, symbols, _CHUNK):
        yield np.array([queue.decode_symbol(tree) for _ in range(min(_CHUNK, symbols - start))], dtype=np.int32)


def _to_raw(values: np.ndarray, data_type: int) -> bytes:
    """Packed little-endian bytes of integer values, as onnx stores them in raw_data."""
    return numpy_helper.from_array(values.astype(helper.tensor_dtype_to_np_dtype(data_type))).raw_data


# --- pack ---------------------------------------------------------------------------------------


def _parse_model(data: bytes) -> onnx.ModelProto:
    if len(data) > MAX_MODEL_BYTES:
        raise ModelError(f"model of {len(data):,d} bytes exceeds the 2 GB single-file limit")
    try:
        model = onnx.load_from_string(data)
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelError(f"not a readable ONNX model: {exc}", "is it an .onnx file?") from exc
    if any(external_data_helper.uses_external_data(t) for t in model.graph.initializer):
        raise ModelError(
            "the model keeps tensors in external data files",
            "pack a self-contained model (onnx.save without save_as_external_data)",
        )
    return model


def _stream_symbols(t: onnx.TensorProto, min_elements: int) -> tuple[np.ndarray | None, str]:
    """The tensor's values as int64, or None and why it stays in the skeleton."""
    n = tensor_elements(t)
    if n < min_elements:
        return None, f"fewer than {min_elements} elements"
    if not t.raw_data or len(t.raw_data) != tensor_nbytes(t):
        return None, "values not stored as packed raw_data"
    values = numpy_helper.to_array(t).astype(np.int64).ravel()
    if int(values.max()) - int(values.min()) + 1 > MAX_SPAN:
        return None, f"symbol range wider than {MAX_SPAN}"
    if _to_raw(values, t.data_type) != t.raw_data:
        return None, "stored bytes not in canonical packed form"
    return values, ""


def _code_stream(t: onnx.TensorProto, values: np.ndarray, coder: str) -> tuple[bytes, bytes, StreamReport]:
    minimum = int(values.min())
    indices = values - minimum
    counts = np.bincount(indices, minlength=int(indices.max()) + 1)
    table, code = encode_table(minimum, counts), _encode(indices, counts, coder)
    report = StreamReport(
        name=t.name,
        data_type=onnx.TensorProto.DataType.Name(t.data_type),
        symbols=len(values),
        distinct=int((counts > 0).sum()),
        entropy_bits=histogram_bits(counts),
        coded_bytes=len(code),
        table_bytes=len(table),
        raw_bytes=len(t.raw_data),
    )
    return table, code, report


_LZMA2 = [{"id": lzma.FILTER_LZMA2, "preset": 9 | lzma.PRESET_EXTREME}]


def _lzma(data: bytes) -> bytes:
    """Raw LZMA2 (no .xz framing: ~60 bytes less per blob; the SHA-256 guards integrity)."""
    return lzma.compress(data, format=lzma.FORMAT_RAW, filters=_LZMA2)


def pack(data: bytes, coder: str = "rans", min_elements: int = DEFAULT_MIN_ELEMENTS) -> tuple[bytes, PackReport]:
    """Container bytes for a serialized ONNX model, and what each part costs.

    Decodes the result in memory and raises VerificationError unless it restores `data`
    byte for byte, so a container that cannot restore its input is never returned.
    """
    if coder not in CODERS:
        raise UsageError(f"unknown coder '{coder}'", f"choose one of {', '.join(CODERS)}")
    model = _parse_model(data)
    spans = raw_data_spans(data)
    if len(spans) != len(model.graph.initializer):
        spans = [None] * len(model.graph.initializer)  # unusual layout: keep everything in the skeleton
    streams, tables, codes, reports, kept = [], [], [], [], []
    for t, span in zip(model.graph.initializer, spans):
        if t.data_type not in _STREAM_TYPES:
            continue
        values, reason = _stream_symbols(t, min_elements) if span else (None, "values not stored as packed raw_data")
        if values is None:
            kept.append((t.name, reason))
            continue
        start, stop = span
        assert data[start:stop] == t.raw_data, "wire offsets disagree with the parsed model"
        table, code, report = _code_stream(t, values, coder)
        streams.append(
            {"name": t.name, "data_type": t.data_type, "dims": list(t.dims), "offset": start}
            | {"raw_bytes": stop - start, "table_bytes": len(table), "coded_bytes": len(code)}
        )
        tables.append(table)
        codes.append(code)
        reports.append(report)
    skeleton = _cut(data, [(s["offset"], s["raw_bytes"]) for s in streams])
    skeleton_z, tables_z = _lzma(skeleton), _lzma(b"".join(tables))
    header = {
        "coder": coder,
        "coder_library": f"constriction {_constriction_version()}",
        "model_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "skeleton": {"bytes": len(skeleton_z), "raw_bytes": len(skeleton)},
        "tables": {"bytes": len(tables_z), "raw_bytes": sum(map(len, tables))},
        "streams": streams,
    }
    header_z = _lzma(json.dumps(header, separators=(",", ":")).encode())
    container = b"".join([MAGIC, struct.pack("<I", len(header_z)), header_z, skeleton_z, tables_z, *codes])
    if unpack(container) != data:
        raise VerificationError("the container does not restore the model byte for byte; nothing written")
    report = PackReport(
        coder=coder,
        model_bytes=len(data),
        container_bytes=len(container),
        header_bytes=len(header_z) + len(MAGIC) + 4,
        skeleton_bytes=len(skeleton_z),
        skeleton_raw_bytes=len(skeleton),
        tables_bytes=len(tables_z),
        streams=reports,
        kept=kept,
    )
    return container, report


def _cut(data: bytes, holes: list[tuple[int, int]]) -> bytes:
    """`data` without the byte ranges (offset, length), which are in increasing order."""
    pieces, pos = [], 0
    for offset, length in holes:
        pieces.append(data[pos:offset])
        pos = offset + length
    pieces.append(data[pos:])
    return b"".join(pieces)


def _constriction_version() -> str:
    from importlib.metadata import version

    return version("constriction")


# --- unpack -------------------------------------------------------------------------------------


def _unlzma(blob: bytes, limit: int, what: str) -> bytes:
    """Decompress without ever producing more than `limit` bytes (no decompression bombs)."""
    decomp = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=_LZMA2)
    try:
        out = decomp.decompress(blob, max_length=limit + 1)
    except lzma.LZMAError as exc:
        raise ContainerError(f"corrupt {what} ({exc})") from None
    if len(out) > limit or not decomp.eof or decomp.unused_data:
        raise ContainerError(f"corrupt {what} (size does not match the header)")
    return out


def _int(d: dict, key: str, low: int = 0, high: int = MAX_MODEL_BYTES) -> int:
    value = d.get(key) if isinstance(d, dict) else None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ContainerError(f"corrupt header: '{key}' is {value!r}")
    return value


def read_header(container: bytes) -> tuple[dict, int]:
    """The validated header and the offset where the body starts."""
    if len(container) < len(MAGIC) + 4 or container[: len(MAGIC) - 1] != MAGIC[:-1]:
        raise ContainerError("not an onnxtq container (bad magic)", "was it written by `onnxtq pack`?")
    if container[len(MAGIC) - 1] != MAGIC[-1]:
        raise ContainerError(f"container format version {container[len(MAGIC) - 1]} is not supported")
    (size,) = struct.unpack_from("<I", container, len(MAGIC))
    body = len(MAGIC) + 4 + size
    if size > MAX_HEADER_BYTES or body > len(container):
        raise ContainerError("container is truncated (header)")
    try:
        header = json.loads(_unlzma(container[len(MAGIC) + 4 : body], MAX_HEADER_BYTES, "header"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ContainerError(f"corrupt header ({exc})") from None
    if not isinstance(header, dict) or header.get("coder") not in CODERS or not isinstance(header.get("streams"), list):
        raise ContainerError("corrupt header (coder or stream list missing)")
    _check_layout(header, len(container) - body)
    return header, body


def _check_layout(header: dict, body_bytes: int) -> None:
    """Every declared size agrees with the tensor shapes, the model size and the file."""
    model_bytes = _int(header, "model_bytes")
    skeleton, tables = header.get("skeleton"), header.get("tables")
    total_blobs = (
        _int(skeleton, "bytes") + _int(tables, "bytes") + sum(_int(s, "coded_bytes") for s in header["streams"])
    )
    if sum(_int(s, "table_bytes", 1, MAX_HEADER_BYTES) for s in header["streams"]) != _int(
        tables, "raw_bytes", 0, MAX_HEADER_BYTES
    ):
        raise ContainerError("corrupt header: count table sizes do not add up")
    if total_blobs != body_bytes:
        raise ContainerError(f"container is truncated or padded: body holds {body_bytes} B, header says {total_blobs}")
    end = 0
    for s in header["streams"]:
        dims = s.get("dims")
        if not isinstance(dims, list) or not all(isinstance(d, int) and 0 <= d <= MAX_TENSOR_ELEMENTS for d in dims):
            raise ContainerError("corrupt header: bad dims")
        if _int(s, "data_type", 0, 64) not in _STREAM_TYPES or not isinstance(s.get("name"), str):
            raise ContainerError("corrupt header: bad stream type or name")
        if math.prod(dims) > MAX_TENSOR_ELEMENTS:
            raise ContainerError(f"corrupt header: stream '{s['name']}' declares {math.prod(dims)} elements")
        probe = onnx.TensorProto(dims=dims, data_type=s["data_type"])
        if _int(s, "raw_bytes") != tensor_nbytes(probe) or _int(s, "offset") < end:
            raise ContainerError(f"corrupt header: stream '{s['name']}' size or offset")
        end = s["offset"] + s["raw_bytes"]
    if end > model_bytes or _int(skeleton, "raw_bytes") + sum(s["raw_bytes"] for s in header["streams"]) != model_bytes:
        raise ContainerError("corrupt header: stream and skeleton sizes do not add up to the model size")
    if not isinstance(header.get("sha256"), str):
        raise ContainerError("corrupt header: checksum missing")


def _decode_stream(s: dict, table: bytes, code: bytes, coder: str) -> bytes:
    symbols = math.prod(s["dims"])
    minimum, counts = decode_table(table, symbols)
    pieces = []
    try:
        for chunk in _decode_chunks(code, counts, symbols, coder):
            pieces.append(_to_raw(chunk.astype(np.int64) + minimum, s["data_type"]))
    except ContainerError:
        raise
    except BaseException as exc:  # garbage may make constriction raise anything, a Rust panic included
        if isinstance(exc, (KeyboardInterrupt, SystemExit, GeneratorExit)):  # (pyo3 panics are BaseExceptions)
            raise
        raise ContainerError(f"corrupt coded stream '{s['name']}' ({exc})") from None
    raw = b"".join(pieces)
    if len(raw) != s["raw_bytes"]:
        raise ContainerError(f"coded stream '{s['name']}' decodes to the wrong size")
    return raw


def unpack(container: bytes) -> bytes:
    """The deployable ONNX bytes a container holds, checked against their SHA-256."""
    header, pos = read_header(container)
    skel = header["skeleton"]
    skeleton = _unlzma(container[pos : pos + skel["bytes"]], skel["raw_bytes"], "skeleton")
    if len(skeleton) != skel["raw_bytes"]:
        raise ContainerError("corrupt skeleton (size does not match the header)")
    pos += skel["bytes"]
    tabs = header["tables"]
    tables = _unlzma(container[pos : pos + tabs["bytes"]], tabs["raw_bytes"], "count tables")
    if len(tables) != tabs["raw_bytes"]:
        raise ContainerError("corrupt count tables (size does not match the header)")
    pos += tabs["bytes"]
    pieces, taken, restored, at = [], 0, 0, 0  # skeleton bytes used, output bytes produced, table offset
    for s in header["streams"]:
        table, code = tables[at : at + s["table_bytes"]], container[pos : pos + s["coded_bytes"]]
        at += s["table_bytes"]
        pos += s["coded_bytes"]
        gap = s["offset"] - restored  # skeleton bytes before this stream's payload
        pieces += [skeleton[taken : taken + gap], _decode_stream(s, table, code, header["coder"])]
        taken += gap
        restored = s["offset"] + s["raw_bytes"]
    pieces.append(skeleton[taken:])
    data = b"".join(pieces)
    if hashlib.sha256(data).hexdigest() != header["sha256"]:
        written, here = header.get("coder_library"), f"constriction {_constriction_version()}"
        hint = f"it was written with {written}, this is {here}" if written != here else None
        raise ContainerError("restored model fails its checksum: the container is corrupt", hint)
    return data


# --- files --------------------------------------------------------------------------------------


def _read(path: str | os.PathLike, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{what} '{path}' does not exist", "check the path")
    if path.stat().st_size > MAX_MODEL_BYTES:
        raise ModelError(f"{what} '{path}' is larger than 2 GB")
    return path.read_bytes()


def pack_file(
    model_path: str | os.PathLike,
    output: str | os.PathLike,
    coder: str = "rans",
    min_elements: int = DEFAULT_MIN_ELEMENTS,
) -> PackReport:
    """Pack an .onnx file into a container file (atomically; never over the input)."""
    check_outputs({"the input model": [model_path]}, {"the output": output})
    container, report = pack(_read(model_path, "model"), coder, min_elements)
    write_atomic(container, output, refuse=model_path)
    return report


def unpack_file(container_path: str | os.PathLike, output: str | os.PathLike) -> int:
    """Restore the .onnx file a container holds; returns its size in bytes."""
    check_outputs({"the container": [container_path]}, {"the output": output})
    data = unpack(_read(container_path, "container"))
    write_atomic(data, output, refuse=container_path)
    return len(data)
