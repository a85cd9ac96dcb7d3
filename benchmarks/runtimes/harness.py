"""Run one ONNX file on several inference runtimes: does it load, does it run, what does it output, how
fast, and how much memory. A compressed file is only as useful as the runtimes that accept it, and the
project's own onnxruntime accepts more (new opsets, INT4/INT2) than most deployments have.

    python benchmarks/runtimes/harness.py MODEL.onnx INPUTS.npz [--runtimes ort117 tract ...] [--root ROOT]

Each runtime runs in its own process from its own prefix under ROOT (made by setup.sh): the Python
ones through py_runner.py, onnxruntime-node through node_runner.mjs, and onnxruntime-web in a headless
Chromium page (web/) served from 127.0.0.1 by a server this module starts. Inputs and outputs travel
through a temporary folder. The CLI compares every runtime's outputs with onnxruntime from the
interpreter running it (the project venv), the reference. The runners pick the arrays they need from the
inputs by input name.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from py_runner import save_npz  # noqa: E402

RUNTIMES = ("ort117", "ortnew", "openvino", "tract", "ort-node", "ort-web")
# harness name -> (venv under ROOT, py_runner.py's runtime argument)
PYTHON_RUNTIMES = {
    "ort117": ("ort117", "onnxruntime"),
    "ortnew": ("ortnew", "onnxruntime"),
    "openvino": ("openvino", "openvino"),
    "tract": ("tract", "tract"),
}


@dataclass
class Result:
    """What one runtime did with one model. outputs are in model output order, None unless it ran."""

    runtime: str
    loads: bool = False
    runs: bool = False
    error: str | None = None
    version: str | None = None
    load_s: float | None = None
    latency_ms: float | None = None
    peak_rss_mb: float | None = None
    outputs: list[np.ndarray] | None = None

    @classmethod
    def from_report(cls, runtime, report, outputs):
        fields = ("loads", "runs", "error", "version", "load_s", "latency_ms", "peak_rss_mb")
        return cls(runtime, **{k: report.get(k) for k in fields}, outputs=outputs if report.get("runs") else None)


def run(runtime: str, model_path, inputs: dict[str, np.ndarray], root="/work/rt", repeat=5, timeout=300) -> Result:
    """Load and run `model_path` on `runtime` (one of RUNTIMES) with `inputs` (whole batches keyed by
    input name). A runtime refusing the model is a Result with loads/runs False and its error line; a
    runner that crashes, prints no report or outlives `timeout` seconds is one too, its error saying so."""
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; one of {', '.join(RUNTIMES)}")
    model_path = str(Path(model_path).resolve())
    with tempfile.TemporaryDirectory(prefix="onnxtq-rt-") as tmp:
        tmp = Path(tmp)
        try:
            if runtime in PYTHON_RUNTIMES:
                venv, name = PYTHON_RUNTIMES[runtime]
                return _run_python(
                    runtime, Path(root, venv, "bin", "python"), name, model_path, inputs, tmp, repeat, timeout
                )
            if runtime == "ort-node":
                return _run_node(model_path, inputs, Path(root, "node"), tmp, repeat, timeout)
            return _run_web(model_path, inputs, Path(root, "node"), tmp, repeat, timeout)
        except subprocess.TimeoutExpired:
            return Result(runtime, error=f"timed out after {timeout} s")
        except (OSError, RuntimeError) as exc:
            return Result(runtime, error=f"harness: {exc}")


def reference(model_path, inputs: dict[str, np.ndarray], repeat=5, timeout=300) -> Result:
    """The same run on onnxruntime of this interpreter (the project venv), for comparisons."""
    with tempfile.TemporaryDirectory(prefix="onnxtq-rt-") as tmp:
        return _run_python(
            "reference",
            Path(sys.executable),
            "onnxruntime",
            str(Path(model_path).resolve()),
            inputs,
            Path(tmp),
            repeat,
            timeout,
        )


def _report(runtime, argv, timeout):
    """Run a runner and return its JSON line (its last stdout line); a RuntimeError saying why where there is none."""
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout)
    lines = proc.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{runtime} runner exited {proc.returncode} without a report: {tail}") from None


def _run_python(runtime, python, name, model_path, inputs, tmp, repeat, timeout):
    if not python.exists():
        return Result(runtime, error=f"{python} missing: run setup.sh")
    save_npz(tmp / "in.npz", list(inputs), list(inputs.values()))
    out = tmp / "out.npz"
    argv = [python, HERE / "py_runner.py", name, model_path, tmp / "in.npz", out, "--repeat", repeat]
    report = _report(runtime, argv, timeout)
    outputs = None
    if report.get("runs"):
        with np.load(out) as z:
            outputs = [z[k] for k in z.files]
    return Result.from_report(runtime, report, outputs)


def _write_tensors(folder, tensors: dict[str, np.ndarray]):
    """The JS runners' tensor format: raw little-endian bytes per tensor plus manifest.json."""
    folder.mkdir()
    manifest = []
    for k, (name, array) in enumerate(tensors.items()):
        array = np.ascontiguousarray(array, dtype=np.asarray(array).dtype.newbyteorder("<"))
        (folder / f"in{k}.bin").write_bytes(array.tobytes())
        manifest.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape), "file": f"in{k}.bin"})
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _read_tensors(folder, manifest):
    return [
        np.frombuffer((folder / t["file"]).read_bytes(), dtype=np.dtype(t["dtype"]).newbyteorder("<")).reshape(
            t["shape"]
        )
        for t in manifest
    ]


def _run_node(model_path, inputs, project, tmp, repeat, timeout):
    if not (project / "node_modules" / "onnxruntime-node").is_dir():
        return Result("ort-node", error=f"onnxruntime-node missing under {project}: run setup.sh")
    _write_tensors(tmp / "in", inputs)
    argv = ["node", HERE / "node_runner.mjs", model_path, tmp / "in", tmp / "out", "--repeat", repeat]
    report = _report("ort-node", [*argv, "--project", project], timeout)
    outputs = None
    if report.get("runs"):
        outputs = _read_tensors(tmp / "out", json.loads((tmp / "out" / "manifest.json").read_text()))
    return Result.from_report("ort-node", report, outputs)


class _WebHandler(SimpleHTTPRequestHandler):
    """Serves the page, the runner scripts, onnxruntime-web's dist, the model and the inputs under fixed
    paths (routes: a URL path, or a prefix ending in / for a folder, to a file or folder), and takes the
    page's POSTs: /output/K (raw bytes) and /result (the JSON report)."""

    extensions_map = {
        ".html": "text/html",
        ".mjs": "text/javascript",
        ".js": "text/javascript",
        ".wasm": "application/wasm",
        ".json": "application/json",
        "": "application/octet-stream",
    }

    def __init__(self, *args, routes, tmp, done, **kwargs):
        self.routes, self.tmp, self.done = routes, tmp, done
        super().__init__(*args, **kwargs)

    def translate_path(self, path):
        path = path.split("?", 1)[0]
        for prefix, target in self.routes.items():
            if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
                rest = Path(path[len(prefix) :])
                if ".." in rest.parts:
                    break
                return str(Path(target, rest))
        return str(self.tmp / "not-found")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/output/") and self.path[len("/output/") :].isdigit():
            (self.tmp / "out" / f"out{self.path[len('/output/') :]}.bin").write_bytes(body)
        elif self.path == "/result":
            (self.tmp / "result.json").write_bytes(body)
            self.done.set()
        else:
            self.send_error(404)
            return
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        """Quiet: the page's requests are not the harness's output."""


def _run_web(model_path, inputs, project, tmp, repeat, timeout):
    dist = project / "node_modules" / "onnxruntime-web" / "dist"
    chromium = shutil.which("chromium")
    if not dist.is_dir() or not chromium:
        return Result("ort-web", error="onnxruntime-web or chromium missing: run setup.sh")
    _write_tensors(tmp / "in", inputs)
    (tmp / "out").mkdir()
    routes = {
        "/index.html": HERE / "web" / "index.html",
        "/runner/": HERE,
        "/ort/": dist,
        "/model.onnx": model_path,
        "/inputs/": tmp / "in",
    }
    done = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_WebHandler, routes=routes, tmp=tmp, done=done))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/index.html?repeat={repeat}"
    # Root needs --no-sandbox; a fresh profile keeps runs apart; its own session lets us end it whole.
    with open(tmp / "chromium.log", "wb") as log:
        browser = subprocess.Popen(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                f"--user-data-dir={tmp / 'profile'}",
                url,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        if not done.wait(timeout):
            raise subprocess.TimeoutExpired(chromium, timeout)
    finally:
        os.killpg(browser.pid, signal.SIGKILL)
        browser.wait()
        server.shutdown()
        server.server_close()
    report = json.loads((tmp / "result.json").read_text())
    outputs = _read_tensors(tmp / "out", report["outputs"]) if report.get("runs") else None
    return Result.from_report("ort-web", report, outputs)


def max_abs_diff(outputs, expected):
    """Largest |a - b| over all outputs; None where either side is missing, inf where shapes differ."""
    if outputs is None or expected is None or len(outputs) != len(expected):
        return None
    worst = 0.0
    for a, b in zip(outputs, expected):
        if a.shape != b.shape:
            return float("inf")
        if a.size:
            worst = max(worst, float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))))
    return worst


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("inputs", help=".npz of whole batches keyed by input name (other keys are ignored)")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--root", default="/work/rt", help="where setup.sh installed the runtimes")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()

    with np.load(args.inputs) as z:
        inputs = {k: z[k] for k in z.files}
    ref = reference(args.model, inputs, args.repeat, args.timeout)
    print(
        f"reference: onnxruntime {ref.version} (this interpreter): {'runs' if ref.runs else 'fails: ' + str(ref.error)}"
    )
    header = (
        f"{'runtime':<9} {'version':<10} {'loads':<5} {'runs':<5} {'max|diff|':>9} {'lat ms':>7} "
        f"{'load s':>6} {'RSS MB':>6}  error"
    )
    print(header)
    print("-" * len(header))
    for runtime in args.runtimes:
        r = run(runtime, args.model, inputs, args.root, args.repeat, args.timeout)
        version = (r.version or "-").split("-")[0]
        print(
            f"{runtime:<9} {version:<10} {str(r.loads):<5} {str(r.runs):<5} "
            f"{_fmt(max_abs_diff(r.outputs, ref.outputs), '9.2e'):>9} {_fmt(r.latency_ms, '7.2f'):>7} "
            f"{_fmt(r.load_s, '6.3f'):>6} {_fmt(r.peak_rss_mb, '6.0f'):>6}  {r.error or ''}",
            flush=True,
        )


if __name__ == "__main__":
    main()
