#!/usr/bin/env bash
# The GPU check (design §7): one run on one lent GPU, ≤ 8 minutes, no downloads, a verdict at the end.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run  # on any machine: the script's logic, GPU steps stubbed
#
# Steps (each time-boxed; boxes shrink so that the whole run fits TOTAL_S):
#   1. preflight: nvidia-smi, torch with CUDA, triton, nvcc, cmake, ninja, a C++ compiler, pybind11
#      (versions printed); no GPU → exit 3 within seconds, saying so;
#   2. build in place (setup.py build_ext --inplace, CUDA for this GPU's arch only); if the CUDA part
#      fails, again with EPIKERN_CUDA=0 so that the Triton and CPU backends are still verified;
#   3. the GPU tests (`-m "gpu or triton"` over tests/backends and tests/ops: the CUDA kernels on
#      every path, Triton compiled, draft_uncertainty on every GPU backend, forward_kl fwd/bwd) with
#      EPIKERN_SKIP_REAL=1, -rfE and junit XML; pytest is stopped with SIGINT at its box, so its
#      summary is always printed;
#   4. the kernel benchmarks (benchmarks/bench_gpu.py, which also runs bench_forward_kl.py);
#   5. the verdict (benchmarks/gpu_verdict.py): each step, the tests, fractions of copy bandwidth,
#      ratios against torch.compile and Liger; exit 1 naming every failed step.
#
# Liger-Kernel is used when importable: put it in ./.gpu_deps beforehand
# (pip install --no-deps --target .gpu_deps liger-kernel); that folder joins PYTHONPATH.
# Environment: OUT (logs, junit XML, bench JSON; default a new temporary folder), PYTHON (default
# python3), TOTAL_S (450), BUILD_S (170), TEST_S (200), BENCH_S (110), TEST_WORKERS (8, with
# pytest-xdist). Dry run only: GPU_CHECK_FAIL=build_cuda|tests|bench makes that stub fail (tests the
# failure paths).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "gpu_check: unknown argument '$1' (use --dry-run or --help)" >&2; exit 2 ;;
esac

OUT_DIR=${OUT:-$(mktemp -d -t gpu_check.XXXXXX)}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
TOTAL_S=${TOTAL_S:-450}
BUILD_S=${BUILD_S:-170}
TEST_S=${TEST_S:-200}
BENCH_S=${BENCH_S:-110}
FAIL_STUB=${GPU_CHECK_FAIL:-}
STEPS="$OUT_DIR/gpu_check_steps.tsv"   # step <TAB> ok|FAIL|skipped <TAB> detail
: > "$STEPS"
if [ -d "$ROOT/.gpu_deps" ]; then
  export PYTHONPATH="$ROOT/.gpu_deps${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export EPIKERN_SKIP_REAL=1 TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}

record() { printf '%s\t%s\t%s\n' "$1" "$2" "$3" >> "$STEPS"; }
no_gpu() {
  echo "gpu_check: FAILED: no GPU: $1" >&2
  record preflight FAIL "no GPU: $1"
  exit 3
}
# Seconds for a step: its default, less if the steps after it need `reserve` of what is left.
box() {
  local want=$1 left=$((TOTAL_S - SECONDS - $2))
  ((left < want)) && want=$left
  ((want < 15)) && want=15
  echo "$want"
}
# run_step NAME SECONDS LOG CMD...: run CMD time-boxed (SIGINT first, so Python prints its
# summary), output to LOG; returns CMD's status (124 on a timeout) without tripping `set -e`.
run_step() {
  local name=$1 secs=$2 log=$3 rc=0
  shift 3
  echo "== $name (≤ ${secs}s, log $log)"
  timeout -s INT -k 20 "$secs" bash -c '"$@"' run_step "$@" > "$log" 2>&1 || rc=$?
  return "$rc"
}
# the steps below are shell functions that run_step's `bash -c` calls: export them and their inputs
export DRY_RUN PY FAIL_STUB
# A dry-run stub of a GPU step: fails when GPU_CHECK_FAIL names it.
stub() {
  echo "dry run: stub of step '$1'"
  [ "$FAIL_STUB" != "$1" ] || { echo "dry run: GPU_CHECK_FAIL=$1 makes this stub fail"; return 1; }
}
export -f stub

# --- 1. preflight ---------------------------------------------------------------------------
echo "== preflight"
arch=""
if ((DRY_RUN)); then
  echo "dry run: no GPU needed; the build, the GPU tests and the benchmarks are stubbed"
else
  command -v nvidia-smi > /dev/null || no_gpu "nvidia-smi not found (no NVIDIA driver on this machine)"
  smi=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
    --format=csv,noheader 2>&1) || no_gpu "nvidia-smi failed: $smi"
  echo "gpu: $smi"
  cap=$(echo "$smi" | head -1 | awk -F', ' '{print $4}')
  case $cap in
    9.0) arch="90a-real" ;;
    [0-9]*.[0-9]*) arch="${cap/./}-real" ;;
  esac
fi
"$PY" - "$DRY_RUN" <<'PY' || no_gpu "torch sees no CUDA device (torch.cuda.is_available() is False)"
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
sys.exit(0 if sys.argv[1] == "1" or torch.cuda.is_available() else 1)
PY
tools=""
for t in "triton:$PY -c 'import triton; print(triton.__version__)'" \
         "pybind11:$PY -c 'import pybind11; print(pybind11.__version__)'" \
         "nvcc:nvcc --version | tail -1" "cmake:cmake --version | head -1" \
         "ninja:ninja --version" "c++:c++ --version | head -1"; do
  name=${t%%:*}
  if version=$(eval "${t#*:}" 2> /dev/null) && [ -n "$version" ]; then
    echo "$name: $version"
    tools+="$name ok, "
  else
    echo "$name: MISSING"
    tools+="$name MISSING, "
  fi
done
record preflight ok "${smi:-dry run}; ${tools%, }"

# --- 2. build -------------------------------------------------------------------------------
build_s=$(box "$BUILD_S" $((TEST_S + BENCH_S)))
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
build() {  # build EPIKERN_CUDA_VALUE
  if ((DRY_RUN)); then
    [ "$1" = 0 ] || stub build_cuda || return
    "$PY" -c "import epikern._cpu" && echo "dry run: the compiled epikern._cpu in the tree imports"
  else
    EPIKERN_CUDA=$1 EPIKERN_CUDA_ARCHS=${EPIKERN_CUDA_ARCHS:-$arch} "$PY" setup.py build_ext --inplace
  fi
}
export -f build
export arch
if run_step "build: epikern._cpu + epikern._cuda (arch ${arch:-default})" "$build_s" \
    "$OUT_DIR/gpu_check_build.log" build 1; then
  record "build (CUDA)" ok "epikern._cpu and epikern._cuda built"
else
  rc=$?
  tail -30 "$OUT_DIR/gpu_check_build.log"
  record "build (CUDA)" FAIL "rc $rc (gpu_check_build.log); retried with EPIKERN_CUDA=0"
  if run_step "build: epikern._cpu only (EPIKERN_CUDA=0)" "$(box 90 $((TEST_S + BENCH_S)))" \
      "$OUT_DIR/gpu_check_build_cpu.log" build 0; then
    record "build (EPIKERN_CUDA=0)" ok "epikern._cpu built; the cuda backend is not verified"
  else
    rc=$?
    tail -30 "$OUT_DIR/gpu_check_build_cpu.log"
    record "build (EPIKERN_CUDA=0)" FAIL "rc $rc (gpu_check_build_cpu.log)"
  fi
fi
backends=$("$PY" -c "import epikern.backends as b; print(' '.join(n for n in b.BACKENDS if b.is_available(n)))" 2>&1) \
  || backends="epikern does not import: $backends"
echo "available backends: $backends"

# --- 3. GPU tests ---------------------------------------------------------------------------
test_s=$(box "$TEST_S" "$BENCH_S")
junit="$OUT_DIR/gpu_tests.xml"
pytest_args=(-m "gpu or triton" -rfE -q -p no:cacheprovider --durations=10 --junitxml="$junit")
if ((DRY_RUN)); then
  # the same selection, cut to tests that skip quickly without a GPU
  pytest_args+=(-k "int64_offsets or scorer_device" tests/backends tests/ops)
  [ "$FAIL_STUB" != tests ] || pytest_args+=(tests/backends/does_not_exist.py)
else
  "$PY" -c "import xdist" 2> /dev/null && pytest_args+=(-n "${TEST_WORKERS:-8}")
  pytest_args+=(tests/backends tests/ops)
fi
rc=0
run_step "GPU tests: pytest ${pytest_args[*]}" "$test_s" "$OUT_DIR/gpu_tests.log" \
  "$PY" -m pytest "${pytest_args[@]}" || rc=$?
# the summary (and -rfE's failure list) is at the end of the log, also after a timeout
tail -n 40 "$OUT_DIR/gpu_tests.log"
case $rc in
  0) record tests ok "pytest passed" ;;
  124 | 130) record tests FAIL "stopped at its ${test_s}s box (rc $rc)" ;;
  *) record tests FAIL "pytest rc $rc" ;;
esac

# --- 4. benchmarks --------------------------------------------------------------------------
bench_s=$(box "$BENCH_S" 10)
bench_json="$OUT_DIR/bench_gpu.json"
if ((DRY_RUN)); then
  bench() { stub bench && "$PY" benchmarks/bench_gpu.py --device cpu --tiny --no-compile --budget 3 --json "$bench_json"; }
else
  # its own budget ends before the box, leaving time for bench_forward_kl.py and the tables
  bench() { "$PY" benchmarks/bench_gpu.py --device cuda --budget $((bench_s > 60 ? bench_s - 30 : 30)) \
    --json "$bench_json"; }
fi
export -f bench
export bench_s bench_json
rc=0
run_step "benchmarks: bench_gpu.py" "$bench_s" "$OUT_DIR/bench_gpu.log" bench || rc=$?
if ((rc == 0)); then
  record bench ok "bench_gpu.json"
else
  tail -20 "$OUT_DIR/bench_gpu.log"
  record bench FAIL "rc $rc (bench_gpu.log)"
fi

# --- 5. verdict -----------------------------------------------------------------------------
echo "== verdict (${SECONDS}s; logs in $OUT_DIR)"
"$PY" benchmarks/gpu_verdict.py --steps "$STEPS" --junit "$junit" --bench "$bench_json" \
  --backends "$backends" --seconds "$SECONDS"
