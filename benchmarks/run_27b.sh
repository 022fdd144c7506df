#!/usr/bin/env bash
# The full-size benchmark in one command, baselines in the same call, then the table and the results file.
#   bash benchmarks/run_27b.sh OUTDIR [extra bench_27b.py arguments for the engine run]
# TP=2 (default; 2 GPUs, ~6 min on 2xH200): ds-qwen-vision at tp=2, then transformers' single-GPU
#   baselines side by side (eager on GPU 0, static cache + compile on GPU 1).
# TP=1 (one GPU, ~6 min on an H200): ds-qwen-vision at tp=1, then transformers' static cache + compile on
#   the same card after it (one at a time: both hold the whole 51 GiB of weights, and timings must not share).
# CHECK=1: then benchmarks/gpu_check.py on the serving path at the same tp (OUTDIR/gpu_check.log; ~5 min).
# Writes OUTDIR/{engine,eager,static}.json + logs, OUTDIR/table.md, and OUTDIR/DATE-CARD-tpN-decode.json
# (copy it into benchmarks/results/ and commit it).
set -uo pipefail
out=${1:?usage: [TP=1|2] run_27b.sh OUTDIR [bench_27b.py args]}
shift
TP=${TP:-2}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
if [ "$TP" = 1 ]; then
    python3 benchmarks/bench_27b.py --out "$out/engine.json" "$@" > "$out/engine.log" 2>&1 || tail -30 "$out/engine.log"
    python3 benchmarks/bench_27b.py --baseline static --streams 0 --out "$out/static.json" > "$out/static.log" 2>&1 \
        || tail -30 "$out/static.log"
else
    deepspeed --num_gpus "$TP" benchmarks/bench_27b.py --out "$out/engine.json" "$@" > "$out/engine.log" 2>&1 \
        || { tail -30 "$out/engine.log"; exit 1; }
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/bench_27b.py --baseline eager --out "$out/eager.json" > "$out/eager.log" 2>&1 &
    CUDA_VISIBLE_DEVICES=1 python3 benchmarks/bench_27b.py --baseline static --out "$out/static.json" > "$out/static.log" 2>&1 &
    wait
fi
python3 benchmarks/report.py "$out"/engine.json "$out"/eager.json "$out"/static.json | tee "$out/table.md"
python3 benchmarks/bench_27b.py --collect "$out"/engine.json "$out"/static.json "$out"/eager.json --results-dir "$out" \
    --command "TP=$TP bash benchmarks/run_27b.sh OUT $*"
if [ "${CHECK:-0}" = 1 ]; then
    launcher=python3
    [ "$TP" != 1 ] && launcher="deepspeed --num_gpus $TP"
    { python3 benchmarks/gpu_check.py build --dir "$out/gc" \
        && python3 benchmarks/gpu_check.py ref --dir "$out/gc" --out "$out/ref.pt" \
        && $launcher benchmarks/gpu_check.py runner --dir "$out/gc" --out "$out/runner.pt" \
        && python3 benchmarks/gpu_check.py compare "$out/ref.pt" "$out/runner.pt"; } > "$out/gpu_check.log" 2>&1
    tail -4 "$out/gpu_check.log"
fi
