// CPU kernel of adacomp::select: docs/algorithm.md section 1 steps 1-6 in one streaming pass.
//
// The tensor is cut into chunks of whole bins processed in parallel. Within a bin the
// first sweep forms G = R + dW (written straight to residue_out) and the bin maximum, the
// second sweep (over the same, cache-hot, 50 or 500 elements) tests |G + dW| >= gmax.
// Sent positions are collected per chunk and concatenated in chunk order, so the output
// order is the flat order whatever the thread count. The ternary scale needs every bin,
// so sent elements (a few percent of the tensor) get their residue R = G - Q in a short
// fix-up over the sent list only: the tensor itself is streamed once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "../common.h"
#include "kernels.h"

namespace adacomp {
namespace {

// |x| as the bits of a non-negative float. For non-negative floats the bit patterns order
// like the values, and NaN/Inf patterns (>= 0x7F800000) order above every finite value,
// so an integer max gives the bin maximum *and* the non-finite test in one reduction,
// and integer compares vectorize without any NaN caveat.
static inline uint32_t abs_bits(float x) { return float_bits(x) & 0x7FFFFFFFu; }
constexpr uint32_t kInfBits = 0x7F800000u;

struct PassArgs {
  const float* d;
  const float* r;
  float* ro;
  int32_t* cnt;
  int64_t n, L, nb, bins_per_chunk;
  int value_mode;
  bool ternary, binmax;
  int32_t* stage;        // chunk c stages its sent positions at stage + c * chunk_elems
  int64_t chunk_elems;
  int64_t* chunk_k;      // how many chunk c staged
};

// Per-thread accumulators of the pass.
struct Acc {
  uint64_t* hist;
  int64_t hcount = 0;
  uint32_t nonfinite = 0;
};

static inline void add_term(Acc& acc, float v) {
  int slot;
  uint64_t m;
  split_term(v, &slot, &m);
  acc.hist[slot] += m;
  ++acc.hcount;
}

// After a chunk's sweeps (its data still in cache): the selected-mean terms.
static void collect(const PassArgs& a, int64_t c, int64_t k, Acc& acc) {
  a.chunk_k[c] = k;
  if (a.ternary && !a.binmax) {
    const int32_t* stage = a.stage + c * a.chunk_elems;
    const float* g = a.ro + c * a.bins_per_chunk * a.L;
    for (int64_t j = 0; j < k; ++j) add_term(acc, std::fabs(g[stage[j]]));
  }
}

static inline void finish_bin(const PassArgs& a, Acc& acc, int64_t b, int32_t sent,
                              uint32_t gmax_bits) {
  a.cnt[b] = sent;
  if (a.ternary && a.binmax && sent > 0) add_term(acc, bits_float(gmax_bits));
}

// Portable version: two sweeps per bin, the first auto-vectorizes, the second stages
// sent positions branch-free.
static void stream_chunks_generic(const PassArgs& a, int64_t c0, int64_t c1, Acc& acc) {
  for (int64_t c = c0; c < c1; ++c) {
    int32_t* stage = a.stage + c * a.chunk_elems;
    const int64_t b0 = c * a.bins_per_chunk;
    const int64_t b1 = std::min(a.nb, b0 + a.bins_per_chunk);
    const int64_t base = b0 * a.L;
    int64_t k = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = b * a.L;
      const int64_t len = std::min(a.L, a.n - s);
      const float* __restrict__ d = a.d + s;
      const float* __restrict__ r = a.r + s;
      float* __restrict__ o = a.ro + s;
      uint32_t m = 0;
      for (int64_t i = 0; i < len; ++i) {
        const float g = r[i] + d[i];
        o[i] = g;
        const uint32_t x = abs_bits(g);
        m = x > m ? x : m;
      }
      const int64_t k0 = k;
      if (m >= kInfBits) {
        acc.nonfinite = 1;
      } else if (m != 0) {
        const int32_t local0 = (int32_t)(s - base);
        for (int64_t i = 0; i < len; ++i) {
          const float g = o[i];
          stage[k] = local0 + (int32_t)i;
          k += (abs_bits(g + d[i]) >= m) & (abs_bits(g) != 0);
        }
      }
      finish_bin(a, acc, b, (int32_t)(k - k0), m);
    }
    collect(a, c, k, acc);
  }
}

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ADACOMP_HAVE_AVX2_PATH 1

// For each 8-bit lane mask, the lane numbers of its set bits first (left-packing table).
struct PackTable {
  alignas(32) int32_t lanes[256][8];
  PackTable() {
    for (int m = 0; m < 256; ++m) {
      int k = 0;
      for (int l = 0; l < 8; ++l)
        if (m & (1 << l)) lanes[m][k++] = l;
      for (; k < 8; ++k) lanes[m][k] = 0;
    }
  }
};
static const PackTable kPack;

// AVX2 version of the same two sweeps: 8 lanes, unsigned integer max/compare on the
// absolute-value bits, and a left-packing permutation that appends the sent lanes to the
// staging list without a branch. Bit-identical to the generic version: the same fp32
// additions, the same comparisons.
__attribute__((target("avx2"))) static void stream_chunks_avx2(const PassArgs& a, int64_t c0,
                                                               int64_t c1, Acc& acc) {
  const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t c = c0; c < c1; ++c) {
    int32_t* stage = a.stage + c * a.chunk_elems;
    const int64_t b0 = c * a.bins_per_chunk;
    const int64_t b1 = std::min(a.nb, b0 + a.bins_per_chunk);
    const int64_t base = b0 * a.L;
    int64_t k = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = b * a.L;
      const int64_t len = std::min(a.L, a.n - s);
      const float* d = a.d + s;
      const float* r = a.r + s;
      float* o = a.ro + s;
      __m256i vm = zero;
      int64_t i = 0;
      for (; i + 8 <= len; i += 8) {
        const __m256 g = _mm256_add_ps(_mm256_loadu_ps(r + i), _mm256_loadu_ps(d + i));
        _mm256_storeu_ps(o + i, g);
        vm = _mm256_max_epu32(vm, _mm256_and_si256(_mm256_castps_si256(g), absmask));
      }
      __m128i m4 = _mm_max_epu32(_mm256_castsi256_si128(vm), _mm256_extracti128_si256(vm, 1));
      m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, _MM_SHUFFLE(1, 0, 3, 2)));
      m4 = _mm_max_epu32(m4, _mm_shuffle_epi32(m4, _MM_SHUFFLE(2, 3, 0, 1)));
      uint32_t m = (uint32_t)_mm_cvtsi128_si32(m4);
      for (; i < len; ++i) {
        const float g = r[i] + d[i];
        o[i] = g;
        const uint32_t x = abs_bits(g);
        m = x > m ? x : m;
      }
      const int64_t k0 = k;
      if (m >= kInfBits) {
        acc.nonfinite = 1;
      } else if (m != 0) {
        const __m256i thr = _mm256_set1_epi32((int)m);
        const int32_t local0 = (int32_t)(s - base);
        i = 0;
        for (; i + 8 <= len; i += 8) {
          const __m256 g = _mm256_loadu_ps(o + i);
          const __m256i h = _mm256_and_si256(
              _mm256_castps_si256(_mm256_add_ps(g, _mm256_loadu_ps(d + i))), absmask);
          const __m256i ge = _mm256_cmpeq_epi32(_mm256_max_epu32(h, thr), h);  // h >= thr
          const __m256i gz =
              _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(g), absmask), zero);
          const int mask = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(gz, ge)));
          const __m256i lanes = _mm256_load_si256((const __m256i*)kPack.lanes[mask]);
          const __m256i pos = _mm256_add_epi32(_mm256_permutevar8x32_epi32(iota, lanes),
                                               _mm256_set1_epi32(local0 + (int32_t)i));
          _mm256_storeu_si256((__m256i*)(stage + k), pos);
          k += __builtin_popcount((unsigned)mask);
        }
        for (; i < len; ++i) {
          const float g = o[i];
          stage[k] = local0 + (int32_t)i;
          k += (abs_bits(g + d[i]) >= m) & (abs_bits(g) != 0);
        }
      }
      finish_bin(a, acc, b, (int32_t)(k - k0), m);
    }
    collect(a, c, k, acc);
  }
}

static bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

static void stream_chunks(const PassArgs& a, int64_t c0, int64_t c1, Acc& acc) {
#ifdef ADACOMP_HAVE_AVX2_PATH
  // ADACOMP_NO_AVX2=1 forces the portable path (read once; the tests use it).
  static const bool use_avx2 = cpu_has_avx2() && std::getenv("ADACOMP_NO_AVX2") == nullptr;
  if (use_avx2) {
    stream_chunks_avx2(a, c0, c1, acc);
    return;
  }
#endif
  stream_chunks_generic(a, c0, c1, acc);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_cpu(
    const at::Tensor& grad, const at::Tensor& residue, at::Tensor& residue_out,
    int64_t bin_size, int64_t scale_mode, int64_t value_mode) {
  TORCH_CHECK_VALUE(bin_size >= 1, "adacomp::select: bin_size must be >= 1, got ", bin_size);
  TORCH_CHECK_VALUE(scale_mode == kScaleBinmaxMean || scale_mode == kScaleSelectedMean,
                    "adacomp::select: unknown scale_mode ", scale_mode);
  TORCH_CHECK_VALUE(value_mode >= kValueTernary && value_mode <= kValueFp32,
                    "adacomp::select: unknown value_mode ", value_mode);
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&grad, &residue, &residue_out}) {
    TORCH_CHECK_VALUE(t->scalar_type() == at::kFloat,
                      "adacomp::select: expected fp32 tensors, got ", t->scalar_type(),
                      " (convert with .float())");
    TORCH_CHECK_VALUE(t->is_contiguous(), "adacomp::select: tensors must be contiguous");
    TORCH_CHECK_VALUE(t->device().is_cpu(), "adacomp::select: CPU kernel got a ", t->device(),
                      " tensor");
  }
  const int64_t n = grad.numel();
  TORCH_CHECK_VALUE(n == 0 || (residue_out.data_ptr() != residue.data_ptr() &&
                                residue_out.data_ptr() != grad.data_ptr()),
                    "adacomp::select: residue_out must be a separate buffer (it may not alias "
                    "grad or residue: the old residue must survive a non-finite step)");
  TORCH_CHECK_VALUE(residue.numel() == n && residue_out.numel() == n,
                    "adacomp::select: grad has ", n, " elements but residue has ",
                    residue.numel(), " and residue_out ", residue_out.numel());

  const int64_t L = bin_size;
  const int64_t nb = n == 0 ? 0 : (n + L - 1) / L;
  const float* d = grad.data_ptr<float>();
  const float* r = residue.data_ptr<float>();
  float* ro = residue_out.data_ptr<float>();
  auto counts = at::empty({nb}, grad.options().dtype(at::kInt));
  int32_t* cnt = counts.data_ptr<int32_t>();

  const int64_t bins_per_chunk = std::max<int64_t>(1, 32768 / L);
  const int64_t chunk_elems = std::min(bins_per_chunk * L, n);
  const int64_t n_chunks = nb == 0 ? 0 : (nb + bins_per_chunk - 1) / bins_per_chunk;
  // Staging area: one region per chunk, +8 for the last 8-lane store. Left uninitialised:
  // a chunk touches only the few pages it stages into.
  std::unique_ptr<int32_t[]> stage(new int32_t[(size_t)(n_chunks * chunk_elems + 8)]);
  std::vector<int64_t> chunk_k(n_chunks, 0);
  const int n_threads = at::get_num_threads();
  std::vector<uint64_t> hist((size_t)n_threads * kHistSize, 0);
  std::vector<int64_t> hist_count(n_threads, 0);
  std::vector<char> bad(n_threads, 0);
  const bool ternary = value_mode == kValueTernary;
  const bool binmax = scale_mode == kScaleBinmaxMean;

  const PassArgs args{d,       r,      ro,          cnt,           n,
                      L,       nb,     bins_per_chunk, (int)value_mode, ternary,
                      binmax,  stage.get(), chunk_elems, chunk_k.data()};
  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    const int tid = at::get_thread_num();
    Acc acc;
    acc.hist = hist.data() + (size_t)tid * kHistSize;
    stream_chunks(args, c0, c1, acc);
    // parallel_for may call the lambda several times on one thread: accumulate.
    hist_count[tid] += acc.hcount;
    bad[tid] |= acc.nonfinite ? 1 : 0;
  });

  std::vector<int64_t> start(n_chunks + 1, 0);
  for (int64_t c = 0; c < n_chunks; ++c) start[c + 1] = start[c] + chunk_k[c];
  const int64_t k = start[n_chunks];
  bool any_bad = false;
  for (char x : bad) any_bad |= x != 0;

  float scale = 0.0f;
  if (ternary) {
    uint64_t total[kHistSize] = {0};
    uint64_t count = 0;
    for (int t = 0; t < n_threads; ++t) {
      for (int e = 0; e < kHistSize; ++e) total[e] += hist[(size_t)t * kHistSize + e];
      count += (uint64_t)hist_count[t];
    }
    scale = any_bad ? NAN : combine_histogram(total, count);
  }

  // Compaction and the fix-up of the sent elements only: offsets from the per-bin counts
  // (no division), Q, and R = G - Q.
  auto offsets = at::empty({k}, grad.options().dtype(at::kInt));
  auto values = at::empty({k}, grad.options());
  int32_t* off = offsets.data_ptr<int32_t>();
  float* val = values.data_ptr<float>();
  const int vm = (int)value_mode;
  at::parallel_for(0, n_chunks, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int32_t* st = stage.get() + c * chunk_elems;
      const int64_t b0 = c * bins_per_chunk;
      const int64_t b1 = std::min(nb, b0 + bins_per_chunk);
      const int64_t base = b0 * L;
      int64_t j = start[c];
      const int64_t jend = start[c + 1];
      for (int64_t b = b0; b < b1 && j < jend; ++b) {
        const int32_t bin_start = (int32_t)(b * L - base);
        for (int32_t t = 0; t < cnt[b]; ++t, ++j, ++st) {
          const int64_t i = base + *st;
          const float g = ro[i];
          const float q = ternary ? (g < 0.0f ? -scale : scale) : round_value(g, vm);
          off[j] = *st - bin_start;
          val[j] = q;
          ro[i] = g - q;
        }
      }
    }
  });

  auto scale_t = at::empty({1}, grad.options());
  scale_t.data_ptr<float>()[0] = scale;
  auto info = at::empty({2}, grad.options().dtype(at::kLong));
  info.data_ptr<int64_t>()[0] = k;
  info.data_ptr<int64_t>()[1] = any_bad ? 1 : 0;
  return {counts, offsets, values, scale_t, info};
}

TORCH_LIBRARY_IMPL(adacomp, CPU, m) { m.impl("select", &select_cpu); }

}  // namespace adacomp
