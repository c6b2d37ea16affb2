#!/usr/bin/env bash
# Every output of a matrix of methods and options, digested (bench/digest.py), to compare two versions of the code:
#   bash bench/bitwise.sh /tmp/old     (on the old commit)      bash bench/bitwise.sh /tmp/new     (on the new one)
#   python bench/digest.py --compare /tmp/old/digests.json /tmp/new/digests.json
# Both bundled models; every method at W3 g32 and W4A8 g32; --batched-experts, --quantize-vision,
# --all-experts-hessian, method ablation flags, two gloo processes, a resumed run, --fake-quant, calib/ (random and
# MACS) and an eval.py JSON. One thread everywhere (the float summation order depends on the thread count).
set -euo pipefail
OUT=${1:?usage: bench/bitwise.sh OUTDIR}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
mkdir -p "$OUT"
Q=models/tiny-qwen3-vl-moe; K=models/tiny-kimi-vl
METHODS="veq-ma gptq rtn awq smoothquant smoothquant-gptq veq-me veq ecs ecs-faq ecmfq"
run() { local name=$1; shift; echo "== $name"; python gptq.py --no-eval --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1; }
for m in q k; do
  model=$Q; [ $m = k ] && model=$K
  python calibrate.py --model $model --n 24 --out "$OUT/calib-$m" > "$OUT/calib-$m.log" 2>&1
  python calibrate.py --model $model --n 16 --select macs --out "$OUT/calibmacs-$m" > "$OUT/calibmacs-$m.log" 2>&1
  for meth in $METHODS; do
    c="$OUT/calib-$m"; [ $meth = ecmfq ] && c="$OUT/calibmacs-$m"
    run "$m-$meth-w3" --model $model --calib "$c" --method $meth --bits 3 --group-size 32
    run "$m-$meth-w4a8" --model $model --calib "$c" --method $meth --bits 4 --abits 8 --group-size 32
  done
  run "$m-veq-ma-batched" --model $model --calib "$OUT/calib-$m" --bits 3 --group-size 32 --batched-experts
  run "$m-gptq-vision" --model $model --calib "$OUT/calib-$m" --method gptq --bits 4 --sym --group-size 32 --quantize-vision
  run "$m-rtn-vision" --model $model --calib "$OUT/calib-$m" --method rtn --bits 4 --group-size 32 --quantize-vision
  run "$m-gptq-allexp" --model $model --calib "$OUT/calib-$m" --method gptq --bits 3 --group-size 32 --all-experts-hessian
done
C="$OUT/calib-q"
run q-veq-ma-ablate1 --model $Q --calib $C --bits 3 --group-size 32 --lam 0.5 --no-affinity --plain-dense --gamma-source grad_x_input
run q-veq-ma-ablate2 --model $Q --calib $C --bits 3 --group-size 32 --no-modality --gamma 3.0 --no-act-order
run q-veq-me-ablate --model $Q --calib $C --method veq-me --bits 3 --group-size 32 --no-gamma --no-beta
run q-veq-static --model $Q --calib $C --method veq --bits 4 --group-size 64 --sym --no-act-order --static-groups --percdamp 0.05
run q-ecs-opts --model $Q --calib $C --method ecs --bits 3 --group-size 32 --ecs-loss huber --ecs-omega prob --ecs-percentile 99 --ecs-grid 7
run q-ecs-opts2 --model $Q --calib $C --method ecs-faq --bits 3 --group-size -1 --ecs-loss mse --ecs-omega veq --eta 0.3
run q-gptq-starved --model $Q --calib $C --method gptq --bits 2 --group-size 32 --min-expert-tokens 80
run q-veq-ma-fake --model $Q --calib $C --bits 3 --group-size 32 --fake-quant
python eval.py --model "$OUT/q-veq-ma-w3" --reference $Q --n 40 --json "$OUT/eval-q.json" > "$OUT/eval-q.log" 2>&1
mkdir -p "$OUT/eval-q"; mv "$OUT/eval-q.json" "$OUT/eval-q/eval.json"
# two gloo processes
echo "== gloo"
python -m torch.distributed.run --standalone --nproc-per-node 2 gptq.py --no-eval --model $Q --calib $C --bits 3 \
  --group-size 32 --out "$OUT/q-veq-ma-gloo2" > "$OUT/q-veq-ma-gloo2.log" 2>&1
python -m torch.distributed.run --standalone --nproc-per-node 2 gptq.py --no-eval --model $K --calib "$OUT/calib-k" \
  --method ecs-faq --bits 4 --group-size 32 --batched-experts --quantize-vision --out "$OUT/k-ecs-faq-gloo2" > "$OUT/k-ecs-faq-gloo2.log" 2>&1
# a run interrupted after layer 1, then resumed
echo "== resume"
python - "$OUT" <<'PY' > "$OUT/q-gptq-resumed.log" 2>&1
import os, runpy, sys
out = sys.argv[1]
real = os.replace
def replace(src, dst):
    real(src, dst)
    if str(dst).endswith("layer_0001.json"):
        raise KeyboardInterrupt
os.replace = replace
sys.argv = ["gptq.py", "--no-eval", "--model", "models/tiny-qwen3-vl-moe", "--calib", out + "/calib-q", "--method", "gptq",
            "--bits", "3", "--group-size", "32", "--out", out + "/q-gptq-resumed"]
try:
    runpy.run_path("gptq.py", run_name="__main__")
except KeyboardInterrupt:
    print("interrupted after layer 1")
PY
run q-gptq-resumed --model $Q --calib $C --method gptq --bits 3 --group-size 32 --resume
grep -c "restored from" "$OUT/q-gptq-resumed.log"
python bench/digest.py "$OUT/digests.json" $(ls -d "$OUT"/*/)
