#!/usr/bin/env bash
# The full-size benchmark in one command (2 GPUs, ~6 min on 2xH200): ds-qwen-vision at tp=2, then
# transformers' single-GPU baselines (eager on GPU 0, static cache + compile on GPU 1, side by side)
# on the same machine, then the table.
#   bash benchmarks/run_27b.sh OUTDIR [extra bench_27b.py arguments for the engine run]
set -uo pipefail
out=${1:?usage: run_27b.sh OUTDIR}
shift
mkdir -p "$out"
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
deepspeed --num_gpus 2 benchmarks/bench_27b.py --out "$out/engine.json" "$@" > "$out/engine.log" 2>&1 \
    || { tail -30 "$out/engine.log"; exit 1; }
CUDA_VISIBLE_DEVICES=0 python3 benchmarks/bench_27b.py --baseline eager --out "$out/eager.json" > "$out/eager.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 python3 benchmarks/bench_27b.py --baseline static --out "$out/static.json" > "$out/static.log" 2>&1 &
wait
python3 benchmarks/report.py "$out"/engine.json "$out"/eager.json "$out"/static.json | tee "$out/table.md"
