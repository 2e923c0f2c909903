#!/usr/bin/env bash
# The cuda backend's GPU suite, on a machine with an NVIDIA GPU (sm_80 or later):
#   1. build fastfa for the visible GPU (9.0a on an H100: wgmma) with the CUTLASS headers;
#   2. the GPU tests (every kernel against tests/oracle.py) and the SASS test;
#   3. compute-sanitizer memcheck and racecheck over one ragged case of every kernel family;
#   4. the benchmark (every rule, cuda and aten backends, torch backprop in the same run),
#      written as benchmarks/results/<date>-<gpu>-bench.json.
# Usage: bash benchmarks/gpu_suite.sh            (from anywhere; runs in the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."

pip install nvidia-cutlass==4.2.0.0 nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm
pip install --no-build-isolation -e .
python -m fastfa info

python -m pytest -q tests/test_cuda.py tests/test_sass.py -s

sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
# One ragged shape, every rule and dtype: each fused kernel (forward, identity, the four
# transforms; bf16, fp16, tf32) runs at least once, plus the exact-transform test.
cases="cuda_backend and (37x67x129 and none or transform_is)"
for tool in memcheck racecheck; do
  "$sanitizer" --tool "$tool" --error-exitcode 1 \
    python -m pytest -q -x tests/test_cuda.py -k "$cases" -p no:cacheprovider
done

python -m fastfa bench --device cuda --dtype bf16 --ops linear --backends cuda,aten
