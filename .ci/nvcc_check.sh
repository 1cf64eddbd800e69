#!/usr/bin/env bash
# Compile-checks the torch-free CUDA cores (csrc/cuda/select_core.cu, bucket_core.cu) with nvcc alone, for
# a few real GPU architectures, treating warnings (including register spills) as errors.
# Needs only a CUDA toolkit, no GPU and no CUDA build of PyTorch. The PyTorch binding
# (kernels_binding.cu) is compiled by `FORCE_CUDA=1 pip install -e .` instead.
set -euo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "nvcc_check: $NVCC not found (set NVCC or put the CUDA toolkit's bin on PATH)" >&2
  exit 1
fi
echo "nvcc_check: $("$NVCC" --version | tail -n 1)"

# sm_75 exercises the pre-sm_80 warp-reduction fallback; sm_80/sm_90 are A100/H100-class.
supported=$("$NVCC" --list-gpu-arch)
gencode=()
for arch in 75 80 90; do
  if grep -qx "compute_$arch" <<<"$supported"; then
    gencode+=(-gencode "arch=compute_$arch,code=sm_$arch")
  else
    echo "nvcc_check: this nvcc does not support sm_$arch, skipped"
  fi
done
if [ ${#gencode[@]} -eq 0 ]; then
  echo "nvcc_check: none of sm_75/80/90 is supported by this nvcc" >&2
  exit 1
fi

out=$(mktemp -d /tmp/adacomp_nvcc_check.XXXXXX)
trap 'rm -rf "$out"' EXIT

# The public header must stay free of PyTorch and of device code: it compiles as plain
# host C++ (nvcc -x c++ hands it to the host compiler, with only the CUDA include path).
printf '#include "cuda/select_core.cuh"\n#include "cuda/bucket_core.cuh"\n' >"$out/header_check.cpp"
cmd=("$NVCC" -x c++ -std=c++17 -I csrc -Xcompiler -Wall,-Wextra,-Werror
     -c "$out/header_check.cpp" -o "$out/header_check.o")
echo "+ ${cmd[*]}"
"${cmd[@]}"

# -O3 -std=c++17 as setup.py passes to nvcc. Compiled one arch at a time so that ptxas's
# resource report (registers, shared memory) is readable per arch.
for core in select_core bucket_core; do
for ((i = 0; i < ${#gencode[@]}; i += 2)); do
  arch=${gencode[i + 1]##*=}
  cmd=("$NVCC" -std=c++17 -O3 -I csrc "${gencode[i]}" "${gencode[i + 1]}"
       --Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror
       -Xptxas -v,-warn-spills,-warn-lmem-usage,-Werror
       -c "csrc/cuda/$core.cu" -o "$out/${core}_$arch.o")
  echo "+ ${cmd[*]}"
  "${cmd[@]}" 2>"$out/ptxas_$arch.txt" || { cat "$out/ptxas_$arch.txt" >&2; exit 1; }
  # One line per kernel: its name and resource use (registers, shared memory, spills).
  grep -E "Compiling entry function|Used [0-9]+ registers" "$out/ptxas_$arch.txt" |
    sed -E "s/.*Compiling entry function '([^']+)'.*/\1/; s/^ptxas info *: //" |
    { command -v c++filt >/dev/null && c++filt || cat; } |
    sed -E 's/adacomp::\(anonymous namespace\):://g; s/^void //' |
    paste - - | awk -F '\t' '{ printf "    %-48s %s\n", $1, $2 }'
done
done
echo "nvcc_check: OK"
