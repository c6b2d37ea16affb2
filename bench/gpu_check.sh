#!/usr/bin/env bash
# bench/gpu_check.sh: the GPU checks in one run of at most ~8 minutes, for a CUDA machine lent
# for a few minutes (e.g. one H200, 16 CPU cores, no internet) that gets a copy of this working tree.
#
#   bash bench/gpu_check.sh                        # on the GPU machine, from the repository root or anywhere
#   GPU_CHECK_DEVICE=cpu bash bench/gpu_check.sh    # a smoke run of the script itself on a CPU: tiny sizes
#
# It installs nothing and reaches nothing over the network: it uses the python it finds ($PYTHON, else python3,
# else python) with whatever torch that has, prints both first, and skips (saying so) what a missing dependency
# rules out. Three parts, each under its own timeout, each printing the tail of its log (all logs stay in
# $GPU_CHECK_ROOT, default /tmp/gpu_check/logs):
#   1. parity (160 s): MOE_VLM_TEST_DEVICE=$DEVICE pytest tests/test_device.py, i.e. calibrate -> gptq (batched
#      act-order, AWQ, ECMFQ + vision tower, VEQ-MA resumed) -> eval on the device under the guard that raises on
#      a tensor made without a device, our model on the device against transformers on the CPU, and a
#      quantization on the device against the same one on the CPU; plus tests/test_qwen.py and tests/test_kimi.py
#      (the transformers oracle itself, on the CPU). Needs pytest; the oracle tests need transformers.
#   2. streaming (200 s): bench/streaming.py --family qwen --layers 1 2 --device $DEVICE --dtype bfloat16: the real
#      driver on random real-width Qwen3-VL-30B-A3B layers (128 experts of 768, hidden 2048), the seconds per
#      layer (T_2 - T_1) and torch's peak GPU memory. Needs safetensors, tokenizers, pillow, numpy; ~4 GB of disk.
#   3. solver (90 s): bench/gptq_solver.py --device $DEVICE: batched GPTQ of a 128-expert layer against the
#      per-expert loop, and the batched solver's rate as a fraction of the device's fp32 matmul rate.
# Last line, one summary (n/a where a part was skipped, TIMEOUT / FAIL(rc) where it did not finish):
#   gpu_check: device=cuda torch=<v> parity=PASS(<passed>) streaming_s_per_layer=<s> peak_gb=<GPU peak, N=2>
#              solver_speedup=<loop / batched> solver_x_matmul=<batched fraction of the matmul rate>
# Knobs: GPU_CHECK_DEVICE (cuda), GPU_CHECK_ROOT (/tmp/gpu_check), PYTHON, OMP_NUM_THREADS (8),
# GPU_CHECK_TIMEOUT_SCALE (1: multiplies every part's timeout, for a smoke run on a slow shared CPU).

set -u
cd "$(dirname "$0")/.." || exit 1
DEVICE=${GPU_CHECK_DEVICE:-cuda}
ROOT=${GPU_CHECK_ROOT:-/tmp/gpu_check}
LOGS=$ROOT/logs
PY=${PYTHON:-$(command -v python3 || command -v python)}
SCALE=${GPU_CHECK_TIMEOUT_SCALE:-1}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1  # no network, no litter in the tree
mkdir -p "$LOGS"

if [ "$DEVICE" = cpu ]; then  # smoke sizes: the commands start, finish and parse; the numbers mean nothing
  TESTS=(tests/test_device.py -k "guard or retry or cuda_without")
  STREAM=(--experts 2 --samples 2)
  SOLVER=(--experts 2 --reference-experts 1 --repeats 1)
else
  TESTS=(tests/test_device.py tests/test_qwen.py tests/test_kimi.py)
  STREAM=(--samples 8)
  SOLVER=(--experts 128 --reference-experts 4 --repeats 2)
fi

# run_part NAME SECONDS CMD...: run under a timeout, log to $LOGS/NAME.log, show its tail; returns the exit code
run_part() {
  local name=$1 secs=$(($2 * SCALE)) t0=$SECONDS rc
  shift 2
  echo "== $name (timeout ${secs}s): $*"
  timeout -k 10 "$secs" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  tail -n 12 "$LOGS/$name.log" | sed 's/^/   | /'
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  return "$rc"
}

# field KEY LINE: the value of KEY=value in LINE (n/a if absent)
field() {
  local v
  v=$(printf '%s\n' "$2" | tr ' ' '\n' | sed -n "s/^$1=//p" | head -n 1)
  echo "${v:-n/a}"
}

# outcome RC: TIMEOUT or FAIL(rc) for a part that did not finish
outcome() {
  if [ "$1" -eq 124 ] || [ "$1" -eq 137 ]; then echo TIMEOUT; else echo "FAIL($1)"; fi
}

echo "== environment"
if ! "$PY" -c 'import torch; print(torch.__version__, torch.cuda.is_available())'; then
  echo "gpu_check: $PY cannot import torch; nothing run"
  exit 1
fi
"$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| CUDA build",
torch.version.cuda, "| GPUs", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])'
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
TORCH=$("$PY" -c 'import torch; print(torch.__version__)')
if [ "${DEVICE%%:*}" = cuda ] && ! "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_check: device=$DEVICE torch=$TORCH: CUDA is not available to this python; nothing run" \
       "(GPU_CHECK_DEVICE=cpu for a smoke run)"
  exit 2
fi
missing() {  # the modules among $@ this python cannot import
  "$PY" -c 'import importlib.util as u, sys; print(" ".join(m for m in sys.argv[1:] if u.find_spec(m) is None))' "$@"
}
CORE_MISSING=$(missing safetensors tokenizers PIL numpy)
TEST_MISSING=$(missing pytest)
ORACLE_MISSING=$(missing transformers)
[ -n "$CORE_MISSING" ] && echo "missing: $CORE_MISSING (the model code needs them): parity and streaming are skipped"
[ -n "$TEST_MISSING" ] && echo "missing: pytest: the parity tests are skipped"
[ -n "$ORACLE_MISSING" ] && echo "missing: transformers: the tests that compare against it are skipped"

# 1. parity and the pipeline on the device
PARITY="SKIP(missing ${CORE_MISSING}${TEST_MISSING})"
if [ -z "$CORE_MISSING$TEST_MISSING" ]; then
  K=()
  if [ -n "$ORACLE_MISSING" ]; then  # without the oracle: the device tests that do not need it
    TESTS=(tests/test_device.py)
    K=(-k "not parity")
  fi
  MOE_VLM_TEST_DEVICE=$DEVICE run_part parity 160 "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" \
    ${K[@]+"${K[@]}"}
  rc=$?
  counts=$(grep -E '[0-9]+ (passed|failed|error)' "$LOGS/parity.log" | tail -n 1)
  passed=$(printf '%s\n' "$counts" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+')
  failed=$(printf '%s\n' "$counts" | grep -oE '[0-9]+ (failed|errors?)' | tr '\n' ' ')
  if [ "$rc" -eq 0 ]; then PARITY="PASS(${passed:-0})"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then PARITY="TIMEOUT(${passed:-0}_passed)"
  else PARITY="FAIL(${failed:-rc=$rc}${passed:-0} passed)"; PARITY=${PARITY// /_}; fi
  [ -n "$ORACLE_MISSING" ] && PARITY="$PARITY,no-transformers"
fi

# 2. a real-width 2-layer quantization on the device
S_LAYER=n/a PEAK=n/a
if [ -z "$CORE_MISSING" ]; then
  if run_part streaming 200 "$PY" bench/streaming.py --family qwen --layers 1 2 --device "$DEVICE" \
       --dtype bfloat16 --threads "$OMP_NUM_THREADS" --root "$ROOT/streaming" --guard-gb 2 "${STREAM[@]}"; then
    line=$(grep '^streaming:' "$LOGS/streaming.log" | tail -n 1)
    S_LAYER=$(field s_per_layer "$line")
    PEAK=$(field device_peak_n2_gb "$line")
    [ "$PEAK" = n/a ] && PEAK="host:$(field peak_n2_gb "$line")"  # on a CPU: the process's VmHWM
  else
    S_LAYER=$(outcome $?)
  fi
fi

# 3. the batched GPTQ solver against the per-expert loop
SPEEDUP=n/a FRACTION=n/a
if run_part solver 90 "$PY" bench/gptq_solver.py --device "$DEVICE" --threads "$OMP_NUM_THREADS" "${SOLVER[@]}"; then
  line=$(grep '^gptq_solver:' "$LOGS/solver.log" | tail -n 1)
  SPEEDUP=$(field speedup "$line")
  FRACTION=$(field matmul_fraction "$line")
else
  SPEEDUP=$(outcome $?)
fi

echo "gpu_check: device=$DEVICE torch=$TORCH parity=${PARITY// /_} streaming_s_per_layer=$S_LAYER peak_gb=$PEAK" \
     "solver_speedup=$SPEEDUP solver_x_matmul=$FRACTION"
