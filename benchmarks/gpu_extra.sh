#!/usr/bin/env bash
# What the GPU check (gpu_check.sh) leaves out to stay under 8 minutes, as further stages of the
# same kind (logs, JUnit XML, summary.tsv in OUTDIR as they run; benchmarks/README.md, "GPU check"):
#
#   bash benchmarks/gpu_extra.sh OUTDIR [graphstep] [sanitizer] [bench] [sweep] [tma]   (default: the first four)
#
#   graphstep  issue 14's proof of CUDA graphs: the capture tests (a training step of every rule in
#              torch.cuda.graph, and under torch.compile(mode="reduce-overhead")), then
#              benchmarks/cuda_graph_step.py: the ResNet-18 step at batch 32 and 256, bf16, each rule
#              and torch's backprop eager and in a CUDA graph (about 1-2 minutes on an H200)
#   sanitizer  compute-sanitizer memcheck and racecheck over one ragged case of every kernel
#              family: each fused cuda kernel (linear and conv2d: forward, identity, the four
#              transforms, conv grad_weight; bf16, fp16, tf32) and each Triton kernel
#              (forward, grad_input, grad_weight; a drawn, a learned and a plain rule)
#   bench      the default `fastfa bench` on the device: every peer (torch.compile with
#              max-autotune), Triton fully autotuned (its kernels compiled first, a process per rule)
#   sweep      `fastfa bench --full`: longer than one 10-minute command on an H200; give it its own
#              command and budget
#   tma        benchmarks/triton_tma.py: the Triton Linear grad_input through tensor descriptors
#              (TMA) against its pointer loads and backprop's matmul, bf16 4096x4096, autotuned
# Each call builds first (setup and build as in gpu_check.sh; a second call on the same machine
# rebuilds only what changed). Environment as gpu_check.sh; GPU_CHECK_BUDGET defaults to 540 s
# with a GPU (one device command) and 3600 without.
set -uo pipefail
if [ $# -lt 1 ]; then
  echo "usage: bash benchmarks/gpu_extra.sh OUTDIR [graphstep] [sanitizer] [bench] [sweep] [tma]" >&2
  exit 2
fi
out=$1
shift
if [ $# -gt 0 ]; then stages=("$@"); else stages=(graphstep sanitizer bench sweep); fi
for stage in "${stages[@]}"; do
  case $stage in graphstep | sanitizer | bench | sweep | tma) ;; *)
    echo "gpu_extra.sh: unknown stage '$stage' (expected graphstep, sanitizer, bench, sweep or tma)" >&2
    exit 2 ;;
  esac
done
budget_default_gpu=540
budget_default_cpu=3600
. "$(dirname "$0")/gpu_stages.sh"

setup_stage
build_stage

sanitizer_stage() {
  local sanitizer tool
  sanitizer=$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")
  if [ "$device" != cuda ]; then
    record sanitizer skipped 0 "no GPU visible"
    return
  elif [ ! -x "$sanitizer" ]; then
    record sanitizer skipped 0 "compute-sanitizer not found"
    return
  fi
  for tool in memcheck racecheck; do
    if [ "$cuda_status" = usable ]; then
      run "$tool-cuda" "$(limit 150)" INT "$sanitizer" --tool "$tool" --error-exitcode 1 \
        "$py" -m pytest "${pytest_args[@]}" -x --junitxml="$out/$tool-cuda.xml" tests/test_cuda.py \
        -k "cuda_backend and (37x67x129 and none or transform_is or 3-5-7-6-6-3-1-1-1)"
    else
      record "$tool-cuda" skipped 0 "the cuda backend is not usable: $cuda_status"
    fi
    FASTFA_TRITON_AUTOTUNE=0 run "$tool-triton" "$(limit 150)" INT "$sanitizer" --tool "$tool" --error-exitcode 1 \
      "$py" -m pytest "${pytest_args[@]}" -x --junitxml="$out/$tool-triton.xml" tests/test_triton_linear.py \
      tests/test_triton_conv2d.py -k "oracle and (bp or brsf or ia)"
  done
}

# graphstep: the capture tests first (their failure says why a rule's row below has an error), then
# the step timed. The tests skip without a GPU; the benchmark is then a CPU rehearsal, eager only.
graphstep_stage() {
  local results
  results=$(results_file cuda-graph-step)
  run graphstep-tests "$(limit 150 300)" INT "$py" -m pytest "${pytest_args[@]}" "${parallel[@]}" \
    --junitxml="$out/graphstep-tests.xml" \
    tests/test_host_path.py::test_a_training_step_captured_in_a_cuda_graph_replays_as_eager_steps \
    tests/test_host_path.py::test_a_training_step_compiled_with_reduce_overhead_replays_as_eager_steps \
    "tests/test_cuda_graph_step.py::test_the_step_is_timed_per_rule_and_mode_against_torch[cuda]"
  note="$(basename "$results") and its .md"
  run graphstep "$(limit 180 900)" TERM "$py" benchmarks/cuda_graph_step.py --budget 60 --out "$results"
}

for stage in "${stages[@]}"; do
  case $stage in
    graphstep) graphstep_stage ;;
    sanitizer) sanitizer_stage ;;
    bench)
      warm_stage 1 400
      run bench "$(limit 100000)" TERM "$py" -m fastfa bench --device "$device" --out "$(results_file bench)" ;;
    sweep) run sweep "$(limit 100000)" TERM "$py" -m fastfa bench --device "$device" --full \
      --out "$(results_file full-bench)" ;;
    tma) run tma "$(limit 100000)" TERM "$py" benchmarks/triton_tma.py --out "$(results_file triton-tma)" ;;
  esac
done
echo "total $((SECONDS - start)) s of a budget of $budget s; summary: $summary"
