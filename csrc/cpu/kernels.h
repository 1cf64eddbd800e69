// The CPU kernels that the per-bucket ops (bucket_kernel.cpp) build on, shared between the
// translation units of csrc/cpu.
#pragma once
#include <ATen/ATen.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

#include "../common.h"

namespace adacomp {

// adacomp::select on CPU (select_kernel.cpp): counts int32[n_bins], offsets int32[n_sent],
// values fp32[n_sent], scale fp32[1], info int64[2] = [n_sent, nonfinite].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> select_cpu(
    const at::Tensor& grad, const at::Tensor& residue, at::Tensor& residue_out,
    int64_t bin_size, int64_t scale_mode, int64_t value_mode);

// Where the selection's streaming pass stages the sent elements, per chunk, in flat order.
struct Staged {
  int32_t* pos;  // position in the chunk
  int32_t* off;  // offset in its bin
  float* g;      // G = R + dW
};

// Staging memory comes from a pool (select_kernel.cpp) so that its pages stay mapped
// from call to call: a fresh allocation of a large tensor's staging area costs a page
// fault for every page a chunk stages into (about 1 ms per call at 4M elements).
struct StageRelease {
  size_t capacity = 0;  // int32 slots
  void operator()(int32_t* p) const;
};
using StageBuffer = std::unique_ptr<int32_t[], StageRelease>;
StageBuffer acquire_stage(size_t slots);

// What the selection's streaming pass leaves behind (select_kernel.cpp, select_pass):
// residue_out holds G = R + dW everywhere, counts the sent elements per bin, and each
// chunk of bins_per_chunk bins has staged its sent elements. They still need their Q and
// R = G - Q (finish_range), which the ternary scale (known only once every bin has been
// seen) makes a second step, over the staged elements only.
struct SelectPass {
  at::Tensor counts;  // int32[nb]
  const int32_t* cnt = nullptr;
  float* ro = nullptr;
  int64_t nb = 0, bins_per_chunk = 1, chunk_elems = 0, n_chunks = 0;
  StageBuffer stage;                 // the storage of st
  Staged st{};                       // chunk c's elements at index c * chunk_elems
  std::vector<int64_t> start;        // [n_chunks + 1]: index of chunk c's first sent element
  int64_t k = 0;                     // elements sent
  bool bad = false;                  // some G not finite (the payload carries no body)
  float scale = 0.0f;                // the ternary scale (NaN if bad)
  int value_mode = kValueTernary;
};

// Argument checks and the streaming pass of adacomp::select (docs/algorithm.md section 1,
// steps 1-4 and the scale of step 5); raises c10::ValueError with select's messages.
SelectPass select_pass(const at::Tensor& grad, const at::Tensor& residue, at::Tensor& residue_out,
                       int64_t bin_size, int64_t scale_mode, int64_t value_mode);

// The vector version select_pass runs on this CPU ("generic" or "avx2").
const char* select_isa();

// Q (step 5) and step 6 for the sent elements j0 <= j < j1 of chunk c (global indices, within
// [start[c], start[c + 1])): Q, R = G - Q written to residue_out, and sent(j, offset in
// bin, Q) in order.
template <class Sent>
inline void finish_range(const SelectPass& s, int64_t c, int64_t j0, int64_t j1, Sent&& sent) {
  const int64_t at = c * s.chunk_elems;
  const int64_t t0 = at + (j0 - s.start[c]);
  const int32_t* pos = s.st.pos + t0;
  const int32_t* off = s.st.off + t0;
  const float* gs = s.st.g + t0;
  float* ro = s.ro + at;
  const int64_t m = j1 - j0;
  if (s.value_mode == kValueTernary) {
    const float scale = s.scale;
    for (int64_t t = 0; t < m; ++t) {
      const float g = gs[t];
      const float q = g < 0.0f ? -scale : scale;
      ro[pos[t]] = g - q;
      sent(j0 + t, off[t], q);
    }
  } else {
    for (int64_t t = 0; t < m; ++t) {
      const float g = gs[t];
      const float q = round_value(g, s.value_mode);
      ro[pos[t]] = g - q;
      sent(j0 + t, off[t], q);
    }
  }
}

// Bytes of a payload body (encode_kernel.cpp) of n_bins bins and n_sent entries.
int64_t body_bytes(int64_t n_bins, int64_t n_sent, int offset_width, int kind);

// Writes that body at `out` (body_bytes(...) bytes); counts must add up to n_sent.
void encode_body_into(uint8_t* out, const int32_t* counts, int64_t n_bins, const int32_t* offsets,
                      const float* values, int64_t n_sent, int offset_width, int kind);

// LSB-first bit writer (bit i of a stream is bit i % 8 of its byte i / 8) for one segment of
// a stream that other threads write the neighbouring segments of. The stream must be zeroed
// beforehand; the segment's two edge bytes, which it may share with its neighbours, are
// OR-ed in atomically, every byte in between is stored.
struct SegmentWriter {
  uint8_t* p = nullptr;  // the byte that bit 0 of acc goes to
  uint64_t acc = 0;
  int nacc = 0;
  bool first = true;  // p is still the segment's first byte
  void begin(uint8_t* stream, int64_t bit) {
    p = stream + (bit >> 3);
    nacc = (int)(bit & 7);
    acc = 0;
    first = true;
  }
  static void or_byte(uint8_t* q, uint8_t v) {
    // The GCC/Clang builtin rather than C++20's std::atomic_ref: PyTorch builds before 2.13
    // compile extensions as C++17.
    if (v) __atomic_fetch_or(q, v, __ATOMIC_RELAXED);
  }
  __attribute__((always_inline)) inline void put(uint64_t bits, int n) {  // n <= 32, bits < 2^n
    acc |= bits << nacc;
    nacc += n;
    if (nacc >= 32) {
      const uint32_t v = (uint32_t)acc;
      if (first) {
        or_byte(p, (uint8_t)v);
        const uint32_t rest = v >> 8;
        std::memcpy(p + 1, &rest, 3);
        first = false;
      } else {
        std::memcpy(p, &v, 4);
      }
      p += 4;
      acc >>= 32;
      nacc -= 32;
    }
  }
  inline void ones(int64_t n) {
    while (n >= 32) {
      put(0xFFFFFFFFull, 32);
      n -= 32;
    }
    if (n) put((1ull << n) - 1, (int)n);
  }
  inline void unary(int64_t n) {  // n ones and a zero
    if (n < 32) {
      put((1ull << n) - 1, (int)n + 1);
    } else {
      ones(n);
      put(0, 1);
    }
  }
  void end() {  // the last partial byte is shared with the next segment
    const int nbytes = (nacc + 7) / 8;
    for (int i = 0; i < nbytes; ++i) {
      const uint8_t v = (uint8_t)(acc >> (8 * i));
      if ((i == 0 && first) || (i == nbytes - 1 && (nacc & 7)))
        or_byte(p + i, v);
      else
        p[i] = v;
    }
    nacc = 0;
    acc = 0;
  }
};

}  // namespace adacomp
