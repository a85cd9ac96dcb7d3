// The onnxruntime-web side of the harness: fetch the model and the inputs (the manifest format of
// node_runner.mjs) from the server that served this page, run them on the single-threaded wasm backend,
// POST each output's raw bytes to /output/K and then the report (with the outputs' manifest) to /result.
import * as ort from "/ort/ort.wasm.min.mjs";
import {describe, errorLine, runSession, typedArray} from "/runner/ort_js.mjs";

async function get(path) {
    const response = await fetch(path);
    if (!response.ok) throw new Error(`GET ${path}: HTTP ${response.status}`);
    return response;
}

async function main() {
    const repeat = Number(new URLSearchParams(location.search).get("repeat") ?? 5);
    const report = {runtime: "onnxruntime-web", version: ort.env.versions.web, loads: false, runs: false,
                    error: null, load_s: null, latency_ms: null, peak_rss_mb: null, outputs: []};
    try {
        // One thread: threads need a cross-origin-isolated page and would measure the machine, not the build.
        ort.env.wasm.numThreads = 1;
        ort.env.wasm.wasmPaths = "/ort/";
        const inputs = {};
        for (const {name, dtype, shape, file} of await (await get("/inputs/manifest.json")).json()) {
            inputs[name] = {dtype, shape, data: typedArray(dtype, await (await get(`/inputs/${file}`)).arrayBuffer())};
        }
        const model = new Uint8Array(await (await get("/model.onnx")).arrayBuffer());
        const start = performance.now();
        const session = await ort.InferenceSession.create(model, {executionProviders: ["wasm"]});
        report.load_s = (performance.now() - start) / 1e3;
        report.loads = true;
        const {outputs, latencyMs} = await runSession(ort, session, inputs, repeat);
        report.runs = true;
        report.latency_ms = latencyMs;
        for (const [k, [name, tensor]] of outputs.entries()) {
            const {dtype, shape, bytes} = describe(tensor);
            await fetch(`/output/${k}`, {method: "POST", body: bytes});
            report.outputs.push({name, dtype, shape, file: `out${k}.bin`});
        }
    } catch (err) {
        report.error = errorLine(err);
    }
    await fetch("/result", {method: "POST", body: JSON.stringify(report)});
}

await main();
