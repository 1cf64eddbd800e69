#!/usr/bin/env bash
# Compile-checks the PyTorch layer of the CUDA kernels (csrc/cuda/kernels_binding.cu) with
# nvcc against the installed torch's headers, as C++17 (what the GPU machine's PyTorch uses
# for extensions). A CPU build of torch ships the CUDA headers but not the one that CMake
# generates (c10/cuda/impl/cuda_cmake_macros.h); an equivalent stub is written to a temp
# directory. This compiles only (no link, no GPU): it catches API misuse in the binding,
# which is otherwise compiled only where a GPU build runs (.ci/gpu_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
PY=${PYTHON:-python}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "binding_check: $NVCC not found, skipped"; exit 0
fi
inc=$($PY -c "import os, torch; p = os.path.join(os.path.dirname(torch.__file__), 'include'); print(p)" 2>/dev/null) || {
  echo "binding_check: torch is not importable, skipped"; exit 0; }
pyinc=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
out=$(mktemp -d /tmp/adacomp_binding_check.XXXXXX)
trap 'rm -rf "$out"' EXIT
if [ ! -f "$inc/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  mkdir -p "$out/stub/c10/cuda/impl"
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' >"$out/stub/c10/cuda/impl/cuda_cmake_macros.h"
fi
cmd=("$NVCC" -std=c++17 -O1 -Xcompiler -fPIC -I csrc -I "$out/stub" -I "$inc" -I "$inc/torch/csrc/api/include"
     -I "$pyinc" -gencode arch=compute_90,code=sm_90 --expt-relaxed-constexpr -DTORCH_EXTENSION_NAME=_C
     -Xcompiler -Wall,-Wextra
     -c csrc/cuda/kernels_binding.cu -o "$out/kernels_binding.o")
echo "+ ${cmd[*]}"
# torch's own headers warn under C++17 with newer torch releases; ours must not warn at all.
if ! "${cmd[@]}" >"$out/log.txt" 2>&1; then cat "$out/log.txt" >&2; exit 1; fi
if grep -E "^(csrc/|[^ ]*/csrc/)[^ ]*: *(warning|error)" "$out/log.txt" >&2; then
  echo "binding_check: warnings in adacomp's own sources" >&2; exit 1
fi
echo "binding_check: OK"
