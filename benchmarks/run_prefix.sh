#!/usr/bin/env bash
# The prefix-reuse benchmark on one GPU (tp=1, 27B shapes, random bf16), in one command:
#   bash benchmarks/run_prefix.sh OUT [extra bench_prefix.py arguments]
# writes OUT/DATE-CARD-tp1-prefix.json and OUT/prefix.log. The project's wheels, if the machine lacks
# DeepSpeed, come from .whl (benchmarks/gpu_env.sh), installed once into /tmp/site.
set -uo pipefail
out=${1:?usage: run_prefix.sh OUT [bench_prefix.py args]}
shift
repo=$(cd "$(dirname "$0")/.." && pwd)
cd "$repo"
mkdir -p "$out"
source benchmarks/gpu_env.sh  # multicast off, the project's wheels from .whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1
timeout 570 python3 benchmarks/bench_prefix.py --preset 27b --device cuda --dtype bfloat16 --out "$out" "$@" \
    > "$out/prefix.log" 2>&1
rc=$?
grep '^{' "$out/prefix.log"
[ $rc -eq 0 ] || tail -40 "$out/prefix.log"
exit $rc
