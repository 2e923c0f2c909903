#!/usr/bin/env bash
# The GPU check: one command that builds fastfa for the visible GPU and checks and times every
# fused kernel, in under 8 minutes on an H200 with no network (benchmarks/README.md, "GPU check").
#
#   bash benchmarks/gpu_check.sh [OUTDIR]      (default OUTDIR: build/gpu-check-<UTC time>)
#
# Stages, most important first, each under a hard time limit cut to what is left of the budget:
#   setup   versions and device; the wheels of .whl/ (nvidia-cutlass) installed offline
#   build   pip install -e . for the visible GPU only, every core; if the fused kernels fail to
#           build, again without CUTLASS, and the summary says so
#   cuda    tests/test_cuda.py and tests/test_sass.py: every fused cuda kernel against the oracle; and
#           test_host_path.py's capture test: a training step of every rule (fp32 and bf16 autocast)
#           captured whole in a CUDA graph replays as eager steps (seconds)
#   auto    benchmarks/auto_dispatch.py (under 90 s): "auto" against the aten and the all-fused
#           cuda paths, and the passes of the cost model; benchmarks/fit_auto_costs.py fits its
#           constants from them (end of auto.log)
#   triton  tests/test_triton_*.py: every Triton kernel against the oracle and aten at ragged and
#           real sizes, every rule and dtype, one autotune configuration (FASTFA_TRITON_AUTOTUNE=0);
#           test_triton_tma.py first (Linear grad_input through tensor descriptors, TMA, which no
#           CPU can run compiled, against its pointer path and the oracle)
#   warm    the bench's Triton kernels compiled in parallel, a process per rule (GPU only)
#   bench   the default `fastfa bench` on the device under --budget (without the torch.compile
#           peer), results in design/gpu.md's shape
#   rest    the rest of tests/ on the device, with whatever time is left
# Each stage writes OUTDIR/<stage>.log (and <stage>.xml, JUnit, for pytest) as it runs, and a line
# to OUTDIR/summary.tsv (stage, status, seconds, note) when it ends, so a run cut short still
# leaves what it did. Without a GPU the same stages run on the CPU, a rehearsal: Triton under its
# interpreter, the cuda stage skipped with its reason, the bench on the CPU.
#
# Environment:
#   GPU_CHECK_BUDGET   seconds for the whole check (default 480 with a GPU, 3600 without)
#   GPU_CHECK_WHEELS   folder of wheels installed offline for the build (default .whl)
#   GPU_CHECK_ARCHIVE  a .tar.gz path: OUTDIR is packed there after every stage (for a caller that
#                      can take back only a few files)
#   GPU_CHECK_BENCH_AUTOTUNE  FASTFA_TRITON_AUTOTUNE for the bench (default 0; gpu_extra.sh's
#                      bench autotunes: full autotuning compiles for longer than this check lasts)
#   PYTHON             the interpreter (default python3)
set -uo pipefail
out="${1:-$(cd "$(dirname "$0")/.." && pwd)/build/gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
budget_default_gpu=480
budget_default_cpu=3600
. "$(dirname "$0")/gpu_stages.sh"

setup_stage
build_stage

if [ "$device" != cuda ]; then
  record cuda skipped 0 "no GPU visible: the cuda kernels need one"
elif [ "$cuda_status" != usable ]; then
  record cuda skipped 0 "the cuda backend is not usable: $cuda_status"
else
  run cuda "$(limit 120)" INT "$py" -m pytest "${pytest_args[@]}" "${parallel[@]}" --junitxml="$out/cuda.xml" \
    tests/test_cuda.py tests/test_sass.py tests/test_auto_dispatch.py \
    tests/test_host_path.py::test_a_training_step_captured_in_a_cuda_graph_replays_as_eager_steps
fi

# "auto" against each forced path, and the passes its cost model is made of (README, "auto" on a
# GPU); the constants fitted from them go to auto.log, for the model's defaults (AutoCosts in
# csrc/include/fastfa/dispatch.h; fastfa._backend.set_auto_costs at run time).
if [ "$device" != cuda ] || [ "$cuda_status" != usable ]; then
  record auto skipped 0 "needs the cuda backend on a GPU"
else
  auto_json=$(results_file gpu-check-auto)
  note="$(basename "$auto_json"); fitted constants at the end of auto.log"
  if run auto "$(limit 90)" TERM "$py" benchmarks/auto_dispatch.py --budget 60 --out "$auto_json"; then
    "$py" benchmarks/fit_auto_costs.py "$auto_json" >> "$out/auto.log" 2>&1
    pack
  fi
fi

if [ "$triton_status" != usable ]; then
  record triton skipped 0 "the triton backend is not usable: $triton_status"
else
  note=$([ "$device" = cuda ] && echo "one autotune configuration (FASTFA_TRITON_AUTOTUNE=0)" ||
    echo "under Triton's interpreter")
  FASTFA_TRITON_AUTOTUNE=0 run triton "$(limit 180 1200)" INT "$py" -m pytest "${pytest_args[@]}" "${parallel[@]}" \
    --junitxml="$out/triton.xml" tests/test_triton_tma.py tests/test_triton_*.py
fi

bench_autotune="${GPU_CHECK_BENCH_AUTOTUNE:-0}"
warm_stage "$bench_autotune" 150
bench_json=$(results_file gpu-check-bench)
bench_limit=$(limit 200 600)
# The bench's --budget is for its timed rounds; compiling and warming up come on top.
bench_args=(bench --device "$device" --budget "$(limit 80 30)" --out "$bench_json")
# On a GPU the torch.compile peer compiles with max-autotune, minutes per rule: gpu_extra.sh times it.
[ "$device" = cuda ] && bench_args+=(--peers autograd)
note="FASTFA_TRITON_AUTOTUNE=$bench_autotune; $(basename "$bench_json")"
if FASTFA_TRITON_AUTOTUNE="$bench_autotune" run bench "$bench_limit" TERM "$py" -m fastfa "${bench_args[@]}"; then
  # The results file names the command that ran, its environment included.
  "$py" - "$bench_json" "$bench_autotune" <<'EOF' >> "$out/bench.log" 2>&1
import json, sys
path, autotune = sys.argv[1:]
results = json.load(open(path))
results["command"] = f"FASTFA_TRITON_AUTOTUNE={autotune} {results['command']}"
with open(path, "w") as f:
    json.dump(results, f, indent=2)
EOF
  pack
fi

others=()
for test in tests/test_*.py; do
  case $test in tests/test_cuda.py | tests/test_sass.py | tests/test_triton_*.py) ;;
    # with the cuda stage's run of it
    tests/test_auto_dispatch.py) [ "$device" = cuda ] && [ "$cuda_status" = usable ] || others+=("$test") ;;
    *) others+=("$test") ;; esac
done
note="what was left of the budget"
FASTFA_TRITON_AUTOTUNE=0 run rest "$(limit 100000)" INT "$py" -m pytest "${pytest_args[@]}" "${parallel[@]}" \
  --junitxml="$out/rest.xml" "${others[@]}"

echo "total $((SECONDS - start)) s of a budget of $budget s; summary: $summary"
