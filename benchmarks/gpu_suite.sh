#!/usr/bin/env bash
# The GPU suite of the triton and cuda backends, on a machine with an NVIDIA GPU (sm_80 or later):
#   1. build fastfa for the visible GPU (9.0a on an H100: wgmma) with the CUTLASS headers;
#   2. the GPU tests (every kernel of both backends against tests/oracle.py and the aten
#      backend, at ragged and real sizes), the SASS test, then the whole suite on the GPU;
#   3. compute-sanitizer memcheck and racecheck over one ragged case of every kernel family;
#   4. the benchmark (every rule, every backend, torch backprop and the peers in the same run),
#      written as benchmarks/results/<date>-<gpu>-bench.json, then the full sweep.
# Usage: bash benchmarks/gpu_suite.sh            (from anywhere; runs in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

pip install nvidia-cutlass==4.2.0.0 nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
pip install --no-build-isolation -e .
python -m fastfa info

python -m pytest -q tests/test_cuda.py tests/test_sass.py tests/test_triton_*.py -s
python -m pytest -q tests

sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
# One ragged shape, every rule and dtype: each fused kernel (linear and conv2d: forward,
# identity, the four transforms, conv grad_weight; bf16, fp16, tf32) runs at least once,
# plus the exact-transform test.
cases="cuda_backend and (37x67x129 and none or transform_is or 3-5-7-6-6-3-1-1-1)"
for tool in memcheck racecheck; do
  "$sanitizer" --tool "$tool" --error-exitcode 1 \
    python -m pytest -q -x tests/test_cuda.py -k "$cases" -p no:cacheprovider
  "$sanitizer" --tool "$tool" --error-exitcode 1 \
    python -m pytest -q -x tests/test_triton_linear.py tests/test_triton_conv2d.py -k "oracle and (bp or brsf or ia)" \
    -p no:cacheprovider
done

python -m fastfa bench --device cuda --backends cuda,triton,aten
python -m fastfa bench --device cuda --backends cuda,triton,aten --full \
  --out "benchmarks/results/$(date +%F)-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr '[:upper:]' '[:lower:]')-full-bench.json"
