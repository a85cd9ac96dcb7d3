#!/usr/bin/env bash
# Installs the inference runtimes that harness.py drives, each in its own prefix under ROOT, so that an
# old onnxruntime (and its numpy<2) never meets the project's venv. Idempotent: a prefix that already
# imports its runtime is left alone. Installs run one after another (the machine is shared).
#
#   bash benchmarks/runtimes/setup.sh [ROOT [WHAT...]]    # default ROOT=/work/rt, WHAT: all of
#                                                         # ort117 ortnew openvino tract node chromium
# CI installs only what the default suite runs: `setup.sh .runtimes ort117 tract`.
set -euo pipefail

ROOT=${1:-/work/rt}
shift || true
WHAT=${*:-ort117 ortnew openvino tract node chromium}
PY=${PYTHON:-python3}
mkdir -p "$ROOT"

wanted() { [[ " $WHAT " == *" $1 "* ]]; }

# venv NAME IMPORT PIP-SPEC...: make ROOT/NAME and pip-install the specs unless IMPORT already works there.
venv() {
    local name=$1 module=$2; shift 2
    local dir=$ROOT/$name
    wanted "$name" || return 0
    if [ -x "$dir/bin/python" ] && "$dir/bin/python" -c "import $module" 2>/dev/null; then
        echo "== $name: present"
        return
    fi
    echo "== $name: installing $*"
    "$PY" -m venv "$dir"
    # The machine's pip config names local wheel folders that may be absent: drop pip's notes about them.
    "$dir/bin/pip" install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2)
}

# onnxruntime 1.17 wheels are built against numpy 1.x and crash on import with numpy 2.
venv ort117 onnxruntime "onnxruntime==1.17.3" "numpy<2"
venv ortnew onnxruntime "onnxruntime==1.32.0" numpy
venv openvino openvino "openvino>=2026.4,<2026.5" numpy
venv tract tract "tract>=0.23,<0.24" numpy

# onnxruntime-node's postinstall downloads CUDA/TensorRT libraries from outside the registry, which is
# unreachable here; the CPU binding ships inside the npm package, so skipping scripts loses nothing we use.
NODE=$ROOT/node
if ! wanted node; then
    :
elif [ -d "$NODE/node_modules/onnxruntime-node" ] && [ -d "$NODE/node_modules/onnxruntime-web" ]; then
    echo "== node: present"
else
    echo "== node: installing onnxruntime-node onnxruntime-web"
    mkdir -p "$NODE"
    [ -f "$NODE/package.json" ] || (cd "$NODE" && npm init -y >/dev/null)
    (cd "$NODE" && npm install --ignore-scripts --no-audit --no-fund onnxruntime-node onnxruntime-web)
fi
# Proof that the CPU binding works without the skipped postinstall: a session on the repository's MNIST CNN.
MODEL=$(cd "$(dirname "$0")/../.." && pwd)/models/mnist_cnn/mnist_cnn.onnx
wanted node && (cd "$NODE" && node -e "require('onnxruntime-node').InferenceSession.create(process.argv[1])
    .then(() => console.log('onnxruntime-node: CPU session created'))
    .catch((e) => { console.error('onnxruntime-node CPU binding fails:', e.message); process.exit(1); })" "$MODEL")

if wanted chromium && ! command -v chromium >/dev/null; then
    echo "== chromium: installing from apt"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

echo "== installed under $ROOT"
for name in ort117 ortnew; do
    wanted $name || continue
    echo "$name: onnxruntime $("$ROOT/$name/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)')" \
         "numpy $("$ROOT/$name/bin/python" -c 'import numpy; print(numpy.__version__)')"
done
if wanted openvino; then
    echo "openvino: openvino $("$ROOT/openvino/bin/python" -c 'import openvino; print(openvino.__version__)')"
fi
if wanted tract; then echo "tract: tract $("$ROOT/tract/bin/pip" show tract 2>/dev/null | sed -n 's/^Version: //p')"; fi
if wanted node; then
    for pkg in onnxruntime-node onnxruntime-web; do
        echo "node: $pkg $(node -p "require('$NODE/node_modules/$pkg/package.json').version")"
    done
    echo "node: $(node --version)"
fi
if wanted chromium; then echo "chromium: $(chromium --version 2>/dev/null)"; fi
