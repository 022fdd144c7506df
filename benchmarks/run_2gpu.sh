#!/usr/bin/env bash
# Issue 16 on 2 GPUs (written for 2xH200), in parts that each fit one device command (10 minutes):
#   bash benchmarks/run_2gpu.sh OUT 1     all-reduce bench (messages + the 27B decode step with the peer path off,
#                                         one_shot, two_shot) and GPU correctness at tp=2 (gpu_check.py: the
#                                         serving path with NCCL and with one_shot, plain generate)       ~7 min
#   bash benchmarks/run_2gpu.sh OUT 2     the tp=2 benchmark with its baselines (run_27b.sh)             ~6-7 min
#   bash benchmarks/run_2gpu.sh OUT 3     the served benchmark through HTTP (bench_served.py --out DIR, plus --tp 2
#                                         where it has that option; skipped when absent)
#   bash benchmarks/run_2gpu.sh OUT all   all three, one after the other (no per-part time budget)
# Each part writes into OUT its results JSONs (DATE-CARD-tp2-WHAT.json where the script names them), a summary
# partN.txt (also printed) and partN.tgz with every log and raw output: the device tool returns at most 8 files.
# Every stage runs under a timeout inside the part's budget (PART_BUDGET_S, default 540 s), so a part returns
# what it has before the tool's 10-minute limit. Extra arguments: GPU_CHECK_ARGS (gpu_check.py runner mode),
# BENCH_27B_ARGS (engine run of run_27b.sh, default --profile), SERVED_ARGS (more bench_served.py arguments, e.g. --layers 16); DRY_RUN=1 lists
# the stages without running them.
# NVLink multicast stays off everywhere: NCCL (NCCL_NVLS_ENABLE=0), PyTorch symmetric memory
# (TORCH_SYMM_MEM_DISABLE_MULTICAST=1, backend CUDA) and NVSHMEM (NVSHMEM_DISABLE_NVLS=1).
set -uo pipefail
out=${1:?usage: run_2gpu.sh OUT 1|2|3|all}
part=${2:?usage: run_2gpu.sh OUT 1|2|3|all}
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
mkdir -p "$out"
out=$(cd "$out" && pwd)
source benchmarks/gpu_env.sh  # multicast off, the project's wheels from .whl

date=$(date -u +%F)
card=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0 2>/dev/null | sed 's/^NVIDIA //; s/ /-/g')
card=${card:-gpu}
name() { echo "$out/$date-$card-tp2-$1.json"; }
scratch=/tmp/dsqv-2gpu   # checkpoints and caches: not sent back
mkdir -p "$scratch"

collect() {  # the results JSONs (DATE-CARD-tpN-WHAT.json) a benchmark wrote into folder $1, into OUT
    find "$1" -maxdepth 1 -name '20??-??-??-*-tp*-*.json' -exec cp {} "$out/" \; 2>/dev/null
}

run_part() {  # run_part N: the stages of part N under its budget
    local n=$1 work="$scratch/part$1" summary="$out/part$1.txt"
    local budget=${PART_BUDGET_S:-540} start=$SECONDS
    [ "$part" = all ] && budget=100000
    rm -rf "$work" && mkdir -p "$work"
    : > "$summary"
    note() { echo "$*" | tee -a "$summary"; }
    stage() {  # stage NAME MAX_S CMD...: runs CMD with a timeout of min(MAX_S, what is left of the budget)
        local sname=$1 max=$2; shift 2
        local left=$((budget - (SECONDS - start) - 15))
        if [ "$left" -lt 30 ]; then note "SKIPPED $sname: ${left}s left of the ${budget}s budget"; return 1; fi
        [ "$max" -gt "$left" ] && max=$left
        local t0=$SECONDS
        if [ -n "${DRY_RUN:-}" ]; then note "DRY_RUN $sname (limit ${max}s): $*"; return 0; fi
        timeout --kill-after=15 "$max" "$@" > "$work/$sname.log" 2>&1
        local rc=$?
        note "$([ $rc = 0 ] && echo OK || echo FAILED) $sname rc=$rc $((SECONDS - t0))s (limit ${max}s): $*"
        [ $rc = 0 ] || tail -25 "$work/$sname.log" | sed 's/^/    /' | tee -a "$summary"
        return $rc
    }
    note "part $n on $(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | paste -sd, -), $(date -u +%FT%TZ)"
    note "torch $(python3 -c 'import torch; print(torch.__version__)' 2>&1), deepspeed $(python3 -c 'import deepspeed; print(deepspeed.__version__)' 2>/dev/null | tail -1)"
    local marker="$work/.start"
    touch "$marker"
    case $n in
    1)
        stage allreduce 330 deepspeed --num_gpus 2 benchmarks/allreduce_bench.py --out "$(name allreduce)" --profile
        local d="$scratch/gpu_check_ckpt"
        stage gpu_check_build 60 python3 benchmarks/gpu_check.py build --dir "$d" &&
        stage gpu_check_ref 120 python3 benchmarks/gpu_check.py ref --dir "$d" --out "$work/ref.pt" &&
        { # shellcheck disable=SC2086
          stage gpu_check_runner 180 deepspeed --num_gpus 2 benchmarks/gpu_check.py runner --dir "$d" \
              --out "$work/runner.pt" ${GPU_CHECK_ARGS:-};
          stage gpu_check_runner_compare 60 python3 benchmarks/gpu_check.py compare "$work/ref.pt" "$work/runner.pt"
          # the serving path again with the decode all-reduces over peer memory: against transformers, and
          # against the NCCL runner just above (same sums at tp=2, so the tokens should be identical)
          # shellcheck disable=SC2086
          stage gpu_check_runner_peer 180 deepspeed --num_gpus 2 benchmarks/gpu_check.py runner --dir "$d" \
              --out "$work/runner_peer.pt" --allreduce one_shot ${GPU_CHECK_ARGS:-};
          stage gpu_check_runner_peer_compare 60 python3 benchmarks/gpu_check.py compare "$work/ref.pt" \
              "$work/runner_peer.pt"
          stage gpu_check_peer_vs_nccl_compare 60 python3 benchmarks/gpu_check.py compare "$work/runner.pt" \
              "$work/runner_peer.pt"
          stage gpu_check_tp 120 deepspeed --num_gpus 2 benchmarks/gpu_check.py tp --dir "$d" --out "$work/tp2.pt"
          stage gpu_check_tp_compare 60 python3 benchmarks/gpu_check.py compare "$work/ref.pt" "$work/tp2.pt"; }
        for f in "$work"/gpu_check_*compare.log; do [ -f "$f" ] && { note "--- $(basename "$f")"; cat "$f" >> "$summary"; }; done
        ;;
    2)
        # shellcheck disable=SC2086
        stage bench_27b 540 bash benchmarks/run_27b.sh "$work/bench_27b" ${BENCH_27B_ARGS:---profile}
        [ -f "$work/bench_27b/table.md" ] && cp "$work/bench_27b/table.md" "$out/bench_27b-table.md"
        collect "$work/bench_27b"
        ;;
    3)
        if [ -f benchmarks/bench_served.py ]; then
            local args=${SERVED_ARGS:-}
            # bench_served.py was written for tp=1; ask for tp=2 where it has the option
            python3 benchmarks/bench_served.py --help 2>/dev/null | grep -q -- '--tp' && args="--tp 2 $args"
            # shellcheck disable=SC2086
            stage served 540 python3 benchmarks/bench_served.py --out "$work/served" $args
            collect "$work/served"
        else
            note "SKIPPED served: benchmarks/bench_served.py is not in this checkout"
        fi
        ;;
    esac
    # results JSONs the benchmarks wrote into the repository's own results folder during this part
    if [ -d benchmarks/results ]; then
        find benchmarks/results -name '*.json' -newer "$marker" -exec cp {} "$out/" \;
    fi
    note "part $n done in $((SECONDS - start))s"
    tar czf "$out/part$n.tgz" -C "$work" . 2>/dev/null
}

case $part in
    1|2|3) run_part "$part" ;;
    all) run_part 1; run_part 2; run_part 3 ;;
    *) echo "part must be 1, 2, 3 or all" >&2; exit 2 ;;
esac
ls -la "$out"
