#!/usr/bin/env bash
# The GPU check of real-model training and serving, in one run of about 8 minutes on one GPU:
#   1. the gpu-marked tests (bf16 loading and scoring, fp32 master weights under bf16 autocast
#      with a lr-1e-5 step that moves the weights, the trainer's rounds on CUDA);
#   2. one SFT, one RM and one PPO-ptx round of the trainer on the 0.5b shape with the BPE
#      family (chat template, grouped-query attention) on CUDA, bf16 compute, bf16 published
#      (scripts/gpu_rounds.py): seconds and peak GPU memory per round;
#   3. the serving benchmark at that size (bench/bench_serving.py, native engine, bf16).
# Every step's output goes to $OUT (or .rlhf/gpu_check) and the last line is one JSON summary.
#
#   scripts/gpu_check.sh                 # 0.5b on cuda
#   scripts/gpu_check.sh tiny cpu        # the same steps at tiny size on CPU (a smoke run)
#
# RLHF_PYTHON names the Python to use (default: the project's environment, scripts/bootstrap.sh).
# The gpu tests that need a Kafka broker (Java) report an error where none can start.
set -uo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
size=${1:-0.5b}
device=${2:-cuda}
py=${RLHF_PYTHON:-$("$root/scripts/bootstrap.sh")/bin/python}
out=${OUT:-$root/.rlhf/gpu_check}
mkdir -p "$out"
export PYTHONPATH="$root" PYTHONUNBUFFERED=1
if [ "$device" = cpu ]; then
  dtype=float32 examples=16 episodes=8 serving=(--prompts 8 --concurrency 1,8)
else
  dtype=bfloat16 examples=64 episodes=32 serving=(--prompts 32 --concurrency 1,32)
fi
status=()

step() {  # step NAME COMMAND...: runs it, logs to $out/NAME.log, records seconds and exit code
  local name=$1 start rc
  shift
  echo "== $name: $*"
  start=$(date +%s)
  "$@" 2>&1 | tee "$out/$name.log"
  rc=${PIPESTATUS[0]}
  status+=("\"$name\": {\"exit\": $rc, \"seconds\": $(( $(date +%s) - start ))}")
  echo "== $name: exit $rc after $(( $(date +%s) - start )) s"
}

if [ "$device" = cpu ]; then
  echo "== gpu_tests: skipped on cpu (they need a CUDA device)"
  status+=("\"gpu_tests\": {\"exit\": null, \"seconds\": 0}")
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  step gpu_tests "$py" -m pytest -m gpu -q -p no:cacheprovider tests
fi
step rounds "$py" scripts/gpu_rounds.py --size "$size" --tokenizer bpe --device "$device" \
  --examples "$examples" --episodes "$episodes"
step serving "$py" bench/bench_serving.py --sizes "$size" --tokenizer bpe --device "$device" \
  --dtype "$dtype" --no-vllm --no-hf-cb --rounds 1 --passes 1 "${serving[@]}"

rounds=$(tail -n 1 "$out/rounds.log")
serving_json=$(tail -n 1 "$out/serving.log")
steps=$(IFS=,; echo "${status[*]}")
summary="{\"check\": \"gpu_check\", \"size\": \"$size\", \"device\": \"$device\", \"steps\": {$steps}, \"rounds\": ${rounds:-null}, \"serving\": ${serving_json:-null}}"
echo "$summary" | tee "$out/summary.json"
for s in "${status[@]}"; do
  case $s in *'"exit": 0,'* | *'"exit": null,'*) ;; *) exit 1 ;; esac
done
