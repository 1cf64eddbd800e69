#!/usr/bin/env bash
# Issue 18's GPU checks as one script, for a machine with an NVIDIA GPU and a CUDA build of
# PyTorch (the device machine of this workplace: its python3 has one; nothing can be fetched
# there, so nothing is installed: the extension is built in place). Writes under $OUT:
#   env.txt            GPU, torch, backends, and every step's exit status
#   build.log          FORCE_CUDA=1 build of adacomp._C
#   pytest_gpu.log     pytest -m gpu (CUDA kernels against the reference; payload fuzzing)
#   kernel_cuda.*      benchmarks/kernel.py --device cuda (select, decompress_sum, public API)
#   hook_cuda.*        benchmarks/hook_overhead.py --device cuda (gloo, 2 ranks on GPU 0)
# Usage, from the repository root: OUT=/some/dir bash .ci/gpu_check.sh
# Each step has its own time limit (at most about 9 minutes in all on an H200).
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
log() { echo "$*" | tee -a "$OUT/env.txt"; }

nvidia-smi > "$OUT/nvidia_smi.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" \
  2>&1 | tee -a "$OUT/env.txt"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS=16 \
  timeout 300 $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1
rc=$?; log "build rc=$rc"
if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; exit 1; fi
$PY -c "from adacomp import ops; print('backends cpu', ops.available_backends('cpu'), 'cuda', ops.available_backends('cuda'))" \
  2>&1 | tee -a "$OUT/env.txt"

timeout 240 $PY -m pytest -q -m gpu -p no:cacheprovider tests/ > "$OUT/pytest_gpu.log" 2>&1
log "pytest -m gpu rc=$? ($(tail -1 "$OUT/pytest_gpu.log"))"

timeout 150 $PY benchmarks/kernel.py --device cuda --sizes 1M 4M 16M 64M --bins 50 500 --backends cuda \
  --repeat 5 --no-reference --json "$OUT/kernel_cuda.json" > "$OUT/kernel_cuda.log" 2>&1
log "kernel rc=$?"

timeout 150 $PY benchmarks/hook_overhead.py --device cuda --synthetic --ranks 2 --models cnn lstm gpt \
  --steps 10 --warmup 4 --variants none fp16 adacomp:allgather --json "$OUT/hook_cuda.json" \
  > "$OUT/hook_cuda.log" 2>&1
log "hook rc=$?"
tail -25 "$OUT/kernel_cuda.log" "$OUT/hook_cuda.log"
