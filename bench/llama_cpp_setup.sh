#!/usr/bin/env bash
# Bench-only: llama.cpp as `rexedge bench --baseline llama.cpp` (the CPU peer), never a rexedge dependency.
#
#   bash bench/llama_cpp_setup.sh CHECKPOINT OUT          # in rexedge's dev venv (torch, transformers)
#   rexedge bench --model CHECKPOINT --weights int4 int8 --baseline llama.cpp --llama-cpp OUT --scenario rex-omni-3b
#
# 1. downloads llama.cpp's source: the copy vendored in the llama-cpp-python source package on PyPI
#    (pinned: LLAMA_CPP_PYTHON_VERSION, default below), into OUT/src;
# 2. builds llama-bench, llama-mtmd-cli and llama-quantize (cmake, Release, CPU, native) into OUT/build/bin,
#    in the background with JOBS parallel jobs (default 2; log: OUT/build.log), while
# 3. llama.cpp's own convert_hf_to_gguf.py converts CHECKPOINT to OUT/gguf/model-F16.gguf and its vision
#    projector (--mmproj) to OUT/gguf/mmproj-F16.gguf, through bench/llama_cpp_convert.py, which works around
#    the converter's tokenizer checks (tokens do not change speed; see that file). The converter's one extra
#    package, sentencepiece, goes to OUT/pydeps, not into the venv;
# 4. llama-quantize makes OUT/gguf/model-Q8_0.gguf and model-Q4_K_M.gguf from the F16 file;
# 5. OUT/source.json names the checkpoint (rexedge bench checks that --model is the same one).
# LLAMA_CPP_NO_AMX=1 builds without AMX (-mno-amx-*): for a VM whose CPU lists AMX but traps its tile
# instructions (llama-bench and llama-mtmd-cli die of SIGILL in ggml_backend_amx_mul_mat on Q4_K_M / Q8_0
# models; seen 2026-12-05 on an Intel Xeon VM). Changing it rebuilds in the same build folder.
# Each step is skipped when its output exists, so a rerun resumes. On the shared 2-core machine: build ~27 min,
# conversion ~3 min, quantization ~10 min; disk: ~0.4 GB of source and build, ~13 GB of GGUF for a 3B model.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: bash bench/llama_cpp_setup.sh CHECKPOINT OUT" >&2
    exit 2
fi
CKPT=$(realpath "$1")
OUT=$(realpath -m "$2")
if [ ! -f "$CKPT/config.json" ]; then
    echo "llama_cpp_setup: $CKPT is not a checkpoint directory (no config.json)" >&2
    exit 2
fi
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
JOBS=${JOBS:-2}
PY=${PYTHON:-python}
SRC="$OUT/src/llama_cpp_python-$VERSION"
LLAMA="$SRC/vendor/llama.cpp"
GGUF="$OUT/gguf"
mkdir -p "$OUT/src" "$GGUF"

if [ ! -f "$LLAMA/CMakeLists.txt" ]; then
    echo "llama_cpp_setup: downloading llama-cpp-python $VERSION (source) for its vendored llama.cpp"
    "$PY" -m pip download --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$OUT/src"
    tar xzf "$OUT/src/llama_cpp_python-$VERSION.tar.gz" -C "$OUT/src"
fi

TOOLS=(llama-bench llama-mtmd-cli llama-quantize)
GENERATOR=()
if command -v ninja > /dev/null; then
    GENERATOR=(-G Ninja)
fi
EXTRA_CMAKE=()
if [ "${LLAMA_CPP_NO_AMX:-0}" = 1 ]; then
    NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"   # GCC keeps explicit -mno-* over what -march=native implies
    EXTRA_CMAKE=(-DCMAKE_C_FLAGS="$NO_AMX" -DCMAKE_CXX_FLAGS="$NO_AMX")
else
    EXTRA_CMAKE=(-DCMAKE_C_FLAGS= -DCMAKE_CXX_FLAGS=)
fi
build() {
    cmake -S "$LLAMA" -B "$OUT/build" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF "${EXTRA_CMAKE[@]}"
    cmake --build "$OUT/build" -j "$JOBS" --target "${TOOLS[@]}"
}
echo "llama_cpp_setup: building ${TOOLS[*]} with $JOBS jobs in the background (log: $OUT/build.log)"
build > "$OUT/build.log" 2>&1 &
BUILD=$!

"$PY" -m pip install --quiet --no-deps --target "$OUT/pydeps" sentencepiece
convert() {  # OUTFILE, then the converter's arguments
    local outfile=$1
    shift
    if [ ! -f "$outfile" ]; then
        echo "llama_cpp_setup: converting to $outfile"
        PYTHONPATH="$OUT/pydeps" "$PY" -P -m rexedge.bench.llama_cpp_convert "$CKPT" --llama-cpp "$LLAMA" -- \
            "$@" --outtype f16 --model-name "$(basename "$CKPT")" --outfile "$outfile.part"
        mv "$outfile.part" "$outfile"
    fi
}
convert "$GGUF/model-F16.gguf"
convert "$GGUF/mmproj-F16.gguf" --mmproj

if ! wait "$BUILD"; then
    echo "llama_cpp_setup: the build failed; the end of $OUT/build.log:" >&2
    tail -20 "$OUT/build.log" >&2
    exit 1
fi
for quant in Q8_0 Q4_K_M; do
    if [ ! -f "$GGUF/model-$quant.gguf" ]; then
        echo "llama_cpp_setup: quantizing to $quant"
        "$OUT/build/bin/llama-quantize" "$GGUF/model-F16.gguf" "$GGUF/model-$quant.gguf.part" "$quant" "$JOBS"
        mv "$GGUF/model-$quant.gguf.part" "$GGUF/model-$quant.gguf"
    fi
done
"$PY" - "$CKPT" "$OUT/source.json" <<'EOF'
import json, sys
checkpoint, out = sys.argv[1:]
with open(f"{checkpoint}/config.json", encoding="utf-8") as f:
    json.dump({"checkpoint": checkpoint, "config_json": json.load(f)}, open(out, "w", encoding="utf-8"), indent=1)
EOF
echo "llama_cpp_setup: done: ${TOOLS[*]} in $OUT/build/bin, the GGUF files in $GGUF"
