#!/usr/bin/env bash
# The main job under Horovod (gloo controller, one host):
#   launch/horovodrun.sh [NPROC] [train.py arguments...]
#   launch/horovodrun.sh 4 --data fashion-mnist --epochs 2
# Needs Horovod: launch/install_horovod.sh. Several hosts: set HOSTS="h1:4,h2:4".
set -euo pipefail
NPROC="${1:-2}"
shift || true
HERE="$(cd "$(dirname "$0")" && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec horovodrun -np "$NPROC" --gloo -H "${HOSTS:-localhost:$NPROC}" \
  python "$HERE/train.py" --backend horovod "$@"
