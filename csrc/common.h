// Shared by every native backend (C++ CPU kernel and the CUDA core, which nvcc compiles
// without any PyTorch header). Keep this file free of PyTorch includes.
//
// The AdaComp scale is a mean of non-negative fp32 terms. To make it bit-reproducible
// whatever the order of summation (threads, GPU blocks), terms are split into an integer
// mantissa and an exponent, the mantissas are summed per exponent in 64-bit integers
// (order-independent), and the per-exponent sums are combined in fp64 in one fixed order
// (largest exponent first). adacomp/_reference.py defines the same computation.
#pragma once
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define ADACOMP_HD __host__ __device__ __forceinline__
#else
#define ADACOMP_HD inline
#endif

namespace adacomp {

constexpr int kHistSize = 256;
constexpr int kScaleBinmaxMean = 0;
constexpr int kScaleSelectedMean = 1;
constexpr int kValueTernary = 0;
constexpr int kValueFp16 = 1;
constexpr int kValueFp32 = 2;
constexpr int kValueDense = 3;  // payload kind only: plain fp32 values
constexpr float kFp16Max = 65504.0f;

ADACOMP_HD uint32_t float_bits(float v) {
  uint32_t u;
  memcpy(&u, &v, sizeof(u));
  return u;
}

ADACOMP_HD float bits_float(uint32_t u) {
  float v;
  memcpy(&v, &u, sizeof(v));
  return v;
}

// v = mant * 2^(slot - 150), slot in [1, 254], for finite v >= 0.
ADACOMP_HD void split_term(float v, int* slot, uint64_t* mant) {
  uint32_t bits = float_bits(v);
  uint32_t biased = bits >> 23;
  uint32_t m = bits & 0x7FFFFFu;
  if (biased > 0) m |= 0x800000u;
  *slot = biased > 0 ? (int)biased : 1;
  *mant = m;
}

// Fixed-order fp64 combination of an exponent histogram, one rounding to fp32.
ADACOMP_HD float combine_histogram(const uint64_t* hist, uint64_t count) {
  if (count == 0) return 0.0f;
  double acc = 0.0;
  for (int e = kHistSize - 1; e > 0; --e) {
    if (hist[e]) {
      // The product is exact (a power of two times an integer below 2^53), so
      // contracting it into an FMA cannot change the result.
      double p = (double)hist[e];
      // 2^(e-150) built from its bits (e - 150 is in [-149, 104], a normal double): an
      // exact ldexp without libm, the same on host and device.
      const uint64_t pow_bits = (uint64_t)(e - 150 + 1023) << 52;
      double two_k;
      memcpy(&two_k, &pow_bits, sizeof(two_k));
      acc += p * two_k;
    }
  }
  return (float)(acc / (double)count);
}

// fp32 -> fp16 bits, round to nearest even (IEEE), saturating inputs are clamped by the
// caller. Used by the CPU kernel; the CUDA core uses __float2half_rn.
ADACOMP_HD uint16_t float_to_half_bits(float f) {
  uint32_t x = float_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return (uint16_t)(sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u));
  if (ax >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  // rounds to inf
  if (ax < 0x38800000u) {  // subnormal half or zero
    if (ax < 0x33000000u) return (uint16_t)sign;  // below half of smallest subnormal
    uint32_t e = ax >> 23;
    uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
    uint32_t shift = 126 - e;  // 14 + (113 - e) - 1 ... chosen so result is m >> (shift)
    // value = m * 2^(e-150); half subnormal unit = 2^-24 -> q = m * 2^(e-126)
    uint32_t q = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1u);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (q & 1u))) q += 1;
    return (uint16_t)(sign | q);
  }
  uint32_t e = (ax >> 23) - 112;  // rebias 127 -> 15
  uint32_t m = ax & 0x7FFFFFu;
  uint32_t q = (e << 10) | (m >> 13);
  uint32_t rem = m & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (q & 1u))) q += 1;
  return (uint16_t)(sign | q);
}

ADACOMP_HD float half_bits_to_float(uint16_t h) {
  uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1Fu;
  uint32_t m = h & 0x3FFu;
  if (e == 0x1F) return bits_float(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    // subnormal: m * 2^-24, exact in fp32
    float v = (float)m * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return bits_float(sign | ((e + 112) << 23) | (m << 13));
}

// The last index m in [0, n) with start(m) <= k, for starts that never decrease and
// start(0) <= k (the piece, payload or range holding position k).
template <class Start>
ADACOMP_HD int64_t last_start_at_or_before(int64_t n, int64_t k, Start start) {
  int64_t a = 0, z = n - 1;
  while (a < z) {
    const int64_t m = a + (z - a + 1) / 2;
    if (start(m) <= k) a = m; else z = m - 1;
  }
  return a;
}

// Quantized value of a sent element for the unquantized value modes.
ADACOMP_HD float round_value(float g, int value_mode) {
  if (value_mode == kValueFp32) return g;
  float c = g > kFp16Max ? kFp16Max : (g < -kFp16Max ? -kFp16Max : g);
  return half_bits_to_float(float_to_half_bits(c));
}

}  // namespace adacomp
