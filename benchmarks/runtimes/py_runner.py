"""Run one ONNX model on one Python inference runtime and report what happened as one JSON line.

    python py_runner.py {onnxruntime|openvino|tract} MODEL.onnx INPUTS.npz OUT.npz [--repeat N]

Run by the python of each runtime's own venv (see setup.sh), so it imports only numpy and that one
runtime: never onnx or onnxtq, whose pinned versions would clash with an old runtime's numpy.
INPUTS.npz holds whole batches keyed by input name. They are fed as stored, except when every model
input has a fixed leading dimension of 1 and the batch is larger: then the samples run one at a time
and the outputs are concatenated. OUT.npz gets the outputs in model order.

A failure to load or run is a result, not a crash: it is reported in the JSON (loads/runs false,
error set) and the exit status stays 0, so that the harness can tell a runtime's refusal from a
broken runner.
"""

import argparse
import json
import re
import resource
import statistics
import time
import zipfile

import numpy as np

SOURCE_LOCATION = re.compile(r"[\w./-]+\.(?:cc|cpp|h|hpp|rs):\d+:?(?: (?:[\w:<>*&]+ )*?[\w:~<>]+\([^)]*\))?")
NOISE = ("Exception from", "Check '", "Caused by")


def error_line(exc, limit=400):
    """The exception as one line, keeping the reason. The runtimes wrap it differently: onnxruntime
    puts a C++ file:line and signature before it, OpenVINO a stack of "Exception from file:line"
    lines, tract an anyhow "Caused by" chain and a backtrace after it. Those wrappers are dropped and
    the remaining lines joined."""
    text = SOURCE_LOCATION.sub("", str(exc).split("Stack backtrace:")[0])
    lines = [ln.strip(" :") for ln in text.splitlines()]
    kept = [ln for ln in lines if ln and not ln.startswith(NOISE)]
    return " / ".join(kept)[:limit] or type(exc).__name__


def model_inputs(names, inputs):
    """The arrays for the model's inputs, in model order (the npz may hold other keys, like labels)."""
    missing = [n for n in names if n not in inputs]
    if missing:
        raise KeyError(f"no array for model inputs {missing}")
    return [inputs[n] for n in names]


def fixed_batch_one(leading_dims, arrays):
    """Whether the model only takes one sample at a time while the arrays hold more.

    leading_dims: the model's first dimension per input, an int where fixed, else anything."""
    return all(a.ndim > 0 for a in arrays) and arrays[0].shape[0] > 1 and all(d == 1 for d in leading_dims)


class OnnxRuntime:
    """onnxruntime on CPUExecutionProvider only: the portable reference every build ships."""

    def __init__(self, path, inputs):
        import onnxruntime as ort

        self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.per_sample = fixed_batch_one(
            [i.shape[0] if i.shape else None for i in self.session.get_inputs()], model_inputs(self.input_names, inputs)
        )

    def run(self, feed):
        return self.session.run(None, feed)


class OpenVino:
    """OpenVINO compiles the ONNX file itself (no conversion step) for its CPU plugin. On CPUs with
    bf16 units (avx512_bf16, AMX) that plugin computes in bf16 by default, which on the FP32 MNIST CNN
    alone moves logits by ~0.08; f32 is pinned so that differences do not depend on the machine. Its
    other default is kept, being what a deployment gets everywhere: layers with DequantizeLinear
    weights quantize their activations dynamically (DYNAMIC_QUANTIZATION_GROUP_SIZE=32)."""

    def __init__(self, path, inputs):
        import openvino as ov

        self.compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        self.input_names = [p.any_name for p in self.compiled.inputs]
        # An output port can lose its tensor names (OpenVINO renames what it fuses): fall back to positions.
        self.output_names = [p.any_name if p.names else f"out{k}" for k, p in enumerate(self.compiled.outputs)]
        leading = []
        for p in self.compiled.inputs:
            shape = p.partial_shape
            leading.append(
                shape[0].get_length() if shape.rank.is_static and len(shape) and shape[0].is_static else None
            )
        self.per_sample = fixed_batch_one(leading, model_inputs(self.input_names, inputs))
        self.request = self.compiled.create_infer_request()

    def run(self, feed):
        result = self.request.infer(feed)
        return [np.array(result[p]) for p in self.compiled.outputs]


TRACT_TYPES = {
    "float32": "f32",
    "float16": "f16",
    "float64": "f64",
    "int8": "i8",
    "int16": "i16",
    "int32": "i32",
    "int64": "i64",
    "uint8": "u8",
    "uint16": "u16",
    "uint32": "u32",
    "uint64": "u64",
    "bool": "bool",
}


class Tract:
    """sonos tract. It loads ONNX as an InferenceModel whose symbolic dims it cannot always resolve
    (an LSTM's Scan body clashes on batch=N != 1), so the input facts are pinned to the shapes that
    will actually be fed before the model is typed and optimised."""

    def __init__(self, path, inputs):
        import tract

        model = tract.onnx().load(path)
        self.input_names = [model.input_name(k) for k in range(model.input_count())]
        self.output_names = [model.output_name(k) for k in range(model.output_count())]
        leading = []
        for k in range(model.input_count()):
            first = model.input_fact(k).dump().split(",")[0]
            leading.append(int(first) if first.isdigit() else None)
        arrays = model_inputs(self.input_names, inputs)
        self.per_sample = fixed_batch_one(leading, arrays)
        for k, array in enumerate(arrays):
            shape = (1,) + array.shape[1:] if self.per_sample else array.shape
            model.set_input_fact(k, ",".join([str(d) for d in shape] + [TRACT_TYPES[array.dtype.name]]))
        self.runnable = model.into_model().into_runnable()

    def run(self, feed):
        return [t.to_numpy() for t in self.runnable.run([feed[n] for n in self.input_names])]


RUNTIMES = {"onnxruntime": OnnxRuntime, "openvino": OpenVino, "tract": Tract}


def save_npz(path, names, arrays):
    """np.savez, but keeping the given order and taking any output name (np.savez's keyword
    arguments reject names such as "file")."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, array in zip(names, arrays):
            with zf.open(name + ".npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(array))


def runtime_version(name):
    """The installed runtime's version, asked before loading so that a refused model still reports it."""
    try:
        if name == "tract":
            import tract

            return tract.version()
        return __import__(name).__version__
    except Exception:
        return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runtime", choices=sorted(RUNTIMES))
    parser.add_argument("model")
    parser.add_argument("inputs")
    parser.add_argument("out")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    with np.load(args.inputs) as z:
        inputs = {k: z[k] for k in z.files}
    report = {
        "runtime": args.runtime,
        "version": runtime_version(args.runtime),
        "loads": False,
        "runs": False,
        "error": None,
        "load_s": None,
        "latency_ms": None,
        "peak_rss_mb": None,
    }
    try:
        start = time.perf_counter()
        session = RUNTIMES[args.runtime](args.model, inputs)
        report["load_s"] = time.perf_counter() - start
        report["loads"] = True

        feeds = [{n: inputs[n] for n in session.input_names}]
        if session.per_sample:
            count = inputs[session.input_names[0]].shape[0]
            feeds = [{n: inputs[n][i : i + 1] for n in session.input_names} for i in range(count)]
        results = [session.run(feed) for feed in feeds]
        # Per-sample outputs are joined along axis 0; scalar ones become one value per sample.
        outputs = [
            parts[0] if len(parts) == 1 else np.concatenate([np.atleast_1d(p) for p in parts])
            for parts in zip(*results)
        ]
        report["runs"] = True

        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            session.run(feeds[0])
            times.append(time.perf_counter() - start)
        report["latency_ms"] = statistics.median(times) * 1e3 if times else None
        save_npz(args.out, session.output_names, outputs)
    except Exception as exc:
        report["error"] = error_line(exc)
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(report))


if __name__ == "__main__":
    main()
