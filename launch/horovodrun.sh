#!/usr/bin/env bash
# The main job under Horovod (gloo controller, one host):
#   launch/horovodrun.sh [NPROC] [train.py arguments...]
#   launch/horovodrun.sh 4 --data fashion-mnist --epochs 2
# Needs Horovod: `make distributed` (or launch/install_horovod.sh) builds it against the
# installed torch. Several hosts: set HOSTS="h1:4,h2:4". The plot goes to
# results/train_<data>_horovod.png.
set -euo pipefail
if ! command -v horovodrun >/dev/null 2>&1; then
  echo "launch/horovodrun.sh: horovodrun not found. Install Horovod with 'make distributed'" \
       "(builds Horovod 0.28.1 against this torch, about 3 minutes) or launch/install_horovod.sh." >&2
  exit 127
fi
NPROC="${1:-2}"
shift || true
HERE="$(cd "$(dirname "$0")" && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec horovodrun -np "$NPROC" --gloo -H "${HOSTS:-localhost:$NPROC}" \
  python "$HERE/train.py" --backend horovod "$@"
