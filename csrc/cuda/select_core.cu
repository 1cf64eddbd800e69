// CUDA core of adacomp::select and adacomp::decompress_sum_ (API: select_core.cuh).
// No PyTorch header here: .ci/nvcc_check.sh compiles this file with nvcc alone.
//
// Selection, for bin sizes up to one tile (kTile = 4096 elements; the paper's 50 and 500):
//
//   1. select_tiles_kernel<false>, one block per tile of whole bins (bins_per_tile =
//      kTile / bin_size). The block reads dW and R once, coalesced (thread t of the block
//      takes elements t, t + 256, ...; a warp reads 32 consecutive floats), keeps G and H in
//      registers, and finds each bin's max|G| with a segmented warp reduction plus a
//      shared-memory atomicMax on the float bits (non-negative floats order like their
//      uint32 bits; NaN sorts above inf, so a NaN bin sends nothing, as in the reference).
//      It then tests every element, writes residue_out = G (coalesced, once), writes the
//      per-bin counts, and compacts the tile-local indices of its sent elements, in flat
//      order, into a per-tile staging area of the workspace (positions from warp ballots and
//      one block scan over the tile's 32-element chunks). Tile t stages at its own first
//      element index, so staging can never overflow and tiles never overlap. Histogram
//      terms of the ternary scale go to shared memory and then, integer atomics, to the
//      workspace.
//   2. finalize_kernel, one block: exclusive scan of the per-tile counts (the compacted start
//      of each tile), info = {total, nonfinite}, and the scale from the exponent histogram
//      with adacomp::combine_histogram (common.h), computed by a single thread.
//   3. compact_kernel, one block per tile: for each staged index, reads G back from
//      residue_out, writes the bin-local offset and Q (+-scale, or G rounded) at the
//      compacted position and G - Q into residue_out. Deferring Q to here is what the
//      ternary scale needs (it is known only after every tile has run) and keeps the
//      staging to 2 bytes per element; the extra traffic is a read and a write of the sent
//      elements only.
//
// Bins larger than a tile cannot be held on chip, so their max needs a pass of its own:
// big_bin_max_kernel reads dW and R, writes G to residue_out and atomicMax-es each bin's
// max into the workspace; select_tiles_kernel<true> then re-reads G and dW (8 more bytes
// per element, the only extra traffic, and only for bins of more than 4096 elements) and
// selects as above. Tiles are plain 4096-element ranges there, touching at most two bins.
//
// Bit-exactness with adacomp/_reference.py: G, H and G - Q are single fp32 additions
// (no multiply, so no FMA contraction), fp16 rounding is adacomp::round_value, and the
// scale is an integer histogram (order-independent atomics) combined in fixed order. The
// build must keep IEEE fp32 (no --use_fast_math / -ftz=true: flushing subnormal G to zero
// would change the selection).
//
// Decoding (decompress_sum_launch): bodies are validated on the host beforehand. Each
// sent element's bin is the number of 0-bits (bin terminators) before its 1-bit in the
// unary count stream, so a one-block scan of the per-byte 0-bit counts gives every count
// byte its starting bin; then one thread per count byte decodes its (at most 8) elements
// from the fixed-width entry stream and adds them into out. Bodies are processed one
// after another on the stream.
#include <cub/block/block_scan.cuh>

#include "../common.h"
#include "../decode.h"
#include "device_util.cuh"
#include "select_core.cuh"

namespace adacomp {
namespace {

using device::block_exclusive_scan;
using device::grid_for;
using device::kScanItems;
using device::kScanThreads;

constexpr int kBlock = 256;                 // threads per selection block
constexpr int kItems = 16;                  // elements per thread per tile
constexpr int kTile = kBlock * kItems;      // elements per tile (fused path: at most)
constexpr int kWarps = kBlock / 32;
constexpr int kChunks = kItems * kWarps;    // 32-element chunks per tile, in flat order
constexpr int kAddBlock = 256;              // decode kernels
constexpr unsigned kFullMask = 0xFFFFFFFFu;
constexpr float kFloatMax = 3.40282347e38f;
constexpr uint32_t kQuietNan = 0x7FC00000u;  // what Python's float("nan") is in fp32
constexpr size_t kAlign = 256;

static_assert(kTile <= 65536, "staged tile-local indices are stored as uint16");
static_assert(kChunks <= kBlock, "one chunk count per thread in the chunk scan");

// Zeroed by select_launch before the kernels run.
struct SelectHeader {
  unsigned long long hist[kHistSize];  // exponent histogram of the ternary scale's terms
  unsigned long long hist_terms;       // number of terms in it
  unsigned int nonfinite;              // any G not finite
};

// Tiling and workspace layout of one selection, a pure function of (n, bin_size).
struct Plan {
  int64_t n, bin_size, n_bins;
  bool big;               // bin_size > kTile: two-kernel path
  int bins_per_tile;      // fused path
  int64_t tile_stride;    // elements per tile (the last one may be shorter)
  int64_t n_tiles;
  size_t off_header, off_tile_count, off_tile_start, off_gmax, off_stage;
  size_t bytes;
};

Plan make_plan(int64_t n, int64_t bin_size) {
  Plan p{};
  p.n = n;
  p.bin_size = bin_size;
  p.n_bins = n == 0 ? 0 : (n + bin_size - 1) / bin_size;
  p.big = bin_size > kTile;
  p.bins_per_tile = p.big ? 0 : (int)(kTile / bin_size);
  p.tile_stride = p.big ? (int64_t)kTile : (int64_t)p.bins_per_tile * bin_size;
  p.n_tiles = n == 0 ? 0 : (n + p.tile_stride - 1) / p.tile_stride;
  size_t off = 0;
  auto take = [&off](size_t bytes) {
    const size_t at = off;
    off = (off + bytes + kAlign - 1) / kAlign * kAlign;
    return at;
  };
  p.off_header = take(sizeof(SelectHeader));
  p.off_tile_count = take((size_t)p.n_tiles * sizeof(int32_t));
  p.off_tile_start = take((size_t)p.n_tiles * sizeof(int64_t));
  p.off_gmax = take(p.big ? (size_t)p.n_bins * sizeof(uint32_t) : 0);
  p.off_stage = take((size_t)n * sizeof(uint16_t));
  p.bytes = off;
  return p;
}

// Everything the selection kernels share, passed by value.
struct SelectArgs {
  const float* grad;
  const float* residue;
  float* residue_out;  // may alias residue, so neither is __restrict__
  int64_t n, n_bins, tile_stride;
  uint32_t bin_size;
  uint32_t div_magic;  // e / bin_size == __umulhi(e, div_magic) for e < kTile, bin_size >= 2
  int bins_per_tile;
  int scale_mode, value_mode;
  int32_t* counts;
  int32_t* offsets;
  float* values;
  float* scale;
  int64_t* info;
  SelectHeader* header;
  int32_t* tile_count;
  int64_t* tile_start;
  uint32_t* gmax;       // big path: per-bin max|G| bits
  uint16_t* stage;      // per-tile staging: tile-local indices of the sent elements
};

// ------------------------------------------------------------------ warp helpers

struct MaxOp {
  static __device__ __forceinline__ uint32_t apply(uint32_t a, uint32_t b) { return a > b ? a : b; }
  static __device__ __forceinline__ uint32_t warp(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return __reduce_max_sync(kFullMask, v);
#else
    for (int o = 16; o > 0; o >>= 1) v = apply(v, __shfl_xor_sync(kFullMask, v, o));
    return v;
#endif
  }
};

struct SumOp {
  static __device__ __forceinline__ uint32_t apply(uint32_t a, uint32_t b) { return a + b; }
  static __device__ __forceinline__ uint32_t warp(uint32_t v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    return __reduce_add_sync(kFullMask, v);
#else
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
    return v;
#endif
  }
};

// The 32 lanes of a warp hold 32 consecutive elements, so their bin ids are non-decreasing
// and each bin is a contiguous run of lanes. Reduces v (identity 0) over each run; returns
// true in exactly one lane per run, whose *out then holds that run's result. All 32 lanes
// must call it. `wide` (bin_size >= 32) means a warp touches at most two bins: two
// whole-warp reductions then replace the five-step segmented scan.
template <class Op>
__device__ __forceinline__ bool segment_reduce(uint32_t v, uint32_t bin, bool wide, int lane,
                                               uint32_t* out) {
  if (wide) {
    const uint32_t first = __shfl_sync(kFullMask, bin, 0);
    const bool in_first = bin == first;
    const uint32_t r_first = Op::warp(in_first ? v : 0u);
    const uint32_t r_second = Op::warp(in_first ? 0u : v);
    if (lane == 0) {
      *out = r_first;
      return true;
    }
    *out = r_second;
    return lane == 31 && !in_first;
  }
  for (int d = 1; d < 32; d <<= 1) {
    const uint32_t other = __shfl_up_sync(kFullMask, v, d);
    const uint32_t other_bin = __shfl_up_sync(kFullMask, bin, d);
    if (lane >= d && other_bin == bin) v = Op::apply(v, other);
  }
  const uint32_t next_bin = __shfl_down_sync(kFullMask, bin, 1);
  *out = v;
  return lane == 31 || next_bin != bin;
}

__device__ __forceinline__ void add_term(unsigned long long* hist, float v) {
  int slot;
  uint64_t mant;
  split_term(v, &slot, &mant);
  atomicAdd(&hist[slot], (unsigned long long)mant);
}

// ------------------------------------------------------------------ selection kernels

// Big bins only: G = R + dW into residue_out, and each bin's max|G| into args.gmax.
__global__ void __launch_bounds__(kBlock) big_bin_max_kernel(SelectArgs a) {
  __shared__ uint32_t s_max[2];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t tile0 = (int64_t)blockIdx.x * kTile;
  const int len = (int)min((int64_t)kTile, a.n - tile0);
  const int64_t bin0 = tile0 / a.bin_size;
  const uint32_t base = (uint32_t)(tile0 - bin0 * a.bin_size);  // tile0's offset in bin0
  if (tid < 2) s_max[tid] = 0u;

  float g[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int e = k * kBlock + tid;
    float d = 0.f, r = 0.f;
    if (e < len) {
      d = a.grad[tile0 + e];
      r = a.residue[tile0 + e];
    }
    g[k] = r + d;
  }
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int e = k * kBlock + tid;
    if (e < len) a.residue_out[tile0 + e] = g[k];  // the same thread read residue[e]
  }
  __syncthreads();  // s_max initialised

  bool bad = false;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    if (k * kBlock + warp * 32 >= len) continue;  // whole chunk past the end (warp-uniform)
    const int e = k * kBlock + tid;
    const float mag = fabsf(g[k]);
    bad |= !(mag <= kFloatMax);
    const uint32_t seg = base + (uint32_t)e >= a.bin_size ? 1u : 0u;
    uint32_t m;
    if (segment_reduce<MaxOp>(float_bits(mag), seg, true, lane, &m) && m) atomicMax(&s_max[seg], m);
  }
  if (__syncthreads_or(bad) && tid == 0) atomicOr(&a.header->nonfinite, 1u);
  const bool has_second = base + (uint32_t)len > a.bin_size;
  if (tid < 2 && (tid == 0 || has_second) && s_max[tid]) atomicMax(&a.gmax[bin0 + tid], s_max[tid]);
}

// Selection of one tile per block; see the file comment. kBig: bins larger than a tile,
// G already in residue_out and the bin maxima in args.gmax (big_bin_max_kernel).
template <bool kBig>
__global__ void __launch_bounds__(kBlock, 3) select_tiles_kernel(SelectArgs a) {
  constexpr int kSlots = kBig ? 2 : kTile;  // bins a tile can touch
  __shared__ uint32_t s_gmax[kSlots];        // float bits of max|G|
  __shared__ uint32_t s_count[kSlots];
  __shared__ unsigned long long s_hist[kHistSize];
  __shared__ int s_chunk[kChunks];  // sent per chunk, then the chunk's start in the tile
  __shared__ unsigned int s_terms;
  using ChunkScan = cub::BlockScan<int, kBlock>;
  __shared__ typename ChunkScan::TempStorage s_scan;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t tile = blockIdx.x;
  const int64_t tile0 = tile * a.tile_stride;
  const int len = (int)min(a.tile_stride, a.n - tile0);
  const uint32_t L = a.bin_size;
  int64_t bin0;   // first bin the tile touches
  uint32_t base;  // big path: tile0's offset inside bin0
  int tile_bins;
  if (kBig) {
    bin0 = tile0 / L;
    base = (uint32_t)(tile0 - bin0 * L);
    tile_bins = base + (uint32_t)len > L ? 2 : 1;
  } else {
    bin0 = tile * a.bins_per_tile;
    base = 0;
    tile_bins = (int)min((int64_t)a.bins_per_tile, a.n_bins - bin0);
  }
  const bool ternary = a.value_mode == kValueTernary;
  const bool selected_mean = a.scale_mode == kScaleSelectedMean;
  const bool wide = L >= 32;
  // Bin of tile element e, relative to bin0. Fused path: e / L with e, L <= 4096, exact
  // by the multiply-high (e * L < 2^32).
  auto local_bin = [&](int e) -> uint32_t {
    if (kBig) return base + (uint32_t)e >= L ? 1u : 0u;
    return L == 1 ? (uint32_t)e : __umulhi((uint32_t)e, a.div_magic);
  };

  for (int b = tid; b < tile_bins; b += kBlock) {
    s_gmax[b] = kBig ? a.gmax[bin0 + b] : 0u;
    s_count[b] = 0u;
  }
  for (int s = tid; s < kHistSize; s += kBlock) s_hist[s] = 0ull;
  if (tid < kChunks) s_chunk[tid] = 0;
  if (tid == 0) s_terms = 0u;

  // Stream in. Elements past the end read as 0: G = 0 is never sent and adds nothing.
  float g[kItems], h[kItems];
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const int e = k * kBlock + tid;
    float d = 0.f, r = 0.f;
    if (e < len) {
      d = a.grad[tile0 + e];
      r = kBig ? a.residue_out[tile0 + e] : a.residue[tile0 + e];
    }
    g[k] = kBig ? r : r + d;  // big path: residue_out already holds G
    h[k] = g[k] + d;
  }
  // residue_out = G, every element once, coalesced; compact_kernel later turns the sent
  // ones into G - Q. (The same thread read residue[e], so residue_out may alias it.)
  if (!kBig) {
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      const int e = k * kBlock + tid;
      if (e < len) a.residue_out[tile0 + e] = g[k];
    }
  }
  __syncthreads();  // shared state initialised

  if (!kBig) {
    bool bad = false;
#pragma unroll
    for (int k = 0; k < kItems; ++k) {
      if (k * kBlock + warp * 32 >= len) continue;  // warp-uniform
      const int e = k * kBlock + tid;
      const float mag = fabsf(g[k]);
      bad |= !(mag <= kFloatMax);
      const uint32_t bin = local_bin(e);
      uint32_t m;
      if (segment_reduce<MaxOp>(float_bits(mag), bin, wide, lane, &m) && m) atomicMax(&s_gmax[bin], m);
    }
    if (__syncthreads_or(bad) && tid == 0) atomicOr(&a.header->nonfinite, 1u);
  }

  uint32_t sent_bits = 0;  // bit k: item k is sent
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    if (k * kBlock + warp * 32 >= len) continue;  // warp-uniform
    const int e = k * kBlock + tid;
    const uint32_t bin = local_bin(e);
    const float gm = bits_float(s_gmax[bin < (uint32_t)tile_bins ? bin : 0u]);
    const bool sent = gm > 0.f && fabsf(h[k]) >= gm && g[k] != 0.f;
    const uint32_t ballot = __ballot_sync(kFullMask, sent);
    if (lane == 0) s_chunk[k * kWarps + warp] = __popc(ballot);
    uint32_t c;
    if (segment_reduce<SumOp>(sent ? 1u : 0u, bin, wide, lane, &c) && c) atomicAdd(&s_count[bin], c);
    if (sent) {
      sent_bits |= 1u << k;
      if (ternary && selected_mean) add_term(s_hist, fabsf(g[k]));
    }
  }
  __syncthreads();  // chunk and bin counts complete

  // Chunk (k, warp) covers tile elements [k*kBlock + warp*32, +32): chunk k*kWarps + warp
  // in flat order. Its exclusive prefix plus the lane's rank in the ballot is the position.
  const int chunk_sent = tid < kChunks ? s_chunk[tid] : 0;
  int chunk_start, tile_sent;
  ChunkScan(s_scan).ExclusiveSum(chunk_sent, chunk_start, tile_sent);
  if (tid < kChunks) s_chunk[tid] = chunk_start;  // each thread rewrites only its own slot
  __syncthreads();

  const uint32_t lanes_below = (1u << lane) - 1u;
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    if (k * kBlock + warp * 32 >= len) continue;  // warp-uniform
    const int e = k * kBlock + tid;
    const bool sent = (sent_bits >> k) & 1u;
    const uint32_t ballot = __ballot_sync(kFullMask, sent);
    if (sent) {
      a.stage[tile0 + s_chunk[k * kWarps + warp] + __popc(ballot & lanes_below)] = (uint16_t)e;
    }
  }

  // Per-bin counts, and the binmax_mean terms (max|G| of bins that send) of the fused path.
  // The big path adds into zeroed counts (a bin spans tiles) and leaves its terms to
  // finalize_kernel, which runs after every tile has counted.
  unsigned int terms = 0;
  for (int b = tid; b < tile_bins; b += kBlock) {
    const uint32_t c = s_count[b];
    if (kBig) {
      if (c) atomicAdd(&a.counts[bin0 + b], (int)c);
    } else {
      a.counts[bin0 + b] = (int32_t)c;
      if (ternary && !selected_mean && c) {
        add_term(s_hist, bits_float(s_gmax[b]));
        ++terms;
      }
    }
  }
  if (terms) atomicAdd(&s_terms, terms);
  __syncthreads();
  if (tid == 0) {
    a.tile_count[tile] = tile_sent;
    const unsigned long long n_terms = selected_mean ? (unsigned long long)tile_sent : s_terms;
    if (ternary && n_terms) atomicAdd(&a.header->hist_terms, n_terms);
  }
  if (ternary) {
    for (int s = tid; s < kHistSize; s += kBlock) {
      if (s_hist[s]) atomicAdd(&a.header->hist[s], s_hist[s]);
    }
  }
}

// One block: tile starts, info, scale.
__global__ void __launch_bounds__(kScanThreads) finalize_kernel(SelectArgs a, int64_t n_tiles,
                                                                 bool big) {
  __shared__ unsigned long long s_hist[kHistSize];
  __shared__ unsigned long long s_terms;
  __shared__ uint64_t s_total[kHistSize];
  const int tid = threadIdx.x;
  for (int s = tid; s < kHistSize; s += kScanThreads) s_hist[s] = 0ull;
  if (tid == 0) s_terms = 0ull;
  __syncthreads();

  const int32_t* tile_count = a.tile_count;
  int64_t* tile_start = a.tile_start;
  const long long total = block_exclusive_scan(
      n_tiles, [=](int64_t i) { return tile_count[i]; },
      [=](int64_t i, long long prefix) { tile_start[i] = prefix; });

  const bool ternary = a.value_mode == kValueTernary;
  if (ternary && big && a.scale_mode == kScaleBinmaxMean) {
    unsigned long long terms = 0;
    for (int64_t b = tid; b < a.n_bins; b += kScanThreads) {
      if (a.counts[b] > 0) {
        add_term(s_hist, bits_float(a.gmax[b]));
        ++terms;
      }
    }
    if (terms) atomicAdd(&s_terms, terms);
  }
  __syncthreads();
  for (int s = tid; s < kHistSize; s += kScanThreads) s_total[s] = a.header->hist[s] + s_hist[s];
  __syncthreads();
  if (tid == 0) {
    const bool nonfinite = a.header->nonfinite != 0u;
    float scale = 0.f;
    if (ternary) {
      scale = nonfinite ? bits_float(kQuietNan)
                        : combine_histogram(s_total, a.header->hist_terms + s_terms);
    }
    a.scale[0] = scale;
    a.info[0] = total;
    a.info[1] = nonfinite ? 1 : 0;
  }
}

// One block per tile: staged entries to their compacted position, with Q and G - Q.
__global__ void __launch_bounds__(kBlock) compact_kernel(SelectArgs a) {
  const int64_t tile = blockIdx.x;
  const int count = a.tile_count[tile];
  if (count == 0) return;
  const int64_t tile0 = tile * a.tile_stride;
  const int64_t start = a.tile_start[tile];
  const uint32_t L = a.bin_size;
  const uint32_t base = (uint32_t)(tile0 % L);  // 0 on the fused path (tiles of whole bins)
  const bool ternary = a.value_mode == kValueTernary;
  const float s = ternary ? a.scale[0] : 0.f;
  for (int j = threadIdx.x; j < count; j += kBlock) {
    const uint32_t e = a.stage[tile0 + j];
    const float g = a.residue_out[tile0 + e];  // G, from the selection pass
    const float q = ternary ? (g < 0.f ? -s : s) : round_value(g, a.value_mode);
    a.offsets[start + j] = (int32_t)((base + e) % L);  // base + e < 2^31 + kTile
    a.values[start + j] = q;
    a.residue_out[tile0 + e] = g - q;
  }
}

// ------------------------------------------------------------------ decoding kernels

struct BodyArgs {
  const uint8_t* count;  // count stream
  const uint8_t* entry;  // entry stream
  const uint8_t* value;  // value stream (fp16/fp32)
  int64_t count_bits, count_bytes, entry_bytes, bin_size;
  int width, field_bits, kind;
  float scale;
};

__device__ __forceinline__ int zeros_in_count_byte(const uint8_t* stream, int64_t nbits, int64_t i) {
  const int64_t valid = min((int64_t)8, nbits - 8 * i);  // padding bits are not terminators
  return __popc(~(uint32_t)stream[i] & ((1u << valid) - 1u));
}

// zeros_before[i] = number of 0-bits in count bytes [0, i) = the bin of byte i's first 1-bit.
__global__ void __launch_bounds__(kScanThreads) count_zeros_scan_kernel(const uint8_t* stream,
                                                                         int64_t nbits, int64_t nbytes,
                                                                         int64_t* zeros_before) {
  block_exclusive_scan(
      nbytes, [=](int64_t i) { return zeros_in_count_byte(stream, nbits, i); },
      [=](int64_t i, long long prefix) { zeros_before[i] = prefix; });
}

// LSB-first field of nbits (<= 32) at bit position bitpos; never reads past nbytes.
__device__ __forceinline__ uint64_t read_field(const uint8_t* p, int64_t nbytes, int64_t bitpos,
                                               int nbits) {
  if (nbits == 0) return 0;
  const int64_t first = bitpos >> 3;
  const int shift = (int)(bitpos & 7);
  const int need = (shift + nbits + 7) >> 3;  // at most 5 bytes
  uint64_t acc = 0;
  for (int t = 0; t < need; ++t) {
    if (first + t < nbytes) acc |= (uint64_t)p[first + t] << (8 * t);
  }
  return (acc >> shift) & ((1ull << nbits) - 1ull);
}

__device__ __forceinline__ uint32_t load_le(const uint8_t* p, int bytes) {
  uint32_t v = 0;
  for (int t = 0; t < bytes; ++t) v |= (uint32_t)p[t] << (8 * t);  // bodies are not aligned
  return v;
}

// One thread per count byte: each 1-bit is a sent element j (= 1-bits before it), in bin
// (= 0-bits before it).
__global__ void __launch_bounds__(kAddBlock) sparse_add_kernel(BodyArgs b,
                                                               const int64_t* zeros_before,
                                                               float* out) {
  const uint64_t mask = b.width ? ((1ull << b.width) - 1ull) : 0ull;
  for (int64_t i = (int64_t)blockIdx.x * kAddBlock + threadIdx.x; i < b.count_bytes;
       i += (int64_t)gridDim.x * kAddBlock) {
    const uint32_t byte = b.count[i];
    int64_t bin = zeros_before[i];
    for (int k = 0; k < 8; ++k) {
      const int64_t pos = 8 * i + k;
      if (pos >= b.count_bits) break;
      if (!((byte >> k) & 1u)) {
        ++bin;
        continue;
      }
      const int64_t j = pos - bin;
      const uint64_t field = read_field(b.entry, b.entry_bytes, j * b.field_bits, b.field_bits);
      float v;
      if (b.kind == kValueTernary) {
        v = (field >> b.width) ? -b.scale : b.scale;
      } else if (b.kind == kValueFp16) {
        v = half_bits_to_float((uint16_t)load_le(b.value + 2 * j, 2));
      } else {
        v = bits_float(load_le(b.value + 4 * j, 4));
      }
      out[bin * b.bin_size + (int64_t)(field & mask)] += v;
    }
  }
}

__global__ void __launch_bounds__(kAddBlock) dense_add_kernel(const uint8_t* body, int64_t numel,
                                                              float* out) {
  for (int64_t i = (int64_t)blockIdx.x * kAddBlock + threadIdx.x; i < numel;
       i += (int64_t)gridDim.x * kAddBlock) {
    out[i] += bits_float(load_le(body + 4 * i, 4));
  }
}


}  // namespace

// ------------------------------------------------------------------ host API

size_t select_workspace_bytes(int64_t n, int64_t bin_size) {
  if (n < 0 || bin_size < 1) return 0;
  return make_plan(n, bin_size).bytes;
}

cudaError_t select_launch(const float* grad, const float* residue, float* residue_out, int64_t n,
                          int64_t bin_size, int scale_mode, int value_mode, int32_t* counts,
                          int32_t* offsets, float* values, float* scale, int64_t* info,
                          void* workspace, cudaStream_t stream) {
  if (n < 0 || bin_size < 1 || bin_size > INT32_MAX || workspace == nullptr ||
      (scale_mode != kScaleBinmaxMean && scale_mode != kScaleSelectedMean) ||
      value_mode < kValueTernary || value_mode > kValueFp32) {
    return cudaErrorInvalidValue;
  }
  const Plan p = make_plan(n, bin_size);
  if (p.n_tiles > INT32_MAX) return cudaErrorInvalidValue;  // grid size limit
  auto* ws = static_cast<unsigned char*>(workspace);
  SelectArgs a{};
  a.grad = grad;
  a.residue = residue;
  a.residue_out = residue_out;
  a.n = n;
  a.n_bins = p.n_bins;
  a.tile_stride = p.tile_stride;
  a.bin_size = (uint32_t)bin_size;
  a.div_magic = bin_size >= 2 ? 0xFFFFFFFFu / (uint32_t)bin_size + 1u : 0u;
  a.bins_per_tile = p.bins_per_tile;
  a.scale_mode = scale_mode;
  a.value_mode = value_mode;
  a.counts = counts;
  a.offsets = offsets;
  a.values = values;
  a.scale = scale;
  a.info = info;
  a.header = reinterpret_cast<SelectHeader*>(ws + p.off_header);
  a.tile_count = reinterpret_cast<int32_t*>(ws + p.off_tile_count);
  a.tile_start = reinterpret_cast<int64_t*>(ws + p.off_tile_start);
  a.gmax = reinterpret_cast<uint32_t*>(ws + p.off_gmax);
  a.stage = reinterpret_cast<uint16_t*>(ws + p.off_stage);

  cudaError_t err = cudaMemsetAsync(a.header, 0, sizeof(SelectHeader), stream);
  if (err != cudaSuccess) return err;
  const unsigned int tiles = (unsigned int)p.n_tiles;
  if (p.big && tiles) {
    err = cudaMemsetAsync(a.gmax, 0, (size_t)p.n_bins * sizeof(uint32_t), stream);
    if (err == cudaSuccess) err = cudaMemsetAsync(counts, 0, (size_t)p.n_bins * sizeof(int32_t), stream);
    if (err != cudaSuccess) return err;
    big_bin_max_kernel<<<tiles, kBlock, 0, stream>>>(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
    select_tiles_kernel<true><<<tiles, kBlock, 0, stream>>>(a);
  } else if (tiles) {
    select_tiles_kernel<false><<<tiles, kBlock, 0, stream>>>(a);
  }
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  finalize_kernel<<<1, kScanThreads, 0, stream>>>(a, p.n_tiles, p.big);
  if ((err = cudaGetLastError()) != cudaSuccess) return err;
  if (tiles) {
    compact_kernel<<<tiles, kBlock, 0, stream>>>(a);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  return cudaSuccess;
}

size_t decompress_workspace_bytes(const DeviceBody* bodies, int64_t n_bodies) {
  size_t most = 0;
  for (int64_t p = 0; p < n_bodies; ++p) {
    const DeviceBody& d = bodies[p];
    if (d.kind == kValueDense || d.numel == 0 || d.n_sent == 0) continue;
    const BodyLayout l = body_layout(d.numel, d.bin_size, d.n_sent, d.kind);
    const size_t need = (size_t)l.count_bytes * sizeof(int64_t);
    most = need > most ? need : most;
  }
  return most;
}

cudaError_t decompress_sum_launch(float* out, const DeviceBody* bodies, int64_t n_bodies,
                                  void* workspace, cudaStream_t stream) {
  auto* zeros_before = static_cast<int64_t*>(workspace);
  for (int64_t p = 0; p < n_bodies; ++p) {
    const DeviceBody& d = bodies[p];
    if (d.numel == 0) continue;
    if (d.kind < kValueTernary || d.kind > kValueDense || d.bin_size < 1 || d.bin_size > INT32_MAX)
      return cudaErrorInvalidValue;
    if (d.kind == kValueDense) {
      dense_add_kernel<<<grid_for(d.numel, kAddBlock), kAddBlock, 0, stream>>>(d.body, d.numel, out);
    } else {
      if (d.n_sent == 0) continue;
      if (zeros_before == nullptr) return cudaErrorInvalidValue;
      const BodyLayout l = body_layout(d.numel, d.bin_size, d.n_sent, d.kind);
      BodyArgs b;
      b.count = d.body;
      b.entry = d.body + l.count_bytes;
      b.value = d.body + l.count_bytes + l.entry_bytes;
      b.count_bits = l.n_bins + l.n_sent;
      b.count_bytes = l.count_bytes;
      b.entry_bytes = l.entry_bytes;
      b.bin_size = d.bin_size;
      b.width = l.width;
      b.field_bits = l.field_bits;
      b.kind = d.kind;
      b.scale = d.scale;
      // The previous body's add kernel, which read zeros_before, precedes this on the stream.
      count_zeros_scan_kernel<<<1, kScanThreads, 0, stream>>>(b.count, b.count_bits, b.count_bytes,
                                                              zeros_before);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      sparse_add_kernel<<<grid_for(b.count_bytes, kAddBlock), kAddBlock, 0, stream>>>(b, zeros_before, out);
    }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace adacomp
