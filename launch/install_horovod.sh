#!/usr/bin/env bash
# Build Horovod 0.28.1 from its source distribution against the installed PyTorch.
#
# Horovod 0.28.1 (its last release) compiles with C++14, which current PyTorch headers no
# longer accept; this script applies the one-line fix (C++17) in the two CMakeLists that set
# the standard, then builds with gloo (and MPI when an MPI compiler wrapper is found).
# Idempotent: does nothing when horovod.torch 0.28.1 already imports.
#
#   launch/install_horovod.sh            # build and install into the current Python
#   HOROVOD_FORCE_REBUILD=1 launch/install_horovod.sh
set -euo pipefail
VERSION=0.28.1
PYTHON="${PYTHON:-python}"

say() { echo "[install_horovod] $*"; }
die() { echo "[install_horovod] ERROR: $*" >&2; exit 1; }

if [ "${HOROVOD_FORCE_REBUILD:-0}" != "1" ] && "$PYTHON" - <<PY 2>/dev/null
import horovod, horovod.torch  # noqa
assert horovod.__version__ == "$VERSION"
PY
then
  say "horovod $VERSION with PyTorch support is already installed: nothing to do"
  exit 0
fi

"$PYTHON" -c "import torch" 2>/dev/null || die "PyTorch is not installed (pip install torch==2.13.0 first)"
command -v cmake >/dev/null || die "cmake is required (apt-get install cmake, or pip install cmake)"
command -v g++ >/dev/null || die "a C++ compiler is required (apt-get install g++)"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
say "downloading the horovod==$VERSION source distribution"
"$PYTHON" -m pip download --quiet --no-deps --no-binary :all: "horovod==$VERSION" -d "$WORK" \
  || die "pip download of horovod==$VERSION failed"
tar xzf "$WORK"/horovod-"$VERSION".tar.gz -C "$WORK"
SRC="$WORK/horovod-$VERSION"

say "applying the C++17 fix (CMAKE_CXX_STANDARD 14 -> 17)"
for f in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
  grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || die "expected 'set(CMAKE_CXX_STANDARD 14)' in $f"
  sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
done

export CMAKE_POLICY_VERSION_MINIMUM=3.5
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1 HOROVOD_WITH_GLOO=1
if command -v mpicxx >/dev/null 2>&1; then
  say "MPI found ($(command -v mpicxx)): building with MPI and gloo"
  export HOROVOD_WITH_MPI=1
else
  say "no MPI compiler wrapper found: building with gloo only"
  export HOROVOD_WITHOUT_MPI=1
fi
export MAKEFLAGS="-j$(nproc)"
say "building (about 2-4 minutes on 2 cores)"
"$PYTHON" -m pip install --no-build-isolation --no-deps "$SRC" > "$WORK/build.log" 2>&1 || {
  tail -n 60 "$WORK/build.log" >&2
  die "the Horovod build failed (log above)"
}
"$PYTHON" -m pip install --quiet cloudpickle psutil pyyaml packaging
"$PYTHON" - <<PY || die "horovod installed but horovod.torch does not import"
import horovod, horovod.torch as hvd
print("[install_horovod] horovod", horovod.__version__, "gloo built:", hvd.gloo_built(), "mpi built:", hvd.mpi_built())
PY
