"""The .onnxtq container: byte-exact round trips of real compressed models, coded sizes against
the empirical entropy, and untrusted-input handling (truncated, corrupt, forged files)."""

import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from builders import bundled
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxtq import container, model_io
from onnxtq.cli import main
from onnxtq.compress import sweep
from onnxtq.errors import ModelError, UsageError, VerificationError

PIPELINES = {"rtn4": "rtn{bits=4}", "rtn2": "rtn{bits=2}", "rtn8": "rtn{bits=8}", "tq3": "tq{rate=3}"}


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """The bundled MNIST CNN compressed four ways (one shared fold-bn,calibrate run on 64 inputs)."""
    path, calib = bundled("mnist_cnn")
    out = tmp_path_factory.mktemp("compressed")
    runs = sweep(path, out, list(PIPELINES.values()), calib, "fold-bn,calibrate{samples=64}", verify_samples=0)
    return {name: Path(run.output).read_bytes() for name, run in zip(PIPELINES, runs)}


@pytest.fixture(scope="module")
def packed(compressed):
    """(container, report) for every compressed model and coder."""
    return {(m, c): container.pack(data, c) for m, data in compressed.items() for c in container.CODERS}


@pytest.mark.parametrize("coder", container.CODERS)
@pytest.mark.parametrize("name", PIPELINES)
def test_round_trip_is_byte_identical(compressed, packed, name, coder):
    blob, report = packed[name, coder]
    assert container.unpack(blob) == compressed[name]
    assert report.container_bytes == len(blob) < report.model_bytes == len(compressed[name])
    assert len(report.streams) >= 4  # every quantized conv/gemm weight of at least 1024 codes
    parts = report.header_bytes + report.skeleton_bytes + report.tables_bytes + report.coded_bytes
    assert parts == len(blob)  # every byte of the file is accounted for
    assert container.pack(compressed[name], coder)[0] == blob  # deterministic


@pytest.mark.parametrize("name", PIPELINES)
def test_rans_reaches_the_empirical_entropy(packed, name):
    report = packed[name, "rans"][1]
    big = [s for s in report.streams if s.symbols >= 2048]
    assert big
    coded, entropy = sum(s.coded_bytes for s in big), sum(s.entropy_bits for s in big) / 8
    assert entropy <= coded <= 1.02 * entropy
    assert report.coded_bytes <= 1.02 * report.entropy_bytes
    # with the count tables: small INT8 tensors pay up to ~10% for their 256-entry table
    assert report.coded_bytes + report.tables_bytes <= 1.05 * report.entropy_bytes


@pytest.mark.parametrize("name", PIPELINES)
def test_huffman_sits_between_entropy_and_one_bit_per_symbol_more(packed, name):
    for s in packed[name, "huffman"][1].streams:
        assert s.entropy_bits <= 8 * s.coded_bytes <= s.entropy_bits + s.symbols + 8, s.name


def test_restored_model_runs_with_identical_outputs(compressed, packed):
    x = np.load(bundled("mnist_cnn")[1])
    feeds = {k: x[k][:16] for k in x.files}
    for name in ("rtn4", "tq3"):
        restored = container.unpack(packed[name, "huffman"][0])
        want = model_io.session(compressed[name]).run(None, feeds)
        got = model_io.session(restored).run(None, feeds)
        assert all(np.array_equal(a, b) for a, b in zip(want, got))


def _synthetic() -> onnx.ModelProto:
    """Initializers that exercise every path: odd INT4, one-valued, wide INT32, INT64, non-raw."""
    rng = np.random.default_rng(0)
    odd = numpy_helper.from_array(rng.integers(-8, 8, 2049).astype(ml_dtypes.int4), "odd_int4")
    dirty = onnx.TensorProto()
    dirty.CopyFrom(odd)
    dirty.name = "dirty_pad"
    dirty.raw_data = odd.raw_data[:-1] + bytes([odd.raw_data[-1] | 0xF0])  # garbage in the pad nibble
    inits = [
        odd,
        dirty,
        numpy_helper.from_array(np.full(5000, 3, np.int8), "constant_int8"),
        numpy_helper.from_array(rng.integers(-(10**6), 10**6, 4096).astype(np.int32), "wide_int32"),
        numpy_helper.from_array(rng.permutation(3000).astype(np.int64) + 10**12, "index_int64"),
        numpy_helper.from_array(rng.integers(0, 4, (64, 33)).astype(ml_dtypes.uint2), "codes_uint2"),
        helper.make_tensor("listed_int32", TensorProto.INT32, [2048], list(range(2048))),
        numpy_helper.from_array(rng.integers(0, 255, 100).astype(np.uint8), "small_uint8"),
        numpy_helper.from_array(rng.standard_normal(3000).astype(np.float32), "float"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [], inits)
    graph.output.append(helper.make_tensor_value_info("y", TensorProto.FLOAT, [1]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 25)])


@pytest.mark.parametrize("coder", container.CODERS)
def test_every_integer_kind_round_trips_and_the_rest_stays_in_the_skeleton(coder):
    data = _synthetic().SerializeToString()
    blob, report = container.pack(data, coder)
    assert container.unpack(blob) == data
    assert {s.name for s in report.streams} == {"odd_int4", "constant_int8", "index_int64", "codes_uint2"}
    assert dict(report.kept) == {
        "dirty_pad": "stored bytes not in canonical packed form",
        "wide_int32": f"symbol range wider than {container.MAX_SPAN}",
        "listed_int32": "values not stored as packed raw_data",
        "small_uint8": "fewer than 1024 elements",
    }
    constant = next(s for s in report.streams if s.name == "constant_int8")
    assert constant.coded_bytes == 0 and constant.entropy_bits == 0


def test_any_field_order_restores_exactly():
    """A file whose graph comes before ir_version (protobuf would re-serialize it the other way)."""
    model = _synthetic()
    graph = model.graph.SerializeToString()
    rest = onnx.ModelProto()
    rest.CopyFrom(model)
    rest.ClearField("graph")
    length = bytearray()
    container._put_varint(length, len(graph))
    data = b"\x3a" + bytes(length) + graph + rest.SerializeToString()  # field 7, wire type 2
    assert onnx.load_from_string(data).SerializeToString() != data
    blob, report = container.pack(data)
    assert container.unpack(blob) == data and len(report.streams) == 4


@settings(max_examples=50, deadline=None)
@given(st.integers(-(2**62), 2**62), st.lists(st.integers(0, 2**40), min_size=1, max_size=300))
def test_count_table_round_trip(minimum, counts):
    counts = np.array(counts, dtype=np.int64)
    table = container.encode_table(minimum, counts)
    got_min, got_counts = container.decode_table(table, int(counts.sum()))
    assert got_min == minimum and np.array_equal(got_counts, counts)


def test_truncated_or_corrupt_containers_raise_clear_errors(compressed, packed):
    original = compressed["tq3"]
    for coder in container.CODERS:
        blob = packed["tq3", coder][0]
        for cut in (0, 5, 11, 40, len(blob) // 2, len(blob) - 1):
            with pytest.raises(container.ContainerError):
                container.unpack(blob[:cut])
        with pytest.raises(container.ContainerError, match="truncated or padded"):
            container.unpack(blob + b"\0")
        for pos in range(len(container.MAGIC), len(blob), 97):  # every region: header, skeleton, tables, codes
            bad = bytearray(blob)
            bad[pos] ^= 0x5A
            try:
                assert container.unpack(bytes(bad)) == original  # e.g. a flipped letter of a name
            except container.ContainerError:
                pass
    with pytest.raises(container.ContainerError, match="bad magic"):
        container.unpack(b"PK\x03\x04" + blob[4:])
    with pytest.raises(container.ContainerError, match="version 2"):
        container.unpack(container.MAGIC[:-1] + b"\x02" + blob[8:])


def _forge(header: dict, body: bytes = b"") -> bytes:
    z = container._lzma(json.dumps(header).encode())
    return container.MAGIC + struct.pack("<I", len(z)) + z + body


def test_forged_sizes_are_refused_before_allocating():
    stream = {"name": "w", "data_type": TensorProto.INT8, "dims": [2**20, 2**20], "offset": 0}
    stream |= {"raw_bytes": 2**40, "table_bytes": 3, "coded_bytes": 0}
    header = {"coder": "rans", "model_bytes": 100, "sha256": "0" * 64, "streams": [stream]}
    header |= {"skeleton": {"bytes": 0, "raw_bytes": 0}, "tables": {"bytes": 0, "raw_bytes": 3}}
    with pytest.raises(container.ContainerError, match="declares"):
        container.unpack(_forge(header))
    stream |= {"dims": [2**30], "raw_bytes": 2**30}
    with pytest.raises(container.ContainerError, match="do not add up to the model size"):
        container.unpack(_forge(header))
    header["model_bytes"] = 2**62
    with pytest.raises(container.ContainerError, match="'model_bytes'"):
        container.unpack(_forge(header))
    with pytest.raises(container.ContainerError, match="counts do not add up"):
        container.decode_table(container.encode_table(0, np.array([5, 5])), 11)
    with pytest.raises(container.ContainerError, match="span"):
        container.decode_table(b"\x00\xff\xff\xff\x0f", 1)


def test_pack_refuses_what_it_cannot_restore(compressed, monkeypatch, tmp_path):
    model = onnx.load_from_string(compressed["rtn8"])
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, size_threshold=0)
    with pytest.raises(ModelError, match="external data"):
        container.pack((tmp_path / "ext.onnx").read_bytes())
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        container.pack(b"\xff" * 100)
    with pytest.raises(UsageError, match="unknown coder"):
        container.pack(compressed["rtn8"], "zip")
    monkeypatch.setattr(container, "unpack", lambda blob: b"")
    with pytest.raises(VerificationError, match="byte for byte"):
        container.pack(compressed["rtn8"])


def test_cli_pack_unpack(compressed, tmp_path, capsys, monkeypatch):
    model = tmp_path / "m.onnx"
    model.write_bytes(compressed["rtn4"])
    assert main(["pack", str(model), "-o", str(tmp_path / "m.onnxtq"), "--coder", "huffman", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["coder"] == "huffman" and report["container_bytes"] == (tmp_path / "m.onnxtq").stat().st_size
    assert report["entropy_bytes"] <= report["coded_bytes"] and report["streams"]
    monkeypatch.chdir(tmp_path)
    assert main(["unpack", "m.onnxtq", "-o", "back.onnx"]) == 0
    assert (tmp_path / "back.onnx").read_bytes() == model.read_bytes()
    assert main(["pack", "back.onnx"]) == 0 and (tmp_path / "back.onnxtq").is_file()
    assert "coder rans" in capsys.readouterr().out
    before = model.read_bytes()
    assert main(["pack", str(model), "-o", str(model)]) == 2
    assert main(["unpack", "m.onnxtq", "-o", "./m.onnxtq"]) == 2
    assert "never overwrites its input" in capsys.readouterr().err
    assert model.read_bytes() == before and (tmp_path / "m.onnxtq").stat().st_size == report["container_bytes"]
    (tmp_path / "junk.onnxtq").write_bytes(b"ONNXTQC\x01" + b"\xff" * 50)
    assert main(["unpack", "junk.onnxtq", "-o", "junk.onnx"]) == 2
    assert "onnxtq: error:" in capsys.readouterr().err and not (tmp_path / "junk.onnx").exists()


ZOO = os.environ.get("ONNXTQ_ZOO_MODELS")


@pytest.mark.slow
@pytest.mark.skipif(not ZOO, reason="set ONNXTQ_ZOO_MODELS to a folder of compressed zoo .onnx files")
@pytest.mark.parametrize("coder", container.CODERS)
def test_zoo_round_trip(coder):
    paths = sorted(Path(ZOO).glob("*.onnx"))
    assert paths, f"no .onnx files in {ZOO}"
    for path in paths:
        data = path.read_bytes()
        blob, report = container.pack(data, coder)
        assert container.unpack(blob) == data, path.name
        if coder == "rans":
            assert report.coded_bytes <= 1.02 * report.entropy_bytes, path.name
