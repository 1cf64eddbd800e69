// Device helpers shared by the CUDA cores (select_core.cu, bucket_core.cu). No PyTorch.
#pragma once
#include <cub/block/block_scan.cuh>
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

// Blocks for `work` items of `block` threads each, capped (the kernels loop, grid-stride).
inline unsigned int grid_for(int64_t work, int block) {
  const int64_t blocks = (work + block - 1) / block;
  return (unsigned int)(blocks < (1 << 20) ? blocks : (1 << 20));  // grid-stride beyond
}

}  // namespace device
}  // namespace adacomp
