// CPU kernel of adacomp::select: ADACOMP.md section 1 steps 1-6 in one streaming pass.
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
#include <vector>

#include "../common.h"

namespace adacomp {
namespace {

struct Chunk {
  std::vector<int64_t> index;  // global positions of sent elements
  std::vector<float> gvalue;   // their G
};

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
  const int64_t n_chunks = nb == 0 ? 0 : (nb + bins_per_chunk - 1) / bins_per_chunk;
  std::vector<Chunk> chunks(n_chunks);
  const int n_threads = at::get_num_threads();
  std::vector<uint64_t> hist((size_t)n_threads * kHistSize, 0);
  std::vector<int64_t> hist_count(n_threads, 0);
  std::vector<char> bad(n_threads, 0);
  const bool ternary = value_mode == kValueTernary;
  const bool binmax = scale_mode == kScaleBinmaxMean;

  at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
    const int tid = at::get_thread_num();
    uint64_t* h = hist.data() + (size_t)tid * kHistSize;
    int64_t hcount = 0;
    uint32_t nonfinite = 0;
    for (int64_t c = c0; c < c1; ++c) {
      Chunk& out = chunks[c];
      const int64_t b0 = c * bins_per_chunk;
      const int64_t b1 = std::min(nb, b0 + bins_per_chunk);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t s = b * L;
        const int64_t len = std::min(L, n - s);
        const float* db = d + s;
        const float* rb = r + s;
        float* ob = ro + s;
        float gmax = 0.0f;
        uint32_t bad_bits = 0;
        for (int64_t i = 0; i < len; ++i) {
          const float g = rb[i] + db[i];
          ob[i] = g;
          const float a = std::fabs(g);
          gmax = a > gmax ? a : gmax;
          bad_bits |= !(a <= 3.40282347e38f);
        }
        nonfinite |= bad_bits;
        int32_t sent = 0;
        if (gmax > 0.0f) {
          for (int64_t i = 0; i < len; ++i) {
            const float g = ob[i];
            const float hval = g + db[i];
            if (std::fabs(hval) >= gmax && g != 0.0f) {
              out.index.push_back(s + i);
              if (ternary) {
                out.gvalue.push_back(g);
                if (!binmax) {
                  int slot;
                  uint64_t m;
                  split_term(std::fabs(g), &slot, &m);
                  h[slot] += m;
                  ++hcount;
                }
              } else {
                const float q = round_value(g, (int)value_mode);
                out.gvalue.push_back(q);
                ob[i] = g - q;
              }
              ++sent;
            }
          }
        }
        cnt[b] = sent;
        if (ternary && binmax && sent > 0) {
          int slot;
          uint64_t m;
          split_term(gmax, &slot, &m);
          h[slot] += m;
          ++hcount;
        }
      }
    }
    // parallel_for may call the lambda several times on one thread: accumulate.
    hist_count[tid] += hcount;
    bad[tid] |= nonfinite ? 1 : 0;
  });

  std::vector<int64_t> start(n_chunks + 1, 0);
  for (int64_t c = 0; c < n_chunks; ++c) start[c + 1] = start[c] + (int64_t)chunks[c].index.size();
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

  auto offsets = at::empty({k}, grad.options().dtype(at::kInt));
  auto values = at::empty({k}, grad.options());
  int32_t* off = offsets.data_ptr<int32_t>();
  float* val = values.data_ptr<float>();
  at::parallel_for(0, n_chunks, 16, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const Chunk& ch = chunks[c];
      const int64_t base = start[c];
      for (size_t j = 0; j < ch.index.size(); ++j) {
        const int64_t i = ch.index[j];
        off[base + j] = (int32_t)(i % L);
        if (ternary) {
          const float g = ch.gvalue[j];
          const float q = g < 0.0f ? -scale : scale;
          val[base + j] = q;
          ro[i] = g - q;
        } else {
          val[base + j] = ch.gvalue[j];
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

}  // namespace

TORCH_LIBRARY_IMPL(adacomp, CPU, m) { m.impl("select", &select_cpu); }

}  // namespace adacomp
