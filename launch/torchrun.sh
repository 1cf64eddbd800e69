#!/usr/bin/env bash
# Single node, N processes:   launch/torchrun.sh [NPROC] [train.py arguments...]
#   launch/torchrun.sh 4 --data fashion-mnist --epochs 2
set -euo pipefail
NPROC="${1:-2}"
shift || true
HERE="$(cd "$(dirname "$0")" && pwd)"
exec python -m torch.distributed.run --standalone --nproc_per_node "$NPROC" "$HERE/train.py" "$@"
