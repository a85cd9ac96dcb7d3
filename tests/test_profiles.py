"""Runtime profiles: a portable file keeps its model's opset and IR, holds no DequantizeLinear and no sub-byte
tensor, computes what the ort profile's file computes, and runs on the oldest onnxruntime it promises and on
tract; `fast` folds weights at load, `lowmem` refuses to; every file says which onnxruntime it needs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from builders import bundled, dequantize_cases, dequantize_model, make_model, run
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto

from onnxtq import compress, lowering, model_io
from onnxtq.cli import main
from onnxtq.graph import Graph
from onnxtq.profiles import min_onnxruntime

REPO = Path(__file__).resolve().parents[1]
RUNTIMES = Path(os.environ.get("ONNXTQ_RUNTIMES", REPO / ".runtimes"))
RUNNER = REPO / "benchmarks" / "runtimes" / "py_runner.py"
SUB_BYTE = set(lowering.SUB_BYTE)


@given(
    st.sampled_from([2, 4]), st.booleans(), st.lists(st.integers(1, 9), min_size=1, max_size=3), st.integers(0, 2**31)
)
def test_bytes_are_onnx_packing_and_the_table_reads_them_back(bits, signed, shape, seed):
    low, high = (-(1 << (bits - 1)), 1 << (bits - 1)) if signed else (0, 1 << bits)
    codes = np.random.default_rng(seed).integers(low, high, size=shape)
    stored = lowering.pack(codes, bits)
    container = {(2, True): ml_dtypes.int2, (2, False): ml_dtypes.uint2, (4, True): ml_dtypes.int4}
    onnx_bytes = onnx.numpy_helper.from_array(codes.astype(container.get((bits, signed), ml_dtypes.uint4))).raw_data
    assert stored.tobytes() == onnx_bytes
    decoded = lowering.digit_table(bits, signed)[stored].reshape(-1)[: codes.size]
    np.testing.assert_array_equal(decoded.reshape(codes.shape), codes)


@pytest.mark.parametrize("case", list(dequantize_cases(np.random.default_rng(0))))
def test_lowered_codes_are_dequantize_linear_values_at_opset_13(case):
    codes, scale, zero_point, attrs = dequantize_cases(np.random.default_rng(0))[case]
    model = dequantize_model(codes, scale, zero_point, **attrs)
    graph = Graph(onnx.ModelProto.FromString(model.SerializeToString()))
    assert lowering.lower(graph, every=True) == 1
    lowered = graph.proto()
    del lowered.opset_import[:]
    lowered.opset_import.append(onnx.helper.make_opsetid("", 13))
    lowered.ir_version = 7
    onnx.checker.check_model(lowered, full_check=True)
    assert not {"DequantizeLinear"} & {n.op_type for n in lowered.graph.node}
    assert not SUB_BYTE & {t.data_type for t in lowered.graph.initializer}
    dtype = np.float16 if model.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16 else np.float32
    x = np.zeros(list(codes.dims), dtype)
    np.testing.assert_array_equal(run(lowered, {"x": x})[0], run(model, {"x": x})[0])


def test_a_session_runs_codes_its_opset_cannot_hold_as_they_will_be_written():
    """Under the portable profile passes write INT4 DequantizeLinear at the model's opset; sessions lower them."""
    codes, scale, _, attrs = dequantize_cases(np.random.default_rng(0))["per axis 1, int4"]
    model = dequantize_model(codes, scale, **attrs)
    expected = run(model, {"x": np.zeros([6, 10], np.float32)})[0]
    model.opset_import[0].version = 17
    assert lowering.needs_lowering(model)
    got = model_io.session(model).run(None, {"x": np.zeros([6, 10], np.float32)})[0]
    np.testing.assert_array_equal(got, expected)


AUTO = "auto{size=70000}"
SPECS = ["rtn{bits=8}", "rtn{bits=2}", "rtn{bits=4,block=32,scale_bits=16}", "tq{rate=3}", "ecsq{rate=3}", "kq", "crq"]


@pytest.fixture(scope="module")
def portable_files(tmp_path_factory):
    """mnist_cnn under every method, in both profiles (and rtn 4 of the transformer and the recurrent model, and a
    size target on the transformer: auto's float16 biases)."""
    out = tmp_path_factory.mktemp("profiles")
    jobs = [("mnist_cnn", s) for s in SPECS] + [("mnist_transformer", "rtn{bits=4}"), ("mnist_rnn", "rtn{bits=4}")]
    jobs.append(("mnist_transformer", AUTO))
    files = {}
    for name, spec in jobs:
        path, calib = bundled(name)
        for target in ("ort", "portable"):
            dest = out / f"{name}.{len(files)}.{target}.onnx"
            compress(path, dest, f"fold-bn,calibrate,{spec}", calib=calib, target=target)
            files[(name, spec, target)] = dest
    return files


def _inputs(name: str) -> dict[str, np.ndarray]:
    data = np.load(bundled(name)[0].parent / "eval.npz")
    return {k: data[k][:8] for k in data.files if k != "label"}


def test_portable_files_keep_the_model_opset_and_compute_what_ort_files_do(portable_files):
    for (name, spec, target), path in portable_files.items():
        if target != "portable":
            continue
        model, source = onnx.load(str(path)), onnx.load(str(bundled(name)[0]))
        onnx.checker.check_model(model, full_check=True)
        assert (model.opset_import[0].version, model.ir_version) == (source.opset_import[0].version, source.ir_version)
        assert "DequantizeLinear" not in {n.op_type for n in model.graph.node}, spec
        assert not SUB_BYTE & {t.data_type for t in model.graph.initializer}, spec
        props = {p.key: p.value for p in model.metadata_props}
        assert props["onnxtq.target"] == "portable" and props["onnxtq.runtime"] == "onnxruntime>=1.17"
        if spec == AUTO:
            continue  # a size target counts the file as written: the portable file's allocation is its own
        inputs = _inputs(name)
        ort_out = run(onnx.load(str(portable_files[(name, spec, "ort")])), inputs)[0]
        ours = run(model, inputs)[0]
        np.testing.assert_allclose(ours, ort_out, rtol=0, atol=1e-5 * np.ptp(ort_out), err_msg=spec)


def test_a_target_run_s_float16_biases_stay_in_the_portable_file(portable_files):
    """Cast(float16) is in every opset the portable target keeps; the runs below load it on each runtime."""
    model = onnx.load(str(portable_files[("mnist_transformer", AUTO, "portable")]))
    halves = {t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT16}
    assert halves and halves <= {i for n in model.graph.node if n.op_type == "Cast" for i in n.input}


def test_files_name_the_onnxruntime_they_need(portable_files, capsys):
    ort2 = onnx.load(str(portable_files[("mnist_cnn", "rtn{bits=2}", "ort")]))
    assert min_onnxruntime(ort2) == "1.24"  # INT2 codes: opset 25, IR 13
    assert {p.key: p.value for p in ort2.metadata_props}["onnxtq.runtime"] == "onnxruntime>=1.24"
    assert main(["inspect", str(portable_files[("mnist_cnn", "rtn{bits=2}", "portable")])]) == 0
    assert "(onnxruntime >= 1.17)" in capsys.readouterr().out


def _run_on(runtime: str, python: Path, path: Path, inputs: dict, tmp_path: Path) -> list[np.ndarray]:
    """The file's outputs on a runtime installed in its own venv (benchmarks/runtimes/setup.sh)."""
    feed, out = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(feed, **inputs)
    done = subprocess.run(
        [str(python), str(RUNNER), runtime, str(path), str(feed), str(out), "--repeat", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["runs"], f"{runtime} on {path.name}: {report['error']}"
    with np.load(out) as data:
        return [data[k] for k in data.files]  # in the model's output order


@pytest.mark.parametrize(("runtime", "venv"), [("onnxruntime", "ort117"), ("tract", "tract")])
def test_portable_files_run_on_the_oldest_onnxruntime_and_on_tract(portable_files, tmp_path, runtime, venv):
    python = RUNTIMES / venv / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no {venv} venv under {RUNTIMES}: bash benchmarks/runtimes/setup.sh {RUNTIMES} ort117 tract")
    for (name, spec, target), path in portable_files.items():
        if target != "portable":
            continue
        inputs = _inputs(name)
        expected = run(onnx.load(str(path)), inputs)[0]
        got = _run_on(runtime, python, path, inputs, tmp_path)[0]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.ptp(expected), err_msg=f"{name} {spec}")


def test_fast_folds_at_load_and_lowmem_keeps_codes(tmp_path):
    path, calib = bundled("mnist_cnn")
    report = compress(path, tmp_path / "fast.onnx", "fold-bn,calibrate,rtn{bits=4}", calib=calib, target="fast")
    assert report.passes[-1].pass_name == "dequantize-at-load"
    assert "DequantizeLinear" not in {n.op_type for n in onnx.load(str(tmp_path / "fast.onnx")).graph.node}
    code = main(
        [
            "compress",
            str(path),
            "-o",
            str(tmp_path / "lowmem.onnx"),
            "--pipeline",
            "fold-bn,calibrate,rtn{bits=4},dequantize-at-load",
            "--target",
            "lowmem",
        ]
    )
    assert code == 2 and not (tmp_path / "lowmem.onnx").exists()


def test_an_unknown_target_is_a_usage_error(tmp_path, capsys):
    path, _ = bundled("mnist_cnn")
    assert main(["compress", str(path), "-o", str(tmp_path / "x.onnx"), "--target", "tflite"]) == 2
    assert "invalid choice: 'tflite'" in capsys.readouterr().err


def _embedding_model(rows=64, cols=23) -> onnx.ModelProto:
    """ids → Gather(table) → ReduceMean over the sequence → MatMul: an embedding lookup to code."""
    rng = np.random.default_rng(0)
    weights = {
        "table": rng.standard_normal((rows, cols)).astype(np.float32),
        "head": rng.standard_normal((cols, 8)).astype(np.float32),
    }
    nodes = [
        onnx.helper.make_node("Gather", ["table", "ids"], ["rows"], axis=0),
        onnx.helper.make_node("ReduceMean", ["rows"], ["mean"], axes=[1], keepdims=0),
        onnx.helper.make_node("MatMul", ["mean", "head"], ["y"]),
    ]
    ids = onnx.helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 5])
    y = onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])
    return make_model(nodes, [ids], [y], weights)


@pytest.mark.parametrize("spec", ["rtn{bits=2}", "rtn{bits=4}", "rtn{bits=4,symmetric=false}", "rtn{bits=8}"])
def test_lowmem_gathers_codes_and_decodes_only_the_rows_looked_up(tmp_path, spec):
    onnx.save(_embedding_model(), tmp_path / "emb.onnx")
    ids = np.random.default_rng(1).integers(0, 64, (32, 5))
    np.savez(tmp_path / "calib.npz", ids=ids)
    for target in ("ort", "lowmem"):
        report = compress(
            tmp_path / "emb.onnx",
            tmp_path / f"{target}.onnx",
            f"calibrate,{spec}",
            tmp_path / "calib.npz",
            target=target,
        )
    assert report.passes[-1].notes[0] == "1 embedding tables stay coded in RAM: only the rows gathered are decoded"
    lowmem, ort_file = onnx.load(str(tmp_path / "lowmem.onnx")), onnx.load(str(tmp_path / "ort.onnx"))
    onnx.checker.check_model(lowmem, full_check=True)
    reads = {name: n.op_type for n in lowmem.graph.node for name in n.input}
    table = [t for t in lowmem.graph.initializer if t.name.startswith("table/")]
    codes = [t for t in table if t.data_type in (TensorProto.UINT8, TensorProto.INT8)]  # and zero points
    assert codes and all(reads[t.name] == "Gather" for t in codes)
    assert not [n for n in lowmem.graph.node if n.op_type == "DequantizeLinear" and n.input[0].startswith("table/")]
    feed = {"ids": ids[:8]}
    np.testing.assert_allclose(run(lowmem, feed)[0], run(ort_file, feed)[0], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("ONNXTQ_BROWSER"), reason="set ONNXTQ_BROWSER=1 (needs setup.sh's node, chromium)"
)
def test_portable_files_run_in_a_browser(portable_files):
    """onnxruntime-web (wasm) in headless Chromium, the page served from 127.0.0.1 (benchmarks/runtimes)."""
    sys.path.insert(0, str(REPO / "benchmarks" / "runtimes"))
    import harness

    for (name, spec, target), path in portable_files.items():
        if target != "portable":
            continue
        inputs = _inputs(name)
        result = harness.run("ort-web", path, inputs, root=str(RUNTIMES))
        assert result.runs, f"{name} {spec}: {result.error}"
        expected = run(onnx.load(str(path)), inputs)[0]
        got = np.asarray(result.outputs[0]).reshape(expected.shape)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * np.ptp(expected), err_msg=f"{name} {spec}")


def test_a_tensor_of_odd_size_leaves_its_last_byte_half_used():
    codes = onnx.helper.make_tensor("q", TensorProto.INT4, [3, 5], list(range(-7, 8)))
    scale = onnx.helper.make_tensor("s", TensorProto.FLOAT, [5], [0.5, 0.25, 1.0, 2.0, 4.0])
    model = dequantize_model(codes, scale, axis=1)
    graph = Graph(onnx.ModelProto.FromString(model.SerializeToString()))
    lowering.lower(graph, every=True)
    x = np.zeros([3, 5], np.float32)
    np.testing.assert_array_equal(run(graph.proto(), {"x": x})[0], run(model, {"x": x})[0])
