#!/usr/bin/env bash
# Launch `xlstm-train train` with the DeepSpeed launcher (parallel.engine=deepspeed).
#
#   launch/deepspeed.sh --recipe recipes/large/1.3b.yaml parallel.zero_stage=2
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh --recipe ...   # several nodes (pdsh + ssh)
#
# Environment:
#   HOSTFILE     MPI-style hostfile (`host slots=N` per line); without it, this node only
#   NUM_GPUS     GPUs per node to use (default: all visible)
#   MASTER_ADDR  (multi-node) address of the first host; default: the launcher's choice
#   MASTER_PORT  default 29500
#
# The launcher starts one process per GPU with RANK/LOCAL_RANK/WORLD_SIZE set; the trainer reads
# them (no --local_rank argument is passed). engine=deepspeed is forced here so the recipe need not
# say it.
#
# Preemption (docs/operations.md): the DeepSpeed launcher kills its workers outright on SIGTERM, so
# this script passes SIGTERM and SIGUSR1 to this node's workers itself (as SIGTERM); each finishes
# its step, writes a checkpoint and exits. With a HOSTFILE, signal the script on every node.
set -euo pipefail

args=(--master_port "${MASTER_PORT:-29500}" --no_python --no_local_rank)
if [[ -n "${HOSTFILE:-}" ]]; then
  args+=(--hostfile "$HOSTFILE")
  [[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
fi
[[ -n "${NUM_GPUS:-}" ]] && args+=(--num_gpus "$NUM_GPUS")

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}

deepspeed "${args[@]}" xlstm-train train "$@" parallel.engine=deepspeed &
launcher_pid=$!

descendants() {  # every process below $1
  local child
  for child in $(pgrep -P "$1" || true); do
    echo "$child"
    descendants "$child"
  done
}

stop_workers() {
  # the workers are the processes running the xlstm-train script itself (the launchers only name it)
  local pid
  for pid in $(descendants "$launcher_pid"); do
    if tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q '/xlstm-train train'; then
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
}

trap stop_workers TERM USR1
trap ':' INT  # Ctrl-C reaches the launcher itself (same process group), which kills the workers at once
while true; do
  status=0
  wait "$launcher_pid" || status=$?
  kill -0 "$launcher_pid" 2>/dev/null || break  # wait returns early when a trapped signal arrives
done
exit "$status"
