#!/usr/bin/env bash
# Multi-node torchrun. Run the same command on every node; the rendezvous comes from the
# environment:
#   MASTER_ADDR   address of node 0 (reachable from every node)      (required)
#   MASTER_PORT   a free TCP port on node 0                           (default 29500)
#   NNODES        number of nodes                                     (required)
#   NODE_RANK     this node's index, 0..NNODES-1                      (required)
#   NPROC_PER_NODE processes per node                                 (default 1)
# Example, two nodes with 4 processes each:
#   node0$ MASTER_ADDR=node0 NNODES=2 NODE_RANK=0 NPROC_PER_NODE=4 launch/torchrun_multinode.sh --epochs 2
#   node1$ MASTER_ADDR=node0 NNODES=2 NODE_RANK=1 NPROC_PER_NODE=4 launch/torchrun_multinode.sh --epochs 2
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to node 0's address}"
: "${NNODES:?set NNODES to the number of nodes}"
: "${NODE_RANK:?set NODE_RANK to this node's index}"
HERE="$(cd "$(dirname "$0")" && pwd)"
exec python -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "${NPROC_PER_NODE:-1}" \
  --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RDZV_ID:-adacomp}" \
  "$HERE/train.py" "$@"
