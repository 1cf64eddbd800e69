// CPU kernel of adacomp::select: docs/algorithm.md section 1 steps 1-6, as one streaming pass
// over the tensor (steps 1-4 and the scale of step 5) and a step over the sent elements only
// (Q and R = G - Q).
//
// The tensor is cut into chunks of whole bins processed in parallel. Within a bin the
// first sweep forms G = R + dW (written straight to residue_out) and the bin maximum, the
// second sweep (over the same, cache-hot, 50 or 500 elements) tests |G + dW| >= gmax and
// G != 0 (a bin whose maximum is 0 sends nothing).
// Each chunk stages its sent elements (chunk-local position, offset in the bin, and G) in
// flat order; chunks are concatenated in chunk order, so the output order is the flat order
// whatever the thread count. The ternary scale needs every bin, so the sent elements (a few
// percent of the tensor) get Q and R = G - Q in a second step over the staged elements only
// (finish_range in kernels.h): the tensor itself is streamed once, and the second step reads
// nothing back from it.
//
// Two versions of the pass, bit-identical (the same fp32 additions and the same integer
// comparisons), chosen at run time by what the CPU supports: AVX2 (8 lanes, a left-packing
// table) and a portable one. ADACOMP_CPU_ISA=generic|avx2 caps the choice (read once per
// process; the tests use it to check both against the reference). An AVX-512 version (16
// lanes, masked bin tails, in-register compression) was tried on this project's Zen 4
// machine and dropped: it was 10-20 % slower than AVX2 once the tensors outgrow the cache.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
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
  bool ternary, binmax;
  Staged st;             // chunk c stages at offset c * chunk_elems of each array
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

// After a chunk's sweeps: the selected-mean terms.
static void collect(const PassArgs& a, int64_t c, int64_t k, Acc& acc) {
  a.chunk_k[c] = k;
  if (a.ternary && !a.binmax) {
    const float* g = a.st.g + c * a.chunk_elems;
    for (int64_t j = 0; j < k; ++j) add_term(acc, std::fabs(g[j]));
  }
}

static inline void finish_bin(const PassArgs& a, Acc& acc, int64_t b, int32_t sent,
                              uint32_t gmax_bits) {
  a.cnt[b] = sent;
  if (a.ternary && a.binmax && sent > 0) add_term(acc, bits_float(gmax_bits));
}

// The scalar second sweep over elements [i, len) of a bin (the vector versions' tails).
static inline int64_t stage_tail(const PassArgs& a, int64_t c, int64_t s, int64_t i, int64_t len,
                                 uint32_t m, int64_t k) {
  const int64_t at = c * a.chunk_elems;
  const int32_t local0 = (int32_t)(s - at);
  const float* d = a.d + s;
  const float* o = a.ro + s;
  for (; i < len; ++i) {
    const float g = o[i];
    a.st.pos[at + k] = local0 + (int32_t)i;
    a.st.off[at + k] = (int32_t)i;
    a.st.g[at + k] = g;
    k += (abs_bits(g + d[i]) >= m) & (abs_bits(g) != 0);
  }
  return k;
}

// Portable version: two sweeps per bin, the first auto-vectorizes, the second stages
// sent elements branch-free.
static void stream_chunks_generic(const PassArgs& a, int64_t c0, int64_t c1, Acc& acc) {
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t b0 = c * a.bins_per_chunk;
    const int64_t b1 = std::min(a.nb, b0 + a.bins_per_chunk);
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
        k = stage_tail(a, c, s, 0, len, m, k);
      }
      finish_bin(a, acc, b, (int32_t)(k - k0), m);
    }
    collect(a, c, k, acc);
  }
}

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define ADACOMP_HAVE_X86_PATHS 1

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

// The AVX2 second sweep over the whole 8-lane vectors of a bin of len elements (G in o, dW
// in d): stages the lanes with |G + dW| >= gmax (thr) and G != 0 at *k, left-packed; with
// kSkip, a vector that sends nothing stores nothing. Returns the first element not swept.
template <bool kSkip>
__attribute__((target("avx2"))) static inline int64_t sweep2_avx2(const float* o, const float* d, int64_t len,
                                                                  __m256i thr, int32_t local0, int32_t* spos,
                                                                  int32_t* soff, float* sg, int64_t* k_io) {
  const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  int64_t k = *k_io;
  int64_t i = 0;
  for (; i + 8 <= len; i += 8) {
    const __m256 g = _mm256_loadu_ps(o + i);
    const __m256i h =
        _mm256_and_si256(_mm256_castps_si256(_mm256_add_ps(g, _mm256_loadu_ps(d + i))), absmask);
    const __m256i ge = _mm256_cmpeq_epi32(_mm256_max_epu32(h, thr), h);  // h >= thr
    const __m256i gz = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(g), absmask), zero);
    const int mask = _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(gz, ge)));
    if (kSkip && mask == 0) continue;
    const __m256i lanes = _mm256_load_si256((const __m256i*)kPack.lanes[mask]);
    const __m256i packed = _mm256_permutevar8x32_epi32(iota, lanes);
    _mm256_storeu_si256((__m256i*)(spos + k), _mm256_add_epi32(packed, _mm256_set1_epi32(local0 + (int32_t)i)));
    _mm256_storeu_si256((__m256i*)(soff + k), _mm256_add_epi32(packed, _mm256_set1_epi32((int32_t)i)));
    _mm256_storeu_ps(sg + k, _mm256_permutevar8x32_ps(g, lanes));
    k += __builtin_popcount((unsigned)mask);
  }
  *k_io = k;
  return i;
}

// AVX2 version of the same two sweeps: 8 lanes, unsigned integer max/compare on the
// absolute-value bits, and a left-packing permutation that appends the sent lanes to the
// staging arrays (sweep2_avx2: branch-free, except after a sparse bin).
__attribute__((target("avx2"))) static void stream_chunks_avx2(const PassArgs& a, int64_t c0,
                                                               int64_t c1, Acc& acc) {
  const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t at = c * a.chunk_elems;
    int32_t* spos = a.st.pos + at;
    int32_t* soff = a.st.off + at;
    float* sg = a.st.g + at;
    const int64_t b0 = c * a.bins_per_chunk;
    const int64_t b1 = std::min(a.nb, b0 + a.bins_per_chunk);
    int64_t k = 0;
    bool sparse = false;
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
        const int32_t local0 = (int32_t)(s - at);
        // Where the previous bin sent at most one element in 64, most 8-lane vectors send
        // nothing and skipping their staging stores pays; where it sent more, the branch
        // would be mispredicted too often (both loops stage the same elements).
        i = sparse ? sweep2_avx2<true>(o, d, len, thr, local0, spos, soff, sg, &k)
                   : sweep2_avx2<false>(o, d, len, thr, local0, spos, soff, sg, &k);
        k = stage_tail(a, c, s, i, len, m, k);
      }
      finish_bin(a, acc, b, (int32_t)(k - k0), m);
      sparse = (k - k0) * 64 <= len;
    }
    collect(a, c, k, acc);
  }
}
#endif

enum class Isa { kGeneric, kAvx2 };

static Isa pick_isa() {
  Isa best = Isa::kGeneric;
#ifdef ADACOMP_HAVE_X86_PATHS
  if (__builtin_cpu_supports("avx2")) best = Isa::kAvx2;
#endif
  const char* cap = std::getenv("ADACOMP_CPU_ISA");
  if (cap == nullptr) return best;
  const std::string want(cap);
  TORCH_CHECK_VALUE(want == "generic" || want == "avx2",
                    "ADACOMP_CPU_ISA must be generic or avx2, got '", want, "'");
  const Isa asked = want == "generic" ? Isa::kGeneric : Isa::kAvx2;
  return std::min(best, asked);
}

// The version in use, chosen once per process (so ADACOMP_CPU_ISA is read once).
static Isa current_isa() {
  static const Isa isa = pick_isa();
  return isa;
}

static void stream_chunks(const PassArgs& a, int64_t c0, int64_t c1, Acc& acc) {
  const Isa isa = current_isa();
#ifdef ADACOMP_HAVE_X86_PATHS
  if (isa == Isa::kAvx2) return stream_chunks_avx2(a, c0, c1, acc);
#endif
  stream_chunks_generic(a, c0, c1, acc);
}

}  // namespace

namespace {
// Allocated once and never destroyed: a selection still running on another thread while
// the process exits (a DDP hook's worker, say) must not return a buffer to a destroyed pool.
struct StagePool {
  std::mutex mutex;
  std::vector<std::pair<int32_t*, size_t>> free;  // free buffers, oldest first
  size_t slots = 0;                               // their total capacity
};
StagePool& stage_pool_state() {
  static StagePool* pool = new StagePool();
  return *pool;
}
// A bucket holds one buffer per tensor while it is compressed (the GPT of the benchmarks
// has 27 in one bucket), so the pool keeps up to 256 of them, with at most 2^28 slots in
// all (1 GiB of address space; only the pages a selection touched are resident).
constexpr size_t kStagePoolBuffers = 256;
constexpr size_t kStagePoolSlots = (size_t)1 << 28;
}  // namespace

StageBuffer acquire_stage(size_t slots) {
  slots = std::max<size_t>(slots, 1);
  {
    StagePool& pool = stage_pool_state();
    const std::lock_guard<std::mutex> lock(pool.mutex);
    size_t best = pool.free.size();
    for (size_t i = 0; i < pool.free.size(); ++i)
      if (pool.free[i].second >= slots &&
          (best == pool.free.size() || pool.free[i].second < pool.free[best].second))
        best = i;
    if (best < pool.free.size()) {
      const auto [p, capacity] = pool.free[best];
      pool.free.erase(pool.free.begin() + (std::ptrdiff_t)best);
      pool.slots -= capacity;
      return StageBuffer(p, StageRelease{capacity});
    }
  }
  return StageBuffer(new int32_t[slots], StageRelease{slots});
}

// Back to the pool; past its limits the least recently returned buffers are freed (the
// one just returned is kept even if it alone is over the limit, so that one huge tensor
// does not fault its staging pages in again on every call).
void StageRelease::operator()(int32_t* p) const {
  StagePool& pool = stage_pool_state();
  const std::lock_guard<std::mutex> lock(pool.mutex);
  pool.free.emplace_back(p, capacity);
  pool.slots += capacity;
  while (pool.free.size() > 1 &&
         (pool.free.size() > kStagePoolBuffers || pool.slots > kStagePoolSlots)) {
    pool.slots -= pool.free.front().second;
    delete[] pool.free.front().first;
    pool.free.erase(pool.free.begin());
  }
}

const char* select_isa() {
  static const char* names[] = {"generic", "avx2"};
  return names[(int)current_isa()];
}

SelectPass select_pass(const at::Tensor& grad, const at::Tensor& residue, at::Tensor& residue_out,
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

  SelectPass s;
  const int64_t L = bin_size;
  const int64_t nb = n == 0 ? 0 : (n + L - 1) / L;
  s.nb = nb;
  s.value_mode = (int)value_mode;
  s.ro = residue_out.data_ptr<float>();
  s.counts = at::empty({nb}, grad.options().dtype(at::kInt));
  int32_t* cnt = s.counts.data_ptr<int32_t>();
  s.cnt = cnt;

  s.bins_per_chunk = std::max<int64_t>(1, 32768 / L);
  s.chunk_elems = std::min(s.bins_per_chunk * L, n);
  s.n_chunks = nb == 0 ? 0 : (nb + s.bins_per_chunk - 1) / s.bins_per_chunk;
  // Staging: one region per chunk in each of three arrays. Left uninitialised: a chunk
  // touches only the few pages it stages into.
  const size_t region = (size_t)(s.n_chunks * s.chunk_elems);
  s.stage = acquire_stage(3 * region);
  s.st = Staged{s.stage.get(), s.stage.get() + region, reinterpret_cast<float*>(s.stage.get() + 2 * region)};
  std::vector<int64_t> chunk_k(s.n_chunks, 0);
  const int n_threads = at::get_num_threads();
  std::vector<uint64_t> hist((size_t)n_threads * kHistSize, 0);
  std::vector<int64_t> hist_count(n_threads, 0);
  std::vector<char> bad(n_threads, 0);
  const bool ternary = value_mode == kValueTernary;
  const bool binmax = scale_mode == kScaleBinmaxMean;

  const PassArgs args{grad.data_ptr<float>(), residue.data_ptr<float>(), s.ro, cnt, n, L, nb,
                      s.bins_per_chunk, ternary, binmax, s.st, s.chunk_elems, chunk_k.data()};
  at::parallel_for(0, s.n_chunks, 1, [&](int64_t c0, int64_t c1) {
    const int tid = at::get_thread_num();
    Acc acc;
    acc.hist = hist.data() + (size_t)tid * kHistSize;
    stream_chunks(args, c0, c1, acc);
    // parallel_for may call the lambda several times on one thread: accumulate.
    hist_count[tid] += acc.hcount;
    bad[tid] |= acc.nonfinite ? 1 : 0;
  });

  s.start.assign(s.n_chunks + 1, 0);
  for (int64_t c = 0; c < s.n_chunks; ++c) s.start[c + 1] = s.start[c] + chunk_k[c];
  s.k = s.start[s.n_chunks];
  for (char x : bad) s.bad |= x != 0;
  if (ternary) {
    uint64_t total[kHistSize] = {0};
    uint64_t count = 0;
    for (int t = 0; t < n_threads; ++t) {
      for (int e = 0; e < kHistSize; ++e) total[e] += hist[(size_t)t * kHistSize + e];
      count += (uint64_t)hist_count[t];
    }
    s.scale = s.bad ? NAN : combine_histogram(total, count);
  }
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_cpu(
    const at::Tensor& grad, const at::Tensor& residue, at::Tensor& residue_out,
    int64_t bin_size, int64_t scale_mode, int64_t value_mode) {
  SelectPass s = select_pass(grad, residue, residue_out, bin_size, scale_mode, value_mode);
  // Compaction and the fix-up of the sent elements only: Q and R = G - Q.
  auto offsets = at::empty({s.k}, grad.options().dtype(at::kInt));
  auto values = at::empty({s.k}, grad.options());
  int32_t* off = offsets.data_ptr<int32_t>();
  float* val = values.data_ptr<float>();
  at::parallel_for(0, s.n_chunks, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      finish_range(s, c, s.start[c], s.start[c + 1], [&](int64_t j, int32_t offset, float q) {
        off[j] = offset;
        val[j] = q;
      });
  });
  auto scale_t = at::empty({1}, grad.options());
  scale_t.data_ptr<float>()[0] = s.scale;
  auto info = at::empty({2}, grad.options().dtype(at::kLong));
  info.data_ptr<int64_t>()[0] = s.k;
  info.data_ptr<int64_t>()[1] = s.bad ? 1 : 0;
  return {s.counts, offsets, values, scale_t, info};
}

TORCH_LIBRARY_IMPL(adacomp, CPU, m) { m.impl("select", &select_cpu); }

}  // namespace adacomp
