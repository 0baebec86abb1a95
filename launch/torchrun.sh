#!/usr/bin/env bash
# Launch `xlstm-train train` with torchrun, on one node or as one node of several.
#
#   launch/torchrun.sh --recipe recipes/large/1.3b.yaml parallel.tp=2 parallel.compile=true
#
# Environment (defaults for a single node):
#   NPROC_PER_NODE  processes on this node          (default: the number of visible GPUs, else 1)
#   NNODES          nodes in the job                (default: 1)
#   NODE_RANK       this node's index, 0..NNODES-1  (default: 0)
#   MASTER_ADDR     host of node 0 (rendezvous)     (default: 127.0.0.1)
#   MASTER_PORT     its port                        (default: 29500)
#   LOG_DIR         where each rank's full stdout/stderr is kept (default: runs/launch-logs)
#
# Every node runs this script with the same NNODES/MASTER_ADDR/MASTER_PORT and its own NODE_RANK.
# The console shows local rank 0 only (and the trainer logs from global rank 0 only); all ranks'
# output is in LOG_DIR. If any rank fails, torchrun stops all workers on every node and prints the
# failing rank; collectives time out after parallel.timeout_s instead of hanging.
#
# Preemption (docs/operations.md): SIGTERM or SIGUSR1 sent to this script reach every worker as
# SIGTERM through torchrun; each finishes its step, writes a checkpoint and exits. torchrun kills
# workers still running SHUTDOWN_TIMEOUT seconds (default 600) later. Ctrl-C reaches torchrun
# directly, which passes it on once; a second Ctrl-C stops the workers at once.
set -euo pipefail

if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python3 -c "import torch; print(max(torch.cuda.device_count(), 1))")
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
LOG_DIR=${LOG_DIR:-runs/launch-logs}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}
# how long torchrun waits for workers to checkpoint after passing on a stop signal (torch >= 2.9 reads it)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-600}

torchrun \
  --nnodes "$NNODES" \
  --node-rank "$NODE_RANK" \
  --nproc-per-node "$NPROC_PER_NODE" \
  --master-addr "$MASTER_ADDR" \
  --master-port "$MASTER_PORT" \
  --max-restarts 0 \
  --log-dir "$LOG_DIR" --tee 3 \
  --local-ranks-filter 0 \
  --no-python \
  xlstm-train train "$@" &
torchrun_pid=$!

# torchrun passes SIGTERM on to its workers, but SIGUSR1 would end torchrun itself: both become SIGTERM.
trap 'kill -TERM "$torchrun_pid" 2>/dev/null || true' TERM USR1
trap ':' INT  # the terminal's Ctrl-C reaches torchrun itself (same process group)
while true; do
  status=0
  wait "$torchrun_pid" || status=$?
  # wait returns early (status > 128) when a trapped signal arrives; go on waiting while torchrun runs
  kill -0 "$torchrun_pid" 2>/dev/null || break
done
exit "$status"
