#!/usr/bin/env bash
# Start ds-qwen-vision: the model ranks under the deepspeed launcher, and the HTTP front under gunicorn.
#
#   ./launch.sh                                  the embedded demo: tiny checkpoint, CPU ranks, tp=2, 127.0.0.1:8000
#   ./launch.sh --config ds_config/FILE.json     a real deployment
#   overrides: --model DIR --host H --port N --tp N --gpus 2,3 --device cpu|cuda --dtype float32|bfloat16
#   ./launch.sh --prebuild [--config ...]        load and warm up once, filling the compile caches; serve nothing
#
# Exit codes (for a supervisor): 0 after a requested shutdown (SIGTERM/SIGINT) that finished cleanly;
# 2 for a bad config or arguments; anything else means a rank or the front died: restart it.
# SIGTERM drains: new requests get 503 while those in flight finish, for up to server.shutdown_grace_s.
set -uo pipefail
cd "$(dirname "$0")"
export PYTHONUNBUFFERED=1
# Nothing outlives this script (ds_qwen_vision/lifeline.py): the ranks watch this pid, the front dies with it.
export DSQV_LAUNCHER_PID=$$
# NVLink multicast can take a shared host's GPUs down; NCCL does fine without it.
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
trap 'exit 0' TERM INT  # stopped before anything started: nothing to clean up
usage() {
    echo "usage: ./launch.sh [--prebuild] [--config FILE] [--model DIR] [--host H] [--port N] [--tp N] [--gpus 2,3]"
    echo "                   [--device cpu|cuda] [--dtype float32|bfloat16]"
    echo "  no arguments: the embedded demo (tiny checkpoint, CPU ranks, tp=2) on 127.0.0.1:8000 (README.md)"
}
# The flags' names are checked here, their values by ds_qwen_vision.config (the same overrides).
for (( i = 1; i <= $#; i++ )); do
    case ${!i} in
        -h|--help) usage; exit 0 ;;
        --prebuild) (( i == 1 )) || { usage >&2; echo "launch.sh: --prebuild comes first" >&2; exit 2; } ;;
        --config|--model|--host|--port|--tp|--gpus|--device|--dtype)
            (( i++ < $# )) || { usage >&2; echo "launch.sh: ${!#} needs a value" >&2; exit 2; } ;;
        --config=*|--model=*|--host=*|--port=*|--tp=*|--gpus=*|--device=*|--dtype=*) ;;
        *) usage >&2; echo "launch.sh: unknown argument ${!i}" >&2; exit 2 ;;
    esac
done
prebuild=0
if [[ "${1:-}" == "--prebuild" ]]; then prebuild=1; shift; fi

# Compiled kernels (inductor), Triton's compiled kernels and its autotune results persist here, so a
# restart on the same machine skips compiling and tuning (warm-up then only loads them).
cache_root=${DSQV_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ds-qwen-vision}
compile_cache=${DSQV_COMPILE_CACHE_DIR:-$cache_root/compile}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$compile_cache/inductor}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$compile_cache/triton}
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}  # autotune results on disk, not re-benchmarked
mkdir -p "$TORCHINDUCTOR_CACHE_DIR" "$TRITON_CACHE_DIR" || exit 1

config_json=$(python3 -m ds_qwen_vision.config "$@" --dump) || exit 2
get() { python3 -c 'import json,sys; v=json.loads(sys.argv[1]); [v := v[k] for k in sys.argv[2].split(".")]; print(v)' "$config_json" "$1"; }
model=$(get model)
tp=$(get tensor_parallel.tp_size)
device=$(get device)
socket=$(get server.ipc_socket)

if [[ "$model" == "demo" ]]; then
    # The embedded demo: build the tiny real-format checkpoint once, into a cache folder.
    demo_dir=$(python3 -m ds_qwen_vision.checkpoint --demo-dir) || exit 1
    python3 -m ds_qwen_vision.checkpoint --out "$demo_dir" --preset tiny --seed 0 >/dev/null || exit 1
fi
# Speculative decoding with the MTP head needs the checkpoint's mtp.* weights: a config error (2), before any rank.
if [[ "$(get speculative.method)" == "mtp" ]] && ! python3 -c 'import sys; from ds_qwen_vision.loading import has_mtp_weights
sys.exit(0 if has_mtp_weights(sys.argv[1]) else 1)' "${demo_dir:-$model}"; then
    echo "launch.sh: speculative.method is mtp but ${demo_dir:-$model} has no mtp.* weights (use ngram or none)" >&2
    exit 2
fi

# A socket that answers belongs to a running deployment (same server.ipc_socket, i.e. the same port by
# default): removing it would cut that deployment's front off its engine. Only a stale one goes.
if python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1])' "$socket" 2>/dev/null; then
    echo "launch.sh: $socket belongs to a running deployment; stop it first or set server.ipc_socket / --port" >&2
    exit 2
fi
rm -f "$socket" "$socket.pid"

# ---- Where the ranks run (ds_qwen_vision/launcher.py): the launcher's GPU selection (--include
# localhost:2,3, or --num_gpus on CPU), a master port of this deployment's own, and the checks that refuse
# (exit 2) what cannot work: tp not dividing the heads, the HTTP or master port taken, too few GPUs.
no_http=(); (( prebuild )) && no_http=(--no-http)  # a prebuild starts no front: its port may be in use
plan=$(python3 -m ds_qwen_vision.launcher "$@" ${demo_dir:+--model-dir "$demo_dir"} "${no_http[@]}") || exit $?  # 2: refused
eval "$plan"  # launcher_args=(...) master_port=N lock_gpus=(...)
# One lock per GPU, held (flock, on an fd this shell and the launcher inherit) until the deployment is gone,
# even by kill -9: a second deployment naming a GPU in use is refused instead of running out of memory.
for gpu in "${lock_gpus[@]}"; do
    lock="${DSQV_LOCK_DIR:-/tmp}/ds-qwen-vision-gpu$gpu.lock"
    exec {fd}<>"$lock" || exit 2
    if ! flock -n "$fd"; then
        echo "launch.sh: GPU $gpu is in use by another deployment ($(cat "$lock")); choose other GPUs (--gpus)" >&2
        exit 2
    fi
    echo "launch.sh pid $$, server.port $(get server.port)" >"$lock"
done
# ---- end of rank placement
# DeepSpeed JIT-builds its CPU all-reduce (shared memory) op at the CPU ranks' first start on a machine, silently.
ext_dir=${TORCH_EXTENSIONS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/torch_extensions}  # torch's (+ py311_cpu/ unless set)
built=$(compgen -G "$ext_dir/deepspeed_shm_comm/*.so"; compgen -G "$ext_dir/py*/deepspeed_shm_comm/*.so")
if [[ "$device" == "cpu" && -z "$built" ]]; then
    echo "launch.sh: first start on this machine: DeepSpeed builds its CPU communication op now," \
         "about 30 s with no output (once: cached in $ext_dir)" >&2
fi
if (( prebuild )); then  # the ranks' start-up alone (on the same GPUs), then exit: no socket, no front
    [[ "$device" == "cpu" ]] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ($(nproc) + tp - 1) / tp ))}
    env -u CUDA_VISIBLE_DEVICES deepspeed "${launcher_args[@]}" --module ds_qwen_vision.serve "$@" --prebuild; code=$?
    rm -f /dev/shm/deepspeed_allreduce_buffer_*_"$master_port"_*
    exit $code  # a rank's 2 is a config error (e.g. the memory planner's: no room for one request)
fi
# Should a rank die before doing so itself: its shared-memory buffer (model.init_distributed), rank 0's socket
# and pid file.
trap 'rm -f /dev/shm/deepspeed_allreduce_buffer_*_"$master_port"_* "$socket" "$socket.pid"' EXIT
[[ "$device" == "cpu" ]] && export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ($(nproc) + tp - 1) / tp ))}
# Own sessions (setsid): a terminal's Ctrl-C or a supervisor's SIGTERM reaches this script only, which then
# asks rank 0 to drain and stop the followers; the launcher itself would SIGTERM every rank at once.
stopping=0
early_stop=0  # stopped before rank 0 took its signal handler: its ranks were killed, which is no failure
ranks=
shutdown() {
    stopping=1
    # Rank 0 drains, then stops the followers; the front keeps answering meanwhile (503 to new requests) and
    # is stopped once the ranks are gone. Until rank 0 is up there is nothing to drain: its whole process
    # group (setsid: the launcher and every rank) goes at once.
    if [[ -f "$socket.pid" ]]; then
        kill -TERM "$(cat "$socket.pid")" 2>/dev/null
    elif [[ -n "$ranks" ]]; then
        early_stop=1
        kill -TERM -- "-$ranks" 2>/dev/null
    fi
}
trap shutdown TERM INT

# CUDA_VISIBLE_DEVICES is already in --include (as physical ids, which the launcher counts from all GPUs).
setsid env -u CUDA_VISIBLE_DEVICES deepspeed "${launcher_args[@]}" --module ds_qwen_vision.serve "$@" &
ranks=$!

# Wait for rank 0's socket (it opens it first thing; /health then reports loading, warming_up, ready)
# or for the ranks to fail.
until [[ -S "$socket" ]]; do
    if ! kill -0 "$ranks" 2>/dev/null; then
        wait "$ranks"; code=$?
        (( stopping )) && exit 0
        echo "launch.sh: the model ranks exited ($code) before becoming ready" >&2
        exit $(( code == 0 ? 1 : code ))  # a rank's 2 is a config error: the supervisor sees it
    fi
    sleep 0.5
done

export DSQV_CONFIG_JSON="$config_json"
export PROMETHEUS_MULTIPROC_DIR=$(mktemp -d -t dsqv-metrics.XXXXXX)
# lifeline: SIGQUIT (gunicorn's quick shutdown) to the front when this script dies, even by kill -9.
setsid python3 -m ds_qwen_vision.lifeline QUIT \
    gunicorn -c python:ds_qwen_vision.server.gunicorn_conf "ds_qwen_vision.server.app:create_app_from_env()" &
front=$!

# Whichever side ends first ends the other; `wait -n` returns early when a trapped signal arrives.
while kill -0 "$ranks" 2>/dev/null && kill -0 "$front" 2>/dev/null; do
    wait -n "$ranks" "$front"
done
if kill -0 "$ranks" 2>/dev/null; then
    if (( ! stopping )); then
        echo "launch.sh: the HTTP front exited; stopping the model ranks" >&2
        [[ -f "$socket.pid" ]] && kill -TERM "$(cat "$socket.pid")" 2>/dev/null
    fi
else
    kill -TERM "$front" 2>/dev/null
fi
# A signal arriving during `wait` makes it return early (128 + signal); wait again until the process is gone.
reap() { local code; while :; do wait "$1"; code=$?; kill -0 "$1" 2>/dev/null || return "$code"; done; }
reap "$ranks"; ranks_code=$?
reap "$front"; front_code=$?
rm -rf "$PROMETHEUS_MULTIPROC_DIR"
if (( stopping )) && (( ranks_code == 0 || early_stop )); then
    exit 0
fi
echo "launch.sh: model ranks exited $ranks_code, HTTP front exited $front_code" >&2
code=$(( ranks_code != 0 ? ranks_code : (front_code != 0 ? front_code : 1) ))
# 2 means a bad config to a supervisor, never a crash: the ranks return it for config errors found at start
# (serve.py: the memory planner, a missing MTP head); the front's 2 is not one
exit $(( code == 2 && ranks_code != 2 ? 1 : code ))
