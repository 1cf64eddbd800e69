// The CUDA core of adacomp: selection (docs/algorithm.md section 1, steps 1-6) and payload-body
// decoding, as plain CUDA C++ with no PyTorch header, so that nvcc can compile and check it
// on its own (.ci/nvcc_check.sh). csrc/cuda/kernels_binding.cu is the thin PyTorch layer.
//
// Every function here only enqueues work on `stream` (memsets and kernel launches): there
// is no host synchronisation, and results such as the number of sent elements stay in
// device memory. Pointers are device pointers unless said otherwise.
#pragma once
#include <cuda_runtime.h>
#include <stddef.h>
#include <stdint.h>

namespace adacomp {

// Bytes of scratch device memory select_launch needs for a tensor of n elements (2 bytes
// per element for the per-tile staging of sent elements, plus a few KB).
size_t select_workspace_bytes(int64_t n, int64_t bin_size);

// One fused selection pass over the flat fp32 tensor of n elements, exactly as
// adacomp/_reference.py's select:
//   G = residue + grad, H = G + grad, per-bin gmax = max|G|, element sent iff
//   gmax > 0 && |H| >= gmax && G != 0, Q = +-scale (ternary) or G rounded (fp16/fp32),
//   residue_out = G - Q.
// Outputs: counts[n_bins] (sent elements per bin), offsets[n] and values[n] (capacity n;
// the first info[0] entries hold the sent elements' bin-local offsets and values in flat
// order), scale[1], info[2] = {n_sent, nonfinite}. residue_out may be residue itself but
// must not overlap grad. workspace: select_workspace_bytes(n, bin_size) bytes, no
// initialisation needed. bin_size in [1, 2^31 - 1]; modes are the adacomp::kScale* and
// adacomp::kValue* constants of common.h (kValueDense is not a selection mode).
// Returns cudaErrorInvalidValue for invalid arguments, else the launch status.
cudaError_t select_launch(const float* grad, const float* residue, float* residue_out, int64_t n,
                          int64_t bin_size, int scale_mode, int value_mode, int32_t* counts,
                          int32_t* offsets, float* values, float* scale, int64_t* info,
                          void* workspace, cudaStream_t stream);

// One payload body that the host has already validated (adacomp::walk_body<false> returned
// kOk for these very bytes): the decode kernels trust its layout and do no bounds checks
// beyond it. `body` points to device memory; the other fields come from the payload meta.
struct DeviceBody {
  const uint8_t* body;
  int64_t numel;
  int64_t bin_size;  // at most 2^31 - 1 (offset fields of at most 31 bits)
  int64_t n_sent;
  int kind;  // adacomp::kValueTernary, kValueFp16, kValueFp32 or kValueDense
  float scale;
};

// Bytes of scratch device memory decompress_sum_launch needs for these bodies (host array).
size_t decompress_workspace_bytes(const DeviceBody* bodies, int64_t n_bodies);

// out[0..numel) += decoded body, for each body in array order (`bodies` is a host array).
// Bodies are added one after another on `stream`, so the floating-point sums happen in the
// same order as in the CPU decoder; within one body all indices are distinct, so its
// elements are added in parallel without atomics.
cudaError_t decompress_sum_launch(float* out, const DeviceBody* bodies, int64_t n_bodies,
                                  void* workspace, cudaStream_t stream);

}  // namespace adacomp
