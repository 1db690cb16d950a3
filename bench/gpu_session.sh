#!/usr/bin/env bash
# Everything a lent GPU is needed for, in one call of the device tool (its lease is short):
#   run(command="bash bench/gpu_session.sh \"$OUT\"", timeout_s=600)
# 1. the GPU machine's versions; 2. rexedge installed into its python (no downloads: the
# image holds torch, triton, onnxruntime, transformers, tokenizers, pillow, pytest);
# 3. the kernel tests compiled on the GPU and the CUDA backend == CPU backend token test;
# 4. python -m rexedge.bench.kernels (bandwidth, decode ms/token, TTFT, transformers);
# 5. rexedge bench with the torch CUDA backend on the cpu-bench preset (the harness path);
# 6. batched decoding on the torch CUDA backend (tests: batched == alone; figures: images/s and the
#    single-token step at max_batch 1, 4 and 16, python -m rexedge.bench.batched);
# 7. the trt backend's batched decoding (tests/test_trt_batched.py: stand-ins, and the real engines where
#    TensorRT is installed; the test skips and says so where it is not).
# Each step logs to OUT/<step>.log and goes on after a failure; a summary ends the output.
# Record the figures in bench/RESULTS.md with the device and the date.
set -uo pipefail
out=${1:-gpu-session}
mkdir -p "$out"
# PYTHONSAFEPATH: run from the repository root, our kernels/ would shadow the `kernels` package
# that transformers imports (README)
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 PYTHONSAFEPATH=1
python=${PYTHON:-python3}
summary=()

step() {   # step NAME COMMAND...: run, log, time, remember the exit status
    local name=$1 start=$SECONDS
    shift
    echo "=== $name: $*"
    "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    summary+=("$name: exit $rc, $((SECONDS - start)) s")
}

step env bash -c "nvidia-smi; $python -c 'import torch, triton; print(torch.__version__, triton.__version__, \
torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).multi_processor_count, \"SMs\")'"
step install "$python" -m pip install --no-deps --no-build-isolation --no-index -e .
step tests "$python" -m pytest -q -x tests/test_kernel_restricted_head.py tests/test_kernel_decode_attention.py \
    tests/test_kernel_rmsnorm.py tests/test_torch_cuda.py
step batched-tests "$python" -m pytest -q tests/test_torch_cuda.py -k "batch"
# the trt backend's batched decoding on real engines (skips itself where TensorRT is not installed)
step trt-batched-tests "$python" -m pytest -q -rs tests/test_trt_batched.py
step kernels "$python" -m rexedge.bench.kernels --out "$out/kernels.json"
step harness "$python" -m rexedge.runtime.cli bench --model cpu-bench --backend torch --device cuda \
    --scenario det-448 det-1428x812 --repeats 3 --warmup 1 --json "$out/harness.json"
step batched "$python" -m rexedge.bench.batched --model cpu-bench --backend torch --device cuda --scenario det-448 \
    --images 16 --max-batch 1 4 16 --repeats 3 --warmup 1 --json "$out/batched-cuda.json"

echo "=== summary"
printf '%s\n' "${summary[@]}"
