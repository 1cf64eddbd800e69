// CUDA core of adacomp::compress_bucket and adacomp::decode_bucket_ (API: bucket_core.cuh).
// No PyTorch header here: .ci/nvcc_check.sh compiles this file with nvcc alone.
//
// The per-index work lives in csrc/wire.h and csrc/wire_check.h as __host__ __device__
// functions; these kernels are grid-stride loops around them, so the host emulation
// (csrc/cpu/wire_emulate.cpp) runs exactly what the GPU runs. Errors are OR-ed into one
// flag word; nothing here synchronises with the host.
#include "../common.h"
#include "bucket_core.cuh"
#include "device_util.cuh"

namespace adacomp {
namespace {

using device::grid_for;
using device::scan_chunk_count;
using device::scan_launch;

constexpr int kThreads = 256;

#define ADACOMP_GRID_STRIDE(i, n) \
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

// bin_end[i] = counts[0] + ... + counts[i] (the multi-block scan's store).
struct LoadInt32 {
  const int32_t* v;
  __device__ long long operator()(int64_t i) const { return v[i]; }
};
struct StoreInclusive {
  const int32_t* v;
  int64_t* out;
  __device__ void operator()(int64_t i, long long prefix) const { out[i] = prefix + v[i]; }
};
// zeros[i] = zeros[0] + ... + zeros[i - 1], in place; index total (loaded as 0) gets the sum.
struct LoadZeros {
  const int64_t* v;
  int64_t total;
  __device__ long long operator()(int64_t i) const { return i < total ? v[i] : 0; }
};
struct StoreExclusive {
  int64_t* out;
  __device__ void operator()(int64_t i, long long prefix) const { out[i] = prefix; }
};

__global__ void summary_kernel(const int64_t* bin_end, const int64_t* sel_info, const float* scale,
                               int64_t numel, int64_t bin_size, int64_t pieces, int64_t* row) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    summary_row(bin_end, sel_info, scale, numel, bin_size, pieces, row);
    row[kSumZero] = 1;
  }
}

// adacomp.parallel.exchange.all_zero: the head (256 elements) first, the rest only if the
// head is all zero. Every block reads the head; they all stop there in the common case.
__global__ void __launch_bounds__(kThreads) zero_kernel(const float* g, int64_t n, int64_t* row) {
  const int64_t head = n < kThreads ? n : kThreads;
  const bool nz = threadIdx.x < head && g[threadIdx.x] != 0.0f;
  if (__syncthreads_or(nz)) {
    if (blockIdx.x == 0 && threadIdx.x == 0) row[kSumZero] = 0;
    return;
  }
  bool any = false;
  for (int64_t i = head + (int64_t)blockIdx.x * kThreads + threadIdx.x; i < n; i += (int64_t)gridDim.x * kThreads)
    any |= g[i] != 0.0f;
  if (any) row[kSumZero] = 0;
}

__global__ void __launch_bounds__(kThreads) write_wire_kernel(const WirePiece* pieces, int64_t n_pieces,
                                                              const WireTensor* tensors, const uint8_t* headers,
                                                              uint8_t* out, int64_t total) {
  ADACOMP_GRID_STRIDE(k, total) { out[k] = wire_byte(pieces, n_pieces, tensors, headers, k); }
}

__global__ void __launch_bounds__(kThreads) check_header_kernel(const CheckEntry* es, int64_t n, const int64_t* dims,
                                                                CheckParsed* parsed, int32_t* flags) {
  ADACOMP_GRID_STRIDE(e, n) {
    parsed[e] = check_header(es[e].data, es[e].nbytes, dims + es[e].dims_off, es[e].ndim);
    if (!parsed[e].ok) atomicOr(&flags[0], 1);
  }
}

__global__ void __launch_bounds__(kThreads) check_bytes_kernel(const CheckEntry* es, int64_t n,
                                                               const CheckParsed* parsed, int64_t total,
                                                               int64_t* zeros, int32_t* flags) {
  ADACOMP_GRID_STRIDE(k, total) {
    zeros[k] = byte_zeros(es, n, parsed, k);
    if (!check_byte(es, n, parsed, k)) atomicOr(&flags[0], 1);
  }
}

__global__ void __launch_bounds__(kThreads) check_count_kernel(const CheckEntry* es, int64_t n,
                                                               const CheckParsed* parsed,
                                                               const int64_t* zeros_before, int64_t total,
                                                               int32_t* flags) {
  ADACOMP_GRID_STRIDE(k, total) {
    if (!check_count_byte(es, n, parsed, zeros_before, k)) atomicOr(&flags[0], 1);
  }
}

__global__ void __launch_bounds__(kThreads) check_totals_kernel(const CheckEntry* es, int64_t n,
                                                                const CheckParsed* parsed,
                                                                const int64_t* zeros_before, int32_t* flags) {
  ADACOMP_GRID_STRIDE(e, n) {
    if (!check_totals(es[e], parsed[e], zeros_before)) atomicOr(&flags[0], 1);
    if (parsed[e].nonfinite) atomicOr(&flags[1 + es[e].group], 1);
  }
}

__global__ void __launch_bounds__(kThreads) fill_kernel(const CheckGroup* gs, int64_t n_groups, int64_t total,
                                                        const int32_t* flags) {
  ADACOMP_GRID_STRIDE(i, total) { fill_elem(gs, n_groups, flags, i); }
}

__global__ void __launch_bounds__(kThreads) add_kernel(const CheckEntry* es, const CheckParsed* parsed,
                                                       const int64_t* zeros_before, const int32_t* flags,
                                                       const int64_t* pos_entry, const int64_t* pos_base,
                                                       int64_t count, int64_t total) {
  ADACOMP_GRID_STRIDE(k, total) { add_byte(es, parsed, zeros_before, flags, pos_entry, pos_base, count, k); }
}

__global__ void __launch_bounds__(kThreads) divide_kernel(const CheckGroup* gs, int64_t n_groups, int64_t total,
                                                          const int32_t* flags, float d) {
  ADACOMP_GRID_STRIDE(i, total) { divide_elem(gs, n_groups, flags, d, i); }
}

}  // namespace

size_t summarize_workspace_bytes(int64_t numel, int64_t bin_size) {
  if (numel < 0 || bin_size < 1) return 0;
  const int64_t n_bins = numel == 0 ? 0 : (numel + bin_size - 1) / bin_size;
  return (size_t)(scan_chunk_count(n_bins) + 1) * sizeof(long long);
}

cudaError_t summarize_launch(const float* grad, int64_t numel, int64_t bin_size, int64_t pieces,
                             const int32_t* counts, const int64_t* sel_info, const float* scale,
                             int64_t* bin_end, int64_t* row, void* workspace, cudaStream_t stream) {
  if (numel < 0 || bin_size < 1 || pieces < 1 || workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t n_bins = numel == 0 ? 0 : (numel + bin_size - 1) / bin_size;
  cudaError_t err = cudaSuccess;
  if (n_bins) {
    err = scan_launch(LoadInt32{counts}, StoreInclusive{counts, bin_end}, n_bins,
                      static_cast<long long*>(workspace), stream);
    if (err != cudaSuccess) return err;
  }
  summary_kernel<<<1, 32, 0, stream>>>(bin_end, sel_info, scale, numel, bin_size, pieces, row);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (numel) {
    const unsigned int blocks = grid_for(numel, kThreads);
    zero_kernel<<<blocks < 1024 ? blocks : 1024, kThreads, 0, stream>>>(grad, numel, row);
  }
  return cudaGetLastError();
}

cudaError_t write_wire_launch(const WirePiece* pieces, int64_t n_pieces, const WireTensor* tensors,
                              const uint8_t* headers, uint8_t* out, int64_t total, cudaStream_t stream) {
  if (total < 0 || n_pieces < 0 || (total > 0 && n_pieces == 0)) return cudaErrorInvalidValue;
  if (total == 0) return cudaSuccess;
  write_wire_kernel<<<grid_for(total, kThreads), kThreads, 0, stream>>>(pieces, n_pieces, tensors, headers, out,
                                                                        total);
  return cudaGetLastError();
}

size_t check_workspace_bytes(int64_t total_bytes) {
  return total_bytes < 0 ? 0 : (size_t)(scan_chunk_count(total_bytes + 1) + 1) * sizeof(long long);
}

cudaError_t check_bucket_launch(const CheckEntry* entries, int64_t n, const int64_t* dims, int64_t total_bytes,
                                int64_t n_groups, CheckParsed* parsed, int64_t* zeros_before, int32_t* flags,
                                void* workspace, cudaStream_t stream) {
  if (n < 0 || total_bytes < 0 || n_groups < 0 || workspace == nullptr) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(flags, 0, (size_t)(1 + n_groups) * sizeof(int32_t), stream);
  if (err != cudaSuccess || n == 0) return err;
  check_header_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(entries, n, dims, parsed, flags);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (total_bytes) {
    check_bytes_kernel<<<grid_for(total_bytes, kThreads), kThreads, 0, stream>>>(entries, n, parsed, total_bytes,
                                                                                zeros_before, flags);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  err = scan_launch(LoadZeros{zeros_before, total_bytes}, StoreExclusive{zeros_before}, total_bytes + 1,
                    static_cast<long long*>(workspace), stream);
  if (err != cudaSuccess) return err;
  if (total_bytes) {
    check_count_kernel<<<grid_for(total_bytes, kThreads), kThreads, 0, stream>>>(entries, n, parsed, zeros_before,
                                                                                total_bytes, flags);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  check_totals_kernel<<<grid_for(n, kThreads), kThreads, 0, stream>>>(entries, n, parsed, zeros_before, flags);
  return cudaGetLastError();
}

cudaError_t apply_bucket_launch(const CheckEntry* entries, int64_t n, const CheckParsed* parsed,
                                const int64_t* zeros_before, const CheckGroup* groups, int64_t n_groups,
                                int64_t total_elems, const int32_t* flags, const int64_t* pos_entry,
                                const int64_t* pos_base, const int64_t* pos_first_host,
                                const int64_t* pos_bytes_host, int64_t positions, int64_t divisor,
                                cudaStream_t stream) {
  if (n < 0 || n_groups < 0 || total_elems < 0 || divisor < 1 || positions < 0) return cudaErrorInvalidValue;
  if (total_elems == 0) return cudaSuccess;
  fill_kernel<<<grid_for(total_elems, kThreads), kThreads, 0, stream>>>(groups, n_groups, total_elems, flags);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // One launch per position, over that position's payloads only: the payloads of a range
  // are added in order (the CPU's sums), and the launches cover every byte once in all.
  for (int64_t p = 0; p < positions; ++p) {
    const int64_t first = pos_first_host[p], count = pos_first_host[p + 1] - first, bytes = pos_bytes_host[p];
    if (!bytes) continue;
    add_kernel<<<grid_for(bytes, kThreads), kThreads, 0, stream>>>(entries, parsed, zeros_before, flags,
                                                                   pos_entry + first, pos_base + first, count, bytes);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (divisor > 1)
    divide_kernel<<<grid_for(total_elems, kThreads), kThreads, 0, stream>>>(groups, n_groups, total_elems, flags,
                                                                            (float)divisor);
  return cudaGetLastError();
}

}  // namespace adacomp
