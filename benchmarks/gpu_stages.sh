# What benchmarks/gpu_check.sh and gpu_extra.sh share (sourced, not run): the output folder and its
# summary, stages under hard time limits, and the setup and build stages.
#
# Before sourcing, set: out (the output folder, made here), budget_default_gpu and
# budget_default_cpu (seconds, when GPU_CHECK_BUDGET is unset). After it: root, py, device (cuda or
# cpu), jobs, budget, wheels; the functions below. Environment: see gpu_check.sh.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 2
mkdir -p "$out" && out="$(cd "$out" && pwd)" || exit 2
py="${PYTHON:-python3}"
wheels="${GPU_CHECK_WHEELS:-$root/.whl}"
export PYTHONUNBUFFERED=1
start=$SECONDS
if "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  device=cuda
else
  device=cpu
  export TRITON_INTERPRET=1  # the Triton kernels on CPU tensors, through Triton's interpreter
fi
budget="${GPU_CHECK_BUDGET:-$([ "$device" = cuda ] && echo "$budget_default_gpu" || echo "$budget_default_cpu")}"
jobs="$(nproc)"
summary="$out/summary.tsv"
[ -f "$summary" ] || printf 'stage\tstatus\tseconds\tnote\n' > "$summary"
note=""

pytest_args=(-q -rfEs -p no:cacheprovider --durations=20)
if [ "$device" = cuda ] && "$py" -c "import xdist" 2>/dev/null; then
  # Each Triton specialisation compiles on first use, on one core per process: workers compile in
  # parallel.
  parallel=(-n "$jobs")
else
  parallel=()
fi

pack() {
  [ -n "${GPU_CHECK_ARCHIVE:-}" ] || return 0
  tar czf "$GPU_CHECK_ARCHIVE.part" -C "$(dirname "$out")" "$(basename "$out")" &&
    mv "$GPU_CHECK_ARCHIVE.part" "$GPU_CHECK_ARCHIVE"
}

# record STAGE STATUS SECONDS NOTE: a line of the summary (and of the terminal), then OUTDIR packed.
record() {
  printf '%s\t%s\t%s\t%s\n' "$@" >> "$summary"
  printf '%-12s %-12s %5ss  %s\n' "$@"
  pack
}

left() { echo $((budget - (SECONDS - start))); }

# limit CAP [CPU_CAP]: a stage's time limit, CAP seconds (CPU_CAP without a GPU, where Triton is
# interpreted and nothing runs on a GPU) or what is left of the budget if less.
limit() {
  local l cap=$1
  [ "$device" = cpu ] && [ $# -gt 1 ] && cap=$2
  l=$(left)
  echo $((l < cap ? l : cap))
}

# run STAGE LIMIT SIGNAL COMMAND...: COMMAND under `timeout`, its output in OUTDIR/STAGE.log, its
# status (pass, fail (rc N), timeout) and $note in the summary. Give pytest SIGINT: it still writes
# its JUnit XML then.
run() {
  local name=$1 limit=$2 signal=$3 t0=$SECONDS rc status
  shift 3
  if [ "$limit" -lt 10 ]; then
    record "$name" skipped 0 "budget spent ($(left) s left of $budget)"
    return 1
  fi
  echo "\$ $*   (limit ${limit}s)" >> "$out/$name.log"
  timeout -s "$signal" -k 20 "$limit" "$@" >> "$out/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=pass ;;
    124 | 137) status=timeout ;;
    *) status="fail (rc $rc)" ;;
  esac
  record "$name" "$status" $((SECONDS - t0)) "$note"
  note=""
  return $rc
}

# setup: versions and device into setup.log; the wheels in $wheels (nvidia-cutlass: the machine
# has no network) installed into a folder of their own, $cutlass_site, that only the build reads.
setup_stage() {
  local t0=$SECONDS setup_note
  {
    date -u
    echo "commit $(git rev-parse HEAD 2>/dev/null || echo none)$(git diff --quiet HEAD 2>/dev/null ||
      echo ' (uncommitted changes)')"
    uname -a
    echo "cores: $jobs"
    nvidia-smi 2>&1
    "$py" -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
      'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')"
    "$py" -c "import triton; print('triton', triton.__version__)"
    command -v nvcc && nvcc --version | tail -2
    command -v compute-sanitizer cuobjdump
  } > "$out/setup.log" 2>&1
  cutlass_site="${TMPDIR:-/tmp}/fastfa-gpu-check-site"
  rm -rf "$cutlass_site"
  if ! ls "$wheels"/*.whl > /dev/null 2>&1; then
    setup_note="$device; no wheels in $wheels: without nvidia-cutlass the cuda backend has no fused kernels"
  elif "$py" -m pip install -q --no-index --no-deps --no-compile --target "$cutlass_site" "$wheels"/*.whl \
      >> "$out/setup.log" 2>&1; then
    setup_note="$device; installed $(cd "$wheels" && echo *.whl)"
  else
    setup_note="$device; installing the wheels in $wheels failed (setup.log)"
  fi
  record setup done $((SECONDS - t0)) "$setup_note"
}

# build: pip install -e . with every core, for the visible GPU only (setup.py takes the
# architecture from the device: 9.0a on an H200). If the fused kernels fail to build, again without
# the CUTLASS headers, so the aten and triton backends are still checked on the GPU. Then the
# backends' status: cuda_status, triton_status ("usable" or why not).
build_stage() {
  local built
  if [ -d "$cutlass_site" ]; then
    PYTHONPATH="$cutlass_site${PYTHONPATH:+:$PYTHONPATH}" note="with the CUTLASS headers" _build
  else
    note="without CUTLASS headers" _build
  fi
  built=$?
  if [ $built -ne 0 ] && [ "$device" = cuda ] && [ -d "$cutlass_site" ]; then
    note="again without CUTLASS: no fused cuda kernels, the aten backend's CUDA transform only" _build
  fi
  "$py" -m fastfa info >> "$out/build.log" 2>&1
  cuda_status=$(_backend_status cuda)
  triton_status=$(_backend_status triton)
  echo "backends: cuda: $cuda_status; triton: $triton_status" | tee -a "$out/build.log"
}

_build() {
  MAX_JOBS="$jobs" run build "$(limit 300 1200)" TERM "$py" -m pip install --no-build-isolation --no-deps -v -e .
}

_backend_status() {
  "$py" -c "import fastfa; s = fastfa.backends()['$1']; print('usable' if s.usable else s.reason)" 2>&1 | tail -1
}

# results_file WHAT: OUTDIR/<date>-<device>-WHAT.json, named as benchmarks/results/ names runs.
results_file() {
  echo "$out/$(date -u +%F)-$("$py" -c "import torch; from fastfa.bench import device_name, slug
print(slug(device_name(torch.device('$device'))))" 2>/dev/null || echo "$device")-$1.json"
}

# warm_stage AUTOTUNE CAP: compiles the Triton kernels that the default `fastfa bench` on the GPU meets,
# one bench process per rule at a time (one round, Triton only), so that the bench finds them in
# Triton's cache: each specialisation compiles on first use on one core, about 1.5 s per autotune
# configuration, which the bench would otherwise pay one after another (README, "GPU check").
warm_stage() {
  if [ "$device" != cuda ]; then
    record warm skipped 0 "no GPU: the interpreter compiles nothing"
    return
  elif [ "$triton_status" != usable ]; then
    record warm skipped 0 "the triton backend is not usable"
    return
  fi
  mkdir -p "$out/warm"
  note="FASTFA_TRITON_AUTOTUNE=$1; a process per rule"
  FASTFA_TRITON_AUTOTUNE=$1 run warm "$(limit "$2")" TERM bash -c '
    for rule in $("$0" -c "import fastfa; print(*fastfa.RULES)"); do
      "$0" -m fastfa bench --device cuda --rules "$rule" --backends triton --peers none --repeat 1 --no-memory \
        --no-plot --out "$1/warm/$rule.json" > "$1/warm/$rule.log" 2>&1 &
    done
    failed=0
    for pid in $(jobs -p); do wait "$pid" || failed=1; done
    cat "$1"/warm/*.log
    exit $failed' "$py" "$out"
  rm -rf "$out/warm"
}
