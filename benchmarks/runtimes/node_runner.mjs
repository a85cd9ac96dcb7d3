// Runs one ONNX model on onnxruntime-node (CPU) and prints one JSON line, the contract of py_runner.py:
//
//   node node_runner.mjs MODEL.onnx IN_DIR OUT_DIR [--repeat N] [--project DIR]
//
// IN_DIR/manifest.json lists the inputs as [{name, dtype, shape, file}] with each file the tensor's raw
// little-endian bytes (written by harness.py); the outputs go to OUT_DIR in the same form, in model
// order. onnxruntime-node is resolved from the npm project DIR (default /work/rt/node, see setup.sh),
// since it is not installed next to this script.
import fs from "node:fs";
import path from "node:path";
import {createRequire} from "node:module";
import {describe, errorLine, runSession, typedArray} from "./ort_js.mjs";

function parseArgs(argv) {
    const args = {repeat: 5, project: "/work/rt/node", positional: []};
    for (let i = 0; i < argv.length; i++) {
        if (argv[i] === "--repeat") args.repeat = Number(argv[++i]);
        else if (argv[i] === "--project") args.project = argv[++i];
        else args.positional.push(argv[i]);
    }
    if (args.positional.length !== 3) {
        console.error("usage: node node_runner.mjs MODEL.onnx IN_DIR OUT_DIR [--repeat N] [--project DIR]");
        process.exit(2);
    }
    return args;
}

function readInputs(dir) {
    const manifest = JSON.parse(fs.readFileSync(path.join(dir, "manifest.json"), "utf8"));
    const inputs = {};
    for (const {name, dtype, shape, file} of manifest) {
        const buf = fs.readFileSync(path.join(dir, file));
        // A Buffer may sit unaligned inside Node's pool: copy it out so that typed arrays can view it.
        const bytes = buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.byteLength);
        inputs[name] = {dtype, shape, data: typedArray(dtype, bytes)};
    }
    return inputs;
}

function writeOutputs(dir, outputs) {
    fs.mkdirSync(dir, {recursive: true});
    const manifest = outputs.map(([name, tensor], k) => {
        const {dtype, shape, bytes} = describe(tensor);
        fs.writeFileSync(path.join(dir, `out${k}.bin`), bytes);
        return {name, dtype, shape, file: `out${k}.bin`};
    });
    fs.writeFileSync(path.join(dir, "manifest.json"), JSON.stringify(manifest));
}

async function main() {
    const args = parseArgs(process.argv.slice(2));
    const [model, inDir, outDir] = args.positional;
    const report = {runtime: "onnxruntime-node", version: null, loads: false, runs: false, error: null,
                    load_s: null, latency_ms: null, peak_rss_mb: null};
    try {
        const ort = createRequire(path.join(args.project, "package.json"))("onnxruntime-node");
        report.version = ort.env.versions.node;
        const inputs = readInputs(inDir);
        const start = performance.now();
        const session = await ort.InferenceSession.create(model, {executionProviders: ["cpu"]});
        report.load_s = (performance.now() - start) / 1e3;
        report.loads = true;
        const {outputs, latencyMs} = await runSession(ort, session, inputs, args.repeat);
        report.runs = true;
        report.latency_ms = latencyMs;
        writeOutputs(outDir, outputs);
    } catch (err) {
        report.error = errorLine(err);
    }
    report.peak_rss_mb = process.resourceUsage().maxRSS / 1024;
    console.log(JSON.stringify(report));
}

await main();
