// What node_runner.mjs and web/page.mjs share: turning the harness's raw tensors into onnxruntime-js
// tensors, running a session with the same batching and timing rules as py_runner.py, and making one
// line of an error. Only standard JavaScript here (no Node or DOM API), so that both can import it.

// A tensor travels as its raw little-endian bytes plus {name, dtype, shape}; dtype is the numpy name,
// which onnxruntime-js also uses. float16 and bool have no typed array of their own in every engine:
// their bytes go as Uint16Array / Uint8Array, which onnxruntime-js accepts for them.
const TYPED = {
    float32: Float32Array, float64: Float64Array, float16: Uint16Array, bool: Uint8Array,
    int8: Int8Array, uint8: Uint8Array, int16: Int16Array, uint16: Uint16Array,
    int32: Int32Array, uint32: Uint32Array, int64: BigInt64Array, uint64: BigUint64Array,
};

/** A typed array over `bytes` (an ArrayBuffer) for a tensor of numpy dtype `dtype`. */
export function typedArray(dtype, bytes) {
    if (!(dtype in TYPED)) throw new Error(`dtype ${dtype} not supported by this runner`);
    return new TYPED[dtype](bytes);
}

/** The raw bytes of an onnxruntime-js output tensor, with what is needed to rebuild it in numpy. */
export function describe(tensor) {
    const data = tensor.data;
    return {dtype: tensor.type, shape: Array.from(tensor.dims),
            bytes: new Uint8Array(data.buffer, data.byteOffset, data.byteLength)};
}

function median(values) {
    const sorted = [...values].sort((a, b) => a - b);
    const mid = sorted.length >> 1;
    return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

// Like py_runner.py: when every input has a fixed leading 1 and the batch is larger, run sample by
// sample. An onnxruntime-js without inputMetadata (older releases) gets the batch as it is.
function perSample(session, inputs) {
    const metadata = session.inputMetadata;
    const first = inputs[session.inputNames[0]];
    return Boolean(metadata) && first.shape.length > 0 && first.shape[0] > 1
        && metadata.every((m) => m.isTensor && m.shape.length > 0 && m.shape[0] === 1);
}

function slice(ort, input, index) {
    const size = input.shape.slice(1).reduce((a, b) => a * b, 1);
    return new ort.Tensor(input.dtype, input.data.subarray(index * size, (index + 1) * size),
                          [1, ...input.shape.slice(1)]);
}

// Joins per-sample outputs along axis 0; scalar ones become one value per sample (as in py_runner.py).
function concat(ort, tensors) {
    if (tensors.length === 1) return tensors[0];
    const first = tensors[0];
    const data = new first.data.constructor(tensors.reduce((n, t) => n + t.data.length, 0));
    let offset = 0;
    for (const t of tensors) { data.set(t.data, offset); offset += t.data.length; }
    const rows = tensors.reduce((n, t) => n + (t.dims.length ? t.dims[0] : 1), 0);
    return new ort.Tensor(first.type, data, [rows, ...first.dims.slice(1)]);
}

/**
 * Runs `session` on `inputs` ({name: {dtype, shape, data}}) and times it.
 * Returns {outputs: [[name, tensor]...] in model order, latencyMs: median of `repeat` runs of the first batch}.
 */
export async function runSession(ort, session, inputs, repeat) {
    const missing = session.inputNames.filter((n) => !(n in inputs));
    if (missing.length) throw new Error(`inputs not given: ${missing.join(", ")}`);
    const whole = (name) => new ort.Tensor(inputs[name].dtype, inputs[name].data, inputs[name].shape);
    let feeds = [Object.fromEntries(session.inputNames.map((n) => [n, whole(n)]))];
    if (perSample(session, inputs)) {
        const count = inputs[session.inputNames[0]].shape[0];
        feeds = Array.from({length: count}, (_, i) =>
            Object.fromEntries(session.inputNames.map((n) => [n, slice(ort, inputs[n], i)])));
    }
    const results = [];
    for (const feed of feeds) results.push(await session.run(feed));
    const outputs = session.outputNames.map((n) => [n, concat(ort, results.map((r) => r[n]))]);

    const times = [];
    for (let i = 0; i < repeat; i++) {
        const start = performance.now();
        await session.run(feeds[0]);
        times.push(performance.now() - start);
    }
    return {outputs, latencyMs: times.length ? median(times) : null};
}

const SOURCE_LOCATION = /[\w./-]+\.(?:cc|cpp|h|hpp):\d+:?(?: (?:[\w:<>*&]+ )*?[\w:~<>]+\([^)]*\))?/g;

/** The error as one line without C++ source locations, as py_runner.py's error_line does. */
export function errorLine(err) {
    const text = String(err && err.message !== undefined ? err.message : err).replace(SOURCE_LOCATION, "");
    const lines = text.split("\n").map((l) => l.trim()).filter(Boolean);
    return lines.join(" / ").slice(0, 400) || String(err);
}
