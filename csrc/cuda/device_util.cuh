// Device helpers shared by the CUDA cores (select_core.cu, bucket_core.cu). No PyTorch.
#pragma once
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>
#include <stdint.h>

namespace adacomp {
namespace device {

constexpr int kScanThreads = 512;  // the one-block scans (tiles, bins, count bytes)
constexpr int kScanItems = 8;

// One-block exclusive scan of load(0..count) into store(i, prefix); returns the total.
// Must be called by all kScanThreads threads of the block.
template <class Load, class Store>
__device__ __forceinline__ long long block_exclusive_scan(int64_t count, Load load, Store store) {
  using Scan = cub::BlockScan<long long, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  long long running = 0;
  for (int64_t first = 0; first < count; first += (int64_t)kScanThreads * kScanItems) {
    const int64_t mine = first + (int64_t)threadIdx.x * kScanItems;
    long long v[kScanItems];
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) v[j] = mine + j < count ? (long long)load(mine + j) : 0;
    long long aggregate;
    Scan(tmp).ExclusiveSum(v, v, aggregate);
#pragma unroll
    for (int j = 0; j < kScanItems; ++j) {
      if (mine + j < count) store(mine + j, running + v[j]);
    }
    running += aggregate;
    __syncthreads();  // tmp is reused by the next round
  }
  return running;
}

// A multi-block scan over n items, for scans too long for one block: the totals of chunks
// of kScanChunk items (scan_chunk_sums), their exclusive scan in one block (scan_chunk_bases,
// a few thousand items at most per million chunks' worth of rounds), and each chunk's own
// scan from its base (scan_chunks). Load is a functor i -> long long; Store gets
// (i, exclusive prefix). Store may overwrite what Load reads at the same index (each thread
// loads its items before it stores them, and the totals are taken by an earlier kernel). chunk_sums: scan_chunk_count(n) + 1
// entries; the last receives the total.
constexpr int64_t kScanChunk = (int64_t)kScanThreads * kScanItems;

inline int64_t scan_chunk_count(int64_t n) { return (n + kScanChunk - 1) / kScanChunk; }

template <class Load>
__global__ void __launch_bounds__(kScanThreads) scan_chunk_sums(Load load, int64_t n, long long* chunk_sums) {
  using Reduce = cub::BlockReduce<long long, kScanThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  const int64_t first = (int64_t)blockIdx.x * kScanChunk + (int64_t)threadIdx.x * kScanItems;
  long long v = 0;
#pragma unroll
  for (int j = 0; j < kScanItems; ++j)
    if (first + j < n) v += (long long)load(first + j);
  const long long sum = Reduce(tmp).Sum(v);
  if (threadIdx.x == 0) chunk_sums[blockIdx.x] = sum;
}

static __global__ void __launch_bounds__(kScanThreads) scan_chunk_bases(long long* chunk_sums, int64_t chunks) {
  const long long total = block_exclusive_scan(
      chunks, [=](int64_t i) { return chunk_sums[i]; }, [=](int64_t i, long long prefix) { chunk_sums[i] = prefix; });
  if (threadIdx.x == 0) chunk_sums[chunks] = total;
}

template <class Load, class Store>
__global__ void __launch_bounds__(kScanThreads) scan_chunks(Load load, Store store, int64_t n,
                                                            const long long* chunk_bases) {
  using Scan = cub::BlockScan<long long, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  const int64_t first = (int64_t)blockIdx.x * kScanChunk + (int64_t)threadIdx.x * kScanItems;
  long long v[kScanItems];
#pragma unroll
  for (int j = 0; j < kScanItems; ++j) v[j] = first + j < n ? (long long)load(first + j) : 0;
  Scan(tmp).ExclusiveSum(v, v);
  const long long base = chunk_bases[blockIdx.x];
#pragma unroll
  for (int j = 0; j < kScanItems; ++j)
    if (first + j < n) store(first + j, base + v[j]);
}

// Enqueues the three kernels; chunk_sums as above. Returns the launch status.
template <class Load, class Store>
cudaError_t scan_launch(Load load, Store store, int64_t n, long long* chunk_sums, cudaStream_t stream) {
  const int64_t chunks = scan_chunk_count(n);
  if (chunks > INT32_MAX) return cudaErrorInvalidValue;
  if (chunks) scan_chunk_sums<<<(unsigned int)chunks, kScanThreads, 0, stream>>>(load, n, chunk_sums);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  scan_chunk_bases<<<1, kScanThreads, 0, stream>>>(chunk_sums, chunks);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (chunks) scan_chunks<<<(unsigned int)chunks, kScanThreads, 0, stream>>>(load, store, n, chunk_sums);
  return cudaGetLastError();
}

// Blocks for `work` items of `block` threads each, capped (the kernels loop, grid-stride).
inline unsigned int grid_for(int64_t work, int block) {
  const int64_t blocks = (work + block - 1) / block;
  return (unsigned int)(blocks < (1 << 20) ? blocks : (1 << 20));  // grid-stride beyond
}

}  // namespace device
}  // namespace adacomp
