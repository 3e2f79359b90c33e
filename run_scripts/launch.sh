#!/usr/bin/env bash
# Shared launcher, sourced by the scripts beside it:  launch <module> <project yaml> [key=value ...]
# One process on one node runs `python -m <module>` directly, so its error is the last line printed;
# anything more runs under torchrun (python -m torch.distributed.run).
#   NPROC        processes on this node (default: all local GPUs, or 1 on CPU)
#   NNODES       nodes (default 1); for several also NODE_RANK, MASTER_ADDR, MASTER_PORT
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

launch() {
  local module=$1 cfg=$2
  shift 2
  local nproc=${NPROC:-$(python -c 'import torch; print(max(torch.cuda.device_count(), 1))')}
  local options=()
  if [ $# -gt 0 ]; then options=(--options "$@"); fi
  if [ "$nproc" = 1 ] && [ "${NNODES:-1}" = 1 ]; then
    python -m "$module" --cfg-path "$cfg" "${options[@]}"
    return
  fi
  local nodes=(--standalone)
  if [ "${NNODES:-1}" -gt 1 ]; then
    nodes=(--nnodes="$NNODES" --node_rank="${NODE_RANK:?set NODE_RANK}" --master_addr="${MASTER_ADDR:?set MASTER_ADDR}"
           --master_port="${MASTER_PORT:-29500}")
  fi
  python -m torch.distributed.run "${nodes[@]}" --nproc_per_node="$nproc" -m "$module" --cfg-path "$cfg" "${options[@]}"
}
