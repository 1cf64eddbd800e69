// Payload body decoding shared by the native decoders (see adacomp/payload.py, which owns
// the format and documents it). Plain C++, no PyTorch: the CUDA decoder reuses it for the
// host-side validation pass.
//
// Body = count stream | entry stream | value stream, each padded to whole bytes.
//   count stream: per bin, its number of sent elements in unary (that many 1-bits, then a
//                 0-bit), LSB-first within bytes; n_bins + n_sent bits.
//   entry stream: per sent element, in flat order, a field of w (+1 sign bit, ternary only)
//                 bits: the bin-local offset in the low w bits, w = ceil(log2(bin_size)).
//   value stream: fp16 or fp32 little-endian values (value kinds fp16/fp32 only).
// Dense kind: the body is numel fp32 values.
#pragma once
#include <stdint.h>
#include <string.h>

#include "common.h"

namespace adacomp {

enum DecodeError {
  kOk = 0,
  kCountStreamOverrun,   // unary counts run past the count stream
  kBinOverfull,          // a bin claims more elements than it has
  kCountMismatch,        // the counts do not add up to n_sent / stream length
  kCountPadding,         // non-zero padding bits in the count stream
  kOffsetOutOfBin,       // an offset lies outside its bin
  kOffsetOrder,          // offsets within a bin not strictly increasing
  kEntryPadding,         // non-zero padding bits in the entry stream
  kValueNotFinite,       // a stored value is NaN/Inf while the non-finite flag is clear
  kLengthMismatch,       // the buffer length differs from what the header implies
};

inline const char* decode_error_message(int code) {
  switch (code) {
    case kCountStreamOverrun: return "count stream ends inside a bin (truncated or corrupt counts)";
    case kBinOverfull: return "a bin claims more sent elements than it holds";
    case kCountMismatch: return "bin counts do not add up to the header's n_sent";
    case kCountPadding: return "non-zero padding bits after the count stream";
    case kOffsetOutOfBin: return "an element offset lies outside its bin";
    case kOffsetOrder: return "element offsets within a bin are not strictly increasing";
    case kEntryPadding: return "non-zero padding bits after the entry stream";
    case kValueNotFinite: return "a stored value is not finite but the non-finite flag is clear";
    case kLengthMismatch: return "payload length differs from the length its header implies";
    default: return "ok";
  }
}

struct BodyLayout {
  int64_t numel, bin_size, n_bins, n_sent;
  int kind;
  int width;       // bits of the offset field
  int field_bits;  // width + sign bit (ternary) or width
  int64_t count_bytes, entry_bytes, value_bytes;
};

inline int offset_width(int64_t bin_size) {
  int w = 0;
  while (((int64_t)1 << w) < bin_size) ++w;
  return w;
}

inline BodyLayout body_layout(int64_t numel, int64_t bin_size, int64_t n_sent, int kind) {
  BodyLayout l;
  l.numel = numel;
  l.bin_size = bin_size;
  l.n_bins = numel == 0 ? 0 : (numel + bin_size - 1) / bin_size;
  l.n_sent = n_sent;
  l.kind = kind;
  l.width = offset_width(bin_size);
  l.field_bits = l.width + (kind == kValueTernary ? 1 : 0);
  l.count_bytes = (l.n_bins + n_sent + 7) / 8;
  l.entry_bytes = (n_sent * l.field_bits + 7) / 8;
  l.value_bytes = kind == kValueFp16 ? 2 * n_sent : (kind == kValueFp32 ? 4 * n_sent : 0);
  if (kind == kValueDense) {
    l.count_bytes = l.entry_bytes = 0;
    l.value_bytes = 4 * numel;
  }
  return l;
}

// Reads LSB-first bit fields; never reads past `nbits`.
struct BitReader {
  const uint8_t* p;
  int64_t nbits;
  int64_t pos = 0;
  BitReader(const uint8_t* data, int64_t nbytes) : p(data), nbits(nbytes * 8) {}
  inline uint32_t bit() {
    uint32_t b = (p[pos >> 3] >> (pos & 7)) & 1u;
    ++pos;
    return b;
  }
  inline uint64_t bits(int n) {  // n <= 57, caller checked bounds
    uint64_t v = 0;
    int got = 0;
    while (got < n) {
      const int64_t byte = pos >> 3;
      const int sh = (int)(pos & 7);
      int take = 8 - sh;
      if (take > n - got) take = n - got;
      v |= (uint64_t)((p[byte] >> sh) & ((1u << take) - 1u)) << got;
      got += take;
      pos += take;
    }
    return v;
  }
  // Number of 1-bits before the next 0-bit, reading at most `limit` bits past pos.
  // Returns -1 if no 0-bit is found within the limit.
  inline int64_t unary(int64_t limit) {
    int64_t c = 0;
    while (true) {
      if (c > limit || pos >= nbits) return -1;
      const int64_t byte = pos >> 3;
      const int sh = (int)(pos & 7);
      uint32_t v = (uint32_t)(p[byte] >> sh);
      const int avail = 8 - sh;
      uint32_t zeros = ~v & ((1u << avail) - 1u);
      if (zeros) {
        int t = __builtin_ctz(zeros);
        if (c + t >= limit + 1) return -1;
        pos += t + 1;
        return c + t;
      }
      c += avail;
      pos += avail;
    }
  }
};

// Walks one body; with Apply, adds the decoded values into out[0..numel).
// Returns a DecodeError code. `scale` is used for the ternary kind.
template <bool Apply>
int walk_body(const uint8_t* body, int64_t body_bytes, const BodyLayout& l, float scale,
              float* out) {
  if (body_bytes != l.count_bytes + l.entry_bytes + l.value_bytes) return kLengthMismatch;
  if (l.kind == kValueDense) {
    for (int64_t i = 0; i < l.numel; ++i) {
      float v;
      memcpy(&v, body + 4 * i, 4);
      if (!Apply) {
        if (!(v - v == 0.0f)) return kValueNotFinite;
      } else {
        out[i] += v;
      }
    }
    return kOk;
  }
  BitReader counts(body, l.count_bytes);
  BitReader entries(body + l.count_bytes, l.entry_bytes);
  const uint8_t* values = body + l.count_bytes + l.entry_bytes;
  const int64_t count_bits = l.n_bins + l.n_sent;
  const uint64_t mask = l.width ? (((uint64_t)1 << l.width) - 1) : 0;
  int64_t j = 0;
  for (int64_t b = 0; b < l.n_bins; ++b) {
    const int64_t start = b * l.bin_size;
    const int64_t len = (l.numel - start) < l.bin_size ? (l.numel - start) : l.bin_size;
    const int64_t c = counts.unary(count_bits - counts.pos - 1);
    if (c < 0) return kCountStreamOverrun;
    if (c > len) return kBinOverfull;
    if (j + c > l.n_sent) return kCountMismatch;
    int64_t prev = -1;
    for (int64_t t = 0; t < c; ++t, ++j) {
      const uint64_t f = entries.bits(l.field_bits);
      const int64_t o = (int64_t)(f & mask);
      if (o >= len) return kOffsetOutOfBin;
      if (o <= prev) return kOffsetOrder;
      prev = o;
      float v;
      if (l.kind == kValueTernary) {
        v = (f >> l.width) ? -scale : scale;
      } else if (l.kind == kValueFp16) {
        uint16_t hb;
        memcpy(&hb, values + 2 * j, 2);
        v = half_bits_to_float(hb);
        if (!(v - v == 0.0f)) return kValueNotFinite;
      } else {
        memcpy(&v, values + 4 * j, 4);
        if (!(v - v == 0.0f)) return kValueNotFinite;
      }
      if (Apply) out[start + o] += v;
    }
  }
  if (j != l.n_sent || counts.pos != count_bits) return kCountMismatch;
  while (counts.pos < counts.nbits) {
    if (counts.bit()) return kCountPadding;
  }
  while (entries.pos < entries.nbits) {
    if (entries.bit()) return kEntryPadding;
  }
  return kOk;
}

}  // namespace adacomp
